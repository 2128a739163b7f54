//! Segmentation networks for SAR (the paper's Tables 1–6), under mmsegmentation's names.
//!
//! A [`Segmenter`] maps images `[N, 3, H, W]` to the decode head's feature map F
//! `[N, D, H/8, W/8]` (HRNet: `H/4`) — the map before dropout and the classifier, which SAR's
//! L_p2a pulls toward the semantic anchors (spec §5) — and, with an auxiliary head, the
//! auxiliary feature map. [`Segmenter::classify`] is the decode head's 1×1 classifier
//! `conv_seg` (weight `[K, D, 1, 1]`, bias): on `[N, D, h, w]` maps it gives logits
//! `[N, K, h, w]`; on `[M, D]` rows (the SAR head's embedded anchors, spec §2) it gives `[M, K]`
//! with the same weights, so the classifier is shared. Dropout (mmsegmentation's `Dropout2d`,
//! p = 0.1, whole channels) is applied by the trainer between F and `classify`, from the run's
//! seed, so training stays a function of its config.
//!
//! | [`SegBackbone`] | structure | stages' widths |
//! |---|---|---|
//! | `resnet18-v1c`, `resnet50-v1c`, `resnet101-v1c` | [`resnet_v1c`]: deep stem (three 3×3 convs 32/32/64), max-pool, 4 stages with strides 1/2/1/1 and dilations 1/1/2/4 (output stride 8), `contract_dilation` | 64/128/256/512 (×4 for Bottlenecks) |
//! | `hrnetv2-w18`, `hrnetv2-w48` | [`hrnet`]: HRNetV2, 4 parallel branches at strides 4/8/16/32, fused by repeated multi-resolution exchange | W/2W/4W/8W |
//! | `mit-b0` … `mit-b5` | [`mit`]: Mix Transformer, 4 stages of overlapping patch embedding and efficient self-attention blocks at strides 4/8/16/32 | E·(1, 2, 5, 8), E = 32 (B0) or 64 |
//! | `swin-t`, `swin-s`, `swin-b`, `swin-l` | [`swin`]: Swin Transformer, 4×4 patch embedding, shifted-window attention blocks, patch merging, strides 4/8/16/32 | E·(1, 2, 4, 8), E = 96 (T, S), 128 (B), 192 (L) |
//!
//! | [`SegHeadKind`] | structure (mmsegmentation) | D |
//! |---|---|---|
//! | `fcn` on a ResNet | two 3×3 ConvModules (conv-BN-ReLU) on stage 4, concatenated with the input, a third 3×3 ConvModule (`convs.0`, `convs.1`, `conv_cat`) | stage-4 width / 4 (512 for R50/101, 128 for R18) |
//! | `fcn` on HRNetV2 | the 4 branches resized to stride 4 and concatenated, one 1×1 ConvModule | 15·W (270 for W18, 720 for W48) |
//! | `aspp` (DeepLabV3) on a ResNet | image pool (1×1) + 1×1 + three 3×3 atrous branches (dilations 12, 24, 36), concatenated, 3×3 `bottleneck` | stage-4 width / 4 |
//! | `ocr` (OCRNet) on HRNetV2 | [`ocr`]: the FCN head's region logits (weight 0.4) gather object representations from a 3×3 bottleneck's pixel features; object attention, a 1×1 fusion | 512 |
//! | `segformer` on a MiT | [`segformer`]: a 1×1 ConvModule per stage, resized to stride 4, concatenated, a 1×1 `fusion_conv` | 256 (B0, B1), 768 (B2–B5) |
//! | `uper` (UPerNet) on a Swin | [`uper`]: pyramid pooling on stage 4, an FPN with lateral and 3×3 convs, the four levels resized to stride 4, concatenated, a 3×3 `fpn_bottleneck`; auxiliary FCN head on stage 3 (256 channels) | 512 |
//!
//! The auxiliary head (ResNets, `aux = true`) is mmsegmentation's: an FCN head with one 3×3
//! ConvModule on stage 3, width stage-3 / 4, its own `conv_seg`, loss weight 0.4 (set by the
//! trainer). Names: `backbone.*`, `decode_head.*`, `auxiliary_head.*`, exactly as in an
//! mmsegmentation checkpoint, so converted checkpoints load without a mapping
//! ([`crate::pretrained`]).
//!
//! Two mmsegmentation details are kept on purpose: a ResNet BasicBlock's second 3×3 conv is
//! not dilated (padding 1, dilation 1, also in dilated stages), and with `contract_dilation`
//! the first block of a stage with dilation d > 1 uses d/2.
//!
//! Initialisation: convs Kaiming normal (fan_out), BatchNorm 1/0, `conv_seg` N(0, 0.01²) with
//! bias 0 (mmsegmentation's `normal_init(std=0.01)`).

