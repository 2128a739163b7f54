//! Decode heads (FCN, ASPP), the auxiliary FCN head, and [`SegModel`], the backbone plus
//! heads behind [`Segmenter`]. Structure and names: see the [parent module](super).

use super::hrnet::HrNetV2;
use super::resnet_v1c::{ResNetV1c, V1cDepth};
use super::{ConvBn, ConvSeg, SegBackbone, SegFeatures, SegHeadKind, SegSpec, Segmenter};
use crate::layers::ConvSpec;
use crate::params::Scope;
use crate::resize::{broadcast_1x1, resize_bilinear};
use crate::{Cost, ModelError, Result};
use candle_core::Tensor;

enum Backbone {
    ResNet(ResNetV1c),
    HrNet(HrNetV2),
}

impl Backbone {
    fn forward(&self, x: &Tensor, train: bool) -> candle_core::Result<Vec<Tensor>> {
        match self {
            Backbone::ResNet(b) => b.forward(x, train),
            Backbone::HrNet(b) => b.forward(x, train),
        }
    }
    fn cost(&self, h: usize, w: usize) -> (Cost, Vec<(usize, usize)>) {
        match self {
            Backbone::ResNet(b) => b.cost(h, w),
            Backbone::HrNet(b) => b.cost(h, w),
        }
    }
}

/// The part of a decode head before dropout and `conv_seg`.
enum Decode {
    /// FCN on one stage: `convs` (3×3 ConvModules), optionally `conv_cat` over [input, convs].
    Fcn {
        input: usize,
        convs: Vec<ConvBn>,
        concat: Option<Box<ConvBn>>,
    },
    /// FCN over all HRNet branches resized to the first and concatenated.
    FcnConcat { conv: Box<ConvBn> },
    /// DeepLabV3's ASPP.
    Aspp {
        input: usize,
        pool: Box<ConvBn>,
        branches: Vec<ConvBn>,
        bottleneck: Box<ConvBn>,
    },
}

impl Decode {
    fn forward(&self, stages: &[Tensor], train: bool) -> candle_core::Result<Tensor> {
        match self {
            Decode::Fcn {
                input,
                convs,
                concat,
            } => {
                let x = &stages[*input];
                let mut y = x.clone();
                for c in convs {
                    y = c.forward(&y, train)?;
                }
                match concat {
                    Some(cat) => cat.forward(&Tensor::cat(&[x, &y], 1)?, train),
                    None => Ok(y),
                }
            }
            Decode::FcnConcat { conv } => {
                let (_, _, h, w) = stages[0].dims4()?;
                let parts = stages
                    .iter()
                    .map(|s| resize_bilinear(s, h, w))
                    .collect::<candle_core::Result<Vec<_>>>()?;
                conv.forward(&Tensor::cat(&parts, 1)?, train)
            }
            Decode::Aspp {
                input,
                pool,
                branches,
                bottleneck,
            } => {
                let x = &stages[*input];
                let (_, _, h, w) = x.dims4()?;
                let pooled = pool.forward(&x.mean_keepdim(2)?.mean_keepdim(3)?, train)?;
                let mut outs = vec![broadcast_1x1(&pooled, h, w)?];
                for b in branches {
                    outs.push(b.forward(x, train)?);
                }
                bottleneck.forward(&Tensor::cat(&outs, 1)?, train)
            }
        }
    }

    fn cost(&self, sizes: &[(usize, usize)]) -> Cost {
        let mut total = Cost { params: 0, macs: 0 };
        match self {
            Decode::Fcn {
                input,
                convs,
                concat,
            } => {
                let (h, w) = sizes[*input];
                for c in convs {
                    total = total + c.cost(h, w).0;
                }
                if let Some(c) = concat {
                    total = total + c.cost(h, w).0;
                }
            }
            Decode::FcnConcat { conv } => {
                let (h, w) = sizes[0];
                total = total + conv.cost(h, w).0;
            }
            Decode::Aspp {
                input,
                pool,
                branches,
                bottleneck,
            } => {
                let (h, w) = sizes[*input];
                total = total + pool.cost(1, 1).0 + bottleneck.cost(h, w).0;
                for b in branches {
                    total = total + b.cost(h, w).0;
                }
            }
        }
        total
    }
}

/// Backbone, decode head, optional auxiliary head (see the [parent module](super)).
pub struct SegModel {
    backbone: Backbone,
    decode: Decode,
    conv_seg: ConvSeg,
    aux: Option<(Decode, ConvSeg)>,
    feature_dim: usize,
    classes: usize,
    output_stride: usize,
}

/// The backbone of `spec` in scope `bb`.
fn backbone(bb: &Scope, spec: &SegSpec) -> Result<Backbone> {
    let resnet = |depth| ResNetV1c::new(bb, depth, spec.in_channels, spec.width);
    Ok(match spec.backbone {
        SegBackbone::ResNet18V1c => Backbone::ResNet(resnet(V1cDepth::R18)?),
        SegBackbone::ResNet50V1c => Backbone::ResNet(resnet(V1cDepth::R50)?),
        SegBackbone::ResNet101V1c => Backbone::ResNet(resnet(V1cDepth::R101)?),
        SegBackbone::HrNetV2W18 => Backbone::HrNet(HrNetV2::new(bb, spec.in_channels, 18)?),
        SegBackbone::HrNetV2W48 => Backbone::HrNet(HrNetV2::new(bb, spec.in_channels, 48)?),
        other => {
            return Err(ModelError::Config(format!(
                "{other} is built by the segformer module, not this one"
            )))
        }
    })
}

