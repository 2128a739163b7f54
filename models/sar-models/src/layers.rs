//! The layers the models are built from, with their cost.
//!
//! Layout NCHW throughout. A [`Conv`] is `candle_nn::Conv2d` plus its geometry (for
//! [`Conv::cost`]); a [`Bn`] is `candle_nn::BatchNorm` (eps 1e-5, momentum 0.1, PyTorch's
//! unbiased running variance) whose running statistics are variables in the model's
//! [`candle_nn::VarMap`]; a [`Fc`] is `candle_nn::Linear`.

use crate::params::{Init, InitScheme, Scope};
use crate::{Cost, Result};
use candle_core::{Module, ModuleT, Tensor, Var};
use candle_nn::{BatchNorm, Conv2d, Conv2dConfig, Linear};
use sar_candle::ops::{batch_norm, residual};
use std::sync::{Arc, Mutex};

/// How a conv weight is initialised.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConvInit {
    /// Kaiming normal, fan_out = out·k² (torchvision's ResNets).
    KaimingFanOut,
    /// Kaiming normal, fan_in = in·k² (the CIFAR ResNets of LDAM/MiSLAS).
    KaimingFanIn,
    /// PyTorch's `nn.Conv2d` default: uniform in ±1/√(in·k²).
    TorchDefault,
}

impl ConvInit {
    /// The layer's own choice `own`, unless the model's scheme overrides it.
    fn under(own: ConvInit, scheme: InitScheme) -> ConvInit {
        match scheme {
            InitScheme::Reference => own,
            InitScheme::TorchDefault => ConvInit::TorchDefault,
            InitScheme::KaimingFanOut => ConvInit::KaimingFanOut,
            InitScheme::KaimingFanIn => ConvInit::KaimingFanIn,
        }
    }
}

/// The geometry of a square 2-D convolution. [`ConvSpec::new`] gives stride 1 and the padding
/// that keeps the size; the builder methods change one field each.
///
/// ```
/// use sar_models::layers::ConvSpec;
/// let c = ConvSpec::new(64, 128, 3).stride(2);
/// assert_eq!((c.in_ch, c.out_ch, c.kernel, c.stride, c.padding, c.dilation), (64, 128, 3, 2, 1, 1));
/// assert_eq!(ConvSpec::new(8, 8, 3).dilation(4).padding, 4);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConvSpec {
    /// Input channels.
    pub in_ch: usize,
    /// Output channels.
    pub out_ch: usize,
    /// Kernel size k (k × k).
    pub kernel: usize,
    /// Stride.
    pub stride: usize,
    /// Zero padding on each side.
    pub padding: usize,
    /// Distance between taps (atrous convolution; 1 is a plain convolution).
    pub dilation: usize,
}

impl ConvSpec {
    /// `in_ch → out_ch` with a `kernel × kernel` kernel, stride 1, padding `(k − 1) / 2`.
    pub fn new(in_ch: usize, out_ch: usize, kernel: usize) -> Self {
        ConvSpec {
            in_ch,
            out_ch,
            kernel,
            stride: 1,
            padding: kernel.saturating_sub(1) / 2,
            dilation: 1,
        }
    }

    /// With stride `stride`.
    pub fn stride(self, stride: usize) -> Self {
        ConvSpec { stride, ..self }
    }

    /// With padding `padding`.
    pub fn padding(self, padding: usize) -> Self {
        ConvSpec { padding, ..self }
    }

    /// With taps `dilation` apart and the padding `dilation · (k − 1) / 2` that keeps the size.
    pub fn dilation(self, dilation: usize) -> Self {
        ConvSpec {
            dilation: dilation.max(1),
            padding: dilation * self.kernel.saturating_sub(1) / 2,
            ..self
        }
    }
}

/// A 2-D convolution without bias.
pub struct Conv {
    conv: Conv2d,
    spec: ConvSpec,
}

impl Conv {
    /// `weight` of shape `[out, in, k, k]` in scope `p`.
    pub fn new(p: &Scope, spec: ConvSpec, how: ConvInit) -> Result<Self> {
        let ConvSpec {
            in_ch,
            out_ch,
            kernel,
            ..
        } = spec;
        let (fan_in, fan_out) = (
            (in_ch * kernel * kernel) as f64,
            (out_ch * kernel * kernel) as f64,
        );
        let init = match ConvInit::under(how, p.scheme()) {
            ConvInit::KaimingFanOut => Init::Normal((2.0 / fan_out).sqrt()),
            ConvInit::KaimingFanIn => Init::Normal((2.0 / fan_in).sqrt()),
            ConvInit::TorchDefault => Init::Uniform(1.0 / fan_in.sqrt()),
        };
        let w = p.get_or_insert("weight", &[out_ch, in_ch, kernel, kernel], init)?;
        let cfg = Conv2dConfig {
            padding: spec.padding,
            stride: spec.stride,
            dilation: spec.dilation,
            groups: 1,
            cudnn_fwd_algo: None,
        };
        Ok(Conv {
            conv: Conv2d::new(w, None, cfg),
            spec,
        })
    }

