//! The comparison arms (`sar.kind` = cr / car / prototype) and SAR's ablation switches
//! (`sar.aux_ce`, `sar.ema`, `sar.reweight`) through the trainer, on candle and dfdx.

use sar_math::{RegularizerKind, SarConfig, WeightMode};
use sar_train::checkpoint;
use sar_train::config::{parse, TrainConfig};
use sar_train::train::{train, TrainOptions};
use std::path::Path;

fn text(out: &Path, backend: &str) -> String {
    format!(
        r#"
[run]
name = "arms"
seed = 3
output = {out:?}
backend = "{backend}"
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
epochs = 3
batch_size = 64
log_every = 1
keep_checkpoints = 100
[eval]
groups = "index"
head_end = 3
medium_end = 7
"#
    )
}

fn config(out: &Path, backend: &str, extra: &[&str]) -> TrainConfig {
    let overrides: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
    parse(&text(out, backend), &overrides).unwrap()
}

/// The logged train steps' (loss, aux, p2a).
fn train_parts(out: &Path) -> Vec<(f64, f64, f64)> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["kind"] == "train")
        .map(|v| {
            let f = |k: &str| v[k].as_f64().unwrap();
            (f("loss"), f("aux"), f("p2a"))
        })
        .collect()
}

fn last_tensors(out: &Path) -> Vec<(String, Vec<f32>)> {
    let path = checkpoint::latest(&out.join("checkpoints"))
        .unwrap()
        .unwrap();
    let ck = checkpoint::load(&path).unwrap();
    let mut v: Vec<_> = ck
        .tensors
        .iter()
        .map(|(n, t)| {
            (
                n.clone(),
                t.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            )
        })
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

#[test]
fn every_baseline_arm_trains_on_both_backends_alike() {
    for kind in ["cr", "car", "prototype"] {
        let set = format!("sar.kind=\"{kind}\"");
        let mut top1 = Vec::new();
        let mut parts = Vec::new();
        for backend in ["candle", "dfdx"] {
            let dir = tempfile::tempdir().unwrap();
            let r = train(
                &config(dir.path(), backend, &[&set]),
                &TrainOptions::default(),
            )
            .unwrap();
            let t = r.eval.classification().unwrap().top1;
            eprintln!("{kind} on {backend}: top-1 {t:.4}, p2a {:.4}", r.loss.p2a);
            assert!(t > 0.25, "{kind} on {backend}: top-1 {t} (chance 0.1)");
            assert_eq!(r.loss.aux, 0.0, "{kind} has no aux CE");
            assert!(r.loss.p2a > 0.0, "{kind}: its feature term was applied");
            assert_eq!(r.sar_params, 0, "{kind} has no embedding");
            let tensors = last_tensors(dir.path());
            assert!(!tensors.iter().any(|(n, _)| n.starts_with("sar.embed.")));
            let buffer = |name: &str| {
                tensors
                    .iter()
                    .find(|(n, _)| n == name)
                    .map(|(_, v)| v.clone())
                    .unwrap()
            };
            if kind == "prototype" {
                // Every class occurs in the training set: every prototype row is initialised,
                // and the EMA holds real (pooled, non-negative, non-zero) features.
                assert!(buffer("sar.initialized").iter().all(|&v| v == 1.0));
                let p = buffer("sar.semantic_anchors");
                assert!(p.iter().all(|&v| v >= 0.0) && p.iter().any(|&v| v > 0.0));
            } else {
                assert!(buffer("sar.initialized").iter().all(|&v| v == 0.0));
            }
            top1.push(t);
            parts.push(train_parts(dir.path()));
        }
        // Same weights, data and order: the first steps agree to f32 rounding.
        for (step, (&(lc, _, pc), &(ld, _, pd))) in
            parts[0].iter().zip(&parts[1]).take(3).enumerate()
        {
            assert!(
                (lc - ld).abs() < 1e-4 * lc.abs() && (pc - pd).abs() < 1e-3 * pc.abs(),
                "{kind} step {step}: candle ({lc}, {pc}) vs dfdx ({ld}, {pd})"
            );
        }
        assert!((top1[0] - top1[1]).abs() < 0.08, "{kind}: {top1:?}");
    }
}

#[test]
fn the_prototype_arm_resumes_bit_identically() {
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let set = "sar.kind=\"prototype\"";
    let full = train(
        &config(a.path(), "candle", &[set]),
        &TrainOptions::default(),
    )
    .unwrap();
    train(
        &config(b.path(), "candle", &[set, "train.max_steps=7"]),
        &TrainOptions::default(),
    )
    .unwrap();
    let resume = TrainOptions {
        resume: Some(b.path().to_path_buf()),
        ..TrainOptions::default()
    };
    let rest = train(&config(b.path(), "candle", &[set]), &resume).unwrap();
    assert_eq!(rest.steps, full.steps);
    let (ta, tb) = (last_tensors(a.path()), last_tensors(b.path()));
    assert_eq!(ta.len(), tb.len());
    for ((na, va), (nb, vb)) in ta.iter().zip(&tb) {
        assert_eq!(na, nb);
        let same = va.iter().zip(vb).all(|(x, y)| x.to_bits() == y.to_bits());
        assert!(same, "{na} differs after resume");
    }
    // Resuming a run of another kind is refused.
    let c = tempfile::tempdir().unwrap();
    train(
        &config(c.path(), "candle", &[set, "train.max_steps=3"]),
        &TrainOptions::default(),
    )
    .unwrap();
    let resume = TrainOptions {
        resume: Some(c.path().to_path_buf()),
        ..TrainOptions::default()
    };
    let err = train(&config(c.path(), "candle", &["sar.kind=\"car\""]), &resume).unwrap_err();
    assert!(format!("{err:#}").contains("sar.kind"), "{err:#}");
}

#[test]
fn each_ablation_switch_changes_exactly_the_hyperparameter_it_names() {
    let dir = tempfile::tempdir().unwrap();
    let hp = |extra: &[&str]| config(dir.path(), "candle", extra).sar.hyperparameters();
    let full = hp(&[]);
    assert_eq!(full, SarConfig::default());
    assert_eq!(
        hp(&["sar.aux_ce=false"]),
        SarConfig {
            lambda_aux: 0.0,
            ..full
        }
    );
    assert_eq!(hp(&["sar.ema=false"]), SarConfig { alpha: 0.0, ..full });
    assert_eq!(
        hp(&["sar.reweight=false"]),
        SarConfig {
            weights: WeightMode::Uniform,
            ..full
        }
    );
    assert_eq!(
        hp(&["sar.ema=false", "sar.reweight=false"]),
        SarConfig {
            alpha: 0.0,
            weights: WeightMode::Uniform,
            ..full
        }
    );
    assert_eq!(
        config(dir.path(), "candle", &["sar.kind=\"cr\""]).sar.kind,
        RegularizerKind::Cr
    );
    // ema = false trains exactly as α = 0 (and differs from the default run).
    let run = |extra: &[&str]| {
        let d = tempfile::tempdir().unwrap();
        let mut e = vec!["train.epochs=2"];
        e.extend_from_slice(extra);
        train(&config(d.path(), "candle", &e), &TrainOptions::default()).unwrap();
        (train_parts(d.path()), d)
    };
    let (no_ema, _a) = run(&["sar.ema=false"]);
    let (alpha0, _b) = run(&["sar.alpha=0.0"]);
    assert_eq!(no_ema, alpha0);
    let (uniform, _c) = run(&["sar.reweight=false"]);
    let (default, _d) = run(&[]);
    assert_ne!(uniform, default);
    // The plain-mean aux CE is logged (and differs from the re-weighted one from step 0).
    assert!(uniform[0].1 > 0.0 && uniform[0].1 != default[0].1);
}

#[test]
fn arm_configs_that_mean_nothing_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let refused = |extra: &[&str], needle: &str| {
        let overrides: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        let err = parse(&text(dir.path(), "candle"), &overrides).unwrap_err();
        let msg = format!("{err:#}");
        assert!(msg.contains(needle), "{extra:?}: {msg}");
    };
    refused(&["sar.kind=\"car\"", "data.mixup_alpha=1.0"], "MixUp");
    refused(&["sar.kind=\"prototype\"", "data.mixup_alpha=1.0"], "MixUp");
    refused(&["sar.kind=\"cr\"", "sar.aux_ce=false"], "sar.aux_ce");
    refused(&["sar.kind=\"car\"", "sar.ema=false"], "sar.ema");
    refused(
        &["sar.reweight=false", "sar.weights=\"detached\""],
        "sar.reweight",
    );
    refused(&["sar.kind=\"em\""], "kind");
    // CR takes MixUp, the prototype arm takes ema = false (the batch's own prototypes).
    for ok in [
        &["sar.kind=\"cr\"", "data.mixup_alpha=1.0"][..],
        &["sar.kind=\"prototype\"", "sar.ema=false"][..],
    ] {
        let overrides: Vec<String> = ok.iter().map(|s| s.to_string()).collect();
        parse(&text(dir.path(), "candle"), &overrides).unwrap();
    }
}

