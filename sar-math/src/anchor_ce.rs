//! Anchor cross-entropy with re-weighting (Eq. 5–7, spec §3) and the δ gate (spec §4).
//!
//! Input: anchor logits Z ∈ R^{C×C}, row-major; row c = the shared classifier applied to the
//! embedded anchor E_c.
//!
//! - ℓ_c = −ln softmax(Z_c)\[c\], computed in log space as ℓ_c = (m − Z_cc) + ln Σ_j e^{Z_cj − m}
//!   with m = max_j Z_cj, and p_c = e^{−ℓ_c}.
//! - Eq. 6: q_c = 1 if p_c > τ, else p_c. Eq. 7: w_c = ln q_c / (Σ_i ln q_i + ε), ε = 1e-9.
//! - L_aux = Σ_c w_c ℓ_c (a sum over classes). With U = {c : p_c ≤ τ} and S = Σ_{i∈U} ℓ_i this is
//!   Σ_{c∈U} ℓ_c² / (S − ε).
//! - Attached weights (default): dL/dℓ_c = (2ℓ_c − L)/(S − ε) for c ∈ U, else 0.
//!   Detached weights: dL/dℓ_c = w_c.
//! - [`WeightMode::Uniform`] (no re-weighting, Table 7's ablation): w_c = 1/C for every anchor,
//!   L_aux = (1/C) Σ_c ℓ_c, dL/dℓ_c = 1/C; U and S are still reported.
//! - dL/dZ_cj = dL/dℓ_c · (softmax(Z_c)_j − [j = c]).
//! - U empty ⇒ every w_c = 0, L = 0 exactly, zero gradient.
//!
//! Numerics: L is accumulated as Σ w_c ℓ_c and the attached gradient as
//! w_c + (ℓ_c − L)/(S − ε), which cannot overflow where Σ ℓ² would. Since every c ∈ U has
//! ℓ_c ≥ −ln τ, S > ε and hence w ≥ 0, L ≥ 0 whenever τ < 1 − 1e-9; for τ closer to 1 the
//! released formula itself can give w < 0 (S < ε), and this kernel reproduces it.
//! A non-finite logit, or a logit range so wide that ℓ_c overflows, is an error.
//!
//! Gate: anchor c passes iff argmax_j Z_cj = c (first maximum, as PyTorch's `argmax`) and
//! ℓ_c < −ln δ. [`GateMode::Global`] passes iff every anchor passes.

use crate::config::{check_range, GateMode, WeightMode};
use crate::error::{check_len, mul_dims, Op, Result, SarError};
use crate::real::Real;

/// ε of Eq. 7.
pub const EPSILON: f64 = 1e-9;

/// Output buffers of [`anchor_ce`], each of length C except `grad_logits` (C×C).
#[derive(Debug)]
pub struct AnchorCeBuffers<'a, F> {
    /// p_c = softmax(Z_c)\[c\].
    pub confidence: &'a mut [F],
    /// ℓ_c = −ln p_c (the per-anchor cross-entropy).
    pub nll: &'a mut [F],
    /// w_c of Eq. 7.
    pub weights: &'a mut [F],
    /// dL_aux/dZ (unweighted by λ1); `None` skips the backward pass.
    pub grad_logits: Option<&'a mut [F]>,
}

/// Scalar results of [`anchor_ce`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AnchorCeValue<F> {
    /// L_aux (unweighted).
    pub loss: F,
    /// |U|: anchors whose confidence is at most τ.
    pub uncertain: usize,
    /// S = Σ_{c∈U} ℓ_c.
    pub nll_sum: F,
}

/// A row's maximum m and ln Σ_j e^{Z_j − m}, kept apart: ℓ_c = (m − Z_c) + ln s keeps the
/// small NLL of a dominant logit that m + ln s would round away at |Z| ≈ 100 in f32.
#[inline]
fn max_and_log_sum<F: Real>(row: &[F]) -> (F, F) {
    let m = row.iter().copied().fold(F::neg_infinity(), F::max);
    let s = row.iter().fold(F::zero(), |acc, &z| acc + (z - m).exp());
    (m, s.ln())
}

