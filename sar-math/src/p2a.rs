//! Pixel-to-anchor loss (Eq. 4, spec §5): loss and analytic gradient in one fused pass.
//!
//! L_p2a = (1 / (|Ω|·D)) Σ_{i∈Ω} Σ_d (F_{i,d} − Â_{y_i,d})²,
//! dL/dF_{i,d} = 2 (F_{i,d} − Â_{y_i,d}) / (|Ω|·D) for i ∈ Ω, 0 elsewhere,
//! with Ω = {i : y_i ≠ ignore_index} (and, with a per-class gate, y_i's anchor active).
//! |Ω| = 0 gives L = 0 and a zero gradient.
//!
//! Layouts:
//! - segmentation: features `[B, D, H, W]` (NCHW, row-major), labels `[B, H', W']` resampled to
//!   H×W on the fly with [`crate::resample::nearest_source_index`] (PyTorch's legacy `nearest`);
//! - classification: features `[N, D]`, labels `[N]`; with MixUp (λ, y_a, y_b) the target row is
//!   λ·Â_{y_a} + (1 − λ)·Â_{y_b}, and a row is in Ω iff both labels are.
//!
//! Anchors Â are `[C, D]`. Every label must be in `0..C` or equal the ignore index; anything else
//! is [`SarError::Label`]. Any non-finite feature inside Ω makes the loss non-finite, which is
//! reported as [`SarError::NonFinite`]; features outside Ω are never read into the result.
//!
//! # Speed
//! The NCHW kernel is bound by memory traffic: it must read F and write dL/dF once. It works
//! on tiles of up to 8192 consecutive pixels of one image: the tile's resampled class indices
//! are computed once into a stack buffer (u8 when C ≤ 255). For each channel plane the tile's
//! targets are gathered from a 256-entry table of that channel's anchor values into an L1
//! buffer, and a dense loop with eight accumulators (vectorised by the compiler) computes the
//! squares and the gradient. Per-tile partial sums go into an `f64` total. The tile buffers
//! live on the stack: about 56 KiB for `f32` (88 KiB for `f64`, or C > 255). [`p2a_nchw_block`]
//! exposes one image's channel range so that callers can run blocks on several threads.

use crate::error::{check_len, mul_dims, Op, Result, SarError};
use crate::real::{Label, Real};
use crate::resample::nearest_source_index;

/// Dimensions of an NCHW feature map `[batch, channels, height, width]` and of its label map
/// `[batch, label_height, label_width]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FeatureGeometry {
    /// B.
    pub batch: usize,
    /// D, the channels that feed the classifier.
    pub channels: usize,
    /// H of the feature map.
    pub height: usize,
    /// W of the feature map.
    pub width: usize,
    /// H' of the label map.
    pub label_height: usize,
    /// W' of the label map.
    pub label_width: usize,
}

impl FeatureGeometry {
    /// B·D·H·W, checked.
    pub fn feature_len(&self) -> Result<usize> {
        mul_dims(
            Op::P2a,
            &[self.batch, self.channels, self.height, self.width],
        )
    }
    /// B·H'·W', checked.
    pub fn label_len(&self) -> Result<usize> {
        mul_dims(Op::P2a, &[self.batch, self.label_height, self.label_width])
    }
    fn validate(&self) -> Result<()> {
        if self.channels == 0 {
            return Err(SarError::Shape {
                op: Op::P2a,
                what: "features need at least one channel",
            });
        }
        if self.height * self.width != 0 && self.label_height * self.label_width == 0 {
            return Err(SarError::Shape {
                op: Op::P2a,
                what: "label map is empty but the feature map is not",
            });
        }
        self.feature_len()?;
        self.label_len()?;
        Ok(())
    }
}

/// What the features are pulled to: anchors `[classes, D]`, which labels are ignored, and
/// (per-class gate) which classes are active.
#[derive(Debug, Clone, Copy)]
pub struct P2aTargets<'a, F> {
    /// Â (or, for the CR baseline, the raw anchors A), row-major `[classes, D]`.
    pub anchors: &'a [F],
    /// C.
    pub classes: usize,
    /// Label excluded from Ω.
    pub ignore_index: i64,
    /// Per-class gate: pixels of class c count only if `class_active[c]`. `None` = all active.
    pub class_active: Option<&'a [bool]>,
}

