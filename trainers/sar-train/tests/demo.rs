//! The demo end to end on the embedded digits: accuracy far above chance for both arms, SAR's
//! gate passes and its p2a term is active, plots are written, and the same seed repeats exactly.
//! The demo is a preset of `sar compare`, so its files are a comparison's.
use sar_train::demo::{run_demo, summary, DemoConfig};

#[test]
fn short_demo_learns_and_sar_is_active() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = DemoConfig {
        seeds: vec![3],
        epochs: 15,
        output: dir.path().to_path_buf(),
        ..Default::default()
    };
    let mut lines = Vec::new();
    let report = run_demo(&cfg, &mut |r| lines.push(r.line())).unwrap();
    assert_eq!(lines.len(), 2);
    assert!(
        lines[0].starts_with("[1/2] baseline seed 3: top1 "),
        "{lines:?}"
    );
    assert_eq!(report.train_counts.iter().sum::<u64>(), 468);
    assert_eq!(report.test_images, 599);
    let (base, sar) = (&report.runs[0], &report.runs[1]);
    assert!(!base.sar() && sar.sar());
    assert_eq!((base.arm.as_str(), sar.arm.as_str()), ("baseline", "sar"));
    // Chance is 10%.
    assert!(
        base.number("top1") > 0.8 && sar.number("top1") > 0.8,
        "top-1 {} / {}",
        base.number("top1"),
        sar.number("top1")
    );
    // The comparison's table is the runs' reports.
    assert_eq!(
        report.comparison.arms[1].metrics[0].values,
        [100.0 * sar.number("top1")]
    );
    assert!(base.report["gate_first_pass"].is_null());
    let first = sar.report["gate_first_pass"]
        .as_u64()
        .expect("SAR's gate never passed");
    assert!(first < 100, "gate first passed at step {first}");
    assert!(
        sar.number("gate_pass_rate") > 0.9 && sar.report["loss"]["p2a"].as_f64().unwrap() > 0.0,
        "{:?}",
        sar.report
    );
    let table = summary(&report);
    assert!(
        table.contains("SAR − baseline") && table.contains("one seed, no noise estimate"),
        "{table}"
    );
    for f in [
        "compare-per-class.png",
        "loss_baseline_vs_sar.png",
        "compare.md",
        "compare.json",
        "report.json",
        "demo.toml",
        "sar/seed-3/loss.png",
    ] {
        assert!(dir.path().join(f).is_file(), "{f}");
    }
    // demo.toml is the base config: `sar compare` on it with the demo's arms reads the demo's
    // runs instead of training them.
    let spec = sar_train::compare::CompareSpec {
        config: sar_train::compare::BaseConfig::File(dir.path().join("demo.toml")),
        ..sar_train::demo::compare_spec(&cfg).unwrap()
    };
    let mut trained = Vec::new();
    sar_train::compare::compare(&spec, &mut |r| trained.push(r.trained)).unwrap();
    assert_eq!(trained, [false, false]);
    // Same seed, same run, to the bit.
    let dir2 = tempfile::tempdir().unwrap();
    let again = run_demo(
        &DemoConfig {
            output: dir2.path().to_path_buf(),
            plots: false,
            ..cfg
        },
        &mut |_| {},
    )
    .unwrap();
    let r = &again.runs[1];
    assert_eq!(
        r.report["per_class_accuracy"],
        sar.report["per_class_accuracy"]
    );
    assert_eq!(r.report["loss"]["p2a"], sar.report["loss"]["p2a"]);
}

/// `sar demo --task seg` end to end, short: both arms run on the mosaic, SAR's gate passes,
/// the table lists per-class IoU and head/body/tail, the plots and prediction images exist.
#[test]
fn short_segmentation_demo_runs_both_arms() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = DemoConfig {
        seeds: vec![1],
        iters: 40,
        output: dir.path().to_path_buf(),
        ..DemoConfig::segmentation()
    };
    let report = run_demo(&cfg, &mut |_| {}).unwrap();
    assert_eq!(report.class_names.len(), 11);
    let (base, sar) = (&report.runs[0], &report.runs[1]);
    assert!(!base.sar() && sar.sar());
    assert_eq!((base.number("steps"), sar.number("steps")), (40.0, 40.0));
    assert!(
        sar.report["gate_first_pass"].is_u64(),
        "SAR's gate never passed"
    );
    assert_eq!(sar.report["per_class_iou"].as_array().unwrap().len(), 11);
    assert_eq!(
        report.comparison.metrics,
        ["miou", "mhead", "mbody", "mtail", "ece"]
    );
    let table = summary(&report);
    for want in ["mIoU", "mHead", "mBody", "mTail", "digit 9", "background"] {
        assert!(table.contains(want), "{want} missing from\n{table}");
    }
    for f in [
        "compare-per-class.png",
        "sar/seed-1/predictions.png",
        "sar/seed-1/per_class_iou.png",
        "baseline/seed-1/loss.png",
    ] {
        assert!(dir.path().join(f).is_file(), "{f}");
    }
}

/// A second demo with the same settings reads the first one's runs; one with other settings is
/// refused, naming what differs, until `overwrite`, which trains again.
#[test]
fn a_second_demo_reads_the_same_runs_and_refuses_others_until_overwrite() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = DemoConfig {
        seeds: vec![0],
        epochs: 1,
        plots: false,
        output: dir.path().to_path_buf(),
        ..Default::default()
    };
    let first = run_demo(&cfg, &mut |_| {}).unwrap();
    let report = dir.path().join("sar/seed-0/report.json");
    let before = std::fs::read(&report).unwrap();
    let mut trained = Vec::new();
    let same = run_demo(&cfg, &mut |r| trained.push(r.trained)).unwrap();
    assert_eq!(
        trained,
        [false, false],
        "the same demo is read, not retrained"
    );
    assert_eq!(std::fs::read(&report).unwrap(), before);
    assert_eq!(
        serde_json::to_value(&same.comparison.arms[1].metrics).unwrap(),
        serde_json::to_value(&first.comparison.arms[1].metrics).unwrap()
    );

    let longer = DemoConfig {
        epochs: 2,
        ..cfg.clone()
    };
    let err = format!("{:#}", run_demo(&longer, &mut |_| {}).unwrap_err());
    assert!(
        err.contains("another config")
            && err.contains("train.epochs = 1 in the folder, 2 here")
            && err.contains("--overwrite"),
        "{err}"
    );
    assert_eq!(
        std::fs::read(&report).unwrap(),
        before,
        "nothing was touched"
    );

    let r = run_demo(
        &DemoConfig {
            overwrite: true,
            ..longer
        },
        &mut |_| {},
    )
    .unwrap();
    assert_eq!(r.runs.len(), 2);
    assert_eq!(r.config.epochs, 2);
    // Each arm's folder holds one run: one final evaluation in its log.
    let log = std::fs::read_to_string(dir.path().join("sar/seed-0/metrics.jsonl")).unwrap();
    assert_eq!(log.matches("\"final\":true").count(), 1);
    assert!(std::fs::read_to_string(dir.path().join("demo.toml"))
        .unwrap()
        .contains("epochs = 2"));
}
