//! Long-tailed subset sizes (the CIFAR-LT rule, spec §8).
//!
//! n_c = floor(n_max · (1/IF)^(c/(C−1))) for c = 0..C, evaluated in `f64` with libm's `pow`
//! exactly as the reference code writes it (`img_max * (imb_factor ** (c / (cls_num - 1.0)))`
//! with `imb_factor = 1/IF`). CIFAR-100 (n_max = 500) with IF = 100 gives 500 down to 5,
//! 10,847 images in total.

use crate::error::{Op, Result, SarError};

/// Writes n_c for every class into `out` (`out.len()` = C) and returns the total.
///
/// ```
/// let mut n = [0u64; 100];
/// assert_eq!(sar_math::longtail::cifar_lt_counts(500, 100.0, &mut n).unwrap(), 10_847);
/// assert_eq!((n[0], n[99]), (500, 5));
/// ```
pub fn cifar_lt_counts(n_max: u64, imbalance_factor: f64, out: &mut [u64]) -> Result<u64> {
    let op = Op::LongTail;
    if !(imbalance_factor.is_finite() && imbalance_factor >= 1.0) {
        return Err(SarError::Param {
            op,
            name: "imbalance_factor",
            value: imbalance_factor,
            domain: "[1, inf)",
        });
    }
    if out.is_empty() {
        return Err(SarError::Shape {
            op,
            what: "need at least one class",
        });
    }
    let ratio = 1.0 / imbalance_factor;
    let last = (out.len() - 1) as f64;
    let mut total = 0u64;
    for (c, n) in out.iter_mut().enumerate() {
        let exponent = if last == 0.0 { 0.0 } else { c as f64 / last };
        *n = libm::floor(n_max as f64 * libm::pow(ratio, exponent)) as u64;
        total += *n;
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cifar100_lt_matches_python_reference() {
        // Every n_c of `int(500 * 0.01 ** (c / 99.0))` as printed by CPython 3.11.
        let want: [u64; 100] = [
            500, 477, 455, 434, 415, 396, 378, 361, 344, 328, 314, 299, 286, 273, 260, 248, 237,
            226, 216, 206, 197, 188, 179, 171, 163, 156, 149, 142, 135, 129, 123, 118, 112, 107,
            102, 98, 93, 89, 85, 81, 77, 74, 70, 67, 64, 61, 58, 56, 53, 51, 48, 46, 44, 42, 40,
            38, 36, 35, 33, 32, 30, 29, 27, 26, 25, 24, 23, 22, 21, 20, 19, 18, 17, 16, 15, 15, 14,
            13, 13, 12, 12, 11, 11, 10, 10, 9, 9, 8, 8, 7, 7, 7, 6, 6, 6, 6, 5, 5, 5, 5,
        ];
        let mut n = [0u64; 100];
        assert_eq!(cifar_lt_counts(500, 100.0, &mut n).unwrap(), 10_847);
        assert_eq!(n, want);
        assert_eq!(want.iter().sum::<u64>(), 10_847);
    }

    #[test]
    fn edge_cases() {
        let mut one = [0u64; 1];
        assert_eq!(cifar_lt_counts(7, 10.0, &mut one).unwrap(), 7);
        assert!(cifar_lt_counts(7, 0.5, &mut one).is_err());
        assert!(cifar_lt_counts(7, f64::NAN, &mut one).is_err());
        assert!(cifar_lt_counts(7, 2.0, &mut []).is_err());
    }
}
