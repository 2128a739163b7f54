//! Classification training on dfdx (`run.backend = "dfdx"`, `sar train --backend dfdx`): the
//! small CNNs, ResNet-32 and torchvision's ResNet-18/50 with either stem (CUB-200 with
//! ImageNet weights included).
//!
//! The same run as on candle, step for step: the batch comes from the candle task's renderer
//! (augmentation, MixUp, fault injection), the weights start from the same seeded initialisers
//! (the candle model is built once and its variables copied), and the loop, schedule,
//! checkpoints, NaN policy, logs and reports are the shared ones in [`crate::run`]. What runs
//! on dfdx: the network (`sar_dfdx_models`, activations as NHWC rows), cross-entropy, SAR
//! (anchor embedding, L_aux through the shared `fc`, gate, EMA, L_p2a), backward on dfdx's
//! tape and SGD. Checkpoints hold the same tensor names and layouts as candle's, so either
//! backend resumes or evaluates the other's. Plots use the candle model with the dfdx weights
//! copied in.

use crate::cls::{evaluate_with, ClsBatch, ClsTask};
use crate::config::{DeviceKind, TrainConfig};
use crate::evaluation::TaskEvaluation;
use crate::run::{loss_parts, RunReport, StepCtx, StepReport, Trainee};
use crate::trainees::candle::{restore_vars, Task};
use anyhow::{bail, Context};
use candle_core::{DType, Device, Tensor};
use sar_dfdx::conv::{nchw_to_rows, GatherCache};
use sar_dfdx::dfdx::prelude::*;
use sar_dfdx::nn::{Params, SarHead, SarHeadConfig, Sgd};
use sar_dfdx::SarDevice;
use sar_dfdx_models::{cross_entropy, one_hot, Arch, Classifier, Depth, Forward, Stem};
use std::cell::RefCell;
use std::collections::HashMap;
use std::path::Path;

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

struct DfdxTrainee<D: SarDevice<f32>> {
    /// Data, normalisation, groups, the seeded initial weights, cost and plots.
    inner: ClsTask,
    net: Classifier,
    params: Params<D>,
    cache: RefCell<GatherCache<D>>,
    head: Option<SarHead<D>>,
    opt: Sgd<D>,
    /// `optim.lr` (one parameter group).
    base_lr: f64,
    pending: Option<Loss<D>>,
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

/// The variables of a candle [`crate::cls::Setup`] (its seeded initial weights) and its SAR
/// head's anchors, on dfdx.
fn on_dfdx<D: SarDevice<f32>>(
    setup: &crate::cls::Setup,
    device: &D,
) -> anyhow::Result<(Params<D>, Option<SarHead<D>>)> {
    let entries = setup
        .varmap
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
    let head = match &setup.head {
        Some(h) => Some(SarHead::new(
            device,
            &SarHeadConfig::new(*h.config(), h.classes(), h.dim()).regularizer(h.regularizer()),
            to_host(&h.buffers()?[0].1)?.1,
        )?),
        None => None,
    };
    Ok((params, head))
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
        let inner = ClsTask::new(cfg)?;
        let arch = dfdx_arch(cfg.model.classifier()?)?;
        let (params, head) = on_dfdx(&inner.setup, &device)?;
        let o = &cfg.optim;
        anyhow::ensure!(
            o.kind == crate::config::OptimizerKind::Sgd,
            "the dfdx backend trains with SGD only; optim.kind = \"adamw\" needs --backend candle"
        );
        anyhow::ensure!(
            o.custom_keys.is_empty(),
            "the dfdx backend has no parameter groups; optim.custom_keys needs --backend candle"
        );
        Ok(DfdxTrainee {
            base_lr: o.lr,
            inner,
            net: Classifier::new(arch)?,
            params,
            cache: RefCell::new(GatherCache::default()),
            head,
            opt: Sgd::new(o.lr, o.momentum, o.weight_decay, o.nesterov),
            pending: None,
        })
    }

    fn rows(
        &self,
        x: Vec<f32>,
        (n, c, h, w): (usize, usize, usize, usize),
    ) -> sar_dfdx::nn::Rows<D, NoneTape> {
        self.params
            .device()
            .tensor_from_vec(nchw_to_rows(&x, n, c, h, w), (n * h * w, c))
    }
}

impl<D: SarDevice<f32>> Trainee for DfdxTrainee<D> {
    fn train_len(&self) -> usize {
        self.inner.train_len()
    }
    fn train_counts(&self) -> &[u64] {
        self.inner.train_counts()
    }
    fn train_labels(&self) -> Option<Vec<usize>> {
        crate::trainees::candle::Task::train_labels(&self.inner)
    }

    fn forward(&mut self, ctx: &StepCtx) -> anyhow::Result<Result<StepReport, String>> {
        self.pending = None;
        let ClsBatch {
            x,
            labels,
            mix,
            shape,
        } = match self.inner.batch(ctx)? {
            Ok(b) => b,
            Err(msg) => return Ok(Err(msg)),
        };
        let (n, _, h, w) = shape;
        let classes = self.inner.data.train.classes();
        let x = self.rows(x, shape).traced(self.params.alloc_grads()?);
        let mut cache = self.cache.borrow_mut();
        let mut f = Forward {
            params: &mut self.params,
            cache: &mut cache,
            train: true,
        };
        let feats = self.net.features(&mut f, x, (n, h, w))?;
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
        let logits = self.net.classify(&self.params, ce_feats)?;
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
        let total = loss.as_vec()[0] as f64;
        Ok(match loss_parts(ctx.step, ce_value, 0.0, aux, p2a, total) {
            Err(msg) => Err(msg),
            Ok(parts) => {
                self.pending = Some(loss);
                Ok(StepReport {
                    parts,
                    gate,
                    valid,
                    images: n,
                })
            }
        })
    }

