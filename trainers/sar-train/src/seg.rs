//! The segmentation half of the trainer (one loop, two tasks: see [`crate::run`]).
//!
//! One step: decode and augment the batch in parallel (mmsegmentation's pipeline,
//! [`sar_data::seg_augment`]; sample j of batch b in epoch e draws from the generator
//! `(seed, e, b·B + j)`) → F = decode-head features `[B, D, h, w]` → `Dropout2d` (p from
//! `model.dropout`, masks from `(seed, step)`) → `conv_seg` → logits resized bilinearly to the
//! crop → cross-entropy with ignore label 255, averaged over **all** pixels of the batch
//! (spec §6, mmsegmentation's default) → plus `model.aux_weight` × the auxiliary head's
//! cross-entropy → with SAR, [`SarHead::step`] on F (undropped) and the crop labels (L_p2a
//! resamples them to h × w, spec §5), the anchors classified by the same `conv_seg` → the
//! shared NaN/inf checks, backward, SGD with the (poly) schedule.
//!
//! Evaluation ([`infer`]): optional keep-ratio rescale of the image into `eval.test_scale`;
//! logits of the whole image or of overlapping windows (`eval.mode = "slide"`: mmsegmentation's
//! grid — `max(H − h_crop + h_stride − 1, 0) / h_stride + 1` rows of windows, the last ones
//! moved back inside the image, logits averaged where windows overlap); logits resized to the
//! input and then to the label size; argmax. Metrics from one confusion matrix over all test
//! pixels ([`sar_math::metrics`]): IoU per class (NaN for classes absent from both truth and
//! prediction, left out of the mean), mIoU, aAcc, mAcc, and mHead/mBody/mTail: the mean IoU of
//! the classes grouped by their labelled pixels in the training set (thirds by rank, or as
//! `eval.groups` says).

use crate::config::{DatasetKind, InferenceMode, StageKind, TrainConfig};
pub use crate::evaluation::SegEvaluation;
use crate::evaluation::{metrics_from_confusion, TaskEvaluation};
use crate::run::{RunReport, StepCtx};
use crate::trainees::candle::{finish_single_loss, finish_step, StepOutcome, Task};
use anyhow::ensure;
use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use rayon::prelude::*;
use sar_candle::{CandleBackend, EmbeddingKind, SarHead, SarHeadConfig};
use sar_data::seg::{self, SegDataset, SegSample, IGNORE};
use sar_data::seg_augment::{self, SegAugment};
use sar_math::metrics::{confusion_update, Group};
use sar_models::resize::resize_bilinear;
use sar_models::seg::{SegSpec, Segmenter};

/// Training and test sets of a segmentation config.
pub struct SegData {
    /// Training set.
    pub train: SegDataset,
    /// Test set.
    pub test: SegDataset,
}

/// Loads the data sets named by `cfg.data`.
pub fn load_seg_data(cfg: &TrainConfig) -> anyhow::Result<SegData> {
    let d = &cfg.data;
    let root = || d.root.clone().unwrap_or_default();
    let (train, test) = match d.dataset {
        DatasetKind::Mosaic => {
            let all = sar_data::digits::embedded()?;
            let (tr, te) =
                sar_data::split::stratified(&all.labels, 10, d.test_fraction, d.split_seed)?;
            let glyphs_train = all.subset(&tr, "digits/train")?;
            let glyphs_test = all.subset(&te, "digits/test")?;
            let mc = |count, seed| seg::MosaicConfig {
                size: d.mosaic_size,
                count,
                glyphs: d.mosaic_glyphs,
                imbalance: d.imbalance.unwrap_or(20.0),
                seed,
            };
            (
                seg::glyph_mosaic(
                    &glyphs_train,
                    &mc(d.mosaic_train, d.split_seed.wrapping_mul(2) + 1),
                    "mosaic/train",
                )?,
                seg::glyph_mosaic(
                    &glyphs_test,
                    &mc(d.mosaic_test, d.split_seed.wrapping_mul(2) + 2),
                    "mosaic/test",
                )?,
            )
        }
        DatasetKind::Cityscapes => (
            seg::cityscapes(&root(), true)?,
            seg::cityscapes(&root(), false)?,
        ),
        DatasetKind::Ade20k => (seg::ade20k(&root(), true)?, seg::ade20k(&root(), false)?),
        DatasetKind::PascalContext59 => (
            seg::pascal_context59(&root(), true)?,
            seg::pascal_context59(&root(), false)?,
        ),
        other => anyhow::bail!("{other:?} is not a segmentation data set"),
    };
    ensure!(
        !train.is_empty() && !test.is_empty(),
        "empty training or test set"
    );
    ensure!(
        train.classes() == test.classes(),
        "training and test sets differ in classes"
    );
    Ok(SegData { train, test })
}

