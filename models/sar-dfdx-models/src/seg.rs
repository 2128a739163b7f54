//! Segmentation networks on dfdx: mmsegmentation's dilated ResNet V1c with the FCN or
//! DeepLabV3 (ASPP) decode head and the auxiliary FCN head, HRNetV2 with FCN or OCRNet, and
//! (in their own modules, dispatched from here) SegFormer on MiT ([`crate::mit`]) and UPerNet
//! on Swin ([`crate::swin`]), under the names `sar-models`' candle networks use
//! (`backbone.*`, `decode_head.*`, `auxiliary_head.*`), so either library loads the other's
//! checkpoints.
//!
//! Activations are NHWC rows `[N·h·w, C]` (see [`sar_dfdx::conv`]).
//!
//! - Backbone, base width w: stem `backbone.stem.{0,3,6}` 3×3 convs (3 → w/2 stride 2,
//!   w/2 → w/2, w/2 → w) each with BatchNorm `stem.{1,4,7}` and ReLU, then a 3×3/2 max-pool
//!   (padding 1); stages `layer1..4` of widths w·2^s (×4 for Bottlenecks), strides 1/2/1/1 and
//!   dilations 1/1/2/4, the first block of a dilated stage at half its dilation
//!   (`contract_dilation`); a BasicBlock's second conv is not dilated. Output stride 8.
//! - FCN decode head on stage 4 (C channels, D = C/4): `convs.0` 3×3 (C → D), `convs.1` 3×3
//!   (D → D), `conv_cat` 3×3 over the channel concatenation [stage 4, convs] (C + D → D), each
//!   a ConvModule (`{name}.conv` → `{name}.bn` → ReLU).
//! - ASPP decode head on stage 4: `image_pool.1` (the per-image mean of stage 4, a 1×1
//!   ConvModule, broadcast back to every pixel), `aspp_modules.0` 1×1 and `aspp_modules.1..3`
//!   3×3 with dilations 12, 24, 36 (padding = dilation), concatenated in that order after the
//!   pool (5·D channels), `bottleneck` 3×3 → D.
//! - OCRNet on HRNetV2 ([`SegHead::Ocr`]; HRNet's branches resized and concatenated into X
//!   `[N·h·w, 15W]`): the FCN head `decode_head.0` (1×1 ConvModule `convs.0`, its `conv_seg`
//!   giving the soft object regions and the auxiliary loss) and the OCR head `decode_head.1`
//!   (`bottleneck` 3×3 → pixel features, spatial gather, the object attention block
//!   `object_context_block.*`, fused by its `bottleneck`); F is the OCR head's output, its
//!   classifier `decode_head.1.conv_seg` the one SAR shares.
//! - Auxiliary head on stage 3 (C₃ channels): `auxiliary_head.convs.0` 3×3 ConvModule →
//!   C₃/4.
//! - Classifiers: `decode_head.conv_seg` and `auxiliary_head.conv_seg`, 1×1 convs with bias
//!   (weight `[K, D, 1, 1]`), applied to rows, so SAR's anchors go through the same weights.
//!
//! [`SegNet::features`] returns the decode head's features F (what SAR pulls toward its
//! anchors, before dropout and `conv_seg`) and, in training mode with an auxiliary head, the
//! auxiliary features.

use crate::{Block, Forward};
use sar_dfdx::conv::max_pool2d;
use sar_dfdx::dfdx::prelude::*;
use sar_dfdx::nn::{linear, Params, Rows};
use sar_dfdx::{ConvOut, Float, Result, SarDevice, SarDfdxError};

/// mmsegmentation's OCR head `channels` (its `ocr_channels` are half of it) at width 64.
const OCR_CHANNELS: usize = 512;

/// Depth of the dilated ResNet V1c.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum V1cDepth {
    /// BasicBlocks [2, 2, 2, 2].
    R18,
    /// Bottlenecks [3, 4, 6, 3].
    R50,
    /// Bottlenecks [3, 4, 23, 3].
    R101,
}

/// The decode head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SegHead {
    /// FCN (two 3×3 ConvModules and `conv_cat`).
    Fcn,
    /// DeepLabV3's ASPP.
    Aspp,
    /// OCRNet on HRNetV2 (mmsegmentation's cascade `decode_head.0` FCN → `decode_head.1`
    /// OCR); `width` scales the OCR head's 512 and 256 channels by width/64 (64: published).
    Ocr {
        /// The head's width (`sar-models`' `SegSpec::width`).
        width: usize,
    },
    /// SegFormer's all-MLP head on a Mix Transformer ([`crate::mit`]).
    SegFormer,
    /// UPerNet (pyramid pooling + FPN) on a Swin Transformer ([`crate::swin`]).
    Uper,
}

/// Which Swin Transformer (see [`crate::swin`] for E, depths and heads).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SwinVariant {
    /// Swin-T.
    Tiny,
    /// Swin-S.
    Small,
    /// Swin-B.
    Base,
    /// Swin-L.
    Large,
}

