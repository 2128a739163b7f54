//! Parameters by name, the SAR head and SGD on dfdx (f32). The networks that use them are in
//! `sar-dfdx-models`.
//!
//! - [`Params`]: every variable by name, flat, with its shape — the same names, shapes and
//!   layouts as `sar-models` and `sar-candle` (`stage1.conv.weight [32, C, 3, 3]`,
//!   `layer2.0.bn1.running_var [32]`, `fc.weight [K, D]`, `sar.embed.fc1.weight [D, D]`, …), so
//!   a checkpoint written by one backend loads in the other. Values come from the caller (the
//!   trainer initialises them with `sar-models`' seeded initialisers, so both backends start
//!   from the same weights). [`linear`] applies `{prefix}.weight`/`.bias` from them.
//! - [`SarHead`]: the fixed anchors A `[C, D]`, h_ψ = [Linear → BatchNorm (train mode over the
//!   C anchors) → ReLU] ×2, Z = g_θ(h_ψ(A)) through the model's own `fc`, then L_aux → gate →
//!   EMA → L_p2a in the spec's order.
//! - [`Sgd`]: PyTorch's SGD (momentum, Nesterov, weight decay) on the parameters, with the
//!   momentum buffers by name; [`AdamW`]: PyTorch's AdamW with m, v and the step count by
//!   name. Both take each variable's learning rate and weight decay from the caller when
//!   stepping ([`Sgd::step_grouped`], [`AdamW::step`]), so parameter groups (mmcv's
//!   `custom_keys`) and schedules stay the trainer's.

use crate::SarDfdxError;
use crate::{
    dev_err, shape_err, DfdxLabels, DfdxLoss, DfdxTensor, Float, Result, SarDevice, TapedBackend,
    Traced,
};
use dfdx::prelude::*;
use sar_math::adamw::{adamw_step, AdamWConfig};
use sar_math::backend::{car_step, prototype_step, BackendSarState, Mixup, SarBackend};
use sar_math::sgd::{sgd_step, SgdConfig};
use sar_math::{RegularizerKind, SarConfig};
use std::collections::{BTreeMap, BTreeSet};

/// Rows `[R, C]` of element type `E` (f32 unless named) on device `D` with tape `T`.
pub type Rows<D, T, E = f32> = Tensor<(usize, usize), E, D, T>;

/// A tensor on the host: shape and values.
pub type HostTensor<E = f32> = (Vec<usize>, Vec<E>);

/// Whether a variable is a BatchNorm running statistic (`sar-math`'s one definition).
pub use sar_math::batch_norm::is_running_stat;
use sar_math::batch_norm::EPS as BN_EPS;

/// Variables by name (see the module docs), of element type `E` (f32 for training; f64 for
/// the cross-checks against candle). Cloning shares the values (they are immutable; updates
/// replace them).
#[derive(Clone)]
pub struct Params<D, E = f32>
where
    E: Float,
    D: SarDevice<E>,
{
    values: BTreeMap<String, Tensor<(usize,), E, D>>,
    shapes: BTreeMap<String, Vec<usize>>,
    /// Variables kept as they are (a second stage's frozen model): no gradient, no update.
    frozen: BTreeSet<String>,
    device: D,
}

impl<E: Float, D: SarDevice<E>> Params<D, E> {
    /// Variables from host values `(name, shape, values)`.
    pub fn from_host(
        device: &D,
        entries: impl IntoIterator<Item = (String, Vec<usize>, Vec<E>)>,
    ) -> Result<Self> {
        let mut p = Params {
            values: BTreeMap::new(),
            shapes: BTreeMap::new(),
            frozen: BTreeSet::new(),
            device: device.clone(),
        };
        for (name, shape, v) in entries {
            if shape.iter().product::<usize>() != v.len() {
                return shape_err(format!(
                    "variable {name}: {} values for shape {shape:?}",
                    v.len()
                ));
            }
            let n = v.len();
            p.values
                .insert(name.clone(), device.tensor_from_vec(v, (n,)));
            p.shapes.insert(name, shape);
        }
        Ok(p)
    }

    /// The device.
    pub fn device(&self) -> &D {
        &self.device
    }

    /// All names, sorted.
    pub fn names(&self) -> impl Iterator<Item = &String> {
        self.values.keys()
    }

    /// The shape of `name`.
    pub fn shape(&self, name: &str) -> Result<&[usize]> {
        self.shapes
            .get(name)
            .map(|s| &s[..])
            .ok_or_else(|| SarDfdxError::Shape(format!("no variable {name}")))
    }

    /// The values of `name`.
    pub fn get(&self, name: &str) -> Result<&Tensor<(usize,), E, D>> {
        self.values.get(name).ok_or_else(|| {
            SarDfdxError::Shape(format!("the model needs variable {name}, which is missing"))
        })
    }

