//! BatchNorm in training mode over rows, as one op with its own backward.
//!
//! Input `X [R, C]` (NHWC rows: R = N·H·W pixels, C channels), scale `γ [C]`, shift `β [C]`:
//!
//! - μ_c = (1/R)·Σ_r x_rc, σ²_c = (1/R)·Σ_r (x_rc − μ_c)² (the biased variance), ι_c = 1/√(σ²_c + ε)
//! - x̂_rc = (x_rc − μ_c)·ι_c, z_rc = γ_c·x̂_rc + β_c, y = z or (with ReLU) y = max(z, 0)
//!
//! Backward, with `dz = dy` (or `dy·[z > 0]` with ReLU):
//!
//! - ∂β_c = Σ_r dz_rc, ∂γ_c = Σ_r dz_rc·x̂_rc
//! - ∂x_rc = (γ_c·ι_c / R)·(R·dz_rc − ∂β_c − x̂_rc·∂γ_c)
//!
//! [`BatchNormKernel::batch_norm_train`] also returns μ and σ² (host) for the running
//! statistics, which the caller updates outside the graph ([`crate::nn`]).
//!
//! On dfdx's `Cpu` this is one op ([`BatchNormKernel`]'s CPU implementation): two passes for
//! the statistics and one for the output, each parallel over fixed blocks of rows, with the
//! per-channel sums accumulated in f64 per block and the blocks added in order (the result does
//! not depend on the thread count). Composed from dfdx's ops (what other devices run,
//! [`batch_norm_train_generic`]) the same layer takes about a dozen passes over `[R, C]`, each
//! allocating, most on one thread.

use crate::{shape_err, Flat, Float, Matrix, Result};
use dfdx::prelude::*;
use dfdx::tensor_ops::Device;

/// Training-mode BatchNorm with its backward on the tape (see the module docs).
pub trait BatchNormKernel<E: Float>: Device<E> + Default {
    /// `y` `[R, C]` and the batch's mean and biased variance `[C]` (host).
    #[allow(clippy::type_complexity)]
    fn batch_norm_train<T: Tape<E, Self>>(
        x: Matrix<E, Self, T>,
        gamma: Flat<E, Self, T>,
        beta: Flat<E, Self, T>,
        eps: f64,
        relu: bool,
    ) -> Result<(Matrix<E, Self, T>, Vec<E>, Vec<E>)>;
}

/// The same layer from dfdx's ops (mean, variance, `normalize`, broadcasts, ReLU), on any
/// device: what CUDA runs, and the reference the CPU op is tested against.
#[allow(clippy::type_complexity)]
pub fn batch_norm_train_generic<E: Float, D: Device<E> + Default, T: Tape<E, D>>(
    x: Matrix<E, D, T>,
    gamma: Flat<E, D, T>,
    beta: Flat<E, D, T>,
    eps: f64,
    relu: bool,
) -> Result<(Matrix<E, D, T>, Vec<E>, Vec<E>)> {
    let (r, c) = *x.shape();
    check(r, c, gamma.shape().0, beta.shape().0)?;
    // The batch statistics for the running averages, outside the graph.
    let plain = x.retaped::<NoneTape>();
    let mean = plain.clone().mean::<(usize,), Axis<0>>();
    let var = (plain - mean.clone().broadcast_like::<_, Axis<0>>(&(r, c)))
        .square()
        .mean::<(usize,), Axis<0>>();
    let y = x.normalize::<Axis<0>>(eps) * gamma.broadcast_like::<_, Axis<0>>(&(r, c))
        + beta.broadcast_like::<_, Axis<0>>(&(r, c));
    let y = if relu { y.relu() } else { y };
    Ok((y, mean.as_vec(), var.as_vec()))
}

fn check(r: usize, c: usize, gamma: usize, beta: usize) -> Result<()> {
    if gamma != c || beta != c {
        return shape_err(format!(
            "batch norm: input [{r}, {c}] with {gamma} scales and {beta} shifts"
        ));
    }
    if r == 0 || c == 0 {
        return shape_err(format!(
            "batch norm: input [{r}, {c}] is empty (no rows to take statistics over, or no channels)"
        ));
    }
    Ok(())
}

/// Rows per block of the CPU op: R split into this many blocks (fewer when R is small).
const CPU_BLOCKS: usize = 32;