impl<F: Real> P2aTargets<'_, F> {
    fn validate(&self, dim: usize) -> Result<()> {
        let op = Op::P2a;
        if self.classes == 0 {
            return Err(SarError::Shape {
                op,
                what: "classes must be at least 1",
            });
        }
        check_len(
            op,
            "anchors",
            self.anchors.len(),
            mul_dims(op, &[self.classes, dim])?,
        )?;
        if let Some(a) = self.class_active {
            check_len(op, "class_active", a.len(), self.classes)?;
        }
        Ok(())
    }

    /// The class of a label, `None` when it is outside Ω; an error when it is out of range.
    #[inline]
    fn class_of(&self, label: i64, index: usize) -> Result<Option<usize>> {
        if label == self.ignore_index {
            return Ok(None);
        }
        if label < 0 || label as u64 >= self.classes as u64 {
            return Err(SarError::Label {
                op: Op::P2a,
                index,
                label,
                classes: self.classes,
            });
        }
        let c = label as usize;
        Ok(match self.class_active {
            Some(active) if !active[c] => None,
            _ => Some(c),
        })
    }
}

/// Scalar results of a p2a evaluation.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct P2aValue<F> {
    /// L_p2a (unweighted).
    pub loss: F,
    /// |Ω|, the pixels (or rows) that count.
    pub valid: usize,
}

/// Validates every label of a `[B, H', W']` map and counts |Ω| among the pixels sampled at
/// feature resolution.
pub fn p2a_valid_count_nchw<F: Real, L: Label>(
    labels: &[L],
    geometry: &FeatureGeometry,
    targets: &P2aTargets<'_, F>,
) -> Result<usize> {
    geometry.validate()?;
    targets.validate(geometry.channels)?;
    check_len(Op::P2a, "labels", labels.len(), geometry.label_len()?)?;
    for (i, &l) in labels.iter().enumerate() {
        targets.class_of(l.to_i64(), i)?;
    }
    if geometry.height * geometry.width == 0 {
        // No pixels; the label map may be empty too (found by fuzzing: H > 0, W = 0, H' = 0).
        return Ok(0);
    }
    let (lh, lw) = (geometry.label_height, geometry.label_width);
    let mut valid = 0usize;
    for b in 0..geometry.batch {
        let img = &labels[b * lh * lw..(b + 1) * lh * lw];
        for h in 0..geometry.height {
            let row = &img[nearest_source_index(lh, geometry.height, h) * lw..][..lw];
            for w in 0..geometry.width {
                let l = row[nearest_source_index(lw, geometry.width, w)];
                if targets.class_of(l.to_i64(), 0)?.is_some() {
                    valid += 1;
                }
            }
        }
    }
    Ok(valid)
}

/// Pixels per tile of the NCHW kernel.
const TILE: usize = 8192;

/// A class index in a tile buffer, with a sentinel for pixels outside Ω.
trait TileIndex: Copy + PartialEq + Default {
    const INVALID: Self;
    fn from_class(c: usize) -> Self;
    fn class(self) -> usize;
}
impl TileIndex for u8 {
    const INVALID: Self = u8::MAX;
    #[inline]
    fn from_class(c: usize) -> Self {
        c as u8
    }
    #[inline]
    fn class(self) -> usize {
        self as usize
    }
}
impl TileIndex for u32 {
    const INVALID: Self = u32::MAX;
    #[inline]
    fn from_class(c: usize) -> Self {
        c as u32
    }
    #[inline]
    fn class(self) -> usize {
        self as usize
    }
}

/// Lanes of the dense loop: 8 independent accumulators, which LLVM turns into SIMD registers.
/// (Indexing the lanes explicitly is what lets it see them as one vector.)
const LANES: usize = 8;

