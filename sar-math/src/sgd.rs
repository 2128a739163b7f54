//! SGD with momentum, Nesterov and weight decay: PyTorch's `torch.optim.SGD` update rule
//! (dampening 0), the one definition the trainers' optimisers apply.
//!
//! Per element, in the parameter's precision:
//!
//! g ← ∇w + wd·w (when wd ≠ 0);
//! b ← g on the first step (a fresh buffer), else b ← μ·b + g (when μ ≠ 0);
//! d ← g + μ·b (Nesterov) or b (when μ ≠ 0), else d ← g;
//! w ← w − lr·d.
//!
//! Each product and sum is rounded separately, in that order (no fused multiply-add), so a
//! tensor library that applies the same rule op by op (`grad + w·wd`, `b·μ + g`, `g + b·μ`,
//! `w − d·lr`) gets the same bits.

use crate::error::{check_len, Op, Result};
use crate::Real;

/// The hyper-parameters of one SGD step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SgdConfig {
    /// Learning rate.
    pub lr: f64,
    /// μ (0: no momentum buffer).
    pub momentum: f64,
    /// Weight decay (L2, added to the gradient).
    pub weight_decay: f64,
    /// Nesterov momentum.
    pub nesterov: bool,
}

/// One SGD step of `param` with gradient `grad`, in place and without allocating.
///
/// `momentum_buf` is b (same length as `param` when μ ≠ 0; ignored, and may be empty, when
/// μ = 0). `fresh` says that b holds nothing yet (PyTorch's first step): it is then set to g
/// instead of updated.
///
/// ```
/// use sar_math::sgd::{sgd_step, SgdConfig};
/// let cfg = SgdConfig { lr: 0.1, momentum: 0.9, weight_decay: 0.0, nesterov: false };
/// let (mut w, mut b) = ([1.0f64], [0.0f64]);
/// sgd_step(&cfg, &mut w, &[2.0], &mut b, true).unwrap();   // b = g = 2, w = 1 − 0.2
/// assert_eq!((w[0], b[0]), (0.8, 2.0));
/// sgd_step(&cfg, &mut w, &[2.0], &mut b, false).unwrap();  // b = 0.9·2 + 2 = 3.8
/// assert!((w[0] - 0.42).abs() < 1e-15 && b[0] == 3.8);
/// ```
pub fn sgd_step<F: Real>(
    cfg: &SgdConfig,
    param: &mut [F],
    grad: &[F],
    momentum_buf: &mut [F],
    fresh: bool,
) -> Result<()> {
    let op = Op::Sgd;
    check_len(op, "grad", grad.len(), param.len())?;
    let use_momentum = cfg.momentum != 0.0;
    if use_momentum {
        check_len(op, "momentum_buf", momentum_buf.len(), param.len())?;
    }
    let (lr, mu, wd) = (
        F::from_f64(cfg.lr),
        F::from_f64(cfg.momentum),
        F::from_f64(cfg.weight_decay),
    );
    for i in 0..param.len() {
        let w = param[i];
        let mut g = grad[i];
        if cfg.weight_decay != 0.0 {
            g = g + w * wd;
        }
        if use_momentum {
            let b = if fresh { g } else { momentum_buf[i] * mu + g };
            momentum_buf[i] = b;
            g = if cfg.nesterov { g + b * mu } else { b };
        }
        param[i] = w - g * lr;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(momentum: f64, weight_decay: f64, nesterov: bool) -> SgdConfig {
        SgdConfig {
            lr: 0.1,
            momentum,
            weight_decay,
            nesterov,
        }
    }

    /// Plain SGD: w = 1 − 0.1·2 = 0.8; the (empty) buffer is not touched.
    #[test]
    fn plain_sgd_ignores_the_buffer() {
        let mut w = [1.0f64];
        sgd_step(&cfg(0.0, 0.0, false), &mut w, &[2.0], &mut [], true).unwrap();
        assert_eq!(w, [0.8]);
    }

    /// Weight decay 0.1 without momentum: g = 2 + 0.1·1 = 2.1, w = 1 − 0.21 = 0.79.
    #[test]
    fn weight_decay_adds_to_the_gradient() {
        let mut w = [1.0f64];
        sgd_step(&cfg(0.0, 0.1, false), &mut w, &[2.0], &mut [], true).unwrap();
        assert!((w[0] - 0.79).abs() < 1e-15, "{w:?}");
    }

    /// Two Nesterov steps with weight decay, by hand: w = (1, −2), ∇ = (0.5, 0.25), lr 0.1,
    /// μ 0.9, wd 0.01. Step 1: g = (0.51, 0.23) = b, d = 1.9·g, w = (0.9031, −2.0437).
    /// Step 2: g = (0.509031, 0.229563), b = 0.9·b + g = (0.968031, 0.436563),
    /// d = g + 0.9·b, w = (0.76507411, −2.10594697).
    #[test]
    fn nesterov_with_weight_decay_by_hand() {
        let c = cfg(0.9, 0.01, true);
        let (mut w, mut b) = ([1.0f64, -2.0], [0.0f64; 2]);
        sgd_step(&c, &mut w, &[0.5, 0.25], &mut b, true).unwrap();
        for (got, want) in w.iter().zip([0.9031, -2.0437]) {
            assert!((got - want).abs() < 1e-12, "{w:?}");
        }
        for (got, want) in b.iter().zip([0.51, 0.23]) {
            assert!((got - want).abs() < 1e-12, "{b:?}");
        }
        sgd_step(&c, &mut w, &[0.5, 0.25], &mut b, false).unwrap();
        for (got, want) in w.iter().zip([0.765_074_11, -2.105_946_97]) {
            assert!((got - want).abs() < 1e-8, "{w:?}");
        }
        for (got, want) in b.iter().zip([0.968_031, 0.436_563]) {
            assert!((got - want).abs() < 1e-12, "{b:?}");
        }
    }

    /// Heavy-ball momentum without Nesterov: d = b. w₀ = 1, ∇ = 2w (L = w²), μ 0.9, wd 0.1:
    /// step 1: g = 2 + 0.1 = 2.1 = b, w = 1 − 0.21 = 0.79; step 2: g = 1.58 + 0.079 = 1.659,
    /// b = 0.9·2.1 + 1.659 = 3.549, w = 0.79 − 0.3549 = 0.4351.
    #[test]
    fn momentum_by_hand() {
        let c = cfg(0.9, 0.1, false);
        let (mut w, mut b) = ([1.0f64], [0.0f64]);
        sgd_step(&c, &mut w, &[2.0], &mut b, true).unwrap();
        assert!((w[0] - 0.79).abs() < 1e-15 && (b[0] - 2.1).abs() < 1e-15);
        let g = [2.0 * w[0]];
        sgd_step(&c, &mut w, &g, &mut b, false).unwrap();
        assert!((b[0] - 3.549).abs() < 1e-14, "{b:?}");
        assert!((w[0] - 0.4351).abs() < 1e-14, "{w:?}");
    }

    /// f32 follows the rule op by op in f32: the same bits as writing it out.
    #[test]
    fn f32_rounds_each_operation() {
        let c = cfg(0.9, 0.01, true);
        let (w0, g0, b0) = (0.3f32, -1.7f32, 0.25f32);
        let (mut w, mut b) = ([w0], [b0]);
        sgd_step(&c, &mut w, &[g0], &mut b, false).unwrap();
        let g = g0 + w0 * 0.01f32;
        let bb = b0 * 0.9f32 + g;
        let d = g + bb * 0.9f32;
        assert_eq!(b[0].to_bits(), bb.to_bits());
        assert_eq!(w[0].to_bits(), (w0 - d * 0.1f32).to_bits());
    }

    #[test]
    fn lengths_are_checked() {
        let mut w = [0.0f64; 2];
        assert!(sgd_step(&cfg(0.0, 0.0, false), &mut w, &[1.0], &mut [], true).is_err());
        assert!(sgd_step(&cfg(0.9, 0.0, false), &mut w, &[1.0, 1.0], &mut [0.0], true).is_err());
    }
}
