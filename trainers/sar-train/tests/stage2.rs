//! Two-stage training (`stage.init_from`, `stage.kind = "mislas"`): the label-aware smoothed
//! cross-entropy in candle against sar-math, a second stage that changes exactly the
//! classifier, the LWS scale and (with shift_bn) BatchNorm's running statistics, exact resume
//! of a second stage, and the refusals.

use candle_core::{Device, Tensor, Var};
use sar_train::checkpoint;
use sar_train::config::{parse, TrainConfig};
use sar_train::train::{train, TrainOptions};
use std::collections::HashMap;
use std::path::Path;

fn stage1(out: &Path) -> String {
    format!(
        r#"
[run]
name = "stage1"
seed = 2
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
epochs = 2
batch_size = 64
log_every = 4
plots = false
[eval]
groups = "index"
head_end = 3
medium_end = 7
"#
    )
}

fn stage2(first: &Path, out: &Path, extra: &[&str]) -> TrainConfig {
    let mut o: Vec<String> = vec![
        "run.name=\"stage2\"".into(),
        format!("run.output={:?}", out.display().to_string()),
        "sar.enabled=false".into(),
        "stage.kind=\"mislas\"".into(),
        format!("stage.init_from={:?}", first.display().to_string()),
        "train.sampler=\"class-balanced\"".into(),
        "train.samples_per_class=4".into(),
        "optim.schedule=\"cosine-epoch\"".into(),
        "optim.nesterov=false".into(),
        "train.epochs=2".into(),
        "train.keep_checkpoints=100".into(),
    ];
    o.extend(extra.iter().map(|s| s.to_string()));
    parse(&stage1(out), &o).unwrap()
}

fn tensors(dir: &Path) -> HashMap<String, Tensor> {
    let ck = checkpoint::latest(&dir.join("checkpoints"))
        .unwrap()
        .unwrap();
    checkpoint::load(&ck).unwrap().tensors
}

fn same(a: &Tensor, b: &Tensor) -> bool {
    let (a, b) = (
        a.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        b.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
    );
    a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()) && a.len() == b.len()
}

#[test]
fn candle_smoothed_cross_entropy_is_the_sar_math_kernel() {
    let z = [
        0.3f32, -1.2, 2.0, 0.7, 0.1, -0.4, 1.5, -2.2, 0.0, 0.9, 0.4, -0.3,
    ];
    let (y, eps) = ([1i64, 3, 0], [0.3f64, 0.05, 0.2, 0.4]);
    let mut want_grad = [0.0f32; 12];
    let want =
        sar_math::mislas::smoothed_cross_entropy(&z, &y, &eps, Some(&mut want_grad)).unwrap();
    let dev = Device::Cpu;
    let zv = Var::from_tensor(&Tensor::from_vec(z.to_vec(), (3, 4), &dev).unwrap()).unwrap();
    let e = Tensor::from_vec(eps.map(|v| v as f32).to_vec(), 4, &dev).unwrap();
    let yt = Tensor::from_vec(y.to_vec(), 3, &dev).unwrap();
    let loss = sar_train::cls::smoothed_cross_entropy(zv.as_tensor(), &yt, &e).unwrap();
    let got = loss.to_scalar::<f32>().unwrap();
    assert!((got - want).abs() < 1e-6, "{got} vs {want}");
    let g = loss.backward().unwrap();
    let g = g.get(zv.as_tensor()).unwrap().flatten_all().unwrap();
    for (a, b) in g.to_vec1::<f32>().unwrap().iter().zip(want_grad) {
        assert!((a - b).abs() < 1e-6, "{a} vs {b}");
    }
}

