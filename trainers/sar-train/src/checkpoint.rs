//! Checkpoints: one safetensors file per checkpoint, written atomically, verified on load.
//!
//! Contents: every model variable under its model name (`conv1.weight`, `bn1.running_mean`,
//! `sar.embed.fc1.weight`, …), SGD momentum buffers as `optim.momentum.{name}` (AdamW: `optim.exp_avg.{name}`,
//! `optim.exp_avg_sq.{name}`, `optim.step.{name}`), and the SAR
//! buffers (`sar.anchors`, `sar.semantic_anchors`, `sar.initialized`). The safetensors metadata
//! holds `sar.state` (the JSON [`CheckpointState`]: step, sampler position, config, …) and
//! `sar.sha256`, a SHA-256 over the state JSON and every tensor's name, dtype, shape and bytes
//! in name order. Loading recomputes it, so a truncated file, a flipped byte or a hand-edited
//! state is rejected with an error instead of being trained on.
//!
//! Files are `checkpoints/step-000000123.safetensors` under the run's output folder, written to
//! a temporary file, fsynced, then renamed: a crash while writing leaves the previous
//! checkpoints as they were (and a `.…tmp-PID` file that [`latest`] ignores).

use crate::config::TrainConfig;
use crate::run::LossParts;
use crate::tensorio::{serialize, write_atomic, OutTensor};
use anyhow::{bail, ensure, Context};
use candle_core::{DType, Device, Tensor};
use safetensors::Dtype;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

/// The format tag in every checkpoint.
pub const FORMAT: &str = "sar-checkpoint-1";

/// The training state besides the tensors.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckpointState {
    /// [`FORMAT`].
    pub format: String,
    /// Optimiser steps done.
    pub step: u64,
    /// The epoch the next batch belongs to.
    pub epoch: u64,
    /// The index of the next batch within that epoch (the sampler position).
    pub batch_in_epoch: u64,
    /// The run's configuration.
    pub config: TrainConfig,
    /// Step at which SAR's gate first passed.
    pub gate_first_pass: Option<u64>,
    /// Steps on which the gate passed since then.
    pub gate_passes: u64,
    /// Steps skipped for a non-finite loss.
    pub skipped_steps: u64,
    /// Training seconds so far.
    pub elapsed_seconds: f64,
    /// The loop's sums since its last `"train"` log line and over the current epoch, so that a
    /// run resumed mid-window logs (and reports) what an uninterrupted one would. Checkpoints
    /// written before this field existed resume with empty sums.
    #[serde(default)]
    pub sums: RunningSums,
    /// `stage.init_from`: where the run's starting weights came from (kept so that the report
    /// names it after a resume without the first stage's checkpoint).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init_from: Option<crate::run::InitFrom>,
}

/// Loss sums a run carries between log lines and across an epoch (see
/// [`CheckpointState::sums`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct RunningSums {
    /// Loss parts summed since the last `"train"` line.
    pub window: LossParts,
    /// Successful steps since then.
    pub window_steps: u64,
    /// Of those, steps whose gate passed.
    pub window_gate_passes: u64,
    /// p2a rows (or pixels) summed since then.
    pub window_p2a_rows: u64,
    /// Loss parts summed over the current epoch's successful steps.
    pub epoch: LossParts,
    /// Successful steps of the current epoch.
    pub epoch_steps: u64,
}

fn out_tensor(t: &Tensor) -> anyhow::Result<OutTensor> {
    let shape = t.dims().to_vec();
    let flat = t.flatten_all()?.to_device(&Device::Cpu)?;
    Ok(match t.dtype() {
        DType::F32 => OutTensor {
            dtype: Dtype::F32,
            shape,
            bytes: flat
                .to_vec1::<f32>()?
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect(),
        },
        DType::F64 => OutTensor {
            dtype: Dtype::F64,
            shape,
            bytes: flat
                .to_vec1::<f64>()?
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect(),
        },
        other => bail!("cannot checkpoint a {other:?} tensor"),
    })
}

