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
//! The demo is a preset of `sar compare` ([`crate::compare`]): its base config (SAR on) with
//! the arms `baseline` (`sar.enabled=false`) and `sar`. So it behaves as a comparison does: a
//! second demo with the same settings into the same folder reads the finished runs and
//! resumes interrupted ones, one with other settings is refused (naming the keys that differ)
//! until `overwrite`.
//!
//! Outputs under `output`: `baseline/seed-S` and `sar/seed-S`, one run folder per arm and seed
//! (config, metrics log, checkpoints, plots); the comparison's `compare.json`, `compare.md`
//! and `compare-per-class.png` (per-class accuracy or IoU of both arms, mean over seeds);
//! `demo.toml`, the base config, so that `sar compare --config OUTPUT/demo.toml --arm
//! baseline:sar.enabled=false --arm sar --seeds …` reruns it; `report.json`, the demo's report
//! (settings, every run's report); and `loss_baseline_vs_sar.png` (first seed's training
//! cross-entropy of both arms).

use crate::compare::{Arm, BaseConfig, CompareSpec, Comparison, RunDone};
use crate::config::TrainConfig;
use crate::run::folder::RunFolder;
use crate::run::loss_series;
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
    /// Delete an earlier demo's runs in `output` and train them again.
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
    /// `baseline` or `sar`.
    pub arm: String,
    /// The run's `report.json`.
    #[serde(flatten)]
    pub report: serde_json::Value,
}

impl DemoRun {
    /// A number of the report (`null`, JSON's NaN, and a missing key read as NaN).
    pub fn number(&self, key: &str) -> f64 {
        self.report[key].as_f64().unwrap_or(f64::NAN)
    }

    /// Whether SAR was on.
    pub fn sar(&self) -> bool {
        self.report["sar"].as_bool().unwrap_or(false)
    }
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
    /// The comparison of the two arms (`compare.json`).
    pub comparison: Comparison,
    /// Every run, by seed and then arm (baseline first).
    pub runs: Vec<DemoRun>,
}

/// The demo's arms: the reference first.
const ARMS: [&str; 2] = ["baseline:sar.enabled=false", "sar"];

/// The base config of the demo (SAR on; `sar compare` sets seed, name and output per run).
pub fn base_config(cfg: &DemoConfig) -> String {
    if cfg.task == DemoTask::Seg {
        return format!(
            r#"[run]
name = "demo-seg"
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
enabled = true
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
        );
    }
    format!(
        r#"[run]
name = "demo"
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
enabled = true
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
    )
}

/// The comparison the demo runs.
pub fn compare_spec(cfg: &DemoConfig) -> anyhow::Result<CompareSpec> {
    Ok(CompareSpec {
        config: BaseConfig::Text {
            label: "demo.toml".into(),
            toml: base_config(cfg),
        },
        arms: ARMS
            .iter()
            .map(|a| Arm::parse(a))
            .collect::<Result<_, _>>()?,
        seeds: cfg.seeds.clone(),
        common: Vec::new(),
        output: cfg.output.clone(),
        verbose: false,
        overwrite: cfg.overwrite,
    })
}

/// The trainer configuration of one demo run, exactly as the demo trains it.
pub fn run_config(cfg: &DemoConfig, seed: u64, sar: bool) -> anyhow::Result<TrainConfig> {
    let spec = compare_spec(cfg)?;
    crate::compare::arm_config(&spec, &spec.arms[usize::from(sar)], seed)
}

/// Runs every seed, baseline and SAR, through [`crate::compare`] and collects the report.
/// `progress` is told each run.
pub fn run_demo(
    cfg: &DemoConfig,
    progress: &mut dyn FnMut(&RunDone),
) -> anyhow::Result<DemoReport> {
    let spec = compare_spec(cfg)?;
    let _lock = RunFolder::lock(&cfg.output)?;
    let seed = *cfg
        .seeds
        .first()
        .context("the demo needs at least one seed")?;
    let first = crate::compare::arm_config(&spec, &spec.arms[1], seed)?;
    let (test_images, class_names) = match cfg.task {
        DemoTask::Cls => (
            crate::cls::load_data(&first)?.test.len(),
            (0..10).map(|d| format!("digit {d}")).collect(),
        ),
        DemoTask::Seg => {
            let d = crate::seg::load_seg_data(&first)?;
            (d.test.len(), d.test.class_names.clone())
        }
    };
    let comparison = crate::compare::compare_locked(&spec, progress)?;
    let base = comparison.arms.first().context("the demo has no arms")?;
    let mut runs = Vec::new();
    for (i, &seed) in cfg.seeds.iter().enumerate() {
        for arm in &comparison.arms {
            let path = arm.runs[i].join("report.json");
            let text = std::fs::read_to_string(&path)
                .with_context(|| format!("reading {}", path.display()))?;
            runs.push(DemoRun {
                seed,
                arm: arm.arm.name.clone(),
                report: serde_json::from_str(&text)
                    .with_context(|| format!("parsing {}", path.display()))?,
            });
        }
    }
    debug_assert_eq!(base.arm.name, "baseline");
    let report = DemoReport {
        config: cfg.clone(),
        train_counts: comparison.train_counts.clone(),
        test_images,
        class_names,
        comparison,
        runs,
    };
    crate::tensorio::write_atomic(&cfg.output.join("demo.toml"), base_config(cfg).as_bytes())?;
    crate::tensorio::write_atomic(
        &cfg.output.join("report.json"),
        serde_json::to_string_pretty(&report)?.as_bytes(),
    )?;
    if cfg.plots {
        loss_plot(&report, &cfg.output)?;
    }
    Ok(report)
}