/// Everything a segmentation run needs, built from a config.
pub struct SegSetup {
    /// Device.
    pub device: Device,
    /// All variables (model and SAR head).
    pub varmap: VarMap,
    /// The network.
    pub model: Box<dyn Segmenter>,
    /// The SAR head (segmentation h_ψ), if SAR is on.
    pub head: Option<SarHead>,
}

/// Builds network and head for `classes` classes.
pub fn build_seg(cfg: &TrainConfig, classes: usize) -> anyhow::Result<SegSetup> {
    let device = crate::trainees::candle::device(cfg.run.device)?;
    let varmap = VarMap::new();
    let m = cfg.model.segmenter()?;
    let spec = SegSpec {
        backbone: m.backbone,
        head: m.head,
        aux: m.aux(),
        width: m.width,
        in_channels: 3,
        classes,
        seed: cfg.run.seed,
        drop_path: m.drop_path(),
        window: m.window,
    };
    let model = sar_models::seg::build_segmenter(&spec, &varmap, &device, DType::F32)?;
    let head = if cfg.sar.enabled {
        let backend = CandleBackend::new(device.clone(), DType::F32)?;
        let head = SarHeadConfig::new(cfg.sar.hyperparameters(), classes, model.feature_dim())
            .kind(EmbeddingKind::Segmentation)
            .anchor_kind(cfg.sar.anchors)
            .regularizer(cfg.sar.kind)
            .seed(cfg.run.seed);
        Some(SarHead::new(&varmap, backend, &head)?)
    } else {
        None
    };
    Ok(SegSetup {
        device,
        varmap,
        model,
        head,
    })
}

/// Cross-entropy of logits `[N, K, h, w]` resized to labels `[N, H, W]` (255 ignored),
/// averaged over all N·H·W pixels.
pub fn seg_cross_entropy(
    logits: &Tensor,
    labels: &[u8],
    dims: (usize, usize, usize),
) -> candle_core::Result<Tensor> {
    pixel_weighted_nll(logits, labels, dims, |_| 1.0)
}

/// Σ over labelled pixels of `weight(label)`·(−log p_label) of logits `[N, K, h, w]` resized to
/// labels `[N, H, W]`, divided by all N·H·W pixels (mmsegmentation's mean; 255 ignored).
fn pixel_weighted_nll(
    logits: &Tensor,
    labels: &[u8],
    (n, h, w): (usize, usize, usize),
    weight: impl Fn(u8) -> f32,
) -> candle_core::Result<Tensor> {
    let up = resize_bilinear(logits, h, w)?;
    let dev = logits.device();
    let idx: Vec<u32> = labels
        .iter()
        .map(|&l| if l == IGNORE { 0 } else { l as u32 })
        .collect();
    let pixel_w: Vec<f32> = labels
        .iter()
        .map(|&l| if l == IGNORE { 0.0 } else { weight(l) })
        .collect();
    let idx = Tensor::from_vec(idx, (n, 1, h, w), dev)?;
    let pw = Tensor::from_vec(pixel_w, (n, 1, h, w), dev)?.to_dtype(up.dtype())?;
    sar_candle::ops::cross_entropy::weighted_pixel_nll(&up, &idx, &pw, (n * h * w) as f64)
}

