//! The fused CPU p2a as a candle custom op.
//!
//! Forward runs `sar-math`'s single-pass kernel (through `sar-cpu`, on all cores) over the
//! features, which yields L_p2a **and** weight·dL_p2a/dF together; the op outputs the scalar
//! weight·L_p2a and keeps the gradient. Backward returns that gradient, scaled by the upstream
//! gradient only when it is not exactly 1 (it is 1 when the weighted loss is simply added to the
//! total, which is why λ2 is folded into the op). So a training step reads the features once
//! and writes their gradient once for SAR's p2a term, the memory floor.
//!
//! Labels, anchors and the per-class mask are constants of the op (host copies; C×D and the
//! label map are small next to the features). CPU only: other devices use the composite path.

use crate::{Result, SarCandleError};
use candle_core::{CpuStorage, CustomOp1, DType, Device, Layout, Shape, Tensor};
use sar_math::backend::P2aOutput;
use sar_math::p2a::{p2a_rows, FeatureGeometry, P2aTargets, RowLabels};
use sar_math::Real;
use std::sync::{Arc, Mutex};

/// What forward leaves for backward and for the caller.
#[derive(Debug, Default)]
struct Stash {
    grad: Option<Tensor>,
    value: f64,
    valid: usize,
    /// A kernel's own error, handed back to the caller as itself (candle's wrapper would
    /// reduce it to text).
    error: Option<sar_math::SarError>,
}

struct FusedP2a {
    labels: Vec<i64>,
    /// MixUp: the second side's labels and λ (rows only).
    mixup: Option<(Vec<i64>, f64)>,
    label_hw: (usize, usize),
    anchors: Vec<f64>,
    classes: usize,
    ignore_index: i64,
    class_active: Option<Vec<bool>>,
    weight: f64,
    stash: Arc<Mutex<Stash>>,
}

impl FusedP2a {
    fn run<F: Real + Default + candle_core::WithDType>(
        &self,
        features: &[F],
        shape: &Shape,
    ) -> candle_core::Result<F> {
        let anchors: Vec<F> = self
            .anchors
            .iter()
            .map(|&v| <F as Real>::from_f64(v))
            .collect();
        let targets = P2aTargets {
            anchors: &anchors,
            classes: self.classes,
            ignore_index: self.ignore_index,
            class_active: self.class_active.as_deref(),
        };
        let mut grad = vec![F::zero(); features.len()];
        let (value, valid) = match shape.dims() {
            &[b, d, h, w] => {
                let geometry = FeatureGeometry {
                    batch: b,
                    channels: d,
                    height: h,
                    width: w,
                    label_height: self.label_hw.0,
                    label_width: self.label_hw.1,
                };
                let r = sar_cpu::p2a_nchw_parallel(
                    features,
                    &self.labels,
                    &geometry,
                    &targets,
                    Some(&mut grad),
                    self.weight,
                )
                .map_err(|e| self.fail(e))?;
                (r.loss, r.valid)
            }
            &[_, d] => {
                let labels = match &self.mixup {
                    None => RowLabels::Plain(&self.labels),
                    Some((b, lambda)) => RowLabels::Mixup {
                        a: &self.labels,
                        b,
                        lambda: *lambda,
                    },
                };
                let v = p2a_rows(features, labels, d, &targets, Some(&mut grad))
                    .map_err(|e| self.fail(e))?;
                let w = <F as Real>::from_f64(self.weight);
                grad.iter_mut().for_each(|g| *g = w * *g);
                (v.loss, v.valid)
            }
            dims => candle_core::bail!("fused p2a: features must be 4-D or 2-D, got {dims:?}"),
        };
        let grad = Tensor::from_vec(grad, shape, &Device::Cpu)?;
        let mut stash = self.stash.lock().expect("stash lock");
        *stash = Stash {
            grad: Some(grad),
            value: Real::as_f64(value),
            valid,
            error: None,
        };
        Ok(<F as Real>::from_f64(self.weight) * value)
    }

    fn fail(&self, e: sar_math::SarError) -> candle_core::Error {
        self.stash.lock().expect("stash lock").error = Some(e);
        candle_core::Error::Msg(e.to_string())
    }
}