/// The first seed's training cross-entropy of both arms.
fn loss_plot(report: &DemoReport, out: &Path) -> anyhow::Result<()> {
    let Some(&seed) = report.config.seeds.first() else {
        return Ok(());
    };
    let mut series = Vec::new();
    for arm in &report.comparison.arms {
        let log = arm.runs[0].join("metrics.jsonl");
        if let Some((_, s)) = loss_series(&log)?.into_iter().find(|s| s.0 == "ce") {
            series.push((format!("{}: cross-entropy", arm.arm.name), s));
        }
    }
    crate::plots::curves(
        &out.join("loss_baseline_vs_sar.png"),
        &format!("seed {seed}: training cross-entropy"),
        "step",
        "loss",
        &series,
    )
}

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

/// The column names of the task's four metrics.
fn metric_labels(task: DemoTask) -> [&'static str; 5] {
    match task {
        DemoTask::Cls => ["top-1", "head 0-2", "medium 3-6", "tail 7-9", "ECE"],
        DemoTask::Seg => ["mIoU", "mHead", "mBody", "mTail", "ECE"],
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

/// Mean ± standard deviation of each arm, the paired differences and their verdicts (ECE:
/// smaller is better).
fn metric_table(report: &DemoReport) -> String {
    let labels = metric_labels(report.config.task);
    let c = &report.comparison;
    let mut out = format!(
        "{:<16}",
        match report.config.task {
            DemoTask::Cls => "test accuracy %",
            DemoTask::Seg => "test IoU %",
        }
    );
    let labels = &labels[..c.metrics.len().min(labels.len())];
    for name in labels {
        out += &format!("{name:>18}");
    }
    out += "\n";
    for (label, arm) in ["baseline", "SAR"].iter().zip(&c.arms) {
        out += &format!("{label:<16}");
        for m in &arm.metrics {
            out += &format!("{:>18}", format!("{:.1} ± {:.1}", m.mean, m.std));
        }
        out += "\n";
    }
    let Some(paired) = c.arms.get(1).and_then(|a| a.paired.as_ref()) else {
        return out;
    };
    out += &format!("{:<16}", "SAR − baseline");
    let mut verdicts = Vec::new();
    for (name, p) in labels.iter().zip(paired) {
        out += &format!("{:>18}", format!("{:+.1} ± {:.1}", p.mean, p.se));
        let seeds = format!("{} of {} seeds up", p.up, p.n);
        verdicts.push(match p.verdict.as_str() {
            "better" | "worse" => {
                format!("{name}: {} beyond 2 standard errors ({seeds})", p.verdict)
            }
            "one seed" => format!("{name}: one seed, no noise estimate ({seeds})"),
            v => format!("{name}: {v} ({seeds})"),
        });
    }
    out += "\n(differences paired by seed, ± their standard error)\n\n";
    for v in verdicts {
        out += &format!("  {v}\n");
    }
    out
}

/// When SAR's gate passed and how large its terms ended.
fn gate_line(report: &DemoReport) -> String {
    let sar_runs: Vec<&DemoRun> = report.runs.iter().filter(|r| r.sar()).collect();
    let firsts: Vec<f64> = sar_runs
        .iter()
        .filter_map(|r| r.report["gate_first_pass"].as_f64())
        .collect();
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    let mean_of =
        |f: &dyn Fn(&DemoRun) -> f64| mean(&sar_runs.iter().map(|r| f(r)).collect::<Vec<_>>());
    let loss = |r: &DemoRun, k: &str| r.report["loss"][k].as_f64().unwrap_or(f64::NAN);
    format!(
        "\nSAR's gate passed in {} of {} runs, first at step {:.1} on average, then on {:.1}% of steps; last-epoch L_aux {:.4}, L_p2a {:.4} (mean)\n",
        firsts.len(),
        sar_runs.len(),
        mean(&firsts),
        100.0 * mean_of(&|r| r.number("gate_pass_rate")),
        mean_of(&|r| loss(r, "aux")),
        mean_of(&|r| loss(r, "p2a")),
    )
}

/// Segmentation: IoU per class of both arms (mean over seeds).
fn per_class_iou_table(report: &DemoReport) -> String {
    let mut out = "\nIoU % per class (mean over seeds; training pixels in brackets):\n".to_string();
    out += &format!(
        "{:<22}{:>12}{:>12}{:>12}\n",
        "class", "baseline", "SAR", "difference"
    );
    let [b, s] = [0, 1].map(|i| {
        report
            .comparison
            .arms
            .get(i)
            .map(|a| a.per_class.clone())
            .unwrap_or_default()
    });
    for (k, name) in report.class_names.iter().enumerate() {
        let (b, s) = (
            b.get(k).copied().unwrap_or(f64::NAN),
            s.get(k).copied().unwrap_or(f64::NAN),
        );
        out += &format!(
            "{:<22}{:>12.1}{:>12.1}{:>+12.1}\n",
            format!(
                "{name} ({})",
                report.train_counts.get(k).copied().unwrap_or(0)
            ),
            b,
            s,
            s - b
        );
    }
    out
}
