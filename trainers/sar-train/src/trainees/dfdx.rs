//! Training on dfdx (`run.backend = "dfdx"`, `sar train --backend dfdx`): classification with
//! the small CNNs, ResNet-32 and torchvision's ResNet-18/50 with either stem (CUB-200 with
//! ImageNet weights included), and segmentation with FCN or DeepLabV3 (ASPP) on the dilated
//! ResNet V1c and FCN or OCRNet on HRNetV2.
//!
//! The same run as on candle, step for step: the batch comes from the candle task's renderer
//! (augmentation, MixUp, fault injection), the weights start from the same seeded initialisers
//! (the candle model is built once and its variables copied), and the loop, schedule,
//! checkpoints, NaN policy, logs and reports are the shared ones in [`crate::run`]. What runs
//! on dfdx: the network (`sar_dfdx_models`, activations as NHWC rows), the losses (for
//! segmentation: `Dropout2d` with the candle trainer's draws, logits resized bilinearly to the
//! crop, mmsegmentation's pixel cross-entropy, the auxiliary head's at its weight), SAR
//! (anchor embedding, L_aux through the shared classifier, gate, EMA, L_p2a on the feature
//! rows with labels resampled by PyTorch's legacy `nearest`), backward on dfdx's tape, SGD or
//! AdamW with candle's parameter groups (`optim.custom_keys`, each group's schedule from its
//! own initial rate) and optimiser state names, and evaluation (segmentation through
//! [`DfdxSegmenter`], so the shared whole / sliding-window inference and metrics run the dfdx
//! network). Checkpoints hold the same tensor names and
//! layouts as candle's, so either backend resumes or evaluates the other's. Plots use the
//! candle model with the dfdx weights copied in.

use crate::cls::{evaluate_with, ClsBatch, ClsTask, StageTwo};
use crate::config::{DeviceKind, TrainConfig};
use crate::evaluation::TaskEvaluation;
use crate::run::{loss_parts, RunReport, StepCtx, StepReport, Trainee};
use crate::seg::SegTask;
use crate::trainees::candle::{restore_vars, Task};
use crate::trainees::dfdx_stage;
use anyhow::{bail, Context};
use candle_core::{DType, Device, Tensor};
use sar_data::seg::IGNORE;
use sar_dfdx::conv::{nchw_to_rows, rows_to_nchw, GatherCache};
use sar_dfdx::dfdx::prelude::*;
use sar_dfdx::nn::{AdamW, Params, Rows, SarHead, SarHeadConfig, Sgd};
use sar_dfdx::SarDevice;
use sar_dfdx_models::seg::{self, SegBackbone, SegHead, SegNet, SwinVariant, V1cDepth};
use sar_dfdx_models::{cross_entropy, one_hot, Arch, Classifier, Depth, Forward, Stem};
use sar_models::seg::{SegFeatures, Segmenter};
use std::cell::RefCell;
use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;

/// The dfdx trainee on `cfg.run.device`.
pub(crate) fn trainee(cfg: &TrainConfig) -> anyhow::Result<Box<dyn Trainee>> {
    match cfg.run.device {
        DeviceKind::Cpu => Ok(Box::new(DfdxTrainee::new(cfg, Cpu::default())?)),
        #[cfg(feature = "cuda")]
        DeviceKind::Cuda => {
            let dev = sar_dfdx::dfdx::tensor::Cuda::try_build(0, cfg.run.seed)
                .map_err(|e| anyhow::anyhow!("cannot open CUDA device 0 for dfdx: {e:?}"))?;
            Ok(Box::new(DfdxTrainee::new(cfg, dev)?))
        }
        #[cfg(not(feature = "cuda"))]
        DeviceKind::Cuda => bail!("run.device = \"cuda\" needs sar built with --features cuda"),
    }
}

type Loss<D> = sar_dfdx::dfdx::tensor::Tensor<Rank0, f32, D, OwnedTape<f32, D>>;

/// The AdamW state in a checkpoint (candle's names, see [`DfdxTrainee::state_tensors`]): m, v
/// and the step count of each variable that has one; a half-present entry is an error.
fn adamw_state(
    tensors: &HashMap<String, Tensor>,
) -> anyhow::Result<Vec<sar_dfdx::nn::HostAdamWState>> {
    let mut out = Vec::new();
    for (name, t) in tensors {
        let Some(var) = name.strip_prefix("optim.exp_avg.") else {
            continue;
        };
        let get = |kind: &str| {
            tensors
                .get(&format!("optim.{kind}.{var}"))
                .with_context(|| format!("the checkpoint has {name} but not optim.{kind}.{var}"))
        };
        let v = to_host(get("exp_avg_sq")?)?.1;
        let steps = crate::optim::adamw_step_count(&format!("optim.step.{var}"), get("step")?)?;
        out.push((var.to_string(), to_host(t)?.1, v, steps));
    }
    for name in tensors.keys() {
        for kind in ["exp_avg_sq", "step"] {
            if let Some(var) = name.strip_prefix(&format!("optim.{kind}.")) {
                anyhow::ensure!(
                    tensors.contains_key(&format!("optim.exp_avg.{var}")),
                    "the checkpoint has {name} but not optim.exp_avg.{var}"
                );
            }
        }
    }
    Ok(out)
}

/// The task and its dfdx network.
enum Work {
    Cls { inner: ClsTask, net: Classifier },
    Seg { inner: SegTask, net: SegNet },
}

impl Work {
    /// The candle task: data, groups, the seeded initial weights, cost and plots.
    fn task(&self) -> &dyn Task {
        match self {
            Work::Cls { inner, .. } => inner,
            Work::Seg { inner, .. } => inner,
        }
    }
}

struct DfdxTrainee<D: SarDevice<f32>> {
    work: Work,
    params: Params<D>,
    cache: RefCell<GatherCache<D>>,
    head: Option<SarHead<D>>,
    opt: DfdxOptimizer<D>,
    /// `optim.lr` and `optim.weight_decay`, before the groups' factors.
    base_lr: f64,
    base_decay: f64,
    /// Per trained variable, the factors of its rate and weight decay (the task's, e.g.
    /// none, times its `optim.custom_keys` group's), as candle's optimisers apply them.
    groups: HashMap<String, (f64, f64)>,
    /// The second stage (its first-stage model frozen in `params`), if the config runs one.
    stage: Option<StageTwo>,
    pending: Option<Loss<D>>,
}

