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

use crate::{DataError, ImageSet, Result};
use sar_math::anchors::AnchorRng;
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

/// The 19 Cityscapes evaluation classes, in trainId order.
pub const CITYSCAPES_CLASSES: [&str; 19] = [
    "road",
    "sidewalk",
    "building",
    "wall",
    "fence",
    "pole",
    "traffic light",
    "traffic sign",
    "vegetation",
    "terrain",
    "sky",
    "person",
    "rider",
    "car",
    "truck",
    "bus",
    "train",
    "motorcycle",
    "bicycle",
];

/// Cityscapes (fine annotations). Uses `*_gtFine_labelTrainIds.png` where present, else
/// `*_gtFine_labelIds.png` through [`LabelMap::cityscapes_label_ids`]; an image with
/// neither is an error. Images in city folders, sorted by path.
pub fn cityscapes(root: &Path, train: bool) -> Result<SegDataset> {
    let split = if train { "train" } else { "val" };
    let img_dir = root.join("leftImg8bit").join(split);
    let ann_dir = root.join("gtFine").join(split);
    let mut cities: Vec<PathBuf> = std::fs::read_dir(&img_dir)
        .map_err(|e| DataError::io(&img_dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_dir())
        .collect();
    cities.sort();
    let mut pairs = Vec::new();
    let mut use_train_ids = None;
    for city in cities {
        let name = city.file_name().expect("dir name").to_owned();
        for img in sorted_files(&city, "_leftImg8bit.png")? {
            let file = img
                .file_name()
                .and_then(|n| n.to_str())
                .expect("utf-8 name");
            let stem = file.strip_suffix("_leftImg8bit.png").expect("suffix");
            let t = ann_dir
                .join(&name)
                .join(format!("{stem}_gtFine_labelTrainIds.png"));
            let l = ann_dir
                .join(&name)
                .join(format!("{stem}_gtFine_labelIds.png"));
            let (path, trains) = if t.is_file() {
                (t, true)
            } else if l.is_file() {
                (l, false)
            } else {
                return Err(missing_label(&img, &[&t, &l]));
            };
            if *use_train_ids.get_or_insert(trains) != trains {
                return Err(DataError::format(
                    &path.display().to_string(),
                    "the split mixes labelTrainIds and labelIds files; use one kind",
                ));
            }
            pairs.push((img, path));
        }
    }
    if pairs.is_empty() {
        return Err(DataError::format(
            &img_dir.display().to_string(),
            "no *_leftImg8bit.png images",
        ));
    }
    let map = if use_train_ids == Some(true) {
        LabelMap::identity(19)
    } else {
        LabelMap::cityscapes_label_ids()
    };
    Ok(SegDataset {
        name: format!("cityscapes/{split}"),
        class_names: names(&CITYSCAPES_CLASSES),
        source: SegSource::Files {
            pairs,
            map: Box::new(map),
        },
    })
}

/// The 150 ADE20K (SceneParsing) classes, in label order 1..150 (stored value − 1).
pub const ADE20K_CLASSES: [&str; 150] = [
    "wall",
    "building",
    "sky",
    "floor",
    "tree",
    "ceiling",
    "road",
    "bed",
    "windowpane",
    "grass",
    "cabinet",
    "sidewalk",
    "person",
    "earth",
    "door",
    "table",
    "mountain",
    "plant",
    "curtain",
    "chair",
    "car",
    "water",
    "painting",
    "sofa",
    "shelf",
    "house",
    "sea",
    "mirror",
    "rug",
    "field",
    "armchair",
    "seat",
    "fence",
    "desk",
    "rock",
    "wardrobe",
    "lamp",
    "bathtub",
    "railing",
    "cushion",
    "base",
    "box",
    "column",
    "signboard",
    "chest of drawers",
    "counter",
    "sand",
    "sink",
    "skyscraper",
    "fireplace",
    "refrigerator",
    "grandstand",
    "path",
    "stairs",
    "runway",
    "case",
    "pool table",
    "pillow",
    "screen door",
    "stairway",
    "river",
    "bridge",
    "bookcase",
    "blind",
    "coffee table",
    "toilet",
    "flower",
    "book",
    "hill",
    "bench",
    "countertop",
    "stove",
    "palm",
    "kitchen island",
    "computer",
    "swivel chair",
    "boat",
    "bar",
    "arcade machine",
    "hovel",
    "bus",
    "towel",
    "light",
    "truck",
    "tower",
    "chandelier",
    "awning",
    "streetlight",
    "booth",
    "television receiver",
    "airplane",
    "dirt track",
    "apparel",
    "pole",
    "land",
    "bannister",
    "escalator",
    "ottoman",
    "bottle",
    "buffet",
    "poster",
    "stage",
    "van",
    "ship",
    "fountain",
    "conveyer belt",
    "canopy",
    "washer",
    "plaything",
    "swimming pool",
    "stool",
    "barrel",
    "basket",
    "waterfall",
    "tent",
    "bag",
    "minibike",
    "cradle",
    "oven",
    "ball",
    "food",
    "step",
    "tank",
    "trade name",
    "microwave",
    "pot",
    "animal",
    "bicycle",
    "lake",
    "dishwasher",
    "screen",
    "blanket",
    "sculpture",
    "hood",
    "sconce",
    "vase",
    "traffic light",
    "tray",
    "ashcan",
    "fan",
    "pier",
    "crt screen",
    "plate",
    "monitor",
    "bulletin board",
    "shower",
    "radiator",
    "glass",
    "clock",
    "flag",
];

/// ADE20K (`ADEChallengeData2016`): `images/<split>/<id>.jpg` with
/// `annotations/<split>/<id>.png`, reduce-zero-label.
pub fn ade20k(root: &Path, train: bool) -> Result<SegDataset> {
    let split = if train { "training" } else { "validation" };
    let img_dir = root.join("images").join(split);
    let ann_dir = root.join("annotations").join(split);
    let mut pairs = Vec::new();
    for img in sorted_files(&img_dir, ".jpg")? {
        let stem = img.file_stem().expect("file stem").to_owned();
        let l = ann_dir.join(Path::new(&stem).with_extension("png"));
        if !l.is_file() {
            return Err(missing_label(&img, &[&l]));
        }
        pairs.push((img, l));
    }
    if pairs.is_empty() {
        return Err(DataError::format(
            &img_dir.display().to_string(),
            "no *.jpg images",
        ));
    }
    Ok(SegDataset {
        name: format!("ade20k/{split}"),
        class_names: names(&ADE20K_CLASSES),
        source: SegSource::Files {
            pairs,
            map: Box::new(LabelMap::reduce_zero(150)),
        },
    })
}

/// The 59 Pascal-Context classes (mmsegmentation's `PascalContextDataset59`).
pub const PASCAL_CONTEXT59_CLASSES: [&str; 59] = [
    "aeroplane",
    "bag",
    "bed",
    "bedclothes",
    "bench",
    "bicycle",
    "bird",
    "boat",
    "book",
    "bottle",
    "building",
    "bus",
    "cabinet",
    "car",
    "cat",
    "ceiling",
    "chair",
    "cloth",
    "computer",
    "cow",
    "cup",
    "curtain",
    "dog",
    "door",
    "fence",
    "floor",
    "flower",
    "food",
    "grass",
    "ground",
    "horse",
    "keyboard",
    "light",
    "motorbike",
    "mountain",
    "mouse",
    "person",
    "plate",
    "platform",
    "pottedplant",
    "road",
    "rock",
    "sheep",
    "shelves",
    "sidewalk",
    "sign",
    "sky",
    "snow",
    "sofa",
    "table",
    "track",
    "train",
    "tree",
    "truck",
    "tvmonitor",
    "wall",
    "water",
    "window",
    "wood",
];

/// Pascal-Context-59 in mmsegmentation's layout under `VOCdevkit/VOC2010`: the ids listed
/// in `ImageSets/SegmentationContext/{train,val}.txt`, `JPEGImages/<id>.jpg`,
/// `SegmentationClassContext/<id>.png`, reduce-zero-label.
pub fn pascal_context59(root: &Path, train: bool) -> Result<SegDataset> {
    let split = if train { "train" } else { "val" };
    let list = root
        .join("ImageSets/SegmentationContext")
        .join(format!("{split}.txt"));
    let text = std::fs::read_to_string(&list).map_err(|e| DataError::io(&list, e))?;
    let mut pairs = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let id = line.trim();
        if id.is_empty() {
            continue;
        }
        if id.contains(['/', '\\']) || id == ".." {
            return Err(DataError::format(
                &list.display().to_string(),
                format!("line {}: {id:?} is not an image id", n + 1),
            ));
        }
        let img = root.join("JPEGImages").join(format!("{id}.jpg"));
        let l = root
            .join("SegmentationClassContext")
            .join(format!("{id}.png"));
        if !img.is_file() {
            return Err(DataError::format(
                &list.display().to_string(),
                format!("line {}: image {} does not exist", n + 1, img.display()),
            ));
        }
        if !l.is_file() {
            return Err(missing_label(&img, &[&l]));
        }
        pairs.push((img, l));
    }
    if pairs.is_empty() {
        return Err(DataError::format(
            &list.display().to_string(),
            "lists no images",
        ));
    }
    Ok(SegDataset {
        name: format!("pascal-context59/{split}"),
        class_names: names(&PASCAL_CONTEXT59_CLASSES),
        source: SegSource::Files {
            pairs,
            map: Box::new(LabelMap::reduce_zero(59)),
        },
    })
}

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
    let mut rng = AnchorRng::new(cfg.seed ^ 0x4D4F_5341_4943);
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