/// Σ diff(k)² and `grad[k] = scale·diff(k)` for k in 0..n, summed in one fixed order: lane
/// k mod 8 for the whole chunks of 8, then the remainder, then the lanes pairwise. The exact
/// path uses it and [`fused_dense`] follows the same order, so both give the same bits
/// whenever they agree per element.
#[inline(always)]
#[allow(clippy::needless_range_loop)]
fn fused_sum<F: Real>(n: usize, diff: impl Fn(usize) -> F, grad: Option<&mut [F]>, scale: F) -> F {
    let mut acc = [F::zero(); LANES];
    let full = n - n % LANES;
    let mut tail = F::zero();
    match grad {
        Some(g) => {
            let g = &mut g[..n];
            for (c, g8) in g[..full].chunks_exact_mut(LANES).enumerate() {
                for l in 0..LANES {
                    let d = diff(c * LANES + l);
                    acc[l] = acc[l] + d * d;
                    g8[l] = scale * d;
                }
            }
            for (k, gv) in g.iter_mut().enumerate().skip(full) {
                let d = diff(k);
                tail = tail + d * d;
                *gv = scale * d;
            }
        }
        None => {
            for c in 0..full / LANES {
                for l in 0..LANES {
                    let d = diff(c * LANES + l);
                    acc[l] = acc[l] + d * d;
                }
            }
            for k in full..n {
                let d = diff(k);
                tail = tail + d * d;
            }
        }
    }
    let half = |a: &[F]| (a[0] + a[1]) + (a[2] + a[3]);
    (half(&acc[..4]) + half(&acc[4..])) + tail
}

/// Dense slices, no labels, no selects: the shape the auto-vectoriser handles. Same summation
/// order as [`fused_sum`], written with chunk iterators so that no bounds checks remain.
#[inline(always)]
#[allow(clippy::needless_range_loop)]
fn fused_dense<F: Real>(f: &[F], t: &[F], grad: Option<&mut [F]>, scale: F) -> F {
    let mut acc = [F::zero(); LANES];
    let mut fc = f.chunks_exact(LANES);
    let mut tc = t.chunks_exact(LANES);
    let mut tail = F::zero();
    match grad {
        Some(g) => {
            let mut gc = g.chunks_exact_mut(LANES);
            for ((f8, t8), g8) in (&mut fc).zip(&mut tc).zip(&mut gc) {
                for l in 0..LANES {
                    let d = f8[l] - t8[l];
                    acc[l] = acc[l] + d * d;
                    g8[l] = scale * d;
                }
            }
            for ((&x, &y), gv) in fc
                .remainder()
                .iter()
                .zip(tc.remainder())
                .zip(gc.into_remainder())
            {
                let d = x - y;
                tail = tail + d * d;
                *gv = scale * d;
            }
        }
        None => {
            for (f8, t8) in (&mut fc).zip(&mut tc) {
                for l in 0..LANES {
                    let d = f8[l] - t8[l];
                    acc[l] = acc[l] + d * d;
                }
            }
            for (&x, &y) in fc.remainder().iter().zip(tc.remainder()) {
                let d = x - y;
                tail = tail + d * d;
            }
        }
    }
    let half = |a: &[F]| (a[0] + a[1]) + (a[2] + a[3]);
    (half(&acc[..4]) + half(&acc[4..])) + tail
}

/// Exact for any input: pixels outside Ω are never read.
#[inline(always)]
fn fused_span_exact<F: Real, I: TileIndex>(
    f: &[F],
    grad: Option<&mut [F]>,
    cls: &[I],
    target: impl Fn(I) -> F,
    scale: F,
) -> F {
    let (f, cls) = (&f[..cls.len()], &cls[..cls.len()]);
    let diff = |k: usize| {
        if cls[k] == I::INVALID {
            F::zero()
        } else {
            f[k] - target(cls[k])
        }
    };
    fused_sum(cls.len(), diff, grad, scale)
}

/// One channel of one tile. Fast path: gather the targets into `t` (a pixel outside Ω gets its
/// own feature value as target, so its difference is exactly 0 for finite features), then run
/// the dense loop. If the partial sum is not finite and the tile has pixels outside Ω, a
/// non-finite value may sit outside Ω, so the span is recomputed on the exact path that never
/// reads those pixels.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn tile_channel<F: Real, I: TileIndex>(
    f: &[F],
    mut grad: Option<&mut [F]>,
    cls: &[I],
    outside: &[u16],
    t: &mut [F],
    target: impl Fn(I) -> F + Copy,
    scale: F,
) -> F {
    for (tk, &y) in t.iter_mut().zip(cls) {
        *tk = target(y);
    }
    for &k in outside {
        t[k as usize] = f[k as usize];
    }
    let s = fused_dense(f, t, grad.as_deref_mut(), scale);
    if s.is_finite() || outside.is_empty() {
        s
    } else {
        fused_span_exact(f, grad, cls, target, scale)
    }
}

