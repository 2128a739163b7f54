//! The run's metrics log, `metrics.jsonl`: one JSON object per line, appended as the run goes.
//!
//! Kinds: `"train"` (mean loss parts over the last `log_every` steps, the learning rate, gate
//! pass rate, p2a rows and images/s; `step` counts the steps done), `"eval"` (a test-set
//! evaluation after `step` steps), `"skip"` and `"nonfinite"` (the step with index `step`, that
//! is the (`step`+1)-th, had a NaN/inf input or loss part), `"pretrained"` and `"resume"`.

use anyhow::Context;
use std::io::Write;
use std::path::{Path, PathBuf};

/// `metrics.jsonl`, open for appending.
pub(crate) struct MetricsLog {
    file: std::fs::File,
    path: PathBuf,
}

impl MetricsLog {
    /// Opens (or creates) the log at `path` for appending.
    pub(crate) fn open(path: PathBuf) -> anyhow::Result<Self> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .with_context(|| format!("cannot open {}", path.display()))?;
        Ok(MetricsLog { file, path })
    }

    /// Appends one record.
    pub(crate) fn write(&mut self, value: serde_json::Value) -> anyhow::Result<()> {
        writeln!(self.file, "{value}")
            .with_context(|| format!("cannot write {}", self.path.display()))
    }
}

/// The training and evaluation loss parts over steps, from a metrics log.
pub fn loss_series(log: &Path) -> anyhow::Result<crate::plots::Series> {
    let text =
        std::fs::read_to_string(log).with_context(|| format!("cannot read {}", log.display()))?;
    let keys = ["loss", "ce", "head_aux", "aux", "p2a"];
    let mut series: Vec<(String, Vec<(f64, f64)>)> =
        keys.iter().map(|k| (k.to_string(), Vec::new())).collect();
    for line in text.lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if v["kind"] != "train" {
            continue;
        }
        let step = v["step"].as_f64().unwrap_or(0.0);
        for (k, s) in keys.iter().zip(series.iter_mut()) {
            if let Some(y) = v[*k].as_f64() {
                s.1.push((step, y));
            }
        }
    }
    series.retain(|s| s.1.iter().any(|p| p.1 != 0.0));
    Ok(series)
}
