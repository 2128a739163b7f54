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
//!   dx = γ/√(σ²+ε) · (g − dβ_c/M − x̂·dγ_c/M) with M = N·H·W. The ReLU's mask is recomputed
//!   from x as x·s_c + t_c > 0 with the forward's own f32 scale and shift (the same operations,
//!   so the same bits as y > 0), which spares the backward reading y;
//! - evaluation: y = x·s_c + t_c with s = γ/√(running σ² + ε), t = β − running μ·s.
//!
//! The running statistics follow PyTorch (momentum 0.1, unbiased variance) and are updated by
//! the caller (sar-models' `layers::Bn`) from the batch statistics this op reports. Sums are over
//! channels in a fixed order, so results do not depend on the thread count. The plane loops are
//! compiled for baseline x86-64 and for AVX2 + FMA and pick at run time (`multiversion`); the
//! baseline build's SSE2 loops had made the backward about twice as slow.

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
        let (y, stats) = train_forward(x, gamma, beta, (n, c, hw), self.eps, self.relu, None);
        *self.stats.lock().expect("stats lock") = stats;
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        beta: &Tensor,
        _y: &Tensor,
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
        let dx = x.apply_op3_no_bwd(&grad.contiguous()?, &beta.contiguous()?, &op)?;
        let (dg, db) = std::mem::take(&mut *params.lock().expect("grad lock"));
        let c = dg.len();
        Ok((
            Some(dx),
            Some(Tensor::from_vec(dg, c, x.device())?),
            Some(Tensor::from_vec(db, c, x.device())?),
        ))
    }
}

/// Training-mode BatchNorm of `x` `[N, C, HW]` with its batch statistics:
/// `y = γ·x̂ + β`, plus `residual` if given, then max(·, 0) with `relu`.
pub(crate) fn train_forward(
    x: &[f32],
    gamma: &[f32],
    beta: &[f32],
    (n, c, hw): (usize, usize, usize),
    eps: f64,
    relu: bool,
    residual: Option<&[f32]>,
) -> (Vec<f32>, BatchStats) {
    let m = n * hw;
    let moments: Vec<(f64, f64)> = (0..c)
        .into_par_iter()
        .map(|ch| {
            let plane = |i: usize| &x[(i * c + ch) * hw..(i * c + ch + 1) * hw];
            let mut s = 0.0f64;
            for i in 0..n {
                s += plane_sum(plane(i));
            }
            let mean = s / m.max(1) as f64;
            let mut q = 0.0f64;
            for i in 0..n {
                q += plane_square_deviation(plane(i), mean);
            }
            (mean, q / m.max(1) as f64)
        })
        .collect();
    let inv_std: Vec<f32> = moments
        .iter()
        .map(|&(_, v)| (1.0 / (v + eps).sqrt()) as f32)
        .collect();
    let stats = BatchStats {
        mean: moments.iter().map(|m| m.0).collect(),
        var: moments.iter().map(|m| m.1).collect(),
        inv_std,
        count: m,
    };
    let (scale, shift) = scale_shift(gamma, beta, &stats);
    let y = affine(x, (n, c, hw), &scale, &shift, relu, residual);
    (y, stats)
}

// The plane loops below are compiled twice, for baseline x86-64 and for AVX2 + FMA, and the
// second runs where the CPU has it (`multiversion`): built for baseline x86-64 they are SSE2.
// Each element's arithmetic is the same in both (Rust never fuses a·b + c) and the lanes of
// the sums are explicit, so the results are bit-identical.

/// Σ v over a plane in f64, in eight interleaved partial sums added at the end: one running
/// sum is a chain of dependent additions (4 cycles each), eight keep the adder busy.
/// (The f64 sum of f32 terms differs from the one-chain sum by ~1e-16 relative.)
#[multiversion::multiversion(targets("x86_64+avx+avx2+fma"))]
fn plane_sum(values: &[f32]) -> f64 {
    let mut lanes = [0.0f64; 8];
    let mut chunks = values.chunks_exact(8);
    for chunk in &mut chunks {
        for (l, &v) in lanes.iter_mut().zip(chunk) {
            *l += f64::from(v);
        }
    }
    let tail: f64 = chunks.remainder().iter().map(|&v| f64::from(v)).sum();
    lanes.iter().sum::<f64>() + tail
}

/// Σ (v − mean)² over a plane in f64, in eight lanes as [`plane_sum`].
#[multiversion::multiversion(targets("x86_64+avx+avx2+fma"))]
fn plane_square_deviation(values: &[f32], mean: f64) -> f64 {
    let mut lanes = [0.0f64; 8];
    let mut chunks = values.chunks_exact(8);
    for chunk in &mut chunks {
        for (l, &v) in lanes.iter_mut().zip(chunk) {
            let d = f64::from(v) - mean;
            *l += d * d;
        }
    }
    let tail: f64 = chunks
        .remainder()
        .iter()
        .map(|&v| (f64::from(v) - mean).powi(2))
        .sum();
    lanes.iter().sum::<f64>() + tail
}

