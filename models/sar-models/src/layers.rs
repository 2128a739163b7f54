//! The layers the models are built from, with their cost.
//!
//! Layout NCHW throughout. A [`Conv`] is `candle_nn::Conv2d` plus its geometry (for
//! [`Conv::cost`]); a [`Bn`] is `candle_nn::BatchNorm` (eps 1e-5, momentum 0.1, PyTorch's
//! unbiased running variance) whose running statistics are variables in the model's
//! [`candle_nn::VarMap`]; a [`Fc`] is `candle_nn::Linear`.

use crate::bn_cpu;
use crate::params::{Init, ParamInit};
use crate::{Cost, Result};
use candle_core::{Module, ModuleT, Tensor, Var};
use candle_nn::{BatchNorm, Conv2d, Conv2dConfig, Linear};
use std::sync::{Arc, Mutex};

/// How a conv weight is initialised.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConvInit {
    /// Kaiming normal, fan_out = out·k² (torchvision's ResNets).
    KaimingFanOut,
    /// Kaiming normal, fan_in = in·k² (the CIFAR ResNets of LDAM/MiSLAS).
    KaimingFanIn,
}

/// A 2-D convolution without bias.
pub struct Conv {
    conv: Conv2d,
    in_channels: usize,
    out_channels: usize,
    kernel: usize,
    stride: usize,
    padding: usize,
    dilation: usize,
}

impl Conv {
    /// `name.weight` of shape `[out, in, k, k]`.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        init: &mut ParamInit,
        name: &str,
        in_channels: usize,
        out_channels: usize,
        kernel: usize,
        stride: usize,
        padding: usize,
        how: ConvInit,
    ) -> Result<Self> {
        let fan = match how {
            ConvInit::KaimingFanOut => out_channels * kernel * kernel,
            ConvInit::KaimingFanIn => in_channels * kernel * kernel,
        };
        let w = init.tensor(
            &format!("{name}.weight"),
            &[out_channels, in_channels, kernel, kernel],
            Init::Normal((2.0 / fan as f64).sqrt()),
        )?;
        let cfg = Conv2dConfig {
            padding,
            stride,
            dilation: 1,
            groups: 1,
            cudnn_fwd_algo: None,
        };
        Ok(Conv {
            conv: Conv2d::new(w, None, cfg),
            in_channels,
            out_channels,
            kernel,
            stride,
            padding,
            dilation: 1,
        })
    }

    /// The same convolution with its taps `dilation` apart (atrous); set the padding to
    /// `dilation · (k − 1) / 2` to keep the size.
    pub fn with_dilation(mut self, dilation: usize) -> Self {
        self.dilation = dilation.max(1);
        self
    }

    /// Output size of an input of `h × w`.
    pub fn out_size(&self, h: usize, w: usize) -> (usize, usize) {
        let extent = self.dilation * (self.kernel - 1) + 1;
        let o = |x: usize| (x + 2 * self.padding).saturating_sub(extent) / self.stride + 1;
        (o(h), o(w))
    }

    /// Cost on an `h × w` input, and the output size.
    pub fn cost(&self, h: usize, w: usize) -> (Cost, usize, usize) {
        let (oh, ow) = self.out_size(h, w);
        let k2 = (self.kernel * self.kernel) as u64;
        let params = self.out_channels as u64 * self.in_channels as u64 * k2;
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
        crate::conv_cpu::conv2d(
            x,
            self.conv.weight(),
            self.stride,
            self.padding,
            self.dilation,
        )
    }
}

/// BatchNorm over the channel axis; on the CPU in f32 the fused ops of [`crate::bn_cpu`],
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
    /// `name.{weight,bias,running_mean,running_var}`.
    pub fn new(init: &mut ParamInit, name: &str, channels: usize) -> Result<Self> {
        let weight = init.tensor(&format!("{name}.weight"), &[channels], Init::Const(1.0))?;
        let bias = init.tensor(&format!("{name}.bias"), &[channels], Init::Const(0.0))?;
        let mean = init.tensor(
            &format!("{name}.running_mean"),
            &[channels],
            Init::Const(0.0),
        )?;
        let var = init.tensor(
            &format!("{name}.running_var"),
            &[channels],
            Init::Const(1.0),
        )?;
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
        if !bn_cpu::fused_ok(x) {
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
            return x.apply_op3_no_bwd(&scale, &shift, &bn_cpu::ChannelAffine { relu });
        }
        let stats = Arc::new(Mutex::new(bn_cpu::BatchStats::default()));
        let op = bn_cpu::BnTrain {
            eps: BN_EPS,
            relu,
            stats: stats.clone(),
        };
        let y = x.apply_op3(&self.weight, &self.bias, op)?;
        let st = stats.lock().expect("stats lock");
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
        let dev = x.device();
        self.running_mean
            .set(&Tensor::from_vec(new_mean, self.channels, dev)?)?;
        self.running_var
            .set(&Tensor::from_vec(new_var, self.channels, dev)?)?;
        Ok(y)
    }
}

/// A fully connected layer with bias.
pub struct Fc {
    linear: Linear,
    inputs: usize,
    outputs: usize,
}

impl Fc {
    /// `name.weight` `[out, in]` and `name.bias` `[out]`, PyTorch's default initialisation
    /// (or Kaiming normal fan_in for the weight when `kaiming`).
    pub fn new(
        init: &mut ParamInit,
        name: &str,
        inputs: usize,
        outputs: usize,
        kaiming: bool,
    ) -> Result<Self> {
        let bound = 1.0 / (inputs as f64).sqrt();
        let w_init = if kaiming {
            Init::Normal((2.0 / inputs as f64).sqrt())
        } else {
            Init::Uniform(bound)
        };
        let w = init.tensor(&format!("{name}.weight"), &[outputs, inputs], w_init)?;
        let b = init.tensor(&format!("{name}.bias"), &[outputs], Init::Uniform(bound))?;
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
