//! Weighted row taps: `Y[m, :] = Σ_t w_t[m]·X[i_t[m], :]` over rows `X [R, C]`, for a list of
//! taps `(i_t, w_t)` each of length M (the output rows), summed in tap order. Bilinear resize
//! of NHWC rows is four such taps (`sar_dfdx_models::seg::resize_bilinear`).
//!
//! Backward: `∂X[i_t[m], :] += w_t[m]·∂Y[m, :]` (the weights are constants: no gradient).
//!
//! On other devices than the CPU (CUDA) this is dfdx's `gather`, a multiplication by the
//! broadcast weights and additions, each with dfdx's backward ([`weighted_taps_generic`]). On
//! dfdx's `Cpu` it is one op with its own backward ([`TapKernel`]): the forward in parallel
//! over blocks of output rows, with the generic path's order of additions (so the same
//! values); the backward one pass over the taps in the order dfdx's tape runs the generic
//! ops (last tap first, rows ascending), on one thread (indices may repeat across rows, and a
//! fixed order keeps runs reproducible).

use crate::{shape_err, Float, Matrix, Result};
use dfdx::prelude::*;
use dfdx::tensor_ops::Device;

/// One tap: the source row of each output row and its weight.
pub type Tap<E> = (Vec<usize>, Vec<E>);

/// Output rows per parallel block of the CPU forward.
const CPU_BLOCK_ROWS: usize = 4096;

/// A device's weighted-taps op (see the module docs).
pub trait TapKernel<E: Float>: Device<E> + Default {
    /// `Y [M, C]` from `x [R, C]` and `taps` (each of M rows, indices < R).
    fn weighted_taps<T: Tape<E, Self>>(
        x: Matrix<E, Self, T>,
        taps: &[Tap<E>],
    ) -> Result<Matrix<E, Self, T>>;
}

/// The output rows M of `taps`, checked against `x`'s R rows.
fn check<E>(rows: usize, taps: &[Tap<E>]) -> Result<usize> {
    let Some((first, _)) = taps.first() else {
        return shape_err("weighted taps: no taps".into());
    };
    let m = first.len();
    for (t, (idx, w)) in taps.iter().enumerate() {
        if idx.len() != m || w.len() != m {
            return shape_err(format!(
                "weighted taps: tap {t} has {} indices and {} weights for {m} rows",
                idx.len(),
                w.len()
            ));
        }
        if let Some(&bad) = idx.iter().find(|&&i| i >= rows) {
            return shape_err(format!("weighted taps: tap {t} reads row {bad} of {rows}"));
        }
    }
    Ok(m)
}

/// The composition of dfdx ops (any device): per tap a gather, times the weights broadcast
/// over the channels, summed in tap order.
pub fn weighted_taps_generic<E: Float, D: Device<E> + Default, T: Tape<E, D>>(
    x: Matrix<E, D, T>,
    taps: &[Tap<E>],
) -> Result<Matrix<E, D, T>> {
    let (rows, c) = *x.shape();
    let m = check(rows, taps)?;
    let dev = x.device().clone();
    let mut out: Option<Matrix<E, D, T>> = None;
    for (idx, w) in taps {
        let tap: Matrix<E, D, T> = x
            .retaped::<T>()
            .gather(dev.tensor_from_vec(idx.clone(), (m,)));
        let w: Tensor<(usize,), E, D> = dev.tensor_from_vec(w.clone(), (m,));
        let term = tap * w.broadcast_like::<_, Axis<1>>(&(m, c));
        out = Some(match out {
            None => term,
            Some(o) => o + term,
        });
    }
    let out = out.ok_or_else(|| crate::SarDfdxError::Shape("weighted taps: no taps".into()))?;
    // The taps were gathered from copies with empty tapes: `x`'s own joins here.
    let (out, tape) = out.split_tape();
    let (_, x_tape) = x.split_tape();
    Ok(out.put_tape(tape.merge(x_tape)))
}

