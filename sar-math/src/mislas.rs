//! MiSLAS's second stage (Zhong et al., CVPR 2021), the long-tail method SAR is stacked under
//! in the paper's Table 10: label-aware smoothing.
//!
//! **Per-class smoothing.** With n_c the training images of class c, n_1 = max_c n_c and
//! n_K = min_c n_c, r_c = (n_c − n_K)/(n_1 − n_K) ∈ [0, 1] (0 for the rarest class, 1 for the
//! most common) and ε_h, ε_t the head's and the tail's smoothing:
//!
//! | shape | ε_c |
//! |---|---|
//! | concave (MiSLAS's default) | ε_t + (ε_h − ε_t)·sin(r_c·π/2) |
//! | linear | ε_t + (ε_h − ε_t)·r_c |
//! | convex | ε_h + (ε_h − ε_t)·sin(3π/2 + r_c·π/2) |
//! | exp with power p | ε_t + (ε_h − ε_t)·r_c^p |
//!
//! (MiSLAS writes the sine's argument as (n_c − n_K)·π / (2(n_1 − n_K)); the same number.)
//! All four run from ε_t at the rarest class to ε_h at the most common. Equal counts leave r
//! undefined (MiSLAS divides by zero) and are refused.
//!
//! **Loss.** Logits z `[N, C]` row-major, labels y `[N]`, log-probabilities
//! log p_ic = z_ic − log Σ_k exp z_ik, ε_i = ε_{y_i}:
//!
//! L = (1/N) Σ_i [ (1 − ε_i)·(−log p_{i,y_i}) + ε_i·(−(1/C) Σ_c log p_ic) ],
//!
//! i.e. cross-entropy against the target (1 − ε_i)·onehot(y_i) + ε_i/C, whose weights sum to
//! one, so ∂L/∂z_ic = (p_ic − (1 − ε_i)·[c = y_i] − ε_i/C) / N.

use crate::error::{check_len, mul_dims, Op, Result, SarError};
use crate::real::{Label, Real};

/// How ε_c moves between the tail's and the head's value (MiSLAS's `shape` and `power`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum SmoothingShape {
    /// ε_t + (ε_h − ε_t)·sin(r·π/2): MiSLAS's default.
    Concave,
    /// ε_t + (ε_h − ε_t)·r.
    Linear,
    /// ε_h + (ε_h − ε_t)·sin(3π/2 + r·π/2).
    Convex,
    /// ε_t + (ε_h − ε_t)·r^power.
    Exp {
        /// The exponent p > 0.
        power: f64,
    },
}

/// Writes ε_c for every class (`out.len()` = `counts.len()`).
///
/// ```
/// use sar_math::mislas::{label_aware_smoothing, SmoothingShape};
/// let mut eps = [0.0; 3];
/// label_aware_smoothing(&[100, 55, 10], 0.4, 0.1, SmoothingShape::Linear, &mut eps).unwrap();
/// assert!((eps[0] - 0.4).abs() < 1e-15 && (eps[1] - 0.25).abs() < 1e-15 && eps[2] == 0.1);
/// ```
pub fn label_aware_smoothing(
    counts: &[u64],
    head: f64,
    tail: f64,
    shape: SmoothingShape,
    out: &mut [f64],
) -> Result<()> {
    let op = Op::Smoothing;
    check_len(op, "smoothing", out.len(), counts.len())?;
    for (name, v) in [("smooth_head", head), ("smooth_tail", tail)] {
        if !(v.is_finite() && (0.0..=1.0).contains(&v)) {
            return Err(SarError::Param {
                op,
                name,
                value: v,
                domain: "[0, 1]",
            });
        }
    }
    if let SmoothingShape::Exp { power } = shape {
        if !(power.is_finite() && power > 0.0) {
            return Err(SarError::Param {
                op,
                name: "power",
                value: power,
                domain: "(0, inf)",
            });
        }
    }
    let (Some(&n1), Some(&nk)) = (counts.iter().max(), counts.iter().min()) else {
        return Err(SarError::Shape {
            op,
            what: "need at least one class",
        });
    };
    if n1 == nk {
        return Err(SarError::Shape {
            op,
            what: "label-aware smoothing needs unequal class counts (n_1 = n_K leaves r undefined)",
        });
    }
    let half_pi = core::f64::consts::FRAC_PI_2;
    for (e, &n) in out.iter_mut().zip(counts) {
        let r = (n - nk) as f64 / (n1 - nk) as f64;
        *e = match shape {
            SmoothingShape::Concave => tail + (head - tail) * libm::sin(r * half_pi),
            SmoothingShape::Linear => tail + (head - tail) * r,
            SmoothingShape::Convex => head + (head - tail) * libm::sin(3.0 * half_pi + r * half_pi),
            SmoothingShape::Exp { power } => tail + (head - tail) * libm::pow(r, power),
        };
    }
    Ok(())
}

