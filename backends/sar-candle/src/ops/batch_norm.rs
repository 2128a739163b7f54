//! Fused CPU BatchNorm (+ ReLU) and residual add + ReLU for f32 NCHW, as candle custom ops.
//!
//! candle-nn's BatchNorm is a chain of about a dozen tensor ops (transpose, copies, mean,
//! subtract, square, mean, divide, …); their backward doubles that and each gradient is
//! accumulated through an extra zero tensor. For a ResNet-32 step that was most of the step.
//! Here one pass computes the per-channel statistics and one pass normalises (and applies the
//! ReLU); the backward is the textbook formula in two passes:
//!
//! - forward (training): μ_c, σ²_c (biased) over N·H·W in f64, x̂ = (x − μ)/√(σ² + ε),
//!   y = γ·x̂ + β, then max(y, 0) if fused with ReLU;
//! - backward: g = dy·𝟙(y > 0) (with ReLU), dβ_c = Σ g, dγ_c = Σ g·x̂,
//!   dx = γ/√(σ²+ε) · (g − dβ_c/M − x̂·dγ_c/M) with M = N·H·W;
//! - evaluation: y = x·s_c + t_c with s = γ/√(running σ² + ε), t = β − running μ·s.
//!
//! The running statistics follow PyTorch (momentum 0.1, unbiased variance) and are updated by
//! the caller (sar-models' `layers::Bn`) from the batch statistics this op reports. Sums are over
//! channels in a fixed order, so results do not depend on the thread count.

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Shape, Tensor};
use rayon::prelude::*;
use std::sync::{Arc, Mutex};

fn nchw(l: &Layout, channels: usize) -> candle_core::Result<(usize, usize, usize)> {
    let d = l.dims();
    if d.len() < 2 || d[1] != channels {
        candle_core::bail!("batch-norm over {channels} channels got input {d:?}");
    }
    let n = d[0];
    let hw: usize = d[2..].iter().product();
    Ok((n, channels, hw))
}

/// Per-channel batch statistics of the last forward pass: mean, biased variance, 1/√(σ²+ε).
#[derive(Debug, Clone, Default)]
pub struct BatchStats {
    /// μ_c.
    pub mean: Vec<f64>,
    /// σ²_c (biased).
    pub var: Vec<f64>,
    /// 1/√(σ²_c + ε).
    pub inv_std: Vec<f32>,
    /// M = N·H·W.
    pub count: usize,
}

/// Training-mode BatchNorm (optionally + ReLU) on (x, γ, β).
pub struct BnTrain {
    /// ε.
    pub eps: f64,
    /// Fuse a ReLU.
    pub relu: bool,
    /// Filled by the forward pass.
    pub stats: Arc<Mutex<BatchStats>>,
}

impl CustomOp3 for BnTrain {
    fn name(&self) -> &'static str {
        "sar-batch-norm"
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
        let gamma = super::cpu_f32("batch-norm", s2, l2, "weight")?;
        let beta = super::cpu_f32("batch-norm", s3, l3, "bias")?;
        let (n, c, hw) = nchw(l1, gamma.len())?;
        let x = super::cpu_f32("batch-norm", s1, l1, "input")?;
        if beta.len() != c {
            candle_core::bail!("batch-norm bias has {} values for {c} channels", beta.len());
        }
        let m = n * hw;
        let moments: Vec<(f64, f64)> = (0..c)
            .into_par_iter()
            .map(|ch| {
                let plane = |i: usize| &x[(i * c + ch) * hw..(i * c + ch + 1) * hw];
                let mut s = 0.0f64;
                for i in 0..n {
                    s += lane_sum(plane(i), |v| v as f64);
                }
                let mean = s / m.max(1) as f64;
                let mut q = 0.0f64;
                for i in 0..n {
                    q += lane_sum(plane(i), |v| (v as f64 - mean).powi(2));
                }
                (mean, q / m.max(1) as f64)
            })
            .collect();
        let inv_std: Vec<f32> = moments
            .iter()
            .map(|&(_, v)| (1.0 / (v + self.eps).sqrt()) as f32)
            .collect();
        let scale: Vec<f32> = (0..c).map(|ch| gamma[ch] * inv_std[ch]).collect();
        let shift: Vec<f32> = (0..c)
            .map(|ch| beta[ch] - moments[ch].0 as f32 * scale[ch])
            .collect();
        let y = affine(x, n, c, hw, &scale, &shift, self.relu);
        *self.stats.lock().expect("stats lock") = BatchStats {
            mean: moments.iter().map(|m| m.0).collect(),
            var: moments.iter().map(|m| m.1).collect(),
            inv_std,
            count: m,
        };
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        _beta: &Tensor,
        y: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let stats = self.stats.lock().expect("stats lock").clone();
        let params = Arc::new(Mutex::new((Vec::new(), Vec::new())));
        let op = BnBackward {
            relu: self.relu,
            stats,
            gamma: gamma.flatten_all()?.to_vec1::<f32>()?,
            param_grads: params.clone(),
        };
        let dx = x.apply_op3_no_bwd(&grad.contiguous()?, y, &op)?;
        let (dg, db) = std::mem::take(&mut *params.lock().expect("grad lock"));
        let c = dg.len();
        Ok((
            Some(dx),
            Some(Tensor::from_vec(dg, c, x.device())?),
            Some(Tensor::from_vec(db, c, x.device())?),
        ))
    }
}

