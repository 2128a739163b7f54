//! `sar demo`: baseline against SAR on a long-tailed split of the embedded digits, several seeds.
//!
//! Data: the 1,797 UCI digits, a stratified third held out as a balanced test set, and a
//! long-tailed training subset by the CIFAR-LT rule (imbalance 10 by default: class 0 keeps the
//! most images, class 9 the fewest). Model: an MLP 64 → 128 → 64 (the feature D = 64, after
//! ReLU) with a linear classifier 64 → 10 that the SAR head shares. SGD with Nesterov momentum,
//! weight decay and a cosine schedule. Both arms of a seed start from the same weights and see
//! the same batches; only SAR's term differs.
//!
//! The digits are a smoke test of SAR, not evidence for it (PyTorch gave SAR − baseline within
//! noise on them; see the repository's shared bench notes). So the demo reports mean ± standard
//! deviation over seeds and the paired differences, and says plainly when a difference is
//! within noise (|mean| < 2 standard errors).

use crate::optim::{learning_rate, Schedule, Sgd};
use anyhow::Context;
use candle_core::{DType, Device, Module, Tensor, Var, D};
use candle_nn::{Linear, VarMap};
use sar_candle::{CandleBackend, EmbeddingKind, SarHead};
use sar_data::{digits, split, ImageSet};
use sar_math::anchors::{AnchorKind, AnchorRng};
use sar_math::metrics::{
    confusion_update, group_means, groups_by_index, overall_accuracy, per_class_accuracy, Group,
};
use sar_math::SarConfig;

/// Settings of the demo.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DemoConfig {
    /// Seeds (one baseline and one SAR run each).
    pub seeds: Vec<u64>,
    /// Training epochs.
    pub epochs: usize,
    /// Batch size.
    pub batch: usize,
    /// Peak learning rate.
    pub lr: f64,
    /// Imbalance factor of the training subset.
    pub imbalance: f64,
    /// SAR's hyper-parameters.
    pub sar: SarConfig,
}

impl Default for DemoConfig {
    fn default() -> Self {
        DemoConfig {
            seeds: (0..5).collect(),
            epochs: 150,
            batch: 64,
            lr: 0.05,
            imbalance: 10.0,
            sar: SarConfig::default(),
        }
    }
}

/// One run's results.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RunResult {
    /// Seed.
    pub seed: u64,
    /// Whether SAR was on.
    pub sar: bool,
    /// Test top-1 accuracy.
    pub top1: f64,
    /// Test accuracy per class.
    pub per_class_accuracy: Vec<f64>,
    /// Mean accuracy of the head classes (0–2).
    pub head: f64,
    /// Mean accuracy of the medium classes (3–6).
    pub medium: f64,
    /// Mean accuracy of the tail classes (7–9).
    pub tail: f64,
    /// Step at which SAR's gate first passed.
    pub gate_first_pass: Option<usize>,
    /// Share of steps after that on which it passed.
    pub gate_pass_rate: f64,
    /// L_aux and L_p2a of the last step (0 for the baseline).
    pub last_loss_aux: f64,
    /// L_p2a of the last step.
    pub last_loss_p2a: f64,
    /// Wall time in seconds.
    pub seconds: f64,
}

/// The whole demo.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DemoReport {
    /// Settings.
    pub config: DemoConfig,
    /// Training images per class.
    pub train_counts: Vec<u64>,
    /// Test images.
    pub test_images: usize,
    /// Every run.
    pub runs: Vec<RunResult>,
}

struct Mlp {
    fc1: Linear,
    fc2: Linear,
    classifier: Linear,
}

impl Mlp {
    /// PyTorch's default Linear initialisation (uniform ±1/√fan_in) from a portable generator.
    fn new(varmap: &VarMap, rng: &mut AnchorRng) -> anyhow::Result<Self> {
        let mut linear = |name: &str, inp: usize, out: usize| -> anyhow::Result<Linear> {
            let bound = 1.0 / (inp as f64).sqrt();
            let mut values = |n: usize| -> Vec<f32> {
                (0..n)
                    .map(|_| (bound * (2.0 * rng.next_f64() - 1.0)) as f32)
                    .collect()
            };
            let w = Var::from_tensor(&Tensor::from_vec(
                values(inp * out),
                (out, inp),
                &Device::Cpu,
            )?)?;
            let b = Var::from_tensor(&Tensor::from_vec(values(out), out, &Device::Cpu)?)?;
            let mut data = varmap.data().lock().expect("varmap lock");
            data.insert(format!("{name}.weight"), w.clone());
            data.insert(format!("{name}.bias"), b.clone());
            Ok(Linear::new(
                w.as_tensor().clone(),
                Some(b.as_tensor().clone()),
            ))
        };
        Ok(Mlp {
            fc1: linear("fc1", 64, 128)?,
            fc2: linear("fc2", 128, 64)?,
            classifier: linear("classifier", 64, 10)?,
        })
    }
    fn features(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.fc2.forward(&self.fc1.forward(x)?.relu()?)?.relu()
    }
}