/// Checks a cross-entropy's input: logits `[N, C]` with N = `labels.len()` ≥ 1 and C ≥ 1, every
/// label a class, every logit finite, and a gradient buffer (its length) of the logits' size.
pub(crate) fn check_class_rows<F: Real, L: Label>(
    op: Op,
    logits: &[F],
    labels: &[L],
    classes: usize,
    grad_len: Option<usize>,
) -> Result<()> {
    let n = labels.len();
    if n == 0 || classes == 0 {
        return Err(SarError::Shape {
            op,
            what: "need at least one row and one class",
        });
    }
    check_len(op, "logits", logits.len(), mul_dims(op, &[n, classes])?)?;
    if let Some(len) = grad_len {
        check_len(op, "grad", len, n * classes)?;
    }
    for (index, y) in labels.iter().enumerate() {
        let label = y.to_i64();
        if !(0..classes as i64).contains(&label) {
            return Err(SarError::Label {
                op,
                index,
                label,
                classes,
            });
        }
    }
    if logits.iter().any(|z| !z.is_finite()) {
        return Err(SarError::NonFinite { op, what: "logits" });
    }
    Ok(())
}

/// log Σ_k exp z_k of a row, shifted by its maximum.
pub(crate) fn log_sum_exp<F: Real>(row: &[F]) -> F {
    let m = row.iter().copied().fold(F::neg_infinity(), F::max);
    m + row.iter().fold(F::zero(), |a, &z| a + (z - m).exp()).ln()
}

