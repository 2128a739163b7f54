//! # sar-candle: SAR on candle
//!
//! - [`CandleBackend`] implements [`sar_math::backend::SarBackend`] on candle tensors (f32 or
//!   f64, any device). SAR's losses are differentiable candle operations: gradients reach the
//!   features, the anchor embedding and the shared classifier through candle's autograd, with
//!   the re-weighting w attached by default (spec §3).
//! - Two kernel paths for L_p2a: a **fused CPU custom op** ([`fused`]) that runs `sar-math`'s
//!   single-pass loss+gradient kernel on all cores and hands the precomputed gradient to
//!   backward, and a **composite** path of plain candle ops (index_select / where_cond / sqr /
//!   sum) that runs on any device, CUDA included. [`Kernels::Auto`] picks the fused op on CPU.
//! - [`SarHead`] ([`head`]): the pre-defined anchors, the anchor embedding h_ψ, the EMA state, and
//!   an explicit `&mut self` step that takes the model's classifier.
//!
//! Layouts: anchor logits `[C, C]`, anchors `[C, D]`, features NCHW `[B, D, H, W]` with labels
//! `[B, H', W']` (I64, resampled on the fly like PyTorch's legacy `nearest`), or `[N, D]` with
//! `[N]`.
//!
//! ```
//! use candle_core::{DType, Device};
//! use sar_candle::CandleBackend;
//! use sar_math::backend::SarBackend;
//! let b = CandleBackend::new(Device::Cpu, DType::F64)?;
//! let z = b.tensor(&[2, 2], &[0.0, 0.0, 0.0, 0.0])?;
//! let ce = b.anchor_ce(&z, 0.9, sar_math::WeightMode::Attached)?;
//! // Two uniform anchors: L = 2(ln 2)²/(2 ln 2 − ε) ≈ ln 2.
//! assert!((b.loss_value(&ce.loss)? - 2f64.ln()).abs() < 1e-8);
//! # Ok::<(), sar_candle::SarCandleError>(())
//! ```

pub mod fused;
pub mod head;
pub mod ops;

pub use head::{EmbeddingKind, SarHead, SarHeadConfig, SarStepOutput};

use candle_core::{DType, Device, Tensor, Var, D};
use sar_math::backend::{AnchorCeOutput, BaselineBackend, Mixup, P2aOutput, SarBackend};
use sar_math::resample::nearest_source_index;
use sar_math::{SarError, WeightMode};

/// Errors of the candle adapter.
#[derive(Debug, thiserror::Error)]
pub enum SarCandleError {
    /// A `sar-math` kernel refused its input.
    #[error(transparent)]
    Sar(#[from] SarError),
    /// candle reported an error.
    #[error("candle: {0}")]
    Candle(#[from] candle_core::Error),
    /// A tensor has the wrong rank, shape or dtype.
    #[error("{0}")]
    Shape(String),
}

/// Result alias of this crate.
pub type Result<T> = std::result::Result<T, SarCandleError>;

/// Which implementation computes L_p2a.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Kernels {
    /// The fused custom op on CPU, composite ops on other devices.
    #[default]
    Auto,
    /// Composite candle ops everywhere (the path CUDA takes).
    Composite,
}

/// The candle backend: a device, a float dtype (F32 or F64) and a kernel choice.
#[derive(Debug, Clone)]
pub struct CandleBackend {
    device: Device,
    dtype: DType,
    kernels: Kernels,
}

fn shape_err<T>(msg: String) -> Result<T> {
    Err(SarCandleError::Shape(msg))
}

impl CandleBackend {
    /// A backend on `device` computing in `dtype` (F32 or F64).
    pub fn new(device: Device, dtype: DType) -> Result<Self> {
        if !matches!(dtype, DType::F32 | DType::F64) {
            return shape_err(format!("SAR computes in F32 or F64, not {dtype:?}"));
        }
        Ok(CandleBackend {
            device,
            dtype,
            kernels: Kernels::Auto,
        })
    }

    /// The same backend with another kernel choice.
    pub fn with_kernels(mut self, kernels: Kernels) -> Self {
        self.kernels = kernels;
        self
    }