/// Sums accumulated by `f(row index, row, acc)` (`acc` of `width` f64s) over row blocks of
/// `values` (`[R, C]`), the blocks' sums added in block order.
fn channel_sums<E: Float + Send + Sync>(
    values: &[E],
    c: usize,
    width: usize,
    rows_per_block: usize,
    f: impl Fn(usize, &[E], &mut [f64]) + Sync,
) -> Vec<f64> {
    use rayon::prelude::*;
    let partials: Vec<Vec<f64>> = values
        .par_chunks(rows_per_block * c)
        .enumerate()
        .map(|(block, chunk)| {
            let mut acc = vec![0.0f64; width];
            for (i, row) in chunk.chunks(c).enumerate() {
                f(block * rows_per_block + i, row, &mut acc);
            }
            acc
        })
        .collect();
    let mut total = vec![0.0f64; width];
    for p in partials {
        for (t, v) in total.iter_mut().zip(p) {
            *t += v;
        }
    }
    total
}

/// What the CPU op keeps for its backward: the input and the per-channel constants.
struct CpuBatchNorm<E> {
    x: Vec<E>,
    mean: Vec<E>,
    inv_std: Vec<E>,
    gamma: Vec<E>,
    beta: Vec<E>,
    relu: bool,
    channels: usize,
    rows_per_block: usize,
}

impl<E: Float> CpuBatchNorm<E> {
    /// x̂ and z = γ·x̂ + β of channel `ch` in `row`.
    fn normed(&self, row: &[E], ch: usize) -> (E, E) {
        let x_hat = (row[ch] - self.mean[ch]) * self.inv_std[ch];
        (x_hat, x_hat * self.gamma[ch] + self.beta[ch])
    }

    /// y = z, or max(z, 0) with ReLU. `z < 0` rather than `!(z > 0)`: a NaN must reach the
    /// loss, which the trainer checks.
    fn forward(&self) -> Vec<E> {
        use rayon::prelude::*;
        let (c, block) = (self.channels, self.rows_per_block * self.channels);
        let mut y = vec![E::zero(); self.x.len()];
        y.par_chunks_mut(block)
            .zip(self.x.par_chunks(block))
            .for_each(|(y_block, x_block)| {
                for (y_row, x_row) in y_block.chunks_mut(c).zip(x_block.chunks(c)) {
                    for (ch, y) in y_row.iter_mut().enumerate() {
                        let (_, z) = self.normed(x_row, ch);
                        *y = if self.relu && z < E::zero() {
                            E::zero()
                        } else {
                            z
                        };
                    }
                }
            });
        y
    }

    /// dz = dy, or dy·[z > 0] with ReLU (its derivative is 0 at a NaN too).
    fn dz(&self, z: E, dy: E) -> E {
        if !self.relu || z > E::zero() {
            dy
        } else {
            E::zero()
        }
    }

    /// Adds ∂x into `g_x`; returns (∂γ, ∂β).
    fn backward(&self, dy: &[E], g_x: &mut [E]) -> (Vec<E>, Vec<E>) {
        use rayon::prelude::*;
        let (c, block) = (self.channels, self.rows_per_block * self.channels);
        // ∂β and ∂γ in one pass: acc = [Σ dz | Σ dz·x̂].
        let sums = channel_sums(dy, c, 2 * c, self.rows_per_block, |i, dy_row, acc| {
            let x_row = &self.x[i * c..(i + 1) * c];
            for ch in 0..c {
                let (x_hat, z) = self.normed(x_row, ch);
                let d = to_f64(self.dz(z, dy_row[ch]));
                acc[ch] += d;
                acc[c + ch] += d * to_f64(x_hat);
            }
        });
        let d_beta: Vec<E> = sums[..c].iter().map(|&v| from_f64(v)).collect();
        let d_gamma: Vec<E> = sums[c..].iter().map(|&v| from_f64(v)).collect();
        let rows: E = from_f64((self.x.len() / c) as f64);
        let scale: Vec<E> = (0..c)
            .map(|ch| self.gamma[ch] * self.inv_std[ch] / rows)
            .collect();
        g_x.par_chunks_mut(block)
            .zip(dy.par_chunks(block))
            .zip(self.x.par_chunks(block))
            .for_each(|((gx_block, dy_block), x_block)| {
                for ((gx_row, dy_row), x_row) in gx_block
                    .chunks_mut(c)
                    .zip(dy_block.chunks(c))
                    .zip(x_block.chunks(c))
                {
                    for ch in 0..c {
                        let (x_hat, z) = self.normed(x_row, ch);
                        let dz = self.dz(z, dy_row[ch]);
                        gx_row[ch] += scale[ch] * (rows * dz - d_beta[ch] - x_hat * d_gamma[ch]);
                    }
                }
            });
        (d_gamma, d_beta)
    }
}

