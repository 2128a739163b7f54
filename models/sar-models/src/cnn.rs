//! A small CNN for 8×8 (embedded digits) and 28×28 (MNIST-family) inputs.
//!
//! `[N, C, H, W]` → three stages of conv3×3-BN-ReLU with 32, 64 and 128 channels (stride 1,
//! then 2, then 2) → global average pooling → feature `[N, 128]` → `fc` → logits `[N, K]`.
//! On 8×8 inputs the maps are 8×8, 4×4, 2×2; on 28×28, 28×28, 14×14, 7×7.

use crate::layers::{global_avg_pool, Bn, Conv, ConvInit, ConvSpec, Fc, FcInit};
use crate::params::Scope;
use crate::{Cost, ImageClassifier, Result};
use candle_core::Tensor;

const WIDTHS: [usize; 3] = [32, 64, 128];

/// See the module docs.
pub struct SmallCnn {
    stages: Vec<(Conv, Bn)>,
    fc: Fc,
    classes: usize,
}

impl SmallCnn {
    /// Registers `stage{1,2,3}.{conv,bn}` and `fc`.
    pub fn new(init: &Scope, in_channels: usize, classes: usize) -> Result<Self> {
        let mut stages = Vec::new();
        let mut c = in_channels;
        for (i, &w) in WIDTHS.iter().enumerate() {
            let stride = if i == 0 { 1 } else { 2 };
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
            stages,
            fc,
            classes,
        })
    }
}

impl ImageClassifier for SmallCnn {
    fn features(&self, images: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        let mut x = images.clone();
        for (conv, bn) in &self.stages {
            x = bn.forward_relu(&conv.forward(&x)?, train)?;
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
        for (conv, bn) in &self.stages {
            let (c, oh, ow) = conv.cost(h, w);
            total = total + c + bn.cost();
            (h, w) = (oh, ow);
        }
        total
    }
}