/// Stochastic depth in training: the largest rate (block k of K drops its residual branches
/// per sample with probability `rate·k/(K − 1)`) and the generator its masks come from.
pub struct DropPath<'r> {
    /// The largest rate (mmsegmentation: 0.1 for MiT, 0.3 for Swin).
    pub rate: f64,
    /// The masks' generator (the trainer's, drawn before the dropout masks).
    pub rng: &'r mut sar_math::rng::SeededRng,
}

/// The backbone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SegBackbone {
    /// The dilated ResNet V1c (output stride 8).
    ResNetV1c(V1cDepth),
    /// HRNetV2 (output stride 4); [`SegNet::width`] is its W (18, 48).
    HrNetV2,
    /// Mix Transformer B0 … B5 by number (output stride 4, SegFormer's head);
    /// [`SegNet::width`] scales its E by width/64.
    Mit(u8),
    /// Swin Transformer with attention window M (output stride 4, UPerNet's head);
    /// [`SegNet::width`] scales its E by width/64.
    Swin {
        /// Which Swin.
        variant: SwinVariant,
        /// The window M.
        window: usize,
    },
}

/// A segmentation network (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegNet {
    /// Backbone.
    pub backbone: SegBackbone,
    /// Decode head.
    pub head: SegHead,
    /// With the auxiliary FCN head on stage 3.
    pub aux: bool,
    /// Base width w of the ResNet stages (64 is the standard network), or HRNet's W.
    pub width: usize,
}

/// What [`SegNet::features`] computes.
pub struct SegOut<E: Float, D: SarDevice<E>, T> {
    /// The decode head's features F `[N·h·w, D]`.
    pub main: Rows<D, T, E>,
    /// The auxiliary head's features `[N·h·w, C₃/4]` (training mode, with an auxiliary head).
    pub aux: Option<Rows<D, T, E>>,
    /// The features' (h, w): the input's / 8 (HRNet and the transformers: / 4), rounded up
    /// per strided layer.
    pub hw: (usize, usize),
    /// The auxiliary features' (h, w): `hw`, except UPerNet's (Swin's stage 2, stride 16).
    pub aux_hw: (usize, usize),
}

fn config_err<T>(msg: String) -> Result<T> {
    Err(SarDfdxError::Shape(msg))
}

impl SegNet {
    /// The network, checked: a ResNet's width a multiple of 4 (at least 4); HRNet with the
    /// FCN head and no auxiliary head (as mmsegmentation's `fcn_hr18` / `fcn_hr48`).
    pub fn new(backbone: SegBackbone, head: SegHead, aux: bool, width: usize) -> Result<Self> {
        match backbone {
            SegBackbone::ResNetV1c(_) if width < 4 || !width.is_multiple_of(4) => {
                return config_err(format!(
                    "the backbone width must be a multiple of 4 (≥ 4), got {width}"
                ));
            }
            SegBackbone::HrNetV2 => {
                let ok = match head {
                    SegHead::Fcn => !aux,
                    // OCRNet's FCN head (the soft regions) is its auxiliary head.
                    SegHead::Ocr { width: w } => aux && w > 0,
                    SegHead::Aspp | SegHead::SegFormer | SegHead::Uper => false,
                };
                if !ok || width == 0 {
                    return config_err(format!(
                        "HRNetV2 takes the FCN head over its concatenated branches without an auxiliary head, or OCRNet's heads with theirs (got {head:?}, aux {aux}, W = {width})"
                    ));
                }
            }
            SegBackbone::ResNetV1c(_) if matches!(head, SegHead::Ocr { .. }) => {
                return config_err("OCRNet's heads take HRNetV2's branches, not a ResNet".into());
            }
            SegBackbone::Mit(b) => {
                let channels = if b <= 1 { 256 } else { 768 };
                if head != SegHead::SegFormer
                    || aux
                    || b > 5
                    || width < 4
                    || !width.is_multiple_of(4)
                    || !(width * channels).is_multiple_of(64)
                {
                    return config_err(format!(
                        "MiT-B0 … B5 take SegFormer's head without an auxiliary head at a width that is a multiple of 4 (got B{b}, {head:?}, aux {aux}, width {width})"
                    ));
                }
            }
            SegBackbone::Swin { window, .. }
                if head != SegHead::Uper
                    || window == 0
                    || width < 4
                    || !width.is_multiple_of(4) =>
            {
                return config_err(format!(
                    "a Swin takes UPerNet's head with a window ≥ 1 at a width that is a multiple of 4 (got {head:?}, window {window}, width {width})"
                ));
            }
            _ => {}
        }
        if matches!(backbone, SegBackbone::ResNetV1c(_) | SegBackbone::HrNetV2)
            && matches!(head, SegHead::SegFormer | SegHead::Uper)
        {
            return config_err(format!(
                "the {head:?} head takes a transformer backbone (SegFormer: MiT, UPerNet: Swin), not {backbone:?}"
            ));
        }
        Ok(SegNet {
            backbone,
            head,
            aux,
            width,
        })
    }

