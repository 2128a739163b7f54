//! Prints parameters and multiply-adds per image of every model (and what SAR's h_ψ adds).
use candle_core::{DType, Device};
use candle_nn::VarMap;
use sar_models::{build, Arch, ModelSpec, Stem};

fn main() {
    println!(
        "{:<22} {:>7} {:>6} {:>12} {:>14} {:>10}",
        "model", "input", "D", "parameters", "multiply-adds", "SAR h_ψ"
    );
    for (arch, stem, c, k, size) in [
        (Arch::SmallCnn, Stem::Cifar, 1, 10, 8),
        (Arch::SmallCnn, Stem::Cifar, 1, 10, 28),
        (Arch::ResNet32, Stem::Cifar, 3, 100, 32),
        (Arch::ResNet18, Stem::Cifar, 3, 100, 32),
        (Arch::ResNet50, Stem::Cifar, 3, 100, 32),
        (Arch::ResNet18, Stem::Imagenet, 3, 200, 224),
        (Arch::ResNet50, Stem::Imagenet, 3, 200, 224),
    ] {
        let varmap = VarMap::new();
        let spec = ModelSpec {
            arch,
            stem,
            in_channels: c,
            classes: k,
            seed: 0,
        };
        let m = build(&spec, &varmap, &Device::Cpu, DType::F32).unwrap();
        let cost = m.cost(size, size);
        let d = m.feature_dim() as u64;
        println!(
            "{:<22} {:>7} {:>6} {:>12} {:>14} {:>10}",
            format!("{arch} ({stem:?}, {k} cl.)"),
            format!("{c}×{size}²"),
            d,
            cost.params,
            cost.macs,
            2 * (d * d + d) + 4 * d
        );
    }
}
