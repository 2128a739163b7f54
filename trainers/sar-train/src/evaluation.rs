//! What an evaluation reports, for both tasks: classification accuracy (top-1, per class,
//! head/medium/tail) and segmentation IoU (mIoU, aAcc, mAcc, mHead/mBody/mTail), each computed
//! from one confusion matrix over the whole test set ([`sar_math::metrics`]), the calibration
//! of the predicted class's softmax probability (ECE and MCE over [`CALIBRATION_BINS`] bins, as
//! MiSLAS reports it; per test image, or per labelled test pixel), and the grouping of classes
//! by their training counts. The training loop sees only [`TaskEvaluation`].

use crate::config::{GroupBy, TrainConfig};
use anyhow::bail;
use sar_math::metrics::{
    expected_calibration_error, group_means, groups_by_count, groups_by_index, groups_by_rank,
    max_calibration_error, nan_mean, overall_accuracy, per_class_accuracy, per_class_iou,
    CalibrationBin, Group,
};
use serde::Serialize;

/// Confidence bins of the calibration metrics (15, as MiSLAS and Guo et al.).
pub const CALIBRATION_BINS: usize = 15;

/// The calibration of an evaluation's predictions (fractions, not percentages).
#[derive(Debug, Clone, Serialize)]
pub struct Calibration {
    /// Expected calibration error (NaN when no prediction had a finite confidence).
    pub ece: f64,
    /// Maximum calibration error over non-empty bins.
    pub mce: f64,
    /// The histogram: bin b holds confidences in (b/B, (b+1)/B].
    pub bins: Vec<CalibrationBin>,
}

impl Calibration {
    /// ECE and MCE of a histogram.
    pub fn from_bins(bins: Vec<CalibrationBin>) -> Self {
        Calibration {
            ece: expected_calibration_error(&bins),
            mce: max_calibration_error(&bins),
            bins,
        }
    }
}

/// The predicted class (the first maximum) and its softmax probability
/// 1 / Σ_k exp(z_k − z_max) (f64) of each row of `logits` `[N, K]`. A row with a non-finite
/// logit gets confidence NaN (left out of the calibration histogram).
pub fn predictions(logits: &[f32], classes: usize) -> (Vec<u32>, Vec<f64>) {
    logits
        .chunks_exact(classes.max(1))
        .map(|row| {
            let mut best = 0;
            for (k, &z) in row.iter().enumerate() {
                if z > row[best] {
                    best = k;
                }
            }
            let zmax = row[best] as f64;
            let conf = if row.iter().all(|z| z.is_finite()) {
                1.0 / row.iter().map(|&z| (z as f64 - zmax).exp()).sum::<f64>()
            } else {
                f64::NAN
            };
            (best as u32, conf)
        })
        .unzip()
}

/// Adds predictions to a calibration histogram: `confidence[i]` of prediction i, `correct[i]`
/// whether it was right; non-finite confidences are left out.
pub fn calibration_add(
    hist: &mut [CalibrationBin],
    confidence: &[f64],
    correct: &[bool],
) -> anyhow::Result<()> {
    let (c, k): (Vec<f64>, Vec<bool>) = confidence
        .iter()
        .zip(correct)
        .filter(|(p, _)| p.is_finite())
        .map(|(&p, &k)| (p.clamp(0.0, 1.0), k))
        .unzip();
    sar_math::metrics::calibration_update(hist, &c, &k)?;
    Ok(())
}

/// Evaluation of a model on a test set.
#[derive(Debug, Clone, Serialize)]
pub struct Evaluation {
    /// Top-1 accuracy.
    pub top1: f64,
    /// Accuracy per class.
    pub per_class_accuracy: Vec<f64>,
    /// Mean accuracy of the head (many-shot) classes.
    pub head: f64,
    /// Mean accuracy of the medium classes.
    pub medium: f64,
    /// Mean accuracy of the tail (few-shot) classes.
    pub tail: f64,
    /// Group of each class ("head", "medium", "tail").
    pub groups: Vec<String>,
    /// Calibration of the predicted class's probability, per test image.
    pub calibration: Calibration,
}

/// Classes grouped into head/medium/tail as `cfg.eval` says.
pub fn class_groups(cfg: &TrainConfig, train_counts: &[u64]) -> anyhow::Result<Vec<Group>> {
    let c = train_counts.len();
    let mut g = vec![Group::Head; c];
    let e = &cfg.eval;
    let by = e.groups.unwrap_or(if cfg.data.dataset.is_segmentation() {
        GroupBy::Rank
    } else {
        GroupBy::Count
    });
    match by {
        GroupBy::Count => groups_by_count(train_counts, e.many, e.few, &mut g)?,
        GroupBy::Rank => groups_by_rank(train_counts, 1.0 / 3.0, 1.0 / 3.0, &mut g)?,
        GroupBy::Index => groups_by_index(e.head_end.min(c), e.medium_end.min(c), &mut g)?,
    }
    Ok(g)
}

/// A test-set evaluation of either task.
#[derive(Debug, Clone, Serialize)]
#[serde(untagged)]
pub enum TaskEvaluation {
    /// Classification.
    Classification(Evaluation),
    /// Segmentation.
    Segmentation(SegEvaluation),
}

