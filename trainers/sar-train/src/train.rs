//! The classification trainer behind `sar train` and `sar eval`.
//!
//! One step: render the batch (parallel crop/flip, optional MixUp) → features F = f(x) `[B, D]`
//! (BatchNorm in training mode) → logits g(F) → cross-entropy (MixUp: λ·CE(y_a) +
//! (1−λ)·CE(y_b)) → with SAR, [`SarHead::step`] (or `step_mixup`) adds λ1·L_aux + λ2·L_p2a,
//! the head classifying its embedded anchors with the same `g` → every loss part checked for
//! NaN/inf → backward → SGD with the scheduled rate.
//!
//! Reproducibility: weights, anchors, data order and augmentation derive from `run.seed` and
//! counters (epoch, position), so a run is a function of its config; a checkpoint holds every
//! variable, the momentum buffers, the SAR buffers and the step, and `--resume` continues
//! bit for bit on the CPU (tested).
//!
//! Outputs in `run.output`: `config.toml` (written before step 0), `metrics.jsonl` (one JSON
//! object per line: `"kind": "train"` every `log_every` steps, `"eval"` after evaluations,
//! `"resume"`, `"skip"`), `checkpoints/`, `report.json`.

use crate::checkpoint::{self, CheckpointState};
use crate::config::{
    AugmentKind, BackendKind, DatasetKind, DeviceKind, GroupBy, NonFinitePolicy, ScheduleKind,
    TrainConfig,
};
use crate::optim::{learning_rate, Schedule, Sgd};
use anyhow::{bail, ensure, Context};
use candle_core::{DType, Device, Tensor, D};
use candle_nn::VarMap;
use sar_candle::{CandleBackend, EmbeddingKind, SarHead, SarHeadConfig};
use sar_data::augment::{self, Augment, Normalize};
use sar_data::dataset::Dataset;
use sar_data::{cifar, cub, digits, idx, split};
use sar_math::metrics::{
    confusion_update, group_means, groups_by_count, groups_by_index, groups_by_rank,
    overall_accuracy, per_class_accuracy, Group,
};
use sar_models::{ImageClassifier, ModelSpec};
use serde::Serialize;
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// The training and test sets of a config.
pub struct Datasets {
    /// Training set (long-tailed if `data.imbalance` is set).
    pub train: Dataset,
    /// Test set (balanced).
    pub test: Dataset,
}

/// Loads the data sets named by `cfg.data`.
pub fn load_data(cfg: &TrainConfig) -> anyhow::Result<Datasets> {
    let d = &cfg.data;
    let root = || d.root.clone().unwrap_or_default();
    let mem = |s: sar_data::ImageSet| Dataset::Memory(s);
    let files = |set: cub::FileSet| Dataset::Files {
        set,
        size: d.crop,
        resize: d.resize,
    };
    let (train, test) = match d.dataset {
        DatasetKind::Digits => {
            let all = digits::embedded()?;
            let (tr, te) = split::stratified(&all.labels, 10, d.test_fraction, d.split_seed)?;
            (
                mem(all.subset(&tr, "digits/train")?),
                mem(all.subset(&te, "digits/test")?),
            )
        }
        DatasetKind::Cub200 => (
            files(cub::read_cub(&root(), true)?),
            files(cub::read_cub(&root(), false)?),
        ),
        DatasetKind::MnistIdx => (
            mem(idx::read_mnist_dir(&root(), true, 10)?),
            mem(idx::read_mnist_dir(&root(), false, 10)?),
        ),
        DatasetKind::Cifar10 => (
            mem(cifar::read_cifar10(&root(), true)?),
            mem(cifar::read_cifar10(&root(), false)?),
        ),
        DatasetKind::Cifar100 => (
            mem(cifar::read_cifar100(
                &root(),
                true,
                cifar::Cifar::HundredFine,
            )?),
            mem(cifar::read_cifar100(
                &root(),
                false,
                cifar::Cifar::HundredFine,
            )?),
        ),
        other => bail!("{other:?} is a segmentation data set, not a classification one"),
    };
    let train = match d.imbalance {
        Some(f) => {
            let keep = split::long_tailed(train.labels(), train.classes(), f, None, d.split_seed)?;
            let name = format!("{}-lt{f}", train.name());
            train.subset(&keep, &name)?
        }
        None => train,
    };
    ensure!(!train.is_empty(), "the training set is empty");
    ensure!(!test.is_empty(), "the test set is empty");
    Ok(Datasets { train, test })
}

pub(crate) fn device(kind: DeviceKind) -> anyhow::Result<Device> {
    match kind {
        DeviceKind::Cpu => Ok(Device::Cpu),
        DeviceKind::Cuda => Device::new_cuda(0).context("cannot open CUDA device 0"),
    }
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

/// Top-1, per-class and group accuracies of `model` on `set` (BatchNorm in eval mode).
pub fn evaluate(
    model: &dyn ImageClassifier,
    set: &Dataset,
    norm: &Normalize,
    groups: &[Group],
    batch_size: usize,
    dev: &Device,
) -> anyhow::Result<Evaluation> {
    evaluate_with(set, norm, groups, batch_size, &mut |x, shape| {
        let x = Tensor::from_vec(x, shape, dev)?;
        Ok(model.forward(&x, false)?.argmax(D::Minus1)?.to_vec1()?)
    })
}

/// Predicted classes of images `[N, C, H, W]` given with (N, C, H, W).
pub(crate) type Predictor<'a> =
    dyn FnMut(Vec<f32>, (usize, usize, usize, usize)) -> anyhow::Result<Vec<u32>> + 'a;

/// [`evaluate`] with any predictor: `predict(images [N, C, H, W], (N, C, H, W))` returns the
/// predicted classes.
pub(crate) fn evaluate_with(
    set: &Dataset,
    norm: &Normalize,
    groups: &[Group],
    batch_size: usize,
    predict: &mut Predictor,
) -> anyhow::Result<Evaluation> {
    let c = set.classes();
    let (ch, h, w) = set.geometry();
    let mut confusion = vec![0u64; c * c];
    let all: Vec<usize> = (0..set.len()).collect();
    for chunk in all.chunks(batch_size) {
        let (x, y) = set.render_batch(chunk, None, norm, 0, 0, 0)?;
        let pred = predict(x, (chunk.len(), ch, h, w))?;
        confusion_update(&mut confusion, c, &y, &pred, -1)?;
    }
    let mut acc = vec![0.0; c];
    per_class_accuracy(&confusion, c, &mut acc)?;
    let g = group_means(&acc, groups)?;
    Ok(Evaluation {
        top1: overall_accuracy(&confusion, c)?,
        per_class_accuracy: acc,
        head: g.head,
        medium: g.medium,
        tail: g.tail,
        groups: groups
            .iter()
            .map(|g| match g {
                Group::Head => "head",
                Group::Medium => "medium",
                Group::Tail => "tail",
            })
            .map(String::from)
            .collect(),
    })
}

/// Mean loss parts over a logging window.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct LossParts {
    /// Cross-entropy (segmentation: of the decode head).
    pub ce: f64,
    /// Segmentation: the auxiliary head's cross-entropy times its weight (0 without one).
    pub head_aux: f64,
    /// L_aux (unweighted).
    pub aux: f64,
    /// L_p2a (unweighted; 0 on steps where the gate failed).
    pub p2a: f64,
    /// The total loss minimised.
    pub total: f64,
}