    /// Blocks per stage and Bottleneck expansion of the ResNet (HRNet: none).
    fn resnet(&self) -> Option<([usize; 4], usize)> {
        match self.backbone {
            SegBackbone::ResNetV1c(V1cDepth::R18) => Some(([2, 2, 2, 2], 1)),
            SegBackbone::ResNetV1c(V1cDepth::R50) => Some(([3, 4, 6, 3], 4)),
            SegBackbone::ResNetV1c(V1cDepth::R101) => Some(([3, 4, 23, 3], 4)),
            _ => None,
        }
    }

    /// Channels of ResNet stage s (0-based).
    fn stage_width(&self, s: usize) -> usize {
        (self.width << s) * self.resnet().map_or(1, |r| r.1)
    }

    /// D, the decode head's feature width (a ResNet's stage 4 / 4; HRNet's 15·W; OCRNet's
    /// 512·width/64).
    pub fn feature_dim(&self) -> usize {
        match (self.backbone, self.head) {
            (_, SegHead::Ocr { width }) => OCR_CHANNELS * width / 64,
            (SegBackbone::Mit(b), _) => crate::mit::head_channels(b, self.width),
            (SegBackbone::Swin { .. }, _) => crate::swin::UPER_CHANNELS * self.width / 64,
            (SegBackbone::HrNetV2, _) => 15 * self.width,
            (SegBackbone::ResNetV1c(_), _) => self.stage_width(3) / 4,
        }
    }

    /// The auxiliary head's feature width (a ResNet's stage 3 / 4; OCRNet's FCN: 15·W).
    pub fn aux_dim(&self) -> usize {
        match self.head {
            SegHead::Ocr { .. } => 15 * self.width,
            SegHead::Uper => crate::swin::UPER_AUX_CHANNELS * self.width / 64,
            SegHead::SegFormer => 0,
            _ => self.stage_width(2) / 4,
        }
    }