    /// The device.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The float dtype.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    fn fused(&self) -> bool {
        self.kernels == Kernels::Auto && self.device.is_cpu()
    }

    /// `v` rounded to this backend's dtype, as f64 (to compare host values the way the kernels do).
    fn in_dtype(&self, v: f64) -> f64 {
        if self.dtype == DType::F32 {
            v as f32 as f64
        } else {
            v
        }
    }

    /// Checks that every label is in `0..classes` or equals `ignore_index` (device reductions;
    /// the host search for the first offender runs only when one exists).
    fn validate_labels(&self, labels: &Tensor, classes: usize, ignore_index: i64) -> Result<()> {
        let l = labels.flatten_all()?;
        if l.elem_count() == 0 {
            return Ok(());
        }
        let in_range = l.ge(0i64)?.minimum(&l.lt(classes as i64)?)?;
        let ok = in_range.maximum(&l.eq(ignore_index)?)?;
        if ok.min(0)?.to_scalar::<u8>()? == 1 {
            return Ok(());
        }
        let host = l.to_vec1::<i64>()?;
        let (index, &label) = host
            .iter()
            .enumerate()
            .find(|&(_, &v)| v != ignore_index && !(0..classes as i64).contains(&v))
            .expect("the device check found one");
        Err(SarError::Label {
            op: sar_math::Op::P2a,
            index,
            label,
            classes,
        }
        .into())
    }

    /// Labels `[B, H', W']` gathered at the nearest source rows and columns for `[B, H, W]`.
    fn resample(&self, labels: &Tensor, (h, w): (usize, usize)) -> Result<Tensor> {
        let (_, lh, lw) = labels.dims3()?;
        if (lh, lw) == (h, w) {
            return Ok(labels.clone());
        }
        if lh * lw == 0 {
            return shape_err(format!(
                "labels {:?} are empty but the feature map is {h}×{w}",
                labels.dims()
            ));
        }
        let rows: Vec<u32> = (0..h)
            .map(|i| nearest_source_index(lh, h, i) as u32)
            .collect();
        let cols: Vec<u32> = (0..w)
            .map(|i| nearest_source_index(lw, w, i) as u32)
            .collect();
        let rows = Tensor::new(rows.as_slice(), labels.device())?;
        let cols = Tensor::new(cols.as_slice(), labels.device())?;
        Ok(labels.index_select(&rows, 1)?.index_select(&cols, 2)?)
    }

    /// Composite p2a: `weight`·L_p2a from candle ops, any device. Returns (loss, value, |Ω|).
    fn p2a_composite(
        &self,
        features: &Tensor,
        labels: &Tensor,
        anchors: &Tensor,
        ignore_index: i64,
        class_active: Option<&[bool]>,
        weight: f64,
    ) -> Result<(Tensor, f64, usize)> {
        let (_, d) = anchors.dims2()?;
        let anchors = anchors.detach().to_dtype(features.dtype())?;
        let y = match features.rank() {
            4 => self.resample(labels, (features.dim(2)?, features.dim(3)?))?,
            _ => labels.clone(),
        };
        let mut valid = y.ne(ignore_index)?;
        let zeros_i = y.zeros_like()?;
        let yc = valid.where_cond(&y, &zeros_i)?.flatten_all()?;
        if let Some(active) = class_active {
            let act: Vec<u8> = active.iter().map(|&a| a as u8).collect();
            let act = Tensor::new(act.as_slice(), y.device())?;
            valid = valid.minimum(&act.index_select(&yc, 0)?.reshape(y.shape())?)?;
        }
        let n = valid.to_dtype(DType::F64)?.sum_all()?.to_scalar::<f64>()? as usize;
        let targets = anchors.index_select(&yc, 0)?; // [M, D]
        let (targets, mask) = match features.rank() {
            4 => {
                let (b, _, h, w) = features.dims4()?;
                let t = targets.reshape((b, h, w, d))?.permute((0, 3, 1, 2))?;
                (t, valid.unsqueeze(1)?.broadcast_as((b, d, h, w))?)
            }
            _ => (targets, valid.unsqueeze(1)?.broadcast_as(features.shape())?),
        };
        // where_cond, not a 0/1 multiply: a NaN outside Ω must not reach the loss or gradient.
        let diff = mask.where_cond(&(features - targets)?, &features.zeros_like()?)?;
        let sum = diff.sqr()?.sum_all()?;
        let scale = if n == 0 {
            0.0
        } else {
            1.0 / (n as f64 * d as f64)
        };
        let value = sum.to_dtype(DType::F64)?.to_scalar::<f64>()? * scale;
        Ok(((sum * (weight * scale))?, value, n))
    }