fn check_logits<F: Real>(op: Op, logits: &[F], classes: usize) -> Result<()> {
    if classes == 0 {
        return Err(SarError::Shape {
            op,
            what: "classes must be at least 1",
        });
    }
    check_len(
        op,
        "anchor logits",
        logits.len(),
        mul_dims(op, &[classes, classes])?,
    )?;
    if logits.iter().any(|z| !z.is_finite()) {
        return Err(SarError::NonFinite {
            op,
            what: "anchor logits",
        });
    }
    Ok(())
}

/// Computes L_aux, p, ℓ, w and (optionally) dL_aux/dZ for `classes` anchors.
///
/// ```
/// use sar_math::anchor_ce::{anchor_ce, AnchorCeBuffers};
/// use sar_math::WeightMode;
/// // Two anchors, uniform logits: p = 0.5 each, ℓ = ln 2, w = 1/2 each, L = ln 2.
/// let z = [0.0f64; 4];
/// let (mut p, mut l, mut w) = ([0.0; 2], [0.0; 2], [0.0; 2]);
/// let v = anchor_ce(&z, 2, 0.9, WeightMode::Attached, AnchorCeBuffers {
///     confidence: &mut p, nll: &mut l, weights: &mut w, grad_logits: None }).unwrap();
/// assert!((v.loss - 2f64.ln()).abs() < 1e-9);
/// ```
pub fn anchor_ce<F: Real>(
    logits: &[F],
    classes: usize,
    tau: f64,
    mode: WeightMode,
    out: AnchorCeBuffers<'_, F>,
) -> Result<AnchorCeValue<F>> {
    let op = Op::AnchorCe;
    check_logits(op, logits, classes)?;
    check_range(op, "tau", tau, 0.0, 1.0, false, "[0, 1]")?;
    check_len(op, "confidence", out.confidence.len(), classes)?;
    check_len(op, "nll", out.nll.len(), classes)?;
    check_len(op, "weights", out.weights.len(), classes)?;
    if let Some(g) = &out.grad_logits {
        check_len(op, "grad_logits", g.len(), classes * classes)?;
    }
    let tau_f = F::from_f64(tau);
    let eps = F::from_f64(EPSILON);

    // Forward: ℓ_c, p_c, membership in U and S.
    let mut s = F::zero();
    let mut uncertain = 0usize;
    for c in 0..classes {
        let row = &logits[c * classes..(c + 1) * classes];
        // m ≥ Z_cc and ln s ≥ 0 (s ≥ 1) hold in floating point too, so ℓ_c ≥ 0.
        let (m, ln_s) = max_and_log_sum(row);
        let nll = (m - row[c]) + ln_s;
        if !nll.is_finite() {
            return Err(SarError::NonFinite {
                op,
                what: "anchor cross-entropy (logit range overflows)",
            });
        }
        let p = (-nll).exp();
        out.nll[c] = nll;
        out.confidence[c] = p;
        if p <= tau_f {
            s = s + nll;
            uncertain += 1;
        }
    }
    if !s.is_finite() {
        return Err(SarError::NonFinite {
            op,
            what: "sum of anchor cross-entropies",
        });
    }

    // Eq. 7 and L_aux = Σ w_c ℓ_c.
    let denom = s - eps; // = −(Σ ln q_i + ε)
    let uniform = F::one() / F::from_f64(classes as f64);
    let mut loss = F::zero();
    for c in 0..classes {
        let w = if mode == WeightMode::Uniform {
            uniform
        } else if out.confidence[c] <= tau_f {
            out.nll[c] / denom
        } else {
            F::zero()
        };
        out.weights[c] = w;
        loss = loss + w * out.nll[c];
    }
    if uncertain == 0 && mode != WeightMode::Uniform {
        loss = F::zero();
    }
    if !loss.is_finite() {
        return Err(SarError::NonFinite { op, what: "L_aux" });
    }

    if let Some(grad) = out.grad_logits {
        for c in 0..classes {
            let in_u = out.confidence[c] <= tau_f;
            let g_c = match (in_u, mode) {
                (_, WeightMode::Uniform) => uniform,
                (false, _) => F::zero(),
                (true, WeightMode::Attached) => out.weights[c] + (out.nll[c] - loss) / denom,
                (true, WeightMode::Detached) => out.weights[c],
            };
            let row = &logits[c * classes..(c + 1) * classes];
            let grow = &mut grad[c * classes..(c + 1) * classes];
            if g_c == F::zero() {
                grow.iter_mut().for_each(|g| *g = F::zero());
                continue;
            }
            let (m, ln_s) = max_and_log_sum(row);
            for (j, (g, &z)) in grow.iter_mut().zip(row).enumerate() {
                let sm = ((z - m) - ln_s).exp();
                let onehot = if j == c { F::one() } else { F::zero() };
                *g = g_c * (sm - onehot);
            }
            if grow.iter().any(|g| !g.is_finite()) {
                return Err(SarError::NonFinite {
                    op,
                    what: "gradient of L_aux",
                });
            }
        }
    }
    Ok(AnchorCeValue {
        loss,
        uncertain,
        nll_sum: s,
    })
}

