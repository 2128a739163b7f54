//! SegFormer: the [Mix Transformer](super::mit) and mmsegmentation's all-MLP `SegformerHead`.
//!
//! Head (`decode_head`): each stage output i is mapped by a 1×1 ConvModule (conv without bias,
//! BatchNorm, ReLU; `convs.{i}`) to `channels` and resized bilinearly (`align_corners=False`) to
//! stage 0's size (stride 4); the four maps are concatenated in stage order and fused by a 1×1
//! ConvModule (`fusion_conv`) into F `[N, channels, H/4, W/4]`, the features SAR pulls toward
//! its anchors; `conv_seg` (after the trainer's dropout, p = 0.1) gives the logits.
//! `channels` is 256 for B0 and B1 and 768 for B2–B5 (mmsegmentation's configs), scaled by
//! width/64 like the backbone. There is no auxiliary head.

use super::mit::{MitVariant, MixVisionTransformer};
use super::{ConvBn, ConvSeg, SegFeatures, SegSpec, Segmenter};
use crate::layers::ConvSpec;
use crate::params::Scope;
use crate::resize::resize_bilinear;
use crate::{Cost, ModelError, Result};
use candle_core::Tensor;
use sar_math::rng::SeededRng;

/// SegFormer behind [`Segmenter`].
pub struct SegFormer {
    backbone: MixVisionTransformer,
    convs: Vec<ConvBn>,
    fusion: ConvBn,
    conv_seg: ConvSeg,
    channels: usize,
    classes: usize,
}

impl SegFormer {
    /// Builds MiT-B`variant` and the head (names `backbone.*`, `decode_head.*`).
    pub fn new(init: &Scope, spec: &SegSpec, variant: MitVariant, drop_path: f64) -> Result<Self> {
        let (embed, depths) = variant.dims();
        let MitVariant::B(b) = variant;
        let head_channels = if b <= 1 { 256 } else { 768 };
        if !(spec.width * embed).is_multiple_of(64)
            || !(spec.width * head_channels).is_multiple_of(64)
        {
            return Err(ModelError::Config(format!(
                "MiT-B{b} at width {} would have a fractional width (E = {embed}·width/64)",
                spec.width
            )));
        }
        if !(0.0..1.0).contains(&drop_path) {
            return Err(ModelError::Config(format!(
                "the stochastic-depth rate must be in [0, 1), got {drop_path}"
            )));
        }
        let embed = embed * spec.width / 64;
        let channels = head_channels * spec.width / 64;
        let backbone = MixVisionTransformer::new(
            &init.pp("backbone"),
            spec.in_channels,
            embed,
            depths,
            drop_path,
        )?;
        let head = init.pp("decode_head");
        let convs = backbone
            .widths()
            .iter()
            .enumerate()
            .map(|(i, &c)| ConvBn::module(&head.pp("convs").pp(i), ConvSpec::new(c, channels, 1)))
            .collect::<Result<Vec<_>>>()?;
        let fusion = ConvBn::module(
            &head.pp("fusion_conv"),
            ConvSpec::new(4 * channels, channels, 1),
        )?;
        let conv_seg = ConvSeg::new(&head.pp("conv_seg"), channels, spec.classes)?;
        Ok(SegFormer {
            backbone,
            convs,
            fusion,
            conv_seg,
            channels,
            classes: spec.classes,
        })
    }
}

impl SegFormer {
    /// The four MiT stage outputs (no stochastic depth), for cross-checks.
    pub fn backbone_outputs(&self, images: &Tensor) -> candle_core::Result<Vec<Tensor>> {
        self.backbone.forward(images, None)
    }
}

impl Segmenter for SegFormer {
    fn features(&self, images: &Tensor, train: bool) -> candle_core::Result<SegFeatures> {
        self.features_with_noise(images, train, None)
    }
    fn features_with_noise(
        &self,
        images: &Tensor,
        train: bool,
        noise: Option<&mut SeededRng>,
    ) -> candle_core::Result<SegFeatures> {
        let stages = self
            .backbone
            .forward(images, if train { noise } else { None })?;
        let (_, _, h, w) = stages[0].dims4()?;
        let maps = stages
            .iter()
            .zip(&self.convs)
            .map(|(s, c)| resize_bilinear(&c.forward(s, train)?, h, w))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let main = self.fusion.forward(&Tensor::cat(&maps, 1)?, train)?;
        Ok(SegFeatures { main, aux: None })
    }
    fn classify(&self, features: &Tensor) -> candle_core::Result<Tensor> {
        self.conv_seg.forward(features)
    }
    fn classify_aux(&self, _features: &Tensor) -> candle_core::Result<Tensor> {
        candle_core::bail!("SegFormer has no auxiliary head")
    }
    fn feature_dim(&self) -> usize {
        self.channels
    }
    fn classes(&self) -> usize {
        self.classes
    }
    fn has_aux(&self) -> bool {
        false
    }
    fn output_stride(&self) -> usize {
        4
    }
    fn cost(&self, h: usize, w: usize) -> Cost {
        let (mut total, sizes) = self.backbone.cost(h, w);
        let (h0, w0) = sizes[0];
        for (c, &(sh, sw)) in self.convs.iter().zip(&sizes) {
            total = total + c.cost(sh, sw).0;
        }
        total + self.fusion.cost(h0, w0).0 + self.conv_seg.cost(h0 * w0)
    }
    fn aux_params(&self) -> u64 {
        0
    }
}
