//! The trainer end to end on the embedded digits: learning, SAR's gate and p2a term, exact
//! resume, checkpoint verification, non-finite losses, bad configs.

use sar_train::checkpoint;
use sar_train::config::{parse, NonFinitePolicy, TrainConfig};
use sar_train::train::{eval_checkpoint, train, TrainOptions};
use std::path::Path;

fn config(out: &Path, extra: &[&str]) -> TrainConfig {
    let text = format!(
        r#"
[run]
name = "test"
seed = 3
output = {out:?}
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
log_every = 2
keep_checkpoints = 100
[eval]
groups = "index"
head_end = 3
medium_end = 7
"#
    );
    let overrides: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
    parse(&text, &overrides).unwrap()
}

fn opts() -> TrainOptions {
    TrainOptions::default()
}

fn read_lines(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn sar_training_learns_passes_the_gate_and_logs_the_p2a_term() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), &["train.epochs=6"]);
    let r = train(&cfg, &opts()).unwrap();
    // Chance is 10 %; a few epochs of a small CNN on 8×8 digits reach far above it.
    assert!(
        r.eval.classification().unwrap().top1 > 0.6,
        "top-1 {}",
        r.eval.classification().unwrap().top1
    );
    assert!(r.sar);
    let first = r.gate_first_pass.expect("SAR's gate never passed");
    assert!(
        r.gate_pass_rate > 0.9,
        "gate pass rate {}",
        r.gate_pass_rate
    );
    assert!(r.loss.p2a > 0.0, "the p2a term is not active");
    assert!(r.sar_params > 0);
    let log = read_lines(&dir.path().join("metrics.jsonl"));
    let train_lines: Vec<_> = log.iter().filter(|v| v["kind"] == "train").collect();
    assert!(!train_lines.is_empty());
    let late = train_lines.last().unwrap();
    assert!(late["p2a"].as_f64().unwrap() > 0.0 && late["gate_pass_rate"].as_f64().unwrap() > 0.0);
    assert!(late["step"].as_u64().unwrap() > first);
    assert!(log
        .iter()
        .any(|v| v["kind"] == "eval" && v["final"] == true));
    // config.toml is the config, report.json the report.
    let saved = std::fs::read_to_string(dir.path().join("config.toml")).unwrap();
    assert_eq!(parse(&saved, &[]).unwrap(), cfg);
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("report.json")).unwrap())
            .unwrap();
    assert_eq!(report["per_class_accuracy"].as_array().unwrap().len(), 10);
    // Calibration: 15 bins holding every test image once; ECE = Σ (n_b/N)·|acc_b − conf_b|
    // recomputed from the bins, and the bins' correct counts give top-1 again.
    let bins = report["calibration"]["bins"].as_array().unwrap();
    assert_eq!(bins.len(), 15);
    let count = |b: &serde_json::Value, k: &str| b[k].as_f64().unwrap();
    let n: f64 = bins.iter().map(|b| count(b, "count")).sum();
    let correct: f64 = bins.iter().map(|b| count(b, "correct")).sum();
    let top1 = report["top1"].as_f64().unwrap();
    assert!(
        (correct / n - top1).abs() < 1e-12,
        "{correct}/{n} vs {top1}"
    );
    let ece: f64 = bins
        .iter()
        .filter(|b| count(b, "count") > 0.0)
        .map(|b| {
            let c = count(b, "count");
            (count(b, "correct") / c - count(b, "confidence_sum") / c).abs() * c / n
        })
        .sum();
    assert!((ece - report["calibration"]["ece"].as_f64().unwrap()).abs() < 1e-12);
    assert!(ece > 0.0 && ece < 0.5, "ECE {ece}");
    for plot in [
        "loss.png",
        "per_class.png",
        "features.png",
        "reliability.png",
    ] {
        let bytes = std::fs::read(dir.path().join(plot)).unwrap();
        assert!(
            bytes.starts_with(b"\x89PNG") && bytes.len() > 5000,
            "{plot}"
        );
    }
    // `sar eval` on the last checkpoint gives the final evaluation again.
    let last = checkpoint::latest(&dir.path().join("checkpoints"))
        .unwrap()
        .unwrap();
    let (_, e) = eval_checkpoint(&last, None).unwrap();
    assert_eq!(
        e.classification().unwrap().top1,
        r.eval.classification().unwrap().top1
    );
}