/// [`anchor_ce`]'s outputs in vectors of their own (feature `alloc`).
#[cfg(feature = "alloc")]
#[derive(Debug, Clone, PartialEq)]
pub struct AnchorCeOwned<F> {
    /// L_aux, |U| and S.
    pub value: AnchorCeValue<F>,
    /// p_c, `[C]`.
    pub confidence: alloc::vec::Vec<F>,
    /// ℓ_c, `[C]`.
    pub nll: alloc::vec::Vec<F>,
    /// w_c, `[C]`.
    pub weights: alloc::vec::Vec<F>,
    /// dL_aux/dZ, `[C, C]`.
    pub grad_logits: alloc::vec::Vec<F>,
}

/// [`anchor_ce`] with the gradient, allocating its outputs (after the logits are validated, so
/// a wrong C cannot make it allocate).
#[cfg(feature = "alloc")]
pub fn anchor_ce_owned<F: Real>(
    logits: &[F],
    classes: usize,
    tau: f64,
    mode: WeightMode,
) -> Result<AnchorCeOwned<F>> {
    check_logits(Op::AnchorCe, logits, classes)?;
    let zeros = |n: usize| alloc::vec![F::zero(); n];
    let (mut confidence, mut nll, mut weights, mut grad_logits) = (
        zeros(classes),
        zeros(classes),
        zeros(classes),
        zeros(logits.len()),
    );
    let value = anchor_ce(
        logits,
        classes,
        tau,
        mode,
        AnchorCeBuffers {
            confidence: &mut confidence,
            nll: &mut nll,
            weights: &mut weights,
            grad_logits: Some(&mut grad_logits),
        },
    )?;
    Ok(AnchorCeOwned {
        value,
        confidence,
        nll,
        weights,
        grad_logits,
    })
}