fn batch(set: &ImageSet, idx: &[usize]) -> anyhow::Result<(Tensor, Tensor)> {
    let scale = 1.0 / set.max_value as f32;
    let mut x = Vec::with_capacity(idx.len() * 64);
    let mut y = Vec::with_capacity(idx.len());
    for &i in idx {
        x.extend(
            set.image(i)
                .context("image index")?
                .iter()
                .map(|&p| p as f32 * scale - 0.5),
        );
        y.push(set.labels[i] as i64);
    }
    Ok((
        Tensor::from_vec(x, (idx.len(), 64), &Device::Cpu)?,
        Tensor::from_vec(y, idx.len(), &Device::Cpu)?,
    ))
}

fn run(
    cfg: &DemoConfig,
    train: &ImageSet,
    test: &ImageSet,
    seed: u64,
    with_sar: bool,
) -> anyhow::Result<RunResult> {
    let start = std::time::Instant::now();
    let varmap = VarMap::new();
    let mut rng = AnchorRng::new(seed);
    let model = Mlp::new(&varmap, &mut rng)?;
    let mut head = if with_sar {
        let backend = CandleBackend::new(Device::Cpu, DType::F32)?;
        Some(SarHead::new(
            &varmap,
            "sar",
            backend,
            cfg.sar,
            10,
            64,
            EmbeddingKind::Classification,
            AnchorKind::Normal,
            seed,
        )?)
    } else {
        None
    };
    let mut opt = Sgd::new(varmap.all_vars(), cfg.lr, 0.9, 5e-4, true);
    let steps_per_epoch = train.len().div_ceil(cfg.batch);
    let total = cfg.epochs * steps_per_epoch;
    let (mut first_pass, mut passes, mut after_first) = (None, 0usize, 0usize);
    let (mut last_aux, mut last_p2a) = (0.0, 0.0);
    let mut order: Vec<usize> = (0..train.len()).collect();
    let mut shuffle = AnchorRng::new(seed ^ 0xD47A);
    let mut t = 0;
    for _ in 0..cfg.epochs {
        for i in (1..order.len()).rev() {
            order.swap(i, (shuffle.next_u64() % (i as u64 + 1)) as usize);
        }
        for chunk in order.chunks(cfg.batch) {
            let (x, y) = batch(train, chunk)?;
            let feats = model.features(&x)?;
            let mut loss = candle_nn::loss::cross_entropy(&model.classifier.forward(&feats)?, &y)?;
            if let Some(h) = head.as_mut() {
                let out = h.step(&|e| model.classifier.forward(e), &feats, &y)?;
                loss = (loss + out.loss)?;
                (last_aux, last_p2a) = (out.loss_aux, out.loss_p2a);
                if out.gate_passed {
                    first_pass.get_or_insert(t);
                    passes += 1;
                }
                if first_pass.is_some() {
                    after_first += 1;
                }
            }
            let value = loss.to_scalar::<f32>()?;
            anyhow::ensure!(
                value.is_finite(),
                "step {t}: the loss is {value} (seed {seed}, SAR {with_sar})"
            );
            opt.lr = learning_rate(&Schedule::Cosine, cfg.lr, t, total, 0);
            opt.step(&loss.backward()?)?;
            t += 1;
        }
    }
    // Evaluation on the balanced test set.
    let all: Vec<usize> = (0..test.len()).collect();
    let (x, _) = batch(test, &all)?;
    let pred: Vec<u32> = model
        .classifier
        .forward(&model.features(&x)?)?
        .argmax(D::Minus1)?
        .to_vec1()?;
    let mut confusion = vec![0u64; 100];
    confusion_update(&mut confusion, 10, &test.labels, &pred, -1)?;
    let mut acc = vec![0.0; 10];
    per_class_accuracy(&confusion, 10, &mut acc)?;
    let mut groups = [Group::Head; 10];
    groups_by_index(3, 7, &mut groups)?;
    let g = group_means(&acc, &groups)?;
    Ok(RunResult {
        seed,
        sar: with_sar,
        top1: overall_accuracy(&confusion, 10)?,
        per_class_accuracy: acc,
        head: g.head,
        medium: g.medium,
        tail: g.tail,
        gate_first_pass: first_pass,
        gate_pass_rate: if after_first == 0 {
            0.0
        } else {
            passes as f64 / after_first as f64
        },
        last_loss_aux: last_aux,
        last_loss_p2a: last_p2a,
        seconds: start.elapsed().as_secs_f64(),
    })
}

