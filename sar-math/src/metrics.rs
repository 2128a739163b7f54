//! Evaluation metrics over a confusion matrix, and head/medium/tail grouping.
//!
//! The confusion matrix is row-major `[C, C]` of `u64` counts: row = ground truth, column =
//! prediction. Pixels or samples whose truth equals the ignore index are skipped.
//!
//! - top-1 (classification) = aAcc (segmentation) = trace / total;
//! - per-class accuracy (recall) = TP_c / row_c, NaN when class c never occurs;
//! - IoU_c = TP_c / (row_c + col_c − TP_c), NaN when the union is empty; mIoU = mean over
//!   non-NaN classes (mmsegmentation's `nanmean`);
//! - groups: head/medium/tail ("many/medium/few", "head/body/tail") by class-index ranges
//!   (CIFAR-100-LT: [0,36), [36,71), [71,100)), by training-set count thresholds
//!   (many > 100, few < 20 in the LT literature), or by frequency rank (segmentation).
//! - calibration (Guo et al. 2017, as MiSLAS reports it, 15 bins): each sample's confidence
//!   p̂ = max_k softmax(z)_k falls in bin b when b/B < p̂ ≤ (b+1)/B (numpy's
//!   `digitize(p̂, linspace(0, 1, B+1), right=True)`; p̂ = 0 belongs to no bin);
//!   ECE = Σ_b (n_b / N)·|acc_b − conf_b| over non-empty bins, MCE = max_b |acc_b − conf_b|,
//!   with acc_b the bin's share of correct predictions and conf_b its mean confidence.

use crate::error::{check_len, mul_dims, Op, Result, SarError};
use crate::real::Label;

/// Adds `(truth, prediction)` pairs to `confusion` (`[C, C]`). A truth equal to `ignore_index`
/// is skipped; any other value outside `0..C` is an error, as is a prediction outside `0..C`.
pub fn confusion_update<L: Label, P: Label>(
    confusion: &mut [u64],
    classes: usize,
    truth: &[L],
    prediction: &[P],
    ignore_index: i64,
) -> Result<()> {
    let op = Op::Metrics;
    check_len(
        op,
        "confusion",
        confusion.len(),
        mul_dims(op, &[classes, classes])?,
    )?;
    check_len(op, "prediction", prediction.len(), truth.len())?;
    let in_range = |v: i64| v >= 0 && (v as u64) < classes as u64;
    for (i, (&t, &p)) in truth.iter().zip(prediction).enumerate() {
        let (t, p) = (t.to_i64(), p.to_i64());
        if t == ignore_index {
            continue;
        }
        if !in_range(t) {
            return Err(SarError::Label {
                op,
                index: i,
                label: t,
                classes,
            });
        }
        if !in_range(p) {
            return Err(SarError::Label {
                op,
                index: i,
                label: p,
                classes,
            });
        }
        confusion[t as usize * classes + p as usize] += 1;
    }
    Ok(())
}

fn check_conf(confusion: &[u64], classes: usize, out_len: usize) -> Result<()> {
    let op = Op::Metrics;
    check_len(
        op,
        "confusion",
        confusion.len(),
        mul_dims(op, &[classes, classes])?,
    )?;
    check_len(op, "per-class output", out_len, classes)
}

/// trace / total (top-1 accuracy, or aAcc); NaN for an empty matrix.
pub fn overall_accuracy(confusion: &[u64], classes: usize) -> Result<f64> {
    check_conf(confusion, classes, classes)?;
    let total: u64 = confusion.iter().sum();
    let trace: u64 = (0..classes).map(|c| confusion[c * classes + c]).sum();
    Ok(if total == 0 {
        f64::NAN
    } else {
        trace as f64 / total as f64
    })
}