pub mod heads;
pub mod hrnet;
pub mod mit;
pub mod ocr;
pub mod resnet_v1c;
pub mod segformer;
pub mod swin;
pub(crate) mod transformer;
pub mod uper;

use crate::layers::{Bn, Conv, ConvInit, ConvSpec};
use crate::params::{Init, Scope};
use crate::{Cost, ModelError, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;

/// What a [`Segmenter`] computes for a batch.
#[derive(Debug, Clone)]
pub struct SegFeatures {
    /// The decode head's feature map F `[N, D, h, w]` (before dropout and `conv_seg`).
    pub main: Tensor,
    /// The auxiliary head's feature map, when the model has one (training only).
    pub aux: Option<Tensor>,
}

/// A segmentation network split into features and a shared 1×1 classifier (see module docs).
pub trait Segmenter: Send + Sync {
    /// Features of images `[N, C, H, W]`; `train` selects BatchNorm's batch statistics and
    /// computes the auxiliary features (when there is an auxiliary head).
    fn features(&self, images: &Tensor, train: bool) -> candle_core::Result<SegFeatures>;
    /// [`Segmenter::features`] with the network's own random layers (SegFormer's stochastic
    /// depth) drawn from `noise` in training; networks without any ignore it.
    fn features_with_noise(
        &self,
        images: &Tensor,
        train: bool,
        noise: Option<&mut sar_math::rng::SeededRng>,
    ) -> candle_core::Result<SegFeatures> {
        let _ = noise;
        self.features(images, train)
    }
    /// The decode head's `conv_seg`: `[N, D, h, w]` → `[N, K, h, w]`, or `[M, D]` → `[M, K]`.
    fn classify(&self, features: &Tensor) -> candle_core::Result<Tensor>;
    /// The auxiliary head's `conv_seg` on auxiliary features.
    fn classify_aux(&self, features: &Tensor) -> candle_core::Result<Tensor>;
    /// D.
    fn feature_dim(&self) -> usize;
    /// K.
    fn classes(&self) -> usize;
    /// Whether there is an auxiliary head.
    fn has_aux(&self) -> bool;
    /// Output stride: input size / feature size.
    fn output_stride(&self) -> usize;
    /// Parameters and multiply-adds of inference on one `height × width` image (auxiliary
    /// head excluded: it is not used at inference; its parameters are in `aux_params`).
    fn cost(&self, height: usize, width: usize) -> Cost;
    /// Parameters of the auxiliary head (0 without one).
    fn aux_params(&self) -> u64;
    /// Logits at feature resolution `[N, K, h, w]` (eval mode, no dropout).
    fn logits(&self, images: &Tensor) -> candle_core::Result<Tensor> {
        self.classify(&self.features(images, false)?.main)
    }
}

/// Which backbone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SegBackbone {
    /// Dilated ResNet-18 V1c.
    #[serde(rename = "resnet18-v1c")]
    ResNet18V1c,
    /// Dilated ResNet-50 V1c.
    #[serde(rename = "resnet50-v1c")]
    ResNet50V1c,
    /// Dilated ResNet-101 V1c.
    #[serde(rename = "resnet101-v1c")]
    ResNet101V1c,
    /// HRNetV2-W18.
    #[serde(rename = "hrnetv2-w18")]
    HrNetV2W18,
    /// HRNetV2-W48.
    #[serde(rename = "hrnetv2-w48")]
    HrNetV2W48,
    /// Mix Transformer B0 (SegFormer).
    #[serde(rename = "mit-b0")]
    MitB0,
    /// Mix Transformer B1.
    #[serde(rename = "mit-b1")]
    MitB1,
    /// Mix Transformer B2.
    #[serde(rename = "mit-b2")]
    MitB2,
    /// Mix Transformer B3.
    #[serde(rename = "mit-b3")]
    MitB3,
    /// Mix Transformer B4.
    #[serde(rename = "mit-b4")]
    MitB4,
    /// Mix Transformer B5.
    #[serde(rename = "mit-b5")]
    MitB5,
    /// Swin-T (UPerNet).
    #[serde(rename = "swin-t")]
    SwinT,
    /// Swin-S.
    #[serde(rename = "swin-s")]
    SwinS,
    /// Swin-B.
    #[serde(rename = "swin-b")]
    SwinB,
    /// Swin-L.
    #[serde(rename = "swin-l")]
    SwinL,
}

impl SegBackbone {
    /// The Mix Transformer variant, for the `mit-*` backbones.
    pub fn mit(self) -> Option<mit::MitVariant> {
        Some(mit::MitVariant::B(match self {
            SegBackbone::MitB0 => 0,
            SegBackbone::MitB1 => 1,
            SegBackbone::MitB2 => 2,
            SegBackbone::MitB3 => 3,
            SegBackbone::MitB4 => 4,
            SegBackbone::MitB5 => 5,
            _ => return None,
        }))
    }

