//! Bilinear resizing of `[N, C, H, W]` maps with PyTorch's `align_corners=False` rule, the
//! resize mmsegmentation uses for logits, HRNet's branch fusion and the ASPP image pool.
//!
//! Output pixel `o` of an axis of `input → output` samples source coordinate
//! ([`sar_math::resample::bilinear_source`])
//! `s = max((o + ½)·(input/output) − ½, 0)` (computed in the tensor's precision, f32 for f32 and
//! below, f64 for f64, as PyTorch's CPU kernel does with its `opmath` type),
//! blending `i0 = ⌊s⌋` and `i1 = min(i0 + 1, input − 1)` with weights `1 − (s − i0)` and
//! `s − i0`. The resize is separable and linear, so it is two matrix products with fixed
//! interpolation matrices `R_h` `[OH, H]` and `R_w` `[OW, W]`:
//! `Y[n, c] = R_h · X[n, c] · R_wᵀ`. Written with candle's `matmul`, its gradient is candle's
//! (`R_hᵀ · dY · R_w`) on every device; each matrix row has at most two non-zeros, and the
//! products cost `2·N·C·(H·W·OW + H·OW·OH)` multiply-adds, small beside the convolutions.

use candle_core::Tensor;

/// The `[output, input]` interpolation matrix of one axis (row-major f32), coordinates in f32.
pub fn interpolation_matrix(input: usize, output: usize) -> Vec<f32> {
    interpolation_matrix_in::<f32>(input, output)
}

/// [`interpolation_matrix`] with coordinates and weights in f64, for f64 tensors.
pub fn interpolation_matrix_f64(input: usize, output: usize) -> Vec<f64> {
    interpolation_matrix_in::<f64>(input, output)
}

fn interpolation_matrix_in<
    T: num_traits::Float + num_traits::float::FloatCore + std::ops::AddAssign,
>(
    input: usize,
    output: usize,
) -> Vec<T> {
    let mut m = vec![T::zero(); output * input];
    if input == 0 || output == 0 {
        return m;
    }
    for o in 0..output {
        let (i0, i1, l1) = sar_math::resample::bilinear_source::<T>(input, output, o);
        m[o * input + i0] += T::one() - l1;
        m[o * input + i1] += l1;
    }
    m
}

/// Resizes `x` `[N, C, H, W]` to `[N, C, out_h, out_w]` (see the module docs). Same size:
/// `x` itself.
pub fn resize_bilinear(x: &Tensor, out_h: usize, out_w: usize) -> candle_core::Result<Tensor> {
    let (n, c, h, w) = x.dims4()?;
    if (h, w) == (out_h, out_w) {
        return Ok(x.clone());
    }
    if out_h == 0 || out_w == 0 || h == 0 || w == 0 {
        candle_core::bail!("resize_bilinear: cannot resize {h}×{w} to {out_h}×{out_w}");
    }
    let (dev, dtype) = (x.device(), x.dtype());
    let matrix = |i: usize, o: usize| -> candle_core::Result<Tensor> {
        if dtype == candle_core::DType::F64 {
            Tensor::from_vec(interpolation_matrix_f64(i, o), (o, i), dev)
        } else {
            Tensor::from_vec(interpolation_matrix(i, o), (o, i), dev)?.to_dtype(dtype)
        }
    };
    // Width: [N·C·H, W] · R_wᵀ [W, OW].
    let mut y = x.contiguous()?.reshape((n * c * h, w))?;
    if w != out_w {
        y = y.matmul(&matrix(w, out_w)?.t()?)?;
    }
    // Height: move H last, [N·C·OW, H] · R_hᵀ [H, OH], move it back.
    let mut y = y.reshape((n * c, h, out_w))?;
    if h != out_h {
        y = y
            .transpose(1, 2)?
            .contiguous()?
            .reshape((n * c * out_w, h))?
            .matmul(&matrix(h, out_h)?.t()?)?
            .reshape((n * c, out_w, out_h))?
            .transpose(1, 2)?
            .contiguous()?;
    }
    y.reshape((n, c, out_h, out_w))
}

/// Nearest-neighbour upsampling of a `[N, C, 1, 1]` map is a broadcast; bilinear of a 1×1
/// map is the same constant. Used by the ASPP image pool.
pub fn broadcast_1x1(x: &Tensor, out_h: usize, out_w: usize) -> candle_core::Result<Tensor> {
    let (n, c, h, w) = x.dims4()?;
    if (h, w) != (1, 1) {
        candle_core::bail!("broadcast_1x1 needs a 1×1 map, got {h}×{w}");
    }
    x.broadcast_as((n, c, out_h, out_w))?.contiguous()
}

