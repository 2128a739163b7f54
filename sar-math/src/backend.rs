//! The narrow trait a tensor library implements to run SAR, and the one generic step driver.
//!
//! SAR needs five operations: the re-weighted anchor CE, the gate, the EMA update, label
//! resampling and the p2a loss (plus `detach`). [`SarBackend`] names exactly those, over the
//! library's own tensor type, and leaves everything else (layers, optimisers) to the library.
//! It is deliberately not a general tensor abstraction.
//!
//! Losses are the associated type [`SarBackend::Loss`]: an autodiff backend returns a scalar
//! tensor in its graph (gradients come from its own backward pass); a backend without autodiff
//! returns the value with the analytic gradient computed by the fused kernels. Either way
//! [`SarBackend::loss_gradient`] reads the gradient w.r.t. the loss's differentiable input
//! (anchor logits for L_aux, features for L_p2a), which is what the cross-backend conformance
//! suite compares.
//!
//! Needs the `alloc` feature. [`BackendSarState::step`] runs one step in the spec's order on any backend:
//! L_aux → gate → EMA → L_p2a toward the updated Â; [`BackendSarState::step_mixup`] the same
//! with MixUp targets ([`SarBackend::p2a_mixup`]).

use crate::config::{GateMode, WeightMode};
use crate::error::SarError;
use alloc::vec;
use alloc::vec::Vec;

/// L_aux with its per-anchor host values.
#[derive(Debug, Clone)]
pub struct AnchorCeOutput<L> {
    /// L_aux (unweighted), differentiable w.r.t. the anchor logits.
    pub loss: L,
    /// p_c, on the host.
    pub confidence: Vec<f64>,
    /// ℓ_c, on the host.
    pub nll: Vec<f64>,
    /// w_c, on the host.
    pub weights: Vec<f64>,
    /// |U|.
    pub uncertain: usize,
}

/// weight·L_p2a as a loss, the unweighted value, and |Ω|.
#[derive(Debug, Clone)]
pub struct P2aOutput<L> {
    /// weight·L_p2a, differentiable w.r.t. the features. (The weight is folded in so that a
    /// fused kernel can write the gradient of the weighted loss in its single pass.)
    pub loss: L,
    /// L_p2a, unweighted.
    pub value: f64,
    /// |Ω|.
    pub valid: usize,
}

/// The MixUp labels of a batch of `[N, D]` features: row n is pulled toward
/// λ·Â_{a_n} + (1 − λ)·Â_{b_n} (spec §5), and is in Ω when both of its labels are (not the
/// ignore index and, under the per-class gate, both classes active). The same rule as
/// [`crate::p2a::RowLabels::Mixup`], which is the reference kernel.
#[derive(Debug, Clone, Copy)]
pub struct Mixup<'a> {
    /// y_a, one per row.
    pub labels_a: &'a [i64],
    /// y_b, one per row.
    pub labels_b: &'a [i64],
    /// λ ∈ [0, 1], the weight of y_a.
    pub lambda: f64,
}

impl<'a> Mixup<'a> {
    /// The labels as the reference kernel takes them.
    pub fn row_labels(&self) -> crate::p2a::RowLabels<'a, i64> {
        crate::p2a::RowLabels::Mixup {
            a: self.labels_a,
            b: self.labels_b,
            lambda: self.lambda,
        }
    }

    /// Checks the labels against `rows` feature rows and `classes` anchors: one label per row
    /// and side, λ in [0, 1], every label in `0..classes` or the ignore index. The errors are
    /// the reference kernel's. Heads call it before a step, so that bad input leaves the state
    /// untouched; backends call it before computing.
    pub fn check(&self, rows: usize, classes: usize, ignore_index: i64) -> Result<(), SarError> {
        let op = crate::Op::P2a;
        crate::error::check_len(op, "labels_a", self.labels_a.len(), rows)?;
        crate::error::check_len(op, "labels_b", self.labels_b.len(), rows)?;
        crate::config::check_range(op, "mixup lambda", self.lambda, 0.0, 1.0, false, "[0, 1]")?;
        for (index, &label) in self.labels_a.iter().chain(self.labels_b).enumerate() {
            if label != ignore_index && !(0..classes as i64).contains(&label) {
                return Err(SarError::Label {
                    op,
                    index: index % rows.max(1),
                    label,
                    classes,
                });
            }
        }
        Ok(())
    }

    /// Ω as a mask over the rows (labels already [checked](Mixup::check)).
    pub fn in_omega(&self, ignore_index: i64, class_active: Option<&[bool]>) -> Vec<bool> {
        let ok = |y: i64| y != ignore_index && class_active.is_none_or(|a| a[y as usize]);
        self.labels_a
            .iter()
            .zip(self.labels_b)
            .map(|(&a, &b)| ok(a) && ok(b))
            .collect()
    }
}

