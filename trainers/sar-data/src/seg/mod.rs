//! Semantic segmentation data: samples, label maps, the readers of Cityscapes, ADE20K and
//! Pascal-Context-59 in their official layouts, and the embedded long-tailed glyph mosaic.
//!
//! A [`SegSample`] is an RGB image (`H × W × 3` bytes, interleaved, rows top to bottom) and
//! its label map (`H × W` bytes): a class index below K, or the ignore label 255.
//!
//! Label PNGs must be 8-bit grayscale or 8-bit palette images; palette indices are the
//! labels (no colour lookup). Each data set maps the stored values to class indices with a
//! [`LabelMap`]; a stored value the map does not know is an error naming the file, the value
//! and the pixel, never a silent ignore.
//!
//! | data set | layout under `root` | K | stored label → class |
//! |---|---|---|---|
//! | [`cityscapes`] | `leftImg8bit/{train,val}/<city>/<id>_leftImg8bit.png`, `gtFine/<split>/<city>/<id>_gtFine_labelTrainIds.png` (or `_labelIds.png`) | 19 | trainIds as stored (255 ignored); labelIds through the official id → trainId table |
//! | [`ade20k`] | `images/{training,validation}/*.jpg`, `annotations/<split>/*.png` (the `ADEChallengeData2016` folder) | 150 | reduce-zero-label: 0 → 255, v → v − 1 |
//! | [`pascal_context59`] | mmsegmentation's VOC2010 layout: `JPEGImages/*.jpg`, `SegmentationClassContext/*.png`, `ImageSets/SegmentationContext/{train,val}.txt` | 59 | reduce-zero-label |
//! | [`glyph_mosaic`] | embedded (the UCI optdigits of [`crate::digits`], CC BY 4.0) | 11 | background 0, digit d → d + 1 |

mod ade20k_set;
mod cityscapes_set;
mod mosaic;
mod pascal_context_set;

pub use ade20k_set::{ade20k, ADE20K_CLASSES};
pub use cityscapes_set::{cityscapes, CITYSCAPES_CLASSES};
pub use mosaic::{glyph_mosaic, mosaic_class_names, MosaicConfig};
pub use pascal_context_set::{pascal_context59, PASCAL_CONTEXT59_CLASSES};

use crate::{DataError, Result};
use std::path::{Path, PathBuf};

/// The ignore label.
pub const IGNORE: u8 = 255;

/// An image and its per-pixel labels.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegSample {
    /// H.
    pub height: usize,
    /// W.
    pub width: usize,
    /// `H·W·3` RGB bytes, interleaved.
    pub image: Vec<u8>,
    /// `H·W` labels (class index or [`IGNORE`]).
    pub label: Vec<u8>,
}

/// Stored label value → class index ([`IGNORE`] for ignored values); values without an
/// entry are errors.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LabelMap {
    table: [Option<u8>; 256],
}

impl LabelMap {
    /// Values below `classes` are classes, 255 is ignored.
    pub fn identity(classes: usize) -> Self {
        let mut table = [None; 256];
        for (v, t) in table.iter_mut().enumerate().take(classes.min(255)) {
            *t = Some(v as u8);
        }
        table[255] = Some(IGNORE);
        LabelMap { table }
    }

    /// mmsegmentation's `reduce_zero_label`: 0 (the "other" label) → 255, v → v − 1 for
    /// 1 ≤ v ≤ classes, 255 stays ignored.
    pub fn reduce_zero(classes: usize) -> Self {
        let mut table = [None; 256];
        table[0] = Some(IGNORE);
        for (v, t) in table
            .iter_mut()
            .enumerate()
            .take(classes.min(254) + 1)
            .skip(1)
        {
            *t = Some((v - 1) as u8);
        }
        table[255] = Some(IGNORE);
        LabelMap { table }
    }