/// All tensors of the newest checkpoint of a run, as bytes by name.
fn final_tensors(out: &Path) -> (u64, Vec<(String, Vec<u8>)>) {
    let path = checkpoint::latest(&out.join("checkpoints"))
        .unwrap()
        .unwrap();
    let ck = checkpoint::load(&path).unwrap();
    let mut v: Vec<(String, Vec<u8>)> = ck
        .tensors
        .iter()
        .map(|(n, t)| {
            let f: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
            (n.clone(), f.iter().flat_map(|x| x.to_le_bytes()).collect())
        })
        .collect();
    v.sort();
    (ck.state.step, v)
}

#[test]
fn resume_from_a_mid_epoch_checkpoint_is_bit_identical() {
    for mixup in ["0.0", "1.0"] {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        let mix = format!("data.mixup_alpha={mixup}");
        let full = train(&config(a.path(), &[&mix]), &opts()).unwrap();
        // The same run interrupted at step 7 (mid-epoch), then resumed from its folder.
        let cut = config(b.path(), &[&mix, "train.max_steps=7"]);
        let part = train(&cut, &opts()).unwrap();
        assert_eq!(part.steps, 7);
        let resume = TrainOptions {
            resume: Some(b.path().to_path_buf()),
            ..opts()
        };
        let rest = train(&config(b.path(), &[&mix]), &resume).unwrap();
        assert_eq!(rest.steps, full.steps);
        let (sa, ta) = final_tensors(a.path());
        let (sb, tb) = final_tensors(b.path());
        assert_eq!(sa, sb);
        assert_eq!(ta.len(), tb.len());
        for ((na, va), (nb, vb)) in ta.iter().zip(&tb) {
            assert_eq!(na, nb);
            assert!(va == vb, "mixup {mixup}: {na} differs after resume");
        }
        assert_eq!(
            full.eval.classification().unwrap().per_class_accuracy,
            rest.eval.classification().unwrap().per_class_accuracy
        );
        assert_eq!(full.gate_first_pass, rest.gate_first_pass);
        assert_eq!(
            full.loss, rest.loss,
            "the last epoch's mean loss, across the resume"
        );
    }
}

#[test]
fn corrupt_truncated_and_foreign_checkpoints_are_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(
        dir.path(),
        &["train.max_steps=3", "train.checkpoint_every_steps=1"],
    );
    train(&cfg, &opts()).unwrap();
    let ckpts = checkpoint::list(&dir.path().join("checkpoints")).unwrap();
    assert_eq!(ckpts.iter().map(|c| c.0).collect::<Vec<_>>(), vec![1, 2, 3]);
    let good = std::fs::read(&ckpts[2].1).unwrap();
    // One flipped byte anywhere (header, state JSON or tensor data) is caught.
    for pos in [10, good.len() / 3, good.len() / 2, good.len() - 1] {
        let mut bad = good.clone();
        bad[pos] ^= 0x20;
        let e = format!("{:#}", checkpoint::from_bytes(&bad).err().unwrap());
        assert!(
            e.contains("checksum")
                || e.contains("safetensors")
                || e.contains("JSON")
                || e.contains("metadata"),
            "byte {pos}: {e}"
        );
    }
    let e = format!(
        "{:#}",
        checkpoint::from_bytes(&good[..good.len() - 100])
            .err()
            .unwrap()
    );
    assert!(e.contains("truncated"), "{e}");
    // Through the CLI-facing paths, the file is named.
    let path = dir.path().join("flipped.safetensors");
    let mut bad = good.clone();
    let n = bad.len();
    bad[n - 5] ^= 1;
    std::fs::write(&path, &bad).unwrap();
    let e = format!("{:#}", eval_checkpoint(&path, None).err().unwrap());
    assert!(
        e.contains("flipped.safetensors") && e.contains("checksum"),
        "{e}"
    );
    // A checkpoint of another model: resuming with another architecture is refused.
    let other = config(dir.path(), &["model.arch=\"resnet32\""]);
    let e = format!(
        "{:#}",
        train(
            &other,
            &TrainOptions {
                resume: Some(ckpts[2].1.clone()),
                ..opts()
            }
        )
        .err()
        .unwrap()
    );
    assert!(e.contains("[model] differs"), "{e}");
    // And its tensors do not fit another model's variables.
    let ck = checkpoint::load(&ckpts[2].1).unwrap();
    let setup = sar_train::cls::build(&other, 1, 10).unwrap();
    let e = format!(
        "{:#}",
        sar_train::trainees::candle::restore_vars(&setup.varmap, &ck.tensors)
            .err()
            .unwrap()
    );
    assert!(e.contains("another model"), "{e}");
}

