//! [`SarHead`]: SAR attached to a candle model.
//!
//! It owns the pre-defined anchors A `[C, D]` (a fixed buffer), the anchor embedding h_ψ and
//! the EMA state Â. Per step, E = h_ψ(A) with BatchNorm in training mode over the C anchors
//! (`sar_math::batch_norm`'s eps and momentum), Z = g_θ(E) through the model's own classifier (passed in, so the
//! classifier is shared and trained by L_aux too), then the spec's order via
//! [`sar_math::backend::BackendSarState::step`]. The EMA is an explicit `&mut self` call.
//!
//! h_ψ (spec §2):
//! - [`EmbeddingKind::Classification`]: [Linear(D,D) → BatchNorm → ReLU] ×2;
//! - [`EmbeddingKind::Segmentation`]: the same, then a 1×1 conv without bias (a D×D matrix on
//!   the C anchor rows) → BatchNorm → ReLU.
//!
//! Stable names: parameters `{prefix}.embed.fc{1,2}.{weight,bias}`, `{prefix}.embed.bn{1,2,3}.{weight,bias}`,
//! `{prefix}.embed.conv.weight`; buffers ([`SarHead::buffers`]) `{prefix}.anchors`,
//! `{prefix}.semantic_anchors`, `{prefix}.initialized`. The prefix is normally `sar`.
//!
//! [`SarHeadConfig::regularizer`] swaps SAR for a baseline of spec §7 on the same anchors and
//! state ([`RegularizerKind`]): `Cr` pulls the features toward A itself, `Car` applies CAR's
//! intra-class loss toward the batch prototypes, `Prototype` pulls toward an EMA of the batch
//! prototypes kept in the `semantic_anchors` buffer. None of them has h_ψ (no `embed.*`
//! parameters) or L_aux; their [`SarStepOutput::gate_passed`] is true (the term always applies).
//!
//! Initialisation is reproducible from the seed: anchors by [`sar_math::anchors`], Linear and
//! conv weights uniform in ±1/√D (PyTorch's default bound) from the same portable generator,
//! BatchNorm weight 1 and bias 0.

use crate::{CandleBackend, Result, SarCandleError};
use candle_core::{DType, Tensor, Var};
use candle_nn::{BatchNorm, Linear, Module, ModuleT, VarMap};
use sar_math::anchors::{generate_anchors, AnchorKind};
use sar_math::backend::{car_step, prototype_step, BackendSarState, Mixup, SarBackend};
use sar_math::rng::SeededRng;
use sar_math::{RegularizerKind, SarConfig};

/// Which h_ψ (spec §2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EmbeddingKind {
    /// [Linear → BN → ReLU] ×2.
    Classification,
    /// [Linear → BN → ReLU] ×2, then 1×1 conv (no bias) → BN → ReLU.
    Segmentation,
}

struct Block {
    linear: Linear,
    bn: BatchNorm,
}

/// The result of one [`SarHead::step`].
#[derive(Debug)]
pub struct SarStepOutput {
    /// λ1·L_aux + λ2·L_p2a (λ2 term only if the gate passed): add it to the task loss.
    pub loss: Tensor,
    /// L_aux, unweighted.
    pub loss_aux: f64,
    /// L_p2a, unweighted (0 when the gate failed).
    pub loss_p2a: f64,
    /// The gate's decision.
    pub gate_passed: bool,
    /// The per-anchor gate test.
    pub class_pass: Vec<bool>,
    /// |Ω| of L_p2a.
    pub valid: usize,
    /// Rows of Â updated by the EMA.
    pub updated_classes: usize,
}

/// What a [`SarHead`] is built from: SAR's hyper-parameters, C and D, and (with defaults) the
/// parameter prefix, h_ψ's kind, the anchor kind and the seed.
///
/// ```
/// use sar_candle::{EmbeddingKind, SarHeadConfig};
/// let cfg = SarHeadConfig::new(sar_math::SarConfig::default(), 10, 64)
///     .kind(EmbeddingKind::Segmentation)
///     .seed(7);
/// assert_eq!((cfg.prefix.as_str(), cfg.classes, cfg.seed), ("sar", 10, 7));
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct SarHeadConfig {
    /// Prefix of the parameter and buffer names (default `sar`).
    pub prefix: String,
    /// SAR's hyper-parameters.
    pub sar: SarConfig,
    /// C.
    pub classes: usize,
    /// D.
    pub dim: usize,
    /// h_ψ (default [`EmbeddingKind::Classification`]).
    pub kind: EmbeddingKind,
    /// The pre-defined anchors (default [`AnchorKind::Normal`]).
    pub anchor_kind: AnchorKind,
    /// Seed of the anchors and of h_ψ's initial weights (default 0).
    pub seed: u64,
    /// SAR or a baseline (default [`RegularizerKind::Sar`]).
    pub regularizer: RegularizerKind,
}