    /// The name of the classifier (`conv_seg`) of the decode head, or of the auxiliary head
    /// with `aux` (OCRNet: `decode_head.1` and its FCN `decode_head.0`).
    pub fn classifier_name(&self, aux: bool) -> &'static str {
        match (self.head, aux) {
            (SegHead::Ocr { .. }, false) => "decode_head.1.conv_seg",
            (SegHead::Ocr { .. }, true) => "decode_head.0.conv_seg",
            (_, false) => "decode_head.conv_seg",
            (_, true) => "auxiliary_head.conv_seg",
        }
    }

    /// Decode (and, in training mode with an auxiliary head, auxiliary) features of images
    /// given as NHWC rows `[N·H·W, C]`, without stochastic depth.
    pub fn features<E, D, T>(
        &self,
        f: &mut Forward<D, E>,
        x: Rows<D, T, E>,
        size: (usize, usize, usize),
    ) -> Result<SegOut<E, D, T>>
    where
        E: Float + num_traits::float::FloatCore,
        D: SarDevice<E>,
        T: Tape<E, D>,
    {
        self.features_with_noise(f, x, size, None)
    }

    /// [`SegNet::features`] with the transformers' stochastic depth in training mode
    /// (`drop`; the other networks have no random layers and ignore it).
    pub fn features_with_noise<E, D, T>(
        &self,
        f: &mut Forward<D, E>,
        x: Rows<D, T, E>,
        (n, h, w): (usize, usize, usize),
        drop: Option<DropPath<'_>>,
    ) -> Result<SegOut<E, D, T>>
    where
        E: Float + num_traits::float::FloatCore,
        D: SarDevice<E>,
        T: Tape<E, D>,
    {
        let drop = if f.train { drop } else { None };
        match self.backbone {
            SegBackbone::Mit(b) => {
                let (main, hw) = crate::mit::segformer(f, x, (n, h, w), b, self.width, drop)?;
                return Ok(SegOut {
                    main,
                    aux: None,
                    hw,
                    aux_hw: hw,
                });
            }
            SegBackbone::Swin { variant, window } => {
                return crate::swin::upernet(
                    f,
                    x,
                    (n, h, w),
                    (variant, window, self.width, self.aux),
                    drop,
                );
            }
            _ => {}
        }
        if self.backbone == SegBackbone::HrNetV2 {
            let (branches, sizes) = hrnet(f, x, (n, h, w), self.width)?;
            let cat = concat_branches(branches, &sizes, n)?;
            let (fh, fw) = sizes[0];
            if let SegHead::Ocr { .. } = self.head {
                let (main, fcn) = ocr(f, cat, (n, fh, fw))?;
                return Ok(SegOut {
                    main,
                    aux: f.train.then_some(fcn),
                    hw: sizes[0],
                    aux_hw: sizes[0],
                });
            }
            let main = conv_bn(f, cat, "decode_head.convs.0", (n, fh, fw), (0, 1))?.0;
            return Ok(SegOut {
                main,
                aux: None,
                hw: sizes[0],
                aux_hw: sizes[0],
            });
        }
        let (stage3, hw3, stage4, hw4) = self.resnet_backbone(f, x, (n, h, w))?;
        let aux = if self.aux && f.train {
            let (a, _) = conv_bn(
                f,
                stage3,
                "auxiliary_head.convs.0",
                (n, hw3.0, hw3.1),
                (1, 1),
            )?;
            Some(a)
        } else {
            None
        };
        let main = match self.head {
            SegHead::Aspp => self.aspp(f, stage4, (n, hw4.0, hw4.1))?,
            _ => self.fcn(f, stage4, (n, hw4.0, hw4.1))?,
        };
        Ok(SegOut {
            main,
            aux,
            hw: hw4,
            aux_hw: hw3,
        })
    }

    /// Logits `[M, K]` of feature rows: `decode_head.conv_seg`, or `auxiliary_head.conv_seg`
    /// with `aux`.
    pub fn classify<E: Float, D: SarDevice<E>, T: Tape<E, D>>(
        &self,
        params: &Params<D, E>,
        features: Rows<D, T, E>,
        aux: bool,
    ) -> Result<Rows<D, T, E>> {
        linear(params, features, self.classifier_name(aux))
    }

    /// Stage 3 and stage 4 with their sizes.
    #[allow(clippy::type_complexity)]
    fn resnet_backbone<E: Float, D: SarDevice<E>, T: Tape<E, D>>(
        &self,
        f: &mut Forward<D, E>,
        x: Rows<D, T, E>,
        (n, h, w): (usize, usize, usize),
    ) -> Result<(Rows<D, T, E>, (usize, usize), Rows<D, T, E>, (usize, usize))> {
        let mut x = x;
        let mut hw = (h, w);
        for (i, stride) in [(0, 2), (3, 1), (6, 1)] {
            let conv = format!("backbone.stem.{i}");
            let bn = format!("backbone.stem.{}", i + 1);
            let (y, o) = f.conv(x, &conv, (n, hw.0, hw.1), stride, 1)?;
            x = f.bn(y, &bn, true)?;
            hw = o;
        }
        (x, hw) = max_pool2d(f.cache, x, (n, hw.0, hw.1), 3, 2, 1)?;
        let (counts, expansion) = self
            .resnet()
            .ok_or_else(|| SarDfdxError::Shape("not a ResNet".into()))?;
        let (strides, dilations) = ([1usize, 2, 1, 1], [1usize, 1, 2, 4]);
        let mut stage3 = None;
        for stage in 0..4 {
            for i in 0..counts[stage] {
                let d = dilations[stage];
                let block = Block {
                    bottleneck: expansion == 4,
                    width: self.width << stage,
                    stride: if i == 0 { strides[stage] } else { 1 },
                    dilation: if i == 0 && d > 1 { d / 2 } else { d },
                };
                let name = format!("backbone.layer{}.{i}", stage + 1);
                (x, hw) = f.residual_block(x, &name, (n, hw.0, hw.1), block)?;
            }
            if stage == 2 {
                stage3 = Some((x.retaped::<T>(), hw));
            }
        }
        let (s3, hw3) = stage3.ok_or_else(|| SarDfdxError::Shape("no stage 3".into()))?;
        // Stage 3's copy carries an empty tape; the backbone's joins through stage 4.
        Ok((s3, hw3, x, hw))
    }

    /// FCN on stage 4 (see the module docs).
    fn fcn<E: Float, D: SarDevice<E>, T: Tape<E, D>>(
        &self,
        f: &mut Forward<D, E>,
        x: Rows<D, T, E>,
        size: (usize, usize, usize),
    ) -> Result<Rows<D, T, E>> {
        let (y, _) = conv_bn(f, x.retaped::<T>(), "decode_head.convs.0", size, (1, 1))?;
        let (y, _) = conv_bn(f, y, "decode_head.convs.1", size, (1, 1))?;
        let cat = (x, y).concat_along(Axis::<1>);
        Ok(conv_bn(f, cat, "decode_head.conv_cat", size, (1, 1))?.0)
    }

    /// DeepLabV3's ASPP on stage 4 (see the module docs).
    fn aspp<E: Float, D: SarDevice<E>, T: Tape<E, D>>(
        &self,
        f: &mut Forward<D, E>,
        x: Rows<D, T, E>,
        (n, h, w): (usize, usize, usize),
    ) -> Result<Rows<D, T, E>> {
        let c = x.shape().1;
        let pooled = x
            .retaped::<T>()
            .reshape_like(&(n, h * w, c))
            .mean::<(usize, usize), Axis<1>>();
        let (pooled, _) = conv_bn(f, pooled, "decode_head.image_pool.1", (n, 1, 1), (0, 1))?;
        // Every pixel takes its image's row (the gather's backward sums over the pixels).
        let dev = pooled.device().clone();
        let rows: Vec<usize> = (0..n * h * w).map(|p| p / (h * w)).collect();
        let mut out = pooled.gather(dev.tensor_from_vec(rows, (n * h * w,)));
        for (i, d) in [1usize, 12, 24, 36].into_iter().enumerate() {
            let name = format!("decode_head.aspp_modules.{i}");
            let geometry = if d == 1 { (0, 1) } else { (d, d) };
            let (b, _) = conv_bn(f, x.retaped::<T>(), &name, (n, h, w), geometry)?;
            out = (out, b).concat_along(Axis::<1>);
        }
        // `x`'s own tape (the backbone) joins the head's here.
        let (out, tape) = out.split_tape();
        let (_, x_tape) = x.split_tape();
        let out = out.put_tape(tape.merge(x_tape));
        Ok(conv_bn(f, out, "decode_head.bottleneck", (n, h, w), (1, 1))?.0)
    }
}