/// The label-aware smoothed cross-entropy L of `logits` `[N, C]` and `labels` `[N]` with the
/// per-class smoothing `epsilon` `[C]`; with `grad`, writes ∂L/∂z `[N, C]`. Every label must be
/// a class (there is no ignore index here).
pub fn smoothed_cross_entropy<F: Real, L: Label>(
    logits: &[F],
    labels: &[L],
    epsilon: &[f64],
    grad: Option<&mut [F]>,
) -> Result<F> {
    let op = Op::Smoothing;
    let (n, c) = (labels.len(), epsilon.len());
    check_class_rows(op, logits, labels, c, grad.as_deref().map(<[F]>::len))?;
    if let Some(&e) = epsilon
        .iter()
        .find(|e| !(e.is_finite() && (0.0..=1.0).contains(*e)))
    {
        return Err(SarError::Param {
            op,
            name: "epsilon",
            value: e,
            domain: "[0, 1]",
        });
    }
    let (inv_n, inv_c) = (F::one() / F::from_usize(n), F::one() / F::from_usize(c));
    let mut total = F::zero();
    let mut grad = grad;
    for (i, y) in labels.iter().enumerate() {
        let y = y.to_i64() as usize;
        let row = &logits[i * c..(i + 1) * c];
        let log_sum = log_sum_exp(row);
        let eps = F::from_f64(epsilon[y]);
        let nll = log_sum - row[y];
        let mean_nll = row.iter().fold(F::zero(), |a, &z| a + (log_sum - z)) * inv_c;
        total = total + (F::one() - eps) * nll + eps * mean_nll;
        if let Some(g) = grad.as_deref_mut() {
            for (k, (gk, &z)) in g[i * c..(i + 1) * c].iter_mut().zip(row).enumerate() {
                let target = eps * inv_c + if k == y { F::one() - eps } else { F::zero() };
                *gk = ((z - log_sum).exp() - target) * inv_n;
            }
        }
    }
    Ok(total * inv_n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smoothing_shapes_by_hand() {
        // counts 100, 55, 10: r = 1, 0.5, 0; ε_h = 0.4, ε_t = 0.1.
        let counts = [100u64, 55, 10];
        let mut e = [0.0; 3];
        label_aware_smoothing(&counts, 0.4, 0.1, SmoothingShape::Concave, &mut e).unwrap();
        let s = core::f64::consts::FRAC_1_SQRT_2; // sin(π/4)
        assert!((e[0] - 0.4).abs() < 1e-15);
        assert!((e[1] - (0.1 + 0.3 * s)).abs() < 1e-15);
        assert!((e[2] - 0.1).abs() < 1e-15);
        label_aware_smoothing(&counts, 0.4, 0.1, SmoothingShape::Convex, &mut e).unwrap();
        // sin(3π/2) = −1, sin(7π/4) = −1/√2, sin(2π) = 0.
        assert!((e[0] - 0.4).abs() < 1e-15);
        assert!((e[1] - (0.4 - 0.3 * s)).abs() < 1e-15);
        assert!((e[2] - 0.1).abs() < 1e-15);
        label_aware_smoothing(
            &counts,
            0.4,
            0.1,
            SmoothingShape::Exp { power: 2.0 },
            &mut e,
        )
        .unwrap();
        assert!((e[1] - 0.175).abs() < 1e-15, "0.1 + 0.3·0.25");
        // The rule also runs downward (ε_h < ε_t) and the order of classes does not matter.
        label_aware_smoothing(&[10, 100], 0.0, 0.2, SmoothingShape::Linear, &mut e[..2]).unwrap();
        assert_eq!(&e[..2], &[0.2, 0.0]);
    }

    #[test]
    fn smoothing_refuses_what_it_cannot_define() {
        let mut e = [0.0; 2];
        let lin = SmoothingShape::Linear;
        assert!(label_aware_smoothing(&[5, 5], 0.4, 0.1, lin, &mut e).is_err());
        assert!(label_aware_smoothing(&[5, 6], 1.5, 0.1, lin, &mut e).is_err());
        assert!(label_aware_smoothing(&[5, 6], 0.4, f64::NAN, lin, &mut e).is_err());
        let exp0 = SmoothingShape::Exp { power: 0.0 };
        assert!(label_aware_smoothing(&[5, 6], 0.4, 0.1, exp0, &mut e).is_err());
        assert!(label_aware_smoothing(&[5, 6, 7], 0.4, 0.1, lin, &mut e).is_err());
        assert!(label_aware_smoothing(&[], 0.4, 0.1, lin, &mut []).is_err());
    }

    #[test]
    fn loss_and_gradient_by_hand() {
        // One row, C = 2, z = (0, ln 3): p = (1/4, 3/4); y = 0, ε_0 = 0.5.
        // L = 0.5·(−ln ¼) + 0.5·½·(−ln ¼ − ln ¾) = 0.5 ln 4 + 0.25 (ln 4 + ln 4/3).
        let z = [0.0f64, 3f64.ln()];
        let mut g = [0.0; 2];
        let l = smoothed_cross_entropy(&z, &[0i64], &[0.5, 0.0], Some(&mut g)).unwrap();
        let want = 0.5 * 4f64.ln() + 0.25 * (4f64.ln() + (4.0f64 / 3.0).ln());
        assert!((l - want).abs() < 1e-15, "{l} vs {want}");
        // Target (0.5 + 0.25, 0.25): ∂L/∂z = (¼ − ¾, ¾ − ¼).
        assert!(
            (g[0] + 0.5).abs() < 1e-15 && (g[1] - 0.5).abs() < 1e-15,
            "{g:?}"
        );
        // ε = 0 is the plain cross-entropy, averaged over rows.
        let z = [1.0f64, 2.0, 3.0, 0.5, -1.0, 2.0];
        let l = smoothed_cross_entropy(&z, &[2u8, 0], &[0.0; 3], None).unwrap();
        let ce = |r: &[f64], y: usize| r.iter().map(|v| v.exp()).sum::<f64>().ln() - r[y];
        assert!((l - (ce(&z[..3], 2) + ce(&z[3..], 0)) / 2.0).abs() < 1e-14);
    }

    #[test]
    fn gradient_matches_finite_differences() {
        let z = [
            0.3f64, -1.2, 2.0, 0.7, 0.1, -0.4, 1.5, -2.2, 0.0, 0.9, 0.4, -0.3,
        ];
        let (y, eps) = ([1i64, 3, 0], [0.3, 0.05, 0.2, 0.4]);
        let mut g = [0.0; 12];
        smoothed_cross_entropy(&z, &y, &eps, Some(&mut g)).unwrap();
        for k in 0..z.len() {
            let h = 1e-6;
            let (mut zp, mut zm) = (z, z);
            zp[k] += h;
            zm[k] -= h;
            let fd = (smoothed_cross_entropy(&zp, &y, &eps, None).unwrap()
                - smoothed_cross_entropy(&zm, &y, &eps, None).unwrap())
                / (2.0 * h);
            assert!((fd - g[k]).abs() < 1e-9, "z[{k}]: {fd} vs {}", g[k]);
        }
        // Each row's gradient sums to zero (the target's weights sum to one).
        for r in 0..3 {
            assert!(g[r * 4..r * 4 + 4].iter().sum::<f64>().abs() < 1e-15);
        }
    }

    #[test]
    fn bad_inputs_are_errors() {
        let z = [0.0f32; 4];
        assert!(smoothed_cross_entropy(&z, &[2i64, 0], &[0.1, 0.1], None).is_err());
        assert!(smoothed_cross_entropy(&z, &[0i64], &[0.1, 0.1], None).is_err());
        assert!(smoothed_cross_entropy(&z, &[0i64, 1], &[0.1, 1.5], None).is_err());
        assert!(smoothed_cross_entropy(&[f32::NAN; 4], &[0i64, 1], &[0.1; 2], None).is_err());
        let mut short = [0.0f32; 3];
        assert!(smoothed_cross_entropy(&z, &[0i64, 1], &[0.1; 2], Some(&mut short)).is_err());
        let empty: [i64; 0] = [];
        assert!(smoothed_cross_entropy(&[] as &[f32], &empty, &[0.1], None).is_err());
    }
}
