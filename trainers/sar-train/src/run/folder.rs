//! A run folder belongs to one run.
//!
//! - **One process per folder.** [`RunFolder::lock`] takes an exclusive advisory lock
//!   (`flock`, through [`std::fs::File::try_lock`]) on `run.lock` inside the folder for the
//!   process's whole run and writes its PID there. A second process aiming at the folder fails
//!   at once, naming the folder and the holder's PID, before it changes anything. The kernel
//!   drops the lock when its holder dies, so a stale `run.lock` never blocks a start. (The lock
//!   file is never deleted: deleting it would let two processes lock two different files of
//!   the same name.)
//! - **No silent overwrite.** A fresh start into a folder that holds a run's files
//!   ([`RUN_FILES`], `checkpoints/`) is refused, naming them and the two ways on (`--resume`,
//!   `--overwrite`); `--overwrite` deletes exactly those files first and says so. Files the
//!   trainer does not write are never touched.
//! - **One line of descent.** Resuming from a checkpoint of the folder's own run refuses when
//!   the folder holds checkpoints of later steps (resuming would fork the run) unless
//!   `--overwrite` deletes them; resuming from another folder's checkpoint into a folder that
//!   holds a run is refused likewise. The metrics log is cut back to the checkpoint's step
//!   (`super::log::truncate_to`).

use crate::checkpoint;
use anyhow::{bail, Context};
use std::fs::{File, TryLockError};
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

/// The lock file inside a run folder.
pub const LOCK_FILE: &str = "run.lock";

/// Files a run writes at the top of its folder (besides `checkpoints/`).
pub const RUN_FILES: &[&str] = &[
    "config.toml",
    "metrics.jsonl",
    "report.json",
    "loss.png",
    "per_class.png",
    "features.png",
    "reliability.png",
    "per_class_iou.png",
    "predictions.png",
];

/// The checkpoint folder inside a run folder.
pub const CHECKPOINTS: &str = "checkpoints";

/// A locked output folder. The lock is held until this value is dropped (or the process ends).
#[derive(Debug)]
pub struct RunFolder {
    path: PathBuf,
    _lock: File,
}