/// A conv `{conv}.weight` (no bias, K×K from the weight, padding (K − 1)/2, `stride`) →
/// BatchNorm `{bn}` → optional ReLU: an `nn.Sequential`'s numbered children.
#[allow(clippy::too_many_arguments)]
fn conv_bn_plain<E: Float, D: SarDevice<E>, T: Tape<E, D>>(
    f: &mut Forward<D, E>,
    x: Rows<D, T, E>,
    conv: &str,
    bn: &str,
    size: (usize, usize, usize),
    stride: usize,
    relu: bool,
) -> Result<ConvOut<E, D, T>> {
    let k = f
        .params
        .shape(&format!("{conv}.weight"))?
        .get(2)
        .copied()
        .unwrap_or(1);
    let (y, hw) = f.conv(x, conv, size, stride, k.saturating_sub(1) / 2)?;
    Ok((f.bn(y, bn, relu)?, hw))
}

/// Joins the tapes of `others` (copies of which the graph used with empty tapes) into `x`'s.
pub(crate) fn join_tapes<E: Float, D: SarDevice<E>, T: Tape<E, D>>(
    x: Rows<D, T, E>,
    others: Vec<Rows<D, T, E>>,
) -> Rows<D, T, E> {
    let (x, mut tape) = x.split_tape();
    for o in others {
        let (_, t) = o.split_tape();
        tape = tape.merge(t);
    }
    x.put_tape(tape)
}

/// Two row tensors (OCRNet's features and its FCN head's).
type RowsPair<E, D, T> = (Rows<D, T, E>, Rows<D, T, E>);

/// Branch outputs with their sizes.
type Branches<E, D, T> = (Vec<Rows<D, T, E>>, Vec<(usize, usize)>);

/// HRNetV2-W`width` (mmsegmentation's `HRNet`, names `backbone.*`): the four branch outputs
/// at strides 4/8/16/32 and their sizes. Structure as `sar-models`' candle HRNet: stem
/// `conv1`/`bn1`, `conv2`/`bn2` (3×3/2, 64), `layer1` (4 Bottlenecks → 256), then stages 2–4
/// (1, 4, 3 modules) of W·2^b-wide branches of 4 BasicBlocks each, entered through
/// `transition{s−1}` and fused by `fuse_layers` (1×1 conv + BN and a bilinear resize from
/// lower resolutions, strided 3×3 convs from higher ones, then ReLU of the sum).
fn hrnet<E, D, T>(
    f: &mut Forward<D, E>,
    x: Rows<D, T, E>,
    (n, h, w): (usize, usize, usize),
    width: usize,
) -> Result<Branches<E, D, T>>
where
    E: Float + num_traits::float::FloatCore,
    D: SarDevice<E>,
    T: Tape<E, D>,
{
    let (x, hw) = conv_bn_plain(f, x, "backbone.conv1", "backbone.bn1", (n, h, w), 2, true)?;
    let (mut x, mut hw) = conv_bn_plain(
        f,
        x,
        "backbone.conv2",
        "backbone.bn2",
        (n, hw.0, hw.1),
        2,
        true,
    )?;
    for k in 0..4 {
        let block = Block {
            bottleneck: true,
            width: 64,
            stride: 1,
            dilation: 1,
        };
        (x, hw) = f.residual_block(x, &format!("backbone.layer1.{k}"), (n, hw.0, hw.1), block)?;
    }
    let channels = [width, 2 * width, 4 * width, 8 * width];
    let (mut ys, mut sizes, mut pre) = (vec![x], vec![hw], vec![256usize]);
    for (s, modules) in [(2usize, 1usize), (3, 4), (4, 3)] {
        let mut xs = Vec::with_capacity(s);
        let mut hws = Vec::with_capacity(s);
        let last = ys.len() - 1;
        // A new branch starts from the last existing one (a copy; its tape joins below).
        let from_last = ys[last].retaped::<T>();
        let mut old = ys.into_iter();
        for (i, &c) in channels[..s].iter().enumerate() {
            let t = format!("backbone.transition{}.{i}", s - 1);
            if i < pre.len() {
                let y = old
                    .next()
                    .ok_or_else(|| SarDfdxError::Shape("HRNet: a branch is missing".into()))?;
                let size = (n, sizes[i].0, sizes[i].1);
                let (y, hw) = if pre[i] == c {
                    (y, sizes[i])
                } else {
                    conv_bn_plain(f, y, &format!("{t}.0"), &format!("{t}.1"), size, 1, true)?
                };
                xs.push(y);
                hws.push(hw);
            } else {
                let (mut y, mut hw) = (from_last.retaped::<T>(), sizes[last]);
                for j in 0..i + 1 - pre.len() {
                    let (conv, bn) = (format!("{t}.{j}.0"), format!("{t}.{j}.1"));
                    (y, hw) = conv_bn_plain(f, y, &conv, &bn, (n, hw.0, hw.1), 2, true)?;
                }
                xs.push(y);
                hws.push(hw);
            }
        }
        for m in 0..modules {
            xs = hr_module(f, xs, &hws, n, &format!("backbone.stage{s}.{m}"))?;
        }
        ys = xs;
        sizes = hws;
        pre = channels[..s].to_vec();
    }
    Ok((ys, sizes))
}

