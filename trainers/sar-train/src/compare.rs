//! `sar compare`: several arms (config variants) × seeds through the same trainer, and a table.
//!
//! An arm is `NAME[:key=value,key=value…]`: the base config with those `--set` overrides (the
//! values are TOML, as for `sar train --set`); `{seed}` in an override (an arm's or a common
//! one) becomes the run's seed, so that a second stage can start from its own seed's first
//! stage: `'mislas:stage.init_from="runs/s1/sar/seed-{seed}"'`. Every arm of one seed starts from the same
//! initial weights and sees the same batches, since both follow `run.seed` alone. Run folders
//! are `OUTPUT/NAME/seed-S`; a folder that already holds `report.json` is read, not retrained,
//! and one with checkpoints is resumed, so an interrupted comparison continues where it stopped.
//! Either only if the folder's `config.toml` is the arm's config (for an interrupted run,
//! `train.max_steps` aside): a run of another config is refused, naming the keys that differ,
//! so a changed `--set` never tables stale results; `overwrite` deletes and retrains instead.
//! The output folder is locked while the comparison runs. A report's `null` (JSON's NaN: a
//! class absent from a segmentation test set's truth and prediction) reads as NaN, and the
//! per-class means leave NaNs out.
//!
//! The table: per arm the mean ± sample standard deviation over seeds of the headline metric,
//! the three frequency groups (classification: top-1 / head / medium / tail accuracy;
//! segmentation: mIoU / mHead / mBody / mTail IoU) and the expected calibration error (15
//! bins; smaller is better, which its verdict follows), in percent. Every arm after the first is
//! then compared with the first **paired by seed**: d_s = arm_s − first_s, mean d̄ ± SE with
//! SE = sd(d)/√n, and the verdict "better" if d̄ > 2·SE, "worse" if d̄ < −2·SE, else "within
//! noise" (with one seed there is no SE: "one seed"), with the number of seeds where the arm
//! was higher. Written as `compare.json`, `compare.md` and `compare-per-class.png` (per-class
//! accuracy or IoU of every arm, mean over seeds) beside the run folders.

use crate::config::{load, parse, TrainConfig};
use crate::run::folder::RunFolder;
use crate::train::{train, TrainOptions};
use anyhow::{bail, ensure, Context};
use serde::Serialize;
use std::path::{Path, PathBuf};

/// One arm: a name and its config overrides.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Arm {
    /// The folder and table name.
    pub name: String,
    /// `section.key=value` overrides applied after the base and the common `--set`s.
    pub overrides: Vec<String>,
}

impl Arm {
    /// Parses `NAME[:key=value,key=value…]`. A comma splits only before `key=`, so TOML arrays
    /// (`data.seg_crop=[64,64]`) stay whole.
    pub fn parse(spec: &str) -> anyhow::Result<Arm> {
        let (name, rest) = match spec.split_once(':') {
            Some((n, r)) => (n, Some(r)),
            None => (spec, None),
        };
        ensure!(
            !name.is_empty()
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.+".contains(c)),
            "arm {spec:?}: the name must be letters, digits, '-', '_', '.' or '+' (it names a folder)"
        );
        let mut overrides: Vec<String> = Vec::new();
        for piece in rest.unwrap_or("").split(',').filter(|p| !p.is_empty()) {
            let starts_key = piece.split_once('=').is_some_and(|(k, _)| {
                !k.is_empty()
                    && k.chars()
                        .all(|c| c.is_ascii_alphanumeric() || "._".contains(c))
            });
            match overrides.last_mut() {
                Some(last) if !starts_key => {
                    last.push(',');
                    last.push_str(piece);
                }
                _ if !starts_key => bail!("arm {spec:?}: {piece:?} is not key=value"),
                _ => overrides.push(piece.to_string()),
            }
        }
        Ok(Arm {
            name: name.to_string(),
            overrides,
        })
    }
}

/// The config every arm starts from.
#[derive(Debug, Clone)]
pub enum BaseConfig {
    /// A TOML file (`sar compare --config`).
    File(PathBuf),
    /// TOML text held by the caller (the demo's presets), with a label for the table.
    Text {
        /// How the table names it.
        label: String,
        /// The TOML.
        toml: String,
    },
}

