//! UPerNet on a [Swin Transformer](super::swin): mmsegmentation's `UPerHead` and the auxiliary
//! `FCNHead`, with their names.
//!
//! Decode head (`decode_head`, `channels` D = 512) on the four stage outputs S₀…S₃:
//!
//! - pyramid pooling on S₃ (`psp_modules.{k}`, scales 1, 2, 3, 6): PyTorch's adaptive average
//!   pooling to s × s (bin i of n inputs spans ⌊i·n/s⌋ … ⌈(i+1)·n/s⌉ − 1), a 1×1 ConvModule
//!   8E → D (`.1`), resized bilinearly (`align_corners=False`) back to S₃'s size; S₃ and the
//!   four pooled maps concatenated and fused by a 3×3 ConvModule (`bottleneck`) into P₃;
//! - lateral 1×1 ConvModules (`lateral_convs.{i}`, i < 3) give Pᵢ from Sᵢ; top-down,
//!   Pᵢ₋₁ ← Pᵢ₋₁ + resize(Pᵢ) for i = 3, 2, 1;
//! - 3×3 ConvModules (`fpn_convs.{i}`, i < 3) on P₀…P₂ (P₃ as it is), every level resized to
//!   P₀'s size (stride 4), concatenated in level order and fused by a 3×3 ConvModule
//!   (`fpn_bottleneck`, 4D → D) into F `[N, D, H/4, W/4]`: the feature SAR pulls toward its
//!   anchors (the released `UPerHeadWFeat`), classified by `conv_seg` after the trainer's
//!   dropout (0.1).
//!
//! Auxiliary head (`auxiliary_head`, training only, loss weight 0.4): a 3×3 ConvModule on S₂,
//! 4E → 256 (`convs.0`), and its own `conv_seg` (mmsegmentation's `FCNHead` with
//! `num_convs=1`, `concat_input=False`).
//!
//! `SegSpec::width` scales D = 512 and the auxiliary 256 by width/64 like the backbone.

use super::swin::{SwinTransformer, SwinVariant};
use super::{ConvBn, ConvSeg, SegFeatures, SegSpec, Segmenter};
use crate::layers::ConvSpec;
use crate::params::Scope;
use crate::resize::resize_bilinear;
use crate::{Cost, ModelError, Result};
use candle_core::Tensor;
use sar_math::rng::SeededRng;

const CHANNELS: usize = 512;
const AUX_CHANNELS: usize = 256;
const POOL_SCALES: [usize; 4] = [1, 2, 3, 6];

/// The `[s, n]` matrix of PyTorch's adaptive average pooling of n inputs to s outputs
/// ([`sar_math::windows::adaptive_pool_bin`]).
fn adaptive_pool_matrix(n: usize, s: usize) -> Vec<f64> {
    let mut m = vec![0.0f64; s * n];
    for i in 0..s {
        let (start, end) = sar_math::windows::adaptive_pool_bin(n, s, i);
        let weight = 1.0 / (end - start) as f64;
        for j in start..end {
            m[i * n + j] = weight;
        }
    }
    m
}

/// Adaptive average pooling of `[N, C, H, W]` to `[N, C, s, s]` as two products with fixed
/// matrices (candle's gradients on every device), built in f64 so that f64 runs average
/// exactly.
fn adaptive_avg_pool(x: &Tensor, s: usize) -> candle_core::Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    let (dev, dtype) = (x.device(), x.dtype());
    let ph = Tensor::from_vec(adaptive_pool_matrix(h, s), (s, h), dev)?.to_dtype(dtype)?;
    let pw = Tensor::from_vec(adaptive_pool_matrix(w, s), (s, w), dev)?.to_dtype(dtype)?;
    ph.broadcast_matmul(&x.contiguous()?.broadcast_matmul(&pw.t()?)?)
}