/// One HR module `{name}`: 4 BasicBlocks per branch, then the fusion (see [`hrnet`]).
fn hr_module<E, D, T>(
    f: &mut Forward<D, E>,
    xs: Vec<Rows<D, T, E>>,
    sizes: &[(usize, usize)],
    n: usize,
    name: &str,
) -> Result<Vec<Rows<D, T, E>>>
where
    E: Float + num_traits::float::FloatCore,
    D: SarDevice<E>,
    T: Tape<E, D>,
{
    let mut ys = Vec::with_capacity(xs.len());
    for (b, (mut x, &(h, w))) in xs.into_iter().zip(sizes).enumerate() {
        let c = x.shape().1;
        for k in 0..4 {
            let block = Block {
                bottleneck: false,
                width: c,
                stride: 1,
                dilation: 1,
            };
            (x, _) = f.residual_block(x, &format!("{name}.branches.{b}.{k}"), (n, h, w), block)?;
        }
        ys.push(x);
    }
    let mut out = Vec::with_capacity(ys.len());
    for (i, &(h, w)) in sizes.iter().enumerate() {
        let mut acc: Option<Rows<D, T, E>> = None;
        for (j, y) in ys.iter().enumerate() {
            let fl = format!("{name}.fuse_layers.{i}.{j}");
            let (hj, wj) = sizes[j];
            let t = if j == i {
                y.retaped::<T>()
            } else if j > i {
                let size = (n, hj, wj);
                let (t, _) = conv_bn_plain(
                    f,
                    y.retaped::<T>(),
                    &format!("{fl}.0"),
                    &format!("{fl}.1"),
                    size,
                    1,
                    false,
                )?;
                resize_bilinear(t, size, (h, w))?
            } else {
                let (mut t, mut hw) = (y.retaped::<T>(), (hj, wj));
                for k in 0..i - j {
                    let (conv, bn) = (format!("{fl}.{k}.0"), format!("{fl}.{k}.1"));
                    let relu = k + 1 < i - j;
                    (t, hw) = conv_bn_plain(f, t, &conv, &bn, (n, hw.0, hw.1), 2, relu)?;
                }
                t
            };
            acc = Some(match acc {
                None => t,
                Some(a) => a + t,
            });
        }
        let sum = acc.ok_or_else(|| SarDfdxError::Shape("HR module without branches".into()))?;
        out.push(sum.relu());
    }
    // Every use above took a copy with an empty tape: the branches' own tapes join output 0's.
    let first = out.remove(0);
    out.insert(0, join_tapes(first, ys));
    Ok(out)
}

/// HRNetV2's branches resized bilinearly to the first one's size and concatenated
/// (mmsegmentation's `resize_concat`): X `[N·h·w, 15·W]`.
fn concat_branches<E, D, T>(
    branches: Vec<Rows<D, T, E>>,
    sizes: &[(usize, usize)],
    n: usize,
) -> Result<Rows<D, T, E>>
where
    E: Float + num_traits::float::FloatCore,
    D: SarDevice<E>,
    T: Tape<E, D>,
{
    let (h, w) = sizes[0];
    let mut cat: Option<Rows<D, T, E>> = None;
    for (b, &(hb, wb)) in branches.into_iter().zip(sizes) {
        let up = resize_bilinear(b, (n, hb, wb), (h, w))?;
        cat = Some(match cat {
            None => up,
            Some(c) => (c, up).concat_along(Axis::<1>),
        });
    }
    cat.ok_or_else(|| SarDfdxError::Shape("HRNet without branches".into()))
}

