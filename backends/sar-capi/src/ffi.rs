//! The `extern "C"` entry points of the kernels, one per kernel and float type (written out, not
//! macro-generated, so that cbindgen sees them). Each forwards to the generic function in
//! `kernels.rs`.

use crate::error::SarStatus;
use crate::kernels::*;

/// Anchor cross-entropy (Eq. 5–7): writes p, ℓ, w (`[C]` each) and, when `grad_logits`
/// is not null, dL_aux/dZ (`[C, C]`); the scalars go to `*value`. `weights_mode` is
/// `SAR_WEIGHTS_ATTACHED`, `SAR_WEIGHTS_DETACHED` or `SAR_WEIGHTS_UNIFORM`.
///
/// # Safety
/// `logits` holds C·C values; `confidence`, `nll`, `weights` C each; `grad_logits` is
/// null or C·C; `value` points to one `SarAnchorCeValue`.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn sar_anchor_ce_f64(
    logits: *const f64,
    classes: usize,
    tau: f64,
    weights_mode: u32,
    confidence: *mut f64,
    nll: *mut f64,
    weights: *mut f64,
    grad_logits: *mut f64,
    value: *mut SarAnchorCeValue,
) -> SarStatus {
    // SAFETY: the caller's contract, as documented.
    unsafe {
        anchor_ce_impl::<f64>(
            logits,
            classes,
            tau,
            weights_mode,
            confidence,
            nll,
            weights,
            grad_logits,
            value,
        )
    }
}

/// Anchor cross-entropy (Eq. 5–7): writes p, ℓ, w (`[C]` each) and, when `grad_logits`
/// is not null, dL_aux/dZ (`[C, C]`); the scalars go to `*value`. `weights_mode` is
/// `SAR_WEIGHTS_ATTACHED`, `SAR_WEIGHTS_DETACHED` or `SAR_WEIGHTS_UNIFORM`.
///
/// # Safety
/// `logits` holds C·C values; `confidence`, `nll`, `weights` C each; `grad_logits` is
/// null or C·C; `value` points to one `SarAnchorCeValue`.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn sar_anchor_ce_f32(
    logits: *const f32,
    classes: usize,
    tau: f64,
    weights_mode: u32,
    confidence: *mut f32,
    nll: *mut f32,
    weights: *mut f32,
    grad_logits: *mut f32,
    value: *mut SarAnchorCeValue,
) -> SarStatus {
    // SAFETY: the caller's contract, as documented.
    unsafe {
        anchor_ce_impl::<f32>(
            logits,
            classes,
            tau,
            weights_mode,
            confidence,
            nll,
            weights,
            grad_logits,
            value,
        )
    }
}

/// The δ gate: writes the per-anchor test into `pass` (`[C]`) and the decision of
/// `gate` (`SAR_GATE_GLOBAL`: all pass; `SAR_GATE_PER_CLASS`: any passes) into
/// `*passed`. `nll` is ℓ from the anchor cross-entropy.
///
/// # Safety
/// `logits` holds C·C values, `nll` and `pass` C, `passed` one `bool`.
#[no_mangle]
pub unsafe extern "C" fn sar_gate_f64(
    logits: *const f64,
    classes: usize,
    nll: *const f64,
    delta: f64,
    gate_kind: u32,
    pass: *mut bool,
    passed: *mut bool,
) -> SarStatus {
    // SAFETY: the caller's contract, as documented.
    unsafe { gate_impl::<f64>(logits, classes, nll, delta, gate_kind, pass, passed) }
}

/// The δ gate: writes the per-anchor test into `pass` (`[C]`) and the decision of
/// `gate` (`SAR_GATE_GLOBAL`: all pass; `SAR_GATE_PER_CLASS`: any passes) into
/// `*passed`. `nll` is ℓ from the anchor cross-entropy.
///
/// # Safety
/// `logits` holds C·C values, `nll` and `pass` C, `passed` one `bool`.
#[no_mangle]
pub unsafe extern "C" fn sar_gate_f32(
    logits: *const f32,
    classes: usize,
    nll: *const f32,
    delta: f64,
    gate_kind: u32,
    pass: *mut bool,
    passed: *mut bool,
) -> SarStatus {
    // SAFETY: the caller's contract, as documented.
    unsafe { gate_impl::<f32>(logits, classes, nll, delta, gate_kind, pass, passed) }
}

