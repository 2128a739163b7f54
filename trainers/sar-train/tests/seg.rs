//! The segmentation half of the trainer: losses and metrics by hand, sliding-window against
//! whole-image inference, and end-to-end runs on the embedded glyph mosaic (learning, SAR's
//! gate, exact resume, evaluation of a checkpoint, bad configs).

use candle_core::{DType, Device, Tensor};
use sar_math::metrics::Group;
use sar_models::seg::{SegFeatures, Segmenter};
use sar_models::Cost;
use sar_train::config::{parse, InferenceMode, TrainConfig};
use sar_train::evaluation::metrics_from_confusion;
use sar_train::seg::{dropout2d, logits_of, seg_cross_entropy};
use sar_train::train::{eval_checkpoint, train, TrainOptions};
use std::path::Path;

/// Hand-computed: 2 pixels, 2 classes, logits (0, ln 3) and (ln 3, 0) → p(true) = 3/4 and
/// 1/4 for labels 1 and 1; a third, ignored pixel counts in the mean as 0.
/// CE = (−ln ¾ − ln ¼) / 3.
#[test]
fn cross_entropy_by_hand_ignores_255_and_averages_over_all_pixels() {
    let l3 = 3f32.ln();
    let logits = Tensor::new(&[[[[0.0f32, l3, 0.0]], [[l3, 0.0, 0.0]]]], &Device::Cpu).unwrap(); // [1, 2, 1, 3]
    let ce = seg_cross_entropy(&logits, &[1, 1, 255], (1, 1, 3)).unwrap();
    let want = (-(0.75f64).ln() - (0.25f64).ln()) / 3.0;
    let got = ce.to_scalar::<f32>().unwrap() as f64;
    assert!((got - want).abs() < 1e-6, "{got} vs {want}");
    // Logits at a quarter of the label size are resized bilinearly first: a constant map
    // stays constant, so CE = ln 2 for two equal logits, every pixel.
    let flat = Tensor::zeros((2, 2, 4, 4), DType::F32, &Device::Cpu).unwrap();
    let ce = seg_cross_entropy(&flat, &vec![1u8; 2 * 16 * 16], (2, 16, 16)).unwrap();
    assert!((ce.to_scalar::<f32>().unwrap() as f64 - 2f64.ln()).abs() < 1e-6);
}

/// Dropout2d zeroes whole channels and scales the rest by 1/(1 − p).
#[test]
fn dropout_drops_whole_channels() {
    let x = Tensor::ones((4, 50, 3, 3), DType::F32, &Device::Cpu).unwrap();
    let mut rng = sar_math::rng::SeededRng::new(1);
    let y = dropout2d(&x, 0.2, &mut rng).unwrap();
    let v: Vec<f32> = y.flatten_all().unwrap().to_vec1().unwrap();
    let mut dropped = 0;
    for ch in v.chunks(9) {
        assert!(
            ch.iter().all(|&a| a == ch[0]),
            "a channel is all dropped or all kept"
        );
        assert!(ch[0] == 0.0 || (ch[0] - 1.25).abs() < 1e-6);
        dropped += (ch[0] == 0.0) as usize;
    }
    assert!(
        (20..=60).contains(&dropped),
        "{dropped} of 200 channels dropped"
    );
}

/// Hand-computed confusion matrix (rows truth, columns prediction), 3 classes:
/// [[5, 1, 0], [2, 3, 0], [0, 0, 0]]: IoU₀ = 5/(6+7−5) = 5/8, IoU₁ = 3/(5+4−3) = 1/2, class 2
/// never occurs (NaN, left out): mIoU = 9/16; aAcc = 8/11; mAcc = (5/6 + 3/5)/2.
#[test]
fn miou_from_a_hand_computed_confusion_matrix() {
    let conf = [5, 1, 0, 2, 3, 0, 0, 0, 0];
    let names: Vec<String> = ["a", "b", "c"].iter().map(|s| s.to_string()).collect();
    let groups = [Group::Head, Group::Medium, Group::Tail];
    let e = metrics_from_confusion(&conf, &groups, &names, vec![Default::default(); 15]).unwrap();
    assert!(e.calibration.ece.is_nan(), "no confidences were added");
    assert!((e.per_class_iou[0] - 0.625).abs() < 1e-12);
    assert!((e.per_class_iou[1] - 0.5).abs() < 1e-12);
    assert!(e.per_class_iou[2].is_nan());
    assert!((e.miou - 0.5625).abs() < 1e-12);
    assert!((e.aacc - 8.0 / 11.0).abs() < 1e-12);
    assert!((e.macc - (5.0 / 6.0 + 0.6) / 2.0).abs() < 1e-12);
    assert_eq!((e.mhead, e.mbody), (0.625, 0.5));
    assert!(e.mtail.is_nan());
    assert_eq!(e.pixels, 11);
}