impl TaskEvaluation {
    /// The classification metrics, or an error for a segmentation run.
    pub fn classification(&self) -> anyhow::Result<&Evaluation> {
        match self {
            TaskEvaluation::Classification(e) => Ok(e),
            TaskEvaluation::Segmentation(_) => bail!("this is a segmentation evaluation"),
        }
    }
    /// The segmentation metrics, or an error for a classification run.
    pub fn segmentation(&self) -> anyhow::Result<&SegEvaluation> {
        match self {
            TaskEvaluation::Segmentation(e) => Ok(e),
            TaskEvaluation::Classification(_) => bail!("this is a classification evaluation"),
        }
    }
    /// One line for logs and the terminal.
    pub fn summary(&self) -> String {
        match self {
            TaskEvaluation::Classification(e) => format!(
                "top-1 {:.2}%  head {:.2}%  medium {:.2}%  tail {:.2}%  ECE {:.2}%",
                100.0 * e.top1,
                100.0 * e.head,
                100.0 * e.medium,
                100.0 * e.tail,
                100.0 * e.calibration.ece
            ),
            TaskEvaluation::Segmentation(e) => format!(
                "mIoU {:.2}%  aAcc {:.2}%  mHead {:.2}%  mBody {:.2}%  mTail {:.2}%  ECE {:.2}%",
                100.0 * e.miou,
                100.0 * e.aacc,
                100.0 * e.mhead,
                100.0 * e.mbody,
                100.0 * e.mtail,
                100.0 * e.calibration.ece
            ),
        }
    }
}

/// Segmentation metrics on a test set (fractions, not percentages).
#[derive(Debug, Clone, Serialize)]
pub struct SegEvaluation {
    /// Mean IoU over classes present in truth or prediction.
    pub miou: f64,
    /// Pixel accuracy over all labelled pixels.
    pub aacc: f64,
    /// Mean per-class pixel accuracy.
    pub macc: f64,
    /// Mean IoU of the head classes (most training pixels).
    pub mhead: f64,
    /// Mean IoU of the body classes.
    pub mbody: f64,
    /// Mean IoU of the tail classes (fewest training pixels).
    pub mtail: f64,
    /// IoU per class (NaN: absent from truth and prediction).
    pub per_class_iou: Vec<f64>,
    /// Pixel accuracy per class.
    pub per_class_accuracy: Vec<f64>,
    /// Group of each class ("head", "body", "tail").
    pub groups: Vec<String>,
    /// Class names.
    pub class_names: Vec<String>,
    /// Labelled test pixels.
    pub pixels: u64,
    /// Calibration of the predicted class's probability, per labelled test pixel.
    pub calibration: Calibration,
}

/// IoU, accuracies and group means of a `[K, K]` confusion matrix.
pub fn metrics_from_confusion(
    confusion: &[u64],
    groups: &[Group],
    names: &[String],
    calibration: Vec<CalibrationBin>,
) -> anyhow::Result<SegEvaluation> {
    let k = names.len();
    let mut iou = vec![0.0; k];
    per_class_iou(confusion, k, &mut iou)?;
    let mut acc = vec![0.0; k];
    per_class_accuracy(confusion, k, &mut acc)?;
    let g = group_means(&iou, groups)?;
    Ok(SegEvaluation {
        miou: nan_mean(&iou),
        aacc: overall_accuracy(confusion, k)?,
        macc: nan_mean(&acc),
        mhead: g.head,
        mbody: g.medium,
        mtail: g.tail,
        per_class_iou: iou,
        per_class_accuracy: acc,
        groups: group_names(groups, "body"),
        class_names: names.to_vec(),
        pixels: confusion.iter().sum(),
        calibration: Calibration::from_bins(calibration),
    })
}

/// Top-1, per-class and group accuracies of a `[C, C]` confusion matrix (rows: truth), with
/// the calibration histogram of the same predictions.
pub fn classification_metrics(
    confusion: &[u64],
    groups: &[Group],
    calibration: Vec<CalibrationBin>,
) -> anyhow::Result<Evaluation> {
    let c = groups.len();
    let mut acc = vec![0.0; c];
    per_class_accuracy(confusion, c, &mut acc)?;
    let g = group_means(&acc, groups)?;
    Ok(Evaluation {
        top1: overall_accuracy(confusion, c)?,
        per_class_accuracy: acc,
        head: g.head,
        medium: g.medium,
        tail: g.tail,
        groups: group_names(groups, "medium"),
        calibration: Calibration::from_bins(calibration),
    })
}

/// The name of each class's group; the middle group is "medium" in classification and "body"
/// in segmentation, as the paper's tables say.
fn group_names(groups: &[Group], medium: &str) -> Vec<String> {
    groups
        .iter()
        .map(|g| match g {
            Group::Head => "head",
            Group::Medium => medium,
            Group::Tail => "tail",
        })
        .map(String::from)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn predictions_take_the_first_maximum_and_its_softmax_probability() {
        // Row 1: logits (0, ln 4): softmax (1/5, 4/5). Row 2: a tie goes to the first class,
        // each at 1/2. Row 3: a NaN logit leaves the confidence out.
        let l = [0.0, 4f32.ln(), 1.0, 1.0, 0.0, f32::NAN];
        let (pred, conf) = predictions(&l, 2);
        assert_eq!(pred[..2], [1, 0]);
        assert!((conf[0] - 0.8).abs() < 1e-7 && (conf[1] - 0.5).abs() < 1e-12);
        assert!(conf[2].is_nan());
        let mut h = vec![CalibrationBin::default(); 4];
        calibration_add(&mut h, &conf, &[true, false, true]).unwrap();
        // 0.8 → bin 3 of 4 ((0.75, 1]), 0.5 → bin 1 ((0.25, 0.5]); the NaN row is not counted.
        assert_eq!(h.iter().map(|b| b.count).collect::<Vec<_>>(), [0, 1, 0, 1]);
        let c = Calibration::from_bins(h);
        // ECE = (|1 − 0.8| + |0 − 0.5|)/2 = 0.35; MCE = 0.5.
        assert!((c.ece - 0.35).abs() < 1e-7 && (c.mce - 0.5).abs() < 1e-12);
    }
}