/// Direct f64 evaluation of the module's formula (coordinates in f64), for tests.
#[doc(hidden)]
pub fn reference_bilinear(
    x: &[f64],
    (n, c, h, w): (usize, usize, usize, usize),
    oh: usize,
    ow: usize,
) -> Vec<f64> {
    let axis = |input: usize, output: usize, o: usize| {
        let scale = input as f64 / output as f64;
        let src = ((o as f64 + 0.5) * scale - 0.5).max(0.0);
        let i0 = (src as usize).min(input - 1);
        (i0, (i0 + 1).min(input - 1), src - i0 as f64)
    };
    let mut out = vec![0.0; n * c * oh * ow];
    for p in 0..n * c {
        for y in 0..oh {
            let (y0, y1, ly) = axis(h, oh, y);
            for xo in 0..ow {
                let (x0, x1, lx) = axis(w, ow, xo);
                let at = |yy: usize, xx: usize| x[(p * h + yy) * w + xx];
                out[(p * oh + y) * ow + xo] = (1.0 - ly)
                    * ((1.0 - lx) * at(y0, x0) + lx * at(y0, x1))
                    + ly * ((1.0 - lx) * at(y1, x0) + lx * at(y1, x1));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::randn;
    use candle_core::{DType, Var};

    fn flat(t: &Tensor) -> Vec<f64> {
        t.flatten_all()
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap()
            .to_vec1()
            .unwrap()
    }

    /// Hand-computed: upsampling [0, 1] to 4 gives PyTorch's [0, 0.25, 0.75, 1].
    #[test]
    fn hand_computed_two_to_four() {
        let x = Tensor::new(&[[[[0.0f32, 1.0]]]], &candle_core::Device::Cpu).unwrap();
        let y = resize_bilinear(&x, 1, 4).unwrap();
        assert_eq!(flat(&y), vec![0.0, 0.25, 0.75, 1.0]);
        // Down by 2: output o samples source 2o + ½, the mean of a pair.
        let x = Tensor::new(&[[[[1.0f32, 3.0, 5.0, 9.0]]]], &candle_core::Device::Cpu).unwrap();
        assert_eq!(flat(&resize_bilinear(&x, 1, 2).unwrap()), vec![2.0, 7.0]);
    }

    /// Forward against the direct formula; the gradient is the transpose (Σ dY·∂Y/∂X) checked
    /// by the identity ⟨R(x), u⟩ = ⟨x, Rᵀ(u)⟩ through autograd.
    #[test]
    fn matches_formula_and_adjoint() {
        for &(n, c, h, w, oh, ow) in &[
            (2, 3, 5, 7, 11, 13),
            (1, 2, 16, 16, 4, 4),
            (1, 1, 8, 8, 64, 64),
            (2, 2, 9, 6, 9, 17),
            (1, 3, 13, 26, 22, 22),
        ] {
            let x = Var::from_tensor(&randn((n, c, h, w))).unwrap();
            let y = resize_bilinear(x.as_tensor(), oh, ow).unwrap();
            let want = reference_bilinear(&flat(x.as_tensor()), (n, c, h, w), oh, ow);
            for (a, b) in flat(&y).iter().zip(&want) {
                assert!((a - b).abs() < 1e-5, "{a} vs {b}");
            }
            let u = randn((n, c, oh, ow));
            let g = (&y * &u).unwrap().sum_all().unwrap().backward().unwrap();
            let dx = flat(g.get(x.as_tensor()).unwrap());
            // ⟨R x, u⟩ = ⟨x, dx⟩ for every x: check on a basis vector per input position.
            let uf = flat(&u);
            for probe in [0, h * w / 2, n * c * h * w - 1] {
                let mut e = vec![0.0; n * c * h * w];
                e[probe] = 1.0;
                let re = reference_bilinear(&e, (n, c, h, w), oh, ow);
                let lhs: f64 = re.iter().zip(&uf).map(|(a, b)| a * b).sum();
                assert!(
                    (lhs - dx[probe]).abs() < 1e-4,
                    "adjoint at {probe}: {lhs} vs {}",
                    dx[probe]
                );
            }
        }
    }

    /// An f64 map is resized with f64 coordinates (PyTorch's f64 kernel): at a scale f32
    /// cannot represent (12 → 23) the result is the f64 formula's to rounding, where f32
    /// coordinates would be off by ~1e-7.
    #[test]
    fn f64_maps_use_f64_coordinates() {
        let (n, c, h, w, oh, ow) = (1, 2, 12, 7, 23, 13);
        let x = randn((n, c, h, w)).to_dtype(DType::F64).unwrap();
        let y = flat(&resize_bilinear(&x, oh, ow).unwrap());
        let want = reference_bilinear(&flat(&x), (n, c, h, w), oh, ow);
        let worst = y
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f64::max);
        assert!(worst < 1e-14, "{worst}");
        let m32 = interpolation_matrix(12, 23);
        let m64 = interpolation_matrix_f64(12, 23);
        assert!(m32
            .iter()
            .zip(&m64)
            .any(|(a, b)| (*a as f64 - b).abs() > 1e-9));
    }

    #[test]
    fn rows_sum_to_one() {
        for (i, o) in [(3, 7), (64, 512), (26, 22), (1, 5), (5, 1)] {
            let m = interpolation_matrix(i, o);
            for r in 0..o {
                let s: f32 = m[r * i..(r + 1) * i].iter().sum();
                assert!((s - 1.0).abs() < 1e-6);
            }
        }
    }
}
