//! torchvision's ResNet-18 and ResNet-50 (v1.5: the stride of a Bottleneck is on its 3×3
//! conv), with the same parameter names, so ImageNet-pretrained torchvision weights load
//! directly ([`crate::pretrained`]).
//!
//! Stem [`Stem::Imagenet`]: `conv1` 7×7/2 (pad 3) → `bn1` → ReLU → max-pool 3×3/2 (pad 1);
//! [`Stem::Cifar`]: `conv1` 3×3/1 (pad 1) → `bn1` → ReLU (the usual CIFAR variant). Then
//! `layer1..4` with 64/128/256/512 base widths (stride 2 from `layer2` on), global average
//! pooling to the feature (512-d for ResNet-18, 2048-d for ResNet-50), `fc`.
//! Projection shortcuts are `layerX.0.downsample.{0 (1×1 conv), 1 (BN)}`.
//! Weights: Kaiming normal fan_out for convs, BN 1/0, `fc` PyTorch's default.

use crate::layers::{global_avg_pool, residual_train, Bn, Conv, ConvInit, ConvSpec, Fc, FcInit};
use crate::params::Scope;
use crate::{Cost, ImageClassifier, Result, Stem};
use candle_core::Tensor;
use sar_candle::ops::residual::Shortcut;

/// Which ResNet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Depth {
    /// BasicBlocks [2, 2, 2, 2].
    R18,
    /// Bottlenecks [3, 4, 6, 3].
    R50,
}

/// A residual block: convs with BatchNorm (ReLU between), shortcut, add, ReLU. Shared with the
/// dilated segmentation backbones.
pub(crate) struct Block {
    pub(crate) convs: Vec<(Conv, Bn)>,
    pub(crate) downsample: Option<(Conv, Bn)>,
}

impl Block {
    pub(crate) fn forward(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        if self.downsample.is_none() {
            let layers: Vec<(&Conv, &Bn)> = self.convs.iter().map(|(c, b)| (c, b)).collect();
            if let Some(out) = residual_train(x, &layers, Shortcut::Identity, train)? {
                return Ok(out);
            }
        }
        let mut out = x.clone();
        let last = self.convs.len() - 1;
        for (i, (conv, bn)) in self.convs.iter().enumerate() {
            let y = conv.forward(&out)?;
            out = if i < last {
                bn.forward_relu(&y, train)?
            } else {
                bn.forward(&y, train)?
            };
        }
        let shortcut = match &self.downsample {
            Some((conv, bn)) => bn.forward(&conv.forward(x)?, train)?,
            None => x.clone(),
        };
        sar_candle::ops::batch_norm::add_relu(&out, &shortcut)
    }

    pub(crate) fn cost(&self, mut h: usize, mut w: usize) -> (Cost, usize, usize) {
        let mut total = Cost { params: 0, macs: 0 };
        let (h0, w0) = (h, w);
        for (conv, bn) in &self.convs {
            let (c, oh, ow) = conv.cost(h, w);
            total = total + c + bn.cost();
            (h, w) = (oh, ow);
        }
        if let Some((conv, bn)) = &self.downsample {
            total = total + conv.cost(h0, w0).0 + bn.cost();
        }
        (total, h, w)
    }
}

/// See the module docs.
pub struct ResNet {
    stem: Stem,
    conv1: Conv,
    bn1: Bn,
    blocks: Vec<Block>,
    fc: Fc,
    feature_dim: usize,
    classes: usize,
}

impl ResNet {
    /// Builds the network under torchvision's names.
    pub fn new(
        init: &Scope,
        depth: Depth,
        stem: Stem,
        in_channels: usize,
        classes: usize,
    ) -> Result<Self> {
        let how = ConvInit::KaimingFanOut;
        let conv1 = match stem {
            Stem::Imagenet => Conv::new(
                &init.pp("conv1"),
                ConvSpec::new(in_channels, 64, 7).stride(2),
                how,
            )?,
            Stem::Cifar => Conv::new(&init.pp("conv1"), ConvSpec::new(in_channels, 64, 3), how)?,
        };
        let bn1 = Bn::new(&init.pp("bn1"), 64)?;
        let (counts, expansion): ([usize; 4], usize) = match depth {
            Depth::R18 => ([2, 2, 2, 2], 1),
            Depth::R50 => ([3, 4, 6, 3], 4),
        };
        let mut blocks = Vec::new();
        let mut c = 64;
        for (stage, (&count, width)) in counts.iter().zip([64usize, 128, 256, 512]).enumerate() {
            for i in 0..count {
                let stride = if stage > 0 && i == 0 { 2 } else { 1 };
                let b = init.pp(format!("layer{}", stage + 1)).pp(i);
                let out = width * expansion;
                let mut convs = Vec::new();
                let mut conv = |j: usize, spec: ConvSpec| -> Result<()> {
                    let conv = Conv::new(&b.pp(format!("conv{j}")), spec, how)?;
                    let bn = Bn::new(&b.pp(format!("bn{j}")), spec.out_ch)?;
                    convs.push((conv, bn));
                    Ok(())
                };
                match depth {
                    Depth::R18 => {
                        conv(1, ConvSpec::new(c, width, 3).stride(stride))?;
                        conv(2, ConvSpec::new(width, width, 3))?;
                    }
                    Depth::R50 => {
                        conv(1, ConvSpec::new(c, width, 1))?;
                        conv(2, ConvSpec::new(width, width, 3).stride(stride))?;
                        conv(3, ConvSpec::new(width, out, 1))?;
                    }
                }
                let downsample = if stride != 1 || c != out {
                    let d = b.pp("downsample");
                    Some((
                        Conv::new(&d.pp(0), ConvSpec::new(c, out, 1).stride(stride), how)?,
                        Bn::new(&d.pp(1), out)?,
                    ))
                } else {
                    None
                };
                blocks.push(Block { convs, downsample });
                c = out;
            }
        }
        let fc = Fc::new(&init.pp("fc"), c, classes, FcInit::Default)?;
        Ok(ResNet {
            stem,
            conv1,
            bn1,
            blocks,
            fc,
            feature_dim: c,
            classes,
        })
    }
}

/// Max-pool 3×3, stride 2, padding 1 (PyTorch's, gradient included).
pub(crate) fn max_pool_3x3_s2_p1(x: &Tensor) -> candle_core::Result<Tensor> {
    sar_candle::ops::pool::max_pool2d(x, 3, 2, 1)
}

impl ImageClassifier for ResNet {
    fn features(&self, images: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        let mut x = self.bn1.forward_relu(&self.conv1.forward(images)?, train)?;
        if self.stem == Stem::Imagenet {
            x = max_pool_3x3_s2_p1(&x)?;
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
        self.feature_dim
    }
    fn classes(&self) -> usize {
        self.classes
    }
    fn cost(&self, h: usize, w: usize) -> Cost {
        let (mut total, mut h, mut w) = self.conv1.cost(h, w);
        total = total + self.bn1.cost() + self.fc.cost();
        if self.stem == Stem::Imagenet {
            (h, w) = ((h + 2 - 3) / 2 + 1, (w + 2 - 3) / 2 + 1);
        }
        for b in &self.blocks {
            let (c, oh, ow) = b.cost(h, w);
            total = total + c;
            (h, w) = (oh, ow);
        }
        total
    }
}