/// Whether the ReLU after `y = x·s + t` passes x's gradient (`None`: no ReLU).
#[inline(always)]
fn passes(x: f32, relu: Option<(f32, f32)>) -> bool {
    match relu {
        None => true,
        Some((s, t)) => x * s + t > 0.0,
    }
}

/// `(Σ g, Σ g·(x − mean))` over one plane, g = dy where the ReLU `relu` passes (else 0), in
/// eight f32 lanes per sum.
#[multiversion::multiversion(targets("x86_64+avx+avx2+fma"))]
fn plane_grad_sums(x: &[f32], dy: &[f32], mean: f32, relu: Option<(f32, f32)>) -> (f64, f64) {
    let (mut a, mut b) = ([0.0f32; 8], [0.0f32; 8]);
    let (xs, ds) = (x.chunks_exact(8), dy.chunks_exact(8));
    let (mut ta, mut tb) = (0.0f64, 0.0f64);
    for (&xv, &d) in xs.remainder().iter().zip(ds.remainder()) {
        let g = if passes(xv, relu) { d } else { 0.0 };
        ta += f64::from(g);
        tb += f64::from(g * (xv - mean));
    }
    for (xc, dc) in xs.zip(ds) {
        for ((a, b), (&xv, &d)) in a.iter_mut().zip(b.iter_mut()).zip(xc.iter().zip(dc)) {
            let g = if passes(xv, relu) { d } else { 0.0 };
            *a += g;
            *b += g * (xv - mean);
        }
    }
    let sum = |v: [f32; 8]| v.iter().map(|&l| f64::from(l)).sum::<f64>();
    (sum(a) + ta, sum(b) + tb)
}

/// One channel's constants of the backward's second pass.
#[derive(Debug, Clone, Copy)]
struct PlaneGrad {
    mean: f32,
    inv: f32,
    k0: f32,
    mg: f32,
    mgx: f32,
}

/// dx = k0·(g − mg − x̂·mgx) over one plane, x̂ = (x − mean)·inv, g = dy where the ReLU
/// `relu` passes, else 0.
#[multiversion::multiversion(targets("x86_64+avx+avx2+fma"))]
fn plane_grad(dst: &mut [f32], x: &[f32], dy: &[f32], k: PlaneGrad, relu: Option<(f32, f32)>) {
    for ((o, &xv), &d) in dst.iter_mut().zip(x).zip(dy) {
        let g = if passes(xv, relu) { d } else { 0.0 };
        let xhat = (xv - k.mean) * k.inv;
        *o = k.k0 * (g - k.mg - xhat * k.mgx);
    }
}

/// `dst = x·s + t (+ residual)`, then max(·, 0) with `relu`, over one plane.
#[multiversion::multiversion(targets("x86_64+avx+avx2+fma"))]
fn plane_affine(
    dst: &mut [f32],
    x: &[f32],
    (s, t): (f32, f32),
    residual: Option<&[f32]>,
    relu: bool,
) {
    match (residual, relu) {
        (Some(r), true) => {
            for ((d, &v), &rv) in dst.iter_mut().zip(x).zip(r) {
                *d = (v * s + t + rv).max(0.0);
            }
        }
        (Some(r), false) => {
            for ((d, &v), &rv) in dst.iter_mut().zip(x).zip(r) {
                *d = v * s + t + rv;
            }
        }
        (None, true) => {
            for (d, &v) in dst.iter_mut().zip(x) {
                *d = (v * s + t).max(0.0);
            }
        }
        (None, false) => {
            for (d, &v) in dst.iter_mut().zip(x) {
                *d = v * s + t;
            }
        }
    }
}

/// `dy` where `y > 0`, else 0 (a ReLU's backward from its output), in parallel chunks.
pub(crate) fn relu_backward(dy: &[f32], y: &[f32]) -> Vec<f32> {
    let mut g = vec![0.0f32; dy.len()];
    g.par_chunks_mut(1 << 14)
        .zip(dy.par_chunks(1 << 14).zip(y.par_chunks(1 << 14)))
        .for_each(|(out, (d, y))| relu_mask(out, d, y));
    g
}

/// `dst = dy` where `y > 0`, else 0.
#[multiversion::multiversion(targets("x86_64+avx+avx2+fma"))]
fn relu_mask(dst: &mut [f32], dy: &[f32], y: &[f32]) {
    for ((o, &d), &y) in dst.iter_mut().zip(dy).zip(y) {
        *o = if y > 0.0 { d } else { 0.0 };
    }
}

/// `dst = max(a + b, 0)`.
#[multiversion::multiversion(targets("x86_64+avx+avx2+fma"))]
fn add_relu_plane(dst: &mut [f32], a: &[f32], b: &[f32]) {
    for ((o, &a), &b) in dst.iter_mut().zip(a).zip(b) {
        *o = (a + b).max(0.0);
    }
}

