//! # sar-train: the `sar` program's library
//!
//! - [`reference`](mod@reference): `sar reference`, one SAR step in f64 from a safetensors case, for checking
//!   other SAR implementations against `sar-math`;
//! - [`tensorio`]: named-tensor I/O over safetensors with atomic writes.
pub mod reference;
pub mod tensorio;
