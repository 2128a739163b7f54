//! Networks for SAR experiments on candle.
//!
//! Every model implements [`ImageClassifier`]: [`ImageClassifier::features`] maps a batch of
//! images `[N, C, H, W]` to the feature `[N, D]` that SAR regularises (after the last ReLU and
//! global average pooling), and [`ImageClassifier::classify`] maps features to logits `[N, K]`
//! through the one linear classifier that the SAR head reuses (spec §2: the anchors are
//! classified by the model's own classifier).
//!
//! | arch | structure | D | names |
//! |---|---|---|---|
//! | [`Arch::SmallCnn`] | 3 stages of conv3×3-BN-ReLU (32, 64, 128; stride 2 between) | 128 | `stage{1,2,3}.conv/bn`, `fc` |
//! | [`Arch::CnnPool`] | 3 stages of conv3×3-BN-ReLU (32, 64, 128; stride 1), 2×2 max-pool after the first two | 128 | `stage{1,2,3}.conv/bn`, `fc` |
//! | [`Arch::ResNet32`] | CIFAR ResNet, 3×5 BasicBlocks (16/32/64), option-A shortcuts | 64 | `conv1`, `bn1`, `layer{1..3}.{i}.{conv,bn}{1,2}`, `fc` |
//! | [`Arch::ResNet18`], [`Arch::ResNet50`] | torchvision ResNets; CIFAR stem (3×3, no max-pool) or ImageNet stem (7×7/2 + max-pool) | 512 / 2048 | torchvision's (`layer1.0.downsample.0.weight`, …) |
//!
//! Parameters live in a [`candle_nn::VarMap`] under those dotted names (BatchNorm running
//! statistics too, as `*.running_mean` / `*.running_var`, so one `VarMap` is the whole model
//! state). Initialisation is reproducible from a seed through a portable generator
//! ([`params::Scope`]). [`ImageClassifier::cost`] gives parameter and multiply-add counts.
//!
//! Segmentation networks (dilated ResNet V1c, HRNetV2; FCN, ASPP and auxiliary heads) are in
//! [`seg`], behind the [`seg::Segmenter`] trait, under mmsegmentation's names.

pub mod cifar_resnet;
pub mod cnn;
pub mod layers;
pub mod params;
pub mod pretrained;
pub mod resize;
pub mod resnet;
pub mod seg;

#[cfg(test)]
pub(crate) mod test_util {
    use candle_core::{Device, Tensor};

    /// Deterministic N(0, 1) test data (each call draws the next seed).
    pub fn randn<S: Into<candle_core::Shape>>(shape: S) -> Tensor {
        use std::sync::atomic::{AtomicU64, Ordering};
        static SEED: AtomicU64 = AtomicU64::new(1);
        let shape = shape.into();
        let mut rng = sar_math::rng::SeededRng::new(SEED.fetch_add(1, Ordering::Relaxed));
        let v: Vec<f32> = (0..shape.elem_count())
            .map(|_| rng.next_normal() as f32)
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }
}

use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;

/// Errors of model construction and weight loading.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// A candle operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// An invalid model setting.
    #[error("invalid model setting: {0}")]
    Config(String),
    /// A weight file could not be used.
    #[error("{path}: {reason}")]
    Weights {
        /// The file.
        path: String,
        /// What is wrong.
        reason: String,
    },
}

/// Result of this crate.
pub type Result<T> = std::result::Result<T, ModelError>;

/// Size and cost of a model for one input image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Cost {
    /// Trainable parameters (BatchNorm running statistics excluded).
    pub params: u64,
    /// Multiply-accumulates of one forward pass of one image (what mmcv and fvcore report as
    /// "FLOPs"); BatchNorm, ReLU and pooling are not counted.
    pub macs: u64,
}

impl std::ops::Add for Cost {
    type Output = Cost;
    fn add(self, o: Cost) -> Cost {
        Cost {
            params: self.params + o.params,
            macs: self.macs + o.macs,
        }
    }
}

