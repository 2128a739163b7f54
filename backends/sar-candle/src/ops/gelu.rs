//! Exact GELU for f32 with its exact derivative, as a candle custom op.
//!
//! y = x·Φ(x) with Φ(x) = ½(1 + erf(x/√2)); dy/dx = Φ(x) + x·φ(x), φ(x) = e^(−x²/2)/√(2π).
//! erf is libm's `erff`, the function candle's own f32 `erf` calls, so the forward equals the
//! composite x·(erf(x·(1/√2)) + 1)·½ written with candle ops bit for bit.
//!
//! candle's fused `gelu_erf` computes the same forward, but its backward uses 0.398942 for
//! 1/√(2π) (relative error 7e-7, visible against PyTorch in f64); the composite is exact but
//! costs five passes forward and more backward. This op is one pass each way, elementwise, so
//! in any order of threads it gives the same values.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Shape, Tensor};
use rayon::prelude::*;
use std::f32::consts::FRAC_1_SQRT_2;

/// Elements per parallel task.
const CHUNK: usize = 1 << 14;
/// 1/√(2π).
const INV_SQRT_2PI: f32 = 0.398_942_3;

fn cdf(v: f32) -> f32 {
    libm::erff(v * FRAC_1_SQRT_2) + 1.0
}

struct Gelu;

impl CustomOp1 for Gelu {
    fn name(&self) -> &'static str {
        "sar-gelu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = super::cpu_f32("gelu", s, l, "input")?;
        let mut y = vec![0.0f32; x.len()];
        y.par_chunks_mut(CHUNK)
            .zip(x.par_chunks(CHUNK))
            .for_each(|(ys, xs)| {
                for (o, &v) in ys.iter_mut().zip(xs) {
                    *o = v * cdf(v) * 0.5;
                }
            });
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(x.apply_op2_no_bwd(&grad.contiguous()?, &GeluGrad)?))
    }
}

/// (x, dy) → dy·(Φ(x) + x·φ(x)).
struct GeluGrad;

impl CustomOp2 for GeluGrad {
    fn name(&self) -> &'static str {
        "sar-gelu-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = super::cpu_f32("gelu", s1, l1, "input")?;
        let g = super::cpu_f32("gelu", s2, l2, "output gradient")?;
        if x.len() != g.len() {
            candle_core::bail!("gelu gradient {:?} for input {:?}", l2.dims(), l1.dims());
        }
        let mut dx = vec![0.0f32; x.len()];
        dx.par_chunks_mut(CHUNK)
            .zip(x.par_chunks(CHUNK).zip(g.par_chunks(CHUNK)))
            .for_each(|(ds, (xs, gs))| {
                for ((d, &v), &gv) in ds.iter_mut().zip(xs).zip(gs) {
                    let pdf = (-0.5 * v * v).exp() * INV_SQRT_2PI;
                    *d = gv * (0.5 * cdf(v) + v * pdf);
                }
            });
        Ok((CpuStorage::F32(dx), l1.shape().clone()))
    }
}

/// Exact GELU of `x`: this op on the CPU for f32, candle's `erf` composite otherwise (whose
/// gradient, through `erf`, is also exact).
pub fn gelu_erf(x: &Tensor) -> candle_core::Result<Tensor> {
    if super::all_cpu_f32(&[x]) {
        x.contiguous()?.apply_op1(Gelu)
    } else {
        gelu_erf_composite(x)
    }
}

/// x·(erf(x/√2) + 1)·½ as candle tensor ops (any device and dtype).
pub fn gelu_erf_composite(x: &Tensor) -> candle_core::Result<Tensor> {
    let cdf = ((x * std::f64::consts::FRAC_1_SQRT_2)?.erf()? + 1.0)?;
    (x * cdf)? * 0.5
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::test_util::randn;
    use candle_core::{DType, Var};

    /// Forward equals the f32 composite bit for bit; the gradient matches the composite's
    /// (through erf) run in f64, over a range that includes the tails (|x| up to ~12).
    #[test]
    fn matches_the_composite_forward_exactly_and_the_f64_gradient() {
        let x0 = (randn(40_000) * 3.0).unwrap();
        let up = randn(40_000);
        let x = Var::from_tensor(&x0).unwrap();
        let ours = gelu_erf(x.as_tensor()).unwrap();
        let theirs = gelu_erf_composite(x.as_tensor()).unwrap();
        assert_eq!(
            ours.to_vec1::<f32>().unwrap(),
            theirs.to_vec1::<f32>().unwrap()
        );
        let g = (&ours * &up)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let dx: Vec<f32> = g.get(x.as_tensor()).unwrap().to_vec1().unwrap();
        let x64 = Var::from_tensor(&x0.to_dtype(DType::F64).unwrap()).unwrap();
        let y64 = gelu_erf_composite(x64.as_tensor()).unwrap();
        let g64 = (&y64 * up.to_dtype(DType::F64).unwrap())
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let dx64: Vec<f64> = g64.get(x64.as_tensor()).unwrap().to_vec1().unwrap();
        for (a, b) in dx.iter().zip(&dx64) {
            assert!(
                (f64::from(*a) - b).abs() < 1e-6 * (1.0 + b.abs()),
                "{a} vs {b}"
            );
        }
    }

    /// Hand values: GELU(0) = 0 with slope ½; GELU(1) = Φ(1) = 0.841345 with slope
    /// Φ(1) + φ(1) = 0.841345 + 0.241971.
    #[test]
    fn hand_values() {
        let x = Var::from_tensor(&Tensor::new(&[0.0f32, 1.0], &candle_core::Device::Cpu).unwrap())
            .unwrap();
        let y = gelu_erf(x.as_tensor()).unwrap();
        let v: Vec<f32> = y.to_vec1().unwrap();
        assert!(v[0] == 0.0 && (v[1] - 0.841_344_7).abs() < 1e-6, "{v:?}");
        let g = y.sum_all().unwrap().backward().unwrap();
        let d: Vec<f32> = g.get(x.as_tensor()).unwrap().to_vec1().unwrap();
        assert!((d[0] - 0.5).abs() < 1e-7, "{d:?}");
        assert!((d[1] - (0.841_344_7 + 0.241_970_7)).abs() < 1e-6, "{d:?}");
    }
}