/// Per-class accuracy TP_c / row_c into `out` (NaN for classes absent from the truth).
pub fn per_class_accuracy(confusion: &[u64], classes: usize, out: &mut [f64]) -> Result<()> {
    check_conf(confusion, classes, out.len())?;
    for (c, o) in out.iter_mut().enumerate() {
        let row: u64 = confusion[c * classes..(c + 1) * classes].iter().sum();
        *o = if row == 0 {
            f64::NAN
        } else {
            confusion[c * classes + c] as f64 / row as f64
        };
    }
    Ok(())
}

/// Per-class IoU into `out` (NaN where the union is empty).
pub fn per_class_iou(confusion: &[u64], classes: usize, out: &mut [f64]) -> Result<()> {
    check_conf(confusion, classes, out.len())?;
    for (c, o) in out.iter_mut().enumerate() {
        let row: u64 = confusion[c * classes..(c + 1) * classes].iter().sum();
        let col: u64 = (0..classes).map(|r| confusion[r * classes + c]).sum();
        let tp = confusion[c * classes + c];
        let union = row + col - tp;
        *o = if union == 0 {
            f64::NAN
        } else {
            tp as f64 / union as f64
        };
    }
    Ok(())
}

/// Mean of the non-NaN values (NaN if there are none).
pub fn nan_mean(values: &[f64]) -> f64 {
    let (sum, n) = values
        .iter()
        .filter(|v| !v.is_nan())
        .fold((0.0, 0usize), |(s, n), &v| (s + v, n + 1));
    if n == 0 {
        f64::NAN
    } else {
        sum / n as f64
    }
}

/// A class's long-tail group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "kebab-case"))]
pub enum Group {
    /// Head ("many-shot").
    Head,
    /// Medium ("body").
    Medium,
    /// Tail ("few-shot").
    Tail,
}

/// Groups by index: `[0, head_end)` head, `[head_end, medium_end)` medium, the rest tail
/// (CIFAR-100-LT: 36, 71).
pub fn groups_by_index(head_end: usize, medium_end: usize, out: &mut [Group]) -> Result<()> {
    if head_end > medium_end || medium_end > out.len() {
        return Err(SarError::Shape {
            op: Op::LongTail,
            what: "need head_end <= medium_end <= classes",
        });
    }
    for (c, g) in out.iter_mut().enumerate() {
        *g = if c < head_end {
            Group::Head
        } else if c < medium_end {
            Group::Medium
        } else {
            Group::Tail
        };
    }
    Ok(())
}

/// Groups by training-set count: head if `count > many_above`, tail if `count < few_below`,
/// else medium (the LT literature uses 100 and 20).
pub fn groups_by_count(
    counts: &[u64],
    many_above: u64,
    few_below: u64,
    out: &mut [Group],
) -> Result<()> {
    check_len(Op::LongTail, "groups", out.len(), counts.len())?;
    for (g, &n) in out.iter_mut().zip(counts) {
        *g = if n > many_above {
            Group::Head
        } else if n < few_below {
            Group::Tail
        } else {
            Group::Medium
        };
    }
    Ok(())
}

/// Groups by frequency rank (segmentation's head/body/tail by pixel frequency): classes sorted
/// by descending count (ties by index); the first `round(C·head_fraction)` are head, the next
/// `round(C·medium_fraction)` medium, the rest tail. Allocation-free (O(C²)).
pub fn groups_by_rank(
    counts: &[u64],
    head_fraction: f64,
    medium_fraction: f64,
    out: &mut [Group],
) -> Result<()> {
    let op = Op::LongTail;
    check_len(op, "groups", out.len(), counts.len())?;
    crate::config::check_range(
        op,
        "head_fraction",
        head_fraction,
        0.0,
        1.0,
        false,
        "[0, 1]",
    )?;
    crate::config::check_range(
        op,
        "medium_fraction",
        medium_fraction,
        0.0,
        1.0 - head_fraction,
        false,
        "[0, 1 − head]",
    )?;
    let c = counts.len() as f64;
    let head_n = libm::round(c * head_fraction) as usize;
    let medium_n = libm::round(c * medium_fraction) as usize;
    for (i, g) in out.iter_mut().enumerate() {
        let rank = counts
            .iter()
            .enumerate()
            .filter(|&(j, &n)| n > counts[i] || (n == counts[i] && j < i))
            .count();
        *g = if rank < head_n {
            Group::Head
        } else if rank < head_n + medium_n {
            Group::Medium
        } else {
            Group::Tail
        };
    }
    Ok(())
}

