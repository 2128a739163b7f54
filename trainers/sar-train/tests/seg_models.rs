//! The newer segmentation models through the trainer: SegFormer (MiT + all-MLP head) with
//! AdamW learns the embedded glyph mosaic from scratch far above chance with SAR's gate
//! passing (the shipped config) and resumes bit-identically (AdamW moments and step counts,
//! stochastic-depth and dropout draws); OCRNet on HRNetV2-W18 and UPerNet on Swin-T learn it
//! too, UPerNet resumes bit-identically as well; every shipped config parses and validates.

use candle_core::DType;
use sar_train::config::load;
use sar_train::train::{train, TrainOptions};
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn mosaic(out: &Path, extra: &[&str]) -> sar_train::config::TrainConfig {
    shipped("mosaic-segformer-b0.toml", out, extra)
}

fn shipped(file: &str, out: &Path, extra: &[&str]) -> sar_train::config::TrainConfig {
    let mut over = vec![format!("run.output={:?}", out.display().to_string())];
    over.push("train.plots=false".into());
    over.extend(extra.iter().map(|s| s.to_string()));
    load(&root().join("configs").join(file), &over).unwrap()
}

/// All-background prediction's mIoU on the test canvases: background share / 11.
fn all_background_miou(cfg: &sar_train::config::TrainConfig) -> f64 {
    let data = sar_train::seg::load_seg_data(cfg).unwrap();
    let counts = data.test.class_pixel_counts().unwrap();
    counts[0] as f64 / counts.iter().sum::<u64>() as f64 / 11.0
}

fn final_tensors(out: &Path) -> Vec<(String, Vec<u8>)> {
    let last = sar_train::checkpoint::latest(&out.join("checkpoints"))
        .unwrap()
        .unwrap();
    let ck = sar_train::checkpoint::load(&last).unwrap();
    let mut v: Vec<(String, Vec<u8>)> = ck
        .tensors
        .iter()
        .map(|(n, t)| {
            let f: Vec<f64> = t
                .flatten_all()
                .unwrap()
                .to_dtype(DType::F64)
                .unwrap()
                .to_vec1()
                .unwrap();
            (n.clone(), f.iter().flat_map(|x| x.to_le_bytes()).collect())
        })
        .collect();
    v.sort();
    v
}

/// Asserts that runs `a` and `b` end with the same bits in every checkpointed tensor and that
/// the names `must_have` are among them; returns `a`'s tensors.
fn assert_same_final_tensors(a: &Path, b: &Path, must_have: &[&str]) -> Vec<(String, Vec<u8>)> {
    let (ta, tb) = (final_tensors(a), final_tensors(b));
    let names: Vec<&str> = ta.iter().map(|(n, _)| n.as_str()).collect();
    for want in must_have {
        assert!(names.contains(want), "{want} not in the checkpoint");
    }
    assert_eq!(ta.len(), tb.len());
    for ((na, xa), (nb, xb)) in ta.iter().zip(&tb) {
        assert_eq!(na, nb);
        assert!(xa == xb, "{na} differs after resume");
    }
    ta
}

/// `configs/mosaic-segformer-b0.toml` as shipped (300 iterations): all-background prediction
/// gives mIoU = background share / 11 (about 5 %); the run must reach twice that, find the two
/// most common digits (IoU > 0.25 and > 0.1), and SAR's gate must pass early and stay open.
#[test]
fn segformer_learns_the_mosaic_with_adamw() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = mosaic(dir.path(), &[]);
    let all_background = all_background_miou(&cfg);
    let r = train(&cfg, &TrainOptions::default()).unwrap();
    let e = r.eval.segmentation().unwrap();
    assert!(
        r.sar && r.gate_first_pass.is_some_and(|s| s < 100) && r.gate_pass_rate > 0.8,
        "{r:?}"
    );
    assert!(
        e.miou > 2.0 * all_background,
        "mIoU {} vs all-background {all_background}",
        e.miou
    );
    assert!(
        e.per_class_iou[1] > 0.25 && e.per_class_iou[2] > 0.1,
        "{:?}",
        e.per_class_iou
    );
    assert!(r.loss.p2a > 0.0 && r.loss.head_aux == 0.0, "{:?}", r.loss);
}

