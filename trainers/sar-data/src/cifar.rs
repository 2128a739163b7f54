//! CIFAR-10 and CIFAR-100, binary versions.
//!
//! CIFAR-100 (`cifar-100-binary/train.bin`, `test.bin`): 3,074-byte records, each the coarse
//! label byte (< 20), the fine label byte (< 100), then 1,024 red, 1,024 green and 1,024 blue
//! bytes (32×32 row-major). CIFAR-10 (`cifar-10-batches-bin/data_batch_{1..5}.bin`,
//! `test_batch.bin`): 3,073-byte records with one label byte (< 10). No header. The pixel
//! planes are already CHW, so records are copied as they are.

use crate::{DataError, ImageSet, Result};
use std::io::{BufReader, Read};
use std::path::Path;

/// Which CIFAR, and for CIFAR-100 which label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cifar {
    /// 10 classes, one label byte.
    Ten,
    /// 100 fine classes (the second label byte).
    HundredFine,
    /// 20 coarse superclasses (the first label byte).
    HundredCoarse,
}

impl Cifar {
    fn labels(self) -> usize {
        match self {
            Cifar::Ten => 1,
            _ => 2,
        }
    }
    fn record(self) -> usize {
        self.labels() + PIXELS
    }
    /// Number of classes.
    pub fn classes(self) -> usize {
        match self {
            Cifar::Ten => 10,
            Cifar::HundredFine => 100,
            Cifar::HundredCoarse => 20,
        }
    }
}

const PIXELS: usize = 3 * 32 * 32;

/// Parses CIFAR records from `reader` into `set` (appending); `name` is used in messages.
pub fn parse_into(reader: impl Read, kind: Cifar, name: &str, set: &mut ImageSet) -> Result<()> {
    let mut r = BufReader::with_capacity(1 << 20, reader);
    let mut record = vec![0u8; kind.record()];
    let mut index = 0usize;
    loop {
        let mut filled = 0;
        while filled < record.len() {
            let n = r
                .read(&mut record[filled..])
                .map_err(|e| DataError::format(name, format!("cannot read record {index}: {e}")))?;
            if n == 0 {
                break;
            }
            filled += n;
        }
        if filled == 0 {
            return Ok(());
        }
        if filled < record.len() {
            return Err(DataError::format(
                name,
                format!("truncated: record {index} has {filled} of {} bytes ({index} whole records before it)", record.len()),
            ));
        }
        let label = match kind {
            Cifar::Ten | Cifar::HundredCoarse => record[0],
            Cifar::HundredFine => record[1],
        };
        if label as usize >= kind.classes() {
            return Err(DataError::format(
                name,
                format!(
                    "record {index}: label {label} is not below {} classes",
                    kind.classes()
                ),
            ));
        }
        set.labels.push(label as u32);
        set.images.extend_from_slice(&record[kind.labels()..]);
        index += 1;
    }
}

fn empty(kind: Cifar, name: &str, capacity: usize) -> ImageSet {
    ImageSet {
        name: name.to_string(),
        channels: 3,
        height: 32,
        width: 32,
        classes: kind.classes(),
        max_value: 255,
        images: Vec::with_capacity(capacity * PIXELS),
        labels: Vec::with_capacity(capacity),
    }
}

/// Reads the files in order into one set.
pub fn read_files(paths: &[&Path], kind: Cifar, name: &str) -> Result<ImageSet> {
    // Size the buffers from the file lengths: one allocation, no copy of the set.
    let total: u64 = paths
        .iter()
        .filter_map(|p| std::fs::metadata(p).ok())
        .map(|m| m.len())
        .sum();
    let mut set = empty(kind, name, (total / kind.record() as u64) as usize);
    for p in paths {
        let f = std::fs::File::open(p).map_err(|e| DataError::io(p, e))?;
        parse_into(f, kind, &p.display().to_string(), &mut set)?;
    }
    if set.is_empty() {
        return Err(DataError::Request(format!(
            "{name}: no CIFAR records in {paths:?}"
        )));
    }
    Ok(set)
}

/// CIFAR-100 from its folder (`train.bin` / `test.bin`, in `dir` or `dir/cifar-100-binary`).
pub fn read_cifar100(dir: &Path, train: bool, kind: Cifar) -> Result<ImageSet> {
    let file = if train { "train.bin" } else { "test.bin" };
    let path = [dir.join(file), dir.join("cifar-100-binary").join(file)]
        .into_iter()
        .find(|p| p.is_file())
        .ok_or_else(|| {
            DataError::format(
                &dir.display().to_string(),
                format!("no {file} here or in cifar-100-binary/"),
            )
        })?;
    read_files(
        &[&path],
        kind,
        &format!("cifar100/{}", if train { "train" } else { "test" }),
    )
}

/// CIFAR-10 from its folder (`data_batch_1..5.bin` or `test_batch.bin`, in `dir` or
/// `dir/cifar-10-batches-bin`).
pub fn read_cifar10(dir: &Path, train: bool) -> Result<ImageSet> {
    let base = [dir.to_path_buf(), dir.join("cifar-10-batches-bin")]
        .into_iter()
        .find(|d| {
            d.join(if train {
                "data_batch_1.bin"
            } else {
                "test_batch.bin"
            })
            .is_file()
        })
        .ok_or_else(|| {
            DataError::format(
                &dir.display().to_string(),
                "no CIFAR-10 batches here or in cifar-10-batches-bin/",
            )
        })?;
    let files: Vec<std::path::PathBuf> = if train {
        (1..=5)
            .map(|i| base.join(format!("data_batch_{i}.bin")))
            .collect()
    } else {
        vec![base.join("test_batch.bin")]
    };
    let refs: Vec<&Path> = files.iter().map(|p| p.as_path()).collect();
    read_files(
        &refs,
        Cifar::Ten,
        &format!("cifar10/{}", if train { "train" } else { "test" }),
    )
}
