//! SGD with momentum, Nesterov and weight decay, and learning-rate schedules, with PyTorch's
//! semantics (`torch.optim.SGD`, dampening 0):
//!
//! g ← ∇w + wd·w; b ← g on the first step, else b ← μ·b + g; d ← g + μ·b (Nesterov) or b;
//! w ← w − lr·d. The rule is defined once, by [`sar_math::sgd::sgd_step`] (which sar-dfdx's
//! optimiser applies too); see [`Sgd::step`].
//!
//! Schedules: constant, cosine (`lr₀·½(1 + cos(π t/T))`) and step (×γ at given steps), each
//! after an optional linear warm-up from lr₀/warm-up to lr₀ (PyTorch-CIFAR style: step t < W
//! uses lr₀·(t+1)/W).

use candle_core::{backprop::GradStore, DType, Device, Result, Tensor, Var};
use sar_math::sgd::SgdConfig;

/// SGD over a set of variables.
pub struct Sgd {
    names: Vec<String>,
    vars: Vec<Var>,
    momentum_buffers: Vec<Option<Tensor>>,
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
    /// Per variable, the factor of `lr` it steps with (1 by default; MiSLAS's `lr_factor`).
    lr_scales: Vec<f64>,
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
            lr_scales: vec![1.0; n],
        }
    }

    /// Each variable steps with `lr · scale(name)`.
    pub fn with_lr_scales(mut self, scale: impl Fn(&str) -> f64) -> Self {
        self.lr_scales = self.names.iter().map(|n| scale(n)).collect();
        self
    }

    /// The momentum buffers that exist, by variable name.
    pub fn momentum_state(&self) -> Vec<(String, Tensor)> {
        self.names
            .iter()
            .zip(&self.momentum_buffers)
            .filter_map(|(n, b)| b.as_ref().map(|b| (n.clone(), b.clone())))
            .collect()
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
            self.momentum_buffers[i] = Some(t.to_dtype(self.vars[i].dtype())?);
        }
        Ok(())
    }

    /// One update from `grads`; variables without a gradient are left alone.
    ///
    /// The rule is [`sar_math::sgd::sgd_step`]: on CPU (F32/F64) it is applied as that kernel
    /// over the host values; on other devices by `device_step`, the same rule as candle ops
    /// in the kernel's order (so both round alike; `tests::device_ops_follow_the_kernel`).
    pub fn step(&mut self, grads: &GradStore) -> Result<()> {
        for ((var, buf), scale) in self
            .vars
            .iter()
            .zip(self.momentum_buffers.iter_mut())
            .zip(&self.lr_scales)
        {
            let Some(grad) = grads.get(var.as_tensor()) else {
                continue;
            };
            let cfg = SgdConfig {
                lr: self.lr * scale,
                momentum: self.momentum,
                weight_decay: self.weight_decay,
                nesterov: self.nesterov,
            };
            match var.dtype() {
                DType::F32 if var.device().is_cpu() && !self.device_ops => {
                    host_step::<f32>(&cfg, var, grad, buf)?
                }
                DType::F64 if var.device().is_cpu() && !self.device_ops => {
                    host_step::<f64>(&cfg, var, grad, buf)?
                }
                _ => device_step(&cfg, var, grad, buf)?,
            }
        }
        Ok(())
    }
}

/// [`sar_math::sgd::sgd_step`] on a CPU variable's host values; the momentum buffer is kept
/// as a tensor (for checkpoints).
fn host_step<F: candle_core::WithDType + sar_math::Real + Default>(
    cfg: &SgdConfig,
    var: &Var,
    grad: &Tensor,
    buf: &mut Option<Tensor>,
) -> Result<()> {
    let shape = var.shape().clone();
    let mut w: Vec<F> = var.as_tensor().flatten_all()?.to_vec1()?;
    let g: Vec<F> = grad.flatten_all()?.to_vec1()?;
    let fresh = buf.is_none();
    let mut b: Vec<F> = match buf.as_ref() {
        Some(b) => b.flatten_all()?.to_vec1()?,
        None if cfg.momentum != 0.0 => vec![F::default(); w.len()],
        None => Vec::new(),
    };
    sar_math::sgd::sgd_step(cfg, &mut w, &g, &mut b, fresh)
        .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
    if cfg.momentum != 0.0 {
        *buf = Some(Tensor::from_vec(b, &shape, &Device::Cpu)?);
    }
    var.set(&Tensor::from_vec(w, &shape, &Device::Cpu)?)
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

/// The rate at step `t` of `total`, with `warmup` linear warm-up steps.
pub fn learning_rate(schedule: &Schedule, base: f64, t: usize, total: usize, warmup: usize) -> f64 {
    if t < warmup {
        return base * (t + 1) as f64 / warmup as f64;
    }
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
        let lr: Vec<f64> = (0..12).map(|t| learning_rate(&s, 0.1, t, 12, 0)).collect();
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
        for (_, b) in opt.momentum_state() {
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
        assert_eq!(learning_rate(&Schedule::Constant, 0.1, 5, 10, 0), 0.1);
        assert!((learning_rate(&Schedule::Cosine, 0.1, 5, 10, 0) - 0.05).abs() < 1e-15);
        assert_eq!(learning_rate(&Schedule::Cosine, 0.1, 0, 10, 0), 0.1);
        let step = Schedule::Step {
            milestones: vec![160, 180],
            gamma: 0.1,
        };
        assert_eq!(learning_rate(&step, 0.1, 159, 200, 5), 0.1);
        assert!((learning_rate(&step, 0.1, 160, 200, 5) - 0.01).abs() < 1e-15);
        assert!((learning_rate(&step, 0.1, 199, 200, 5) - 0.001).abs() < 1e-15);
        // Warm-up: 5 steps from lr/5 to lr.
        assert!((learning_rate(&step, 0.1, 0, 200, 5) - 0.02).abs() < 1e-15);
        assert_eq!(learning_rate(&step, 0.1, 4, 200, 5), 0.1);
        // Poly 0.9 to 1e-4 (mmseg): half-way (0.01 − 1e-4)·0.5^0.9 + 1e-4.
        let poly = Schedule::Poly {
            power: 0.9,
            min_lr: 1e-4,
        };
        let want = (0.01 - 1e-4) * 0.5f64.powf(0.9) + 1e-4;
        assert!((learning_rate(&poly, 0.01, 50, 100, 0) - want).abs() < 1e-15);
        assert_eq!(learning_rate(&poly, 0.01, 100, 100, 0), 1e-4);
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
        let state = opt.momentum_state();
        assert_eq!(state.len(), 1, "only w had a gradient");
        assert_eq!(state[0].0, "w");
        let mut fresh = Sgd::named(vars, 0.1, 0.9, 0.0, false);
        fresh.load_momentum_state(state.clone()).unwrap();
        assert_eq!(
            fresh.momentum_state()[0].1.to_vec1::<f64>().unwrap(),
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
}
