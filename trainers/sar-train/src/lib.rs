//! # sar-train: the `sar` program's library
//!
//! - [`reference`](mod@reference): `sar reference`, one SAR step in f64 from a safetensors case, for checking
//!   other SAR implementations against `sar-math`;
//! - [`tensorio`]: named-tensor I/O over safetensors with atomic writes;
//! - [`bench`](mod@bench): `sar bench`, SAR step timings per backend beside a memory copy;
//! - [`demo`]: `sar demo`, baseline against SAR on long-tailed digits over several seeds;
//! - [`config`], [`train`], [`checkpoint`]: `sar train` / `sar eval`, the classification
//!   trainer with TOML configs, verified atomic checkpoints and exact resume;
//! - `dfdx_task`: the same classification training on dfdx (`run.backend = "dfdx"`);
//! - [`plots`]: PNG loss curves, per-class accuracy and feature projections;
//! - [`optim`]: SGD (momentum, Nesterov, weight decay) and learning-rate schedules.
pub mod bench;
pub mod checkpoint;
pub mod config;
pub mod demo;
mod dfdx_task;
pub mod optim;
pub mod plots;
pub mod reference;
pub mod seg;
pub mod tensorio;
pub mod train;
