//! Pre-defined anchors A ∈ R^{C×D} (spec §1), drawn from a seed.
//!
//! Layout: row-major `[C, D]`, row c is the anchor of class c.
//!
//! Drawn with [`crate::rng::SeededRng`], so a seed gives the same bits on every platform, and
//! `f32` anchors are the `f64` anchors rounded to nearest.
//!
//! # Kinds
//! - [`AnchorKind::Normal`] (default): i.i.d. N(0, 1), drawn row by row.
//! - [`AnchorKind::Orthogonal`] (OM, Table 7): Gaussian rows made orthonormal by modified
//!   Gram–Schmidt run twice; needs C ≤ D.
//! - [`AnchorKind::SimplexEtf`] (MES, Table 7): C unit vectors with pairwise cosine −1/(C−1),
//!   `a_c = √(C/(C−1)) Σ_k H[c][k] q_k` where H is the Helmert basis of the plane ⟂ 1 in R^C and
//!   q_1..q_{C−1} are random orthonormal rows in R^D (so D ≥ C − 1); for C = 1 one random unit
//!   vector.

use crate::error::{check_len, mul_dims, Op, Result, SarError};
use crate::real::Real;
use crate::rng::SeededRng;

/// How the pre-defined anchors are drawn.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "kebab-case"))]
pub enum AnchorKind {
    /// i.i.d. standard normal (the released code).
    #[default]
    Normal,
    /// Random orthonormal rows (OM); needs C ≤ D.
    Orthogonal,
    /// Simplex equiangular tight frame (MES); needs D ≥ C − 1.
    SimplexEtf,
}

fn fill_normal<F: Real>(rng: &mut SeededRng, out: &mut [F]) {
    for v in out.iter_mut() {
        *v = F::from_f64(rng.next_normal());
    }
}

fn dot<F: Real>(a: &[F], b: &[F]) -> F {
    a.iter().zip(b).fold(F::zero(), |acc, (&x, &y)| acc + x * y)
}

/// Makes the `rows` first rows of `out` (each `dim` long) orthonormal, in place, drawing a fresh
/// Gaussian row whenever one is numerically dependent on the previous ones.
fn orthonormal_rows<F: Real>(
    rng: &mut SeededRng,
    rows: usize,
    dim: usize,
    out: &mut [F],
) -> Result<()> {
    fill_normal(rng, &mut out[..rows * dim]);
    for r in 0..rows {
        let mut accepted = false;
        for _attempt in 0..16 {
            let (done, rest) = out.split_at_mut(r * dim);
            let row = &mut rest[..dim];
            let norm0 = dot(row, row).sqrt();
            // Two passes of modified Gram–Schmidt ("twice is enough").
            for _pass in 0..2 {
                for prev in done.chunks_exact(dim) {
                    let proj = dot(row, prev);
                    for (x, &p) in row.iter_mut().zip(prev) {
                        *x = *x - proj * p;
                    }
                }
            }
            let norm = dot(row, row).sqrt();
            if norm > norm0 * F::from_f64(1e-3) && norm > F::zero() && norm.is_finite() {
                for x in row.iter_mut() {
                    *x = *x / norm;
                }
                accepted = true;
                break;
            }
            fill_normal(rng, row);
        }
        if !accepted {
            return Err(SarError::NonFinite {
                op: Op::Anchors,
                what: "orthonormal row",
            });
        }
    }
    Ok(())
}