/// `optim.kind` on dfdx.
enum DfdxOptimizer<D: SarDevice<f32>> {
    Sgd(Sgd<D>),
    AdamW(AdamW<D>),
}

fn host_tensor(name: &str, shape: &[usize], v: Vec<f32>) -> anyhow::Result<(String, Tensor)> {
    Ok((name.to_string(), Tensor::from_vec(v, shape, &Device::Cpu)?))
}

fn to_host(t: &Tensor) -> anyhow::Result<(Vec<usize>, Vec<f32>)> {
    Ok((
        t.dims().to_vec(),
        t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?,
    ))
}

/// The variables of a candle task (its seeded initial weights) and its SAR head's anchors, on
/// dfdx; `segmentation` (the decode head's classifier) selects the segmentation head.
fn on_dfdx<D: SarDevice<f32>>(
    varmap: &candle_nn::VarMap,
    head: Option<&sar_candle::SarHead>,
    segmentation: Option<&str>,
    device: &D,
) -> anyhow::Result<(Params<D>, Option<SarHead<D>>)> {
    let entries = varmap
        .data()
        .lock()
        .expect("varmap lock")
        .iter()
        .map(|(n, v)| {
            let (shape, values) = to_host(v.as_tensor())?;
            Ok((n.clone(), shape, values))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let params = Params::from_host(device, entries)?;
    let head = match head {
        Some(h) => {
            let mut c =
                SarHeadConfig::new(*h.config(), h.classes(), h.dim()).regularizer(h.regularizer());
            if let Some(classifier) = segmentation {
                c = c.segmentation();
                c.classifier = classifier.to_string();
            }
            Some(SarHead::new(device, &c, to_host(&h.buffers()?[0].1)?.1)?)
        }
        None => None,
    };
    Ok((params, head))
}

/// The dfdx network of a segmenter config: the dilated ResNets with FCN or ASPP, HRNetV2 with
/// FCN or OCRNet's heads, SegFormer on MiT, UPerNet on Swin (every network candle builds).
fn dfdx_segnet(c: &crate::config::SegmenterConfig) -> anyhow::Result<SegNet> {
    use sar_models::seg::{SegBackbone as B, SegHeadKind};
    let (backbone, width) = match c.backbone {
        B::ResNet18V1c => (SegBackbone::ResNetV1c(V1cDepth::R18), c.width),
        B::ResNet50V1c => (SegBackbone::ResNetV1c(V1cDepth::R50), c.width),
        B::ResNet101V1c => (SegBackbone::ResNetV1c(V1cDepth::R101), c.width),
        B::HrNetV2W18 => (SegBackbone::HrNetV2, 18),
        B::HrNetV2W48 => (SegBackbone::HrNetV2, 48),
        b => match (b.mit(), b.swin()) {
            (Some(sar_models::seg::mit::MitVariant::B(v)), _) => (SegBackbone::Mit(v), c.width),
            (_, Some(v)) => {
                use sar_models::seg::swin::SwinVariant as S;
                let variant = match v {
                    S::Tiny => SwinVariant::Tiny,
                    S::Small => SwinVariant::Small,
                    S::Base => SwinVariant::Base,
                    S::Large => SwinVariant::Large,
                };
                // Unset: the variant's window, as candle's network takes it.
                let window = c.window.unwrap_or(v.dims().3);
                (SegBackbone::Swin { variant, window }, c.width)
            }
            _ => bail!("run.backend = \"dfdx\" has no network for model.backbone = {b}"),
        },
    };
    let head = match c.head {
        SegHeadKind::Fcn => SegHead::Fcn,
        SegHeadKind::Aspp => SegHead::Aspp,
        SegHeadKind::Ocr => SegHead::Ocr { width: c.width },
        SegHeadKind::Segformer => SegHead::SegFormer,
        SegHeadKind::Uper => SegHead::Uper,
    };
    Ok(SegNet::new(backbone, head, c.aux(), width)?)
}

/// The dfdx network of a classifier config (every architecture candle builds).
fn dfdx_arch(c: &crate::config::ClassifierConfig) -> anyhow::Result<Arch> {
    let stem = match c.stem {
        sar_models::Stem::Imagenet => Stem::Imagenet,
        sar_models::Stem::Cifar => Stem::Cifar,
    };
    Ok(match c.arch {
        sar_models::Arch::SmallCnn => Arch::SmallCnn,
        sar_models::Arch::CnnPool => Arch::CnnPool,
        sar_models::Arch::ResNet32 => Arch::CifarResNet { depth: 32 },
        sar_models::Arch::ResNet18 => Arch::ResNet {
            depth: Depth::R18,
            stem,
        },
        sar_models::Arch::ResNet50 => Arch::ResNet {
            depth: Depth::R50,
            stem,
        },
    })
}

impl<D: SarDevice<f32>> DfdxTrainee<D> {
    fn new(cfg: &TrainConfig, device: D) -> anyhow::Result<Self> {
        let (work, (params, head)) = if cfg.data.dataset.is_segmentation() {
            let inner = SegTask::new(cfg)?;
            let net = dfdx_segnet(cfg.model.segmenter()?)?;
            let vars = on_dfdx(
                &inner.setup.varmap,
                inner.setup.head.as_ref(),
                Some(net.classifier_name(false)),
                &device,
            )?;
            (Work::Seg { inner, net }, vars)
        } else {
            let inner = ClsTask::new(cfg)?;
            let net = Classifier::new(dfdx_arch(cfg.model.classifier()?)?)?;
            let vars = on_dfdx(
                &inner.setup.varmap,
                inner.setup.head.as_ref(),
                None,
                &device,
            )?;
            (Work::Cls { inner, net }, vars)
        };
        let (stage, mut params) = (
            match &work {
                Work::Cls { inner, .. } => inner.stage_two()?,
                Work::Seg { inner, .. } => inner.stage_two(),
            },
            params,
        );
        // A second stage trains its own few variables; the rest stay as the first stage left
        // them (no gradient, no weight decay, no momentum).
        params.freeze_unless(|n| work.task().trainable(n));
        let o = &cfg.optim;
        let groups = params
            .trainable()
            .into_iter()
            .map(|n| {
                let key = crate::optim::custom_key(&o.custom_keys, &n);
                let lr = work.task().lr_scale(&n) * key.lr_mult;
                (n, (lr, key.decay_mult))
            })
            .collect();
        let opt = match o.kind {
            crate::config::OptimizerKind::Sgd => {
                DfdxOptimizer::Sgd(Sgd::new(o.lr, o.momentum, o.weight_decay, o.nesterov))
            }
            crate::config::OptimizerKind::AdamW => {
                DfdxOptimizer::AdamW(AdamW::new((o.betas[0], o.betas[1]), o.eps))
            }
        };
        Ok(DfdxTrainee {
            base_lr: o.lr,
            base_decay: o.weight_decay,
            groups,
            work,
            params,
            cache: RefCell::new(GatherCache::default()),
            head,
            opt,
            stage,
            pending: None,
        })
    }

    /// A classification batch's loss (see the module docs).
    fn cls_loss(&mut self, ctx: &StepCtx) -> anyhow::Result<Result<StepLoss<D>, String>> {
        let Work::Cls { inner, net } = &self.work else {
            bail!("not a classification run");
        };
        let ClsBatch {
            x,
            labels,
            mix,
            shape,
        } = match inner.batch(ctx)? {
            Ok(b) => b,
            Err(msg) => return Ok(Err(msg)),
        };
        let (n, _, h, w) = shape;
        let classes = inner.data.train.classes();
        if let Some(stage) = &self.stage {
            // The first stage's extractor runs without a tape (frozen); with shift_bn its
            // BatchNorm normalises by the batch and updates its running statistics.
            // (The config refuses MixUp in a second stage.)
            let shift_bn = match stage {
                StageTwo::Mislas { shift_bn, .. } | StageTwo::DisAlign { shift_bn, .. } => {
                    *shift_bn
                }
                StageTwo::SegDisAlign { .. } => {
                    bail!("a segmentation stage in a classification run")
                }
            };
            let x = rows_of(self.params.device(), x, shape);
            let mut cache = self.cache.borrow_mut();
            let mut f = Forward {
                params: &mut self.params,
                cache: &mut cache,
                train: shift_bn,
            };
            let frozen = net.features(&mut f, x, (n, h, w))?;
            let params: &Params<D> = f.params;
            let feats = frozen.clone().traced(params.alloc_grads()?);
            let loss = match stage {
                StageTwo::Mislas { epsilon, lws, .. } => {
                    dfdx_stage::mislas_loss(params, feats, &labels, epsilon, *lws)?
                }
                StageTwo::DisAlign { weights, .. } | StageTwo::SegDisAlign { weights, .. } => {
                    let z = net.classify(params, frozen)?;
                    let logits = dfdx_stage::cls_disalign_logits(params, feats, z)?;
                    dfdx_stage::class_weighted_cross_entropy(logits, &labels, weights)?
                }
            };
            return Ok(Ok(single_loss(loss, ctx.poison_loss, n)));
        }
        let x = rows_of(self.params.device(), x, shape).traced(self.params.alloc_grads()?);
        let mut cache = self.cache.borrow_mut();
        let mut f = Forward {
            params: &mut self.params,
            cache: &mut cache,
            train: true,
        };
        let feats = net.features(&mut f, x, (n, h, w))?;
        let targets = match &mix {
            None => one_hot(&labels, classes)?,
            Some((lam, lb)) => {
                let (a, b) = (one_hot(&labels, classes)?, one_hot(lb, classes)?);
                let lam = *lam as f32;
                a.iter()
                    .zip(&b)
                    .map(|(a, b)| lam * a + (1.0 - lam) * b)
                    .collect()
            }
        };
        // With SAR the features go on to p2a carrying the network's tape; the classifier
        // gets a copy with an empty one (their gradients meet under the same tensor id).
        let (ce_feats, sar_feats) = match self.head {
            Some(_) => (feats.retaped::<OwnedTape<f32, D>>(), Some(feats)),
            None => (feats, None),
        };
        let logits = net.classify(&self.params, ce_feats)?;
        let mut ce = cross_entropy(logits, targets)?;
        if ctx.poison_loss {
            ce = ce * f32::INFINITY;
        }
        let ce_value = ce.as_vec()[0] as f64;
        let (mut aux, mut p2a, mut gate, mut valid) = (0.0, 0.0, false, 0);
        let loss = match (self.head.as_mut(), sar_feats) {
            (Some(hd), Some(feats)) => {
                let s = hd.step(
                    &self.params,
                    feats,
                    &labels,
                    mix.as_ref().map(|(lam, lb)| (&lb[..], *lam)),
                )?;
                (aux, p2a, gate, valid) = (s.loss_aux, s.loss_p2a, s.gate_passed, s.valid);
                ce + s.loss
            }
            _ => ce,
        };
        Ok(Ok(StepLoss {
            loss,
            ce: ce_value,
            head_aux: 0.0,
            aux,
            p2a,
            gate,
            valid,
            images: n,
        }))
    }

    /// A segmentation batch's loss, as the candle trainer's `SegTask` step computes it (see the
    /// module docs).
    fn seg_loss(&mut self, ctx: &StepCtx) -> anyhow::Result<Result<StepLoss<D>, String>> {
        let Work::Seg { inner, net } = &self.work else {
            bail!("not a segmentation run");
        };
        let cfg = &inner.cfg;
        let (n, step) = (ctx.idx.len(), ctx.step);
        let [h, w] = cfg.data.seg_crop;
        let (mut x, y) = inner.render(ctx.idx, ctx.epoch, ctx.position)?;
        if ctx.poison_input {
            x.iter_mut().for_each(|v| *v = f32::NAN);
        }
        if let Some(i) = x.iter().position(|v| !v.is_finite()) {
            return Ok(Err(format!(
                "step {step}: the input batch holds {} (image {} of the batch)",
                x[i],
                i / (3 * h * w)
            )));
        }
        let m = cfg.model.segmenter()?;
        // The candle trainer's generator: the main features' dropout masks, then the
        // auxiliary features'.
        let mut rng = sar_data::augment::sample_rng(cfg.run.seed ^ 0x4452_4F50, step, 0);
        let x = rows_of(self.params.device(), x, (n, 3, h, w));
        let mut cache = self.cache.borrow_mut();
        if let Some(stage) = &self.stage {
            let StageTwo::SegDisAlign { weights, shift_bn } = stage else {
                bail!("a classification stage in a segmentation run");
            };
            // The segmenter is frozen (no tape; its BatchNorm statistics shift with shift_bn,
            // its dropout stays as in training); the auxiliary head's loss weight is 0.
            let mut f = Forward {
                params: &mut self.params,
                cache: &mut cache,
                train: *shift_bn,
            };
            let out = net.features(&mut f, x, (n, h, w))?;
            let (fh, fw) = out.hw;
            let dropped = seg::dropout2d(out.main.clone(), n, m.dropout, &mut rng)?;
            let z = net.classify(f.params, dropped, false)?;
            let feats = out.main.traced(f.params.alloc_grads()?);
            // The DisAlign gate's own BatchNorm trains.
            f.train = true;
            let logits = dfdx_stage::seg_disalign_logits(&mut f, feats, z)?;
            let up = seg::resize_bilinear(logits, (n, fh, fw), (h, w))?;
            let loss = seg::seg_weighted_cross_entropy(up, &y, IGNORE, weights)?;
            return Ok(Ok(single_loss(loss, ctx.poison_loss, n)));
        }
        let batch = SegBatch {
            x,
            y: &y,
            size: (n, h, w),
            dropout: m.dropout,
            aux_weight: m.aux_weight,
            drop_path: m.drop_path(),
            poison_loss: ctx.poison_loss,
        };
        let model = SegStepModel {
            net,
            params: &mut self.params,
            cache: &mut cache,
            head: self.head.as_mut(),
        };
        Ok(Ok(seg_step_loss(model, batch, &mut rng)?))
    }
}

/// A segmentation network in training with its variables, gather cache and SAR head.
struct SegStepModel<'a, D: SarDevice<f32>> {
    net: &'a SegNet,
    params: &'a mut Params<D>,
    cache: &'a mut GatherCache<D>,
    head: Option<&'a mut SarHead<D>>,
}

/// One segmentation batch: images as rows, labels `[N·H·W]` (255 ignored), the crop's size and
/// the loss settings.
struct SegBatch<'a, D: SarDevice<f32>> {
    x: Rows<D, NoneTape>,
    y: &'a [u8],
    size: (usize, usize, usize),
    dropout: f64,
    aux_weight: f64,
    /// Stochastic depth's largest rate (the transformers; the others ignore it).
    drop_path: f64,
    /// Fault injection: an infinite cross-entropy.
    poison_loss: bool,
}

