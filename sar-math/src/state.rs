//! [`SarState`]: one SAR regulariser's state (the semantic anchors Â and their "initialised"
//! flags) and [`SarState::step`], which runs one training step's SAR math in the spec's order:
//!
//! 1. L_aux, p, ℓ, w and dL_aux/dZ from the anchor logits Z = g_θ(E) (Eq. 5–7);
//! 2. the δ gate (global, or per class);
//! 3. the EMA of Eq. 8 (first pass copies E);
//! 4. L_p2a and dL_p2a/dF toward the **updated** Â, only if the gate passed (per class: only
//!    pixels whose class passed);
//! 5. L_SAR = λ1·L_aux + λ2·L_p2a.
//!
//! Gradients written are those of the *unweighted* losses L_aux and L_p2a; scale them by λ1, λ2.
//!
//! Storage is generic: `alloc::vec::Vec` through [`SarState::new`] (feature `alloc`), or
//! fixed-capacity `heapless::Vec` through [`SarState::new_fixed`] for `no_std` without a heap.

use crate::anchor_ce::{anchor_ce, gate, AnchorCeBuffers};
use crate::config::{GateMode, SarConfig};
use crate::ema::{ema_update, ema_update_per_class};
use crate::error::{check_len, mul_dims, Op, Result, SarError};
use crate::p2a::{p2a_nchw, p2a_rows, FeatureGeometry, P2aTargets, P2aValue, RowLabels};
use crate::real::{Label, Real};

/// The features SAR pulls toward the semantic anchors, with their labels.
#[derive(Debug, Clone, Copy)]
pub enum FeatureInput<'a, F, L> {
    /// Segmentation: NCHW features and a label map resampled to the feature size.
    Nchw {
        /// `[B, D, H, W]`.
        features: &'a [F],
        /// `[B, H', W']`.
        labels: &'a [L],
        /// The dimensions.
        geometry: FeatureGeometry,
    },
    /// Classification: `[N, D]` pooled features, plain or MixUp labels.
    Rows {
        /// `[N, D]`.
        features: &'a [F],
        /// Labels of the rows.
        labels: RowLabels<'a, L>,
    },
}

impl<F, L> FeatureInput<'_, F, L> {
    /// The feature slice.
    pub fn features(&self) -> &[F] {
        match self {
            FeatureInput::Nchw { features, .. } | FeatureInput::Rows { features, .. } => features,
        }
    }
}

/// One step's inputs.
#[derive(Debug, Clone, Copy)]
pub struct StepInput<'a, F, L> {
    /// Z = g_θ(E), `[C, C]`.
    pub anchor_logits: &'a [F],
    /// E = h_ψ(A), `[C, D]` (this step's forward value).
    pub embedded_anchors: &'a [F],
    /// The features and labels.
    pub features: FeatureInput<'a, F, L>,
}

/// Output buffers of one step.
#[derive(Debug)]
pub struct StepBuffers<'a, F> {
    /// p_c, `[C]`.
    pub confidence: &'a mut [F],
    /// ℓ_c, `[C]`.
    pub nll: &'a mut [F],
    /// w_c, `[C]`.
    pub weights: &'a mut [F],
    /// The per-anchor gate test, `[C]`.
    pub class_pass: &'a mut [bool],
    /// dL_aux/dZ, `[C, C]`, or `None`.
    pub grad_logits: Option<&'a mut [F]>,
    /// dL_p2a/dF, the shape of the features, or `None`.
    pub grad_features: Option<&'a mut [F]>,
}

/// Scalar results of one step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepReport<F> {
    /// L_aux (unweighted).
    pub loss_aux: F,
    /// L_p2a (unweighted; 0 when the gate failed).
    pub loss_p2a: F,
    /// λ1·L_aux + λ2·L_p2a.
    pub loss_sar: F,
    /// Global gate: whether it passed. Per-class gate: whether any anchor passed.
    pub gate_passed: bool,
    /// Rows of Â changed by the EMA this step.
    pub updated_classes: usize,
    /// |U|: anchors still below τ.
    pub uncertain: usize,
    /// |Ω| used by L_p2a (0 when p2a was not applied).
    pub valid: usize,
}

