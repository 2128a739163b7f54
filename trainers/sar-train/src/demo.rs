//! `sar demo`: baseline against SAR on a long-tailed split of the embedded digits, several
//! seeds, through the same trainer as `sar train`.
//!
//! Data: the 1,797 UCI digits, a stratified third held out as a balanced test set, and a
//! long-tailed training subset by the CIFAR-LT rule (imbalance 10 by default: class 0 keeps the
//! most images, class 9 the fewest). Model: the small CNN (128-d feature) whose `fc` the SAR
//! head shares. SGD with Nesterov momentum, weight decay and a cosine schedule; random crops
//! (1 pixel). Both arms of a seed start from the same weights and see the same batches; only
//! SAR's term differs. Head/medium/tail are classes 0–2, 3–6 and 7–9.
//!
//! The digits are a smoke test of SAR, not evidence for it (PyTorch gave SAR − baseline within
//! noise on them; see the repository's shared bench notes). So the demo reports mean ± standard
//! deviation over seeds and the paired differences, and says plainly when a difference is
//! within noise (|mean| < 2 standard errors).
//!
//! Outputs under `output`: one run folder per seed and arm (config, metrics log, checkpoints,
//! plots), `report.json`, and the comparison plots `per_class_baseline_vs_sar.png` (mean over
//! seeds) and `loss_baseline_vs_sar.png` (first seed).

use crate::config::{parse, TrainConfig};
use crate::train::{loss_series, train, RunReport, TrainOptions};
use std::path::{Path, PathBuf};

/// Settings of the demo.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DemoConfig {
    /// Seeds (one baseline and one SAR run each).
    pub seeds: Vec<u64>,
    /// Training epochs.
    pub epochs: usize,
    /// Imbalance factor of the training subset.
    pub imbalance: f64,
    /// Output folder.
    pub output: PathBuf,
    /// Write plots.
    pub plots: bool,
}

impl Default for DemoConfig {
    fn default() -> Self {
        DemoConfig {
            seeds: (0..5).collect(),
            epochs: 30,
            imbalance: 10.0,
            output: PathBuf::from("runs/demo"),
            plots: true,
        }
    }
}

/// One run of the demo.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DemoRun {
    /// Seed.
    pub seed: u64,
    /// The trainer's report.
    #[serde(flatten)]
    pub report: RunReport,
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
    pub runs: Vec<DemoRun>,
}

/// The trainer configuration of one demo run.
pub fn run_config(cfg: &DemoConfig, seed: u64, sar: bool) -> anyhow::Result<TrainConfig> {
    let arm = if sar { "sar" } else { "baseline" };
    let out = cfg.output.join(format!("seed{seed}-{arm}"));
    let text = format!(
        r#"
[run]
name = "seed {seed} {arm}"
seed = {seed}
output = {out:?}
[data]
dataset = "digits"
imbalance = {imbalance:?}
split_seed = 2024
pad = 1
flip = false
[model]
arch = "small-cnn"
[optim]
lr = 0.05
momentum = 0.9
weight_decay = 5e-4
nesterov = true
schedule = "cosine"
[sar]
enabled = {sar}
[train]
epochs = {epochs}
batch_size = 64
log_every = 10
keep_checkpoints = 1
plots = {plots}
[eval]
groups = "index"
head_end = 3
medium_end = 7
"#,
        imbalance = cfg.imbalance,
        epochs = cfg.epochs,
        plots = cfg.plots,
        out = out.display().to_string(),
    );
    parse(&text, &[])
}

