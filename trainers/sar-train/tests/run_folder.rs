//! A run folder belongs to one run, tested on the real binary: concurrent starts, a repeated
//! fresh start and `--overwrite`, a stale lock, and the stop on SIGTERM (a clean stop whose
//! checkpoint resumes to the same model, and a second signal that exits at once).
#![cfg(unix)]

use sar_train::checkpoint;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const SAR: &str = env!("CARGO_BIN_EXE_sar");

/// A digits run into `dir/out`: 15 steps an epoch (468 long-tailed images, batch 32).
fn write_config(dir: &Path, seed: u64, epochs: usize, extra: &str) -> PathBuf {
    let path = dir.join(format!("run-{seed}-{epochs}.toml"));
    std::fs::write(
        &path,
        format!(
            r#"
[run]
seed = {seed}
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
log_every = 1
eval_every = 1
plots = false
{extra}
"#,
            dir.join("out").display().to_string()
        ),
    )
    .unwrap();
    path
}

fn sar(args: &[&str], config: &Path) -> Command {
    let mut cmd = Command::new(SAR);
    cmd.args(["train", "-q", "--config"]).arg(config).args(args);
    cmd
}

fn run_ok(args: &[&str], config: &Path) -> Output {
    let out = sar(args, config).output().unwrap();
    assert!(
        out.status.success(),
        "sar train {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn spawn(args: &[&str], config: &Path) -> Child {
    sar(args, config)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn signal(child: &Child, name: &str) {
    let ok = Command::new("kill")
        .arg(format!("-{name}"))
        .arg(child.id().to_string())
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill -{name} failed");
}

/// Polls `cond` every 10 ms for up to 60 s.
fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn records(out: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// The log's training, evaluation and skip records without wall-clock fields: what an
/// interrupted and resumed run must have exactly as an uninterrupted one.
fn progress_records(out: &Path) -> Vec<serde_json::Value> {
    records(out)
        .into_iter()
        .filter(|r| matches!(r["kind"].as_str(), Some("train" | "eval" | "skip")))
        .map(|mut r| {
            r.as_object_mut().unwrap().remove("images_per_s");
            r
        })
        .collect()
}

fn checkpoint_steps(out: &Path) -> Vec<u64> {
    checkpoint::list(&out.join("checkpoints"))
        .unwrap()
        .into_iter()
        .map(|c| c.0)
        .collect()
}

/// Every tensor of the newest checkpoint, as bytes by name, with its step.
fn final_tensors(out: &Path) -> (u64, Vec<(String, Vec<u8>)>) {
    let path = checkpoint::latest(&out.join("checkpoints"))
        .unwrap()
        .unwrap();
    let ck = checkpoint::load(&path).unwrap();
    let mut v: Vec<(String, Vec<u8>)> = ck
        .tensors
        .iter()
        .map(|(n, t)| {
            let f: Vec<f32> = t
                .to_dtype(candle_core::DType::F32)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            (n.clone(), f.iter().flat_map(|x| x.to_le_bytes()).collect())
        })
        .collect();
    v.sort();
    (ck.state.step, v)
}

fn report(out: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap()
}

#[test]
fn a_second_start_into_a_busy_folder_is_refused_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let first_cfg = write_config(dir.path(), 1, 3, "");
    let second_cfg = write_config(dir.path(), 7, 3, "");
    let mut first = spawn(&["--debug-step-delay-ms", "30"], &first_cfg);
    let pid = first.id().to_string();
    wait_for("the first run to hold the lock", || {
        std::fs::read_to_string(out.join("run.lock")).is_ok_and(|s| s.trim() == pid)
    });
    let second = sar(&[], &second_cfg).output().unwrap();
    assert!(!second.status.success(), "the second start was not refused");
    let err = String::from_utf8_lossy(&second.stderr);
    assert!(
        err.contains(&out.display().to_string()) && err.contains(&format!("process {pid}")),
        "the message names the folder and the holder: {err}"
    );
    let status = first.wait().unwrap();
    assert!(status.success(), "the first run failed");
    // Everything in the folder is the first run's.
    let config = std::fs::read_to_string(out.join("config.toml")).unwrap();
    assert!(config.contains("seed = 1"), "{config}");
    for (step, path) in checkpoint::list(&out.join("checkpoints")).unwrap() {
        let ck = checkpoint::load(&path).unwrap();
        assert_eq!(ck.state.config.run.seed, 1, "checkpoint of step {step}");
    }
    assert_eq!(report(&out)["steps"], 45);
    let steps: Vec<u64> = records(&out)
        .iter()
        .filter(|r| r["kind"] == "train")
        .map(|r| r["step"].as_u64().unwrap())
        .collect();
    assert_eq!(
        steps,
        (1..=45).collect::<Vec<_>>(),
        "one run's log, in order"
    );
}

#[test]
fn a_repeated_fresh_start_is_refused_and_overwrite_starts_over() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let one = write_config(dir.path(), 1, 1, "");
    let two = write_config(dir.path(), 1, 2, "");
    run_ok(&[], &one);
    let report_before = std::fs::read(out.join("report.json")).unwrap();
    let log_before = std::fs::read(out.join("metrics.jsonl")).unwrap();
    let ckpts_before = checkpoint_steps(&out);
    let refused = sar(&[], &two).output().unwrap();
    assert!(!refused.status.success());
    let err = String::from_utf8_lossy(&refused.stderr);
    for word in [
        "already holds a run",
        "config.toml",
        "report.json",
        "--resume",
        "--overwrite",
    ] {
        assert!(err.contains(word), "`{word}` missing from: {err}");
    }
    assert_eq!(
        std::fs::read(out.join("report.json")).unwrap(),
        report_before
    );
    assert_eq!(
        std::fs::read(out.join("metrics.jsonl")).unwrap(),
        log_before
    );
    assert_eq!(checkpoint_steps(&out), ckpts_before);
    assert!(std::fs::read_to_string(out.join("config.toml"))
        .unwrap()
        .contains("epochs = 1"));

    let over = run_ok(&["--overwrite"], &two);
    let err = String::from_utf8_lossy(&over.stderr);
    assert!(err.contains("removed the previous run's files"), "{err}");
    assert_eq!(report(&out)["steps"], 30);
    let finals = records(&out)
        .iter()
        .filter(|r| r["kind"] == "eval" && r["final"] == true)
        .count();
    assert_eq!(finals, 1, "the old run's log is gone");
    for (_, path) in checkpoint::list(&out.join("checkpoints")).unwrap() {
        assert_eq!(
            checkpoint::load(&path).unwrap().state.config.train.epochs,
            2
        );
    }
    // Resuming an earlier checkpoint of the run would fork it: refused, then allowed with
    // --overwrite, which deletes the later checkpoints and cuts the log back.
    let first = checkpoint::list(&out.join("checkpoints")).unwrap()[0]
        .1
        .clone();
    let fork = sar(&["--resume", first.to_str().unwrap()], &two)
        .output()
        .unwrap();
    assert!(!fork.status.success());
    assert!(String::from_utf8_lossy(&fork.stderr).contains("later steps (30)"));
    run_ok(&["--resume", first.to_str().unwrap(), "--overwrite"], &two);
    assert_eq!(report(&out)["steps"], 30);
    let train_steps: Vec<u64> = records(&out)
        .iter()
        .filter(|r| r["kind"] == "train")
        .map(|r| r["step"].as_u64().unwrap())
        .collect();
    assert_eq!(train_steps, (1..=30).collect::<Vec<_>>());
}

#[test]
fn a_stale_lock_never_blocks_a_start() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let cfg = write_config(dir.path(), 1, 1, "checkpoint_every_steps = 1");
    // A lock file left by a process long gone (nobody holds the lock).
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("run.lock"), "4194303\n").unwrap();
    // And one whose holder is killed while it holds it.
    let mut killed = spawn(&["--debug-step-delay-ms", "50"], &cfg);
    let pid = killed.id().to_string();
    wait_for("the run to hold the lock and checkpoint", || {
        std::fs::read_to_string(out.join("run.lock")).is_ok_and(|s| s.trim() == pid)
            && !checkpoint_steps(&out).is_empty()
    });
    signal(&killed, "KILL");
    killed.wait().unwrap();
    run_ok(&["--resume", out.to_str().unwrap()], &cfg);
    assert_eq!(report(&out)["steps"], 15);
    // Whatever the kill cut, the log holds each step once.
    let steps: Vec<u64> = records(&out)
        .iter()
        .filter(|r| r["kind"] == "train")
        .map(|r| r["step"].as_u64().unwrap())
        .collect();
    assert_eq!(steps, (1..=15).collect::<Vec<_>>());
}