/// Each `configs/arms/NAME.toml` is what its header says: the digits config with the
/// `--arm` overrides quoted there (the README's Table 7 mapping), run name and folder aside.
#[test]
fn each_example_arm_config_is_its_documented_arm() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let mut seen = Vec::new();
    for entry in std::fs::read_dir(root.join("configs/arms")).unwrap() {
        let path = entry.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        let quoted = text
            .lines()
            .find_map(|l| l.split_once("--arm ").map(|(_, a)| a))
            .unwrap_or_else(|| panic!("{}: no --arm in its header", path.display()));
        let quoted = quoted.split("` trains").next().unwrap();
        let arm = sar_train::compare::Arm::parse(quoted.trim_matches('\'')).unwrap();
        assert_eq!(
            path.file_stem().unwrap().to_str().unwrap(),
            arm.name,
            "{}",
            path.display()
        );
        let file = sar_train::config::load(&path, &[]).unwrap();
        let mut want =
            sar_train::config::load(&root.join("configs/digits-small-cnn.toml"), &arm.overrides)
                .unwrap();
        want.run.name = file.run.name.clone();
        want.run.output = file.run.output.clone();
        assert_eq!(file, want, "{}", path.display());
        seen.push((arm.name, file.sar.enabled, file.sar.kind));
    }
    seen.sort_by(|a, b| a.0.cmp(&b.0));
    let names: Vec<&str> = seen.iter().map(|s| s.0.as_str()).collect();
    assert_eq!(
        names,
        [
            "car",
            "ce",
            "cr-mes",
            "cr-nd",
            "cr-om",
            "emb-aux",
            "emb-aux-ema",
            "prototype",
            "sar"
        ]
    );
    assert!(seen.iter().any(|s| !s.1), "the CE arm turns SAR off");
    assert!(seen.iter().any(|s| s.2 == RegularizerKind::Car));
}