#[test]
fn mislas_stage_two_changes_exactly_the_classifier_lws_and_running_statistics() {
    let root = tempfile::tempdir().unwrap();
    let first = root.path().join("s1");
    let s1 = train(
        &parse(&stage1(&first), &[]).unwrap(),
        &TrainOptions::default(),
    )
    .unwrap();
    assert!(s1.sar && s1.init_from.is_none());
    let before = tensors(&first);

    let out = root.path().join("s2");
    let r = train(&stage2(&first, &out, &[]), &TrainOptions::default()).unwrap();
    let from = r.init_from.as_ref().expect("the report names stage 1");
    assert_eq!((from.run.as_str(), from.sar), ("stage1", true));
    assert_eq!(from.step, s1.steps);
    assert!(from.checkpoint.contains("s1"), "{}", from.checkpoint);
    let log = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    assert!(
        log.contains("\"kind\":\"init_from\"") && log.contains("stage.lws_scale"),
        "the log names the fresh LWS scale"
    );
    let after = tensors(&out);
    let mut changed = Vec::new();
    for (name, t) in &after {
        if name.starts_with("optim.") {
            continue;
        }
        match before.get(name) {
            Some(b) if same(b, t) => {}
            Some(_) => changed.push(name.clone()),
            None => {
                assert_eq!(name, "stage.lws_scale", "a new tensor");
                changed.push(name.clone());
            }
        }
    }
    changed.sort();
    let running = |n: &str| n.ends_with("running_mean") || n.ends_with("running_var");
    let (stats, learned): (Vec<_>, Vec<_>) = changed.iter().partition(|n| running(n));
    assert_eq!(learned, ["fc.bias", "fc.weight", "stage.lws_scale"]);
    assert!(!stats.is_empty(), "shift_bn updates running statistics");
    // Stage 1's SAR head does not come along: stage 2 has no SAR.
    assert!(!after.keys().any(|n| n.starts_with("sar.")));
    // Momentum only for what stage 2 trains.
    let mut momentum: Vec<&String> = after
        .keys()
        .filter(|n| n.starts_with("optim.momentum."))
        .collect();
    momentum.sort();
    assert_eq!(
        momentum,
        [
            "optim.momentum.fc.bias",
            "optim.momentum.fc.weight",
            "optim.momentum.stage.lws_scale"
        ]
    );
    let e = r.eval.classification().unwrap();
    assert!(e.top1 > 0.3, "top-1 {}", e.top1);

    // Without shift_bn, the running statistics stay too.
    let frozen = root.path().join("s2-frozen");
    train(
        &stage2(
            &first,
            &frozen,
            &["stage.shift_bn=false", "stage.lws=false"],
        ),
        &TrainOptions::default(),
    )
    .unwrap();
    let f = tensors(&frozen);
    let moved: Vec<&String> = f
        .iter()
        .filter(|(n, t)| !n.starts_with("optim.") && !same(&before[*n], t))
        .map(|(n, _)| n)
        .collect();
    let mut moved: Vec<&str> = moved.iter().map(|s| s.as_str()).collect();
    moved.sort();
    assert_eq!(moved, ["fc.bias", "fc.weight"]);
}

