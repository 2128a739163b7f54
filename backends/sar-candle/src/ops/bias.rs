//! Per-channel bias add for f32 with a parallel backward, as a candle custom op.
//!
//! y = x + b broadcast along one axis: x viewed as `[outer, C, inner]` around the channel
//! axis (a linear layer's rows `[M, C]`: outer M, inner 1; a convolution's `[N, C, H, W]`:
//! outer N, inner H·W), b `[C]`. Backward: dx = dy, db_c = Σ_outer Σ_inner dy.
//!
//! candle's `broadcast_add` gets db from its generic reduction, which walks a non-trailing
//! axis element by element on one thread; in a transformer training step that reduction was a
//! fifth of all CPU time. Here the sum runs over fixed groups of `outer` in parallel, each in
//! f64, and the groups are then added in order: the result does not depend on the thread
//! count.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Shape, Tensor};
use rayon::prelude::*;

/// `[outer, C, inner]` of `dims` around `axis`, checking C against the bias length.
fn split(dims: &[usize], axis: usize, channels: usize) -> candle_core::Result<(usize, usize)> {
    if axis >= dims.len() || dims[axis] != channels {
        candle_core::bail!("bias of {channels} channels on axis {axis} of a {dims:?} tensor");
    }
    Ok((
        dims[..axis].iter().product(),
        dims[axis + 1..].iter().product(),
    ))
}

/// Fixed number of groups the outer index is summed in (then the groups in order).
const SUM_GROUPS: usize = 16;

struct BiasAdd {
    axis: usize,
}

impl CustomOp2 for BiasAdd {
    fn name(&self) -> &'static str {
        "sar-bias-add"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = super::cpu_f32("bias-add", s1, l1, "input")?;
        let b = super::cpu_f32("bias-add", s2, l2, "bias")?;
        let c = b.len();
        let (_, inner) = split(l1.dims(), self.axis, c)?;
        let mut y = x.to_vec();
        if y.is_empty() {
            // No channels or an empty axis: nothing to add (and no chunk size of 0 below).
        } else if inner == 1 {
            y.par_chunks_mut(c * 64).for_each(|rows| {
                for row in rows.chunks_exact_mut(c) {
                    for (v, bv) in row.iter_mut().zip(b) {
                        *v += bv;
                    }
                }
            });
        } else {
            y.par_chunks_mut(inner).enumerate().for_each(|(plane, v)| {
                let bv = b[plane % c];
                for e in v {
                    *e += bv;
                }
            });
        }
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let db = grad.contiguous()?.apply_op1_no_bwd(&BiasGrad {
            axis: self.axis,
            channels: b.elem_count(),
        })?;
        Ok((Some(grad.clone()), Some(db)))
    }
}

/// db_c = Σ dy over every axis but the channel one.
struct BiasGrad {
    axis: usize,
    channels: usize,
}

impl CustomOp1 for BiasGrad {
    fn name(&self) -> &'static str {
        "sar-bias-grad"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let g = super::cpu_f32("bias-add", s, l, "output gradient")?;
        let c = self.channels;
        let (outer, inner) = split(l.dims(), self.axis, c)?;
        if g.is_empty() {
            return Ok((CpuStorage::F32(vec![0.0; c]), Shape::from(c)));
        }
        let per_group = outer.div_ceil(SUM_GROUPS).max(1);
        let partial: Vec<Vec<f64>> = (0..outer.div_ceil(per_group))
            .into_par_iter()
            .map(|grp| {
                let mut acc = vec![0.0f64; c];
                for o in grp * per_group..((grp + 1) * per_group).min(outer) {
                    let block = &g[o * c * inner..(o + 1) * c * inner];
                    if inner == 1 {
                        for (a, v) in acc.iter_mut().zip(block) {
                            *a += f64::from(*v);
                        }
                    } else {
                        for (a, plane) in acc.iter_mut().zip(block.chunks_exact(inner)) {
                            *a += super::sum_f32(plane);
                        }
                    }
                }
                acc
            })
            .collect();
        let mut db = vec![0.0f64; c];
        for part in &partial {
            for (a, v) in db.iter_mut().zip(part) {
                *a += v;
            }
        }
        Ok((
            CpuStorage::F32(db.into_iter().map(|v| v as f32).collect()),
            Shape::from(c),
        ))
    }
}