/// Stopped at step 8 and resumed, a run ends with the same bits as one straight through:
/// weights, AdamW's `exp_avg` / `exp_avg_sq` / `step` per variable, BatchNorm statistics and
/// SAR's buffers. The warm-up spans the stop, and stochastic depth is on.
#[test]
fn segformer_adamw_resume_is_bit_identical() {
    let dir = tempfile::tempdir().unwrap();
    let common = [
        "train.iters=16",
        "optim.warmup_iters=10",
        "data.mosaic_train=24",
        "data.mosaic_test=4",
        "train.checkpoint_every_steps=8",
        "train.keep_checkpoints=10",
        "model.drop_path=0.3",
    ];
    let full = mosaic(&dir.path().join("full"), &common);
    assert_eq!(train(&full, &TrainOptions::default()).unwrap().steps, 16);
    let mut stop = common.to_vec();
    stop.push("train.max_steps=8");
    train(
        &mosaic(&dir.path().join("part"), &stop),
        &TrainOptions::default(),
    )
    .unwrap();
    let opts = TrainOptions {
        resume: Some(dir.path().join("part")),
        ..Default::default()
    };
    let r = train(&mosaic(&dir.path().join("part"), &common), &opts).unwrap();
    assert_eq!(r.steps, 16);
    let a = assert_same_final_tensors(
        &dir.path().join("full"),
        &dir.path().join("part"),
        &[
            "optim.exp_avg.backbone.layers.0.1.0.attn.attn.in_proj_weight",
            "optim.exp_avg_sq.decode_head.conv_seg.weight",
            "optim.step.backbone.layers.3.2.weight",
        ],
    );
    // A different stochastic-depth rate changes the run (the masks are drawn).
    let other = mosaic(
        &dir.path().join("other"),
        &[&common[..], &["model.drop_path=0.0"]].concat(),
    );
    train(&other, &TrainOptions::default()).unwrap();
    let c = final_tensors(&dir.path().join("other"));
    assert!(a.iter().zip(&c).any(|(x, y)| x.1 != y.1));
}

/// `configs/mosaic-ocr-hr18.toml` as shipped (200 steps of batch 4): OCRNet well above
/// all-background (about 2× its mIoU here, with the head digit segmented), the FCN head's
/// region loss present (the auxiliary term), SAR's gate passing.
#[test]
fn ocrnet_learns_the_mosaic() {
    let dir = tempfile::tempdir().unwrap();
    assert_learns_the_mosaic("mosaic-ocr-hr18.toml", dir.path());
    // OCRNet's FCN head is its cascade's first stage: switching it off is refused.
    let e = config_error("mosaic-ocr-hr18.toml", dir.path(), "model.aux=false");
    assert!(e.contains("cascade"), "{e}");
}

/// Trains shipped config `file` as it is and asserts it well above all-background (1.6× its
/// mIoU), the most common digit segmented (IoU > 0.15), the auxiliary head's loss present
/// and SAR's gate passing.
fn assert_learns_the_mosaic(file: &str, out: &Path) {
    let cfg = shipped(file, out, &[]);
    let all_background = all_background_miou(&cfg);
    let r = train(&cfg, &TrainOptions::default()).unwrap();
    let e = r.eval.segmentation().unwrap();
    assert!(
        r.sar && r.gate_first_pass.is_some() && r.gate_pass_rate > 0.5,
        "{file}: {r:?}"
    );
    assert!(
        r.loss.head_aux > 0.0 && r.loss.p2a > 0.0,
        "{file}: {:?}",
        r.loss
    );
    assert!(
        e.miou > 1.6 * all_background,
        "{file}: mIoU {} vs all-background {all_background}",
        e.miou
    );
    assert!(e.per_class_iou[1] > 0.15, "{file}: {:?}", e.per_class_iou);
}