impl LossParts {
    fn add(&mut self, o: &LossParts) {
        self.ce += o.ce;
        self.head_aux += o.head_aux;
        self.aux += o.aux;
        self.p2a += o.p2a;
        self.total += o.total;
    }
    fn scaled(&self, k: f64) -> LossParts {
        LossParts {
            ce: self.ce * k,
            head_aux: self.head_aux * k,
            aux: self.aux * k,
            p2a: self.p2a * k,
            total: self.total * k,
        }
    }
}

/// A test-set evaluation of either task.
#[derive(Debug, Clone, Serialize)]
#[serde(untagged)]
pub enum TaskEvaluation {
    /// Classification.
    Classification(Evaluation),
    /// Segmentation.
    Segmentation(crate::seg::SegEvaluation),
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
    pub fn segmentation(&self) -> anyhow::Result<&crate::seg::SegEvaluation> {
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

/// The result of a training run (`report.json`).
#[derive(Debug, Clone, Serialize)]
pub struct RunReport {
    /// `run.name`.
    pub name: String,
    /// Whether SAR was on.
    pub sar: bool,
    /// Final test evaluation.
    #[serde(flatten)]
    pub eval: TaskEvaluation,
    /// Training images (segmentation: labelled pixels) per class.
    pub train_counts: Vec<u64>,
    /// Loss parts averaged over the last epoch.
    pub loss: LossParts,
    /// Step at which SAR's gate first passed.
    pub gate_first_pass: Option<u64>,
    /// Share of steps since then on which it passed.
    pub gate_pass_rate: f64,
    /// Steps skipped for a non-finite loss.
    pub skipped_steps: u64,
    /// Optimiser steps.
    pub steps: u64,
    /// Training wall time in seconds (evaluation excluded, resumed parts included).
    pub wall_seconds: f64,
    /// Parameters and multiply-adds per image of the model, without SAR.
    pub model_cost: sar_models::Cost,
    /// Parameters SAR adds (h_ψ); SAR adds no inference cost.
    pub sar_params: u64,
}

/// Options of [`train`] beyond the config.
#[derive(Debug, Clone, Default)]
pub struct TrainOptions {
    /// A checkpoint file, or a run folder whose newest checkpoint is used.
    pub resume: Option<PathBuf>,
    /// Show a progress bar on stderr (when it is a terminal).
    pub progress: bool,
    /// Print a line per evaluation.
    pub verbose: bool,
    /// Fault injection for tests: the input batches of these steps are set to NaN, so the
    /// non-finite handling runs on its real path.
    pub poison_steps: Vec<u64>,
    /// Fault injection for tests: the cross-entropy of these steps is multiplied by +inf.
    pub poison_loss_steps: Vec<u64>,
}

struct MetricsLog {
    file: std::fs::File,
    path: PathBuf,
}

impl MetricsLog {
    fn open(path: PathBuf) -> anyhow::Result<Self> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .with_context(|| format!("cannot open {}", path.display()))?;
        Ok(MetricsLog { file, path })
    }
    fn write(&mut self, value: serde_json::Value) -> anyhow::Result<()> {
        writeln!(self.file, "{value}")
            .with_context(|| format!("cannot write {}", self.path.display()))
    }
}

/// Everything a model needs, built from a config.
pub struct Setup {
    /// Device.
    pub device: Device,
    /// All variables (model and SAR head).
    pub varmap: VarMap,
    /// The network.
    pub model: Box<dyn ImageClassifier>,
    /// The SAR head, if SAR is on.
    pub head: Option<SarHead>,
}

/// Builds model and head for `classes` classes of `channels`-channel images.
pub fn build(cfg: &TrainConfig, channels: usize, classes: usize) -> anyhow::Result<Setup> {
    let device = device(cfg.run.device)?;
    let varmap = VarMap::new();
    let spec = ModelSpec {
        arch: cfg
            .model
            .arch
            .context("model.arch is required for a classification run")?,
        stem: cfg.model.stem,
        in_channels: channels,
        classes,
        seed: cfg.run.seed,
    };
    let model = sar_models::build(&spec, &varmap, &device, DType::F32)?;
    let head = if cfg.sar.enabled {
        let backend = CandleBackend::new(device.clone(), DType::F32)?;
        let head = SarHeadConfig::new(cfg.sar.params(), classes, model.feature_dim())
            .kind(EmbeddingKind::Classification)
            .anchor_kind(cfg.sar.anchors)
            .seed(cfg.run.seed);
        Some(SarHead::new(&varmap, backend, &head)?)
    } else {
        None
    };
    Ok(Setup {
        device,
        varmap,
        model,
        head,
    })
}

/// Sets every variable of `varmap` from `tensors` (all must be there, shapes equal).
pub fn restore_vars(
    varmap: &VarMap,
    tensors: &std::collections::HashMap<String, Tensor>,
) -> anyhow::Result<()> {
    let data = varmap.data().lock().expect("varmap lock");
    for (name, var) in data.iter() {
        let t = tensors
            .get(name)
            .with_context(|| format!("the checkpoint lacks {name} (another model?)"))?;
        ensure!(
            t.dims() == var.dims(),
            "checkpoint tensor {name} has shape {:?}, the model needs {:?} (another model?)",
            t.dims(),
            var.dims()
        );
        var.set(&t.to_device(var.device())?.to_dtype(var.dtype())?)?;
    }
    Ok(())
}

fn schedule(cfg: &TrainConfig, steps_per_epoch: usize) -> Schedule {
    let o = &cfg.optim;
    match o.schedule {
        ScheduleKind::Constant => Schedule::Constant,
        ScheduleKind::Cosine => Schedule::Cosine,
        ScheduleKind::Step => Schedule::Step {
            milestones: o.milestones.iter().map(|e| e * steps_per_epoch).collect(),
            gamma: o.gamma,
        },
        ScheduleKind::Poly => Schedule::Poly {
            power: o.power,
            min_lr: o.min_lr,
        },
    }
}

/// Deep copies of the state a forward pass changes: BatchNorm running statistics and the SAR
/// buffers.
struct Snapshot {
    running: Vec<(String, Tensor)>,
    sar: Vec<(String, Tensor)>,
}

fn snapshot_state(varmap: &VarMap, head: Option<&SarHead>) -> anyhow::Result<Snapshot> {
    let running = varmap
        .data()
        .lock()
        .expect("varmap lock")
        .iter()
        .filter(|(n, _)| sar_models::params::is_running_stat(n))
        .map(|(n, v)| Ok((n.clone(), v.as_tensor().copy()?)))
        .collect::<candle_core::Result<_>>()?;
    let sar = match head {
        Some(h) => h
            .buffers()?
            .into_iter()
            .map(|(n, t)| Ok((n, t.copy()?)))
            .collect::<candle_core::Result<_>>()?,
        None => Vec::new(),
    };
    Ok(Snapshot { running, sar })
}

fn restore_state(
    varmap: &VarMap,
    head: Option<&mut SarHead>,
    snap: &Snapshot,
) -> anyhow::Result<()> {
    let data = varmap.data().lock().expect("varmap lock");
    for (n, t) in &snap.running {
        data[n].set(t)?;
    }
    if let Some(h) = head {
        h.load_buffers(&|name| {
            snap.sar
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, t)| t.clone())
        })?;
    }
    Ok(())
}

