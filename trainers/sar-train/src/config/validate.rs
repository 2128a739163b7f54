//! [`TrainConfig::validate`]: every value checked, one section at a time; each error names
//! the key and the value.

use super::*;
use anyhow::{bail, ensure};
use sar_models::seg::SegHeadKind;

impl TrainConfig {
    /// Checks every value; the error names the key.
    pub fn validate(&self) -> anyhow::Result<()> {
        self.validate_model()?;
        if self.data.dataset.is_segmentation() {
            self.validate_segmentation()?;
        }
        self.validate_data()?;
        self.validate_optim_and_train()?;
        self.validate_eval()?;
        self.validate_sar()?;
        self.validate_stage()?;
        self.validate_run()
    }

    /// `[stage]` and `train.sampler`: what a second stage needs and refuses.
    fn validate_stage(&self) -> anyhow::Result<()> {
        let (st, t) = (&self.stage, &self.train);
        let seg = self.data.dataset.is_segmentation();
        ensure!(
            t.samples_per_class >= 1,
            "train.samples_per_class must be ≥ 1"
        );
        ensure!(
            !(seg && t.sampler == SamplerKind::ClassBalanced),
            "train.sampler = \"class-balanced\" draws images by their class; segmentation images have many classes (use \"shuffle\")"
        );
        ensure!(
            !(st.init_from.is_some() && self.model.pretrained().is_some()),
            "stage.init_from and model.pretrained both give starting weights; keep one"
        );
        ensure!(
            st.classifier_lr_factor.is_finite() && st.classifier_lr_factor > 0.0,
            "stage.classifier_lr_factor must be > 0, got {}",
            st.classifier_lr_factor
        );
        if let Some(rho) = st.grw_rho {
            ensure!(
                rho.is_finite() && rho >= 0.0,
                "stage.grw_rho must be ≥ 0, got {rho}"
            );
        }
        if st.kind == StageKind::Disalign {
            ensure!(
                st.init_from.is_some(),
                "stage.kind = \"disalign\" calibrates a first stage: name its checkpoint or run folder in stage.init_from (sar train --init-from)"
            );
            ensure!(
                !self.sar.enabled && self.data.mixup_alpha == 0.0,
                "stage.kind = \"disalign\" is a second stage without SAR and MixUp; set sar.enabled = false and data.mixup_alpha = 0"
            );
        }
        if st.kind == StageKind::Mislas {
            ensure!(
                !seg,
                "stage.kind = \"mislas\" retrains a classifier; it is for classification"
            );
            ensure!(
                st.init_from.is_some(),
                "stage.kind = \"mislas\" retrains the classifier of a first stage: name its checkpoint or run folder in stage.init_from (sar train --init-from)"
            );
            ensure!(
                !self.sar.enabled,
                "stage.kind = \"mislas\" is a second stage without SAR (SAR is a first-stage regulariser in the paper's Table 10); set sar.enabled = false"
            );
            ensure!(
                self.data.mixup_alpha == 0.0,
                "stage.kind = \"mislas\" trains without MixUp (MiSLAS's stage 2); set data.mixup_alpha = 0"
            );
            let mut eps = [0.0; 2];
            sar_math::mislas::label_aware_smoothing(
                &[1, 2],
                st.smooth_head,
                st.smooth_tail,
                st.shape(),
                &mut eps,
            )
            .map_err(|e| anyhow::anyhow!("[stage]: {e}"))?;
        }
        Ok(())
    }

    /// `[sar]`: the hyper-parameters' domains, and the regulariser kind with its switches.
    fn validate_sar(&self) -> anyhow::Result<()> {
        let s = &self.sar;
        s.hyperparameters()
            .validate()
            .map_err(|e| anyhow::anyhow!("[sar]: {e}"))?;
        ensure!(
            s.reweight || s.weights == WeightMode::Attached,
            "sar.reweight = false replaces sar.weights (the plain mean has no weights to detach); leave sar.weights at \"attached\""
        );
        if s.kind != RegularizerKind::Sar {
            let name = serde_json::to_string(&s.kind)?;
            ensure!(
                s.aux_ce && s.reweight,
                "sar.aux_ce and sar.reweight switch off parts of SAR; sar.kind = {name} has neither (leave them true)"
            );
            ensure!(
                s.ema || s.kind == RegularizerKind::Prototype,
                "sar.ema applies to SAR and to sar.kind = \"prototype\" only, not to {name}"
            );
        }
        let mixup = !self.data.dataset.is_segmentation() && self.data.mixup_alpha > 0.0;
        ensure!(
            !(mixup && matches!(s.kind, RegularizerKind::Car | RegularizerKind::Prototype)),
            "sar.kind = {} builds batch prototypes, which MixUp's blended images do not have; set data.mixup_alpha = 0 (\"sar\" and \"cr\" take MixUp)",
            serde_json::to_string(&s.kind)?
        );
        Ok(())
    }