    /// Replaces the values of `name` (same number of elements).
    pub fn set(&mut self, name: &str, v: Vec<E>) -> Result<()> {
        let n = self.shape(name)?.iter().product::<usize>();
        if v.len() != n {
            return shape_err(format!("variable {name}: {} values for {n}", v.len()));
        }
        let t = self.device.tensor_from_vec(v, (n,));
        self.values.insert(name.to_string(), t);
        Ok(())
    }

    /// Replaces the tensor of `name` (same length; used by the optimiser).
    fn replace(&mut self, name: &str, t: Tensor<(usize,), E, D>) {
        self.values.insert(name.to_string(), t);
    }

    /// Every variable on the host: `(name, shape, values)`, sorted by name.
    pub fn to_host(&self) -> Vec<(String, Vec<usize>, Vec<E>)> {
        self.values
            .iter()
            .map(|(n, t)| (n.clone(), self.shapes[n].clone(), t.as_vec()))
            .collect()
    }

    /// Names of the trained variables (not running statistics, not frozen), sorted.
    pub fn trainable(&self) -> Vec<String> {
        self.values
            .keys()
            .filter(|n| !is_running_stat(n) && !self.frozen.contains(*n))
            .cloned()
            .collect()
    }

    /// Freezes every variable for which `train` is false (a second stage trains a few): the
    /// optimisers leave them as they are and [`Params::alloc_grads`] allocates no gradient
    /// for them. Running statistics stay what BatchNorm makes of them.
    pub fn freeze_unless(&mut self, train: impl Fn(&str) -> bool) {
        self.frozen = self
            .values
            .keys()
            .filter(|n| !is_running_stat(n) && !train(n))
            .cloned()
            .collect();
    }

    /// `name` with an empty tape of type `T` (its gradient accumulates under its id).
    pub fn taped<T: Tape<E, D>>(&self, name: &str) -> Result<Tensor<(usize,), E, D, T>> {
        Ok(self.get(name)?.retaped::<T>())
    }

    /// A gradient store with a zero gradient allocated for every trained variable, to trace
    /// the input with: every variable then has a gradient after backward, reached or not.
    pub fn alloc_grads(&self) -> Result<Gradients<E, D>> {
        let mut g = Gradients::leaky();
        for n in self.trainable() {
            g.try_alloc_for(&self.values[&n]).map_err(dev_err)?;
        }
        Ok(g)
    }

    /// The gradient of `name` from `grads`, on the host.
    pub fn gradient(&self, grads: &Gradients<E, D>, name: &str) -> Result<Vec<E>> {
        Ok(grads.get(self.get(name)?).as_vec())
    }
}

/// `x W^T + b` with `{prefix}.weight [out, in]` (or a 1×1 conv's `[out, in, 1, 1]`) and (if
/// present) `{prefix}.bias [out]`.
pub fn linear<E: Float, D: SarDevice<E>, T: Tape<E, D>>(
    params: &Params<D, E>,
    x: Rows<D, T, E>,
    prefix: &str,
) -> Result<Rows<D, T, E>> {
    let (n, inputs) = *x.shape();
    let wname = format!("{prefix}.weight");
    // A 1×1 conv's weight `[out, in, 1, 1]` (segmentation's `conv_seg`) is the same matrix.
    let (out, win) = match *params.shape(&wname)? {
        [out, win] | [out, win, 1, 1] => (out, win),
        _ => return shape_err(format!("{wname} must be [out, in] or [out, in, 1, 1]")),
    };
    if win != inputs {
        return shape_err(format!(
            "{wname} [{out}, {win}] does not fit {inputs} inputs"
        ));
    }
    let w = params
        .taped::<T>(&wname)?
        .reshape_like(&(out, inputs))
        .permute::<_, Axes2<1, 0>>();
    let y = x.matmul(w);
    let bname = format!("{prefix}.bias");
    Ok(if params.values.contains_key(&bname) {
        y + params
            .taped::<T>(&bname)?
            .broadcast_like::<_, Axis<0>>(&(n, out))
    } else {
        y
    })
}

/// What one SAR step produced.
pub struct SarStep<D: SarDevice<f32>, T> {
    /// λ1·L_aux + λ2·L_p2a, with the tape.
    pub loss: Tensor<Rank0, f32, D, T>,
    /// L_aux (unweighted).
    pub loss_aux: f64,
    /// L_p2a (unweighted; 0 when the gate failed).
    pub loss_p2a: f64,
    /// The gate.
    pub gate_passed: bool,
    /// |Ω|.
    pub valid: usize,
}

