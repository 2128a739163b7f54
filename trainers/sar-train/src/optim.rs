//! The optimisers, with PyTorch's semantics, and learning-rate schedules.
//!
//! **SGD** (`torch.optim.SGD`, dampening 0): g ← ∇w + wd·w; b ← g on the first step, else
//! b ← μ·b + g; d ← g + μ·b (Nesterov) or b; w ← w − lr·d. The rule is defined once, by
//! [`sar_math::sgd::sgd_step`] (which sar-dfdx's optimiser applies too); see [`Sgd::step`].
//!
//! **AdamW** (`torch.optim.AdamW`, decoupled weight decay, no AMSGrad): w ← w·(1 − lr·wd);
//! m ← m + (1 − β1)(g − m); v ← β2·v + (1 − β2)g²; w ← w − lr/(1 − β1ᵗ) · m/(√v/√(1 − β2ᵗ) + ε),
//! defined by [`sar_math::adamw::adamw_step`]; see [`AdamW`].
//!
//! **Parameter groups** ([`CustomKey`]): mmcv's `paramwise_cfg.custom_keys`. Each parameter
//! takes the multipliers of the first key that is a substring of its name, keys tried longest
//! first and, at equal length, in alphabetical order (mmcv's `DefaultOptimizerConstructor`);
//! its initial rate is lr·`lr_mult` and its weight decay wd·`decay_mult`. The schedule is then
//! applied to each group's initial rate ([`Optimizer::step`] takes the schedule as a function
//! of the initial rate), as mmcv's `LrUpdaterHook` does per group.
//!
//! Schedules: constant, cosine (`lr₀·½(1 + cos(π t/T))`), step (×γ at given steps) and poly,
//! each after an optional [`Warmup`]: linear from lr₀/W to lr₀ over W steps (PyTorch-CIFAR
//! style: step t < W uses lr₀·(t+1)/W), or mmcv's linear warm-up by iterations with a ratio
//! (step t < W uses lr(t)·(1 − (1 − t/W)(1 − ratio)), lr(t) the schedule's rate).

use candle_core::{backprop::GradStore, CpuStorage, DType, Device, Result, Tensor, Var};
use rayon::prelude::*;
use sar_math::adamw::AdamWConfig;
use sar_math::sgd::SgdConfig;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// SGD over a set of variables.
pub struct Sgd {
    names: Vec<String>,
    vars: Vec<Var>,
    momentum_buffers: Vec<Option<StateBuf>>,
    /// Learning rate of the next step.
    pub lr: f64,
    /// μ.
    pub momentum: f64,
    /// Weight decay (L2, added to the gradient).
    pub weight_decay: f64,
    /// Nesterov momentum.
    pub nesterov: bool,
    /// Apply the rule as candle ops on CPU too (tests compare the two paths).
    device_ops: bool,
    scales: GroupScales,
}

/// Per variable, the factors of the rate (1 by default; MiSLAS's `lr_factor`, a
/// [`CustomKey`]'s `lr_mult`) and of the weight decay (a [`CustomKey`]'s `decay_mult`): what
/// both optimisers' parameter groups are.
#[derive(Debug, Clone)]
struct GroupScales {
    lr: Vec<f64>,
    decay: Vec<f64>,
}

impl GroupScales {
    fn new(n: usize) -> Self {
        GroupScales {
            lr: vec![1.0; n],
            decay: vec![1.0; n],
        }
    }

    /// Multiplies each variable's rate factor by `scale(name)`.
    fn scale_lr(&mut self, names: &[String], scale: impl Fn(&str) -> f64) {
        for (s, n) in self.lr.iter_mut().zip(names) {
            *s *= scale(n);
        }
    }

    /// Multiplies in each variable's [`CustomKey`] factors.
    fn apply_custom_keys(&mut self, names: &[String], keys: &BTreeMap<String, CustomKey>) {
        for ((l, d), n) in self.lr.iter_mut().zip(self.decay.iter_mut()).zip(names) {
            let k = custom_key(keys, n);
            *l *= k.lr_mult;
            *d *= k.decay_mult;
        }
    }
}

impl Sgd {
    /// An optimiser for `vars`.
    pub fn new(vars: Vec<Var>, lr: f64, momentum: f64, weight_decay: f64, nesterov: bool) -> Self {
        let named = vars
            .into_iter()
            .enumerate()
            .map(|(i, v)| (i.to_string(), v))
            .collect();
        Self::named(named, lr, momentum, weight_decay, nesterov)
    }

    /// An optimiser for named variables (the names key the momentum buffers in checkpoints).
    pub fn named(
        vars: Vec<(String, Var)>,
        lr: f64,
        momentum: f64,
        weight_decay: f64,
        nesterov: bool,
    ) -> Self {
        let n = vars.len();
        let (names, vars) = vars.into_iter().unzip();
        Sgd {
            names,
            vars,
            momentum_buffers: vec![None; n],
            lr,
            momentum,
            weight_decay,
            nesterov,
            device_ops: false,
            scales: GroupScales::new(n),
        }
    }

    /// Each variable steps with `lr · scale(name)` (times the factors already set).
    pub fn with_lr_scales(mut self, scale: impl Fn(&str) -> f64) -> Self {
        self.scales.scale_lr(&self.names, scale);
        self
    }

    /// Each variable takes its [`CustomKey`] multipliers of lr and weight decay.
    pub fn with_custom_keys(mut self, keys: &BTreeMap<String, CustomKey>) -> Self {
        self.scales.apply_custom_keys(&self.names, keys);
        self
    }

    /// The momentum buffers that exist, by variable name (copies: later steps do not change
    /// them).
    pub fn momentum_state(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out = Vec::new();
        for ((n, b), var) in self
            .names
            .iter()
            .zip(&self.momentum_buffers)
            .zip(&self.vars)
        {
            if let Some(b) = b {
                out.push((n.clone(), b.to_tensor(var)?));
            }
        }
        Ok(out)
    }

    /// Restores momentum buffers saved by [`Sgd::momentum_state`]; a variable without one
    /// starts fresh, as on PyTorch's first step. A buffer of the wrong shape or an unknown
    /// name is an error.
    pub fn load_momentum_state(&mut self, state: Vec<(String, Tensor)>) -> anyhow::Result<()> {
        for b in self.momentum_buffers.iter_mut() {
            *b = None;
        }
        for (name, t) in state {
            let i =
                self.names.iter().position(|n| *n == name).ok_or_else(|| {
                    anyhow::anyhow!("momentum buffer for unknown variable {name}")
                })?;
            anyhow::ensure!(
                t.dims() == self.vars[i].dims(),
                "momentum buffer {name} has shape {:?}, the variable {:?}",
                t.dims(),
                self.vars[i].dims()
            );
            self.momentum_buffers[i] = Some(StateBuf::for_var(&t, &self.vars[i], self.device_ops)?);
        }
        Ok(())
    }

