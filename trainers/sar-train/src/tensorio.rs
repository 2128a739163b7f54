//! Reading and writing named tensors in safetensors files, with errors that name the tensor.
//!
//! Writes are atomic: the bytes go to a temporary file in the destination's folder, which is
//! flushed to disk and then renamed over the destination, so a reader never sees a partial
//! file and a failed write leaves no file behind.

use safetensors::tensor::{Dtype, TensorView};
use safetensors::SafeTensors;
use std::collections::HashMap;
use std::io::Write;
use std::path::Path;

/// A problem with a named tensor or with the file holding it.
#[derive(Debug, thiserror::Error)]
pub enum TensorError {
    /// The file is not valid safetensors.
    #[error("{path}: not a valid safetensors file: {reason}")]
    Corrupt {
        /// File.
        path: String,
        /// Parser message.
        reason: String,
    },
    /// A required tensor is absent.
    #[error("missing tensor `{0}`")]
    Missing(String),
    /// A tensor has a dtype that is not accepted.
    #[error("tensor `{name}` has dtype {found:?}, expected {expected}")]
    Dtype {
        /// Tensor.
        name: String,
        /// Dtype in the file.
        found: Dtype,
        /// Accepted dtypes, in words.
        expected: &'static str,
    },
    /// A tensor has the wrong shape.
    #[error("tensor `{name}` has shape {found:?}, expected {expected}")]
    Shape {
        /// Tensor.
        name: String,
        /// Shape in the file.
        found: Vec<usize>,
        /// Expected shape, in words.
        expected: String,
    },
    /// A float tensor holds NaN or an infinity.
    #[error("tensor `{name}` holds a non-finite value at flat index {index}")]
    NonFinite {
        /// Tensor.
        name: String,
        /// First offending index.
        index: usize,
    },
    /// Reading or writing the file failed.
    #[error("{path}: {source}")]
    Io {
        /// File.
        path: String,
        /// Cause.
        source: std::io::Error,
    },
}

/// A tensor read from a file, converted to a host type.
#[derive(Debug, Clone, PartialEq)]
pub struct HostTensor<T> {
    /// Dimensions.
    pub shape: Vec<usize>,
    /// Row-major values.
    pub data: Vec<T>,
}

/// A parsed safetensors file (owns its bytes).
pub struct TensorFile {
    path: String,
    bytes: Vec<u8>,
}

impl TensorFile {
    /// Reads and parses `path`.
    pub fn open(path: &Path) -> Result<Self, TensorError> {
        let p = path.display().to_string();
        let bytes = std::fs::read(path).map_err(|source| TensorError::Io {
            path: p.clone(),
            source,
        })?;
        Self::from_bytes(p, bytes)
    }

    /// Parses bytes already in memory (`name` is used in messages).
    pub fn from_bytes(name: String, bytes: Vec<u8>) -> Result<Self, TensorError> {
        SafeTensors::deserialize(&bytes).map_err(|e| TensorError::Corrupt {
            path: name.clone(),
            reason: e.to_string(),
        })?;
        Ok(TensorFile { path: name, bytes })
    }

