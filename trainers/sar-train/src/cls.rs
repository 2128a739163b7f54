//! Classification: the task behind `sar train` with a classification data set, on candle.
//!
//! One step: render the batch (parallel crop/flip, optional MixUp) → features F = f(x) `[B, D]`
//! (BatchNorm in training mode) → logits g(F) → cross-entropy (MixUp: λ·CE(y_a) +
//! (1−λ)·CE(y_b)) → with SAR, [`SarHead::step`] (or `step_mixup`) adds λ1·L_aux + λ2·L_p2a,
//! the head classifying its embedded anchors with the same `g` → every loss part checked for
//! NaN/inf → (in the loop, [`crate::run`]) backward → SGD with the scheduled rate.
//!
//! Evaluation: top-1, per-class and head/medium/tail accuracy on the balanced test set
//! ([`crate::evaluation`]). The data sets, batch rendering and evaluation here are shared with
//! the dfdx trainee (`crate::trainees::dfdx`).

use crate::config::{AugmentKind, DatasetKind, StageKind, TrainConfig};
use crate::evaluation::{class_groups, Evaluation, TaskEvaluation};
use crate::run::{RunReport, StepCtx};
use crate::trainees::candle::{device, finish_single_loss, finish_step, StepOutcome, Task};
use anyhow::{bail, ensure, Context};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use sar_candle::{CandleBackend, EmbeddingKind, SarHead, SarHeadConfig};
use sar_data::augment::{self, Augment, Normalize};
use sar_data::dataset::Dataset;
use sar_data::{cifar, cub, digits, idx, split};
use sar_math::metrics::{confusion_update, Group};
use sar_models::{ImageClassifier, ModelSpec};
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
        Ok(model.forward(&x, false)?.flatten_all()?.to_vec1()?)
    })
}

/// Logits `[N, K]` (row-major) of images `[N, C, H, W]` given with (N, C, H, W).
pub(crate) type Predictor<'a> =
    dyn FnMut(Vec<f32>, (usize, usize, usize, usize)) -> anyhow::Result<Vec<f32>> + 'a;

/// [`evaluate`] with any predictor: `predict(images [N, C, H, W], (N, C, H, W))` returns the
/// logits; the prediction is their first maximum, its confidence the softmax probability
/// ([`crate::evaluation::predictions`]).
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
    let mut calibration = vec![Default::default(); crate::evaluation::CALIBRATION_BINS];
    let all: Vec<usize> = (0..set.len()).collect();
    for chunk in all.chunks(batch_size) {
        let (x, y) = set.render_batch(chunk, None, norm, 0, 0, 0)?;
        let logits = predict(x, (chunk.len(), ch, h, w))?;
        ensure!(
            logits.len() == chunk.len() * c,
            "the model gave {} logits for {} images of {c} classes",
            logits.len(),
            chunk.len()
        );
        let (pred, conf) = crate::evaluation::predictions(&logits, c);
        confusion_update(&mut confusion, c, &y, &pred, -1)?;
        let correct: Vec<bool> = pred.iter().zip(&y).map(|(p, t)| p == t).collect();
        crate::evaluation::calibration_add(&mut calibration, &conf, &correct)?;
    }
    crate::evaluation::classification_metrics(&confusion, groups, calibration)
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
    let m = cfg.model.classifier()?;
    let spec = ModelSpec {
        arch: m.arch,
        stem: m.stem,
        in_channels: channels,
        classes,
        seed: cfg.run.seed,
        init: cfg.model.classifier()?.init,
    };
    let model = sar_models::build(&spec, &varmap, &device, DType::F32)?;
    let head = if cfg.sar.enabled {
        let backend = CandleBackend::new(device.clone(), DType::F32)?;
        let head = SarHeadConfig::new(cfg.sar.hyperparameters(), classes, model.feature_dim())
            .kind(EmbeddingKind::Classification)
            .anchor_kind(cfg.sar.anchors)
            .regularizer(cfg.sar.kind)
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

/// Classification: images → pooled features → linear classifier.
pub(crate) struct ClsTask {
    pub(crate) cfg: TrainConfig,
    pub(crate) setup: Setup,
    pub(crate) data: Datasets,
    pub(crate) norm: Normalize,
    pub(crate) groups: Vec<Group>,
    pub(crate) counts: Vec<u64>,
    augment: Augment,
    /// MiSLAS stage 2 (`stage.kind = "mislas"`): ε per class and the LWS scale.
    mislas: Option<Mislas>,
    /// DisAlign (`stage.kind = "disalign"`): the calibration's variables and the class weights.
    disalign: Option<DisAlign>,
    /// Debug: every rendered batch is written here (see `ClsTask::dump_batch`).
    pub(crate) dump: Option<std::path::PathBuf>,
    /// Debug: with `dump`, write the plan of each step instead (see `ClsTask::dump_plan`).
    pub(crate) dump_plan: bool,
}

/// The state of MiSLAS's second stage.
pub(crate) struct Mislas {
    /// ε_c of label-aware smoothing, `[C]` (f32, on the device).
    epsilon: Tensor,
    /// The learnable weight scaling s `[C]` (`stage.lws_scale`), if on.
    lws: Option<Tensor>,
    /// BatchNorm of the frozen extractor in training mode ("shift learning").
    shift_bn: bool,
}

/// A second stage's settings on the host, for a backend that runs the stage itself (dfdx):
/// what [`ClsTask`] and [`crate::seg::SegTask`] computed from the config and the class counts.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum StageTwo {
    /// MiSLAS (classification): ε per class `[C]`, whether `stage.lws_scale` scales the
    /// logits, whether the frozen extractor's BatchNorm normalises by the batch.
    Mislas {
        epsilon: Vec<f32>,
        lws: bool,
        shift_bn: bool,
    },
    /// DisAlign on a classifier: the class weights w `[C]`, BatchNorm shifting.
    DisAlign { weights: Vec<f32>, shift_bn: bool },
    /// DisAlign on a segmenter: the class weights w `[K]`, BatchNorm shifting.
    SegDisAlign { weights: Vec<f32>, shift_bn: bool },
}

