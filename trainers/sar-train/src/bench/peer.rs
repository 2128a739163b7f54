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