impl SarHeadConfig {
    /// C classes, D dimensions, the defaults for the rest.
    pub fn new(sar: SarConfig, classes: usize, dim: usize) -> Self {
        SarHeadConfig {
            prefix: "sar".to_string(),
            sar,
            classes,
            dim,
            kind: EmbeddingKind::Classification,
            anchor_kind: AnchorKind::Normal,
            seed: 0,
            regularizer: RegularizerKind::Sar,
        }
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

    /// With another h_ψ.
    pub fn kind(mut self, kind: EmbeddingKind) -> Self {
        self.kind = kind;
        self
    }

    /// With another anchor kind.
    pub fn anchor_kind(mut self, anchor_kind: AnchorKind) -> Self {
        self.anchor_kind = anchor_kind;
        self
    }

    /// With another seed.
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }
}

/// SAR's anchors, embedding and EMA state for one model. See the module docs.
pub struct SarHead {
    backend: CandleBackend,
    prefix: String,
    anchors: Tensor,
    blocks: Vec<Block>,
    state: BackendSarState<Tensor>,
    classes: usize,
    dim: usize,
    regularizer: RegularizerKind,
}

/// Gets `name` from `varmap`, or creates it from `init` (so a loaded checkpoint wins).
fn get_or_insert(
    varmap: &VarMap,
    name: &str,
    init: impl FnOnce() -> Result<Tensor>,
) -> Result<Tensor> {
    let mut data = varmap.data().lock().expect("varmap lock");
    if let Some(v) = data.get(name) {
        return Ok(v.as_tensor().clone());
    }
    let var = Var::from_tensor(&init()?)?;
    let t = var.as_tensor().clone();
    data.insert(name.to_string(), var);
    Ok(t)
}

impl SarHead {
    /// Builds the head described by `cfg`, registering h_ψ's parameters in `varmap` under
    /// `{prefix}.embed`.
    pub fn new(varmap: &VarMap, backend: CandleBackend, cfg: &SarHeadConfig) -> Result<Self> {
        let SarHeadConfig {
            ref prefix,
            sar: config,
            classes,
            dim,
            kind,
            anchor_kind,
            seed,
            regularizer,
        } = *cfg;
        config.validate()?;
        let (dev, dtype) = (backend.device().clone(), backend.dtype());
        let mut a = vec![0.0f64; classes * dim];
        generate_anchors(anchor_kind, seed, classes, dim, &mut a)?;
        let anchors = Tensor::from_vec(a, (classes, dim), &dev)?.to_dtype(dtype)?;
        // A separate stream for the weights, so anchors do not shift with the layer count.
        let mut rng = SeededRng::new(seed ^ 0x5A52_5F45_4D42_4544);
        let bound = 1.0 / (dim as f64).sqrt();
        let mut uniform = |n: usize| -> Vec<f64> {
            (0..n)
                .map(|_| bound * (2.0 * rng.next_f64() - 1.0))
                .collect()
        };
        let make = |name: &str, shape: &[usize], values: Vec<f64>| -> Result<Tensor> {
            get_or_insert(varmap, &format!("{prefix}.embed.{name}"), || {
                Ok(Tensor::from_vec(values, shape, &dev)?.to_dtype(dtype)?)
            })
        };
        let mut blocks = Vec::new();
        let layers: &[(&str, &str, bool)] = match (regularizer, kind) {
            // The baselines have no embedding.
            (RegularizerKind::Cr | RegularizerKind::Car | RegularizerKind::Prototype, _) => &[],
            (_, EmbeddingKind::Classification) => &[("fc1", "bn1", true), ("fc2", "bn2", true)],
            (_, EmbeddingKind::Segmentation) => &[
                ("fc1", "bn1", true),
                ("fc2", "bn2", true),
                ("conv", "bn3", false),
            ],
        };
        for &(lin, bn, bias) in layers {
            let w = make(&format!("{lin}.weight"), &[dim, dim], uniform(dim * dim))?;
            let b = if bias {
                Some(make(&format!("{lin}.bias"), &[dim], uniform(dim))?)
            } else {
                None
            };
            let gamma = make(&format!("{bn}.weight"), &[dim], vec![1.0; dim])?;
            let beta = make(&format!("{bn}.bias"), &[dim], vec![0.0; dim])?;
            let bn = BatchNorm::new(
                dim,
                Tensor::zeros(dim, dtype, &dev)?,
                Tensor::ones(dim, dtype, &dev)?,
                gamma,
                beta,
                sar_math::batch_norm::EPS,
            )?;
            blocks.push(Block {
                linear: Linear::new(w, b),
                bn,
            });
        }
        let state =
            BackendSarState::new(config, classes, Tensor::zeros((classes, dim), dtype, &dev)?)?;
        Ok(SarHead {
            backend,
            prefix: prefix.to_string(),
            anchors,
            blocks,
            state,
            classes,
            dim,
            regularizer,
        })
    }