/// The name of MiSLAS's learnable weight scaling in the varmap and checkpoints.
pub const LWS_SCALE: &str = "stage.lws_scale";

/// The prefix of DisAlign's variables (`scale`, `bias` `[C]`; `gate.weight` `[D]`,
/// `gate.bias` `[1]`).
pub const DISALIGN: &str = "stage.disalign.";

/// DisAlign's classification calibration on a frozen model ([`sar_math::disalign`]).
pub(crate) struct DisAlign {
    scale: Tensor,
    bias: Tensor,
    gate_weight: Tensor,
    gate_bias: Tensor,
    /// The generalized re-weighting w `[C]` (f32).
    weights: Tensor,
    shift_bn: bool,
}

impl DisAlign {
    /// The calibrated logits (1 + σ s) z + σ m, σ = sigmoid(x·v + b), of features `x` `[N, D]`
    /// and frozen logits `z` `[N, C]`.
    fn calibrate(&self, x: &Tensor, z: &Tensor) -> candle_core::Result<Tensor> {
        let g = x
            .matmul(&self.gate_weight.unsqueeze(1)?)?
            .broadcast_add(&self.gate_bias)?;
        let sigma = (g.neg()?.exp()? + 1.0)?.recip()?;
        let a = z.broadcast_mul(&self.scale)?.broadcast_add(&self.bias)?;
        z + sigma.broadcast_mul(&a)?
    }
}

/// The class-weighted cross-entropy with PyTorch's weighted mean, Σ w_{y_i} nll_i / Σ w_{y_i}
/// ([`sar_math::disalign::weighted_cross_entropy`]), in candle ops.
pub fn weighted_cross_entropy(
    logits: &Tensor,
    labels: &Tensor,
    weights: &Tensor,
) -> candle_core::Result<Tensor> {
    let nll = candle_nn::ops::log_softmax(logits, 1)?
        .gather(&labels.unsqueeze(1)?, 1)?
        .squeeze(1)?
        .neg()?;
    let w = weights.index_select(labels, 0)?;
    w.mul(&nll)?.sum_all()?.broadcast_div(&w.sum_all()?)
}

/// The DisAlign calibration the trainer computes, for tests against sar-math: features `x`,
/// frozen logits `z`, gate weight `v` `[D]` and bias `b` `[1]`, scale and margin `[C]`.
pub fn disalign_logits(
    x: &Tensor,
    z: &Tensor,
    v: &Tensor,
    b: &Tensor,
    scale: &Tensor,
    bias: &Tensor,
) -> candle_core::Result<Tensor> {
    DisAlign {
        scale: scale.clone(),
        bias: bias.clone(),
        gate_weight: v.clone(),
        gate_bias: b.clone(),
        weights: scale.clone(),
        shift_bn: false,
    }
    .calibrate(x, z)
}

