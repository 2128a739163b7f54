//! Fused LayerNorm over the last axis for f32, with its backward, as a candle custom op.
//!
//! Rows r of x `[…, C]` (R rows of C): μ_r = mean of the row, σ²_r = mean of (x − μ_r)² (biased),
//! ρ_r = 1/√(σ²_r + ε), x̂ = (x − μ_r)·ρ_r, y = γ·x̂ + β with γ, β `[C]`. Statistics are taken
//! in f64. Backward for upstream g, with ĝ = γ·g:
//!
//! - dx = ρ_r·(ĝ − mean_r(ĝ) − x̂·mean_r(ĝ·x̂));
//! - dγ = Σ_r g·x̂, dβ = Σ_r g.
//!
//! candle-nn's `layer_norm` has no backward, and the same formula written as tensor ops costs
//! a dozen passes over memory plus, for γ and β, candle's single-threaded reduction over the
//! leading axes. Here one pass normalises and one pass differentiates (the row statistics are
//! recomputed from x rather than kept). Rows are summed into dγ, dβ in fixed groups, then the
//! groups in order: results do not depend on the thread count.

use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Tensor, D};
use rayon::prelude::*;

/// Rows per parallel task in the forward pass.
const ROWS_PER_TASK: usize = 64;
/// Fixed number of row groups dγ and dβ are summed in.
const SUM_GROUPS: usize = 16;

fn rows(l: &Layout, channels: usize) -> candle_core::Result<usize> {
    let dims = l.dims();
    match dims.last() {
        Some(&c) if c == channels && c > 0 => Ok(l.shape().elem_count() / c),
        _ => candle_core::bail!("layer-norm over {channels} channels got input {dims:?}"),
    }
}

/// (μ, ρ) of one row.
fn stats(row: &[f32], eps: f64) -> (f32, f32) {
    let c = row.len() as f64;
    let mean = super::sum_f32(row) / c;
    let var = row
        .iter()
        .map(|&v| {
            let d = f64::from(v) - mean;
            d * d
        })
        .sum::<f64>()
        / c;
    (mean as f32, (1.0 / (var + eps).sqrt()) as f32)
}

struct LayerNormOp {
    eps: f64,
}

impl CustomOp3 for LayerNormOp {
    fn name(&self) -> &'static str {
        "sar-layer-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = super::cpu_f32("layer-norm", s1, l1, "input")?;
        let w = super::cpu_f32("layer-norm", s2, l2, "weight")?;
        let b = super::cpu_f32("layer-norm", s3, l3, "bias")?;
        let c = w.len();
        if b.len() != c {
            candle_core::bail!("layer-norm weight has {c} channels, bias {}", b.len());
        }
        rows(l1, c)?;
        let mut y = vec![0.0f32; x.len()];
        y.par_chunks_mut(c * ROWS_PER_TASK)
            .zip(x.par_chunks(c * ROWS_PER_TASK))
            .for_each(|(ys, xs)| {
                for (yr, xr) in ys.chunks_exact_mut(c).zip(xs.chunks_exact(c)) {
                    let (mean, rho) = stats(xr, self.eps);
                    for (((o, &v), &g), &t) in yr.iter_mut().zip(xr).zip(w).zip(b) {
                        *o = (v - mean) * rho * g + t;
                    }
                }
            });
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let all = x.apply_op3_no_bwd(w, &grad.contiguous()?, &LayerNormGrad { eps: self.eps })?;
        let (n, c) = (x.elem_count(), w.elem_count());
        let dx = all.narrow(0, 0, n)?.reshape(x.shape())?;
        let dw = all.narrow(0, n, c)?;
        let db = all.narrow(0, n + c, c)?;
        Ok((Some(dx), Some(dw), Some(db)))
    }
}

/// (x, γ, dy) → dx, dγ, dβ concatenated flat.
struct LayerNormGrad {
    eps: f64,
}

