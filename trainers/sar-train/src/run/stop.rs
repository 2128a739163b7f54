//! A clean stop on SIGTERM or SIGINT.
//!
//! Batch schedulers (SLURM, Kubernetes) send SIGTERM some time before they kill; a terminal
//! sends SIGINT on Ctrl-C. [`StopRequest::on_signals`] (called by the `sar` binary) makes the
//! first of either only raise a flag: the loop finishes the step in progress, writes a
//! verified checkpoint of it and returns [`Interrupted`], and the binary exits with 128 + the
//! signal's number (143, 130). A second signal ends the process at once with the same status;
//! what it cuts short is at most a checkpoint's temporary file, never a checkpoint (they are
//! written atomically), and the next start removes the temporary.

use anyhow::Context;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

/// Whether a stop was asked for, and by which signal. Clones share the flag.
#[derive(Debug, Clone, Default)]
pub struct StopRequest {
    asked: Arc<AtomicBool>,
    signal: Arc<AtomicUsize>,
}

impl StopRequest {
    /// A request that only [`StopRequest::ask`] raises (for tests and embedding programs).
    pub fn new() -> Self {
        Self::default()
    }

    /// Raises the request as signal `signal` would.
    pub fn ask(&self, signal: i32) {
        self.signal.store(signal as usize, Ordering::SeqCst);
        self.asked.store(true, Ordering::SeqCst);
    }

    /// The signal that asked for a stop, if one did.
    pub fn asked(&self) -> Option<i32> {
        self.asked
            .load(Ordering::SeqCst)
            .then(|| self.signal.load(Ordering::SeqCst) as i32)
    }

    /// A request raised by the first SIGTERM or SIGINT; the second exits the process at once
    /// with status 128 + signal. Process-wide: for a program's `main`.
    pub fn on_signals() -> anyhow::Result<Self> {
        use signal_hook::consts::{SIGINT, SIGTERM};
        use signal_hook::flag;
        let r = Self::new();
        for sig in [SIGTERM, SIGINT] {
            // Registered first, so it sees the flag as it was before this signal: only a
            // signal that arrives after the request exits.
            flag::register_conditional_shutdown(sig, 128 + sig, r.asked.clone())
                .and_then(|_| flag::register_usize(sig, r.signal.clone(), sig as usize))
                .and_then(|_| flag::register(sig, r.asked.clone()))
                .with_context(|| format!("cannot install the handler of signal {sig}"))?;
        }
        Ok(r)
    }
}

/// The error a run stopped by a [`StopRequest`] returns, after its checkpoint is written.
#[derive(Debug, Clone)]
pub struct Interrupted {
    /// The signal that asked for the stop.
    pub signal: i32,
    /// Steps done (the checkpoint's step).
    pub step: u64,
    /// The checkpoint written at the stop.
    pub checkpoint: PathBuf,
    /// The run folder (what `--resume` takes).
    pub folder: PathBuf,
}

impl Interrupted {
    /// The exit status a shell expects of a process ended by the signal.
    pub fn exit_code(&self) -> i32 {
        128 + self.signal
    }

    fn signal_name(&self) -> String {
        match self.signal {
            15 => "SIGTERM".into(),
            2 => "SIGINT".into(),
            s => format!("signal {s}"),
        }
    }
}

impl std::fmt::Display for Interrupted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "stopped by {} after step {}; checkpoint {} written",
            self.signal_name(),
            self.step,
            self.checkpoint.display()
        )
    }
}

impl std::error::Error for Interrupted {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_names_its_signal_and_clones_share_it() {
        let r = StopRequest::new();
        let seen = r.clone();
        assert_eq!(seen.asked(), None);
        r.ask(15);
        assert_eq!(seen.asked(), Some(15));
        let i = Interrupted {
            signal: 15,
            step: 7,
            checkpoint: "c".into(),
            folder: "f".into(),
        };
        assert_eq!(i.exit_code(), 143);
        assert_eq!(
            i.to_string(),
            "stopped by SIGTERM after step 7; checkpoint c written"
        );
    }
}