fn finite_check(step: u64, parts: &[(&str, f64)]) -> Option<String> {
    parts
        .iter()
        .find(|(_, v)| !v.is_finite())
        .map(|(name, v)| format!("step {step}: loss part {name} is {v}"))
}

/// What one training step produced.
pub(crate) enum StepOutcome {
    /// A non-finite input or loss part, in words.
    Fault(String),
    /// The loss to minimise and its parts.
    Loss {
        loss: Tensor,
        parts: LossParts,
        gate: bool,
        valid: usize,
        images: usize,
    },
}

/// Where a training step is in the run.
pub(crate) struct StepCtx<'a> {
    /// Training samples of the batch.
    pub idx: &'a [usize],
    /// Epoch (pass over the data).
    pub epoch: u64,
    /// Batch within the epoch.
    pub batch: usize,
    /// Position of the batch's first sample within the epoch.
    pub position: u64,
    /// Optimiser step.
    pub step: u64,
    /// Fault injection: NaN input.
    pub poison_input: bool,
    /// Fault injection: infinite task loss.
    pub poison_loss: bool,
}

/// The task-specific half of the trainer (classification or segmentation); the loop,
/// optimiser, schedule, checkpoints, logging and reports are shared.
pub(crate) trait Task {
    /// All variables (model and SAR head).
    fn varmap(&self) -> &VarMap;
    /// Device.
    fn device(&self) -> &Device;
    /// The SAR head.
    fn head(&self) -> Option<&SarHead>;
    /// The SAR head, mutably.
    fn head_mut(&mut self) -> Option<&mut SarHead>;
    /// Training samples.
    fn train_len(&self) -> usize;
    /// Training images (classification) or pixels (segmentation) per class.
    fn train_counts(&self) -> &[u64];
    /// Forward pass and loss of one batch (BatchNorm statistics and SAR's EMA update here).
    fn step(&mut self, ctx: &StepCtx) -> anyhow::Result<StepOutcome>;
    /// Test-set evaluation.
    fn evaluate(&self) -> anyhow::Result<TaskEvaluation>;
    /// Parameters and multiply-adds of inference on one training-size input.
    fn cost(&self) -> sar_models::Cost;
    /// PNG plots beyond the loss curves.
    fn write_plots(&self, cfg: &TrainConfig, report: &RunReport) -> anyhow::Result<()>;
}

/// Classification: images → pooled features → linear classifier.
pub(crate) struct ClsTask {
    pub(crate) cfg: TrainConfig,
    pub(crate) setup: Setup,
    pub(crate) data: Datasets,
    pub(crate) norm: Normalize,
    pub(crate) groups: Vec<Group>,
    pub(crate) counts: Vec<u64>,
    augment: Augment,
}

/// One rendered classification batch.
pub(crate) struct ClsBatch {
    /// Images `[N, C, H, W]`, normalised (and mixed, with MixUp).
    pub x: Vec<f32>,
    /// Labels (MixUp: of the first side).
    pub labels: Vec<i64>,
    /// MixUp: λ and the labels of the second side.
    pub mix: Option<(f64, Vec<i64>)>,
    /// (N, C, H, W).
    pub shape: (usize, usize, usize, usize),
}