/// An image classifier split into a feature extractor and a linear classifier.
pub trait ImageClassifier: Send + Sync {
    /// Features `[N, D]` of images `[N, C, H, W]`; `train` selects BatchNorm's batch statistics
    /// (and updates the running ones) or the running statistics.
    fn features(&self, images: &Tensor, train: bool) -> candle_core::Result<Tensor>;
    /// Logits `[M, K]` of features `[M, D]` (also the SAR head's embedded anchors).
    fn classify(&self, features: &Tensor) -> candle_core::Result<Tensor>;
    /// D.
    fn feature_dim(&self) -> usize;
    /// K.
    fn classes(&self) -> usize;
    /// Parameters and multiply-adds for one image of `channels × height × width`.
    fn cost(&self, height: usize, width: usize) -> Cost;
    /// Logits of images: `classify(features(images))`.
    fn forward(&self, images: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        self.classify(&self.features(images, train)?)
    }
}

/// The stem of a torchvision-style ResNet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Stem {
    /// 3×3 conv, stride 1, no max-pool (32×32 inputs).
    Cifar,
    /// 7×7 conv, stride 2, then 3×3 max-pool with stride 2 (ImageNet-size inputs).
    Imagenet,
}

/// Which network.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Arch {
    /// [`cnn::SmallCnn`] with strided convolutions ([`cnn::CnnKind::Strided`]), for 8×8 and
    /// 28×28 inputs.
    SmallCnn,
    /// [`cnn::SmallCnn`] with max-pooling ([`cnn::CnnKind::Pooled`]): the conventional
    /// Fashion-MNIST CNN.
    CnnPool,
    /// [`cifar_resnet::CifarResNet`] of depth 32.
    #[serde(rename = "resnet32")]
    ResNet32,
    /// [`resnet::ResNet`] with BasicBlocks [2, 2, 2, 2].
    #[serde(rename = "resnet18")]
    ResNet18,
    /// [`resnet::ResNet`] with Bottlenecks [3, 4, 6, 3].
    #[serde(rename = "resnet50")]
    ResNet50,
}

impl std::fmt::Display for Arch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Arch::SmallCnn => "small-cnn",
            Arch::CnnPool => "cnn-pool",
            Arch::ResNet32 => "resnet32",
            Arch::ResNet18 => "resnet18",
            Arch::ResNet50 => "resnet50",
        })
    }
}

/// What to build.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ModelSpec {
    /// Network.
    pub arch: Arch,
    /// Stem of ResNet-18/50 (ignored by the others).
    pub stem: Stem,
    /// Input channels.
    pub in_channels: usize,
    /// Classes K.
    pub classes: usize,
    /// Seed of the initial weights.
    pub seed: u64,
    /// How the convolution and linear weights are initialised.
    pub init: params::InitScheme,
}

/// Builds the model, registering its parameters in `varmap` (parameters already there, e.g.
/// loaded from a checkpoint, are kept).
pub fn build(
    spec: &ModelSpec,
    varmap: &VarMap,
    device: &Device,
    dtype: DType,
) -> Result<Box<dyn ImageClassifier>> {
    if spec.classes < 2 {
        return Err(ModelError::Config(format!(
            "a classifier needs at least 2 classes, got {}",
            spec.classes
        )));
    }
    if spec.in_channels == 0 {
        return Err(ModelError::Config(
            "input channels must be at least 1".into(),
        ));
    }
    let init = params::Scope::with_scheme(varmap, device.clone(), dtype, spec.seed, spec.init);
    Ok(match spec.arch {
        Arch::SmallCnn | Arch::CnnPool => {
            let kind = if spec.arch == Arch::CnnPool {
                cnn::CnnKind::Pooled
            } else {
                cnn::CnnKind::Strided
            };
            Box::new(cnn::SmallCnn::new(
                &init,
                kind,
                spec.in_channels,
                spec.classes,
            )?)
        }
        Arch::ResNet32 => Box::new(cifar_resnet::CifarResNet::new(
            &init,
            32,
            spec.in_channels,
            spec.classes,
        )?),
        Arch::ResNet18 => Box::new(resnet::ResNet::new(
            &init,
            resnet::Depth::R18,
            spec.stem,
            spec.in_channels,
            spec.classes,
        )?),
        Arch::ResNet50 => Box::new(resnet::ResNet::new(
            &init,
            resnet::Depth::R50,
            spec.stem,
            spec.in_channels,
            spec.classes,
        )?),
    })
}