/// The state of one SAR regulariser: configuration, C, D, Â `[C, D]` and the per-class
/// "initialised" flags (all equal under the global gate).
#[derive(Debug, Clone, PartialEq)]
pub struct SarState<F, A, M> {
    config: SarConfig,
    classes: usize,
    dim: usize,
    semantic: A,
    initialized: M,
    _real: core::marker::PhantomData<F>,
}

#[cfg(feature = "alloc")]
impl<F: Real> SarState<F, alloc::vec::Vec<F>, alloc::vec::Vec<bool>> {
    /// A fresh state on the heap: Â = 0, nothing initialised.
    pub fn new(config: SarConfig, classes: usize, dim: usize) -> Result<Self> {
        let n = mul_dims(Op::Step, &[classes, dim])?;
        Self::from_parts(
            config,
            classes,
            dim,
            alloc::vec![F::zero(); n],
            alloc::vec![false; classes],
        )
    }
}

impl<F: Real, const N: usize, const K: usize>
    SarState<F, heapless::Vec<F, N>, heapless::Vec<bool, K>>
{
    /// A fresh state in fixed-capacity storage (no heap): needs `N ≥ C·D` and `K ≥ C`.
    pub fn new_fixed(config: SarConfig, classes: usize, dim: usize) -> Result<Self> {
        let n = mul_dims(Op::Step, &[classes, dim])?;
        let mut semantic = heapless::Vec::new();
        semantic
            .resize(n, F::zero())
            .map_err(|_| SarError::Capacity {
                op: Op::Step,
                capacity: N,
                needed: n,
            })?;
        let mut init = heapless::Vec::new();
        init.resize(classes, false)
            .map_err(|_| SarError::Capacity {
                op: Op::Step,
                capacity: K,
                needed: classes,
            })?;
        Self::from_parts(config, classes, dim, semantic, init)
    }
}