    /// SAR or the baseline this head applies.
    pub fn regularizer(&self) -> RegularizerKind {
        self.regularizer
    }

    /// C.
    pub fn classes(&self) -> usize {
        self.classes
    }
    /// D.
    pub fn dim(&self) -> usize {
        self.dim
    }
    /// The configuration.
    pub fn config(&self) -> &SarConfig {
        &self.state.config
    }
    /// The backend the head computes with.
    pub fn backend(&self) -> &CandleBackend {
        &self.backend
    }
    /// Â, `[C, D]`.
    pub fn semantic_anchors(&self) -> &Tensor {
        &self.state.semantic
    }
    /// Whether every row of Â is initialised.
    pub fn fully_initialized(&self) -> bool {
        self.state.fully_initialized()
    }

    /// E = h_ψ(A), BatchNorm in training mode over the C anchors.
    pub fn embed(&self) -> Result<Tensor> {
        let mut x = self.anchors.clone();
        for blk in &self.blocks {
            x = blk.bn.forward_t(&blk.linear.forward(&x)?, true)?.relu()?;
        }
        Ok(x)
    }

    /// One SAR step: embed, classify with `classifier` (`[C, D]` → `[C, C]`, the model's own
    /// classifier), then L_aux → gate → EMA → λ2·L_p2a of `features` (`[B, D, H, W]` with labels
    /// `[B, H', W']`, or `[N, D]` with `[N]`).
    pub fn step(
        &mut self,
        classifier: &dyn Fn(&Tensor) -> candle_core::Result<Tensor>,
        features: &Tensor,
        labels: &Tensor,
    ) -> Result<SarStepOutput> {
        let (ignore, weight) = (self.state.config.ignore_index, self.state.config.lambda_p2a);
        let b = &self.backend;
        let baseline = match self.regularizer {
            RegularizerKind::Sar => None,
            RegularizerKind::Cr => {
                Some(b.p2a(features, labels, &self.anchors, ignore, None, weight)?)
            }
            RegularizerKind::Car => {
                Some(car_step(b, self.classes, ignore, features, labels, weight)?.loss)
            }
            RegularizerKind::Prototype => {
                Some(prototype_step(b, &mut self.state, features, labels, weight)?.loss)
            }
        };
        if let Some(p) = baseline {
            return Ok(self.baseline_output(p));
        }
        let (e, z) = self.embed_and_classify(classifier)?;
        let step = self.state.step(&self.backend, &z, &e, features, labels)?;
        self.finish(step)
    }

    /// [`SarHead::step`] for a MixUp batch of `[N, D]` features: row n is pulled toward
    /// λ·Â_{a_n} + (1−λ)·Â_{b_n} (spec §5). A row counts in Ω when both of its labels are
    /// valid (not `ignore_index`) and, under the per-class gate, both classes passed. The p2a
    /// term is the backend's [`sar_math::backend::SarBackend::p2a_mixup`].
    pub fn step_mixup(
        &mut self,
        classifier: &dyn Fn(&Tensor) -> candle_core::Result<Tensor>,
        features: &Tensor,
        labels_a: &[i64],
        labels_b: &[i64],
        lambda: f64,
    ) -> Result<SarStepOutput> {
        let (n, d) = features.dims2()?;
        if d != self.dim {
            return Err(SarCandleError::Shape(format!(
                "mixup p2a needs features [N, {}]; got {:?}",
                self.dim,
                features.dims(),
            )));
        }
        let mixup = Mixup {
            labels_a,
            labels_b,
            lambda,
        };
        // Checked before the step, so that bad input leaves Â untouched.
        mixup.check(n, self.classes, self.state.config.ignore_index)?;
        match self.regularizer {
            RegularizerKind::Sar => {}
            RegularizerKind::Cr => {
                let (ignore, weight) =
                    (self.state.config.ignore_index, self.state.config.lambda_p2a);
                let p = self
                    .backend
                    .p2a_mixup(features, mixup, &self.anchors, ignore, None, weight)?;
                return Ok(self.baseline_output(p));
            }
            RegularizerKind::Car | RegularizerKind::Prototype => {
                return Err(SarCandleError::Shape(format!(
                    "the {:?} baseline has no MixUp rule (batch prototypes of mixed images are undefined); train it without MixUp",
                    self.regularizer
                )))
            }
        }
        let (e, z) = self.embed_and_classify(classifier)?;
        let step = self
            .state
            .step_mixup(&self.backend, &z, &e, features, mixup)?;
        self.finish(step)
    }