impl CustomOp3 for LayerNormGrad {
    fn name(&self) -> &'static str {
        "sar-layer-norm-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = super::cpu_f32("layer-norm", s1, l1, "input")?;
        let w = super::cpu_f32("layer-norm", s2, l2, "weight")?;
        let g = super::cpu_f32("layer-norm", s3, l3, "output gradient")?;
        let c = w.len();
        let r = rows(l1, c)?;
        if g.len() != x.len() {
            candle_core::bail!(
                "layer-norm gradient {:?} for input {:?}",
                l3.dims(),
                l1.dims()
            );
        }
        let per_group = r.div_ceil(SUM_GROUPS).max(1);
        let mut out = vec![0.0f32; x.len() + 2 * c];
        let (dx, params) = out.split_at_mut(x.len());
        let partial: Vec<(Vec<f64>, Vec<f64>)> = dx
            .par_chunks_mut(per_group * c)
            .zip(x.par_chunks(per_group * c))
            .zip(g.par_chunks(per_group * c))
            .map(|((dxs, xs), gs)| {
                let (mut dw, mut db) = (vec![0.0f64; c], vec![0.0f64; c]);
                let mut xhat = vec![0.0f32; c];
                let mut gw = vec![0.0f32; c];
                for ((dr, xr), gr) in dxs
                    .chunks_exact_mut(c)
                    .zip(xs.chunks_exact(c))
                    .zip(gs.chunks_exact(c))
                {
                    let (mean, rho) = stats(xr, self.eps);
                    for ((h, &v), ((q, &gv), &wv)) in
                        xhat.iter_mut().zip(xr).zip(gw.iter_mut().zip(gr).zip(w))
                    {
                        *h = (v - mean) * rho;
                        *q = gv * wv;
                    }
                    let inv_c = 1.0 / c as f64;
                    let mean_gw = (super::sum_f32(&gw) * inv_c) as f32;
                    let mean_gwx = (super::dot_f32(&gw, Some(&xhat)) * inv_c) as f32;
                    for ((d, &q), &h) in dr.iter_mut().zip(&gw).zip(&xhat) {
                        *d = rho * (q - mean_gw - h * mean_gwx);
                    }
                    for (((a, e), &gv), &h) in dw.iter_mut().zip(db.iter_mut()).zip(gr).zip(&xhat) {
                        *a += f64::from(gv * h);
                        *e += f64::from(gv);
                    }
                }
                (dw, db)
            })
            .collect();
        let (mut dw, mut db) = (vec![0.0f64; c], vec![0.0f64; c]);
        for (pw, pb) in &partial {
            for (a, v) in dw.iter_mut().zip(pw) {
                *a += v;
            }
            for (a, v) in db.iter_mut().zip(pb) {
                *a += v;
            }
        }
        for (o, v) in params.iter_mut().zip(dw.iter().chain(&db)) {
            *o = *v as f32;
        }
        Ok((CpuStorage::F32(out), Shape::from(x.len() + 2 * c)))
    }
}

/// LayerNorm of `x` `[…, C]` over its last axis with `weight`, `bias` `[C]`: this op on the
/// CPU for f32, the same formula as candle tensor ops otherwise.
pub fn layer_norm(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
) -> candle_core::Result<Tensor> {
    if super::all_cpu_f32(&[x, weight, bias]) {
        x.contiguous()?.apply_op3(
            &weight.contiguous()?,
            &bias.contiguous()?,
            LayerNormOp { eps },
        )
    } else {
        layer_norm_composite(x, weight, bias, eps)
    }
}

