//! AdamW: PyTorch's `torch.optim.AdamW` update rule (decoupled weight decay, no AMSGrad), the
//! one definition the trainers' optimisers apply (mmsegmentation's SegFormer and Swin
//! schedules train with it).
//!
//! For step t = 1, 2, … (counted per parameter), per element, in the parameter's precision:
//!
//! w ← w·(1 − lr·wd);
//! m ← m + (1 − β1)·(g − m);
//! v ← v·β2 + (g·g)·(1 − β2);
//! w ← w − (lr / (1 − β1ᵗ))·(m / (√v / √(1 − β2ᵗ) + ε)).
//!
//! The scalars 1 − lr·wd, 1 − β1, 1 − β2, lr / (1 − β1ᵗ) and √(1 − β2ᵗ) are computed in f64
//! (PyTorch computes them as Python floats) and rounded once to the parameter's precision; each
//! tensor operation is then rounded separately in the order written, as PyTorch's
//! single-tensor implementation does (`mul_`, `lerp_`, `mul_().addcmul_()`, `sqrt() / c + ε`,
//! `addcdiv_`). m and v start at zero.

use crate::error::{check_len, Op, Result, SarError};
use crate::Real;

/// The hyper-parameters of one AdamW step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    /// Learning rate.
    pub lr: f64,
    /// β1, the first moment's decay (0.9).
    pub beta1: f64,
    /// β2, the second moment's decay (0.999).
    pub beta2: f64,
    /// ε, added to the bias-corrected √v (1e-8).
    pub eps: f64,
    /// Decoupled weight decay (0.01): the parameter shrinks by lr·wd before the Adam step.
    pub weight_decay: f64,
}

impl AdamWConfig {
    /// Checks the domains: lr ≥ 0, β1 and β2 in [0, 1), ε > 0, wd ≥ 0, all finite.
    pub fn validate(&self) -> Result<()> {
        let param = |name, value: f64, domain, ok: bool| {
            if ok && value.is_finite() {
                Ok(())
            } else {
                Err(SarError::Param {
                    op: Op::AdamW,
                    name,
                    value,
                    domain,
                })
            }
        };
        param("lr", self.lr, "[0, ∞)", self.lr >= 0.0)?;
        param(
            "beta1",
            self.beta1,
            "[0, 1)",
            (0.0..1.0).contains(&self.beta1),
        )?;
        param(
            "beta2",
            self.beta2,
            "[0, 1)",
            (0.0..1.0).contains(&self.beta2),
        )?;
        param("eps", self.eps, "(0, ∞)", self.eps > 0.0)?;
        param(
            "weight_decay",
            self.weight_decay,
            "[0, ∞)",
            self.weight_decay >= 0.0,
        )
    }
}

/// The step's scalars, in f64: (1 − lr·wd, 1 − β1, 1 − β2, lr / (1 − β1ᵗ), √(1 − β2ᵗ)).
///
/// A tensor library applying the rule op by op uses these (see the module docs), so both paths
/// round alike.
pub fn step_scalars(cfg: &AdamWConfig, step: u64) -> [f64; 5] {
    // Python's `beta ** step` is pow on floats.
    let t = step as f64;
    [
        1.0 - cfg.lr * cfg.weight_decay,
        1.0 - cfg.beta1,
        1.0 - cfg.beta2,
        cfg.lr / (1.0 - Real::powf(cfg.beta1, t)),
        Real::sqrt(1.0 - Real::powf(cfg.beta2, t)),
    ]
}

