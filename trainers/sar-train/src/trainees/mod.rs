//! Each tensor library's trainee: what the loop ([`crate::run`]) trains through the
//! `crate::run::Trainee` trait. candle runs every task; dfdx runs classification.

pub mod candle;
pub(crate) mod dfdx;