/// The network's part of a training step's loss (SAR's is the head's, added by the caller).
pub struct SegForward {
    /// SAR's features F `[N, D, h, w]` (before dropout).
    pub features: Tensor,
    /// Cross-entropy of the main logits.
    pub ce: Tensor,
    /// `aux_weight` × the auxiliary head's cross-entropy, when the network has one.
    pub aux_ce: Option<Tensor>,
}

/// The training-mode forward of images `x` `[N, 3, H, W]` with labels `y` (`N·H·W`, 255
/// ignored) and the network's losses. Stochastic depth (SegFormer, Swin) draws from `rng`
/// first, then the `Dropout2d` masks (rate `dropout`) of the main and the auxiliary features;
/// networks without random layers draw nothing.
pub fn seg_forward_losses(
    model: &dyn Segmenter,
    x: &Tensor,
    y: &[u8],
    dropout: f64,
    aux_weight: f64,
    rng: &mut sar_math::rng::SeededRng,
) -> candle_core::Result<SegForward> {
    let (n, _, h, w) = x.dims4()?;
    let f = model.features_with_noise(x, true, Some(&mut *rng))?;
    let logits = model.classify(&dropout2d(&f.main, dropout, rng)?)?;
    let ce = seg_cross_entropy(&logits, y, (n, h, w))?;
    let aux_ce = match &f.aux {
        Some(a) => {
            let la = model.classify_aux(&dropout2d(a, dropout, rng)?)?;
            Some((seg_cross_entropy(&la, y, (n, h, w))? * aux_weight)?)
        }
        None => None,
    };
    Ok(SegForward {
        features: f.main,
        ce,
        aux_ce,
    })
}

/// `Dropout2d`: whole channels of `x` `[N, D, h, w]` zeroed with probability `p`, the rest
/// scaled by 1/(1 − p); masks from `rng`.
pub fn dropout2d(
    x: &Tensor,
    p: f64,
    rng: &mut sar_math::rng::SeededRng,
) -> candle_core::Result<Tensor> {
    if p <= 0.0 {
        return Ok(x.clone());
    }
    let (n, d, _, _) = x.dims4()?;
    let keep = (1.0 / (1.0 - p)) as f32;
    let m: Vec<f32> = (0..n * d)
        .map(|_| if rng.next_f64() < p { 0.0 } else { keep })
        .collect();
    x.broadcast_mul(&Tensor::from_vec(m, (n, d, 1, 1), x.device())?.to_dtype(x.dtype())?)
}

/// DisAlign's segmentation head on a frozen segmenter (`stage.kind = "disalign"`, spec §8.5):
/// a per-pixel gate σ = sigmoid(relu(BN(conv1×1(F)))) from the decode head's features F, the
/// per-class scale s and margin m, z' = σ(s z + m) + (1 − σ) z. Variables under
/// `stage.disalign.` (`scale`, `bias`, `gate.conv.weight`, `gate.bn.*`).
pub struct SegDisAlign {
    scale: Tensor,
    bias: Tensor,
    conv: sar_models::layers::Conv,
    bn: sar_models::layers::Bn,
    /// The generalized re-weighting w `[K]`.
    weights: Vec<f32>,
}