    fn update(&mut self, rate: &dyn Fn(f64) -> f64) -> anyhow::Result<()> {
        let loss = self
            .pending
            .take()
            .context("update without a forward pass")?;
        let mut grads = loss
            .try_backward()
            .map_err(|e| anyhow::anyhow!("dfdx backward: {e:?}"))?;
        self.opt.lr = rate(self.base_lr);
        self.opt.step(&mut self.params, &mut grads)?;
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
        for (name, v) in self.opt.buffers() {
            let shape = self.params.shape(&name)?.to_vec();
            out.push(host_tensor(&format!("optim.momentum.{name}"), &shape, v)?);
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
        let mut momentum = Vec::new();
        for (name, t) in tensors {
            if let Some(v) = name.strip_prefix("optim.momentum.") {
                momentum.push((v.to_string(), to_host(t)?.1));
            }
        }
        self.opt.load_buffers(&self.params, momentum)?;
        if let Some(h) = self.head.as_mut() {
            h.load_buffers(&|n| tensors.get(n).and_then(|t| to_host(t).ok()))?;
        }
        Ok(())
    }

    /// torchvision / timm weights (everything but `fc.`), read strictly by `sar-models`' loader
    /// into the seeded candle variables, then copied over: a file that does not fit the
    /// network changes nothing on either side.
    fn load_pretrained(
        &mut self,
        _: &TrainConfig,
        p: &Path,
    ) -> anyhow::Result<(usize, Vec<String>)> {
        let varmap = &self.inner.setup.varmap;
        let r = sar_models::pretrained::load_pretrained(varmap, p, &["fc."])?;
        let data = varmap.data().lock().expect("varmap lock");
        for name in &r.loaded {
            let var = data
                .get(name)
                .with_context(|| format!("pretrained: {name} is not a variable"))?;
            self.params.set(name, to_host(var.as_tensor())?.1)?;
        }
        Ok((r.loaded.len(), r.kept))
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
        let inner = &self.inner;
        // Evaluation mode changes nothing; a shallow copy of the variables lends `Forward`
        // its `&mut`.
        let mut params = self.params.clone();
        let mut cache = self.cache.borrow_mut();
        let e = evaluate_with(
            &inner.data.test,
            &inner.norm,
            &inner.groups,
            inner.cfg.eval.batch_size,
            &mut |x, shape| {
                let (n, _, h, w) = shape;
                let x = self.rows(x, shape);
                let mut f = Forward {
                    params: &mut params,
                    cache: &mut cache,
                    train: false,
                };
                let feats = self.net.features(&mut f, x, (n, h, w))?;
                let logits = self.net.classify(&params, feats)?;
                Ok(logits.as_vec())
            },
        )?;
        Ok(TaskEvaluation::Classification(e))
    }

    fn cost(&self) -> sar_models::Cost {
        self.inner.cost()
    }

    fn write_plots(&self, cfg: &TrainConfig, report: &RunReport) -> anyhow::Result<()> {
        // The candle model with the trained weights copied in draws the feature projection.
        let tensors: HashMap<String, Tensor> = self.state_tensors()?.into_iter().collect();
        restore_vars(&self.inner.setup.varmap, &tensors)?;
        let anchors = match &self.head {
            Some(h) if h.fully_initialized() => Some(h.buffers()[1].2.clone()),
            _ => None,
        };
        crate::cls::write_plots(
            cfg,
            report,
            self.inner.setup.model.as_ref(),
            &self.inner.data.test,
            &self.inner.norm,
            &self.inner.setup.device,
            anchors.as_deref(),
        )
    }
}

/// `sar bench --workload resnet32` on dfdx: one ResNet-32 training step (forward in training
/// mode, cross-entropy, with `sar` SAR's step, backward, SGD) on a fixed random batch of
/// `batch` 3×32×32 images and 100 classes, from the same initial weights as candle's runner.
pub(crate) fn resnet32_runner(sar: bool, batch: usize) -> anyhow::Result<crate::bench::Runner> {
    use sar_math::rng::SeededRng;
    let text = format!(
        "[data]\ndataset = \"digits\"\n[model]\narch = \"resnet32\"\n[sar]\nenabled = {sar}\n"
    );
    let cfg = crate::config::parse(&text, &[])?;
    let setup = crate::cls::build(&cfg, 3, 100)?;
    let dev = Cpu::default();
    let (mut params, mut head) = on_dfdx(&setup, &dev)?;
    let mut rng = SeededRng::new(11);
    let x: Vec<f32> = (0..batch * 3 * 32 * 32)
        .map(|_| rng.next_normal() as f32)
        .collect();
    let y: Vec<i64> = (0..batch).map(|_| (rng.next_u64() % 100) as i64).collect();
    let x = dev.tensor_from_vec(nchw_to_rows(&x, batch, 3, 32, 32), (batch * 32 * 32, 3));
    let targets = one_hot(&y, 100)?;
    let net = Classifier::new(Arch::CifarResNet { depth: 32 })?;
    let mut cache = GatherCache::default();
    let mut opt = Sgd::new(0.1, 0.9, 5e-4, false);
    Ok(Box::new(move || {
        let traced = x.trace(params.alloc_grads()?);
        let mut f = Forward {
            params: &mut params,
            cache: &mut cache,
            train: true,
        };
        let feats = net.features(&mut f, traced, (batch, 32, 32))?;
        let loss = match head.as_mut() {
            Some(h) => {
                let logits = net.classify(&params, feats.retaped())?;
                let ce = cross_entropy(logits, targets.clone())?;
                ce + h.step(&params, feats, &y, None)?.loss
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
