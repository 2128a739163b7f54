//! Model structure, cost, gradients and pretrained loading.

use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use sar_models::pretrained::load_pretrained;
use sar_models::{build, Arch, ModelSpec, Stem};

fn spec(arch: Arch, stem: Stem, in_channels: usize, classes: usize) -> ModelSpec {
    ModelSpec {
        arch,
        stem,
        in_channels,
        classes,
        seed: 7,
        init: Default::default(),
    }
}

fn trainable(varmap: &VarMap) -> u64 {
    let data = varmap.data().lock().unwrap();
    data.iter()
        .filter(|(n, _)| !sar_models::params::is_running_stat(n))
        .map(|(_, v)| v.elem_count() as u64)
        .sum()
}

#[test]
fn parameter_and_mac_counts_match_the_published_ones() {
    // torchvision: ResNet-18 11,689,512 parameters, 1.81 GFLOPs (multiply-adds) at 224×224;
    // ResNet-50 25,557,032 and 4.09. CIFAR ResNet-32 (10 classes): 464,154 parameters.
    for (arch, stem, classes, size, params, gmacs) in [
        (
            Arch::ResNet18,
            Stem::Imagenet,
            1000,
            224,
            11_689_512u64,
            1.81,
        ),
        (Arch::ResNet50, Stem::Imagenet, 1000, 224, 25_557_032, 4.09),
        (Arch::ResNet32, Stem::Cifar, 10, 32, 464_154, 0.069),
    ] {
        let varmap = VarMap::new();
        let m = build(
            &spec(arch, stem, 3, classes),
            &varmap,
            &Device::Cpu,
            DType::F32,
        )
        .unwrap();
        let cost = m.cost(size, size);
        assert_eq!(cost.params, params, "{arch}");
        assert_eq!(
            trainable(&varmap),
            params,
            "{arch}: the VarMap holds what cost() counts"
        );
        let g = cost.macs as f64 / 1e9;
        assert!(
            (g - gmacs).abs() < 0.006,
            "{arch}: {g} GMACs, published {gmacs}"
        );
    }
}

#[test]
fn every_model_gives_features_and_logits_of_the_right_shape() {
    for (arch, stem, c, hw, d) in [
        (Arch::SmallCnn, Stem::Cifar, 1, 8, 128),
        (Arch::SmallCnn, Stem::Cifar, 1, 28, 128),
        (Arch::CnnPool, Stem::Cifar, 1, 8, 128),
        (Arch::CnnPool, Stem::Cifar, 1, 28, 128),
        (Arch::ResNet32, Stem::Cifar, 3, 32, 64),
        (Arch::ResNet18, Stem::Cifar, 3, 32, 512),
        (Arch::ResNet18, Stem::Imagenet, 3, 64, 512),
        (Arch::ResNet50, Stem::Imagenet, 3, 64, 2048),
    ] {
        let varmap = VarMap::new();
        let m = build(&spec(arch, stem, c, 5), &varmap, &Device::Cpu, DType::F32).unwrap();
        let x = Tensor::randn(0f32, 1.0, (2, c, hw, hw), &Device::Cpu).unwrap();
        for train in [true, false] {
            let f = m.features(&x, train).unwrap();
            assert_eq!(f.dims(), &[2, d], "{arch} {stem:?}");
            assert_eq!(m.feature_dim(), d);
            let logits = m.classify(&f).unwrap();
            assert_eq!(logits.dims(), &[2, 5]);
            let v: Vec<f32> = logits.flatten_all().unwrap().to_vec1().unwrap();
            assert!(v.iter().all(|x| x.is_finite()));
        }
        assert_eq!(m.classes(), 5);
    }
}

#[test]
fn initialisation_is_reproducible_from_the_seed() {
    let weights = |seed: u64| {
        let varmap = VarMap::new();
        let mut s = spec(Arch::ResNet32, Stem::Cifar, 3, 10);
        s.seed = seed;
        build(&s, &varmap, &Device::Cpu, DType::F32).unwrap();
        let data = varmap.data().lock().unwrap();
        let w = &data["layer2.0.conv1.weight"];
        w.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    };
    assert_eq!(weights(3), weights(3));
    assert_ne!(weights(3), weights(4));
    // Kaiming normal, fan_in = 16·9: the sample std is close to √(2/144).
    let w = weights(3);
    let std = (w.iter().map(|x| (x * x) as f64).sum::<f64>() / w.len() as f64).sqrt();
    assert!((std - (2.0f64 / 144.0).sqrt()).abs() < 0.01, "{std}");
}