impl SegDisAlign {
    /// Builds the head's variables in `varmap` (`seed` draws the gate's conv weight).
    pub fn new(
        varmap: &VarMap,
        dev: &Device,
        seed: u64,
        channels: usize,
        weights: &[f64],
    ) -> anyhow::Result<Self> {
        use sar_models::layers::{Bn, Conv, ConvInit, ConvSpec};
        let root = sar_models::params::Scope::new(varmap, dev.clone(), DType::F32, seed ^ 0x4441);
        let p = root.pp("stage").pp("disalign");
        let k = weights.len();
        let var = |name: &str, v: f64| {
            varmap.get(
                k,
                &format!("stage.disalign.{name}"),
                candle_nn::Init::Const(v),
                DType::F32,
                dev,
            )
        };
        Ok(SegDisAlign {
            scale: var("scale", 1.0)?.reshape((1, k, 1, 1))?,
            bias: var("bias", 0.0)?.reshape((1, k, 1, 1))?,
            // mmcv's ConvModule: a bias-free conv (Kaiming, fan_out) → BatchNorm → ReLU.
            conv: Conv::new(
                &p.pp("gate").pp("conv"),
                ConvSpec::new(channels, 1, 1),
                ConvInit::KaimingFanOut,
            )?,
            bn: Bn::new(&p.pp("gate").pp("bn"), 1)?,
            weights: weights.iter().map(|&v| v as f32).collect(),
        })
    }

    /// Calibrated logits `[N, K, h, w]` of features `f` `[N, D, h, w]` and frozen logits `z`.
    pub fn calibrate(&self, f: &Tensor, z: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        let g = self.bn.forward_relu(&self.conv.forward(f)?, train)?;
        let sigma = (g.neg()?.exp()? + 1.0)?.recip()?;
        let a = (z.broadcast_mul(&self.scale)?.broadcast_add(&self.bias)? - z)?;
        z + a.broadcast_mul(&sigma)?
    }
}

/// [`seg_cross_entropy`] with class weights w as mmsegmentation reduces it:
/// Σ_valid w_y·nll / (N·H·W), all pixels in the denominator.
pub fn seg_weighted_cross_entropy(
    logits: &Tensor,
    labels: &[u8],
    dims: (usize, usize, usize),
    weights: &[f32],
) -> candle_core::Result<Tensor> {
    pixel_weighted_nll(logits, labels, dims, |l| weights[l as usize])
}

/// A segmenter whose logits go through a DisAlign head (evaluation of a DisAlign run).
struct Calibrated<'a> {
    model: &'a dyn Segmenter,
    head: &'a SegDisAlign,
}

impl Segmenter for Calibrated<'_> {
    fn features(
        &self,
        images: &Tensor,
        train: bool,
    ) -> candle_core::Result<sar_models::seg::SegFeatures> {
        self.model.features(images, train)
    }
    fn features_with_noise(
        &self,
        images: &Tensor,
        train: bool,
        noise: Option<&mut sar_math::rng::SeededRng>,
    ) -> candle_core::Result<sar_models::seg::SegFeatures> {
        self.model.features_with_noise(images, train, noise)
    }
    fn classify(&self, features: &Tensor) -> candle_core::Result<Tensor> {
        self.model.classify(features)
    }
    fn classify_aux(&self, features: &Tensor) -> candle_core::Result<Tensor> {
        self.model.classify_aux(features)
    }
    fn feature_dim(&self) -> usize {
        self.model.feature_dim()
    }
    fn classes(&self) -> usize {
        self.model.classes()
    }
    fn has_aux(&self) -> bool {
        self.model.has_aux()
    }
    fn output_stride(&self) -> usize {
        self.model.output_stride()
    }
    fn cost(&self, height: usize, width: usize) -> sar_models::Cost {
        self.model.cost(height, width)
    }
    fn aux_params(&self) -> u64 {
        self.model.aux_params()
    }
    fn logits(&self, images: &Tensor) -> candle_core::Result<Tensor> {
        let f = self.model.features(images, false)?.main;
        self.head.calibrate(&f, &self.model.classify(&f)?, false)
    }
}

/// A borrowed segmenter as a boxed one.
struct ByRef<'a>(&'a dyn Segmenter);

