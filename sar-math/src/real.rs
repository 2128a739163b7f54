//! The floating-point element type of every kernel.
//!
//! [`Real`] is implemented for `f32` and `f64` only (it is sealed). Transcendental functions
//! (`exp`, `ln`, `sqrt`, `cos`) always go through the pure-Rust [`libm`] crate, so that the
//! anchors drawn from a seed and every reference value are the same bits on every platform,
//! with or without `std`, and in `no_std` builds for bare-metal or wasm targets.

use core::fmt::{Debug, Display};
use num_traits::float::FloatCore;

mod sealed {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for f64 {}
}

/// A floating-point scalar the SAR kernels compute in: `f32` or `f64`.
pub trait Real:
    FloatCore + Debug + Display + Default + Send + Sync + core::iter::Sum + sealed::Sealed + 'static
{
    /// Machine epsilon of the type, as `f64` (for tolerances in tests and docs).
    const EPSILON_F64: f64;
    /// Converts from `f64` with Rust's `as` rounding (round to nearest even).
    fn from_f64(v: f64) -> Self;
    /// Widens (or copies) to `f64`; exact for both types.
    fn as_f64(self) -> f64;
    /// Converts a count or an index to this type (rounded to nearest when not representable).
    fn from_usize(v: usize) -> Self;
    /// e^self through libm.
    fn exp(self) -> Self;
    /// Natural logarithm through libm.
    fn ln(self) -> Self;
    /// Square root through libm (correctly rounded, like IEEE `sqrt`).
    fn sqrt(self) -> Self;
    /// Cosine through libm.
    fn cos(self) -> Self;
    /// `self ^ e` through libm.
    fn powf(self, e: Self) -> Self;
}

impl Real for f32 {
    const EPSILON_F64: f64 = f32::EPSILON as f64;
    #[inline]
    fn from_f64(v: f64) -> Self {
        v as f32
    }
    #[inline]
    fn as_f64(self) -> f64 {
        self as f64
    }
    #[inline]
    fn from_usize(v: usize) -> Self {
        v as f32
    }
    #[inline]
    fn exp(self) -> Self {
        libm::expf(self)
    }
    #[inline]
    fn ln(self) -> Self {
        libm::logf(self)
    }
    #[inline]
    fn sqrt(self) -> Self {
        libm::sqrtf(self)
    }
    #[inline]
    fn cos(self) -> Self {
        libm::cosf(self)
    }
    #[inline]
    fn powf(self, e: Self) -> Self {
        libm::powf(self, e)
    }
}

impl Real for f64 {
    const EPSILON_F64: f64 = f64::EPSILON;
    #[inline]
    fn from_f64(v: f64) -> Self {
        v
    }
    #[inline]
    fn as_f64(self) -> f64 {
        self
    }
    #[inline]
    fn from_usize(v: usize) -> Self {
        v as f64
    }
    #[inline]
    fn exp(self) -> Self {
        libm::exp(self)
    }
    #[inline]
    fn ln(self) -> Self {
        libm::log(self)
    }
    #[inline]
    fn sqrt(self) -> Self {
        libm::sqrt(self)
    }
    #[inline]
    fn cos(self) -> Self {
        libm::cos(self)
    }
    #[inline]
    fn powf(self, e: Self) -> Self {
        libm::pow(self, e)
    }
}

/// A class label as stored by a data set: any integer type that widens to `i64`.
///
/// Segmentation maps are usually `u8` (with 255 = ignore) and PyTorch labels `i64`; the kernels
/// accept either without a copy.
pub trait Label: Copy + Send + Sync + 'static {
    /// The label as a signed 64-bit integer (lossless for every implementor except
    /// `u64`/`usize` values above `i64::MAX`, which saturate and are then rejected as out of range).
    fn to_i64(self) -> i64;
}

macro_rules! impl_label {
    ($($t:ty),*) => {$(
        impl Label for $t {
            #[inline]
            fn to_i64(self) -> i64 {
                // Saturate instead of wrapping so that huge values stay out of range.
                i64::try_from(self).unwrap_or(i64::MAX)
            }
        }
    )*};
}
impl_label!(u8, u16, u32, u64, usize, i8, i16, i32, i64);