/// NaN-skipping means of a per-class metric over each group.
#[derive(Debug, Clone, Copy, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct GroupMeans {
    /// Mean over head classes.
    pub head: f64,
    /// Mean over medium classes.
    pub medium: f64,
    /// Mean over tail classes.
    pub tail: f64,
}

/// Means of `values` per group.
pub fn group_means(values: &[f64], groups: &[Group]) -> Result<GroupMeans> {
    check_len(Op::Metrics, "groups", groups.len(), values.len())?;
    let mean_of = |want: Group| {
        let (s, n) = values
            .iter()
            .zip(groups)
            .filter(|(v, &g)| g == want && !v.is_nan())
            .fold((0.0, 0usize), |(s, n), (&v, _)| (s + v, n + 1));
        if n == 0 {
            f64::NAN
        } else {
            s / n as f64
        }
    };
    Ok(GroupMeans {
        head: mean_of(Group::Head),
        medium: mean_of(Group::Medium),
        tail: mean_of(Group::Tail),
    })
}

/// One confidence bin of a calibration histogram (see the module docs).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct CalibrationBin {
    /// Samples whose confidence fell in the bin.
    pub count: u64,
    /// Sum of their confidences.
    pub confidence_sum: f64,
    /// How many of them were predicted correctly.
    pub correct: u64,
}

impl CalibrationBin {
    /// Mean confidence of the bin (NaN when empty).
    pub fn confidence(&self) -> f64 {
        self.confidence_sum / self.count as f64
    }
    /// Share of correct predictions in the bin (NaN when empty).
    pub fn accuracy(&self) -> f64 {
        self.correct as f64 / self.count as f64
    }
}

/// The bin of confidence `p` among `bins` equal-width bins: b with b/B < p ≤ (b+1)/B (the
/// edges as numpy's `linspace(0, 1, B + 1)` computes them), `None` for p = 0 (no bin, as
/// numpy's `digitize` puts it below the first edge). `p` must lie in [0, 1].
pub fn calibration_bin(p: f64, bins: usize) -> Result<Option<usize>> {
    if bins == 0 {
        return Err(SarError::Param {
            op: Op::Metrics,
            name: "calibration bins",
            value: 0.0,
            domain: "≥ 1",
        });
    }
    if !(0.0..=1.0).contains(&p) {
        return Err(if p.is_finite() {
            SarError::Param {
                op: Op::Metrics,
                name: "confidence",
                value: p,
                domain: "[0, 1]",
            }
        } else {
            SarError::NonFinite {
                op: Op::Metrics,
                what: "confidence",
            }
        });
    }
    let step = 1.0 / bins as f64;
    let edge = |i: usize| if i == bins { 1.0 } else { i as f64 * step };
    if p <= 0.0 {
        return Ok(None);
    }
    // The estimate from the division (truncation; no `ceil` without std), corrected against
    // the edges themselves.
    let mut b = ((p * bins as f64) as usize).min(bins - 1);
    while b > 0 && p <= edge(b) {
        b -= 1;
    }
    while b + 1 < bins && p > edge(b + 1) {
        b += 1;
    }
    Ok(Some(b))
}

