//! Segmentation networks: shapes, names, costs against published figures, the shared
//! classifier, and gradients reaching every parameter.

use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use sar_models::seg::{build_segmenter, SegBackbone, SegHeadKind, SegSpec};

fn spec(backbone: SegBackbone, head: SegHeadKind, aux: bool, width: usize) -> SegSpec {
    SegSpec {
        backbone,
        head,
        aux,
        width,
        in_channels: 3,
        classes: 19,
        seed: 7,
        drop_path: 0.1,
        window: None,
    }
}

fn images(n: usize, h: usize, w: usize) -> Tensor {
    let v: Vec<f32> = (0..n * 3 * h * w)
        .map(|i| ((i * 2654435761usize) % 1000) as f32 / 500.0 - 1.0)
        .collect();
    Tensor::from_vec(v, (n, 3, h, w), &Device::Cpu).unwrap()
}

/// HRNetV2-W48 with its FCN head (19 classes) is the HRNet paper's Cityscapes model:
/// 65.9 M parameters; W18 is 9.6 M (mmsegmentation's fcn_hr18). SAR's h_ψ on D = 720 adds
/// 2(D² + D) + D² + 6D = 1,560,960 (the SAR paper's Table 20: 1.56 M).
#[test]
fn parameter_counts_match_published_figures() {
    let dev = Device::Cpu;
    for (backbone, want_m) in [
        (SegBackbone::HrNetV2W48, 65.9),
        (SegBackbone::HrNetV2W18, 9.6),
    ] {
        let vm = VarMap::new();
        let m = build_segmenter(
            &spec(backbone, SegHeadKind::Fcn, false, 64),
            &vm,
            &dev,
            DType::F32,
        )
        .unwrap();
        let c = m.cost(1024, 2048);
        let got = c.params as f64 / 1e6;
        assert!(
            (got - want_m).abs() < 0.06,
            "{backbone}: {got} M parameters, published {want_m} M"
        );
        // The registered variables agree with cost() (running statistics excluded).
        let n: usize = vm
            .data()
            .lock()
            .unwrap()
            .iter()
            .filter(|(k, _)| !sar_models::params::is_running_stat(k))
            .map(|(_, v)| v.elem_count())
            .sum();
        assert_eq!(n as u64, c.params, "{backbone}");
        if backbone == SegBackbone::HrNetV2W48 {
            // HRNet paper (TPAMI, Cityscapes table): 747.3 G multiply-adds at 1024×2048.
            let g = c.macs as f64 / 1e9;
            assert!((g - 747.3).abs() < 0.005 * 747.3, "{g} GMACs");
        }
    }
    let d = 720u64;
    assert_eq!(2 * (d * d + d) + d * d + 6 * d, 1_560_960);
}

