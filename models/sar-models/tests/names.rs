//! Every model's variables, names and shapes, against lists captured from the code before
//! parameter paths were scoped: checkpoints and the strict torchvision / timm / mmsegmentation
//! loading depend on these names byte for byte.
//!
//! The lists are `tests/data/names-*.txt`, one `name [d0, d1, …]` a line, sorted. To rewrite
//! them after a deliberate change of names, run with `SAR_BLESS_NAMES=1`.

use candle_core::{DType, Device};
use candle_nn::VarMap;
use sar_models::seg::{build_segmenter, SegBackbone, SegHeadKind, SegSpec};
use sar_models::{build, Arch, ModelSpec, Stem};
use std::path::PathBuf;

fn listing(varmap: &VarMap) -> String {
    let data = varmap.data().lock().unwrap();
    let mut lines: Vec<String> = data
        .iter()
        .map(|(name, var)| format!("{name} {:?}\n", var.dims()))
        .collect();
    lines.sort();
    lines.concat()
}

fn check(file: &str, varmap: &VarMap) {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(format!("names-{file}.txt"));
    let got = listing(varmap);
    if std::env::var_os("SAR_BLESS_NAMES").is_some() {
        std::fs::write(&path, &got).unwrap();
        return;
    }
    let want = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    if got != want {
        let (g, w): (Vec<&str>, Vec<&str>) = (got.lines().collect(), want.lines().collect());
        let missing: Vec<&&str> = w.iter().filter(|l| !g.contains(l)).take(5).collect();
        let extra: Vec<&&str> = g.iter().filter(|l| !w.contains(l)).take(5).collect();
        panic!(
            "{file}: {} variables, expected {}; missing {missing:?}, unexpected {extra:?}",
            g.len(),
            w.len()
        );
    }
}

#[test]
fn classifier_names_and_shapes_are_unchanged() {
    for (file, arch, stem, in_channels) in [
        ("small-cnn", Arch::SmallCnn, Stem::Cifar, 1),
        // cnn-pool has exactly small-cnn's variables (only strides and pooling differ).
        ("small-cnn", Arch::CnnPool, Stem::Cifar, 1),
        ("resnet32", Arch::ResNet32, Stem::Cifar, 3),
        ("resnet18-cifar", Arch::ResNet18, Stem::Cifar, 3),
        ("resnet18-imagenet", Arch::ResNet18, Stem::Imagenet, 3),
        ("resnet50-cifar", Arch::ResNet50, Stem::Cifar, 3),
        ("resnet50-imagenet", Arch::ResNet50, Stem::Imagenet, 3),
    ] {
        let varmap = VarMap::new();
        let spec = ModelSpec {
            arch,
            stem,
            in_channels,
            classes: 10,
            seed: 1,
            init: Default::default(),
        };
        build(&spec, &varmap, &Device::Cpu, DType::F32).unwrap();
        check(file, &varmap);
    }
}

#[test]
fn segmenter_names_and_shapes_are_unchanged() {
    let resnets = [
        ("resnet18-v1c", SegBackbone::ResNet18V1c),
        ("resnet50-v1c", SegBackbone::ResNet50V1c),
        ("resnet101-v1c", SegBackbone::ResNet101V1c),
    ];
    let mut specs = Vec::new();
    for (name, backbone) in resnets {
        for (head_name, head) in [("fcn", SegHeadKind::Fcn), ("aspp", SegHeadKind::Aspp)] {
            for aux in [false, true] {
                let tail = if aux { "-aux" } else { "" };
                // Width 16: the same names as the standard 64, a quarter of the channels.
                specs.push((
                    format!("{head_name}-{name}{tail}-w16"),
                    backbone,
                    head,
                    aux,
                    16,
                ));
            }
        }
    }
    specs.push((
        "fcn-resnet50-v1c-aux".into(),
        SegBackbone::ResNet50V1c,
        SegHeadKind::Fcn,
        true,
        64,
    ));
    specs.push((
        "fcn-hrnetv2-w18".into(),
        SegBackbone::HrNetV2W18,
        SegHeadKind::Fcn,
        false,
        64,
    ));
    specs.push((
        "fcn-hrnetv2-w48".into(),
        SegBackbone::HrNetV2W48,
        SegHeadKind::Fcn,
        false,
        64,
    ));
    for (file, backbone, head, aux, width) in specs {
        let varmap = VarMap::new();
        let spec = SegSpec {
            backbone,
            head,
            aux,
            width,
            in_channels: 3,
            classes: 19,
            seed: 1,
            drop_path: 0.1,
            window: None,
        };
        build_segmenter(&spec, &varmap, &Device::Cpu, DType::F32).unwrap();
        check(&file, &varmap);
    }
}
