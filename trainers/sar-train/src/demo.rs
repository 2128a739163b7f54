//! `sar demo`: baseline against SAR on embedded long-tailed data, several seeds, through the
//! same trainer as `sar train`. Two tasks:
//!
//! - classification (`--task cls`, the default), described below;
//! - segmentation (`--task seg`): the embedded glyph mosaic ([`sar_data::seg::glyph_mosaic`]:
//!   64×64 canvases of real handwritten digits, 11 classes with background, digit 9 twenty
//!   times rarer than digit 0), a narrow dilated ResNet-18 V1c (base width 16) with the FCN and
//!   auxiliary heads, mmsegmentation's augmentation with a milder random resize (0.75–1.5:
//!   the canvases are small) and no flip (a mirrored digit is another shape), SGD lr 0.1 with
//!   poly decay, batch 8; reported as per-class IoU, mIoU and mHead/mBody/mTail (classes in
//!   thirds by training pixels).
//!
//! Data: the 1,797 UCI digits, a stratified third held out as a balanced test set, and a
//! long-tailed training subset by the CIFAR-LT rule (imbalance 10 by default: class 0 keeps the
//! most images, class 9 the fewest). Model: the small CNN (128-d feature) whose `fc` the SAR
//! head shares. SGD with Nesterov momentum, weight decay and a cosine schedule; random crops
//! (1 pixel). Both arms of a seed start from the same weights and see the same batches; only
//! SAR's term differs. Head/medium/tail are classes 0–2, 3–6 and 7–9.
//!
//! The digits are a smoke test of SAR, not evidence for it (PyTorch gave SAR − baseline within
//! noise on them, +0.23 ± 0.85 top-1 over 20 seeds). So the demo reports mean ± standard
//! deviation over seeds and the paired differences, and says plainly when a difference is
//! within noise (|mean| < 2 standard errors).
//!
//! Outputs under `output`: one run folder per seed and arm (config, metrics log, checkpoints,
//! plots), `report.json`, and the comparison plots `per_class_baseline_vs_sar.png` (mean over
//! seeds) and `loss_baseline_vs_sar.png` (first seed).

use crate::config::{parse, TrainConfig};
use crate::evaluation::TaskEvaluation;
use crate::run::folder::RunFolder;
use crate::run::{loss_series, RunReport};
use crate::train::{train, TrainOptions};
use anyhow::Context;
use std::path::{Path, PathBuf};

/// Which task the demo trains.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum DemoTask {
    /// Long-tailed digits, small CNN.
    Cls,
    /// Long-tailed glyph mosaic, FCN on a dilated ResNet-18.
    Seg,
}

/// Settings of the demo.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DemoConfig {
    /// Task.
    pub task: DemoTask,
    /// Seeds (one baseline and one SAR run each).
    pub seeds: Vec<u64>,
    /// Training epochs (classification).
    pub epochs: usize,
    /// Training iterations (segmentation).
    pub iters: usize,
    /// Imbalance factor of the training subset.
    pub imbalance: f64,
    /// Output folder.
    pub output: PathBuf,
    /// Write plots.
    pub plots: bool,
    /// Delete an earlier demo's files in `output` instead of refusing to start.
    pub overwrite: bool,
}

impl Default for DemoConfig {
    fn default() -> Self {
        DemoConfig {
            task: DemoTask::Cls,
            seeds: (0..5).collect(),
            epochs: 30,
            iters: 600,
            imbalance: 10.0,
            output: PathBuf::from("runs/demo"),
            plots: true,
            overwrite: false,
        }
    }
}

