//! Pascal-Context-59 in mmsegmentation's VOC2010 layout.

use super::{missing_label, names, LabelMap, SegDataset, SegSource};
use crate::{DataError, Result};
use std::path::Path;

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