    /// A baseline's loss as a step output: no L_aux, the term always applied.
    fn baseline_output(&self, p: sar_math::backend::P2aOutput<Tensor>) -> SarStepOutput {
        SarStepOutput {
            loss: p.loss,
            loss_aux: 0.0,
            loss_p2a: p.value,
            gate_passed: true,
            class_pass: vec![true; self.classes],
            valid: p.valid,
            updated_classes: 0,
        }
    }

    fn embed_and_classify(
        &self,
        classifier: &dyn Fn(&Tensor) -> candle_core::Result<Tensor>,
    ) -> Result<(Tensor, Tensor)> {
        let e = self.embed()?;
        let z = classifier(&e)?;
        if z.dims() != [self.classes, self.classes] {
            return Err(SarCandleError::Shape(format!(
                "the classifier maps the [{}, {}] anchors to {:?}, expected [{}, {}]",
                self.classes,
                self.dim,
                z.dims(),
                self.classes,
                self.classes
            )));
        }
        Ok((e, z))
    }

    fn finish(
        &self,
        step: sar_math::backend::BackendStep<
            <CandleBackend as sar_math::backend::SarBackend>::Loss,
        >,
    ) -> Result<SarStepOutput> {
        let aux = (step.aux.loss.clone() * self.state.config.lambda_aux)?;
        let loss_aux = step.aux.loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        let (loss, loss_p2a, valid) = match &step.p2a {
            Some(p) => ((aux + &p.loss)?, p.value, p.valid),
            None => (aux, 0.0, 0),
        };
        Ok(SarStepOutput {
            loss,
            loss_aux,
            loss_p2a,
            gate_passed: step.gate_passed,
            class_pass: step.class_pass,
            valid,
            updated_classes: step.updated_classes,
        })
    }

    /// The buffers a checkpoint must hold: A, Â and the "initialised" flags (as 0/1 in the
    /// head's dtype), under their stable names.
    pub fn buffers(&self) -> Result<Vec<(String, Tensor)>> {
        let flags: Vec<f64> = self
            .state
            .initialized
            .iter()
            .map(|&b| b as u8 as f64)
            .collect();
        let init = Tensor::from_vec(flags, self.classes, self.anchors.device())?
            .to_dtype(self.anchors.dtype())?;
        Ok(vec![
            (format!("{}.anchors", self.prefix), self.anchors.clone()),
            (
                format!("{}.semantic_anchors", self.prefix),
                self.state.semantic.clone(),
            ),
            (format!("{}.initialized", self.prefix), init),
        ])
    }

    /// Restores the buffers written by [`SarHead::buffers`], checking their shapes.
    pub fn load_buffers(&mut self, get: &dyn Fn(&str) -> Option<Tensor>) -> Result<()> {
        let (c, d) = (self.classes, self.dim);
        let fetch = |suffix: &str, shape: &[usize]| -> Result<Tensor> {
            let name = format!("{}.{suffix}", self.prefix);
            let t = get(&name)
                .ok_or_else(|| SarCandleError::Shape(format!("checkpoint lacks `{name}`")))?;
            if t.dims() != shape {
                return Err(SarCandleError::Shape(format!(
                    "checkpoint `{name}` has shape {:?}, expected {shape:?}",
                    t.dims()
                )));
            }
            Ok(t.to_device(self.anchors.device())?
                .to_dtype(self.anchors.dtype())?)
        };
        let anchors = fetch("anchors", &[c, d])?;
        let semantic = fetch("semantic_anchors", &[c, d])?;
        let init = fetch("initialized", &[c])?
            .to_dtype(DType::F64)?
            .to_vec1::<f64>()?;
        self.anchors = anchors;
        self.state.semantic = semantic.detach();
        self.state.initialized = init.iter().map(|&v| v != 0.0).collect();
        Ok(())
    }
}