    /// Composite MixUp p2a: `weight`·L_p2a toward λ·Â_a + (1−λ)·Â_b from candle ops, any
    /// device. Labels checked by the caller.
    fn p2a_mixup_composite(
        &self,
        features: &Tensor,
        mixup: Mixup<'_>,
        anchors: &Tensor,
        ignore_index: i64,
        class_active: Option<&[bool]>,
        weight: f64,
    ) -> Result<P2aOutput<Tensor>> {
        let (n, d) = features.dims2()?;
        let dev = features.device();
        let lambda = mixup.lambda;
        let mask: Vec<f64> = mixup
            .in_omega(ignore_index, class_active)
            .into_iter()
            .map(|m| m as u8 as f64)
            .collect();
        let valid = mask.iter().filter(|&&m| m > 0.0).count();
        let index = |ys: &[i64]| -> candle_core::Result<Tensor> {
            let v: Vec<u32> = ys
                .iter()
                .map(|&y| if y == ignore_index { 0 } else { y as u32 })
                .collect();
            Tensor::from_vec(v, n, dev)
        };
        let target = ((anchors.index_select(&index(mixup.labels_a)?, 0)? * lambda)?
            + (anchors.index_select(&index(mixup.labels_b)?, 0)? * (1.0 - lambda))?)?
            .detach();
        let mask = Tensor::from_vec(mask, (n, 1), dev)?.to_dtype(features.dtype())?;
        let sq = (features - target)?
            .sqr()?
            .broadcast_mul(&mask)?
            .sum_all()?;
        let denom = (valid.max(1) * d) as f64;
        let value = sq.to_dtype(DType::F64)?.to_scalar::<f64>()? / denom;
        let value = if valid == 0 { 0.0 } else { value };
        Ok(P2aOutput {
            loss: (sq * (weight / denom))?,
            value,
            valid,
        })
    }

    fn check_p2a_shapes(&self, features: &Tensor, labels: &Tensor, anchors: &Tensor) -> Result<()> {
        let (_, d) = anchors.dims2()?;
        match (features.dims(), labels.dims()) {
            ([b, fd, _, _], [lb, _, _]) if *fd == d && b == lb => Ok(()),
            ([n, fd], [ln]) if *fd == d && n == ln => Ok(()),
            (f, l) => shape_err(format!(
                "p2a: features {f:?} and labels {l:?} must be [B, {d}, H, W] with [B, H', W'], or [N, {d}] with [N]"
            )),
        }
    }
}

impl SarBackend for CandleBackend {
    type Tensor = Tensor;
    type Labels = Tensor;
    type Loss = Tensor;
    type Error = SarCandleError;

    fn tensor(&self, shape: &[usize], data: &[f64]) -> Result<Tensor> {
        let t = Tensor::from_slice(data, shape, &self.device)?.to_dtype(self.dtype)?;
        Ok(Var::from_tensor(&t)?.as_tensor().clone())
    }

    fn labels(&self, shape: &[usize], data: &[i64]) -> Result<Tensor> {
        Ok(Tensor::from_slice(data, shape, &self.device)?)
    }

    fn to_host(&self, t: &Tensor) -> Result<Vec<f64>> {
        Ok(t.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?)
    }

    fn loss_value(&self, loss: &Tensor) -> Result<f64> {
        Ok(loss.to_dtype(DType::F64)?.to_scalar::<f64>()?)
    }

    fn loss_gradient(&self, loss: &Tensor, wrt: &Tensor) -> Result<Vec<f64>> {
        let grads = loss.backward()?;
        match grads.get(wrt) {
            Some(g) => self.to_host(g),
            None => Ok(vec![0.0; wrt.elem_count()]),
        }
    }

