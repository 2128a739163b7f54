//! Compares a sar-models ResNet with torchvision's on a case written by
//! `tests/torch/check_models.py` (see there). Exits non-zero on a mismatch.

use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use sar_models::{build, pretrained::load_pretrained, Arch, ModelSpec, Stem};

/// max |a − b| / max |b|: f32 sums in another order differ in proportion to the values.
fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    let max_abs = |t: &Tensor| -> f32 {
        t.abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar()
            .unwrap()
    };
    max_abs(&(a - b).unwrap()) / max_abs(b).max(f32::MIN_POSITIVE)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let arch = match args[1].as_str() {
        "resnet18" => Arch::ResNet18,
        "resnet50" => Arch::ResNet50,
        other => panic!("unknown arch {other}"),
    };
    let prefix = &args[2];
    let varmap = VarMap::new();
    let spec = ModelSpec {
        arch,
        stem: Stem::Imagenet,
        in_channels: 3,
        classes: 1000,
        seed: 0,
        init: Default::default(),
    };
    let model = build(&spec, &varmap, &Device::Cpu, DType::F32).unwrap();
    let report = load_pretrained(
        &varmap,
        format!("{prefix}.weights.safetensors").as_ref(),
        &[],
    )
    .unwrap();
    let io =
        candle_core::safetensors::load(format!("{prefix}.io.safetensors"), &Device::Cpu).unwrap();
    let x = &io["input"];
    let feats = model.features(x, false).unwrap();
    let logits = model.classify(&feats).unwrap();
    let train_logits = model.forward(x, true).unwrap();
    let rm = varmap.data().lock().unwrap()["bn1.running_mean"]
        .as_tensor()
        .clone();
    let grads = (&train_logits * &io["upstream"])
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let rows = [
        (
            "features (eval)",
            max_diff(&feats, &io["features_eval"]),
            1e-5,
        ),
        ("logits (eval)", max_diff(&logits, &io["logits_eval"]), 1e-5),
        (
            "logits (train)",
            max_diff(&train_logits, &io["logits_train"]),
            1e-4,
        ),
        (
            "bn1 running mean after train",
            max_diff(&rm, &io["bn1_running_mean_after_train"]),
            1e-6,
        ),
    ];
    let mut rows = rows.to_vec();
    let data = varmap.data().lock().unwrap();
    // Gradients against torch's f64 ones, allowed 3× torch's own f32 error + 1e-5.
    let mut names: Vec<String> = io
        .keys()
        .filter_map(|k| k.strip_prefix("grad64.").map(String::from))
        .collect();
    names.sort();
    let labels: Vec<String> = names.iter().map(|n| format!("d/d {n} vs f64")).collect();
    for (name, label) in names.iter().zip(&labels) {
        let ours = grads
            .get(data[name.as_str()].as_tensor())
            .expect("a gradient");
        let torch_err: f32 = io[&format!("torch_f32_error.{name}")]
            .to_vec1::<f32>()
            .unwrap()[0];
        rows.push((
            label.as_str(),
            max_diff(ours, &io[&format!("grad64.{name}")]),
            3.0 * torch_err + 1e-5,
        ));
    }
    drop(data);
    let mut ok = true;
    println!("{arch}: {} tensors loaded", report.loaded.len());
    for (what, d, tol) in rows {
        let pass = d <= tol;
        ok &= pass;
        println!(
            "  {what:<40} max |diff| / max |torch| {d:.2e} (tolerance {tol:.1e}) {}",
            if pass { "ok" } else { "FAIL" }
        );
    }
    std::process::exit(if ok { 0 } else { 1 });
}
