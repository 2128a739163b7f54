//! What an evaluation reports, for both tasks: classification accuracy (top-1, per class,
//! head/medium/tail) and segmentation IoU (mIoU, aAcc, mAcc, mHead/mBody/mTail), each computed
//! from one confusion matrix over the whole test set ([`sar_math::metrics`]), and the grouping
//! of classes by their training counts. The training loop sees only [`TaskEvaluation`].

use crate::config::{GroupBy, TrainConfig};
use anyhow::bail;
use sar_math::metrics::{
    group_means, groups_by_count, groups_by_index, groups_by_rank, nan_mean, overall_accuracy,
    per_class_accuracy, per_class_iou, Group,
};
use serde::Serialize;

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
                "top-1 {:.2}%  head {:.2}%  medium {:.2}%  tail {:.2}%",
                100.0 * e.top1,
                100.0 * e.head,
                100.0 * e.medium,
                100.0 * e.tail
            ),
            TaskEvaluation::Segmentation(e) => format!(
                "mIoU {:.2}%  aAcc {:.2}%  mHead {:.2}%  mBody {:.2}%  mTail {:.2}%",
                100.0 * e.miou,
                100.0 * e.aacc,
                100.0 * e.mhead,
                100.0 * e.mbody,
                100.0 * e.mtail
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
}

/// IoU, accuracies and group means of a `[K, K]` confusion matrix.
pub fn metrics_from_confusion(
    confusion: &[u64],
    groups: &[Group],
    names: &[String],
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
    })
}

/// Top-1, per-class and group accuracies of a `[C, C]` confusion matrix (rows: truth).
pub fn classification_metrics(confusion: &[u64], groups: &[Group]) -> anyhow::Result<Evaluation> {
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
