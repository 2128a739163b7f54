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
//! On dfdx's `Cpu` this is one op ([`BatchNormKernel for Cpu`](BatchNormKernel)): two passes for
//! the statistics and one for the output, each parallel over fixed blocks of rows, with the
//! per-channel sums accumulated in f64 per block and the blocks added in order (the result does
//! not depend on the thread count). Composed from dfdx's ops (what other devices run,
//! [`batch_norm_train_generic`]) the same layer takes about a dozen passes over `[R, C]`, each
//! allocating, most on one thread.

use crate::{shape_err, Flat, Float, Matrix, Result};
use dfdx::prelude::*;
use dfdx::tensor_ops::Device;
use num_traits::Zero;

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

macro_rules! cpu_batch_norm {
    ($e:ty) => {
        impl BatchNormKernel<$e> for Cpu {
            fn batch_norm_train<T: Tape<$e, Self>>(
                x: Matrix<$e, Self, T>,
                gamma: Flat<$e, Self, T>,
                beta: Flat<$e, Self, T>,
                eps: f64,
                relu: bool,
            ) -> Result<(Matrix<$e, Self, T>, Vec<$e>, Vec<$e>)> {
                use rayon::prelude::*;
                type E = $e;
                let (r, c) = *x.shape();
                check(r, c, gamma.shape().0, beta.shape().0)?;
                let (x, tape) = x.split_tape();
                let (gamma, tape_g) = gamma.split_tape();
                let (beta, tape_b) = beta.split_tape();
                let mut tape = tape.merge(tape_g).merge(tape_b);
                let xs = std::sync::Arc::new(x.as_vec());
                let (g_host, b_host) = (gamma.as_vec(), beta.as_vec());
                let rows_per_block = r.div_ceil(CPU_BLOCKS).max(1);
                let sums = channel_sums(&xs, c, c, rows_per_block, |_, row, acc| {
                    for (a, &v) in acc.iter_mut().zip(row) {
                        *a += v as f64;
                    }
                });
                let mean: Vec<f64> = sums.iter().map(|s| s / r as f64).collect();
                let sq = channel_sums(&xs, c, c, rows_per_block, |_, row, acc| {
                    for ((a, &v), m) in acc.iter_mut().zip(row).zip(&mean) {
                        let d = v as f64 - m;
                        *a += d * d;
                    }
                });
                let var: Vec<f64> = sq.iter().map(|s| s / r as f64).collect();
                let inv: std::sync::Arc<Vec<E>> =
                    std::sync::Arc::new(var.iter().map(|v| (1.0 / (v + eps).sqrt()) as E).collect());
                let mean_e: std::sync::Arc<Vec<E>> =
                    std::sync::Arc::new(mean.iter().map(|&m| m as E).collect());
                let mut y = vec![E::zero(); r * c];
                y.par_chunks_mut(rows_per_block * c)
                    .zip(xs.par_chunks(rows_per_block * c))
                    .for_each(|(y_block, x_block)| {
                        for (y_row, x_row) in y_block.chunks_mut(c).zip(x_block.chunks(c)) {
                            for ch in 0..c {
                                let z = (x_row[ch] - mean_e[ch]) * inv[ch] * g_host[ch] + b_host[ch];
                                // `z < 0`, not `!(z > 0)`: a NaN must reach the loss, which the trainer checks.
                                y_row[ch] = if relu && z < 0.0 { 0.0 } else { z };
                            }
                        }
                    });
                let out = x.device().tensor_from_vec(y, (r, c));
                let (out_id, x_id, g_id, b_id) =
                    (out.clone(), x.clone(), gamma.clone(), beta.clone());
                let (g_host, b_host) = (std::sync::Arc::new(g_host), std::sync::Arc::new(b_host));
                let (mean_b, inv_b) = (mean_e.clone(), inv.clone());
                tape.add_backward_op(move |grads| {
                    // The output's gradient is complete here and read only here: take it.
                    let dz: Vec<E> = std::mem::take(&mut **grads.get_or_alloc_mut(&out_id)?);
                    let x_hat = |row: &[E], ch: usize| (row[ch] - mean_b[ch]) * inv_b[ch];
                    // dz = dy, or dy·[z > 0] with ReLU (z recomputed, as in the forward pass).
                    let masked = |x_row: &[E], ch: usize, d: E| {
                        // ReLU's derivative is 1 where z > 0, else 0 (NaN included).
                        let z = x_hat(x_row, ch) * g_host[ch] + b_host[ch];
                        if !relu || z > 0.0 {
                            d
                        } else {
                            0.0
                        }
                    };
                    // ∂β and ∂γ in one pass: acc = [Σ dz | Σ dz·x̂].
                    let sums = channel_sums(&dz, c, 2 * c, rows_per_block, |i, row, acc| {
                        let x_row = &xs[i * c..(i + 1) * c];
                        for ch in 0..c {
                            let d = masked(x_row, ch, row[ch]);
                            acc[ch] += d as f64;
                            acc[c + ch] += d as f64 * x_hat(x_row, ch) as f64;
                        }
                    });
                    let (d_beta, d_gamma) = sums.split_at(c);
                    let rf = r as E;
                    let scale: Vec<E> = (0..c).map(|ch| g_host[ch] * inv_b[ch] / rf).collect();
                    let (db, dg): (Vec<E>, Vec<E>) = (
                        d_beta.iter().map(|&v| v as E).collect(),
                        d_gamma.iter().map(|&v| v as E).collect(),
                    );
                    let g_x = grads.get_or_alloc_mut(&x_id)?;
                    g_x.par_chunks_mut(rows_per_block * c)
                        .zip(dz.par_chunks(rows_per_block * c))
                        .zip(xs.par_chunks(rows_per_block * c))
                        .for_each(|((gx_block, d_block), x_block)| {
                            for ((gx_row, d_row), x_row) in gx_block
                                .chunks_mut(c)
                                .zip(d_block.chunks(c))
                                .zip(x_block.chunks(c))
                            {
                                for ch in 0..c {
                                    gx_row[ch] += scale[ch]
                                        * (rf * masked(x_row, ch, d_row[ch]) - db[ch] - x_hat(x_row, ch) * dg[ch]);
                                }
                            }
                        });
                    for (d, v) in grads.get_or_alloc_mut(&g_id)?.iter_mut().zip(&dg) {
                        *d += *v;
                    }
                    for (d, v) in grads.get_or_alloc_mut(&b_id)?.iter_mut().zip(&db) {
                        *d += *v;
                    }
                    Ok(())
                });
                let mean_out = mean_e.to_vec();
                let var_out = var.iter().map(|&v| v as E).collect();
                Ok((out.put_tape(tape), mean_out, var_out))
            }
        }
    };
}
cpu_batch_norm!(f32);
cpu_batch_norm!(f64);

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
