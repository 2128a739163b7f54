//! OCRNet on HRNetV2: mmsegmentation's cascade of an FCN head and the OCR head
//! (`CascadeEncoderDecoder` with `decode_head = [FCNHead, OCRHead]`), with its names.
//!
//! The four HRNet branches are resized to stride 4 and concatenated into X `[N, 15W, h, w]`
//! (`resize_concat`). Then:
//!
//! - `decode_head.0` (FCN, the soft object regions): one 1×1 ConvModule 15W → 15W (`convs.0`)
//!   and its `conv_seg`, giving region logits R `[N, K, h, w]`; its cross-entropy has weight
//!   0.4 (the trainer's auxiliary loss, `model.aux_weight`). Gradients flow from the OCR head
//!   into it, as in mmsegmentation (R is not detached).
//! - `decode_head.1` (OCR): a 3×3 ConvModule 15W → 512 (`bottleneck`) gives pixel features P;
//!   spatial gather: softmax of R over the h·w positions, per class, times P gives the object
//!   regions' representations `[N, 512, K, 1]`; the object attention block
//!   (`object_context_block`, mmsegmentation's `_SelfAttentionBlock`): queries from P and keys
//!   from the regions by two 1×1 ConvModules each (`query_project.{0,1}`, `key_project.{0,1}`,
//!   512 → 256 → 256), values by one (`value_project`, 512 → 256), attention
//!   softmax(q·kᵀ/√256) over the K regions, the context projected back to 512 (`out_project`),
//!   concatenated with P and fused by a 1×1 ConvModule 1024 → 512 (`bottleneck`). That output
//!   is F `[N, 512, h, w]`, the feature SAR pulls toward its anchors (the released
//!   `OCRHeadWFeat`), and `decode_head.1.conv_seg` the classifier SAR shares.
//!
//! `SegSpec::width` scales the 512 and 256 channels by width/64 (64: the published head).
//!
//! Both heads have `dropout_ratio = -1` in mmsegmentation's OCRNet configs (no dropout):
//! configs set `model.dropout = 0`.

use super::hrnet::HrNetV2;
use super::{ConvBn, ConvSeg, SegFeatures, SegSpec, Segmenter};
use crate::layers::ConvSpec;
use crate::params::Scope;
use crate::resize::resize_bilinear;
use crate::{Cost, Result};
use candle_core::{Tensor, D};

/// mmsegmentation's `channels` and `ocr_channels` of the published OCRNet.
const CHANNELS: usize = 512;
const OCR_CHANNELS: usize = 256;

/// OCRNet behind [`Segmenter`] (see the module docs).
pub struct OcrNet {
    backbone: HrNetV2,
    fcn: ConvBn,
    fcn_seg: ConvSeg,
    bottleneck: ConvBn,
    query: [ConvBn; 2],
    key: [ConvBn; 2],
    value: ConvBn,
    out: ConvBn,
    fuse: ConvBn,
    conv_seg: ConvSeg,
    classes: usize,
    channels: usize,
    ocr_channels: usize,
}

impl OcrNet {
    /// OCRNet on HRNetV2-W`width` (18 or 48).
    pub fn new(init: &Scope, spec: &SegSpec, width: usize) -> Result<Self> {
        // `SegSpec::width` narrows the OCR head like the other heads (64: the published 512
        // and 256 channels); HRNet's own width is its name's.
        let (channels, ocr_channels) = (CHANNELS * spec.width / 64, OCR_CHANNELS * spec.width / 64);
        let backbone = HrNetV2::new(&init.pp("backbone"), spec.in_channels, width)?;
        let concat: usize = backbone.widths().iter().sum();
        let k = spec.classes;
        let h0 = init.pp("decode_head").pp(0);
        let h1 = init.pp("decode_head").pp(1);
        let ocb = h1.pp("object_context_block");
        let cb = |p: &Scope, cin, cout, kernel| ConvBn::module(p, ConvSpec::new(cin, cout, kernel));
        let pair = |p: &Scope| -> Result<[ConvBn; 2]> {
            Ok([
                cb(&p.pp(0), channels, ocr_channels, 1)?,
                cb(&p.pp(1), ocr_channels, ocr_channels, 1)?,
            ])
        };
        Ok(OcrNet {
            fcn: cb(&h0.pp("convs").pp(0), concat, concat, 1)?,
            fcn_seg: ConvSeg::new(&h0.pp("conv_seg"), concat, k)?,
            bottleneck: cb(&h1.pp("bottleneck"), concat, channels, 3)?,
            query: pair(&ocb.pp("query_project"))?,
            key: pair(&ocb.pp("key_project"))?,
            value: cb(&ocb.pp("value_project"), channels, ocr_channels, 1)?,
            out: cb(&ocb.pp("out_project"), ocr_channels, channels, 1)?,
            fuse: cb(&ocb.pp("bottleneck"), 2 * channels, channels, 1)?,
            conv_seg: ConvSeg::new(&h1.pp("conv_seg"), channels, k)?,
            backbone,
            classes: k,
            channels,
            ocr_channels,
        })
    }

