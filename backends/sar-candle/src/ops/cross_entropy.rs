//! Pixel-wise weighted cross-entropy of NCHW logits for f32, with its backward, as a candle
//! custom op: the segmentation loss.
//!
//! Logits z `[N, K, H, W]`, labels y `[N, 1, H, W]` (u32, each < K), weights w `[N, 1, H, W]`,
//! a denominator M (mmsegmentation's mean: all N·H·W pixels):
//!
//! - L = Σ_p w_p·(lse_p − z[y_p, p]) / M, lse_p = log Σ_k exp z[k, p] (taken after subtracting
//!   the pixel's maximum);
//! - dL/dz[k, p] = w_p·(softmax_k(z_p) − 𝟙[k = y_p]) / M.
//!
//! Written with candle ops ([`weighted_pixel_nll_composite`], the path of other devices) this is
//! a log-softmax over the channel axis, whose max and sum reduce a non-trailing axis on one
//! thread, a gather, and in the backward a scatter into zeros. Here pixels are processed in
//! blocks (the channel loop inside, so every inner loop runs over contiguous pixels), the loss
//! is summed per block in f64 and the blocks in order: the result does not depend on the
//! thread count.

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

/// Pixels per parallel task.
const BLOCK: usize = 1024;

#[derive(Debug, Clone, Copy)]
struct Geometry {
    n: usize,
    k: usize,
    hw: usize,
}

impl Geometry {
    fn new(z: &[usize], y: &[usize], w: &[usize]) -> candle_core::Result<Self> {
        let [n, k, rest @ ..] = z else {
            candle_core::bail!("pixel cross-entropy takes logits [N, K, …], got {z:?}")
        };
        let hw: usize = rest.iter().product();
        let count = |d: &[usize]| d.iter().product::<usize>();
        if *k == 0 || count(y) != n * hw || count(w) != n * hw || y.first() != Some(n) {
            candle_core::bail!(
                "pixel cross-entropy: logits {z:?} need labels and weights of N·H·W = {} \
                 values, got {y:?} and {w:?}",
                n * hw
            );
        }
        Ok(Geometry { n: *n, k: *k, hw })
    }
}

/// The blocks of the map: (image, first pixel, pixels).
fn blocks(g: &Geometry) -> Vec<(usize, usize, usize)> {
    (0..g.n)
        .flat_map(|i| {
            (0..g.hw.div_ceil(BLOCK)).map(move |b| (i, b * BLOCK, BLOCK.min(g.hw - b * BLOCK)))
        })
        .collect()
}

/// Per pixel of one block: the maximum and Σ exp(z − max), over the K channels.
fn block_stats(
    z: &[f32],
    g: &Geometry,
    (i, p0, len): (usize, usize, usize),
) -> (Vec<f32>, Vec<f32>) {
    let mut max = vec![f32::NEG_INFINITY; len];
    let mut sum = vec![0.0f32; len];
    for k in 0..g.k {
        let row = &z[(i * g.k + k) * g.hw + p0..][..len];
        for (m, &v) in max.iter_mut().zip(row) {
            *m = m.max(v);
        }
    }
    for k in 0..g.k {
        let row = &z[(i * g.k + k) * g.hw + p0..][..len];
        for ((s, &m), &v) in sum.iter_mut().zip(&max).zip(row) {
            *s += (v - m).exp();
        }
    }
    (max, sum)
}

fn labels_of<'a>(s: &'a CpuStorage, l: &Layout, k: usize) -> candle_core::Result<&'a [u32]> {
    let CpuStorage::U32(v) = s else {
        candle_core::bail!("pixel cross-entropy: labels must be u32");
    };
    let Some((a, b)) = l.contiguous_offsets() else {
        candle_core::bail!("pixel cross-entropy: labels must be contiguous");
    };
    let y = &v[a..b];
    if let Some(bad) = y.iter().find(|&&c| c as usize >= k) {
        candle_core::bail!("pixel cross-entropy: label {bad} for {k} classes");
    }
    Ok(y)
}

struct PixelNll {
    denominator: f64,
}