/// The label-aware smoothed cross-entropy of `logits` `[N, C]` ([`sar_math::mislas`]) in
/// candle ops: mean_i [(1 − ε_i)(−log p_{i,y_i}) + ε_i·mean_c(−log p_ic)], ε_i = ε_{y_i}.
pub fn smoothed_cross_entropy(
    logits: &Tensor,
    labels: &Tensor,
    epsilon: &Tensor,
) -> candle_core::Result<Tensor> {
    let logp = candle_nn::ops::log_softmax(logits, 1)?;
    let nll = logp.gather(&labels.unsqueeze(1)?, 1)?.squeeze(1)?.neg()?;
    let smooth = logp.mean(1)?.neg()?;
    let eps = epsilon.index_select(labels, 0)?;
    let keep = eps.affine(-1.0, 1.0)?;
    ((keep * nll)? + (eps * smooth)?)?.mean(0)
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
        let batch = ClsBatch {
            x,
            labels,
            mix,
            shape: (n, c, h, w),
        };
        if let Some(dir) = &self.dump {
            if self.dump_plan {
                self.dump_plan(dir, ctx)?;
            } else {
                self.dump_batch(dir, ctx, &batch)?;
            }
        }
        Ok(Ok(batch))
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
        let mislas = match cfg.stage.kind {
            StageKind::None | StageKind::Disalign => None,
            StageKind::Mislas => {
                let st = &cfg.stage;
                let mut eps = vec![0.0; counts.len()];
                sar_math::mislas::label_aware_smoothing(
                    &counts,
                    st.smooth_head,
                    st.smooth_tail,
                    st.shape(),
                    &mut eps,
                )
                .map_err(|e| anyhow::anyhow!("stage.kind = \"mislas\": {e}"))?;
                let dev = &setup.device;
                let epsilon = Tensor::from_vec(
                    eps.iter().map(|&e| e as f32).collect::<Vec<_>>(),
                    counts.len(),
                    dev,
                )?;
                let lws = if st.lws {
                    Some(setup.varmap.get(
                        counts.len(),
                        LWS_SCALE,
                        candle_nn::Init::Const(1.0),
                        DType::F32,
                        dev,
                    )?)
                } else {
                    None
                };
                Some(Mislas {
                    epsilon,
                    lws,
                    shift_bn: st.shift_bn,
                })
            }
        };
        let disalign = match cfg.stage.kind {
            StageKind::Disalign => {
                let mut w = vec![0.0; counts.len()];
                sar_math::disalign::grw_weights(&counts, cfg.stage.rho(false), &mut w)
                    .map_err(|e| anyhow::anyhow!("stage.kind = \"disalign\": {e}"))?;
                let (vm, dev, c) = (&setup.varmap, &setup.device, counts.len());
                let d = setup.model.feature_dim();
                let var = |name: &str, n: usize, v: f64| {
                    vm.get(
                        n,
                        &format!("{DISALIGN}{name}"),
                        candle_nn::Init::Const(v),
                        DType::F32,
                        dev,
                    )
                };
                Some(DisAlign {
                    scale: var("scale", c, 1.0)?,
                    bias: var("bias", c, 0.0)?,
                    // The released DisAlignLinear sets the gate's weight to 0.1; its bias keeps
                    // PyTorch's random default, here 0 (so a run depends on its seed only).
                    gate_weight: var("gate.weight", d, 0.1)?,
                    gate_bias: var("gate.bias", 1, 0.0)?,
                    weights: Tensor::from_vec(
                        w.iter().map(|&v| v as f32).collect::<Vec<_>>(),
                        c,
                        dev,
                    )?,
                    shift_bn: cfg.stage.shift_bn,
                })
            }
            _ => None,
        };
        Ok(ClsTask {
            cfg: cfg.clone(),
            setup,
            data,
            norm,
            groups,
            counts,
            augment,
            mislas,
            disalign,
            dump: None,
            dump_plan: false,
        })
    }

    /// The second stage this task runs, if any, on the host.
    pub(crate) fn stage_two(&self) -> anyhow::Result<Option<StageTwo>> {
        let host = |t: &Tensor| -> anyhow::Result<Vec<f32>> {
            Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?)
        };
        Ok(match (&self.mislas, &self.disalign) {
            (Some(m), _) => Some(StageTwo::Mislas {
                epsilon: host(&m.epsilon)?,
                lws: m.lws.is_some(),
                shift_bn: m.shift_bn,
            }),
            (None, Some(d)) => Some(StageTwo::DisAlign {
                weights: host(&d.weights)?,
                shift_bn: d.shift_bn,
            }),
            (None, None) => None,
        })
    }

    /// Debug (`sar train --debug-dump DIR --debug-dump-plan`): writes the data as stored,
    /// `DIR/data.safetensors` — `train_images` `[N, C, H, W]` and `test_images` (u8 pixels),
    /// `train_labels` and `test_labels` (i64), the normalisation `mean` and `std` `[C]` (of
    /// `p / max_value`) and `max_value` — for a mirror that renders the batches itself from
    /// the plan (`ClsTask::dump_plan`) and evaluates on the same test set.
    pub(crate) fn dump_data(&self, dir: &std::path::Path) -> anyhow::Result<()> {
        use crate::tensorio::{serialize, write_atomic, OutTensor};
        let mut tensors = Vec::new();
        for (name, set) in [("train", &self.data.train), ("test", &self.data.test)] {
            let sar_data::dataset::Dataset::Memory(s) = set else {
                bail!("--debug-dump-plan needs a data set held in memory (not image files)");
            };
            let labels: Vec<i64> = s.labels.iter().map(|&l| l as i64).collect();
            tensors.push((
                format!("{name}_images"),
                OutTensor::u8(&[s.len(), s.channels, s.height, s.width], &s.images),
            ));
            tensors.push((
                format!("{name}_labels"),
                OutTensor::i64(&[s.len()], &labels),
            ));
            if name == "train" {
                tensors.push(("max_value".into(), OutTensor::scalar(s.max_value as f64)));
            }
        }
        let f = |v: &[f32]| v.iter().map(|&x| x as f64).collect::<Vec<_>>();
        let c = self.norm.mean.len();
        tensors.push(("mean".into(), OutTensor::f64(&[c], &f(&self.norm.mean))));
        tensors.push(("std".into(), OutTensor::f64(&[c], &f(&self.norm.std))));
        let bytes = serialize(&tensors, Default::default()).map_err(|e| anyhow::anyhow!(e))?;
        write_atomic(&dir.join("data.safetensors"), &bytes)?;
        Ok(())
    }

    /// Debug (`--debug-dump-plan`): appends the random choices of step `ctx.step` to
    /// `DIR/plan.jsonl` as one JSON line — `step`, `idx` (training-set indices), `crop` (per
    /// sample `[dy, dx, flip]`, see `sar_data::augment::draw`) and with MixUp `lambda` and
    /// `perm` (the partner of each row) — a few kB per step where the batches would take
    /// hundreds, so whole runs can be replayed.
    fn dump_plan(&self, dir: &std::path::Path, ctx: &StepCtx) -> anyhow::Result<()> {
        use std::io::Write;
        let cfg = &self.cfg;
        let crop: Vec<(isize, isize, bool)> = (0..ctx.idx.len())
            .map(|k| {
                let mut rng = augment::sample_rng(cfg.run.seed, ctx.epoch, ctx.position + k as u64);
                augment::draw(self.augment, &mut rng)
            })
            .collect();
        let mut line = serde_json::json!({"step": ctx.step, "idx": ctx.idx, "crop": crop});
        if cfg.data.mixup_alpha > 0.0 {
            let (lam, perm) = augment::mixup_draw(
                ctx.idx.len(),
                cfg.data.mixup_alpha,
                cfg.run.seed,
                ctx.epoch,
                ctx.batch as u64,
            );
            line["lambda"] = lam.into();
            line["perm"] = perm.into();
        }
        let path = dir.join("plan.jsonl");
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .with_context(|| format!("cannot append to {}", path.display()))?;
        writeln!(f, "{line}").with_context(|| format!("cannot append to {}", path.display()))?;
        Ok(())
    }

    /// Debug (`sar train --debug-dump DIR`): writes the batch of step `ctx.step` as
    /// `DIR/batch-<step>.safetensors` — `x` `[N, C, H, W]` (rendered, normalised and mixed; f32
    /// values widened to f64), `labels` `[N]`, `idx` `[N]` (training-set indices), and with
    /// MixUp `labels_b` `[N]` and `lambda` — so that another implementation can replay the run
    /// on exactly the same inputs (`tests/torch/train_mirror.py`).
    fn dump_batch(&self, dir: &std::path::Path, ctx: &StepCtx, b: &ClsBatch) -> anyhow::Result<()> {
        use crate::tensorio::{serialize, write_atomic, OutTensor};
        let (n, c, h, w) = b.shape;
        let x: Vec<f64> = b.x.iter().map(|&v| v as f64).collect();
        let idx: Vec<i64> = ctx.idx.iter().map(|&i| i as i64).collect();
        let mut tensors = vec![
            ("x".to_string(), OutTensor::f64(&[n, c, h, w], &x)),
            ("labels".to_string(), OutTensor::i64(&[n], &b.labels)),
            ("idx".to_string(), OutTensor::i64(&[n], &idx)),
        ];
        if let Some((lam, lb)) = &b.mix {
            tensors.push(("labels_b".to_string(), OutTensor::i64(&[n], lb)));
            tensors.push(("lambda".to_string(), OutTensor::scalar(*lam)));
        }
        let bytes = serialize(&tensors, Default::default()).map_err(|e| anyhow::anyhow!(e))?;
        write_atomic(
            &dir.join(format!("batch-{:06}.safetensors", ctx.step)),
            &bytes,
        )?;
        Ok(())
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
        if let Some(da) = &self.disalign {
            // The whole model is frozen; only the calibration learns.
            let feats = model.features(&x, da.shift_bn)?.detach();
            let z = model.classify(&feats)?.detach();
            let logits = da.calibrate(&feats, &z)?;
            let loss = weighted_cross_entropy(&logits, &y_t, &da.weights)?;
            return finish_single_loss(ctx, loss, n);
        }
        if let Some(m) = &self.mislas {
            // Stage 2: the extractor is frozen (no gradient reaches it); with shift_bn its
            // BatchNorm normalises by the batch and updates its running statistics.
            let feats = model.features(&x, m.shift_bn)?.detach();
            let mut logits = model.classify(&feats)?;
            if let Some(s) = &m.lws {
                logits = logits.broadcast_mul(s)?;
            }
            let loss = smoothed_cross_entropy(&logits, &y_t, &m.epsilon)?;
            return finish_single_loss(ctx, loss, n);
        }
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
        let (model, dev) = (&self.setup.model, &self.setup.device);
        Ok(TaskEvaluation::Classification(evaluate_with(
            &self.data.test,
            &self.norm,
            &self.groups,
            self.cfg.eval.batch_size,
            &mut |x, shape| {
                let x = Tensor::from_vec(x, shape, dev)?;
                // What the run predicts with: DisAlign's calibrated logits, or MiSLAS's scaled
                // ones, or the model's own.
                let logits = if let Some(da) = &self.disalign {
                    let feats = model.features(&x, false)?;
                    da.calibrate(&feats, &model.classify(&feats)?)?
                } else {
                    let logits = model.forward(&x, false)?;
                    match self.mislas.as_ref().and_then(|m| m.lws.as_ref()) {
                        Some(scale) => logits.broadcast_mul(scale)?,
                        None => logits,
                    }
                };
                Ok(logits.flatten_all()?.to_vec1()?)
            },
        )?))
    }

    fn train_labels(&self) -> Option<Vec<usize>> {
        Some(
            self.data
                .train
                .labels()
                .iter()
                .map(|&y| y as usize)
                .collect(),
        )
    }

    fn trainable(&self, name: &str) -> bool {
        match self.cfg.stage.kind {
            StageKind::None => true,
            StageKind::Mislas => name.starts_with("fc.") || name == LWS_SCALE,
            StageKind::Disalign => name.starts_with(DISALIGN),
        }
    }

    fn lr_scale(&self, name: &str) -> f64 {
        match &self.mislas {
            Some(_) if name.starts_with("fc.") => self.cfg.stage.classifier_lr_factor,
            _ => 1.0,
        }
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
    crate::plots::reliability(
        &out.join("reliability.png"),
        &format!("{name}: calibration on the test set"),
        &report.eval.classification()?.calibration,
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