#[test]
fn shapes_names_and_output_strides() {
    let dev = Device::Cpu;
    let x = images(2, 64, 64);
    for (s, dim, stride, names) in [
        (
            spec(SegBackbone::ResNet18V1c, SegHeadKind::Fcn, true, 16),
            16 * 8 / 4,
            8,
            &[
                "backbone.stem.0.weight",
                "backbone.stem.7.running_var",
                "backbone.layer3.0.downsample.0.weight",
                "decode_head.conv_cat.conv.weight",
                "decode_head.conv_seg.bias",
                "auxiliary_head.convs.0.bn.weight",
                "auxiliary_head.conv_seg.weight",
            ][..],
        ),
        (
            spec(SegBackbone::ResNet18V1c, SegHeadKind::Aspp, false, 16),
            32,
            8,
            &[
                "decode_head.image_pool.1.conv.weight",
                "decode_head.aspp_modules.3.conv.weight",
                "decode_head.bottleneck.bn.running_mean",
            ][..],
        ),
        (
            spec(SegBackbone::HrNetV2W18, SegHeadKind::Fcn, false, 64),
            270,
            4,
            &[
                "backbone.transition1.0.0.weight",
                "backbone.transition1.1.0.0.weight",
                "backbone.transition3.3.0.1.weight",
                "backbone.stage4.2.fuse_layers.0.3.0.weight",
                "backbone.stage4.2.fuse_layers.3.0.2.1.running_mean",
                "backbone.stage3.3.branches.2.3.conv2.weight",
                "backbone.layer1.0.downsample.1.bias",
                "decode_head.convs.0.conv.weight",
            ][..],
        ),
    ] {
        let vm = VarMap::new();
        let m = build_segmenter(&s, &vm, &dev, DType::F32).unwrap();
        let data = vm.data().lock().unwrap();
        for n in names {
            assert!(data.contains_key(*n), "{:?}: no {n}", s.backbone);
        }
        drop(data);
        assert_eq!(m.feature_dim(), dim);
        assert_eq!(m.output_stride(), stride);
        let f = m.features(&x, true).unwrap();
        assert_eq!(f.main.dims(), &[2, dim, 64 / stride, 64 / stride]);
        assert_eq!(f.aux.is_some(), s.aux);
        if let Some(a) = &f.aux {
            let l = m.classify_aux(a).unwrap();
            assert_eq!(l.dims(), &[2, 19, 8, 8]);
        }
        assert_eq!(
            m.classify(&f.main).unwrap().dims(),
            &[2, 19, 64 / stride, 64 / stride]
        );
        assert!(m.features(&x, false).unwrap().aux.is_none());
    }
}

/// The classifier applied to rows `[M, D]` (the SAR head's anchors) is the same map as on
/// feature maps: row m equals pixel m of a 1-pixel-high map.
#[test]
fn classifier_is_shared_between_maps_and_rows() {
    let dev = Device::Cpu;
    let vm = VarMap::new();
    let m = build_segmenter(
        &spec(SegBackbone::ResNet18V1c, SegHeadKind::Fcn, false, 16),
        &vm,
        &dev,
        DType::F32,
    )
    .unwrap();
    let d = m.feature_dim();
    let rows = images(1, 5, d)
        .reshape((5 * 3, d))
        .unwrap()
        .narrow(0, 0, 5)
        .unwrap();
    let by_rows = m.classify(&rows).unwrap(); // [5, K]
    let map = rows
        .t()
        .unwrap()
        .reshape((1, d, 1, 5))
        .unwrap()
        .contiguous()
        .unwrap();
    let by_map = m
        .classify(&map)
        .unwrap()
        .reshape((19, 5))
        .unwrap()
        .t()
        .unwrap();
    let diff = (by_rows - by_map)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap();
    assert!(diff.to_scalar::<f32>().unwrap() < 1e-5);
    assert!(m.classify(&images(1, 2, 2).flatten_all().unwrap()).is_err());
}

/// A training-mode loss reaches every trainable parameter (nothing is disconnected).
#[test]
fn gradients_reach_every_parameter() {
    let dev = Device::Cpu;
    for s in [
        spec(SegBackbone::ResNet18V1c, SegHeadKind::Fcn, true, 8),
        spec(SegBackbone::ResNet18V1c, SegHeadKind::Aspp, false, 8),
    ] {
        let vm = VarMap::new();
        let m = build_segmenter(&s, &vm, &dev, DType::F32).unwrap();
        let f = m.features(&images(2, 32, 32), true).unwrap();
        let mut loss = m
            .classify(&f.main)
            .unwrap()
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap();
        if let Some(a) = &f.aux {
            loss = (loss + m.classify_aux(a).unwrap().sqr().unwrap().sum_all().unwrap()).unwrap();
        }
        let g = loss.backward().unwrap();
        for (name, v) in vm.data().lock().unwrap().iter() {
            if sar_models::params::is_running_stat(name) {
                continue;
            }
            let gv = g.get(v.as_tensor());
            assert!(gv.is_some(), "{:?}: no gradient for {name}", s.head);
        }
    }
}