/// A per-pixel model (1×1 conv features, no spatial context): its receptive field fits any
/// window, so sliding-window inference must equal whole-image inference.
struct PerPixel {
    w: Tensor,
}

impl Segmenter for PerPixel {
    fn features(&self, images: &Tensor, _train: bool) -> candle_core::Result<SegFeatures> {
        let f = images.conv2d(&self.w, 0, 1, 1, 1)?.tanh()?;
        Ok(SegFeatures { main: f, aux: None })
    }
    fn classify(&self, f: &Tensor) -> candle_core::Result<Tensor> {
        Ok(f.clone())
    }
    fn classify_aux(&self, _: &Tensor) -> candle_core::Result<Tensor> {
        candle_core::bail!("none")
    }
    fn feature_dim(&self) -> usize {
        4
    }
    fn classes(&self) -> usize {
        4
    }
    fn has_aux(&self) -> bool {
        false
    }
    fn output_stride(&self) -> usize {
        1
    }
    fn cost(&self, _: usize, _: usize) -> Cost {
        Cost {
            params: 12,
            macs: 0,
        }
    }
    fn aux_params(&self) -> u64 {
        0
    }
}

#[test]
fn sliding_window_equals_whole_image_for_a_per_pixel_model() {
    let dev = Device::Cpu;
    let wv: Vec<f32> = (0..12).map(|i| (i as f32 * 0.7).sin()).collect();
    let m = PerPixel {
        w: Tensor::from_vec(wv, (4, 3, 1, 1), &dev).unwrap(),
    };
    let xv: Vec<f32> = (0..3 * 37 * 53)
        .map(|i| ((i * 7919) % 101) as f32 / 50.0 - 1.0)
        .collect();
    let x = Tensor::from_vec(xv, (1, 3, 37, 53), &dev).unwrap();
    let whole = logits_of(&m, &x, InferenceMode::Whole, [0, 0], [1, 1]).unwrap();
    for (crop, stride) in [
        ([16, 16], [10, 12]),
        ([20, 53], [7, 7]),
        ([37, 20], [5, 33]),
        ([64, 64], [8, 8]),
    ] {
        let slide = logits_of(&m, &x, InferenceMode::Slide, crop, stride).unwrap();
        let d = (&slide - &whole)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(d < 1e-6, "crop {crop:?} stride {stride:?}: {d}");
    }
    // And a model with spatial context does differ (the comparison can fail).
    struct Blur(PerPixel);
    impl Segmenter for Blur {
        fn features(&self, images: &Tensor, t: bool) -> candle_core::Result<SegFeatures> {
            let f = self.0.features(images, t)?.main;
            let k = Tensor::ones((4, 1, 5, 5), DType::F32, images.device())?;
            let mut chans = Vec::new();
            for c in 0..4 {
                chans.push(f.narrow(1, c, 1)?.conv2d(&k.narrow(0, c, 1)?, 2, 1, 1, 1)?);
            }
            Ok(SegFeatures {
                main: Tensor::cat(&chans, 1)?,
                aux: None,
            })
        }
        fn classify(&self, f: &Tensor) -> candle_core::Result<Tensor> {
            Ok(f.clone())
        }
        fn classify_aux(&self, f: &Tensor) -> candle_core::Result<Tensor> {
            self.0.classify_aux(f)
        }
        fn feature_dim(&self) -> usize {
            4
        }
        fn classes(&self) -> usize {
            4
        }
        fn has_aux(&self) -> bool {
            false
        }
        fn output_stride(&self) -> usize {
            1
        }
        fn cost(&self, h: usize, w: usize) -> Cost {
            self.0.cost(h, w)
        }
        fn aux_params(&self) -> u64 {
            0
        }
    }
    let b = Blur(m);
    let whole = logits_of(&b, &x, InferenceMode::Whole, [0, 0], [1, 1]).unwrap();
    let slide = logits_of(&b, &x, InferenceMode::Slide, [16, 16], [10, 12]).unwrap();
    let d = (&slide - &whole)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(d > 1e-3);
}

fn config(out: &Path, extra: &[&str]) -> TrainConfig {
    let text = format!(
        r#"
[run]
name = "seg-test"
seed = 5
output = {out:?}
[data]
dataset = "mosaic"
imbalance = 10.0
mosaic_train = 96
mosaic_test = 24
seg_crop = [64, 64]
[model]
backbone = "resnet18-v1c"
width = 8
[optim]
lr = 0.05
schedule = "poly"
min_lr = 1e-4
[train]
iters = 60
batch_size = 4
log_every = 4
keep_checkpoints = 100
plots = false
[eval]
prediction_images = 2
"#
    );
    let overrides: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
    parse(&text, &overrides).unwrap()
}