/// SAR on a dfdx classifier (see the module docs). Variables `{prefix}.embed.*` live in the
/// model's [`Params`]; the buffers (anchors, Â, initialised flags) here.
pub struct SarHead<D: SarDevice<f32>> {
    /// The fixed anchors A `[C, D]`.
    pub anchors: Tensor<(usize, usize), f32, D>,
    /// Â `[C, D]`, the "initialised" flags and the configuration: `sar-math`'s state machine.
    state: BackendSarState<DfdxTensor<f32, D>>,
    prefix: String,
    classes: usize,
    dim: usize,
    regularizer: RegularizerKind,
    classifier: String,
    segmentation: bool,
    /// Added times I to the anchors' logits before each step (0: the specified step).
    anchor_logit_offset: f32,
}

/// What a [`SarHead`] is built from (besides its anchors): SAR's hyper-parameters, C, D and
/// the name prefix (default `sar`), as in `sar-candle`'s `SarHeadConfig`.
#[derive(Debug, Clone, PartialEq)]
pub struct SarHeadConfig {
    /// Prefix of the variable and buffer names (default `sar`).
    pub prefix: String,
    /// SAR's hyper-parameters.
    pub sar: SarConfig,
    /// C.
    pub classes: usize,
    /// D.
    pub dim: usize,
    /// SAR or a baseline (default SAR), as in `sar-candle`: the baselines have no h_ψ.
    pub regularizer: RegularizerKind,
    /// The name prefix of the model's classifier that also classifies the embedded anchors
    /// (default `fc`; `decode_head.conv_seg` for the segmentation networks).
    pub classifier: String,
    /// The segmentation embedding (default false): h_ψ ends in a 1×1 conv without bias
    /// `{prefix}.embed.conv` → BatchNorm `{prefix}.embed.bn3` → ReLU, as `sar-candle`'s
    /// `EmbeddingKind::Segmentation`.
    pub segmentation: bool,
}

impl SarHeadConfig {
    /// C classes, D dimensions, the prefix `sar`.
    pub fn new(sar: SarConfig, classes: usize, dim: usize) -> Self {
        SarHeadConfig {
            prefix: "sar".to_string(),
            sar,
            classes,
            dim,
            regularizer: RegularizerKind::Sar,
            classifier: "fc".to_string(),
            segmentation: false,
        }
    }

    /// For a segmentation network: the segmentation embedding and the classifier
    /// `decode_head.conv_seg`.
    pub fn segmentation(mut self) -> Self {
        self.segmentation = true;
        self.classifier = "decode_head.conv_seg".to_string();
        self
    }

    /// With a baseline regulariser instead of SAR.
    pub fn regularizer(mut self, regularizer: RegularizerKind) -> Self {
        self.regularizer = regularizer;
        self
    }

    /// With another name prefix.
    pub fn prefix(mut self, prefix: &str) -> Self {
        self.prefix = prefix.to_string();
        self
    }
}

impl<D: SarDevice<f32>> SarHead<D> {
    /// A head described by `cfg` with anchors `[classes, dim]` (host values, e.g. from
    /// `sar_math::anchors`).
    pub fn new(device: &D, cfg: &SarHeadConfig, anchors: Vec<f32>) -> Result<Self> {
        let SarHeadConfig {
            ref prefix,
            sar: config,
            classes,
            dim,
            regularizer,
            ref classifier,
            segmentation,
        } = *cfg;
        config.validate()?;
        if anchors.len() != classes * dim {
            return shape_err(format!(
                "{} anchor values for [{classes}, {dim}]",
                anchors.len()
            ));
        }
        let zeros = DfdxTensor {
            data: device.zeros_like(&(classes * dim,)),
            shape: vec![classes, dim],
        };
        Ok(SarHead {
            anchors: device.tensor_from_vec(anchors, (classes, dim)),
            state: BackendSarState::new(config, classes, zeros)?,
            prefix: prefix.to_string(),
            classes,
            dim,
            regularizer,
            classifier: classifier.clone(),
            segmentation,
            anchor_logit_offset: 0.0,
        })
    }

    /// Adds `offset`·I to the anchors' logits Z = `fc`(h_ψ(A)) before every later step (0, the
    /// default, is the specified step). With a large offset each anchor is classified as its
    /// own class with confidence above δ, so the gate passes and L_p2a runs on any weights:
    /// for benchmarks that must time L_p2a on an untrained model (candle's wrap the classifier
    /// the same way), never for training.
    pub fn set_anchor_logit_offset(&mut self, offset: f32) {
        self.anchor_logit_offset = offset;
    }

    /// SAR or the baseline this head applies.
    pub fn regularizer(&self) -> RegularizerKind {
        self.regularizer
    }