/// Adds samples to a calibration histogram of `hist.len()` bins: `confidence[i]` in [0, 1]
/// (the predicted class's probability) and whether prediction i was `correct`.
pub fn calibration_update(
    hist: &mut [CalibrationBin],
    confidence: &[f64],
    correct: &[bool],
) -> Result<()> {
    check_len(Op::Metrics, "correct", correct.len(), confidence.len())?;
    // Validate everything first, so a bad value leaves the histogram untouched.
    for &p in confidence {
        calibration_bin(p, hist.len())?;
    }
    for (&p, &ok) in confidence.iter().zip(correct) {
        if let Some(b) = calibration_bin(p, hist.len())? {
            let bin = &mut hist[b];
            bin.count += 1;
            bin.confidence_sum += p;
            bin.correct += ok as u64;
        }
    }
    Ok(())
}

/// Expected calibration error Σ_b (n_b / N)·|acc_b − conf_b| (a fraction; NaN when the
/// histogram is empty).
pub fn expected_calibration_error(hist: &[CalibrationBin]) -> f64 {
    let n: u64 = hist.iter().map(|b| b.count).sum();
    hist.iter()
        .filter(|b| b.count > 0)
        .map(|b| b.count as f64 * (b.accuracy() - b.confidence()).abs())
        .sum::<f64>()
        / n as f64
}

