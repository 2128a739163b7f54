//! DisAlign (Zhang et al., CVPR 2021), the second-stage method of the paper's Table 3:
//! adaptive calibration of a frozen model's logits and the generalized re-weighting of its loss.
//!
//! **Adaptive calibration.** Logits z `[N, C]` of a frozen classifier, a confidence gate
//! σ_i = sigmoid(g_i) per row (g_i = v·x_i + b from the row's feature x_i, or a per-pixel 1×1
//! convolution in segmentation), a per-class scale s `[C]` and margin m `[C]`. The released
//! code has two forms:
//!
//! | form | z'_ic | at s = 1, m = 0 |
//! |---|---|---|
//! | [`CalibrationForm::Classification`] (`DisAlignLinear`) | (1 + σ_i s_c)·z_ic + σ_i m_c | (1 + σ_i)·z |
//! | [`CalibrationForm::Segmentation`] (`DisAlignFCNHead`) | σ_i (s_c z_ic + m_c) + (1 − σ_i)·z_ic | z |
//!
//! Gradients (with G = ∂L/∂z'): ∂L/∂s_c = Σ_i G_ic σ_i z_ic, ∂L/∂m_c = Σ_i G_ic σ_i, and
//! ∂L/∂g_i = σ_i(1 − σ_i)·Σ_c G_ic·a_ic with a_ic = s_c z_ic + m_c (classification) or
//! s_c z_ic + m_c − z_ic (segmentation).
//!
//! **Generalized re-weighting.** With the reference distribution r_c = n_c / Σ_k n_k and the
//! exponent ρ: w_c = r_c^(−ρ), rescaled so that the weights average to one, w_c ← C·w_c / Σ_k w_k.
//! Every class needs n_c > 0 (r_c^(−ρ) is infinite otherwise).

use crate::error::{check_len, mul_dims, Op, Result, SarError};
use crate::real::Real;

/// Which of the released code's two calibrations (see the module documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CalibrationForm {
    /// (1 + σ s) z + σ m.
    Classification,
    /// σ (s z + m) + (1 − σ) z.
    Segmentation,
}

fn check(op: Op, logits: usize, gate: usize, scale: usize, bias: usize) -> Result<(usize, usize)> {
    let (n, c) = (gate, scale);
    if n == 0 || c == 0 {
        return Err(SarError::Shape {
            op,
            what: "need at least one row and one class",
        });
    }
    check_len(op, "logits", logits, mul_dims(op, &[n, c])?)?;
    check_len(op, "bias", bias, c)?;
    Ok((n, c))
}

fn sigmoid<F: Real>(g: F) -> F {
    F::one() / (F::one() + (-g).exp())
}

/// Writes the calibrated logits z' `[N, C]` of `logits` `[N, C]` with the gate's logits
/// `gate` `[N]`, `scale` and `bias` `[C]`.
pub fn calibrate<F: Real>(
    logits: &[F],
    gate: &[F],
    scale: &[F],
    bias: &[F],
    form: CalibrationForm,
    out: &mut [F],
) -> Result<()> {
    let op = Op::DisAlign;
    let (n, c) = check(op, logits.len(), gate.len(), scale.len(), bias.len())?;
    check_len(op, "out", out.len(), n * c)?;
    for i in 0..n {
        let s = sigmoid(gate[i]);
        for k in 0..c {
            let z = logits[i * c + k];
            out[i * c + k] = match form {
                CalibrationForm::Classification => (F::one() + s * scale[k]) * z + s * bias[k],
                CalibrationForm::Segmentation => s * (scale[k] * z + bias[k]) + (F::one() - s) * z,
            };
        }
    }
    Ok(())
}

/// The gradients of [`calibrate`] from `grad` = ∂L/∂z' `[N, C]`: ∂L/∂scale and ∂L/∂bias `[C]`
/// (overwritten) and ∂L/∂gate `[N]` (overwritten). The logits are constants (a frozen model).
#[allow(clippy::too_many_arguments)]
pub fn calibrate_backward<F: Real>(
    logits: &[F],
    gate: &[F],
    scale: &[F],
    bias: &[F],
    form: CalibrationForm,
    grad: &[F],
    grad_scale: &mut [F],
    grad_bias: &mut [F],
    grad_gate: &mut [F],
) -> Result<()> {
    let op = Op::DisAlign;
    let (n, c) = check(op, logits.len(), gate.len(), scale.len(), bias.len())?;
    check_len(op, "grad", grad.len(), n * c)?;
    check_len(op, "grad_scale", grad_scale.len(), c)?;
    check_len(op, "grad_bias", grad_bias.len(), c)?;
    check_len(op, "grad_gate", grad_gate.len(), n)?;
    grad_scale.fill(F::zero());
    grad_bias.fill(F::zero());
    for i in 0..n {
        let s = sigmoid(gate[i]);
        let mut dg = F::zero();
        for k in 0..c {
            let (z, g) = (logits[i * c + k], grad[i * c + k]);
            grad_scale[k] = grad_scale[k] + g * s * z;
            grad_bias[k] = grad_bias[k] + g * s;
            let a = scale[k] * z + bias[k];
            dg = dg
                + g * match form {
                    CalibrationForm::Classification => a,
                    CalibrationForm::Segmentation => a - z,
                };
        }
        grad_gate[i] = dg * s * (F::one() - s);
    }
    Ok(())
}