impl BaseConfig {
    fn label(&self) -> String {
        match self {
            BaseConfig::File(p) => p.display().to_string(),
            BaseConfig::Text { label, .. } => label.clone(),
        }
    }

    fn with(&self, overrides: &[String]) -> anyhow::Result<TrainConfig> {
        match self {
            BaseConfig::File(p) => load(p, overrides),
            BaseConfig::Text { label, toml } => {
                parse(toml, overrides).with_context(|| format!("config {label}"))
            }
        }
    }
}

/// What `sar compare` runs.
#[derive(Debug, Clone)]
pub struct CompareSpec {
    /// The base config.
    pub config: BaseConfig,
    /// The arms, the first being the reference of the paired differences.
    pub arms: Vec<Arm>,
    /// `run.seed` of each repetition.
    pub seeds: Vec<u64>,
    /// Overrides for every arm (before the arm's own).
    pub common: Vec<String>,
    /// Where the run folders and the table go.
    pub output: PathBuf,
    /// Progress bars.
    pub verbose: bool,
    /// Delete every arm's earlier run and train it again, instead of reading or resuming it.
    pub overwrite: bool,
}

/// One metric of one arm over the seeds.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    /// Per seed, in percent.
    pub values: Vec<f64>,
    /// Mean.
    pub mean: f64,
    /// Sample standard deviation (0 for one seed).
    pub std: f64,
}

/// One metric of an arm against the first arm, paired by seed.
#[derive(Debug, Clone, Serialize)]
pub struct Paired {
    /// Mean of the per-seed differences (arm − first), percentage points.
    pub mean: f64,
    /// Standard error of that mean (0 for one seed).
    pub se: f64,
    /// Seeds on which the arm was higher.
    pub up: usize,
    /// Seeds.
    pub n: usize,
    /// "better", "worse", "within noise" (2 SE), or "one seed".
    pub verdict: String,
}

/// An arm's rows of the table.
#[derive(Debug, Clone, Serialize)]
pub struct ArmResult {
    /// The arm.
    pub arm: Arm,
    /// The run folders, by seed.
    pub runs: Vec<PathBuf>,
    /// Per metric (in [`Comparison::metrics`] order).
    pub metrics: Vec<Summary>,
    /// Against the first arm (absent for the first).
    pub paired: Option<Vec<Paired>>,
    /// Per-class accuracy (or IoU) in percent, mean over the seeds where it is defined (NaN,
    /// written `null`, where it is defined on none: a class absent from truth and prediction).
    pub per_class: Vec<f64>,
    /// Training wall time summed over seeds, seconds.
    pub wall_seconds: f64,
}

/// `compare.json`.
#[derive(Debug, Clone, Serialize)]
pub struct Comparison {
    /// The base config.
    pub config: String,
    /// The common overrides.
    pub common: Vec<String>,
    /// The seeds.
    pub seeds: Vec<u64>,
    /// Metric names.
    pub metrics: Vec<String>,
    /// Training images (segmentation: labelled pixels) per class, from the first run.
    pub train_counts: Vec<u64>,
    /// One per arm.
    pub arms: Vec<ArmResult>,
}

/// One run of a comparison, trained now or read: what the `on_run` callback is told.
#[derive(Debug, Clone)]
pub struct RunDone {
    /// The arm's name.
    pub arm: String,
    /// `run.seed`.
    pub seed: u64,
    /// Position among all runs, from 1.
    pub index: usize,
    /// Number of runs.
    pub total: usize,
    /// Trained (or resumed) now; false when an earlier report was read.
    pub trained: bool,
    /// The headline metric and the three groups, in percent, by name.
    pub metrics: Vec<(String, f64)>,
    /// Training wall time of the run, seconds.
    pub wall_seconds: f64,
    /// The run folder.
    pub dir: PathBuf,
}

impl RunDone {
    /// A one-line account: `[3/6] sar seed 1: top1 71.23  head … (12.3 s)`.
    pub fn line(&self) -> String {
        let m: Vec<String> = self
            .metrics
            .iter()
            .map(|(k, v)| format!("{k} {v:.2}"))
            .collect();
        format!(
            "[{}/{}] {} seed {}: {}  ({})",
            self.index,
            self.total,
            self.arm,
            self.seed,
            m.join("  "),
            if self.trained {
                format!("{:.1} s", self.wall_seconds)
            } else {
                format!("read from {}", self.dir.join("report.json").display())
            }
        )
    }
}

