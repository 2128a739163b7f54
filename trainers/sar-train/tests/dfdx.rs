//! `run.backend = "dfdx"`: the classification trainer on dfdx against the same run on candle,
//! exact resume, checkpoints shared between the backends, and what dfdx refuses.

use sar_train::checkpoint;
use sar_train::config::{parse, BackendKind, TrainConfig};
use sar_train::train::{eval_checkpoint, train, TrainOptions};
use std::path::Path;

fn config(out: &Path, extra: &[&str]) -> TrainConfig {
    let text = format!(
        r#"
[run]
name = "dfdx"
seed = 3
output = {out:?}
backend = "dfdx"
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
    );
    let overrides: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
    parse(&text, &overrides).unwrap()
}

fn train_losses(out: &Path) -> Vec<f64> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["kind"] == "train")
        .map(|v| v["loss"].as_f64().unwrap())
        .collect()
}

fn tensors(path: &Path) -> Vec<(String, Vec<f32>)> {
    let ck = checkpoint::load(path).unwrap();
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

/// Options that resume from the newest checkpoint of the run folder `dir`.
fn resuming(dir: &Path) -> TrainOptions {
    TrainOptions {
        resume: Some(dir.to_path_buf()),
        ..TrainOptions::default()
    }
}

#[test]
fn dfdx_trains_like_candle_and_their_checkpoints_are_interchangeable() {
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let dfdx = train(
        &config(a.path(), &["train.epochs=6"]),
        &TrainOptions::default(),
    )
    .unwrap();
    let candle = train(
        &config(b.path(), &["train.epochs=6", "run.backend=\"candle\""]),
        &TrainOptions::default(),
    )
    .unwrap();
    let (td, tc) = (
        dfdx.eval.classification().unwrap().top1,
        candle.eval.classification().unwrap().top1,
    );
    eprintln!("embedded digits, 6 epochs, small CNN + SAR: top-1 dfdx {td:.4}, candle {tc:.4}");
    assert!(td > 0.6, "dfdx top-1 {td}");
    assert!((td - tc).abs() < 0.08, "dfdx {td} vs candle {tc}");
    assert!(dfdx.gate_first_pass.is_some() && dfdx.loss.p2a > 0.0);
    assert_eq!(dfdx.sar_params, candle.sar_params);
    // Same weights, data and order: the first steps' losses agree to f32 rounding (they drift
    // apart later, as the two libraries round differently).
    let (ld, lc) = (train_losses(a.path()), train_losses(b.path()));
    for step in 0..3 {
        assert!(
            (ld[step] - lc[step]).abs() < 1e-4 * lc[step].abs(),
            "step {step}: loss dfdx {} vs candle {}",
            ld[step],
            lc[step]
        );
    }
    // Same tensor names and shapes in both checkpoints.
    let last_d = checkpoint::latest(&a.path().join("checkpoints"))
        .unwrap()
        .unwrap();
    let last_c = checkpoint::latest(&b.path().join("checkpoints"))
        .unwrap()
        .unwrap();
    let (nd, nc) = (tensors(&last_d), tensors(&last_c));
    let names = |v: &[(String, Vec<f32>)]| {
        v.iter()
            .map(|(n, t)| (n.clone(), t.len()))
            .collect::<Vec<_>>()
    };
    assert_eq!(names(&nd), names(&nc));
    // The dfdx checkpoint evaluated on candle, and the candle one on dfdx.
    let (_, e) = eval_checkpoint(&last_d, Some(BackendKind::Candle)).unwrap();
    let on_candle = e.classification().unwrap().top1;
    assert!(
        (on_candle - td).abs() <= 2.0 / 360.0,
        "dfdx weights on candle {on_candle} vs {td}"
    );
    let (_, e) = eval_checkpoint(&last_c, Some(BackendKind::Dfdx)).unwrap();
    let on_dfdx = e.classification().unwrap().top1;
    assert!(
        (on_dfdx - tc).abs() <= 2.0 / 360.0,
        "candle weights on dfdx {on_dfdx} vs {tc}"
    );
    // A candle run cut at step 7 finishes on dfdx (weights, BatchNorm statistics, momentum and
    // SAR buffers all carried over).
    let c = tempfile::tempdir().unwrap();
    let cut = config(
        c.path(),
        &[
            "train.epochs=6",
            "run.backend=\"candle\"",
            "train.max_steps=7",
        ],
    );
    train(&cut, &TrainOptions::default()).unwrap();
    let rest = train(&config(c.path(), &["train.epochs=6"]), &resuming(c.path())).unwrap();
    assert_eq!(rest.steps, dfdx.steps);
    assert_eq!(rest.gate_first_pass, dfdx.gate_first_pass);
    let tr = rest.eval.classification().unwrap().top1;
    assert!((tr - td).abs() < 0.08, "candle then dfdx {tr} vs dfdx {td}");
}

#[test]
fn dfdx_resume_is_bit_identical_with_and_without_mixup() {
    for mixup in ["0.0", "1.0"] {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let mix = format!("data.mixup_alpha={mixup}");
        let full = train(&config(a.path(), &[&mix]), &TrainOptions::default()).unwrap();
        let part = train(
            &config(b.path(), &[&mix, "train.max_steps=7"]),
            &TrainOptions::default(),
        )
        .unwrap();
        assert_eq!(part.steps, 7);
        let rest = train(&config(b.path(), &[&mix]), &resuming(b.path())).unwrap();
        assert_eq!(rest.steps, full.steps);
        let last = |p: &Path| checkpoint::latest(&p.join("checkpoints")).unwrap().unwrap();
        let (ta, tb) = (tensors(&last(a.path())), tensors(&last(b.path())));
        assert_eq!(ta.len(), tb.len());
        for ((na, va), (nb, vb)) in ta.iter().zip(&tb) {
            assert_eq!(na, nb);
            let same = va.iter().zip(vb).all(|(x, y)| x.to_bits() == y.to_bits());
            assert!(same, "mixup {mixup}: {na} differs after resume");
        }
        assert!(ta.iter().any(|(n, _)| n.starts_with("optim.momentum.")));
        assert_eq!(full.gate_first_pass, rest.gate_first_pass);
    }
}

#[test]
fn dfdx_resnet32_steps_and_nan_steps_are_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(
        dir.path(),
        &[
            "model.arch=\"resnet32\"",
            "train.max_steps=3",
            "train.batch_size=16",
            "train.on_nonfinite=\"skip\"",
        ],
    );
    let opts = TrainOptions {
        poison_steps: vec![1],
        ..TrainOptions::default()
    };
    let r = train(&cfg, &opts).unwrap();
    assert_eq!((r.steps, r.skipped_steps), (3, 1));
    assert!(r.loss.total.is_finite());
    // ResNet-32 on 1-channel 8×8 digits (the cost comes from the shared model description).
    assert_eq!(r.model_cost.params, 463_866);
}

#[test]
fn dfdx_refuses_what_it_does_not_run() {
    let dir = tempfile::tempdir().unwrap();
    for (extra, words) in [
        ("model.arch=\"resnet18\"", "resnet18"),
        ("model.pretrained=\"w.safetensors\"", "pretrained"),
    ] {
        let text = config(dir.path(), &[]).to_toml();
        let e = format!("{:#}", parse(&text, &[extra.to_string()]).err().unwrap());
        assert!(e.contains("dfdx") && e.contains(words), "{extra}: {e}");
    }
}
