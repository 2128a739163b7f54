//! `sar train` configuration: a TOML file, validated, unknown keys rejected, every value
//! overridable from the command line with `--set section.key=value`.
//!
//! ```toml
//! [run]      # name, seed, output, device ("cpu" | "cuda")
//! [data]     # dataset, root, imbalance, augment, pad, flip, crop, resize, mixup_alpha, test_fraction, split_seed
//! [model]    # classification: arch ("small-cnn" | "resnet32" | "resnet18" | "resnet50"), stem, init, pretrained
//!            # segmentation: backbone, head, aux, aux_weight, dropout, width, pretrained
//! [optim]    # kind (sgd|adamw), lr, momentum, weight_decay, nesterov, betas, eps, custom_keys,
//!            # schedule, warmup_epochs, warmup_iters, warmup_ratio, milestones, gamma, power, min_lr
//! [sar]      # enabled, kind, aux_ce, ema, reweight, anchors, tau, delta, alpha, lambda_aux,
//!            # lambda_p2a, gate, weights
//! [train]    # epochs, batch_size, eval_every, checkpoint_every_steps, keep_checkpoints, log_every, on_nonfinite, max_steps, plots, sampler, samples_per_class
//! [eval]     # groups ("count" | "rank" | "index"), many, few, head_end, medium_end, batch_size
//! [stage]    # kind ("none" | "mislas" | "disalign"), init_from, smooth_head, smooth_tail, smooth_shape, smooth_power, shift_bn, lws, classifier_lr_factor, grw_rho
//! ```
//! Every key except `data.dataset` and `model.arch` (or `model.backbone`) has a default (see the field docs). Example
//! configurations are in `configs/`. A top-level `base = "file.toml"` starts from another
//! config file and changes only the keys given (see [`load`]).

mod validate;

use anyhow::{bail, ensure, Context};
use sar_math::anchors::AnchorKind;
use sar_math::{GateMode, RegularizerKind, SarConfig, WeightMode};
use sar_models::params::InitScheme;
use sar_models::seg::{SegBackbone, SegHeadKind};
use sar_models::{Arch, Stem};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// The whole configuration of a training run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    /// Run identity and output.
    #[serde(default)]
    pub run: RunConfig,
    /// Data set and augmentation.
    pub data: DataConfig,
    /// Network.
    pub model: ModelConfig,
    /// Optimiser and learning-rate schedule.
    #[serde(default)]
    pub optim: OptimConfig,
    /// SAR.
    #[serde(default)]
    pub sar: SarSection,
    /// The training loop.
    #[serde(default)]
    pub train: LoopConfig,
    /// Evaluation and head/medium/tail grouping.
    #[serde(default)]
    pub eval: EvalConfig,
    /// A second stage on a first stage's weights (MiSLAS).
    #[serde(default)]
    pub stage: StageConfig,
}

/// Which second-stage method a run is (`stage.kind`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum StageKind {
    /// An ordinary run (default).
    #[default]
    None,
    /// MiSLAS stage 2: the feature extractor frozen (BatchNorm's running statistics may shift),
    /// the classifier retrained under label-aware smoothing.
    Mislas,
    /// DisAlign: the whole model frozen (BatchNorm's running statistics may shift), its logits
    /// calibrated by a learned per-class scale and margin behind a confidence gate, trained
    /// with the generalized re-weighting of the cross-entropy.
    Disalign,
}

/// The curve of label-aware smoothing between head and tail (`stage.smooth_shape`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SmoothShape {
    /// sin(r·π/2) (MiSLAS's default).
    Concave,
    /// r.
    Linear,
    /// 1 + sin(3π/2 + r·π/2) (written from the head down).
    Convex,
    /// r^`smooth_power`.
    Exp,
}