    fn detach(&self, t: &Tensor) -> Tensor {
        t.detach()
    }

    fn anchor_ce(
        &self,
        logits: &Tensor,
        tau: f64,
        mode: WeightMode,
    ) -> Result<AnchorCeOutput<Tensor>> {
        let (c, c2) = logits.dims2()?;
        if c != c2 || c == 0 {
            return shape_err(format!(
                "anchor logits must be [C, C], got {:?}",
                logits.dims()
            ));
        }
        sar_math::config::SarConfig {
            tau,
            ..Default::default()
        }
        .validate()?;
        let z_host = self.to_host(logits)?;
        if z_host.iter().any(|v| !v.is_finite()) {
            return Err(SarError::NonFinite {
                op: sar_math::Op::AnchorCe,
                what: "anchor logits",
            }
            .into());
        }
        // ℓ_c = −log_softmax(Z)_cc (max-shifted inside log_softmax), p_c = e^{−ℓ_c}.
        let eye = Tensor::eye(c, logits.dtype(), logits.device())?;
        let nll = candle_nn::ops::log_softmax(logits, D::Minus1)?
            .mul(&eye)?
            .sum(1)?
            .neg()?;
        let p = nll.neg()?.exp()?;
        let (p_host, nll_host) = (self.to_host(&p)?, self.to_host(&nll)?);
        // U = {c : p_c ≤ τ}, decided in the dtype's precision like the kernels.
        let tau_d = self.in_dtype(tau);
        let in_u: Vec<f64> = p_host
            .iter()
            .map(|&pc| if pc <= tau_d { 1.0 } else { 0.0 })
            .collect();
        let uncertain = in_u.iter().filter(|&&m| m == 1.0).count();
        let mask = Tensor::from_slice(&in_u, c, logits.device())?.to_dtype(logits.dtype())?;
        // ln q_c = −ℓ_c on U, 0 elsewhere; w = ln q / (Σ ln q + ε); L = Σ w ℓ.
        let w = if mode == WeightMode::Uniform {
            // No re-weighting: the plain mean over the C anchors.
            (nll.ones_like()? / c as f64)?.detach()
        } else {
            let ln_q = nll.neg()?.mul(&mask)?;
            let denom = (ln_q.sum_all()? + sar_math::anchor_ce::EPSILON)?;
            let w = ln_q.broadcast_div(&denom)?;
            if mode == WeightMode::Detached {
                w.detach()
            } else {
                w
            }
        };
        let loss = w.mul(&nll)?.sum_all()?;
        let w_host = self.to_host(&w)?;
        Ok(AnchorCeOutput {
            loss,
            confidence: p_host,
            nll: nll_host,
            weights: w_host,
            uncertain,
        })
    }

    fn ema_update(
        &self,
        semantic: &mut Tensor,
        embedded: &Tensor,
        alpha: f64,
        rows: &[bool],
        initialized: &mut [bool],
    ) -> Result<usize> {
        let (c, d) = semantic.dims2()?;
        if embedded.dims() != [c, d] || rows.len() != c || initialized.len() != c {
            return shape_err(format!(
                "ema: semantic {:?}, embedded {:?}, rows {}, initialized {} disagree",
                semantic.dims(),
                embedded.dims(),
                rows.len(),
                initialized.len()
            ));
        }
        sar_math::config::SarConfig {
            alpha,
            ..Default::default()
        }
        .validate()?;
        if self.to_host(embedded)?.iter().any(|v| !v.is_finite()) {
            return Err(SarError::NonFinite {
                op: sar_math::Op::Ema,
                what: "embedded anchors",
            }
            .into());
        }
        // Per row: keep (a=1, b=0), initialise (a=0, b=1) or average (a=α, b=1−α), with 1−α
        // rounded in the dtype as sar-math does, so both agree to the bit.
        let alpha_d = self.in_dtype(alpha);
        let beta_d = if self.dtype == DType::F32 {
            (1.0f32 - alpha as f32) as f64
        } else {
            1.0 - alpha
        };
        let (mut a, mut b) = (vec![1.0; c], vec![0.0; c]);
        let mut updated = 0;
        for r in 0..c {
            if rows[r] {
                (a[r], b[r]) = if initialized[r] {
                    (alpha_d, beta_d)
                } else {
                    (0.0, 1.0)
                };
                initialized[r] = true;
                updated += 1;
            }
        }
        let col = |v: Vec<f64>| -> Result<Tensor> {
            Ok(Tensor::from_vec(v, (c, 1), semantic.device())?.to_dtype(semantic.dtype())?)
        };
        let e = embedded.detach().to_dtype(semantic.dtype())?;
        *semantic = semantic
            .broadcast_mul(&col(a)?)?
            .add(&e.broadcast_mul(&col(b)?)?)?
            .detach();
        Ok(updated)
    }

