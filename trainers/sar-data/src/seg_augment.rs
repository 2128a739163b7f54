//! mmsegmentation's standard training pipeline for segmentation, as a function of a seeded
//! generator, and the test-time input preparation.
//!
//! Training ([`augment`]), in mmsegmentation's order:
//! 1. **Random resize** (`RandomResize(scale, ratio_range, keep_ratio=True)`): r ~ U(lo, hi),
//!    target (r·W_s, r·H_s); the image is rescaled by
//!    f = min(max(target)/max(h, w), min(target)/min(h, w)) to (⌊w·f + ½⌋, ⌊h·f + ½⌋) —
//!    bilinear with half-pixel centres for the image, nearest (PyTorch's legacy rule,
//!    [`sar_math::resample`]) for the labels.
//! 2. **Random crop** (`RandomCrop(crop, cat_max_ratio=0.75)`): offsets uniform in
//!    `0..=max(size − crop, 0)`; up to 10 draws until the crop holds ≥ 2 classes and no class
//!    covers ≥ 75 % of its labelled pixels (the last draw is kept otherwise).
//! 3. **Flip** left–right with probability ½.
//! 4. **Photometric distortion** (`PhotoMetricDistortion`), on 8-bit values as mmsegmentation
//!    does it (each step clips to 0..255 and truncates): brightness ±32 (p ½); contrast ×U(0.5,
//!    1.5) (p ½) either first or last (p ½ each); in 8-bit HSV (OpenCV's convention, H in
//!    0..180), saturation ×U(0.5, 1.5) (p ½) and hue +U{−18..18} mod 180 (p ½).
//! 5. **Normalise** with ImageNet's mean (123.675, 116.28, 103.53) and std (58.395, 57.12,
//!    57.375), then **pad** to the crop size: image 0 (after normalisation), labels 255.
//!
//! Every pixel moves with its label: the geometric steps apply one coordinate map to both.

use crate::seg::{SegSample, IGNORE};
use sar_math::resample::nearest_source_index;
use sar_math::rng::SeededRng;

/// ImageNet mean of the RGB channels (0..255).
pub const MEAN: [f32; 3] = [123.675, 116.28, 103.53];
/// ImageNet standard deviation of the RGB channels (0..255).
pub const STD: [f32; 3] = [58.395, 57.12, 57.375];

/// Settings of the training pipeline.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SegAugment {
    /// Base scale (W, H) of the random resize (Cityscapes: (2048, 1024)).
    pub scale: (usize, usize),
    /// Ratio range of the random resize (0.5, 2.0).
    pub ratio_range: (f64, f64),
    /// Crop (H, W).
    pub crop: (usize, usize),
    /// Largest share of one class in a crop (0.75; 1 disables the check).
    pub cat_max_ratio: f64,
    /// Random horizontal flip.
    pub flip: bool,
    /// Photometric distortion.
    pub photometric: bool,
}

fn uniform(rng: &mut SeededRng, lo: f64, hi: f64) -> f64 {
    lo + (hi - lo) * rng.next_f64()
}
fn coin(rng: &mut SeededRng) -> bool {
    rng.next_u64() & 1 == 1
}

/// Bilinear resize of interleaved RGB (half-pixel centres, edges clamped), rounded.
pub fn resize_image(img: &[u8], h: usize, w: usize, oh: usize, ow: usize) -> Vec<u8> {
    if (h, w) == (oh, ow) {
        return img.to_vec();
    }
    let axis = |input: usize, output: usize| -> Vec<(usize, usize, f32)> {
        let scale = input as f32 / output as f32;
        (0..output)
            .map(|o| {
                let src = ((o as f32 + 0.5) * scale - 0.5).max(0.0);
                let i0 = (src as usize).min(input - 1);
                (i0, (i0 + 1).min(input - 1), src - i0 as f32)
            })
            .collect()
    };
    let (ys, xs) = (axis(h, oh), axis(w, ow));
    let mut out = vec![0u8; oh * ow * 3];
    for (oy, &(y0, y1, ly)) in ys.iter().enumerate() {
        for (ox, &(x0, x1, lx)) in xs.iter().enumerate() {
            for c in 0..3 {
                let at = |y: usize, x: usize| img[(y * w + x) * 3 + c] as f32;
                let v = (1.0 - ly) * ((1.0 - lx) * at(y0, x0) + lx * at(y0, x1))
                    + ly * ((1.0 - lx) * at(y1, x0) + lx * at(y1, x1));
                out[(oy * ow + ox) * 3 + c] = v.round().clamp(0.0, 255.0) as u8;
            }
        }
    }
    out
}