#[test]
fn a_nan_batch_stops_training_or_is_skipped_as_configured() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), &["train.checkpoint_every_steps=2"]);
    let poison = TrainOptions {
        poison_steps: vec![5],
        ..opts()
    };
    let e = format!("{:#}", train(&cfg, &poison).err().unwrap());
    assert!(
        e.contains("step 5") && e.contains("input batch holds NaN"),
        "{e}"
    );
    // The last good checkpoint (step 4) is intact and resumable.
    let last = checkpoint::latest(&dir.path().join("checkpoints"))
        .unwrap()
        .unwrap();
    let ck = checkpoint::load(&last).unwrap();
    assert_eq!(ck.state.step, 4);
    assert!(read_lines(&dir.path().join("metrics.jsonl"))
        .iter()
        .any(|v| v["kind"] == "nonfinite" && v["step"] == 5));
    // An infinite loss (the cross-entropy of step 3) is named the same way.
    let dir2 = tempfile::tempdir().unwrap();
    let cfg2 = config(dir2.path(), &[]);
    let inf = TrainOptions {
        poison_loss_steps: vec![3],
        ..opts()
    };
    let e = format!("{:#}", train(&cfg2, &inf).err().unwrap());
    assert!(e.contains("step 3: loss part cross-entropy is inf"), "{e}");
    // Skip: the step is logged and skipped, training goes on and ends normally.
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path(), &[]);
    cfg.train.on_nonfinite = NonFinitePolicy::Skip;
    let both = TrainOptions {
        poison_loss_steps: vec![9],
        ..poison
    };
    let r = train(&cfg, &both).unwrap();
    assert_eq!(r.skipped_steps, 2);
    assert!(r.eval.classification().unwrap().top1 > 0.3);
    assert!(read_lines(&dir.path().join("metrics.jsonl"))
        .iter()
        .any(|v| v["kind"] == "skip" && v["step"] == 5));
}

#[test]
fn the_baseline_runs_without_sar() {
    let dir = tempfile::tempdir().unwrap();
    let r = train(&config(dir.path(), &["sar.enabled=false"]), &opts()).unwrap();
    assert!(!r.sar && r.gate_first_pass.is_none() && r.sar_params == 0);
    assert_eq!(r.loss.aux, 0.0);
    let ck = checkpoint::load(
        &checkpoint::latest(&dir.path().join("checkpoints"))
            .unwrap()
            .unwrap(),
    )
    .unwrap();
    assert!(!ck.tensors.keys().any(|k| k.starts_with("sar.")));
}

#[test]
fn cub_layout_trains_end_to_end_with_a_resnet18() {
    // A tiny CUB-200-2011 tree in the official layout (solid-colour JPEGs of varying size).
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("CUB_200_2011");
    std::fs::create_dir_all(root.join("images")).unwrap();
    let (mut images, mut labels, mut split) = (String::new(), String::new(), String::new());
    for i in 1..=8usize {
        let class = 1 + i % 2;
        let rel = format!("{class:03}.Bird/img_{i}.jpg");
        std::fs::create_dir_all(root.join("images").join(format!("{class:03}.Bird"))).unwrap();
        image::RgbImage::from_pixel(40 + i as u32, 36, image::Rgb([120 * class as u8, 40, 200]))
            .save(root.join("images").join(&rel))
            .unwrap();
        images += &format!("{i} {rel}\n");
        labels += &format!("{i} {class}\n");
        split += &format!("{i} {}\n", (i <= 6) as u8);
    }
    std::fs::write(root.join("images.txt"), images).unwrap();
    std::fs::write(root.join("image_class_labels.txt"), labels).unwrap();
    std::fs::write(root.join("train_test_split.txt"), split).unwrap();
    let text = format!(
        "[run]\noutput = {:?}\n[data]\ndataset = \"cub200\"\nroot = {:?}\ncrop = 32\nresize = 36\n[model]\narch = \"resnet18\"\nstem = \"imagenet\"\n[train]\nepochs = 2\nbatch_size = 3\nplots = false\n[eval]\ngroups = \"rank\"\n",
        dir.path().join("out").display().to_string(),
        root.display().to_string()
    );
    let cfg = parse(&text, &[]).unwrap();
    let r = train(&cfg, &opts()).unwrap();
    assert_eq!(r.steps, 4);
    assert_eq!(
        r.eval.classification().unwrap().per_class_accuracy.len(),
        200
    );
    assert_eq!(r.train_counts.iter().sum::<u64>(), 6);
    assert!(r.loss.ce.is_finite() && r.loss.aux.is_finite());
}

#[test]
fn every_example_config_parses_and_validates() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs");
    let mut n = 0;
    for dir in [dir.clone(), dir.join("arms")] {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "toml") {
                sar_train::config::load(&path, &[])
                    .unwrap_or_else(|e| panic!("{}: {e:#}", path.display()));
                n += 1;
            }
        }
    }
    assert!(n >= 15, "{n} configs");
}