fn final_tensors(out: &Path) -> Vec<(String, Vec<u8>)> {
    let dir = out.join("checkpoints");
    let last = sar_train::checkpoint::latest(&dir).unwrap().unwrap();
    let ck = sar_train::checkpoint::load(&last).unwrap();
    let mut v: Vec<(String, Vec<u8>)> = ck
        .tensors
        .iter()
        .map(|(n, t)| {
            let f: Vec<f32> = t
                .flatten_all()
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap()
                .to_vec1()
                .unwrap();
            (n.clone(), f.iter().flat_map(|x| x.to_le_bytes()).collect())
        })
        .collect();
    v.sort();
    v
}

/// A mid-run checkpoint resumed gives bit-identical weights, momentum, BatchNorm statistics
/// and SAR buffers (the augmentation and dropout draws are functions of the run's counters).
#[test]
fn segmentation_resume_is_bit_identical_and_checkpoints_evaluate() {
    let dir = tempfile::tempdir().unwrap();
    let full = config(
        &dir.path().join("full"),
        &["train.checkpoint_every_steps=30"],
    );
    let r = train(&full, &TrainOptions::default()).unwrap();
    assert_eq!(r.steps, 60);
    assert!(
        r.sar && r.gate_first_pass.is_some(),
        "SAR's gate never passed in the short run"
    );
    let seg = r.eval.segmentation().unwrap();
    assert_eq!(seg.per_class_iou.len(), 11);
    assert!(r.loss.head_aux > 0.0, "the auxiliary head adds its loss");
    // Stop at step 30, then resume from there.
    let part = config(
        &dir.path().join("part"),
        &["train.checkpoint_every_steps=30", "train.max_steps=30"],
    );
    train(&part, &TrainOptions::default()).unwrap();
    let rest = config(
        &dir.path().join("part"),
        &["train.checkpoint_every_steps=30"],
    );
    let opts = TrainOptions {
        resume: Some(dir.path().join("part")),
        ..Default::default()
    };
    let r2 = train(&rest, &opts).unwrap();
    assert_eq!(r2.steps, 60);
    let (a, b) = (
        final_tensors(&dir.path().join("full")),
        final_tensors(&dir.path().join("part")),
    );
    assert_eq!(a.len(), b.len());
    for ((na, ta), (nb, tb)) in a.iter().zip(&b) {
        assert_eq!(na, nb);
        assert!(ta == tb, "{na} differs after resume");
    }
    assert_eq!(r2.eval.segmentation().unwrap().per_class_iou.len(), 11);
    let (_, e) = eval_checkpoint(
        &sar_train::checkpoint::latest(&dir.path().join("full/checkpoints"))
            .unwrap()
            .unwrap(),
        None,
    )
    .unwrap();
    let (x, y) = (e.segmentation().unwrap().miou, seg.miou);
    assert!(x == y || (x.is_nan() && y.is_nan()));
}

#[test]
fn bad_segmentation_configs_are_named() {
    let dir = tempfile::tempdir().unwrap();
    for (over, want) in [
        (
            "model.arch=\"resnet32\"",
            "model.arch is for classification",
        ),
        ("data.seg_crop=[4, 4]", "data.seg_crop"),
        ("eval.groups=\"count\"", "eval.groups"),
        ("model.head=\"aspp\"", ""),
    ] {
        let text = format!(
            "[run]\noutput = {:?}\n[data]\ndataset = \"mosaic\"\n[model]\nbackbone = \"resnet18-v1c\"\n",
            dir.path().display().to_string()
        );
        let r = parse(&text, &[over.to_string()]);
        if want.is_empty() {
            assert!(r.is_ok());
        } else {
            let e = format!("{:#}", r.unwrap_err());
            assert!(e.contains(want), "{over}: {e}");
        }
    }
    // Cityscapes without files: a clear error naming the folder.
    let text = format!(
        "[run]\noutput = {:?}\n[data]\ndataset = \"cityscapes\"\nroot = {:?}\n[model]\nbackbone = \"resnet18-v1c\"\n",
        dir.path().join("o").display().to_string(),
        dir.path().join("nowhere").display().to_string()
    );
    let cfg = parse(&text, &[]).unwrap();
    let e = format!("{:#}", train(&cfg, &TrainOptions::default()).unwrap_err());
    assert!(e.contains("nowhere"), "{e}");
}