/// The δ gate: writes the per-anchor test into `pass` and returns the decision of `mode`
/// (global: every anchor passes; per-class: at least one anchor passes).
///
/// `nll` is ℓ from [`anchor_ce`]. δ = 0 makes the confidence test always true, δ = 1 never.
pub fn gate<F: Real>(
    logits: &[F],
    classes: usize,
    nll: &[F],
    delta: f64,
    mode: GateMode,
    pass: &mut [bool],
) -> Result<bool> {
    let op = Op::Gate;
    check_logits(op, logits, classes)?;
    check_range(op, "delta", delta, 0.0, 1.0, false, "[0, 1]")?;
    check_len(op, "nll", nll.len(), classes)?;
    check_len(op, "pass", pass.len(), classes)?;
    let threshold = -F::from_f64(delta).ln();
    for c in 0..classes {
        let row = &logits[c * classes..(c + 1) * classes];
        let mut arg = 0;
        for (j, &z) in row.iter().enumerate() {
            if z > row[arg] {
                arg = j;
            }
        }
        pass[c] = arg == c && nll[c] < threshold;
    }
    Ok(match mode {
        GateMode::Global => pass.iter().all(|&p| p),
        GateMode::PerClass => pass.iter().any(|&p| p),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use approx::assert_relative_eq;
    use std::string::ToString;

    fn run(
        z: &[f64],
        c: usize,
        tau: f64,
        mode: WeightMode,
    ) -> (AnchorCeValue<f64>, [f64; 9], [f64; 3], [f64; 3]) {
        let (mut p, mut l, mut w, mut g) = ([0.0; 3], [0.0; 3], [0.0; 3], [0.0; 9]);
        let v = anchor_ce(
            z,
            c,
            tau,
            mode,
            AnchorCeBuffers {
                confidence: &mut p[..c],
                nll: &mut l[..c],
                weights: &mut w[..c],
                grad_logits: Some(&mut g[..c * c]),
            },
        )
        .unwrap();
        (v, g, p, w)
    }

    /// Hand-computed: Z = [[2,0],[0,0]]. Row 0: p0 = e²/(e²+1) = 0.880797…, ℓ0 = ln(1+e⁻²)
    /// = 0.126928…; row 1: p1 = 0.5, ℓ1 = ln 2. τ = 0.9 ⇒ U = {0,1}, S = ℓ0+ℓ1.
    #[test]
    fn two_anchors_by_hand() {
        let z = [2.0, 0.0, 0.0, 0.0];
        let (v, g, p, w) = run(&z, 2, 0.9, WeightMode::Attached);
        let l0 = (1.0 + (-2.0f64).exp()).ln();
        let l1 = 2.0f64.ln();
        let s = l0 + l1 - EPSILON;
        assert_relative_eq!(p[0], 0.8807970779778823, epsilon = 1e-15);
        assert_relative_eq!(w[0], l0 / s, epsilon = 1e-15);
        assert_relative_eq!(w[1], l1 / s, epsilon = 1e-15);
        let loss = (l0 * l0 + l1 * l1) / s;
        assert_relative_eq!(v.loss, loss, epsilon = 1e-15);
        // dL/dℓ0 = (2ℓ0 − L)/s; dℓ0/dZ00 = p0 − 1, dℓ0/dZ01 = 1 − p0.
        let g0 = (2.0 * l0 - loss) / s;
        assert_relative_eq!(g[0], g0 * (p[0] - 1.0), epsilon = 1e-14);
        assert_relative_eq!(g[1], g0 * (1.0 - p[0]), epsilon = 1e-14);
        let g1 = (2.0 * l1 - loss) / s;
        assert_relative_eq!(g[2], g1 * 0.5, epsilon = 1e-14);
        assert_relative_eq!(g[3], g1 * -0.5, epsilon = 1e-14);
        // Detached: dL/dℓ_c = w_c.
        let (_, gd, _, _) = run(&z, 2, 0.9, WeightMode::Detached);
        assert_relative_eq!(gd[0], w[0] * (p[0] - 1.0), epsilon = 1e-14);
        assert_relative_eq!(gd[3], w[1] * -0.5, epsilon = 1e-14);
    }

    /// No re-weighting: Z = [[2,0],[0,0]] gives L = (ℓ0 + ℓ1)/2 with ℓ0 = ln(1+e⁻²), ℓ1 = ln 2,
    /// w = 1/2 each, dL/dZ_c = ½(softmax(Z_c) − onehot_c) — also when every anchor is
    /// confident (U empty, where the re-weighted loss would be exactly 0).
    #[test]
    fn uniform_is_the_plain_mean() {
        let z = [2.0, 0.0, 0.0, 0.0];
        let (v, g, p, w) = run(&z, 2, 0.9, WeightMode::Uniform);
        let (l0, l1) = ((1.0 + (-2.0f64).exp()).ln(), 2.0f64.ln());
        assert_relative_eq!(v.loss, (l0 + l1) / 2.0, epsilon = 1e-15);
        assert_eq!(&w[..2], &[0.5, 0.5]);
        assert_relative_eq!(g[0], 0.5 * (p[0] - 1.0), epsilon = 1e-15);
        assert_relative_eq!(g[1], 0.5 * (1.0 - p[0]), epsilon = 1e-15);
        assert_relative_eq!(g[2], 0.25, epsilon = 1e-15);
        assert_relative_eq!(g[3], -0.25, epsilon = 1e-15);
        // τ = 0: U is empty; the plain mean still trains every anchor.
        let z = [5.0, 0.0, 0.0, 5.0];
        let (v, g, p, _) = run(&z, 2, 0.0, WeightMode::Uniform);
        assert_eq!(v.uncertain, 0);
        let l = (1.0 + (-5.0f64).exp()).ln();
        assert_relative_eq!(v.loss, l, epsilon = 1e-15);
        assert_relative_eq!(g[0], 0.5 * (p[0] - 1.0), epsilon = 1e-15);
        assert_relative_eq!(g[3], 0.5 * (p[1] - 1.0), epsilon = 1e-15);
        // Finite differences on a 3×3 table.
        let z = [0.3, -1.2, 2.0, 0.5, 0.1, -0.7, 1.5, 1.4, -0.2];
        let (_, g, _, _) = run(&z, 3, 0.9, WeightMode::Uniform);
        for k in 0..9 {
            let (mut zp, mut zm) = (z, z);
            zp[k] += 1e-6;
            zm[k] -= 1e-6;
            let fd = (run(&zp, 3, 0.9, WeightMode::Uniform).0.loss
                - run(&zm, 3, 0.9, WeightMode::Uniform).0.loss)
                / 2e-6;
            assert_relative_eq!(g[k], fd, epsilon = 1e-9);
        }
    }

    /// τ = 0.85 puts anchor 0 (p0 = 0.88) outside U: w0 = 0, L = ℓ1²/(ℓ1 − ε) ≈ ln 2.
    #[test]
    fn confident_anchor_drops_out() {
        let z = [2.0, 0.0, 0.0, 0.0];
        let (v, g, _, w) = run(&z, 2, 0.85, WeightMode::Attached);
        let l1 = 2.0f64.ln();
        assert_eq!(v.uncertain, 1);
        assert_eq!(w[0], 0.0);
        assert_relative_eq!(v.loss, l1 * l1 / (l1 - EPSILON), epsilon = 1e-15);
        assert_eq!(&g[..2], &[0.0, 0.0]);
        // dL/dℓ1 = (2ℓ1 − L)/(ℓ1 − ε) ≈ 1.
        assert_relative_eq!(
            g[2],
            0.5 * (2.0 * l1 - v.loss) / (l1 - EPSILON),
            epsilon = 1e-14
        );
    }

    #[test]
    fn all_confident_is_exactly_zero() {
        let z = [9.0, 0.0, 0.0, 0.0, 9.0, 0.0, 0.0, 0.0, 9.0];
        let (v, g, _, w) = run(&z, 3, 0.9, WeightMode::Attached);
        assert_eq!(v.loss, 0.0);
        assert_eq!(v.uncertain, 0);
        assert!(w.iter().all(|&x| x == 0.0));
        assert!(g.iter().all(|&x| x == 0.0));
    }

    #[test]
    fn huge_logits_stay_finite() {
        let z = [
            100.0, -100.0, 0.0, -100.0, 100.0, 100.0, 100.0, -100.0, -100.0,
        ];
        let (v, g, p, _) = run(&z, 3, 0.9, WeightMode::Attached);
        assert!(v.loss.is_finite() && v.loss > 0.0);
        assert!(g.iter().all(|x| x.is_finite()));
        // Row 2: logit of class 2 is 200 below the max: ℓ2 = 200 + ln(1 + e^-200 + …) ≈ 200.
        assert!(p[2] < 1e-80);
    }

    #[test]
    fn rejects_bad_input() {
        let (mut p, mut l, mut w) = ([0.0f32; 2], [0.0f32; 2], [0.0f32; 2]);
        let e = anchor_ce(
            &[0.0f32; 3],
            2,
            0.9,
            WeightMode::Attached,
            AnchorCeBuffers {
                confidence: &mut p,
                nll: &mut l,
                weights: &mut w,
                grad_logits: None,
            },
        )
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "anchor_ce: anchor logits has length 3, expected 4"
        );
        let e = anchor_ce(
            &[0.0f32, f32::NAN, 0.0, 0.0],
            2,
            0.9,
            WeightMode::Attached,
            AnchorCeBuffers {
                confidence: &mut p,
                nll: &mut l,
                weights: &mut w,
                grad_logits: None,
            },
        )
        .unwrap_err();
        assert!(matches!(e, SarError::NonFinite { .. }));
        let e = anchor_ce(
            &[0.0f32; 4],
            2,
            1.5,
            WeightMode::Attached,
            AnchorCeBuffers {
                confidence: &mut p,
                nll: &mut l,
                weights: &mut w,
                grad_logits: None,
            },
        )
        .unwrap_err();
        assert!(matches!(e, SarError::Param { name: "tau", .. }));
    }

    #[test]
    fn gate_needs_argmax_and_confidence() {
        // Row 0 confident (p ≈ 0.9997), row 1 argmax wrong.
        let z = [9.0, 1.0, 3.0, 1.0];
        let (mut p, mut l, mut w) = ([0.0; 2], [0.0; 2], [0.0; 2]);
        anchor_ce(
            &z,
            2,
            0.9,
            WeightMode::Attached,
            AnchorCeBuffers {
                confidence: &mut p,
                nll: &mut l,
                weights: &mut w,
                grad_logits: None,
            },
        )
        .unwrap();
        let mut pass = [false; 2];
        assert!(!gate(&z, 2, &l, 0.8, GateMode::Global, &mut pass).unwrap());
        assert_eq!(pass, [true, false]);
        assert!(gate(&z, 2, &l, 0.8, GateMode::PerClass, &mut pass).unwrap());
        // Ties go to the first index, like argmax: row [1, 1] has argmax 0, so anchor 1 fails.
        let z = [5.0, 0.0, 1.0, 1.0];
        anchor_ce(
            &z,
            2,
            0.9,
            WeightMode::Attached,
            AnchorCeBuffers {
                confidence: &mut p,
                nll: &mut l,
                weights: &mut w,
                grad_logits: None,
            },
        )
        .unwrap();
        assert!(!gate(&z, 2, &l, 0.0, GateMode::Global, &mut pass).unwrap());
        assert_eq!(pass, [true, false]);
        // δ = 1 never passes: ℓ < −ln 1 = 0 is impossible.
        let z = [50.0, 0.0, 0.0, 50.0];
        anchor_ce(
            &z,
            2,
            0.9,
            WeightMode::Attached,
            AnchorCeBuffers {
                confidence: &mut p,
                nll: &mut l,
                weights: &mut w,
                grad_logits: None,
            },
        )
        .unwrap();
        assert!(!gate(&z, 2, &l, 1.0, GateMode::Global, &mut pass).unwrap());
        assert!(gate(&z, 2, &l, 0.8, GateMode::Global, &mut pass).unwrap());
    }
}