fn to_f64<E: Float>(v: E) -> f64 {
    v.to_f64().unwrap_or(f64::NAN)
}

fn from_f64<E: Float>(v: f64) -> E {
    E::from(v).unwrap_or_else(E::nan)
}

/// On the CPU: two statistics passes and one output pass, each parallel over fixed blocks of
/// rows; the backward makes one pass for ∂β and ∂γ and one for ∂x (see the module docs).
impl<E: Float> BatchNormKernel<E> for Cpu
where
    Cpu: Device<E>,
    <Cpu as Storage<E>>::Vec: std::ops::DerefMut<Target = Vec<E>>,
{
    fn batch_norm_train<T: Tape<E, Self>>(
        x: Matrix<E, Self, T>,
        gamma: Flat<E, Self, T>,
        beta: Flat<E, Self, T>,
        eps: f64,
        relu: bool,
    ) -> Result<(Matrix<E, Self, T>, Vec<E>, Vec<E>)> {
        let (r, c) = *x.shape();
        check(r, c, gamma.shape().0, beta.shape().0)?;
        let (x, tape) = x.split_tape();
        let (gamma, tape_g) = gamma.split_tape();
        let (beta, tape_b) = beta.split_tape();
        let mut tape = tape.merge(tape_g).merge(tape_b);
        let values = x.as_vec();
        let rows_per_block = r.div_ceil(CPU_BLOCKS).max(1);
        let sums = channel_sums(&values, c, c, rows_per_block, |_, row, acc| {
            for (a, &v) in acc.iter_mut().zip(row) {
                *a += to_f64(v);
            }
        });
        let mean: Vec<f64> = sums.iter().map(|s| s / r as f64).collect();
        let squares = channel_sums(&values, c, c, rows_per_block, |_, row, acc| {
            for ((a, &v), m) in acc.iter_mut().zip(row).zip(&mean) {
                let d = to_f64(v) - m;
                *a += d * d;
            }
        });
        let var: Vec<E> = squares.iter().map(|s| from_f64(s / r as f64)).collect();
        let op = CpuBatchNorm {
            x: values,
            mean: mean.iter().map(|&m| from_f64(m)).collect(),
            inv_std: squares
                .iter()
                .map(|s| from_f64(1.0 / (s / r as f64 + eps).sqrt()))
                .collect(),
            gamma: gamma.as_vec(),
            beta: beta.as_vec(),
            relu,
            channels: c,
            rows_per_block,
        };
        let out = x.device().tensor_from_vec(op.forward(), (r, c));
        let batch_mean = op.mean.clone();
        let (out_id, x_id, g_id, b_id) = (out.clone(), x.clone(), gamma.clone(), beta.clone());
        tape.add_backward_op(move |grads| {
            // The output's gradient is complete here and read only here: take it.
            let dy: Vec<E> = std::mem::take(&mut **grads.get_or_alloc_mut(&out_id)?);
            let (d_gamma, d_beta) = op.backward(&dy, grads.get_or_alloc_mut(&x_id)?);
            for (d, v) in grads.get_or_alloc_mut(&g_id)?.iter_mut().zip(d_gamma) {
                *d += v;
            }
            for (d, v) in grads.get_or_alloc_mut(&b_id)?.iter_mut().zip(d_beta) {
                *d += v;
            }
            Ok(())
        });
        Ok((out.put_tape(tape), batch_mean, var))
    }
}

#[cfg(feature = "cuda")]
impl<E: Float> BatchNormKernel<E> for dfdx::tensor::Cuda
where
    dfdx::tensor::Cuda: Device<E>,
{
    fn batch_norm_train<T: Tape<E, Self>>(
        x: Matrix<E, Self, T>,
        gamma: Flat<E, Self, T>,
        beta: Flat<E, Self, T>,
        eps: f64,
        relu: bool,
    ) -> Result<(Matrix<E, Self, T>, Vec<E>, Vec<E>)> {
        batch_norm_train_generic(x, gamma, beta, eps, relu)
    }
}