impl<F: Real, A: AsRef<[F]> + AsMut<[F]>, M: AsRef<[bool]> + AsMut<[bool]>> SarState<F, A, M> {
    /// Wraps existing storage (e.g. restored from a checkpoint) after validating the config and
    /// the lengths (`semantic` `[C, D]`, `initialized` `[C]`).
    pub fn from_parts(
        config: SarConfig,
        classes: usize,
        dim: usize,
        semantic: A,
        initialized: M,
    ) -> Result<Self> {
        config.validate()?;
        if classes == 0 || dim == 0 {
            return Err(SarError::Shape {
                op: Op::Step,
                what: "classes and dim must be at least 1",
            });
        }
        check_len(
            Op::Step,
            "semantic anchors",
            semantic.as_ref().len(),
            mul_dims(Op::Step, &[classes, dim])?,
        )?;
        check_len(Op::Step, "initialized", initialized.as_ref().len(), classes)?;
        if semantic.as_ref().iter().any(|v| !v.is_finite()) {
            return Err(SarError::NonFinite {
                op: Op::Step,
                what: "semantic anchors",
            });
        }
        Ok(SarState {
            config,
            classes,
            dim,
            semantic,
            initialized,
            _real: core::marker::PhantomData,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &SarConfig {
        &self.config
    }
    /// C.
    pub fn classes(&self) -> usize {
        self.classes
    }
    /// D.
    pub fn dim(&self) -> usize {
        self.dim
    }
    /// Â, `[C, D]`.
    pub fn semantic_anchors(&self) -> &[F] {
        self.semantic.as_ref()
    }
    /// The per-class "initialised" flags.
    pub fn initialized(&self) -> &[bool] {
        self.initialized.as_ref()
    }
    /// Whether every row of Â has been initialised.
    pub fn fully_initialized(&self) -> bool {
        self.initialized.as_ref().iter().all(|&b| b)
    }
    /// Gives the storage back.
    pub fn into_parts(self) -> (A, M) {
        (self.semantic, self.initialized)
    }

    /// Runs one step (see the module docs) and returns the loss parts.
    pub fn step<L: Label>(
        &mut self,
        input: StepInput<'_, F, L>,
        out: StepBuffers<'_, F>,
    ) -> Result<StepReport<F>> {
        let (c, d) = (self.classes, self.dim);
        let cfg = self.config;
        check_len(
            Op::Step,
            "embedded anchors",
            input.embedded_anchors.len(),
            c * d,
        )?;
        check_len(Op::Step, "class_pass", out.class_pass.len(), c)?;
        // Validate the feature side before any state changes, so an error leaves Â untouched.
        match &input.features {
            FeatureInput::Nchw { geometry, .. } if geometry.channels != d => {
                return Err(SarError::Shape {
                    op: Op::Step,
                    what: "feature channels differ from the anchors' D",
                });
            }
            _ => {}
        }
        if let Some(g) = &out.grad_features {
            check_len(
                Op::Step,
                "grad_features",
                g.len(),
                input.features.features().len(),
            )?;
        }
        let ce = anchor_ce(
            input.anchor_logits,
            c,
            cfg.tau,
            cfg.weights,
            AnchorCeBuffers {
                confidence: out.confidence,
                nll: out.nll,
                weights: out.weights,
                grad_logits: out.grad_logits,
            },
        )?;
        let passed = gate(
            input.anchor_logits,
            c,
            out.nll,
            cfg.delta,
            cfg.gate,
            out.class_pass,
        )?;
        if input.embedded_anchors.iter().any(|v| !v.is_finite()) {
            return Err(SarError::NonFinite {
                op: Op::Ema,
                what: "embedded anchors",
            });
        }
        // Dry-run the p2a validation against the current Â so bad labels fail before the EMA.
        self.p2a(&input.features, None, None)?;
        let updated = match cfg.gate {
            GateMode::Global => {
                let mut init = self.fully_initialized();
                let changed = ema_update(
                    self.semantic.as_mut(),
                    &mut init,
                    input.embedded_anchors,
                    c,
                    d,
                    cfg.alpha,
                    passed,
                )?;
                if init {
                    self.initialized.as_mut().iter_mut().for_each(|f| *f = true);
                }
                if changed {
                    c
                } else {
                    0
                }
            }
            GateMode::PerClass => ema_update_per_class(
                self.semantic.as_mut(),
                self.initialized.as_mut(),
                input.embedded_anchors,
                c,
                d,
                cfg.alpha,
                out.class_pass,
            )?,
        };
        let p2a = if passed {
            let active = match cfg.gate {
                GateMode::Global => None,
                GateMode::PerClass => Some(&*out.class_pass),
            };
            self.p2a(&input.features, active, out.grad_features)?
        } else {
            if let Some(g) = out.grad_features {
                g.iter_mut().for_each(|v| *v = F::zero());
            }
            P2aValue {
                loss: F::zero(),
                valid: 0,
            }
        };
        let loss_sar =
            F::from_f64(cfg.lambda_aux) * ce.loss + F::from_f64(cfg.lambda_p2a) * p2a.loss;
        Ok(StepReport {
            loss_aux: ce.loss,
            loss_p2a: p2a.loss,
            loss_sar,
            gate_passed: passed,
            updated_classes: updated,
            uncertain: ce.uncertain,
            valid: p2a.valid,
        })
    }

    fn p2a<L: Label>(
        &self,
        input: &FeatureInput<'_, F, L>,
        active: Option<&[bool]>,
        grad: Option<&mut [F]>,
    ) -> Result<P2aValue<F>> {
        let targets = P2aTargets {
            anchors: self.semantic.as_ref(),
            classes: self.classes,
            ignore_index: self.config.ignore_index,
            class_active: active,
        };
        match *input {
            FeatureInput::Nchw {
                features,
                labels,
                geometry,
            } => {
                if grad.is_none() && active.is_none() {
                    // Validation only: labels and shapes, no pass over the features.
                    check_len(Op::P2a, "features", features.len(), geometry.feature_len()?)?;
                    crate::p2a::p2a_valid_count_nchw(labels, &geometry, &targets)?;
                    return Ok(P2aValue {
                        loss: F::zero(),
                        valid: 0,
                    });
                }
                p2a_nchw(features, labels, &geometry, &targets, grad)
            }
            FeatureInput::Rows { features, labels } => {
                p2a_rows(features, labels, self.dim, &targets, grad)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type State = SarState<f64, heapless::Vec<f64, 8>, heapless::Vec<bool, 2>>;

    fn buffers<'a>(
        p: &'a mut [f64; 2],
        l: &'a mut [f64; 2],
        w: &'a mut [f64; 2],
        pass: &'a mut [bool; 2],
        gf: &'a mut [f64],
    ) -> StepBuffers<'a, f64> {
        StepBuffers {
            confidence: p,
            nll: l,
            weights: w,
            class_pass: pass,
            grad_logits: None,
            grad_features: Some(gf),
        }
    }

    #[test]
    fn gate_fails_then_passes_then_ema() {
        let cfg = SarConfig {
            alpha: 0.5,
            ..SarConfig::default()
        };
        let mut s = State::new_fixed(cfg, 2, 2).unwrap();
        let e = [1.0, 2.0, 3.0, 4.0];
        let feats = [1.0, 2.0, 3.0, 5.0];
        let labels = [0i64, 1];
        let input = |z: &'static [f64]| StepInput {
            anchor_logits: z,
            embedded_anchors: &e,
            features: FeatureInput::Rows {
                features: &feats,
                labels: RowLabels::Plain(&labels),
            },
        };
        let (mut p, mut l, mut w, mut pass, mut gf) =
            ([0.0; 2], [0.0; 2], [0.0; 2], [false; 2], [9.0; 4]);
        // Anchors not separated: gate fails, no p2a, Â untouched.
        let r = s
            .step(
                input(&[0.0, 0.0, 0.0, 0.0]),
                buffers(&mut p, &mut l, &mut w, &mut pass, &mut gf),
            )
            .unwrap();
        assert!(!r.gate_passed);
        assert_eq!((r.loss_p2a, r.valid, r.updated_classes), (0.0, 0, 0));
        assert_eq!(gf, [0.0; 4]);
        assert!(!s.fully_initialized());
        // Separated: first pass copies E, p2a toward E: ((0)²+(0)²+(0)²+(1)²)/(2·2) = 0.25.
        let r = s
            .step(
                input(&[9.0, 0.0, 0.0, 9.0]),
                buffers(&mut p, &mut l, &mut w, &mut pass, &mut gf),
            )
            .unwrap();
        assert!(r.gate_passed && s.fully_initialized());
        assert_eq!(s.semantic_anchors(), &e);
        assert_eq!(r.loss_p2a, 0.25);
        assert_eq!(gf, [0.0, 0.0, 0.0, 0.5]);
        assert_eq!(r.loss_aux, 0.0); // p ≈ 0.9999 > τ for both anchors
        assert_eq!(r.loss_sar, 0.1 * 0.25);
    }

    #[test]
    fn bad_labels_leave_state_untouched() {
        let mut s = State::new_fixed(SarConfig::default(), 2, 2).unwrap();
        let (mut p, mut l, mut w, mut pass, mut gf) =
            ([0.0; 2], [0.0; 2], [0.0; 2], [false; 2], [0.0; 4]);
        let err = s
            .step(
                StepInput {
                    anchor_logits: &[9.0, 0.0, 0.0, 9.0],
                    embedded_anchors: &[1.0; 4],
                    features: FeatureInput::Rows {
                        features: &[0.0; 4],
                        labels: RowLabels::Plain(&[0i64, 7]),
                    },
                },
                buffers(&mut p, &mut l, &mut w, &mut pass, &mut gf),
            )
            .unwrap_err();
        assert!(matches!(err, SarError::Label { label: 7, .. }));
        assert!(!s.fully_initialized());
        assert_eq!(s.semantic_anchors(), &[0.0; 4]);
    }

    #[test]
    fn capacity_error() {
        let e = SarState::<f32, heapless::Vec<f32, 3>, heapless::Vec<bool, 2>>::new_fixed(
            SarConfig::default(),
            2,
            2,
        );
        assert_eq!(
            e.unwrap_err(),
            SarError::Capacity {
                op: Op::Step,
                capacity: 3,
                needed: 4
            }
        );
    }
}