/// Global-gate EMA (Eq. 8): when `passed`, Â (`semantic`, `[C, D]`) ← E the first time
/// (`*initialized` false), else αÂ + (1−α)E; sets `*initialized`. `*changed` (may be
/// null) says whether Â changed.
///
/// # Safety
/// `semantic` and `embedded` hold C·D values; `initialized` one `bool`.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn sar_ema_update_f64(
    semantic: *mut f64,
    initialized: *mut bool,
    embedded: *const f64,
    classes: usize,
    dim: usize,
    alpha: f64,
    passed: bool,
    changed: *mut bool,
) -> SarStatus {
    // SAFETY: the caller's contract, as documented.
    unsafe {
        ema_impl::<f64>(
            semantic,
            initialized,
            embedded,
            classes,
            dim,
            alpha,
            passed,
            changed,
        )
    }
}

/// Global-gate EMA (Eq. 8): when `passed`, Â (`semantic`, `[C, D]`) ← E the first time
/// (`*initialized` false), else αÂ + (1−α)E; sets `*initialized`. `*changed` (may be
/// null) says whether Â changed.
///
/// # Safety
/// `semantic` and `embedded` hold C·D values; `initialized` one `bool`.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn sar_ema_update_f32(
    semantic: *mut f32,
    initialized: *mut bool,
    embedded: *const f32,
    classes: usize,
    dim: usize,
    alpha: f64,
    passed: bool,
    changed: *mut bool,
) -> SarStatus {
    // SAFETY: the caller's contract, as documented.
    unsafe {
        ema_impl::<f32>(
            semantic,
            initialized,
            embedded,
            classes,
            dim,
            alpha,
            passed,
            changed,
        )
    }
}

/// Per-class EMA: row c of Â is updated (initialised the first time) iff `passed[c]`.
/// `*updated` (may be null) gets the number of rows updated.
///
/// # Safety
/// `semantic`, `embedded` hold C·D values; `initialized`, `passed` C flags.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn sar_ema_update_per_class_f64(
    semantic: *mut f64,
    initialized: *mut bool,
    embedded: *const f64,
    classes: usize,
    dim: usize,
    alpha: f64,
    passed: *const bool,
    updated: *mut usize,
) -> SarStatus {
    // SAFETY: the caller's contract, as documented.
    unsafe {
        ema_per_class_impl::<f64>(
            semantic,
            initialized,
            embedded,
            classes,
            dim,
            alpha,
            passed,
            updated,
        )
    }
}

/// Per-class EMA: row c of Â is updated (initialised the first time) iff `passed[c]`.
/// `*updated` (may be null) gets the number of rows updated.
///
/// # Safety
/// `semantic`, `embedded` hold C·D values; `initialized`, `passed` C flags.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn sar_ema_update_per_class_f32(
    semantic: *mut f32,
    initialized: *mut bool,
    embedded: *const f32,
    classes: usize,
    dim: usize,
    alpha: f64,
    passed: *const bool,
    updated: *mut usize,
) -> SarStatus {
    // SAFETY: the caller's contract, as documented.
    unsafe {
        ema_per_class_impl::<f32>(
            semantic,
            initialized,
            embedded,
            classes,
            dim,
            alpha,
            passed,
            updated,
        )
    }
}

/// L_p2a (Eq. 4) and, when `grad` is not null, dL_p2a/dF for NCHW features
/// `[B, D, H, W]` with labels `[B, H', W']` (resampled by PyTorch's legacy `nearest`),
/// toward `anchors` `[C, D]`. `class_active` (`[C]`, may be null = all) restricts Ω to
/// the active classes (per-class gate).
///
/// # Safety
/// Arrays hold the lengths their dims give; `value` points to one `SarP2aValue`.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn sar_p2a_nchw_f64(
    features: *const f64,
    labels: *const i64,
    geometry: SarGeometry,
    anchors: *const f64,
    classes: usize,
    ignore_index: i64,
    class_active: *const bool,
    grad: *mut f64,
    value: *mut SarP2aValue,
) -> SarStatus {
    // SAFETY: the caller's contract, as documented.
    unsafe {
        p2a_nchw_impl::<f64>(
            features,
            labels,
            geometry,
            anchors,
            classes,
            ignore_index,
            class_active,
            grad,
            value,
        )
    }
}