    /// SAR's hyper-parameters.
    pub fn config(&self) -> &SarConfig {
        &self.state.config
    }

    /// Â `[C, D]`, flat.
    pub fn semantic_anchors(&self) -> &Tensor<(usize,), f32, D> {
        &self.state.semantic.data
    }

    /// Per-class "initialised" flags.
    pub fn initialized(&self) -> &[bool] {
        &self.state.initialized
    }

    /// Classes C.
    pub fn classes(&self) -> usize {
        self.classes
    }

    /// Feature dimension D.
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// Whether every row of Â is initialised.
    pub fn fully_initialized(&self) -> bool {
        self.state.fully_initialized()
    }

    /// E = h_ψ(A) `[C, D]`, BatchNorm over the C anchors in training mode (with the
    /// segmentation embedding's conv block when configured).
    pub fn embed<T: Tape<f32, D>>(&self, params: &Params<D>) -> Result<Rows<D, T>> {
        let mut x: Rows<D, T> = self.anchors.retaped::<T>();
        let (c, d) = (self.classes, self.dim);
        // The segmentation embedding's 1×1 conv on the C anchor rows is a D×D matrix without
        // bias, which `linear` applies.
        let blocks: &[(&str, &str)] = if self.segmentation {
            &[("fc1", "bn1"), ("fc2", "bn2"), ("conv", "bn3")]
        } else {
            &[("fc1", "bn1"), ("fc2", "bn2")]
        };
        for (fc, bn) in blocks {
            let y = linear(params, x, &format!("{}.embed.{fc}", self.prefix))?;
            let g = params.taped::<T>(&format!("{}.embed.{bn}.weight", self.prefix))?;
            let b = params.taped::<T>(&format!("{}.embed.{bn}.bias", self.prefix))?;
            x = (y.normalize::<Axis<0>>(BN_EPS) * g.broadcast_like::<_, Axis<0>>(&(c, d))
                + b.broadcast_like::<_, Axis<0>>(&(c, d)))
            .relu();
        }
        Ok(x)
    }

    /// One SAR step with features `[N, D]` carrying the model's tape: L_aux on
    /// Z = `fc`(h_ψ(A)), the gate, the EMA, and λ2·L_p2a toward Â if the gate passed, in the
    /// spec's order by `sar-math`'s [`BackendSarState`] (the losses continue the model's tape).
    /// With `mix = Some((labels_b, λ))` the p2a target is `λ·Â[y] + (1−λ)·Â[y_b]` (MixUp,
    /// [`sar_math::backend::SarBackend::p2a_mixup`]), rows counted when both labels are valid.
    pub fn step(
        &mut self,
        params: &Params<D>,
        features: Rows<D, OwnedTape<f32, D>>,
        labels: &[i64],
        mix: Option<(&[i64], f64)>,
    ) -> Result<SarStep<D, OwnedTape<f32, D>>> {
        let (n, d) = *features.shape();
        if d != self.dim || labels.len() != n {
            return shape_err(format!(
                "SAR: features [{n}, {d}] with {} labels; the head has D = {}",
                labels.len(),
                self.dim
            ));
        }
        let mixup = mix.map(|(labels_b, lambda)| Mixup {
            labels_a: labels,
            labels_b,
            lambda,
        });
        if let Some(m) = &mixup {
            // Checked before the step, so that bad input leaves Â untouched.
            m.check(n, self.classes, self.state.config.ignore_index)?;
        }
        let (c, dim) = (self.classes, self.dim);
        if self.regularizer != RegularizerKind::Sar {
            return self.baseline_step(params, features, labels, mixup);
        }
        let e: Rows<D, OwnedTape<f32, D>> = self.embed(params)?;
        let embedded = DfdxTensor {
            data: e.retaped::<NoneTape>().reshape_like(&(c * dim,)),
            shape: vec![c, dim],
        };
        let mut z = linear(params, e, &self.classifier)?;
        if *z.shape() != (c, c) {
            return shape_err(format!(
                "the classifier maps the [{c}, {dim}] anchors to {:?}, expected [{c}, {c}]",
                z.shape()
            ));
        }
        if self.anchor_logit_offset != 0.0 {
            let shift: Vec<f32> = (0..c * c)
                .map(|i| {
                    if i % (c + 1) == 0 {
                        self.anchor_logit_offset
                    } else {
                        0.0
                    }
                })
                .collect();
            z = z + params.device().tensor_from_vec(shift, (c, c));
        }
        let (b, zt, ft) = TapedBackend::carrying(params.device(), z, features);
        let step = match mixup {
            None => {
                let lt = DfdxLabels {
                    data: labels.to_vec(),
                    shape: vec![n],
                };
                self.state.step(&b, &zt, &embedded, &ft, &lt)?
            }
            Some(m) => self.state.step_mixup(&b, &zt, &embedded, &ft, m)?,
        };
        let loss_aux = step.aux.loss.value();
        let aux = traced(step.aux.loss)? * self.state.config.lambda_aux as f32;
        let Some(p2a) = step.p2a else {
            // p2a is not applied at all; the features' tape joins through a zero term so the
            // caller's graph stays one.
            let (_, tape) = b
                .take_features()
                .ok_or_else(|| SarDfdxError::Device("the features' tape is gone".into()))?
                .split_tape();
            let zero = params.device().zeros::<Rank0>().put_tape(tape);
            return Ok(SarStep {
                loss: aux + zero,
                loss_aux,
                loss_p2a: 0.0,
                gate_passed: false,
                valid: 0,
            });
        };
        Ok(SarStep {
            loss: aux + traced(p2a.loss)?,
            loss_aux,
            loss_p2a: p2a.value,
            gate_passed: true,
            valid: p2a.valid,
        })
    }

