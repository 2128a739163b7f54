//! # sar-cpu: the parallel CPU drivers of SAR's fused kernels
//!
//! `sar-math` is single-threaded and allocation-free by design. This crate runs its kernels on
//! rayon's pool over plain slices, so every CPU adapter (ndarray, candle's CPU custom op, ...)
//! shares one parallel implementation instead of each writing its own.
//!
//! [`p2a_nchw_parallel`]: features NCHW `[B, D, H, W]`, labels `[B, H', W']`, anchors `[C, D]`,
//! all row-major. Labels are validated in full and resampled once to H×W (PyTorch's legacy
//! `nearest`); each image's channel planes are then split into blocks, and the blocks run in
//! parallel through [`sar_math::p2a::p2a_nchw_block`]. Block sums are added in block order, so
//! the result has the same bits for any number of threads.
//!
//! [`gemm`]: single-thread matrix products over strided slice views (the gemm crate, f32 and
//! f64), the arithmetic of the CPU convolutions (candle's and dfdx's).
//!
//! [`same_conv`]: a direct AVX-512 kernel for stride-1 "same" convolutions (forward, input and
//! filter gradients, f32), which candle's CPU convolution uses in place of im2col + gemm.
//!
//! [`scratch`]: per-thread buffers kept between calls, for the CPU convolutions' im2col
//! matrices (candle's and dfdx's).

pub mod gemm;
pub mod same_conv;
pub mod scratch;

use rayon::prelude::*;
use sar_math::p2a::{p2a_nchw_block, p2a_valid_count_nchw, FeatureGeometry, P2aTargets};
use sar_math::{Label, Op, Real, SarError};

/// Scalar result of a parallel p2a.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct P2aResult<F> {
    /// L_p2a (unweighted).
    pub loss: F,
    /// |Ω|.
    pub valid: usize,
}

/// Fused, parallel L_p2a and `grad_weight · dL_p2a/dF` for NCHW features.
///
/// `grad` (the features' length) receives the gradient scaled by `grad_weight` (pass λ2 to get
/// the gradient of λ2·L_p2a in the same pass); `None` computes the loss only.
pub fn p2a_nchw_parallel<F: Real, L: Label + Default>(
    features: &[F],
    labels: &[L],
    geometry: &FeatureGeometry,
    targets: &P2aTargets<'_, F>,
    grad: Option<&mut [F]>,
    grad_weight: f64,
) -> Result<P2aResult<F>, SarError> {
    let op = Op::P2a;
    let n = geometry.feature_len()?;
    if features.len() != n {
        return Err(SarError::Length {
            op,
            what: "features",
            expected: n,
            actual: features.len(),
        });
    }
    if let Some(g) = &grad {
        if g.len() != n {
            return Err(SarError::Length {
                op,
                what: "grad_features",
                expected: n,
                actual: g.len(),
            });
        }
    }
    let valid = p2a_valid_count_nchw(labels, geometry, targets)?;
    let FeatureGeometry {
        batch: b,
        channels: d,
        height: h,
        width: w,
        label_height: lh,
        label_width: lw,
    } = *geometry;
    let hw = h * w;
    if hw == 0 || b == 0 {
        return Ok(P2aResult {
            loss: F::zero(),
            valid,
        });
    }
    // Resample once, so that the blocks read labels at feature resolution (identity mapping).
    let mut resampled = vec![L::default(); b * hw];
    sar_math::resample::resample_labels_nearest(labels, b, (lh, lw), (h, w), &mut resampled)?;
    let at_feature = FeatureGeometry {
        label_height: h,
        label_width: w,
        ..*geometry
    };
    let scale = if valid == 0 {
        F::zero()
    } else {
        F::from_f64(grad_weight * 2.0 / (valid as f64 * d as f64))
    };
    // Enough blocks to keep every thread busy, never crossing an image.
    let blocks_per_image = (2 * rayon::current_num_threads()).div_ceil(b).max(1);
    let block_channels = d.div_ceil(blocks_per_image).max(1);
    let per_image = d.div_ceil(block_channels);
    let (image_len, block_len) = (d * hw, block_channels * hw);
    let run = |i: usize, fb: &[F], gb: Option<&mut [F]>| -> Result<f64, SarError> {
        let (img, j) = (i / per_image, i % per_image);
        p2a_nchw_block(
            fb,
            gb,
            &resampled[img * hw..(img + 1) * hw],
            &at_feature,
            j * block_channels,
            targets,
            scale,
        )
    };
    let f_blocks: Vec<&[F]> = features
        .chunks(image_len)
        .flat_map(|img| img.chunks(block_len))
        .collect();
    let sums: Vec<f64> = match grad {
        Some(g) => {
            let g_blocks: Vec<&mut [F]> = g
                .chunks_mut(image_len)
                .flat_map(|img| img.chunks_mut(block_len))
                .collect();
            f_blocks
                .into_par_iter()
                .zip(g_blocks)
                .enumerate()
                .map(|(i, (fb, gb))| run(i, fb, Some(gb)))
                .collect::<Result<_, _>>()?
        }
        None => f_blocks
            .into_par_iter()
            .enumerate()
            .map(|(i, fb)| run(i, fb, None))
            .collect::<Result<_, _>>()?,
    };
    // Block order, not completion order: the same bits for any thread count.
    let sum_sq: f64 = sums.iter().sum();
    let loss = F::from_f64(if valid == 0 {
        0.0
    } else {
        sum_sq / (valid as f64 * d as f64)
    });
    if !loss.is_finite() {
        return Err(SarError::NonFinite {
            op,
            what: "L_p2a (features inside Ω)",
        });
    }
    Ok(P2aResult { loss, valid })
}