    /// The geometry.
    pub fn spec(&self) -> ConvSpec {
        self.spec
    }

    /// Output size of an input of `h × w`.
    pub fn out_size(&self, h: usize, w: usize) -> (usize, usize) {
        let ConvSpec {
            kernel,
            stride,
            padding,
            dilation,
            ..
        } = self.spec;
        let extent = dilation * (kernel - 1) + 1;
        let o = |x: usize| (x + 2 * padding).saturating_sub(extent) / stride + 1;
        (o(h), o(w))
    }

    /// Cost on an `h × w` input, and the output size.
    pub fn cost(&self, h: usize, w: usize) -> (Cost, usize, usize) {
        let (oh, ow) = self.out_size(h, w);
        let k2 = (self.spec.kernel * self.spec.kernel) as u64;
        let params = self.spec.out_ch as u64 * self.spec.in_ch as u64 * k2;
        (
            Cost {
                params,
                macs: params * (oh * ow) as u64,
            },
            oh,
            ow,
        )
    }

    /// Applies the convolution.
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        sar_candle::ops::conv::conv2d(
            x,
            self.conv.weight(),
            self.spec.stride,
            self.spec.padding,
            self.spec.dilation,
        )
    }
}

/// BatchNorm over the channel axis; on the CPU in f32 the fused ops of [`sar_candle::ops::batch_norm`],
/// elsewhere candle-nn's BatchNorm.
pub struct Bn {
    bn: BatchNorm,
    weight: Tensor,
    bias: Tensor,
    running_mean: Var,
    running_var: Var,
    channels: usize,
}

use sar_math::batch_norm::{EPS as BN_EPS, MOMENTUM as BN_MOMENTUM};

impl Bn {
    /// `{weight,bias,running_mean,running_var}` in scope `p`.
    pub fn new(p: &Scope, channels: usize) -> Result<Self> {
        let weight = p.get_or_insert("weight", &[channels], Init::Const(1.0))?;
        let bias = p.get_or_insert("bias", &[channels], Init::Const(0.0))?;
        let mean = p.get_or_insert("running_mean", &[channels], Init::Const(0.0))?;
        let var = p.get_or_insert("running_var", &[channels], Init::Const(1.0))?;
        Ok(Bn {
            bn: BatchNorm::new(
                channels,
                mean.clone(),
                var.clone(),
                weight.clone(),
                bias.clone(),
                BN_EPS,
            )?,
            weight,
            bias,
            // Variables share storage with the tensors in the VarMap.
            running_mean: Var::from_tensor(&mean)?,
            running_var: Var::from_tensor(&var)?,
            channels,
        })
    }

    /// Parameters (weight and bias).
    pub fn cost(&self) -> Cost {
        Cost {
            params: 2 * self.channels as u64,
            macs: 0,
        }
    }

    /// Normalises with batch statistics (`train`, updating the running ones) or the running
    /// statistics.
    pub fn forward(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        self.run(x, train, false)
    }

    /// `relu(forward(x))`, fused on the CPU.
    pub fn forward_relu(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        self.run(x, train, true)
    }

    fn run(&self, x: &Tensor, train: bool, relu: bool) -> candle_core::Result<Tensor> {
        if !batch_norm::fused_ok(x) {
            let y = self.bn.forward_t(x, train)?;
            return if relu { y.relu() } else { Ok(y) };
        }
        let x = x.contiguous()?;
        if !train {
            let inv = (self.running_var.as_tensor().detach() + BN_EPS)?
                .sqrt()?
                .recip()?;
            let scale = (&self.weight * inv)?;
            let shift = (&self.bias - (self.running_mean.as_tensor().detach() * &scale)?)?;
            return x.apply_op3_no_bwd(&scale, &shift, &batch_norm::ChannelAffine { relu });
        }
        let stats = Arc::new(Mutex::new(batch_norm::BatchStats::default()));
        let op = batch_norm::BnTrain {
            eps: BN_EPS,
            relu,
            stats: stats.clone(),
        };
        let y = x.apply_op3(&self.weight, &self.bias, op)?;
        let st = stats.lock().expect("stats lock");
        self.update_running(&st)?;
        Ok(y)
    }