    /// [`SarHead::step`] of a baseline (CR, CAR, prototypes; see `sar-candle`'s head).
    fn baseline_step(
        &mut self,
        params: &Params<D>,
        features: Rows<D, OwnedTape<f32, D>>,
        labels: &[i64],
        mixup: Option<Mixup<'_>>,
    ) -> Result<SarStep<D, OwnedTape<f32, D>>> {
        let n = labels.len();
        let (ignore, weight) = (self.state.config.ignore_index, self.state.config.lambda_p2a);
        let (b, ft) = TapedBackend::carrying_features(params.device(), features);
        let lt = DfdxLabels {
            data: labels.to_vec(),
            shape: vec![n],
        };
        let anchors = DfdxTensor {
            data: self
                .anchors
                .clone()
                .reshape_like(&(self.classes * self.dim,)),
            shape: vec![self.classes, self.dim],
        };
        let out = match (self.regularizer, mixup) {
            (RegularizerKind::Cr, None) => b.p2a(&ft, &lt, &anchors, ignore, None, weight)?,
            (RegularizerKind::Cr, Some(m)) => b.p2a_mixup(&ft, m, &anchors, ignore, None, weight)?,
            (RegularizerKind::Car, None) => {
                car_step(&b, self.classes, ignore, &ft, &lt, weight)?.loss
            }
            (RegularizerKind::Prototype, None) => {
                prototype_step(&b, &mut self.state, &ft, &lt, weight)?.loss
            }
            (kind, _) => {
                return shape_err(format!(
                    "the {kind:?} baseline has no MixUp rule (batch prototypes of mixed images are undefined); train it without MixUp"
                ))
            }
        };
        Ok(SarStep {
            loss: traced(out.loss)?,
            loss_aux: 0.0,
            loss_p2a: out.value,
            gate_passed: true,
            valid: out.valid,
        })
    }

    /// The buffers under the names `sar-candle`'s head uses: `{prefix}.anchors`,
    /// `{prefix}.semantic_anchors`, `{prefix}.initialized` (0/1), as host values with shapes.
    pub fn buffers(&self) -> Vec<(String, Vec<usize>, Vec<f32>)> {
        let (c, d) = (self.classes, self.dim);
        vec![
            (
                format!("{}.anchors", self.prefix),
                vec![c, d],
                self.anchors.as_vec(),
            ),
            (
                format!("{}.semantic_anchors", self.prefix),
                vec![c, d],
                self.state.semantic.data.as_vec(),
            ),
            (
                format!("{}.initialized", self.prefix),
                vec![c],
                self.state
                    .initialized
                    .iter()
                    .map(|&b| b as u8 as f32)
                    .collect(),
            ),
        ]
    }

    /// Restores the buffers from `get(name)` (shape-checked).
    pub fn load_buffers(&mut self, get: &dyn Fn(&str) -> Option<HostTensor>) -> Result<()> {
        let (c, d) = (self.classes, self.dim);
        let fetch = |suffix: &str, shape: &[usize]| -> Result<Vec<f32>> {
            let name = format!("{}.{suffix}", self.prefix);
            let (s, v) = get(&name)
                .ok_or_else(|| SarDfdxError::Shape(format!("checkpoint lacks `{name}`")))?;
            if s != shape {
                return shape_err(format!(
                    "checkpoint `{name}` has shape {s:?}, expected {shape:?}"
                ));
            }
            Ok(v)
        };
        let anchors = fetch("anchors", &[c, d])?;
        let semantic = fetch("semantic_anchors", &[c, d])?;
        let init = fetch("initialized", &[c])?;
        let dev = self.anchors.device().clone();
        self.anchors = dev.tensor_from_vec(anchors, (c, d));
        self.state.semantic = DfdxTensor {
            data: dev.tensor_from_vec(semantic, (c * d,)),
            shape: vec![c, d],
        };
        self.state.initialized = init.iter().map(|&v| v != 0.0).collect();
        Ok(())
    }
}