impl Segmenter for ByRef<'_> {
    fn features(
        &self,
        images: &Tensor,
        train: bool,
    ) -> candle_core::Result<sar_models::seg::SegFeatures> {
        self.0.features(images, train)
    }
    fn features_with_noise(
        &self,
        images: &Tensor,
        train: bool,
        noise: Option<&mut sar_math::rng::SeededRng>,
    ) -> candle_core::Result<sar_models::seg::SegFeatures> {
        self.0.features_with_noise(images, train, noise)
    }
    fn classify(&self, features: &Tensor) -> candle_core::Result<Tensor> {
        self.0.classify(features)
    }
    fn classify_aux(&self, features: &Tensor) -> candle_core::Result<Tensor> {
        self.0.classify_aux(features)
    }
    fn feature_dim(&self) -> usize {
        self.0.feature_dim()
    }
    fn classes(&self) -> usize {
        self.0.classes()
    }
    fn has_aux(&self) -> bool {
        self.0.has_aux()
    }
    fn output_stride(&self) -> usize {
        self.0.output_stride()
    }
    fn cost(&self, height: usize, width: usize) -> sar_models::Cost {
        self.0.cost(height, width)
    }
    fn aux_params(&self) -> u64 {
        self.0.aux_params()
    }
    fn logits(&self, images: &Tensor) -> candle_core::Result<Tensor> {
        self.0.logits(images)
    }
}

/// The segmentation task.
pub struct SegTask {
    pub(crate) cfg: TrainConfig,
    pub(crate) setup: SegSetup,
    pub(crate) data: SegData,
    counts: Vec<u64>,
    pub(crate) groups: Vec<Group>,
    disalign: Option<SegDisAlign>,
}

impl SegTask {
    /// Loads data, builds the network, counts training pixels per class.
    pub fn new(cfg: &TrainConfig) -> anyhow::Result<Self> {
        let data = load_seg_data(cfg)?;
        let counts = data.train.class_pixel_counts()?;
        let groups = crate::evaluation::class_groups(cfg, &counts)?;
        let setup = build_seg(cfg, data.train.classes())?;
        let disalign = match cfg.stage.kind {
            StageKind::Disalign => {
                let mut w = vec![0.0; counts.len()];
                sar_math::disalign::grw_weights(&counts, cfg.stage.rho(true), &mut w)
                    .map_err(|e| anyhow::anyhow!("stage.kind = \"disalign\": {e}"))?;
                Some(SegDisAlign::new(
                    &setup.varmap,
                    &setup.device,
                    cfg.run.seed,
                    setup.model.feature_dim(),
                    &w,
                )?)
            }
            _ => None,
        };
        Ok(SegTask {
            cfg: cfg.clone(),
            setup,
            data,
            counts,
            groups,
            disalign,
        })
    }

    /// The second stage this task runs (DisAlign), if any, on the host.
    pub(crate) fn stage_two(&self) -> Option<crate::cls::StageTwo> {
        self.disalign
            .as_ref()
            .map(|d| crate::cls::StageTwo::SegDisAlign {
                weights: d.weights.clone(),
                shift_bn: self.cfg.stage.shift_bn,
            })
    }

    /// The network as it predicts (through the DisAlign head in a DisAlign run).
    pub fn model(&self) -> Box<dyn Segmenter + '_> {
        match &self.disalign {
            None => Box::new(ByRef(self.setup.model.as_ref())),
            Some(head) => Box::new(Calibrated {
                model: self.setup.model.as_ref(),
                head,
            }),
        }
    }

    fn augment_for(&self, s: &SegSample) -> SegAugment {
        let d = &self.cfg.data;
        SegAugment {
            scale: d.seg_scale.map_or((s.width, s.height), |v| (v[0], v[1])),
            ratio_range: (d.ratio_range[0], d.ratio_range[1]),
            crop: (d.seg_crop[0], d.seg_crop[1]),
            cat_max_ratio: d.cat_max_ratio,
            flip: d.flip,
            photometric: d.photometric,
        }
    }

    /// Normalised images `[n, 3, H, W]` and labels `[n·H·W]` of training samples `idx`.
    pub(crate) fn render(
        &self,
        idx: &[usize],
        epoch: u64,
        position: u64,
    ) -> anyhow::Result<(Vec<f32>, Vec<u8>)> {
        let [ch, cw] = self.cfg.data.seg_crop;
        let per = 3 * ch * cw;
        let parts: Vec<(Vec<f32>, Vec<u8>)> = idx
            .par_iter()
            .enumerate()
            .map(|(j, &i)| {
                let s = self.data.train.get(i)?;
                let mut rng =
                    sar_data::augment::sample_rng(self.cfg.run.seed, epoch, position + j as u64);
                let (a, valid) = seg_augment::augment(&s, &self.augment_for(&s), &mut rng);
                let mut x = vec![0.0f32; per];
                seg_augment::normalize_into(&a, valid, &mut x);
                Ok((x, a.label))
            })
            .collect::<anyhow::Result<_>>()?;
        let mut x = Vec::with_capacity(per * idx.len());
        let mut y = Vec::with_capacity(ch * cw * idx.len());
        for (a, b) in parts {
            x.extend(a);
            y.extend(b);
        }
        Ok((x, y))
    }
}