/// The decode head on a ResNet's stage 4 (`cin` channels, D = `cin / 4`) in scope `head`.
fn resnet_decode(head: &Scope, kind: SegHeadKind, cin: usize) -> Result<Decode> {
    let ch = cin / 4;
    Ok(match kind {
        SegHeadKind::Fcn => Decode::Fcn {
            input: 3,
            convs: vec![
                ConvBn::module(&head.pp("convs").pp(0), ConvSpec::new(cin, ch, 3))?,
                ConvBn::module(&head.pp("convs").pp(1), ConvSpec::new(ch, ch, 3))?,
            ],
            concat: Some(
                ConvBn::module(&head.pp("conv_cat"), ConvSpec::new(cin + ch, ch, 3))?.into(),
            ),
        },
        SegHeadKind::Aspp => {
            let mut branches = Vec::new();
            for (i, d) in [1usize, 12, 24, 36].into_iter().enumerate() {
                let kk = if d == 1 { 1 } else { 3 };
                branches.push(ConvBn::module(
                    &head.pp("aspp_modules").pp(i),
                    ConvSpec::new(cin, ch, kk).dilation(d),
                )?);
            }
            Decode::Aspp {
                input: 3,
                pool: ConvBn::module(&head.pp("image_pool").pp(1), ConvSpec::new(cin, ch, 1))?
                    .into(),
                branches,
                bottleneck: ConvBn::module(&head.pp("bottleneck"), ConvSpec::new(5 * ch, ch, 3))?
                    .into(),
            }
        }
        SegHeadKind::Segformer | SegHeadKind::Ocr | SegHeadKind::Uper => {
            return Err(ModelError::Config(format!(
                "the {kind:?} head does not take a ResNet backbone (segformer: mit-b0 … mit-b5; ocr: hrnetv2-w18/w48; uper: swin-t/s/b/l)"
            )))
        }
    })
}

/// The auxiliary FCN head and its classifier on a ResNet's stage 3 (`cin` channels) in scope
/// `aux_head`.
fn resnet_aux(aux_head: &Scope, cin: usize, classes: usize) -> Result<(Decode, ConvSeg)> {
    let ch = cin / 4;
    Ok((
        Decode::Fcn {
            input: 2,
            convs: vec![ConvBn::module(
                &aux_head.pp("convs").pp(0),
                ConvSpec::new(cin, ch, 3),
            )?],
            concat: None,
        },
        ConvSeg::new(&aux_head.pp("conv_seg"), ch, classes)?,
    ))
}

impl SegModel {
    /// Builds the model for `spec`.
    pub fn new(init: &Scope, spec: &SegSpec) -> Result<Self> {
        let k = spec.classes;
        let head = init.pp("decode_head");
        let backbone = backbone(&init.pp("backbone"), spec)?;
        let (decode, dim, aux, output_stride) = match &backbone {
            Backbone::ResNet(b) => {
                let widths = b.widths();
                let decode = resnet_decode(&head, spec.head, widths[3])?;
                let aux = if spec.aux {
                    Some(resnet_aux(&init.pp("auxiliary_head"), widths[2], k)?)
                } else {
                    None
                };
                (decode, widths[3] / 4, aux, 8)
            }
            Backbone::HrNet(b) => {
                if spec.head != SegHeadKind::Fcn || spec.aux {
                    return Err(ModelError::Config(
                        "HRNetV2 takes the FCN head over its concatenated branches, without an auxiliary head (as mmsegmentation's fcn_hr18/fcn_hr48)".into(),
                    ));
                }
                let d: usize = b.widths().iter().sum();
                let conv = ConvBn::module(&head.pp("convs").pp(0), ConvSpec::new(d, d, 1))?;
                let decode = Decode::FcnConcat {
                    conv: Box::new(conv),
                };
                (decode, d, None, 4)
            }
        };
        let conv_seg = ConvSeg::new(&head.pp("conv_seg"), dim, k)?;
        Ok(SegModel {
            backbone,
            decode,
            conv_seg,
            aux,
            feature_dim: dim,
            classes: k,
            output_stride,
        })
    }
}

impl Segmenter for SegModel {
    fn features(&self, images: &Tensor, train: bool) -> candle_core::Result<SegFeatures> {
        let stages = self.backbone.forward(images, train)?;
        let main = self.decode.forward(&stages, train)?;
        let aux = match (&self.aux, train) {
            (Some((head, _)), true) => Some(head.forward(&stages, train)?),
            _ => None,
        };
        Ok(SegFeatures { main, aux })
    }
    fn classify(&self, features: &Tensor) -> candle_core::Result<Tensor> {
        self.conv_seg.forward(features)
    }
    fn classify_aux(&self, features: &Tensor) -> candle_core::Result<Tensor> {
        match &self.aux {
            Some((_, seg)) => seg.forward(features),
            None => candle_core::bail!("this model has no auxiliary head"),
        }
    }
    fn feature_dim(&self) -> usize {
        self.feature_dim
    }
    fn classes(&self) -> usize {
        self.classes
    }
    fn has_aux(&self) -> bool {
        self.aux.is_some()
    }
    fn output_stride(&self) -> usize {
        self.output_stride
    }
    fn cost(&self, h: usize, w: usize) -> Cost {
        let (backbone, sizes) = self.backbone.cost(h, w);
        let main = match &self.decode {
            Decode::FcnConcat { .. } => sizes[0],
            Decode::Fcn { input, .. } | Decode::Aspp { input, .. } => sizes[*input],
        };
        backbone + self.decode.cost(&sizes) + self.conv_seg.cost(main.0 * main.1)
    }
    fn aux_params(&self) -> u64 {
        match &self.aux {
            Some((head, seg)) => head.cost(&[(1, 1); 4]).params + seg.cost(0).params,
            None => 0,
        }
    }
}