/// `[stage]`: start from another run's weights, and the second-stage method (defaults:
/// MiSLAS's CIFAR-100-LT, imbalance 100, values and DisAlign's classification ρ; see
/// `docs/spec.md` §8.4–8.5).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StageConfig {
    /// "none" (an ordinary run), "mislas" or "disalign".
    pub kind: StageKind,
    /// Weights to start from: a checkpoint file, or a run folder (its newest checkpoint). Only
    /// the model's weights and BatchNorm statistics are taken; the schedule, optimiser state
    /// and SAR's buffers start afresh (`sar train --init-from`). Required by "mislas".
    pub init_from: Option<PathBuf>,
    /// MiSLAS: ε of the most common class (0.4).
    pub smooth_head: f64,
    /// MiSLAS: ε of the rarest class (0.1).
    pub smooth_tail: f64,
    /// MiSLAS: how ε runs between them ("concave").
    pub smooth_shape: SmoothShape,
    /// MiSLAS: the exponent of `smooth_shape = "exp"` (1.0).
    pub smooth_power: f64,
    /// MiSLAS and DisAlign: run the frozen feature extractor with BatchNorm in training mode,
    /// so that its running statistics follow the stage's batches ("shift learning"; true).
    pub shift_bn: bool,
    /// MiSLAS: learnable weight scaling, logits ← s ⊙ logits with s `[C]` from ones, trained
    /// with the classifier (`stage.lws_scale` in checkpoints; true).
    pub lws: bool,
    /// MiSLAS: the classifier's learning rate is `optim.lr` times this (its `lr_factor`, 0.2
    /// for CIFAR-100-LT at imbalance 100); the LWS scale takes `optim.lr` itself.
    pub classifier_lr_factor: f64,
    /// DisAlign: the exponent ρ of the generalized re-weighting, w_c ∝ (n_c/N)^(−ρ) (default:
    /// the released configs' 1.2 for classification, ImageNet-LT, and 0.2 for segmentation,
    /// ADE20K).
    pub grw_rho: Option<f64>,
}

impl Default for StageConfig {
    fn default() -> Self {
        StageConfig {
            kind: StageKind::None,
            init_from: None,
            smooth_head: 0.4,
            smooth_tail: 0.1,
            smooth_shape: SmoothShape::Concave,
            smooth_power: 1.0,
            shift_bn: true,
            lws: true,
            classifier_lr_factor: 0.2,
            grw_rho: None,
        }
    }
}

impl StageConfig {
    /// ρ of the generalized re-weighting: `grw_rho`, or the released default of the task.
    pub fn rho(&self, segmentation: bool) -> f64 {
        self.grw_rho.unwrap_or(if segmentation { 0.2 } else { 1.2 })
    }

    /// The sar-math shape.
    pub fn shape(&self) -> sar_math::mislas::SmoothingShape {
        use sar_math::mislas::SmoothingShape as S;
        match self.smooth_shape {
            SmoothShape::Concave => S::Concave,
            SmoothShape::Linear => S::Linear,
            SmoothShape::Convex => S::Convex,
            SmoothShape::Exp => S::Exp {
                power: self.smooth_power,
            },
        }
    }
}

/// The order in which an epoch visits the training set (`train.sampler`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum SamplerKind {
    /// Every image once, in a seeded shuffled order (default).
    #[default]
    Shuffle,
    /// Class-balanced (MiSLAS's and Decoupling's `ClassAwareSampler`): classes drawn in turn
    /// from a reshuffled cycle, `samples_per_class` images of each from the class's own
    /// reshuffled cycle. An epoch takes as many images as the training set has (MiSLAS's loop
    /// cuts the sampler's C·max_c n_c there), so it has as many steps as a shuffled epoch.
    ClassBalanced,
}

/// Where the computation runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum DeviceKind {
    /// The CPU.
    #[default]
    Cpu,
    /// The first CUDA GPU (needs the `cuda` feature).
    Cuda,
}

/// `[run]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RunConfig {
    /// Name shown in reports ("run").
    pub name: String,
    /// Seed of initial weights, anchors, data order and augmentation (0).
    pub seed: u64,
    /// Output folder: config, metrics log, checkpoints, report ("runs/run").
    pub output: PathBuf,
    /// Device ("cpu").
    pub device: DeviceKind,
    /// Tensor library that trains ("candle"; "dfdx" for classification with the small CNN
    /// or the CIFAR ResNet-32).
    pub backend: BackendKind,
}

/// Which tensor library trains.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum BackendKind {
    /// candle (every task and model).
    #[default]
    Candle,
    /// dfdx (classification; FCN / DeepLabV3 on the ResNet V1c, FCN / OCRNet on HRNetV2).
    Dfdx,
}

impl Default for RunConfig {
    fn default() -> Self {
        RunConfig {
            name: "run".into(),
            seed: 0,
            output: PathBuf::from("runs/run"),
            device: DeviceKind::Cpu,
            backend: BackendKind::Candle,
        }
    }
}