/// OCRNet's heads on HRNet's concatenated branches X of size (n, h, w), as `sar-models`'
/// `OcrNet`: `decode_head.0` (a 1×1 ConvModule, the FCN features, whose `conv_seg` gives the
/// soft object regions R `[N·h·w, K]`) and `decode_head.1`: a 3×3 ConvModule `bottleneck` →
/// pixel features P `[N·h·w, C]`; per image, softmax of R over the h·w positions times P →
/// the regions' representations `[N·K, C]`; the object attention block
/// (`object_context_block`): queries from P and keys from the regions by two 1×1 ConvModules
/// each, values by one, softmax(q·kᵀ/√C') over the K regions, the context through
/// `out_project`, concatenated [context, P] and fused by `bottleneck`. Returns (F, the FCN
/// features); gradients reach the FCN head through R as well (not detached).
fn ocr<E, D, T>(
    f: &mut Forward<D, E>,
    x: Rows<D, T, E>,
    (n, h, w): (usize, usize, usize),
) -> Result<RowsPair<E, D, T>>
where
    E: Float + num_traits::float::FloatCore,
    D: SarDevice<E>,
    T: Tape<E, D>,
{
    let hw = h * w;
    let (fcn, _) = conv_bn(
        f,
        x.retaped::<T>(),
        "decode_head.0.convs.0",
        (n, h, w),
        (0, 1),
    )?;
    let regions = linear(f.params, fcn.retaped::<T>(), "decode_head.0.conv_seg")?;
    let k = regions.shape().1;
    // `x`'s own tape (the backbone) goes on with the pixel features.
    let (pixels, _) = conv_bn(f, x, "decode_head.1.bottleneck", (n, h, w), (1, 1))?;
    let c = pixels.shape().1;
    // Spatial gather: per image and class, a softmax over the positions weights the pixels.
    // The softmax runs over axis 1 of the contiguous [N, h·w, K], not over the last axis of a
    // permuted view: dfdx's softmax keeps its input's id across an internal subtraction whose
    // output is laid out afresh, so on a permuted input its gradient lands transposed (wrong
    // gradients, measured against candle).
    let probs = regions.reshape_like(&(n, hw, k)).softmax::<Axis<1>>();
    let objects = probs
        .permute::<_, Axes3<0, 2, 1>>()
        .matmul(pixels.retaped::<T>().reshape_like(&(n, hw, c)))
        .reshape_like(&(n * k, c));
    // Object attention: the pixels query the K region representations (maps K × 1).
    let ocb = "decode_head.1.object_context_block";
    let mut q = pixels.retaped::<T>();
    let mut key = objects.retaped::<T>();
    for i in 0..2 {
        q = conv_bn(f, q, &format!("{ocb}.query_project.{i}"), (n, h, w), (0, 1))?.0;
        key = conv_bn(f, key, &format!("{ocb}.key_project.{i}"), (n, k, 1), (0, 1))?.0;
    }
    let value = conv_bn(
        f,
        objects,
        &format!("{ocb}.value_project"),
        (n, k, 1),
        (0, 1),
    )?
    .0;
    let o = q.shape().1;
    let scale = <E as num_traits::NumCast>::from((o as f64).powf(-0.5)).unwrap_or_else(E::zero);
    let sim = q
        .reshape_like(&(n, hw, o))
        .matmul(key.reshape_like(&(n, k, o)).permute::<_, Axes3<0, 2, 1>>());
    let sim = (sim * scale).softmax::<Axis<2>>();
    let context = sim
        .matmul(value.reshape_like(&(n, k, o)))
        .reshape_like(&(n * hw, o));
    let context = conv_bn(f, context, &format!("{ocb}.out_project"), (n, h, w), (0, 1))?.0;
    let cat = (context, pixels).concat_along(Axis::<1>);
    let main = conv_bn(f, cat, &format!("{ocb}.bottleneck"), (n, h, w), (0, 1))?.0;
    Ok((main, fcn))
}

/// mmcv's ConvModule `{name}.conv` (no bias) → `{name}.bn` → ReLU, stride 1, with `(padding,
/// dilation)`.
pub(crate) fn conv_bn<E: Float, D: SarDevice<E>, T: Tape<E, D>>(
    f: &mut Forward<D, E>,
    x: Rows<D, T, E>,
    name: &str,
    size: (usize, usize, usize),
    (pad, dilation): (usize, usize),
) -> Result<ConvOut<E, D, T>> {
    let (y, hw) = f.conv_dilated(x, &format!("{name}.conv"), size, 1, pad, dilation)?;
    Ok((f.bn(y, &format!("{name}.bn"), true)?, hw))
}

/// Bilinear resize (PyTorch's `align_corners=False`,
/// [`sar_math::resample::bilinear_source`] per axis, coordinates in `E`) of NHWC rows
/// `[N·H·W, C]` of `(n, h, w)` pixels to `(oh, ow)`: rows `[N·OH·OW, C]`. Each output row is
/// the weighted sum of four source rows (the same row twice at a border):
/// [`sar_dfdx::taps::TapKernel`], one op with its own backward on the CPU, gathers and
/// scatter-adds elsewhere. The same size returns `x`.
pub fn resize_bilinear<E, D, T>(
    x: Rows<D, T, E>,
    (n, h, w): (usize, usize, usize),
    (oh, ow): (usize, usize),
) -> Result<Rows<D, T, E>>
where
    E: Float + num_traits::float::FloatCore,
    D: SarDevice<E>,
    T: Tape<E, D>,
{
    let rows = x.shape().0;
    if rows != n * h * w || h == 0 || w == 0 || oh == 0 || ow == 0 {
        return config_err(format!(
            "resize: {rows} rows for {n}×{h}×{w} pixels, to {oh}×{ow}"
        ));
    }
    if (h, w) == (oh, ow) {
        return Ok(x);
    }
    let ys: Vec<(usize, usize, E)> = (0..oh)
        .map(|o| sar_math::resample::bilinear_source::<E>(h, oh, o))
        .collect();
    let xs: Vec<(usize, usize, E)> = (0..ow)
        .map(|o| sar_math::resample::bilinear_source::<E>(w, ow, o))
        .collect();
    let m = n * oh * ow;
    // Taps (y0, x0), (y0, x1), (y1, x0), (y1, x1): source rows and weights per output pixel.
    let mut taps: Vec<sar_dfdx::taps::Tap<E>> = (0..4)
        .map(|_| (Vec::with_capacity(m), Vec::with_capacity(m)))
        .collect();
    for b in 0..n {
        for &(y0, y1, ly) in &ys {
            for &(x0, x1, lx) in &xs {
                let corners = [
                    (y0, x0, (E::one() - ly) * (E::one() - lx)),
                    (y0, x1, (E::one() - ly) * lx),
                    (y1, x0, ly * (E::one() - lx)),
                    (y1, x1, ly * lx),
                ];
                for ((idx, wts), (yy, xx, wt)) in taps.iter_mut().zip(corners) {
                    idx.push((b * h + yy) * w + xx);
                    wts.push(wt);
                }
            }
        }
    }
    D::weighted_taps(x, &taps)
}