impl RunFolder {
    /// Creates `path` if needed and locks it for this process; fails at once, naming the
    /// holder's PID, if another process holds it.
    pub fn lock(path: &Path) -> anyhow::Result<Self> {
        std::fs::create_dir_all(path)
            .with_context(|| format!("cannot create {}", path.display()))?;
        let lock_path = path.join(LOCK_FILE);
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&lock_path)
            .with_context(|| format!("cannot open {}", lock_path.display()))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                let mut holder = String::new();
                // The holder wrote its PID after locking; an empty read (it is between the
                // two) still names the folder.
                let _ = file.read_to_string(&mut holder);
                let holder = match holder.trim() {
                    "" => "another process".to_string(),
                    pid => format!("process {pid}"),
                };
                bail!(
                    "{} is in use by {holder} (lock {}): one run per folder; wait for it to \
                     finish or choose another output folder",
                    path.display(),
                    lock_path.display()
                );
            }
            Err(TryLockError::Error(e)) => {
                return Err(e).with_context(|| format!("cannot lock {}", lock_path.display()))
            }
        }
        file.set_len(0)
            .and_then(|()| file.rewind())
            .and_then(|()| writeln!(file, "{}", std::process::id()))
            .with_context(|| format!("cannot write {}", lock_path.display()))?;
        Ok(RunFolder {
            path: path.to_path_buf(),
            _lock: file,
        })
    }

    /// The folder.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The run files present, as names (`checkpoints/` with the number of files in it).
    pub fn existing_run(&self) -> anyhow::Result<Vec<String>> {
        let mut found: Vec<String> = RUN_FILES
            .iter()
            .filter(|f| self.path.join(f).exists())
            .map(|f| f.to_string())
            .collect();
        let ckpt = self.path.join(CHECKPOINTS);
        if ckpt.is_dir() {
            let n = std::fs::read_dir(&ckpt)
                .with_context(|| format!("cannot read {}", ckpt.display()))?
                .count();
            if n > 0 {
                found.push(format!("{CHECKPOINTS}/ ({n} files)"));
            }
        } else if ckpt.exists() {
            found.push(CHECKPOINTS.to_string());
        }
        Ok(found)
    }

    /// Deletes the run files ([`RUN_FILES`] and `checkpoints/`); returns what was there.
    pub fn clear(&self) -> anyhow::Result<Vec<String>> {
        let found = self.existing_run()?;
        for f in RUN_FILES {
            remove_if_present(&self.path.join(f))?;
        }
        let ckpt = self.path.join(CHECKPOINTS);
        if ckpt.is_dir() {
            std::fs::remove_dir_all(&ckpt)
                .with_context(|| format!("cannot remove {}", ckpt.display()))?;
        } else {
            remove_if_present(&ckpt)?;
        }
        Ok(found)
    }

    /// Before a fresh start: an empty folder passes; one holding a run is refused, or cleared
    /// with `overwrite` (said on stderr).
    pub fn prepare_fresh(&self, overwrite: bool, command: &str) -> anyhow::Result<()> {
        let found = self.existing_run()?;
        if found.is_empty() {
            return Ok(());
        }
        if !overwrite {
            bail!(
                "{} already holds a run ({}); continue it with `{command} --resume {}`, or \
                 start over with `--overwrite` (which deletes those files)",
                self.path.display(),
                found.join(", "),
                self.path.display()
            );
        }
        self.clear()?;
        eprintln!(
            "--overwrite: removed the previous run's files from {}: {}",
            self.path.display(),
            found.join(", ")
        );
        Ok(())
    }

    /// Before resuming from the checkpoint `from` (of step `step`): refuses (or with
    /// `overwrite` deletes) later checkpoints of this folder's run, or another run's files when
    /// the checkpoint comes from elsewhere. Returns whether `from` is this folder's own.
    pub fn prepare_resume(&self, from: &Path, step: u64, overwrite: bool) -> anyhow::Result<bool> {
        let ckpt = self.path.join(CHECKPOINTS);
        let own = match (
            from.parent().map(std::fs::canonicalize),
            ckpt.canonicalize(),
        ) {
            (Some(Ok(a)), Ok(b)) => a == b,
            _ => false,
        };
        if !own {
            let found = self.existing_run()?;
            if !found.is_empty() {
                if !overwrite {
                    bail!(
                        "cannot resume from {} into {}: the folder holds another run ({}); \
                         choose an empty output folder, or pass `--overwrite` to delete those \
                         files",
                        from.display(),
                        self.path.display(),
                        found.join(", ")
                    );
                }
                self.clear()?;
                eprintln!(
                    "--overwrite: removed the previous run's files from {}: {}",
                    self.path.display(),
                    found.join(", ")
                );
            }
            return Ok(false);
        }
        let later: Vec<(u64, PathBuf)> = checkpoint::list(&ckpt)?
            .into_iter()
            .filter(|(s, _)| *s > step)
            .collect();
        if !later.is_empty() {
            let steps: Vec<String> = later.iter().map(|(s, _)| s.to_string()).collect();
            if !overwrite {
                bail!(
                    "cannot resume from step {step}: {} holds checkpoints of later steps ({}), \
                     and continuing from an earlier one would fork the run; resume from the \
                     newest (`--resume {}`), or pass `--overwrite` to delete the later ones",
                    ckpt.display(),
                    steps.join(", "),
                    self.path.display()
                );
            }
            for (_, p) in &later {
                std::fs::remove_file(p)
                    .with_context(|| format!("cannot remove {}", p.display()))?;
            }
            eprintln!(
                "--overwrite: removed the checkpoints after step {step} from {}: steps {}",
                ckpt.display(),
                steps.join(", ")
            );
        }
        Ok(true)
    }
}

fn remove_if_present(path: &Path) -> anyhow::Result<()> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("cannot remove {}", path.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_is_refused_and_names_the_holder() {
        let dir = tempfile::tempdir().unwrap();
        let first = RunFolder::lock(dir.path()).unwrap();
        let err = RunFolder::lock(dir.path()).unwrap_err().to_string();
        assert!(
            err.contains(&format!("process {}", std::process::id())),
            "{err}"
        );
        assert!(err.contains(&dir.path().display().to_string()), "{err}");
        drop(first);
        // Released with its holder: the next lock succeeds, over the old lock file.
        RunFolder::lock(dir.path()).unwrap();
    }

    #[test]
    fn a_fresh_start_is_refused_over_a_run_and_overwrite_clears_only_run_files() {
        let dir = tempfile::tempdir().unwrap();
        let f = RunFolder::lock(dir.path()).unwrap();
        f.prepare_fresh(false, "sar train").unwrap(); // empty: fine
        std::fs::write(dir.path().join("config.toml"), "x").unwrap();
        std::fs::create_dir(dir.path().join(CHECKPOINTS)).unwrap();
        std::fs::write(
            dir.path()
                .join(CHECKPOINTS)
                .join("step-000000003.safetensors"),
            "x",
        )
        .unwrap();
        std::fs::write(dir.path().join("notes.txt"), "mine").unwrap();
        let err = f.prepare_fresh(false, "sar train").unwrap_err().to_string();
        assert!(
            err.contains("config.toml")
                && err.contains("checkpoints/ (1 files)")
                && err.contains("--resume")
                && err.contains("--overwrite"),
            "{err}"
        );
        assert!(dir.path().join("config.toml").exists());
        f.prepare_fresh(true, "sar train").unwrap();
        assert!(!dir.path().join("config.toml").exists());
        assert!(!dir.path().join(CHECKPOINTS).exists());
        assert!(dir.path().join("notes.txt").exists(), "not a run file");
        assert!(f.existing_run().unwrap().is_empty());
    }
}