/// A segmentation batch's loss as the candle trainer's `SegTask` step computes it: features
/// (the transformers' stochastic-depth masks drawn from `rng` first), `Dropout2d` (masks from
/// `rng`: the main features', then the auxiliary's), `conv_seg`,
/// logits resized to the crop, pixel cross-entropy (+ `aux_weight` × the auxiliary head's),
/// and with SAR the head's step on F (before dropout) with the labels resampled to F's size.
fn seg_step_loss<D: SarDevice<f32>>(
    m: SegStepModel<'_, D>,
    b: SegBatch<'_, D>,
    rng: &mut sar_math::rng::SeededRng,
) -> anyhow::Result<StepLoss<D>> {
    let (n, h, w) = b.size;
    let x = b.x.traced(m.params.alloc_grads()?);
    let mut f = Forward {
        params: m.params,
        cache: m.cache,
        train: true,
    };
    let drop = seg::DropPath {
        rate: b.drop_path,
        rng: &mut *rng,
    };
    let out = m
        .net
        .features_with_noise(&mut f, x, (n, h, w), Some(drop))?;
    let params: &Params<D> = f.params;
    let (fh, fw) = out.hw;
    let aux_hw = out.aux_hw;
    let pixel_ce =
        |feats: Rows<D, OwnedTape<f32, D>>, aux: bool, rng: &mut sar_math::rng::SeededRng| {
            let dropped = seg::dropout2d(feats, n, b.dropout, rng)?;
            let logits = m.net.classify(params, dropped, aux)?;
            let (lh, lw) = if aux { aux_hw } else { (fh, fw) };
            let up = seg::resize_bilinear(logits, (n, lh, lw), (h, w))?;
            seg::seg_cross_entropy(up, b.y, IGNORE)
        };
    // With SAR, F goes on to p2a carrying the network's tape; the classifier gets a copy with
    // an empty one (their gradients meet under the same tensor id).
    let (ce_feats, sar_feats) = match m.head {
        Some(_) => (out.main.retaped::<OwnedTape<f32, D>>(), Some(out.main)),
        None => (out.main, None),
    };
    let mut ce = pixel_ce(ce_feats, false, rng)?;
    if b.poison_loss {
        ce = ce * f32::INFINITY;
    }
    let ce_value = ce.as_vec()[0] as f64;
    let mut loss = ce;
    let mut head_aux = 0.0;
    if let Some(a) = out.aux {
        let la = pixel_ce(a, true, rng)? * b.aux_weight as f32;
        head_aux = la.as_vec()[0] as f64;
        loss = loss + la;
    }
    let (mut aux, mut p2a, mut gate, mut valid) = (0.0, 0.0, false, 0);
    if let (Some(hd), Some(feats)) = (m.head, sar_feats) {
        // Labels at feature resolution, in the rows' (image, y, x) order.
        let mut small = vec![0u8; n * fh * fw];
        sar_math::resample::resample_labels_nearest(b.y, n, (h, w), (fh, fw), &mut small)?;
        let labels: Vec<i64> = small.iter().map(|&v| v as i64).collect();
        let s = hd.step(params, feats, &labels, None)?;
        (aux, p2a, gate, valid) = (s.loss_aux, s.loss_p2a, s.gate_passed, s.valid);
        loss = loss + s.loss;
    }
    Ok(StepLoss {
        loss,
        ce: ce_value,
        head_aux,
        aux,
        p2a,
        gate,
        valid,
        images: n,
    })
}

