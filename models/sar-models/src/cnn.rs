//! Two small CNNs for 8×8 (embedded digits) and 28×28 (MNIST-family) inputs, with the same
//! variable names (`stage{1,2,3}.{conv,bn}`, `fc`) and feature dimension D = 128.
//!
//! - `small-cnn` ([`CnnKind::Strided`]): `[N, C, H, W]` → three stages of conv3×3-BN-ReLU with
//!   32, 64 and 128 channels (stride 1, then 2, then 2) → global average pooling → feature
//!   `[N, 128]` → `fc` → logits `[N, K]`. Maps on 8×8 inputs: 8×8, 4×4, 2×2; on 28×28: 28×28,
//!   14×14, 7×7.
//! - `cnn-pool` ([`CnnKind::Pooled`]): the conventional Fashion-MNIST CNN — conv3×3-BN-ReLU 32,
//!   max-pool 2×2 (stride 2), conv3×3-BN-ReLU 64, max-pool 2×2, conv3×3-BN-ReLU 128 (all stride
//!   1, padding 1) → global average pooling → `fc`. Maps on 28×28 inputs: 28×28, 14×14, 7×7 (the
//!   same sizes and multiply-adds as `small-cnn`, but each downsampling keeps the strongest of
//!   four responses instead of every other one). Max-pool floors odd sizes like PyTorch's
//!   `nn.MaxPool2d(2)` and sends each output's gradient to the first maximum of its window
//!   ([`sar_candle::ops::pool`]).

use crate::layers::{global_avg_pool, Bn, Conv, ConvInit, ConvSpec, Fc, FcInit};
use crate::params::Scope;
use crate::{Cost, ImageClassifier, Result};
use candle_core::Tensor;

const WIDTHS: [usize; 3] = [32, 64, 128];

/// How the small CNN downsamples.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CnnKind {
    /// `small-cnn`: stride-2 convolutions in stages 2 and 3.
    Strided,
    /// `cnn-pool`: stride-1 convolutions, a 2×2 max-pool after stages 1 and 2.
    Pooled,
}

/// See the module docs.
pub struct SmallCnn {
    kind: CnnKind,
    stages: Vec<(Conv, Bn)>,
    fc: Fc,
    classes: usize,
}

impl SmallCnn {
    /// Registers `stage{1,2,3}.{conv,bn}` and `fc`.
    pub fn new(init: &Scope, kind: CnnKind, in_channels: usize, classes: usize) -> Result<Self> {
        let mut stages = Vec::new();
        let mut c = in_channels;
        for (i, &w) in WIDTHS.iter().enumerate() {
            let stride = if i == 0 || kind == CnnKind::Pooled {
                1
            } else {
                2
            };
            let stage = init.pp(format!("stage{}", i + 1));
            let conv = Conv::new(
                &stage.pp("conv"),
                ConvSpec::new(c, w, 3).stride(stride),
                ConvInit::KaimingFanOut,
            )?;
            let bn = Bn::new(&stage.pp("bn"), w)?;
            stages.push((conv, bn));
            c = w;
        }
        let fc = Fc::new(&init.pp("fc"), c, classes, FcInit::Default)?;
        Ok(SmallCnn {
            kind,
            stages,
            fc,
            classes,
        })
    }

    /// Whether a 2×2 max-pool follows stage `i` (0-based).
    fn pools_after(&self, i: usize) -> bool {
        self.kind == CnnKind::Pooled && i + 1 < self.stages.len()
    }
}

impl ImageClassifier for SmallCnn {
    fn features(&self, images: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        let mut x = images.clone();
        for (i, (conv, bn)) in self.stages.iter().enumerate() {
            x = bn.forward_relu(&conv.forward(&x)?, train)?;
            if self.pools_after(i) {
                x = sar_candle::ops::pool::max_pool2d(&x, 2, 2, 0)?;
            }
        }
        global_avg_pool(&x)
    }
    fn classify(&self, features: &Tensor) -> candle_core::Result<Tensor> {
        self.fc.forward(features)
    }
    fn feature_dim(&self) -> usize {
        WIDTHS[2]
    }
    fn classes(&self) -> usize {
        self.classes
    }
    fn cost(&self, mut h: usize, mut w: usize) -> Cost {
        let mut total = self.fc.cost();
        for (i, (conv, bn)) in self.stages.iter().enumerate() {
            let (c, oh, ow) = conv.cost(h, w);
            total = total + c + bn.cost();
            (h, w) = (oh, ow);
            if self.pools_after(i) {
                (h, w) = (h / 2, w / 2);
            }
        }
        total
    }
}
