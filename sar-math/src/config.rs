//! [`SarConfig`]: the hyper-parameters of one SAR regulariser, with the paper's defaults.
//!
//! | field | symbol | default | domain |
//! |---|---|---|---|
//! | `tau` | τ, confidence above which an anchor's CE is no longer re-weighted (Eq. 6) | 0.9 | [0, 1] |
//! | `delta` | δ, confidence an anchor must exceed for the gate (§4) | 0.8 | [0, 1] |
//! | `alpha` | α, EMA momentum of the semantic anchors (Eq. 8) | 0.999 | [0, 1) |
//! | `lambda_aux` | λ1, weight of L_aux in Eq. 9 | 1.0 | ≥ 0, finite |
//! | `lambda_p2a` | λ2, weight of L_p2a in Eq. 9 (0.05 for DeepLabV3) | 0.1 | ≥ 0, finite |
//! | `ignore_index` | label that marks pixels outside Ω | 255 | any |
//! | `gate` | [`GateMode`] | `Global` | |
//! | `weights` | [`WeightMode`] | `Attached` | `Attached`, `Detached`, `Uniform` (no re-weighting) |

use crate::error::{Op, Result, SarError};

/// How the δ gate decides whether the semantic anchors are updated and p2a applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "kebab-case"))]
pub enum GateMode {
    /// The released code: one all-or-nothing decision per step, passing iff every anchor is
    /// classified as its own class with confidence above δ.
    #[default]
    Global,
    /// The same test per anchor: each row of Â is initialised / updated on its own, and p2a
    /// uses only pixels whose class passed.
    PerClass,
}

/// Whether the re-weighting factors w of Eq. 7 carry gradient.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "kebab-case"))]
pub enum WeightMode {
    /// The released code: w is part of the graph, dL/dℓ_c = (2ℓ_c − L)/(S − ε).
    #[default]
    Attached,
    /// w is a constant (stop-gradient): dL/dℓ_c = w_c.
    Detached,
    /// No re-weighting (the Table 7 ablation `reweight = false`): L_aux = (1/C) Σ_c ℓ_c, the
    /// plain mean of the anchor cross-entropies over all C anchors, w_c = 1/C, dL/dℓ_c = 1/C.
    Uniform,
}

/// Which feature regulariser a head applies: SAR or one of the baselines the paper compares
/// it with (spec §7, Table 7). λ2 (`lambda_p2a`) weighs the feature term of every kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "kebab-case"))]
pub enum RegularizerKind {
    /// SAR (the released code): embedding, aux CE, gate, EMA, p2a toward Â.
    #[default]
    Sar,
    /// CR: p2a toward the raw pre-defined anchors A every step; no embedding, no aux CE, no gate.
    Cr,
    /// CAR's intra-class loss toward this batch's detached class prototypes; stateless.
    Car,
    /// p2a toward an EMA (α = `alpha`) of per-class batch prototypes (Eq. 1–3); classes absent
    /// from a batch keep their last prototype, classes never seen are outside Ω.
    Prototype,
}

/// Hyper-parameters of SAR. Build with [`SarConfig::default`] and check with
/// [`SarConfig::validate`]; every consumer in this crate validates again.
#[derive(Debug, Clone, Copy, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(default, deny_unknown_fields))]
pub struct SarConfig {
    /// τ of Eq. 6.
    pub tau: f64,
    /// δ of the gate.
    pub delta: f64,
    /// α of Eq. 8.
    pub alpha: f64,
    /// λ1 of Eq. 9.
    pub lambda_aux: f64,
    /// λ2 of Eq. 9.
    pub lambda_p2a: f64,
    /// Label value excluded from Ω.
    pub ignore_index: i64,
    /// Gate mode.
    pub gate: GateMode,
    /// Weight mode.
    pub weights: WeightMode,
}

impl Default for SarConfig {
    fn default() -> Self {
        SarConfig {
            tau: 0.9,
            delta: 0.8,
            alpha: 0.999,
            lambda_aux: 1.0,
            lambda_p2a: 0.1,
            ignore_index: 255,
            gate: GateMode::Global,
            weights: WeightMode::Attached,
        }
    }
}

/// Checks `lo <= v <= hi` (or `< hi` when `hi_open`), rejecting NaN.
pub(crate) fn check_range(
    op: Op,
    name: &'static str,
    v: f64,
    lo: f64,
    hi: f64,
    hi_open: bool,
    domain: &'static str,
) -> Result<()> {
    let ok = v >= lo && if hi_open { v < hi } else { v <= hi };
    if ok {
        Ok(())
    } else {
        Err(SarError::Param {
            op,
            name,
            value: v,
            domain,
        })
    }
}

impl SarConfig {
    /// Checks every field's domain: τ, δ ∈ [0, 1], α ∈ [0, 1), λ1, λ2 finite and ≥ 0.
    ///
    /// ```
    /// use sar_math::SarConfig;
    /// assert!(SarConfig::default().validate().is_ok());
    /// let bad = SarConfig { alpha: 1.0, ..SarConfig::default() };
    /// assert_eq!(bad.validate().unwrap_err().to_string(), "config: alpha = 1 is outside [0, 1)");
    /// ```
    pub fn validate(&self) -> Result<()> {
        let op = Op::Config;
        check_range(op, "tau", self.tau, 0.0, 1.0, false, "[0, 1]")?;
        check_range(op, "delta", self.delta, 0.0, 1.0, false, "[0, 1]")?;
        check_range(op, "alpha", self.alpha, 0.0, 1.0, true, "[0, 1)")?;
        check_range(
            op,
            "lambda_aux",
            self.lambda_aux,
            0.0,
            f64::MAX,
            false,
            "[0, inf)",
        )?;
        check_range(
            op,
            "lambda_p2a",
            self.lambda_p2a,
            0.0,
            f64::MAX,
            false,
            "[0, inf)",
        )?;
        Ok(())
    }
}
