//! Loading pretrained weights from a safetensors file (e.g. a torchvision ResNet exported with
//! `safetensors.torch.save_file(model.state_dict(), path)`).
//!
//! Name mapping: the models use torchvision's names, so a file tensor `N` loads into the model
//! variable `N` unchanged (`conv1.weight`, `bn1.running_mean`, `layer2.0.downsample.1.bias`,
//! …). `*.num_batches_tracked` is ignored (BatchNorm here uses a fixed momentum). Tensors under
//! a skipped prefix (by default `fc.`: the ImageNet classifier has 1,000 classes) are not
//! loaded and keep their fresh initialisation, as do the SAR head's (`sar.`).
//!
//! Loading is strict, because a silent partial load trains from scratch without saying so:
//! a file tensor with no model variable, a model variable (outside the skipped prefixes) with
//! no file tensor, a shape mismatch or an unsupported dtype is an error naming the tensor.
//! F32, F64, F16 and BF16 files are accepted and converted to the model's dtype.

use crate::{ModelError, Result};
use candle_core::{DType, Tensor};
use candle_nn::VarMap;
use std::collections::BTreeSet;
use std::path::Path;

/// What a load did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LoadReport {
    /// Variables set from the file.
    pub loaded: Vec<String>,
    /// File tensors not used (`num_batches_tracked`, skipped prefixes).
    pub ignored: Vec<String>,
    /// Variables left at their initial values (skipped prefixes).
    pub kept: Vec<String>,
}

/// Loads `path` into `varmap`; see the module docs. Nothing is changed unless the whole file
/// matches.
pub fn load_pretrained(varmap: &VarMap, path: &Path, skip_prefixes: &[&str]) -> Result<LoadReport> {
    let shown = path.display().to_string();
    let err = |reason: String| ModelError::Weights {
        path: shown.clone(),
        reason,
    };
    let bytes = std::fs::read(path).map_err(|e| err(format!("cannot read: {e}")))?;
    let file = safetensors::SafeTensors::deserialize(&bytes)
        .map_err(|e| err(format!("not a valid safetensors file: {e}")))?;
    let skipped =
        |name: &str| name.starts_with("sar.") || skip_prefixes.iter().any(|p| name.starts_with(p));
    let data = varmap.data().lock().expect("varmap lock");
    let mut report = LoadReport::default();
    let mut updates = Vec::new();
    let mut names: Vec<String> = file.names().into_iter().map(String::from).collect();
    names.sort();
    for name in &names {
        if name.ends_with(".num_batches_tracked") || skipped(name) {
            report.ignored.push(name.clone());
            continue;
        }
        let Some(var) = data.get(name) else {
            return Err(err(format!(
                "tensor {name} has no counterpart in the model (wrong architecture?)"
            )));
        };
        let view = file
            .tensor(name)
            .map_err(|e| err(format!("tensor {name}: {e}")))?;
        if view.shape() != var.dims() {
            return Err(err(format!(
                "tensor {name} has shape {:?}, the model needs {:?}",
                view.shape(),
                var.dims()
            )));
        }
        let dtype = match view.dtype() {
            safetensors::Dtype::F32 => DType::F32,
            safetensors::Dtype::F64 => DType::F64,
            safetensors::Dtype::F16 => DType::F16,
            safetensors::Dtype::BF16 => DType::BF16,
            other => {
                return Err(err(format!(
                    "tensor {name} has dtype {other:?}; expected a float type"
                )))
            }
        };
        let t = Tensor::from_raw_buffer(view.data(), dtype, view.shape(), var.device())?
            .to_dtype(var.dtype())?;
        updates.push((name.clone(), t));
    }
    let in_file: BTreeSet<&str> = names.iter().map(String::as_str).collect();
    let mut model_names: Vec<&String> = data.keys().collect();
    model_names.sort();
    for name in model_names {
        if skipped(name) {
            report.kept.push(name.clone());
        } else if !in_file.contains(name.as_str()) {
            return Err(err(format!(
                "the model's tensor {name} is missing from the file"
            )));
        }
    }
    for (name, t) in updates {
        data[&name].set(&t)?;
        report.loaded.push(name);
    }
    Ok(report)
}