/// Σ f(v) over `values` in f64, in eight interleaved partial sums added at the end: one
/// running sum is a chain of dependent additions (4 cycles each), eight keep the adder busy.
/// (The f64 sum of f32 terms differs from the one-chain sum by ~1e-16 relative.)
#[inline]
fn lane_sum(values: &[f32], f: impl Fn(f32) -> f64) -> f64 {
    let mut lanes = [0.0f64; 8];
    let mut chunks = values.chunks_exact(8);
    for chunk in &mut chunks {
        for (l, &v) in lanes.iter_mut().zip(chunk) {
            *l += f(v);
        }
    }
    let tail: f64 = chunks.remainder().iter().map(|&v| f(v)).sum();
    lanes.iter().sum::<f64>() + tail
}

fn affine(
    x: &[f32],
    n: usize,
    c: usize,
    hw: usize,
    scale: &[f32],
    shift: &[f32],
    relu: bool,
) -> Vec<f32> {
    let mut y = vec![0.0f32; n * c * hw];
    y.par_chunks_mut(c * hw).enumerate().for_each(|(i, yi)| {
        let xi = &x[i * c * hw..(i + 1) * c * hw];
        for ch in 0..c {
            let (s, t) = (scale[ch], shift[ch]);
            let (src, dst) = (&xi[ch * hw..(ch + 1) * hw], &mut yi[ch * hw..(ch + 1) * hw]);
            if relu {
                for (d, &v) in dst.iter_mut().zip(src) {
                    *d = (v * s + t).max(0.0);
                }
            } else {
                for (d, &v) in dst.iter_mut().zip(src) {
                    *d = v * s + t;
                }
            }
        }
    });
    y
}

/// dL/dx of [`BnTrain`] from (x, dy, y); dγ and dβ go to `param_grads`.
struct BnBackward {
    relu: bool,
    stats: BatchStats,
    gamma: Vec<f32>,
    param_grads: Arc<Mutex<(Vec<f32>, Vec<f32>)>>,
}

impl CustomOp3 for BnBackward {
    fn name(&self) -> &'static str {
        "sar-batch-norm-backward"
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
        let c = self.gamma.len();
        let (n, _, hw) = nchw(l1, c)?;
        let x = super::cpu_f32("batch-norm", s1, l1, "input")?;
        let dy = super::cpu_f32("batch-norm", s2, l2, "output gradient")?;
        let y = super::cpu_f32("batch-norm", s3, l3, "output")?;
        let st = &self.stats;
        if st.mean.len() != c {
            candle_core::bail!("batch-norm backward without forward statistics");
        }
        let relu = self.relu;
        let g = move |d: f32, yv: f32| if relu && yv <= 0.0 { 0.0 } else { d };
        let sums: Vec<(f64, f64)> = (0..c)
            .into_par_iter()
            .map(|ch| {
                let (mean, inv) = (st.mean[ch] as f32, st.inv_std[ch]);
                let (mut sg, mut sgx) = (0.0f64, 0.0f64);
                for i in 0..n {
                    let r = (i * c + ch) * hw..(i * c + ch + 1) * hw;
                    let (mut a, mut b) = (0.0f32, 0.0f32);
                    for ((&xv, &d), &yv) in x[r.clone()].iter().zip(&dy[r.clone()]).zip(&y[r]) {
                        let gk = g(d, yv);
                        a += gk;
                        b += gk * (xv - mean) * inv;
                    }
                    sg += a as f64;
                    sgx += b as f64;
                }
                (sg, sgx)
            })
            .collect();
        let m = st.count.max(1) as f64;
        let mut dx = vec![0.0f32; x.len()];
        dx.par_chunks_mut(c * hw).enumerate().for_each(|(i, out)| {
            for ch in 0..c {
                let (mean, inv) = (st.mean[ch] as f32, st.inv_std[ch]);
                let k0 = self.gamma[ch] * inv;
                let mg = (sums[ch].0 / m) as f32;
                let mgx = (sums[ch].1 / m) as f32;
                let r = (i * c + ch) * hw..(i * c + ch + 1) * hw;
                let dst = &mut out[ch * hw..(ch + 1) * hw];
                for (((o, &xv), &d), &yv) in dst
                    .iter_mut()
                    .zip(&x[r.clone()])
                    .zip(&dy[r.clone()])
                    .zip(&y[r])
                {
                    let xhat = (xv - mean) * inv;
                    *o = k0 * (g(d, yv) - mg - xhat * mgx);
                }
            }
        });
        *self.param_grads.lock().expect("grad lock") = (
            sums.iter().map(|s| s.1 as f32).collect(),
            sums.iter().map(|s| s.0 as f32).collect(),
        );
        Ok((CpuStorage::F32(dx), l1.shape().clone()))
    }
}

