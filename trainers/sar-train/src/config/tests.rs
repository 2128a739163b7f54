//! Parsing, overrides and validation of `sar train` configs.

use super::*;

const MIN: &str = "[data]\ndataset = \"digits\"\n[model]\narch = \"small-cnn\"\n";
const SEG: &str = "[data]\ndataset = \"mosaic\"\n[model]\nbackbone = \"resnet18-v1c\"\n";

#[test]
fn defaults_overrides_and_round_trip() {
    let cfg = parse(MIN, &[]).unwrap();
    assert_eq!(cfg.optim.lr, 0.1);
    assert!(cfg.sar.enabled);
    assert_eq!(cfg.sar.tau, 0.9);
    let cfg = parse(
        MIN,
        &[
            "optim.lr=0.05".into(),
            "sar.enabled=false".into(),
            "optim.schedule=step".into(),
            "optim.milestones=[160, 180]".into(),
            "run.name=my run".into(),
        ],
    )
    .unwrap();
    assert_eq!(cfg.optim.lr, 0.05);
    assert!(!cfg.sar.enabled);
    assert_eq!(cfg.optim.schedule, ScheduleKind::Step);
    assert_eq!(cfg.optim.milestones, vec![160, 180]);
    assert_eq!(cfg.run.name, "my run");
    assert_eq!(parse(&cfg.to_toml(), &[]).unwrap(), cfg);
    let seg = parse(
        SEG,
        &["data.seg_crop=[32, 48]".into(), "train.iters=100".into()],
    )
    .unwrap();
    assert_eq!(
        seg.model.segmenter().unwrap().backbone,
        SegBackbone::ResNet18V1c
    );
    assert_eq!(seg.data.seg_crop, [32, 48]);
    assert_eq!(parse(&seg.to_toml(), &[]).unwrap(), seg);
}

