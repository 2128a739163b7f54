//! The demo end to end on the embedded digits: accuracy far above chance for both arms, SAR's
//! gate passes and its p2a term is active, plots are written, and the same seed repeats exactly.
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
    let report = run_demo(&cfg, &mut |_| {}).unwrap();
    assert_eq!(report.train_counts.iter().sum::<u64>(), 468);
    assert_eq!(report.test_images, 599);
    let (base, sar) = (&report.runs[0].report, &report.runs[1].report);
    assert!(!base.sar && sar.sar);
    // Chance is 10%.
    assert!(
        base.eval.classification().unwrap().top1 > 0.8
            && sar.eval.classification().unwrap().top1 > 0.8,
        "top-1 {} / {}",
        base.eval.classification().unwrap().top1,
        sar.eval.classification().unwrap().top1
    );
    assert!(base.gate_first_pass.is_none());
    let first = sar.gate_first_pass.expect("SAR's gate never passed");
    assert!(first < 100, "gate first passed at step {first}");
    assert!(sar.gate_pass_rate > 0.9 && sar.loss.p2a > 0.0, "{sar:?}");
    let table = summary(&report);
    assert!(
        table.contains("SAR − baseline") && table.contains("within noise"),
        "{table}"
    );
    for plot in ["per_class_baseline_vs_sar.png", "loss_baseline_vs_sar.png"] {
        assert!(dir.path().join(plot).is_file(), "{plot}");
    }
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
    let r = &again.runs[1].report;
    assert_eq!(
        r.eval.classification().unwrap().per_class_accuracy,
        sar.eval.classification().unwrap().per_class_accuracy
    );
    assert_eq!(r.loss.p2a, sar.loss.p2a);
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
    let (base, sar) = (&report.runs[0].report, &report.runs[1].report);
    assert!(!base.sar && sar.sar);
    assert_eq!((base.steps, sar.steps), (40, 40));
    assert!(sar.gate_first_pass.is_some(), "SAR's gate never passed");
    let e = sar.eval.segmentation().unwrap();
    assert_eq!(e.per_class_iou.len(), 11);
    let table = summary(&report);
    for want in ["mIoU", "mHead", "mBody", "mTail", "digit 9", "background"] {
        assert!(table.contains(want), "{want} missing from\n{table}");
    }
    for f in [
        "per_class_baseline_vs_sar.png",
        "seed1-sar/predictions.png",
        "seed1-sar/per_class_iou.png",
        "seed1-baseline/loss.png",
    ] {
        assert!(dir.path().join(f).is_file(), "{f}");
    }
}

#[test]
fn a_second_demo_into_one_folder_is_refused_until_overwrite() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = DemoConfig {
        seeds: vec![0],
        epochs: 1,
        plots: false,
        output: dir.path().to_path_buf(),
        ..Default::default()
    };
    run_demo(&cfg, &mut |_| {}).unwrap();
    let before = std::fs::read(dir.path().join("report.json")).unwrap();
    let err = run_demo(&cfg, &mut |_| {}).unwrap_err().to_string();
    assert!(
        err.contains("already holds a demo")
            && err.contains("report.json")
            && err.contains("seed0-baseline/")
            && err.contains("--overwrite"),
        "{err}"
    );
    assert_eq!(
        std::fs::read(dir.path().join("report.json")).unwrap(),
        before
    );
    let again = DemoConfig {
        overwrite: true,
        ..cfg
    };
    let r = run_demo(&again, &mut |_| {}).unwrap();
    assert_eq!(r.runs.len(), 2);
    // Each arm's folder holds one run: one final evaluation in its log.
    let log = std::fs::read_to_string(dir.path().join("seed0-sar/metrics.jsonl")).unwrap();
    assert_eq!(log.matches("\"final\":true").count(), 1);
}