fn digest<'a>(
    state: &str,
    tensors: impl Iterator<Item = (&'a str, &'a str, &'a [usize], &'a [u8])>,
) -> String {
    let mut h = Sha256::new();
    h.update(FORMAT.as_bytes());
    h.update((state.len() as u64).to_le_bytes());
    h.update(state.as_bytes());
    for (name, dtype, shape, bytes) in tensors {
        h.update((name.len() as u64).to_le_bytes());
        h.update(name.as_bytes());
        h.update(dtype.as_bytes());
        h.update((shape.len() as u64).to_le_bytes());
        for d in shape {
            h.update((*d as u64).to_le_bytes());
        }
        h.update((bytes.len() as u64).to_le_bytes());
        h.update(bytes);
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// Serialises a checkpoint to bytes.
pub fn to_bytes(tensors: &[(String, Tensor)], state: &CheckpointState) -> anyhow::Result<Vec<u8>> {
    let mut out: BTreeMap<String, OutTensor> = BTreeMap::new();
    for (name, t) in tensors {
        ensure!(
            out.insert(name.clone(), out_tensor(t)?).is_none(),
            "two checkpoint tensors are named {name}"
        );
    }
    let json = serde_json::to_string(state)?;
    let sum = digest(
        &json,
        out.iter()
            .map(|(n, t)| (n.as_str(), dtype_name(t.dtype), &t.shape[..], &t.bytes[..])),
    );
    let metadata = HashMap::from([
        ("sar.state".to_string(), json),
        ("sar.sha256".to_string(), sum),
    ]);
    let list: Vec<(String, OutTensor)> = out.into_iter().collect();
    serialize(&list, metadata).map_err(|e| anyhow::anyhow!("serialising the checkpoint: {e}"))
}

fn dtype_name(d: Dtype) -> &'static str {
    match d {
        Dtype::F32 => "F32",
        Dtype::F64 => "F64",
        _ => "other",
    }
}

/// Writes a checkpoint atomically.
pub fn save(
    path: &Path,
    tensors: &[(String, Tensor)],
    state: &CheckpointState,
) -> anyhow::Result<()> {
    let bytes = to_bytes(tensors, state)?;
    write_atomic(path, &bytes).with_context(|| format!("writing checkpoint {}", path.display()))
}

/// A verified checkpoint.
pub struct Checkpoint {
    /// Tensors by name (on the CPU).
    pub tensors: HashMap<String, Tensor>,
    /// The state.
    pub state: CheckpointState,
}

/// Reads and verifies a checkpoint; every failure names the file and what is wrong.
pub fn load(path: &Path) -> anyhow::Result<Checkpoint> {
    let shown = path.display();
    let bytes = std::fs::read(path).with_context(|| format!("cannot read checkpoint {shown}"))?;
    from_bytes(&bytes).with_context(|| format!("checkpoint {shown} is unusable"))
}

/// [`load`] on bytes.
pub fn from_bytes(bytes: &[u8]) -> anyhow::Result<Checkpoint> {
    let (_, meta) = safetensors::SafeTensors::read_metadata(bytes)
        .map_err(|e| anyhow::anyhow!("not a valid safetensors file (truncated?): {e}"))?;
    let file = safetensors::SafeTensors::deserialize(bytes)
        .map_err(|e| anyhow::anyhow!("not a valid safetensors file (truncated?): {e}"))?;
    let md = meta
        .metadata()
        .as_ref()
        .context("no metadata: not a sar checkpoint")?;
    let json = md
        .get("sar.state")
        .context("no sar.state: not a sar checkpoint")?;
    let stored = md
        .get("sar.sha256")
        .context("no sar.sha256: not a sar checkpoint")?;
    let mut names: Vec<String> = file.names().into_iter().map(String::from).collect();
    names.sort();
    let views: Vec<_> = names
        .iter()
        .map(|n| file.tensor(n).map(|v| (n.as_str(), v)))
        .collect::<Result<_, _>>()
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let sum = digest(
        json,
        views
            .iter()
            .map(|(n, v)| (*n, dtype_name(v.dtype()), v.shape(), v.data())),
    );
    ensure!(
        &sum == stored,
        "checksum mismatch (stored {stored}, computed {sum}): the file is corrupt"
    );
    let state: CheckpointState =
        serde_json::from_str(json).context("the state JSON does not parse")?;
    ensure!(
        state.format == FORMAT,
        "format {} is not {FORMAT}",
        state.format
    );
    let mut tensors = HashMap::new();
    for (name, v) in views {
        let dtype = match v.dtype() {
            Dtype::F32 => DType::F32,
            Dtype::F64 => DType::F64,
            other => bail!("tensor {name} has dtype {other:?}"),
        };
        let t = Tensor::from_raw_buffer(v.data(), dtype, v.shape(), &Device::Cpu)?;
        tensors.insert(name.to_string(), t);
    }
    Ok(Checkpoint { tensors, state })
}

/// The checkpoint file of `step` in `dir`.
pub fn path_for(dir: &Path, step: u64) -> PathBuf {
    dir.join(format!("step-{step:09}.safetensors"))
}

/// Checkpoint files in `dir`, oldest first (temporary files ignored).
pub fn list(dir: &Path) -> anyhow::Result<Vec<(u64, PathBuf)>> {
    let mut out = Vec::new();
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(e).with_context(|| format!("cannot list {}", dir.display())),
    };
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().to_string();
        if let Some(step) = name
            .strip_prefix("step-")
            .and_then(|s| s.strip_suffix(".safetensors"))
            .and_then(|s| s.parse::<u64>().ok())
        {
            out.push((step, entry.path()));
        }
    }
    out.sort();
    Ok(out)
}

/// The newest checkpoint in `dir`.
pub fn latest(dir: &Path) -> anyhow::Result<Option<PathBuf>> {
    Ok(list(dir)?.pop().map(|(_, p)| p))
}