/// Runs every seed, baseline and SAR, and collects the report. `progress` is told each run.
pub fn run_demo(
    cfg: &DemoConfig,
    progress: &mut dyn FnMut(&RunResult),
) -> anyhow::Result<DemoReport> {
    let data = digits::embedded()?;
    let (train_idx, test_idx) = split::stratified(&data.labels, 10, 1.0 / 3.0, 2024)?;
    let train_full = data.subset(&train_idx, "digits/train")?;
    let lt = split::long_tailed(&train_full.labels, 10, cfg.imbalance, None, 2024)?;
    let train = train_full.subset(&lt, "digits/train-lt")?;
    let test = data.subset(&test_idx, "digits/test")?;
    let mut runs = Vec::new();
    for &seed in &cfg.seeds {
        for with_sar in [false, true] {
            let r = run(cfg, &train, &test, seed, with_sar)?;
            progress(&r);
            runs.push(r);
        }
    }
    Ok(DemoReport {
        config: cfg.clone(),
        train_counts: train.class_counts(),
        test_images: test.len(),
        runs,
    })
}

fn mean_sd(v: &[f64]) -> (f64, f64) {
    let n = v.len() as f64;
    let m = v.iter().sum::<f64>() / n;
    let var = if v.len() > 1 {
        v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (n - 1.0)
    } else {
        0.0
    };
    (m, var.sqrt())
}

/// A reported metric: its column name and how to read it from a run.
type Metric = (&'static str, fn(&RunResult) -> f64);

/// The table printed by `sar demo`.
pub fn summary(report: &DemoReport) -> String {
    let arm = |sar: bool| report.runs.iter().filter(move |r| r.sar == sar);
    let col = |sar: bool, f: fn(&RunResult) -> f64| arm(sar).map(f).collect::<Vec<_>>();
    let metrics: [Metric; 4] = [
        ("top-1", |r| r.top1),
        ("head 0-2", |r| r.head),
        ("medium 3-6", |r| r.medium),
        ("tail 7-9", |r| r.tail),
    ];
    let n = report.config.seeds.len();
    let mut out = format!(
        "SAR demo: long-tailed digits (imbalance {}, {} training images {:?}, {} balanced test images), MLP 64-128-64, {} epochs, {} seeds\n\n",
        report.config.imbalance,
        report.train_counts.iter().sum::<u64>(),
        report.train_counts,
        report.test_images,
        report.config.epochs,
        n
    );
    out += &format!("{:<16}", "test accuracy %");
    for (name, _) in metrics {
        out += &format!("{name:>18}");
    }
    out += "\n";
    for (label, sar) in [("baseline", false), ("SAR", true)] {
        out += &format!("{label:<16}");
        for (_, f) in metrics {
            let (m, s) = mean_sd(&col(sar, f));
            out += &format!("{:>18}", format!("{:.1} ± {:.1}", 100.0 * m, 100.0 * s));
        }
        out += "\n";
    }
    out += &format!("{:<16}", "SAR − baseline");
    let mut verdicts = Vec::new();
    for (name, f) in metrics {
        let d: Vec<f64> = col(true, f)
            .iter()
            .zip(col(false, f))
            .map(|(a, b)| a - b)
            .collect();
        let (m, s) = mean_sd(&d);
        out += &format!("{:>18}", format!("{:+.1} ± {:.1}", 100.0 * m, 100.0 * s));
        let stderr = s / (n as f64).sqrt();
        let up = d.iter().filter(|&&x| x > 0.0).count();
        verdicts.push(if n < 2 || m.abs() < 2.0 * stderr {
            format!("{name}: within noise ({up} of {n} seeds up)")
        } else {
            format!(
                "{name}: {} beyond 2 standard errors ({up} of {n} seeds up)",
                if m > 0.0 { "better" } else { "worse" }
            )
        });
    }
    out += "\n\n";
    for v in verdicts {
        out += &format!("  {v}\n");
    }
    let sar_runs: Vec<&RunResult> = arm(true).collect();
    let firsts: Vec<f64> = sar_runs
        .iter()
        .filter_map(|r| r.gate_first_pass.map(|s| s as f64))
        .collect();
    let rate = mean_sd(
        &sar_runs
            .iter()
            .map(|r| r.gate_pass_rate)
            .collect::<Vec<_>>(),
    )
    .0;
    out += &format!(
        "\nSAR's gate passed in {} of {} runs, first at step {:.1} on average, then on {:.1}% of steps; last step L_aux {:.4}, L_p2a {:.4} (mean)\n",
        firsts.len(),
        sar_runs.len(),
        mean_sd(&firsts).0,
        100.0 * rate,
        mean_sd(&sar_runs.iter().map(|r| r.last_loss_aux).collect::<Vec<_>>()).0,
        mean_sd(&sar_runs.iter().map(|r| r.last_loss_p2a).collect::<Vec<_>>()).0,
    );
    out += "The digits are a smoke test of SAR: its measurable effect needs a larger long-tailed set (e.g. CIFAR-100-LT).\n";
    out
}