    /// One update from `grads`; variables without a gradient are left alone.
    ///
    /// The rule is [`sar_math::sgd::sgd_step`]: on CPU (F32/F64) it is applied as that kernel
    /// over the host values; on other devices by `device_step`, the same rule as candle ops
    /// in the kernel's order (so both round alike; `tests::device_ops_follow_the_kernel`).
    pub fn step(&mut self, grads: &GradStore) -> Result<()> {
        self.step_scheduled(grads, &|initial| initial)
    }

    /// [`Sgd::step`] with each variable's rate `rate(lr · its scale)`: the schedule applied to
    /// its group's initial rate.
    pub fn step_scheduled(&mut self, grads: &GradStore, rate: &dyn Fn(f64) -> f64) -> Result<()> {
        for (((var, buf), scale), decay) in self
            .vars
            .iter()
            .zip(self.momentum_buffers.iter_mut())
            .zip(&self.scales.lr)
            .zip(&self.scales.decay)
        {
            let Some(grad) = grads.get(var.as_tensor()) else {
                continue;
            };
            let cfg = SgdConfig {
                lr: rate(self.lr * scale),
                momentum: self.momentum,
                weight_decay: self.weight_decay * decay,
                nesterov: self.nesterov,
            };
            if steps_on_host(var, self.device_ops) {
                host_sgd(&cfg, var, grad, buf)?
            } else {
                let mut b = buf.take().map(|b| b.to_tensor(var)).transpose()?;
                device_step(&cfg, var, grad, &mut b)?;
                *buf = b.map(StateBuf::Device);
            }
        }
        Ok(())
    }
}

/// [`sar_math::sgd::sgd_step`] on a CPU variable's values in place, with a host momentum
/// buffer (created zero; the kernel's `fresh` takes the gradient on the first step).
fn host_sgd(cfg: &SgdConfig, var: &Var, grad: &Tensor, buf: &mut Option<StateBuf>) -> Result<()> {
    let fresh = buf.is_none();
    let mut b = match buf.take() {
        Some(b) => b.into_host(var)?,
        None if cfg.momentum != 0.0 => StateBuf::zeros(var)?,
        None => StateBuf::zeros_empty(var)?,
    };
    match &mut b {
        StateBuf::F32(v) => in_place::<f32>(var, grad, vec![v.as_mut_slice()], &|w, g, ex| {
            sar_math::sgd::sgd_step(cfg, w, g, ex.pop().unwrap_or_default(), fresh)
        })?,
        StateBuf::F64(v) => in_place::<f64>(var, grad, vec![v.as_mut_slice()], &|w, g, ex| {
            sar_math::sgd::sgd_step(cfg, w, g, ex.pop().unwrap_or_default(), fresh)
        })?,
        StateBuf::Device(_) => candle_core::bail!("host SGD step with a device buffer"),
    }
    if cfg.momentum != 0.0 {
        *buf = Some(b);
    }
    Ok(())
}

/// [`sar_math::sgd::sgd_step`]'s rule as candle ops, for variables on other devices (CUDA):
/// g ← ∇w + w·wd; b ← g (fresh) or b·μ + g; d ← g + b·μ (Nesterov) or b; w ← w − d·lr.
fn device_step(cfg: &SgdConfig, var: &Var, grad: &Tensor, buf: &mut Option<Tensor>) -> Result<()> {
    // Detached: arithmetic on a variable records the op, so the momentum buffer would
    // otherwise chain every previous step's graph (memory growing without bound).
    let w = var.as_tensor().detach();
    let grad = grad.detach();
    let mut g = if cfg.weight_decay != 0.0 {
        (&grad + (&w * cfg.weight_decay)?)?
    } else {
        grad
    };
    if cfg.momentum != 0.0 {
        let b = match buf.take() {
            None => g.clone(),
            Some(b) => ((b * cfg.momentum)? + &g)?,
        };
        g = if cfg.nesterov {
            (&g + (&b * cfg.momentum)?)?
        } else {
            b.clone()
        };
        *buf = Some(b);
    }
    var.set(&(w - (g * cfg.lr)?)?)
}

/// mmcv's `custom_keys` entry: multipliers of the rate and the weight decay of the parameters
/// whose names contain the key (see the module docs for the matching rule).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CustomKey {
    /// Factor of the learning rate (1).
    pub lr_mult: f64,
    /// Factor of the weight decay (1).
    pub decay_mult: f64,
}

impl Default for CustomKey {
    fn default() -> Self {
        CustomKey {
            lr_mult: 1.0,
            decay_mult: 1.0,
        }
    }
}

/// The multipliers of parameter `name`: the first key contained in the name, longest keys
/// first, ties alphabetical (mmcv's rule); 1 and 1 when none matches.
pub fn custom_key(keys: &BTreeMap<String, CustomKey>, name: &str) -> CustomKey {
    // BTreeMap iterates alphabetically; a stable sort by descending length keeps that order
    // among keys of one length, as mmcv's `sorted(sorted(keys), key=len, reverse=True)`.
    let mut sorted: Vec<(&String, &CustomKey)> = keys.iter().collect();
    sorted.sort_by_key(|(k, _)| std::cmp::Reverse(k.len()));
    sorted
        .into_iter()
        .find(|(k, _)| name.contains(k.as_str()))
        .map_or_else(CustomKey::default, |(_, m)| *m)
}

/// AdamW over named variables ([`sar_math::adamw::adamw_step`]): per variable the moments m,
/// v and its own step count, as PyTorch keeps them.
pub struct AdamW {
    names: Vec<String>,
    vars: Vec<Var>,
    /// m and v, created at a variable's first step.
    moments: Vec<Option<(StateBuf, StateBuf)>>,
    steps: Vec<u64>,
    /// Initial learning rate (before the multipliers and the schedule).
    pub lr: f64,
    /// β1.
    pub beta1: f64,
    /// β2.
    pub beta2: f64,
    /// ε.
    pub eps: f64,
    /// Decoupled weight decay.
    pub weight_decay: f64,
    scales: GroupScales,
    device_ops: bool,
}

impl AdamW {
    /// An optimiser for named variables (the names key its state in checkpoints).
    pub fn named(
        vars: Vec<(String, Var)>,
        lr: f64,
        betas: (f64, f64),
        eps: f64,
        weight_decay: f64,
    ) -> Self {
        let n = vars.len();
        let (names, vars) = vars.into_iter().unzip();
        AdamW {
            names,
            vars,
            moments: vec![None; n],
            steps: vec![0; n],
            lr,
            beta1: betas.0,
            beta2: betas.1,
            eps,
            weight_decay,
            scales: GroupScales::new(n),
            device_ops: false,
        }
    }

    /// Each variable steps with `lr · scale(name)` (times the factors already set).
    pub fn with_lr_scales(mut self, scale: impl Fn(&str) -> f64) -> Self {
        self.scales.scale_lr(&self.names, scale);
        self
    }

    /// Each variable takes its [`CustomKey`] multipliers of lr and weight decay.
    pub fn with_custom_keys(mut self, keys: &BTreeMap<String, CustomKey>) -> Self {
        self.scales.apply_custom_keys(&self.names, keys);
        self
    }