    /// The running averages after a training batch with statistics `st` (PyTorch's rule:
    /// momentum 0.1, unbiased variance).
    fn update_running(&self, st: &batch_norm::BatchStats) -> candle_core::Result<()> {
        let m = st.count as f64;
        let unbias = if m > 1.0 { m / (m - 1.0) } else { 1.0 };
        let rm: Vec<f32> = self.running_mean.as_tensor().to_vec1()?;
        let rv: Vec<f32> = self.running_var.as_tensor().to_vec1()?;
        let new_mean: Vec<f32> = rm
            .iter()
            .zip(&st.mean)
            .map(|(&r, &b)| ((1.0 - BN_MOMENTUM) * r as f64 + BN_MOMENTUM * b) as f32)
            .collect();
        let new_var: Vec<f32> = rv
            .iter()
            .zip(&st.var)
            .map(|(&r, &b)| ((1.0 - BN_MOMENTUM) * r as f64 + BN_MOMENTUM * b * unbias) as f32)
            .collect();
        let dev = self.running_mean.device();
        self.running_mean
            .set(&Tensor::from_vec(new_mean, self.channels, dev)?)?;
        self.running_var
            .set(&Tensor::from_vec(new_var, self.channels, dev)?)
    }
}

/// In training on the CPU in f32, `relu(BN_L(conv_L(…relu(BN_1(conv_1(x)))…)) + S(x))` as one
/// op ([`sar_candle::ops::residual`], which keeps the block's intermediate tensors out of
/// candle's backward), updating each BatchNorm's running statistics; `None` elsewhere
/// (evaluation, other devices and dtypes), where the caller runs the layers one by one.
pub fn residual_train(
    x: &Tensor,
    layers: &[(&Conv, &Bn)],
    shortcut: residual::Shortcut,
    train: bool,
) -> candle_core::Result<Option<Tensor>> {
    residual_chain_train(x, &[(layers, shortcut)], train)
}

/// [`residual_train`] for blocks run one after another, as one op: candle then also gives no
/// `zeros_like` + `add` to the gradients between the blocks.
pub fn residual_chain_train(
    x: &Tensor,
    blocks: &[(&[(&Conv, &Bn)], residual::Shortcut)],
    train: bool,
) -> candle_core::Result<Option<Tensor>> {
    if !train || !batch_norm::fused_ok(x) {
        return Ok(None);
    }
    let ops: Vec<residual::ResidualBlock<'_>> = blocks
        .iter()
        .map(|(layers, shortcut)| residual::ResidualBlock {
            layers: layers
                .iter()
                .map(|(conv, bn)| residual::ConvBn {
                    weight: conv.conv.weight(),
                    gamma: &bn.weight,
                    beta: &bn.bias,
                    conv: sar_candle::ops::conv::Conv2dCpu {
                        stride: conv.spec.stride,
                        padding: conv.spec.padding,
                        dilation: conv.spec.dilation,
                    },
                })
                .collect(),
            shortcut: *shortcut,
        })
        .collect();
    let (out, stats) = residual::residual_blocks_train(x, &ops, BN_EPS)?;
    for ((layers, _), block_stats) in blocks.iter().zip(&stats) {
        for ((_, bn), st) in layers.iter().zip(block_stats) {
            bn.update_running(st)?;
        }
    }
    Ok(Some(out))
}

/// How a fully connected layer's weight is initialised (the bias always PyTorch's default).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FcInit {
    /// PyTorch's `nn.Linear` default: uniform in ±1/√fan_in.
    Default,
    /// Kaiming normal, fan_in (the CIFAR ResNets of LDAM/MiSLAS).
    KaimingFanIn,
}

/// A fully connected layer with bias.
pub struct Fc {
    linear: Linear,
    inputs: usize,
    outputs: usize,
}

impl Fc {
    /// `weight` `[out, in]` and `bias` `[out]` in scope `p`, PyTorch's default initialisation
    /// (or Kaiming normal fan_in for the weight with [`FcInit::KaimingFanIn`]).
    pub fn new(p: &Scope, inputs: usize, outputs: usize, how: FcInit) -> Result<Self> {
        let bound = 1.0 / (inputs as f64).sqrt();
        let how = match p.scheme() {
            InitScheme::Reference => how,
            InitScheme::TorchDefault | InitScheme::KaimingFanOut => FcInit::Default,
            InitScheme::KaimingFanIn => FcInit::KaimingFanIn,
        };
        let w_init = match how {
            FcInit::KaimingFanIn => Init::Normal((2.0 / inputs as f64).sqrt()),
            FcInit::Default => Init::Uniform(bound),
        };
        let w = p.get_or_insert("weight", &[outputs, inputs], w_init)?;
        let b = p.get_or_insert("bias", &[outputs], Init::Uniform(bound))?;
        Ok(Fc {
            linear: Linear::new(w, Some(b)),
            inputs,
            outputs,
        })
    }

