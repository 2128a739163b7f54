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
//! | [`pool`] | y = max over the k×k window (padding −∞), gradient to the window's first maximum | x `[N, C, H, W]` → y `[N, C, OH, OW]` |
//!
//! Layout: contiguous row-major NCHW; the ops make their inputs contiguous. Sums over images
//! and channels run in fixed orders, so results do not depend on the thread count (rayon).

pub mod batch_norm;
pub mod conv;
pub mod pool;

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