fn affine(
    x: &[f32],
    (n, c, hw): (usize, usize, usize),
    scale: &[f32],
    shift: &[f32],
    relu: bool,
    residual: Option<&[f32]>,
) -> Vec<f32> {
    let mut y = vec![0.0f32; n * c * hw];
    y.par_chunks_mut(c * hw).enumerate().for_each(|(i, yi)| {
        let xi = &x[i * c * hw..(i + 1) * c * hw];
        let ri = residual.map(|r| &r[i * c * hw..(i + 1) * c * hw]);
        for ch in 0..c {
            let planes = ch * hw..(ch + 1) * hw;
            let r = ri.map(|r| &r[planes.clone()]);
            let st = (scale[ch], shift[ch]);
            plane_affine(&mut yi[planes.clone()], &xi[planes], st, r, relu);
        }
    });
    y
}

/// dL/dx of [`BnTrain`] from (x, dy, β); dγ and dβ go to `param_grads`.
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
        let beta = super::cpu_f32("batch-norm", s3, l3, "bias")?;
        if self.stats.mean.len() != c || beta.len() != c {
            candle_core::bail!("batch-norm backward without forward statistics");
        }
        let relu = if self.relu {
            Relu::Fused { beta }
        } else {
            Relu::None
        };
        let (dx, dgamma, dbeta) = backward(x, dy, relu, &self.stats, &self.gamma, (n, c, hw));
        *self.param_grads.lock().expect("grad lock") = (dgamma, dbeta);
        Ok((CpuStorage::F32(dx), l1.shape().clone()))
    }
}

/// The training-mode BatchNorm backward for `x` `[N, C, HW]` with the forward's `stats`:
/// g = dy where the ReLU `relu` (if any) passed its input, else 0;
/// returns (dx, dγ, dβ) with dβ_c = Σ g, dγ_c = Σ g·x̂, dx = γ/√(σ²+ε)·(g − dβ_c/M − x̂·dγ_c/M).
pub(crate) fn backward(
    x: &[f32],
    dy: &[f32],
    relu: Relu<'_>,
    st: &BatchStats,
    gamma: &[f32],
    (n, c, hw): (usize, usize, usize),
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let scale_shift = match relu {
        Relu::Fused { beta } => Some(scale_shift(gamma, beta, st)),
        Relu::None => None,
    };
    let relu_at = |ch: usize| scale_shift.as_ref().map(|(s, t)| (s[ch], t[ch]));
    let plane = |i: usize, ch: usize| (i * c + ch) * hw..(i * c + ch + 1) * hw;
    let sums: Vec<(f64, f64)> = (0..c)
        .into_par_iter()
        .map(|ch| {
            let mean = st.mean[ch] as f32;
            let (mut sg, mut sgx) = (0.0f64, 0.0f64);
            for i in 0..n {
                let r = plane(i, ch);
                let (a, b) = plane_grad_sums(&x[r.clone()], &dy[r], mean, relu_at(ch));
                sg += a;
                sgx += b * st.inv_std[ch] as f64;
            }
            (sg, sgx)
        })
        .collect();
    let m = st.count.max(1) as f64;
    let mut dx = vec![0.0f32; x.len()];
    dx.par_chunks_mut(c * hw).enumerate().for_each(|(i, out)| {
        for ch in 0..c {
            let inv = st.inv_std[ch];
            let k = PlaneGrad {
                mean: st.mean[ch] as f32,
                inv,
                k0: gamma[ch] * inv,
                mg: (sums[ch].0 / m) as f32,
                mgx: (sums[ch].1 / m) as f32,
            };
            let r = plane(i, ch);
            let dst = &mut out[ch * hw..(ch + 1) * hw];
            plane_grad(dst, &x[r.clone()], &dy[r], k, relu_at(ch));
        }
    });
    (
        dx,
        sums.iter().map(|s| s.1 as f32).collect(),
        sums.iter().map(|s| s.0 as f32).collect(),
    )
}

/// Which ReLU follows a BatchNorm, for its backward: the output gradient is kept where the
/// ReLU's output is positive.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Relu<'a> {
    /// No ReLU.
    None,
    /// relu(γ·x̂ + β), as [`BnTrain`] with `relu`: the mask is recomputed from x with the
    /// forward's scale and shift ([`scale_shift`], the same f32 operations, so the same bits),
    /// which spares reading the output.
    Fused {
        /// β.
        beta: &'a [f32],
    },
}

/// The per-channel `(s, t)` of the training forward, `y = x·s + t`: s = γ/√(σ² + ε),
/// t = β − μ·s.
fn scale_shift(gamma: &[f32], beta: &[f32], st: &BatchStats) -> (Vec<f32>, Vec<f32>) {
    let scale: Vec<f32> = gamma.iter().zip(&st.inv_std).map(|(g, i)| g * i).collect();
    let shift = beta
        .iter()
        .zip(&st.mean)
        .zip(&scale)
        .map(|((b, &m), s)| b - m as f32 * s)
        .collect();
    (scale, shift)
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
            CpuStorage::F32(affine(x, (n, c, hw), scale, shift, self.relu, None)),
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
        y.par_chunks_mut(1 << 14)
            .zip(a.par_chunks(1 << 14).zip(b.par_chunks(1 << 14)))
            .for_each(|(out, (a, b))| add_relu_plane(out, a, b));
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
        if dy.len() != y.len() {
            candle_core::bail!("relu mask of {:?} by {:?}", l1.dims(), l2.dims());
        }
        let g = relu_backward(dy, y);
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
