//! CUB-200-2011 in its official layout, decoded on demand.
//!
//! `CUB_200_2011/` holds `images/NNN.Name/*.jpg` and text files of `id value` lines:
//! `images.txt` (id → path under `images/`), `image_class_labels.txt` (id → class 1..200),
//! `train_test_split.txt` (id → 1 train, 0 test). The official split has 5,994 training and
//! 5,794 test images. Images differ in size, so [`FileSet`] keeps paths and labels only and
//! decodes JPEGs when a batch needs them (in parallel; nothing is held twice).

use crate::{DataError, Result};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Images stored as files, with labels.
#[derive(Debug, Clone, PartialEq)]
pub struct FileSet {
    /// Name for messages.
    pub name: String,
    /// Image files.
    pub paths: Vec<PathBuf>,
    /// Label per image, `< classes`.
    pub labels: Vec<u32>,
    /// Number of classes.
    pub classes: usize,
}

impl FileSet {
    /// Number of images.
    pub fn len(&self) -> usize {
        self.labels.len()
    }
    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }
    /// Images per class.
    pub fn class_counts(&self) -> Vec<u64> {
        let mut c = vec![0u64; self.classes];
        for &l in &self.labels {
            c[l as usize] += 1;
        }
        c
    }
    /// The images at `indices`.
    pub fn subset(&self, indices: &[usize], name: &str) -> Result<FileSet> {
        let mut out = FileSet {
            name: name.into(),
            paths: Vec::with_capacity(indices.len()),
            labels: Vec::with_capacity(indices.len()),
            classes: self.classes,
        };
        for &i in indices {
            if i >= self.len() {
                return Err(DataError::Request(format!(
                    "{}: index {i} out of range ({} images)",
                    self.name,
                    self.len()
                )));
            }
            out.paths.push(self.paths[i].clone());
            out.labels.push(self.labels[i]);
        }
        Ok(out)
    }
    /// Decodes image `i` to 8-bit RGB; the error names the file.
    pub fn decode(&self, i: usize) -> Result<image::RgbImage> {
        let path = &self.paths[i];
        let reader = image::ImageReader::open(path)
            .map_err(|e| DataError::io(path, e))?
            .with_guessed_format()
            .map_err(|e| DataError::io(path, e))?;
        let img = reader.decode().map_err(|e| {
            DataError::format(
                &path.display().to_string(),
                format!("cannot decode the image: {e}"),
            )
        })?;
        Ok(img.to_rgb8())
    }
}

fn read_pairs(path: &Path) -> Result<Vec<(u64, String)>> {
    let text = std::fs::read_to_string(path).map_err(|e| DataError::io(path, e))?;
    parse_pairs(&text, &path.display().to_string())
}

/// Parses one of CUB's `id value` text files (`images.txt`, `image_class_labels.txt`,
/// `train_test_split.txt`); `shown` names the file in errors. Blank lines are skipped.
pub fn parse_pairs(text: &str, shown: &str) -> Result<Vec<(u64, String)>> {
    let shown = shown.to_string();
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let (id, value) = line.split_once(char::is_whitespace).ok_or_else(|| {
            DataError::format(&shown, format!("line {}: expected `id value`", n + 1))
        })?;
        let id: u64 = id.parse().map_err(|_| {
            DataError::format(
                &shown,
                format!("line {}: image id `{id}` is not a number", n + 1),
            )
        })?;
        out.push((id, value.trim().to_string()));
    }
    Ok(out)
}

/// Reads the training (`train`) or test part of CUB-200-2011 under `root` (the folder holding
/// `images.txt`). Checks that every id has a label and a split entry, every label is in
/// 1..=200 and every image file exists; errors name the file and line.
pub fn read_cub(root: &Path, train: bool) -> Result<FileSet> {
    let images = read_pairs(&root.join("images.txt"))?;
    let labels_path = root.join("image_class_labels.txt");
    let split_path = root.join("train_test_split.txt");
    let labels: HashMap<u64, String> = read_pairs(&labels_path)?.into_iter().collect();
    let split: HashMap<u64, String> = read_pairs(&split_path)?.into_iter().collect();
    let mut set = FileSet {
        name: format!("cub200/{}", if train { "train" } else { "test" }),
        paths: Vec::new(),
        labels: Vec::new(),
        classes: 200,
    };
    for (id, rel) in images {
        let label = labels.get(&id).ok_or_else(|| {
            DataError::format(
                &labels_path.display().to_string(),
                format!("image id {id} has no label"),
            )
        })?;
        let label: u32 = match label.parse::<u32>() {
            Ok(l) if (1..=200).contains(&l) => l - 1,
            _ => {
                return Err(DataError::format(
                    &labels_path.display().to_string(),
                    format!("image id {id}: class `{label}` is not in 1..200"),
                ))
            }
        };
        let is_train = match split.get(&id).map(String::as_str) {
            Some("1") => true,
            Some("0") => false,
            Some(other) => {
                return Err(DataError::format(
                    &split_path.display().to_string(),
                    format!("image id {id}: split `{other}` is neither 1 nor 0"),
                ))
            }
            None => {
                return Err(DataError::format(
                    &split_path.display().to_string(),
                    format!("image id {id} has no split entry"),
                ))
            }
        };
        if is_train != train {
            continue;
        }
        let path = root.join("images").join(&rel);
        if !path.is_file() {
            return Err(DataError::format(
                &path.display().to_string(),
                format!("image id {id} is listed in images.txt but the file is missing"),
            ));
        }
        set.paths.push(path);
        set.labels.push(label);
    }
    if set.is_empty() {
        return Err(DataError::format(
            &root.display().to_string(),
            format!("no {} images", if train { "training" } else { "test" }),
        ));
    }
    Ok(set)
}