/// Images `[n, c, h, w]` (host, NCHW) as NHWC rows on `device`.
fn rows_of<D: SarDevice<f32>>(
    device: &D,
    x: Vec<f32>,
    (n, c, h, w): (usize, usize, usize, usize),
) -> Rows<D, NoneTape> {
    device.tensor_from_vec(nchw_to_rows(&x, n, c, h, w), (n * h * w, c))
}

/// A second stage's loss as the step's only part (candle's `finish_single_loss`): reported as
/// the cross-entropy, infinite under fault injection.
fn single_loss<D: SarDevice<f32>>(loss: Loss<D>, poison: bool, images: usize) -> StepLoss<D> {
    let loss = if poison { loss * f32::INFINITY } else { loss };
    StepLoss {
        ce: loss.as_vec()[0] as f64,
        loss,
        head_aux: 0.0,
        aux: 0.0,
        p2a: 0.0,
        gate: false,
        valid: 0,
        images,
    }
}

/// One batch's loss with its tape, and its parts for the log.
struct StepLoss<D: SarDevice<f32>> {
    loss: Loss<D>,
    ce: f64,
    head_aux: f64,
    aux: f64,
    p2a: f64,
    gate: bool,
    valid: usize,
    images: usize,
}

impl<D: SarDevice<f32>> Trainee for DfdxTrainee<D> {
    fn train_len(&self) -> usize {
        self.work.task().train_len()
    }
    fn train_counts(&self) -> &[u64] {
        self.work.task().train_counts()
    }
    fn train_labels(&self) -> Option<Vec<usize>> {
        self.work.task().train_labels()
    }