impl CustomOp1 for FusedP2a {
    fn name(&self) -> &'static str {
        "sar-p2a-fused"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (start, end) = layout.contiguous_offsets().ok_or_else(|| {
            candle_core::Error::Msg("fused p2a: features must be contiguous".into())
        })?;
        let scalar = Shape::from(());
        match storage {
            CpuStorage::F32(v) => Ok((
                CpuStorage::F32(vec![self.run(&v[start..end], layout.shape())?]),
                scalar,
            )),
            CpuStorage::F64(v) => Ok((
                CpuStorage::F64(vec![self.run(&v[start..end], layout.shape())?]),
                scalar,
            )),
            _ => candle_core::bail!("fused p2a: features must be F32 or F64"),
        }
    }

    fn bwd(
        &self,
        _arg: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let grad = self.stash.lock().expect("stash lock").grad.clone();
        let Some(grad) = grad else {
            candle_core::bail!("fused p2a: backward before forward")
        };
        // Upstream 1 (the weighted loss added to the total): the stored gradient as it is.
        if grad_res.to_dtype(DType::F64)?.to_scalar::<f64>()? == 1.0 {
            return Ok(Some(grad));
        }
        Ok(Some(grad.broadcast_mul(grad_res)?))
    }
}

/// weight·L_p2a through the fused op (CPU tensors). Shapes are checked by the caller.
pub fn p2a_fused(
    features: &Tensor,
    labels: &Tensor,
    anchors: &Tensor,
    ignore_index: i64,
    class_active: Option<&[bool]>,
    weight: f64,
) -> Result<P2aOutput<Tensor>> {
    if !features.device().is_cpu() {
        return Err(SarCandleError::Shape(
            "the fused p2a runs on CPU tensors only".into(),
        ));
    }
    let label_hw = match labels.dims() {
        [_, h, w] => (*h, *w),
        _ => (1, 1),
    };
    let labels = labels
        .flatten_all()?
        .to_dtype(DType::I64)?
        .to_vec1::<i64>()?;
    run_fused(
        features,
        (labels, label_hw, None),
        anchors,
        ignore_index,
        class_active,
        weight,
    )
}

/// weight·L_p2a with MixUp targets through the fused op (CPU tensors, features `[N, D]`;
/// shapes checked by the caller).
pub fn p2a_mixup_fused(
    features: &Tensor,
    mixup: sar_math::backend::Mixup<'_>,
    anchors: &Tensor,
    ignore_index: i64,
    class_active: Option<&[bool]>,
    weight: f64,
) -> Result<P2aOutput<Tensor>> {
    if !features.device().is_cpu() {
        return Err(SarCandleError::Shape(
            "the fused p2a runs on CPU tensors only".into(),
        ));
    }
    run_fused(
        features,
        (
            mixup.labels_a.to_vec(),
            (1, 1),
            Some((mixup.labels_b.to_vec(), mixup.lambda)),
        ),
        anchors,
        ignore_index,
        class_active,
        weight,
    )
}

/// The labels of one fused call: side a (or the only side), the label map's (H', W'), and
/// MixUp's side b with λ.
type FusedLabels = (Vec<i64>, (usize, usize), Option<(Vec<i64>, f64)>);

fn run_fused(
    features: &Tensor,
    (labels, label_hw, mixup): FusedLabels,
    anchors: &Tensor,
    ignore_index: i64,
    class_active: Option<&[bool]>,
    weight: f64,
) -> Result<P2aOutput<Tensor>> {
    let (classes, _) = anchors.dims2()?;
    let stash = Arc::new(Mutex::new(Stash::default()));
    let op = FusedP2a {
        labels,
        mixup,
        label_hw,
        anchors: anchors
            .flatten_all()?
            .to_dtype(DType::F64)?
            .to_vec1::<f64>()?,
        classes,
        ignore_index,
        class_active: class_active.map(<[bool]>::to_vec),
        weight,
        stash: stash.clone(),
    };
    let loss = features.contiguous()?.apply_op1(op);
    let s = stash.lock().expect("stash lock");
    match (loss, s.error) {
        (_, Some(e)) => Err(SarCandleError::Sar(e)),
        (Err(e), None) => Err(e.into()),
        (Ok(loss), None) => Ok(P2aOutput {
            loss,
            value: s.value,
            valid: s.valid,
        }),
    }
}