/// UPerNet (Swin backbone) behind [`Segmenter`] (see the module docs).
pub struct UperNet {
    backbone: SwinTransformer,
    ppm: Vec<ConvBn>,
    bottleneck: ConvBn,
    laterals: Vec<ConvBn>,
    fpn_convs: Vec<ConvBn>,
    fpn_bottleneck: ConvBn,
    conv_seg: ConvSeg,
    aux: Option<(ConvBn, ConvSeg)>,
    channels: usize,
    classes: usize,
}

impl UperNet {
    /// Swin-`variant` with window `window` (`None`: the variant's) and the heads (names
    /// `backbone.*`, `decode_head.*`, `auxiliary_head.*`).
    pub fn new(
        init: &Scope,
        spec: &SegSpec,
        variant: SwinVariant,
        window: Option<usize>,
    ) -> Result<Self> {
        let (embed, depths, heads, default_window) = variant.dims();
        if !(spec.width * embed).is_multiple_of(64)
            || !(spec.width * AUX_CHANNELS).is_multiple_of(64)
        {
            return Err(ModelError::Config(format!(
                "Swin-{variant:?} at width {} would have a fractional width (E = {embed}·width/64)",
                spec.width
            )));
        }
        if !(0.0..1.0).contains(&spec.drop_path) {
            return Err(ModelError::Config(format!(
                "the stochastic-depth rate must be in [0, 1), got {}",
                spec.drop_path
            )));
        }
        let embed = embed * spec.width / 64;
        let channels = CHANNELS * spec.width / 64;
        let backbone = SwinTransformer::new(
            &init.pp("backbone"),
            spec.in_channels,
            embed,
            depths,
            heads,
            window.unwrap_or(default_window),
            spec.drop_path,
        )?;
        let widths = backbone.widths();
        let head = init.pp("decode_head");
        let cb = |p: &Scope, cin, cout, k| ConvBn::module(p, ConvSpec::new(cin, cout, k));
        let ppm = (0..POOL_SCALES.len())
            .map(|k| cb(&head.pp("psp_modules").pp(k).pp(1), widths[3], channels, 1))
            .collect::<Result<Vec<_>>>()?;
        let bottleneck = cb(
            &head.pp("bottleneck"),
            widths[3] + POOL_SCALES.len() * channels,
            channels,
            3,
        )?;
        let laterals = (0..3)
            .map(|i| cb(&head.pp("lateral_convs").pp(i), widths[i], channels, 1))
            .collect::<Result<Vec<_>>>()?;
        let fpn_convs = (0..3)
            .map(|i| cb(&head.pp("fpn_convs").pp(i), channels, channels, 3))
            .collect::<Result<Vec<_>>>()?;
        let fpn_bottleneck = cb(&head.pp("fpn_bottleneck"), 4 * channels, channels, 3)?;
        let conv_seg = ConvSeg::new(&head.pp("conv_seg"), channels, spec.classes)?;
        let aux = if spec.aux {
            let a = init.pp("auxiliary_head");
            let ac = AUX_CHANNELS * spec.width / 64;
            Some((
                cb(&a.pp("convs").pp(0), widths[2], ac, 3)?,
                ConvSeg::new(&a.pp("conv_seg"), ac, spec.classes)?,
            ))
        } else {
            None
        };
        Ok(UperNet {
            backbone,
            ppm,
            bottleneck,
            laterals,
            fpn_convs,
            fpn_bottleneck,
            conv_seg,
            aux,
            channels,
            classes: spec.classes,
        })
    }

    /// The four Swin stage outputs (no stochastic depth), for cross-checks.
    pub fn backbone_outputs(&self, images: &Tensor) -> candle_core::Result<Vec<Tensor>> {
        self.backbone.forward(images, None)
    }

    /// The auxiliary head's eval-mode logits `[N, K, H/16, W/16]` (the trainer computes them
    /// only in training, as mmsegmentation does; this serves cross-checks of the head).
    pub fn auxiliary_logits_eval(&self, images: &Tensor) -> candle_core::Result<Tensor> {
        let stages = self.backbone.forward(images, None)?;
        match &self.aux {
            Some((conv, seg)) => seg.forward(&conv.forward(&stages[2], false)?),
            None => candle_core::bail!("this UPerNet has no auxiliary head"),
        }
    }