/// Which data set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DatasetKind {
    /// The embedded UCI digits (8×8, 10 classes), split into train and test by `test_fraction`.
    Digits,
    /// MNIST-family IDX files in `root` (train-/t10k-images-idx3-ubyte[.gz], …).
    MnistIdx,
    /// CIFAR-10 binary version in `root`.
    Cifar10,
    /// CIFAR-100 binary version in `root` (fine labels).
    Cifar100,
    /// CUB-200-2011 in its official layout in `root` (`images.txt`, `images/`, …).
    #[serde(rename = "cub200")]
    Cub200,
    /// Segmentation: the embedded long-tailed glyph mosaic ([`sar_data::seg::glyph_mosaic`]).
    Mosaic,
    /// Segmentation: Cityscapes (fine) in `root`.
    Cityscapes,
    /// Segmentation: ADE20K (`ADEChallengeData2016`) in `root`.
    #[serde(rename = "ade20k")]
    Ade20k,
    /// Segmentation: Pascal-Context-59, mmsegmentation's `VOCdevkit/VOC2010` in `root`.
    #[serde(rename = "pascal-context59")]
    PascalContext59,
}

impl DatasetKind {
    /// Whether this is a segmentation data set (and the run a segmentation run).
    pub fn is_segmentation(self) -> bool {
        matches!(
            self,
            DatasetKind::Mosaic
                | DatasetKind::Cityscapes
                | DatasetKind::Ade20k
                | DatasetKind::PascalContext59
        )
    }
}

/// Training augmentation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AugmentKind {
    /// None.
    None,
    /// Random crop with `pad` zero padding and horizontal flip.
    CropFlip,
}

/// `[data]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    /// The data set (required).
    pub dataset: DatasetKind,
    /// Folder of the data set files (required except for `digits`).
    #[serde(default)]
    pub root: Option<PathBuf>,
    /// Long-tailed training subset by the CIFAR-LT rule with this imbalance factor (none).
    #[serde(default)]
    pub imbalance: Option<f64>,
    /// Seed of the long-tailed subset and of the digits train/test split (0).
    #[serde(default)]
    pub split_seed: u64,
    /// Share of the digits held out as the balanced test set (1/3).
    #[serde(default = "default_test_fraction")]
    pub test_fraction: f64,
    /// Training augmentation ("crop-flip").
    #[serde(default = "default_augment")]
    pub augment: AugmentKind,
    /// Zero padding of the random crop (4).
    #[serde(default = "default_pad")]
    pub pad: usize,
    /// Random horizontal flip with the crop (true).
    #[serde(default = "default_flip")]
    pub flip: bool,
    /// MixUp α (0: off).
    #[serde(default)]
    pub mixup_alpha: f64,
    /// Side of the crop rendered from image files (CUB; 224).
    #[serde(default = "default_crop")]
    pub crop: usize,
    /// Shorter side before the evaluation centre crop of image files (256).
    #[serde(default = "default_resize")]
    pub resize: usize,
    /// Segmentation: training crop [H, W] (Cityscapes [512, 1024]; mosaic [64, 64]).
    #[serde(default = "default_seg_crop")]
    pub seg_crop: [usize; 2],
    /// Segmentation: base scale [W, H] of the random resize (Cityscapes [2048, 1024]; none:
    /// each image's own size).
    #[serde(default)]
    pub seg_scale: Option<[usize; 2]>,
    /// Segmentation: ratio range of the random resize ([0.5, 2.0]).
    #[serde(default = "default_ratio_range")]
    pub ratio_range: [f64; 2],
    /// Segmentation: largest share of one class in a random crop (0.75).
    #[serde(default = "default_cat_max_ratio")]
    pub cat_max_ratio: f64,
    /// Segmentation: photometric distortion (true).
    #[serde(default = "default_flip")]
    pub photometric: bool,
    /// Mosaic: canvas side (64).
    #[serde(default = "default_mosaic_size")]
    pub mosaic_size: usize,
    /// Mosaic: training canvases (600).
    #[serde(default = "default_mosaic_train")]
    pub mosaic_train: usize,
    /// Mosaic: test canvases (200).
    #[serde(default = "default_mosaic_test")]
    pub mosaic_test: usize,
    /// Mosaic: glyphs per canvas, at most one per 32 × 32 cell (3).
    #[serde(default = "default_mosaic_glyphs")]
    pub mosaic_glyphs: usize,
}

