//! BatchNorm's constants and naming, shared by every network library (candle, dfdx): PyTorch's
//! defaults, which the released code uses everywhere (the networks and h_ψ).
//!
//! Training mode normalises with the batch's biased variance plus [`EPS`] and updates the
//! running statistics as r ← (1 − [`MOMENTUM`])·r + [`MOMENTUM`]·batch (the variance unbiased);
//! evaluation mode normalises with the running statistics. Checkpoints name them
//! `{layer}.running_mean` and `{layer}.running_var` ([`is_running_stat`]): buffers, not trained.

/// ε added to the variance.
pub const EPS: f64 = 1e-5;

/// The running statistics' momentum.
pub const MOMENTUM: f64 = 0.1;

/// Whether a variable is a BatchNorm running statistic (a buffer, not trained).
///
/// ```
/// use sar_math::batch_norm::is_running_stat;
/// assert!(is_running_stat("layer1.0.bn1.running_var"));
/// assert!(!is_running_stat("layer1.0.bn1.weight"));
/// ```
pub fn is_running_stat(name: &str) -> bool {
    name.ends_with(".running_mean") || name.ends_with(".running_var")
}