#[allow(clippy::too_many_arguments)]
fn block_tiles<F: Real, L: Label, I: TileIndex>(
    features: &[F],
    mut grad: Option<&mut [F]>,
    labels: &[L],
    geometry: &FeatureGeometry,
    channel_start: usize,
    channels: usize,
    targets: &P2aTargets<'_, F>,
    grad_scale: F,
) -> Result<f64> {
    let (h, w) = (geometry.height, geometry.width);
    let (lh, lw) = (geometry.label_height, geometry.label_width);
    let hw = h * w;
    let dim = geometry.channels;
    let fast_table = core::mem::size_of::<I>() == 1;
    let mut total = 0.0f64;
    let mut cls = [I::default(); TILE];
    let mut outside = [0u16; TILE];
    let mut t = [F::zero(); TILE];
    let mut p0 = 0;
    while p0 < hw {
        let n = TILE.min(hw - p0);
        let mut n_out = 0;
        for (k, slot) in cls[..n].iter_mut().enumerate() {
            let p = p0 + k;
            let (ph, pw) = (p / w, p % w);
            let li = nearest_source_index(lh, h, ph) * lw + nearest_source_index(lw, w, pw);
            *slot = match targets.class_of(labels[li].to_i64(), li)? {
                Some(c) => I::from_class(c),
                None => {
                    outside[n_out] = k as u16;
                    n_out += 1;
                    I::INVALID
                }
            };
        }
        let outside = &outside[..n_out];
        for k in 0..channels {
            let d = channel_start + k;
            let f = &features[k * hw + p0..][..n];
            let g = grad.as_deref_mut().map(|g| &mut g[k * hw + p0..][..n]);
            let partial = if fast_table {
                // Entry 255 (the sentinel) stays 0 and is overwritten by the outside-Ω patch.
                let mut table = [F::zero(); 256];
                for (c, tv) in table.iter_mut().enumerate().take(targets.classes) {
                    *tv = targets.anchors[c * dim + d];
                }
                let table = &table;
                tile_channel(
                    f,
                    g,
                    &cls[..n],
                    outside,
                    &mut t[..n],
                    |y: I| table[y.class() & 0xff],
                    grad_scale,
                )
            } else {
                let anchors = targets.anchors;
                let target = |y: I| {
                    if y == I::INVALID {
                        F::zero()
                    } else {
                        anchors[y.class() * dim + d]
                    }
                };
                tile_channel(f, g, &cls[..n], outside, &mut t[..n], target, grad_scale)
            };
            total += partial.as_f64();
        }
        p0 += n;
    }
    Ok(total)
}

/// The p2a kernel over one image's channel range `[channel_start, channel_start + k)`:
/// `features` and `grad` hold those k planes of H×W (`k·H·W` elements, NCHW order), `labels`
/// that image's `[H', W']` map. Writes `grad_scale · (F − Â_y)` (0 outside Ω) into `grad` and
/// returns Σ_{i∈Ω} Σ_d (F − Â_y)² over the block as `f64`.
///
/// `grad_scale` is 2/(|Ω|·D) for the gradient of L_p2a; get |Ω| from [`p2a_valid_count_nchw`].
/// Blocks are independent, so callers may run them in parallel and add the sums.
pub fn p2a_nchw_block<F: Real, L: Label>(
    features: &[F],
    grad: Option<&mut [F]>,
    labels: &[L],
    geometry: &FeatureGeometry,
    channel_start: usize,
    targets: &P2aTargets<'_, F>,
    grad_scale: F,
) -> Result<f64> {
    let op = Op::P2a;
    geometry.validate()?;
    targets.validate(geometry.channels)?;
    check_len(
        op,
        "labels of one image",
        labels.len(),
        geometry.label_height * geometry.label_width,
    )?;
    let hw = geometry.height * geometry.width;
    if hw == 0 {
        return Ok(0.0);
    }
    if !features.len().is_multiple_of(hw) {
        return Err(SarError::Shape {
            op,
            what: "feature block is not a whole number of H×W planes",
        });
    }
    let channels = features.len() / hw;
    if channel_start
        .checked_add(channels)
        .is_none_or(|end| end > geometry.channels)
    {
        return Err(SarError::Shape {
            op,
            what: "channel range exceeds the feature channels",
        });
    }
    if let Some(g) = &grad {
        check_len(op, "grad block", g.len(), features.len())?;
    }
    if targets.classes <= u8::MAX as usize {
        block_tiles::<F, L, u8>(
            features,
            grad,
            labels,
            geometry,
            channel_start,
            channels,
            targets,
            grad_scale,
        )
    } else {
        block_tiles::<F, L, u32>(
            features,
            grad,
            labels,
            geometry,
            channel_start,
            channels,
            targets,
            grad_scale,
        )
    }
}