/// Maximum calibration error max_b |acc_b − conf_b| over non-empty bins (NaN when empty).
pub fn max_calibration_error(hist: &[CalibrationBin]) -> f64 {
    hist.iter()
        .filter(|b| b.count > 0)
        .map(|b| (b.accuracy() - b.confidence()).abs())
        .fold(f64::NAN, f64::max)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hand_computed_confusion() {
        // truth:      0 0 1 1 1 2 (255 ignored)
        // prediction: 0 1 1 1 0 1
        let mut m = [0u64; 9];
        confusion_update(
            &mut m,
            3,
            &[0u8, 0, 1, 1, 1, 2, 255],
            &[0u8, 1, 1, 1, 0, 1, 2],
            255,
        )
        .unwrap();
        assert_eq!(m, [1, 1, 0, 1, 2, 0, 0, 1, 0]);
        assert_eq!(overall_accuracy(&m, 3).unwrap(), 0.5);
        let mut acc = [0.0; 3];
        per_class_accuracy(&m, 3, &mut acc).unwrap();
        assert_eq!(acc[..2], [0.5, 2.0 / 3.0]);
        assert_eq!(acc[2], 0.0);
        let mut iou = [0.0; 3];
        per_class_iou(&m, 3, &mut iou).unwrap();
        // IoU0 = 1/(2+2−1) = 1/3, IoU1 = 2/(3+4−2) = 2/5, IoU2 = 0/(1+0−0) = 0.
        assert_eq!(iou, [1.0 / 3.0, 0.4, 0.0]);
        assert!((nan_mean(&iou) - (1.0 / 3.0 + 0.4) / 3.0).abs() < 1e-15);
        assert!(confusion_update(&mut m, 3, &[3u8], &[0u8], 255).is_err());
        assert!(confusion_update(&mut m, 3, &[0u8], &[7u8], 255).is_err());
    }

    #[test]
    fn absent_class_is_nan_and_skipped() {
        let m = [3u64, 0, 0, 0];
        let mut iou = [0.0; 2];
        per_class_iou(&m, 2, &mut iou).unwrap();
        assert_eq!(iou[0], 1.0);
        assert!(iou[1].is_nan());
        assert_eq!(nan_mean(&iou), 1.0);
    }

    #[test]
    fn grouping() {
        let mut g = [Group::Head; 5];
        groups_by_index(2, 4, &mut g).unwrap();
        assert_eq!(
            g,
            [
                Group::Head,
                Group::Head,
                Group::Medium,
                Group::Medium,
                Group::Tail
            ]
        );
        groups_by_count(&[500, 100, 20, 19, 101], 100, 20, &mut g).unwrap();
        assert_eq!(
            g,
            [
                Group::Head,
                Group::Medium,
                Group::Medium,
                Group::Tail,
                Group::Head
            ]
        );
        groups_by_rank(&[5, 50, 1, 50, 9], 0.4, 0.2, &mut g).unwrap();
        assert_eq!(
            g,
            [
                Group::Tail,
                Group::Head,
                Group::Tail,
                Group::Head,
                Group::Medium
            ]
        );
        let m = group_means(&[1.0, 0.5, f64::NAN, 0.0, 0.25], &g).unwrap();
        assert_eq!(
            m,
            GroupMeans {
                head: 0.25,
                medium: 0.25,
                tail: 1.0
            }
        );
    }

    #[test]
    fn calibration_bins_follow_numpy_digitize_right() {
        // 15 bins: (0, 1/15], (1/15, 2/15], …; an edge belongs to the bin below it.
        assert_eq!(calibration_bin(0.0, 15).unwrap(), None);
        assert_eq!(calibration_bin(1e-9, 15).unwrap(), Some(0));
        assert_eq!(calibration_bin(1.0 / 15.0, 15).unwrap(), Some(0));
        assert_eq!(calibration_bin(1.0 / 15.0 + 1e-12, 15).unwrap(), Some(1));
        assert_eq!(calibration_bin(0.5, 15).unwrap(), Some(7)); // 7/15 < 0.5 ≤ 8/15
        assert_eq!(calibration_bin(14.0 / 15.0, 15).unwrap(), Some(13));
        assert_eq!(calibration_bin(1.0, 15).unwrap(), Some(14));
        // Every edge i·(1/15) as linspace computes it falls in bin i − 1.
        for i in 1..=15 {
            let e = if i == 15 {
                1.0
            } else {
                i as f64 * (1.0 / 15.0)
            };
            assert_eq!(calibration_bin(e, 15).unwrap(), Some(i - 1), "edge {i}");
        }
        assert!(calibration_bin(1.5, 15).is_err());
        assert!(calibration_bin(f64::NAN, 15).is_err());
        assert!(calibration_bin(0.5, 0).is_err());
    }

    #[test]
    fn ece_and_mce_of_a_small_table_by_hand() {
        // 4 bins. Samples: 0.9 ✓, 0.8 ✓, 0.8 ✗, 0.3 ✗, 0.3 ✓.
        // bin 3 (0.75, 1]: 3 samples, conf (0.9 + 0.8 + 0.8)/3 = 0.8333…, acc 2/3, gap 1/6;
        // bin 1 (0.25, 0.5]: 2 samples, conf 0.3, acc 0.5, gap 0.2.
        // ECE = (3·(1/6) + 2·0.2)/5 = 0.9/5 = 0.18; MCE = 0.2.
        let mut h = [CalibrationBin::default(); 4];
        calibration_update(
            &mut h,
            &[0.9, 0.8, 0.8, 0.3, 0.3],
            &[true, true, false, false, true],
        )
        .unwrap();
        assert_eq!(
            (h[3].count, h[3].correct, h[1].count, h[1].correct),
            (3, 2, 2, 1)
        );
        assert_eq!((h[0].count, h[2].count), (0, 0));
        assert!((expected_calibration_error(&h) - 0.18).abs() < 1e-12);
        assert!((max_calibration_error(&h) - 0.2).abs() < 1e-12);
        // A perfectly calibrated bin contributes nothing.
        let mut p = [CalibrationBin::default(); 2];
        calibration_update(
            &mut p,
            &[0.75, 0.75, 0.75, 0.75],
            &[true, true, true, false],
        )
        .unwrap();
        assert_eq!(expected_calibration_error(&p), 0.0);
        // Bad input is an error and changes nothing.
        let before = h;
        assert!(calibration_update(&mut h, &[0.5, 2.0], &[true, true]).is_err());
        assert!(calibration_update(&mut h, &[0.5], &[true, true]).is_err());
        assert_eq!(h, before);
        assert!(expected_calibration_error(&[CalibrationBin::default(); 3]).is_nan());
        assert!(max_calibration_error(&[CalibrationBin::default(); 3]).is_nan());
    }
}
