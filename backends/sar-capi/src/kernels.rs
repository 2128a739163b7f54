//! One `extern "C"` function per `sar-math` kernel and float type. Each only decodes pointers
//! and dims and calls the kernel: no SAR arithmetic lives here.

use crate::error::{guard, Error, SarStatus};
use crate::{dims, gate_mode, input, optional, out_ref, output, weight_mode};
use sar_math::anchor_ce::{anchor_ce, gate, AnchorCeBuffers};
use sar_math::anchors::generate_anchors;
use sar_math::ema::{ema_update, ema_update_per_class};
use sar_math::p2a::{p2a_nchw, p2a_rows, FeatureGeometry, P2aTargets, RowLabels};
use sar_math::prototype::{car_intra_class, class_prototypes};
use sar_math::resample::{nearest_source_index, resample_labels_nearest};
use sar_math::{AnchorKind, Real};

/// Dims of an NCHW feature map `[batch, channels, height, width]` and its label map
/// `[batch, label_height, label_width]`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SarGeometry {
    /// B.
    pub batch: usize,
    /// D.
    pub channels: usize,
    /// H.
    pub height: usize,
    /// W.
    pub width: usize,
    /// H'.
    pub label_height: usize,
    /// W'.
    pub label_width: usize,
}

impl From<SarGeometry> for FeatureGeometry {
    fn from(g: SarGeometry) -> Self {
        FeatureGeometry {
            batch: g.batch,
            channels: g.channels,
            height: g.height,
            width: g.width,
            label_height: g.label_height,
            label_width: g.label_width,
        }
    }
}

/// Scalar results of the anchor cross-entropy.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct SarAnchorCeValue {
    /// L_aux (unweighted).
    pub loss: f64,
    /// |U|: anchors with confidence ≤ τ.
    pub uncertain: usize,
    /// S = Σ_{c∈U} ℓ_c.
    pub nll_sum: f64,
}

/// Scalar results of a p2a evaluation.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct SarP2aValue {
    /// L_p2a (unweighted).
    pub loss: f64,
    /// |Ω|.
    pub valid: usize,
}

/// `kind` of `sar_generate_anchors_f64` / `_f32`: i.i.d. normal rows.
pub const SAR_ANCHORS_NORMAL: u32 = 0;
/// Orthonormal rows (OM; needs C ≤ D).
pub const SAR_ANCHORS_ORTHOGONAL: u32 = 1;
/// Simplex equiangular tight frame (MES; needs C ≤ D + 1).
pub const SAR_ANCHORS_SIMPLEX_ETF: u32 = 2;

fn anchor_kind(v: u32) -> crate::Result<AnchorKind> {
    match v {
        SAR_ANCHORS_NORMAL => Ok(AnchorKind::Normal),
        SAR_ANCHORS_ORTHOGONAL => Ok(AnchorKind::Orthogonal),
        SAR_ANCHORS_SIMPLEX_ETF => Ok(AnchorKind::SimplexEtf),
        _ => Err(Error::Input(
            SarStatus::SarErrParam,
            "kind must be SAR_ANCHORS_NORMAL (0), SAR_ANCHORS_ORTHOGONAL (1) or SAR_ANCHORS_SIMPLEX_ETF (2)",
        )),
    }
}

fn geometry_lens(g: &SarGeometry) -> crate::Result<(usize, usize)> {
    Ok((
        dims(&[g.batch, g.channels, g.height, g.width])?,
        dims(&[g.batch, g.label_height, g.label_width])?,
    ))
}

fn targets<'a, F>(
    anchors: &'a [F],
    classes: usize,
    ignore_index: i64,
    class_active: Option<&'a [bool]>,
) -> P2aTargets<'a, F> {
    P2aTargets {
        anchors,
        classes,
        ignore_index,
        class_active,
    }
}