/// Removes temporary files that a killed writer left in `dir` (`.NAME.tmp-PID`); returns how
/// many. Only call it when no other process writes into `dir`.
pub fn remove_stale_temporaries(dir: &Path) -> anyhow::Result<usize> {
    let mut n = 0;
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(0);
    };
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().to_string();
        if name.starts_with('.') && name.contains(".tmp-") {
            std::fs::remove_file(entry.path())
                .with_context(|| format!("cannot remove {}", entry.path().display()))?;
            n += 1;
        }
    }
    Ok(n)
}

/// Deletes the oldest checkpoints of the run's line up to `current` (the step just written),
/// so that `keep` of them remain: only checkpoints of steps ≤ `current` are considered, and
/// `current` itself is never deleted, whatever else the folder holds.
pub fn prune(dir: &Path, keep: usize, current: u64) -> anyhow::Result<()> {
    let line: Vec<(u64, PathBuf)> = list(dir)?
        .into_iter()
        .filter(|(s, _)| *s <= current)
        .collect();
    let n = line.len().saturating_sub(keep.max(1));
    for (_, p) in line[..n].iter().filter(|(s, _)| *s != current) {
        std::fs::remove_file(p).with_context(|| format!("cannot remove {}", p.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> (Vec<(String, Tensor)>, CheckpointState) {
        let cfg = crate::config::parse(
            "[data]\ndataset = \"digits\"\n[model]\narch = \"small-cnn\"\n",
            &[],
        )
        .unwrap();
        let tensors = vec![
            (
                "a.weight".to_string(),
                Tensor::new(&[1.0f32, -2.0, 3.5], &Device::Cpu).unwrap(),
            ),
            (
                "sar.semantic_anchors".to_string(),
                Tensor::new(&[[0.25f64, 4.0]], &Device::Cpu).unwrap(),
            ),
        ];
        let state = CheckpointState {
            format: FORMAT.into(),
            step: 7,
            epoch: 1,
            batch_in_epoch: 2,
            config: cfg,
            gate_first_pass: Some(3),
            gate_passes: 4,
            skipped_steps: 0,
            elapsed_seconds: 1.5,
            sums: RunningSums {
                window_steps: 3,
                epoch: LossParts {
                    ce: 0.5,
                    ..Default::default()
                },
                ..Default::default()
            },
            init_from: None,
        };
        (tensors, state)
    }

    #[test]
    fn round_trip_and_every_single_byte_flip_is_caught() {
        let (tensors, state) = tiny();
        let bytes = to_bytes(&tensors, &state).unwrap();
        if let Ok(path) = std::env::var("SAR_WRITE_CHECKPOINT_SEED") {
            let mut seed = vec![1u8];
            seed.extend(&bytes);
            std::fs::write(path, seed).unwrap();
        }
        let ck = from_bytes(&bytes).unwrap();
        assert_eq!(ck.state, state);
        assert_eq!(
            ck.tensors["a.weight"].to_vec1::<f32>().unwrap(),
            vec![1.0, -2.0, 3.5]
        );
        assert_eq!(
            ck.tensors["sar.semantic_anchors"].to_vec2::<f64>().unwrap(),
            vec![vec![0.25, 4.0]]
        );
        // Flipping any one bit of any byte is rejected: nothing corrupt loads as a checkpoint.
        for i in 0..bytes.len() {
            for bit in [0x01u8, 0x80] {
                let mut bad = bytes.clone();
                bad[i] ^= bit;
                assert!(
                    from_bytes(&bad).is_err(),
                    "flip {bit:#x} at byte {i} of {} loaded",
                    bytes.len()
                );
            }
        }
        for n in [0, 7, 8, bytes.len() / 2, bytes.len() - 1] {
            assert!(from_bytes(&bytes[..n]).is_err(), "a file cut at {n} loaded");
        }
    }

    #[test]
    fn pruning_keeps_the_current_checkpoint_and_never_touches_later_steps() {
        let dir = tempfile::tempdir().unwrap();
        let steps = |d: &Path| -> Vec<u64> { list(d).unwrap().into_iter().map(|c| c.0).collect() };
        for s in [5, 10, 16, 112, 120] {
            std::fs::write(path_for(dir.path(), s), b"x").unwrap();
        }
        std::fs::write(dir.path().join("notes.txt"), b"x").unwrap();
        prune(dir.path(), 2, 16).unwrap();
        assert_eq!(steps(dir.path()), vec![10, 16, 112, 120]);
        prune(dir.path(), 1, 16).unwrap();
        assert_eq!(steps(dir.path()), vec![16, 112, 120]);
        // keep = 0 still keeps the checkpoint just written.
        prune(dir.path(), 0, 120).unwrap();
        assert_eq!(steps(dir.path()), vec![120]);
        assert!(dir.path().join("notes.txt").exists());
    }
}
