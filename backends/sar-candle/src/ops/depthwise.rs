//! Depth-wise k×k convolution with bias (stride 1, zero padding k/2, k odd) for f32 NCHW, with
//! its backward, as candle custom ops.
//!
//! x `[N, C, H, W]`, w `[C, 1, k, k]`, b `[C]`, p = k/2, y like x:
//!
//! - `y[n,c,i,j] = b[c] + Σ_{u,v<k} w[c,u,v]·x[n,c,i+u−p,j+v−p]` (x = 0 outside the map);
//! - `dx[n,c,i,j] = Σ_{u,v} w[c,u,v]·dy[n,c,i−u+p,j−v+p]`;
//! - `dw[c,u,v] = Σ_{n,i,j} dy[n,c,i,j]·x[n,c,i+u−p,j+v−p]`, `db[c] = Σ_{n,i,j} dy[n,c,i,j]`.
//!
//! The forward adds the taps in row-major order (u, then v) and the bias last, the order of
//! the composite of k² shifted, scaled copies ([`depthwise_conv2d_composite`], the path other
//! devices take), so the two agree bit for bit. candle runs a grouped convolution as one
//! convolution per group (thousands of them for a Mix-FFN), and the composite costs ~3k²
//! passes over the map with a single-threaded reduction per tap in its backward; here each
//! (image, channel) plane is one task and dw, db sum images in order per channel.

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Shape, Tensor};
use rayon::prelude::*;

#[derive(Debug, Clone, Copy)]
struct Geometry {
    n: usize,
    c: usize,
    h: usize,
    w: usize,
    k: usize,
}

impl Geometry {
    fn new(x: &[usize], w: &[usize]) -> candle_core::Result<Self> {
        let ([n, c, h, wd], [wc, 1, k, k2]) = (x, w) else {
            candle_core::bail!(
                "depth-wise conv takes x [N, C, H, W] and w [C, 1, k, k], got {x:?} and {w:?}"
            )
        };
        if wc != c || k != k2 || k % 2 == 0 {
            candle_core::bail!(
                "depth-wise conv: weight {w:?} for input {x:?} (need [C, 1, k, k], k odd)"
            );
        }
        Ok(Geometry {
            n: *n,
            c: *c,
            h: *h,
            w: *wd,
            k: *k,
        })
    }

    fn plane(&self) -> usize {
        self.h * self.w
    }

    /// For tap offset `d` (= u − p) on an axis of length `len`: the output range whose source
    /// `o + d` lies inside the axis.
    fn valid(d: isize, len: usize) -> std::ops::Range<usize> {
        let lo = (-d).max(0) as usize;
        let hi = (len as isize - d.max(0)).max(0) as usize;
        lo.min(hi)..hi
    }
}

/// One plane: out += Σ taps w·shift(src), taps in row-major order; `flip` takes the kernel
/// rotated by 180° (the input gradient's correlation).
fn correlate_plane(src: &[f32], taps: &[f32], g: &Geometry, flip: bool, out: &mut [f32]) {
    let p = (g.k / 2) as isize;
    for u in 0..g.k {
        for v in 0..g.k {
            let (du, dv) = if flip {
                (p - u as isize, p - v as isize)
            } else {
                (u as isize - p, v as isize - p)
            };
            let wt = taps[u * g.k + v];
            let cols = Geometry::valid(dv, g.w);
            for i in Geometry::valid(du, g.h) {
                let si = (i as isize + du) as usize;
                let (o, s) = (
                    &mut out[i * g.w + cols.start..i * g.w + cols.end],
                    &src[si * g.w..(si + 1) * g.w],
                );
                let s = &s[(cols.start as isize + dv) as usize..(cols.end as isize + dv) as usize];
                for (a, &b) in o.iter_mut().zip(s) {
                    *a += wt * b;
                }
            }
        }
    }
}

struct Depthwise;

impl CustomOp3 for Depthwise {
    fn name(&self) -> &'static str {
        "sar-depthwise-conv2d"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let g = Geometry::new(l1.dims(), l2.dims())?;
        let x = super::cpu_f32("depth-wise conv", s1, l1, "input")?;
        let w = super::cpu_f32("depth-wise conv", s2, l2, "weight")?;
        let b = super::cpu_f32("depth-wise conv", s3, l3, "bias")?;
        if b.len() != g.c {
            candle_core::bail!("depth-wise conv: bias of {} for {} channels", b.len(), g.c);
        }
        let kk = g.k * g.k;
        let mut y = vec![0.0f32; x.len()];
        y.par_chunks_mut(g.plane().max(1))
            .zip(x.par_chunks(g.plane().max(1)))
            .enumerate()
            .for_each(|(plane, (out, src))| {
                let c = plane % g.c;
                correlate_plane(src, &w[c * kk..(c + 1) * kk], &g, false, out);
                for v in out.iter_mut() {
                    *v += b[c];
                }
            });
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let dx = grad.apply_op2_no_bwd(w, &DepthwiseGradInput)?;
        let params = x.apply_op2_no_bwd(&grad, &DepthwiseGradParams { k: w.dim(2)? })?;
        let kk = params.dim(1)? - 1;
        let dw = params.narrow(1, 0, kk)?.contiguous()?.reshape(w.shape())?;
        let db = params.narrow(1, kk, 1)?.contiguous()?.flatten_all()?;
        Ok((Some(dx), Some(dw), Some(db)))
    }
}