/// L_p2a (Eq. 4) and, when `grad` is not null, dL_p2a/dF for NCHW features
/// `[B, D, H, W]` with labels `[B, H', W']` (resampled by PyTorch's legacy `nearest`),
/// toward `anchors` `[C, D]`. `class_active` (`[C]`, may be null = all) restricts Ω to
/// the active classes (per-class gate).
///
/// # Safety
/// Arrays hold the lengths their dims give; `value` points to one `SarP2aValue`.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn sar_p2a_nchw_f32(
    features: *const f32,
    labels: *const i64,
    geometry: SarGeometry,
    anchors: *const f32,
    classes: usize,
    ignore_index: i64,
    class_active: *const bool,
    grad: *mut f32,
    value: *mut SarP2aValue,
) -> SarStatus {
    // SAFETY: the caller's contract, as documented.
    unsafe {
        p2a_nchw_impl::<f32>(
            features,
            labels,
            geometry,
            anchors,
            classes,
            ignore_index,
            class_active,
            grad,
            value,
        )
    }
}

/// L_p2a and (optional) dL/dF for `[N, D]` features with one label per row.
///
/// # Safety
/// `features` (and a non-null `grad`) hold N·D values, `labels` N, `anchors` C·D.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn sar_p2a_rows_f64(
    features: *const f64,
    rows: usize,
    dim: usize,
    labels: *const i64,
    anchors: *const f64,
    classes: usize,
    ignore_index: i64,
    class_active: *const bool,
    grad: *mut f64,
    value: *mut SarP2aValue,
) -> SarStatus {
    // SAFETY: the caller's contract, as documented.
    unsafe {
        p2a_rows_impl::<f64>(
            features,
            rows,
            dim,
            labels,
            anchors,
            classes,
            ignore_index,
            class_active,
            grad,
            value,
        )
    }
}

/// L_p2a and (optional) dL/dF for `[N, D]` features with one label per row.
///
/// # Safety
/// `features` (and a non-null `grad`) hold N·D values, `labels` N, `anchors` C·D.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn sar_p2a_rows_f32(
    features: *const f32,
    rows: usize,
    dim: usize,
    labels: *const i64,
    anchors: *const f32,
    classes: usize,
    ignore_index: i64,
    class_active: *const bool,
    grad: *mut f32,
    value: *mut SarP2aValue,
) -> SarStatus {
    // SAFETY: the caller's contract, as documented.
    unsafe {
        p2a_rows_impl::<f32>(
            features,
            rows,
            dim,
            labels,
            anchors,
            classes,
            ignore_index,
            class_active,
            grad,
            value,
        )
    }
}

/// MixUp p2a for `[N, D]` features: the target of row i is
/// λ·Â_{a_i} + (1 − λ)·Â_{b_i}.
///
/// # Safety
/// As the plain rows function, with `labels_a` and `labels_b` of N each.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn sar_p2a_rows_mixup_f64(
    features: *const f64,
    rows: usize,
    dim: usize,
    labels_a: *const i64,
    labels_b: *const i64,
    lambda: f64,
    anchors: *const f64,
    classes: usize,
    ignore_index: i64,
    class_active: *const bool,
    grad: *mut f64,
    value: *mut SarP2aValue,
) -> SarStatus {
    // SAFETY: the caller's contract, as documented.
    unsafe {
        p2a_rows_mixup_impl::<f64>(
            features,
            rows,
            dim,
            labels_a,
            labels_b,
            lambda,
            anchors,
            classes,
            ignore_index,
            class_active,
            grad,
            value,
        )
    }
}

/// MixUp p2a for `[N, D]` features: the target of row i is
/// λ·Â_{a_i} + (1 − λ)·Â_{b_i}.
///
/// # Safety
/// As the plain rows function, with `labels_a` and `labels_b` of N each.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn sar_p2a_rows_mixup_f32(
    features: *const f32,
    rows: usize,
    dim: usize,
    labels_a: *const i64,
    labels_b: *const i64,
    lambda: f64,
    anchors: *const f32,
    classes: usize,
    ignore_index: i64,
    class_active: *const bool,
    grad: *mut f32,
    value: *mut SarP2aValue,
) -> SarStatus {
    // SAFETY: the caller's contract, as documented.
    unsafe {
        p2a_rows_mixup_impl::<f32>(
            features,
            rows,
            dim,
            labels_a,
            labels_b,
            lambda,
            anchors,
            classes,
            ignore_index,
            class_active,
            grad,
            value,
        )
    }
}