    /// Parameters and multiply-adds per row.
    pub fn cost(&self) -> Cost {
        let w = (self.inputs * self.outputs) as u64;
        Cost {
            params: w + self.outputs as u64,
            macs: w,
        }
    }

    /// `x Wᵀ + b`.
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.linear.forward(x)
    }
}

/// Global average pooling `[N, C, H, W] → [N, C]`.
pub fn global_avg_pool(x: &Tensor) -> candle_core::Result<Tensor> {
    x.mean((2, 3))
}

#[cfg(test)]
mod tests {
    use super::{residual_train, Bn, Conv, ConvInit, ConvSpec};
    use crate::params::Scope;
    use crate::test_util::randn;
    use candle_core::{DType, Device, ModuleT, Tensor, Var};
    use candle_nn::VarMap;
    use sar_candle::ops::residual::Shortcut;

    fn max_abs(t: &Tensor) -> f64 {
        t.abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap()
            .to_scalar()
            .unwrap()
    }

    /// The fused op (f32) against candle-nn's BatchNorm + ReLU in f64: outputs, all three
    /// gradients, the running statistics after two steps, and evaluation mode.
    #[test]
    fn fused_batch_norm_matches_candle_nn_in_f64() {
        let dev = Device::Cpu;
        for (shape, relu) in [
            ((4usize, 3usize, 5usize, 3usize), true),
            ((2, 4, 1, 1), false),
            ((3, 2, 4, 4), false),
        ] {
            let varmap = VarMap::new();
            let init = Scope::new(&varmap, dev.clone(), DType::F32, 1);
            let bn = Bn::new(&init.pp("bn"), shape.1).unwrap();
            // Non-trivial γ, β.
            let data = varmap.data().lock().unwrap();
            data["bn.weight"]
                .set(&Tensor::new(&[1.5f32, 0.5, -0.7, 2.0][..shape.1], &dev).unwrap())
                .unwrap();
            data["bn.bias"]
                .set(&Tensor::new(&[0.1f32, -0.2, 0.3, 0.0][..shape.1], &dev).unwrap())
                .unwrap();
            let (gamma, beta) = (data["bn.weight"].clone(), data["bn.bias"].clone());
            drop(data);
            let g64 = Var::from_tensor(&gamma.as_tensor().to_dtype(DType::F64).unwrap()).unwrap();
            let b64 = Var::from_tensor(&beta.as_tensor().to_dtype(DType::F64).unwrap()).unwrap();
            let reference = candle_nn::BatchNorm::new(
                shape.1,
                Tensor::zeros(shape.1, DType::F64, &dev).unwrap(),
                Tensor::ones(shape.1, DType::F64, &dev).unwrap(),
                g64.as_tensor().clone(),
                b64.as_tensor().clone(),
                1e-5,
            )
            .unwrap();
            for step in 0..2 {
                let x = Var::from_tensor(&((randn(shape) * 2.0).unwrap() + step as f64).unwrap())
                    .unwrap();
                let x64 = Var::from_tensor(&x.as_tensor().to_dtype(DType::F64).unwrap()).unwrap();
                let up = randn(shape).to_dtype(DType::F64).unwrap();
                let y = if relu {
                    bn.forward_relu(x.as_tensor(), true)
                } else {
                    bn.forward(x.as_tensor(), true)
                }
                .unwrap();
                let mut y64 = reference.forward_t(x64.as_tensor(), true).unwrap();
                if relu {
                    y64 = y64.relu().unwrap();
                }
                let err = max_abs(&(y.to_dtype(DType::F64).unwrap() - &y64).unwrap());
                assert!(
                    err < 1e-5 * max_abs(&y64).max(1.0),
                    "{shape:?} step {step}: {err}"
                );
                let g = (y.to_dtype(DType::F64).unwrap() * &up)
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .backward()
                    .unwrap();
                let g_ref = (&y64 * &up).unwrap().sum_all().unwrap().backward().unwrap();
                for (ours, theirs, what) in [
                    (x.as_tensor(), x64.as_tensor(), "x"),
                    (gamma.as_tensor(), g64.as_tensor(), "gamma"),
                    (beta.as_tensor(), b64.as_tensor(), "beta"),
                ] {
                    let a = g.get(ours).unwrap().to_dtype(DType::F64).unwrap();
                    let b = g_ref.get(theirs).unwrap();
                    let tol = 1e-4 * max_abs(b).max(1.0);
                    assert!(
                        max_abs(&(a - b).unwrap()) < tol,
                        "{what} gradient, shape {shape:?}"
                    );
                }
            }
            let data = varmap.data().lock().unwrap();
            for (ours, theirs) in [
                ("bn.running_mean", reference.running_mean()),
                ("bn.running_var", reference.running_var()),
            ] {
                let a = data[ours].as_tensor().to_dtype(DType::F64).unwrap();
                assert!(max_abs(&(a - theirs).unwrap()) < 1e-5, "{ours}");
            }
            drop(data);
            let x = randn(shape);
            let y = bn.forward(&x, false).unwrap().to_dtype(DType::F64).unwrap();
            let y64 = reference
                .forward_t(&x.to_dtype(DType::F64).unwrap(), false)
                .unwrap();
            assert!(max_abs(&(y - y64).unwrap()) < 1e-5, "eval mode");
        }
    }