    fn resample_labels(&self, labels: &Tensor, out_hw: (usize, usize)) -> Result<Tensor> {
        self.resample(labels, out_hw)
    }

    fn p2a(
        &self,
        features: &Tensor,
        labels: &Tensor,
        anchors: &Tensor,
        ignore_index: i64,
        class_active: Option<&[bool]>,
        weight: f64,
    ) -> Result<P2aOutput<Tensor>> {
        self.check_p2a_shapes(features, labels, anchors)?;
        let (classes, _) = anchors.dims2()?;
        if let Some(a) = class_active {
            if a.len() != classes {
                return shape_err(format!(
                    "p2a: class_active has {} entries for {classes} classes",
                    a.len()
                ));
            }
        }
        if self.fused() {
            let out = fused::p2a_fused(
                features,
                labels,
                anchors,
                ignore_index,
                class_active,
                weight,
            )?;
            return Ok(out);
        }
        self.validate_labels(labels, classes, ignore_index)?;
        let (loss, value, valid) = self.p2a_composite(
            features,
            labels,
            anchors,
            ignore_index,
            class_active,
            weight,
        )?;
        Ok(P2aOutput { loss, value, valid })
    }

    fn p2a_mixup(
        &self,
        features: &Tensor,
        mixup: Mixup<'_>,
        anchors: &Tensor,
        ignore_index: i64,
        class_active: Option<&[bool]>,
        weight: f64,
    ) -> Result<P2aOutput<Tensor>> {
        let (classes, d) = anchors.dims2()?;
        let rows = match features.dims() {
            &[n, fd] if fd == d => n,
            f => {
                return shape_err(format!(
                    "mixup p2a: features {f:?} must be [N, {d}] for anchors [{classes}, {d}]"
                ))
            }
        };
        if let Some(a) = class_active {
            if a.len() != classes {
                return shape_err(format!(
                    "p2a: class_active has {} entries for {classes} classes",
                    a.len()
                ));
            }
        }
        mixup.check(rows, classes, ignore_index)?;
        if self.fused() {
            return fused::p2a_mixup_fused(
                features,
                mixup,
                anchors,
                ignore_index,
                class_active,
                weight,
            );
        }
        self.p2a_mixup_composite(features, mixup, anchors, ignore_index, class_active, weight)
    }
}

impl CandleBackend {
    /// Features as rows `[M, D]` (NCHW permuted to pixels) with their labels `[M]` (resampled
    /// to the feature map), after the shape and label checks.
    fn baseline_rows(
        &self,
        op: &str,
        features: &Tensor,
        labels: &Tensor,
        classes: usize,
        ignore_index: i64,
    ) -> Result<(Tensor, Tensor)> {
        let (rows, y) = match (features.dims(), labels.dims()) {
            (&[b, d, h, w], &[lb, _, _]) if b == lb => {
                let y = self.resample(labels, (h, w))?;
                let rows = features.permute((0, 2, 3, 1))?.reshape((b * h * w, d))?;
                (rows, y.flatten_all()?)
            }
            (&[n, _], &[ln]) if n == ln => (features.clone(), labels.clone()),
            (f, l) => {
                return shape_err(format!(
                    "{op}: features {f:?} and labels {l:?} must be [B, D, H, W] with [B, H', W'], or [N, D] with [N]"
                ))
            }
        };
        self.validate_labels(&y, classes, ignore_index)?;
        Ok((rows, y))
    }
}

