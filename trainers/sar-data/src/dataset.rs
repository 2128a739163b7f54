//! One interface over in-memory sets of equal-size images ([`ImageSet`]: digits, MNIST, CIFAR)
//! and file-backed sets of JPEGs ([`FileSet`]: CUB-200), as the trainer sees them: labels,
//! geometry of the rendered batch, and parallel rendering with augmentation.
//!
//! File-backed images are rendered at `size × size`: for training a random resized crop
//! (scale 0.08–1, aspect 3/4–4/3, as torchvision's `RandomResizedCrop`) and a random
//! horizontal flip; for evaluation a resize of the shorter side to `resize` and a centre crop
//! (torchvision's `Resize(256)` + `CenterCrop(224)`). Bilinear resampling. Normalisation uses
//! the ImageNet mean and standard deviation (pretrained backbones expect them).

use crate::augment::{self, Augment, Normalize};
use crate::cub::FileSet;
use crate::{DataError, ImageSet, Result};
use rayon::prelude::*;
use sar_math::rng::SeededRng;

/// A training or test set.
#[derive(Debug, Clone, PartialEq)]
pub enum Dataset {
    /// Equal-size images in memory.
    Memory(ImageSet),
    /// Image files rendered at `size × size` (shorter side resized to `resize` for evaluation).
    Files {
        /// The files.
        set: FileSet,
        /// Output side.
        size: usize,
        /// Shorter side before the evaluation centre crop.
        resize: usize,
    },
}

/// ImageNet channel means and standard deviations (torchvision's).
pub fn imagenet_normalize() -> Normalize {
    Normalize {
        mean: vec![0.485, 0.456, 0.406],
        std: vec![0.229, 0.224, 0.225],
    }
}

impl Dataset {
    /// Number of images.
    pub fn len(&self) -> usize {
        self.labels().len()
    }
    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Labels.
    pub fn labels(&self) -> &[u32] {
        match self {
            Dataset::Memory(s) => &s.labels,
            Dataset::Files { set, .. } => &set.labels,
        }
    }
    /// Classes.
    pub fn classes(&self) -> usize {
        match self {
            Dataset::Memory(s) => s.classes,
            Dataset::Files { set, .. } => set.classes,
        }
    }
    /// Name for messages.
    pub fn name(&self) -> &str {
        match self {
            Dataset::Memory(s) => &s.name,
            Dataset::Files { set, .. } => &set.name,
        }
    }
    /// `(channels, height, width)` of a rendered image.
    pub fn geometry(&self) -> (usize, usize, usize) {
        match self {
            Dataset::Memory(s) => (s.channels, s.height, s.width),
            Dataset::Files { size, .. } => (3, *size, *size),
        }
    }
    /// Images per class.
    pub fn class_counts(&self) -> Vec<u64> {
        match self {
            Dataset::Memory(s) => s.class_counts(),
            Dataset::Files { set, .. } => set.class_counts(),
        }
    }
    /// The images at `indices`.
    pub fn subset(&self, indices: &[usize], name: &str) -> Result<Dataset> {
        Ok(match self {
            Dataset::Memory(s) => Dataset::Memory(s.subset(indices, name)?),
            Dataset::Files { set, size, resize } => Dataset::Files {
                set: set.subset(indices, name)?,
                size: *size,
                resize: *resize,
            },
        })
    }
    /// Normalisation: measured on the images in memory, ImageNet's for files.
    pub fn normalize(&self) -> Normalize {
        match self {
            Dataset::Memory(s) => Normalize::measure(s),
            Dataset::Files { .. } => imagenet_normalize(),
        }
    }

    /// Renders `indices` (positions in the epoch from `first_position`) in parallel:
    /// `[N, C, H, W]` floats and labels. `augment` `None` is the evaluation transform.
    #[allow(clippy::too_many_arguments)]
    pub fn render_batch(
        &self,
        indices: &[usize],
        augment: Option<Augment>,
        norm: &Normalize,
        seed: u64,
        epoch: u64,
        first_position: u64,
    ) -> Result<(Vec<f32>, Vec<u32>)> {
        match self {
            Dataset::Memory(s) => Ok(augment::render_batch(
                s,
                indices,
                augment.unwrap_or(Augment::None),
                norm,
                seed,
                epoch,
                first_position,
            )),
            Dataset::Files { set, size, resize } => {
                let len = 3 * size * size;
                let mut x = vec![0.0f32; indices.len() * len];
                x.par_chunks_mut(len)
                    .zip(indices.par_iter().enumerate())
                    .try_for_each(|(out, (k, &i))| -> Result<()> {
                        let img = set.decode(i)?;
                        let mut rng = augment::sample_rng(seed, epoch, first_position + k as u64);
                        let view = match augment {
                            Some(_) => random_resized_crop(&img, *size, &mut rng),
                            None => center_crop(&img, *resize, *size),
                        };
                        let flip = augment.is_some() && rng.next_u64() & 1 == 1;
                        write_chw(&view, flip, norm, out);
                        Ok(())
                    })?;
                Ok((x, indices.iter().map(|&i| set.labels[i]).collect()))
            }
        }
    }
}