#[test]
fn training_mode_updates_running_statistics_and_gradients_reach_every_parameter() {
    let varmap = VarMap::new();
    let m = build(
        &spec(Arch::ResNet32, Stem::Cifar, 3, 4),
        &varmap,
        &Device::Cpu,
        DType::F32,
    )
    .unwrap();
    let x = (Tensor::randn(0f32, 1.0, (4, 3, 8, 8), &Device::Cpu).unwrap() + 3.0).unwrap();
    let loss = m
        .forward(&x, true)
        .unwrap()
        .sqr()
        .unwrap()
        .mean_all()
        .unwrap();
    let grads = loss.backward().unwrap();
    let data = varmap.data().lock().unwrap();
    for (name, var) in data.iter() {
        if sar_models::params::is_running_stat(name) {
            continue;
        }
        assert!(
            grads.get(var.as_tensor()).is_some(),
            "no gradient for {name}"
        );
    }
    // The input has mean 3: the stem BN's running mean moved from 0 towards the batch mean.
    let rm: Vec<f32> = data["bn1.running_mean"].to_vec1().unwrap();
    assert!(rm.iter().any(|&v| v != 0.0));
    // Evaluation mode leaves them alone.
    drop(data);
    let before: Vec<f32> = varmap.data().lock().unwrap()["bn1.running_var"]
        .to_vec1()
        .unwrap();
    m.features(&x, false).unwrap();
    let after: Vec<f32> = varmap.data().lock().unwrap()["bn1.running_var"]
        .to_vec1()
        .unwrap();
    assert_eq!(before, after);
}

/// Writes a torchvision-style state dict for `arch` from a model built with another seed, with
/// a 1000-class `fc` and `num_batches_tracked` entries.
fn write_state_dict(path: &std::path::Path, extra: Option<(&str, Vec<usize>)>, drop: Option<&str>) {
    let source = VarMap::new();
    let mut s = spec(Arch::ResNet18, Stem::Imagenet, 3, 1000);
    s.seed = 99;
    build(&s, &source, &Device::Cpu, DType::F32).unwrap();
    let mut tensors: Vec<(String, Tensor)> = source
        .data()
        .lock()
        .unwrap()
        .iter()
        .filter(|(n, _)| Some(n.as_str()) != drop)
        .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
        .collect();
    tensors.push((
        "bn1.num_batches_tracked".into(),
        Tensor::new(&[5i64], &Device::Cpu)
            .unwrap()
            .squeeze(0)
            .unwrap(),
    ));
    if let Some((name, shape)) = extra {
        tensors.push((
            name.into(),
            Tensor::zeros(shape, DType::F32, &Device::Cpu).unwrap(),
        ));
    }
    candle_core::safetensors::save(
        &tensors
            .into_iter()
            .collect::<std::collections::HashMap<_, _>>(),
        path,
    )
    .unwrap();
}

#[test]
fn torchvision_weights_load_by_name_and_the_classifier_is_kept() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("resnet18.safetensors");
    write_state_dict(&path, None, None);
    let varmap = VarMap::new();
    let m = build(
        &spec(Arch::ResNet18, Stem::Imagenet, 3, 10),
        &varmap,
        &Device::Cpu,
        DType::F32,
    )
    .unwrap();
    let fc_before: Vec<f32> = varmap.data().lock().unwrap()["fc.bias"].to_vec1().unwrap();
    let report = load_pretrained(&varmap, &path, &["fc."]).unwrap();
    assert_eq!(
        report.kept,
        vec!["fc.bias".to_string(), "fc.weight".to_string()]
    );
    assert!(report
        .ignored
        .contains(&"bn1.num_batches_tracked".to_string()));
    assert_eq!(report.loaded.len(), varmap.data().lock().unwrap().len() - 2);
    // The loaded weights are the source's, bit for bit; fc is untouched.
    let source = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    let data = varmap.data().lock().unwrap();
    for name in [
        "conv1.weight",
        "layer3.0.downsample.0.weight",
        "layer4.1.bn2.running_var",
    ] {
        let a: Vec<f32> = data[name].flatten_all().unwrap().to_vec1().unwrap();
        let b: Vec<f32> = source[name].flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(a, b, "{name}");
    }
    assert_eq!(data["fc.bias"].to_vec1::<f32>().unwrap(), fc_before);
    drop(data);
    let x = Tensor::randn(0f32, 1.0, (1, 3, 32, 32), &Device::Cpu).unwrap();
    assert_eq!(m.forward(&x, false).unwrap().dims(), &[1, 10]);
}