/// A tensor library that can run SAR. See the module docs.
pub trait SarBackend {
    /// The library's float tensor.
    type Tensor: Clone;
    /// The library's label tensor (integers).
    type Labels;
    /// A scalar loss from which the gradient w.r.t. its differentiable input can be read.
    type Loss;
    /// The adapter's error, which wraps [`SarError`].
    type Error: From<SarError> + core::fmt::Debug + core::fmt::Display;

    /// A float tensor from host values (row-major), as a differentiable leaf where the library
    /// tracks gradients.
    fn tensor(&self, shape: &[usize], data: &[f64]) -> Result<Self::Tensor, Self::Error>;
    /// A label tensor from host values.
    fn labels(&self, shape: &[usize], data: &[i64]) -> Result<Self::Labels, Self::Error>;
    /// A tensor's values on the host, row-major, widened to f64.
    fn to_host(&self, tensor: &Self::Tensor) -> Result<Vec<f64>, Self::Error>;
    /// A loss's value.
    fn loss_value(&self, loss: &Self::Loss) -> Result<f64, Self::Error>;
    /// dLoss/d`wrt`, row-major, where `wrt` is the loss's differentiable input.
    fn loss_gradient(&self, loss: &Self::Loss, wrt: &Self::Tensor)
        -> Result<Vec<f64>, Self::Error>;
    /// The tensor without gradient tracking.
    fn detach(&self, tensor: &Self::Tensor) -> Self::Tensor;

    /// Eq. 5–7 on anchor logits `[C, C]`.
    fn anchor_ce(
        &self,
        logits: &Self::Tensor,
        tau: f64,
        mode: WeightMode,
    ) -> Result<AnchorCeOutput<Self::Loss>, Self::Error>;

    /// The δ gate from the logits and ℓ (see [`crate::anchor_ce::gate`]). The default reads the
    /// C×C logits to the host, where the decision is made anyway.
    fn gate(
        &self,
        logits: &Self::Tensor,
        nll: &[f64],
        delta: f64,
        mode: GateMode,
        pass: &mut [bool],
    ) -> Result<bool, Self::Error> {
        let z = self.to_host(logits)?;
        Ok(crate::anchor_ce::gate(
            &z,
            nll.len(),
            nll,
            delta,
            mode,
            pass,
        )?)
    }

    /// Eq. 8 in place: rows with `rows[c]` become E_c the first time (`initialized[c]` false)
    /// and αÂ_c + (1−α)E_c afterwards. E is detached. Returns the rows updated.
    fn ema_update(
        &self,
        semantic: &mut Self::Tensor,
        embedded: &Self::Tensor,
        alpha: f64,
        rows: &[bool],
        initialized: &mut [bool],
    ) -> Result<usize, Self::Error>;

    /// Labels `[B, H', W']` resampled to `[B, H, W]` by PyTorch's legacy `nearest`.
    fn resample_labels(
        &self,
        labels: &Self::Labels,
        out_hw: (usize, usize),
    ) -> Result<Self::Labels, Self::Error>;

    /// Eq. 4: features `[B, D, H, W]` with labels `[B, H', W']`, or `[N, D]` with `[N]`,
    /// toward `anchors` `[C, D]` (a constant). `class_active` restricts Ω (per-class gate).
    /// The returned loss is `weight`·L_p2a.
    fn p2a(
        &self,
        features: &Self::Tensor,
        labels: &Self::Labels,
        anchors: &Self::Tensor,
        ignore_index: i64,
        class_active: Option<&[bool]>,
        weight: f64,
    ) -> Result<P2aOutput<Self::Loss>, Self::Error>;

    /// Eq. 4 with MixUp targets (see [`Mixup`]): features `[N, D]` toward
    /// λ·Â_{a_n} + (1 − λ)·Â_{b_n}, `anchors` `[C, D]` a constant, `class_active` restricting Ω
    /// (per-class gate). The returned loss is `weight`·L_p2a.
    fn p2a_mixup(
        &self,
        features: &Self::Tensor,
        mixup: Mixup<'_>,
        anchors: &Self::Tensor,
        ignore_index: i64,
        class_active: Option<&[bool]>,
        weight: f64,
    ) -> Result<P2aOutput<Self::Loss>, Self::Error>;
}