/// A head loss's tape-carrying scalar.
fn traced<D: SarDevice<f32>>(loss: DfdxLoss<f32, D>) -> Result<Traced<f32, D>> {
    loss.into_traced()
        .ok_or_else(|| SarDfdxError::Device("the loss's tape was consumed".into()))
}

/// A trained variable's values and its gradient on the host, what the optimisers update; a
/// variable the loss did not reach gets a zero gradient.
fn values_and_gradient<D: SarDevice<f32>>(
    params: &Params<D>,
    grads: &mut Gradients<f32, D>,
    name: &str,
) -> Result<(Vec<f32>, Vec<f32>)> {
    let w = params.get(name)?;
    grads.try_alloc_for(w).map_err(dev_err)?;
    Ok((w.as_vec(), grads.get(w).as_vec()))
}

/// PyTorch's SGD (dampening 0): g ← ∇w + wd·w; b ← g on the first step, else μ·b + g;
/// d ← g + μ·b (Nesterov) or b; w ← w − lr·d, applied by [`sar_math::sgd::sgd_step`] (the one
/// definition of the rule) over the host values. Momentum buffers by variable name, on the
/// device.
pub struct Sgd<D: SarDevice<f32>> {
    /// Learning rate (set per step by the schedule).
    pub lr: f64,
    /// μ.
    pub momentum: f64,
    /// wd.
    pub weight_decay: f64,
    /// Nesterov momentum.
    pub nesterov: bool,
    buffers: BTreeMap<String, Tensor<(usize,), f32, D>>,
}

impl<D: SarDevice<f32>> Sgd<D> {
    /// An optimiser without momentum buffers yet.
    pub fn new(lr: f64, momentum: f64, weight_decay: f64, nesterov: bool) -> Self {
        Sgd {
            lr,
            momentum,
            weight_decay,
            nesterov,
            buffers: BTreeMap::new(),
        }
    }

    /// One update of every trained variable of `params` from `grads`. A variable without a
    /// gradient in `grads` (the loss did not reach it, and the input was not traced with
    /// [`Params::alloc_grads`]) gets a zero one: weight decay and momentum still apply.
    pub fn step(&mut self, params: &mut Params<D>, grads: &mut Gradients<f32, D>) -> Result<()> {
        let (lr, wd) = (self.lr, self.weight_decay);
        self.step_grouped(params, grads, &|_| (lr, wd))
    }

    /// [`Sgd::step`] with each variable's learning rate and weight decay `rate_and_decay(name)`
    /// instead of [`Sgd::lr`] and [`Sgd::weight_decay`] (parameter groups).
    pub fn step_grouped(
        &mut self,
        params: &mut Params<D>,
        grads: &mut Gradients<f32, D>,
        rate_and_decay: &dyn Fn(&str) -> (f64, f64),
    ) -> Result<()> {
        for name in params.trainable() {
            let (lr, weight_decay) = rate_and_decay(&name);
            let cfg = SgdConfig {
                lr,
                momentum: self.momentum,
                weight_decay,
                nesterov: self.nesterov,
            };
            let (mut values, grad) = values_and_gradient(params, grads, &name)?;
            let fresh = !self.buffers.contains_key(&name);
            let mut b = match self.buffers.remove(&name) {
                Some(b) => b.as_vec(),
                None if cfg.momentum != 0.0 => vec![0.0; values.len()],
                None => Vec::new(),
            };
            sgd_step(&cfg, &mut values, &grad, &mut b, fresh)?;
            let n = values.len();
            if cfg.momentum != 0.0 {
                let b = params.device().tensor_from_vec(b, (n,));
                self.buffers.insert(name.clone(), b);
            }
            let t = params.device().tensor_from_vec(values, (n,));
            params.replace(&name, t);
        }
        Ok(())
    }

    /// The momentum buffers on the host, by variable name.
    pub fn buffers(&self) -> Vec<(String, Vec<f32>)> {
        self.buffers
            .iter()
            .map(|(n, b)| (n.clone(), b.as_vec()))
            .collect()
    }

    /// Replaces the momentum buffers (names and lengths checked against `params`).
    pub fn load_buffers(
        &mut self,
        params: &Params<D>,
        buffers: Vec<(String, Vec<f32>)>,
    ) -> Result<()> {
        let mut map = BTreeMap::new();
        for (name, b) in buffers {
            let n: usize = params.shape(&name)?.iter().product();
            if b.len() != n || is_running_stat(&name) {
                return shape_err(format!(
                    "momentum buffer for {name} does not fit the variable"
                ));
            }
            map.insert(name, params.device().tensor_from_vec(b, (n,)));
        }
        self.buffers = map;
        Ok(())
    }
}