    /// The Swin Transformer variant, for the `swin-*` backbones.
    pub fn swin(self) -> Option<swin::SwinVariant> {
        Some(match self {
            SegBackbone::SwinT => swin::SwinVariant::Tiny,
            SegBackbone::SwinS => swin::SwinVariant::Small,
            SegBackbone::SwinB => swin::SwinVariant::Base,
            SegBackbone::SwinL => swin::SwinVariant::Large,
            _ => return None,
        })
    }
}

impl std::fmt::Display for SegBackbone {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SegBackbone::ResNet18V1c => "resnet18-v1c",
            SegBackbone::ResNet50V1c => "resnet50-v1c",
            SegBackbone::ResNet101V1c => "resnet101-v1c",
            SegBackbone::HrNetV2W18 => "hrnetv2-w18",
            SegBackbone::HrNetV2W48 => "hrnetv2-w48",
            SegBackbone::MitB0 => "mit-b0",
            SegBackbone::MitB1 => "mit-b1",
            SegBackbone::MitB2 => "mit-b2",
            SegBackbone::MitB3 => "mit-b3",
            SegBackbone::MitB4 => "mit-b4",
            SegBackbone::MitB5 => "mit-b5",
            SegBackbone::SwinT => "swin-t",
            SegBackbone::SwinS => "swin-s",
            SegBackbone::SwinB => "swin-b",
            SegBackbone::SwinL => "swin-l",
        })
    }
}

/// Which decode head.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SegHeadKind {
    /// FCN.
    Fcn,
    /// DeepLabV3's ASPP (ResNet backbones).
    Aspp,
    /// SegFormer's all-MLP head (MiT backbones).
    Segformer,
    /// OCRNet's cascade of an FCN head and the OCR head (HRNetV2 backbones).
    Ocr,
    /// UPerNet's pyramid pooling and FPN head (Swin backbones).
    Uper,
}

/// What to build.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SegSpec {
    /// Backbone.
    pub backbone: SegBackbone,
    /// Decode head.
    pub head: SegHeadKind,
    /// Auxiliary FCN head on stage 3 (ResNet backbones only).
    pub aux: bool,
    /// Base width of the ResNet stages (64 is the standard network; smaller values give
    /// narrower networks for quick CPU runs, e.g. the embedded demo). Ignored by HRNet.
    pub width: usize,
    /// Input channels.
    pub in_channels: usize,
    /// Classes K.
    pub classes: usize,
    /// Seed of the initial weights.
    pub seed: u64,
    /// Stochastic depth's largest rate (mmsegmentation: 0.1 for MiT, 0.3 for Swin; other
    /// backbones ignore it).
    pub drop_path: f64,
    /// Swin's attention window M (`None`: the variant's, see [`swin`]; other backbones ignore
    /// it).
    pub window: Option<usize>,
}

/// Builds the network, registering its parameters in `varmap` (parameters already there are
/// kept).
pub fn build_segmenter(
    spec: &SegSpec,
    varmap: &VarMap,
    device: &Device,
    dtype: DType,
) -> Result<Box<dyn Segmenter>> {
    if spec.classes < 2 {
        return Err(ModelError::Config(format!(
            "a segmenter needs at least 2 classes, got {}",
            spec.classes
        )));
    }
    if spec.in_channels == 0 || spec.width < 4 || !spec.width.is_multiple_of(4) {
        return Err(ModelError::Config(format!(
            "input channels must be ≥ 1 and the width a multiple of 4 (≥ 4), got {} and {}",
            spec.in_channels, spec.width
        )));
    }
    let init = Scope::new(varmap, device.clone(), dtype, spec.seed);
    match (spec.backbone.mit(), spec.head) {
        (Some(variant), SegHeadKind::Segformer) => {
            if spec.aux {
                return Err(ModelError::Config(
                    "SegFormer has no auxiliary head (set model.aux = false)".into(),
                ));
            }
            segformer::SegFormer::new(&init, spec, variant, spec.drop_path)
                .map(|m| Box::new(m) as Box<dyn Segmenter>)
        }
        (Some(_), head) => Err(ModelError::Config(format!(
            "a {} backbone takes the segformer head, not {head:?}",
            spec.backbone
        ))),
        (None, head) if spec.backbone.swin().is_some() || head == SegHeadKind::Uper => {
            match (spec.backbone.swin(), head) {
                (Some(variant), SegHeadKind::Uper) => {
                    uper::UperNet::new(&init, spec, variant, spec.window)
                        .map(|m| Box::new(m) as Box<dyn Segmenter>)
                }
                (Some(_), head) => Err(ModelError::Config(format!(
                    "a {} backbone takes the uper head, not {head:?}",
                    spec.backbone
                ))),
                (None, _) => Err(ModelError::Config(format!(
                    "the uper head takes a swin-t, swin-s, swin-b or swin-l backbone, not {}",
                    spec.backbone
                ))),
            }
        }
        (None, SegHeadKind::Ocr) => {
            let width = match spec.backbone {
                SegBackbone::HrNetV2W18 => 18,
                SegBackbone::HrNetV2W48 => 48,
                other => {
                    return Err(ModelError::Config(format!(
                        "the ocr head takes an hrnetv2-w18 or hrnetv2-w48 backbone, not {other}"
                    )))
                }
            };
            if !spec.aux {
                return Err(ModelError::Config(
                    "OCRNet's FCN head is part of its cascade (its regions feed the OCR head): model.aux cannot be false".into(),
                ));
            }
            ocr::OcrNet::new(&init, spec, width).map(|m| Box::new(m) as Box<dyn Segmenter>)
        }
        (None, SegHeadKind::Segformer) => Err(ModelError::Config(format!(
            "the segformer head takes a mit-b0 … mit-b5 backbone, not {}",
            spec.backbone
        ))),
        (None, _) => heads::SegModel::new(&init, spec).map(|m| Box::new(m) as Box<dyn Segmenter>),
    }
}