/// The same LayerNorm as candle tensor ops (any device and dtype; the CUDA path).
pub fn layer_norm_composite(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
) -> candle_core::Result<Tensor> {
    let centred = x.broadcast_sub(&x.mean_keepdim(D::Minus1)?)?;
    let var = centred.sqr()?.mean_keepdim(D::Minus1)?;
    centred
        .broadcast_div(&(var + eps)?.sqrt()?)?
        .broadcast_mul(weight)?
        .broadcast_add(bias)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::test_util::{flat, randn};
    use candle_core::{DType, Var};

    /// Forward and the three gradients of the f32 op against the composite formula run in
    /// f64 on the same values, for several row counts and widths (one with a large mean, where
    /// f32 statistics would lose digits), with a random upstream gradient.
    #[test]
    fn matches_the_f64_composite_forward_and_gradients() {
        for (dims, offset) in [
            (vec![7, 5], 0.0),
            (vec![2, 33, 32], 0.0),
            (vec![3, 4, 160], 0.0),
            (vec![1, 1, 1], 0.0),
            (vec![300, 9], 100.0),
        ] {
            let c = *dims.last().unwrap();
            let x0 = (randn(dims.as_slice()) + offset).unwrap();
            let w0 = (randn(c) + 1.0).unwrap();
            let b0 = randn(c);
            let up = randn(dims.as_slice());
            let run = |dtype: DType, fused: bool| {
                let x = Var::from_tensor(&x0.to_dtype(dtype).unwrap()).unwrap();
                let w = Var::from_tensor(&w0.to_dtype(dtype).unwrap()).unwrap();
                let b = Var::from_tensor(&b0.to_dtype(dtype).unwrap()).unwrap();
                let f = if fused {
                    layer_norm
                } else {
                    layer_norm_composite
                };
                let y = f(x.as_tensor(), w.as_tensor(), b.as_tensor(), 1e-6).unwrap();
                let g = (&y * up.to_dtype(dtype).unwrap())
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .backward()
                    .unwrap();
                [
                    flat(&y),
                    flat(g.get(x.as_tensor()).unwrap()),
                    flat(g.get(w.as_tensor()).unwrap()),
                    flat(g.get(b.as_tensor()).unwrap()),
                ]
            };
            let ours = run(DType::F32, true);
            let exact = run(DType::F64, false);
            for (what, a, b) in ["forward", "dx", "dγ", "dβ"]
                .iter()
                .zip(ours.iter())
                .zip(exact.iter())
                .map(|((w, a), b)| (w, a, b))
            {
                assert_eq!(a.len(), b.len(), "{what} {dims:?}");
                let scale = b.iter().fold(1.0f64, |m, v| m.max(v.abs()));
                for (u, v) in a.iter().zip(b) {
                    assert!((u - v).abs() < 2e-5 * scale, "{what} {dims:?}: {u} vs {v}");
                }
            }
        }
    }

    /// A row of C equal values normalises to β (σ² = 0, only ε keeps it finite), and its input
    /// gradient is finite.
    #[test]
    fn a_constant_row_gives_beta_and_a_finite_gradient() {
        let x = Var::from_tensor(&Tensor::full(3.0f32, (2, 4), &candle_core::Device::Cpu).unwrap())
            .unwrap();
        let w = randn(4);
        let b = randn(4);
        let y = layer_norm(x.as_tensor(), &w, &b, 1e-6).unwrap();
        let want: Vec<f32> = b.to_vec1().unwrap();
        for row in y.to_vec2::<f32>().unwrap() {
            assert_eq!(row, want);
        }
        let g = y.sum_all().unwrap().backward().unwrap();
        let dx = flat(g.get(x.as_tensor()).unwrap());
        assert!(dx.iter().all(|v| v.is_finite()), "{dx:?}");
    }

    #[test]
    fn mismatched_widths_are_errors() {
        let x = randn((2, 5));
        let err = layer_norm(&x, &randn(4), &randn(4), 1e-5)
            .unwrap_err()
            .to_string();
        assert!(err.contains("layer-norm over 4 channels"), "{err}");
        let err = layer_norm(&x, &randn(5), &randn(4), 1e-5)
            .unwrap_err()
            .to_string();
        assert!(err.contains("weight has 5 channels, bias 4"), "{err}");
    }
}