    /// Cityscapes `labelIds` (0–33) → the 19 `trainIds` of the official benchmark script
    /// (`cityscapesscripts/helpers/labels.py`); the 15 unused ids → 255.
    pub fn cityscapes_label_ids() -> Self {
        const TRAIN_ID: [u8; 34] = [
            255, 255, 255, 255, 255, 255, 255, 0, 1, 255, 255, 2, 3, 4, 255, 255, 255, 5, 255, 6,
            7, 8, 9, 10, 11, 12, 13, 14, 15, 255, 255, 16, 17, 18,
        ];
        let mut table = [None; 256];
        for (id, &t) in TRAIN_ID.iter().enumerate() {
            table[id] = Some(t);
        }
        LabelMap { table }
    }

    /// The class of stored value `v`, if the map knows it.
    pub fn get(&self, v: u8) -> Option<u8> {
        self.table[v as usize]
    }
}

/// Where the samples of a [`SegDataset`] live.
#[derive(Debug, Clone)]
pub enum SegSource {
    /// Decoded samples (labels already class indices).
    Memory(Vec<SegSample>),
    /// Image and label files, decoded and mapped on access.
    Files {
        /// (image, label) pairs.
        pairs: Vec<(PathBuf, PathBuf)>,
        /// Stored value → class.
        map: Box<LabelMap>,
    },
}

/// A segmentation data set.
#[derive(Debug, Clone)]
pub struct SegDataset {
    /// Name for messages and reports.
    pub name: String,
    /// Class names (K of them).
    pub class_names: Vec<String>,
    /// The samples.
    pub source: SegSource,
}

impl SegDataset {
    /// K.
    pub fn classes(&self) -> usize {
        self.class_names.len()
    }
    /// Number of samples.
    pub fn len(&self) -> usize {
        match &self.source {
            SegSource::Memory(v) => v.len(),
            SegSource::Files { pairs, .. } => pairs.len(),
        }
    }
    /// Whether there are no samples.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Sample `i`, decoded, labels mapped and checked (every label < K or 255).
    pub fn get(&self, i: usize) -> Result<SegSample> {
        match &self.source {
            SegSource::Memory(v) => {
                let s = v.get(i).ok_or_else(|| {
                    DataError::Request(format!("{}: no sample {i} (of {})", self.name, v.len()))
                })?;
                check_sample(s, self.classes(), &format!("{}[{i}]", self.name))?;
                Ok(s.clone())
            }
            SegSource::Files { pairs, map } => {
                let (img, lbl) = pairs.get(i).ok_or_else(|| {
                    DataError::Request(format!("{}: no sample {i} (of {})", self.name, pairs.len()))
                })?;
                read_pair(img, lbl, map, self.classes())
            }
        }
    }
    /// Labelled pixels per class over the whole set (reads every label map).
    pub fn class_pixel_counts(&self) -> Result<Vec<u64>> {
        use rayon::prelude::*;
        let k = self.classes();
        (0..self.len())
            .into_par_iter()
            .map(|i| {
                let s = self.get(i)?;
                let mut c = vec![0u64; k];
                for &l in &s.label {
                    if l != IGNORE {
                        c[l as usize] += 1;
                    }
                }
                Ok(c)
            })
            .try_reduce(
                || vec![0u64; k],
                |mut a, b| {
                    a.iter_mut().zip(&b).for_each(|(x, y)| *x += y);
                    Ok(a)
                },
            )
    }
}

fn check_sample(s: &SegSample, classes: usize, what: &str) -> Result<()> {
    let n = s.height * s.width;
    if s.image.len() != n * 3 || s.label.len() != n {
        return Err(DataError::format(
            what,
            format!(
                "a {}×{} sample needs {} image bytes and {} labels, has {} and {}",
                s.height,
                s.width,
                n * 3,
                n,
                s.image.len(),
                s.label.len()
            ),
        ));
    }
    if let Some(p) = s
        .label
        .iter()
        .position(|&l| l != IGNORE && l as usize >= classes)
    {
        return Err(DataError::format(
            what,
            format!(
                "label {} at row {}, column {} is not a class (K = {classes}) nor the ignore label 255",
                s.label[p],
                p / s.width,
                p % s.width
            ),
        ));
    }
    Ok(())
}