    fn view(&self) -> SafeTensors<'_> {
        // Validated in `from_bytes`.
        SafeTensors::deserialize(&self.bytes).expect("validated at open")
    }

    /// Names of the tensors in the file.
    pub fn names(&self) -> Vec<String> {
        self.view().names().into_iter().map(str::to_owned).collect()
    }

    /// The file's name, as given at open.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// A float tensor (f64, f32) as f64, rejecting non-finite values. `None` if absent.
    pub fn f64_opt(&self, name: &str) -> Result<Option<HostTensor<f64>>, TensorError> {
        let st = self.view();
        let Ok(t) = st.tensor(name) else {
            return Ok(None);
        };
        let data: Vec<f64> = match t.dtype() {
            Dtype::F64 => t
                .data()
                .chunks_exact(8)
                .map(|b| f64::from_le_bytes(b.try_into().unwrap()))
                .collect(),
            Dtype::F32 => t
                .data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes(b.try_into().unwrap()) as f64)
                .collect(),
            found => {
                return Err(TensorError::Dtype {
                    name: name.into(),
                    found,
                    expected: "F64 or F32",
                })
            }
        };
        if let Some(index) = data.iter().position(|v| !v.is_finite()) {
            return Err(TensorError::NonFinite {
                name: name.into(),
                index,
            });
        }
        Ok(Some(HostTensor {
            shape: t.shape().to_vec(),
            data,
        }))
    }

    /// A required float tensor as f64.
    pub fn f64(&self, name: &str) -> Result<HostTensor<f64>, TensorError> {
        self.f64_opt(name)?
            .ok_or_else(|| TensorError::Missing(name.into()))
    }

    /// An integer tensor (i64, i32, u8, u16, u32) as i64. `None` if absent.
    pub fn i64_opt(&self, name: &str) -> Result<Option<HostTensor<i64>>, TensorError> {
        let st = self.view();
        let Ok(t) = st.tensor(name) else {
            return Ok(None);
        };
        let d = t.data();
        let data: Vec<i64> = match t.dtype() {
            Dtype::I64 => d
                .chunks_exact(8)
                .map(|b| i64::from_le_bytes(b.try_into().unwrap()))
                .collect(),
            Dtype::I32 => d
                .chunks_exact(4)
                .map(|b| i32::from_le_bytes(b.try_into().unwrap()) as i64)
                .collect(),
            Dtype::U32 => d
                .chunks_exact(4)
                .map(|b| u32::from_le_bytes(b.try_into().unwrap()) as i64)
                .collect(),
            Dtype::U16 => d
                .chunks_exact(2)
                .map(|b| u16::from_le_bytes(b.try_into().unwrap()) as i64)
                .collect(),
            Dtype::U8 => d.iter().map(|&b| b as i64).collect(),
            found => {
                return Err(TensorError::Dtype {
                    name: name.into(),
                    found,
                    expected: "I64 (or I32, U32, U16, U8)",
                })
            }
        };
        Ok(Some(HostTensor {
            shape: t.shape().to_vec(),
            data,
        }))
    }

    /// A required integer tensor as i64.
    pub fn i64(&self, name: &str) -> Result<HostTensor<i64>, TensorError> {
        self.i64_opt(name)?
            .ok_or_else(|| TensorError::Missing(name.into()))
    }

    /// A flag tensor (bool, u8, or a float/int where non-zero = true). `None` if absent.
    pub fn flags_opt(&self, name: &str) -> Result<Option<HostTensor<bool>>, TensorError> {
        let st = self.view();
        let Ok(t) = st.tensor(name) else {
            return Ok(None);
        };
        if t.dtype() == Dtype::BOOL {
            return Ok(Some(HostTensor {
                shape: t.shape().to_vec(),
                data: t.data().iter().map(|&b| b != 0).collect(),
            }));
        }
        if let Some(f) = self.f64_opt(name).ok().flatten() {
            return Ok(Some(HostTensor {
                shape: f.shape,
                data: f.data.iter().map(|&v| v != 0.0).collect(),
            }));
        }
        match self.i64_opt(name) {
            Ok(Some(i)) => Ok(Some(HostTensor {
                shape: i.shape,
                data: i.data.iter().map(|&v| v != 0).collect(),
            })),
            _ => Err(TensorError::Dtype {
                name: name.into(),
                found: t.dtype(),
                expected: "BOOL, U8, I64, F32 or F64",
            }),
        }
    }
}

/// A tensor to be written.
#[derive(Debug, Clone)]
pub struct OutTensor {
    /// Element type.
    pub dtype: Dtype,
    /// Dimensions (`[]` for a scalar).
    pub shape: Vec<usize>,
    /// Little-endian bytes.
    pub bytes: Vec<u8>,
}

impl OutTensor {
    /// From f64 values and a shape (the product of the shape must equal the length).
    pub fn f64(shape: &[usize], values: &[f64]) -> Self {
        debug_assert_eq!(shape.iter().product::<usize>(), values.len());
        OutTensor {
            dtype: Dtype::F64,
            shape: shape.to_vec(),
            bytes: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        }
    }
    /// From i64 values and a shape.
    pub fn i64(shape: &[usize], values: &[i64]) -> Self {
        debug_assert_eq!(shape.iter().product::<usize>(), values.len());
        OutTensor {
            dtype: Dtype::I64,
            shape: shape.to_vec(),
            bytes: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        }
    }
    /// From bytes (pixels) and a shape.
    pub fn u8(shape: &[usize], values: &[u8]) -> Self {
        debug_assert_eq!(shape.iter().product::<usize>(), values.len());
        OutTensor {
            dtype: Dtype::U8,
            shape: shape.to_vec(),
            bytes: values.to_vec(),
        }
    }
    /// A scalar f64 (shape `[]`).
    pub fn scalar(v: f64) -> Self {
        Self::f64(&[], &[v])
    }
}

/// Serialises `tensors` with `metadata` to safetensors bytes.
pub fn serialize(
    tensors: &[(String, OutTensor)],
    metadata: HashMap<String, String>,
) -> Result<Vec<u8>, String> {
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .map(|(n, t)| TensorView::new(t.dtype, t.shape.clone(), &t.bytes).map(|v| (n.clone(), v)))
        .collect::<Result<_, _>>()
        .map_err(|e| e.to_string())?;
    safetensors::serialize(views, Some(metadata)).map_err(|e| e.to_string())
}

/// Writes `bytes` to `path` atomically (temporary file in the same folder, fsync, rename).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), TensorError> {
    let io = |source| TensorError::Io {
        path: path.display().to_string(),
        source,
    };
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => std::path::PathBuf::from("."),
    };
    let file_name = path
        .file_name()
        .ok_or_else(|| io(std::io::Error::other("not a file path")))?;
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        file_name.to_string_lossy(),
        std::process::id()
    ));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        drop(f);
        std::fs::rename(&tmp, path)?;
        // Make the rename itself durable.
        if let Ok(d) = std::fs::File::open(&dir) {
            let _ = d.sync_all();
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map_err(io)
}
