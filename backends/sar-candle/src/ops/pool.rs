//! Max-pooling with padding and overlapping windows (ResNet's 3×3, stride 2, padding 1) for
//! f32 NCHW on the CPU, with PyTorch's backward: each output's gradient goes to the first
//! maximum of its window in row-major order (candle 0.11 has no backward for overlapping
//! windows). Padding never wins (it is −∞). Other devices: the maximum of the nine shifted
//! strided views, whose autograd splits the gradient between tied maxima.

use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};
use rayon::prelude::*;
use std::sync::{Arc, Mutex};

/// Max-pool `k × k`, stride `s`, padding `p` (see the module docs).
pub struct MaxPoolCpu {
    k: usize,
    s: usize,
    p: usize,
    argmax: Arc<Mutex<Vec<u32>>>,
}

fn out_size(n: usize, k: usize, s: usize, p: usize) -> usize {
    (n + 2 * p - k) / s + 1
}

impl CustomOp1 for MaxPoolCpu {
    fn name(&self) -> &'static str {
        "sar-max-pool"
    }
    fn cpu_fwd(&self, st: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = super::cpu_f32("max-pool", st, l, "input")?;
        let &[n, c, h, w] = l.dims() else {
            candle_core::bail!("max-pool needs [N, C, H, W], got {:?}", l.dims());
        };
        if h + 2 * self.p < self.k || w + 2 * self.p < self.k || self.p * 2 > self.k {
            candle_core::bail!(
                "max-pool {}×{} (padding {}) does not fit {h}×{w}",
                self.k,
                self.k,
                self.p
            );
        }
        let (oh, ow) = (
            out_size(h, self.k, self.s, self.p),
            out_size(w, self.k, self.s, self.p),
        );
        let mut y = vec![0.0f32; n * c * oh * ow];
        let mut idx = vec![0u32; n * c * oh * ow];
        y.par_chunks_mut(oh * ow)
            .zip(idx.par_chunks_mut(oh * ow))
            .enumerate()
            .for_each(|(plane, (yo, io))| {
                let xp = &x[plane * h * w..(plane + 1) * h * w];
                for oy in 0..oh {
                    for ox in 0..ow {
                        let (mut best, mut at) = (f32::NEG_INFINITY, u32::MAX);
                        for ky in 0..self.k {
                            let iy = (oy * self.s + ky) as isize - self.p as isize;
                            if iy < 0 || iy >= h as isize {
                                continue;
                            }
                            for kx in 0..self.k {
                                let ix = (ox * self.s + kx) as isize - self.p as isize;
                                if ix < 0 || ix >= w as isize {
                                    continue;
                                }
                                let j = iy as usize * w + ix as usize;
                                let v = xp[j];
                                if v > best || v.is_nan() || at == u32::MAX {
                                    (best, at) = (v, j as u32);
                                    if v.is_nan() {
                                        break;
                                    }
                                }
                            }
                        }
                        yo[oy * ow + ox] = best;
                        io[oy * ow + ox] = at;
                    }
                }
            });
        *self.argmax.lock().expect("argmax lock") = idx;
        Ok((CpuStorage::F32(y), Shape::from((n, c, oh, ow))))
    }
    fn bwd(&self, x: &Tensor, _y: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let (n, c, h, w) = x.dims4()?;
        let idx = self.argmax.lock().expect("argmax lock").clone();
        let g: Vec<f32> = grad.contiguous()?.flatten_all()?.to_vec1()?;
        let per = g.len() / (n * c).max(1);
        let mut dx = vec![0.0f32; n * c * h * w];
        dx.par_chunks_mut(h * w)
            .enumerate()
            .for_each(|(plane, out)| {
                for (gv, &j) in g[plane * per..(plane + 1) * per]
                    .iter()
                    .zip(&idx[plane * per..(plane + 1) * per])
                {
                    if let Some(o) = out.get_mut(j as usize) {
                        *o += gv;
                    }
                }
            });
        Ok(Some(Tensor::from_vec(dx, (n, c, h, w), x.device())?))
    }
}

