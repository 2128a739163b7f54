//! Pre-defined anchors A ∈ R^{C×D} (spec §1), drawn from a seed.
//!
//! Layout: row-major `[C, D]`, row c is the anchor of class c.
//!
//! # The generator (portable by construction)
//! [`AnchorRng`] is xoshiro256\*\* (Blackman & Vigna, 2018) whose 256-bit state is filled by four
//! outputs of SplitMix64 started at the seed. Uniforms are `(x >> 11) · 2⁻⁵³ ∈ [0, 1)`; standard
//! normals come from the Box–Muller transform in `f64` with libm's `log`, `sqrt`, `cos`, `sin`:
//! `u1 = 1 − U₁ ∈ (0, 1]`, `u2 = U₂`, `r = √(−2 ln u1)`, giving `r cos 2πu2` then `r sin 2πu2`.
//! Everything is integer or libm arithmetic, so a seed gives the same bits on every platform, and
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

/// The seeded, portable pseudo-random generator of the anchors (see the module docs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AnchorRng {
    state: [u64; 4],
    spare_normal: Option<u64>,
}

/// One step of SplitMix64 (Steele, Lea & Flood, 2014): advances `x` and returns the output.
pub fn splitmix64(x: &mut u64) -> u64 {
    *x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *x;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl AnchorRng {
    /// Seeds the generator: the state is four successive SplitMix64 outputs from `seed`.
    pub fn new(seed: u64) -> Self {
        let mut x = seed;
        let state = [
            splitmix64(&mut x),
            splitmix64(&mut x),
            splitmix64(&mut x),
            splitmix64(&mut x),
        ];
        AnchorRng {
            state,
            spare_normal: None,
        }
    }

    /// Next 64 random bits (xoshiro256\*\*).
    pub fn next_u64(&mut self) -> u64 {
        let s = &mut self.state;
        let result = s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(45);
        result
    }

    /// Uniform in [0, 1) with 53 random bits.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Standard normal by Box–Muller (the second value of each pair is kept for the next call).
    pub fn next_normal(&mut self) -> f64 {
        if let Some(bits) = self.spare_normal.take() {
            return f64::from_bits(bits);
        }
        let u1 = 1.0 - self.next_f64();
        let u2 = self.next_f64();
        let r = libm::sqrt(-2.0 * libm::log(u1));
        let theta = 2.0 * core::f64::consts::PI * u2;
        self.spare_normal = Some((r * libm::sin(theta)).to_bits());
        r * libm::cos(theta)
    }
}

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

fn fill_normal<F: Real>(rng: &mut AnchorRng, out: &mut [F]) {
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
    rng: &mut AnchorRng,
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
    let mut rng = AnchorRng::new(seed);
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
    fn splitmix64_reference_values() {
        // Reference outputs of SplitMix64 from seed 0 (as published with the algorithm).
        let mut x = 0u64;
        assert_eq!(splitmix64(&mut x), 0xE220_A839_7B1D_CDAF);
        assert_eq!(splitmix64(&mut x), 0x6E78_9E6A_A1B9_65F4);
        assert_eq!(splitmix64(&mut x), 0x06C4_5D18_8009_454F);
    }

    #[test]
    fn normals_have_unit_moments() {
        let mut rng = AnchorRng::new(42);
        let n = 200_000;
        let (mut s1, mut s2) = (0.0, 0.0);
        for _ in 0..n {
            let z = rng.next_normal();
            s1 += z;
            s2 += z * z;
        }
        let mean = s1 / n as f64;
        let var = s2 / n as f64 - mean * mean;
        assert!(mean.abs() < 0.01, "mean {mean}");
        assert!((var - 1.0).abs() < 0.01, "var {var}");
    }

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
