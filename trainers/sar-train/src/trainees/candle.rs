//! The candle trainee: any candle `Task` (classification, segmentation) with its optimiser
//! (SGD or AdamW), as the loop ([`crate::run`]) sees it through `Trainee`.
//!
//! A task renders its batch and computes the loss (task loss plus SAR's λ1·L_aux + λ2·L_p2a)
//! in candle's graph; this trainee keeps that loss until the loop asks for the update, then
//! runs candle's backward and one optimiser step. Checkpoint state: every variable, the
//! optimiser's state (SGD: `optim.momentum.<name>`; AdamW: `optim.exp_avg.<name>`,
//! `optim.exp_avg_sq.<name>`, `optim.step.<name>`) and the SAR head's buffers, under the names
//! every backend shares.

use crate::config::{DeviceKind, OptimizerKind, TrainConfig};
use crate::evaluation::TaskEvaluation;
use crate::optim::{AdamW, Optimizer, Sgd};
use crate::run::{loss_parts, LossParts, RunReport, StepCtx, StepReport, Trainee};
use anyhow::{ensure, Context};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use sar_candle::SarHead;
use std::collections::HashMap;
use std::path::Path;

/// The candle device of `run.device`.
pub(crate) fn device(kind: DeviceKind) -> anyhow::Result<Device> {
    match kind {
        DeviceKind::Cpu => Ok(Device::Cpu),
        DeviceKind::Cuda => Device::new_cuda(0).context("cannot open CUDA device 0"),
    }
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
        set_var(name, var, t)?;
    }
    Ok(())
}

/// `var` ← `t` (moved to its device and dtype) after checking the shapes.
fn set_var(name: &str, var: &candle_core::Var, t: &Tensor) -> anyhow::Result<()> {
    ensure!(
        t.dims() == var.dims(),
        "checkpoint tensor {name} has shape {:?}, the model needs {:?} (another model?)",
        t.dims(),
        var.dims()
    );
    var.set(&t.to_device(var.device())?.to_dtype(var.dtype())?)?;
    Ok(())
}

/// `model.pretrained` into `varmap`: a classifier's weights but `fc.`; a whole segmentation
/// checkpoint but its classifiers (the class count may differ); or an ImageNet backbone under
/// the segmentation backbone. Strict: a file that does not fit changes nothing.
pub(crate) fn load_pretrained_into(
    varmap: &VarMap,
    cfg: &TrainConfig,
    p: &Path,
) -> anyhow::Result<sar_models::pretrained::LoadReport> {
    use sar_models::pretrained::{load_backbone, load_pretrained, tensor_names};
    Ok(if !cfg.data.dataset.is_segmentation() {
        load_pretrained(varmap, p, &["fc."])?
    } else if tensor_names(p)?.iter().any(|n| n.starts_with("backbone.")) {
        load_pretrained(
            varmap,
            p,
            &["decode_head.conv_seg.", "auxiliary_head.conv_seg."],
        )?
    } else {
        load_backbone(varmap, p)?
    })
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
    /// The class of each training sample, for a class-balanced sampler (none: the task has
    /// no single class per sample).
    fn train_labels(&self) -> Option<Vec<usize>> {
        None
    }
    /// Whether the optimiser updates variable `name` (a second stage freezes most).
    fn trainable(&self, _name: &str) -> bool {
        true
    }
    /// The factor of the scheduled learning rate for variable `name`.
    fn lr_scale(&self, _name: &str) -> f64 {
        1.0
    }
}

