//! The embedded default data set: 1,797 handwritten digits, 8×8 greyscale, pixels 0..16,
//! 10 classes (about 180 each).
//!
//! Source: the test portion of the UCI "Optical Recognition of Handwritten Digits" data set
//! (E. Alpaydin, C. Kaynak, 1998; CC BY 4.0), as shipped in scikit-learn
//! (`sklearn/datasets/data/digits.csv.gz`). Format: gzip CSV, one image per line, 64 pixel
//! values in row-major order, then the label.

use crate::{DataError, ImageSet, Result};
use std::io::{BufRead, BufReader, Read};

const EMBEDDED: &[u8] = include_bytes!("../data/optdigits-1797.csv.gz");

/// Parses digits CSV (plain text) from `reader`; `name` is used in messages.
pub fn parse_csv(reader: impl Read, name: &str) -> Result<ImageSet> {
    let mut set = ImageSet {
        name: name.to_string(),
        channels: 1,
        height: 8,
        width: 8,
        classes: 10,
        max_value: 16,
        images: Vec::new(),
        labels: Vec::new(),
    };
    for (i, line) in BufReader::new(reader).lines().enumerate() {
        let line = line.map_err(|e| DataError::format(name, format!("line {}: {e}", i + 1)))?;
        if line.trim().is_empty() {
            continue;
        }
        let values: Vec<&str> = line.trim().split(',').collect();
        if values.len() != 65 {
            return Err(DataError::format(
                name,
                format!(
                    "line {}: {} values, expected 64 pixels and a label",
                    i + 1,
                    values.len()
                ),
            ));
        }
        for (k, v) in values.iter().enumerate() {
            let x: u8 = v.trim().parse().map_err(|_| {
                DataError::format(
                    name,
                    format!(
                        "line {}, value {}: `{v}` is not an integer 0..=255",
                        i + 1,
                        k + 1
                    ),
                )
            })?;
            let (limit, what) = if k < 64 { (16, "pixel") } else { (9, "label") };
            if x > limit {
                return Err(DataError::format(
                    name,
                    format!("line {}: {what} {x} is above {limit}", i + 1),
                ));
            }
            if k < 64 {
                set.images.push(x);
            } else {
                set.labels.push(x as u32);
            }
        }
    }
    if set.is_empty() {
        return Err(DataError::format(name, "no images"));
    }
    Ok(set)
}

/// The embedded 1,797 digits.
pub fn embedded() -> Result<ImageSet> {
    parse_csv(
        flate2::read::GzDecoder::new(EMBEDDED),
        "digits (embedded UCI optdigits)",
    )
}
