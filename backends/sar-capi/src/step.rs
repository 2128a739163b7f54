//! One whole SAR step, equal to `sar reference` (L_aux → gate → EMA → L_p2a, by
//! [`sar_math::SarState::step`]), over caller-owned state: Â and the flags are updated in
//! place, so nothing is allocated. [`step`] is the safe Rust form (used by the Python binding);
//! [`sar_step_f64`] / [`sar_step_f32`] are the C entry points.

use crate::error::{guard, Error, Result, SarStatus};
use crate::{dims, input, optional, out_ref, output, SarOptions};
use sar_math::p2a::{FeatureGeometry, RowLabels};
use sar_math::state::{FeatureInput, StepBuffers, StepInput, StepReport};
use sar_math::{GateMode, Real, SarConfig, SarState};

/// The inputs of one step, in the `sar reference` convention.
#[derive(Debug, Clone, Copy)]
pub struct StepCase<'a, F> {
    /// C.
    pub classes: usize,
    /// D.
    pub dim: usize,
    /// Z = g_θ(E), `[C, C]`.
    pub anchor_logits: &'a [F],
    /// E = h_ψ(A), `[C, D]`.
    pub embedded_anchors: &'a [F],
    /// F, of shape `feature_shape`.
    pub features: &'a [F],
    /// `[B, D, H, W]` or `[N, D]`.
    pub feature_shape: &'a [usize],
    /// y, of shape `label_shape`.
    pub labels: &'a [i64],
    /// `[B, H', W']` or `[N]`.
    pub label_shape: &'a [usize],
}

fn bad(tensor: &'static str, expected: &'static str) -> Error {
    Error::BadShape { tensor, expected }
}

/// Checks the shapes of a case as `sar reference` does and returns the feature input.
fn feature_input<'a, F>(case: &StepCase<'a, F>) -> Result<FeatureInput<'a, F, i64>> {
    let (c, d) = (case.classes, case.dim);
    if c == 0 {
        return Err(bad("anchor_logits", "[C, C] with C ≥ 1"));
    }
    if d == 0 {
        return Err(bad("features", "[B, D, H, W] or [N, D] with D ≥ 1"));
    }
    if case.anchor_logits.len() != dims(&[c, c])? {
        return Err(bad("anchor_logits", "[C, C]"));
    }
    if case.embedded_anchors.len() != dims(&[c, d])? {
        return Err(bad(
            "embedded_anchors",
            "[C, D] (C from anchor_logits, D from features)",
        ));
    }
    if case.features.len() != dims(case.feature_shape)? {
        return Err(bad("features", "as many values as its shape holds"));
    }
    if case.labels.len() != dims(case.label_shape)? {
        return Err(bad("labels", "as many values as its shape holds"));
    }
    match (case.feature_shape, case.label_shape) {
        (&[b, fd, h, w], ls) => {
            if fd != d {
                return Err(bad("features", "[B, D, H, W] with D of the anchors"));
            }
            let &[lb, lh, lw] = ls else {
                return Err(bad("labels", "[B, H', W'] for [B, D, H, W] features"));
            };
            if lb != b || (h * w != 0 && lh * lw == 0) {
                return Err(bad(
                    "labels",
                    "[B, H', W'] with the features' B and a non-empty map",
                ));
            }
            Ok(FeatureInput::Nchw {
                features: case.features,
                labels: case.labels,
                geometry: FeatureGeometry {
                    batch: b,
                    channels: d,
                    height: h,
                    width: w,
                    label_height: lh,
                    label_width: lw,
                },
            })
        }
        (&[n, fd], ls) => {
            if fd != d {
                return Err(bad("features", "[N, D] with D of the anchors"));
            }
            if ls != [n] {
                return Err(bad("labels", "[N] for [N, D] features"));
            }
            Ok(FeatureInput::Rows {
                features: case.features,
                labels: RowLabels::Plain(case.labels),
            })
        }
        _ => Err(bad("features", "[B, D, H, W] or [N, D]")),
    }
}