fn default_seg_crop() -> [usize; 2] {
    [64, 64]
}
fn default_ratio_range() -> [f64; 2] {
    [0.5, 2.0]
}
fn default_cat_max_ratio() -> f64 {
    0.75
}
fn default_mosaic_size() -> usize {
    64
}
fn default_mosaic_train() -> usize {
    600
}
fn default_mosaic_test() -> usize {
    200
}
fn default_mosaic_glyphs() -> usize {
    3
}

fn default_crop() -> usize {
    224
}
fn default_resize() -> usize {
    256
}

fn default_test_fraction() -> f64 {
    1.0 / 3.0
}
fn default_augment() -> AugmentKind {
    AugmentKind::CropFlip
}
fn default_pad() -> usize {
    4
}
fn default_flip() -> bool {
    true
}

/// `[model]`: a classifier (`arch`) or a segmenter (`backbone`). Which one is read from the
/// key present, and the other's keys are then unknown keys, rejected by name.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum ModelConfig {
    /// `model.arch`: a classification network.
    Classifier(ClassifierConfig),
    /// `model.backbone`: a segmentation network.
    Segmenter(SegmenterConfig),
}

/// `[model]` of a classification run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClassifierConfig {
    /// The network (required).
    pub arch: Arch,
    /// Stem of ResNet-18/50 ("cifar").
    #[serde(default = "default_stem")]
    pub stem: Stem,
    /// Pretrained weights (safetensors, torchvision names; `fc.` is not loaded).
    #[serde(default)]
    pub pretrained: Option<PathBuf>,
    /// How convolution and linear weights start ("reference": the architecture's own;
    /// "torch-default", "kaiming-fan-out", "kaiming-fan-in"; see
    /// `sar_models::params::InitScheme` for each layer kind).
    #[serde(default)]
    pub init: InitScheme,
}

/// `[model]` of a segmentation run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SegmenterConfig {
    /// The backbone (required).
    pub backbone: SegBackbone,
    /// Decode head ("fcn").
    #[serde(default = "default_head")]
    pub head: SegHeadKind,
    /// Auxiliary FCN head on stage 3. Unset: the model's own, as mmsegmentation's configs
    /// have it (ResNets and OCRNet yes; HRNetV2's FCN and MiT/SegFormer no). See
    /// [`SegmenterConfig::aux`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aux: Option<bool>,
    /// Weight of the auxiliary head's cross-entropy (0.4).
    #[serde(default = "default_aux_weight")]
    pub aux_weight: f64,
    /// Dropout2d rate before each `conv_seg` (0.1).
    #[serde(default = "default_dropout")]
    pub dropout: f64,
    /// Base width of the ResNet stages (64; smaller for quick CPU runs). MiT and Swin: the
    /// embedding and head widths scale by width/64; OCRNet: its head's.
    #[serde(default = "default_width")]
    pub width: usize,
    /// Stochastic depth's largest rate (transformer backbones). Unset: mmsegmentation's, 0.1
    /// for MiT (SegFormer) and 0.3 for Swin (UPerNet). See [`SegmenterConfig::drop_path`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drop_path: Option<f64>,
    /// Swin's attention window. Unset: the variant's (7 for T, S, B; 12 for L).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window: Option<usize>,
    /// Pretrained weights (safetensors: a backbone, or a whole mmsegmentation model whose
    /// classifiers are not loaded).
    #[serde(default)]
    pub pretrained: Option<PathBuf>,
}

/// The keys only a segmenter has, dropped from the flat `[model]` of checkpoints written
/// before the section was split (their JSON held every key, the unused ones null or default).
const SEGMENTER_ONLY: &[&str] = &[
    "backbone",
    "head",
    "aux",
    "aux_weight",
    "dropout",
    "width",
    "drop_path",
    "window",
];

