//! Depth-wise convolution over NHWC rows (no bias; the caller adds it):
//! `y[m, c] = Σ_t w[t, c] · x[I[m, t], c]` for output pixel rows m `[N·OH·OW]`, taps
//! t = (ky, kx) in row-major order `[K·K]`, the im2col index I of [`ConvGeometry`] (the zero
//! row where a tap falls in the padding), weights `[K·K, C]` (PyTorch's `[C, 1, K, K]`
//! transposed).
//!
//! Backward: `∂x[I[m, t], c] += w[t, c]·∂y[m, c]`, `∂w[t, c] = Σ_m x[I[m, t], c]·∂y[m, c]`.
//!
//! On other devices than the CPU (CUDA) this is dfdx's ops: the taps gathered `[M, K·K, C]`
//! ([`im2col_gather`]), times the weights broadcast over the rows, summed over the taps
//! ([`depthwise_rows_generic`]), each with dfdx's backward. That materialises K·K copies of
//! the input and of its gradient; on dfdx's `Cpu` it is one op with its own backward
//! ([`DepthwiseKernel`]), parallel over images: the forward adds the taps in order per output
//! row; the backward scatters each image's input gradient (an image's taps read only its own
//! rows) and sums the weight gradient per group of images, then over the groups in order, so
//! the result does not depend on the thread count.

use crate::conv::{im2col_gather, ConvGeometry, GatherCache};
use crate::{shape_err, Float, Matrix, Result};
use dfdx::prelude::*;
use dfdx::tensor_ops::Device;

/// Images per weight-gradient partial on the CPU (see the module docs).
const CPU_GROUPS: usize = 16;

/// A device's depth-wise convolution (see the module docs).
pub trait DepthwiseKernel<E: Float>: Device<E> + Default {
    /// `y [N·OH·OW, C]` from rows `x [N·H·W, C]` and weights `[K·K, C]` under `geom`.
    fn depthwise_rows<T: Tape<E, Self>>(
        cache: &mut GatherCache<Self>,
        x: Matrix<E, Self, T>,
        weight: Matrix<E, Self, T>,
        geom: ConvGeometry,
    ) -> Result<Matrix<E, Self, T>>;
}

/// Output rows M and channels C, checked.
fn check(x: (usize, usize), weight: (usize, usize), geom: ConvGeometry) -> Result<(usize, usize)> {
    let ((rows, c), (taps, wc)) = (x, weight);
    let (oh, ow) = geom.out_hw()?;
    if rows != geom.n * geom.h * geom.w || taps != geom.k * geom.k || wc != c {
        return shape_err(format!(
            "depth-wise conv: rows [{rows}, {c}] and weights [{taps}, {wc}] for {geom:?}"
        ));
    }
    Ok((geom.n * oh * ow, c))
}

/// The composition of dfdx ops (any device; see the module docs).
pub fn depthwise_rows_generic<E: Float, D: Device<E> + Default, T: Tape<E, D>>(
    cache: &mut GatherCache<D>,
    x: Matrix<E, D, T>,
    weight: Matrix<E, D, T>,
    geom: ConvGeometry,
) -> Result<Matrix<E, D, T>> {
    let (m, c) = check(*x.shape(), *weight.shape(), geom)?;
    let taps = geom.k * geom.k;
    let patches = im2col_gather(cache, x, geom)?.reshape_like(&(m, taps, c));
    Ok(
        (patches * weight.broadcast_like::<_, Axis<0>>(&(m, taps, c)))
            .sum::<(usize, usize), Axis<1>>(),
    )
}

impl<E: Float> DepthwiseKernel<E> for Cpu
where
    Cpu: Device<E>,
    <Cpu as Storage<E>>::Vec: std::ops::DerefMut<Target = Vec<E>>,
{
    fn depthwise_rows<T: Tape<E, Self>>(
        cache: &mut GatherCache<Self>,
        x: Matrix<E, Self, T>,
        weight: Matrix<E, Self, T>,
        geom: ConvGeometry,
    ) -> Result<Matrix<E, Self, T>> {
        use rayon::prelude::*;
        let (m, c) = check(*x.shape(), *weight.shape(), geom)?;
        let (rows, taps) = (x.shape().0, geom.k * geom.k);
        let idx = cache.host_rows(geom)?;
        let (x, tape_x) = x.split_tape();
        let (weight, tape_w) = weight.split_tape();
        let mut tape = tape_x.merge(tape_w);
        let (xs, ws) = (crate::cpu_values(&x), crate::cpu_values(&weight));
        let per_out = m / geom.n.max(1);
        let mut y = vec![E::zero(); m * c];
        if c > 0 && per_out > 0 {
            y.par_chunks_mut(per_out * c)
                .zip(idx.par_chunks(per_out * taps))
                .for_each(|(y_b, idx_b)| {
                    for (y_r, idx_r) in y_b.chunks_mut(c).zip(idx_b.chunks(taps)) {
                        for (w_t, &src) in ws.chunks(c).zip(idx_r) {
                            if src < rows {
                                let x_r = &xs[src * c..(src + 1) * c];
                                for ((d, &v), &wv) in y_r.iter_mut().zip(x_r).zip(w_t) {
                                    *d += v * wv;
                                }
                            }
                        }
                    }
                });
        }
        let out = x.device().tensor_from_vec(y, (m, c));
        // Ghosts (id and shape, no buffer): the backward reads the host copies above.
        let (out_id, x_id, w_id) = (out.ghost(), x.ghost(), weight.ghost());
        let n = geom.n;
        tape.add_backward_op(move |grads| {
            // The output's gradient is complete here and read only here: take it.
            let g_y: Vec<E> = std::mem::take(&mut **grads.get_or_alloc_mut(&out_id)?);
            if c == 0 || per_out == 0 {
                return Ok(());
            }
            let per_in = rows / n.max(1);
            let per_group = n.div_ceil(CPU_GROUPS).max(1);
            let g_x = grads.get_or_alloc_mut(&x_id)?;
            let partials: Vec<Vec<E>> = g_x
                .par_chunks_mut(per_group * per_in * c)
                .zip(g_y.par_chunks(per_group * per_out * c))
                .zip(idx.par_chunks(per_group * per_out * taps))
                .enumerate()
                .map(|(group, ((g_x, g_y), idx))| {
                    let first_row = group * per_group * per_in;
                    let mut g_w = vec![E::zero(); taps * c];
                    for (g_r, idx_r) in g_y.chunks(c).zip(idx.chunks(taps)) {
                        for ((&src, w_t), gw_t) in
                            idx_r.iter().zip(ws.chunks(c)).zip(g_w.chunks_mut(c))
                        {
                            if src >= rows {
                                continue;
                            }
                            let x_r = &xs[src * c..(src + 1) * c];
                            let at = (src - first_row) * c;
                            let gx_r = &mut g_x[at..at + c];
                            for ((((gx, gw), &g), &xv), &wv) in gx_r
                                .iter_mut()
                                .zip(gw_t.iter_mut())
                                .zip(g_r)
                                .zip(x_r)
                                .zip(w_t)
                            {
                                *gx += wv * g;
                                *gw += xv * g;
                            }
                        }
                    }
                    g_w
                })
                .collect();
            let g_w = grads.get_or_alloc_mut(&w_id)?;
            for part in partials {
                for (d, p) in g_w.iter_mut().zip(part) {
                    *d += p;
                }
            }
            Ok(())
        });
        Ok(out.put_tape(tape))
    }
}