#[test]
fn bad_specs_are_errors() {
    let dev = Device::Cpu;
    let vm = VarMap::new();
    for s in [
        spec(SegBackbone::HrNetV2W18, SegHeadKind::Aspp, false, 64),
        spec(SegBackbone::HrNetV2W18, SegHeadKind::Fcn, true, 64),
        SegSpec {
            classes: 1,
            ..spec(SegBackbone::ResNet18V1c, SegHeadKind::Fcn, false, 16)
        },
        spec(SegBackbone::ResNet18V1c, SegHeadKind::Fcn, false, 6),
    ] {
        assert!(build_segmenter(&s, &vm, &dev, DType::F32).is_err(), "{s:?}");
    }
}

/// ImageNet-pretrained backbone weights under their own names (no `backbone.` prefix, with a
/// classifier and `num_batches_tracked`) load into `backbone.*`; the heads keep their values;
/// a missing backbone tensor is an error naming it, and nothing changes.
#[test]
fn backbone_weights_load_by_the_documented_mapping() {
    let dev = Device::Cpu;
    let s = spec(SegBackbone::ResNet18V1c, SegHeadKind::Fcn, true, 8);
    let (a, b) = (VarMap::new(), VarMap::new());
    build_segmenter(&s, &a, &dev, DType::F32).unwrap();
    build_segmenter(&SegSpec { seed: 99, ..s }, &b, &dev, DType::F32).unwrap();
    let mut file = std::collections::HashMap::new();
    for (name, v) in a.data().lock().unwrap().iter() {
        if let Some(rest) = name.strip_prefix("backbone.") {
            file.insert(rest.to_string(), v.as_tensor().clone());
        }
    }
    file.insert(
        "fc.weight".into(),
        Tensor::zeros((1000, 512), DType::F32, &dev).unwrap(),
    );
    file.insert(
        "stem.1.num_batches_tracked".into(),
        Tensor::zeros(1, DType::I64, &dev).unwrap(),
    );
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("r18v1c.safetensors");
    candle_core::safetensors::save(&file, &path).unwrap();
    let head_before: Vec<f32> = b.data().lock().unwrap()["decode_head.conv_seg.weight"]
        .as_tensor()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let r = sar_models::pretrained::load_backbone(&b, &path).unwrap();
    assert_eq!(r.ignored.len(), 2);
    let (da, db) = (a.data().lock().unwrap(), b.data().lock().unwrap());
    for (name, v) in da.iter() {
        let x: Vec<f32> = v.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
        let y: Vec<f32> = db[name]
            .as_tensor()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        if name.starts_with("backbone.") {
            assert_eq!(x, y, "{name} was not loaded");
        }
    }
    let head_after: Vec<f32> = db["decode_head.conv_seg.weight"]
        .as_tensor()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    assert_eq!(head_before, head_after);
    drop((da, db));
    file.remove("layer4.1.bn2.running_var");
    candle_core::safetensors::save(&file, &path).unwrap();
    let e = sar_models::pretrained::load_backbone(&VarMap::new(), &path)
        .unwrap_err()
        .to_string();
    assert!(e.contains("has no counterpart"), "{e}");
    let c = VarMap::new();
    build_segmenter(&s, &c, &dev, DType::F32).unwrap();
    let e = sar_models::pretrained::load_backbone(&c, &path)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("backbone.layer4.1.bn2.running_var is missing"),
        "{e}"
    );
}