/// PyTorch's AdamW (decoupled weight decay, no AMSGrad), applied by
/// [`sar_math::adamw::adamw_step`] (the one definition of the rule) over the host values: per
/// variable m, v (on the device) and its own step count, by name. Every trained variable
/// steps: the trainer's losses reach them all (candle's optimiser skips a variable no loss
/// reaches; here it would step with a zero gradient).
pub struct AdamW<D: SarDevice<f32>> {
    /// β1.
    pub beta1: f64,
    /// β2.
    pub beta2: f64,
    /// ε.
    pub eps: f64,
    /// Per variable: m, v and the number of steps taken.
    state: BTreeMap<String, AdamWState<D>>,
}

/// One variable's AdamW state.
type AdamWState<D> = (Tensor<(usize,), f32, D>, Tensor<(usize,), f32, D>, u64);

/// One variable's AdamW state on the host: its name, m, v and the steps taken.
pub type HostAdamWState = (String, Vec<f32>, Vec<f32>, u64);

impl<D: SarDevice<f32>> AdamW<D> {
    /// An optimiser with no state yet.
    pub fn new(betas: (f64, f64), eps: f64) -> Self {
        AdamW {
            beta1: betas.0,
            beta2: betas.1,
            eps,
            state: BTreeMap::new(),
        }
    }

    /// One update of every trained variable of `params` from `grads`, each at the learning
    /// rate and weight decay `rate_and_decay(name)`. A variable without a gradient in `grads`
    /// gets a zero one.
    pub fn step(
        &mut self,
        params: &mut Params<D>,
        grads: &mut Gradients<f32, D>,
        rate_and_decay: &dyn Fn(&str) -> (f64, f64),
    ) -> Result<()> {
        for name in params.trainable() {
            let (lr, weight_decay) = rate_and_decay(&name);
            let cfg = AdamWConfig {
                lr,
                beta1: self.beta1,
                beta2: self.beta2,
                eps: self.eps,
                weight_decay,
            };
            let (mut values, grad) = values_and_gradient(params, grads, &name)?;
            let n = values.len();
            let (mut m, mut v, steps) = match self.state.remove(&name) {
                Some((m, v, t)) => (m.as_vec(), v.as_vec(), t),
                None => (vec![0.0; n], vec![0.0; n], 0),
            };
            adamw_step(&cfg, &mut values, &grad, &mut m, &mut v, steps + 1)?;
            let dev = params.device().clone();
            self.state.insert(
                name.clone(),
                (
                    dev.tensor_from_vec(m, (n,)),
                    dev.tensor_from_vec(v, (n,)),
                    steps + 1,
                ),
            );
            params.replace(&name, dev.tensor_from_vec(values, (n,)));
        }
        Ok(())
    }

    /// The state on the host, by variable name, for the variables that have stepped.
    pub fn state(&self) -> Vec<HostAdamWState> {
        self.state
            .iter()
            .map(|(n, (m, v, t))| (n.clone(), m.as_vec(), v.as_vec(), *t))
            .collect()
    }