#[test]
fn sigterm_mid_epoch_checkpoints_that_step_and_the_resumed_run_is_bit_identical() {
    let full_dir = tempfile::tempdir().unwrap();
    let full = full_dir.path().join("out");
    run_ok(
        &[],
        &write_config(full_dir.path(), 3, 3, "keep_checkpoints = 5"),
    );

    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let cfg = write_config(dir.path(), 3, 3, "keep_checkpoints = 5");
    let child = spawn(&["--debug-step-delay-ms", "40"], &cfg);
    // Into the second epoch (steps 16–30), away from its end.
    wait_for("step 18", || {
        records(&out)
            .iter()
            .any(|r| r["kind"] == "train" && r["step"] == 18)
    });
    signal(&child, "TERM");
    let stopped = child.wait_with_output().unwrap();
    assert_eq!(
        stopped.status.code(),
        Some(143),
        "exit status of a SIGTERM stop"
    );
    let err = String::from_utf8_lossy(&stopped.stderr);
    assert!(
        err.contains("stopped by SIGTERM") && err.contains("--resume"),
        "{err}"
    );
    let stop: Vec<u64> = records(&out)
        .iter()
        .filter(|r| r["kind"] == "stop")
        .map(|r| r["step"].as_u64().unwrap())
        .collect();
    assert_eq!(stop.len(), 1);
    let at = stop[0];
    assert!((18..30).contains(&at), "stopped at step {at}, mid-epoch");
    // The checkpoint of the step it stopped at, verified, beside the epoch-end one.
    assert_eq!(checkpoint_steps(&out), vec![15, at]);
    let ck = checkpoint::load(&checkpoint::path_for(&out.join("checkpoints"), at)).unwrap();
    assert_eq!(ck.state.step, at);
    assert_eq!(ck.state.batch_in_epoch, at - 15);

    run_ok(&["--resume", out.to_str().unwrap()], &cfg);
    let (sa, ta) = final_tensors(&full);
    let (sb, tb) = final_tensors(&out);
    assert_eq!((sa, ta.len()), (sb, tb.len()));
    for ((na, va), (nb, vb)) in ta.iter().zip(&tb) {
        assert_eq!(na, nb);
        assert!(va == vb, "{na} differs after the stop and resume");
    }
    for key in ["per_class_accuracy", "loss", "gate_first_pass", "steps"] {
        assert_eq!(report(&full)[key], report(&out)[key], "report.{key}");
    }
    // The log continues where the checkpoint stands: no step twice, the same records.
    assert_eq!(progress_records(&full), progress_records(&out));
}