/// Runs one step of `config` on `case`, updating `semantic` (Â, `[C, D]`) and `initialized`
/// (`[C]`) in place, writing the buffers of `out`. Equal to `sar reference` (which runs the
/// same [`SarState::step`] in f64), with its checks: under the global gate the flags must be
/// all equal.
pub fn step<F: Real>(
    config: &SarConfig,
    case: &StepCase<'_, F>,
    semantic: &mut [F],
    initialized: &mut [bool],
    out: StepBuffers<'_, F>,
) -> Result<StepReport<F>> {
    config.validate()?;
    let features = feature_input(case)?;
    if semantic.len() != dims(&[case.classes, case.dim])? {
        return Err(bad("semantic_anchors", "[C, D]"));
    }
    if initialized.len() != case.classes {
        return Err(bad("initialized", "[C]"));
    }
    if config.gate == GateMode::Global && initialized.iter().any(|&f| f != initialized[0]) {
        return Err(Error::Input(
            SarStatus::SarErrParam,
            "tensor `initialized`: the global gate needs all flags equal, found a mix",
        ));
    }
    let mut state = SarState::<F, _, _>::from_parts(
        *config,
        case.classes,
        case.dim,
        &mut *semantic,
        &mut *initialized,
    )?;
    Ok(state.step(
        StepInput {
            anchor_logits: case.anchor_logits,
            embedded_anchors: case.embedded_anchors,
            features,
        },
        out,
    )?)
}

/// Scalar results of one step.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct SarStepReport {
    /// L_aux (unweighted).
    pub loss_aux: f64,
    /// L_p2a (unweighted; 0 when the gate failed).
    pub loss_p2a: f64,
    /// λ1·L_aux + λ2·L_p2a.
    pub loss_sar: f64,
    /// Global gate: whether it passed; per-class gate: whether any anchor passed.
    pub gate_passed: bool,
    /// Rows of Â changed by the EMA.
    pub updated_classes: usize,
    /// |U|: anchors still below τ.
    pub uncertain: usize,
    /// |Ω| used by L_p2a.
    pub valid: usize,
}

impl<F: Real> From<StepReport<F>> for SarStepReport {
    fn from(r: StepReport<F>) -> Self {
        SarStepReport {
            loss_aux: r.loss_aux.as_f64(),
            loss_p2a: r.loss_p2a.as_f64(),
            loss_sar: r.loss_sar.as_f64(),
            gate_passed: r.gate_passed,
            updated_classes: r.updated_classes,
            uncertain: r.uncertain,
            valid: r.valid,
        }
    }
}

/// The C form of [`step`].
///
/// # Safety
/// Every pointer holds the elements its dims give (see [`sar_step_f64`]).
#[allow(clippy::too_many_arguments)]
unsafe fn step_impl<F: Real>(
    options: *const SarOptions,
    classes: usize,
    dim: usize,
    anchor_logits: *const F,
    embedded_anchors: *const F,
    semantic_anchors: *mut F,
    initialized: *mut bool,
    features: *const F,
    feature_shape: *const usize,
    feature_rank: usize,
    labels: *const i64,
    label_shape: *const usize,
    confidence: *mut F,
    nll: *mut F,
    weights: *mut F,
    class_pass: *mut bool,
    grad_logits: *mut F,
    grad_features: *mut F,
    report: *mut SarStepReport,
) -> SarStatus {
    guard(|| {
        // SAFETY (all blocks): the caller's contract; lengths from the dims.
        let options = unsafe { options.as_ref() }.ok_or(Error::Null("options"))?;
        let config = options.config()?;
        if feature_rank != 2 && feature_rank != 4 {
            return Err(bad("features", "[B, D, H, W] or [N, D] (rank 4 or 2)"));
        }
        let fshape = unsafe { input(feature_shape, feature_rank, "feature_shape")? };
        let lshape = unsafe { input(label_shape, feature_rank - 1, "label_shape")? };
        let (cc, cd) = (dims(&[classes, classes])?, dims(&[classes, dim])?);
        let nf = dims(fshape)?;
        let case = StepCase {
            classes,
            dim,
            anchor_logits: unsafe { input(anchor_logits, cc, "anchor_logits")? },
            embedded_anchors: unsafe { input(embedded_anchors, cd, "embedded_anchors")? },
            features: unsafe { input(features, nf, "features")? },
            feature_shape: fshape,
            labels: unsafe { input(labels, dims(lshape)?, "labels")? },
            label_shape: lshape,
        };
        let semantic = unsafe { output(semantic_anchors, cd, "semantic_anchors")? };
        let init = unsafe { output(initialized, classes, "initialized")? };
        let out = StepBuffers {
            confidence: unsafe { output(confidence, classes, "confidence")? },
            nll: unsafe { output(nll, classes, "nll")? },
            weights: unsafe { output(weights, classes, "weights")? },
            class_pass: unsafe { output(class_pass, classes, "class_pass")? },
            grad_logits: unsafe { optional(grad_logits, cc, "grad_logits")? },
            grad_features: unsafe { optional(grad_features, nf, "grad_features")? },
        };
        let report = unsafe { out_ref(report, "report")? };
        *report = step(&config, &case, semantic, init, out)?.into();
        Ok(())
    })
}