impl<'de> Deserialize<'de> for ModelConfig {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        let mut keys = serde_json::Map::<String, serde_json::Value>::deserialize(d)?;
        // TOML has no null: a null value comes only from an older checkpoint's JSON.
        let legacy = keys.values().any(|v| v.is_null());
        keys.retain(|_, v| !v.is_null());
        match (keys.contains_key("arch"), keys.contains_key("backbone")) {
            (true, false) => {
                if legacy {
                    keys.retain(|k, _| !SEGMENTER_ONLY.contains(&k.as_str()));
                }
                serde_json::from_value(keys.into())
                    .map(ModelConfig::Classifier)
                    .map_err(D::Error::custom)
            }
            (false, true) => {
                if legacy {
                    keys.remove("stem");
                }
                serde_json::from_value(keys.into())
                    .map(ModelConfig::Segmenter)
                    .map_err(D::Error::custom)
            }
            (true, true) => Err(D::Error::custom(
                "model.arch is for classification and model.backbone for segmentation: give one",
            )),
            (false, false) => Err(D::Error::custom(
                "[model] needs model.arch (classification) or model.backbone (segmentation)",
            )),
        }
    }
}

impl ModelConfig {
    /// The classifier's settings, or an error naming the key a classification run needs.
    pub fn classifier(&self) -> anyhow::Result<&ClassifierConfig> {
        match self {
            ModelConfig::Classifier(c) => Ok(c),
            ModelConfig::Segmenter(_) => {
                bail!("model.arch is required for classification (this [model] is a segmenter)")
            }
        }
    }

    /// The segmenter's settings, or an error naming the key a segmentation run needs.
    pub fn segmenter(&self) -> anyhow::Result<&SegmenterConfig> {
        match self {
            ModelConfig::Segmenter(c) => Ok(c),
            ModelConfig::Classifier(_) => {
                bail!("model.backbone is required for segmentation (this [model] is a classifier)")
            }
        }
    }

    /// `model.pretrained`.
    pub fn pretrained(&self) -> Option<&Path> {
        match self {
            ModelConfig::Classifier(c) => c.pretrained.as_deref(),
            ModelConfig::Segmenter(c) => c.pretrained.as_deref(),
        }
    }
}

fn default_stem() -> Stem {
    Stem::Cifar
}
fn default_head() -> SegHeadKind {
    SegHeadKind::Fcn
}

impl SegmenterConfig {
    /// `model.drop_path`, else mmsegmentation's rate for the backbone: 0.3 for Swin, 0.1
    /// otherwise (only the transformers use it).
    pub fn drop_path(&self) -> f64 {
        self.drop_path.unwrap_or(if self.backbone.swin().is_some() {
            0.3
        } else {
            0.1
        })
    }

    /// Whether the model has the auxiliary head: `model.aux`, else true for the ResNet
    /// backbones, UPerNet and OCRNet (whose FCN head is its cascade's first stage), false
    /// for HRNet's FCN and SegFormer.
    pub fn aux(&self) -> bool {
        self.aux.unwrap_or(
            matches!(self.head, SegHeadKind::Ocr | SegHeadKind::Uper)
                || matches!(
                    self.backbone,
                    SegBackbone::ResNet18V1c | SegBackbone::ResNet50V1c | SegBackbone::ResNet101V1c
                ),
        )
    }
}
fn default_aux_weight() -> f64 {
    0.4
}
fn default_dropout() -> f64 {
    0.1
}
fn default_width() -> usize {
    64
}

/// Learning-rate schedules.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ScheduleKind {
    /// Constant.
    Constant,
    /// Cosine to 0 over the run.
    Cosine,
    /// Cosine over epochs, constant within each (MiSLAS's stage 2).
    CosineEpoch,
    /// ×γ at each milestone epoch.
    Step,
    /// (lr − min_lr)(1 − t/T)^power + min_lr.
    Poly,
}

/// The optimiser.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OptimizerKind {
    /// SGD with momentum (`torch.optim.SGD`).
    Sgd,
    /// AdamW (`torch.optim.AdamW`): decoupled weight decay; `momentum` and `nesterov` unused.
    #[serde(rename = "adamw")]
    AdamW,
}

