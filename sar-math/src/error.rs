//! [`SarError`]: what went wrong, and in which operation.
//!
//! Every public function validates its inputs before indexing and returns one of these instead
//! of panicking. The error is a small `Copy` value (no allocation) that names the operation
//! ([`Op`]), the argument, and the offending numbers, so that a message reads like
//! `p2a: labels has length 10, expected 12`.

use core::fmt;

/// The SAR operation that reported an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    /// Pre-defined anchor generation (`anchors`).
    Anchors,
    /// Anchor cross-entropy with re-weighting (Eq. 5–7).
    AnchorCe,
    /// The δ gate over the anchor logits.
    Gate,
    /// The EMA of semantic anchors (Eq. 8).
    Ema,
    /// Nearest-neighbour label resampling.
    Resample,
    /// Pixel-to-anchor loss (Eq. 4).
    P2a,
    /// Class prototypes (Eq. 1/3).
    Prototype,
    /// CAR intra-class loss.
    Car,
    /// Confusion matrices and accuracy / IoU metrics.
    Metrics,
    /// Long-tailed subset sizes and class groupings.
    LongTail,
    /// [`crate::SarConfig`] validation.
    Config,
    /// One full SAR step ([`crate::SarState::step`]).
    Step,
    /// One SGD update ([`crate::sgd::sgd_step`]).
    Sgd,
    /// One AdamW update ([`crate::adamw::adamw_step`]).
    AdamW,
    /// MiSLAS's label-aware smoothing ([`crate::mislas`]).
    Smoothing,
    /// DisAlign's calibration and re-weighting ([`crate::disalign`]).
    DisAlign,
}

impl Op {
    /// The short name used in messages.
    pub const fn name(self) -> &'static str {
        match self {
            Op::Anchors => "anchors",
            Op::AnchorCe => "anchor_ce",
            Op::Gate => "gate",
            Op::Ema => "ema",
            Op::Resample => "resample",
            Op::P2a => "p2a",
            Op::Prototype => "prototype",
            Op::Car => "car",
            Op::Metrics => "metrics",
            Op::LongTail => "longtail",
            Op::Config => "config",
            Op::Step => "step",
            Op::Sgd => "sgd",
            Op::AdamW => "adamw",
            Op::Smoothing => "smoothing",
            Op::DisAlign => "disalign",
        }
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Why an operation refused its input.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum SarError {
    /// A slice has the wrong number of elements for the dimensions given.
    Length {
        /// Operation.
        op: Op,
        /// Argument name.
        what: &'static str,
        /// Length required by the dimensions.
        expected: usize,
        /// Length received.
        actual: usize,
    },
    /// A dimension is zero where at least one is needed, or the dimensions disagree.
    Shape {
        /// Operation.
        op: Op,
        /// What is wrong, in words.
        what: &'static str,
    },
    /// The product of the dimensions overflows `usize`.
    Overflow {
        /// Operation.
        op: Op,
    },
    /// A label is neither a class in `0..classes` nor the ignore index.
    Label {
        /// Operation.
        op: Op,
        /// Flat position of the label in its slice.
        index: usize,
        /// The label value.
        label: i64,
        /// Number of classes.
        classes: usize,
    },
    /// A hyper-parameter is outside its domain.
    Param {
        /// Operation.
        op: Op,
        /// Parameter name.
        name: &'static str,
        /// The value received.
        value: f64,
        /// The domain, in words (e.g. `"[0, 1]"`).
        domain: &'static str,
    },
    /// A value that must be finite is NaN or infinite.
    NonFinite {
        /// Operation.
        op: Op,
        /// Which value.
        what: &'static str,
    },
    /// A fixed-capacity (heapless) buffer is too small.
    Capacity {
        /// Operation.
        op: Op,
        /// Capacity available.
        capacity: usize,
        /// Capacity needed.
        needed: usize,
    },
}

impl SarError {
    /// The operation that reported the error.
    pub const fn op(&self) -> Op {
        match *self {
            SarError::Length { op, .. }
            | SarError::Shape { op, .. }
            | SarError::Overflow { op }
            | SarError::Label { op, .. }
            | SarError::Param { op, .. }
            | SarError::NonFinite { op, .. }
            | SarError::Capacity { op, .. } => op,
        }
    }
}

impl fmt::Display for SarError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            SarError::Length {
                op,
                what,
                expected,
                actual,
            } => {
                write!(f, "{op}: {what} has length {actual}, expected {expected}")
            }
            SarError::Shape { op, what } => write!(f, "{op}: {what}"),
            SarError::Overflow { op } => write!(f, "{op}: dimensions overflow usize"),
            SarError::Label {
                op,
                index,
                label,
                classes,
            } => write!(
                f,
                "{op}: label {label} at position {index} is out of range for {classes} classes \
                 (and is not the ignore index)"
            ),
            SarError::Param {
                op,
                name,
                value,
                domain,
            } => {
                write!(f, "{op}: {name} = {value} is outside {domain}")
            }
            SarError::NonFinite { op, what } => write!(f, "{op}: {what} is not finite"),
            SarError::Capacity {
                op,
                capacity,
                needed,
            } => write!(
                f,
                "{op}: fixed capacity {capacity} is too small, {needed} needed"
            ),
        }
    }
}

impl core::error::Error for SarError {}

/// Result alias for this crate.
pub type Result<T> = core::result::Result<T, SarError>;

/// Checks `slice_len == expected`.
#[inline]
pub(crate) fn check_len(op: Op, what: &'static str, actual: usize, expected: usize) -> Result<()> {
    if actual == expected {
        Ok(())
    } else {
        Err(SarError::Length {
            op,
            what,
            expected,
            actual,
        })
    }
}

/// Multiplies dimensions, reporting overflow.
#[inline]
pub(crate) fn mul_dims(op: Op, dims: &[usize]) -> Result<usize> {
    dims.iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or(SarError::Overflow { op })
}
