//! `sar compare` end to end on the embedded digits: three arms × two seeds, one run
//! interrupted and continued, the table checked against the run reports.

use sar_train::compare::{Arm, BaseConfig, CompareSpec, Comparison};
use sar_train::config::load;
use sar_train::train::{train, TrainOptions};
use std::path::Path;

const BASE: &str = r#"
[run]
name = "compare"
seed = 0
[data]
dataset = "digits"
imbalance = 10.0
pad = 1
flip = false
[model]
arch = "small-cnn"
[optim]
lr = 0.05
nesterov = true
[train]
epochs = 2
batch_size = 64
log_every = 4
[eval]
groups = "index"
head_end = 3
medium_end = 7
"#;

fn spec(config: &Path, output: &Path) -> CompareSpec {
    CompareSpec {
        config: BaseConfig::File(config.to_path_buf()),
        arms: ["sar", "ce:sar.enabled=false", "cr:sar.kind=\"cr\""]
            .iter()
            .map(|a| Arm::parse(a).unwrap())
            .collect(),
        seeds: vec![0, 1],
        common: vec!["train.log_every=8".into()],
        output: output.to_path_buf(),
        verbose: false,
        overwrite: false,
    }
}

fn compare(spec: &CompareSpec) -> anyhow::Result<Comparison> {
    sar_train::compare::compare(spec, &mut |_| {})
}

fn report(dir: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("report.json")).unwrap()).unwrap()
}

fn modified(p: &Path) -> std::time::SystemTime {
    std::fs::metadata(p.join("report.json"))
        .unwrap()
        .modified()
        .unwrap()
}

#[test]
fn compare_trains_every_arm_and_seed_continues_after_an_interruption_and_tables_the_reports() {
    let root = tempfile::tempdir().unwrap();
    let config = root.path().join("base.toml");
    std::fs::write(&config, BASE).unwrap();
    let (a, b) = (root.path().join("a"), root.path().join("b"));

    let full = compare(&spec(&config, &a)).unwrap();

    // b: arm "cr", seed 1 was stopped after 5 steps (checkpoints, no report).
    let cut = b.join("cr").join("seed-1");
    let o: Vec<String> = vec![
        "train.log_every=8".into(),
        "sar.kind=\"cr\"".into(),
        "run.seed=1".into(),
        "run.name=\"cr-seed1\"".into(),
        format!("run.output={:?}", cut.display().to_string()),
        "train.max_steps=5".into(),
    ];
    train(&load(&config, &o).unwrap(), &TrainOptions::default()).unwrap();
    std::fs::remove_file(cut.join("report.json")).unwrap();
    assert!(std::fs::read_dir(cut.join("checkpoints")).unwrap().count() > 0);
    let continued = compare(&spec(&config, &b)).unwrap();
    let resumed = std::fs::read_to_string(cut.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .any(|l| l.contains("\"kind\":\"resume\"") && l.contains("\"step\":5"));
    assert!(
        resumed,
        "the interrupted run was resumed from its step-5 checkpoint"
    );
    let r = report(&cut);
    assert_eq!(r["steps"], report(&a.join("cr").join("seed-1"))["steps"]);

    // The continued comparison is the uninterrupted one, number for number.
    assert_eq!(
        serde_json::to_value(full.arms.iter().map(|x| &x.metrics).collect::<Vec<_>>()).unwrap(),
        serde_json::to_value(
            continued
                .arms
                .iter()
                .map(|x| &x.metrics)
                .collect::<Vec<_>>()
        )
        .unwrap()
    );

    // The table against the reports.
    assert_eq!(full.metrics, ["top1", "head", "medium", "tail", "ece"]);
    for arm in &full.arms {
        assert_eq!(arm.runs.len(), 2);
        for (m, key) in full.metrics.iter().enumerate() {
            let values: Vec<f64> = arm
                .runs
                .iter()
                .map(|d| {
                    let r = report(d);
                    let v = match key.as_str() {
                        "ece" => &r["calibration"]["ece"],
                        k => &r[k],
                    };
                    100.0 * v.as_f64().unwrap()
                })
                .collect();
            let mean = (values[0] + values[1]) / 2.0;
            let std = (values[0] - values[1]).abs() / 2f64.sqrt();
            let s = &arm.metrics[m];
            assert_eq!(s.values, values, "{} {key}", arm.arm.name);
            assert!((s.mean - mean).abs() < 1e-12 && (s.std - std).abs() < 1e-12);
        }
    }
    let first = &full.arms[0];
    for arm in &full.arms[1..] {
        let p = &arm.paired.as_ref().unwrap()[0];
        let d: Vec<f64> = (0..2)
            .map(|s| arm.metrics[0].values[s] - first.metrics[0].values[s])
            .collect();
        assert!((p.mean - (d[0] + d[1]) / 2.0).abs() < 1e-12);
        assert!(
            (p.se - (d[0] - d[1]).abs() / 2.0).abs() < 1e-12,
            "sd/√2 of two values"
        );
        assert_eq!(p.up, d.iter().filter(|&&x| x > 0.0).count());
    }
    assert!(full.arms[0].paired.is_none());
    // Different arms are different runs; the baseline has no SAR.
    assert_eq!(report(&full.arms[1].runs[0])["sar"], false);
    assert_ne!(
        full.arms[0].metrics[0].values,
        full.arms[2].metrics[0].values
    );

    // Files, and a rerun reads the reports instead of retraining.
    for f in ["compare.json", "compare.md", "compare-per-class.png"] {
        assert!(b.join(f).exists(), "{f}");
    }
    let md = std::fs::read_to_string(b.join("compare.md")).unwrap();
    assert!(md.contains("| cr |") && md.contains("Δ top1"), "{md}");
    let before: Vec<_> = continued
        .arms
        .iter()
        .flat_map(|x| x.runs.iter().map(|p| modified(p)))
        .collect();
    compare(&spec(&config, &b)).unwrap();
    let after: Vec<_> = continued
        .arms
        .iter()
        .flat_map(|x| x.runs.iter().map(|p| modified(p)))
        .collect();
    assert_eq!(before, after);

    // Another common override: the finished runs are of another config. That is refused
    // before anything trains, naming the key; `overwrite` trains them again.
    let mut changed = spec(&config, &b);
    changed.common = vec!["train.log_every=4".into()];
    let err = format!("{:#}", compare(&changed).unwrap_err());
    assert!(
        err.contains("another config")
            && err.contains("train.log_every = 8 in the folder, 4 here")
            && err.contains("--overwrite"),
        "{err}"
    );
    let untouched: Vec<_> = continued
        .arms
        .iter()
        .flat_map(|x| x.runs.iter().map(|p| modified(p)))
        .collect();
    assert_eq!(before, untouched);
    changed.arms.truncate(1);
    changed.seeds = vec![0];
    changed.overwrite = true;
    let mut trained = Vec::new();
    let redone = sar_train::compare::compare(&changed, &mut |r| trained.push(r.trained)).unwrap();
    assert_eq!(trained, [true]);
    let stored = std::fs::read_to_string(b.join("sar/seed-0/config.toml")).unwrap();
    assert!(stored.contains("log_every = 4"), "{stored}");
    // log_every changes nothing the model learns.
    assert_eq!(
        redone.arms[0].metrics[0].values[0],
        full.arms[0].metrics[0].values[0]
    );

    // A bad arm fails before anything trains.
    let mut bad = spec(&config, &root.path().join("c"));
    bad.arms.push(Arm::parse("typo:sar.knd=\"cr\"").unwrap());
    assert!(compare(&bad).is_err());
    assert!(!root.path().join("c").join("sar").exists());
}