    /// Replaces the state (names, lengths and step counts ≥ 1 checked against `params`); a
    /// variable without state starts fresh.
    pub fn load_state(&mut self, params: &Params<D>, state: Vec<HostAdamWState>) -> Result<()> {
        let mut map = BTreeMap::new();
        for (name, m, v, t) in state {
            let n: usize = params.shape(&name)?.iter().product();
            if m.len() != n || v.len() != n || is_running_stat(&name) {
                return shape_err(format!("AdamW state for {name} does not fit the variable"));
            }
            if t == 0 {
                return shape_err(format!(
                    "AdamW state for {name}: the step count starts at 1"
                ));
            }
            let dev = params.device();
            map.insert(
                name,
                (
                    dev.tensor_from_vec(m, (n,)),
                    dev.tensor_from_vec(v, (n,)),
                    t,
                ),
            );
        }
        self.state = map;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two Nesterov steps with weight decay, by hand: w = (1, −2), ∇ = (0.5, 0.25), lr 0.1,
    /// μ 0.9, wd 0.01. Step 1: g = (0.51, 0.23) = b, d = 1.9·g, w = (0.9031, −2.0437).
    /// Step 2: g = (0.509031, 0.229563), b = 0.9·b + g = (0.968031, 0.436563),
    /// d = g + 0.9·b, w = (0.76507411, −2.10594697).
    #[test]
    fn sgd_nesterov_with_weight_decay_by_hand() {
        let dev = Cpu::default();
        let mut params =
            Params::from_host(&dev, [("w".to_string(), vec![2], vec![1.0f32, -2.0])]).unwrap();
        let mut opt = Sgd::new(0.1, 0.9, 0.01, true);
        let c = dev.tensor_from_vec(vec![0.5f32, 0.25], (2,));
        for (want_w, want_b) in [
            ([0.9031f32, -2.0437], [0.51f32, 0.23]),
            ([0.765_074_1, -2.105_947], [0.968_031, 0.436_563]),
        ] {
            let w = params.get("w").unwrap().clone();
            let loss = (w.trace(params.alloc_grads().unwrap()) * c.clone()).sum::<Rank0, _>();
            let mut grads = loss.backward();
            opt.step(&mut params, &mut grads).unwrap();
            let got = params.get("w").unwrap().as_vec();
            let buf = &opt.buffers()[0].1;
            for i in 0..2 {
                assert!((got[i] - want_w[i]).abs() < 1e-6, "w {got:?} vs {want_w:?}");
                assert!((buf[i] - want_b[i]).abs() < 1e-6, "b {buf:?} vs {want_b:?}");
            }
        }
    }

    /// Two AdamW steps by hand, two variables in two groups. `a` at lr 0.1, wd 0.01, with
    /// gradient 2 (β 0.9/0.999): step 1 w = 1·(1 − 0.001) − 0.1·(m̂ = 2)/(√v̂ = 2) = 0.899;
    /// step 2 w = 0.899·0.999 − 0.1·(0.38/0.19)/(√(0.007996/0.001999) = 2) = 0.798101. `b` at
    /// lr 0.05, no decay: 0.95, then 0.9. The state round-trips through the host.
    #[test]
    fn adamw_by_hand_with_two_groups() {
        let dev = Cpu::default();
        let mut params = Params::from_host(
            &dev,
            [
                ("a".to_string(), vec![1], vec![1.0f32]),
                ("b".to_string(), vec![1], vec![1.0f32]),
            ],
        )
        .unwrap();
        let mut opt = AdamW::new((0.9, 0.999), 1e-8);
        let group = |n: &str| if n == "a" { (0.1, 0.01) } else { (0.05, 0.0) };
        for (want_a, want_b, steps) in [(0.899f32, 0.95f32, 1u64), (0.798_101, 0.9, 2)] {
            let tape = params.alloc_grads().unwrap();
            let (a, b) = (
                params.get("a").unwrap().clone(),
                params.get("b").unwrap().clone(),
            );
            let loss = ((a.trace(tape) + b) * 2.0).sum::<Rank0, _>();
            let mut grads = loss.backward();
            opt.step(&mut params, &mut grads, &group).unwrap();
            let (a, b) = (
                params.get("a").unwrap().as_vec(),
                params.get("b").unwrap().as_vec(),
            );
            assert!((a[0] - want_a).abs() < 1e-6, "a {a:?} vs {want_a}");
            assert!((b[0] - want_b).abs() < 1e-6, "b {b:?} vs {want_b}");
            let state = opt.state();
            assert_eq!(state.len(), 2);
            assert!(state.iter().all(|(_, _, _, t)| *t == steps));
        }
        // m of `a` after two steps: 0.2, then 0.2 + 0.1·(2 − 0.2) = 0.38.
        let state = opt.state();
        assert!((state[0].1[0] - 0.38).abs() < 1e-6, "{state:?}");
        let mut fresh = AdamW::new((0.9, 0.999), 1e-8);
        fresh.load_state(&params, state.clone()).unwrap();
        assert_eq!(fresh.state(), state);
        let bad = vec![("a".to_string(), vec![0.0; 2], vec![0.0; 2], 1)];
        assert!(fresh.load_state(&params, bad).is_err());
        let zero = vec![("a".to_string(), vec![0.0], vec![0.0], 0)];
        assert!(fresh.load_state(&params, zero).is_err());
    }

    #[test]
    fn missing_variables_and_bad_shapes_are_errors() {
        let dev = Cpu::default();
        assert!(Params::<Cpu>::from_host(&dev, [("w".into(), vec![2, 2], vec![0.0; 3])]).is_err());
        let params = Params::from_host(
            &dev,
            [("fc.weight".to_string(), vec![3, 4], vec![0.0f32; 12])],
        )
        .unwrap();
        let x: Rows<Cpu, NoneTape> = dev.zeros_like(&(2, 4));
        // No `fc.bias` is fine (a layer without bias); a wrong input width is an error.
        assert!(linear(&params, x.clone(), "fc").is_ok());
        assert!(linear(&params, dev.zeros_like(&(2, 5)), "fc").is_err());
    }
}