/// Step number `step` (1 for the first) of `param` with gradient `grad`, in place and without
/// allocating. `exp_avg` (m) and `exp_avg_sq` (v) have `param`'s length and are zero before the
/// first step.
///
/// ```
/// use sar_math::adamw::{adamw_step, AdamWConfig};
/// let cfg = AdamWConfig { lr: 0.1, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0 };
/// let (mut w, mut m, mut v) = ([1.0f64], [0.0f64], [0.0f64]);
/// adamw_step(&cfg, &mut w, &[2.0], &mut m, &mut v, 1).unwrap();
/// // The first step moves by lr·sign(g) (up to ε): m̂ = 2, √v̂ = 2.
/// assert!((w[0] - 0.9).abs() < 1e-8);
/// ```
pub fn adamw_step<F: Real>(
    cfg: &AdamWConfig,
    param: &mut [F],
    grad: &[F],
    exp_avg: &mut [F],
    exp_avg_sq: &mut [F],
    step: u64,
) -> Result<()> {
    let op = Op::AdamW;
    cfg.validate()?;
    if step == 0 {
        return Err(SarError::Shape {
            op,
            what: "the step number starts at 1",
        });
    }
    check_len(op, "grad", grad.len(), param.len())?;
    check_len(op, "exp_avg", exp_avg.len(), param.len())?;
    check_len(op, "exp_avg_sq", exp_avg_sq.len(), param.len())?;
    let [decay, one_minus_b1, one_minus_b2, step_size, bc2_sqrt] = step_scalars(cfg, step);
    let (decay, one_minus_b1, one_minus_b2, step_size, bc2_sqrt) = (
        F::from_f64(decay),
        F::from_f64(one_minus_b1),
        F::from_f64(one_minus_b2),
        F::from_f64(step_size),
        F::from_f64(bc2_sqrt),
    );
    let (beta2, eps) = (F::from_f64(cfg.beta2), F::from_f64(cfg.eps));
    for i in 0..param.len() {
        let g = grad[i];
        let w = if cfg.weight_decay != 0.0 {
            param[i] * decay
        } else {
            param[i]
        };
        let m = exp_avg[i] + one_minus_b1 * (g - exp_avg[i]);
        let v = exp_avg_sq[i] * beta2 + (g * g) * one_minus_b2;
        let denom = v.sqrt() / bc2_sqrt + eps;
        exp_avg[i] = m;
        exp_avg_sq[i] = v;
        param[i] = w - step_size * (m / denom);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(weight_decay: f64) -> AdamWConfig {
        AdamWConfig {
            lr: 0.01,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay,
        }
    }

    /// Two steps by hand: w = 1, g = 0.5 then 0.25, lr 0.01, wd 0.1.
    /// Step 1: w = 1·(1 − 0.001) = 0.999; m = 0.05; v = 0.00025; m̂ = 0.5, √v̂ = 0.5,
    /// w = 0.999 − 0.01·0.5/(0.5 + 1e-8) = 0.989000000199…
    /// Step 2: w = 0.989·0.999 = 0.988011…; m = 0.045 + 0.025 = 0.07; v = 0.00024975 + 0.0000625
    /// = 0.00031225; m̂ = 0.07/0.19 = 0.368421…; v̂ = 0.00031225/0.001999 = 0.156203…,
    /// √v̂ = 0.395225…; w −= 0.01·0.932183… → 0.978689…
    #[test]
    fn two_steps_by_hand() {
        let c = cfg(0.1);
        let (mut w, mut m, mut v) = ([1.0f64], [0.0f64], [0.0f64]);
        adamw_step(&c, &mut w, &[0.5], &mut m, &mut v, 1).unwrap();
        assert!((m[0] - 0.05).abs() < 1e-15 && (v[0] - 0.00025).abs() < 1e-18);
        assert!(
            (w[0] - (0.999 - 0.01 * 0.5 / (0.5 + 1e-8))).abs() < 1e-15,
            "{w:?}"
        );
        let w1 = w[0];
        adamw_step(&c, &mut w, &[0.25], &mut m, &mut v, 2).unwrap();
        assert!((m[0] - 0.07).abs() < 1e-15, "{m:?}");
        assert!((v[0] - 0.000_312_25).abs() < 1e-17, "{v:?}");
        let m_hat = 0.07 / (1.0 - 0.81);
        let v_hat: f64 = 0.000_312_25 / (1.0 - 0.998_001);
        let want = w1 * 0.999 - 0.01 * m_hat / (v_hat.sqrt() + 1e-8);
        assert!((w[0] - want).abs() < 1e-14, "{} vs {want}", w[0]);
        assert!((w[0] - 0.978_689).abs() < 1e-6, "{w:?}");
    }

    /// Without decay a zero gradient leaves the parameter where it is on the first step
    /// (m = 0), and the decay alone shrinks it by lr·wd.
    #[test]
    fn zero_gradient_only_decays() {
        let (mut w, mut m, mut v) = ([2.0f64], [0.0f64], [0.0f64]);
        adamw_step(&cfg(0.0), &mut w, &[0.0], &mut m, &mut v, 1).unwrap();
        assert_eq!(w, [2.0]);
        adamw_step(&cfg(0.5), &mut w, &[0.0], &mut m, &mut v, 2).unwrap();
        assert!((w[0] - 2.0 * (1.0 - 0.005)).abs() < 1e-15, "{w:?}");
    }

    /// The update is invariant to the gradient's scale (up to ε): Adam's defining property.
    #[test]
    fn scale_invariant() {
        let run = |s: f64| {
            let (mut w, mut m, mut v) = ([0.3f64, -0.7], [0.0; 2], [0.0; 2]);
            for t in 1..=5 {
                let g = [s * (w[0] - 0.1 * t as f64), s * w[1] * w[1]];
                adamw_step(&cfg(0.0), &mut w, &g, &mut m, &mut v, t).unwrap();
            }
            w
        };
        let (a, b) = (run(1.0), run(1000.0));
        for (x, y) in a.iter().zip(&b) {
            assert!((x - y).abs() < 1e-7, "{a:?} vs {b:?}");
        }
    }

    /// f32 rounds each operation in the documented order.
    #[test]
    fn f32_rounds_each_operation() {
        let c = cfg(0.05);
        let (w0, g0, m0, v0) = (0.3f32, -1.7f32, 0.25f32, 0.5f32);
        let (mut w, mut m, mut v) = ([w0], [m0], [v0]);
        adamw_step(&c, &mut w, &[g0], &mut m, &mut v, 3).unwrap();
        let [d, b1, b2, ss, bc] = step_scalars(&c, 3).map(|x| x as f32);
        let mm = m0 + b1 * (g0 - m0);
        let vv = v0 * 0.999f32 + (g0 * g0) * b2;
        let ww = w0 * d - ss * (mm / (vv.sqrt() / bc + 1e-8f32));
        assert_eq!(
            (m[0].to_bits(), v[0].to_bits()),
            (mm.to_bits(), vv.to_bits())
        );
        assert_eq!(w[0].to_bits(), ww.to_bits());
    }

    #[test]
    fn bad_input_is_named() {
        let (mut w, mut m, mut v) = ([0.0f64; 2], [0.0f64; 2], [0.0f64; 2]);
        let e = adamw_step(&cfg(0.0), &mut w, &[1.0], &mut m, &mut v, 1).unwrap_err();
        assert!(matches!(e, SarError::Length { what: "grad", .. }), "{e}");
        let e = adamw_step(&cfg(0.0), &mut w, &[1.0; 2], &mut m, &mut v, 0).unwrap_err();
        assert!(matches!(e, SarError::Shape { .. }), "{e}");
        let mut bad = cfg(0.0);
        bad.beta2 = 1.0;
        let e = adamw_step(&bad, &mut w, &[1.0; 2], &mut m, &mut v, 1).unwrap_err();
        assert!(matches!(e, SarError::Param { name: "beta2", .. }), "{e}");
        let mut short = [0.0f64; 1];
        assert!(adamw_step(&cfg(0.0), &mut w, &[1.0; 2], &mut short, &mut v, 1).is_err());
    }
}