/// Class prototypes (Eq. 1/3): per-class mean features over Ω into `prototypes`
/// (`[C, D]`, zero for a class with no pixel) and pixel counts into `counts` (`[C]`,
/// may be null). `shape_anchors` is any `[C, D]` array (Â, say): as in the Rust
/// kernel, only its length is checked, never its values.
///
/// # Safety
/// Arrays hold the lengths their dims give.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn sar_class_prototypes_f64(
    features: *const f64,
    labels: *const i64,
    geometry: SarGeometry,
    shape_anchors: *const f64,
    classes: usize,
    ignore_index: i64,
    class_active: *const bool,
    prototypes: *mut f64,
    counts: *mut u64,
) -> SarStatus {
    // SAFETY: the caller's contract, as documented.
    unsafe {
        prototypes_impl::<f64>(
            features,
            labels,
            geometry,
            shape_anchors,
            classes,
            ignore_index,
            class_active,
            prototypes,
            counts,
        )
    }
}

/// Class prototypes (Eq. 1/3): per-class mean features over Ω into `prototypes`
/// (`[C, D]`, zero for a class with no pixel) and pixel counts into `counts` (`[C]`,
/// may be null). `shape_anchors` is any `[C, D]` array (Â, say): as in the Rust
/// kernel, only its length is checked, never its values.
///
/// # Safety
/// Arrays hold the lengths their dims give.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn sar_class_prototypes_f32(
    features: *const f32,
    labels: *const i64,
    geometry: SarGeometry,
    shape_anchors: *const f32,
    classes: usize,
    ignore_index: i64,
    class_active: *const bool,
    prototypes: *mut f32,
    counts: *mut u64,
) -> SarStatus {
    // SAFETY: the caller's contract, as documented.
    unsafe {
        prototypes_impl::<f32>(
            features,
            labels,
            geometry,
            shape_anchors,
            classes,
            ignore_index,
            class_active,
            prototypes,
            counts,
        )
    }
}

/// CAR's intra-class loss (spec §7) toward `prototypes` (`[C, D]`, constants) into
/// `*loss`, and dL/dF into `grad` when it is not null.
///
/// # Safety
/// Arrays hold the lengths their dims give; `loss` points to one `double`.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn sar_car_intra_class_f64(
    features: *const f64,
    labels: *const i64,
    geometry: SarGeometry,
    prototypes: *const f64,
    classes: usize,
    ignore_index: i64,
    class_active: *const bool,
    grad: *mut f64,
    loss: *mut f64,
) -> SarStatus {
    // SAFETY: the caller's contract, as documented.
    unsafe {
        car_impl::<f64>(
            features,
            labels,
            geometry,
            prototypes,
            classes,
            ignore_index,
            class_active,
            grad,
            loss,
        )
    }
}

/// CAR's intra-class loss (spec §7) toward `prototypes` (`[C, D]`, constants) into
/// `*loss`, and dL/dF into `grad` when it is not null.
///
/// # Safety
/// Arrays hold the lengths their dims give; `loss` points to one `double`.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn sar_car_intra_class_f32(
    features: *const f32,
    labels: *const i64,
    geometry: SarGeometry,
    prototypes: *const f32,
    classes: usize,
    ignore_index: i64,
    class_active: *const bool,
    grad: *mut f32,
    loss: *mut f64,
) -> SarStatus {
    // SAFETY: the caller's contract, as documented.
    unsafe {
        car_impl::<f32>(
            features,
            labels,
            geometry,
            prototypes,
            classes,
            ignore_index,
            class_active,
            grad,
            loss,
        )
    }
}

/// Pre-defined anchors A (`[C, D]`) of `kind` (`SAR_ANCHORS_*`) from `seed`, with the
/// project's portable generator (the same bits on every platform).
///
/// # Safety
/// `out` holds C·D values.
#[no_mangle]
pub unsafe extern "C" fn sar_generate_anchors_f64(
    kind: u32,
    seed: u64,
    classes: usize,
    dim: usize,
    out: *mut f64,
) -> SarStatus {
    // SAFETY: the caller's contract, as documented.
    unsafe { generate_anchors_impl::<f64>(kind, seed, classes, dim, out) }
}

/// Pre-defined anchors A (`[C, D]`) of `kind` (`SAR_ANCHORS_*`) from `seed`, with the
/// project's portable generator (the same bits on every platform).
///
/// # Safety
/// `out` holds C·D values.
#[no_mangle]
pub unsafe extern "C" fn sar_generate_anchors_f32(
    kind: u32,
    seed: u64,
    classes: usize,
    dim: usize,
    out: *mut f32,
) -> SarStatus {
    // SAFETY: the caller's contract, as documented.
    unsafe { generate_anchors_impl::<f32>(kind, seed, classes, dim, out) }
}