/// (dy, w) → dx.
struct DepthwiseGradInput;

impl CustomOp2 for DepthwiseGradInput {
    fn name(&self) -> &'static str {
        "sar-depthwise-conv2d-grad-input"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let g = Geometry::new(l1.dims(), l2.dims())?;
        let dy = super::cpu_f32("depth-wise conv", s1, l1, "output gradient")?;
        let w = super::cpu_f32("depth-wise conv", s2, l2, "weight")?;
        let kk = g.k * g.k;
        let mut dx = vec![0.0f32; dy.len()];
        dx.par_chunks_mut(g.plane().max(1))
            .zip(dy.par_chunks(g.plane().max(1)))
            .enumerate()
            .for_each(|(plane, (out, src))| {
                let c = plane % g.c;
                correlate_plane(src, &w[c * kk..(c + 1) * kk], &g, true, out);
            });
        Ok((CpuStorage::F32(dx), l1.shape().clone()))
    }
}

/// (x, dy) → `[C, k² + 1]`: dw flattened, then db.
struct DepthwiseGradParams {
    k: usize,
}

impl CustomOp2 for DepthwiseGradParams {
    fn name(&self) -> &'static str {
        "sar-depthwise-conv2d-grad-params"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let c = l1.dims().get(1).copied().unwrap_or(0);
        let g = Geometry::new(l1.dims(), &[c, 1, self.k, self.k])?;
        let x = super::cpu_f32("depth-wise conv", s1, l1, "input")?;
        let dy = super::cpu_f32("depth-wise conv", s2, l2, "output gradient")?;
        if dy.len() != x.len() {
            candle_core::bail!(
                "depth-wise conv gradient {:?} for input {:?}",
                l2.dims(),
                l1.dims()
            );
        }
        let (kk, plane, p) = (g.k * g.k, g.plane(), (g.k / 2) as isize);
        let mut out = vec![0.0f32; g.c * (kk + 1)];
        out.par_chunks_mut(kk + 1).enumerate().for_each(|(c, row)| {
            let mut acc = vec![0.0f64; kk + 1];
            for n in 0..g.n {
                let at = (n * g.c + c) * plane;
                let (xs, gs) = (&x[at..at + plane], &dy[at..at + plane]);
                for u in 0..g.k {
                    for v in 0..g.k {
                        let (du, dv) = (u as isize - p, v as isize - p);
                        let cols = Geometry::valid(dv, g.w);
                        for i in Geometry::valid(du, g.h) {
                            let si = (i as isize + du) as usize;
                            let gr = &gs[i * g.w + cols.start..i * g.w + cols.end];
                            let xr = &xs[si * g.w..(si + 1) * g.w];
                            let xr = &xr[(cols.start as isize + dv) as usize
                                ..(cols.end as isize + dv) as usize];
                            acc[u * g.k + v] += super::dot_f32(gr, Some(xr));
                        }
                    }
                }
                acc[kk] += super::sum_f32(gs);
            }
            for (o, a) in row.iter_mut().zip(&acc) {
                *o = *a as f32;
            }
        });
        Ok((CpuStorage::F32(out), Shape::from((g.c, kk + 1))))
    }
}

/// Depth-wise k×k conv of `x` with `weight` `[C, 1, k, k]` and `bias` `[C]` (stride 1,
/// padding k/2): this op on the CPU for f32, [`depthwise_conv2d_composite`] otherwise.
pub fn depthwise_conv2d(x: &Tensor, weight: &Tensor, bias: &Tensor) -> candle_core::Result<Tensor> {
    if super::all_cpu_f32(&[x, weight, bias]) {
        x.contiguous()?
            .apply_op3(&weight.contiguous()?, &bias.contiguous()?, Depthwise)
    } else {
        depthwise_conv2d_composite(x, weight, bias)
    }
}

