//! The `[N, D]` kernel (classification), plain or MixUp labels.

use super::{finish, grad_scale, P2aTargets, P2aValue};
use crate::error::{check_len, Op, Result, SarError};
use crate::real::{Label, Real};

/// The target row of one sample: Â_y, or λ·Â_{y_a} + (1 − λ)·Â_{y_b} with MixUp.
#[derive(Debug, Clone, Copy)]
pub enum RowLabels<'a, L> {
    /// One label per row.
    Plain(&'a [L]),
    /// MixUp: two labels per row and the batch's λ.
    Mixup {
        /// y_a.
        a: &'a [L],
        /// y_b.
        b: &'a [L],
        /// λ ∈ [0, 1], the weight of y_a.
        lambda: f64,
    },
}

/// L_p2a and (optionally) dL_p2a/dF for `[N, D]` features (classification).
///
/// ```
/// use sar_math::p2a::{p2a_rows, P2aTargets, RowLabels};
/// let anchors = [0.0f64, 0.0, 2.0, 2.0];           // Â_0 = (0,0), Â_1 = (2,2)
/// let targets = P2aTargets { anchors: &anchors, classes: 2, ignore_index: -1, class_active: None };
/// // MixUp λ = 0.25 between classes 0 and 1: target (1.5, 1.5).
/// let v = p2a_rows(&[1.5, 2.5], RowLabels::Mixup { a: &[0i64], b: &[1], lambda: 0.25 }, 2, &targets, None).unwrap();
/// assert_eq!(v.loss, 0.5);
/// ```
pub fn p2a_rows<F: Real, L: Label>(
    features: &[F],
    labels: RowLabels<'_, L>,
    dim: usize,
    targets: &P2aTargets<'_, F>,
    mut grad: Option<&mut [F]>,
) -> Result<P2aValue<F>> {
    let op = Op::P2a;
    if dim == 0 {
        return Err(SarError::Shape {
            op,
            what: "features need at least one channel",
        });
    }
    targets.validate(dim)?;
    if !features.len().is_multiple_of(dim) {
        return Err(SarError::Shape {
            op,
            what: "features length is not a multiple of D",
        });
    }
    let rows = features.len() / dim;
    if let Some(g) = &grad {
        check_len(op, "grad_features", g.len(), features.len())?;
    }
    let lambda = match labels {
        RowLabels::Plain(l) => {
            check_len(op, "labels", l.len(), rows)?;
            1.0
        }
        RowLabels::Mixup { a, b, lambda } => {
            check_len(op, "labels_a", a.len(), rows)?;
            check_len(op, "labels_b", b.len(), rows)?;
            crate::config::check_range(op, "mixup lambda", lambda, 0.0, 1.0, false, "[0, 1]")?;
            lambda
        }
    };
    let row_classes = |n: usize| -> Result<Option<(usize, usize)>> {
        Ok(match labels {
            RowLabels::Plain(l) => targets.class_of(l[n].to_i64(), n)?.map(|c| (c, c)),
            RowLabels::Mixup { a, b, .. } => {
                let ca = targets.class_of(a[n].to_i64(), n)?;
                let cb = targets.class_of(b[n].to_i64(), n)?;
                ca.zip(cb)
            }
        })
    };
    let mut valid = 0;
    for n in 0..rows {
        if row_classes(n)?.is_some() {
            valid += 1;
        }
    }
    let scale = grad_scale::<F>(valid, dim);
    let (lam, one_minus) = (F::from_f64(lambda), F::from_f64(1.0 - lambda));
    let mut sum_sq = 0.0f64;
    for n in 0..rows {
        let f = &features[n * dim..(n + 1) * dim];
        let g = grad.as_deref_mut().map(|g| &mut g[n * dim..(n + 1) * dim]);
        let Some((ca, cb)) = row_classes(n)? else {
            if let Some(g) = g {
                g.iter_mut().for_each(|v| *v = F::zero());
            }
            continue;
        };
        let (ta, tb) = (
            &targets.anchors[ca * dim..][..dim],
            &targets.anchors[cb * dim..][..dim],
        );
        let mut acc = F::zero();
        let mut emit = |d: usize, diff: F, g: &mut Option<&mut [F]>| {
            acc = acc + diff * diff;
            if let Some(g) = g {
                g[d] = scale * diff;
            }
        };
        let mut g = g;
        if ca == cb {
            for d in 0..dim {
                emit(d, f[d] - ta[d], &mut g);
            }
        } else {
            for d in 0..dim {
                emit(d, f[d] - (lam * ta[d] + one_minus * tb[d]), &mut g);
            }
        }
        sum_sq += acc.as_f64();
    }
    finish(sum_sq, valid, dim)
}