    /// A residual block through [`residual_train`] and layer by layer, in two models with the
    /// same initial weights: the same outputs and weight gradients for two training steps, the
    /// same running statistics after them, and no fused path in evaluation.
    #[test]
    fn fused_residual_block_matches_the_layers() {
        let dev = Device::Cpu;
        let build = || {
            let varmap = VarMap::new();
            let init = Scope::new(&varmap, dev.clone(), DType::F32, 7);
            let layer = |i: usize| {
                let spec = ConvSpec::new(4, 4, 3);
                let conv = Conv::new(&init.pp(format!("conv{i}")), spec, ConvInit::KaimingFanIn);
                (
                    conv.unwrap(),
                    Bn::new(&init.pp(format!("bn{i}")), 4).unwrap(),
                )
            };
            (varmap.clone(), [layer(1), layer(2)])
        };
        let (fused_vars, fused) = build();
        let (plain_vars, plain) = build();
        for step in 0..2 {
            let x = Var::from_tensor(&(randn((3, 4, 5, 6)) + step as f64).unwrap()).unwrap();
            let pairs: Vec<_> = fused.iter().map(|(c, b)| (c, b)).collect();
            let ours = residual_train(x.as_tensor(), &pairs, Shortcut::Identity, true)
                .unwrap()
                .expect("fused on the CPU in f32");
            let a = plain[0]
                .1
                .forward_relu(&plain[0].0.forward(x.as_tensor()).unwrap(), true)
                .unwrap();
            let b = plain[1]
                .1
                .forward(&plain[1].0.forward(&a).unwrap(), true)
                .unwrap();
            let theirs = sar_candle::ops::batch_norm::add_relu(&b, x.as_tensor()).unwrap();
            let err = max_abs(&(&ours - &theirs).unwrap());
            assert!(err < 1e-6 * max_abs(&theirs), "step {step}: output {err}");
            let up = randn((3, 4, 5, 6));
            let grads = |t: &Tensor| (t * &up).unwrap().sum_all().unwrap().backward().unwrap();
            let (g, h) = (grads(&ours), grads(&theirs));
            let gx = (g.get(x.as_tensor()).unwrap() - h.get(x.as_tensor()).unwrap()).unwrap();
            assert!(max_abs(&gx) < 1e-5 * max_abs(h.get(x.as_tensor()).unwrap()));
            for ((fc, _), (pc, _)) in fused.iter().zip(&plain) {
                let (a, b) = (fc.conv.weight(), pc.conv.weight());
                let d = (g.get(a).unwrap() - h.get(b).unwrap()).unwrap();
                assert!(
                    max_abs(&d) < 1e-5 * max_abs(h.get(b).unwrap()),
                    "step {step}"
                );
            }
        }
        let (fd, pd) = (
            fused_vars.data().lock().unwrap(),
            plain_vars.data().lock().unwrap(),
        );
        for name in [
            "bn1.running_mean",
            "bn1.running_var",
            "bn2.running_mean",
            "bn2.running_var",
        ] {
            let d = (fd[name].as_tensor() - pd[name].as_tensor()).unwrap();
            assert_eq!(max_abs(&d), 0.0, "{name}");
        }
        let x = randn((3, 4, 5, 6));
        let pairs: Vec<_> = fused.iter().map(|(c, b)| (c, b)).collect();
        assert!(residual_train(&x, &pairs, Shortcut::Identity, false)
            .unwrap()
            .is_none());
    }
}