    /// One update, each variable at rate `rate(lr · its scale)`; variables without a gradient
    /// are left alone and their step count does not move (PyTorch skips them too).
    pub fn step(&mut self, grads: &GradStore, rate: &dyn Fn(f64) -> f64) -> Result<()> {
        for i in 0..self.vars.len() {
            let var = &self.vars[i];
            let Some(grad) = grads.get(var.as_tensor()) else {
                continue;
            };
            self.steps[i] += 1;
            let cfg = AdamWConfig {
                lr: rate(self.lr * self.scales.lr[i]),
                beta1: self.beta1,
                beta2: self.beta2,
                eps: self.eps,
                weight_decay: self.weight_decay * self.scales.decay[i],
            };
            let step = self.steps[i];
            let moments = self.moments[i].take();
            self.moments[i] = Some(if steps_on_host(var, self.device_ops) {
                let (mut m, mut v) = match moments {
                    Some((m, v)) => (m.into_host(var)?, v.into_host(var)?),
                    None => (StateBuf::zeros(var)?, StateBuf::zeros(var)?),
                };
                adamw_host(&cfg, var, grad, (&mut m, &mut v), step)?;
                (m, v)
            } else {
                let (m, v) = match moments {
                    Some((m, v)) => (m.to_tensor(var)?, v.to_tensor(var)?),
                    None => {
                        let z = var.as_tensor().zeros_like()?.detach();
                        (z.clone(), z)
                    }
                };
                let (m, v) = adamw_device(&cfg, var, grad, (m, v), step)?;
                (StateBuf::Device(m), StateBuf::Device(v))
            });
        }
        Ok(())
    }

    /// The state by name: `exp_avg.{var}`, `exp_avg_sq.{var}` and `step.{var}` (the count as
    /// a one-element f64 tensor), for the variables that have stepped (copies: later steps do
    /// not change them).
    pub fn state(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out = Vec::new();
        for (((n, m), &t), var) in self
            .names
            .iter()
            .zip(&self.moments)
            .zip(&self.steps)
            .zip(&self.vars)
        {
            if let Some((m, v)) = m {
                out.push((format!("exp_avg.{n}"), m.to_tensor(var)?));
                out.push((format!("exp_avg_sq.{n}"), v.to_tensor(var)?));
                out.push((format!("step.{n}"), Tensor::new(&[t as f64], &Device::Cpu)?));
            }
        }
        Ok(out)
    }

    /// Restores [`AdamW::state`]; a variable without state starts fresh. An unknown name, a
    /// moment of the wrong shape, a missing half or a step count that is not a whole number
    /// ≥ 1 is an error.
    pub fn load_state(&mut self, state: Vec<(String, Tensor)>) -> anyhow::Result<()> {
        let n = self.vars.len();
        let (mut m, mut v, mut t) = (vec![None; n], vec![None; n], vec![None; n]);
        for (name, tensor) in state {
            let (kind, var) = name
                .split_once('.')
                .ok_or_else(|| anyhow::anyhow!("AdamW state `{name}` has no kind prefix"))?;
            let i =
                self.names.iter().position(|x| x == var).ok_or_else(|| {
                    anyhow::anyhow!("AdamW state `{name}` for an unknown variable")
                })?;
            match kind {
                "exp_avg" | "exp_avg_sq" => {
                    anyhow::ensure!(
                        tensor.dims() == self.vars[i].dims(),
                        "AdamW state {name} has shape {:?}, the variable {:?}",
                        tensor.dims(),
                        self.vars[i].dims()
                    );
                    let x = tensor
                        .to_dtype(self.vars[i].dtype())?
                        .to_device(self.vars[i].device())?;
                    if kind == "exp_avg" {
                        m[i] = Some(x);
                    } else {
                        v[i] = Some(x);
                    }
                }
                "step" => t[i] = Some(adamw_step_count(&name, &tensor)?),
                _ => anyhow::bail!("unknown AdamW state `{name}` (exp_avg, exp_avg_sq, step)"),
            }
        }
        for i in 0..n {
            let name = &self.names[i];
            match (m[i].take(), v[i].take(), t[i]) {
                (Some(a), Some(b), Some(c)) => {
                    let var = &self.vars[i];
                    self.moments[i] = Some((
                        StateBuf::for_var(&a, var, self.device_ops)?,
                        StateBuf::for_var(&b, var, self.device_ops)?,
                    ));
                    self.steps[i] = c;
                }
                (None, None, None) => {
                    self.moments[i] = None;
                    self.steps[i] = 0;
                }
                _ => anyhow::bail!(
                    "AdamW state of {name} is incomplete: exp_avg, exp_avg_sq and step go together"
                ),
            }
        }
        Ok(())
    }
}

/// An AdamW step count as checkpoints hold it (one f64 element): a whole number ≥ 1 and
/// below 2⁵³, else an error naming `name`.
pub(crate) fn adamw_step_count(name: &str, tensor: &Tensor) -> anyhow::Result<u64> {
    let c: Vec<f64> = tensor.to_dtype(DType::F64)?.flatten_all()?.to_vec1()?;
    anyhow::ensure!(
        c.len() == 1 && c[0] >= 1.0 && c[0].fract() == 0.0 && c[0] < 2f64.powi(53),
        "AdamW state {name} must hold one whole step count ≥ 1, got {c:?}"
    );
    Ok(c[0] as u64)
}

/// The error for an AdamW chunk without exactly its two moment chunks (cannot happen:
/// [`in_place`] gives every chunk one piece of each buffer).
fn two_moments() -> sar_math::SarError {
    sar_math::SarError::Shape {
        op: sar_math::Op::AdamW,
        what: "a chunk needs its two moment chunks",
    }
}

/// [`sar_math::adamw::adamw_step`] on a CPU variable's values and host moments, in place.
fn adamw_host(
    cfg: &AdamWConfig,
    var: &Var,
    grad: &Tensor,
    (m, v): (&mut StateBuf, &mut StateBuf),
    step: u64,
) -> Result<()> {
    match (m, v) {
        (StateBuf::F32(m), StateBuf::F32(v)) => {
            in_place::<f32>(var, grad, vec![m, v], &|w, g, ex| match ex.as_mut_slice() {
                [m, v] => sar_math::adamw::adamw_step(cfg, w, g, m, v, step),
                _ => Err(two_moments()),
            })
        }
        (StateBuf::F64(m), StateBuf::F64(v)) => {
            in_place::<f64>(var, grad, vec![m, v], &|w, g, ex| match ex.as_mut_slice() {
                [m, v] => sar_math::adamw::adamw_step(cfg, w, g, m, v, step),
                _ => Err(two_moments()),
            })
        }
        _ => candle_core::bail!("host AdamW step with moments of another dtype or device"),
    }
}