impl CustomOp3 for PixelNll {
    fn name(&self) -> &'static str {
        "sar-pixel-nll"
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
        let g = Geometry::new(l1.dims(), l2.dims(), l3.dims())?;
        let z = super::cpu_f32("pixel cross-entropy", s1, l1, "logits")?;
        let y = labels_of(s2, l2, g.k)?;
        let w = super::cpu_f32("pixel cross-entropy", s3, l3, "weights")?;
        let parts: Vec<f64> = blocks(&g)
            .into_par_iter()
            .map(|blk @ (i, p0, len)| {
                let (max, sum) = block_stats(z, &g, blk);
                let mut acc = 0.0f64;
                for j in 0..len {
                    let p = i * g.hw + p0 + j;
                    if w[p] != 0.0 {
                        let zy = z[(i * g.k + y[p] as usize) * g.hw + p0 + j];
                        let nll = max[j] + sum[j].ln() - zy;
                        acc += f64::from(w[p]) * f64::from(nll);
                    }
                }
                acc
            })
            .collect();
        let total: f64 = parts.iter().sum();
        Ok((
            CpuStorage::F32(vec![(total / self.denominator) as f32]),
            Shape::from(()),
        ))
    }

    fn bwd(
        &self,
        z: &Tensor,
        y: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let upstream = grad.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        let dz = z.apply_op3_no_bwd(
            y,
            w,
            &PixelNllGrad {
                scale: (upstream / self.denominator) as f32,
            },
        )?;
        Ok((Some(dz), None, None))
    }
}

/// (z, y, w) → dz, times `scale` (the upstream gradient over M).
struct PixelNllGrad {
    scale: f32,
}

impl CustomOp3 for PixelNllGrad {
    fn name(&self) -> &'static str {
        "sar-pixel-nll-grad"
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
        let g = Geometry::new(l1.dims(), l2.dims(), l3.dims())?;
        let z = super::cpu_f32("pixel cross-entropy", s1, l1, "logits")?;
        let y = labels_of(s2, l2, g.k)?;
        let w = super::cpu_f32("pixel cross-entropy", s3, l3, "weights")?;
        // Each block writes its K rows of pixels; gathered per block, then placed.
        let parts: Vec<Vec<f32>> = blocks(&g)
            .into_par_iter()
            .map(|blk @ (i, p0, len)| {
                let (max, sum) = block_stats(z, &g, blk);
                let mut out = vec![0.0f32; g.k * len];
                for k in 0..g.k {
                    let row = &z[(i * g.k + k) * g.hw + p0..][..len];
                    let o = &mut out[k * len..(k + 1) * len];
                    for j in 0..len {
                        let p = i * g.hw + p0 + j;
                        let sm = (row[j] - max[j]).exp() / sum[j];
                        let hot = if y[p] as usize == k { 1.0 } else { 0.0 };
                        o[j] = w[p] * self.scale * (sm - hot);
                    }
                }
                out
            })
            .collect();
        let mut dz = vec![0.0f32; z.len()];
        for ((i, p0, len), part) in blocks(&g).into_iter().zip(&parts) {
            for k in 0..g.k {
                dz[(i * g.k + k) * g.hw + p0..][..len].copy_from_slice(&part[k * len..][..len]);
            }
        }
        Ok((CpuStorage::F32(dz), l1.shape().clone()))
    }
}

/// `Σ_p w_p·(−log softmax(z_p)[y_p]) / denominator` of logits `[N, K, H, W]`, labels
/// `[N, 1, H, W]` (u32) and weights `[N, 1, H, W]`, as a scalar: this op on the CPU for f32,
/// [`weighted_pixel_nll_composite`] otherwise. Only the logits get a gradient.
pub fn weighted_pixel_nll(
    logits: &Tensor,
    labels: &Tensor,
    weights: &Tensor,
    denominator: f64,
) -> candle_core::Result<Tensor> {
    if super::all_cpu_f32(&[logits, weights]) && labels.dtype() == DType::U32 {
        logits.contiguous()?.apply_op3(
            &labels.contiguous()?,
            &weights.contiguous()?,
            PixelNll { denominator },
        )
    } else {
        weighted_pixel_nll_composite(logits, labels, weights, denominator)
    }
}