#[cfg(test)]
mod tests {
    use super::*;
    use sar_math::p2a::p2a_nchw;

    #[test]
    fn equals_the_serial_kernel_for_any_thread_count() {
        let g = FeatureGeometry {
            batch: 2,
            channels: 37,
            height: 19,
            width: 23,
            label_height: 41,
            label_width: 50,
        };
        let mut rng = sar_math::rng::SeededRng::new(9);
        let f: Vec<f32> = (0..g.feature_len().unwrap())
            .map(|_| rng.next_normal() as f32)
            .collect();
        let labels: Vec<u8> = (0..g.label_len().unwrap())
            .map(|_| match rng.next_u64() % 6 {
                5 => 255,
                c => c as u8,
            })
            .collect();
        let a: Vec<f32> = (0..5 * 37).map(|_| rng.next_normal() as f32).collect();
        let t = P2aTargets {
            anchors: &a,
            classes: 5,
            ignore_index: 255,
            class_active: None,
        };
        let mut g_serial = vec![0f32; f.len()];
        let serial = p2a_nchw(&f, &labels, &g, &t, Some(&mut g_serial)).unwrap();
        let mut results = Vec::new();
        for threads in [1, 2, 3, 8] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            let mut grad = vec![0f32; f.len()];
            let r = pool
                .install(|| p2a_nchw_parallel(&f, &labels, &g, &t, Some(&mut grad), 1.0))
                .unwrap();
            assert_eq!(grad, g_serial, "{threads} threads");
            assert_eq!(r.valid, serial.valid);
            assert!((r.loss - serial.loss).abs() <= 1e-6 * serial.loss);
            results.push(r.loss);
        }
        // Block sums are added in block order: for a fixed block split, the same bits.
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .unwrap();
        let again = pool
            .install(|| p2a_nchw_parallel(&f, &labels, &g, &t, None, 1.0))
            .unwrap();
        assert_eq!(again.loss, results[1]);
        // grad_weight scales the gradient only.
        let mut g3 = vec![0f32; f.len()];
        let r3 = p2a_nchw_parallel(&f, &labels, &g, &t, Some(&mut g3), 0.5).unwrap();
        assert_eq!(
            r3.loss,
            p2a_nchw_parallel(&f, &labels, &g, &t, None, 1.0)
                .unwrap()
                .loss
        );
        for (x, y) in g3.iter().zip(&g_serial) {
            assert!((x - 0.5 * y).abs() <= 1e-7 * y.abs());
        }
    }
}
