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
        (Arch::CnnPool, Stem::Cifar, 1, 10, 8),
        (Arch::CnnPool, Stem::Cifar, 1, 10, 28),
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
            init: Default::default(),
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
    // Segmentation models at 1024×1024 (the SAR paper's Table 20 resolution), 19 classes.
    use sar_models::seg::{build_segmenter, SegBackbone as B, SegHeadKind as H, SegSpec};
    println!(
        "\n{:<28} {:>6} {:>12} {:>12} {:>16} {:>10}",
        "segmenter (19 classes)", "D", "parameters", "aux head", "GMACs @1024²", "SAR h_ψ"
    );
    for (backbone, head, aux) in [
        (B::ResNet18V1c, H::Fcn, true),
        (B::ResNet50V1c, H::Fcn, true),
        (B::ResNet101V1c, H::Fcn, true),
        (B::ResNet50V1c, H::Aspp, true),
        (B::HrNetV2W18, H::Fcn, false),
        (B::HrNetV2W48, H::Fcn, false),
        (B::HrNetV2W18, H::Ocr, true),
        (B::HrNetV2W48, H::Ocr, true),
    ] {
        let spec = SegSpec {
            backbone,
            head,
            aux,
            width: 64,
            in_channels: 3,
            classes: 19,
            seed: 0,
            drop_path: 0.1,
            window: None,
        };
        let m = build_segmenter(&spec, &VarMap::new(), &Device::Cpu, DType::F32).unwrap();
        let cost = m.cost(1024, 1024);
        let d = m.feature_dim() as u64;
        println!(
            "{:<28} {:>6} {:>12} {:>12} {:>16.1} {:>10}",
            format!("{head:?} on {backbone}"),
            d,
            cost.params,
            m.aux_params(),
            cost.macs as f64 / 1e9,
            3 * d * d + 2 * d + 6 * d
        );
    }
    // SegFormer at 512×512 with 150 classes (ADE20K; the SegFormer paper's Table 1 setting).
    println!(
        "\n{:<28} {:>6} {:>12} {:>16} {:>10}",
        "SegFormer (150 classes)", "D", "parameters", "GMACs @512²", "SAR h_ψ"
    );
    for backbone in [B::MitB0, B::MitB1, B::MitB2, B::MitB3, B::MitB4, B::MitB5] {
        let spec = SegSpec {
            backbone,
            head: H::Segformer,
            aux: false,
            width: 64,
            in_channels: 3,
            classes: 150,
            seed: 0,
            drop_path: 0.1,
            window: None,
        };
        let m = build_segmenter(&spec, &VarMap::new(), &Device::Cpu, DType::F32).unwrap();
        let cost = m.cost(512, 512);
        let d = m.feature_dim() as u64;
        println!(
            "{:<28} {:>6} {:>12} {:>16.1} {:>10}",
            format!("SegFormer {backbone}"),
            d,
            cost.params,
            cost.macs as f64 / 1e9,
            3 * d * d + 2 * d + 6 * d
        );
    }
    // UPerNet on Swin at 512×2048 with 150 classes (the Swin paper's Table 3 setting for
    // ADE20K, window 7; parameters include the auxiliary head, as the paper counts them).
    println!(
        "\n{:<28} {:>6} {:>12} {:>12} {:>17} {:>10}",
        "UPerNet (150 classes)", "D", "parameters", "aux head", "GMACs @512×2048", "SAR h_ψ"
    );
    // The † rows are the paper's ImageNet-22K models: window 12, 640×2560.
    for (backbone, window, (h, w)) in [
        (B::SwinT, None, (512, 2048)),
        (B::SwinS, None, (512, 2048)),
        (B::SwinB, None, (512, 2048)),
        (B::SwinL, None, (512, 2048)),
        (B::SwinB, Some(12), (640, 2560)),
        (B::SwinL, Some(12), (640, 2560)),
    ] {
        let spec = SegSpec {
            backbone,
            head: H::Uper,
            aux: true,
            width: 64,
            in_channels: 3,
            classes: 150,
            seed: 0,
            drop_path: 0.3,
            window,
        };
        let m = build_segmenter(&spec, &VarMap::new(), &Device::Cpu, DType::F32).unwrap();
        let cost = m.cost(h, w);
        let d = m.feature_dim() as u64;
        let name = match window {
            Some(_) => format!("UPerNet {backbone}† {h}×{w}"),
            None => format!("UPerNet {backbone}"),
        };
        println!(
            "{:<28} {:>6} {:>12} {:>12} {:>17.1} {:>10}",
            name,
            d,
            cost.params + m.aux_params(),
            m.aux_params(),
            cost.macs as f64 / 1e9,
            3 * d * d + 2 * d + 6 * d
        );
    }
}