/// Nearest-neighbour resize of a label map (PyTorch's legacy `nearest` per axis).
pub fn resize_labels(lbl: &[u8], h: usize, w: usize, oh: usize, ow: usize) -> Vec<u8> {
    let ys: Vec<usize> = (0..oh).map(|o| nearest_source_index(h, oh, o)).collect();
    let xs: Vec<usize> = (0..ow).map(|o| nearest_source_index(w, ow, o)).collect();
    let mut out = Vec::with_capacity(oh * ow);
    for &y in &ys {
        out.extend(xs.iter().map(|&x| lbl[y * w + x]));
    }
    out
}

/// mmcv's `imrescale` size for keep-ratio resizing of `h × w` into `target` (W, H).
pub fn rescale_size(h: usize, w: usize, target: (f64, f64)) -> (usize, usize) {
    let (long, short) = (target.0.max(target.1), target.0.min(target.1));
    let f = (long / h.max(w) as f64).min(short / h.min(w) as f64);
    (
        ((h as f64 * f + 0.5) as usize).max(1),
        ((w as f64 * f + 0.5) as usize).max(1),
    )
}

fn crop(s: &SegSample, y0: usize, x0: usize, ch: usize, cw: usize) -> SegSample {
    let (h, w) = (ch.min(s.height - y0), cw.min(s.width - x0));
    let mut image = Vec::with_capacity(h * w * 3);
    let mut label = Vec::with_capacity(h * w);
    for y in y0..y0 + h {
        image.extend_from_slice(&s.image[(y * s.width + x0) * 3..(y * s.width + x0 + w) * 3]);
        label.extend_from_slice(&s.label[y * s.width + x0..y * s.width + x0 + w]);
    }
    SegSample {
        height: h,
        width: w,
        image,
        label,
    }
}

fn crop_ok(labels: &[u8], cat_max_ratio: f64) -> bool {
    let mut counts = [0u64; 256];
    for &l in labels {
        counts[l as usize] += 1;
    }
    counts[IGNORE as usize] = 0;
    let present = counts.iter().filter(|&&c| c > 0).count();
    let total: u64 = counts.iter().sum();
    let max = counts.iter().copied().max().unwrap_or(0);
    present > 1 && (max as f64) / (total as f64) < cat_max_ratio
}

fn clip_u8(v: f64) -> u8 {
    v.clamp(0.0, 255.0) as u8
}

/// 8-bit RGB → OpenCV's 8-bit HSV (H in 0..180, S and V in 0..255).
pub fn rgb_to_hsv(r: u8, g: u8, b: u8) -> (u8, u8, u8) {
    let (rf, gf, bf) = (r as f64, g as f64, b as f64);
    let v = rf.max(gf).max(bf);
    let m = rf.min(gf).min(bf);
    let d = v - m;
    let s = if v > 0.0 { 255.0 * d / v } else { 0.0 };
    let mut h = if d == 0.0 {
        0.0
    } else if v == rf {
        60.0 * (gf - bf) / d
    } else if v == gf {
        120.0 + 60.0 * (bf - rf) / d
    } else {
        240.0 + 60.0 * (rf - gf) / d
    };
    if h < 0.0 {
        h += 360.0;
    }
    (
        ((h / 2.0).round() as u32 % 180) as u8,
        s.round() as u8,
        v.round() as u8,
    )
}

/// OpenCV's 8-bit HSV → RGB.
pub fn hsv_to_rgb(h: u8, s: u8, v: u8) -> (u8, u8, u8) {
    let hh = (h as f64 * 2.0) / 60.0;
    let (s, v) = (s as f64 / 255.0, v as f64);
    let i = hh.floor();
    let f = hh - i;
    let (p, q, t) = (v * (1.0 - s), v * (1.0 - s * f), v * (1.0 - s * (1.0 - f)));
    let (r, g, b) = match i as i64 % 6 {
        0 => (v, t, p),
        1 => (q, v, p),
        2 => (p, v, t),
        3 => (p, q, v),
        4 => (t, p, v),
        _ => (v, p, q),
    };
    let u = |x: f64| x.round().clamp(0.0, 255.0) as u8;
    (u(r), u(g), u(b))
}

