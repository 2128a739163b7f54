//! A PyTorch peer of a benchmark, kept running: `PYTHON SCRIPT --serve THREADS` prints a JSON
//! header (torch version, threads), then answers each step name written to its input with one
//! JSON line holding that step's `seconds`. Our benchmark asks for its steps in turn with ours,
//! so drift of the machine affects both alike, and times them by its own clock (the pipe's
//! round trip is microseconds beside steps of 100 ms and more).

use anyhow::Context;
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};

/// The running PyTorch peer.
pub(crate) struct Peer {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    /// Its first line: torch version and threads.
    pub(crate) header: serde_json::Value,
}

impl Peer {
    pub(crate) fn start(python: &Path, script: &Path, threads: usize) -> anyhow::Result<Self> {
        anyhow::ensure!(
            script.is_file(),
            "the PyTorch peer {} is missing (run from a checkout of the repository)",
            script.display()
        );
        let mut child = Command::new(python)
            .arg(script)
            .arg("--serve")
            .arg(threads.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .with_context(|| format!("cannot start {}", python.display()))?;
        let stdin = child.stdin.take().context("the peer's stdin")?;
        let mut stdout = BufReader::new(child.stdout.take().context("the peer's stdout")?);
        let header = read_json(&mut stdout).context("the PyTorch peer did not start")?;
        Ok(Peer {
            child,
            stdin,
            stdout,
            header,
        })
    }

    /// Asks for one step of `name`; its seconds, as the peer timed it.
    pub(crate) fn step(&mut self, name: &str) -> anyhow::Result<f64> {
        writeln!(self.stdin, "{name}")?;
        self.stdin.flush()?;
        let v = read_json(&mut self.stdout)
            .with_context(|| format!("the PyTorch peer failed on {name}"))?;
        v["seconds"]
            .as_f64()
            .with_context(|| format!("the PyTorch peer answered {v}"))
    }

    /// The peer process's CPU time so far and peak resident set, as it reports them.
    pub(crate) fn rusage(&mut self) -> anyhow::Result<Rusage> {
        writeln!(self.stdin, "rusage")?;
        self.stdin.flush()?;
        let v = read_json(&mut self.stdout).context("the PyTorch peer's rusage")?;
        let field = |k: &str| {
            v[k].as_f64()
                .with_context(|| format!("the PyTorch peer's rusage lacks {k}: {v}"))
        };
        Ok(Rusage {
            user_s: field("user_s")?,
            sys_s: field("sys_s")?,
            max_rss_kib: field("max_rss_kib")? as u64,
        })
    }
}

/// A process's CPU time and peak resident set (`getrusage(RUSAGE_SELF)`).
#[derive(Debug, Clone, Copy, serde::Serialize, serde::Deserialize)]
pub struct Rusage {
    /// User CPU seconds.
    pub user_s: f64,
    /// System CPU seconds.
    pub sys_s: f64,
    /// Peak resident set, KiB.
    pub max_rss_kib: u64,
}

impl Rusage {
    /// This process's, on Linux (glibc builds, where libc is a dependency).
    pub fn of_this_process() -> Option<Self> {
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        {
            // SAFETY: getrusage writes one plain struct that we own and reads nothing.
            let mut r: libc::rusage = unsafe { std::mem::zeroed() };
            if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut r) } != 0 {
                return None;
            }
            let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 * 1e-6;
            Some(Rusage {
                user_s: secs(r.ru_utime),
                sys_s: secs(r.ru_stime),
                // Linux reports KiB.
                max_rss_kib: r.ru_maxrss as u64,
            })
        }
        #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
        None
    }

    /// System time as a share of all CPU time, per cent.
    pub fn sys_percent(&self) -> f64 {
        100.0 * self.sys_s / (self.user_s + self.sys_s).max(1e-9)
    }

    /// `user 12.3 s, sys 0.4 s (3.1 %), peak RSS 841 MB`.
    pub fn line(&self) -> String {
        format!(
            "user {:.1} s, sys {:.1} s ({:.1} % of CPU time), peak RSS {:.0} MB",
            self.user_s,
            self.sys_s,
            self.sys_percent(),
            self.max_rss_kib as f64 * 1024.0 / 1e6
        )
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn read_json(r: &mut impl BufRead) -> anyhow::Result<serde_json::Value> {
    let mut line = String::new();
    anyhow::ensure!(r.read_line(&mut line)? > 0, "it closed its output");
    serde_json::from_str(&line).with_context(|| format!("not JSON: {line:?}"))
}
