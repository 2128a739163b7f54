//! candle custom CPU ops for the networks' layers (f32, NCHW), each with its own backward.
//!
//! candle 0.11's CPU convolution backward is a direct `conv_transpose2d` loop, its BatchNorm
//! (in candle-nn) a dozen tensor ops, and its max-pool has no backward for overlapping
//! windows; these ops made a ResNet-32 training step about 1.2 s instead of 9.1 s on 2 cores.
//! Each public function takes the op on the CPU for f32 and falls back to candle's own ops on
//! other devices and dtypes, so callers need not branch.
//!
//! | module | equation | shapes |
//! |---|---|---|
//! | [`conv`] | y_n = W · im2col(x_n); dx_n = col2im(Wᵀ · dy_n); dW = Σ_n dy_n · im2col(x_n)ᵀ | x `[N, C, H, W]`, W `[O, C, k, k]` → y `[N, O, OH, OW]` (stride, padding, dilation; no groups, no bias) |
//! | [`batch_norm`] | y = γ·(x − μ_c)/√(σ²_c + ε) + β (+ ReLU), batch or running statistics; relu(a + b) | x `[N, C, …]`, γ, β `[C]` → y like x |
//! | [`bias`] | y = x + b_c along one axis; db_c = Σ dy | x `[outer, C, inner]`, b `[C]` → y like x |
//! | [`layer_norm`] | y = γ·(x − μ)/√(σ² + ε) + β over the last axis | x `[…, C]`, γ, β `[C]` → y like x |
//! | [`gelu`] | y = x·Φ(x) (exact, through erf); dy/dx = Φ(x) + x·φ(x) | any shape |
//! | [`cross_entropy`] | `L = Σ_p w_p·(−log softmax(z_p)[y_p]) / M`; dz = w·(softmax − onehot)/M | z `[N, K, H, W]`, y (u32), w `[N, 1, H, W]` → scalar |
//! | [`depthwise`] | y_c = b_c + w_c ⋆ x_c, k×k, stride 1, padding k/2 | x `[N, C, H, W]`, w `[C, 1, k, k]`, b `[C]` → y like x |
//! | [`pool`] | y = max over the k×k window (padding −∞), gradient to the window's first maximum | x `[N, C, H, W]` → y `[N, C, OH, OW]` |
//! | [`residual`] | out = relu(BN_L(W_L ⊛ … relu(BN_1(W_1 ⊛ x)) …) + S(x)), training only, S the identity or option A | x `[N, C, H, W]`, W_i, γ_i, β_i → out like S(x) |
//!
//! Layout: contiguous row-major NCHW; the ops make their inputs contiguous. Sums over images
//! and channels run in fixed orders, so results do not depend on the thread count (rayon).

pub mod batch_norm;
pub mod bias;
pub mod conv;
pub mod cross_entropy;
pub mod depthwise;
pub mod gelu;
pub mod layer_norm;
pub mod pool;
pub mod residual;

/// Whether the custom CPU ops apply: every tensor on the CPU and f32 (else callers take the
/// composite path).
pub(crate) fn all_cpu_f32(ts: &[&candle_core::Tensor]) -> bool {
    ts.iter()
        .all(|t| t.device().is_cpu() && t.dtype() == candle_core::DType::F32)
}

/// Σ v in eight f32 lanes (so that it vectorises), returned in f64.
pub(crate) fn sum_f32(v: &[f32]) -> f64 {
    dot_f32(v, None)
}

/// Σ a·b (or Σ a without `b`) in eight f32 lanes, returned in f64.
pub(crate) fn dot_f32(a: &[f32], b: Option<&[f32]>) -> f64 {
    let mut lanes = [0.0f32; 8];
    let mut tail = 0.0f64;
    match b {
        None => {
            let chunks = a.chunks_exact(8);
            for r in chunks.remainder() {
                tail += f64::from(*r);
            }
            for ch in chunks {
                for (l, v) in lanes.iter_mut().zip(ch) {
                    *l += v;
                }
            }
        }
        Some(b) => {
            let n = a.len().min(b.len());
            let (a, b) = (&a[..n], &b[..n]);
            let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
            for (x, y) in ca.remainder().iter().zip(cb.remainder()) {
                tail += f64::from(*x) * f64::from(*y);
            }
            for (x, y) in ca.zip(cb) {
                for ((l, u), v) in lanes.iter_mut().zip(x).zip(y) {
                    *l += u * v;
                }
            }
        }
    }
    lanes.iter().map(|&l| f64::from(l)).sum::<f64>() + tail
}

/// The f32 values of a contiguous CPU storage, for these custom ops; errors name the op and
/// the operand.
pub(crate) fn cpu_f32<'a>(
    op: &str,
    s: &'a candle_core::CpuStorage,
    l: &candle_core::Layout,
    what: &str,
) -> candle_core::Result<&'a [f32]> {
    let candle_core::CpuStorage::F32(v) = s else {
        candle_core::bail!("{op} cpu op: {what} must be f32");
    };
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&v[a..b]),
        None => candle_core::bail!("{op} cpu op: {what} must be contiguous"),
    }
}

#[cfg(test)]
pub(crate) mod test_util {
    use candle_core::{Device, Tensor};

    /// A tensor's values as f64, flattened.
    pub fn flat(t: &Tensor) -> Vec<f64> {
        t.flatten_all()
            .unwrap()
            .to_dtype(candle_core::DType::F64)
            .unwrap()
            .to_vec1()
            .unwrap()
    }

    /// Deterministic N(0, 1) test data (each call draws the next seed).
    pub fn randn<S: Into<candle_core::Shape>>(shape: S) -> Tensor {
        use std::sync::atomic::{AtomicU64, Ordering};
        static SEED: AtomicU64 = AtomicU64::new(1);
        let shape = shape.into();
        let mut rng = sar_math::rng::SeededRng::new(SEED.fetch_add(1, Ordering::Relaxed));
        let v: Vec<f32> = (0..shape.elem_count())
            .map(|_| rng.next_normal() as f32)
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }
}
