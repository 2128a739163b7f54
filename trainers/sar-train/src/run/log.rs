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

/// Whether a record of the log belongs to the first `step` steps of the run: what a resumed
/// run keeps. Training and evaluation records count steps done (`step ≤ k` stays); skip and
/// non-finite records name the index of the step that failed (`step < k` stays); a final
/// evaluation ends an attempt, and the resumed run makes its own.
fn before_checkpoint(record: &serde_json::Value, step: u64) -> bool {
    let at = record["step"].as_u64().unwrap_or(0);
    match record["kind"].as_str() {
        Some("skip" | "nonfinite") => at < step,
        Some("eval") if record["final"] == true => at < step,
        _ => at <= step,
    }
}

/// Cuts the log at `path` back to what the first `step` steps wrote, atomically, before a run
/// resumes from its checkpoint of that step: records of the interrupted attempt past the
/// checkpoint go, and so does everything from the first line that does not parse (a line cut
/// by a kill). Returns the number of lines dropped. A missing log is not an error.
pub(crate) fn truncate_to(path: &Path, step: u64) -> anyhow::Result<usize> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    let mut kept = String::with_capacity(text.len());
    let mut dropped = 0;
    let mut torn = false;
    for line in text.lines() {
        let keep = !torn
            && match serde_json::from_str::<serde_json::Value>(line) {
                Ok(v) => before_checkpoint(&v, step),
                Err(_) => {
                    torn = true;
                    false
                }
            };
        if keep {
            kept.push_str(line);
            kept.push('\n');
        } else {
            dropped += 1;
        }
    }
    if dropped > 0 {
        crate::tensorio::write_atomic(path, kept.as_bytes())?;
    }
    Ok(dropped)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncation_keeps_exactly_the_records_of_the_first_k_steps() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("metrics.jsonl");
        let lines = [
            r#"{"kind":"pretrained","file":"w"}"#,
            r#"{"kind":"train","step":5}"#,
            r#"{"kind":"skip","step":6}"#,
            r#"{"kind":"train","step":10}"#,
            r#"{"kind":"eval","step":10,"final":false}"#,
            r#"{"kind":"skip","step":10}"#,
            r#"{"kind":"train","step":15}"#,
            r#"{"kind":"eval","step":15,"final":true}"#,
        ];
        std::fs::write(&path, lines.join("\n") + "\n{\"kind\":\"tra").unwrap();
        assert_eq!(truncate_to(&path, 10).unwrap(), 4);
        let kept = std::fs::read_to_string(&path).unwrap();
        assert_eq!(kept, lines[..5].join("\n") + "\n");
        // Already cut: nothing to drop, the file is left as it is.
        assert_eq!(truncate_to(&path, 10).unwrap(), 0);
        // A final evaluation at the checkpoint's own step ends that attempt.
        std::fs::write(&path, lines[6..].join("\n") + "\n").unwrap();
        assert_eq!(truncate_to(&path, 15).unwrap(), 1);
        assert_eq!(truncate_to(&dir.path().join("absent"), 3).unwrap(), 0);
    }

    #[test]
    fn a_torn_line_ends_the_kept_log() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("metrics.jsonl");
        std::fs::write(
            &path,
            "{\"kind\":\"train\",\"step\":1}\n{\"kind\":\"tr\n{\"kind\":\"train\",\"step\":2}\n",
        )
        .unwrap();
        assert_eq!(truncate_to(&path, 9).unwrap(), 2);
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "{\"kind\":\"train\",\"step\":1}\n"
        );
    }
}