fn photometric(img: &mut [u8], rng: &mut SeededRng) {
    if coin(rng) {
        let delta = uniform(rng, -32.0, 32.0);
        img.iter_mut().for_each(|v| *v = clip_u8(*v as f64 + delta));
    }
    let contrast_first = coin(rng);
    let contrast = |img: &mut [u8], rng: &mut SeededRng| {
        if coin(rng) {
            let alpha = uniform(rng, 0.5, 1.5);
            img.iter_mut().for_each(|v| *v = clip_u8(*v as f64 * alpha));
        }
    };
    if contrast_first {
        contrast(img, rng);
    }
    let sat = coin(rng).then(|| uniform(rng, 0.5, 1.5));
    let hue = coin(rng).then(|| (rng.next_u64() % 37) as i64 - 18);
    if sat.is_some() || hue.is_some() {
        for px in img.chunks_mut(3) {
            let (mut h, mut s, v) = rgb_to_hsv(px[0], px[1], px[2]);
            if let Some(a) = sat {
                s = clip_u8(s as f64 * a);
            }
            if let Some(dh) = hue {
                h = (h as i64 + dh).rem_euclid(180) as u8;
            }
            let (r, g, b) = hsv_to_rgb(h, s, v);
            px.copy_from_slice(&[r, g, b]);
        }
    }
    if !contrast_first {
        contrast(img, rng);
    }
}

/// The training pipeline (module docs) on one sample: a `crop`-sized sample whose padding
/// is labelled 255, plus the number of valid (unpadded) rows and columns.
pub fn augment(
    s: &SegSample,
    aug: &SegAugment,
    rng: &mut SeededRng,
) -> (SegSample, (usize, usize)) {
    let r = uniform(rng, aug.ratio_range.0, aug.ratio_range.1);
    let target = (aug.scale.0 as f64 * r, aug.scale.1 as f64 * r);
    let (nh, nw) = rescale_size(s.height, s.width, target);
    let resized = SegSample {
        height: nh,
        width: nw,
        image: resize_image(&s.image, s.height, s.width, nh, nw),
        label: resize_labels(&s.label, s.height, s.width, nh, nw),
    };
    let (ch, cw) = aug.crop;
    let draw = |rng: &mut SeededRng| {
        let y = (rng.next_u64() % (nh.saturating_sub(ch) as u64 + 1)) as usize;
        let x = (rng.next_u64() % (nw.saturating_sub(cw) as u64 + 1)) as usize;
        (y, x)
    };
    let (mut y0, mut x0) = draw(rng);
    if aug.cat_max_ratio < 1.0 {
        for _ in 0..10 {
            if crop_ok(&crop(&resized, y0, x0, ch, cw).label, aug.cat_max_ratio) {
                break;
            }
            (y0, x0) = draw(rng);
        }
    }
    let mut out = crop(&resized, y0, x0, ch, cw);
    if aug.flip && coin(rng) {
        flip_horizontal(&mut out);
    }
    if aug.photometric {
        photometric(&mut out.image, rng);
    }
    let valid = (out.height, out.width);
    (pad_to(&out, ch, cw), valid)
}

/// Mirrors a sample left–right.
pub fn flip_horizontal(s: &mut SegSample) {
    let w = s.width;
    for y in 0..s.height {
        s.label[y * w..(y + 1) * w].reverse();
        let row = &mut s.image[y * w * 3..(y + 1) * w * 3];
        for x in 0..w / 2 {
            for c in 0..3 {
                row.swap(x * 3 + c, (w - 1 - x) * 3 + c);
            }
        }
    }
}

/// Pads bottom/right to `h × w` (image 0, labels 255). The image padding is replaced by 0
/// after normalisation by [`normalize_into`] through `valid`.
fn pad_to(s: &SegSample, h: usize, w: usize) -> SegSample {
    if (s.height, s.width) == (h, w) {
        return s.clone();
    }
    let mut image = vec![0u8; h * w * 3];
    let mut label = vec![IGNORE; h * w];
    for y in 0..s.height {
        image[y * w * 3..(y * w + s.width) * 3]
            .copy_from_slice(&s.image[y * s.width * 3..(y + 1) * s.width * 3]);
        label[y * w..y * w + s.width].copy_from_slice(&s.label[y * s.width..(y + 1) * s.width]);
    }
    SegSample {
        height: h,
        width: w,
        image,
        label,
    }
}

/// Writes the normalised image as CHW floats into `out` (`3·H·W`); pixels outside the
/// `valid` (rows, columns) region are 0 (mmsegmentation pads after normalising).
pub fn normalize_into(s: &SegSample, valid: (usize, usize), out: &mut [f32]) {
    let (h, w) = (s.height, s.width);
    for c in 0..3 {
        for y in 0..h {
            for x in 0..w {
                out[(c * h + y) * w + x] = if y < valid.0 && x < valid.1 {
                    (s.image[(y * w + x) * 3 + c] as f32 - MEAN[c]) / STD[c]
                } else {
                    0.0
                };
            }
        }
    }
}
