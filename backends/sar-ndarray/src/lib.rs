//! # sar-ndarray: SAR on ndarray (the CPU oracle)
//!
//! [`NdarrayBackend`] implements [`sar_math::backend::SarBackend`] over `ArrayD<F>` (`F` = f32
//! or f64) with `ArrayD<i64>` labels. It has no autodiff: each loss carries the analytic
//! gradient computed by `sar-math`'s fused kernels ([`NdLoss`]).
//!
//! The p2a kernel is parallel ([`p2a_nchw_parallel`], through `sar-cpu`): labels are resampled
//! once to the feature size, then each image's channel planes are split into blocks that run on
//! rayon's pool. Block sums are added in block order, so results do not depend on the number
//! of threads.
//!
//! Layouts: features NCHW `[B, D, H, W]` or `[N, D]`, labels `[B, H', W']` or `[N]`, anchors
//! and anchor logits row-major `[C, D]` and `[C, C]`.

use ndarray::{ArrayD, ArrayView2, ArrayView3, ArrayView4, ArrayViewMut4, IxDyn};
use sar_math::anchor_ce::anchor_ce_owned;
use sar_math::backend::{AnchorCeOutput, BaselineBackend, Mixup, P2aOutput, SarBackend};
use sar_math::p2a::{p2a_rows, FeatureGeometry, P2aTargets, RowLabels};
use sar_math::{Label, Real, SarError, WeightMode};
use std::marker::PhantomData;
use std::sync::{Arc, Mutex};

/// Errors of the ndarray adapter.
#[derive(Debug, thiserror::Error)]
pub enum NdError {
    /// A `sar-math` kernel refused its input.
    #[error(transparent)]
    Sar(#[from] SarError),
    /// An array has the wrong number of dimensions or an incompatible shape.
    #[error("{0}")]
    Shape(String),
}

/// A loss value with its gradient w.r.t. the loss's input (anchor logits or features).
#[derive(Debug, Clone, PartialEq)]
pub struct NdLoss<F> {
    /// The loss.
    pub value: f64,
    /// dLoss/dinput, the input's shape. Shared with the backend so that the next p2a can
    /// write into the same memory once this loss is dropped (see [`NdarrayBackend`]).
    pub grad: Arc<ArrayD<F>>,
}

/// The ndarray backend for element type `F`.
///
/// It keeps the last feature-gradient buffer it handed out: when the caller has dropped that
/// loss, the next p2a of the same shape writes into the same memory instead of allocating
/// (hundreds of MB at segmentation scale, where a fresh allocation costs a page fault and a
/// kernel zero-fill per 4 KiB, more than the kernel itself). Clones of the backend share it.
#[derive(Debug, Clone, Default)]
pub struct NdarrayBackend<F> {
    grad_buffer: Arc<Mutex<Option<Arc<ArrayD<F>>>>>,
    _real: PhantomData<F>,
}

impl<F: Real + Default> NdarrayBackend<F> {
    /// A backend with an empty buffer cache.
    pub fn new() -> Self {
        NdarrayBackend {
            grad_buffer: Arc::new(Mutex::new(None)),
            _real: PhantomData,
        }
    }

    /// A gradient buffer of `shape`: the cached one if nobody else holds it, else a new one.
    /// Its contents are arbitrary; the fused kernel overwrites every element.
    fn grad_buffer(&self, shape: &[usize]) -> Arc<ArrayD<F>> {
        let mut cache = self.grad_buffer.lock().expect("buffer lock");
        if let Some(buf) = cache.take() {
            if Arc::strong_count(&buf) == 1 && buf.shape() == shape {
                return buf;
            }
        }
        Arc::new(ArrayD::zeros(IxDyn(shape)))
    }

    fn keep(&self, buf: &Arc<ArrayD<F>>) {
        *self.grad_buffer.lock().expect("buffer lock") = Some(buf.clone());
    }
}

fn contiguous<F: Clone>(a: &ArrayD<F>) -> std::borrow::Cow<'_, [F]> {
    match a.as_slice() {
        Some(s) => std::borrow::Cow::Borrowed(s),
        None => std::borrow::Cow::Owned(a.iter().cloned().collect()),
    }
}

