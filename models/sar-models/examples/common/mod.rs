//! Shared by the PyTorch cross-check examples: random but realistic values for the tensors an
//! initialisation leaves trivial, and the weights file.
use candle_core::{Device, Tensor};
use candle_nn::VarMap;
use sar_math::rng::SeededRng;
use std::collections::HashMap;

/// Draws BatchNorm running statistics, LayerNorm scales, biases and relative-position bias
/// tables uniformly (in name order: the map's own order changes from run to run), so that
/// eval mode and every name are tested, then writes `{prefix}.weights.safetensors` and returns
/// the weights.
pub fn randomise_and_save(
    varmap: &VarMap,
    rng: &mut SeededRng,
    dev: &Device,
    prefix: &str,
) -> HashMap<String, Tensor> {
    let mut vars: Vec<_> = varmap.data().lock().unwrap().clone().into_iter().collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    for (name, var) in &vars {
        let (lo, hi) = if name.ends_with("running_var") {
            (0.5, 2.0)
        } else if name.ends_with("running_mean") {
            (-0.3, 0.3)
        } else if name.contains("norm") && name.ends_with("weight") {
            (0.5, 1.5)
        } else if name.ends_with("bias") {
            (-0.1, 0.1)
        } else if name.ends_with("relative_position_bias_table") {
            // Larger than the 0.02 initialisation, so that a wrong index shows.
            (-1.0, 1.0)
        } else {
            continue;
        };
        let v: Vec<f32> = (0..var.elem_count())
            .map(|_| (lo + (hi - lo) * rng.next_f64()) as f32)
            .collect();
        var.set(&Tensor::from_vec(v, var.shape(), dev).unwrap())
            .unwrap();
    }
    let weights: HashMap<String, Tensor> = vars
        .iter()
        .map(|(name, var)| (name.clone(), var.as_tensor().copy().unwrap()))
        .collect();
    candle_core::safetensors::save(&weights, format!("{prefix}.weights.safetensors")).unwrap();
    weights
}

/// Sets every variable of `varmap` (an f64 copy of the network) from `weights`.
pub fn load_f64(varmap: &VarMap, weights: &HashMap<String, Tensor>) {
    for (name, var) in varmap.data().lock().unwrap().iter() {
        var.set(&weights[name].to_dtype(candle_core::DType::F64).unwrap())
            .unwrap();
    }
}
