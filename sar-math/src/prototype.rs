//! Baselines the paper compares SAR with (spec §7).
//!
//! Layout: features NCHW `[B, D, H, W]` with labels `[B, H', W']` resampled by PyTorch's legacy
//! `nearest` ([`crate::resample`]). Classification features `[N, D]` are the special case
//! `B = N, H = W = H' = W' = 1`.
//!
//! - **Prototypes** (Eq. 1/3): P_c = mean of F_i over the pixels i ∈ Ω with y_i = c; a class with
//!   no pixel has none (count 0, row left at zero).
//! - **CR** (Table 7): p2a toward the raw pre-defined anchors A, no embedding, no aux loss; that
//!   is [`crate::p2a::p2a_nchw`] / [`crate::p2a::p2a_rows`] with `anchors = A`.
//! - **CAR intra-class loss**: m = (1/(N·D)) Σ_{i∈Ω} Σ_d |F_{i,d} − P_{y_i,d}| with N = B·H·W
//!   (pixels outside Ω count as zeros in the mean), L = max(m², 1e-5). P is a constant
//!   (stop-gradient). dL/dF_{i,d} = 2m·sign(F_{i,d} − P_{y_i,d})/(N·D) for i ∈ Ω when
//!   m² ≥ 1e-5 (clamp passes gradient at the bound, like `torch.clamp`), else 0; sign(0) = 0.

use crate::error::{check_len, Op, Result, SarError};
use crate::p2a::{FeatureGeometry, P2aTargets};
use crate::real::{Label, Real};
use crate::resample::nearest_source_index;

/// Lower clip of the CAR intra-class loss.
pub const CAR_MIN_LOSS: f64 = 1e-5;

/// Calls `visit(feature_offset_of_channel_0, class)` for every pixel in Ω, where the pixel's
/// channel d lives at `offset + d·H·W`.
fn for_each_valid_pixel<F: Real, L: Label>(
    op: Op,
    labels: &[L],
    geometry: &FeatureGeometry,
    targets: &P2aTargets<'_, F>,
    mut visit: impl FnMut(usize, usize),
) -> Result<()> {
    crate::p2a::p2a_valid_count_nchw(labels, geometry, targets).map_err(|e| match e {
        SarError::Label {
            index,
            label,
            classes,
            ..
        } => SarError::Label {
            op,
            index,
            label,
            classes,
        },
        other => other,
    })?;
    let (h, w, d) = (geometry.height, geometry.width, geometry.channels);
    let (lh, lw) = (geometry.label_height, geometry.label_width);
    for b in 0..geometry.batch {
        for y in 0..h {
            let row = (b * lh + nearest_source_index(lh, h, y)) * lw;
            for x in 0..w {
                let li = row + nearest_source_index(lw, w, x);
                let label = labels[li].to_i64();
                if label == targets.ignore_index {
                    continue;
                }
                let c = label as usize; // validated above
                if targets.class_active.is_some_and(|a| !a[c]) {
                    continue;
                }
                visit(b * d * h * w + y * w + x, c);
            }
        }
    }
    Ok(())
}

/// Per-class mean features over Ω into `prototypes` (`[C, D]`) and pixel counts into `counts`.
/// `targets.anchors` is not read (pass the prototypes' own shape, e.g. the current anchors).
pub fn class_prototypes<F: Real, L: Label>(
    features: &[F],
    labels: &[L],
    geometry: &FeatureGeometry,
    targets: &P2aTargets<'_, F>,
    prototypes: &mut [F],
    counts: &mut [u64],
) -> Result<()> {
    let op = Op::Prototype;
    check_len(op, "features", features.len(), geometry.feature_len()?)?;
    check_len(op, "prototypes", prototypes.len(), targets.anchors.len())?;
    check_len(op, "counts", counts.len(), targets.classes)?;
    let (d, hw) = (geometry.channels, geometry.height * geometry.width);
    prototypes.iter_mut().for_each(|p| *p = F::zero());
    counts.iter_mut().for_each(|c| *c = 0);
    for_each_valid_pixel(op, labels, geometry, targets, |off, c| {
        counts[c] += 1;
        for k in 0..d {
            prototypes[c * d + k] = prototypes[c * d + k] + features[off + k * hw];
        }
    })?;
    for (c, &n) in counts.iter().enumerate() {
        if n > 0 {
            let inv = F::one() / F::from_f64(n as f64);
            prototypes[c * d..(c + 1) * d]
                .iter_mut()
                .for_each(|p| *p = *p * inv);
        }
    }
    Ok(())
}

