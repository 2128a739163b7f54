//! Nearest-neighbour label resampling, bit-exact with PyTorch's legacy `nearest` mode
//! (`F.interpolate(mode='nearest')`, spec §5).
//!
//! Per axis, for an input of `input` and an output of `output` elements, output index `dst` reads
//! input index:
//! - `dst` when `output == input`;
//! - `dst >> 1` when `output == 2 · input`;
//! - otherwise `min(floor(dst as f32 · scale), input − 1)` with `scale = input as f32 / output as f32`,
//!   all in **f32** (f64 or integer arithmetic picks another pixel for some sizes, e.g. 26 → 22).
//!
//! Layout: labels are row-major `[B, H, W]`.
//!
//! [`bilinear_source`] is the per-axis rule of PyTorch's bilinear `align_corners=False` resize
//! of feature maps and logits (mmsegmentation's `resize`): output index `o` samples source
//! coordinate `s = max((o + ½)·(input/output) − ½, 0)` in the tensor's own precision, blending
//! `i0 = ⌊s⌋` and `i1 = min(i0 + 1, input − 1)` with weights `1 − (s − i0)` and `s − i0`.

use crate::error::{check_len, mul_dims, Op, Result, SarError};

/// The input index that output index `dst` reads along one axis (see the module docs).
///
/// ```
/// use sar_math::resample::nearest_source_index;
/// assert_eq!(nearest_source_index(512, 128, 5), 20); // exact ×4: top-left of each 4×4 block
/// assert_eq!(nearest_source_index(26, 22, 11), 12); // f32 arithmetic, as PyTorch (f64 gives 13)
/// ```
#[inline]
pub fn nearest_source_index(input: usize, output: usize, dst: usize) -> usize {
    if output == input {
        dst
    } else if output == 2 * input {
        dst >> 1
    } else {
        let scale = input as f32 / output as f32;
        // The product is ≥ 0, so truncation is floor; `as usize` also saturates, so a huge
        // product cannot wrap, and the min keeps it in range.
        ((dst as f32 * scale) as usize).min(input.saturating_sub(1))
    }
}

/// The two source indices and the weight of the second, `(i0, i1, s − i0)`, of output index
/// `dst` of a bilinear `align_corners=False` resize from `input` to `output` elements, in
/// precision `F` (see the module docs; `input` and `output` at least 1).
///
/// ```
/// use sar_math::resample::bilinear_source;
/// assert_eq!(bilinear_source::<f64>(4, 8, 0), (0, 1, 0.0)); // clamped at the first pixel
/// assert_eq!(bilinear_source::<f64>(4, 8, 3), (1, 2, 0.25));
/// assert_eq!(bilinear_source::<f64>(4, 8, 7), (3, 3, 0.25)); // the last pixel twice
/// assert_eq!(bilinear_source::<f32>(8, 2, 1), (5, 6, 0.5));
/// ```
#[inline]
pub fn bilinear_source<F: num_traits::float::FloatCore>(
    input: usize,
    output: usize,
    dst: usize,
) -> (usize, usize, F) {
    let of = |v: usize| F::from(v).unwrap_or_else(F::zero);
    let half = F::from(0.5).unwrap_or_else(F::zero);
    let scale = of(input) / of(output);
    let src = ((of(dst) + half) * scale - half).max(F::zero());
    let last = input.saturating_sub(1);
    let i0 = src.to_usize().unwrap_or(0).min(last);
    ((i0), (i0 + 1).min(last), src - of(i0))
}

/// Resamples `[batch, in_h, in_w]` labels to `[batch, out_h, out_w]` into `out`.
pub fn resample_labels_nearest<L: Copy>(
    labels: &[L],
    batch: usize,
    in_hw: (usize, usize),
    out_hw: (usize, usize),
    out: &mut [L],
) -> Result<()> {
    let op = Op::Resample;
    let (in_h, in_w) = in_hw;
    let (out_h, out_w) = out_hw;
    if (in_h == 0 || in_w == 0) && out_h != 0 && out_w != 0 && batch != 0 {
        return Err(SarError::Shape {
            op,
            what: "cannot resample an empty label map to a non-empty one",
        });
    }
    check_len(
        op,
        "labels",
        labels.len(),
        mul_dims(op, &[batch, in_h, in_w])?,
    )?;
    check_len(
        op,
        "output labels",
        out.len(),
        mul_dims(op, &[batch, out_h, out_w])?,
    )?;
    if out.is_empty() {
        // Nothing to write; the input rows may not exist (found by fuzzing: out W = 0, in H = 0).
        return Ok(());
    }
    for b in 0..batch {
        let src = &labels[b * in_h * in_w..(b + 1) * in_h * in_w];
        let dst = &mut out[b * out_h * out_w..(b + 1) * out_h * out_w];
        for oh in 0..out_h {
            let ih = nearest_source_index(in_h, out_h, oh);
            let src_row = &src[ih * in_w..(ih + 1) * in_w];
            for (ow, d) in dst[oh * out_w..(oh + 1) * out_w].iter_mut().enumerate() {
                *d = src_row[nearest_source_index(in_w, out_w, ow)];
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The rule in f64 picks a different pixel than PyTorch's f32 for 26 → 22.
    #[test]
    fn f32_rule_differs_from_f64() {
        let f64_rule = |i: usize, o: usize, d: usize| {
            (((d as f64) * (i as f64 / o as f64)).floor() as usize).min(i - 1)
        };
        let differs = (0..22)
            .filter(|&d| nearest_source_index(26, 22, d) != f64_rule(26, 22, d))
            .count();
        assert!(differs > 0);
        // The f32 rule evaluated independently with numpy.float32; f64 gives 13 at dst 11.
        let torch = [
            0, 1, 2, 3, 4, 5, 7, 8, 9, 10, 11, 12, 14, 15, 16, 17, 18, 20, 21, 22, 23, 24,
        ];
        for (d, &want) in torch.iter().enumerate() {
            assert_eq!(nearest_source_index(26, 22, d), want, "dst {d}");
        }
    }

    #[test]
    fn identity_double_and_quarter() {
        for d in 0..7 {
            assert_eq!(nearest_source_index(7, 7, d), d);
        }
        for d in 0..14 {
            assert_eq!(nearest_source_index(7, 14, d), d / 2);
        }
        let labels: [u8; 16] = core::array::from_fn(|i| i as u8);
        let mut out = [0u8; 4];
        resample_labels_nearest(&labels, 1, (4, 4), (2, 2), &mut out).unwrap();
        assert_eq!(out, [0, 2, 8, 10]);
    }

    /// Fuzzing regression: an empty output from an empty input must not index the input.
    #[test]
    fn empty_output_from_empty_input() {
        let mut out: [u8; 0] = [];
        resample_labels_nearest::<u8>(&[], 1, (0, 3), (2, 0), &mut out).unwrap();
        resample_labels_nearest::<u8>(&[], 2, (3, 0), (0, 5), &mut out).unwrap();
        assert!(resample_labels_nearest::<u8>(&[], 1, (0, 3), (2, 2), &mut [0u8; 4]).is_err());
    }

    #[test]
    fn length_errors() {
        let mut out = [0u8; 4];
        assert!(resample_labels_nearest(&[0u8; 15], 1, (4, 4), (2, 2), &mut out).is_err());
        assert!(resample_labels_nearest(&[0u8; 16], 1, (4, 4), (2, 3), &mut out).is_err());
    }
}