/// The baselines from candle ops (any device): prototypes as a one-hot matrix product, CAR's
/// |F − P_y| with the sign as a constant so that sign(0) = 0 as in PyTorch's `abs` (candle's
/// own `abs` backward gives +1 at 0).
impl BaselineBackend for CandleBackend {
    fn class_prototypes(
        &self,
        features: &Tensor,
        labels: &Tensor,
        classes: usize,
        ignore_index: i64,
    ) -> Result<(Tensor, Vec<u64>)> {
        let (rows, y) =
            self.baseline_rows("prototypes", features, labels, classes, ignore_index)?;
        let dtype = rows.dtype();
        let ids = Tensor::arange(0i64, classes as i64, y.device())?;
        // [M, C] one-hot of the valid rows (an ignored label matches no class id, unless the
        // ignore index is itself in 0..C, which validate_labels then treats as ignored).
        let valid = y.ne(ignore_index)?.unsqueeze(1)?;
        let onehot = y
            .unsqueeze(1)?
            .broadcast_eq(&ids.unsqueeze(0)?)?
            .broadcast_mul(&valid)?;
        let counts_t = onehot.to_dtype(DType::F64)?.sum(0)?;
        let counts: Vec<u64> = counts_t
            .to_vec1::<f64>()?
            .into_iter()
            .map(|v| v as u64)
            .collect();
        let rows = rows.detach();
        // where_cond keeps a NaN of an ignored row out of every prototype.
        let valid_rows = valid.broadcast_as(rows.shape())?;
        let rows = valid_rows.where_cond(&rows, &rows.zeros_like()?)?;
        let sums = onehot.to_dtype(dtype)?.t()?.matmul(&rows)?; // [C, D]
        let inv: Vec<f64> = counts
            .iter()
            .map(|&n| if n > 0 { 1.0 / n as f64 } else { 0.0 })
            .collect();
        let inv = Tensor::from_vec(inv, (classes, 1), rows.device())?.to_dtype(dtype)?;
        Ok((sums.broadcast_mul(&inv)?.detach(), counts))
    }

    fn car(
        &self,
        features: &Tensor,
        labels: &Tensor,
        prototypes: &Tensor,
        ignore_index: i64,
        weight: f64,
    ) -> Result<P2aOutput<Tensor>> {
        let (classes, d) = prototypes.dims2()?;
        let (rows, y) = self.baseline_rows("car", features, labels, classes, ignore_index)?;
        if rows.dim(1)? != d {
            return shape_err(format!(
                "car: prototypes {:?} for features {:?}",
                prototypes.dims(),
                features.dims()
            ));
        }
        let valid = y.ne(ignore_index)?;
        let n_valid = valid.to_dtype(DType::F64)?.sum_all()?.to_scalar::<f64>()? as usize;
        let yc = valid.where_cond(&y, &y.zeros_like()?)?;
        let targets = prototypes
            .detach()
            .to_dtype(rows.dtype())?
            .index_select(&yc, 0)?;
        let mask = valid.unsqueeze(1)?.broadcast_as(rows.shape())?;
        let diff = mask.where_cond(&(&rows - targets)?, &rows.zeros_like()?)?;
        let sign = (diff.gt(0.0)?.to_dtype(rows.dtype())?
            - diff.lt(0.0)?.to_dtype(rows.dtype())?)?
        .detach();
        let n = rows.elem_count() as f64; // N·D, ignored pixels included
        let mean = ((diff * sign)?.sum_all()? / n)?;
        let raw = mean.sqr()?;
        let raw_value = raw.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        if !raw_value.is_finite() {
            return Err(SarError::NonFinite {
                op: sar_math::Op::Car,
                what: "CAR loss (features inside Ω)",
            }
            .into());
        }
        let min = sar_math::prototype::CAR_MIN_LOSS;
        // max(m², 1e-5) as torch.clamp: below the bound the value is the bound, gradient 0.
        let (loss, value) = if raw_value >= min {
            (raw, raw_value)
        } else {
            (((raw * 0.0)? + min)?, min)
        };
        Ok(P2aOutput {
            loss: (loss * weight)?,
            value,
            valid: n_valid,
        })
    }
}