fn resize(img: &image::RgbImage, w: u32, h: u32) -> image::RgbImage {
    image::imageops::resize(
        img,
        w.max(1),
        h.max(1),
        image::imageops::FilterType::Triangle,
    )
}

/// torchvision's `RandomResizedCrop(size, scale=(0.08, 1), ratio=(3/4, 4/3))`: up to 10 tries
/// for a crop of that area and log-uniform aspect inside the image, else the centre crop of
/// the clamped aspect.
pub fn random_resized_crop(
    img: &image::RgbImage,
    size: usize,
    rng: &mut SeededRng,
) -> image::RgbImage {
    let (w, h) = (img.width() as f64, img.height() as f64);
    let area = w * h;
    let (lo, hi) = ((3.0f64 / 4.0).ln(), (4.0f64 / 3.0).ln());
    for _ in 0..10 {
        let target = area * (0.08 + 0.92 * rng.next_f64());
        let ratio = (lo + (hi - lo) * rng.next_f64()).exp();
        let cw = (target * ratio).sqrt().round();
        let ch = (target / ratio).sqrt().round();
        if cw >= 1.0 && ch >= 1.0 && cw <= w && ch <= h {
            let x = (rng.next_f64() * (w - cw + 1.0)).floor().min(w - cw);
            let y = (rng.next_f64() * (h - ch + 1.0)).floor().min(h - ch);
            let crop =
                image::imageops::crop_imm(img, x as u32, y as u32, cw as u32, ch as u32).to_image();
            return resize(&crop, size as u32, size as u32);
        }
    }
    let r = w / h;
    let (cw, ch) = if r < 3.0 / 4.0 {
        (w, (w / (3.0 / 4.0)).round())
    } else if r > 4.0 / 3.0 {
        ((h * 4.0 / 3.0).round(), h)
    } else {
        (w, h)
    };
    let crop = image::imageops::crop_imm(
        img,
        ((w - cw) / 2.0) as u32,
        ((h - ch) / 2.0) as u32,
        cw as u32,
        ch as u32,
    )
    .to_image();
    resize(&crop, size as u32, size as u32)
}

/// Shorter side to `resize`, then the centre `size × size`.
pub fn center_crop(img: &image::RgbImage, resize_to: usize, size: usize) -> image::RgbImage {
    let (w, h) = (img.width() as f64, img.height() as f64);
    let s = resize_to as f64 / w.min(h);
    let (nw, nh) = (
        (w * s).round().max(size as f64) as u32,
        (h * s).round().max(size as f64) as u32,
    );
    let r = resize(img, nw, nh);
    let x = (nw - size as u32) / 2;
    let y = (nh - size as u32) / 2;
    image::imageops::crop_imm(&r, x, y, size as u32, size as u32).to_image()
}

fn write_chw(img: &image::RgbImage, flip: bool, norm: &Normalize, out: &mut [f32]) {
    let (w, h) = (img.width() as usize, img.height() as usize);
    for (x, y, p) in img.enumerate_pixels() {
        let (x, y) = (x as usize, y as usize);
        let xo = if flip { w - 1 - x } else { x };
        for c in 0..3 {
            out[c * h * w + y * w + xo] = (p[c] as f32 / 255.0 - norm.mean[c]) / norm.std[c];
        }
    }
}

/// A label-range check for a set about to be used with `classes` classes.
pub fn check_labels(set: &Dataset) -> Result<()> {
    let c = set.classes();
    if let Some((i, &l)) = set
        .labels()
        .iter()
        .enumerate()
        .find(|(_, &l)| l as usize >= c)
    {
        return Err(DataError::Request(format!(
            "{}: image {i} has label {l}, beyond {c} classes",
            set.name()
        )));
    }
    Ok(())
}