/// Fused, parallel L_p2a and `grad_weight`·dL_p2a/dF for NCHW features (through [`sar_cpu`]),
/// writing the gradient into `grad`. Returns (L_p2a, |Ω|). The labels may be at another resolution; they
/// are validated in full.
pub fn p2a_nchw_parallel<F: Real, L: Label + Default>(
    features: ArrayView4<'_, F>,
    labels: ArrayView3<'_, L>,
    targets: &P2aTargets<'_, F>,
    mut grad: Option<ArrayViewMut4<'_, F>>,
    grad_weight: f64,
) -> Result<(F, usize), NdError> {
    let (b, d, h, w) = features.dim();
    let (lb, lh, lw) = labels.dim();
    if lb != b {
        return Err(NdError::Shape(format!(
            "p2a: labels have batch {lb}, features {b}"
        )));
    }
    let geometry = FeatureGeometry {
        batch: b,
        channels: d,
        height: h,
        width: w,
        label_height: lh,
        label_width: lw,
    };
    let labels = labels.as_standard_layout();
    let features = features.as_standard_layout();
    let g = match grad.as_mut() {
        Some(g) if g.dim() != (b, d, h, w) => {
            return Err(NdError::Shape(format!(
                "p2a: gradient shape {:?} differs from features {:?}",
                g.dim(),
                (b, d, h, w)
            )))
        }
        Some(g) => Some(
            g.as_slice_mut()
                .ok_or_else(|| NdError::Shape("p2a: gradient must be contiguous".into()))?,
        ),
        None => None,
    };
    let r = sar_cpu::p2a_nchw_parallel(
        features.as_slice().expect("standard layout"),
        labels.as_slice().expect("standard layout"),
        &geometry,
        targets,
        g,
        grad_weight,
    )?;
    Ok((r.loss, r.valid))
}

/// (L_p2a, |Ω|, `weight`·dL_p2a/dF) of `[N, D]` features.
type RowsResult<F> = (f64, usize, Arc<ArrayD<F>>);

impl<F: Real + Default> NdarrayBackend<F> {
    /// The fused rows kernel (plain or MixUp labels) with the gradient scaled by `weight`.
    fn p2a_rows_weighted(
        &self,
        features: &ArrayD<F>,
        labels: RowLabels<'_, i64>,
        targets: &P2aTargets<'_, F>,
        weight: f64,
    ) -> Result<RowsResult<F>, NdError> {
        let f = contiguous(features);
        let mut grad = vec![F::zero(); f.len()];
        let v = p2a_rows(&f, labels, features.shape()[1], targets, Some(&mut grad))?;
        let w = F::from_f64(weight);
        grad.iter_mut().for_each(|g| *g = w * *g);
        let grad = Arc::new(ArrayD::from_shape_vec(IxDyn(features.shape()), grad).expect("shape"));
        Ok((v.loss.as_f64(), v.valid, grad))
    }

    fn anchors_view<'a>(&self, a: &'a ArrayD<F>) -> Result<ArrayView2<'a, F>, NdError> {
        a.view()
            .into_dimensionality()
            .map_err(|_| NdError::Shape(format!("anchors must be [C, D], got {:?}", a.shape())))
    }
}

impl<F: Real + Default> SarBackend for NdarrayBackend<F> {
    type Tensor = ArrayD<F>;
    type Labels = ArrayD<i64>;
    type Loss = NdLoss<F>;
    type Error = NdError;

    fn tensor(&self, shape: &[usize], data: &[f64]) -> Result<ArrayD<F>, NdError> {
        ArrayD::from_shape_vec(IxDyn(shape), data.iter().map(|&v| F::from_f64(v)).collect())
            .map_err(|e| NdError::Shape(e.to_string()))
    }

    fn labels(&self, shape: &[usize], data: &[i64]) -> Result<ArrayD<i64>, NdError> {
        ArrayD::from_shape_vec(IxDyn(shape), data.to_vec())
            .map_err(|e| NdError::Shape(e.to_string()))
    }

    fn to_host(&self, t: &ArrayD<F>) -> Result<Vec<f64>, NdError> {
        Ok(t.iter().map(|v| v.as_f64()).collect())
    }

    fn loss_value(&self, loss: &NdLoss<F>) -> Result<f64, NdError> {
        Ok(loss.value)
    }

    fn loss_gradient(&self, loss: &NdLoss<F>, wrt: &ArrayD<F>) -> Result<Vec<f64>, NdError> {
        if loss.grad.shape() != wrt.shape() {
            return Err(NdError::Shape(format!(
                "gradient shape {:?} differs from the input {:?}",
                loss.grad.shape(),
                wrt.shape()
            )));
        }
        self.to_host(&loss.grad)
    }

    fn detach(&self, t: &ArrayD<F>) -> ArrayD<F> {
        t.clone()
    }