/// [`sar_math::adamw::adamw_step`]'s rule as candle ops (CUDA), in the kernel's order and with
/// its f64 scalars: affine ops multiply by a scalar rounded to the dtype, and the division by
/// √(1 − β2ᵗ) is a true division (candle's `tensor / f64` multiplies by the reciprocal).
fn adamw_device(
    cfg: &AdamWConfig,
    var: &Var,
    grad: &Tensor,
    (m, v): (Tensor, Tensor),
    step: u64,
) -> Result<(Tensor, Tensor)> {
    cfg.validate()
        .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
    let [decay, one_minus_b1, one_minus_b2, step_size, bc2_sqrt] =
        sar_math::adamw::step_scalars(cfg, step);
    let w = var.as_tensor().detach();
    let g = grad.detach();
    let w = if cfg.weight_decay != 0.0 {
        w.affine(decay, 0.0)?
    } else {
        w
    };
    let m = (&m + (&g - &m)?.affine(one_minus_b1, 0.0)?)?;
    let v = (v.affine(cfg.beta2, 0.0)? + g.sqr()?.affine(one_minus_b2, 0.0)?)?;
    let bc2 = Tensor::new(bc2_sqrt, var.device())?.to_dtype(var.dtype())?;
    let denom = v.sqrt()?.broadcast_div(&bc2)?.affine(1.0, cfg.eps)?;
    var.set(&(w - (&m / &denom)?.affine(step_size, 0.0)?)?)?;
    Ok((m, v))
}

/// Whether `var` steps through the sar-math kernels on host memory (CPU f32 or f64, unless the
/// tests ask for the device ops).
fn steps_on_host(var: &Var, device_ops: bool) -> bool {
    var.device().is_cpu() && !device_ops && matches!(var.dtype(), DType::F32 | DType::F64)
}

/// One variable's optimiser state (a momentum buffer, an Adam moment): host values beside a
/// CPU variable that steps on host memory, updated in place with it; a tensor on the
/// variable's device otherwise. Both hold the variable's shape, flattened on the host.
#[derive(Debug, Clone)]
enum StateBuf {
    F32(Vec<f32>),
    F64(Vec<f64>),
    Device(Tensor),
}

impl StateBuf {
    /// Zeros the size of `var` on the host.
    fn zeros(var: &Var) -> Result<Self> {
        let n = var.elem_count();
        match var.dtype() {
            DType::F32 => Ok(StateBuf::F32(vec![0.0; n])),
            DType::F64 => Ok(StateBuf::F64(vec![0.0; n])),
            d => candle_core::bail!("optimiser state on the host for a {d:?} variable"),
        }
    }

    /// An empty host buffer of `var`'s dtype (SGD without momentum keeps none).
    fn zeros_empty(var: &Var) -> Result<Self> {
        match var.dtype() {
            DType::F32 => Ok(StateBuf::F32(Vec::new())),
            DType::F64 => Ok(StateBuf::F64(Vec::new())),
            d => candle_core::bail!("optimiser state on the host for a {d:?} variable"),
        }
    }

    /// Saved or loaded state `t` in the form `var` steps with.
    fn for_var(t: &Tensor, var: &Var, device_ops: bool) -> Result<Self> {
        let t = t.to_dtype(var.dtype())?;
        if steps_on_host(var, device_ops) {
            StateBuf::Device(t).into_host(var)
        } else {
            Ok(StateBuf::Device(t.to_device(var.device())?))
        }
    }

    /// As host values of `var`'s dtype.
    fn into_host(self, var: &Var) -> Result<Self> {
        match self {
            StateBuf::Device(t) => {
                let t = t.to_dtype(var.dtype())?.flatten_all()?;
                match var.dtype() {
                    DType::F32 => Ok(StateBuf::F32(t.to_vec1()?)),
                    DType::F64 => Ok(StateBuf::F64(t.to_vec1()?)),
                    d => candle_core::bail!("optimiser state on the host for a {d:?} variable"),
                }
            }
            host => Ok(host),
        }
    }

    /// A tensor of `var`'s shape on its device (a copy of host values).
    fn to_tensor(&self, var: &Var) -> Result<Tensor> {
        match self {
            StateBuf::F32(v) => {
                Tensor::from_slice(v, var.shape(), &Device::Cpu)?.to_device(var.device())
            }
            StateBuf::F64(v) => {
                Tensor::from_slice(v, var.shape(), &Device::Cpu)?.to_device(var.device())
            }
            StateBuf::Device(t) => Ok(t.clone()),
        }
    }
}

/// A CPU float whose storage the in-place step can borrow mutably.
trait HostFloat: candle_core::WithDType + sar_math::Real + Send + Sync {
    fn storage_mut(s: &mut CpuStorage) -> Option<&mut Vec<Self>>;
}

impl HostFloat for f32 {
    fn storage_mut(s: &mut CpuStorage) -> Option<&mut Vec<Self>> {
        match s {
            CpuStorage::F32(v) => Some(v),
            _ => None,
        }
    }
}

impl HostFloat for f64 {
    fn storage_mut(s: &mut CpuStorage) -> Option<&mut Vec<Self>> {
        match s {
            CpuStorage::F64(v) => Some(v),
            _ => None,
        }
    }
}

/// Elements per parallel task of an in-place step.
const STEP_CHUNK: usize = 1 << 15;

/// A kernel over one chunk: the variable's values, its gradient, the state buffers' chunks.
type ChunkKernel<'k, F> = dyn Fn(&mut [F], &[F], &mut Vec<&mut [F]>) -> std::result::Result<(), sar_math::SarError>
    + Sync
    + 'k;

/// `kernel` over `var`'s own storage (no copy in or out), its gradient and `state` (each
/// empty or `var`'s length), in parallel chunks of [`STEP_CHUNK`]. The kernels are
/// element-wise, so the chunking does not change a bit of the result.
fn in_place<F: HostFloat>(
    var: &Var,
    grad: &Tensor,
    state: Vec<&mut [F]>,
    kernel: &ChunkKernel<'_, F>,
) -> Result<()> {
    let grad = grad.contiguous()?;
    var.as_tensor().inplace_op2(
        &grad,
        &InPlaceStep {
            state: std::sync::Mutex::new(Some(state)),
            kernel,
        },
    )
}

struct InPlaceStep<'a, F> {
    state: std::sync::Mutex<Option<Vec<&'a mut [F]>>>,
    kernel: &'a ChunkKernel<'a, F>,
}