/// `k × k` max-pool with stride `s` and padding `p` (p ≤ k/2).
pub fn max_pool2d(x: &Tensor, k: usize, s: usize, p: usize) -> candle_core::Result<Tensor> {
    if x.device().is_cpu() && x.dtype() == candle_core::DType::F32 {
        return x.contiguous()?.apply_op1(MaxPoolCpu {
            k,
            s,
            p,
            argmax: Arc::new(Mutex::new(Vec::new())),
        });
    }
    let (_, _, h, w) = x.dims4()?;
    let (oh, ow) = (out_size(h, k, s, p), out_size(w, k, s, p));
    // −∞-like padding, then the maximum of the k² shifted views subsampled by s.
    let big = -1e30;
    let pad_h = (oh - 1) * s + k + s - (h + 2 * p).min((oh - 1) * s + k + s);
    let pad_w = (ow - 1) * s + k + s - (w + 2 * p).min((ow - 1) * s + k + s);
    let xp = (x
        .pad_with_zeros(2, p, p + pad_h)?
        .pad_with_zeros(3, p, p + pad_w)?
        + (Tensor::ones_like(x)?
            .pad_with_zeros(2, p, p + pad_h)?
            .pad_with_zeros(3, p, p + pad_w)?
            .affine(-big, big))?)?;
    let mut out: Option<Tensor> = None;
    for ky in 0..k {
        for kx in 0..k {
            let v = xp.narrow(2, ky, oh * s)?.narrow(3, kx, ow * s)?;
            let (n, c, _, _) = v.dims4()?;
            let v = v
                .reshape((n, c, oh, s, ow, s))?
                .narrow(3, 0, 1)?
                .narrow(5, 0, 1)?
                .reshape((n, c, oh, ow))?;
            out = Some(match out {
                None => v,
                Some(o) => o.maximum(&v)?,
            });
        }
    }
    Ok(out.expect("k ≥ 1"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// d`loss`/d`x`, flattened.
    fn gradient(loss: &Tensor, x: &Var) -> Vec<f32> {
        let grads = loss.backward().unwrap();
        let g = grads.get(x.as_tensor()).unwrap();
        g.flatten_all().unwrap().to_vec1().unwrap()
    }

    #[test]
    fn cpu_op_matches_the_composite_forward_and_routes_gradients_to_the_first_maximum() {
        // Values without ties: forward equal to the composite path; backward: each output's
        // gradient lands on its window's maximum.
        let (n, c, h, w) = (2, 3, 7, 6);
        let v: Vec<f32> = (0..n * c * h * w)
            .map(|i| ((i * 37 % 101) as f32) - 50.0)
            .collect();
        let x = Var::from_tensor(&Tensor::from_vec(v.clone(), (n, c, h, w), &Device::Cpu).unwrap())
            .unwrap();
        let y = max_pool2d(x.as_tensor(), 3, 2, 1).unwrap();
        assert_eq!(y.dims(), &[2, 3, 4, 3]);
        let x64 = x.as_tensor().to_dtype(candle_core::DType::F64).unwrap();
        let y2 = max_pool2d(&x64, 3, 2, 1).unwrap();
        let a: Vec<f32> = y.flatten_all().unwrap().to_vec1().unwrap();
        let b: Vec<f64> = y2.flatten_all().unwrap().to_vec1().unwrap();
        assert!(a.iter().zip(&b).all(|(p, q)| (*p as f64 - q).abs() < 1e-9));
        let grads = y.sum_all().unwrap().backward().unwrap();
        let g: Vec<f32> = grads
            .get(x.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        // Total gradient = number of outputs; each nonzero entry sits on a value that is some
        // output's maximum.
        assert_eq!(g.iter().sum::<f32>() as usize, a.len());
        for (i, &gv) in g.iter().enumerate() {
            if gv > 0.0 {
                assert!(a.contains(&v[i]));
            }
        }
        // Ties: all-equal input sends each window's gradient to its first (top-left) valid cell.
        let x = Var::from_tensor(
            &Tensor::ones((1, 1, 4, 4), candle_core::DType::F32, &Device::Cpu).unwrap(),
        )
        .unwrap();
        let y = max_pool2d(x.as_tensor(), 3, 2, 1).unwrap();
        let g = gradient(&y.sum_all().unwrap(), &x);
        // Windows start at rows/cols -1 and 1: first valid cells (0,0), (0,1), (1,0), (1,1).
        let mut want = vec![0.0f32; 16];
        for j in [0, 1, 4, 5] {
            want[j] = 1.0;
        }
        assert_eq!(g, want);
    }

    #[test]
    fn two_by_two_pooling_floors_odd_sizes_and_keeps_the_first_of_tied_maxima() {
        // 1×1×3×5 → 1×1×1×2 (PyTorch's nn.MaxPool2d(2): the last row and column are dropped).
        #[rustfmt::skip]
        let v: Vec<f32> = vec![
            1.0, 7.0, 3.0, 3.0, 9.0,
            4.0, 2.0, 3.0, 3.0, 9.0,
            8.0, 8.0, 8.0, 8.0, 8.0,
        ];
        let x =
            Var::from_tensor(&Tensor::from_vec(v, (1, 1, 3, 5), &Device::Cpu).unwrap()).unwrap();
        let y = max_pool2d(x.as_tensor(), 2, 2, 0).unwrap();
        assert_eq!(y.dims(), &[1, 1, 1, 2]);
        assert_eq!(
            y.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            [7.0, 3.0]
        );
        let w = Tensor::new(&[[[[10.0f32, 100.0]]]], &Device::Cpu).unwrap();
        let g = gradient(&(y * w).unwrap().sum_all().unwrap(), &x);
        // Window 1's maximum 7 at (0,1); window 2 has four 3s: the first, (0,2), takes it all.
        #[rustfmt::skip]
        let want = vec![
            0.0, 10.0, 100.0, 0.0, 0.0,
            0.0, 0.0, 0.0, 0.0, 0.0,
            0.0, 0.0, 0.0, 0.0, 0.0,
        ];
        assert_eq!(g, want);
    }
}