/// The losses of one step on a backend.
#[derive(Debug)]
pub struct BackendStep<L> {
    /// L_aux (unweighted) and the per-anchor values.
    pub aux: AnchorCeOutput<L>,
    /// λ2·L_p2a (with the unweighted value), or `None` when the gate failed (p2a is not
    /// applied at all then).
    pub p2a: Option<P2aOutput<L>>,
    /// Gate decision (global), or whether any anchor passed (per-class).
    pub gate_passed: bool,
    /// The per-anchor gate test.
    pub class_pass: Vec<bool>,
    /// Rows of Â updated.
    pub updated_classes: usize,
}

/// SAR state on a backend: Â as a backend tensor, and the per-class "initialised" flags.
#[derive(Debug, Clone)]
pub struct BackendSarState<T> {
    /// Â, `[C, D]`, without gradient.
    pub semantic: T,
    /// Per-class flags (all equal under the global gate).
    pub initialized: Vec<bool>,
    /// The configuration.
    pub config: crate::SarConfig,
}

impl<T: Clone> BackendSarState<T> {
    /// A fresh state: Â = `zeros` (`[C, D]`), nothing initialised. Validates the config.
    pub fn new(config: crate::SarConfig, classes: usize, zeros: T) -> Result<Self, SarError> {
        config.validate()?;
        Ok(BackendSarState {
            semantic: zeros,
            initialized: vec![false; classes],
            config,
        })
    }

    /// Whether every row of Â has been initialised.
    pub fn fully_initialized(&self) -> bool {
        self.initialized.iter().all(|&b| b)
    }

    /// One step in the spec's order on backend `b`: L_aux on `logits` (Z = g_θ(E)), the gate,
    /// the EMA with `embedded` (E), then λ2·L_p2a of `features` toward the updated Â if the gate
    /// passed. The caller adds λ1·L_aux + λ2·L_p2a to its task loss.
    pub fn step<B: SarBackend<Tensor = T>>(
        &mut self,
        b: &B,
        logits: &T,
        embedded: &T,
        features: &T,
        labels: &B::Labels,
    ) -> Result<BackendStep<B::Loss>, B::Error> {
        let ignore = self.config.ignore_index;
        self.step_with(b, logits, embedded, |semantic, active, weight| {
            b.p2a(features, labels, semantic, ignore, active, weight)
        })
    }

    /// [`BackendSarState::step`] for a MixUp batch of `[N, D]` features: the p2a term is
    /// [`SarBackend::p2a_mixup`].
    pub fn step_mixup<B: SarBackend<Tensor = T>>(
        &mut self,
        b: &B,
        logits: &T,
        embedded: &T,
        features: &T,
        mixup: Mixup<'_>,
    ) -> Result<BackendStep<B::Loss>, B::Error> {
        let ignore = self.config.ignore_index;
        self.step_with(b, logits, embedded, |semantic, active, weight| {
            b.p2a_mixup(features, mixup, semantic, ignore, active, weight)
        })
    }

    /// [`BackendSarState::step`] with the p2a term supplied by the caller (e.g. MixUp targets):
    /// `p2a(Â, class_active, λ2)` is called only when the gate passed, with Â already updated.
    pub fn step_with<B: SarBackend<Tensor = T>>(
        &mut self,
        b: &B,
        logits: &T,
        embedded: &T,
        p2a: impl FnOnce(&T, Option<&[bool]>, f64) -> Result<P2aOutput<B::Loss>, B::Error>,
    ) -> Result<BackendStep<B::Loss>, B::Error> {
        let cfg = self.config;
        let aux = b.anchor_ce(logits, cfg.tau, cfg.weights)?;
        let c = aux.nll.len();
        if self.initialized.len() != c {
            return Err(SarError::Length {
                op: crate::Op::Step,
                what: "initialized",
                expected: c,
                actual: self.initialized.len(),
            }
            .into());
        }
        let mut class_pass = vec![false; c];
        let gate_passed = b.gate(logits, &aux.nll, cfg.delta, cfg.gate, &mut class_pass)?;
        let rows: Vec<bool> = match cfg.gate {
            GateMode::Global => vec![gate_passed; c],
            GateMode::PerClass => class_pass.clone(),
        };
        let updated_classes = b.ema_update(
            &mut self.semantic,
            embedded,
            cfg.alpha,
            &rows,
            &mut self.initialized,
        )?;
        let p2a = if gate_passed {
            let active = match cfg.gate {
                GateMode::Global => None,
                GateMode::PerClass => Some(&class_pass[..]),
            };
            Some(p2a(&self.semantic, active, cfg.lambda_p2a)?)
        } else {
            None
        };
        Ok(BackendStep {
            aux,
            p2a,
            gate_passed,
            class_pass,
            updated_classes,
        })
    }
}