/// CAR intra-class loss toward `targets.anchors` = the (detached) prototypes, with its gradient.
pub fn car_intra_class<F: Real, L: Label>(
    features: &[F],
    labels: &[L],
    geometry: &FeatureGeometry,
    targets: &P2aTargets<'_, F>,
    grad: Option<&mut [F]>,
) -> Result<F> {
    let op = Op::Car;
    check_len(op, "features", features.len(), geometry.feature_len()?)?;
    if let Some(g) = &grad {
        check_len(op, "grad_features", g.len(), features.len())?;
    }
    let (d, hw) = (geometry.channels, geometry.height * geometry.width);
    let mut sum_abs = 0.0f64;
    for_each_valid_pixel(op, labels, geometry, targets, |off, c| {
        for k in 0..d {
            sum_abs += (features[off + k * hw] - targets.anchors[c * d + k])
                .abs()
                .as_f64();
        }
    })?;
    let n = (geometry.batch * hw * d) as f64;
    let mean = if n == 0.0 { 0.0 } else { sum_abs / n };
    let raw = mean * mean;
    if !raw.is_finite() {
        return Err(SarError::NonFinite {
            op,
            what: "CAR loss (features inside Ω)",
        });
    }
    if let Some(g) = grad {
        g.iter_mut().for_each(|v| *v = F::zero());
        if raw >= CAR_MIN_LOSS {
            let k_scale = F::from_f64(2.0 * mean / n);
            for_each_valid_pixel(op, labels, geometry, targets, |off, c| {
                for k in 0..d {
                    let diff = features[off + k * hw] - targets.anchors[c * d + k];
                    let sign = if diff > F::zero() {
                        F::one()
                    } else if diff < F::zero() {
                        -F::one()
                    } else {
                        F::zero()
                    };
                    g[off + k * hw] = k_scale * sign;
                }
            })?;
        }
    }
    Ok(F::from_f64(raw.max(CAR_MIN_LOSS)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows(n: usize, d: usize) -> FeatureGeometry {
        FeatureGeometry {
            batch: n,
            channels: d,
            height: 1,
            width: 1,
            label_height: 1,
            label_width: 1,
        }
    }

    #[test]
    fn prototypes_by_hand() {
        let f = [1.0f64, 2.0, 3.0, 4.0, 10.0, 10.0, 0.0, 0.0];
        let zeros = [0.0; 6];
        let targets = P2aTargets {
            anchors: &zeros,
            classes: 3,
            ignore_index: 255,
            class_active: None,
        };
        let (mut p, mut n) = ([0.0; 6], [0u64; 3]);
        class_prototypes(&f, &[0u8, 0, 2, 255], &rows(4, 2), &targets, &mut p, &mut n).unwrap();
        assert_eq!(n, [2, 0, 1]);
        assert_eq!(p, [2.0, 3.0, 0.0, 0.0, 10.0, 10.0]);
    }

    #[test]
    fn car_by_hand() {
        // Two rows of D = 2, one ignored: m = (|3−1| + |−1−0|)/(2·2) = 0.75, L = 0.5625.
        let f = [3.0f64, -1.0, 7.0, 7.0];
        let p = [1.0, 0.0];
        let targets = P2aTargets {
            anchors: &p,
            classes: 1,
            ignore_index: 255,
            class_active: None,
        };
        let mut g = [9.0; 4];
        let l = car_intra_class(&f, &[0u8, 255], &rows(2, 2), &targets, Some(&mut g)).unwrap();
        assert_eq!(l, 0.5625);
        assert_eq!(g, [0.375, -0.375, 0.0, 0.0]); // 2·0.75·sign/4
                                                  // Clipped: features on their prototype.
        let l = car_intra_class(
            &[1.0, 0.0, 7.0, 7.0],
            &[0u8, 255],
            &rows(2, 2),
            &targets,
            Some(&mut g),
        )
        .unwrap();
        assert_eq!(l, CAR_MIN_LOSS);
        assert_eq!(g, [0.0; 4]);
    }
}