    /// A classifier for a classification data set, a segmenter for a segmentation one.
    fn validate_model(&self) -> anyhow::Result<()> {
        let d = &self.data;
        match (d.dataset.is_segmentation(), &self.model) {
            (false, ModelConfig::Segmenter(_)) => bail!(
                "model.backbone is for segmentation data sets; {:?} takes model.arch",
                d.dataset
            ),
            (true, ModelConfig::Classifier(_)) => bail!(
                "model.arch is for classification; {:?} takes model.backbone",
                d.dataset
            ),
            _ => Ok(()),
        }
    }

    /// The keys only segmentation reads (model, augmentation, mosaic, sliding window).
    fn validate_segmentation(&self) -> anyhow::Result<()> {
        let (d, m) = (&self.data, self.model.segmenter()?);
        ensure!(
            (0.0..1.0).contains(&m.dropout),
            "model.dropout must be in [0, 1), got {}",
            m.dropout
        );
        ensure!(
            m.aux_weight.is_finite() && m.aux_weight >= 0.0,
            "model.aux_weight must be ≥ 0, got {}",
            m.aux_weight
        );
        ensure!(
            (0.0..1.0).contains(&m.drop_path()),
            "model.drop_path must be in [0, 1), got {}",
            m.drop_path()
        );
        let mit = m.backbone.mit().is_some();
        let swin = m.backbone.swin().is_some();
        ensure!(
            swin == (m.head == SegHeadKind::Uper),
            "model.head = \"uper\" goes with the swin-t, swin-s, swin-b and swin-l backbones and only with them (backbone {}, head {:?})",
            m.backbone,
            m.head
        );
        if let Some(window) = m.window {
            ensure!(
                swin && window >= 2,
                "model.window is Swin's attention window: it needs a swin-* backbone and at least 2, got {window} with {}",
                m.backbone
            );
        }
        ensure!(
            mit == (m.head == SegHeadKind::Segformer),
            "model.head = \"segformer\" goes with the mit-b0 … mit-b5 backbones and only with them (backbone {}, head {:?})",
            m.backbone,
            m.head
        );
        ensure!(
            m.head != SegHeadKind::Ocr || m.aux(),
            "OCRNet's FCN head is part of its cascade (its regions feed the OCR head): model.aux cannot be false"
        );
        ensure!(
            !(mit && m.aux()),
            "SegFormer has no auxiliary head: model.aux = true needs a ResNet backbone"
        );
        ensure!(
            m.width >= 4 && m.width.is_multiple_of(4),
            "model.width must be a multiple of 4, got {}",
            m.width
        );
        ensure!(
            d.seg_crop.iter().all(|&v| v >= 8),
            "data.seg_crop must be at least [8, 8], got {:?}",
            d.seg_crop
        );
        ensure!(
            d.ratio_range[0] > 0.0
                && d.ratio_range[0] <= d.ratio_range[1]
                && d.ratio_range[1].is_finite(),
            "data.ratio_range must be [lo, hi] with 0 < lo ≤ hi, got {:?}",
            d.ratio_range
        );
        ensure!(
            d.cat_max_ratio > 0.0 && d.cat_max_ratio <= 1.0,
            "data.cat_max_ratio must be in (0, 1], got {}",
            d.cat_max_ratio
        );
        ensure!(
            d.mixup_alpha == 0.0,
            "data.mixup_alpha is for classification only"
        );
        ensure!(
            d.mosaic_size >= 32 && d.mosaic_train >= 1 && d.mosaic_test >= 1,
            "data.mosaic_size must be ≥ 32 and mosaic_train/mosaic_test ≥ 1"
        );
        ensure!(
            self.eval.slide_crop.iter().all(|&v| v >= 1)
                && self.eval.slide_stride.iter().all(|&v| v >= 1),
            "eval.slide_crop and eval.slide_stride must be positive"
        );
        ensure!(
            self.eval.groups != Some(GroupBy::Count),
            "eval.groups = \"count\" groups classes by images; segmentation groups by pixel frequency (\"rank\") or \"index\""
        );
        Ok(())
    }

