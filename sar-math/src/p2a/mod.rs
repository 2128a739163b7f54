//! Pixel-to-anchor loss (Eq. 4, spec §5): loss and analytic gradient in one fused pass.
//!
//! L_p2a = (1 / (|Ω|·D)) Σ_{i∈Ω} Σ_d (F_{i,d} − Â_{y_i,d})²,
//! dL/dF_{i,d} = 2 (F_{i,d} − Â_{y_i,d}) / (|Ω|·D) for i ∈ Ω, 0 elsewhere,
//! with Ω = {i : y_i ≠ ignore_index} (and, with a per-class gate, y_i's anchor active).
//! |Ω| = 0 gives L = 0 and a zero gradient.
//!
//! Layouts:
//! - segmentation: features `[B, D, H, W]` (NCHW, row-major), labels `[B, H', W']` resampled to
//!   H×W on the fly with [`crate::resample::nearest_source_index`] (PyTorch's legacy `nearest`);
//! - classification: features `[N, D]`, labels `[N]`; with MixUp (λ, y_a, y_b) the target row is
//!   λ·Â_{y_a} + (1 − λ)·Â_{y_b}, and a row is in Ω iff both labels are.
//!
//! Anchors Â are `[C, D]`. Every label must be in `0..C` or equal the ignore index; anything else
//! is [`SarError::Label`]. Any non-finite feature inside Ω makes the loss non-finite, which is
//! reported as [`SarError::NonFinite`]; features outside Ω are never read into the result.
//!
//! # Speed
//! The NCHW kernel is bound by memory traffic: it must read F and write dL/dF once. It works
//! on tiles of up to 8192 consecutive pixels of one image: the tile's resampled class indices
//! are computed once into a stack buffer (u8 when C ≤ 255). For each channel plane the tile's
//! targets are gathered from a 256-entry table of that channel's anchor values into an L1
//! buffer, and a dense loop with eight accumulators (vectorised by the compiler) computes the
//! squares and the gradient. Per-tile partial sums go into an `f64` total. The tile buffers
//! live on the stack: about 56 KiB for `f32` (88 KiB for `f64`, or C > 255). [`p2a_nchw_block`]
//! exposes one image's channel range so that callers can run blocks on several threads.

use crate::error::{check_len, mul_dims, Op, Result, SarError};
use crate::real::Real;

mod nchw;
mod rows;
#[cfg(test)]
mod tests;

pub use nchw::{p2a_nchw, p2a_nchw_block, p2a_valid_count_nchw};
pub use rows::{p2a_rows, RowLabels};

/// Dimensions of an NCHW feature map `[batch, channels, height, width]` and of its label map
/// `[batch, label_height, label_width]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FeatureGeometry {
    /// B.
    pub batch: usize,
    /// D, the channels that feed the classifier.
    pub channels: usize,
    /// H of the feature map.
    pub height: usize,
    /// W of the feature map.
    pub width: usize,
    /// H' of the label map.
    pub label_height: usize,
    /// W' of the label map.
    pub label_width: usize,
}

impl FeatureGeometry {
    /// B·D·H·W, checked.
    pub fn feature_len(&self) -> Result<usize> {
        mul_dims(
            Op::P2a,
            &[self.batch, self.channels, self.height, self.width],
        )
    }
    /// B·H'·W', checked.
    pub fn label_len(&self) -> Result<usize> {
        mul_dims(Op::P2a, &[self.batch, self.label_height, self.label_width])
    }
    fn validate(&self) -> Result<()> {
        if self.channels == 0 {
            return Err(SarError::Shape {
                op: Op::P2a,
                what: "features need at least one channel",
            });
        }
        if self.height * self.width != 0 && self.label_height * self.label_width == 0 {
            return Err(SarError::Shape {
                op: Op::P2a,
                what: "label map is empty but the feature map is not",
            });
        }
        self.feature_len()?;
        self.label_len()?;
        Ok(())
    }
}

/// What the features are pulled to: anchors `[classes, D]`, which labels are ignored, and
/// (per-class gate) which classes are active.
#[derive(Debug, Clone, Copy)]
pub struct P2aTargets<'a, F> {
    /// Â (or, for the CR baseline, the raw anchors A), row-major `[classes, D]`.
    pub anchors: &'a [F],
    /// C.
    pub classes: usize,
    /// Label excluded from Ω.
    pub ignore_index: i64,
    /// Per-class gate: pixels of class c count only if `class_active[c]`. `None` = all active.
    pub class_active: Option<&'a [bool]>,
}

impl<F: Real> P2aTargets<'_, F> {
    fn validate(&self, dim: usize) -> Result<()> {
        let op = Op::P2a;
        if self.classes == 0 {
            return Err(SarError::Shape {
                op,
                what: "classes must be at least 1",
            });
        }
        check_len(
            op,
            "anchors",
            self.anchors.len(),
            mul_dims(op, &[self.classes, dim])?,
        )?;
        if let Some(a) = self.class_active {
            check_len(op, "class_active", a.len(), self.classes)?;
        }
        Ok(())
    }

    /// The class of a label, `None` when it is outside Ω; an error when it is out of range.
    #[inline]
    fn class_of(&self, label: i64, index: usize) -> Result<Option<usize>> {
        if label == self.ignore_index {
            return Ok(None);
        }
        if label < 0 || label as u64 >= self.classes as u64 {
            return Err(SarError::Label {
                op: Op::P2a,
                index,
                label,
                classes: self.classes,
            });
        }
        let c = label as usize;
        Ok(match self.class_active {
            Some(active) if !active[c] => None,
            _ => Some(c),
        })
    }
}

/// Scalar results of a p2a evaluation.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct P2aValue<F> {
    /// L_p2a (unweighted).
    pub loss: F,
    /// |Ω|, the pixels (or rows) that count.
    pub valid: usize,
}

fn finish<F: Real>(sum_sq: f64, valid: usize, dim: usize) -> Result<P2aValue<F>> {
    let loss = if valid == 0 {
        0.0
    } else {
        sum_sq / (valid as f64 * dim as f64)
    };
    let loss_f = F::from_f64(loss);
    if !loss_f.is_finite() {
        return Err(SarError::NonFinite {
            op: Op::P2a,
            what: "L_p2a (features inside Ω)",
        });
    }
    Ok(P2aValue {
        loss: loss_f,
        valid,
    })
}

fn grad_scale<F: Real>(valid: usize, dim: usize) -> F {
    if valid == 0 {
        F::zero()
    } else {
        F::from_f64(2.0 / (valid as f64 * dim as f64))
    }
}
