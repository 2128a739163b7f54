//! mmsegmentation's dilated ResNet V1c (output stride 8), under `backbone.*` names.
//!
//! Stem: `stem.0` 3×3/2 conv (3 → w/2) → `stem.1` BN → ReLU → `stem.3` 3×3 (w/2 → w/2) →
//! `stem.4` → ReLU → `stem.6` 3×3 (w/2 → w) → `stem.7` → ReLU → max-pool 3×3/2 (stride 4).
//! Stages `layer1..4`: widths w, 2w, 4w, 8w (×4 for Bottlenecks), strides 1/2/1/1, dilations
//! 1/1/2/4 with `contract_dilation` (the first block of a stage with dilation d > 1 uses d/2).
//! BasicBlock: `conv1` 3×3 (stride, padding = dilation = d), `conv2` 3×3 padding 1, *not*
//! dilated (as mmsegmentation builds it). Bottleneck (pytorch style): `conv1` 1×1, `conv2` 3×3
//! with the stride and dilation, `conv3` 1×1. Shortcut `downsample.0` 1×1 conv (stride) +
//! `downsample.1` BN where the shape changes. Returns the four stage outputs (strides
//! 4/8/8/8).

use super::ConvBn;
use crate::layers::{Bn, Conv, ConvInit, ConvSpec};
use crate::params::Scope;
use crate::resnet::{max_pool_3x3_s2_p1, Block};
use crate::{Cost, Result};
use candle_core::Tensor;

/// Depth of a dilated ResNet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum V1cDepth {
    /// BasicBlocks [2, 2, 2, 2].
    R18,
    /// Bottlenecks [3, 4, 6, 3].
    R50,
    /// Bottlenecks [3, 4, 23, 3].
    R101,
}

/// See the module docs.
pub struct ResNetV1c {
    stem: Vec<ConvBn>,
    stages: Vec<Vec<Block>>,
    widths: [usize; 4],
}

impl ResNetV1c {
    /// Builds the backbone in scope `init`.
    pub fn new(init: &Scope, depth: V1cDepth, in_channels: usize, width: usize) -> Result<Self> {
        let how = ConvInit::KaimingFanOut;
        let half = width / 2;
        let st = init.pp("stem");
        let stem = vec![
            ConvBn::plain(
                &st.pp(0),
                &st.pp(1),
                ConvSpec::new(in_channels, half, 3).stride(2),
                true,
            )?,
            ConvBn::plain(&st.pp(3), &st.pp(4), ConvSpec::new(half, half, 3), true)?,
            ConvBn::plain(&st.pp(6), &st.pp(7), ConvSpec::new(half, width, 3), true)?,
        ];
        let (counts, expansion): ([usize; 4], usize) = match depth {
            V1cDepth::R18 => ([2, 2, 2, 2], 1),
            V1cDepth::R50 => ([3, 4, 6, 3], 4),
            V1cDepth::R101 => ([3, 4, 23, 3], 4),
        };
        let strides = [1, 2, 1, 1];
        let dilations = [1, 1, 2, 4];
        let mut stages = Vec::new();
        let mut widths = [0; 4];
        let mut c = width;
        for stage in 0..4 {
            let planes = width << stage;
            let out = planes * expansion;
            let mut blocks = Vec::new();
            for i in 0..counts[stage] {
                let stride = if i == 0 { strides[stage] } else { 1 };
                let d = dilations[stage];
                let dil = if i == 0 && d > 1 { d / 2 } else { d };
                let b = init.pp(format!("layer{}", stage + 1)).pp(i);
                let cv = |j: usize, spec: ConvSpec| -> Result<(Conv, Bn)> {
                    Ok((
                        Conv::new(&b.pp(format!("conv{j}")), spec, how)?,
                        Bn::new(&b.pp(format!("bn{j}")), spec.out_ch)?,
                    ))
                };
                let convs = match depth {
                    V1cDepth::R18 => vec![
                        cv(1, ConvSpec::new(c, planes, 3).stride(stride).dilation(dil))?,
                        cv(2, ConvSpec::new(planes, planes, 3))?,
                    ],
                    V1cDepth::R50 | V1cDepth::R101 => vec![
                        cv(1, ConvSpec::new(c, planes, 1))?,
                        cv(
                            2,
                            ConvSpec::new(planes, planes, 3)
                                .stride(stride)
                                .dilation(dil),
                        )?,
                        cv(3, ConvSpec::new(planes, out, 1))?,
                    ],
                };
                let downsample = if stride != 1 || c != out {
                    Some((
                        Conv::new(
                            &b.pp("downsample").pp(0),
                            ConvSpec::new(c, out, 1).stride(stride),
                            how,
                        )?,
                        Bn::new(&b.pp("downsample").pp(1), out)?,
                    ))
                } else {
                    None
                };
                blocks.push(Block { convs, downsample });
                c = out;
            }
            widths[stage] = out;
            stages.push(blocks);
        }
        Ok(ResNetV1c {
            stem,
            stages,
            widths,
        })
    }

    /// Channels of the four stage outputs.
    pub fn widths(&self) -> [usize; 4] {
        self.widths
    }

    /// The four stage outputs.
    pub fn forward(&self, x: &Tensor, train: bool) -> candle_core::Result<Vec<Tensor>> {
        let mut x = x.clone();
        for m in &self.stem {
            x = m.forward(&x, train)?;
        }
        x = max_pool_3x3_s2_p1(&x)?;
        let mut outs = Vec::with_capacity(4);
        for blocks in &self.stages {
            for b in blocks {
                x = b.forward(&x, train)?;
            }
            outs.push(x.clone());
        }
        Ok(outs)
    }

    /// Cost on an `h × w` image, and the size of each stage output.
    pub fn cost(&self, mut h: usize, mut w: usize) -> (Cost, Vec<(usize, usize)>) {
        let mut total = Cost { params: 0, macs: 0 };
        for m in &self.stem {
            let (c, oh, ow) = m.cost(h, w);
            total = total + c;
            (h, w) = (oh, ow);
        }
        (h, w) = ((h + 2 - 3) / 2 + 1, (w + 2 - 3) / 2 + 1);
        let mut sizes = Vec::new();
        for blocks in &self.stages {
            for b in blocks {
                let (c, oh, ow) = b.cost(h, w);
                total = total + c;
                (h, w) = (oh, ow);
            }
            sizes.push((h, w));
        }
        (total, sizes)
    }
}