impl ClsTask {
    /// Renders the batch of `ctx` (augmentation, MixUp, fault injection); `Err(message)` when
    /// the input is not finite.
    pub(crate) fn batch(&self, ctx: &StepCtx) -> anyhow::Result<Result<ClsBatch, String>> {
        let cfg = &self.cfg;
        let (c, h, w) = self.data.train.geometry();
        let n = ctx.idx.len();
        let (mut x, y) = self.data.train.render_batch(
            ctx.idx,
            Some(self.augment),
            &self.norm,
            cfg.run.seed,
            ctx.epoch,
            ctx.position,
        )?;
        let labels: Vec<i64> = y.iter().map(|&v| v as i64).collect();
        let mix = if cfg.data.mixup_alpha > 0.0 {
            let (lam, perm) = augment::mixup(
                &mut x,
                c * h * w,
                cfg.data.mixup_alpha,
                cfg.run.seed,
                ctx.epoch,
                ctx.batch as u64,
            );
            Some((lam, perm.iter().map(|&p| labels[p]).collect()))
        } else {
            None
        };
        if ctx.poison_input {
            x.iter_mut().for_each(|v| *v = f32::NAN);
        }
        if let Some(i) = x.iter().position(|v| !v.is_finite()) {
            return Ok(Err(format!(
                "step {}: the input batch holds {} (image {} of the batch)",
                ctx.step,
                x[i],
                i / (c * h * w)
            )));
        }
        Ok(Ok(ClsBatch {
            x,
            labels,
            mix,
            shape: (n, c, h, w),
        }))
    }

    pub(crate) fn new(cfg: &TrainConfig) -> anyhow::Result<Self> {
        let data = load_data(cfg)?;
        ensure!(
            data.train.classes() == data.test.classes()
                && data.train.geometry() == data.test.geometry(),
            "training and test sets differ in classes or image size"
        );
        sar_data::dataset::check_labels(&data.train)?;
        sar_data::dataset::check_labels(&data.test)?;
        let setup = build(cfg, data.train.geometry().0, data.train.classes())?;
        let norm = data.train.normalize();
        let counts = data.train.class_counts();
        let groups = class_groups(cfg, &counts)?;
        let augment = match cfg.data.augment {
            AugmentKind::None => Augment::None,
            AugmentKind::CropFlip => Augment::CropFlip {
                pad: cfg.data.pad,
                flip: cfg.data.flip,
            },
        };
        Ok(ClsTask {
            cfg: cfg.clone(),
            setup,
            data,
            norm,
            groups,
            counts,
            augment,
        })
    }
}

impl Task for ClsTask {
    fn varmap(&self) -> &VarMap {
        &self.setup.varmap
    }
    fn device(&self) -> &Device {
        &self.setup.device
    }
    fn head(&self) -> Option<&SarHead> {
        self.setup.head.as_ref()
    }
    fn head_mut(&mut self) -> Option<&mut SarHead> {
        self.setup.head.as_mut()
    }
    fn train_len(&self) -> usize {
        self.data.train.len()
    }
    fn train_counts(&self) -> &[u64] {
        &self.counts
    }

    fn step(&mut self, ctx: &StepCtx) -> anyhow::Result<StepOutcome> {
        let ClsBatch {
            x,
            labels,
            mix,
            shape: (n, c, h, w),
        } = match self.batch(ctx)? {
            Ok(b) => b,
            Err(msg) => return Ok(StepOutcome::Fault(msg)),
        };
        let step = ctx.step;
        let dev = self.setup.device.clone();
        let model = &self.setup.model;
        let x = Tensor::from_vec(x, (n, c, h, w), &dev)?;
        let y_t = Tensor::from_vec(labels.clone(), n, &dev)?;
        let feats = model.features(&x, true)?;
        let logits = model.classify(&feats)?;
        let ce = match &mix {
            None => candle_nn::loss::cross_entropy(&logits, &y_t)?,
            Some((lam, lb)) => {
                let yb = Tensor::from_vec(lb.clone(), n, &dev)?;
                ((candle_nn::loss::cross_entropy(&logits, &y_t)? * *lam)?
                    + (candle_nn::loss::cross_entropy(&logits, &yb)? * (1.0 - lam))?)?
            }
        };
        let ce = if ctx.poison_loss {
            (ce * f64::INFINITY)?
        } else {
            ce
        };
        let ce_value = ce.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        let mut loss = ce;
        let (mut aux, mut p2a, mut gate, mut valid) = (0.0, 0.0, false, 0);
        if let Some(hd) = self.setup.head.as_mut() {
            let classify = |e: &Tensor| model.classify(e);
            let s = match &mix {
                Some((lam, lb)) => hd.step_mixup(&classify, &feats, &labels, lb, *lam)?,
                None => hd.step(&classify, &feats, &y_t)?,
            };
            (aux, p2a, gate, valid) = (s.loss_aux, s.loss_p2a, s.gate_passed, s.valid);
            loss = (loss + s.loss)?;
        }
        finish_step(step, loss, ce_value, 0.0, aux, p2a, gate, valid, n)
    }

    fn evaluate(&self) -> anyhow::Result<TaskEvaluation> {
        Ok(TaskEvaluation::Classification(evaluate(
            self.setup.model.as_ref(),
            &self.data.test,
            &self.norm,
            &self.groups,
            self.cfg.eval.batch_size,
            &self.setup.device,
        )?))
    }

    fn cost(&self) -> sar_models::Cost {
        let (_, h, w) = self.data.train.geometry();
        self.setup.model.cost(h, w)
    }

    fn write_plots(&self, cfg: &TrainConfig, report: &RunReport) -> anyhow::Result<()> {
        let anchors = match self.head() {
            Some(h) if h.fully_initialized() => Some(
                h.semantic_anchors()
                    .to_dtype(DType::F32)?
                    .flatten_all()?
                    .to_vec1::<f32>()?,
            ),
            _ => None,
        };
        write_plots(
            cfg,
            report,
            self.setup.model.as_ref(),
            &self.data.test,
            &self.norm,
            &self.setup.device,
            anchors.as_deref(),
        )
    }
}

/// Checks the loss parts for NaN/inf and packs the outcome. `head_aux` is the auxiliary
/// segmentation head's (weighted) cross-entropy, part of `loss`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn finish_step(
    step: u64,
    loss: Tensor,
    ce: f64,
    head_aux: f64,
    aux: f64,
    p2a: f64,
    gate: bool,
    valid: usize,
    images: usize,
) -> anyhow::Result<StepOutcome> {
    let total = loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
    Ok(match loss_parts(step, ce, head_aux, aux, p2a, total) {
        Err(msg) => StepOutcome::Fault(msg),
        Ok(parts) => StepOutcome::Loss {
            loss,
            parts,
            gate,
            valid,
            images,
        },
    })
}