/// A number of a report; `null` (how JSON writes NaN) reads as NaN.
fn number(v: &serde_json::Value) -> Option<f64> {
    v.as_f64().or(v.is_null().then_some(f64::NAN))
}

/// The metrics of one `report.json`: headline and groups, in percent, and per class.
fn metrics_of(
    report: &serde_json::Value,
) -> anyhow::Result<(Vec<&'static str>, Vec<f64>, Vec<f64>)> {
    let num = |k: &str| -> anyhow::Result<f64> {
        report
            .get(k)
            .and_then(number)
            .map(|v| 100.0 * v)
            .with_context(|| format!("report.json lacks `{k}`"))
    };
    let list = |k: &str| -> anyhow::Result<Vec<f64>> {
        report[k]
            .as_array()
            .with_context(|| format!("report.json lacks `{k}`"))?
            .iter()
            .map(|v| {
                number(v)
                    .map(|x| 100.0 * x)
                    .with_context(|| format!("`{k}` holds a non-number: {v}"))
            })
            .collect()
    };
    let (mut names, per_class) = if report.get("top1").is_some() {
        (vec!["top1", "head", "medium", "tail"], "per_class_accuracy")
    } else {
        (vec!["miou", "mhead", "mbody", "mtail"], "per_class_iou")
    };
    let mut v = names
        .iter()
        .map(|k| num(k))
        .collect::<anyhow::Result<Vec<_>>>()?;
    // Calibration, where the report has it (reports before ECE existed lack it).
    if let Some(ece) = report.get("calibration").and_then(|c| c.get("ece")) {
        names.push("ece");
        v.push(100.0 * number(ece).context("`calibration.ece` is not a number")?);
    }
    Ok((names, v, list(per_class)?))
}

fn summary(values: Vec<f64>) -> Summary {
    let n = values.len() as f64;
    let mean = values.iter().sum::<f64>() / n;
    let std = if values.len() > 1 {
        (values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0)).sqrt()
    } else {
        0.0
    };
    Summary { values, mean, std }
}

/// Whether a larger value of metric `name` is better (ECE is an error: smaller is).
pub fn higher_is_better(name: &str) -> bool {
    name != "ece"
}

/// The paired comparison of `arm` against `first` (same seeds, same order) for a metric where
/// larger is better; see [`paired_metric`].
pub fn paired(arm: &[f64], first: &[f64]) -> Paired {
    paired_metric(arm, first, true)
}

/// The paired comparison of `arm` against `first`: the verdict says "better" when the mean
/// difference is beyond 2 SE in the good direction (`higher_is_better`), "worse" in the other.
/// `up` counts the seeds where the arm is higher, whichever is better.
pub fn paired_metric(arm: &[f64], first: &[f64], higher_is_better: bool) -> Paired {
    let d: Vec<f64> = arm.iter().zip(first).map(|(a, b)| a - b).collect();
    let s = summary(d.clone());
    let n = d.len();
    let se = s.std / (n as f64).sqrt();
    let (up, down) = if higher_is_better {
        ("better", "worse")
    } else {
        ("worse", "better")
    };
    let verdict = if n < 2 {
        "one seed"
    } else if s.mean > 2.0 * se {
        up
    } else if s.mean < -2.0 * se {
        down
    } else {
        "within noise"
    };
    Paired {
        mean: s.mean,
        se,
        up: d.iter().filter(|&&x| x > 0.0).count(),
        n,
        verdict: verdict.to_string(),
    }
}

/// The run folder of an arm and seed.
fn run_dir(spec: &CompareSpec, arm: &Arm, seed: u64) -> PathBuf {
    spec.output.join(&arm.name).join(format!("seed-{seed}"))
}