#[test]
fn a_second_sigterm_exits_at_once_leaving_only_verified_checkpoints() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let cfg = write_config(
        dir.path(),
        1,
        1,
        "checkpoint_every_steps = 1\nkeep_checkpoints = 3",
    );
    let child = spawn(&["--debug-step-delay-ms", "1500"], &cfg);
    // Right after the checkpoint of step 1 appears, step 2 sleeps for 1.5 s: both signals
    // land inside it.
    wait_for("the first checkpoint", || {
        !checkpoint_steps(&out).is_empty()
    });
    signal(&child, "TERM");
    std::thread::sleep(Duration::from_millis(150));
    let second = Instant::now();
    signal(&child, "TERM");
    let stopped = child.wait_with_output().unwrap();
    assert_eq!(stopped.status.code(), Some(143));
    assert!(
        second.elapsed() < Duration::from_millis(1000),
        "the second signal did not end the step: {:?}",
        second.elapsed()
    );
    assert!(
        !records(&out).iter().any(|r| r["kind"] == "stop"),
        "the graceful stop ran to its end"
    );
    assert_eq!(checkpoint_steps(&out), vec![1]);
    for (step, path) in checkpoint::list(&out.join("checkpoints")).unwrap() {
        checkpoint::load(&path).unwrap_or_else(|e| panic!("step {step}: {e:#}"));
    }
}