/// mmsegmentation's pixel cross-entropy of logit rows `[M, K]` (already at label resolution)
/// against `labels` (`M`, `ignore` skipped): Σ over labelled pixels of −log softmax(z)_label,
/// divided by all M pixels. A label ≥ K other than `ignore` is an error naming its position.
pub fn seg_cross_entropy<E: Float, D: SarDevice<E>, T: Tape<E, D>>(
    logits: Rows<D, T, E>,
    labels: &[u8],
    ignore: u8,
) -> Result<Tensor<Rank0, E, D, T>> {
    pixel_nll(logits, labels, ignore, |_| E::one())
}

/// [`seg_cross_entropy`] with class weights w `[K]` as mmsegmentation reduces it (DisAlign's
/// generalized re-weighting): Σ over labelled pixels of w_label·(−log softmax(z)_label),
/// divided by all M pixels.
pub fn seg_weighted_cross_entropy<E: Float, D: SarDevice<E>, T: Tape<E, D>>(
    logits: Rows<D, T, E>,
    labels: &[u8],
    ignore: u8,
    weights: &[E],
) -> Result<Tensor<Rank0, E, D, T>> {
    let k = logits.shape().1;
    if weights.len() != k {
        return config_err(format!(
            "segmentation cross-entropy: {} class weights for K = {k}",
            weights.len()
        ));
    }
    pixel_nll(logits, labels, ignore, |l| weights[l as usize])
}

/// Σ over labelled pixels of `weight(label)`·(−log softmax(z)_label) / M (see
/// [`seg_cross_entropy`]).
fn pixel_nll<E: Float, D: SarDevice<E>, T: Tape<E, D>>(
    logits: Rows<D, T, E>,
    labels: &[u8],
    ignore: u8,
    weight: impl Fn(u8) -> E,
) -> Result<Tensor<Rank0, E, D, T>> {
    let (m, k) = *logits.shape();
    if labels.len() != m || m == 0 {
        return config_err(format!(
            "segmentation cross-entropy: {} labels for {m} logit rows",
            labels.len()
        ));
    }
    if let Some(i) = labels.iter().position(|&l| l != ignore && l as usize >= k) {
        return config_err(format!(
            "segmentation cross-entropy: label {} at pixel {i} is not a class (K = {k}) nor the ignore index {ignore}",
            labels[i]
        ));
    }
    let dev = logits.device().clone();
    let idx: Vec<usize> = labels
        .iter()
        .map(|&l| if l == ignore { 0 } else { l as usize })
        .collect();
    let keep: Vec<E> = labels
        .iter()
        .map(|&l| if l == ignore { E::zero() } else { weight(l) })
        .collect();
    let picked: Tensor<(usize,), E, D, T> = logits
        .log_softmax::<Axis<1>>()
        .select(dev.tensor_from_vec(idx, (m,)));
    let total = E::from(m).unwrap_or_else(E::one);
    Ok((picked * dev.tensor_from_vec(keep, (m,))).sum::<Rank0, _>() * (-E::one() / total))
}

/// `Dropout2d` on NHWC rows `[N·h·w, C]` of `n` images: whole channels of an image zeroed with
/// probability `p`, the rest scaled by 1/(1 − p), the masks drawn from `rng` image by image
/// and channel by channel (`rng.next_f64() < p` drops), as the candle trainer draws them.
pub fn dropout2d<E: Float, D: SarDevice<E>, T: Tape<E, D>>(
    x: Rows<D, T, E>,
    n: usize,
    p: f64,
    rng: &mut sar_math::rng::SeededRng,
) -> Result<Rows<D, T, E>> {
    if p <= 0.0 {
        return Ok(x);
    }
    let (rows, c) = *x.shape();
    if n == 0 || rows % n != 0 {
        return config_err(format!("dropout: {rows} rows for {n} images"));
    }
    let keep = E::from((1.0 / (1.0 - p)) as f32).unwrap_or_else(E::one);
    let mask: Vec<E> = (0..n * c)
        .map(|_| if rng.next_f64() < p { E::zero() } else { keep })
        .collect();
    let per = rows / n;
    let full: Vec<E> = (0..rows)
        .flat_map(|r| mask[(r / per) * c..(r / per + 1) * c].iter().copied())
        .collect();
    let dev = x.device().clone();
    Ok(x * dev.tensor_from_vec(full, (rows, c)))
}