fn finish<F: Real>(sum_sq: f64, valid: usize, dim: usize) -> Result<P2aValue<F>> {
    let loss = if valid == 0 {
        0.0
    } else {
        sum_sq / (valid as f64 * dim as f64)
    };
    let loss_f = F::from_f64(loss);
    if !loss_f.is_finite() {
        return Err(SarError::NonFinite {
            op: Op::P2a,
            what: "L_p2a (features inside Ω)",
        });
    }
    Ok(P2aValue {
        loss: loss_f,
        valid,
    })
}

fn grad_scale<F: Real>(valid: usize, dim: usize) -> F {
    if valid == 0 {
        F::zero()
    } else {
        F::from_f64(2.0 / (valid as f64 * dim as f64))
    }
}

/// L_p2a and (optionally) dL_p2a/dF for NCHW features, single-threaded.
///
/// ```
/// use sar_math::p2a::{p2a_nchw, FeatureGeometry, P2aTargets};
/// // One image, D = 2, 1×2 features; labels 1×2 with the second pixel ignored.
/// let f = [1.0f64, 9.0, 3.0, 9.0]; // channel 0: [1, 9], channel 1: [3, 9]
/// let anchors = [0.0, 1.0];         // one class: Â_0 = (0, 1)
/// let geometry = FeatureGeometry { batch: 1, channels: 2, height: 1, width: 2, label_height: 1, label_width: 2 };
/// let targets = P2aTargets { anchors: &anchors, classes: 1, ignore_index: 255, class_active: None };
/// let mut g = [0.0; 4];
/// let v = p2a_nchw(&f, &[0u8, 255], &geometry, &targets, Some(&mut g)).unwrap();
/// assert_eq!(v.loss, (1.0 + 4.0) / 2.0); // ((1−0)² + (3−1)²) / (|Ω|·D)
/// assert_eq!(g, [1.0, 0.0, 2.0, 0.0]);   // 2(F − Â)/(|Ω|·D)
/// ```
pub fn p2a_nchw<F: Real, L: Label>(
    features: &[F],
    labels: &[L],
    geometry: &FeatureGeometry,
    targets: &P2aTargets<'_, F>,
    mut grad: Option<&mut [F]>,
) -> Result<P2aValue<F>> {
    let op = Op::P2a;
    check_len(op, "features", features.len(), geometry.feature_len()?)?;
    if let Some(g) = &grad {
        check_len(op, "grad_features", g.len(), features.len())?;
    }
    let valid = p2a_valid_count_nchw(labels, geometry, targets)?;
    let scale = grad_scale::<F>(valid, geometry.channels);
    let image = geometry.channels * geometry.height * geometry.width;
    let label_image = geometry.label_height * geometry.label_width;
    let mut sum_sq = 0.0;
    for b in 0..geometry.batch {
        let g = grad
            .as_deref_mut()
            .map(|g| &mut g[b * image..(b + 1) * image]);
        sum_sq += p2a_nchw_block(
            &features[b * image..(b + 1) * image],
            g,
            &labels[b * label_image..(b + 1) * label_image],
            geometry,
            0,
            targets,
            scale,
        )?;
    }
    finish(sum_sq, valid, geometry.channels)
}