/// The same loss as candle ops: log-softmax over the channel axis, the labels' entries
/// gathered, weighted, summed, negated and divided (any device and dtype).
pub fn weighted_pixel_nll_composite(
    logits: &Tensor,
    labels: &Tensor,
    weights: &Tensor,
    denominator: f64,
) -> candle_core::Result<Tensor> {
    let lsm = candle_nn::ops::log_softmax(logits, 1)?;
    (lsm.gather(labels, 1)? * weights)?.sum_all()?.neg()? / denominator
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::test_util::randn;
    use candle_core::{Device, Var};

    fn case((n, k, h, w): (usize, usize, usize, usize), seed: u64) -> (Tensor, Tensor, Tensor) {
        let mut rng = sar_math::rng::SeededRng::new(seed);
        let y: Vec<u32> = (0..n * h * w)
            .map(|_| (rng.next_u64() % k as u64) as u32)
            .collect();
        // Some pixels ignored (weight 0), the rest weighted unevenly.
        let wt: Vec<f32> = (0..n * h * w)
            .map(|_| {
                if rng.next_f64() < 0.2 {
                    0.0
                } else {
                    0.5 + rng.next_f64() as f32
                }
            })
            .collect();
        (
            (randn((n, k, h, w)) * 3.0).unwrap(),
            Tensor::from_vec(y, (n, 1, h, w), &Device::Cpu).unwrap(),
            Tensor::from_vec(wt, (n, 1, h, w), &Device::Cpu).unwrap(),
        )
    }

    /// Loss and logit gradient of the f32 op against the composite run in f64, over maps
    /// smaller and larger than a block and an upstream gradient other than 1.
    #[test]
    fn matches_the_f64_composite() {
        for (dims, seed) in [
            ((2, 5, 7, 9), 1),
            ((1, 19, 40, 33), 2),
            ((3, 1, 2, 2), 3),
            ((2, 3, 1, 1), 4),
        ] {
            let (z, y, w) = case(dims, seed);
            let m = (dims.0 * dims.2 * dims.3) as f64;
            let run = |dtype: DType, fused: bool| -> (f64, Vec<f64>) {
                let zv = Var::from_tensor(&z.to_dtype(dtype).unwrap()).unwrap();
                let wd = w.to_dtype(dtype).unwrap();
                let f = if fused {
                    weighted_pixel_nll
                } else {
                    weighted_pixel_nll_composite
                };
                let loss = f(zv.as_tensor(), &y, &wd, m).unwrap();
                let g = (&loss * 1.7).unwrap().backward().unwrap();
                (
                    loss.to_dtype(DType::F64).unwrap().to_scalar().unwrap(),
                    g.get(zv.as_tensor())
                        .unwrap()
                        .to_dtype(DType::F64)
                        .unwrap()
                        .flatten_all()
                        .unwrap()
                        .to_vec1()
                        .unwrap(),
                )
            };
            let (l32, g32) = run(DType::F32, true);
            let (l64, g64) = run(DType::F64, false);
            assert!(
                (l32 - l64).abs() < 1e-6 * (1.0 + l64.abs()),
                "{dims:?}: {l32} vs {l64}"
            );
            let scale = g64.iter().fold(1e-30f64, |a, v| a.max(v.abs()));
            for (a, b) in g32.iter().zip(&g64) {
                assert!((a - b).abs() < 1e-5 * scale, "{dims:?}: {a} vs {b}");
            }
        }
    }

    /// By hand: two classes, logits (0, ln 3) at one pixel labelled 1 with weight 2, M = 4:
    /// L = 2·(log 4 − log 3)/4, dL/dz = 2·(¼ − 0, ¾ − 1)/4.
    #[test]
    fn hand_values() {
        let z = Var::from_tensor(
            &Tensor::new(&[0.0f32, 3f32.ln()], &Device::Cpu)
                .unwrap()
                .reshape((1, 2, 1, 1))
                .unwrap(),
        )
        .unwrap();
        let y = Tensor::new(&[1u32], &Device::Cpu)
            .unwrap()
            .reshape((1, 1, 1, 1))
            .unwrap();
        let w = Tensor::new(&[2.0f32], &Device::Cpu)
            .unwrap()
            .reshape((1, 1, 1, 1))
            .unwrap();
        let loss = weighted_pixel_nll(z.as_tensor(), &y, &w, 4.0).unwrap();
        let want = 2.0 * (4f64.ln() - 3f64.ln()) / 4.0;
        assert!((f64::from(loss.to_scalar::<f32>().unwrap()) - want).abs() < 1e-7);
        let g = loss.backward().unwrap();
        let d: Vec<f32> = g
            .get(z.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert!(
            (d[0] - 0.125).abs() < 1e-7 && (d[1] + 0.125).abs() < 1e-7,
            "{d:?}"
        );
    }

    #[test]
    fn bad_labels_and_shapes_are_errors() {
        let (z, _, w) = case((1, 3, 2, 2), 5);
        let y = Tensor::new(&[0u32, 1, 3, 2], &Device::Cpu)
            .unwrap()
            .reshape((1, 1, 2, 2))
            .unwrap();
        let err = weighted_pixel_nll(&z, &y, &w, 4.0).unwrap_err().to_string();
        assert!(err.contains("label 3 for 3 classes"), "{err}");
        let y = Tensor::new(&[0u32, 1, 2], &Device::Cpu)
            .unwrap()
            .reshape((1, 1, 3))
            .unwrap();
        let err = weighted_pixel_nll(&z, &y, &w, 4.0).unwrap_err().to_string();
        assert!(err.contains("N·H·W = 4"), "{err}");
    }
}