/// `class_active` may be null (all classes active).
///
/// # Safety
/// A non-null pointer must point to `classes` flags.
unsafe fn active<'a>(p: *const bool, classes: usize) -> crate::Result<Option<&'a [bool]>> {
    if p.is_null() {
        Ok(None)
    } else {
        // SAFETY: forwarded.
        unsafe { input(p, classes, "class_active") }.map(Some)
    }
}

/// PyTorch's legacy `nearest`: the input index that output index `dst` reads along an axis of
/// `input` → `output` elements.
#[no_mangle]
pub extern "C" fn sar_nearest_source_index(input: usize, output: usize, dst: usize) -> usize {
    nearest_source_index(input, output, dst)
}

/// Resamples `[batch, in_h, in_w]` labels to `[batch, out_h, out_w]` (PyTorch's legacy
/// `nearest`, bit-exact) into `out`.
///
/// # Safety
/// `labels` must hold `batch·in_h·in_w` and `out` `batch·out_h·out_w` elements (null only when
/// empty).
#[no_mangle]
pub unsafe extern "C" fn sar_resample_labels_nearest_i64(
    labels: *const i64,
    batch: usize,
    in_h: usize,
    in_w: usize,
    out_h: usize,
    out_w: usize,
    out: *mut i64,
) -> SarStatus {
    guard(|| {
        // SAFETY: the caller's contract (lengths from the dims).
        let l = unsafe { input(labels, dims(&[batch, in_h, in_w])?, "labels")? };
        let o = unsafe { output(out, dims(&[batch, out_h, out_w])?, "out")? };
        resample_labels_nearest(l, batch, (in_h, in_w), (out_h, out_w), o)?;
        Ok(())
    })
}

/// Anchor cross-entropy (Eq. 5–7): writes p, ℓ, w (`[C]` each) and, when `grad_logits`
/// is not null, dL_aux/dZ (`[C, C]`); the scalars go to `*value`. `weights_mode` is
/// `SAR_WEIGHTS_ATTACHED`, `SAR_WEIGHTS_DETACHED` or `SAR_WEIGHTS_UNIFORM`.
///
/// # Safety
/// `logits` holds C·C values; `confidence`, `nll`, `weights` C each; `grad_logits` is
/// null or C·C; `value` points to one `SarAnchorCeValue`.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn anchor_ce_impl<F: Real>(
    logits: *const F,
    classes: usize,
    tau: f64,
    weights_mode: u32,
    confidence: *mut F,
    nll: *mut F,
    weights: *mut F,
    grad_logits: *mut F,
    value: *mut SarAnchorCeValue,
) -> SarStatus {
    guard(|| {
        let mode = weight_mode(weights_mode)?;
        let cc = dims(&[classes, classes])?;
        // SAFETY: the caller's contract (lengths from the dims).
        let z = unsafe { input(logits, cc, "logits")? };
        let out = AnchorCeBuffers {
            confidence: unsafe { output(confidence, classes, "confidence")? },
            nll: unsafe { output(nll, classes, "nll")? },
            weights: unsafe { output(weights, classes, "weights")? },
            grad_logits: unsafe { optional(grad_logits, cc, "grad_logits")? },
        };
        let value = unsafe { out_ref(value, "value")? };
        let v = anchor_ce(z, classes, tau, mode, out)?;
        *value = SarAnchorCeValue {
            loss: v.loss.as_f64(),
            uncertain: v.uncertain,
            nll_sum: v.nll_sum.as_f64(),
        };
        Ok(())
    })
}