/// Decodes an 8-bit grayscale or palette PNG into (height, width, values).
pub fn decode_label_png(bytes: &[u8], path: &str) -> Result<(usize, usize, Vec<u8>)> {
    let mut decoder = png::Decoder::new(std::io::Cursor::new(bytes));
    decoder.set_transformations(png::Transformations::IDENTITY);
    let mut reader = decoder
        .read_info()
        .map_err(|e| DataError::format(path, format!("not a readable PNG: {e}")))?;
    let info = reader.info();
    let (w, h) = (info.width as usize, info.height as usize);
    let (ct, depth) = (info.color_type, info.bit_depth);
    if !matches!(ct, png::ColorType::Grayscale | png::ColorType::Indexed)
        || depth != png::BitDepth::Eight
    {
        return Err(DataError::format(
            path,
            format!("a label map must be an 8-bit grayscale or palette PNG, this one is {ct:?} with {depth:?}-bit samples"),
        ));
    }
    if w == 0 || h == 0 || w.saturating_mul(h) > 1 << 28 {
        return Err(DataError::format(
            path,
            format!("unusable label map size {w}×{h}"),
        ));
    }
    let mut buf = vec![0u8; reader.output_buffer_size()];
    let frame = reader
        .next_frame(&mut buf)
        .map_err(|e| DataError::format(path, format!("corrupt PNG data: {e}")))?;
    let stride = frame.line_size;
    let mut out = Vec::with_capacity(w * h);
    for row in 0..h {
        out.extend_from_slice(&buf[row * stride..row * stride + w]);
    }
    Ok((h, w, out))
}

/// Decodes an image file (PNG or JPEG) to RGB.
pub fn decode_image(bytes: &[u8], path: &str) -> Result<(usize, usize, Vec<u8>)> {
    let img = image::load_from_memory(bytes)
        .map_err(|e| DataError::format(path, format!("cannot decode the image: {e}")))?
        .to_rgb8();
    let (w, h) = img.dimensions();
    Ok((h as usize, w as usize, img.into_raw()))
}

/// Reads an image and its label map, maps and checks the labels.
pub fn read_pair(image: &Path, label: &Path, map: &LabelMap, classes: usize) -> Result<SegSample> {
    let read = |p: &Path| std::fs::read(p).map_err(|e| DataError::io(p, e));
    let (ip, lp) = (image.display().to_string(), label.display().to_string());
    let (h, w, pixels) = decode_image(&read(image)?, &ip)?;
    let (lh, lw, stored) = decode_label_png(&read(label)?, &lp)?;
    if (lh, lw) != (h, w) {
        return Err(DataError::format(
            &lp,
            format!("the label map is {lw}×{lh} but its image {ip} is {w}×{h}"),
        ));
    }
    let mut labels = Vec::with_capacity(stored.len());
    for (p, &v) in stored.iter().enumerate() {
        match map.get(v) {
            Some(c) if c == IGNORE || (c as usize) < classes => labels.push(c),
            _ => {
                return Err(DataError::format(
                    &lp,
                    format!(
                        "unknown label value {v} at row {}, column {} (this data set's labels are listed in the sar_data::seg docs)",
                        p / w,
                        p % w
                    ),
                ))
            }
        }
    }
    Ok(SegSample {
        height: h,
        width: w,
        image: pixels,
        label: labels,
    })
}

fn sorted_files(dir: &Path, suffix: &str) -> Result<Vec<PathBuf>> {
    let rd = std::fs::read_dir(dir).map_err(|e| DataError::io(dir, e))?;
    let mut v = Vec::new();
    for e in rd {
        let p = e.map_err(|e| DataError::io(dir, e))?.path();
        if p.is_file()
            && p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.ends_with(suffix))
        {
            v.push(p);
        }
    }
    v.sort();
    Ok(v)
}

fn missing_label(image: &Path, tried: &[&Path]) -> DataError {
    DataError::format(
        &image.display().to_string(),
        format!(
            "no label map for this image (looked for {})",
            tried
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(" and ")
        ),
    )
}

fn names(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}