/// HRNetV2-W18 and DeepLabV3 (ASPP) train through the same loop: finite losses, SAR's term
/// present, a report with 11 IoUs.
#[test]
fn hrnet_and_aspp_models_train_a_few_steps() {
    let dir = tempfile::tempdir().unwrap();
    for (name, extra) in [
        (
            "hr18",
            vec!["model.backbone=\"hrnetv2-w18\"", "model.aux=false"],
        ),
        ("aspp", vec!["model.head=\"aspp\"", "sar.lambda_p2a=0.05"]),
    ] {
        let mut over = vec![
            "train.iters=3",
            "data.mosaic_train=12",
            "data.mosaic_test=4",
        ];
        over.extend(extra);
        let cfg = config(&dir.path().join(name), &over);
        let r = train(&cfg, &TrainOptions::default()).unwrap();
        assert_eq!(r.steps, 3, "{name}");
        assert!(
            r.loss.total.is_finite() && r.loss.ce > 0.0 && r.loss.aux > 0.0,
            "{name}: {:?}",
            r.loss
        );
        assert_eq!(r.eval.segmentation().unwrap().per_class_iou.len(), 11);
        assert!(r.sar_params > 0);
    }
}

/// The baselines on a segmenter (NCHW features, labels resampled to the feature map): each
/// applies its feature term from the first step, has no h_ψ or L_aux, and the prototype arm's
/// EMA resumes bit-identically.
#[test]
fn baseline_arms_train_a_segmenter() {
    let dir = tempfile::tempdir().unwrap();
    let small = [
        "train.iters=4",
        "data.mosaic_train=12",
        "data.mosaic_test=4",
    ];
    for kind in ["cr", "car", "prototype"] {
        let set = format!("sar.kind=\"{kind}\"");
        let mut over = small.to_vec();
        over.push(&set);
        let r = train(
            &config(&dir.path().join(kind), &over),
            &TrainOptions::default(),
        )
        .unwrap();
        assert_eq!(r.steps, 4, "{kind}");
        assert!(
            r.loss.total.is_finite() && r.loss.p2a > 0.0,
            "{kind}: {:?}",
            r.loss
        );
        assert_eq!((r.loss.aux, r.sar_params), (0.0, 0), "{kind}");
    }
    let mut cut = small.to_vec();
    cut.extend(["sar.kind=\"prototype\"", "train.max_steps=2"]);
    let b = dir.path().join("cut");
    train(&config(&b, &cut), &TrainOptions::default()).unwrap();
    cut.pop();
    let opts = TrainOptions {
        resume: Some(b.clone()),
        ..TrainOptions::default()
    };
    train(&config(&b, &cut), &opts).unwrap();
    assert_eq!(
        final_tensors(&b),
        final_tensors(&dir.path().join("prototype"))
    );
}

/// The demo's segmentation setup with SAR, shortened to 500 iterations: far above chance.
/// Chance here is what needs no digit recognition: predicting background everywhere gives
/// IoU_bg = the background share of the test pixels and 0 elsewhere, so mIoU = share / 11
/// (about 5 %); a uniform random guess is lower still. The run must reach 2.5× that mIoU and
/// recognise the two most common digits (IoU > 0.3 and > 0.15), with SAR's gate passing.
#[test]
fn mosaic_training_beats_chance_by_far_with_the_gate_passing() {
    let dir = tempfile::tempdir().unwrap();
    let demo = sar_train::demo::DemoConfig {
        iters: 500,
        output: dir.path().to_path_buf(),
        plots: false,
        ..sar_train::demo::DemoConfig::segmentation()
    };
    let cfg = sar_train::demo::run_config(&demo, 0, true).unwrap();
    let data = sar_train::seg::load_seg_data(&cfg).unwrap();
    let counts = data.test.class_pixel_counts().unwrap();
    let all_background_miou = counts[0] as f64 / counts.iter().sum::<u64>() as f64 / 11.0;
    let r = train(&cfg, &TrainOptions::default()).unwrap();
    let e = r.eval.segmentation().unwrap();
    assert!(
        r.gate_first_pass.is_some_and(|s| s < 100) && r.gate_pass_rate > 0.8,
        "{r:?}"
    );
    assert!(
        e.miou > 2.5 * all_background_miou,
        "mIoU {} vs all-background {}",
        e.miou,
        all_background_miou
    );
    assert!(
        e.per_class_iou[1] > 0.3 && e.per_class_iou[2] > 0.15,
        "{:?}",
        e.per_class_iou
    );
    assert!(e.aacc > 0.6, "aAcc {}", e.aacc);
}