/// Fills `out` (`[classes, dim]`, row-major) with pre-defined anchors of `kind` drawn from `seed`.
///
/// ```
/// use sar_math::anchors::{generate_anchors, AnchorKind};
/// let mut a = [0.0f64; 3 * 4];
/// generate_anchors(AnchorKind::Orthogonal, 7, 3, 4, &mut a).unwrap();
/// let d01: f64 = (0..4).map(|k| a[k] * a[4 + k]).sum();
/// assert!(d01.abs() < 1e-12);
/// ```
pub fn generate_anchors<F: Real>(
    kind: AnchorKind,
    seed: u64,
    classes: usize,
    dim: usize,
    out: &mut [F],
) -> Result<()> {
    let op = Op::Anchors;
    if classes == 0 || dim == 0 {
        return Err(SarError::Shape {
            op,
            what: "classes and dim must be at least 1",
        });
    }
    check_len(op, "anchors", out.len(), mul_dims(op, &[classes, dim])?)?;
    let mut rng = SeededRng::new(seed);
    match kind {
        AnchorKind::Normal => fill_normal(&mut rng, out),
        AnchorKind::Orthogonal => {
            if classes > dim {
                return Err(SarError::Shape {
                    op,
                    what: "orthogonal anchors need classes <= dim",
                });
            }
            orthonormal_rows(&mut rng, classes, dim, out)?;
        }
        AnchorKind::SimplexEtf => {
            if classes == 1 {
                return orthonormal_rows(&mut rng, 1, dim, out);
            }
            let k_rows = classes - 1;
            if dim < k_rows {
                return Err(SarError::Shape {
                    op,
                    what: "simplex ETF anchors need dim >= classes - 1",
                });
            }
            // Rows 1..C hold q_0..q_{C-2}; anchor c needs q_k for k >= c - 1 only, i.e. rows >= c,
            // so it can overwrite row c column by column.
            orthonormal_rows(&mut rng, k_rows, dim, &mut out[dim..])?;
            let c_f = classes as f64;
            let scale = libm::sqrt(c_f / (c_f - 1.0));
            // Helmert coefficient H[c][k] of basis vector h_{k+1}.
            let helmert = |c: usize, k: usize| -> f64 {
                let kk = (k + 1) as f64;
                let norm = libm::sqrt(kk * (kk + 1.0));
                if c < k + 1 {
                    1.0 / norm
                } else if c == k + 1 {
                    -kk / norm
                } else {
                    0.0
                }
            };
            for c in 0..classes {
                let k_start = c.saturating_sub(1);
                for d in 0..dim {
                    let mut acc = 0.0f64;
                    for k in k_start..k_rows {
                        acc += helmert(c, k) * out[(k + 1) * dim + d].as_f64();
                    }
                    out[c * dim + d] = F::from_f64(scale * acc);
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f32_anchors_are_rounded_f64_anchors() {
        let mut a64 = [0.0f64; 5 * 7];
        let mut a32 = [0.0f32; 5 * 7];
        generate_anchors(AnchorKind::Normal, 3, 5, 7, &mut a64).unwrap();
        generate_anchors(AnchorKind::Normal, 3, 5, 7, &mut a32).unwrap();
        for (x, y) in a64.iter().zip(&a32) {
            assert_eq!(*x as f32, *y);
        }
    }

    #[test]
    fn simplex_etf_has_unit_rows_and_equal_negative_cosines() {
        for (c, d) in [(2usize, 1usize), (3, 2), (5, 4), (10, 16), (19, 720)] {
            let mut a = std::vec![0.0f64; c * d];
            generate_anchors(AnchorKind::SimplexEtf, 11, c, d, &mut a).unwrap();
            for i in 0..c {
                let ri = &a[i * d..(i + 1) * d];
                assert!((dot(ri, ri) - 1.0).abs() < 1e-12);
                for j in 0..i {
                    let rj = &a[j * d..(j + 1) * d];
                    let want = -1.0 / (c as f64 - 1.0);
                    assert!((dot(ri, rj) - want).abs() < 1e-12, "c={c} d={d} ({i},{j})");
                }
            }
        }
    }

    #[test]
    fn shape_errors() {
        let mut a = [0.0f32; 6];
        assert!(generate_anchors(AnchorKind::Orthogonal, 0, 3, 2, &mut a).is_err());
        assert!(generate_anchors(AnchorKind::SimplexEtf, 0, 4, 2, &mut [0.0f32; 8]).is_err());
        assert!(generate_anchors(AnchorKind::Normal, 0, 3, 3, &mut a).is_err());
        assert!(generate_anchors::<f32>(AnchorKind::Normal, 0, 0, 3, &mut []).is_err());
    }
}