/// Runs every seed, baseline and SAR, and collects the report. `progress` is told each run.
pub fn run_demo(
    cfg: &DemoConfig,
    progress: &mut dyn FnMut(&DemoRun),
) -> anyhow::Result<DemoReport> {
    let mut runs = Vec::new();
    let mut test_images = 0;
    for &seed in &cfg.seeds {
        for sar in [false, true] {
            let rc = run_config(cfg, seed, sar)?;
            if test_images == 0 {
                test_images = crate::train::load_data(&rc)?.test.len();
            }
            let report = train(&rc, &TrainOptions::default())?;
            let run = DemoRun { seed, report };
            progress(&run);
            runs.push(run);
        }
    }
    let report = DemoReport {
        config: cfg.clone(),
        train_counts: runs
            .first()
            .map(|r| r.report.train_counts.clone())
            .unwrap_or_default(),
        test_images,
        runs,
    };
    crate::tensorio::write_atomic(
        &cfg.output.join("report.json"),
        serde_json::to_string_pretty(&report)?.as_bytes(),
    )?;
    if cfg.plots {
        comparison_plots(&report, &cfg.output)?;
    }
    Ok(report)
}

fn comparison_plots(report: &DemoReport, out: &Path) -> anyhow::Result<()> {
    let mean_per_class = |sar: bool| -> Vec<f64> {
        let runs: Vec<&DemoRun> = report.runs.iter().filter(|r| r.report.sar == sar).collect();
        let c = report.train_counts.len();
        (0..c)
            .map(|k| {
                100.0
                    * runs
                        .iter()
                        .map(|r| r.report.eval.per_class_accuracy[k])
                        .sum::<f64>()
                    / runs.len().max(1) as f64
            })
            .collect()
    };
    let labels = crate::plots::class_labels(&report.train_counts);
    crate::plots::grouped_bars(
        &out.join("per_class_baseline_vs_sar.png"),
        &format!(
            "long-tailed digits: test accuracy per class, mean of {} seeds",
            report.config.seeds.len()
        ),
        "accuracy %",
        &labels,
        &[
            ("baseline".to_string(), mean_per_class(false)),
            ("SAR".to_string(), mean_per_class(true)),
        ],
    )?;
    if let Some(&seed) = report.config.seeds.first() {
        let mut series = Vec::new();
        for arm in ["baseline", "sar"] {
            let log = out.join(format!("seed{seed}-{arm}")).join("metrics.jsonl");
            if let Some((_, s)) = loss_series(&log)?.into_iter().find(|s| s.0 == "ce") {
                series.push((format!("{arm}: cross-entropy"), s));
            }
        }
        crate::plots::curves(
            &out.join("loss_baseline_vs_sar.png"),
            &format!("seed {seed}: training cross-entropy"),
            "step",
            "loss",
            &series,
        )?;
    }
    Ok(())
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
type Metric = (&'static str, fn(&RunReport) -> f64);

/// The table printed by `sar demo`.
pub fn summary(report: &DemoReport) -> String {
    let arm = |sar: bool| {
        report
            .runs
            .iter()
            .filter(move |r| r.report.sar == sar)
            .map(|r| &r.report)
    };
    let col = |sar: bool, f: fn(&RunReport) -> f64| arm(sar).map(f).collect::<Vec<_>>();
    let metrics: [Metric; 4] = [
        ("top-1", |r| r.eval.top1),
        ("head 0-2", |r| r.eval.head),
        ("medium 3-6", |r| r.eval.medium),
        ("tail 7-9", |r| r.eval.tail),
    ];
    let n = report.config.seeds.len();
    let mut out = format!(
        "SAR demo: long-tailed digits (imbalance {}, {} training images {:?}, {} balanced test images), small CNN, {} epochs, {} seeds\n\n",
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
    let sar_runs: Vec<&RunReport> = arm(true).collect();
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
        "\nSAR's gate passed in {} of {} runs, first at step {:.1} on average, then on {:.1}% of steps; last-epoch L_aux {:.4}, L_p2a {:.4} (mean)\n",
        firsts.len(),
        sar_runs.len(),
        mean_sd(&firsts).0,
        100.0 * rate,
        mean_sd(&sar_runs.iter().map(|r| r.loss.aux).collect::<Vec<_>>()).0,
        mean_sd(&sar_runs.iter().map(|r| r.loss.p2a).collect::<Vec<_>>()).0,
    );
    out += "The digits are a smoke test of SAR: its measurable effect needs a larger long-tailed set (e.g. CIFAR-100-LT).\n";
    out
}