    /// The OCR head on concatenated features `x` and region logits `regions`.
    fn ocr(&self, x: &Tensor, regions: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        let pixels = self.bottleneck.forward(x, train)?;
        let (n, c, h, w) = pixels.dims4()?;
        let k = regions.dim(1)?;
        // Spatial gather: per class, a softmax over positions weights the pixel features.
        let probs = candle_nn::ops::softmax(&regions.reshape((n, k, h * w))?, D::Minus1)?;
        let flat = pixels.reshape((n, c, h * w))?;
        let objects = probs
            .matmul(&flat.transpose(1, 2)?.contiguous()?)? // [n, k, c]
            .transpose(1, 2)?
            .contiguous()?
            .reshape((n, c, k, 1))?;
        // Object attention: pixels query the K object representations.
        let mut q = pixels.clone();
        let mut key = objects.clone();
        for (qp, kp) in self.query.iter().zip(&self.key) {
            q = qp.forward(&q, train)?;
            key = kp.forward(&key, train)?;
        }
        let value = self.value.forward(&objects, train)?;
        let q = q
            .reshape((n, self.ocr_channels, h * w))?
            .transpose(1, 2)?
            .contiguous()?;
        let key = key.reshape((n, self.ocr_channels, k))?;
        let value = value
            .reshape((n, self.ocr_channels, k))?
            .transpose(1, 2)?
            .contiguous()?;
        let sim = (q.matmul(&key)? * (self.ocr_channels as f64).powf(-0.5))?;
        let sim = candle_nn::ops::softmax(&sim, D::Minus1)?;
        let context = sim
            .matmul(&value)? // [n, hw, 256]
            .transpose(1, 2)?
            .contiguous()?
            .reshape((n, self.ocr_channels, h, w))?;
        let context = self.out.forward(&context, train)?;
        self.fuse
            .forward(&Tensor::cat(&[&context, &pixels], 1)?, train)
    }
}

impl Segmenter for OcrNet {
    fn features(&self, images: &Tensor, train: bool) -> candle_core::Result<SegFeatures> {
        let stages = self.backbone.forward(images, train)?;
        let (_, _, h, w) = stages[0].dims4()?;
        let parts = stages
            .iter()
            .map(|s| resize_bilinear(s, h, w))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let x = Tensor::cat(&parts, 1)?;
        let fcn = self.fcn.forward(&x, train)?;
        let regions = self.fcn_seg.forward(&fcn)?;
        let main = self.ocr(&x, &regions, train)?;
        Ok(SegFeatures {
            main,
            aux: train.then_some(fcn),
        })
    }
    fn classify(&self, features: &Tensor) -> candle_core::Result<Tensor> {
        self.conv_seg.forward(features)
    }
    fn classify_aux(&self, features: &Tensor) -> candle_core::Result<Tensor> {
        self.fcn_seg.forward(features)
    }
    fn feature_dim(&self) -> usize {
        self.channels
    }
    fn classes(&self) -> usize {
        self.classes
    }
    fn has_aux(&self) -> bool {
        true
    }
    fn output_stride(&self) -> usize {
        4
    }
    /// The FCN head is part of inference here (its regions feed the OCR head), so its cost is
    /// counted; `aux_params` is 0.
    fn cost(&self, h: usize, w: usize) -> Cost {
        let (backbone, sizes) = self.backbone.cost(h, w);
        let (h0, w0) = sizes[0];
        let px = (h0 * w0) as u64;
        let k = self.classes as u64;
        let (c, o) = (self.channels as u64, self.ocr_channels as u64);
        let mut total = backbone
            + self.fcn.cost(h0, w0).0
            + self.fcn_seg.cost(h0 * w0)
            + self.bottleneck.cost(h0, w0).0
            + self.conv_seg.cost(h0 * w0);
        for (q, kp) in self.query.iter().zip(&self.key) {
            total = total + q.cost(h0, w0).0 + kp.cost(self.classes, 1).0;
        }
        total = total
            + self.value.cost(self.classes, 1).0
            + self.out.cost(h0, w0).0
            + self.fuse.cost(h0, w0).0;
        // The gather (K×hw×C) and the attention's two products (hw×K×256 each).
        total.macs += px * k * c + 2 * px * k * o;
        total
    }
    fn aux_params(&self) -> u64 {
        0
    }
}