/// The config of one arm and seed.
pub fn arm_config(spec: &CompareSpec, arm: &Arm, seed: u64) -> anyhow::Result<TrainConfig> {
    let mut o: Vec<String> = spec
        .common
        .iter()
        .chain(&arm.overrides)
        .map(|v| v.replace("{seed}", &seed.to_string()))
        .collect();
    o.push(format!("run.seed={seed}"));
    o.push(format!(
        "run.name={}",
        serde_json::to_string(&format!("{}-seed{seed}", arm.name))?
    ));
    o.push(format!(
        "run.output={}",
        serde_json::to_string(&run_dir(spec, arm, seed).display().to_string())?
    ));
    spec.config
        .with(&o)
        .with_context(|| format!("arm {}", arm.name))
}

/// A config as `section.key` → value, for naming what two configs differ in.
fn flat(cfg: &TrainConfig) -> std::collections::BTreeMap<String, String> {
    fn walk(prefix: &str, v: &toml::Value, out: &mut std::collections::BTreeMap<String, String>) {
        match v {
            toml::Value::Table(t) => {
                for (k, v) in t {
                    let key = if prefix.is_empty() {
                        k.clone()
                    } else {
                        format!("{prefix}.{k}")
                    };
                    walk(&key, v, out);
                }
            }
            other => {
                out.insert(prefix.to_string(), other.to_string());
            }
        }
    }
    let mut out = std::collections::BTreeMap::new();
    if let Ok(v) = toml::Value::try_from(cfg) {
        walk("", &v, &mut out);
    }
    out
}

/// The keys in which `old` (a run folder's) and `new` (this comparison's) differ, as
/// `key = old (in the folder) / new (here)`.
fn differences(old: &TrainConfig, new: &TrainConfig) -> String {
    let (a, b) = (flat(old), flat(new));
    let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
    keys.sort_unstable();
    keys.dedup();
    let unset = "(unset)".to_string();
    let d: Vec<String> = keys
        .into_iter()
        .filter(|k| a.get(*k) != b.get(*k))
        .map(|k| {
            format!(
                "{k} = {} in the folder, {} here",
                a.get(k).unwrap_or(&unset),
                b.get(k).unwrap_or(&unset)
            )
        })
        .collect();
    if d.is_empty() {
        "no key differs in its TOML form".into()
    } else {
        d.join("; ")
    }
}

/// What an arm's run folder holds when the comparison reaches it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Found {
    /// Nothing to keep: train from the start.
    Nothing,
    /// A finished run of this very config: read its report.
    Finished,
    /// Checkpoints of this config without a report: resume.
    Interrupted,
}

/// Looks at an arm's run folder. A run of another config there is refused (its results would
/// be tabled as this arm's), unless `overwrite`, which deletes it.
fn inspect(dir: &Path, cfg: &TrainConfig, overwrite: bool) -> anyhow::Result<Found> {
    if overwrite {
        if dir.exists() {
            let folder = RunFolder::lock(dir)?;
            let removed = folder.clear()?;
            if !removed.is_empty() {
                eprintln!(
                    "--overwrite: removed the previous run's files from {}: {}",
                    dir.display(),
                    removed.join(", ")
                );
            }
        }
        return Ok(Found::Nothing);
    }
    let has_report = dir.join("report.json").exists();
    let has_checkpoint = crate::checkpoint::latest(&dir.join("checkpoints"))
        .ok()
        .flatten()
        .is_some();
    if !has_report && !has_checkpoint {
        return Ok(Found::Nothing);
    }
    let stored = dir.join("config.toml");
    let old = load(&stored, &[]).with_context(|| {
        format!(
            "{} holds a run but its config.toml cannot be read: pass --overwrite to train this \
             arm again, or choose another --output",
            dir.display()
        )
    })?;
    let found = if has_report {
        Found::Finished
    } else {
        Found::Interrupted
    };
    let mut comparable = old.clone();
    if found == Found::Interrupted {
        // An interrupted run may have been stopped on purpose with `train.max_steps`; where it
        // stopped is not part of what it trains.
        comparable.train.max_steps = cfg.train.max_steps;
    }
    ensure!(
        comparable == *cfg,
        "{} holds a {} run of another config than this arm's ({}): pass --overwrite to train \
         it again, or choose another --output",
        dir.display(),
        if has_report { "finished" } else { "partial" },
        differences(&comparable, cfg)
    );
    Ok(found)
}

