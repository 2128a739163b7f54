//! # sar-data: image data sets in their official formats
//!
//! Every reader returns an [`ImageSet`] (u8 pixels, CHW per image, row-major, and u32 labels)
//! or a [`DataError`] naming the file and the problem: a truncated record, a label out of
//! range, a bad magic number. Readers never panic on bad bytes. Each parses from any
//! [`std::io::Read`] as well as from a path (the fuzz targets feed them bytes). Files are
//! streamed into the final buffers, so a data set is never held twice in memory.
//!
//! - [`idx`]: MNIST-family IDX files, plain or gzip (e.g. Fashion-MNIST from Debian's
//!   `dataset-fashion-mnist`);
//! - [`cifar`]: CIFAR-10 and CIFAR-100 binary versions;
//! - [`digits`]: the 1,797 UCI handwritten digits (8×8, 0..16), embedded in the crate;
//! - [`split`]: long-tailed subsets by the CIFAR-LT rule and stratified splits, from a seed;
//! - [`seg`]: segmentation data (Cityscapes, ADE20K, Pascal-Context-59, the embedded glyph
//!   mosaic) and [`seg_augment`], mmsegmentation's training pipeline.

pub mod augment;
pub mod cifar;
pub mod cub;
pub mod dataset;
pub mod digits;
pub mod idx;
pub mod seg;
pub mod seg_augment;
pub mod split;

use std::path::Path;

/// A problem with a data file.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// The file could not be opened or read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The file's content is not what its format requires.
    #[error("{path}: {reason}")]
    Format {
        /// The file.
        path: String,
        /// What is wrong, in words.
        reason: String,
    },
    /// A request does not fit the data (a split asking for more images than a class has).
    #[error("{0}")]
    Request(String),
}

impl DataError {
    pub(crate) fn format(path: &str, reason: impl Into<String>) -> Self {
        DataError::Format {
            path: path.to_string(),
            reason: reason.into(),
        }
    }
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        DataError::Io {
            path: path.display().to_string(),
            source,
        }
    }
}

/// Result alias of this crate.
pub type Result<T> = std::result::Result<T, DataError>;

/// Images and labels in memory: `images` holds N images of `channels × height × width` bytes
/// (channel planes, rows, columns), `labels` N class indices below `classes`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageSet {
    /// A name for messages and reports (e.g. `cifar100/train`).
    pub name: String,
    /// C of each image.
    pub channels: usize,
    /// H.
    pub height: usize,
    /// W.
    pub width: usize,
    /// Number of classes.
    pub classes: usize,
    /// The largest pixel value the format uses (255, or 16 for the UCI digits).
    pub max_value: u8,
    /// N·C·H·W pixels.
    pub images: Vec<u8>,
    /// N labels.
    pub labels: Vec<u32>,
}

impl ImageSet {
    /// N.
    pub fn len(&self) -> usize {
        self.labels.len()
    }
    /// Whether there are no images.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }
    /// Bytes per image.
    pub fn image_len(&self) -> usize {
        self.channels * self.height * self.width
    }
    /// Image `i` (CHW), or `None` past the end.
    pub fn image(&self, i: usize) -> Option<&[u8]> {
        let n = self.image_len();
        self.images.get(i * n..(i + 1) * n)
    }
    /// Images per class.
    pub fn class_counts(&self) -> Vec<u64> {
        let mut counts = vec![0u64; self.classes];
        for &l in &self.labels {
            if let Some(c) = counts.get_mut(l as usize) {
                *c += 1;
            }
        }
        counts
    }
    /// The images at `indices`, in that order (an index past the end is an error).
    pub fn subset(&self, indices: &[usize], name: &str) -> Result<ImageSet> {
        let n = self.image_len();
        let mut images = Vec::with_capacity(indices.len() * n);
        let mut labels = Vec::with_capacity(indices.len());
        for &i in indices {
            let img = self.image(i).ok_or_else(|| {
                DataError::Request(format!(
                    "{}: index {i} is past its {} images",
                    self.name,
                    self.len()
                ))
            })?;
            images.extend_from_slice(img);
            labels.push(self.labels[i]);
        }
        Ok(ImageSet {
            name: name.to_string(),
            channels: self.channels,
            height: self.height,
            width: self.width,
            classes: self.classes,
            max_value: self.max_value,
            images,
            labels,
        })
    }
    /// Checks the lengths and the label range (for sets built by hand).
    pub fn validate(&self) -> Result<()> {
        if self.images.len() != self.len() * self.image_len() {
            return Err(DataError::format(
                &self.name,
                format!(
                    "{} pixels for {} images of {} bytes",
                    self.images.len(),
                    self.len(),
                    self.image_len()
                ),
            ));
        }
        if let Some((i, &l)) = self
            .labels
            .iter()
            .enumerate()
            .find(|&(_, &l)| l as usize >= self.classes)
        {
            return Err(DataError::format(
                &self.name,
                format!(
                    "label {l} of image {i} is not below {} classes",
                    self.classes
                ),
            ));
        }
        Ok(())
    }
}