    fn decode(&self, stages: &[Tensor], train: bool) -> candle_core::Result<Tensor> {
        let top = &stages[3];
        let (_, _, h3, w3) = top.dims4()?;
        let mut pyramid = vec![top.clone()];
        for (conv, &s) in self.ppm.iter().zip(&POOL_SCALES) {
            let pooled = conv.forward(&adaptive_avg_pool(top, s)?, train)?;
            pyramid.push(resize_bilinear(&pooled, h3, w3)?);
        }
        let mut levels = stages[..3]
            .iter()
            .zip(&self.laterals)
            .map(|(s, c)| c.forward(s, train))
            .collect::<candle_core::Result<Vec<_>>>()?;
        levels.push(self.bottleneck.forward(&Tensor::cat(&pyramid, 1)?, train)?);
        for i in (1..4).rev() {
            let (_, _, h, w) = levels[i - 1].dims4()?;
            levels[i - 1] = (&levels[i - 1] + resize_bilinear(&levels[i], h, w)?)?;
        }
        let (_, _, h0, w0) = levels[0].dims4()?;
        let mut outs = Vec::with_capacity(4);
        for (i, level) in levels.iter().enumerate() {
            let y = match self.fpn_convs.get(i) {
                Some(c) => c.forward(level, train)?,
                None => level.clone(),
            };
            outs.push(resize_bilinear(&y, h0, w0)?);
        }
        self.fpn_bottleneck.forward(&Tensor::cat(&outs, 1)?, train)
    }
}

impl Segmenter for UperNet {
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
        let main = self.decode(&stages, train)?;
        let aux = match (&self.aux, train) {
            (Some((conv, _)), true) => Some(conv.forward(&stages[2], train)?),
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
            None => candle_core::bail!("this UPerNet has no auxiliary head"),
        }
    }
    fn feature_dim(&self) -> usize {
        self.channels
    }
    fn classes(&self) -> usize {
        self.classes
    }
    fn has_aux(&self) -> bool {
        self.aux.is_some()
    }
    fn output_stride(&self) -> usize {
        4
    }
    fn cost(&self, h: usize, w: usize) -> Cost {
        let (mut total, sizes) = self.backbone.cost(h, w);
        let (h0, w0) = sizes[0];
        let (h3, w3) = sizes[3];
        for (c, &s) in self.ppm.iter().zip(&POOL_SCALES) {
            total = total + c.cost(s, s).0;
        }
        total = total + self.bottleneck.cost(h3, w3).0;
        for (i, (l, f)) in self.laterals.iter().zip(&self.fpn_convs).enumerate() {
            let (sh, sw) = sizes[i];
            total = total + l.cost(sh, sw).0 + f.cost(sh, sw).0;
        }
        total + self.fpn_bottleneck.cost(h0, w0).0 + self.conv_seg.cost(h0 * w0)
    }
    fn aux_params(&self) -> u64 {
        match &self.aux {
            Some((conv, seg)) => conv.cost(1, 1).0.params + seg.cost(0).params,
            None => 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// PyTorch's bins: 5 inputs to 3 outputs are {0, 1}, {1, 2, 3}, {3, 4}; 2 to 6 repeat.
    #[test]
    fn adaptive_pool_bins_are_pytorchs() {
        let m = adaptive_pool_matrix(5, 3);
        let rows: Vec<Vec<f64>> = m.chunks(5).map(|r| r.to_vec()).collect();
        assert_eq!(rows[0], vec![0.5, 0.5, 0.0, 0.0, 0.0]);
        let third = 1.0 / 3.0;
        assert_eq!(rows[1], vec![0.0, third, third, third, 0.0]);
        assert_eq!(rows[2], vec![0.0, 0.0, 0.0, 0.5, 0.5]);
        let m = adaptive_pool_matrix(2, 6);
        let firsts: Vec<f64> = m.chunks(2).map(|r| r[0]).collect();
        assert_eq!(firsts, vec![1.0, 1.0, 1.0, 0.0, 0.0, 0.0]);
    }
}