/// Keep-ratio rescale size of an `h × w` image into `scale` [W, H] (none: unchanged).
fn test_size(h: usize, w: usize, scale: Option<[usize; 2]>) -> (usize, usize) {
    match scale {
        Some([sw, sh]) => seg_augment::rescale_size(h, w, (sw as f64, sh as f64)),
        None => (h, w),
    }
}

/// Logits `[1, K, H, W]` of a normalised image `[1, 3, H, W]`, whole or by sliding windows.
pub fn logits_of(
    model: &dyn Segmenter,
    x: &Tensor,
    mode: InferenceMode,
    crop: [usize; 2],
    stride: [usize; 2],
) -> candle_core::Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    match mode {
        InferenceMode::Whole => resize_bilinear(&model.logits(x)?, h, w),
        InferenceMode::Slide => {
            let ([ch, cw], [sh, sw]) = (crop, stride);
            let (ch, cw) = (ch.min(h), cw.min(w));
            let rows = h.saturating_sub(ch).div_ceil(sh) + 1;
            let cols = w.saturating_sub(cw).div_ceil(sw) + 1;
            let k = model.classes();
            let mut sum = vec![0.0f32; k * h * w];
            let mut count = vec![0u32; h * w];
            for r in 0..rows {
                for c in 0..cols {
                    let y2 = (r * sh + ch).min(h);
                    let x2 = (c * sw + cw).min(w);
                    let (y1, x1) = (y2.saturating_sub(ch), x2.saturating_sub(cw));
                    let win = x
                        .narrow(2, y1, y2 - y1)?
                        .narrow(3, x1, x2 - x1)?
                        .contiguous()?;
                    let l = resize_bilinear(&model.logits(&win)?, y2 - y1, x2 - x1)?;
                    let v: Vec<f32> = l.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
                    let (wh, ww) = (y2 - y1, x2 - x1);
                    for kk in 0..k {
                        for yy in 0..wh {
                            let src = &v[(kk * wh + yy) * ww..(kk * wh + yy + 1) * ww];
                            let dst = &mut sum[(kk * h + y1 + yy) * w + x1..][..ww];
                            dst.iter_mut().zip(src).for_each(|(a, b)| *a += b);
                        }
                    }
                    for yy in y1..y2 {
                        count[yy * w + x1..yy * w + x2]
                            .iter_mut()
                            .for_each(|c| *c += 1);
                    }
                }
            }
            for kk in 0..k {
                for p in 0..h * w {
                    sum[kk * h * w + p] /= count[p] as f32;
                }
            }
            Tensor::from_vec(sum, (1, k, h, w), x.device())
        }
    }
}

