//! Token-sequence pieces shared by the transformer backbones ([MiT](super::mit),
//! [Swin](super::swin)): LayerNorm, linear layers on `[N, L, C]` tokens, the token/map
//! reshapes, exact GELU and per-sample stochastic depth.

use crate::params::{Init, Scope};
use crate::Result;
use candle_core::Tensor;
use sar_math::rng::SeededRng;

/// LayerNorm over the last dimension with its ε: `sar_candle`'s fused op on the CPU for f32,
/// the same formula as candle ops elsewhere (candle-nn's fused `layer_norm` has no backward).
pub(crate) struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    /// `weight` 1 and `bias` 0 (`[channels]`) in scope `p`.
    pub(crate) fn new(p: &Scope, channels: usize, eps: f64) -> Result<Self> {
        Ok(LayerNorm {
            weight: p.get_or_insert("weight", &[channels], Init::Const(1.0))?,
            bias: p.get_or_insert("bias", &[channels], Init::Const(0.0))?,
            eps,
        })
    }

    /// Normalises `x` `[…, C]` over C.
    pub(crate) fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        sar_candle::ops::layer_norm::layer_norm(x, &self.weight, &self.bias, self.eps)
    }

    pub(crate) fn params(&self) -> u64 {
        2 * self.weight.elem_count() as u64
    }
}

/// `x` `[N, L, in]` times `weight` `[out, in]` (or a 1×1 conv's `[out, in, 1, 1]`) plus `bias`.
pub(crate) fn linear(x: &Tensor, weight: &Tensor, bias: &Tensor) -> candle_core::Result<Tensor> {
    let (n, l, c) = x.dims3()?;
    let out = weight.dim(0)?;
    let w = weight.reshape((out, c))?;
    let y = x.reshape((n * l, c))?.matmul(&w.t()?)?;
    sar_candle::ops::bias::bias_add(&y, bias, 1)?.reshape((n, l, out))
}

/// Tokens `[N, h·w, C]` to a map `[N, C, h, w]`.
pub(crate) fn to_map(x: &Tensor, h: usize, w: usize) -> candle_core::Result<Tensor> {
    let (n, _, c) = x.dims3()?;
    x.transpose(1, 2)?.reshape((n, c, h, w))
}

/// A map `[N, C, h, w]` to tokens `[N, h·w, C]`.
pub(crate) fn to_tokens(x: &Tensor) -> candle_core::Result<Tensor> {
    let (n, c, h, w) = x.dims4()?;
    x.reshape((n, c, h * w))?.transpose(1, 2)?.contiguous()
}

/// Exact GELU, x·½(1 + erf(x/√2)), with its exact gradient (`sar_candle`'s op on the CPU for
/// f32, composite candle ops through `erf` elsewhere): candle's fused `gelu_erf` computes the
/// same forward, but its backward uses 0.398942 for 1/√(2π) (relative error 7e-7, visible
/// against PyTorch in f64).
pub(crate) fn gelu(x: &Tensor) -> candle_core::Result<Tensor> {
    sar_candle::ops::gelu::gelu_erf(x)
}

/// Per-sample stochastic depth of a residual branch `[N, …]` (identity outside training or at
/// p = 0).
pub(crate) fn drop_path(
    x: &Tensor,
    p: f64,
    noise: Option<&mut SeededRng>,
) -> candle_core::Result<Tensor> {
    let Some(rng) = noise else {
        return Ok(x.clone());
    };
    if p <= 0.0 {
        return Ok(x.clone());
    }
    let n = x.dim(0)?;
    let keep = 1.0 - p;
    let mask: Vec<f32> = (0..n)
        .map(|_| {
            if rng.next_f64() < keep {
                (1.0 / keep) as f32
            } else {
                0.0
            }
        })
        .collect();
    let mut shape = vec![1usize; x.rank()];
    shape[0] = n;
    let m = Tensor::from_vec(mask, shape, x.device())?.to_dtype(x.dtype())?;
    x.broadcast_mul(&m)
}