/// The loss parts, or a message naming the first that is NaN or infinite.
pub(crate) fn loss_parts(
    step: u64,
    ce: f64,
    head_aux: f64,
    aux: f64,
    p2a: f64,
    total: f64,
) -> Result<LossParts, String> {
    if let Some(msg) = finite_check(
        step,
        &[
            ("cross-entropy", ce),
            ("auxiliary-head cross-entropy", head_aux),
            ("L_aux", aux),
            ("L_p2a", p2a),
            ("total", total),
        ],
    ) {
        return Err(msg);
    }
    Ok(LossParts {
        ce,
        head_aux,
        aux,
        p2a,
        total,
    })
}

/// What a successful forward pass reports to the loop (the loss itself stays with the trainee
/// until [`Trainee::update`]).
pub(crate) struct StepReport {
    pub parts: LossParts,
    pub gate: bool,
    pub valid: usize,
    pub images: usize,
}

/// The loop's view of a model in training, whatever tensor library runs it: forward and loss,
/// the update, the state a checkpoint holds (as candle CPU tensors under the shared names), and
/// evaluation. candle runs every [`Task`] ([`CandleTrainee`]); dfdx runs classification
/// ([`crate::dfdx_task::DfdxTrainee`]).
pub(crate) trait Trainee {
    /// Training samples.
    fn train_len(&self) -> usize;
    /// Training images (classification) or pixels (segmentation) per class.
    fn train_counts(&self) -> &[u64];
    /// Forward pass and loss of one batch; `Err(message)` for a non-finite input or loss part.
    fn forward(&mut self, ctx: &StepCtx) -> anyhow::Result<Result<StepReport, String>>;
    /// Backward of the last forward's loss and one SGD step at rate `lr`.
    fn update(&mut self, lr: f64) -> anyhow::Result<()>;
    /// Deep copies of the state a forward pass changes (BatchNorm running statistics, SAR
    /// buffers), to undo a skipped step.
    fn snapshot(&self) -> anyhow::Result<Vec<(String, Tensor)>>;
    /// Puts a [`Trainee::snapshot`] back.
    fn restore(&mut self, snap: &[(String, Tensor)]) -> anyhow::Result<()>;
    /// Every variable, `optim.momentum.*` buffer and SAR buffer, by name.
    fn state_tensors(&self) -> anyhow::Result<Vec<(String, Tensor)>>;
    /// Restores [`Trainee::state_tensors`] from a checkpoint (every variable required).
    fn load_state(&mut self, tensors: &HashMap<String, Tensor>) -> anyhow::Result<()>;
    /// Loads pretrained weights as `model.pretrained` says; returns the number loaded and the
    /// names kept from the initialisation.
    fn load_pretrained(
        &mut self,
        cfg: &TrainConfig,
        path: &Path,
    ) -> anyhow::Result<(usize, Vec<String>)>;
    /// Parameters SAR adds.
    fn sar_params(&self) -> u64;
    /// Test-set evaluation.
    fn evaluate(&self) -> anyhow::Result<TaskEvaluation>;
    /// Parameters and multiply-adds of inference on one training-size input.
    fn cost(&self) -> sar_models::Cost;
    /// PNG plots beyond the loss curves.
    fn write_plots(&self, cfg: &TrainConfig, report: &RunReport) -> anyhow::Result<()>;
}

/// A candle [`Task`] with its optimiser and the pending loss.
pub(crate) struct CandleTrainee {
    task: Box<dyn Task>,
    opt: Sgd,
    pending: Option<Tensor>,
}

impl CandleTrainee {
    pub(crate) fn new(cfg: &TrainConfig) -> anyhow::Result<Self> {
        let task: Box<dyn Task> = if cfg.data.dataset.is_segmentation() {
            Box::new(crate::seg::SegTask::new(cfg)?)
        } else {
            Box::new(ClsTask::new(cfg)?)
        };
        let mut named: Vec<(String, candle_core::Var)> = task
            .varmap()
            .data()
            .lock()
            .expect("varmap lock")
            .iter()
            .filter(|(n, _)| !sar_models::params::is_running_stat(n))
            .map(|(n, v)| (n.clone(), v.clone()))
            .collect();
        named.sort_by(|a, b| a.0.cmp(&b.0));
        let o = &cfg.optim;
        let opt = Sgd::named(named, o.lr, o.momentum, o.weight_decay, o.nesterov);
        Ok(CandleTrainee {
            task,
            opt,
            pending: None,
        })
    }
}