/// The target row of one sample: Â_y, or λ·Â_{y_a} + (1 − λ)·Â_{y_b} with MixUp.
#[derive(Debug, Clone, Copy)]
pub enum RowLabels<'a, L> {
    /// One label per row.
    Plain(&'a [L]),
    /// MixUp: two labels per row and the batch's λ.
    Mixup {
        /// y_a.
        a: &'a [L],
        /// y_b.
        b: &'a [L],
        /// λ ∈ [0, 1], the weight of y_a.
        lambda: f64,
    },
}

/// L_p2a and (optionally) dL_p2a/dF for `[N, D]` features (classification).
///
/// ```
/// use sar_math::p2a::{p2a_rows, P2aTargets, RowLabels};
/// let anchors = [0.0f64, 0.0, 2.0, 2.0];           // Â_0 = (0,0), Â_1 = (2,2)
/// let targets = P2aTargets { anchors: &anchors, classes: 2, ignore_index: -1, class_active: None };
/// // MixUp λ = 0.25 between classes 0 and 1: target (1.5, 1.5).
/// let v = p2a_rows(&[1.5, 2.5], RowLabels::Mixup { a: &[0i64], b: &[1], lambda: 0.25 }, 2, &targets, None).unwrap();
/// assert_eq!(v.loss, 0.5);
/// ```
pub fn p2a_rows<F: Real, L: Label>(
    features: &[F],
    labels: RowLabels<'_, L>,
    dim: usize,
    targets: &P2aTargets<'_, F>,
    mut grad: Option<&mut [F]>,
) -> Result<P2aValue<F>> {
    let op = Op::P2a;
    if dim == 0 {
        return Err(SarError::Shape {
            op,
            what: "features need at least one channel",
        });
    }
    targets.validate(dim)?;
    if !features.len().is_multiple_of(dim) {
        return Err(SarError::Shape {
            op,
            what: "features length is not a multiple of D",
        });
    }
    let rows = features.len() / dim;
    if let Some(g) = &grad {
        check_len(op, "grad_features", g.len(), features.len())?;
    }
    let lambda = match labels {
        RowLabels::Plain(l) => {
            check_len(op, "labels", l.len(), rows)?;
            1.0
        }
        RowLabels::Mixup { a, b, lambda } => {
            check_len(op, "labels_a", a.len(), rows)?;
            check_len(op, "labels_b", b.len(), rows)?;
            crate::config::check_range(op, "mixup lambda", lambda, 0.0, 1.0, false, "[0, 1]")?;
            lambda
        }
    };
    let row_classes = |n: usize| -> Result<Option<(usize, usize)>> {
        Ok(match labels {
            RowLabels::Plain(l) => targets.class_of(l[n].to_i64(), n)?.map(|c| (c, c)),
            RowLabels::Mixup { a, b, .. } => {
                let ca = targets.class_of(a[n].to_i64(), n)?;
                let cb = targets.class_of(b[n].to_i64(), n)?;
                ca.zip(cb)
            }
        })
    };
    let mut valid = 0;
    for n in 0..rows {
        if row_classes(n)?.is_some() {
            valid += 1;
        }
    }
    let scale = grad_scale::<F>(valid, dim);
    let (lam, one_minus) = (F::from_f64(lambda), F::from_f64(1.0 - lambda));
    let mut sum_sq = 0.0f64;
    for n in 0..rows {
        let f = &features[n * dim..(n + 1) * dim];
        let g = grad.as_deref_mut().map(|g| &mut g[n * dim..(n + 1) * dim]);
        let Some((ca, cb)) = row_classes(n)? else {
            if let Some(g) = g {
                g.iter_mut().for_each(|v| *v = F::zero());
            }
            continue;
        };
        let (ta, tb) = (
            &targets.anchors[ca * dim..][..dim],
            &targets.anchors[cb * dim..][..dim],
        );
        let mut acc = F::zero();
        let mut emit = |d: usize, diff: F, g: &mut Option<&mut [F]>| {
            acc = acc + diff * diff;
            if let Some(g) = g {
                g[d] = scale * diff;
            }
        };
        let mut g = g;
        if ca == cb {
            for d in 0..dim {
                emit(d, f[d] - ta[d], &mut g);
            }
        } else {
            for d in 0..dim {
                emit(d, f[d] - (lam * ta[d] + one_minus * tb[d]), &mut g);
            }
        }
        sum_sq += acc.as_f64();
    }
    finish(sum_sq, valid, dim)
}