/// The δ gate: writes the per-anchor test into `pass` (`[C]`) and the decision of
/// `gate` (`SAR_GATE_GLOBAL`: all pass; `SAR_GATE_PER_CLASS`: any passes) into
/// `*passed`. `nll` is ℓ from the anchor cross-entropy.
///
/// # Safety
/// `logits` holds C·C values, `nll` and `pass` C, `passed` one `bool`.
pub(crate) unsafe fn gate_impl<F: Real>(
    logits: *const F,
    classes: usize,
    nll: *const F,
    delta: f64,
    gate_kind: u32,
    pass: *mut bool,
    passed: *mut bool,
) -> SarStatus {
    guard(|| {
        let mode = gate_mode(gate_kind)?;
        // SAFETY: the caller's contract.
        let z = unsafe { input(logits, dims(&[classes, classes])?, "logits")? };
        let l = unsafe { input(nll, classes, "nll")? };
        let p = unsafe { output(pass, classes, "pass")? };
        let out = unsafe { out_ref(passed, "passed")? };
        *out = gate(z, classes, l, delta, mode, p)?;
        Ok(())
    })
}

/// Global-gate EMA (Eq. 8): when `passed`, Â (`semantic`, `[C, D]`) ← E the first time
/// (`*initialized` false), else αÂ + (1−α)E; sets `*initialized`. `*changed` (may be
/// null) says whether Â changed.
///
/// # Safety
/// `semantic` and `embedded` hold C·D values; `initialized` one `bool`.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn ema_impl<F: Real>(
    semantic: *mut F,
    initialized: *mut bool,
    embedded: *const F,
    classes: usize,
    dim: usize,
    alpha: f64,
    passed: bool,
    changed: *mut bool,
) -> SarStatus {
    guard(|| {
        let n = dims(&[classes, dim])?;
        // SAFETY: the caller's contract.
        let s = unsafe { output(semantic, n, "semantic")? };
        let i = unsafe { out_ref(initialized, "initialized")? };
        let e = unsafe { input(embedded, n, "embedded")? };
        let c = ema_update(s, i, e, classes, dim, alpha, passed)?;
        if let Some(out) = unsafe { changed.as_mut() } {
            *out = c;
        }
        Ok(())
    })
}

/// Per-class EMA: row c of Â is updated (initialised the first time) iff `passed[c]`.
/// `*updated` (may be null) gets the number of rows updated.
///
/// # Safety
/// `semantic`, `embedded` hold C·D values; `initialized`, `passed` C flags.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn ema_per_class_impl<F: Real>(
    semantic: *mut F,
    initialized: *mut bool,
    embedded: *const F,
    classes: usize,
    dim: usize,
    alpha: f64,
    passed: *const bool,
    updated: *mut usize,
) -> SarStatus {
    guard(|| {
        let n = dims(&[classes, dim])?;
        // SAFETY: the caller's contract.
        let s = unsafe { output(semantic, n, "semantic")? };
        let i = unsafe { output(initialized, classes, "initialized")? };
        let e = unsafe { input(embedded, n, "embedded")? };
        let p = unsafe { input(passed, classes, "passed")? };
        let u = ema_update_per_class(s, i, e, classes, dim, alpha, p)?;
        if let Some(out) = unsafe { updated.as_mut() } {
            *out = u;
        }
        Ok(())
    })
}

/// L_p2a (Eq. 4) and, when `grad` is not null, dL_p2a/dF for NCHW features
/// `[B, D, H, W]` with labels `[B, H', W']` (resampled by PyTorch's legacy `nearest`),
/// toward `anchors` `[C, D]`. `class_active` (`[C]`, may be null = all) restricts Ω to
/// the active classes (per-class gate).
///
/// # Safety
/// Arrays hold the lengths their dims give; `value` points to one `SarP2aValue`.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn p2a_nchw_impl<F: Real>(
    features: *const F,
    labels: *const i64,
    geometry: SarGeometry,
    anchors: *const F,
    classes: usize,
    ignore_index: i64,
    class_active: *const bool,
    grad: *mut F,
    value: *mut SarP2aValue,
) -> SarStatus {
    guard(|| {
        let (nf, nl) = geometry_lens(&geometry)?;
        // SAFETY: the caller's contract.
        let f = unsafe { input(features, nf, "features")? };
        let l = unsafe { input(labels, nl, "labels")? };
        let a = unsafe { input(anchors, dims(&[classes, geometry.channels])?, "anchors")? };
        let act = unsafe { active(class_active, classes)? };
        let g = unsafe { optional(grad, nf, "grad")? };
        let value = unsafe { out_ref(value, "value")? };
        let t = targets(a, classes, ignore_index, act);
        let v = p2a_nchw(f, l, &geometry.into(), &t, g)?;
        *value = SarP2aValue {
            loss: v.loss.as_f64(),
            valid: v.valid,
        };
        Ok(())
    })
}

