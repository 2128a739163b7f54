//! The CIFAR ResNets of He et al. (2016, §4.2) as used by LDAM-DRW and MiSLAS (CIFAR-100-LT):
//! depth 6n+2, a 3×3 stem with 16 channels, three stages of n BasicBlocks with 16, 32 and 64
//! channels (stride 2 at the start of stages 2 and 3), option-A shortcuts (subsample by 2 and
//! zero-pad the channels, no parameters), global average pooling to the 64-d feature, `fc`.
//! ResNet-32 is n = 5: 0.46 M parameters with 10 classes, 69 M multiply-adds per 32×32 image.
//!
//! Weights: Kaiming normal (fan_in) for convs and `fc.weight`, as in those codebases.

use crate::layers::{
    global_avg_pool, residual_chain_train, Bn, Conv, ConvInit, ConvSpec, Fc, FcInit,
};
use crate::params::Scope;
use crate::{Cost, ImageClassifier, ModelError, Result};
use candle_core::{Tensor, D};
use sar_candle::ops::residual::Shortcut;

struct BasicBlock {
    conv1: Conv,
    bn1: Bn,
    conv2: Conv,
    bn2: Bn,
    /// Channels to add on each side in the option-A shortcut (0: identity).
    pad: usize,
    stride: usize,
}

impl BasicBlock {
    fn layers(&self) -> [(&Conv, &Bn); 2] {
        [(&self.conv1, &self.bn1), (&self.conv2, &self.bn2)]
    }

    fn shortcut(&self) -> Shortcut {
        if self.stride == 1 && self.pad == 0 {
            Shortcut::Identity
        } else {
            Shortcut::Subsample {
                stride: self.stride,
                pad: self.pad,
            }
        }
    }

    /// Evaluation, or training off the CPU or in another dtype: layer by layer.
    fn forward(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        let out = self.bn1.forward_relu(&self.conv1.forward(x)?, train)?;
        let out = self.bn2.forward(&self.conv2.forward(&out)?, train)?;
        let shortcut = if self.stride == 1 && self.pad == 0 {
            x.clone()
        } else {
            option_a(x, self.stride, self.pad)?
        };
        sar_candle::ops::batch_norm::add_relu(&out, &shortcut)
    }
}

/// `x[:, :, ::s, ::s]` zero-padded by `pad` channels on each side.
fn option_a(x: &Tensor, stride: usize, pad: usize) -> candle_core::Result<Tensor> {
    let (n, c, h, w) = x.dims4()?;
    // Even sizes: subsample by reshaping. Odd sizes: pad one row/column first (PyTorch's
    // ::2 keeps ceil(h/2) rows, the first of every pair).
    let x = if h % stride != 0 || w % stride != 0 {
        let x = x.pad_with_zeros(2, 0, (stride - h % stride) % stride)?;
        x.pad_with_zeros(3, 0, (stride - w % stride) % stride)?
    } else {
        x.clone()
    };
    let (hh, ww) = (x.dim(2)? / stride, x.dim(3)? / stride);
    let sub = x
        .reshape((n, c, hh, stride, ww, stride))?
        .narrow(3, 0, 1)?
        .narrow(D::Minus1, 0, 1)?
        .reshape((n, c, hh, ww))?;
    sub.pad_with_zeros(1, pad, pad)
}

/// See the module docs.
pub struct CifarResNet {
    conv1: Conv,
    bn1: Bn,
    blocks: Vec<BasicBlock>,
    fc: Fc,
    classes: usize,
}

impl CifarResNet {
    /// Depth 6n+2 (20, 32, 44, 56, 110, …).
    pub fn new(init: &Scope, depth: usize, in_channels: usize, classes: usize) -> Result<Self> {
        if depth < 8 || !(depth - 2).is_multiple_of(6) {
            return Err(ModelError::Config(format!(
                "a CIFAR ResNet has depth 6n+2 (20, 32, 44, …), got {depth}"
            )));
        }
        let n = (depth - 2) / 6;
        let how = ConvInit::KaimingFanIn;
        let conv1 = Conv::new(&init.pp("conv1"), ConvSpec::new(in_channels, 16, 3), how)?;
        let bn1 = Bn::new(&init.pp("bn1"), 16)?;
        let mut blocks = Vec::new();
        let mut c = 16;
        for (stage, width) in [16usize, 32, 64].into_iter().enumerate() {
            for i in 0..n {
                let stride = if stage > 0 && i == 0 { 2 } else { 1 };
                let b = init.pp(format!("layer{}", stage + 1)).pp(i);
                blocks.push(BasicBlock {
                    conv1: Conv::new(
                        &b.pp("conv1"),
                        ConvSpec::new(c, width, 3).stride(stride),
                        how,
                    )?,
                    bn1: Bn::new(&b.pp("bn1"), width)?,
                    conv2: Conv::new(&b.pp("conv2"), ConvSpec::new(width, width, 3), how)?,
                    bn2: Bn::new(&b.pp("bn2"), width)?,
                    pad: (width - c) / 2,
                    stride,
                });
                c = width;
            }
        }
        let fc = Fc::new(&init.pp("fc"), 64, classes, FcInit::KaimingFanIn)?;
        Ok(CifarResNet {
            conv1,
            bn1,
            blocks,
            fc,
            classes,
        })
    }
}

impl ImageClassifier for CifarResNet {
    fn features(&self, images: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        let mut x = self.bn1.forward_relu(&self.conv1.forward(images)?, train)?;
        // In training on the CPU, all blocks as one op.
        let layers: Vec<_> = self.blocks.iter().map(BasicBlock::layers).collect();
        let chain: Vec<(&[(&Conv, &Bn)], Shortcut)> = layers
            .iter()
            .zip(&self.blocks)
            .map(|(l, b)| (&l[..], b.shortcut()))
            .collect();
        if let Some(out) = residual_chain_train(&x, &chain, train)? {
            return global_avg_pool(&out);
        }
        for b in &self.blocks {
            x = b.forward(&x, train)?;
        }
        global_avg_pool(&x)
    }
    fn classify(&self, features: &Tensor) -> candle_core::Result<Tensor> {
        self.fc.forward(features)
    }
    fn feature_dim(&self) -> usize {
        64
    }
    fn classes(&self) -> usize {
        self.classes
    }
    fn cost(&self, h: usize, w: usize) -> Cost {
        let (mut total, mut h, mut w) = self.conv1.cost(h, w);
        total = total + self.bn1.cost() + self.fc.cost();
        for b in &self.blocks {
            let (c1, h1, w1) = b.conv1.cost(h, w);
            let (c2, h2, w2) = b.conv2.cost(h1, w1);
            total = total + c1 + c2 + b.bn1.cost() + b.bn2.cost();
            (h, w) = (h2, w2);
        }
        total
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn option_a_subsamples_and_pads() {
        // x[n, c, i, j] = 100c + 10i + j on a 1×2×4×3 map (odd width).
        let v: Vec<f32> = (0..2)
            .flat_map(|c| {
                (0..4).flat_map(move |i| (0..3).map(move |j| (100 * c + 10 * i + j) as f32))
            })
            .collect();
        let x = Tensor::from_vec(v, (1, 2, 4, 3), &Device::Cpu).unwrap();
        let y = option_a(&x, 2, 1).unwrap();
        assert_eq!(y.dims(), &[1, 4, 2, 2]);
        let y: Vec<f32> = y.flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(
            y,
            vec![0., 0., 0., 0., 0., 2., 20., 22., 100., 102., 120., 122., 0., 0., 0., 0.]
        );
    }
}