/// Writes the generalized re-weighting w `[C]` of the class counts with exponent `rho`.
///
/// ```
/// // r = (0.8, 0.2), ρ = 1: r^−1 = (1.25, 5), rescaled to mean 1: (0.4, 1.6).
/// let mut w = [0.0; 2];
/// sar_math::disalign::grw_weights(&[80, 20], 1.0, &mut w).unwrap();
/// assert!((w[0] - 0.4).abs() < 1e-15 && (w[1] - 1.6).abs() < 1e-15);
/// ```
pub fn grw_weights(counts: &[u64], rho: f64, out: &mut [f64]) -> Result<()> {
    let op = Op::DisAlign;
    check_len(op, "weights", out.len(), counts.len())?;
    if !(rho.is_finite() && rho >= 0.0) {
        return Err(SarError::Param {
            op,
            name: "rho",
            value: rho,
            domain: "[0, inf)",
        });
    }
    if counts.is_empty() {
        return Err(SarError::Shape {
            op,
            what: "need at least one class",
        });
    }
    if counts.contains(&0) {
        return Err(SarError::Shape {
            op,
            what: "generalized re-weighting needs every class in the training set (n_c > 0)",
        });
    }
    let total: f64 = counts.iter().map(|&n| n as f64).sum();
    for (w, &n) in out.iter_mut().zip(counts) {
        *w = libm::pow(n as f64 / total, -rho);
    }
    let sum: f64 = out.iter().sum();
    let c = counts.len() as f64;
    out.iter_mut().for_each(|w| *w *= c / sum);
    Ok(())
}