    fn forward(&mut self, ctx: &StepCtx) -> anyhow::Result<Result<StepReport, String>> {
        self.pending = None;
        let step = match self.work {
            Work::Cls { .. } => self.cls_loss(ctx)?,
            Work::Seg { .. } => self.seg_loss(ctx)?,
        };
        let s = match step {
            Ok(s) => s,
            Err(msg) => return Ok(Err(msg)),
        };
        let total = s.loss.as_vec()[0] as f64;
        Ok(
            match loss_parts(ctx.step, s.ce, s.head_aux, s.aux, s.p2a, total) {
                Err(msg) => Err(msg),
                Ok(parts) => {
                    self.pending = Some(s.loss);
                    Ok(StepReport {
                        parts,
                        gate: s.gate,
                        valid: s.valid,
                        images: s.images,
                    })
                }
            },
        )
    }

    fn update(&mut self, rate: &dyn Fn(f64) -> f64) -> anyhow::Result<()> {
        let loss = self
            .pending
            .take()
            .context("update without a forward pass")?;
        let mut grads = loss
            .try_backward()
            .map_err(|e| anyhow::anyhow!("dfdx backward: {e:?}"))?;
        // Each group's schedule starts from its own initial rate (mmcv's per-group update).
        let (lr, wd, groups) = (self.base_lr, self.base_decay, &self.groups);
        let rate_and_decay = |name: &str| {
            let (l, d) = groups.get(name).copied().unwrap_or((1.0, 1.0));
            (rate(lr * l), wd * d)
        };
        match &mut self.opt {
            DfdxOptimizer::Sgd(o) => {
                o.step_grouped(&mut self.params, &mut grads, &rate_and_decay)?
            }
            DfdxOptimizer::AdamW(o) => o.step(&mut self.params, &mut grads, &rate_and_decay)?,
        }
        Ok(())
    }

    fn snapshot(&self) -> anyhow::Result<Vec<(String, Tensor)>> {
        let mut out = Vec::new();
        for (name, shape, v) in self.params.to_host() {
            if sar_dfdx::nn::is_running_stat(&name) {
                out.push(host_tensor(&name, &shape, v)?);
            }
        }
        if let Some(h) = &self.head {
            for (name, shape, v) in h.buffers() {
                out.push(host_tensor(&name, &shape, v)?);
            }
        }
        Ok(out)
    }

    fn restore(&mut self, snap: &[(String, Tensor)]) -> anyhow::Result<()> {
        let map: HashMap<String, Tensor> = snap.iter().cloned().collect();
        for (name, t) in &map {
            if sar_dfdx::nn::is_running_stat(name) {
                self.params.set(name, to_host(t)?.1)?;
            }
        }
        if let Some(h) = self.head.as_mut() {
            h.load_buffers(&|n| map.get(n).and_then(|t| to_host(t).ok()))?;
        }
        Ok(())
    }

    fn state_tensors(&self) -> anyhow::Result<Vec<(String, Tensor)>> {
        let mut out = Vec::new();
        for (name, shape, v) in self.params.to_host() {
            out.push(host_tensor(&name, &shape, v)?);
        }
        // candle's names: SGD `optim.momentum.<var>`; AdamW `optim.exp_avg.<var>`,
        // `optim.exp_avg_sq.<var>` and `optim.step.<var>` (the count, one f64).
        match &self.opt {
            DfdxOptimizer::Sgd(o) => {
                for (name, v) in o.buffers() {
                    let shape = self.params.shape(&name)?.to_vec();
                    out.push(host_tensor(&format!("optim.momentum.{name}"), &shape, v)?);
                }
            }
            DfdxOptimizer::AdamW(o) => {
                for (name, m, v, t) in o.state() {
                    let shape = self.params.shape(&name)?.to_vec();
                    out.push(host_tensor(&format!("optim.exp_avg.{name}"), &shape, m)?);
                    out.push(host_tensor(&format!("optim.exp_avg_sq.{name}"), &shape, v)?);
                    let step = Tensor::new(&[t as f64], &Device::Cpu)?;
                    out.push((format!("optim.step.{name}"), step));
                }
            }
        }
        if let Some(h) = &self.head {
            for (name, shape, v) in h.buffers() {
                out.push(host_tensor(&name, &shape, v)?);
            }
        }
        Ok(out)
    }

