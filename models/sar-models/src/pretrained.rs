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
    let skipped =
        |name: &str| name.starts_with("sar.") || skip_prefixes.iter().any(|p| name.starts_with(p));
    load_mapped(
        varmap,
        path,
        &|name: &str| (!skipped(name)).then(|| name.to_string()),
        &|name: &str| !skipped(name),
    )
}

/// File prefixes of ImageNet classification heads, ignored by [`load_backbone`]: torchvision's
/// and mmcls' `fc.`, timm's `classifier.`/`head.`, the HRNet classification branch
/// (`incre_modules.`, `downsamp_modules.`, `final_layer.`) and the Swin classifier's final
/// LayerNorm `norm.` (before its pooling and `head`).
pub const CLASSIFIER_PREFIXES: [&str; 7] = [
    "fc.",
    "classifier.",
    "head.",
    "incre_modules.",
    "downsamp_modules.",
    "final_layer.",
    "norm.",
];

/// File tensor suffixes of buffers that a backbone derives from its configuration, ignored by
/// [`load_backbone`]: Swin's `relative_position_index` and shift `attn_mask` (recomputed from
/// the window; a different window shows in the bias tables' shapes, which must match).
pub const DERIVED_BUFFER_SUFFIXES: [&str; 2] = [".relative_position_index", ".attn_mask"];

/// Whether `name` is one of the output LayerNorms `backbone.norm{i}.*` that mmsegmentation's
/// Swin adds for the segmentation outputs: not in an ImageNet checkpoint, so they keep their
/// initialisation (ones and zeros), as mmsegmentation's non-strict load leaves them.
fn is_swin_output_norm(name: &str) -> bool {
    name.strip_prefix("backbone.norm").is_some_and(|rest| {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        digits > 0 && rest[digits..].starts_with('.')
    })
}

/// Loads ImageNet-pretrained backbone weights into a segmentation model: file tensor `N`
/// loads into `backbone.N` (the names of mmsegmentation's `ResNetV1c` and `HRNet`, which
/// are also timm's HRNet names and the open-mmlab ImageNet checkpoints'), classifier tensors
/// ([`CLASSIFIER_PREFIXES`]) and `num_batches_tracked` are ignored, and every `backbone.*`
/// variable must be in the file; the heads keep their initialisation. A file whose names
/// already start with `backbone.` (a whole mmsegmentation checkpoint) loads with the identity
/// mapping through [`load_pretrained`] instead.
///
/// Swin: the file is the official ImageNet checkpoint converted by mmsegmentation's
/// `swin2mmseg.py` (names `patch_embed.projection`, `stages.{i}.blocks.{j}.attn.w_msa.*`,
/// `ffn.layers.*`, `stages.{i}.downsample.*` in `nn.Unfold`'s order). Its derived buffers
/// ([`DERIVED_BUFFER_SUFFIXES`]) and final `norm.` are ignored, and the output norms
/// `backbone.norm{i}` are not required, which is what mmsegmentation's `init_weights` makes of
/// the same file; everything else must match strictly. Bias tables of another window size are
/// refused (mmsegmentation would resize them bicubically; set `model.window` to the file's).
pub fn load_backbone(varmap: &VarMap, path: &Path) -> Result<LoadReport> {
    load_mapped(
        varmap,
        path,
        &|name: &str| {
            let ignored = CLASSIFIER_PREFIXES.iter().any(|p| name.starts_with(p))
                || DERIVED_BUFFER_SUFFIXES.iter().any(|s| name.ends_with(s));
            (!ignored).then(|| format!("backbone.{name}"))
        },
        &|name: &str| name.starts_with("backbone.") && !is_swin_output_norm(name),
    )
}

/// The names in a safetensors file (for choosing how to load it).
pub fn tensor_names(path: &Path) -> Result<Vec<String>> {
    let err = |reason: String| ModelError::Weights {
        path: path.display().to_string(),
        reason,
    };
    let bytes = std::fs::read(path).map_err(|e| err(format!("cannot read: {e}")))?;
    let file = safetensors::SafeTensors::deserialize(&bytes)
        .map_err(|e| err(format!("not a valid safetensors file: {e}")))?;
    Ok(file.names().into_iter().map(String::from).collect())
}

/// The general strict load: `map` gives the model variable of a file tensor (None: ignore
/// it), `required` the model variables that the file must provide (the others keep their
/// values). Nothing changes unless everything matches.
pub fn load_mapped(
    varmap: &VarMap,
    path: &Path,
    map: &dyn Fn(&str) -> Option<String>,
    required: &dyn Fn(&str) -> bool,
) -> Result<LoadReport> {
    let shown = path.display().to_string();
    let err = |reason: String| ModelError::Weights {
        path: shown.clone(),
        reason,
    };
    let bytes = std::fs::read(path).map_err(|e| err(format!("cannot read: {e}")))?;
    let file = safetensors::SafeTensors::deserialize(&bytes)
        .map_err(|e| err(format!("not a valid safetensors file: {e}")))?;
    let data = varmap.data().lock().expect("varmap lock");
    let mut report = LoadReport::default();
    let mut updates = Vec::new();
    let mut names: Vec<String> = file.names().into_iter().map(String::from).collect();
    names.sort();
    let mut provided = BTreeSet::new();
    for name in &names {
        let target = if name.ends_with(".num_batches_tracked") {
            None
        } else {
            map(name)
        };
        let Some(target) = target else {
            report.ignored.push(name.clone());
            continue;
        };
        let Some(var) = data.get(&target) else {
            return Err(err(format!(
                "tensor {name} has no counterpart {target} in the model (wrong architecture?)"
            )));
        };
        let view = file
            .tensor(name)
            .map_err(|e| err(format!("tensor {name}: {e}")))?;
        if view.shape() != var.dims() {
            let hint = match (view.shape(), var.dims()) {
                ([file_rows, _], [model_rows, _])
                    if name.ends_with(".relative_position_bias_table") =>
                {
                    // (2M − 1)² rows for an M × M window.
                    let window = |rows: usize| rows.isqrt().div_ceil(2);
                    format!(
                        " (a window of {} where the model's is {}: set model.window to the \
                         file's; bias tables are not resized)",
                        window(*file_rows),
                        window(*model_rows)
                    )
                }
                _ => String::new(),
            };
            return Err(err(format!(
                "tensor {name} has shape {:?}, the model needs {:?}{hint}",
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
        provided.insert(target.clone());
        updates.push((target, t));
    }
    let mut model_names: Vec<&String> = data.keys().collect();
    model_names.sort();
    for name in model_names {
        if !required(name) {
            report.kept.push(name.clone());
        } else if !provided.contains(name) {
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
