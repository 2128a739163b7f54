//! Faults injected into real `sar train` processes: SIGKILL at arbitrary moments (checkpoints
//! are written every step, so kills land inside checkpoint writes too), a file-size limit that
//! makes checkpoint writes fail (a full disk), and an output path that cannot be a folder.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

const SAR: &str = env!("CARGO_BIN_EXE_sar");

fn write_config(dir: &Path, epochs: usize) -> std::path::PathBuf {
    let path = dir.join("run.toml");
    std::fs::write(
        &path,
        format!(
            r#"
[run]
seed = 1
output = {:?}
[data]
dataset = "digits"
imbalance = 10.0
flip = false
pad = 1
[model]
arch = "small-cnn"
[optim]
lr = 0.05
[train]
epochs = {epochs}
batch_size = 32
checkpoint_every_steps = 1
keep_checkpoints = 3
log_every = 5
plots = false
"#,
            dir.join("out").display().to_string()
        ),
    )
    .unwrap();
    path
}

fn checkpoints(dir: &Path) -> Vec<std::path::PathBuf> {
    sar_train::checkpoint::list(&dir.join("out/checkpoints"))
        .unwrap()
        .into_iter()
        .map(|c| c.1)
        .collect()
}

#[test]
fn sigkill_never_leaves_a_bad_checkpoint_and_resume_finishes_the_run() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), 30);
    let mut kills = 0;
    let mut leftovers = 0;
    // Kill at a spread of moments; resume from whatever the folder holds each time.
    for (i, wait_ms) in [700u64, 350, 900, 420, 610, 380, 455, 530, 275, 820]
        .into_iter()
        .enumerate()
    {
        let mut cmd = Command::new(SAR);
        cmd.args(["train", "-q", "--config"]).arg(&cfg);
        if i > 0 {
            cmd.arg("--resume").arg(dir.path().join("out"));
        }
        let mut child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(wait_ms));
        if child.try_wait().unwrap().is_none() {
            child.kill().unwrap(); // SIGKILL
            kills += 1;
        }
        child.wait().unwrap();
        // Every checkpoint file that exists verifies; temporary files are never mistaken for one.
        for c in checkpoints(dir.path()) {
            sar_train::checkpoint::load(&c)
                .unwrap_or_else(|e| panic!("after kill {i}: {}: {e:#}", c.display()));
        }
        leftovers += std::fs::read_dir(dir.path().join("out/checkpoints"))
            .map(|d| {
                d.filter(|e| {
                    e.as_ref()
                        .unwrap()
                        .file_name()
                        .to_string_lossy()
                        .contains(".tmp-")
                })
                .count()
            })
            .unwrap_or(0);
    }
    assert!(kills >= 3, "the runs finished before they could be killed");
    assert!(!checkpoints(dir.path()).is_empty());
    // What a kill in the middle of a write leaves, planted for certain: a half-written
    // temporary file named after a newer step. It is not a checkpoint, and the next start
    // removes it.
    let good = std::fs::read(checkpoints(dir.path()).last().unwrap()).unwrap();
    let planted = dir
        .path()
        .join("out/checkpoints/.step-999999999.safetensors.tmp-4242");
    std::fs::write(&planted, &good[..good.len() / 2]).unwrap();
    // Resume to the end.
    let out = Command::new(SAR)
        .args(["train", "-q", "--config"])
        .arg(&cfg)
        .arg("--resume")
        .arg(dir.path().join("out"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("out/report.json")).unwrap())
            .unwrap();
    assert!(report["top1"].as_f64().unwrap() > 0.5);
    assert!(
        !planted.exists(),
        "the stale temporary file was not removed"
    );
    eprintln!("{kills} kills, {leftovers} temporary files seen after kills (writes interrupted)");
}

#[test]
fn a_full_disk_is_a_clear_error_and_leaves_no_partial_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), 1);
    // `ulimit -f` caps file size (in 1 KiB or 512 B blocks, by shell): a checkpoint (about
    // 0.8 MB) cannot be written, the config and log can. SIGXFSZ is ignored so the write
    // fails with EFBIG, as on a full disk.
    let script = format!(
        "trap '' XFSZ; ulimit -f 200; exec '{SAR}' train -q --config '{}'",
        cfg.display()
    );
    let out = Command::new("sh").arg("-c").arg(&script).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("writing checkpoint") && err.contains("step-000000001"),
        "{err}"
    );
    assert!(
        err.to_lowercase().contains("file too large"),
        "the OS reason is shown: {err}"
    );
    let names: Vec<String> = std::fs::read_dir(dir.path().join("out/checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    assert!(names.is_empty(), "half-written files left: {names:?}");
}

#[test]
fn an_output_path_that_is_a_file_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), 1);
    std::fs::write(dir.path().join("out"), b"not a folder").unwrap();
    let out = Command::new(SAR)
        .args(["train", "-q", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cannot create") && err.contains("out"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
}