    fn load_state(&mut self, tensors: &HashMap<String, Tensor>) -> anyhow::Result<()> {
        let names: Vec<String> = self.params.names().cloned().collect();
        for name in names {
            let t = tensors
                .get(&name)
                .with_context(|| format!("the checkpoint lacks {name} (another model?)"))?;
            let (shape, v) = to_host(t)?;
            anyhow::ensure!(
                shape == self.params.shape(&name)?,
                "checkpoint tensor {name} has shape {shape:?}, the model needs {:?} (another model?)",
                self.params.shape(&name)?
            );
            self.params.set(&name, v)?;
        }
        // A checkpoint of the other optimiser is refused, as candle's optimisers refuse it.
        let holds = |prefix: &str| tensors.keys().find(|n| n.starts_with(prefix));
        match (&self.opt, holds("optim.momentum."), holds("optim.exp_avg")) {
            (DfdxOptimizer::Sgd(_), _, Some(n)) | (DfdxOptimizer::AdamW(_), Some(n), _) => {
                bail!("the checkpoint holds {n}, state of the other optimiser than optim.kind")
            }
            _ => {}
        }
        match &mut self.opt {
            DfdxOptimizer::Sgd(o) => {
                let mut momentum = Vec::new();
                for (name, t) in tensors {
                    if let Some(v) = name.strip_prefix("optim.momentum.") {
                        momentum.push((v.to_string(), to_host(t)?.1));
                    }
                }
                o.load_buffers(&self.params, momentum)?;
            }
            DfdxOptimizer::AdamW(o) => o.load_state(&self.params, adamw_state(tensors)?)?,
        }
        if let Some(h) = self.head.as_mut() {
            h.load_buffers(&|n| tensors.get(n).and_then(|t| to_host(t).ok()))?;
        }
        Ok(())
    }

    /// Pretrained weights as the candle trainee reads them (torchvision / timm classifiers but
    /// `fc.`, mmsegmentation checkpoints or ImageNet backbones), strictly by `sar-models`'
    /// loader into the seeded candle variables, then copied over: a file that does not fit
    /// the network changes nothing on either side.
    fn load_pretrained(
        &mut self,
        cfg: &TrainConfig,
        p: &Path,
    ) -> anyhow::Result<(usize, Vec<String>)> {
        let varmap = self.work.task().varmap();
        let r = crate::trainees::candle::load_pretrained_into(varmap, cfg, p)?;
        let data = varmap.data().lock().expect("varmap lock");
        for name in &r.loaded {
            let var = data
                .get(name)
                .with_context(|| format!("pretrained: {name} is not a variable"))?;
            self.params.set(name, to_host(var.as_tensor())?.1)?;
        }
        Ok((r.loaded.len(), r.kept))
    }

    /// `stage.init_from` as the candle trainee reads it (every variable the checkpoint has,
    /// only `sar.*` and `stage.*` may be missing), then every variable copied over.
    fn init_weights(
        &mut self,
        tensors: &HashMap<String, Tensor>,
    ) -> anyhow::Result<(usize, Vec<String>)> {
        let varmap = self.work.task().varmap();
        let r = crate::trainees::candle::init_vars(varmap, tensors)?;
        let data = varmap.data().lock().expect("varmap lock");
        for (name, var) in data.iter() {
            if self.params.shape(name).is_ok() {
                self.params.set(name, to_host(var.as_tensor())?.1)?;
            }
        }
        Ok(r)
    }

    fn sar_params(&self) -> u64 {
        self.params
            .trainable()
            .iter()
            .filter(|n| n.starts_with("sar."))
            .map(|n| {
                self.params
                    .shape(n)
                    .map_or(0, |s| s.iter().product::<usize>() as u64)
            })
            .sum()
    }

    fn evaluate(&self) -> anyhow::Result<TaskEvaluation> {
        // Evaluation mode changes nothing; a shallow copy of the variables lends `Forward`
        // its `&mut`.
        let mut params = self.params.clone();
        match &self.work {
            Work::Cls { inner, net } => {
                let mut cache = self.cache.borrow_mut();
                let e = evaluate_with(
                    &inner.data.test,
                    &inner.norm,
                    &inner.groups,
                    inner.cfg.eval.batch_size,
                    &mut |x, shape| {
                        let (n, _, h, w) = shape;
                        let x = rows_of(params.device(), x, shape);
                        let mut f = Forward {
                            params: &mut params,
                            cache: &mut cache,
                            train: false,
                        };
                        let feats = net.features(&mut f, x, (n, h, w))?;
                        // What the run predicts with: DisAlign's calibrated logits, or
                        // MiSLAS's scaled ones, or the model's own.
                        let logits = match &self.stage {
                            Some(StageTwo::Mislas { lws, .. }) => {
                                dfdx_stage::mislas_logits(&params, feats, *lws)?
                            }
                            Some(StageTwo::DisAlign { .. }) => {
                                let z = net.classify(&params, feats.clone())?;
                                dfdx_stage::cls_disalign_logits(&params, feats, z)?
                            }
                            _ => net.classify(&params, feats)?,
                        };
                        Ok(logits.as_vec())
                    },
                )?;
                Ok(TaskEvaluation::Classification(e))
            }
            Work::Seg { inner, net } => {
                // On the CPU, from a copy of the weights: the shared inference takes a
                // `Segmenter`, which must be Send + Sync, and dfdx's CUDA device is neither.
                let cpu = Cpu::default();
                let model = DfdxSegmenter {
                    net: *net,
                    params: Mutex::new(Params::from_host(&cpu, params.to_host())?),
                    cache: Mutex::new(GatherCache::default()),
                    shape: inner.setup.model.as_ref(),
                    disalign: matches!(self.stage, Some(StageTwo::SegDisAlign { .. })),
                };
                Ok(TaskEvaluation::Segmentation(crate::seg::evaluate_seg(
                    &model,
                    &inner.data.test,
                    &inner.groups,
                    &inner.cfg,
                    &Device::Cpu,
                )?))
            }
        }
    }

    fn cost(&self) -> sar_models::Cost {
        self.work.task().cost()
    }

