//! The NCHW kernel (segmentation): tiles of resampled class indices, per-channel gathers and a
//! dense fused loop (see the [module docs](super)).

use super::{finish, grad_scale, FeatureGeometry, P2aTargets, P2aValue};
use crate::error::{check_len, Op, Result, SarError};
use crate::real::{Label, Real};
use crate::resample::nearest_source_index;

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
