//! Cityscapes (fine annotations) in its official layout.

use super::{missing_label, names, sorted_files, LabelMap, SegDataset, SegSource};
use crate::{DataError, Result};
use std::path::{Path, PathBuf};

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