/// The same convolution as k² shifted, per-channel scaled copies of the zero-padded map,
/// summed in row-major tap order, plus the bias: candle tensor ops with candle's gradients,
/// for any device and dtype.
pub fn depthwise_conv2d_composite(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
) -> candle_core::Result<Tensor> {
    let (_, c, h, w) = x.dims4()?;
    Geometry::new(x.dims(), weight.dims())?;
    let k = weight.dim(2)?;
    let p = k / 2;
    let padded = x.pad_with_zeros(2, p, p)?.pad_with_zeros(3, p, p)?;
    let mut acc: Option<Tensor> = None;
    for u in 0..k {
        for v in 0..k {
            let tap = padded.narrow(2, u, h)?.narrow(3, v, w)?;
            let wt = weight
                .narrow(2, u, 1)?
                .narrow(3, v, 1)?
                .reshape((1, c, 1, 1))?;
            let term = tap.broadcast_mul(&wt)?;
            acc = Some(match acc {
                None => term,
                Some(a) => (a + term)?,
            });
        }
    }
    match acc {
        Some(a) => a.broadcast_add(&bias.reshape((1, c, 1, 1))?),
        None => candle_core::bail!("depth-wise conv with an empty kernel"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::test_util::{flat, randn};
    use candle_core::Var;

    /// Direct f64 loops over the definition in the module docs: y, dx, dw, db.
    fn naive(
        x: &[f64],
        w: &[f64],
        b: &[f64],
        up: &[f64],
        (n, c, h, wd, k): (usize, usize, usize, usize, usize),
    ) -> [Vec<f64>; 4] {
        let p = (k / 2) as isize;
        let mut y = vec![0.0; x.len()];
        let (mut dx, mut dw, mut db) = (vec![0.0; x.len()], vec![0.0; w.len()], vec![0.0; c]);
        for i in 0..n {
            for ch in 0..c {
                for oy in 0..h {
                    for ox in 0..wd {
                        let yi = ((i * c + ch) * h + oy) * wd + ox;
                        y[yi] += b[ch];
                        db[ch] += up[yi];
                        for u in 0..k {
                            for v in 0..k {
                                let iy = oy as isize + u as isize - p;
                                let ix = ox as isize + v as isize - p;
                                if iy < 0 || ix < 0 || iy >= h as isize || ix >= wd as isize {
                                    continue;
                                }
                                let xi = ((i * c + ch) * h + iy as usize) * wd + ix as usize;
                                let wi = (ch * k + u) * k + v;
                                y[yi] += w[wi] * x[xi];
                                dx[xi] += w[wi] * up[yi];
                                dw[wi] += x[xi] * up[yi];
                            }
                        }
                    }
                }
            }
        }
        [y, dx, dw, db]
    }

    /// Forward and the three gradients against direct f64 loops, and the forward against the
    /// composite bit for bit, for maps smaller and larger than the kernel, k = 1, 3, 5.
    #[test]
    fn matches_direct_loops_and_the_composite() {
        for geo in [
            (2, 3, 7, 5, 3),
            (1, 4, 2, 3, 3),
            (3, 2, 1, 1, 3),
            (2, 5, 9, 8, 5),
            (2, 3, 4, 4, 1),
            (1, 16, 16, 16, 3),
        ] {
            let (n, c, h, w, k) = geo;
            let x = Var::from_tensor(&randn((n, c, h, w))).unwrap();
            let wt = Var::from_tensor(&randn((c, 1, k, k))).unwrap();
            let b = Var::from_tensor(&randn(c)).unwrap();
            let up = randn((n, c, h, w));
            let ours = depthwise_conv2d(x.as_tensor(), wt.as_tensor(), b.as_tensor()).unwrap();
            let composite =
                depthwise_conv2d_composite(x.as_tensor(), wt.as_tensor(), b.as_tensor()).unwrap();
            assert_eq!(
                flat(&ours),
                flat(&composite),
                "forward vs composite {geo:?}"
            );
            let want = naive(
                &flat(x.as_tensor()),
                &flat(wt.as_tensor()),
                &flat(b.as_tensor()),
                &flat(&up),
                geo,
            );
            let g = (&ours * &up)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let got = [
                flat(&ours),
                flat(g.get(x.as_tensor()).unwrap()),
                flat(g.get(wt.as_tensor()).unwrap()),
                flat(g.get(b.as_tensor()).unwrap()),
            ];
            for ((what, a), b) in ["forward", "dx", "dw", "db"].iter().zip(&got).zip(&want) {
                assert_eq!(a.len(), b.len(), "{what} {geo:?}");
                let scale = b.iter().fold(1.0f64, |m, v| m.max(v.abs()));
                for (u, v) in a.iter().zip(b) {
                    assert!((u - v).abs() < 1e-5 * scale, "{what} {geo:?}: {u} vs {v}");
                }
            }
        }
    }

    #[test]
    fn shape_errors_are_errors() {
        let x = randn((1, 2, 4, 4));
        for (w, b, needle) in [
            (randn((3, 1, 3, 3)), randn(3), "need [C, 1, k, k], k odd"),
            (randn((2, 1, 2, 2)), randn(2), "k odd"),
            (
                randn((2, 2, 3, 3)),
                randn(2),
                "got [1, 2, 4, 4] and [2, 2, 3, 3]",
            ),
            (randn((2, 1, 3, 3)), randn(3), "bias of 3 for 2 channels"),
        ] {
            let err = depthwise_conv2d(&x, &w, &b).unwrap_err().to_string();
            assert!(err.contains(needle), "{err}");
        }
    }
}