/// Predicted classes (`H·W`) of one test sample, as the module docs describe, and each
/// pixel's confidence (the predicted class's softmax probability).
pub fn infer(
    model: &dyn Segmenter,
    s: &SegSample,
    cfg: &TrainConfig,
    dev: &Device,
) -> anyhow::Result<(Vec<u8>, Vec<f32>)> {
    let (nh, nw) = test_size(s.height, s.width, cfg.eval.test_scale);
    let resized = SegSample {
        height: nh,
        width: nw,
        image: seg_augment::resize_image(&s.image, s.height, s.width, nh, nw),
        label: Vec::new(),
    };
    let mut x = vec![0.0f32; 3 * nh * nw];
    seg_augment::normalize_into(&resized, (nh, nw), &mut x);
    let x = Tensor::from_vec(x, (1, 3, nh, nw), dev)?;
    let l = logits_of(
        model,
        &x,
        cfg.eval.mode,
        cfg.eval.slide_crop,
        cfg.eval.slide_stride,
    )?;
    let l = resize_bilinear(&l, s.height, s.width)?;
    let pred = l
        .argmax(1)?
        .flatten_all()?
        .to_dtype(DType::U8)?
        .to_vec1::<u8>()?;
    let conf = candle_nn::ops::softmax(&l, 1)?
        .max(1)?
        .flatten_all()?
        .to_dtype(DType::F32)?
        .to_vec1::<f32>()?;
    Ok((pred, conf))
}

/// Metrics of `model` on `set` (see the module docs).
pub fn evaluate_seg(
    model: &dyn Segmenter,
    set: &SegDataset,
    groups: &[Group],
    cfg: &TrainConfig,
    dev: &Device,
) -> anyhow::Result<SegEvaluation> {
    let k = set.classes();
    let mut confusion = vec![0u64; k * k];
    let mut calibration = vec![Default::default(); crate::evaluation::CALIBRATION_BINS];
    for i in 0..set.len() {
        let s = set.get(i)?;
        let (pred, conf) = infer(model, &s, cfg, dev)?;
        confusion_update(&mut confusion, k, &s.label, &pred, IGNORE as i64)?;
        // Calibration over the labelled pixels.
        let (mut c, mut ok) = (Vec::new(), Vec::new());
        for ((&t, &p), &q) in s.label.iter().zip(&pred).zip(&conf) {
            if t != IGNORE {
                c.push(q as f64);
                ok.push(t == p);
            }
        }
        crate::evaluation::calibration_add(&mut calibration, &c, &ok)?;
    }
    metrics_from_confusion(&confusion, groups, &set.class_names, calibration)
}

impl Task for SegTask {
    fn varmap(&self) -> &VarMap {
        &self.setup.varmap
    }
    fn device(&self) -> &Device {
        &self.setup.device
    }
    fn head(&self) -> Option<&SarHead> {
        self.setup.head.as_ref()
    }
    fn head_mut(&mut self) -> Option<&mut SarHead> {
        self.setup.head.as_mut()
    }
    fn train_len(&self) -> usize {
        self.data.train.len()
    }
    fn train_counts(&self) -> &[u64] {
        &self.counts
    }