/// L_p2a and (optional) dL/dF for `[N, D]` features with one label per row.
///
/// # Safety
/// `features` (and a non-null `grad`) hold N·D values, `labels` N, `anchors` C·D.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn p2a_rows_impl<F: Real>(
    features: *const F,
    rows: usize,
    dim: usize,
    labels: *const i64,
    anchors: *const F,
    classes: usize,
    ignore_index: i64,
    class_active: *const bool,
    grad: *mut F,
    value: *mut SarP2aValue,
) -> SarStatus {
    guard(|| {
        let n = dims(&[rows, dim])?;
        // SAFETY: the caller's contract.
        let f = unsafe { input(features, n, "features")? };
        let l = unsafe { input(labels, rows, "labels")? };
        let a = unsafe { input(anchors, dims(&[classes, dim])?, "anchors")? };
        let act = unsafe { active(class_active, classes)? };
        let g = unsafe { optional(grad, n, "grad")? };
        let value = unsafe { out_ref(value, "value")? };
        let t = targets(a, classes, ignore_index, act);
        let v = p2a_rows(f, RowLabels::Plain(l), dim, &t, g)?;
        *value = SarP2aValue {
            loss: v.loss.as_f64(),
            valid: v.valid,
        };
        Ok(())
    })
}

/// MixUp p2a for `[N, D]` features: the target of row i is
/// λ·Â_{a_i} + (1 − λ)·Â_{b_i}.
///
/// # Safety
/// As the plain rows function, with `labels_a` and `labels_b` of N each.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn p2a_rows_mixup_impl<F: Real>(
    features: *const F,
    rows: usize,
    dim: usize,
    labels_a: *const i64,
    labels_b: *const i64,
    lambda: f64,
    anchors: *const F,
    classes: usize,
    ignore_index: i64,
    class_active: *const bool,
    grad: *mut F,
    value: *mut SarP2aValue,
) -> SarStatus {
    guard(|| {
        let n = dims(&[rows, dim])?;
        // SAFETY: the caller's contract.
        let f = unsafe { input(features, n, "features")? };
        let la = unsafe { input(labels_a, rows, "labels_a")? };
        let lb = unsafe { input(labels_b, rows, "labels_b")? };
        let a = unsafe { input(anchors, dims(&[classes, dim])?, "anchors")? };
        let act = unsafe { active(class_active, classes)? };
        let g = unsafe { optional(grad, n, "grad")? };
        let value = unsafe { out_ref(value, "value")? };
        let t = targets(a, classes, ignore_index, act);
        let v = p2a_rows(
            f,
            RowLabels::Mixup {
                a: la,
                b: lb,
                lambda,
            },
            dim,
            &t,
            g,
        )?;
        *value = SarP2aValue {
            loss: v.loss.as_f64(),
            valid: v.valid,
        };
        Ok(())
    })
}