/// `[optim]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OptimConfig {
    /// The optimiser ("sgd").
    pub kind: OptimizerKind,
    /// Peak learning rate (0.1).
    pub lr: f64,
    /// Momentum (0.9; SGD).
    pub momentum: f64,
    /// Weight decay (5e-4): L2 added to the gradient (SGD), decoupled (AdamW).
    pub weight_decay: f64,
    /// AdamW's (β1, β2) ([0.9, 0.999]).
    pub betas: [f64; 2],
    /// AdamW's ε (1e-8).
    pub eps: f64,
    /// mmcv's `paramwise_cfg.custom_keys`: `{ head = { lr_mult = 10.0 }, norm = { decay_mult =
    /// 0.0 } }` gives parameters whose names contain the key these multipliers (longest key
    /// first, then alphabetical; see [`crate::optim`]). Empty by default.
    pub custom_keys: std::collections::BTreeMap<String, crate::optim::CustomKey>,
    /// mmcv's linear warm-up by iterations (0: none): step t < W runs at the schedule's rate
    /// times 1 − (1 − t/W)(1 − `warmup_ratio`).
    pub warmup_iters: usize,
    /// The warm-up's starting factor (1e-6, mmsegmentation's SegFormer and Swin configs).
    pub warmup_ratio: f64,
    /// Nesterov momentum (false).
    pub nesterov: bool,
    /// Schedule ("cosine").
    pub schedule: ScheduleKind,
    /// Linear warm-up epochs (0).
    pub warmup_epochs: usize,
    /// Epochs at which the step schedule multiplies the rate by `gamma`.
    pub milestones: Vec<usize>,
    /// Step schedule factor (0.1).
    pub gamma: f64,
    /// Poly exponent (0.9).
    pub power: f64,
    /// Poly floor (0).
    pub min_lr: f64,
}

impl Default for OptimConfig {
    fn default() -> Self {
        OptimConfig {
            kind: OptimizerKind::Sgd,
            lr: 0.1,
            momentum: 0.9,
            weight_decay: 5e-4,
            betas: [0.9, 0.999],
            eps: 1e-8,
            custom_keys: Default::default(),
            warmup_iters: 0,
            warmup_ratio: 1e-6,
            nesterov: false,
            schedule: ScheduleKind::Cosine,
            warmup_epochs: 0,
            milestones: Vec::new(),
            gamma: 0.1,
            power: 0.9,
            min_lr: 0.0,
        }
    }
}

/// `[sar]`: on/off, the anchor kind and SAR's hyper-parameters (defaults: the spec's).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SarSection {
    /// SAR on (true) or the plain baseline.
    pub enabled: bool,
    /// The regulariser ("sar"; or a comparison baseline: "cr", "car", "prototype").
    pub kind: RegularizerKind,
    /// Table 7's ablation: L_aux in the loss (true). false ≡ λ1 = 0.
    pub aux_ce: bool,
    /// Table 7's ablation: the EMA of Eq. 8 (true). false ≡ α = 0.
    pub ema: bool,
    /// Table 7's ablation: the re-weighting of Eq. 6–7 (true). false ≡ weights = "uniform".
    pub reweight: bool,
    /// Pre-defined anchors ("normal").
    pub anchors: AnchorKind,
    /// τ (0.9).
    pub tau: f64,
    /// δ (0.8).
    pub delta: f64,
    /// EMA α (0.999).
    pub alpha: f64,
    /// λ1 (1).
    pub lambda_aux: f64,
    /// λ2 (0.1).
    pub lambda_p2a: f64,
    /// Gate ("global").
    pub gate: GateMode,
    /// Re-weighting mode ("attached").
    pub weights: WeightMode,
}

impl Default for SarSection {
    fn default() -> Self {
        let d = SarConfig::default();
        SarSection {
            enabled: true,
            kind: RegularizerKind::Sar,
            aux_ce: true,
            ema: true,
            reweight: true,
            anchors: AnchorKind::Normal,
            tau: d.tau,
            delta: d.delta,
            alpha: d.alpha,
            lambda_aux: d.lambda_aux,
            lambda_p2a: d.lambda_p2a,
            gate: d.gate,
            weights: d.weights,
        }
    }
}

impl SarSection {
    /// SAR's hyper-parameters as sar-math takes them (τ, δ, α, λ1, λ2, gate, weights).
    /// The ablation switches are folded in here: `aux_ce = false` gives λ1 = 0, `ema = false`
    /// α = 0 (Â ← E whenever the gate passes, so p2a pulls toward this step's detached
    /// h_ψ(A)), `reweight = false` the uniform weights (the plain mean of the anchor CEs).
    pub fn hyperparameters(&self) -> SarConfig {
        SarConfig {
            tau: self.tau,
            delta: self.delta,
            alpha: if self.ema { self.alpha } else { 0.0 },
            lambda_aux: if self.aux_ce { self.lambda_aux } else { 0.0 },
            lambda_p2a: self.lambda_p2a,
            gate: self.gate,
            weights: if self.reweight {
                self.weights
            } else {
                WeightMode::Uniform
            },
            ..SarConfig::default()
        }
    }
}