/// The comparison baselines of spec §7 on a backend: batch class prototypes and CAR's
/// intra-class loss (see [`crate::prototype`], the reference kernels). CR needs no new
/// operation: it is [`SarBackend::p2a`] toward the raw anchors A.
pub trait BaselineBackend: SarBackend {
    /// Per-class mean of `features` (`[B, D, H, W]` with labels `[B, H', W']` resampled by
    /// legacy `nearest`, or `[N, D]` with `[N]`) over Ω = labels ≠ `ignore_index`, as a
    /// constant `[classes, D]` tensor (rows of absent classes zero), with the per-class counts.
    fn class_prototypes(
        &self,
        features: &Self::Tensor,
        labels: &Self::Labels,
        classes: usize,
        ignore_index: i64,
    ) -> Result<(Self::Tensor, Vec<u64>), Self::Error>;

    /// `weight`·L_CAR with L_CAR = max(m², 1e-5), m = (1/(N·D)) Σ_{i∈Ω} Σ_d |F_{i,d} − P_{y_i,d}|,
    /// N every pixel (or row) of the batch, P = `prototypes` `[C, D]` a constant. The
    /// returned `value` is L_CAR unweighted, `valid` is |Ω|.
    fn car(
        &self,
        features: &Self::Tensor,
        labels: &Self::Labels,
        prototypes: &Self::Tensor,
        ignore_index: i64,
        weight: f64,
    ) -> Result<P2aOutput<Self::Loss>, Self::Error>;
}

/// The losses of one baseline step ([`prototype_step`], [`car_step`]).
#[derive(Debug)]
pub struct BaselineStep<L> {
    /// weight·L (with the unweighted value and |Ω|).
    pub loss: P2aOutput<L>,
    /// Classes present in the batch (at least one pixel in Ω).
    pub present_classes: usize,
}

/// The EM-style prototype baseline (Eq. 1–3): the batch prototypes P of the detached
/// `features` update the state's EMA of class prototypes (`state.semantic`, α = its config's
/// `alpha`; a class's first prototype is copied, classes absent from the batch keep their last
/// value), then `weight`·L_p2a pulls `features` toward the updated EMA. Classes never seen
/// are outside Ω (they cannot occur in this batch anyway, since every class present was just
/// initialised).
pub fn prototype_step<B: BaselineBackend>(
    b: &B,
    state: &mut BackendSarState<B::Tensor>,
    features: &B::Tensor,
    labels: &B::Labels,
    weight: f64,
) -> Result<BaselineStep<B::Loss>, B::Error> {
    let classes = state.initialized.len();
    let ignore = state.config.ignore_index;
    let (prototypes, counts) = b.class_prototypes(&b.detach(features), labels, classes, ignore)?;
    let present: Vec<bool> = counts.iter().map(|&n| n > 0).collect();
    let present_classes = present.iter().filter(|&&p| p).count();
    b.ema_update(
        &mut state.semantic,
        &prototypes,
        state.config.alpha,
        &present,
        &mut state.initialized,
    )?;
    let active = if state.fully_initialized() {
        None
    } else {
        Some(&state.initialized[..])
    };
    let loss = b.p2a(features, labels, &state.semantic, ignore, active, weight)?;
    Ok(BaselineStep {
        loss,
        present_classes,
    })
}

/// CAR's intra-class term: `weight`·L_CAR of `features` toward this batch's (detached)
/// class prototypes. Stateless.
pub fn car_step<B: BaselineBackend>(
    b: &B,
    classes: usize,
    ignore_index: i64,
    features: &B::Tensor,
    labels: &B::Labels,
    weight: f64,
) -> Result<BaselineStep<B::Loss>, B::Error> {
    let (prototypes, counts) =
        b.class_prototypes(&b.detach(features), labels, classes, ignore_index)?;
    let present_classes = counts.iter().filter(|&&n| n > 0).count();
    let loss = b.car(features, labels, &prototypes, ignore_index, weight)?;
    Ok(BaselineStep {
        loss,
        present_classes,
    })
}