    /// `[data]` keys of every task.
    fn validate_data(&self) -> anyhow::Result<()> {
        let d = &self.data;
        if !matches!(d.dataset, DatasetKind::Digits | DatasetKind::Mosaic) {
            ensure!(
                d.root.is_some(),
                "data.root is required for {:?}",
                d.dataset
            );
        }
        if let Some(f) = d.imbalance {
            ensure!(
                f.is_finite() && f >= 1.0,
                "data.imbalance must be ≥ 1, got {f}"
            );
        }
        ensure!(
            d.test_fraction > 0.0 && d.test_fraction < 1.0,
            "data.test_fraction must be in (0, 1), got {}",
            d.test_fraction
        );
        ensure!(
            d.crop >= 8 && d.resize >= d.crop,
            "data.crop must be ≥ 8 and data.resize ≥ data.crop, got {} and {}",
            d.crop,
            d.resize
        );
        ensure!(
            d.mixup_alpha.is_finite() && d.mixup_alpha >= 0.0,
            "data.mixup_alpha must be ≥ 0, got {}",
            d.mixup_alpha
        );
        Ok(())
    }

    /// `[optim]` and `[train]`.
    fn validate_optim_and_train(&self) -> anyhow::Result<()> {
        if let Some(i) = self.train.iters {
            ensure!(i >= 1, "train.iters must be ≥ 1");
        }
        let o = &self.optim;
        ensure!(
            o.lr.is_finite() && o.lr > 0.0,
            "optim.lr must be > 0, got {}",
            o.lr
        );
        ensure!(
            (0.0..1.0).contains(&o.momentum),
            "optim.momentum must be in [0, 1), got {}",
            o.momentum
        );
        ensure!(
            o.weight_decay.is_finite() && o.weight_decay >= 0.0,
            "optim.weight_decay must be ≥ 0, got {}",
            o.weight_decay
        );
        ensure!(
            !o.nesterov || o.momentum > 0.0,
            "optim.nesterov needs optim.momentum > 0"
        );
        ensure!(
            o.gamma.is_finite() && o.gamma > 0.0,
            "optim.gamma must be > 0, got {}",
            o.gamma
        );
        ensure!(
            o.power.is_finite() && o.power > 0.0,
            "optim.power must be > 0, got {}",
            o.power
        );
        ensure!(
            o.min_lr.is_finite() && o.min_lr >= 0.0 && o.min_lr <= o.lr,
            "optim.min_lr must be in [0, lr], got {}",
            o.min_lr
        );
        let t = &self.train;
        ensure!(t.epochs >= 1, "train.epochs must be ≥ 1");
        ensure!(t.batch_size >= 1, "train.batch_size must be ≥ 1");
        ensure!(
            t.keep_checkpoints >= 1,
            "train.keep_checkpoints must be ≥ 1"
        );
        ensure!(
            o.betas.iter().all(|b| (0.0..1.0).contains(b)),
            "optim.betas must both be in [0, 1), got {:?}",
            o.betas
        );
        ensure!(
            o.eps.is_finite() && o.eps > 0.0,
            "optim.eps must be > 0, got {}",
            o.eps
        );
        for (key, m) in &o.custom_keys {
            ensure!(
                !key.is_empty(),
                "optim.custom_keys: a key must not be empty"
            );
            ensure!(
                m.lr_mult.is_finite() && m.lr_mult >= 0.0,
                "optim.custom_keys.{key}.lr_mult must be ≥ 0, got {}",
                m.lr_mult
            );
            ensure!(
                m.decay_mult.is_finite() && m.decay_mult >= 0.0,
                "optim.custom_keys.{key}.decay_mult must be ≥ 0, got {}",
                m.decay_mult
            );
        }
        ensure!(
            (0.0..=1.0).contains(&o.warmup_ratio),
            "optim.warmup_ratio must be in [0, 1], got {}",
            o.warmup_ratio
        );
        ensure!(
            o.warmup_epochs == 0 || o.warmup_iters == 0,
            "optim.warmup_epochs and optim.warmup_iters are two warm-ups: set one"
        );
        ensure!(
            o.kind == super::OptimizerKind::Sgd || !o.nesterov,
            "optim.nesterov is SGD's; optim.kind = \"adamw\" has no Nesterov variant"
        );
        ensure!(
            o.warmup_epochs <= t.epochs,
            "optim.warmup_epochs ({}) exceeds train.epochs ({})",
            o.warmup_epochs,
            t.epochs
        );
        Ok(())
    }

    /// `[eval]`.
    fn validate_eval(&self) -> anyhow::Result<()> {
        ensure!(self.eval.batch_size >= 1, "eval.batch_size must be ≥ 1");
        ensure!(
            self.eval.head_end <= self.eval.medium_end,
            "eval.head_end must be ≤ eval.medium_end"
        );
        ensure!(
            self.eval.few <= self.eval.many,
            "eval.few must be ≤ eval.many"
        );
        Ok(())
    }

    /// `[run]`: the device this build has. (Both backends train every model, data set and
    /// stage.)
    fn validate_run(&self) -> anyhow::Result<()> {
        if self.run.device == DeviceKind::Cuda && !cfg!(feature = "cuda") {
            bail!("run.device = \"cuda\" needs sar built with --features cuda");
        }
        Ok(())
    }
}