#[cfg(feature = "cuda")]
impl<E: Float> DepthwiseKernel<E> for dfdx::tensor::Cuda
where
    dfdx::tensor::Cuda: Device<E>,
{
    fn depthwise_rows<T: Tape<E, Self>>(
        cache: &mut GatherCache<Self>,
        x: Matrix<E, Self, T>,
        weight: Matrix<E, Self, T>,
        geom: ConvGeometry,
    ) -> Result<Matrix<E, Self, T>> {
        depthwise_rows_generic(cache, x, weight, geom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The CPU op against the generic path in f64: 3×3 and 5×5 kernels on odd grids, a batch
    /// of 18 images (uneven gradient groups), the output, the input gradient (which another
    /// consumer of x also adds to) and the weight gradient to rounding; bad shapes refused.
    #[test]
    fn cpu_op_matches_the_generic_path() {
        let dev = Cpu::default();
        for (n, h, w, c, k) in [
            (2usize, 5usize, 4usize, 3usize, 3usize),
            (18, 3, 6, 2, 5),
            (1, 1, 1, 4, 3),
        ] {
            let geom = ConvGeometry::new(n, (h, w), k, 1, k / 2);
            let rows = n * h * w;
            let xv: Vec<f64> = (0..rows * c).map(|i| (i as f64 * 0.37).sin()).collect();
            let wv: Vec<f64> = (0..k * k * c).map(|i| (i as f64 * 0.23).cos()).collect();
            let r: Vec<f64> = (0..rows * c).map(|i| (i as f64 * 0.07).cos()).collect();
            let x: Matrix<f64, Cpu> = dev.tensor_from_vec(xv, (rows, c));
            let wt: Matrix<f64, Cpu> = dev.tensor_from_vec(wv, (k * k, c));
            let run = |generic: bool| {
                let mut cache = GatherCache::default();
                let tx = x.leaky_trace();
                let other = (tx.retaped::<OwnedTape<f64, Cpu>>() * 2.0).sum::<Rank0, _>();
                let tw = wt.retaped::<OwnedTape<f64, Cpu>>();
                let y = if generic {
                    depthwise_rows_generic(&mut cache, tx, tw, geom).unwrap()
                } else {
                    <Cpu as DepthwiseKernel<f64>>::depthwise_rows(&mut cache, tx, tw, geom).unwrap()
                };
                let values = y.as_vec();
                let rt: Matrix<f64, Cpu> = dev.tensor_from_vec(r.clone(), (rows, c));
                let g = ((y * rt).sum::<Rank0, _>() + other).backward();
                (values, g.get(&x).as_vec(), g.get(&wt).as_vec())
            };
            let (generic, cpu) = (run(true), run(false));
            for (what, a, b) in [
                ("y", &cpu.0, &generic.0),
                ("dx", &cpu.1, &generic.1),
                ("dw", &cpu.2, &generic.2),
            ] {
                assert_eq!(a.len(), b.len());
                for (u, v) in a.iter().zip(b) {
                    assert!(
                        (u - v).abs() <= 1e-12 * (1.0 + v.abs()),
                        "{what} {n}×{h}×{w}×{c} k{k}: {u} vs {v}"
                    );
                }
            }
        }
        let geom = ConvGeometry::new(1, (2, 2), 3, 1, 1);
        let x: Matrix<f64, Cpu> = dev.zeros_like(&(4, 2));
        let bad: Matrix<f64, Cpu> = dev.zeros_like(&(9, 3));
        let mut cache = GatherCache::default();
        assert!(
            <Cpu as DepthwiseKernel<f64>>::depthwise_rows(&mut cache, x.clone(), bad, geom)
                .is_err()
        );
        let short: Matrix<f64, Cpu> = dev.zeros_like(&(3, 2));
        let w: Matrix<f64, Cpu> = dev.zeros_like(&(9, 2));
        assert!(depthwise_rows_generic(&mut cache, short, w, geom).is_err());
    }
}