/// The error of loading shipped config `file` with override `over` and training it.
fn config_error(file: &str, out: &Path, over: &str) -> String {
    let o = [
        format!("run.output={:?}", out.join("bad").display().to_string()),
        over.to_string(),
    ];
    let e = load(&root().join("configs").join(file), &o)
        .and_then(|c| train(&c, &TrainOptions::default()).map(|_| ()))
        .unwrap_err();
    format!("{e:#}")
}

/// `configs/mosaic-upernet-swin-t.toml` as shipped: UPerNet on Swin-T (width 16, window 4)
/// with AdamW well above all-background, the most common digit segmented, the auxiliary FCN
/// head's loss present and SAR's gate passing.
#[test]
fn upernet_swin_learns_the_mosaic() {
    let dir = tempfile::tempdir().unwrap();
    assert_learns_the_mosaic("mosaic-upernet-swin-t.toml", dir.path());
}

/// UPerNet on Swin stopped at step 4 and resumed ends with the same bits as a run straight
/// through (AdamW moments, stochastic depth on, shifted windows with padding: 48² crops give
/// Swin grids of 12, 6, 3 and 2 with window 4); a window the backbone cannot take is refused
/// by name.
#[test]
fn upernet_swin_resume_is_bit_identical() {
    let dir = tempfile::tempdir().unwrap();
    let common = [
        "train.iters=8",
        "train.batch_size=2",
        "optim.warmup_iters=6",
        "data.mosaic_train=12",
        "data.mosaic_test=2",
        "data.seg_crop=[48, 48]",
        "train.checkpoint_every_steps=4",
        "train.keep_checkpoints=10",
    ];
    let run = |name: &str, extra: &[&str]| {
        let cfg = shipped(
            "mosaic-upernet-swin-t.toml",
            &dir.path().join(name),
            &[&common[..], extra].concat(),
        );
        train(&cfg, &TrainOptions::default()).unwrap()
    };
    assert_eq!(run("full", &[]).steps, 8);
    run("part", &["train.max_steps=4"]);
    let cfg = shipped(
        "mosaic-upernet-swin-t.toml",
        &dir.path().join("part"),
        &common,
    );
    let opts = TrainOptions {
        resume: Some(dir.path().join("part")),
        ..Default::default()
    };
    assert_eq!(train(&cfg, &opts).unwrap().steps, 8);
    assert_same_final_tensors(
        &dir.path().join("full"),
        &dir.path().join("part"),
        &[
            "optim.exp_avg.backbone.stages.1.blocks.1.attn.w_msa.relative_position_bias_table",
            "optim.exp_avg_sq.decode_head.fpn_bottleneck.conv.weight",
            "auxiliary_head.convs.0.bn.running_var",
        ],
    );
    for (over, want) in [
        ("model.window=1", "model.window"),
        ("model.head=\"fcn\"", "uper"),
    ] {
        let e = config_error("mosaic-upernet-swin-t.toml", dir.path(), over);
        assert!(e.contains(want), "{over}: {e}");
    }
}

/// SegFormer's config errors name the key: a ResNet head on a MiT, the segformer head on a
/// ResNet, an auxiliary head, a bad stochastic-depth rate, AdamW on dfdx.
#[test]
fn bad_segformer_configs_are_named() {
    let dir = tempfile::tempdir().unwrap();
    for (over, want) in [
        ("model.head=\"fcn\"", "segformer"),
        ("model.backbone=\"resnet18-v1c\"", "segformer"),
        ("model.aux=true", "auxiliary"),
        ("model.drop_path=1.0", "model.drop_path"),
        ("optim.betas=[0.9, 1.0]", "optim.betas"),
        ("optim.warmup_epochs=1", "warmup"),
    ] {
        let e = config_error("mosaic-segformer-b0.toml", dir.path(), over);
        assert!(e.contains(want), "{over}: {e}");
    }
}

/// Every config under `configs/` loads and validates (their data folders aside).
#[test]
fn every_shipped_config_parses() {
    let mut n = 0;
    for dir in ["configs", "configs/arms"] {
        for entry in std::fs::read_dir(root().join(dir)).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "toml") {
                load(&path, &[]).unwrap_or_else(|e| panic!("{}: {e:#}", path.display()));
                n += 1;
            }
        }
    }
    assert!(n > 20, "{n} configs");
}