/// The class-weighted cross-entropy as PyTorch's `cross_entropy(weight = w)` reduces it (the
/// classification DisAlign's loss): L = Σ_i w_{y_i}·(−log p_{i,y_i}) / Σ_i w_{y_i}, with
/// ∂L/∂z_ic = w_{y_i}·(p_ic − [c = y_i]) / Σ_i w_{y_i}. With `grad`, writes ∂L/∂z `[N, C]`.
pub fn weighted_cross_entropy<F: Real, L: crate::real::Label>(
    logits: &[F],
    labels: &[L],
    weights: &[f64],
    grad: Option<&mut [F]>,
) -> Result<F> {
    let op = Op::DisAlign;
    let c = weights.len();
    crate::mislas::check_class_rows(op, logits, labels, c, grad.as_deref().map(<[F]>::len))?;
    if let Some(&w) = weights.iter().find(|w| !(w.is_finite() && **w >= 0.0)) {
        return Err(SarError::Param {
            op,
            name: "weights",
            value: w,
            domain: "[0, inf)",
        });
    }
    let total_w: f64 = labels.iter().map(|y| weights[y.to_i64() as usize]).sum();
    if total_w <= 0.0 {
        return Err(SarError::Shape {
            op,
            what: "the batch's labels all have weight 0",
        });
    }
    let inv = F::from_f64(1.0 / total_w);
    let mut total = F::zero();
    let mut grad = grad;
    for (i, y) in labels.iter().enumerate() {
        let y = y.to_i64() as usize;
        let w = F::from_f64(weights[y]);
        let row = &logits[i * c..(i + 1) * c];
        let log_sum = crate::mislas::log_sum_exp(row);
        total = total + w * (log_sum - row[y]);
        if let Some(g) = grad.as_deref_mut() {
            for (k, (gk, &z)) in g[i * c..(i + 1) * c].iter_mut().zip(row).enumerate() {
                let hot = if k == y { F::one() } else { F::zero() };
                *gk = w * ((z - log_sum).exp() - hot) * inv;
            }
        }
    }
    Ok(total * inv)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calibration_by_hand() {
        // One row, C = 2, g = 0 (σ = ½), z = (2, −1), s = (3, 1), m = (1, −2).
        let (z, g, s, m) = ([2.0f64, -1.0], [0.0], [3.0, 1.0], [1.0, -2.0]);
        let mut out = [0.0; 2];
        calibrate(&z, &g, &s, &m, CalibrationForm::Classification, &mut out).unwrap();
        // (1 + 1.5)·2 + 0.5 = 5.5; (1 + 0.5)·(−1) − 1 = −2.5.
        assert_eq!(out, [5.5, -2.5]);
        calibrate(&z, &g, &s, &m, CalibrationForm::Segmentation, &mut out).unwrap();
        // ½(6 + 1) + ½·2 = 4.5; ½(−1 − 2) + ½·(−1) = −2.
        assert_eq!(out, [4.5, -2.0]);
        // The segmentation form starts as the identity.
        calibrate(
            &z,
            &[3.0],
            &[1.0, 1.0],
            &[0.0, 0.0],
            CalibrationForm::Segmentation,
            &mut out,
        )
        .unwrap();
        assert_eq!(out, z);
    }

    #[test]
    fn gradients_match_finite_differences() {
        let z = [0.5f64, -1.0, 2.0, 1.5, 0.25, -0.75];
        let g = [0.3, -0.8];
        let s = [1.2, 0.7, -0.4];
        let m = [0.1, -0.3, 0.6];
        let w = [0.9, -0.2, 0.4, 1.1, 0.5, -0.7]; // L = Σ w ⊙ z'
        for form in [
            CalibrationForm::Classification,
            CalibrationForm::Segmentation,
        ] {
            let loss = |g: &[f64], s: &[f64], m: &[f64]| {
                let mut out = [0.0; 6];
                calibrate(&z, g, s, m, form, &mut out).unwrap();
                out.iter().zip(&w).map(|(a, b)| a * b).sum::<f64>()
            };
            let (mut gs, mut gm, mut gg) = ([0.0; 3], [0.0; 3], [0.0; 2]);
            calibrate_backward(&z, &g, &s, &m, form, &w, &mut gs, &mut gm, &mut gg).unwrap();
            let h = 1e-6;
            let fd = |f: &dyn Fn(f64) -> f64| (f(h) - f(-h)) / (2.0 * h);
            for k in 0..3 {
                let d = fd(&|e| {
                    let mut s2 = s;
                    s2[k] += e;
                    loss(&g, &s2, &m)
                });
                assert!((d - gs[k]).abs() < 1e-9, "{form:?} scale {k}");
                let d = fd(&|e| {
                    let mut m2 = m;
                    m2[k] += e;
                    loss(&g, &s, &m2)
                });
                assert!((d - gm[k]).abs() < 1e-9, "{form:?} bias {k}");
            }
            for i in 0..2 {
                let d = fd(&|e| {
                    let mut g2 = g;
                    g2[i] += e;
                    loss(&g2, &s, &m)
                });
                assert!((d - gg[i]).abs() < 1e-9, "{form:?} gate {i}");
            }
        }
    }

    #[test]
    fn weighted_cross_entropy_by_hand_and_by_finite_differences() {
        // Rows z = (0, ln 3) (p = ¼, ¾) label 0 and z = (0, 0) (p = ½, ½) label 1;
        // w = (2, 1): L = (2·ln 4 + ln 2) / 3.
        let z = [0.0f64, 3f64.ln(), 0.0, 0.0];
        let mut g = [0.0; 4];
        let l = weighted_cross_entropy(&z, &[0i64, 1], &[2.0, 1.0], Some(&mut g)).unwrap();
        assert!((l - (2.0 * 4f64.ln() + 2f64.ln()) / 3.0).abs() < 1e-15);
        // Row 0: 2·(¼ − 1, ¾)/3; row 1: (½, ½ − 1)/3.
        let want = [-0.5, 0.5, 0.5 / 3.0, -0.5 / 3.0];
        for (a, b) in g.iter().zip(want) {
            assert!((a - b).abs() < 1e-15, "{g:?}");
        }
        let z = [0.3f64, -1.2, 2.0, 0.7, 0.1, -0.4];
        let (y, w) = ([2i64, 0], [0.5, 1.0, 3.0]);
        let mut g = [0.0; 6];
        weighted_cross_entropy(&z, &y, &w, Some(&mut g)).unwrap();
        for k in 0..6 {
            let (mut zp, mut zm) = (z, z);
            zp[k] += 1e-6;
            zm[k] -= 1e-6;
            let fd = (weighted_cross_entropy(&zp, &y, &w, None).unwrap()
                - weighted_cross_entropy(&zm, &y, &w, None).unwrap())
                / 2e-6;
            assert!((fd - g[k]).abs() < 1e-9, "z[{k}]");
        }
        assert!(weighted_cross_entropy(&z, &[3i64, 0], &w, None).is_err());
        assert!(weighted_cross_entropy(&z, &y, &[0.0, 1.0, 0.0], None).is_err());
    }

    #[test]
    fn grw_by_hand_and_refusals() {
        // r = (0.5, 0.25, 0.25), ρ = 2: r^−2 = (4, 16, 16), sum 36, ×3/36: (⅓, 4/3, 4/3).
        let mut w = [0.0; 3];
        grw_weights(&[2, 1, 1], 2.0, &mut w).unwrap();
        assert!((w[0] - 1.0 / 3.0).abs() < 1e-15 && (w[1] - 4.0 / 3.0).abs() < 1e-15);
        grw_weights(&[5, 1, 9], 0.0, &mut w).unwrap();
        assert_eq!(w, [1.0; 3], "ρ = 0 is the plain cross-entropy");
        assert!(grw_weights(&[2, 0, 1], 1.0, &mut w).is_err());
        assert!(grw_weights(&[2, 1, 1], -1.0, &mut w).is_err());
        assert!(grw_weights(&[2, 1], 1.0, &mut w).is_err());
        let mut out = [0.0; 2];
        assert!(calibrate(
            &[0.0; 3],
            &[0.0],
            &[1.0; 2],
            &[0.0; 2],
            CalibrationForm::Segmentation,
            &mut out
        )
        .is_err());
    }
}