    fn anchor_ce(
        &self,
        logits: &ArrayD<F>,
        tau: f64,
        mode: WeightMode,
    ) -> Result<AnchorCeOutput<NdLoss<F>>, NdError> {
        let c = match logits.shape() {
            [c, c2] if c == c2 => *c,
            s => {
                return Err(NdError::Shape(format!(
                    "anchor logits must be [C, C], got {s:?}"
                )))
            }
        };
        let out = anchor_ce_owned(&contiguous(logits), c, tau, mode)?;
        let host = |x: &[F]| x.iter().map(|v| v.as_f64()).collect::<Vec<f64>>();
        Ok(AnchorCeOutput {
            loss: NdLoss {
                value: out.value.loss.as_f64(),
                grad: Arc::new(
                    ArrayD::from_shape_vec(IxDyn(&[c, c]), out.grad_logits).expect("C×C"),
                ),
            },
            confidence: host(&out.confidence),
            nll: host(&out.nll),
            weights: host(&out.weights),
            uncertain: out.value.uncertain,
        })
    }

    fn ema_update(
        &self,
        semantic: &mut ArrayD<F>,
        embedded: &ArrayD<F>,
        alpha: f64,
        rows: &[bool],
        initialized: &mut [bool],
    ) -> Result<usize, NdError> {
        if semantic.shape() != embedded.shape() || semantic.ndim() != 2 {
            return Err(NdError::Shape(format!(
                "ema: semantic {:?} and embedded {:?} must both be [C, D]",
                semantic.shape(),
                embedded.shape()
            )));
        }
        let (c, d) = (semantic.shape()[0], semantic.shape()[1]);
        let e = contiguous(embedded).into_owned();
        let s = semantic
            .as_slice_mut()
            .ok_or_else(|| NdError::Shape("ema: semantic anchors must be contiguous".into()))?;
        Ok(sar_math::ema::ema_update_per_class(
            s,
            initialized,
            &e,
            c,
            d,
            alpha,
            rows,
        )?)
    }

    fn resample_labels(
        &self,
        labels: &ArrayD<i64>,
        out_hw: (usize, usize),
    ) -> Result<ArrayD<i64>, NdError> {
        let [b, h, w] = labels.shape()[..] else {
            return Err(NdError::Shape(format!(
                "labels to resample must be [B, H, W], got {:?}",
                labels.shape()
            )));
        };
        let mut out = vec![0i64; b * out_hw.0 * out_hw.1];
        sar_math::resample::resample_labels_nearest(
            &contiguous(labels),
            b,
            (h, w),
            out_hw,
            &mut out,
        )?;
        Ok(ArrayD::from_shape_vec(IxDyn(&[b, out_hw.0, out_hw.1]), out).expect("shape"))
    }

    fn p2a(
        &self,
        features: &ArrayD<F>,
        labels: &ArrayD<i64>,
        anchors: &ArrayD<F>,
        ignore_index: i64,
        class_active: Option<&[bool]>,
        weight: f64,
    ) -> Result<P2aOutput<NdLoss<F>>, NdError> {
        let a = self.anchors_view(anchors)?;
        let a = a.as_standard_layout();
        let targets = P2aTargets {
            anchors: a.as_slice().expect("standard"),
            classes: a.nrows(),
            ignore_index,
            class_active,
        };
        let (value, valid, grad) = match features.ndim() {
            4 => {
                let f4: ArrayView4<F> = features.view().into_dimensionality().expect("4-D");
                let l3: ArrayView3<i64> = labels.view().into_dimensionality().map_err(|_| {
                    NdError::Shape(format!(
                        "p2a: labels must be [B, H', W'] for NCHW features, got {:?}",
                        labels.shape()
                    ))
                })?;
                let mut grad = self.grad_buffer(features.shape());
                let view = Arc::get_mut(&mut grad)
                    .expect("unshared buffer")
                    .view_mut()
                    .into_dimensionality()
                    .expect("4-D");
                let (loss, valid) = p2a_nchw_parallel(f4, l3, &targets, Some(view), weight)?;
                self.keep(&grad);
                (loss.as_f64(), valid, grad)
            }
            2 => {
                if labels.ndim() != 1 {
                    return Err(NdError::Shape(format!(
                        "p2a: labels must be [N] for [N, D] features, got {:?}",
                        labels.shape()
                    )));
                }
                let labels = contiguous(labels);
                self.p2a_rows_weighted(features, RowLabels::Plain(&labels), &targets, weight)?
            }
            n => {
                return Err(NdError::Shape(format!(
                    "p2a: features must be [B, D, H, W] or [N, D], got {n} dimensions"
                )))
            }
        };
        Ok(P2aOutput {
            loss: NdLoss {
                value: weight * value,
                grad,
            },
            value,
            valid,
        })
    }