#[cfg(test)]
mod tests {
    use super::*;
    use approx::assert_relative_eq;

    /// Naive reference: materialise resampled labels and loop in the obvious order.
    fn naive(
        f: &[f64],
        labels: &[i64],
        g: &FeatureGeometry,
        a: &[f64],
        ignore: i64,
    ) -> (f64, std::vec::Vec<f64>) {
        let (b, d, h, w) = (g.batch, g.channels, g.height, g.width);
        let mut valid = 0usize;
        let mut sum = 0.0;
        let mut lab = std::vec![ignore; b * h * w];
        for bi in 0..b {
            for y in 0..h {
                for x in 0..w {
                    let sy = nearest_source_index(g.label_height, h, y);
                    let sx = nearest_source_index(g.label_width, w, x);
                    lab[(bi * h + y) * w + x] =
                        labels[(bi * g.label_height + sy) * g.label_width + sx];
                }
            }
        }
        for &l in &lab {
            if l != ignore {
                valid += 1;
            }
        }
        let mut grad = std::vec![0.0; f.len()];
        for bi in 0..b {
            for c in 0..d {
                for p in 0..h * w {
                    let l = lab[bi * h * w + p];
                    if l == ignore {
                        continue;
                    }
                    let i = (bi * d + c) * h * w + p;
                    let diff = f[i] - a[l as usize * d + c];
                    sum += diff * diff;
                    grad[i] = 2.0 * diff / (valid * d) as f64;
                }
            }
        }
        (
            if valid == 0 {
                0.0
            } else {
                sum / (valid * d) as f64
            },
            grad,
        )
    }

    #[test]
    fn matches_naive_with_resampling_across_tiles() {
        // 3000 pixels per image spans two tiles; labels at 3× resolution minus one column.
        let g = FeatureGeometry {
            batch: 2,
            channels: 3,
            height: 50,
            width: 60,
            label_height: 150,
            label_width: 179,
        };
        let mut rng = crate::anchors::AnchorRng::new(5);
        let f: std::vec::Vec<f64> = (0..g.feature_len().unwrap())
            .map(|_| rng.next_normal())
            .collect();
        let labels: std::vec::Vec<i64> = (0..g.label_len().unwrap())
            .map(|_| {
                let r = rng.next_u64() % 6;
                if r == 5 {
                    255
                } else {
                    r as i64
                }
            })
            .collect();
        let a: std::vec::Vec<f64> = (0..5 * 3).map(|_| rng.next_normal()).collect();
        let targets = P2aTargets {
            anchors: &a,
            classes: 5,
            ignore_index: 255,
            class_active: None,
        };
        let mut grad = std::vec![7.0; f.len()];
        let v = p2a_nchw(&f, &labels, &g, &targets, Some(&mut grad)).unwrap();
        let (want, want_grad) = naive(&f, &labels, &g, &a, 255);
        assert_relative_eq!(v.loss, want, max_relative = 1e-13);
        for (x, y) in grad.iter().zip(&want_grad) {
            assert_relative_eq!(*x, *y, max_relative = 1e-13);
        }
        // The same through the u32 path (C ≥ 255): add unused classes.
        let mut big = a.clone();
        big.resize(300 * 3, 0.5);
        let targets = P2aTargets {
            anchors: &big,
            classes: 300,
            ignore_index: 255,
            class_active: None,
        };
        let labels_big: std::vec::Vec<i64> = labels
            .iter()
            .map(|&l| if l == 255 { 299 } else { l })
            .collect();
        let targets_ign = P2aTargets {
            ignore_index: 299,
            ..targets
        };
        let v2 = p2a_nchw(&f, &labels_big, &g, &targets_ign, Some(&mut grad)).unwrap();
        assert_relative_eq!(v2.loss, want, max_relative = 1e-13);
        for (x, y) in grad.iter().zip(&want_grad) {
            assert_relative_eq!(*x, *y, max_relative = 1e-13);
        }
    }