/// SegFormer's parameters and multiply-adds at 512² with 150 classes against the SegFormer
/// paper's Table 1 (B0 3.8 M / 8.4 G, B2 27.5 M / 62.4 G), and its output stride and width.
#[test]
fn segformer_costs_match_the_published_figures() {
    for (backbone, params, gmacs, d) in [
        (SegBackbone::MitB0, 3.8e6, 8.4, 256),
        (SegBackbone::MitB2, 27.5e6, 62.4, 768),
    ] {
        let s = SegSpec {
            classes: 150,
            ..spec(backbone, SegHeadKind::Segformer, false, 64)
        };
        let m = build_segmenter(&s, &VarMap::new(), &Device::Cpu, DType::F32).unwrap();
        let c = m.cost(512, 512);
        assert!(
            (c.params as f64 / params - 1.0).abs() < 0.02,
            "{backbone}: {c:?}"
        );
        assert!(
            (c.macs as f64 / 1e9 / gmacs - 1.0).abs() < 0.01,
            "{backbone}: {c:?}"
        );
        assert_eq!(
            (m.feature_dim(), m.output_stride(), m.has_aux()),
            (d, 4, false)
        );
        let x = Tensor::zeros((1, 3, 64, 64), DType::F32, &Device::Cpu).unwrap();
        let f = m.features(&x, false).unwrap();
        assert_eq!(f.main.dims(), &[1, d, 16, 16]);
    }
    // Wrong pairings are named.
    let vm = VarMap::new();
    for s in [
        spec(SegBackbone::MitB0, SegHeadKind::Fcn, false, 64),
        spec(SegBackbone::ResNet18V1c, SegHeadKind::Segformer, false, 64),
        spec(SegBackbone::MitB0, SegHeadKind::Segformer, true, 64),
    ] {
        let e = build_segmenter(&s, &vm, &Device::Cpu, DType::F32)
            .err()
            .unwrap();
        assert!(
            e.to_string().contains("segformer") || e.to_string().contains("auxiliary"),
            "{e}"
        );
    }
}

/// OCRNet on HRNetV2-W18: F has 512 channels at stride 4, the FCN regions are its auxiliary
/// output (training only), and the OCR head's loss reaches the FCN head (the regions are not
/// detached, as in mmsegmentation).
#[test]
fn ocrnet_cascade_shapes_and_gradients() {
    let vm = VarMap::new();
    let dev = Device::Cpu;
    let s = spec(SegBackbone::HrNetV2W18, SegHeadKind::Ocr, true, 64);
    let m = build_segmenter(&s, &vm, &dev, DType::F32).unwrap();
    assert_eq!(
        (m.feature_dim(), m.output_stride(), m.has_aux()),
        (512, 4, true)
    );
    let x = Tensor::randn(0f32, 1.0, (2, 3, 32, 32), &dev).unwrap();
    let f = m.features(&x, true).unwrap();
    assert_eq!(f.main.dims(), &[2, 512, 8, 8]);
    let aux = f.aux.as_ref().unwrap();
    assert_eq!(m.classify_aux(aux).unwrap().dims(), &[2, 19, 8, 8]);
    assert!(m.features(&x, false).unwrap().aux.is_none());
    let grads = m
        .classify(&f.main)
        .unwrap()
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let data = vm.data().lock().unwrap();
    for name in [
        "decode_head.0.convs.0.conv.weight",
        "decode_head.0.conv_seg.weight",
        "decode_head.1.object_context_block.key_project.1.conv.weight",
        "decode_head.1.object_context_block.bottleneck.conv.weight",
        "backbone.conv1.weight",
    ] {
        let v = data.get(name).unwrap_or_else(|| panic!("no {name}"));
        let g = grads
            .get(v.as_tensor())
            .unwrap_or_else(|| panic!("no gradient for {name}"));
        let norm = g
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(norm > 0.0 && norm.is_finite(), "{name}: {norm}");
    }
    drop(data);
    let bad = spec(SegBackbone::HrNetV2W18, SegHeadKind::Ocr, false, 64);
    let e = build_segmenter(&bad, &VarMap::new(), &dev, DType::F32)
        .err()
        .unwrap();
    assert!(e.to_string().contains("cascade"), "{e}");
    let bad = spec(SegBackbone::ResNet18V1c, SegHeadKind::Ocr, true, 16);
    assert!(build_segmenter(&bad, &VarMap::new(), &dev, DType::F32).is_err());
}