/// `x + b` with `b` `[C]` broadcast along `axis` of `x` (C = `x.dim(axis)`): this op on the
/// CPU for f32, candle's `broadcast_add` otherwise.
pub fn bias_add(x: &Tensor, b: &Tensor, axis: usize) -> candle_core::Result<Tensor> {
    if super::all_cpu_f32(&[x, b]) && b.rank() == 1 {
        x.contiguous()?
            .apply_op2(&b.contiguous()?, BiasAdd { axis })
    } else {
        let mut shape = vec![1usize; x.rank()];
        if axis < shape.len() {
            shape[axis] = b.elem_count();
        }
        x.broadcast_add(&b.reshape(shape)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::test_util::randn;
    use candle_core::{DType, Var};

    /// Forward and both gradients against candle's `broadcast_add`, on rows (the linear
    /// layer's case), NCHW maps and a middle axis of a rank-3 tensor, with a random upstream
    /// gradient.
    #[test]
    fn matches_broadcast_add_forward_and_gradients() {
        for (dims, axis) in [
            (vec![37, 5], 1),
            (vec![3, 7, 5, 6], 1),
            (vec![4, 3, 9], 1),
            (vec![2, 3, 4], 2),
            (vec![1, 1], 1),
        ] {
            let x = Var::from_tensor(&randn(dims.as_slice())).unwrap();
            let b = Var::from_tensor(&randn(dims[axis])).unwrap();
            let up = randn(dims.as_slice());
            let ours = bias_add(x.as_tensor(), b.as_tensor(), axis).unwrap();
            let mut shape = vec![1usize; dims.len()];
            shape[axis] = dims[axis];
            let theirs = x
                .as_tensor()
                .broadcast_add(&b.as_tensor().reshape(shape).unwrap())
                .unwrap();
            let grads = |y: &Tensor| {
                let g = (y * &up).unwrap().sum_all().unwrap().backward().unwrap();
                (
                    g.get(x.as_tensor()).unwrap().clone(),
                    g.get(b.as_tensor()).unwrap().clone(),
                )
            };
            let (dx0, db0) = grads(&ours);
            let (dx1, db1) = grads(&theirs);
            let diff = |a: &Tensor, b: &Tensor| -> f32 {
                assert_eq!(a.dims(), b.dims());
                let (a, b) = (
                    a.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                    b.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                );
                a.iter().zip(&b).fold(0.0, |m, (u, v)| m.max((u - v).abs()))
            };
            assert_eq!(diff(&ours, &theirs), 0.0, "forward {dims:?}");
            assert_eq!(diff(&dx0, &dx1), 0.0, "input gradient {dims:?}");
            assert!(diff(&db0, &db1) < 1e-5, "bias gradient {dims:?}");
        }
    }

    /// The bias gradient is Σ dy exactly as f64 sums would give it, whatever the size.
    #[test]
    fn bias_gradient_is_the_f64_sum() {
        let g = randn((40, 3, 5));
        let db = g.apply_op1_no_bwd(&BiasGrad {
            axis: 1,
            channels: 3,
        });
        let db: Vec<f32> = db.unwrap().to_vec1().unwrap();
        let v: Vec<f64> = g
            .to_dtype(DType::F64)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        for (c, got) in db.iter().enumerate() {
            let want: f64 = (0..40)
                .flat_map(|o| (0..5).map(move |i| (o * 3 + c) * 5 + i))
                .map(|i| v[i])
                .sum();
            assert!((f64::from(*got) - want).abs() < 1e-5, "{got} vs {want}");
        }
    }

    /// Empty tensors (no channels, or an empty trailing axis) go through forward and the
    /// bias gradient without error: zeros of the right shape.
    #[test]
    fn empty_tensors_pass_through() {
        for (dims, c) in [([2usize, 0, 3], 0usize), ([2, 3, 0], 3)] {
            let x = Tensor::zeros(dims.as_slice(), DType::F32, &candle_core::Device::Cpu).unwrap();
            let b = randn(c);
            assert_eq!(bias_add(&x, &b, 1).unwrap().dims(), &dims);
            let db = x
                .apply_op1_no_bwd(&BiasGrad {
                    axis: 1,
                    channels: c,
                })
                .unwrap();
            assert_eq!(db.to_vec1::<f32>().unwrap(), vec![0.0; c]);
        }
    }

    #[test]
    fn a_bias_of_the_wrong_length_is_an_error() {
        let x = randn((2, 3, 4));
        let b = randn(4);
        let err = bias_add(&x, &b, 1).unwrap_err().to_string();
        assert!(err.contains("bias of 4 channels on axis 1"), "{err}");
    }
}