    fn write_plots(&self, cfg: &TrainConfig, report: &RunReport) -> anyhow::Result<()> {
        // The candle model with the trained weights copied in draws the plots.
        let tensors: HashMap<String, Tensor> = self.state_tensors()?.into_iter().collect();
        restore_vars(self.work.task().varmap(), &tensors)?;
        let Work::Cls { inner, .. } = &self.work else {
            return self.work.task().write_plots(cfg, report);
        };
        let anchors = match &self.head {
            Some(h) if h.fully_initialized() => Some(h.buffers()[1].2.clone()),
            _ => None,
        };
        crate::cls::write_plots(
            cfg,
            report,
            inner.setup.model.as_ref(),
            &inner.data.test,
            &inner.norm,
            &inner.setup.device,
            anchors.as_deref(),
        )
    }
}

/// A dfdx segmentation network behind the candle [`Segmenter`] interface, so the shared
/// inference (whole image or sliding windows), metrics and plots run it: images and feature
/// maps cross as host NCHW values, the network runs on dfdx's CPU device in evaluation mode.
/// The candle model of the same config answers the questions about its shape and cost.
pub(crate) struct DfdxSegmenter<'a> {
    net: SegNet,
    params: Mutex<Params<Cpu>>,
    cache: Mutex<GatherCache<Cpu>>,
    shape: &'a dyn Segmenter,
    /// Predicts through the DisAlign head (`stage.disalign.*`) of a DisAlign run.
    disalign: bool,
}

/// The dims `(N, C, h, w)` of a map.
type Nchw = (usize, usize, usize, usize);

fn candle_err(e: impl std::fmt::Display) -> candle_core::Error {
    candle_core::Error::Msg(e.to_string())
}

impl DfdxSegmenter<'_> {
    /// NCHW `[N, C, h, w]` host values of a candle map and its dims.
    fn host(t: &Tensor) -> candle_core::Result<(Vec<f32>, Nchw)> {
        let dims = t.dims4()?;
        let v = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        Ok((v, dims))
    }

    /// Rows `[N·h·w, C]` back to a candle NCHW map `[N, C, h, w]` on the CPU.
    fn map(
        rows: Vec<f32>,
        (n, c, h, w): (usize, usize, usize, usize),
    ) -> candle_core::Result<Tensor> {
        Tensor::from_vec(rows_to_nchw(&rows, n, c, h, w), (n, c, h, w), &Device::Cpu)
    }
}

impl Segmenter for DfdxSegmenter<'_> {
    fn features(&self, images: &Tensor, train: bool) -> candle_core::Result<SegFeatures> {
        if train {
            candle_core::bail!("the dfdx segmenter adapter evaluates only (train on the trainee)");
        }
        let (main, (n, fh, fw)) =
            self.eval_features(images, |_, main, size| Ok((main.as_vec(), size)))?;
        let main = Self::map(main, (n, self.net.feature_dim(), fh, fw))?;
        Ok(SegFeatures { main, aux: None })
    }
    fn classify(&self, features: &Tensor) -> candle_core::Result<Tensor> {
        self.conv_seg(features, false)
    }
    fn classify_aux(&self, features: &Tensor) -> candle_core::Result<Tensor> {
        self.conv_seg(features, true)
    }
    fn feature_dim(&self) -> usize {
        self.net.feature_dim()
    }
    fn classes(&self) -> usize {
        self.shape.classes()
    }
    fn has_aux(&self) -> bool {
        self.net.aux
    }
    fn output_stride(&self) -> usize {
        self.shape.output_stride()
    }
    fn cost(&self, height: usize, width: usize) -> sar_models::Cost {
        self.shape.cost(height, width)
    }
    fn aux_params(&self) -> u64 {
        self.shape.aux_params()
    }
    fn logits(&self, images: &Tensor) -> candle_core::Result<Tensor> {
        if !self.disalign {
            return self.classify(&self.features(images, false)?.main);
        }
        let (logits, (n, fh, fw)) = self.eval_features(images, |f, main, size| {
            let z = self.net.classify(f.params, main.clone(), false)?;
            Ok((dfdx_stage::seg_disalign_logits(f, main, z)?.as_vec(), size))
        })?;
        Self::map(logits, (n, self.classes(), fh, fw))
    }
}

impl DfdxSegmenter<'_> {
    /// The evaluation-mode features F of candle images `[N, 3, H, W]` as rows, passed to
    /// `then` with the forward pass (whose variables the DisAlign head reads too) and
    /// F's (N, h, w).
    fn eval_features<R>(
        &self,
        images: &Tensor,
        then: impl FnOnce(
            &mut Forward<Cpu>,
            Rows<Cpu, NoneTape>,
            (usize, usize, usize),
        ) -> anyhow::Result<R>,
    ) -> candle_core::Result<R> {
        let (x, (n, c, h, w)) = Self::host(images)?;
        let mut params = self.params.lock().map_err(candle_err)?;
        let x = rows_of(params.device(), x, (n, c, h, w));
        let mut cache = self.cache.lock().map_err(candle_err)?;
        let mut f = Forward {
            params: &mut params,
            cache: &mut cache,
            train: false,
        };
        let out = self
            .net
            .features(&mut f, x, (n, h, w))
            .map_err(candle_err)?;
        let (fh, fw) = out.hw;
        then(&mut f, out.main, (n, fh, fw)).map_err(candle_err)
    }

    /// `conv_seg` (or the auxiliary one) on a candle map `[N, D, h, w]`.
    fn conv_seg(&self, features: &Tensor, aux: bool) -> candle_core::Result<Tensor> {
        let (v, (n, d, h, w)) = Self::host(features)?;
        let params = self.params.lock().map_err(candle_err)?;
        let rows = rows_of(params.device(), v, (n, d, h, w));
        let logits = self.net.classify(&params, rows, aux).map_err(candle_err)?;
        Self::map(logits.as_vec(), (n, self.classes(), h, w))
    }
}