impl Trainee for CandleTrainee {
    fn train_len(&self) -> usize {
        self.task.train_len()
    }
    fn train_counts(&self) -> &[u64] {
        self.task.train_counts()
    }
    fn forward(&mut self, ctx: &StepCtx) -> anyhow::Result<Result<StepReport, String>> {
        self.pending = None;
        Ok(match self.task.step(ctx)? {
            StepOutcome::Fault(msg) => Err(msg),
            StepOutcome::Loss {
                loss,
                parts,
                gate,
                valid,
                images,
            } => {
                self.pending = Some(loss);
                Ok(StepReport {
                    parts,
                    gate,
                    valid,
                    images,
                })
            }
        })
    }
    fn update(&mut self, lr: f64) -> anyhow::Result<()> {
        let loss = self
            .pending
            .take()
            .context("update without a forward pass")?;
        let grads = loss.backward()?;
        self.opt.lr = lr;
        self.opt.step(&grads)?;
        Ok(())
    }
    fn snapshot(&self) -> anyhow::Result<Vec<(String, Tensor)>> {
        let s = snapshot_state(self.task.varmap(), self.task.head())?;
        Ok(s.running.into_iter().chain(s.sar).collect())
    }
    fn restore(&mut self, snap: &[(String, Tensor)]) -> anyhow::Result<()> {
        let varmap = self.task.varmap().clone();
        let (running, sar): (Vec<_>, Vec<_>) = snap
            .iter()
            .cloned()
            .partition(|(n, _)| sar_models::params::is_running_stat(n));
        restore_state(&varmap, self.task.head_mut(), &Snapshot { running, sar })
    }
    fn state_tensors(&self) -> anyhow::Result<Vec<(String, Tensor)>> {
        let mut tensors: Vec<(String, Tensor)> = self
            .task
            .varmap()
            .data()
            .lock()
            .expect("varmap lock")
            .iter()
            .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
            .collect();
        for (n, t) in self.opt.momentum_state() {
            tensors.push((format!("optim.momentum.{n}"), t));
        }
        if let Some(h) = self.task.head() {
            tensors.extend(h.buffers()?);
        }
        Ok(tensors)
    }
    fn load_state(&mut self, tensors: &HashMap<String, Tensor>) -> anyhow::Result<()> {
        let dev = self.task.device().clone();
        restore_vars(self.task.varmap(), tensors)?;
        let mut momentum = Vec::new();
        for (name, t) in tensors {
            if let Some(v) = name.strip_prefix("optim.momentum.") {
                momentum.push((v.to_string(), t.to_device(&dev)?));
            }
        }
        self.opt.load_momentum_state(momentum)?;
        if let Some(h) = self.task.head_mut() {
            h.load_buffers(&|n| tensors.get(n).and_then(|t| t.to_device(&dev).ok()))?;
        }
        Ok(())
    }
    fn load_pretrained(
        &mut self,
        cfg: &TrainConfig,
        p: &Path,
    ) -> anyhow::Result<(usize, Vec<String>)> {
        use sar_models::pretrained::{load_backbone, load_pretrained, tensor_names};
        let varmap = self.task.varmap();
        let r = if !cfg.data.dataset.is_segmentation() {
            load_pretrained(varmap, p, &["fc."])?
        } else if tensor_names(p)?.iter().any(|n| n.starts_with("backbone.")) {
            // A whole segmentation checkpoint: everything but the classifiers (the class
            // count may differ).
            load_pretrained(
                varmap,
                p,
                &["decode_head.conv_seg.", "auxiliary_head.conv_seg."],
            )?
        } else {
            load_backbone(varmap, p)?
        };
        Ok((r.loaded.len(), r.kept))
    }
    fn sar_params(&self) -> u64 {
        self.task
            .varmap()
            .data()
            .lock()
            .expect("varmap lock")
            .iter()
            .filter(|(n, _)| n.starts_with("sar.") && !sar_models::params::is_running_stat(n))
            .map(|(_, v)| v.elem_count() as u64)
            .sum()
    }
    fn evaluate(&self) -> anyhow::Result<TaskEvaluation> {
        self.task.evaluate()
    }
    fn cost(&self) -> sar_models::Cost {
        self.task.cost()
    }
    fn write_plots(&self, cfg: &TrainConfig, report: &RunReport) -> anyhow::Result<()> {
        self.task.write_plots(cfg, report)
    }
}

/// The trainee for `cfg.run.backend`.
pub(crate) fn trainee(cfg: &TrainConfig) -> anyhow::Result<Box<dyn Trainee>> {
    Ok(match cfg.run.backend {
        BackendKind::Candle => Box::new(CandleTrainee::new(cfg)?),
        BackendKind::Dfdx => crate::dfdx_task::trainee(cfg)?,
    })
}