impl<F: HostFloat> candle_core::InplaceOp2 for InPlaceStep<'_, F> {
    fn name(&self) -> &'static str {
        "sar-optimiser-step"
    }

    fn cpu_fwd(
        &self,
        dst: &mut CpuStorage,
        dst_l: &candle_core::Layout,
        src: &CpuStorage,
        src_l: &candle_core::Layout,
    ) -> Result<()> {
        let (Some((a, b)), Some((ga, gb))) =
            (dst_l.contiguous_offsets(), src_l.contiguous_offsets())
        else {
            candle_core::bail!("optimiser step on a non-contiguous variable or gradient");
        };
        let w = match F::storage_mut(dst) {
            Some(v) => &mut v[a..b],
            None => candle_core::bail!("optimiser step: the variable is not {:?}", F::DTYPE),
        };
        let g = &F::cpu_storage_as_slice(src)?[ga..gb];
        if g.len() != w.len() {
            candle_core::bail!(
                "optimiser step: gradient of {} for {} values",
                g.len(),
                w.len()
            );
        }
        let state = self
            .state
            .lock()
            .map_err(|_| candle_core::Error::Msg("optimiser state lock poisoned".into()))?
            .take()
            .unwrap_or_default();
        // Per chunk, each state buffer's matching chunk (an empty buffer gives empty chunks).
        let chunks = w.len().div_ceil(STEP_CHUNK).max(1);
        let mut per_chunk: Vec<Vec<&mut [F]>> = (0..chunks).map(|_| Vec::new()).collect();
        for buf in state {
            if buf.is_empty() {
                per_chunk.iter_mut().for_each(|c| c.push(&mut []));
            } else if buf.len() != w.len() {
                candle_core::bail!("optimiser state of {} for {} values", buf.len(), w.len());
            } else {
                for (c, part) in per_chunk.iter_mut().zip(buf.chunks_mut(STEP_CHUNK)) {
                    c.push(part);
                }
            }
        }
        w.par_chunks_mut(STEP_CHUNK)
            .zip(g.par_chunks(STEP_CHUNK))
            .zip(per_chunk.par_iter_mut())
            .try_for_each(|((w, g), ex)| (self.kernel)(w, g, ex))
            .map_err(|e| candle_core::Error::Msg(e.to_string()))
    }
}

/// The trainer's optimiser: `optim.kind`.
pub enum Optimizer {
    /// SGD.
    Sgd(Sgd),
    /// AdamW.
    AdamW(AdamW),
}

impl Optimizer {
    /// One update; each variable's rate is `rate(initial)`, `initial` its group's initial rate
    /// (lr × multipliers).
    pub fn step(&mut self, grads: &GradStore, rate: &dyn Fn(f64) -> f64) -> Result<()> {
        match self {
            Optimizer::Sgd(o) => o.step_scheduled(grads, rate),
            Optimizer::AdamW(o) => o.step(grads, rate),
        }
    }

    /// The state by name, without the checkpoint's `optim.` prefix (`momentum.{var}`;
    /// `exp_avg.{var}`, `exp_avg_sq.{var}`, `step.{var}`).
    pub fn state(&self) -> Result<Vec<(String, Tensor)>> {
        match self {
            Optimizer::Sgd(o) => Ok(o
                .momentum_state()?
                .into_iter()
                .map(|(n, t)| (format!("momentum.{n}"), t))
                .collect()),
            Optimizer::AdamW(o) => o.state(),
        }
    }

    /// Restores [`Optimizer::state`]; state of the other optimiser is an error.
    pub fn load_state(&mut self, state: Vec<(String, Tensor)>) -> anyhow::Result<()> {
        match self {
            Optimizer::Sgd(o) => {
                let mut momentum = Vec::with_capacity(state.len());
                for (n, t) in state {
                    let var = n.strip_prefix("momentum.").ok_or_else(|| {
                        anyhow::anyhow!(
                            "optimiser state `optim.{n}` is not SGD's (optim.momentum.*)"
                        )
                    })?;
                    momentum.push((var.to_string(), t));
                }
                o.load_momentum_state(momentum)
            }
            Optimizer::AdamW(o) => o.load_state(state),
        }
    }
}

/// A warm-up before the schedule.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Warmup {
    /// None.
    None,
    /// Linear from lr₀/W to lr₀: step t < W uses lr₀·(t+1)/W (PyTorch-CIFAR style).
    Linear {
        /// W.
        steps: usize,
    },
    /// mmcv's `warmup = "linear"`: step t < W uses lr(t)·(1 − (1 − t/W)(1 − ratio)), lr(t)
    /// the schedule's rate at t.
    LinearRatio {
        /// W.
        steps: usize,
        /// The factor at t = 0.
        ratio: f64,
    },
}

/// A learning-rate schedule over `total` steps.
#[derive(Debug, Clone, PartialEq)]
pub enum Schedule {
    /// lr₀ throughout.
    Constant,
    /// lr₀·½(1 + cos(π t/T)).
    Cosine,
    /// lr₀·½(1 + cos(π e/E)) with e = ⌊t / steps_per_epoch⌋ and E epochs: constant within an
    /// epoch (MiSLAS's stage 2, `adjust_learning_rate` once per epoch).
    CosineEpoch {
        /// Steps per epoch.
        steps_per_epoch: usize,
        /// E.
        epochs: usize,
    },
    /// lr₀·γ^(number of milestones ≤ t).
    Step {
        /// Steps at which the rate is multiplied by γ.
        milestones: Vec<usize>,
        /// γ.
        gamma: f64,
    },
    /// (lr₀ − min)·(1 − t/T)^power + min (mmsegmentation's poly).
    Poly {
        /// The exponent (0.9 in mmsegmentation).
        power: f64,
        /// The floor.
        min_lr: f64,
    },
}

/// The rate at step `t` of `total`, after `warmup`.
pub fn learning_rate(
    schedule: &Schedule,
    base: f64,
    t: usize,
    total: usize,
    warmup: Warmup,
) -> f64 {
    match warmup {
        Warmup::Linear { steps } if t < steps => base * (t + 1) as f64 / steps as f64,
        Warmup::LinearRatio { steps, ratio } if t < steps => {
            let k = (1.0 - t as f64 / steps as f64) * (1.0 - ratio);
            scheduled_rate(schedule, base, t, total) * (1.0 - k)
        }
        _ => scheduled_rate(schedule, base, t, total),
    }
}

