//! Token pieces shared by the transformer backbones on dfdx (MiT for SegFormer, Swin for
//! UPerNet), as `sar-models`' candle `seg::transformer`.
//!
//! Tokens are rows: an h × w grid of C-channel tokens of N images is `[N·h·w, C]`, the same
//! NHWC rows the conv layers use (`[N, L, C]` flattened, L = h·w), so no reshape lies between
//! a patch-embedding conv and the transformer blocks.
//!
//! - [`layer_norm`]: y = (x − μ)/√(σ² + ε)·γ + β per row, σ² the biased variance over C
//!   (PyTorch's `LayerNorm` over the last dimension), `{prefix}.weight`/`.bias` `[C]`.
//! - [`gelu`]: exact GELU x·Φ(x) = x·½(1 + erf(x/√2)) with its exact derivative
//!   Φ(x) + x·φ(x), φ(x) = e^{−x²/2}/√(2π): dfdx's `accurate_gelu` for the value, plus a term
//!   that is exactly 0 but corrects its gradient (dfdx 0.13's `accurate_gelu` backward, on the
//!   CPU and in its CUDA kernel, computes Φ(x) + x·e^{−x²/2}/√π, √2 times too much in its
//!   second term).
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

/// Exact GELU with its exact gradient (see the module docs):
/// `accurate_gelu(x) + (g(x) − g̃)`, with g(x) = −κ·e^{−x²/2}, κ = (1/√2 − 1)/√π, and g̃ a
/// copy of g(x)'s values off the tape (another tensor, so no gradient reaches g(x) through
/// it). The difference is exactly 0 in the forward; its gradient g′(x) = κ·x·e^{−x²/2} turns
/// `accurate_gelu`'s x·e^{−x²/2}/√π into x·e^{−x²/2}/√(2π) = x·φ(x).
pub fn gelu<E: Float, D: SarDevice<E>, T: Tape<E, D>>(x: Rows<D, T, E>) -> Rows<D, T, E> {
    let kappa = (std::f64::consts::FRAC_1_SQRT_2 - 1.0) / std::f64::consts::PI.sqrt();
    let to_e = |v: f64| <E as num_traits::NumCast>::from(v).unwrap_or_else(E::nan);
    let g = (x.retaped::<T>().square() * to_e(-0.5)).exp() * to_e(-kappa);
    // A new tensor (new id) with g's values and no tape: the subtraction's backward writes
    // its (discarded) gradient there, not into g's.
    let fixed = g.retaped::<NoneTape>() * E::one();
    x.accurate_gelu() + (g - fixed)
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

#[cfg(test)]
mod tests {
    use super::*;

    /// [`gelu`]'s value and gradient against x·Φ(x) and Φ(x) + x·φ(x) in f64 (Φ from the
    /// value: Φ(x) = gelu(x)/x away from 0).
    #[test]
    fn gelu_has_the_exact_gradient() {
        let dev = Cpu::default();
        let xs: Vec<f64> = (0..41).map(|i| -4.0 + 0.2 * i as f64 + 0.013).collect();
        let x: Rows<Cpu, NoneTape, f64> = dev.tensor_from_vec(xs.clone(), (xs.len(), 1));
        let y = gelu(x.leaky_trace());
        let vals = y.as_vec();
        let g = y.sum::<Rank0, _>().backward().get(&x).as_vec();
        let plain = x.clone().accurate_gelu().as_vec();
        for (i, &v) in xs.iter().enumerate() {
            assert_eq!(vals[i], plain[i], "value at {v}");
            let phi_cdf = vals[i] / v;
            let pdf = (-0.5 * v * v).exp() / (2.0 * std::f64::consts::PI).sqrt();
            let want = phi_cdf + v * pdf;
            assert!(
                (g[i] - want).abs() < 1e-14,
                "gradient at {v}: {} vs {want}",
                g[i]
            );
        }
    }
}