/// An extra tensor to add, a tensor to drop, the expected error.
type Case = (
    Option<(&'static str, Vec<usize>)>,
    Option<&'static str>,
    &'static str,
);

#[test]
fn mismatched_weight_files_are_rejected_by_name_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let cases: [Case; 3] = [
        (
            Some(("layer5.0.conv1.weight", vec![1])),
            None,
            "layer5.0.conv1.weight has no counterpart",
        ),
        (
            None,
            Some("layer2.1.bn1.bias"),
            "layer2.1.bn1.bias is missing",
        ),
        (None, None, "garbage"),
    ];
    for (i, (extra, drop, expected)) in cases.into_iter().enumerate() {
        let path = dir.path().join(format!("w{i}.safetensors"));
        if expected == "garbage" {
            std::fs::write(&path, b"\x08\x00\x00\x00\x00\x00\x00\x00{\"a\":1}").unwrap();
        } else {
            write_state_dict(&path, extra, drop);
        }
        let varmap = VarMap::new();
        build(
            &spec(Arch::ResNet18, Stem::Imagenet, 3, 10),
            &varmap,
            &Device::Cpu,
            DType::F32,
        )
        .unwrap();
        let before: Vec<f32> = varmap.data().lock().unwrap()["conv1.weight"]
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let e = load_pretrained(&varmap, &path, &["fc."])
            .unwrap_err()
            .to_string();
        let want = if expected == "garbage" {
            "not a valid safetensors"
        } else {
            expected
        };
        assert!(e.contains(want) && e.contains(&format!("w{i}")), "{e}");
        let after: Vec<f32> = varmap.data().lock().unwrap()["conv1.weight"]
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(before, after, "a failed load changed the model");
    }
    // A shape mismatch: the file's model had 1 input channel.
    let path = dir.path().join("gray.safetensors");
    let source = VarMap::new();
    build(
        &spec(Arch::ResNet18, Stem::Imagenet, 1, 10),
        &source,
        &Device::Cpu,
        DType::F32,
    )
    .unwrap();
    source.save(&path).unwrap();
    let varmap = VarMap::new();
    build(
        &spec(Arch::ResNet18, Stem::Imagenet, 3, 10),
        &varmap,
        &Device::Cpu,
        DType::F32,
    )
    .unwrap();
    let e = load_pretrained(&varmap, &path, &[])
        .unwrap_err()
        .to_string();
    assert!(e.contains("conv1.weight has shape [64, 1, 7, 7]"), "{e}");
}

#[test]
fn bad_settings_are_errors() {
    let varmap = VarMap::new();
    let e = build(
        &spec(Arch::ResNet32, Stem::Cifar, 3, 1),
        &varmap,
        &Device::Cpu,
        DType::F32,
    )
    .err()
    .unwrap();
    assert!(e.to_string().contains("at least 2 classes"));
    let e = build(
        &spec(Arch::SmallCnn, Stem::Cifar, 0, 3),
        &varmap,
        &Device::Cpu,
        DType::F32,
    )
    .err()
    .unwrap();
    assert!(e.to_string().contains("channels"));
}

/// Standard deviation of a variable's values.
fn std_of(varmap: &VarMap, name: &str) -> (f64, f64) {
    let data = varmap.data().lock().unwrap();
    let v: Vec<f32> = data[name]
        .as_tensor()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let n = v.len() as f64;
    let mean = v.iter().map(|&x| x as f64).sum::<f64>() / n;
    let var = v.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n;
    let max = v.iter().fold(0.0f64, |m, &x| m.max((x as f64).abs()));
    (var.sqrt(), max)
}

#[test]
fn init_schemes_draw_each_layer_as_documented() {
    use sar_models::params::InitScheme;
    // stage2.conv of the small CNN: [64, 32, 3, 3], fan_in 288, fan_out 576; fc: [10, 128].
    let built = |init| {
        let varmap = VarMap::new();
        build(
            &ModelSpec {
                init,
                ..spec(Arch::SmallCnn, Stem::Cifar, 3, 10)
            },
            &varmap,
            &Device::Cpu,
            DType::F32,
        )
        .unwrap();
        varmap
    };
    let close = |got: f64, want: f64| (got / want - 1.0).abs() < 0.03;
    let reference = built(InitScheme::Reference);
    let (s, _) = std_of(&reference, "stage2.conv.weight");
    assert!(
        close(s, (2.0f64 / 576.0).sqrt()),
        "reference: Kaiming fan_out, std {s}"
    );
    let torch = built(InitScheme::TorchDefault);
    let (s, max) = std_of(&torch, "stage2.conv.weight");
    let bound = 1.0 / 288f64.sqrt();
    assert!(
        max <= bound && max > 0.99 * bound,
        "torch default: U(±{bound}), max {max}"
    );
    assert!(close(s, bound / 3f64.sqrt()), "torch default: std {s}");
    let (s, max) = std_of(&torch, "fc.weight");
    assert!(
        max <= 1.0 / 128f64.sqrt() && close(s, 1.0 / 128f64.sqrt() / 3f64.sqrt()),
        "{s} {max}"
    );
    let fan_in = built(InitScheme::KaimingFanIn);
    let (s, _) = std_of(&fan_in, "stage2.conv.weight");
    assert!(close(s, (2.0f64 / 288.0).sqrt()), "fan_in: std {s}");
    let fan_out = built(InitScheme::KaimingFanOut);
    assert_eq!(
        std_of(&fan_out, "stage2.conv.weight"),
        std_of(&reference, "stage2.conv.weight"),
        "the small CNN's reference is Kaiming fan_out"
    );
    // BatchNorm is the same under every scheme; one seed, one set of weights.
    assert_eq!(std_of(&torch, "stage2.bn.weight"), (0.0, 1.0));
    assert_eq!(
        std_of(&built(InitScheme::TorchDefault), "stage3.conv.weight"),
        std_of(&torch, "stage3.conv.weight")
    );
}