/// The schedule's rate at step `t` of `total`, without warm-up.
fn scheduled_rate(schedule: &Schedule, base: f64, t: usize, total: usize) -> f64 {
    match schedule {
        Schedule::Constant => base,
        Schedule::Cosine => {
            base * 0.5 * (1.0 + (std::f64::consts::PI * t as f64 / total.max(1) as f64).cos())
        }
        Schedule::CosineEpoch {
            steps_per_epoch,
            epochs,
        } => {
            let e = t / (*steps_per_epoch).max(1);
            base * 0.5 * (1.0 + (std::f64::consts::PI * e as f64 / (*epochs).max(1) as f64).cos())
        }
        Schedule::Step { milestones, gamma } => {
            base * gamma.powi(milestones.iter().filter(|&&m| m <= t).count() as i32)
        }
        Schedule::Poly { power, min_lr } => {
            let left = 1.0 - (t as f64 / total.max(1) as f64).min(1.0);
            (base - min_lr) * left.powf(*power) + min_lr
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    #[test]
    fn cosine_by_epoch_is_constant_within_an_epoch() {
        let s = Schedule::CosineEpoch {
            steps_per_epoch: 3,
            epochs: 4,
        };
        let lr: Vec<f64> = (0..12)
            .map(|t| learning_rate(&s, 0.1, t, 12, Warmup::None))
            .collect();
        // e = 0, 1, 2, 3: 0.1·½(1 + cos(πe/4)) = 0.1, 0.0853…, 0.05, 0.0146…
        let want = [
            0.1,
            0.05 * (1.0 + std::f64::consts::FRAC_1_SQRT_2),
            0.05,
            0.05 * (1.0 - std::f64::consts::FRAC_1_SQRT_2),
        ];
        for (t, v) in lr.iter().enumerate() {
            assert!((v - want[t / 3]).abs() < 1e-15, "step {t}: {v}");
        }
    }

    #[test]
    fn a_variable_steps_with_its_own_lr_factor() {
        // L = a + b: gradient 1 each; lr 0.1, no momentum or decay; b at 0.2 × lr.
        let a = Var::from_tensor(&Tensor::new(&[1.0f64], &Device::Cpu).unwrap()).unwrap();
        let b = Var::from_tensor(&Tensor::new(&[1.0f64], &Device::Cpu).unwrap()).unwrap();
        let mut opt = Sgd::named(
            vec![("a".into(), a.clone()), ("b".into(), b.clone())],
            0.1,
            0.0,
            0.0,
            false,
        )
        .with_lr_scales(|n| if n == "b" { 0.2 } else { 1.0 });
        let grads = (a.as_tensor() + b.as_tensor())
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        opt.step(&grads).unwrap();
        let v = |x: &Var| x.as_tensor().to_vec1::<f64>().unwrap()[0];
        assert!((v(&a) - 0.9).abs() < 1e-15 && (v(&b) - 0.98).abs() < 1e-15);
    }

    /// Two steps by hand, w₀ = 1, ∇ = 2w (L = w²), lr 0.1, μ 0.9, wd 0.1.
    /// Step 1: g = 2 + 0.1 = 2.1, b = 2.1, Nesterov d = 2.1 + 0.9·2.1 = 3.99, w = 1 − 0.399 = 0.601.
    /// Step 2: g = 1.202 + 0.0601 = 1.2621, b = 0.9·2.1 + 1.2621 = 3.1521,
    ///         d = 1.2621 + 0.9·3.1521 = 4.09899, w = 0.601 − 0.409899 = 0.191101.
    #[test]
    fn nesterov_with_weight_decay_by_hand() {
        let w = Var::from_tensor(&Tensor::new(&[1.0f64], &Device::Cpu).unwrap()).unwrap();
        let mut opt = Sgd::new(vec![w.clone()], 0.1, 0.9, 0.1, true);
        for want in [0.601, 0.191101] {
            let grads = w
                .as_tensor()
                .sqr()
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            opt.step(&grads).unwrap();
            let got = w.as_tensor().to_vec1::<f64>().unwrap()[0];
            assert!((got - want).abs() < 1e-12, "{got} vs {want}");
        }
        // The buffers carry no op graph: before the fix, each momentum buffer was the result
        // of an op over the previous one, so memory grew with every step.
        for (_, b) in opt.momentum_state().unwrap() {
            assert!(!b.track_op(), "momentum buffer records an op graph");
        }
        // Plain momentum (PyTorch's default): step 1 is w − lr·g.
        let v = Var::from_tensor(&Tensor::new(&[1.0f64], &Device::Cpu).unwrap()).unwrap();
        let mut opt = Sgd::new(vec![v.clone()], 0.1, 0.9, 0.0, false);
        let grads = v
            .as_tensor()
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        opt.step(&grads).unwrap();
        assert!((v.as_tensor().to_vec1::<f64>().unwrap()[0] - 0.8).abs() < 1e-15);
    }

    /// The candle-ops path (CUDA's) and the kernel path agree bit for bit on CPU, in f32 and
    /// f64, over momentum, Nesterov and weight decay.
    #[test]
    fn device_ops_follow_the_kernel() {
        for dtype in [DType::F32, DType::F64] {
            for (mu, wd, nesterov) in [(0.0, 0.0, false), (0.9, 0.0, false), (0.9, 5e-4, true)] {
                let init: Vec<f64> = (0..7).map(|i| (i as f64 * 0.7).sin()).collect();
                let make = || {
                    let t = Tensor::new(init.as_slice(), &Device::Cpu).unwrap();
                    Var::from_tensor(&t.to_dtype(dtype).unwrap()).unwrap()
                };
                let (a, b) = (make(), make());
                let mut host = Sgd::new(vec![a.clone()], 0.1, mu, wd, nesterov);
                let mut ops = Sgd::new(vec![b.clone()], 0.1, mu, wd, nesterov);
                ops.device_ops = true;
                for _ in 0..3 {
                    for (opt, v) in [(&mut host, &a), (&mut ops, &b)] {
                        let loss = (v.as_tensor().sqr().unwrap().sum_all().unwrap() * 0.5).unwrap();
                        opt.step(&loss.backward().unwrap()).unwrap();
                    }
                    let host_w = a.as_tensor().to_dtype(DType::F64).unwrap().to_vec1::<f64>();
                    let ops_w = b.as_tensor().to_dtype(DType::F64).unwrap().to_vec1::<f64>();
                    assert_eq!(host_w.unwrap(), ops_w.unwrap(), "{dtype:?} μ {mu} wd {wd}");
                }
            }
        }
    }

    #[test]
    fn schedules() {
        assert_eq!(
            learning_rate(&Schedule::Constant, 0.1, 5, 10, Warmup::None),
            0.1
        );
        assert!((learning_rate(&Schedule::Cosine, 0.1, 5, 10, Warmup::None) - 0.05).abs() < 1e-15);
        assert_eq!(
            learning_rate(&Schedule::Cosine, 0.1, 0, 10, Warmup::None),
            0.1
        );
        let step = Schedule::Step {
            milestones: vec![160, 180],
            gamma: 0.1,
        };
        assert_eq!(
            learning_rate(&step, 0.1, 159, 200, Warmup::Linear { steps: 5 }),
            0.1
        );
        assert!(
            (learning_rate(&step, 0.1, 160, 200, Warmup::Linear { steps: 5 }) - 0.01).abs() < 1e-15
        );
        assert!(
            (learning_rate(&step, 0.1, 199, 200, Warmup::Linear { steps: 5 }) - 0.001).abs()
                < 1e-15
        );
        // Warm-up: 5 steps from lr/5 to lr.
        assert!(
            (learning_rate(&step, 0.1, 0, 200, Warmup::Linear { steps: 5 }) - 0.02).abs() < 1e-15
        );
        assert_eq!(
            learning_rate(&step, 0.1, 4, 200, Warmup::Linear { steps: 5 }),
            0.1
        );
        // Poly 0.9 to 1e-4 (mmseg): half-way (0.01 − 1e-4)·0.5^0.9 + 1e-4.
        let poly = Schedule::Poly {
            power: 0.9,
            min_lr: 1e-4,
        };
        let want = (0.01 - 1e-4) * 0.5f64.powf(0.9) + 1e-4;
        assert!((learning_rate(&poly, 0.01, 50, 100, Warmup::None) - want).abs() < 1e-15);
        assert_eq!(learning_rate(&poly, 0.01, 100, 100, Warmup::None), 1e-4);
    }

    #[test]
    fn momentum_state_round_trips_by_name() {
        let w = Var::from_tensor(&Tensor::new(&[1.0f64, 2.0], &Device::Cpu).unwrap()).unwrap();
        let u = Var::from_tensor(&Tensor::new(&[3.0f64], &Device::Cpu).unwrap()).unwrap();
        let vars = vec![("w".to_string(), w.clone()), ("u".to_string(), u.clone())];
        let mut opt = Sgd::named(vars.clone(), 0.1, 0.9, 0.0, false);
        let grads = w
            .as_tensor()
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        opt.step(&grads).unwrap();
        let state = opt.momentum_state().unwrap();
        assert_eq!(state.len(), 1, "only w had a gradient");
        assert_eq!(state[0].0, "w");
        let mut fresh = Sgd::named(vars, 0.1, 0.9, 0.0, false);
        fresh.load_momentum_state(state.clone()).unwrap();
        assert_eq!(
            fresh.momentum_state().unwrap()[0]
                .1
                .to_vec1::<f64>()
                .unwrap(),
            state[0].1.to_vec1::<f64>().unwrap()
        );
        let bad = vec![("nope".to_string(), state[0].1.clone())];
        assert!(fresh.load_momentum_state(bad).is_err());
        let bad = vec![("u".to_string(), state[0].1.clone())];
        assert!(fresh
            .load_momentum_state(bad)
            .unwrap_err()
            .to_string()
            .contains("shape"));
    }
    /// Three steps of L = Σ w³/3 (∇ = w²) against `torch.optim.AdamW` in f64 (lr 0.01,
    /// betas (0.9, 0.99), eps 1e-6, weight decay 0.1), values printed by PyTorch 2.x.
    #[test]
    fn adamw_matches_pytorch() {
        let w =
            Var::from_tensor(&Tensor::new(&[0.5f64, -1.25, 2.0], &Device::Cpu).unwrap()).unwrap();
        let mut opt = AdamW::named(vec![("w".into(), w.clone())], 0.01, (0.9, 0.99), 1e-6, 0.1);
        for _ in 0..3 {
            let loss = (w.as_tensor().powf(3.0).unwrap().sum_all().unwrap() / 3.0).unwrap();
            opt.step(&loss.backward().unwrap(), &|lr| lr).unwrap();
        }
        let got = w.as_tensor().to_vec1::<f64>().unwrap();
        for (g, want) in
            got.iter()
                .zip([0.468577217271321, -1.2762349821057788, 1.9640471736670049])
        {
            assert!((g - want).abs() < 1e-14, "{got:?}");
        }
        let state = opt.state().unwrap();
        let get = |k: &str| {
            let t = &state.iter().find(|(n, _)| n == k).unwrap().1;
            t.to_vec1::<f64>().unwrap()
        };
        for (g, want) in get("exp_avg.w").iter().zip([
            0.06476122305878498,
            0.4298173229248672,
            1.070156509106109,
        ]) {
            assert!((g - want).abs() < 1e-14);
        }
        for (g, want) in get("exp_avg_sq.w").iter().zip([
            0.0017074846452363862,
            0.07459180777084001,
            0.46391026100743776,
        ]) {
            assert!((g - want).abs() < 1e-15);
        }
        assert_eq!(get("step.w"), vec![3.0]);
    }

    /// The candle-ops path (CUDA's) and the kernel path agree bit for bit on CPU.
    #[test]
    fn adamw_device_ops_follow_the_kernel() {
        for dtype in [DType::F32, DType::F64] {
            for wd in [0.0, 0.05] {
                let init: Vec<f64> = (0..7).map(|i| (i as f64 * 0.7).sin()).collect();
                let make = || {
                    let t = Tensor::new(init.as_slice(), &Device::Cpu).unwrap();
                    Var::from_tensor(&t.to_dtype(dtype).unwrap()).unwrap()
                };
                let (a, b) = (make(), make());
                let mut host =
                    AdamW::named(vec![("a".into(), a.clone())], 0.01, (0.9, 0.999), 1e-8, wd);
                let mut ops =
                    AdamW::named(vec![("b".into(), b.clone())], 0.01, (0.9, 0.999), 1e-8, wd);
                ops.device_ops = true;
                for _ in 0..4 {
                    for (opt, v) in [(&mut host, &a), (&mut ops, &b)] {
                        let loss = v.as_tensor().powf(4.0).unwrap().sum_all().unwrap();
                        opt.step(&loss.backward().unwrap(), &|lr| lr * 0.5).unwrap();
                    }
                    let host_w = a.as_tensor().to_dtype(DType::F64).unwrap().to_vec1::<f64>();
                    let ops_w = b.as_tensor().to_dtype(DType::F64).unwrap().to_vec1::<f64>();
                    assert_eq!(host_w.unwrap(), ops_w.unwrap(), "{dtype:?} wd {wd}");
                }
            }
        }
    }

    /// The in-place host steps over a variable of several parallel chunks (and a ragged last
    /// one) give the bits of the sar-math kernels run once over the whole slice, for AdamW and
    /// SGD with momentum; the saved state is a copy that later steps leave alone.
    #[test]
    fn in_place_steps_over_chunks_equal_one_kernel_call() {
        let n = 2 * STEP_CHUNK + 1_234;
        let w0: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin()).collect();
        let g0: Vec<f32> = (0..n).map(|i| (i as f32 * 0.11).cos()).collect();
        let grad = Tensor::from_slice(&g0, n, &Device::Cpu).unwrap();
        // d(Σ w·g)/dw = g: the gradient store holds exactly g0.
        let grads_for = |v: &Var| {
            (v.as_tensor() * &grad)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap()
        };
        let var = Var::from_slice(&w0, n, &Device::Cpu).unwrap();
        let mut adam = AdamW::named(
            vec![("w".into(), var.clone())],
            0.01,
            (0.9, 0.999),
            1e-8,
            0.05,
        );
        let cfg = AdamWConfig {
            lr: 0.01,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.05,
        };
        let (mut w, mut m, mut v) = (w0.clone(), vec![0.0f32; n], vec![0.0f32; n]);
        for step in 1..=3 {
            adam.step(&grads_for(&var), &|lr| lr).unwrap();
            sar_math::adamw::adamw_step(&cfg, &mut w, &g0, &mut m, &mut v, step).unwrap();
            assert_eq!(
                var.as_tensor().to_vec1::<f32>().unwrap(),
                w,
                "AdamW step {step}"
            );
        }
        let saved = adam.state().unwrap();
        let exp_avg = saved
            .iter()
            .find(|(k, _)| k == "exp_avg.w")
            .unwrap()
            .1
            .clone();
        assert_eq!(exp_avg.to_vec1::<f32>().unwrap(), m);
        adam.step(&grads_for(&var), &|lr| lr).unwrap();
        assert_eq!(
            exp_avg.to_vec1::<f32>().unwrap(),
            m,
            "the saved moment changed"
        );

        let var = Var::from_slice(&w0, n, &Device::Cpu).unwrap();
        let mut sgd = Sgd::named(vec![("w".into(), var.clone())], 0.1, 0.9, 1e-4, true);
        let cfg = SgdConfig {
            lr: 0.1,
            momentum: 0.9,
            weight_decay: 1e-4,
            nesterov: true,
        };
        let (mut w, mut b) = (w0.clone(), vec![0.0f32; n]);
        for step in 0..3 {
            sgd.step(&grads_for(&var)).unwrap();
            sar_math::sgd::sgd_step(&cfg, &mut w, &g0, &mut b, step == 0).unwrap();
            assert_eq!(
                var.as_tensor().to_vec1::<f32>().unwrap(),
                w,
                "SGD step {step}"
            );
        }
        let buf = sgd.momentum_state().unwrap()[0].1.clone();
        sgd.step(&grads_for(&var)).unwrap();
        assert_eq!(buf.to_vec1::<f32>().unwrap(), b, "the saved buffer changed");
    }

    /// Saving the state after 2 steps and loading it into a fresh optimiser gives the same
    /// bits after 2 more as 4 uninterrupted steps; bad state is named.
    #[test]
    fn adamw_state_resumes_exactly() {
        let make =
            || Var::from_tensor(&Tensor::new(&[0.3f32, -0.8, 1.1], &Device::Cpu).unwrap()).unwrap();
        let loss = |v: &Var| {
            v.as_tensor()
                .sqr()
                .unwrap()
                .sin()
                .unwrap()
                .sum_all()
                .unwrap()
        };
        let new = |v: &Var| {
            AdamW::named(
                vec![("w".into(), v.clone())],
                0.05,
                (0.9, 0.999),
                1e-8,
                0.01,
            )
        };
        let (a, b) = (make(), make());
        let mut straight = new(&a);
        for _ in 0..4 {
            straight
                .step(&loss(&a).backward().unwrap(), &|lr| lr)
                .unwrap();
        }
        let mut first = new(&b);
        for _ in 0..2 {
            first.step(&loss(&b).backward().unwrap(), &|lr| lr).unwrap();
        }
        let saved = first.state().unwrap();
        let mut resumed = new(&b);
        resumed.load_state(saved.clone()).unwrap();
        for _ in 0..2 {
            resumed
                .step(&loss(&b).backward().unwrap(), &|lr| lr)
                .unwrap();
        }
        assert_eq!(
            a.as_tensor().to_vec1::<f32>().unwrap(),
            b.as_tensor().to_vec1::<f32>().unwrap()
        );
        let mut fresh = new(&b);
        let missing: Vec<_> = saved
            .iter()
            .filter(|(n, _)| !n.starts_with("step."))
            .cloned()
            .collect();
        assert!(fresh
            .load_state(missing)
            .unwrap_err()
            .to_string()
            .contains("incomplete"));
        let unknown = vec![("exp_avg.nope".to_string(), saved[0].1.clone())];
        assert!(fresh
            .load_state(unknown)
            .unwrap_err()
            .to_string()
            .contains("unknown variable"));
        let mut sgd_state = Optimizer::AdamW(new(&b));
        let e = sgd_state
            .load_state(vec![("momentum.w".to_string(), saved[0].1.clone())])
            .unwrap_err();
        assert!(e.to_string().contains("unknown AdamW state"), "{e}");
    }

    /// mmcv's matching: longest key first, then alphabetical; a substring of the full name.
    #[test]
    fn custom_keys_follow_mmcv() {
        let keys: BTreeMap<String, CustomKey> = [
            (
                "head",
                CustomKey {
                    lr_mult: 10.0,
                    decay_mult: 1.0,
                },
            ),
            (
                "norm",
                CustomKey {
                    lr_mult: 1.0,
                    decay_mult: 0.0,
                },
            ),
            (
                "head.norm",
                CustomKey {
                    lr_mult: 2.0,
                    decay_mult: 0.5,
                },
            ),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        assert_eq!(
            custom_key(&keys, "decode_head.conv_seg.weight").lr_mult,
            10.0
        );
        assert_eq!(
            custom_key(&keys, "backbone.layers.0.1.0.norm1.weight").decay_mult,
            0.0
        );
        assert_eq!(custom_key(&keys, "decode_head.norm.bias").lr_mult, 2.0);
        // "head" and "norm" have one length: "head" wins alphabetically.
        assert_eq!(custom_key(&keys, "head_norm").lr_mult, 10.0);
        assert_eq!(
            custom_key(&keys, "backbone.layers.0.2.weight"),
            CustomKey::default()
        );
    }

    /// SGD with groups: lr×10 and no decay where the keys say; the rate function sees each
    /// group's initial rate.
    #[test]
    fn sgd_takes_custom_keys() {
        let a = Var::from_tensor(&Tensor::new(&[1.0f64], &Device::Cpu).unwrap()).unwrap();
        let b = Var::from_tensor(&Tensor::new(&[1.0f64], &Device::Cpu).unwrap()).unwrap();
        let keys: BTreeMap<String, CustomKey> = [(
            "head".to_string(),
            CustomKey {
                lr_mult: 10.0,
                decay_mult: 0.0,
            },
        )]
        .into();
        let mut opt = Sgd::named(
            vec![
                ("backbone.a".into(), a.clone()),
                ("head.b".into(), b.clone()),
            ],
            0.01,
            0.0,
            0.5,
            false,
        )
        .with_custom_keys(&keys);
        let grads = (a.as_tensor() + b.as_tensor())
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        // Poly-like floor: rate(initial) = initial/2 + 0.001.
        opt.step_scheduled(&grads, &|lr| lr / 2.0 + 0.001).unwrap();
        let v = |x: &Var| x.as_tensor().to_vec1::<f64>().unwrap()[0];
        // a: lr 0.006, g = 1 + 0.5 = 1.5; b: lr 0.051, g = 1.
        assert!((v(&a) - (1.0 - 0.006 * 1.5)).abs() < 1e-15, "{}", v(&a));
        assert!((v(&b) - (1.0 - 0.051)).abs() < 1e-15, "{}", v(&b));
    }

    /// mmcv's linear warm-up with a ratio: t = 0 gives lr(0)·ratio, t = W/2 about half of
    /// lr(W/2), and from W on the schedule alone.
    #[test]
    fn linear_ratio_warmup() {
        let poly = Schedule::Poly {
            power: 1.0,
            min_lr: 0.0,
        };
        let w = Warmup::LinearRatio {
            steps: 10,
            ratio: 1e-6,
        };
        assert!((learning_rate(&poly, 6e-5, 0, 100, w) - 6e-5 * 1e-6).abs() < 1e-20);
        let half = 6e-5 * 0.95 * (1.0 - 0.5 * (1.0 - 1e-6));
        assert!((learning_rate(&poly, 6e-5, 5, 100, w) - half).abs() < 1e-18);
        assert_eq!(
            learning_rate(&poly, 6e-5, 10, 100, w),
            learning_rate(&poly, 6e-5, 10, 100, Warmup::None)
        );
    }
}