impl<E: Float> TapKernel<E> for Cpu
where
    Cpu: Device<E>,
    <Cpu as Storage<E>>::Vec: std::ops::DerefMut<Target = Vec<E>>,
{
    fn weighted_taps<T: Tape<E, Self>>(
        x: Matrix<E, Self, T>,
        taps: &[Tap<E>],
    ) -> Result<Matrix<E, Self, T>> {
        use rayon::prelude::*;
        let (rows, c) = *x.shape();
        let m = check(rows, taps)?;
        let (x, mut tape) = x.split_tape();
        let xs = crate::cpu_values(&x);
        let mut y = vec![E::zero(); m * c];
        if c > 0 {
            y.par_chunks_mut(CPU_BLOCK_ROWS * c)
                .enumerate()
                .for_each(|(b, y_b)| {
                    let first = b * CPU_BLOCK_ROWS;
                    for (r, y_r) in y_b.chunks_mut(c).enumerate() {
                        let row = first + r;
                        // ((t₀ + t₁) + t₂) + t₃, as the generic path adds its terms.
                        for (t, (idx, w)) in taps.iter().enumerate() {
                            let src = &xs[idx[row] * c..(idx[row] + 1) * c];
                            let wt = w[row];
                            if t == 0 {
                                for (d, &v) in y_r.iter_mut().zip(src) {
                                    *d = v * wt;
                                }
                            } else {
                                for (d, &v) in y_r.iter_mut().zip(src) {
                                    *d += v * wt;
                                }
                            }
                        }
                    }
                });
        }
        let out = x.device().tensor_from_vec(y, (m, c));
        let (out_id, x_id) = (out.ghost(), x.ghost());
        let taps: Vec<Tap<E>> = taps.to_vec();
        tape.add_backward_op(move |grads| {
            // The output's gradient is complete here and read only here: take it.
            let g_y: Vec<E> = std::mem::take(&mut **grads.get_or_alloc_mut(&out_id)?);
            let g_x = grads.get_or_alloc_mut(&x_id)?;
            if c == 0 {
                return Ok(());
            }
            for (idx, w) in taps.iter().rev() {
                for ((&src, &wt), g_r) in idx.iter().zip(w).zip(g_y.chunks(c)) {
                    for (d, &g) in g_x[src * c..(src + 1) * c].iter_mut().zip(g_r) {
                        *d += g * wt;
                    }
                }
            }
            Ok(())
        });
        Ok(out.put_tape(tape))
    }
}

#[cfg(feature = "cuda")]
impl<E: Float> TapKernel<E> for dfdx::tensor::Cuda
where
    dfdx::tensor::Cuda: Device<E>,
{
    fn weighted_taps<T: Tape<E, Self>>(
        x: Matrix<E, Self, T>,
        taps: &[Tap<E>],
    ) -> Result<Matrix<E, Self, T>> {
        weighted_taps_generic(x, taps)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The CPU op against the generic path in f64 (repeated indices, three channels, blocks
    /// of rows): the same values bit for bit, the same input gradient to rounding (another
    /// consumer of `x` adds to it too), and bad taps refused.
    #[test]
    fn cpu_op_matches_the_generic_path() {
        let dev = Cpu::default();
        let (rows, c, m) = (7usize, 3usize, CPU_BLOCK_ROWS + 5);
        let xv: Vec<f64> = (0..rows * c).map(|i| (i as f64 * 0.37).sin()).collect();
        let taps: Vec<Tap<f64>> = (0..4)
            .map(|t| {
                let idx = (0..m).map(|r| (r * (t + 3) + t) % rows).collect();
                let w = (0..m).map(|r| ((r + t) as f64 * 0.11).cos()).collect();
                (idx, w)
            })
            .collect();
        let r: Vec<f64> = (0..m * c).map(|i| (i as f64 * 0.07).cos()).collect();
        let x: Matrix<f64, Cpu> = dev.tensor_from_vec(xv, (rows, c));
        let run = |generic: bool| {
            let t = x.leaky_trace();
            let other = (t.retaped::<OwnedTape<f64, Cpu>>() * 2.0).sum::<Rank0, _>();
            let y = if generic {
                weighted_taps_generic(t, &taps).unwrap()
            } else {
                <Cpu as TapKernel<f64>>::weighted_taps(t, &taps).unwrap()
            };
            let values = y.as_vec();
            let rt: Matrix<f64, Cpu> = dev.tensor_from_vec(r.clone(), (m, c));
            let g = ((y * rt).sum::<Rank0, _>() + other).backward();
            (values, g.get(&x).as_vec())
        };
        let (yg, gg) = run(true);
        let (yc, gc) = run(false);
        assert_eq!(yc, yg);
        for (a, b) in gc.iter().zip(&gg) {
            assert!((a - b).abs() <= 1e-12 * (1.0 + b.abs()), "{a} vs {b}");
        }
        let bad = vec![(vec![rows], vec![1.0])];
        assert!(<Cpu as TapKernel<f64>>::weighted_taps(x.clone(), &bad).is_err());
        let uneven = vec![(vec![0, 1], vec![1.0])];
        assert!(weighted_taps_generic(x, &uneven).is_err());
    }
}