/// Trains (or reads) every arm × seed and builds the table; writes `compare.json`,
/// `compare.md` and `compare-per-class.png` into the output folder, which it locks for the
/// duration. `on_run` is told of each run as it is done.
pub fn compare(spec: &CompareSpec, on_run: &mut dyn FnMut(&RunDone)) -> anyhow::Result<Comparison> {
    let _lock = RunFolder::lock(&spec.output)?;
    compare_locked(spec, on_run)
}

/// [`compare`] for a caller that holds the output folder's lock.
pub(crate) fn compare_locked(
    spec: &CompareSpec,
    on_run: &mut dyn FnMut(&RunDone),
) -> anyhow::Result<Comparison> {
    ensure!(
        !spec.arms.is_empty(),
        "sar compare needs at least one --arm"
    );
    ensure!(
        !spec.seeds.is_empty(),
        "sar compare needs at least one seed"
    );
    let mut names: Vec<&str> = spec.arms.iter().map(|a| a.name.as_str()).collect();
    names.sort_unstable();
    names.dedup();
    ensure!(
        names.len() == spec.arms.len(),
        "two arms have the same name"
    );
    let mut seeds = spec.seeds.clone();
    seeds.sort_unstable();
    seeds.dedup();
    ensure!(seeds.len() == spec.seeds.len(), "a seed is given twice");
    // Every config and every folder first, so that a typo or a stale folder fails before
    // hours of training.
    let mut plan = Vec::new();
    for arm in &spec.arms {
        for &seed in &spec.seeds {
            let cfg = arm_config(spec, arm, seed)?;
            let dir = run_dir(spec, arm, seed);
            if !spec.overwrite {
                inspect(&dir, &cfg, false)?;
            }
            plan.push((arm, seed, cfg, dir));
        }
    }
    let total = plan.len();
    let mut metric_names = Vec::new();
    let mut train_counts: Vec<u64> = Vec::new();
    let mut arms: Vec<ArmResult> = Vec::new();
    let mut index = 0;
    for arm in &spec.arms {
        let (mut per_seed, mut per_class, mut runs, mut wall) =
            (Vec::new(), Vec::new(), Vec::new(), 0.0);
        for (_, seed, cfg, dir) in plan.iter().filter(|p| p.0.name == arm.name) {
            let seed = *seed;
            let report_path = dir.join("report.json");
            let found = inspect(dir, cfg, spec.overwrite)?;
            if found != Found::Finished {
                let opts = TrainOptions {
                    overwrite: found == Found::Nothing,
                    resume: (found == Found::Interrupted).then(|| dir.clone()),
                    progress: spec.verbose,
                    ..TrainOptions::default()
                };
                train(cfg, &opts).with_context(|| format!("arm {} seed {seed}", arm.name))?;
            }
            let text = std::fs::read_to_string(&report_path)
                .with_context(|| format!("reading {}", report_path.display()))?;
            let report: serde_json::Value = serde_json::from_str(&text)
                .with_context(|| format!("parsing {}", report_path.display()))?;
            let (names, values, classes) = metrics_of(&report)
                .with_context(|| format!("reading {}", report_path.display()))?;
            if metric_names.is_empty() {
                metric_names = names.iter().map(|s| s.to_string()).collect();
            }
            ensure!(
                metric_names == names,
                "{}: a {} report among {} reports",
                report_path.display(),
                names[0],
                metric_names[0]
            );
            let run_wall = report["wall_seconds"].as_f64().unwrap_or(0.0);
            wall += run_wall;
            if train_counts.is_empty() {
                train_counts = report["train_counts"]
                    .as_array()
                    .map(|v| v.iter().filter_map(|x| x.as_u64()).collect())
                    .unwrap_or_default();
            }
            index += 1;
            on_run(&RunDone {
                arm: arm.name.clone(),
                seed,
                index,
                total,
                trained: found != Found::Finished,
                metrics: names
                    .iter()
                    .map(|s| s.to_string())
                    .zip(values.iter().copied())
                    .collect(),
                wall_seconds: run_wall,
                dir: dir.clone(),
            });
            per_seed.push(values);
            per_class.push(classes);
            runs.push(dir.clone());
        }
        let k = metric_names.len();
        let metrics = (0..k)
            .map(|m| summary(per_seed.iter().map(|v| v[m]).collect()))
            .collect();
        let classes = per_class[0].len();
        ensure!(
            per_class.iter().all(|c| c.len() == classes),
            "arm {}: class counts differ",
            arm.name
        );
        let per_class = (0..classes)
            .map(|c| {
                sar_math::metrics::nan_mean(&per_class.iter().map(|v| v[c]).collect::<Vec<_>>())
            })
            .collect();
        arms.push(ArmResult {
            arm: arm.clone(),
            runs,
            metrics,
            paired: None,
            per_class,
            wall_seconds: wall,
        });
    }
    let first: Vec<Vec<f64>> = arms[0].metrics.iter().map(|m| m.values.clone()).collect();
    for a in arms.iter_mut().skip(1) {
        a.paired = Some(
            a.metrics
                .iter()
                .zip(&first)
                .zip(&metric_names)
                .map(|((m, f), name)| paired_metric(&m.values, f, higher_is_better(name)))
                .collect(),
        );
    }
    let out = Comparison {
        config: spec.config.label(),
        common: spec.common.clone(),
        seeds: spec.seeds.clone(),
        metrics: metric_names,
        train_counts,
        arms,
    };
    crate::tensorio::write_atomic(
        &spec.output.join("compare.json"),
        serde_json::to_string_pretty(&out)?.as_bytes(),
    )?;
    crate::tensorio::write_atomic(&spec.output.join("compare.md"), markdown(&out).as_bytes())?;
    let series: Vec<(String, Vec<f64>)> = out
        .arms
        .iter()
        .map(|a| (a.arm.name.clone(), a.per_class.clone()))
        .collect();
    let (what, unit) = if out.metrics[0] == "top1" {
        ("test accuracy", "accuracy (%)")
    } else {
        ("test IoU", "IoU (%)")
    };
    crate::plots::grouped_bars(
        &spec.output.join("compare-per-class.png"),
        &format!(
            "{}: {what} per class, mean of {} seeds",
            out.config,
            out.seeds.len()
        ),
        unit,
        &crate::plots::class_labels(&out.train_counts),
        &series,
    )?;
    Ok(out)
}