    fn step(&mut self, ctx: &StepCtx) -> anyhow::Result<StepOutcome> {
        let (n, step) = (ctx.idx.len(), ctx.step);
        let [h, w] = self.cfg.data.seg_crop;
        let (mut x, y) = self.render(ctx.idx, ctx.epoch, ctx.position)?;
        if ctx.poison_input {
            x.iter_mut().for_each(|v| *v = f32::NAN);
        }
        if let Some(i) = x.iter().position(|v| !v.is_finite()) {
            return Ok(StepOutcome::Fault(format!(
                "step {step}: the input batch holds {} (image {} of the batch)",
                x[i],
                i / (3 * h * w)
            )));
        }
        let dev = self.setup.device.clone();
        let model = &self.setup.model;
        let x = Tensor::from_vec(x, (n, 3, h, w), &dev)?;
        let mut rng = sar_data::augment::sample_rng(self.cfg.run.seed ^ 0x4452_4F50, step, 0);
        let m = self.cfg.model.segmenter()?;
        let p = m.dropout;
        if let Some(da) = &self.disalign {
            // The segmenter is frozen (its BatchNorm statistics shift with shift_bn, its
            // dropout stays as in training); the auxiliary head's loss weight is 0.
            let f = model.features(&x, self.cfg.stage.shift_bn)?.main.detach();
            let z = model.classify(&dropout2d(&f, p, &mut rng)?)?.detach();
            let logits = da.calibrate(&f, &z, true)?;
            let loss = seg_weighted_cross_entropy(&logits, &y, (n, h, w), &da.weights)?;
            return finish_single_loss(ctx, loss, n);
        }
        let fw = seg_forward_losses(model.as_ref(), &x, &y, p, m.aux_weight, &mut rng)?;
        let ce = if ctx.poison_loss {
            (fw.ce * f64::INFINITY)?
        } else {
            fw.ce
        };
        let ce_value = ce.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        let mut loss = ce;
        let mut head_aux = 0.0;
        if let Some(ca) = fw.aux_ce {
            head_aux = ca.to_dtype(DType::F64)?.to_scalar::<f64>()?;
            loss = (loss + ca)?;
        }
        let (mut aux, mut p2a, mut gate, mut valid) = (0.0, 0.0, false, 0);
        if let Some(hd) = self.setup.head.as_mut() {
            let labels: Vec<i64> = y.iter().map(|&v| v as i64).collect();
            let y_t = Tensor::from_vec(labels, (n, h, w), &dev)?;
            let classify = |e: &Tensor| model.classify(e);
            let s = hd.step(&classify, &fw.features, &y_t)?;
            (aux, p2a, gate, valid) = (s.loss_aux, s.loss_p2a, s.gate_passed, s.valid);
            loss = (loss + s.loss)?;
        }
        finish_step(step, loss, ce_value, head_aux, aux, p2a, gate, valid, n)
    }

    fn trainable(&self, name: &str) -> bool {
        match self.cfg.stage.kind {
            StageKind::Disalign => name.starts_with("stage.disalign."),
            _ => true,
        }
    }

    fn evaluate(&self) -> anyhow::Result<TaskEvaluation> {
        Ok(TaskEvaluation::Segmentation(evaluate_seg(
            self.model().as_ref(),
            &self.data.test,
            &self.groups,
            &self.cfg,
            &self.setup.device,
        )?))
    }

    fn cost(&self) -> sar_models::Cost {
        let [h, w] = self.cfg.data.seg_crop;
        self.setup.model.cost(h, w)
    }

    fn write_plots(&self, cfg: &TrainConfig, report: &RunReport) -> anyhow::Result<()> {
        let out = &cfg.run.output;
        let e = report.eval.segmentation()?;
        let labels: Vec<String> = e
            .class_names
            .iter()
            .zip(&report.train_counts)
            .map(|(n, c)| format!("{n} ({c})"))
            .collect();
        crate::plots::grouped_bars(
            &out.join("per_class_iou.png"),
            &format!("{}: test IoU per class (training pixels)", cfg.run.name),
            "IoU %",
            &labels,
            &[(
                if report.sar { "SAR" } else { "baseline" }.to_string(),
                e.per_class_iou.iter().map(|v| 100.0 * v).collect(),
            )],
        )?;
        crate::plots::reliability(
            &out.join("reliability.png"),
            &format!("{}: calibration per test pixel", cfg.run.name),
            &e.calibration,
        )?;
        let shown = cfg.eval.prediction_images.min(self.data.test.len());
        if shown > 0 {
            let mut rows = Vec::new();
            for i in 0..shown {
                let s = self.data.test.get(i)?;
                let (pred, _) = infer(self.model().as_ref(), &s, cfg, &self.setup.device)?;
                rows.push((s, pred));
            }
            crate::plots::segmentation_panel(
                &out.join("predictions.png"),
                &rows,
                self.data.test.classes(),
            )?;
        }
        Ok(())
    }
}