/// What to do when a loss part is NaN or infinite.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum NonFinitePolicy {
    /// Stop with an error naming the step and the loss part (the last checkpoint stays).
    Stop,
    /// Skip the update of that step, log it, go on (at most 10 in a row, then stop).
    Skip,
}

/// `[train]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LoopConfig {
    /// Epochs (200).
    pub epochs: usize,
    /// Batch size (128).
    pub batch_size: usize,
    /// Evaluate every this many epochs, and at the end (0: only at the end).
    pub eval_every: usize,
    /// Also checkpoint every this many steps (0: only at epoch ends).
    pub checkpoint_every_steps: usize,
    /// Checkpoints kept (2).
    pub keep_checkpoints: usize,
    /// Log training metrics every this many steps (50).
    pub log_every: usize,
    /// NaN/inf policy ("stop").
    pub on_nonfinite: NonFinitePolicy,
    /// Stop after this many steps (for smoke tests; none).
    pub max_steps: Option<usize>,
    /// Iteration-based schedule (segmentation): train this many steps, cycling through the
    /// data; the schedule's horizon is `iters` and `epochs` is ignored (none).
    pub iters: Option<usize>,
    /// Also evaluate every this many steps (0: never; evaluation at the end always runs).
    pub eval_every_steps: usize,
    /// Write PNG plots at the end: loss.png, per_class.png, features.png, reliability.png (true).
    pub plots: bool,
    /// Epoch order: "shuffle" (default) or "class-balanced" (classification).
    pub sampler: SamplerKind,
    /// "class-balanced": consecutive images drawn from one class before the next (1).
    pub samples_per_class: usize,
}

impl Default for LoopConfig {
    fn default() -> Self {
        LoopConfig {
            epochs: 200,
            batch_size: 128,
            eval_every: 0,
            checkpoint_every_steps: 0,
            keep_checkpoints: 2,
            log_every: 50,
            on_nonfinite: NonFinitePolicy::Stop,
            max_steps: None,
            iters: None,
            eval_every_steps: 0,
            plots: true,
            sampler: SamplerKind::Shuffle,
            samples_per_class: 1,
        }
    }
}

/// How classes are grouped into head/medium/tail.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum GroupBy {
    /// By training images: many (> `many`), medium, few (< `few`), as in OLTR/LDAM.
    Count,
    /// By rank of the training count: first third, middle third, last third.
    Rank,
    /// By class index: [0, head_end), [head_end, medium_end), the rest (CIFAR-100-LT: 36, 71).
    Index,
}

/// `[eval]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EvalConfig {
    /// Grouping (classification: "count"; segmentation: "rank", thirds of the classes by
    /// training pixels, the paper's head/body/tail).
    pub groups: Option<GroupBy>,
    /// Many-shot threshold (100).
    pub many: u64,
    /// Few-shot threshold (20).
    pub few: u64,
    /// End of the head classes for index grouping (36).
    pub head_end: usize,
    /// End of the medium classes for index grouping (71).
    pub medium_end: usize,
    /// Evaluation batch size (256).
    pub batch_size: usize,
    /// Segmentation inference: "whole" image or "slide" windows.
    pub mode: InferenceMode,
    /// Sliding window [H, W] (mmsegmentation Cityscapes: [512, 1024]).
    pub slide_crop: [usize; 2],
    /// Sliding stride [H, W] (mmsegmentation Cityscapes: [341, 341]).
    pub slide_stride: [usize; 2],
    /// Segmentation: test images rescaled (keeping the ratio) into this [W, H] before
    /// inference, logits resized back to the label size (none: original size).
    pub test_scale: Option<[usize; 2]>,
    /// Segmentation: colour-coded predictions of this many test images in `predictions.png`
    /// (4).
    pub prediction_images: usize,
}

/// Segmentation inference.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum InferenceMode {
    /// The whole image at once.
    Whole,
    /// Overlapping windows, logits averaged where they overlap (mmsegmentation's `slide`).
    Slide,
}