/// One whole SAR step in `double`, equal to `sar reference`: anchor cross-entropy on
/// `anchor_logits` (`[C, C]`), the δ gate, the EMA of `semantic_anchors` (`[C, D]`, updated in
/// place, with the flags `initialized` `[C]`) toward `embedded_anchors` (`[C, D]`), and p2a of
/// `features` (shape `feature_shape`: `[B, D, H, W]` for rank 4, `[N, D]` for rank 2) with
/// `labels` (shape `label_shape`, rank `feature_rank − 1`: `[B, H', W']` resampled by PyTorch's
/// legacy `nearest`, or `[N]`). Writes p, ℓ, w, the per-anchor gate test (`[C]` each), dL_aux/dZ
/// and dL_p2a/dF (each skipped when null) and the scalars into `*report`. Gradients are those of
/// the unweighted losses. On an error Â and the flags are left as they were whenever the error
/// is found before the EMA (every input check is).
///
/// # Safety
/// Each pointer holds the elements its dims give; null only for empty arrays and the two
/// gradients.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn sar_step_f64(
    options: *const SarOptions,
    classes: usize,
    dim: usize,
    anchor_logits: *const f64,
    embedded_anchors: *const f64,
    semantic_anchors: *mut f64,
    initialized: *mut bool,
    features: *const f64,
    feature_shape: *const usize,
    feature_rank: usize,
    labels: *const i64,
    label_shape: *const usize,
    confidence: *mut f64,
    nll: *mut f64,
    weights: *mut f64,
    class_pass: *mut bool,
    grad_logits: *mut f64,
    grad_features: *mut f64,
    report: *mut SarStepReport,
) -> SarStatus {
    // SAFETY: forwarded contract.
    unsafe {
        step_impl(
            options,
            classes,
            dim,
            anchor_logits,
            embedded_anchors,
            semantic_anchors,
            initialized,
            features,
            feature_shape,
            feature_rank,
            labels,
            label_shape,
            confidence,
            nll,
            weights,
            class_pass,
            grad_logits,
            grad_features,
            report,
        )
    }
}

/// [`sar_step_f64`] in `float` (the report stays `double`).
///
/// # Safety
/// As [`sar_step_f64`].
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn sar_step_f32(
    options: *const SarOptions,
    classes: usize,
    dim: usize,
    anchor_logits: *const f32,
    embedded_anchors: *const f32,
    semantic_anchors: *mut f32,
    initialized: *mut bool,
    features: *const f32,
    feature_shape: *const usize,
    feature_rank: usize,
    labels: *const i64,
    label_shape: *const usize,
    confidence: *mut f32,
    nll: *mut f32,
    weights: *mut f32,
    class_pass: *mut bool,
    grad_logits: *mut f32,
    grad_features: *mut f32,
    report: *mut SarStepReport,
) -> SarStatus {
    // SAFETY: forwarded contract.
    unsafe {
        step_impl(
            options,
            classes,
            dim,
            anchor_logits,
            embedded_anchors,
            semantic_anchors,
            initialized,
            features,
            feature_shape,
            feature_rank,
            labels,
            label_shape,
            confidence,
            nll,
            weights,
            class_pass,
            grad_logits,
            grad_features,
            report,
        )
    }
}
