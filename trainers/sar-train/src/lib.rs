//! # sar-train: the `sar` program's library
//!
//! - [`reference`](mod@reference): `sar reference`, one SAR step in f64 from a safetensors case, for checking
//!   other SAR implementations against `sar-math`;
//! - [`tensorio`]: named-tensor I/O over safetensors with atomic writes;
//! - [`bench`](mod@bench): `sar bench`, SAR step timings per backend beside a memory copy;
//! - [`demo`]: `sar demo`, baseline against SAR on long-tailed digits over several seeds;
//! - [`compare`]: `sar compare`, arms (config variants) × seeds and a paired table;
//! - [`config`], [`checkpoint`]: TOML configs, verified atomic checkpoints;
//! - [`train`]: `sar train` / `sar eval` at the top, choosing the task and the trainee;
//! - [`run`]: the training loop shared by every task and library (imports no task), with
//!   exact resume;
//! - [`cls`], [`seg`]: the classification and segmentation tasks;
//! - [`trainees`]: each tensor library's trainee (candle runs every task; dfdx runs
//!   classification, `run.backend = "dfdx"`);
//! - [`evaluation`]: what an evaluation reports (accuracy, IoU, head/medium/tail);
//! - [`plots`]: PNG loss curves, per-class accuracy and feature projections;
//! - [`optim`]: SGD (momentum, Nesterov, weight decay) and learning-rate schedules.
pub mod bench;
pub mod checkpoint;
pub mod cls;
pub mod compare;
pub mod config;
pub mod demo;
pub mod evaluation;
pub mod optim;
pub mod plots;
pub mod reference;
pub mod run;
pub mod seg;
pub mod tensorio;
pub mod train;
pub mod trainees;
