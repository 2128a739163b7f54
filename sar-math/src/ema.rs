//! Semantic anchors Â by exponential moving average (Eq. 8, spec §4).
//!
//! Layout: Â and E are row-major `[C, D]`.
//!
//! - Global gate: if the gate passes, the first time Â ← E (a copy), afterwards
//!   Â ← α·Â + (1 − α)·E. If it fails, Â is unchanged.
//! - Per-class gate: the same rule applied to each row c on its own, with its own
//!   "initialised" flag, when anchor c passed.
//!
//! Â never receives gradient; the EMA is an explicit `&mut` update made once per step.

use crate::config::check_range;
use crate::error::{check_len, mul_dims, Op, Result, SarError};
use crate::real::Real;

fn check<F: Real>(
    semantic: &[F],
    embedded: &[F],
    classes: usize,
    dim: usize,
    alpha: f64,
) -> Result<()> {
    let op = Op::Ema;
    if classes == 0 || dim == 0 {
        return Err(SarError::Shape {
            op,
            what: "classes and dim must be at least 1",
        });
    }
    let n = mul_dims(op, &[classes, dim])?;
    check_len(op, "semantic anchors", semantic.len(), n)?;
    check_len(op, "embedded anchors", embedded.len(), n)?;
    check_range(op, "alpha", alpha, 0.0, 1.0, true, "[0, 1)")?;
    if embedded.iter().any(|v| !v.is_finite()) {
        return Err(SarError::NonFinite {
            op,
            what: "embedded anchors",
        });
    }
    Ok(())
}

#[inline]
fn update_row<F: Real>(row: &mut [F], e: &[F], alpha: F, first: bool) {
    if first {
        row.copy_from_slice(e);
    } else {
        let beta = F::one() - alpha;
        for (a, &x) in row.iter_mut().zip(e) {
            *a = alpha * *a + beta * x;
        }
    }
}

/// Global-gate EMA: updates every row when `passed`, initialising on the first pass.
/// Returns whether Â changed.
pub fn ema_update<F: Real>(
    semantic: &mut [F],
    initialized: &mut bool,
    embedded: &[F],
    classes: usize,
    dim: usize,
    alpha: f64,
    passed: bool,
) -> Result<bool> {
    check(semantic, embedded, classes, dim, alpha)?;
    if !passed {
        return Ok(false);
    }
    update_row(semantic, embedded, F::from_f64(alpha), !*initialized);
    *initialized = true;
    Ok(true)
}

/// Per-class EMA: row c is updated (initialised the first time) iff `passed[c]`.
/// Returns the number of rows updated.
pub fn ema_update_per_class<F: Real>(
    semantic: &mut [F],
    initialized: &mut [bool],
    embedded: &[F],
    classes: usize,
    dim: usize,
    alpha: f64,
    passed: &[bool],
) -> Result<usize> {
    check(semantic, embedded, classes, dim, alpha)?;
    check_len(Op::Ema, "initialized", initialized.len(), classes)?;
    check_len(Op::Ema, "passed", passed.len(), classes)?;
    let alpha = F::from_f64(alpha);
    let mut updated = 0;
    for c in 0..classes {
        if passed[c] {
            let rows = c * dim..(c + 1) * dim;
            update_row(
                &mut semantic[rows.clone()],
                &embedded[rows],
                alpha,
                !initialized[c],
            );
            initialized[c] = true;
            updated += 1;
        }
    }
    Ok(updated)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_pass_copies_then_averages() {
        let mut a = [0.0f64; 2];
        let mut init = false;
        assert!(!ema_update(&mut a, &mut init, &[4.0, 8.0], 1, 2, 0.75, false).unwrap());
        assert_eq!((a, init), ([0.0, 0.0], false));
        assert!(ema_update(&mut a, &mut init, &[4.0, 8.0], 1, 2, 0.75, true).unwrap());
        assert_eq!((a, init), ([4.0, 8.0], true));
        ema_update(&mut a, &mut init, &[0.0, 0.0], 1, 2, 0.75, true).unwrap();
        assert_eq!(a, [3.0, 6.0]);
    }

    #[test]
    fn per_class_rows_are_independent() {
        let mut a = [1.0f32, 1.0, 5.0, 5.0];
        let mut init = [true, false];
        let n = ema_update_per_class(
            &mut a,
            &mut init,
            &[3.0, 3.0, 7.0, 9.0],
            2,
            2,
            0.5,
            &[true, false],
        )
        .unwrap();
        assert_eq!(n, 1);
        assert_eq!(a, [2.0, 2.0, 5.0, 5.0]);
        ema_update_per_class(
            &mut a,
            &mut init,
            &[3.0, 3.0, 7.0, 9.0],
            2,
            2,
            0.5,
            &[false, true],
        )
        .unwrap();
        assert_eq!(a, [2.0, 2.0, 7.0, 9.0]);
        assert_eq!(init, [true, true]);
    }

    #[test]
    fn rejects_bad_alpha_and_lengths() {
        let mut a = [0.0f64; 2];
        let mut init = false;
        assert!(ema_update(&mut a, &mut init, &[0.0; 2], 1, 2, 1.0, true).is_err());
        assert!(ema_update(&mut a, &mut init, &[0.0; 3], 1, 2, 0.5, true).is_err());
        assert!(ema_update(&mut a, &mut init, &[f64::NAN; 2], 1, 2, 0.5, true).is_err());
    }
}