impl DemoConfig {
    /// The segmentation demo's defaults.
    pub fn segmentation() -> Self {
        DemoConfig {
            task: DemoTask::Seg,
            seeds: (0..2).collect(),
            iters: 800,
            imbalance: 20.0,
            output: PathBuf::from("runs/demo-seg"),
            ..DemoConfig::default()
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
    /// Training images (segmentation: pixels) per class.
    pub train_counts: Vec<u64>,
    /// Test images.
    pub test_images: usize,
    /// Class names.
    pub class_names: Vec<String>,
    /// Every run.
    pub runs: Vec<DemoRun>,
}

/// The trainer configuration of one demo run.
pub fn run_config(cfg: &DemoConfig, seed: u64, sar: bool) -> anyhow::Result<TrainConfig> {
    let arm = if sar { "sar" } else { "baseline" };
    let out = cfg.output.join(format!("seed{seed}-{arm}"));
    if cfg.task == DemoTask::Seg {
        let text = format!(
            r#"
[run]
name = "seed {seed} {arm}"
seed = {seed}
output = {out:?}
[data]
dataset = "mosaic"
imbalance = {imbalance:?}
split_seed = 2024
seg_crop = [64, 64]
ratio_range = [0.75, 1.5]
flip = false
[model]
backbone = "resnet18-v1c"
head = "fcn"
aux = true
width = 16
[optim]
lr = 0.1
momentum = 0.9
weight_decay = 5e-4
schedule = "poly"
power = 0.9
min_lr = 1e-4
[sar]
enabled = {sar}
[train]
iters = {iters}
batch_size = 8
log_every = 20
keep_checkpoints = 1
plots = {plots}
"#,
            imbalance = cfg.imbalance,
            iters = cfg.iters,
            plots = cfg.plots,
            out = out.display().to_string(),
        );
        return parse(&text, &[]);
    }
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
    let _lock = prepare_output(cfg)?;
    let mut runs = Vec::new();
    let mut test_images = 0;
    let mut class_names = Vec::new();
    for &seed in &cfg.seeds {
        for sar in [false, true] {
            let rc = run_config(cfg, seed, sar)?;
            if test_images == 0 {
                (test_images, class_names) = match cfg.task {
                    DemoTask::Cls => (
                        crate::cls::load_data(&rc)?.test.len(),
                        (0..10).map(|d| format!("digit {d}")).collect(),
                    ),
                    DemoTask::Seg => {
                        let d = crate::seg::load_seg_data(&rc)?;
                        (d.test.len(), d.test.class_names.clone())
                    }
                };
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
        class_names,
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

/// Files the demo writes at the top of its output folder, beside its run folders.
const DEMO_FILES: &[&str] = &[
    "report.json",
    "per_class_baseline_vs_sar.png",
    "loss_baseline_vs_sar.png",
];

/// Whether `name` is one of the demo's run folders (`seed<N>-baseline`, `seed<N>-sar`).
fn is_demo_run(name: &str) -> bool {
    name.strip_prefix("seed")
        .and_then(|r| {
            r.strip_suffix("-baseline")
                .or_else(|| r.strip_suffix("-sar"))
        })
        .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

/// Locks the output folder for the demo's whole run. An earlier demo there (its files or a run
/// folder holding a run) is refused, or with `overwrite` deleted (said on stderr), so that the
/// folder never mixes two demos.
fn prepare_output(cfg: &DemoConfig) -> anyhow::Result<RunFolder> {
    let lock = RunFolder::lock(&cfg.output)?;
    let mut found: Vec<String> = DEMO_FILES
        .iter()
        .filter(|f| cfg.output.join(f).exists())
        .map(|f| f.to_string())
        .collect();
    let mut runs = Vec::new();
    for entry in std::fs::read_dir(&cfg.output)
        .with_context(|| format!("cannot read {}", cfg.output.display()))?
    {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().to_string();
        if is_demo_run(&name) && entry.path().is_dir() {
            let run = RunFolder::lock(&entry.path())?;
            if !run.existing_run()?.is_empty() {
                found.push(format!("{name}/"));
                runs.push(run);
            }
        }
    }
    if found.is_empty() {
        return Ok(lock);
    }
    found.sort();
    anyhow::ensure!(
        cfg.overwrite,
        "{} already holds a demo ({}); pass `--overwrite` to delete it and run again, or \
         choose another `--output`",
        cfg.output.display(),
        found.join(", ")
    );
    for f in DEMO_FILES {
        let p = cfg.output.join(f);
        if p.exists() {
            std::fs::remove_file(&p).with_context(|| format!("cannot remove {}", p.display()))?;
        }
    }
    for run in &runs {
        run.clear()?;
    }
    eprintln!(
        "--overwrite: removed the previous demo from {}: {}",
        cfg.output.display(),
        found.join(", ")
    );
    Ok(lock)
}

/// Per-class test accuracy (classification) or IoU (segmentation) of a run.
fn per_class(r: &RunReport) -> Vec<f64> {
    match &r.eval {
        TaskEvaluation::Classification(e) => e.per_class_accuracy.clone(),
        TaskEvaluation::Segmentation(e) => e.per_class_iou.clone(),
    }
}

/// Mean over the runs of an arm, per class, NaNs (classes absent from a test set) left out.
fn mean_per_class(report: &DemoReport, sar: bool) -> Vec<f64> {
    let runs: Vec<Vec<f64>> = report
        .runs
        .iter()
        .filter(|r| r.report.sar == sar)
        .map(|r| per_class(&r.report))
        .collect();
    (0..report.train_counts.len())
        .map(|k| sar_math::metrics::nan_mean(&runs.iter().map(|v| v[k]).collect::<Vec<_>>()))
        .collect()
}

fn comparison_plots(report: &DemoReport, out: &Path) -> anyhow::Result<()> {
    let pct = |v: Vec<f64>| v.into_iter().map(|x| 100.0 * x).collect::<Vec<_>>();
    let labels = crate::plots::class_labels(&report.train_counts);
    let (what, unit) = match report.config.task {
        DemoTask::Cls => ("long-tailed digits: test accuracy per class", "accuracy %"),
        DemoTask::Seg => ("glyph mosaic: test IoU per class", "IoU %"),
    };
    crate::plots::grouped_bars(
        &out.join("per_class_baseline_vs_sar.png"),
        &format!("{what}, mean of {} seeds", report.config.seeds.len()),
        unit,
        &labels,
        &[
            ("baseline".to_string(), pct(mean_per_class(report, false))),
            ("SAR".to_string(), pct(mean_per_class(report, true))),
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
    let mut out = headline(report);
    out += &metric_table(report);
    out += &gate_line(report);
    if report.config.task == DemoTask::Seg {
        out += &per_class_iou_table(report);
        out += "A small synthetic set and a short schedule: a smoke test of SAR for segmentation, not evidence for it.\n";
    } else {
        out += "The digits are a smoke test of SAR: its measurable effect needs a larger long-tailed set (e.g. CIFAR-100-LT).\n";
    }
    out
}

/// The reports of one arm.
fn arm(report: &DemoReport, sar: bool) -> impl Iterator<Item = &RunReport> {
    report
        .runs
        .iter()
        .filter(move |r| r.report.sar == sar)
        .map(|r| &r.report)
}

/// The four metrics of the task's table.
fn metrics(task: DemoTask) -> [Metric; 4] {
    fn cls(r: &RunReport) -> Option<&crate::evaluation::Evaluation> {
        r.eval.classification().ok()
    }
    fn seg(r: &RunReport) -> Option<&crate::seg::SegEvaluation> {
        r.eval.segmentation().ok()
    }
    match task {
        DemoTask::Cls => [
            ("top-1", |r| cls(r).map_or(f64::NAN, |e| e.top1)),
            ("head 0-2", |r| cls(r).map_or(f64::NAN, |e| e.head)),
            ("medium 3-6", |r| cls(r).map_or(f64::NAN, |e| e.medium)),
            ("tail 7-9", |r| cls(r).map_or(f64::NAN, |e| e.tail)),
        ],
        DemoTask::Seg => [
            ("mIoU", |r| seg(r).map_or(f64::NAN, |e| e.miou)),
            ("mHead", |r| seg(r).map_or(f64::NAN, |e| e.mhead)),
            ("mBody", |r| seg(r).map_or(f64::NAN, |e| e.mbody)),
            ("mTail", |r| seg(r).map_or(f64::NAN, |e| e.mtail)),
        ],
    }
}

/// What was trained on what.
fn headline(report: &DemoReport) -> String {
    let (c, n) = (&report.config, report.config.seeds.len());
    match c.task {
        DemoTask::Cls => format!(
            "SAR demo: long-tailed digits (imbalance {}, {} training images {:?}, {} balanced test images), small CNN, {} epochs, {} seeds\n\n",
            c.imbalance,
            report.train_counts.iter().sum::<u64>(),
            report.train_counts,
            report.test_images,
            c.epochs,
            n
        ),
        DemoTask::Seg => format!(
            "SAR demo: long-tailed glyph mosaic (digit 0 {}× as common as digit 9; training pixels per class {:?}; {} test canvases), FCN on dilated ResNet-18 (width 16) + auxiliary head, {} iterations, {} seeds\n\n",
            c.imbalance,
            report.train_counts,
            report.test_images,
            c.iters,
            n
        ),
    }
}

/// Mean ± standard deviation of each arm, the paired differences and their verdicts.
fn metric_table(report: &DemoReport) -> String {
    let n = report.config.seeds.len();
    let metrics = metrics(report.config.task);
    let col = |sar: bool, f: fn(&RunReport) -> f64| arm(report, sar).map(f).collect::<Vec<_>>();
    let mut out = format!(
        "{:<16}",
        match report.config.task {
            DemoTask::Cls => "test accuracy %",
            DemoTask::Seg => "test IoU %",
        }
    );
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
        verdicts.push(if n < 2 || m.abs() <= 2.0 * stderr {
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
    out
}

/// When SAR's gate passed and how large its terms ended.
fn gate_line(report: &DemoReport) -> String {
    let sar_runs: Vec<&RunReport> = arm(report, true).collect();
    let firsts: Vec<f64> = sar_runs
        .iter()
        .filter_map(|r| r.gate_first_pass.map(|s| s as f64))
        .collect();
    let mean_of =
        |f: fn(&RunReport) -> f64| mean_sd(&sar_runs.iter().map(|r| f(r)).collect::<Vec<_>>()).0;
    format!(
        "\nSAR's gate passed in {} of {} runs, first at step {:.1} on average, then on {:.1}% of steps; last-epoch L_aux {:.4}, L_p2a {:.4} (mean)\n",
        firsts.len(),
        sar_runs.len(),
        mean_sd(&firsts).0,
        100.0 * mean_of(|r| r.gate_pass_rate),
        mean_of(|r| r.loss.aux),
        mean_of(|r| r.loss.p2a),
    )
}

/// Segmentation: IoU per class of both arms (mean over seeds).
fn per_class_iou_table(report: &DemoReport) -> String {
    let mut out = "\nIoU % per class (mean over seeds; training pixels in brackets):\n".to_string();
    out += &format!(
        "{:<22}{:>12}{:>12}{:>12}\n",
        "class", "baseline", "SAR", "difference"
    );
    let (b, s) = (mean_per_class(report, false), mean_per_class(report, true));
    for (k, name) in report.class_names.iter().enumerate() {
        out += &format!(
            "{:<22}{:>12.1}{:>12.1}{:>+12.1}\n",
            format!(
                "{name} ({})",
                report.train_counts.get(k).copied().unwrap_or(0)
            ),
            100.0 * b[k],
            100.0 * s[k],
            100.0 * (s[k] - b[k])
        );
    }
    out
}