/// Trains as `cfg` says; see the module docs. Returns the final report (also written to
/// `run.output/report.json`).
pub fn train(cfg: &TrainConfig, opts: &TrainOptions) -> anyhow::Result<RunReport> {
    let out = &cfg.run.output;
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let ckpt_dir = out.join("checkpoints");
    std::fs::create_dir_all(&ckpt_dir)
        .with_context(|| format!("cannot create {}", ckpt_dir.display()))?;
    let stale = checkpoint::remove_stale_temporaries(&ckpt_dir)?;
    let mut task = trainee(cfg)?;
    let train_counts = task.train_counts().to_vec();

    let batch = cfg.train.batch_size;
    let train_len = task.train_len();
    let steps_per_epoch = train_len.div_ceil(batch);
    let (total_steps, epochs) = match cfg.train.iters {
        Some(i) => (i as u64, i.div_ceil(steps_per_epoch)),
        None => (
            (cfg.train.epochs * steps_per_epoch) as u64,
            cfg.train.epochs,
        ),
    };
    let last_step = cfg
        .train
        .max_steps
        .map_or(total_steps, |m| (m as u64).min(total_steps));
    let warmup = cfg.optim.warmup_epochs * steps_per_epoch;
    let sched = schedule(cfg, steps_per_epoch);

    let mut state = CheckpointState {
        format: checkpoint::FORMAT.into(),
        step: 0,
        epoch: 0,
        batch_in_epoch: 0,
        config: cfg.clone(),
        gate_first_pass: None,
        gate_passes: 0,
        skipped_steps: 0,
        elapsed_seconds: 0.0,
    };
    let mut log = MetricsLog::open(out.join("metrics.jsonl"))?;
    if let Some(r) = &opts.resume {
        let path = if r.is_dir() {
            let dir = if r.join("checkpoints").is_dir() {
                r.join("checkpoints")
            } else {
                r.clone()
            };
            checkpoint::latest(&dir)?
                .with_context(|| format!("no checkpoint in {}", dir.display()))?
        } else {
            r.clone()
        };
        let ck = checkpoint::load(&path)?;
        let old = &ck.state.config;
        for (what, same) in [
            ("[model]", old.model == cfg.model),
            ("[data]", old.data == cfg.data),
            ("sar.enabled", old.sar.enabled == cfg.sar.enabled),
            ("run.seed", old.run.seed == cfg.run.seed),
            (
                "train.batch_size",
                old.train.batch_size == cfg.train.batch_size,
            ),
            ("train.iters", old.train.iters == cfg.train.iters),
        ] {
            ensure!(
                same,
                "cannot resume from {}: its {what} differs from this config",
                path.display()
            );
        }
        task.load_state(&ck.tensors)
            .with_context(|| format!("cannot resume from {}", path.display()))?;
        state = CheckpointState {
            config: cfg.clone(),
            ..ck.state
        };
        log.write(serde_json::json!({"kind": "resume", "step": state.step, "from": path.display().to_string(), "stale_temporaries_removed": stale}))?;
    } else {
        crate::tensorio::write_atomic(&out.join("config.toml"), cfg.to_toml().as_bytes())?;
        if let Some(p) = &cfg.model.pretrained {
            let (loaded, kept) = task.load_pretrained(cfg, p)?;
            log.write(serde_json::json!({"kind": "pretrained", "file": p.display().to_string(), "loaded": loaded, "kept": kept}))?;
        }
    }

    let save = |task: &dyn Trainee, state: &CheckpointState| -> anyhow::Result<()> {
        checkpoint::save(
            &checkpoint::path_for(&ckpt_dir, state.step),
            &task.state_tensors()?,
            state,
        )?;
        checkpoint::prune(&ckpt_dir, cfg.train.keep_checkpoints)
    };

    let bar = if opts.progress {
        indicatif::ProgressBar::new(last_step)
    } else {
        indicatif::ProgressBar::hidden()
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{prefix} [{bar:30}] {pos}/{len} steps {per_sec} ETA {eta} {msg}",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    bar.set_prefix(cfg.run.name.clone());
    bar.set_position(state.step);

    let seed = cfg.run.seed;
    let mut lr = cfg.optim.lr;
    let mut window = (LossParts::default(), 0usize, 0usize, 0usize); // sums, steps, gate passes, valid
    let mut epoch_loss = (LossParts::default(), 0usize);
    let mut last_epoch_loss = LossParts::default();
    let mut consecutive_skips = 0;
    let mut t0 = Instant::now();
    let mut window_start = Instant::now();
    let mut window_images = 0usize;
    let mut epoch = state.epoch as usize;
    let evaluate_and_log =
        |task: &dyn Trainee, log: &mut MetricsLog, step: u64, epoch: usize, last: bool| {
            let e = task.evaluate()?;
            let mut v = serde_json::to_value(&e)?;
            v["kind"] = "eval".into();
            v["step"] = step.into();
            v["epoch"] = epoch.into();
            v["final"] = last.into();
            log.write(v)?;
            anyhow::Ok(e)
        };
    'epochs: while epoch < epochs {
        let order = augment::epoch_order(train_len, seed, epoch as u64);
        let first_batch = if epoch as u64 == state.epoch {
            state.batch_in_epoch as usize
        } else {
            0
        };
        for b in first_batch..steps_per_epoch {
            if state.step >= last_step {
                break 'epochs;
            }
            let idx = &order[b * batch..((b + 1) * batch).min(order.len())];
            let step = state.step;
            // Forward passes update BatchNorm running statistics and the SAR EMA: a skipped
            // step must not leave NaN there, so keep a deep copy when skipping is allowed.
            let snapshot = match cfg.train.on_nonfinite {
                NonFinitePolicy::Skip => Some(task.snapshot()?),
                NonFinitePolicy::Stop => None,
            };
            let outcome = task.forward(&StepCtx {
                idx,
                epoch: epoch as u64,
                batch: b,
                position: (b * batch) as u64,
                step,
                poison_input: opts.poison_steps.contains(&step),
                poison_loss: opts.poison_loss_steps.contains(&step),
            })?;
            if let Err(msg) = &outcome {
                match cfg.train.on_nonfinite {
                    NonFinitePolicy::Stop => {
                        log.write(
                            serde_json::json!({"kind": "nonfinite", "step": step, "message": msg}),
                        )?;
                        bar.abandon();
                        bail!(
                            "{msg}; training stopped (the last checkpoint in {} is intact)",
                            ckpt_dir.display()
                        );
                    }
                    NonFinitePolicy::Skip => {
                        consecutive_skips += 1;
                        state.skipped_steps += 1;
                        log.write(
                            serde_json::json!({"kind": "skip", "step": step, "message": msg}),
                        )?;
                        ensure!(
                            consecutive_skips <= 10,
                            "{msg}; 10 consecutive steps were skipped, stopping"
                        );
                        if let Some(snap) = &snapshot {
                            task.restore(snap)?;
                        }
                    }
                }
            }
            // A skipped batch is consumed without an update; the step counter still moves on,
            // so the run stays a function of its config.
            state.step += 1;
            state.batch_in_epoch = b as u64 + 1;
            bar.inc(1);
            if let Ok(StepReport {
                parts,
                gate,
                valid,
                images,
            }) = outcome
            {
                consecutive_skips = 0;
                lr = learning_rate(
                    &sched,
                    cfg.optim.lr,
                    step as usize,
                    total_steps as usize,
                    warmup,
                );
                task.update(lr)?;
                if gate {
                    state.gate_first_pass.get_or_insert(step);
                    state.gate_passes += 1;
                }
                for acc in [&mut window.0, &mut epoch_loss.0] {
                    acc.add(&parts);
                }
                epoch_loss.1 += 1;
                window.1 += 1;
                window.2 += gate as usize;
                window.3 += valid;
                window_images += images;
            }
            if cfg.train.log_every > 0 && state.step.is_multiple_of(cfg.train.log_every as u64) {
                let k = window.1.max(1) as f64;
                let secs = window_start.elapsed().as_secs_f64();
                let m = window.0.scaled(1.0 / k);
                log.write(serde_json::json!({
                    "kind": "train", "step": state.step, "epoch": epoch, "lr": lr,
                    "loss": m.total, "ce": m.ce, "head_aux": m.head_aux, "aux": m.aux,
                    "p2a": m.p2a, "gate_pass_rate": window.2 as f64 / k,
                    "p2a_rows_per_step": window.3 as f64 / k,
                    "images_per_s": window_images as f64 / secs.max(1e-9),
                }))?;
                bar.set_message(format!("loss {:.4}", m.total));
                window = (LossParts::default(), 0, 0, 0);
                window_images = 0;
                window_start = Instant::now();
            }
            let end_of_epoch = b + 1 == steps_per_epoch;
            if end_of_epoch {
                state.epoch = epoch as u64 + 1;
                state.batch_in_epoch = 0;
            }
            let periodic = cfg.train.checkpoint_every_steps > 0
                && state
                    .step
                    .is_multiple_of(cfg.train.checkpoint_every_steps as u64);
            if periodic || end_of_epoch || state.step == last_step {
                state.elapsed_seconds += t0.elapsed().as_secs_f64();
                t0 = Instant::now();
                save(task.as_ref(), &state)?;
            }
            if cfg.train.eval_every_steps > 0
                && state.step.is_multiple_of(cfg.train.eval_every_steps as u64)
                && state.step < last_step
            {
                let e = evaluate_and_log(task.as_ref(), &mut log, state.step, epoch, false)?;
                if opts.verbose {
                    bar.println(format!("step {}: {}", state.step, e.summary()));
                }
                t0 = Instant::now();
            }
        }
        last_epoch_loss = epoch_loss.0.scaled(1.0 / epoch_loss.1.max(1) as f64);
        epoch_loss = (LossParts::default(), 0);
        epoch += 1;
        if cfg.train.iters.is_none()
            && cfg.train.eval_every > 0
            && epoch.is_multiple_of(cfg.train.eval_every)
            && epoch < epochs
        {
            let e = evaluate_and_log(task.as_ref(), &mut log, state.step, epoch, false)?;
            if opts.verbose {
                bar.println(format!("epoch {epoch}: {}", e.summary()));
            }
        }
        t0 = Instant::now();
    }
    bar.finish_and_clear();
    let eval = evaluate_and_log(task.as_ref(), &mut log, state.step, epoch, true)?;
    let after_first = state.gate_first_pass.map_or(0, |f| state.step - f);
    let sar_params = task.sar_params();
    let report = RunReport {
        name: cfg.run.name.clone(),
        sar: cfg.sar.enabled,
        eval,
        train_counts,
        loss: last_epoch_loss,
        gate_first_pass: state.gate_first_pass,
        gate_pass_rate: if after_first == 0 {
            0.0
        } else {
            state.gate_passes as f64 / after_first as f64
        },
        skipped_steps: state.skipped_steps,
        steps: state.step,
        wall_seconds: state.elapsed_seconds,
        model_cost: task.cost(),
        sar_params,
    };
    crate::tensorio::write_atomic(
        &out.join("report.json"),
        serde_json::to_string_pretty(&report)?.as_bytes(),
    )?;
    if cfg.train.plots {
        crate::plots::curves(
            &out.join("loss.png"),
            &format!("{}: training loss", cfg.run.name),
            "step",
            "loss",
            &loss_series(&out.join("metrics.jsonl"))?,
        )?;
        task.write_plots(cfg, &report)?;
    }
    Ok(report)
}