    #[test]
    fn label_errors_name_the_position() {
        let g = FeatureGeometry {
            batch: 1,
            channels: 1,
            height: 1,
            width: 2,
            label_height: 1,
            label_width: 2,
        };
        let targets = P2aTargets {
            anchors: &[0.0f32, 1.0],
            classes: 2,
            ignore_index: 255,
            class_active: None,
        };
        let e = p2a_nchw(&[0.0f32; 2], &[1i64, 2], &g, &targets, None).unwrap_err();
        assert_eq!(
            e,
            SarError::Label {
                op: Op::P2a,
                index: 1,
                label: 2,
                classes: 2
            }
        );
        let e = p2a_nchw(&[0.0f32; 2], &[-3i64, 0], &g, &targets, None).unwrap_err();
        assert!(matches!(e, SarError::Label { label: -3, .. }));
    }

    #[test]
    fn empty_omega_is_zero_with_zero_grad_even_for_nan_features() {
        let g = FeatureGeometry {
            batch: 1,
            channels: 2,
            height: 1,
            width: 2,
            label_height: 1,
            label_width: 2,
        };
        let targets = P2aTargets {
            anchors: &[0.0f64, 1.0],
            classes: 1,
            ignore_index: 255,
            class_active: None,
        };
        let mut grad = [1.0; 4];
        let v = p2a_nchw(&[f64::NAN; 4], &[255u8, 255], &g, &targets, Some(&mut grad)).unwrap();
        assert_eq!(
            v,
            P2aValue {
                loss: 0.0,
                valid: 0
            }
        );
        assert_eq!(grad, [0.0; 4]);
        // NaN inside Ω is an error, not a silent NaN loss.
        let e = p2a_nchw(&[f64::NAN; 4], &[0u8, 255], &g, &targets, Some(&mut grad)).unwrap_err();
        assert!(matches!(e, SarError::NonFinite { .. }));
    }

    /// Fuzzing regression: a feature map with no pixels (W = 0) and an empty label map.
    #[test]
    fn empty_feature_map_with_empty_labels() {
        let g = FeatureGeometry {
            batch: 1,
            channels: 1,
            height: 2,
            width: 0,
            label_height: 0,
            label_width: 3,
        };
        let targets = P2aTargets {
            anchors: &[0.0f64],
            classes: 1,
            ignore_index: 255,
            class_active: None,
        };
        let v = p2a_nchw::<f64, i64>(&[], &[], &g, &targets, Some(&mut [])).unwrap();
        assert_eq!(
            v,
            P2aValue {
                loss: 0.0,
                valid: 0
            }
        );
        let g = FeatureGeometry {
            height: 0,
            width: 4,
            label_height: 3,
            label_width: 0,
            ..g
        };
        assert_eq!(
            p2a_nchw::<f64, i64>(&[], &[], &g, &targets, None)
                .unwrap()
                .valid,
            0
        );
    }

    #[test]
    fn inactive_classes_leave_omega() {
        let g = FeatureGeometry {
            batch: 1,
            channels: 1,
            height: 1,
            width: 2,
            label_height: 1,
            label_width: 2,
        };
        let active = [true, false];
        let targets = P2aTargets {
            anchors: &[0.0f64, 5.0],
            classes: 2,
            ignore_index: 255,
            class_active: Some(&active),
        };
        let mut grad = [9.0; 2];
        let v = p2a_nchw(&[2.0, 1.0], &[0u8, 1], &g, &targets, Some(&mut grad)).unwrap();
        assert_eq!(
            v,
            P2aValue {
                loss: 4.0,
                valid: 1
            }
        );
        assert_eq!(grad, [4.0, 0.0]);
    }

    #[test]
    fn rows_plain_and_ignore() {
        let targets = P2aTargets {
            anchors: &[1.0f32, 1.0, -1.0, 0.0],
            classes: 2,
            ignore_index: -100,
            class_active: None,
        };
        let mut grad = [9.0f32; 6];
        let v = p2a_rows(
            &[2.0, 3.0, 0.0, 0.0, 5.0, 5.0],
            RowLabels::Plain(&[0i32, 1, -100]),
            2,
            &targets,
            Some(&mut grad),
        )
        .unwrap();
        // Row 0: (1² + 2²) = 5, row 1: (1² + 0²) = 1; |Ω|·D = 4.
        assert_eq!(
            v,
            P2aValue {
                loss: 1.5,
                valid: 2
            }
        );
        assert_eq!(grad, [0.5, 1.0, 0.5, 0.0, 0.0, 0.0]);
    }
}