#[test]
fn model_keys_of_the_other_task_are_rejected_and_old_checkpoints_still_read() {
    for (extra, want) in [
        ("aux = false\n", "unknown field `aux`"),
        ("backbone = \"resnet18-v1c\"\n", "give one"),
    ] {
        let err = format!("{:#}", parse(&(MIN.to_string() + extra), &[]).unwrap_err());
        assert!(err.contains(want), "{extra}: {err}");
    }
    let err = format!(
        "{:#}",
        parse(&(SEG.to_string() + "stem = \"imagenet\"\n"), &[]).unwrap_err()
    );
    assert!(err.contains("unknown field `stem`"), "{err}");
    let err = format!(
        "{:#}",
        parse("[data]\ndataset = \"digits\"\n[model]\n", &[]).unwrap_err()
    );
    assert!(
        err.contains("model.arch") && err.contains("model.backbone"),
        "{err}"
    );
    // The flat JSON of checkpoints written before the split: every key, unused ones null.
    let old_cls = r#"{"arch":"small-cnn","backbone":null,"head":"fcn","aux":true,"aux_weight":0.4,"dropout":0.1,"width":64,"stem":"cifar","pretrained":null}"#;
    let m: ModelConfig = serde_json::from_str(old_cls).unwrap();
    assert_eq!(
        m,
        ModelConfig::Classifier(ClassifierConfig {
            arch: Arch::SmallCnn,
            stem: Stem::Cifar,
            pretrained: None,
            init: InitScheme::Reference,
        })
    );
    let old_seg = r#"{"arch":null,"backbone":"resnet18-v1c","head":"aspp","aux":false,"aux_weight":0.4,"dropout":0.1,"width":16,"stem":"cifar","pretrained":null}"#;
    let m: ModelConfig = serde_json::from_str(old_seg).unwrap();
    let seg = m.segmenter().unwrap();
    assert_eq!(
        (seg.head, seg.aux(), seg.width),
        (SegHeadKind::Aspp, false, 16)
    );
    let m = parse(&(MIN.to_string() + "init = \"torch-default\"\n"), &[]).unwrap();
    assert_eq!(m.model.classifier().unwrap().init, InitScheme::TorchDefault);
    let err = format!(
        "{:#}",
        parse(&(MIN.to_string() + "init = \"xavier\"\n"), &[]).unwrap_err()
    );
    assert!(err.contains("xavier"), "{err}");
    // Without nulls (a TOML file), mixed keys stay errors.
    assert!(serde_json::from_str::<ModelConfig>(r#"{"arch":"small-cnn","width":64}"#).is_err());
}

#[test]
fn unknown_keys_and_bad_values_are_named() {
    for (text, over, want) in [
        (
            MIN.to_string() + "[optim]\nlearning_rate = 0.1\n",
            "",
            "learning_rate",
        ),
        (MIN.to_string(), "optim.lr=-1", "optim.lr"),
        (MIN.to_string(), "sar.tau=1.5", "tau"),
        (MIN.to_string(), "data.imbalance=0.5", "data.imbalance"),
        (MIN.to_string(), "model.arch=vgg", "vgg"),
        (MIN.to_string(), "data.dataset=mosaic", "model.backbone"),
        (
            SEG.to_string(),
            "model.arch=resnet32",
            "model.arch is for classification",
        ),
        (SEG.to_string(), "data.seg_crop=[4, 64]", "data.seg_crop"),
        (SEG.to_string(), "model.dropout=1.0", "model.dropout"),
        (SEG.to_string(), "eval.groups=count", "eval.groups"),
        (SEG.to_string(), "data.dataset=cityscapes", "data.root"),
        (SEG.to_string(), "model.backbone=hrnet", "hrnet"),
        (MIN.to_string(), "data.dataset=cifar100", "data.root"),
        (MIN.to_string(), "lr=0.1", "section.key"),
        (MIN.to_string(), "train.epochs=0", "train.epochs"),
        ("[model]\narch = \"resnet32\"\n".to_string(), "", "data"),
    ] {
        let overrides: Vec<String> = if over.is_empty() {
            vec![]
        } else {
            vec![over.into()]
        };
        let e = format!("{:#}", parse(&text, &overrides).unwrap_err());
        assert!(e.contains(want), "expected `{want}` in: {e}");
    }
}

#[test]
fn a_base_file_is_laid_under_the_variant_section_by_section() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.toml");
    std::fs::write(
        &base,
        "[data]\ndataset = \"digits\"\nimbalance = 10.0\n[model]\narch = \"small-cnn\"\n\
         [sar]\nlambda_p2a = 0.3\n[train]\nepochs = 7\n",
    )
    .unwrap();
    std::fs::create_dir(dir.path().join("arms")).unwrap();
    let arm = dir.path().join("arms/cr.toml");
    std::fs::write(
        &arm,
        "base = \"../base.toml\"\n[sar]\nkind = \"cr\"\n[train]\nbatch_size = 16\n",
    )
    .unwrap();
    let cfg = load(&arm, &["train.epochs=2".into()]).unwrap();
    // The variant's keys replace, the base's other keys of the same section stay, the
    // override comes last.
    assert_eq!(cfg.sar.kind, sar_math::RegularizerKind::Cr);
    assert_eq!(cfg.sar.lambda_p2a, 0.3);
    assert_eq!((cfg.train.batch_size, cfg.train.epochs), (16, 2));
    assert_eq!(cfg.data.imbalance, Some(10.0));
    assert_eq!(
        cfg,
        load(
            &base,
            &[
                "sar.kind=\"cr\"".into(),
                "train.batch_size=16".into(),
                "train.epochs=2".into()
            ]
        )
        .unwrap()
    );
    // A chain works; a cycle, a missing base and a non-string base are named.
    let chained = dir.path().join("arms/cr-om.toml");
    std::fs::write(
        &chained,
        "base = \"cr.toml\"\n[sar]\nanchors = \"orthogonal\"\n",
    )
    .unwrap();
    let c = load(&chained, &[]).unwrap();
    assert_eq!(
        (c.sar.kind, c.train.batch_size, c.sar.anchors),
        (
            sar_math::RegularizerKind::Cr,
            16,
            sar_math::anchors::AnchorKind::Orthogonal
        )
    );
    let cyc = dir.path().join("cycle.toml");
    std::fs::write(&cyc, "base = \"cycle.toml\"\n").unwrap();
    let e = format!("{:#}", load(&cyc, &[]).unwrap_err());
    assert!(e.contains("more than 8 files deep"), "{e}");
    let missing = dir.path().join("missing.toml");
    std::fs::write(&missing, "base = \"nowhere.toml\"\n").unwrap();
    let e = format!("{:#}", load(&missing, &[]).unwrap_err());
    assert!(
        e.contains("nowhere.toml") && e.contains("missing.toml"),
        "{e}"
    );
    let number = dir.path().join("number.toml");
    std::fs::write(&number, "base = 3\n").unwrap();
    let e = format!("{:#}", load(&number, &[]).unwrap_err());
    assert!(e.contains("`base` must be a file name"), "{e}");
    let e = format!("{:#}", parse("base = \"x.toml\"\n", &[]).unwrap_err());
    assert!(e.contains("only a config loaded from a file"), "{e}");
}