/// Features `[n, D]` (eval mode) of the first `limit` images of `set`, with their labels.
pub fn features_of(
    model: &dyn ImageClassifier,
    set: &Dataset,
    norm: &Normalize,
    dev: &Device,
    limit: usize,
) -> anyhow::Result<(Vec<f32>, Vec<u32>)> {
    let idx: Vec<usize> = (0..set.len().min(limit)).collect();
    let (c, h, w) = set.geometry();
    let (mut f, mut y) = (Vec::new(), Vec::new());
    for chunk in idx.chunks(256) {
        let (x, labels) = set.render_batch(chunk, None, norm, 0, 0, 0)?;
        let x = Tensor::from_vec(x, (chunk.len(), c, h, w), dev)?;
        f.extend(model.features(&x, false)?.flatten_all()?.to_vec1::<f32>()?);
        y.extend(labels);
    }
    Ok((f, y))
}

/// The training and evaluation loss parts over steps, from a metrics log.
pub fn loss_series(log: &Path) -> anyhow::Result<crate::plots::Series> {
    let text =
        std::fs::read_to_string(log).with_context(|| format!("cannot read {}", log.display()))?;
    let keys = ["loss", "ce", "head_aux", "aux", "p2a"];
    let mut series: Vec<(String, Vec<(f64, f64)>)> =
        keys.iter().map(|k| (k.to_string(), Vec::new())).collect();
    for line in text.lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if v["kind"] != "train" {
            continue;
        }
        let step = v["step"].as_f64().unwrap_or(0.0);
        for (k, s) in keys.iter().zip(series.iter_mut()) {
            if let Some(y) = v[*k].as_f64() {
                s.1.push((step, y));
            }
        }
    }
    series.retain(|s| s.1.iter().any(|p| p.1 != 0.0));
    Ok(series)
}

pub(crate) fn write_plots(
    cfg: &TrainConfig,
    report: &RunReport,
    model: &dyn ImageClassifier,
    test: &Dataset,
    norm: &Normalize,
    dev: &Device,
    anchors: Option<&[f32]>,
) -> anyhow::Result<()> {
    let out = &cfg.run.output;
    let name = &cfg.run.name;
    let labels = crate::plots::class_labels(&report.train_counts);
    crate::plots::grouped_bars(
        &out.join("per_class.png"),
        &format!("{name}: test accuracy per class"),
        "accuracy %",
        &labels,
        &[(
            if report.sar { "SAR" } else { "baseline" }.to_string(),
            report
                .eval
                .classification()?
                .per_class_accuracy
                .iter()
                .map(|a| 100.0 * a)
                .collect(),
        )],
    )?;
    let (f, y) = features_of(model, test, norm, dev, 2000)?;
    crate::plots::feature_projection(
        &out.join("features.png"),
        &format!(
            "{name}: test features{} (PCA)",
            if anchors.is_some() {
                " and semantic anchors"
            } else {
                ""
            }
        ),
        &f,
        &y,
        model.feature_dim(),
        anchors,
    )
}

/// `sar eval`: the checkpoint's model on its config's test set, on the backend that trained
/// it or on `backend` (checkpoints name their tensors the same way on every backend).
pub fn eval_checkpoint(
    path: &Path,
    backend: Option<BackendKind>,
) -> anyhow::Result<(TrainConfig, TaskEvaluation)> {
    let ck = checkpoint::load(path)?;
    let mut cfg = ck.state.config.clone();
    if let Some(b) = backend {
        cfg.run.backend = b;
        cfg.validate()?;
    }
    let mut task = trainee(&cfg)?;
    task.load_state(&ck.tensors)
        .with_context(|| format!("checkpoint {}", path.display()))?;
    let e = task.evaluate()?;
    Ok((cfg, e))
}
