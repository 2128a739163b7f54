//! # sar-train: the `sar` program's library
//!
//! - [`reference`](mod@reference): `sar reference`, one SAR step in f64 from a safetensors case, for checking
//!   other SAR implementations against `sar-math`;
//! - [`tensorio`]: named-tensor I/O over safetensors with atomic writes;
//! - [`bench`](mod@bench): `sar bench`, SAR step timings per backend beside a memory copy.
pub mod bench;
pub mod reference;
pub mod tensorio;