/// mmcv's ConvModule without bias: conv → BatchNorm → ReLU, named `{name}.conv` / `{name}.bn`
/// (or, with [`ConvBn::plain`], `{name}.{i}` / `{name}.{i+1}` inside an `nn.Sequential`).
pub struct ConvBn {
    pub(crate) conv: Conv,
    pub(crate) bn: Bn,
    pub(crate) relu: bool,
}

impl ConvBn {
    /// `conv.weight`, `bn.*` in scope `p`, with ReLU.
    pub fn module(p: &Scope, spec: ConvSpec) -> Result<Self> {
        Ok(ConvBn {
            conv: Conv::new(&p.pp("conv"), spec, ConvInit::KaimingFanOut)?,
            bn: Bn::new(&p.pp("bn"), spec.out_ch)?,
            relu: true,
        })
    }

    /// `weight` in scope `conv` and `*` in scope `bn` (e.g. a Sequential's numbered children).
    pub fn plain(conv: &Scope, bn: &Scope, spec: ConvSpec, relu: bool) -> Result<Self> {
        Ok(ConvBn {
            conv: Conv::new(conv, spec, ConvInit::KaimingFanOut)?,
            bn: Bn::new(bn, spec.out_ch)?,
            relu,
        })
    }

    /// Applies conv, BatchNorm and (if set) ReLU.
    pub fn forward(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        let y = self.conv.forward(x)?;
        if self.relu {
            self.bn.forward_relu(&y, train)
        } else {
            self.bn.forward(&y, train)
        }
    }

    /// Cost on an `h × w` input, and the output size.
    pub fn cost(&self, h: usize, w: usize) -> (Cost, usize, usize) {
        let (c, oh, ow) = self.conv.cost(h, w);
        (c + self.bn.cost(), oh, ow)
    }
}

/// A 1×1 classifier with bias (`conv_seg`): weight `[K, D, 1, 1]`, bias `[K]`.
pub struct ConvSeg {
    weight: Tensor,
    bias: Tensor,
    inputs: usize,
    outputs: usize,
}

impl ConvSeg {
    /// `weight` N(0, 0.01²), `bias` 0 in scope `p`.
    pub fn new(p: &Scope, inputs: usize, outputs: usize) -> Result<Self> {
        Ok(ConvSeg {
            weight: p.get_or_insert("weight", &[outputs, inputs, 1, 1], Init::Normal(0.01))?,
            bias: p.get_or_insert("bias", &[outputs], Init::Const(0.0))?,
            inputs,
            outputs,
        })
    }

    /// `[N, D, h, w]` → `[N, K, h, w]`, or `[M, D]` → `[M, K]`, with the same weights.
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match x.rank() {
            2 => {
                let w = self.weight.reshape((self.outputs, self.inputs))?;
                sar_candle::ops::bias::bias_add(&x.matmul(&w.t()?)?, &self.bias, 1)
            }
            4 => sar_candle::ops::bias::bias_add(
                &sar_candle::ops::conv::conv2d(x, &self.weight, 1, 0, 1)?,
                &self.bias,
                1,
            ),
            r => candle_core::bail!(
                "conv_seg takes [N, D, h, w] maps or [M, D] rows, got rank {r} ({:?})",
                x.dims()
            ),
        }
    }

    /// Parameters, and multiply-adds per pixel.
    pub fn cost(&self, pixels: usize) -> Cost {
        let w = (self.inputs * self.outputs) as u64;
        Cost {
            params: w + self.outputs as u64,
            macs: w * pixels as u64,
        }
    }
}