/// Evaluation-mode per-channel affine (+ ReLU) on (x, scale, shift); no backward.
pub struct ChannelAffine {
    /// Fuse a ReLU.
    pub relu: bool,
}

impl CustomOp3 for ChannelAffine {
    fn name(&self) -> &'static str {
        "sar-channel-affine"
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
        let scale = super::cpu_f32("batch-norm", s2, l2, "scale")?;
        let shift = super::cpu_f32("batch-norm", s3, l3, "shift")?;
        let (n, c, hw) = nchw(l1, scale.len())?;
        let x = super::cpu_f32("batch-norm", s1, l1, "input")?;
        Ok((
            CpuStorage::F32(affine(x, n, c, hw, scale, shift, self.relu)),
            l1.shape().clone(),
        ))
    }
}

/// relu(a + b) for two f32 tensors of one shape (the end of a residual block).
pub struct AddRelu;

impl CustomOp2 for AddRelu {
    fn name(&self) -> &'static str {
        "sar-add-relu"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        if l1.dims() != l2.dims() {
            candle_core::bail!("add-relu of {:?} and {:?}", l1.dims(), l2.dims());
        }
        let a = super::cpu_f32("batch-norm", s1, l1, "lhs")?;
        let b = super::cpu_f32("add-relu", s2, l2, "rhs")?;
        let mut y = vec![0.0f32; a.len()];
        y.par_chunks_mut(1 << 14).enumerate().for_each(|(i, out)| {
            let o = i << 14;
            for (j, v) in out.iter_mut().enumerate() {
                *v = (a[o + j] + b[o + j]).max(0.0);
            }
        });
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }
    fn bwd(
        &self,
        _a: &Tensor,
        _b: &Tensor,
        y: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let g = grad.contiguous()?.apply_op2_no_bwd(y, &ReluMask)?;
        Ok((Some(g.clone()), Some(g)))
    }
}

/// dy·𝟙(y > 0).
struct ReluMask;

impl CustomOp2 for ReluMask {
    fn name(&self) -> &'static str {
        "sar-relu-mask"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let dy = super::cpu_f32("batch-norm", s1, l1, "gradient")?;
        let y = super::cpu_f32("add-relu", s2, l2, "output")?;
        let mut g = vec![0.0f32; dy.len()];
        g.par_chunks_mut(1 << 14).enumerate().for_each(|(i, out)| {
            let o = i << 14;
            for (j, v) in out.iter_mut().enumerate() {
                *v = if y[o + j] > 0.0 { dy[o + j] } else { 0.0 };
            }
        });
        Ok((CpuStorage::F32(g), l1.shape().clone()))
    }
}

/// Whether the fused CPU ops apply to `x`.
pub fn fused_ok(x: &Tensor) -> bool {
    x.device().is_cpu() && x.dtype() == candle_core::DType::F32
}

/// relu(a + b): the fused op on the CPU for f32, candle's ops elsewhere.
pub fn add_relu(a: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
    if fused_ok(a) {
        a.contiguous()?.apply_op2(&b.contiguous()?, AddRelu)
    } else {
        (a + b)?.relu()
    }
}

#[cfg(test)]
mod tests {
    use crate::ops::test_util::randn;
    use candle_core::{DType, Tensor, Var};

    fn max_abs(t: &Tensor) -> f64 {
        t.abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap()
            .to_scalar()
            .unwrap()
    }

    #[test]
    fn add_relu_matches_candle_ops() {
        let a = Var::from_tensor(&randn((3, 40000))).unwrap();
        let b = Var::from_tensor(&randn((3, 40000))).unwrap();
        let up = randn((3, 40000));
        let ours = super::add_relu(a.as_tensor(), b.as_tensor()).unwrap();
        let theirs = (a.as_tensor() + b.as_tensor()).unwrap().relu().unwrap();
        assert_eq!(max_abs(&(&ours - &theirs).unwrap()), 0.0);
        let g1 = (ours * &up).unwrap().sum_all().unwrap().backward().unwrap();
        let g2 = (theirs * &up)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        for v in [&a, &b] {
            let d = (g1.get(v.as_tensor()).unwrap() - g2.get(v.as_tensor()).unwrap()).unwrap();
            assert_eq!(max_abs(&d), 0.0);
        }
    }
}
