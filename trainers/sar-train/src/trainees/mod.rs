//! Each tensor library's trainee: what the loop ([`crate::run`]) trains through the
//! `crate::run::Trainee` trait. candle and dfdx each run every task (classification,
//! segmentation, the second stages).

pub mod candle;
pub(crate) mod dfdx;
mod dfdx_stage;
