//! The embedded long-tailed glyph mosaic.

use super::{SegDataset, SegSample, SegSource};
use crate::{DataError, ImageSet, Result};
use sar_math::rng::SeededRng;

/// Settings of [`glyph_mosaic`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MosaicConfig {
    /// Canvas side in pixels.
    pub size: usize,
    /// Number of canvases.
    pub count: usize,
    /// Glyphs per canvas (at most; a glyph that does not fit is skipped).
    pub glyphs: usize,
    /// Frequency of digit d ∝ imbalance^(−d/9): digit 0 is `imbalance` times as common as 9.
    pub imbalance: f64,
    /// Seed.
    pub seed: u64,
}

/// The 11 classes of the mosaic.
pub fn mosaic_class_names() -> Vec<String> {
    std::iter::once("background".to_string())
        .chain((0..10).map(|d| format!("digit {d}")))
        .collect()
}

/// A long-tailed segmentation set built from real handwritten digits (`glyphs`, 8×8 images
/// with values 0..16, such as [`crate::digits::embedded`]). Each canvas (`size` × `size`, a
/// noisy background of a random colour) is a grid of 32 × 32 cells; up to `glyphs` distinct
/// cells receive a digit, scaled ×3 or ×4 (nearest) at a random offset inside its cell, its
/// ink a random colour of strong contrast with the background, blended by stroke intensity.
/// Labels: the digit's class (digit + 1) on the glyph's *shape* — the pixels whose 8×8
/// source pixel or one of its 8 neighbours has ink ≥ 4/16, i.e. the stroke widened by one
/// source pixel, so the shape stays resolvable by output-stride-8 networks — and background
/// (0) elsewhere. Glyphs never overlap. Digit classes are drawn with frequency ∝
/// `imbalance^(−d/9)`, so the rare classes are rare in images *and* pixels. Colour carries no
/// class information: only the shape does.
pub fn glyph_mosaic(glyphs: &ImageSet, cfg: &MosaicConfig, name: &str) -> Result<SegDataset> {
    if glyphs.channels != 1 || glyphs.height != 8 || glyphs.width != 8 || glyphs.classes != 10 {
        return Err(DataError::Request(format!(
            "the mosaic needs 8×8 single-channel glyphs of 10 classes, got {}×{}×{} of {}",
            glyphs.channels, glyphs.height, glyphs.width, glyphs.classes
        )));
    }
    if cfg.size < 32 || cfg.imbalance.is_nan() || cfg.imbalance < 1.0 {
        return Err(DataError::Request(format!(
            "mosaic size must be ≥ 32 and imbalance ≥ 1, got {} and {}",
            cfg.size, cfg.imbalance
        )));
    }
    let mut by_class: Vec<Vec<usize>> = vec![Vec::new(); 10];
    for (i, &l) in glyphs.labels.iter().enumerate() {
        by_class[l as usize].push(i);
    }
    if let Some(d) = by_class.iter().position(|v| v.is_empty()) {
        return Err(DataError::Request(format!(
            "the glyph set has no digit {d}"
        )));
    }
    let weights: Vec<f64> = (0..10)
        .map(|d| cfg.imbalance.powf(-(d as f64) / 9.0))
        .collect();
    let total: f64 = weights.iter().sum();
    let s = cfg.size;
    let grid = s / 32;
    let mut rng = SeededRng::new(cfg.seed ^ 0x4D4F_5341_4943);
    let mut samples = Vec::with_capacity(cfg.count);
    for _ in 0..cfg.count {
        let base: [f64; 3] = std::array::from_fn(|_| 30.0 + 195.0 * rng.next_f64());
        let mut image = vec![0u8; s * s * 3];
        for px in image.chunks_mut(3) {
            for (c, v) in px.iter_mut().enumerate() {
                *v = (base[c] + 30.0 * (rng.next_f64() - 0.5)).clamp(0.0, 255.0) as u8;
            }
        }
        let mut label = vec![0u8; s * s];
        // A seeded shuffle of the cells; the first `glyphs` get a digit.
        let mut cells: Vec<usize> = (0..grid * grid).collect();
        for i in (1..cells.len()).rev() {
            cells.swap(i, (rng.next_u64() % (i as u64 + 1)) as usize);
        }
        for &cell in cells.iter().take(cfg.glyphs) {
            let mut u = rng.next_f64() * total;
            let mut digit = 9;
            for (d, &w) in weights.iter().enumerate() {
                if u < w {
                    digit = d;
                    break;
                }
                u -= w;
            }
            let pool = &by_class[digit];
            let g = pool[(rng.next_u64() % pool.len() as u64) as usize];
            let scale = 3 + (rng.next_u64() % 2) as usize;
            let side = 8 * scale;
            let y0 = (cell / grid) * 32 + (rng.next_u64() % (32 - side + 1) as u64) as usize;
            let x0 = (cell % grid) * 32 + (rng.next_u64() % (32 - side + 1) as u64) as usize;
            // Ink: each channel half the range away from the background, ±40.
            let ink: [f64; 3] = std::array::from_fn(|c| {
                (base[c] + 128.0 + 80.0 * (rng.next_f64() - 0.5)).rem_euclid(256.0)
            });
            let pixels = &glyphs.images[g * 64..(g + 1) * 64];
            let shape = |gy: usize, gx: usize| {
                (gy.saturating_sub(1)..(gy + 2).min(8)).any(|y| {
                    (gx.saturating_sub(1)..(gx + 2).min(8)).any(|x| pixels[y * 8 + x] >= 4)
                })
            };
            for y in 0..side {
                for x in 0..side {
                    let (gy, gx) = (y / scale, x / scale);
                    let p = (y0 + y) * s + x0 + x;
                    if shape(gy, gx) {
                        label[p] = digit as u8 + 1;
                    }
                    let v = pixels[gy * 8 + gx] as f64 / 16.0;
                    for c in 0..3 {
                        let old = image[p * 3 + c] as f64;
                        image[p * 3 + c] = (old * (1.0 - v) + ink[c] * v).round() as u8;
                    }
                }
            }
        }
        samples.push(SegSample {
            height: s,
            width: s,
            image,
            label,
        });
    }
    Ok(SegDataset {
        name: name.to_string(),
        class_names: mosaic_class_names(),
        source: SegSource::Memory(samples),
    })
}
