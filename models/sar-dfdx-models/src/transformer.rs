//! Token pieces shared by the transformer backbones on dfdx (MiT for SegFormer, Swin for
//! UPerNet), as `sar-models`' candle `seg::transformer`.
//!
//! Tokens are rows: an h × w grid of C-channel tokens of N images is `[N·h·w, C]`, the same
//! NHWC rows the conv layers use (`[N, L, C]` flattened, L = h·w), so no reshape lies between
//! a patch-embedding conv and the transformer blocks.
//!
//! - [`layer_norm`]: y = (x − μ)/√(σ² + ε)·γ + β per row, σ² the biased variance over C
//!   (PyTorch's `LayerNorm` over the last dimension), `{prefix}.weight`/`.bias` `[C]`.
//! - [`gelu`]: exact GELU x·½(1 + erf(x/√2)) (dfdx's `accurate_gelu`, whose backward is the
//!   exact derivative).
//! - [`drop_path`]: per-sample stochastic depth of a residual branch.
//! - [`conv_bias`]: a dense conv with bias (patch embeddings, MiT's spatial reduction).

use crate::Forward;
use sar_dfdx::dfdx::prelude::*;
use sar_dfdx::nn::{Params, Rows};
use sar_dfdx::{ConvOut, Float, Result, SarDevice, SarDfdxError};
use sar_math::rng::SeededRng;

/// LayerNorm of rows `[R, C]` over C with `{prefix}.weight` and `{prefix}.bias` `[C]` and ε
/// `eps` (see the module docs).
pub fn layer_norm<E: Float, D: SarDevice<E>, T: Tape<E, D>>(
    params: &Params<D, E>,
    x: Rows<D, T, E>,
    prefix: &str,
    eps: f64,
) -> Result<Rows<D, T, E>> {
    let (r, c) = *x.shape();
    let gamma = params.taped::<T>(&format!("{prefix}.weight"))?;
    let beta = params.taped::<T>(&format!("{prefix}.bias"))?;
    if gamma.shape().0 != c || beta.shape().0 != c {
        return Err(SarDfdxError::Shape(format!(
            "{prefix} normalises {} channels, the input has {c}",
            gamma.shape().0
        )));
    }
    let normed = x.normalize::<Axis<1>>(eps);
    Ok(normed * gamma.broadcast_like::<_, Axis<0>>(&(r, c))
        + beta.broadcast_like::<_, Axis<0>>(&(r, c)))
}

/// Exact GELU (see the module docs).
pub fn gelu<E: Float, D: SarDevice<E>, T: Tape<E, D>>(x: Rows<D, T, E>) -> Rows<D, T, E> {
    x.accurate_gelu()
}

/// Per-sample stochastic depth of a residual branch given as rows `[N·L, C]` of `n` samples:
/// with `noise` and p > 0, sample i's rows are kept (scaled by 1/(1 − p)) when
/// `rng.next_f64() < 1 − p`, one draw per sample in order, else zeroed, as the candle
/// networks draw them; the identity without `noise` (evaluation) or at p = 0.
pub fn drop_path<E: Float, D: SarDevice<E>, T: Tape<E, D>>(
    x: Rows<D, T, E>,
    n: usize,
    p: f64,
    noise: Option<&mut SeededRng>,
) -> Result<Rows<D, T, E>> {
    let Some(rng) = noise else {
        return Ok(x);
    };
    if p <= 0.0 {
        return Ok(x);
    }
    let (rows, c) = *x.shape();
    if n == 0 || rows % n != 0 {
        return Err(SarDfdxError::Shape(format!(
            "drop path: {rows} rows for {n} samples"
        )));
    }
    let keep = 1.0 - p;
    // The scale is computed in f32 as the candle networks' f32 mask is, then widened.
    let scale = E::from((1.0 / keep) as f32).unwrap_or_else(E::one);
    let mask: Vec<E> = (0..n)
        .map(|_| {
            if rng.next_f64() < keep {
                scale
            } else {
                E::zero()
            }
        })
        .collect();
    let per = rows / n;
    let full: Vec<E> = (0..rows).map(|r| mask[r / per]).collect();
    let dev = x.device().clone();
    let m: Tensor<(usize,), E, D> = dev.tensor_from_vec(full, (rows,));
    Ok(x * m.broadcast_like::<_, Axis<1>>(&(rows, c)))
}

/// A dense conv `{prefix}.weight [Cout, Cin, K, K]` with bias `{prefix}.bias [Cout]` over NHWC
/// rows of `(n, h, w)` pixels, with `stride` and `pad`: the rows and the output (h, w).
pub fn conv_bias<E: Float, D: SarDevice<E>, T: Tape<E, D>>(
    f: &mut Forward<D, E>,
    x: Rows<D, T, E>,
    prefix: &str,
    size: (usize, usize, usize),
    stride: usize,
    pad: usize,
) -> Result<ConvOut<E, D, T>> {
    let (y, hw) = f.conv(x, prefix, size, stride, pad)?;
    let (r, c) = *y.shape();
    let bias = f.params.taped::<T>(&format!("{prefix}.bias"))?;
    if bias.shape().0 != c {
        return Err(SarDfdxError::Shape(format!(
            "{prefix}.bias has {} entries for {c} output channels",
            bias.shape().0
        )));
    }
    Ok((y + bias.broadcast_like::<_, Axis<0>>(&(r, c)), hw))
}
