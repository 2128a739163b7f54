//! `sar compare`: several arms (config variants) × seeds through the same trainer, and a table.
//!
//! An arm is `NAME[:key=value,key=value…]`: the base config with those `--set` overrides (the
//! values are TOML, as for `sar train --set`). Every arm of one seed starts from the same
//! initial weights and sees the same batches, since both follow `run.seed` alone. Run folders
//! are `OUTPUT/NAME/seed-S`; a folder that already holds `report.json` is read, not retrained,
//! and one with checkpoints is resumed, so an interrupted comparison continues where it stopped.
//!
//! The table: per arm the mean ± sample standard deviation over seeds of the headline metric
//! and the three frequency groups (classification: top-1 / head / medium / tail accuracy;
//! segmentation: mIoU / mHead / mBody / mTail IoU), in percent. Every arm after the first is
//! then compared with the first **paired by seed**: d_s = arm_s − first_s, mean d̄ ± SE with
//! SE = sd(d)/√n, and the verdict "better" if d̄ > 2·SE, "worse" if d̄ < −2·SE, else "within
//! noise" (with one seed there is no SE: "one seed"), with the number of seeds where the arm
//! was higher. Written as `compare.json`, `compare.md` and `compare-per-class.png` (per-class
//! accuracy or IoU of every arm, mean over seeds) beside the run folders.

use crate::config::{load, TrainConfig};
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

/// What `sar compare` runs.
#[derive(Debug, Clone)]
pub struct CompareSpec {
    /// The base config file.
    pub config: PathBuf,
    /// The arms, the first being the reference of the paired differences.
    pub arms: Vec<Arm>,
    /// `run.seed` of each repetition.
    pub seeds: Vec<u64>,
    /// Overrides for every arm (before the arm's own).
    pub common: Vec<String>,
    /// Where the run folders and the table go.
    pub output: PathBuf,
    /// Progress bars and per-run lines.
    pub verbose: bool,
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
    /// Per-class accuracy (or IoU) in percent, mean over seeds.
    pub per_class: Vec<f64>,
    /// Training wall time summed over seeds, seconds.
    pub wall_seconds: f64,
}

/// `compare.json`.
#[derive(Debug, Clone, Serialize)]
pub struct Comparison {
    /// The base config.
    pub config: PathBuf,
    /// The common overrides.
    pub common: Vec<String>,
    /// The seeds.
    pub seeds: Vec<u64>,
    /// Metric names.
    pub metrics: Vec<String>,
    /// One per arm.
    pub arms: Vec<ArmResult>,
}