/// UPerNet on Swin-T (narrow): stride-4 features of D = 512·width/64, the auxiliary head on
/// stage 3, shapes at an input that needs padding (odd token grids, windows larger than the
/// last stages), a gradient reaching every parameter, and the pairings that are refused.
#[test]
fn upernet_swin_shapes_names_and_gradients() {
    let vm = VarMap::new();
    let dev = Device::Cpu;
    let s = SegSpec {
        window: Some(4),
        ..spec(SegBackbone::SwinT, SegHeadKind::Uper, true, 16)
    };
    let m = build_segmenter(&s, &vm, &dev, DType::F32).unwrap();
    assert_eq!(
        (m.feature_dim(), m.output_stride(), m.has_aux()),
        (128, 4, true)
    );
    // 44 × 60: 11 × 15 tokens, padded to windows of 4; stage 4 is 2 × 2.
    let x = images(2, 44, 60);
    let f = m.features(&x, true).unwrap();
    assert_eq!(f.main.dims(), &[2, 128, 11, 15]);
    let aux = f.aux.as_ref().unwrap();
    assert_eq!(aux.dims(), &[2, 64, 3, 4]);
    assert_eq!(m.classify_aux(aux).unwrap().dims(), &[2, 19, 3, 4]);
    assert!(m.features(&x, false).unwrap().aux.is_none());
    let loss = (m
        .classify(&f.main)
        .unwrap()
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        + m.classify_aux(aux)
            .unwrap()
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap())
    .unwrap();
    let grads = loss.backward().unwrap();
    let data = vm.data().lock().unwrap();
    for want in [
        "backbone.patch_embed.projection.weight",
        "backbone.stages.0.blocks.1.attn.w_msa.relative_position_bias_table",
        "backbone.stages.2.blocks.5.ffn.layers.0.0.weight",
        "backbone.stages.2.downsample.reduction.weight",
        "backbone.norm3.weight",
        "decode_head.psp_modules.3.1.conv.weight",
        "decode_head.fpn_bottleneck.bn.weight",
        "auxiliary_head.convs.0.conv.weight",
    ] {
        assert!(data.contains_key(want), "no {want}");
    }
    assert!(!data.contains_key("backbone.stages.3.downsample.norm.weight"));
    for (name, v) in data.iter() {
        if name.ends_with("running_mean") || name.ends_with("running_var") {
            continue;
        }
        let g = grads
            .get(v.as_tensor())
            .unwrap_or_else(|| panic!("no gradient for {name}"));
        let norm = g
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(norm.is_finite(), "{name}: {norm}");
        // BatchNorm removes any per-channel shift of a conv-free bias only at a norm's
        // output; every weight here sees the loss.
        if name.ends_with("weight") && !name.contains("norm3") {
            assert!(norm > 0.0, "{name}: zero gradient");
        }
    }
    drop(data);
    let vm = VarMap::new();
    for bad in [
        spec(SegBackbone::SwinT, SegHeadKind::Fcn, true, 16),
        spec(SegBackbone::ResNet18V1c, SegHeadKind::Uper, true, 16),
        SegSpec {
            window: Some(1),
            ..spec(SegBackbone::SwinT, SegHeadKind::Uper, true, 16)
        },
    ] {
        let e = build_segmenter(&bad, &vm, &dev, DType::F32).err().unwrap();
        let e = e.to_string();
        assert!(e.contains("uper") || e.contains("window"), "{e}");
    }
}

/// UPerNet's parameters and multiply-adds against the Swin paper's ADE20K table (150 classes,
/// window 7; parameters include the auxiliary head, multiply-adds at 512×2048 count the decode
/// path only, as mmcv's counter on mmsegmentation's `forward_dummy`): Swin-T 60 M / 945 G,
/// Swin-S 81 M / 1038 G, Swin-B 121 M / 1188 G.
#[test]
fn upernet_swin_costs_match_the_published_figures() {
    for (backbone, params, gmacs) in [
        (SegBackbone::SwinT, 60e6, 945.0),
        (SegBackbone::SwinS, 81e6, 1038.0),
        (SegBackbone::SwinB, 121e6, 1188.0),
    ] {
        let s = SegSpec {
            classes: 150,
            ..spec(backbone, SegHeadKind::Uper, true, 64)
        };
        let m = build_segmenter(&s, &VarMap::new(), &Device::Cpu, DType::F32).unwrap();
        let c = m.cost(512, 512);
        let total = (c.params + m.aux_params()) as f64;
        assert!(
            (total / params - 1.0).abs() < 0.01,
            "{backbone}: {c:?} + aux {}",
            m.aux_params()
        );
        let c = m.cost(512, 2048);
        assert!(
            (c.macs as f64 / 1e9 / gmacs - 1.0).abs() < 0.002,
            "{backbone}: {c:?}"
        );
    }
}

