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

/// Per-channel sums (`width` f64s) over row blocks of `values` (`[R, C]`): `kernel(block,
/// acc)` accumulates one block's rows in order, the blocks' sums are added in block order.
fn block_sums<E: Float + Send + Sync>(
    values: &[E],
    c: usize,
    width: usize,
    rows_per_block: usize,
    kernel: impl Fn(&[E], &mut [f64]) + Sync,
) -> Vec<f64> {
    use rayon::prelude::*;
    let partials: Vec<Vec<f64>> = values
        .par_chunks(rows_per_block * c)
        .map(|chunk| {
            let mut acc = vec![0.0f64; width];
            kernel(chunk, &mut acc);
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

/// The per-channel constants of a BatchNorm, each `[C]`.
#[derive(Clone, Copy)]
struct Channels<'a, E> {
    mean: &'a [E],
    inv_std: &'a [E],
    gamma: &'a [E],
    beta: &'a [E],
}

impl<'a, E: Float> Channels<'a, E> {
    /// Per channel of `x_row`: (x̂, z) with x̂ = (x − μ)·(1/σ) and z = x̂·γ + β, rounded in
    /// that order.
    #[inline(always)]
    fn normed(self, x_row: &'a [E]) -> impl Iterator<Item = (E, E)> + 'a {
        let channels = x_row.iter().zip(self.mean).zip(self.inv_std);
        channels
            .zip(self.gamma)
            .zip(self.beta)
            .map(|((((&x, &m), &s), &g), &b)| {
                let x_hat = (x - m) * s;
                (x_hat, x_hat * g + b)
            })
    }
}

/// dz = dy, or dy·[z > 0] with a fused ReLU (its derivative is 0 at a NaN too).
#[inline(always)]
fn relu_grad<E: Float>(relu: bool, z: E, dy: E) -> E {
    if !relu || z > E::zero() {
        dy
    } else {
        E::zero()
    }
}

// The row kernels below are compiled twice, for baseline x86-64 and for AVX2 + FMA, and the
// second runs where the CPU has it (`multiversion`): built for baseline x86-64 their loops
// stayed scalar SSE2 (docs/results/profile-dfdx-resnet32-2026-12-07.txt). Every element's
// arithmetic is the same in both (Rust never fuses a·b + c), so the results are bit-identical.

/// Σ x per channel over the rows of `rows` (`[r, C]`) into `acc`, rows in order.
#[multiversion::multiversion(targets("x86_64+avx+avx2+fma"))]
fn sum_rows<E: Float>(rows: &[E], acc: &mut [f64]) {
    for row in rows.chunks_exact(acc.len()) {
        for (a, &v) in acc.iter_mut().zip(row) {
            *a += to_f64(v);
        }
    }
}

/// Σ (x − μ)² per channel over the rows of `rows` into `acc`, rows in order.
#[multiversion::multiversion(targets("x86_64+avx+avx2+fma"))]
fn square_rows<E: Float>(rows: &[E], mean: &[f64], acc: &mut [f64]) {
    for row in rows.chunks_exact(acc.len()) {
        for ((a, &v), &m) in acc.iter_mut().zip(row).zip(mean) {
            let d = to_f64(v) - m;
            *a += d * d;
        }
    }
}

/// y = z (or max(z, 0) with `relu`), z = (x − μ)·(1/σ)·γ + β, for the rows of `x`.
#[multiversion::multiversion(targets("x86_64+avx+avx2+fma"))]
fn forward_rows<E: Float>(y: &mut [E], x: &[E], k: Channels<'_, E>, relu: bool) {
    let c = k.mean.len();
    for (y_row, x_row) in y.chunks_exact_mut(c).zip(x.chunks_exact(c)) {
        for (y, (_, z)) in y_row.iter_mut().zip(k.normed(x_row)) {
            *y = if relu && z < E::zero() { E::zero() } else { z };
        }
    }
}

/// [Σ dz | Σ dz·x̂] per channel over the rows into `acc` (`[2C]`), rows in order.
#[multiversion::multiversion(targets("x86_64+avx+avx2+fma"))]
fn grad_sum_rows<E: Float>(dy: &[E], x: &[E], k: Channels<'_, E>, relu: bool, acc: &mut [f64]) {
    let c = k.mean.len();
    let (acc_beta, acc_gamma) = acc.split_at_mut(c);
    for (dy_row, x_row) in dy.chunks_exact(c).zip(x.chunks_exact(c)) {
        let sums = acc_beta.iter_mut().zip(acc_gamma.iter_mut());
        for (((ab, ag), &dy), (x_hat, z)) in sums.zip(dy_row).zip(k.normed(x_row)) {
            let d = to_f64(relu_grad(relu, z, dy));
            *ab += d;
            *ag += d * to_f64(x_hat);
        }
    }
}

/// The BatchNorm's ∂x, added into `gx` for the rows: scale·(R·dz − ∂β − x̂·∂γ) per channel,
/// with `per_grad` = (∂β, ∂γ, scale) and `rows` = R.
#[multiversion::multiversion(targets("x86_64+avx+avx2+fma"))]
fn dx_rows<E: Float>(
    gx: &mut [E],
    (dy, x): (&[E], &[E]),
    k: Channels<'_, E>,
    per_grad: (&[E], &[E], &[E]),
    (rows, relu): (E, bool),
) {
    let c = k.mean.len();
    let (d_beta, d_gamma, scale) = per_grad;
    for ((gx_row, dy_row), x_row) in gx
        .chunks_exact_mut(c)
        .zip(dy.chunks_exact(c))
        .zip(x.chunks_exact(c))
    {
        let grads = d_beta.iter().zip(d_gamma).zip(scale);
        for (((gx, &dy), (x_hat, z)), ((&db, &dg), &sc)) in gx_row
            .iter_mut()
            .zip(dy_row)
            .zip(k.normed(x_row))
            .zip(grads)
        {
            *gx += sc * (rows * relu_grad(relu, z, dy) - db - x_hat * dg);
        }
    }
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
    /// The per-channel constants.
    fn channels(&self) -> Channels<'_, E> {
        let c = self.channels;
        Channels {
            mean: &self.mean[..c],
            inv_std: &self.inv_std[..c],
            gamma: &self.gamma[..c],
            beta: &self.beta[..c],
        }
    }

    /// y = z, or max(z, 0) with ReLU. `z < 0` rather than `!(z > 0)`: a NaN must reach the
    /// loss, which the trainer checks. x̂ = (x − μ)·(1/σ), z = x̂·γ + β, rounded in that order
    /// ([`forward_rows`] per block of rows).
    fn forward(&self) -> Vec<E> {
        use rayon::prelude::*;
        let block = self.rows_per_block * self.channels;
        let mut y = vec![E::zero(); self.x.len()];
        let k = self.channels();
        y.par_chunks_mut(block)
            .zip(self.x.par_chunks(block))
            .for_each(|(y_block, x_block)| forward_rows(y_block, x_block, k, self.relu));
        y
    }

    /// Adds ∂x into `g_x`; returns (∂γ, ∂β). dz = dy, or dy·[z > 0] with ReLU (its derivative
    /// is 0 at a NaN too); x̂ and z as in [`CpuBatchNorm::forward`].
    fn backward(&self, dy: &[E], g_x: &mut [E]) -> (Vec<E>, Vec<E>) {
        use rayon::prelude::*;
        let (c, block) = (self.channels, self.rows_per_block * self.channels);
        let (k, relu) = (self.channels(), self.relu);
        // ∂β and ∂γ in one pass per block: [Σ dz | Σ dz·x̂] in f64, blocks added in order.
        let partials: Vec<Vec<f64>> = dy
            .par_chunks(block)
            .zip(self.x.par_chunks(block))
            .map(|(dy_block, x_block)| {
                let mut acc = vec![0.0f64; 2 * c];
                grad_sum_rows(dy_block, x_block, k, relu, &mut acc);
                acc
            })
            .collect();
        let mut sums = vec![0.0f64; 2 * c];
        for p in partials {
            for (t, v) in sums.iter_mut().zip(p) {
                *t += v;
            }
        }
        let d_beta: Vec<E> = sums[..c].iter().map(|&v| from_f64(v)).collect();
        let d_gamma: Vec<E> = sums[c..].iter().map(|&v| from_f64(v)).collect();
        let rows: E = from_f64((self.x.len() / c) as f64);
        let scale: Vec<E> = (0..c)
            .map(|ch| self.gamma[ch] * self.inv_std[ch] / rows)
            .collect();
        let per_grad = (&d_beta[..c], &d_gamma[..c], &scale[..c]);
        g_x.par_chunks_mut(block)
            .zip(dy.par_chunks(block))
            .zip(self.x.par_chunks(block))
            .for_each(|((gx_block, dy_block), x_block)| {
                dx_rows(gx_block, (dy_block, x_block), k, per_grad, (rows, relu))
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
        let values = crate::cpu_values(&x);
        let rows_per_block = r.div_ceil(CPU_BLOCKS).max(1);
        let sums = block_sums(&values, c, c, rows_per_block, |rows, acc| {
            sum_rows(rows, acc)
        });
        let mean: Vec<f64> = sums.iter().map(|s| s / r as f64).collect();
        let squares = block_sums(&values, c, c, rows_per_block, |rows, acc| {
            square_rows(rows, &mean, acc)
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
        // Ghosts (id and shape, no buffer): the backward reads the op's own copies, so the tape
        // need not keep the input's and output's dfdx buffers alive until then.
        let (out_id, x_id, g_id, b_id) = (out.ghost(), x.ghost(), gamma.ghost(), beta.ghost());
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