/// `sar bench` on dfdx: one training step of `step` (forward in training mode, cross-entropy,
/// with `sar` SAR's step, backward, SGD) on its fixed random batch, from the same initial
/// weights as candle's runner (`crate::bench::cls_step_runner`).
pub(crate) fn cls_step_runner(
    step: &crate::bench::ClsStep,
    sar: bool,
) -> anyhow::Result<crate::bench::Runner> {
    let (cfg, setup) = step.setup(sar)?;
    let dev = Cpu::default();
    let (mut params, mut head) = on_dfdx(&setup.varmap, setup.head.as_ref(), None, &dev)?;
    let (x, y) = step.batch_data();
    let (batch, (c, h, w)) = (step.batch, step.shape);
    let x = rows_of(&dev, x, (batch, c, h, w));
    let targets = one_hot(&y, step.classes)?;
    let net = Classifier::new(dfdx_arch(cfg.model.classifier()?)?)?;
    let mut cache = GatherCache::default();
    let mut opt = Sgd::new(0.1, 0.9, 5e-4, false);
    Ok(Box::new(move || {
        let traced = x.trace(params.alloc_grads()?);
        let mut f = Forward {
            params: &mut params,
            cache: &mut cache,
            train: true,
        };
        let feats = net.features(&mut f, traced, (batch, h, w))?;
        let loss = match head.as_mut() {
            Some(hd) => {
                let logits = net.classify(&params, feats.retaped())?;
                let ce = cross_entropy(logits, targets.clone())?;
                ce + hd.step(&params, feats, &y, None)?.loss
            }
            None => cross_entropy(net.classify(&params, feats)?, targets.clone())?,
        };
        let mut grads = loss
            .try_backward()
            .map_err(|e| anyhow::anyhow!("dfdx backward: {e:?}"))?;
        opt.step(&mut params, &mut grads)?;
        Ok(())
    }))
}

/// A benchmark step's loss (its masks from a fixed generator) and backward: the gradients.
/// With a SAR head, its gate must have passed (the runner holds it open), so that L_p2a was
/// timed.
fn bench_gradients<D: SarDevice<f32>>(
    model: SegStepModel<'_, D>,
    batch: SegBatch<'_, D>,
) -> anyhow::Result<Gradients<f32, D>> {
    let sar = model.head.is_some();
    let step = seg_step_loss(model, batch, &mut sar_math::rng::SeededRng::new(1))?;
    anyhow::ensure!(
        !sar || (step.gate && step.valid > 0),
        "the benchmark's SAR gate did not pass"
    );
    step.loss
        .try_backward()
        .map_err(|e| anyhow::anyhow!("dfdx backward: {e:?}"))
}

/// `sar bench --workload seg-models` on dfdx: one training step of the network of `cfg`
/// (`classes` classes) on images `x` (NCHW) with labels `y` of size `(n, h, w)`, as the candle
/// runner's (`crate::bench::seg_models`): no dropout or stochastic depth, the auxiliary head
/// at its weight, AdamW (lr 6e-5, weight decay 0.01) over every variable, without SAR.
pub(crate) fn seg_model_runner(
    cfg: &TrainConfig,
    classes: usize,
    x: Vec<f32>,
    y: Vec<u8>,
    (n, h, w): (usize, usize, usize),
) -> anyhow::Result<crate::bench::Runner> {
    let setup = crate::seg::build_seg(cfg, classes)?;
    let dev = Cpu::default();
    let m = cfg.model.segmenter()?;
    let net = dfdx_segnet(m)?;
    let (mut params, _) = on_dfdx(&setup.varmap, None, None, &dev)?;
    drop(setup);
    let x = rows_of(&dev, x, (n, 3, h, w));
    let aux_weight = m.aux_weight;
    let mut cache = GatherCache::default();
    let mut opt = AdamW::new((0.9, 0.999), 1e-8);
    Ok(Box::new(move || {
        let model = SegStepModel {
            net: &net,
            params: &mut params,
            cache: &mut cache,
            head: None,
        };
        let batch = SegBatch {
            x: x.clone(),
            y: &y,
            size: (n, h, w),
            dropout: 0.0,
            aux_weight,
            drop_path: 0.0,
            poison_loss: false,
        };
        let mut grads = bench_gradients(model, batch)?;
        opt.step(&mut params, &mut grads, &|_| (6e-5, 0.01))?;
        Ok(())
    }))
}

/// `sar bench --workload seg-step` on dfdx: the candle benchmark's FCN-R18-d8 step (batch 2 of
/// 512² random images and labels over 19 classes, Dropout2d, logits resized to the labels,
/// cross-entropy + 0.4 × the auxiliary head's, SGD) from the same initial weights. With `sar`
/// the anchors' logits are shifted by 20·I as in candle's benchmark
/// ([`SarHead::set_anchor_logit_offset`]), so that the gate passes and L_p2a runs on every
/// timed step, as in a trained model.
pub(crate) fn seg_step_runner(sar: bool) -> anyhow::Result<crate::bench::Runner> {
    let cfg = crate::bench::seg_bench_config(sar)?;
    let setup = crate::seg::build_seg(&cfg, 19)?;
    let dev = Cpu::default();
    let net = dfdx_segnet(cfg.model.segmenter()?)?;
    let classifier = Some(net.classifier_name(false));
    let (mut params, mut head) = on_dfdx(&setup.varmap, setup.head.as_ref(), classifier, &dev)?;
    if let Some(h) = head.as_mut() {
        h.set_anchor_logit_offset(20.0);
    }
    let (x, y) = crate::bench::seg_bench_batch();
    let (n, h, w) = crate::bench::SEG_BENCH_SIZE;
    let x = rows_of(&dev, x, (n, 3, h, w));
    let mut cache = GatherCache::default();
    let mut opt = Sgd::new(0.01, 0.9, 5e-4, false);
    Ok(Box::new(move || {
        let model = SegStepModel {
            net: &net,
            params: &mut params,
            cache: &mut cache,
            head: head.as_mut(),
        };
        let batch = SegBatch {
            x: x.clone(),
            y: &y,
            size: (n, h, w),
            dropout: 0.1,
            aux_weight: 0.4,
            drop_path: 0.0,
            poison_loss: false,
        };
        let mut grads = bench_gradients(model, batch)?;
        opt.step(&mut params, &mut grads)?;
        Ok(())
    }))
}