impl Default for EvalConfig {
    fn default() -> Self {
        EvalConfig {
            groups: None,
            many: 100,
            few: 20,
            head_end: 36,
            medium_end: 71,
            batch_size: 256,
            mode: InferenceMode::Whole,
            slide_crop: [512, 1024],
            slide_stride: [341, 341],
            test_scale: None,
            prediction_images: 4,
        }
    }
}

/// Reads `path`, applies `overrides` (`section.key=value`, value in TOML syntax; a bare word is
/// taken as a string) and validates.
///
/// A file may start from another: a top-level `base = "other.toml"` (relative to the file)
/// loads that file first and lays this one's keys over it, section by section, so that a
/// variant states only what it changes (`configs/arms/`). Bases may chain, at most
/// [`MAX_BASE_DEPTH`] deep (a cycle fails there).
pub fn load(path: &Path, overrides: &[String]) -> anyhow::Result<TrainConfig> {
    let table = load_table(path, 0)?;
    from_table(table, overrides).with_context(|| format!("config {}", path.display()))
}

/// How many `base` files a config may chain through.
pub const MAX_BASE_DEPTH: usize = 8;

/// A config file's table with its `base` chain resolved.
fn load_table(path: &Path, depth: usize) -> anyhow::Result<toml::Table> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut table: toml::Table =
        toml::from_str(&text).with_context(|| format!("config {}", path.display()))?;
    match table.remove("base") {
        None => Ok(table),
        Some(toml::Value::String(base)) => {
            ensure!(
                depth < MAX_BASE_DEPTH,
                "config {}: `base` chains more than {MAX_BASE_DEPTH} files deep (a cycle?)",
                path.display()
            );
            let base_path = path.parent().unwrap_or(Path::new(".")).join(&base);
            let mut merged = load_table(&base_path, depth + 1)
                .with_context(|| format!("the base {base:?} of config {}", path.display()))?;
            merge_over(&mut merged, table);
            Ok(merged)
        }
        Some(other) => bail!(
            "config {}: `base` must be a file name in quotes, not {other}",
            path.display()
        ),
    }
}

/// Lays `over` onto `into`: tables merge key by key, anything else replaces.
fn merge_over(into: &mut toml::Table, over: toml::Table) {
    for (key, value) in over {
        match (into.get_mut(&key), value) {
            (Some(toml::Value::Table(a)), toml::Value::Table(b)) => merge_over(a, b),
            (_, value) => {
                into.insert(key, value);
            }
        }
    }
}

/// [`load`] on TOML text (without `base`, which needs a file to be relative to).
pub fn parse(text: &str, overrides: &[String]) -> anyhow::Result<TrainConfig> {
    let table: toml::Table = toml::from_str(text)?;
    ensure!(
        !table.contains_key("base"),
        "`base` names a file relative to the config file, so only a config loaded from a file          may have it"
    );
    from_table(table, overrides)
}

fn from_table(mut table: toml::Table, overrides: &[String]) -> anyhow::Result<TrainConfig> {
    for o in overrides {
        apply_override(&mut table, o)?;
    }
    let cfg: TrainConfig = toml::Value::Table(table).try_into()?;
    cfg.validate()?;
    Ok(cfg)
}

fn apply_override(table: &mut toml::Table, item: &str) -> anyhow::Result<()> {
    let (key, value) = item
        .split_once('=')
        .with_context(|| format!("override `{item}` is not of the form section.key=value"))?;
    let path: Vec<&str> = key.trim().split('.').collect();
    ensure!(
        path.len() == 2 && path.iter().all(|p| !p.is_empty()),
        "override `{item}`: the key must be section.key (e.g. optim.lr=0.05)"
    );
    let value = value.trim();
    let parsed: toml::Value = match toml::from_str::<toml::Table>(&format!("v = {value}")) {
        Ok(mut t) => t.remove("v").expect("parsed"),
        Err(_) => toml::Value::String(value.to_string()),
    };
    let section = table
        .entry(path[0].to_string())
        .or_insert_with(|| toml::Value::Table(toml::Table::new()));
    let Some(section) = section.as_table_mut() else {
        bail!("override `{item}`: `{}` is not a section", path[0]);
    };
    section.insert(path[1].to_string(), parsed);
    Ok(())
}

impl TrainConfig {
    /// The TOML text of this configuration (written next to the run's outputs).
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("a config always serialises")
    }
}

#[cfg(test)]
mod tests;
