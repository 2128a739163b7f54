//! MNIST-family IDX files (`train-images-idx3-ubyte`, `…-labels-idx1-ubyte`), plain or gzip.
//!
//! Format: two zero bytes, a type byte (0x08 = unsigned byte, the only type these data sets
//! use and the only one accepted), the number of dimensions, then each dimension as a
//! big-endian u32, then the data in row-major order, nothing after it. Gzip is recognised by its
//! magic bytes (1f 8b), whatever the file name.

use crate::{DataError, ImageSet, Result};
use std::io::{BufReader, Read};
use std::path::Path;

/// An IDX array of unsigned bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Idx {
    /// Dimensions.
    pub dims: Vec<usize>,
    /// Row-major data.
    pub data: Vec<u8>,
}

/// Largest array accepted (bytes): far above any IDX data set, low enough that a corrupt
/// header cannot make the reader try to hold terabytes.
pub const MAX_BYTES: usize = 1 << 34;

/// Parses an IDX array (gzip or plain) from `reader`; `name` is used in messages.
pub fn parse(reader: impl Read, name: &str) -> Result<Idx> {
    let mut r = BufReader::new(reader);
    let mut magic = [0u8; 2];
    read_exact(&mut r, &mut magic, name, "the header")?;
    if magic == [0x1f, 0x8b] {
        let chained = std::io::Cursor::new(magic).chain(r);
        return parse_plain(flate2::read::GzDecoder::new(chained), name);
    }
    parse_plain(std::io::Cursor::new(magic).chain(r), name)
}

fn read_exact(r: &mut impl Read, buf: &mut [u8], name: &str, what: &str) -> Result<()> {
    r.read_exact(buf).map_err(|e| match e.kind() {
        std::io::ErrorKind::UnexpectedEof => {
            DataError::format(name, format!("file ends inside {what}"))
        }
        _ => DataError::format(name, format!("cannot read {what}: {e}")),
    })
}

fn parse_plain(mut r: impl Read, name: &str) -> Result<Idx> {
    let mut head = [0u8; 4];
    read_exact(&mut r, &mut head, name, "the header")?;
    if head[0] != 0 || head[1] != 0 {
        return Err(DataError::format(
            name,
            format!(
                "not an IDX file: magic {:02x} {:02x} {:02x} {:02x}",
                head[0], head[1], head[2], head[3]
            ),
        ));
    }
    if head[2] != 0x08 {
        return Err(DataError::format(
            name,
            format!(
                "IDX element type 0x{:02x} is not supported (only unsigned byte, 0x08)",
                head[2]
            ),
        ));
    }
    let ndims = head[3] as usize;
    if ndims == 0 {
        return Err(DataError::format(name, "IDX file with zero dimensions"));
    }
    let mut dims = Vec::with_capacity(ndims);
    for k in 0..ndims {
        let mut d = [0u8; 4];
        read_exact(
            &mut r,
            &mut d,
            name,
            &format!("dimension {k} of the header"),
        )?;
        dims.push(u32::from_be_bytes(d) as usize);
    }
    let len = dims
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .filter(|&n| n <= MAX_BYTES)
        .ok_or_else(|| {
            DataError::format(
                name,
                format!("dimensions {dims:?} exceed {MAX_BYTES} bytes"),
            )
        })?;
    // Grow as bytes arrive instead of trusting the header with one huge allocation.
    let mut data = Vec::with_capacity(len.min(1 << 26));
    let got = r
        .by_ref()
        .take(len as u64)
        .read_to_end(&mut data)
        .map_err(|e| DataError::format(name, format!("cannot read the data: {e}")))?;
    if got < len {
        return Err(DataError::format(
            name,
            format!("truncated: dimensions {dims:?} need {len} data bytes, found {got}"),
        ));
    }
    let mut extra = [0u8; 1];
    if r.read(&mut extra)
        .map_err(|e| DataError::format(name, format!("cannot read past the data: {e}")))?
        > 0
    {
        return Err(DataError::format(
            name,
            format!("bytes follow the {len} data bytes of dimensions {dims:?}"),
        ));
    }
    Ok(Idx { dims, data })
}

/// Reads an IDX file (gzip or plain).
pub fn read(path: &Path) -> Result<Idx> {
    let f = std::fs::File::open(path).map_err(|e| DataError::io(path, e))?;
    parse(f, &path.display().to_string())
}

/// An image set from an images file `[N, H, W]` and a labels file `[N]` with `classes` classes.
pub fn read_pair(images: &Path, labels: &Path, classes: usize, name: &str) -> Result<ImageSet> {
    let img = read(images)?;
    let lab = read(labels)?;
    let (ip, lp) = (images.display().to_string(), labels.display().to_string());
    let [n, h, w] = img.dims[..] else {
        return Err(DataError::format(
            &ip,
            format!(
                "images must have 3 dimensions [N, H, W], found {:?}",
                img.dims
            ),
        ));
    };
    if lab.dims != [n] {
        return Err(DataError::format(
            &lp,
            format!(
                "labels have dimensions {:?}, the images file {ip} holds {n} images",
                lab.dims
            ),
        ));
    }
    if let Some((i, &l)) = lab
        .data
        .iter()
        .enumerate()
        .find(|&(_, &l)| l as usize >= classes)
    {
        return Err(DataError::format(
            &lp,
            format!("label {l} of item {i} is not below {classes} classes"),
        ));
    }
    Ok(ImageSet {
        name: name.to_string(),
        channels: 1,
        height: h,
        width: w,
        classes,
        max_value: 255,
        images: img.data,
        labels: lab.data.iter().map(|&l| l as u32).collect(),
    })
}

/// The MNIST file names in `dir` (`train-…` or `t10k-…`), with or without `.gz`.
pub fn read_mnist_dir(dir: &Path, train: bool, classes: usize) -> Result<ImageSet> {
    let prefix = if train { "train" } else { "t10k" };
    let find = |kind: &str| -> Result<std::path::PathBuf> {
        let base = format!("{prefix}-{kind}");
        [base.clone(), format!("{base}.gz")]
            .iter()
            .map(|n| dir.join(n))
            .find(|p| p.is_file())
            .ok_or_else(|| {
                DataError::format(
                    &dir.display().to_string(),
                    format!("no {base} or {base}.gz in this folder"),
                )
            })
    };
    let name = format!(
        "{}/{}",
        dir.file_name()
            .map_or_else(|| "idx".into(), |s| s.to_string_lossy().into_owned()),
        prefix
    );
    read_pair(
        &find("images-idx3-ubyte")?,
        &find("labels-idx1-ubyte")?,
        classes,
        &name,
    )
}