/// Sets every variable of `varmap` that `tensors` has (shapes equal) and returns the names
/// it lacks, which must all be of parts a first stage may not have (SAR's `sar.*`, the
/// second stage's `stage.*`); any other missing variable is an error.
pub fn init_vars(
    varmap: &VarMap,
    tensors: &std::collections::HashMap<String, Tensor>,
) -> anyhow::Result<(usize, Vec<String>)> {
    let data = varmap.data().lock().expect("varmap lock");
    let (mut loaded, mut fresh) = (0, Vec::new());
    for (name, var) in data.iter() {
        let Some(t) = tensors.get(name) else {
            ensure!(
                name.starts_with("sar.") || name.starts_with("stage."),
                "the checkpoint lacks {name} (another model?)"
            );
            fresh.push(name.clone());
            continue;
        };
        set_var(name, var, t)?;
        loaded += 1;
    }
    fresh.sort();
    Ok((loaded, fresh))
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

/// The outcome of a step whose whole loss is one term (a second stage): poisoned when the
/// fault injection asks, reported as the cross-entropy part.
pub(crate) fn finish_single_loss(
    ctx: &StepCtx,
    loss: Tensor,
    images: usize,
) -> anyhow::Result<StepOutcome> {
    let loss = if ctx.poison_loss {
        (loss * f64::INFINITY)?
    } else {
        loss
    };
    let value = loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
    finish_step(ctx.step, loss, value, 0.0, 0.0, 0.0, false, 0, images)
}

/// A candle `Task` with its optimiser and the pending loss.
pub(crate) struct CandleTrainee {
    task: Box<dyn Task>,
    opt: Optimizer,
    pending: Option<Tensor>,
}

impl CandleTrainee {
    /// `task` trained by the optimiser `cfg.optim` says (every variable but the BatchNorm
    /// running statistics), with its parameter groups.
    pub(crate) fn new(task: Box<dyn Task>, cfg: &TrainConfig) -> anyhow::Result<Self> {
        let mut named: Vec<(String, candle_core::Var)> = task
            .varmap()
            .data()
            .lock()
            .expect("varmap lock")
            .iter()
            .filter(|(n, _)| !sar_models::params::is_running_stat(n) && task.trainable(n))
            .map(|(n, v)| (n.clone(), v.clone()))
            .collect();
        named.sort_by(|a, b| a.0.cmp(&b.0));
        let o = &cfg.optim;
        let opt = match o.kind {
            OptimizerKind::Sgd => Optimizer::Sgd(
                Sgd::named(named, o.lr, o.momentum, o.weight_decay, o.nesterov)
                    .with_lr_scales(|n| task.lr_scale(n))
                    .with_custom_keys(&o.custom_keys),
            ),
            OptimizerKind::AdamW => Optimizer::AdamW(
                AdamW::named(named, o.lr, (o.betas[0], o.betas[1]), o.eps, o.weight_decay)
                    .with_lr_scales(|n| task.lr_scale(n))
                    .with_custom_keys(&o.custom_keys),
            ),
        };
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
    fn update(&mut self, rate: &dyn Fn(f64) -> f64) -> anyhow::Result<()> {
        let loss = self
            .pending
            .take()
            .context("update without a forward pass")?;
        let grads = loss.backward()?;
        self.opt.step(&grads, rate)?;
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
        for (n, t) in self.opt.state()? {
            tensors.push((format!("optim.{n}"), t));
        }
        if let Some(h) = self.task.head() {
            tensors.extend(h.buffers()?);
        }
        Ok(tensors)
    }
    fn load_state(&mut self, tensors: &HashMap<String, Tensor>) -> anyhow::Result<()> {
        let dev = self.task.device().clone();
        restore_vars(self.task.varmap(), tensors)?;
        let mut optim = Vec::new();
        for (name, t) in tensors {
            if let Some(v) = name.strip_prefix("optim.") {
                optim.push((v.to_string(), t.to_device(&dev)?));
            }
        }
        self.opt.load_state(optim)?;
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
        let r = load_pretrained_into(self.task.varmap(), cfg, p)?;
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
    fn train_labels(&self) -> Option<Vec<usize>> {
        self.task.train_labels()
    }
    fn init_weights(
        &mut self,
        tensors: &HashMap<String, Tensor>,
    ) -> anyhow::Result<(usize, Vec<String>)> {
        init_vars(self.task.varmap(), tensors)
    }
    fn cost(&self) -> sar_models::Cost {
        self.task.cost()
    }
    fn write_plots(&self, cfg: &TrainConfig, report: &RunReport) -> anyhow::Result<()> {
        self.task.write_plots(cfg, report)
    }
}