/// Class prototypes (Eq. 1/3): per-class mean features over Ω into `prototypes`
/// (`[C, D]`, zero for a class with no pixel) and pixel counts into `counts` (`[C]`,
/// may be null). `shape_anchors` is any `[C, D]` array (Â, say): as in the Rust
/// kernel, only its length is checked, never its values.
///
/// # Safety
/// Arrays hold the lengths their dims give.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn prototypes_impl<F: Real>(
    features: *const F,
    labels: *const i64,
    geometry: SarGeometry,
    shape_anchors: *const F,
    classes: usize,
    ignore_index: i64,
    class_active: *const bool,
    prototypes: *mut F,
    counts: *mut u64,
) -> SarStatus {
    guard(|| {
        let (nf, nl) = geometry_lens(&geometry)?;
        let ncd = dims(&[classes, geometry.channels])?;
        // SAFETY: the caller's contract.
        let f = unsafe { input(features, nf, "features")? };
        let l = unsafe { input(labels, nl, "labels")? };
        let a = unsafe { input(shape_anchors, ncd, "shape_anchors")? };
        let act = unsafe { active(class_active, classes)? };
        let p = unsafe { output(prototypes, ncd, "prototypes")? };
        let mut none = [0u64; 0];
        let cnt = match unsafe { optional(counts, classes, "counts")? } {
            Some(c) => c,
            None if classes == 0 => &mut none[..],
            None => {
                return prototypes_without_counts(f, l, geometry, a, classes, ignore_index, act, p)
            }
        };
        let t = targets(a, classes, ignore_index, act);
        class_prototypes(f, l, &geometry.into(), &t, p, cnt)?;
        Ok(())
    })
}

/// CAR's intra-class loss (spec §7) toward `prototypes` (`[C, D]`, constants) into
/// `*loss`, and dL/dF into `grad` when it is not null.
///
/// # Safety
/// Arrays hold the lengths their dims give; `loss` points to one `double`.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn car_impl<F: Real>(
    features: *const F,
    labels: *const i64,
    geometry: SarGeometry,
    prototypes: *const F,
    classes: usize,
    ignore_index: i64,
    class_active: *const bool,
    grad: *mut F,
    loss: *mut f64,
) -> SarStatus {
    guard(|| {
        let (nf, nl) = geometry_lens(&geometry)?;
        // SAFETY: the caller's contract.
        let f = unsafe { input(features, nf, "features")? };
        let l = unsafe { input(labels, nl, "labels")? };
        let a = unsafe {
            input(
                prototypes,
                dims(&[classes, geometry.channels])?,
                "prototypes",
            )?
        };
        let act = unsafe { active(class_active, classes)? };
        let g = unsafe { optional(grad, nf, "grad")? };
        let out = unsafe { out_ref(loss, "loss")? };
        let t = targets(a, classes, ignore_index, act);
        *out = car_intra_class(f, l, &geometry.into(), &t, g)?.as_f64();
        Ok(())
    })
}

/// Pre-defined anchors A (`[C, D]`) of `kind` (`SAR_ANCHORS_*`) from `seed`, with the
/// project's portable generator (the same bits on every platform).
///
/// # Safety
/// `out` holds C·D values.
pub(crate) unsafe fn generate_anchors_impl<F: Real>(
    kind: u32,
    seed: u64,
    classes: usize,
    dim: usize,
    out: *mut F,
) -> SarStatus {
    guard(|| {
        let k = anchor_kind(kind)?;
        // SAFETY: the caller's contract.
        let o = unsafe { output(out, dims(&[classes, dim])?, "out")? };
        generate_anchors(k, seed, classes, dim, o)?;
        Ok(())
    })
}
/// Prototypes with no counts array: the counts go to a stack buffer, class block by class
/// block, so that nothing is allocated (the kernel needs somewhere to count).
#[allow(clippy::too_many_arguments)]
fn prototypes_without_counts<F: sar_math::Real>(
    f: &[F],
    l: &[i64],
    geometry: SarGeometry,
    a: &[F],
    classes: usize,
    ignore_index: i64,
    act: Option<&[bool]>,
    p: &mut [F],
) -> crate::Result<()> {
    const STACK: usize = 256;
    if classes <= STACK {
        let mut counts = [0u64; STACK];
        let t = targets(a, classes, ignore_index, act);
        class_prototypes(f, l, &geometry.into(), &t, p, &mut counts[..classes])?;
        Ok(())
    } else {
        Err(Error::Input(
            SarStatus::SarErrNullPointer,
            "`counts` may be null only for C ≤ 256; pass a [C] array",
        ))
    }
}