    fn p2a_mixup(
        &self,
        features: &ArrayD<F>,
        mixup: Mixup<'_>,
        anchors: &ArrayD<F>,
        ignore_index: i64,
        class_active: Option<&[bool]>,
        weight: f64,
    ) -> Result<P2aOutput<NdLoss<F>>, NdError> {
        let a = self.anchors_view(anchors)?;
        let a = a.as_standard_layout();
        let targets = P2aTargets {
            anchors: a.as_slice().expect("standard"),
            classes: a.nrows(),
            ignore_index,
            class_active,
        };
        if features.ndim() != 2 {
            return Err(NdError::Shape(format!(
                "mixup p2a: features must be [N, D], got {:?}",
                features.shape()
            )));
        }
        let (value, valid, grad) =
            self.p2a_rows_weighted(features, mixup.row_labels(), &targets, weight)?;
        Ok(P2aOutput {
            loss: NdLoss {
                value: weight * value,
                grad,
            },
            value,
            valid,
        })
    }
}

/// The geometry of `[B, D, H, W]` features with `[B, H', W']` labels, or `[N, D]` with `[N]`.
fn baseline_geometry(
    op: &str,
    features: &[usize],
    labels: &[usize],
) -> Result<FeatureGeometry, NdError> {
    let g = |batch, channels, height, width, label_height, label_width| FeatureGeometry {
        batch,
        channels,
        height,
        width,
        label_height,
        label_width,
    };
    match (features, labels) {
        (&[b, d, h, w], &[lb, lh, lw]) if b == lb => Ok(g(b, d, h, w, lh, lw)),
        (&[n, d], &[ln]) if n == ln => Ok(g(n, d, 1, 1, 1, 1)),
        (f, l) => Err(NdError::Shape(format!(
            "{op}: features {f:?} and labels {l:?} must be [B, D, H, W] with [B, H', W'], or [N, D] with [N]"
        ))),
    }
}

impl<F: Real + Default> BaselineBackend for NdarrayBackend<F> {
    fn class_prototypes(
        &self,
        features: &ArrayD<F>,
        labels: &ArrayD<i64>,
        classes: usize,
        ignore_index: i64,
    ) -> Result<(ArrayD<F>, Vec<u64>), NdError> {
        let geometry = baseline_geometry("prototypes", features.shape(), labels.shape())?;
        let d = geometry.channels;
        let zeros = vec![F::zero(); classes * d];
        let targets = P2aTargets {
            anchors: &zeros,
            classes,
            ignore_index,
            class_active: None,
        };
        let (mut p, mut counts) = (vec![F::zero(); classes * d], vec![0u64; classes]);
        sar_math::prototype::class_prototypes(
            &contiguous(features),
            &contiguous(labels),
            &geometry,
            &targets,
            &mut p,
            &mut counts,
        )?;
        Ok((
            ArrayD::from_shape_vec(IxDyn(&[classes, d]), p).expect("[C, D]"),
            counts,
        ))
    }

    fn car(
        &self,
        features: &ArrayD<F>,
        labels: &ArrayD<i64>,
        prototypes: &ArrayD<F>,
        ignore_index: i64,
        weight: f64,
    ) -> Result<P2aOutput<NdLoss<F>>, NdError> {
        let geometry = baseline_geometry("car", features.shape(), labels.shape())?;
        let p = self.anchors_view(prototypes)?;
        if p.ncols() != geometry.channels {
            return Err(NdError::Shape(format!(
                "car: prototypes {:?} for features with D = {}",
                p.shape(),
                geometry.channels
            )));
        }
        let p = p.as_standard_layout();
        let targets = P2aTargets {
            anchors: p.as_slice().expect("standard"),
            classes: p.nrows(),
            ignore_index,
            class_active: None,
        };
        let labels = contiguous(labels);
        let mut grad = vec![F::zero(); features.len()];
        let value = sar_math::prototype::car_intra_class(
            &contiguous(features),
            &labels,
            &geometry,
            &targets,
            Some(&mut grad),
        )?
        .as_f64();
        let w = F::from_f64(weight);
        grad.iter_mut().for_each(|g| *g = w * *g);
        let valid = sar_math::p2a::p2a_valid_count_nchw(&labels, &geometry, &targets)?;
        Ok(P2aOutput {
            loss: NdLoss {
                value: weight * value,
                grad: Arc::new(
                    ArrayD::from_shape_vec(IxDyn(features.shape()), grad).expect("shape"),
                ),
            },
            value,
            valid,
        })
    }
}