/// The metrics of one `report.json`: headline and groups, in percent, and per class.
fn metrics_of(
    report: &serde_json::Value,
) -> anyhow::Result<(Vec<&'static str>, Vec<f64>, Vec<f64>)> {
    let num = |k: &str| -> anyhow::Result<f64> {
        report[k]
            .as_f64()
            .map(|v| 100.0 * v)
            .with_context(|| format!("report.json lacks `{k}`"))
    };
    let list = |k: &str| -> anyhow::Result<Vec<f64>> {
        report[k]
            .as_array()
            .with_context(|| format!("report.json lacks `{k}`"))?
            .iter()
            .map(|v| {
                v.as_f64()
                    .map(|x| 100.0 * x)
                    .context("a non-number in the report")
            })
            .collect()
    };
    if report.get("top1").is_some() {
        let names = vec!["top1", "head", "medium", "tail"];
        let v = names
            .iter()
            .map(|k| num(k))
            .collect::<anyhow::Result<_>>()?;
        Ok((names, v, list("per_class_accuracy")?))
    } else {
        let names = vec!["miou", "mhead", "mbody", "mtail"];
        let v = names
            .iter()
            .map(|k| num(k))
            .collect::<anyhow::Result<_>>()?;
        Ok((names, v, list("per_class_iou")?))
    }
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

/// The paired comparison of `arm` against `first` (same seeds, same order).
pub fn paired(arm: &[f64], first: &[f64]) -> Paired {
    let d: Vec<f64> = arm.iter().zip(first).map(|(a, b)| a - b).collect();
    let s = summary(d.clone());
    let n = d.len();
    let se = s.std / (n as f64).sqrt();
    let verdict = if n < 2 {
        "one seed"
    } else if s.mean > 2.0 * se {
        "better"
    } else if s.mean < -2.0 * se {
        "worse"
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

/// The config of one arm and seed.
fn arm_config(spec: &CompareSpec, arm: &Arm, seed: u64, dir: &Path) -> anyhow::Result<TrainConfig> {
    let mut o = spec.common.clone();
    o.extend(arm.overrides.iter().cloned());
    o.push(format!("run.seed={seed}"));
    o.push(format!(
        "run.name={}",
        serde_json::to_string(&format!("{}-seed{seed}", arm.name))?
    ));
    o.push(format!(
        "run.output={}",
        serde_json::to_string(&dir.display().to_string())?
    ));
    load(&spec.config, &o).with_context(|| format!("arm {}", arm.name))
}

/// Trains (or reads) every arm × seed and builds the table; writes `compare.json` and
/// `compare.md` into the output folder.
pub fn compare(spec: &CompareSpec) -> anyhow::Result<Comparison> {
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
    // Every config first, so that a typo fails before hours of training.
    for arm in &spec.arms {
        for &seed in &spec.seeds {
            let dir = spec.output.join(&arm.name).join(format!("seed-{seed}"));
            arm_config(spec, arm, seed, &dir)?;
        }
    }
    let mut metric_names = Vec::new();
    let mut train_counts: Vec<u64> = Vec::new();
    let mut arms: Vec<ArmResult> = Vec::new();
    for arm in &spec.arms {
        let (mut per_seed, mut per_class, mut runs, mut wall) =
            (Vec::new(), Vec::new(), Vec::new(), 0.0);
        for &seed in &spec.seeds {
            let dir = spec.output.join(&arm.name).join(format!("seed-{seed}"));
            let report_path = dir.join("report.json");
            if !report_path.exists() {
                let cfg = arm_config(spec, arm, seed, &dir)?;
                let resume = crate::checkpoint::latest(&dir.join("checkpoints"))
                    .ok()
                    .flatten()
                    .map(|_| dir.clone());
                let opts = TrainOptions {
                    overwrite: resume.is_none(),
                    resume,
                    progress: spec.verbose,
                    ..TrainOptions::default()
                };
                let r =
                    train(&cfg, &opts).with_context(|| format!("arm {} seed {seed}", arm.name))?;
                if spec.verbose {
                    eprintln!("{} seed {seed}: done in {:.1} s", arm.name, r.wall_seconds);
                }
            } else if spec.verbose {
                eprintln!(
                    "{} seed {seed}: {} exists, not retrained",
                    arm.name,
                    report_path.display()
                );
            }
            let text = std::fs::read_to_string(&report_path)
                .with_context(|| format!("reading {}", report_path.display()))?;
            let report: serde_json::Value = serde_json::from_str(&text)
                .with_context(|| format!("parsing {}", report_path.display()))?;
            let (names, values, classes) = metrics_of(&report)?;
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
            wall += report["wall_seconds"].as_f64().unwrap_or(0.0);
            if train_counts.is_empty() {
                train_counts = report["train_counts"]
                    .as_array()
                    .map(|v| v.iter().filter_map(|x| x.as_u64()).collect())
                    .unwrap_or_default();
            }
            per_seed.push(values);
            per_class.push(classes);
            runs.push(dir);
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
        let n = per_class.len() as f64;
        let per_class = (0..classes)
            .map(|c| per_class.iter().map(|v| v[c]).sum::<f64>() / n)
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
                .map(|(m, f)| paired(&m.values, f))
                .collect(),
        );
    }
    let out = Comparison {
        config: spec.config.clone(),
        common: spec.common.clone(),
        seeds: spec.seeds.clone(),
        metrics: metric_names,
        arms,
    };
    std::fs::create_dir_all(&spec.output)?;
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
    crate::plots::grouped_bars(
        &spec.output.join("compare-per-class.png"),
        "per class, mean over seeds",
        if out.metrics[0] == "top1" {
            "accuracy (%)"
        } else {
            "IoU (%)"
        },
        &crate::plots::class_labels(&train_counts),
        &series,
    )?;
    Ok(out)
}

/// The table as Markdown: mean ± std per arm, then the paired differences against the first.
pub fn markdown(c: &Comparison) -> String {
    let mut s = format!(
        "Base config `{}`{}; seeds {:?}. Percent; mean ± sample std over seeds.\n\n",
        c.config.display(),
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
    }
}