/// An ImageNet Swin checkpoint as mmsegmentation's `swin2mmseg.py` writes it (no `backbone.`
/// prefix, the classifier's `norm.` and `head.`, the derived `relative_position_index` and
/// `attn_mask` buffers, no output norms `norm{i}`) loads into `backbone.*`; the output norms
/// and the heads keep their values; a bias table of another window is refused naming both
/// windows; a missing block tensor is an error naming it.
#[test]
fn swin_imagenet_checkpoint_loads_as_mmsegmentation_loads_it() {
    let dev = Device::Cpu;
    let s = SegSpec {
        window: Some(4),
        ..spec(SegBackbone::SwinT, SegHeadKind::Uper, true, 8)
    };
    let (a, b) = (VarMap::new(), VarMap::new());
    build_segmenter(&s, &a, &dev, DType::F32).unwrap();
    build_segmenter(&SegSpec { seed: 99, ..s }, &b, &dev, DType::F32).unwrap();
    let mut file = std::collections::HashMap::new();
    for (name, v) in a.data().lock().unwrap().iter() {
        if let Some(rest) = name.strip_prefix("backbone.") {
            if !rest.starts_with("norm") {
                file.insert(rest.to_string(), v.as_tensor().clone());
            }
        }
    }
    let zeros = |shape: &[usize], dtype| Tensor::zeros(shape, dtype, &dev).unwrap();
    file.insert("norm.weight".into(), zeros(&[24], DType::F32));
    file.insert("head.weight".into(), zeros(&[1000, 24], DType::F32));
    file.insert(
        "stages.0.blocks.0.attn.w_msa.relative_position_index".into(),
        zeros(&[16, 16], DType::I64),
    );
    file.insert(
        "stages.0.blocks.1.attn_mask".into(),
        zeros(&[4, 16, 16], DType::F32),
    );
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("swin_t.safetensors");
    candle_core::safetensors::save(&file, &path).unwrap();
    let r = sar_models::pretrained::load_backbone(&b, &path).unwrap();
    assert_eq!(r.ignored.len(), 4, "{:?}", r.ignored);
    let norms: Vec<&String> = r
        .kept
        .iter()
        .filter(|n| n.starts_with("backbone."))
        .collect();
    assert_eq!(norms.len(), 8, "{norms:?}");
    let values = |m: &VarMap, name: &str| -> Vec<f32> {
        m.data().lock().unwrap()[name]
            .as_tensor()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    };
    let names: Vec<String> = a.data().lock().unwrap().keys().cloned().collect();
    for name in &names {
        let same = values(&a, name) == values(&b, name);
        if name.starts_with("backbone.") && !name.starts_with("backbone.norm") {
            assert!(same, "{name} was not loaded");
        } else if name.ends_with("conv_seg.weight") {
            assert!(!same, "{name} was overwritten");
        }
    }
    assert_eq!(r.loaded.len(), file.len() - 4);
    // A window-7 table (169 rows) for the window-4 model (49 rows).
    let table = "stages.1.blocks.0.attn.w_msa.relative_position_bias_table";
    let heads = file[table].dim(1).unwrap();
    let mut wrong = file.clone();
    wrong.insert(table.into(), zeros(&[169, heads], DType::F32));
    candle_core::safetensors::save(&wrong, &path).unwrap();
    let e = sar_models::pretrained::load_backbone(&b, &path)
        .unwrap_err()
        .to_string();
    assert!(e.contains("a window of 7 where the model's is 4"), "{e}");
    file.remove("stages.2.blocks.3.ffn.layers.1.weight");
    candle_core::safetensors::save(&file, &path).unwrap();
    let e = sar_models::pretrained::load_backbone(&b, &path)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("backbone.stages.2.blocks.3.ffn.layers.1.weight is missing"),
        "{e}"
    );
}