#[test]
fn an_interrupted_second_stage_resumes_to_the_same_bits() {
    let root = tempfile::tempdir().unwrap();
    let first = root.path().join("s1");
    train(
        &parse(&stage1(&first), &["train.epochs=1".into()]).unwrap(),
        &TrainOptions::default(),
    )
    .unwrap();
    let whole = root.path().join("whole");
    let w = train(&stage2(&first, &whole, &[]), &TrainOptions::default()).unwrap();
    let cut = root.path().join("cut");
    train(
        &stage2(&first, &cut, &["train.max_steps=5"]),
        &TrainOptions::default(),
    )
    .unwrap();
    // The first stage's checkpoint is not needed to resume the second.
    std::fs::remove_dir_all(first.join("checkpoints")).unwrap();
    let c = train(
        &stage2(&first, &cut, &[]),
        &TrainOptions {
            resume: Some(cut.clone()),
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(c.init_from, w.init_from, "the report still names stage 1");
    let (a, b) = (tensors(&whole), tensors(&cut));
    for (name, t) in &a {
        assert!(same(t, &b[name]), "{name} differs after resume");
    }
    assert_eq!(
        c.eval.classification().unwrap().per_class_accuracy,
        w.eval.classification().unwrap().per_class_accuracy
    );
}

#[test]
fn configs_a_second_stage_cannot_mean_are_refused() {
    let out = Path::new("/nonexistent/out");
    let base = stage1(out);
    for (over, want) in [
        (
            vec!["stage.kind=\"mislas\"", "sar.enabled=false"],
            "stage.init_from",
        ),
        (
            vec!["stage.kind=\"mislas\"", "stage.init_from=\"x\""],
            "sar.enabled = false",
        ),
        (
            vec![
                "stage.kind=\"mislas\"",
                "stage.init_from=\"x\"",
                "sar.enabled=false",
                "data.mixup_alpha=1.0",
            ],
            "MixUp",
        ),
        (
            vec![
                "stage.kind=\"mislas\"",
                "stage.init_from=\"x\"",
                "sar.enabled=false",
                "stage.smooth_head=1.5",
            ],
            "smooth_head",
        ),
        (vec!["train.samples_per_class=0"], "samples_per_class"),
        (vec!["stage.classifier_lr_factor=0"], "classifier_lr_factor"),
    ] {
        let o: Vec<String> = over.iter().map(|s| s.to_string()).collect();
        let e = format!("{:#}", parse(&base, &o).unwrap_err());
        assert!(e.contains(want), "{over:?}: expected `{want}` in {e}");
    }
    // init_from of another model is named when the run starts.
    let root = tempfile::tempdir().unwrap();
    let first = root.path().join("s1");
    train(
        &parse(&stage1(&first), &["train.max_steps=1".into()]).unwrap(),
        &TrainOptions::default(),
    )
    .unwrap();
    let other = stage2(
        &first,
        &root.path().join("s2"),
        &["model.arch=\"cnn-pool\""],
    );
    let e = format!("{:#}", train(&other, &TrainOptions::default()).unwrap_err());
    assert!(e.contains("another [model]"), "{e}");
    let missing = stage2(&root.path().join("nowhere"), &root.path().join("s3"), &[]);
    let e = format!(
        "{:#}",
        train(&missing, &TrainOptions::default()).unwrap_err()
    );
    assert!(e.contains("nowhere"), "{e}");
}

/// The class-balanced sampler feeds both backends the same batches: their first steps' losses
/// agree as on shuffled epochs.
#[test]
fn class_balanced_batches_are_the_same_on_candle_and_dfdx() {
    let root = tempfile::tempdir().unwrap();
    let mut first = Vec::new();
    for backend in ["candle", "dfdx"] {
        let out = root.path().join(backend);
        let cfg = parse(
            &stage1(&out),
            &[
                format!("run.backend=\"{backend}\""),
                "train.sampler=\"class-balanced\"".into(),
                "train.samples_per_class=4".into(),
                "train.log_every=1".into(),
                "train.max_steps=3".into(),
            ],
        )
        .unwrap();
        train(&cfg, &TrainOptions::default()).unwrap();
        let log = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
        let ce: Vec<f64> = log
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .filter(|v| v["kind"] == "train")
            .map(|v| v["ce"].as_f64().unwrap())
            .collect();
        assert_eq!(ce.len(), 3, "{backend}");
        first.push(ce[0]);
    }
    assert!(
        ((first[0] - first[1]) / first[0]).abs() < 1e-4,
        "first-step cross-entropy: candle {} dfdx {}",
        first[0],
        first[1]
    );
}

#[test]
fn candle_disalign_calibration_and_weighted_loss_are_the_sar_math_kernels() {
    use sar_math::disalign::{
        calibrate, calibrate_backward, weighted_cross_entropy, CalibrationForm,
    };
    let dev = Device::Cpu;
    let (n, c, d) = (3usize, 4usize, 2usize);
    let x = [0.5f32, -1.0, 2.0, 0.25, -0.5, 1.5];
    let z = [
        0.3f32, -1.2, 2.0, 0.7, 0.1, -0.4, 1.5, -2.2, 0.0, 0.9, 0.4, -0.3,
    ];
    let (v, b) = ([0.1f32, -0.3], [0.2f32]);
    let (s, m) = ([1.2f32, 0.7, 1.0, 0.4], [0.1f32, -0.3, 0.6, 0.0]);
    let (y, w) = ([1i64, 3, 0], [0.5f64, 2.0, 1.0, 1.5]);
    // sar-math: g = x·v + b, z' = calibrate, L = weighted CE, then the chain back.
    let g: Vec<f32> = (0..n)
        .map(|i| x[i * d] * v[0] + x[i * d + 1] * v[1] + b[0])
        .collect();
    let mut zc = [0.0f32; 12];
    calibrate(&z, &g, &s, &m, CalibrationForm::Classification, &mut zc).unwrap();
    let mut gz = [0.0f32; 12];
    let want = weighted_cross_entropy(&zc, &y, &w, Some(&mut gz)).unwrap();
    let (mut gs, mut gm, mut gg) = ([0.0f32; 4], [0.0f32; 4], [0.0f32; 3]);
    calibrate_backward(
        &z,
        &g,
        &s,
        &m,
        CalibrationForm::Classification,
        &gz,
        &mut gs,
        &mut gm,
        &mut gg,
    )
    .unwrap();
    let gv: Vec<f32> = (0..d)
        .map(|k| (0..n).map(|i| gg[i] * x[i * d + k]).sum())
        .collect();
    let gb: f32 = gg.iter().sum();

    let var = |v: &[f32]| Var::from_tensor(&Tensor::new(v, &dev).unwrap()).unwrap();
    let (sv, mv, vv, bv) = (var(&s), var(&m), var(&v), var(&b));
    let xt = Tensor::from_vec(x.to_vec(), (n, d), &dev).unwrap();
    let zt = Tensor::from_vec(z.to_vec(), (n, c), &dev).unwrap();
    let logits = sar_train::cls::disalign_logits(
        &xt,
        &zt,
        vv.as_tensor(),
        bv.as_tensor(),
        sv.as_tensor(),
        mv.as_tensor(),
    )
    .unwrap();
    let got_z = logits.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    for (a, b) in got_z.iter().zip(zc) {
        assert!((a - b).abs() < 1e-6, "calibrated logits {a} vs {b}");
    }
    let wt = Tensor::new(&w.map(|v| v as f32), &dev).unwrap();
    let yt = Tensor::new(&y, &dev).unwrap();
    let loss = sar_train::cls::weighted_cross_entropy(&logits, &yt, &wt).unwrap();
    assert!((loss.to_scalar::<f32>().unwrap() - want).abs() < 1e-6);
    let grads = loss.backward().unwrap();
    let close = |var: &Var, want: &[f32], what: &str| {
        let got = grads
            .get(var.as_tensor())
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        for (a, b) in got.iter().zip(want) {
            assert!((a - b).abs() < 1e-6, "{what}: {got:?} vs {want:?}");
        }
    };
    close(&sv, &gs, "scale");
    close(&mv, &gm, "bias");
    close(&vv, &gv, "gate weight");
    close(&bv, &[gb], "gate bias");
}

#[test]
fn disalign_trains_only_its_calibration_on_the_frozen_model() {
    let root = tempfile::tempdir().unwrap();
    let first = root.path().join("s1");
    train(
        &parse(&stage1(&first), &[]).unwrap(),
        &TrainOptions::default(),
    )
    .unwrap();
    let before = tensors(&first);
    let out = root.path().join("da");
    let cfg = parse(
        &stage1(&out),
        &[
            "run.name=\"disalign\"".into(),
            "sar.enabled=false".into(),
            "stage.kind=\"disalign\"".into(),
            format!("stage.init_from={:?}", first.display().to_string()),
            "stage.grw_rho=1.0".into(),
            "train.epochs=2".into(),
        ],
    )
    .unwrap();
    let r = train(&cfg, &TrainOptions::default()).unwrap();
    assert_eq!(r.init_from.as_ref().unwrap().run, "stage1");
    let after = tensors(&out);
    let mut learned: Vec<&str> = after
        .iter()
        .filter(|(n, _)| {
            !n.starts_with("optim.") && !n.ends_with("running_mean") && !n.ends_with("running_var")
        })
        .filter(|(n, t)| before.get(*n).is_none_or(|b| !same(b, t)))
        .map(|(n, _)| n.as_str())
        .collect();
    learned.sort();
    assert_eq!(
        learned,
        [
            "stage.disalign.bias",
            "stage.disalign.gate.bias",
            "stage.disalign.gate.weight",
            "stage.disalign.scale"
        ]
    );
    let e = r.eval.classification().unwrap();
    assert!(e.top1 > 0.3, "top-1 {}", e.top1);
    // The evaluation of a checkpoint goes through the calibration too.
    let ck = checkpoint::latest(&out.join("checkpoints"))
        .unwrap()
        .unwrap();
    let (_, again) = sar_train::train::eval_checkpoint(&ck, None).unwrap();
    assert_eq!(
        again.classification().unwrap().per_class_accuracy,
        e.per_class_accuracy
    );
}

#[test]
fn segmentation_disalign_head_is_the_sar_math_form_and_its_loss_is_mmsegmentations() {
    use sar_math::disalign::{calibrate, CalibrationForm};
    use sar_train::seg::{seg_cross_entropy, seg_weighted_cross_entropy, SegDisAlign};
    let dev = Device::Cpu;
    let varmap = candle_nn::VarMap::new();
    let (d, k) = (3usize, 2usize);
    let head = SegDisAlign::new(&varmap, &dev, 5, d, &[0.5, 1.5]).unwrap();
    // Move scale and margin off their start so that both terms count.
    let vars = varmap.data().lock().unwrap().clone();
    vars["stage.disalign.scale"]
        .set(&Tensor::new(&[1.5f32, 0.5], &dev).unwrap())
        .unwrap();
    vars["stage.disalign.bias"]
        .set(&Tensor::new(&[0.25f32, -0.5], &dev).unwrap())
        .unwrap();
    let f: Vec<f32> = (0..d * 4).map(|i| (i as f32 * 0.37).sin()).collect();
    let z: Vec<f32> = (0..k * 4).map(|i| (i as f32 * 0.91).cos()).collect();
    let ft = Tensor::from_vec(f.clone(), (1, d, 2, 2), &dev).unwrap();
    let zt = Tensor::from_vec(z.clone(), (1, k, 2, 2), &dev).unwrap();
    let got = head
        .calibrate(&ft, &zt, false)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    // The gate in evaluation mode at BatchNorm's start: relu(conv(F) / √(1 + ε)).
    let wconv = vars["stage.disalign.gate.conv.weight"]
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let gate: Vec<f32> = (0..4)
        .map(|p| {
            let c: f32 = (0..d).map(|j| wconv[j] * f[j * 4 + p]).sum();
            (c / (1.0f32 + 1e-5).sqrt()).max(0.0)
        })
        .collect();
    // sar-math works on rows [pixels, K].
    let rows: Vec<f32> = (0..4)
        .flat_map(|p| (0..k).map(move |c| (p, c)))
        .map(|(p, c)| z[c * 4 + p])
        .collect();
    let mut want = vec![0.0f32; 8];
    calibrate(
        &rows,
        &gate,
        &[1.5, 0.5],
        &[0.25, -0.5],
        CalibrationForm::Segmentation,
        &mut want,
    )
    .unwrap();
    for p in 0..4 {
        for c in 0..k {
            let (a, b) = (got[c * 4 + p], want[p * k + c]);
            assert!((a - b).abs() < 1e-6, "pixel {p} class {c}: {a} vs {b}");
        }
    }
    // With unit weights the weighted loss is the plain one (mean over all pixels, ignored
    // ones included); a weight scales exactly its class's pixels.
    let labels = [0u8, 1, 255, 1];
    let plain = seg_cross_entropy(&zt, &labels, (1, 2, 2)).unwrap();
    let unit = seg_weighted_cross_entropy(&zt, &labels, (1, 2, 2), &[1.0, 1.0]).unwrap();
    let (p, u) = (
        plain.to_scalar::<f32>().unwrap(),
        unit.to_scalar::<f32>().unwrap(),
    );
    assert!((p - u).abs() < 1e-7);
    let lsm = candle_nn::ops::log_softmax(&zt, 1)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let nll = |pix: usize, c: usize| -lsm[c * 4 + pix];
    let hand = (2.0 * nll(0, 0) + 0.5 * nll(1, 1) + 0.5 * nll(3, 1)) / 4.0;
    let weighted = seg_weighted_cross_entropy(&zt, &labels, (1, 2, 2), &[2.0, 0.5])
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!((weighted - hand).abs() < 1e-6, "{weighted} vs {hand}");
}

#[test]
fn segmentation_disalign_trains_only_its_head_on_the_frozen_segmenter() {
    let root = tempfile::tempdir().unwrap();
    let demo = sar_train::demo::DemoConfig {
        iters: 30,
        output: root.path().to_path_buf(),
        plots: false,
        ..sar_train::demo::DemoConfig::segmentation()
    };
    let mut s1 = sar_train::demo::run_config(&demo, 0, true).unwrap();
    s1.run.output = root.path().join("s1");
    train(&s1, &TrainOptions::default()).unwrap();
    let before = tensors(&s1.run.output);
    let mut s2 = s1.clone();
    s2.run.output = root.path().join("s2");
    s2.run.name = "disalign".into();
    s2.sar.enabled = false;
    s2.stage.kind = sar_train::config::StageKind::Disalign;
    s2.stage.init_from = Some(s1.run.output.clone());
    s2.train.iters = Some(12);
    s2.validate().unwrap();
    let r = train(&s2, &TrainOptions::default()).unwrap();
    assert_eq!(r.init_from.as_ref().unwrap().run, s1.run.name);
    let after = tensors(&s2.run.output);
    let stat = |n: &str| n.ends_with("running_mean") || n.ends_with("running_var");
    let mut learned: Vec<&str> = after
        .iter()
        .filter(|(n, _)| !n.starts_with("optim.") && !stat(n))
        .filter(|(n, t)| before.get(*n).is_none_or(|b| !same(b, t)))
        .map(|(n, _)| n.as_str())
        .collect();
    learned.sort();
    assert_eq!(
        learned,
        [
            "stage.disalign.bias",
            "stage.disalign.gate.bn.bias",
            "stage.disalign.gate.bn.weight",
            "stage.disalign.gate.conv.weight",
            "stage.disalign.scale"
        ]
    );
    // The frozen segmenter's weights, the auxiliary head's included, are stage 1's.
    for (n, t) in &before {
        if !n.starts_with("sar.") && !n.starts_with("optim.") && !stat(n) {
            assert!(same(t, &after[n]), "{n} moved");
        }
    }
    let e = r.eval.segmentation().unwrap();
    assert!(e.miou.is_finite() && e.miou > 0.0, "{e:?}");
    let ck = checkpoint::latest(&s2.run.output.join("checkpoints"))
        .unwrap()
        .unwrap();
    let (_, again) = sar_train::train::eval_checkpoint(&ck, None).unwrap();
    assert_eq!(again.segmentation().unwrap().miou, e.miou);
}