/// The table as Markdown: mean ± std per arm, then the paired differences against the first.
pub fn markdown(c: &Comparison) -> String {
    let mut s = format!(
        "Base config `{}`{}; seeds {:?}. Percent; mean ± sample std over seeds.\n\n",
        c.config,
        if c.common.is_empty() {
            String::new()
        } else {
            format!(", with `{}`", c.common.join("`, `"))
        },
        c.seeds
    );
    s.push_str("| arm | overrides |");
    for m in &c.metrics {
        s.push_str(&format!(" {m} |"));
    }
    s.push_str(" train s |\n|---|---|");
    s.push_str(&"---|".repeat(c.metrics.len() + 1));
    s.push('\n');
    for a in &c.arms {
        let o = if a.arm.overrides.is_empty() {
            "(base)".to_string()
        } else {
            format!("`{}`", a.arm.overrides.join("`, `"))
        };
        s.push_str(&format!("| {} | {o} |", a.arm.name));
        for m in &a.metrics {
            s.push_str(&format!(" {:.2} ± {:.2} |", m.mean, m.std));
        }
        s.push_str(&format!(" {:.0} |\n", a.wall_seconds));
    }
    if c.arms.len() > 1 {
        s.push_str(&format!(
            "\nAgainst `{}`, paired by seed: mean difference ± standard error (points), seeds up / seeds, verdict at 2 SE.\n\n| arm |",
            c.arms[0].arm.name
        ));
        for m in &c.metrics {
            s.push_str(&format!(" Δ {m} |"));
        }
        s.push_str("\n|---|");
        s.push_str(&"---|".repeat(c.metrics.len()));
        s.push('\n');
        for a in c.arms.iter().skip(1) {
            s.push_str(&format!("| {} |", a.arm.name));
            for p in a.paired.iter().flatten() {
                s.push_str(&format!(
                    " {:+.2} ± {:.2} ({}/{}, {}) |",
                    p.mean, p.se, p.up, p.n, p.verdict
                ));
            }
            s.push('\n');
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arms_parse_with_arrays_and_reject_junk() {
        let a = Arm::parse("cr-om:sar.kind=\"cr\",sar.anchors=\"orthogonal\"").unwrap();
        assert_eq!(a.name, "cr-om");
        assert_eq!(
            a.overrides,
            ["sar.kind=\"cr\"", "sar.anchors=\"orthogonal\""]
        );
        let a = Arm::parse("crop:data.seg_crop=[64,64],train.epochs=2").unwrap();
        assert_eq!(a.overrides, ["data.seg_crop=[64,64]", "train.epochs=2"]);
        assert_eq!(Arm::parse("sar").unwrap().overrides, Vec::<String>::new());
        assert!(Arm::parse("a/b").is_err());
        assert!(Arm::parse(":x=1").is_err());
        assert!(Arm::parse("a:junk").is_err());
    }

    #[test]
    fn a_null_in_a_report_reads_as_nan_and_per_class_means_leave_it_out() {
        let r: serde_json::Value = serde_json::from_str(
            r#"{"miou": 0.5, "mhead": 0.75, "mbody": 0.5, "mtail": 0.25, "per_class_iou": [0.5, null, 1.0]}"#,
        )
        .unwrap();
        let (names, v, per_class) = metrics_of(&r).unwrap();
        assert_eq!(names, ["miou", "mhead", "mbody", "mtail"]);
        assert_eq!(v, [50.0, 75.0, 50.0, 25.0]);
        assert_eq!(per_class[0], 50.0);
        assert!(per_class[1].is_nan());
        let bad: serde_json::Value =
            serde_json::from_str(r#"{"top1": 0.5, "head": 0.5, "medium": 0.5, "tail": 0.5, "per_class_accuracy": ["x"]}"#)
                .unwrap();
        let err = metrics_of(&bad).unwrap_err().to_string();
        assert!(
            err.contains("per_class_accuracy") && err.contains("non-number"),
            "{err}"
        );
        assert!(metrics_of(&serde_json::json!({"top1": 0.5})).is_err());
    }

    #[test]
    fn differences_name_each_changed_key() {
        let a = parse(
            "[data]\ndataset = \"digits\"\n[model]\narch = \"small-cnn\"\n[train]\nepochs = 2\n",
            &[],
        )
        .unwrap();
        let b = parse(
            "[data]\ndataset = \"digits\"\n[model]\narch = \"small-cnn\"\n[train]\nepochs = 3\n[optim]\nlr = 0.5\n",
            &[],
        )
        .unwrap();
        let d = differences(&a, &b);
        assert!(
            d.contains("train.epochs = 2 in the folder, 3 here") && d.contains("optim.lr = "),
            "{d}"
        );
        assert_eq!(differences(&a, &a), "no key differs in its TOML form");
    }

    #[test]
    fn paired_verdicts_by_hand() {
        // d = [1, 2, 3]: mean 2, sd 1, SE 1/√3 ≈ 0.577 → better, 3 of 3 up.
        let p = paired(&[11.0, 12.0, 13.0], &[10.0, 10.0, 10.0]);
        assert_eq!(
            (p.mean, p.up, p.n, p.verdict.as_str()),
            (2.0, 3, 3, "better")
        );
        assert!((p.se - 1.0 / 3f64.sqrt()).abs() < 1e-12);
        // d = [1, −1, 0.5]: mean 1/6, within noise.
        let p = paired(&[11.0, 9.0, 10.5], &[10.0, 10.0, 10.0]);
        assert_eq!(p.verdict, "within noise");
        assert_eq!(p.up, 2);
        let p = paired(&[8.0, 8.5, 8.2], &[10.0, 10.0, 10.0]);
        assert_eq!(p.verdict, "worse");
        assert_eq!(paired(&[1.0], &[0.0]).verdict, "one seed");
        // An error metric: lower is better, "up" still counts the higher seeds.
        let p = paired_metric(&[8.0, 8.5, 8.2], &[10.0, 10.0, 10.0], false);
        assert_eq!((p.verdict.as_str(), p.up), ("better", 0));
        assert!(!higher_is_better("ece") && higher_is_better("top1"));
    }
}
