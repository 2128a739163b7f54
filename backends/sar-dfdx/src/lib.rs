//! # sar-dfdx: SAR on dfdx
//!
//! The second autodiff backend (after candle), to show that SAR's math is not tied to one
//! library. dfdx 0.13 on stable Rust (its `nightly` convolution and pooling ops do not build
//! here), f32 or f64, on dfdx's `Cpu` or (feature `cuda`) `Cuda` device.
//!
//! - [`DfdxBackend`] implements [`sar_math::backend::SarBackend`]. Its tensors
//!   ([`DfdxTensor`]) are untraced leaves stored flat with a runtime shape; each loss traces its
//!   differentiable input on dfdx's tape, and [`DfdxLoss`] keeps the tape-carrying scalar so
//!   that [`SarBackend::loss_gradient`] can run dfdx's backward once (dfdx's `backward`
//!   consumes the tape; the gradients are cached for later reads).
//! - The losses themselves are the tape-generic functions [`anchor_ce`] (Eq. 5–7) and
//!   [`p2a_rows`] (Eq. 4 on `[N, D]` rows): the backend calls them on traced leaves, and the
//!   trainer on activations that carry the model's tape, so one implementation serves both.
//! - [`conv`]: 2-D convolution built from stable dfdx ops (a row gather over NHWC rows with a
//!   zero row for padding, then a matmul; on the CPU the gather is one parallel kernel recorded
//!   on dfdx's tape), and the option-A shortcut the same way.
//! - [`nn`]: parameters by name (the same names and layouts as `sar-models`, so checkpoints
//!   move between backends), the SAR head with the classifier shared, and SGD. The networks
//!   (small CNN, CIFAR ResNets) are in `sar-dfdx-models`.
//!
//! Layouts: anchor logits `[C, C]`; anchors `[C, D]`; the backend's p2a takes NCHW
//! `[B, D, H, W]` with labels `[B, H', W']` or rows `[N, D]` with `[N]`, like the other
//! backends. The models keep activations as NHWC rows `[B·H·W, C]`.
//!
//! ```
//! use sar_dfdx::DfdxBackend;
//! use sar_math::backend::SarBackend;
//! let b = DfdxBackend::<f64>::cpu();
//! let z = b.tensor(&[2, 2], &[0.0; 4])?;
//! let ce = b.anchor_ce(&z, 0.9, sar_math::WeightMode::Attached)?;
//! // Two uniform anchors: L = 2(ln 2)²/(2 ln 2 − ε) ≈ ln 2.
//! assert!((b.loss_value(&ce.loss)? - 2f64.ln()).abs() < 1e-8);
//! # Ok::<(), sar_dfdx::SarDfdxError>(())
//! ```

pub mod conv;
pub mod depthwise;
pub mod nn;
pub mod norm;
mod taped;
pub mod taps;

pub(crate) use taped::TapedBackend;

/// The dfdx version this crate is built on, for callers that name its types.
pub use dfdx;

use dfdx::prelude::*;
use sar_math::backend::{AnchorCeOutput, BaselineBackend, Mixup, P2aOutput, SarBackend};
use sar_math::{SarError, WeightMode};
use std::cell::RefCell;

/// Errors of the dfdx adapter.
#[derive(Debug, thiserror::Error)]
pub enum SarDfdxError {
    /// A `sar-math` kernel or check refused its input.
    #[error(transparent)]
    Sar(#[from] SarError),
    /// dfdx's device reported an error.
    #[error("dfdx: {0}")]
    Device(String),
    /// A tensor has the wrong rank or shape.
    #[error("{0}")]
    Shape(String),
}

/// Result alias of this crate.
pub type Result<T> = std::result::Result<T, SarDfdxError>;

pub(crate) fn shape_err<T>(msg: String) -> Result<T> {
    Err(SarDfdxError::Shape(msg))
}

pub(crate) fn dev_err<E: std::fmt::Debug>(e: E) -> SarDfdxError {
    SarDfdxError::Device(format!("{e:?}"))
}

/// A scalar tensor with tape `T`.
pub type Scalar<E, D, T = NoneTape> = Tensor<Rank0, E, D, T>;
/// A runtime-shaped matrix with tape `T`.
pub type Matrix<E, D, T = NoneTape> = Tensor<(usize, usize), E, D, T>;
/// A runtime-length vector with tape `T`.
pub type Flat<E, D, T = NoneTape> = Tensor<(usize,), E, D, T>;
/// A scalar on dfdx's recording tape.
pub type Traced<E, D> = Scalar<E, D, OwnedTape<E, D>>;
/// Output rows of a convolution and the output (height, width).
pub type ConvOut<E, D, T> = (Matrix<E, D, T>, (usize, usize));
/// `weight`·L_p2a with its tape, the unweighted value and |Ω|.
pub type P2aParts<E, D, T> = (Scalar<E, D, T>, f64, usize);

/// A float type dfdx computes in (f32 or f64).
pub trait Float:
    Dtype + num_traits::Float + sar_cpu::scratch::ScratchElem + sar_cpu::gemm::GemmScalar
{
}
impl Float for f32 {}
impl Float for f64 {}

/// A dfdx device that runs every op SAR and the models need, for element type `E`: dfdx's
/// `Cpu` and (feature `cuda`) `Cuda`.
pub trait SarDevice<E: Float>:
    Device<E>
    + Default
    + conv::ConvKernel<E>
    + depthwise::DepthwiseKernel<E>
    + norm::BatchNormKernel<E>
    + taps::TapKernel<E>
{
}
impl<E: Float, D> SarDevice<E> for D where
    D: Device<E>
        + Default
        + conv::ConvKernel<E>
        + depthwise::DepthwiseKernel<E>
        + norm::BatchNormKernel<E>
        + taps::TapKernel<E>
{
}

/// A flat dfdx tensor with its runtime shape (row-major), without a tape: a leaf.
#[derive(Clone)]
pub struct DfdxTensor<E: Float, D: SarDevice<E>> {
    /// The values, flat.
    pub data: Tensor<(usize,), E, D>,
    /// The shape.
    pub shape: Vec<usize>,
}

impl<E: Float, D: SarDevice<E>> std::fmt::Debug for DfdxTensor<E, D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DfdxTensor{:?}", self.shape)
    }
}

impl<E: Float, D: SarDevice<E>> DfdxTensor<E, D> {
    /// The values as a `[rows, cols]` matrix (the caller checked the shape).
    pub fn matrix(&self, rows: usize, cols: usize) -> Tensor<(usize, usize), E, D> {
        self.data.clone().reshape_like(&(rows, cols))
    }
}

/// Integer labels with their shape, on the host (they become index tensors where used).
#[derive(Debug, Clone)]
pub struct DfdxLabels {
    /// The values, flat.
    pub data: Vec<i64>,
    /// The shape.
    pub shape: Vec<usize>,
}

/// A scalar loss: its value and, until the first [`SarBackend::loss_gradient`] call, the
/// tape-carrying scalar (dfdx's backward consumes it; the gradients are then kept).
pub struct DfdxLoss<E: Float, D: SarDevice<E>> {
    value: f64,
    tape: RefCell<Option<Traced<E, D>>>,
    grads: RefCell<Option<Gradients<E, D>>>,
}

impl<E: Float, D: SarDevice<E>> std::fmt::Debug for DfdxLoss<E, D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DfdxLoss({})", self.value)
    }
}

impl<E: Float, D: SarDevice<E>> DfdxLoss<E, D> {
    /// The loss's value.
    pub fn value(&self) -> f64 {
        self.value
    }

    /// The tape-carrying scalar, to join a caller's graph; `None` once
    /// [`SarBackend::loss_gradient`] has consumed it.
    pub fn into_traced(self) -> Option<Traced<E, D>> {
        self.tape.into_inner()
    }

    fn new(loss: Tensor<Rank0, E, D, OwnedTape<E, D>>) -> Self {
        DfdxLoss {
            value: to_f64(loss.as_vec()[0]),
            tape: RefCell::new(Some(loss)),
            grads: RefCell::new(None),
        }
    }
}

pub(crate) fn to_f64<E: Float>(v: E) -> f64 {
    v.to_f64().unwrap_or(f64::NAN)
}

pub(crate) fn from_f64<E: Float>(v: f64) -> E {
    E::from_f64(v).unwrap_or_else(E::nan)
}

/// A CPU tensor's values in logical (row-major) order, copied with one memcpy: dfdx's
/// `contiguous` leaves a tensor with standard strides as it is (and copies any other layout
/// into one), whose buffer then holds exactly its elements in order, which `copy_into` copies
/// whole. `as_vec` instead walks dfdx's element iterator, computing an index per element (a
/// few ns each): when every convolution and BatchNorm read their input that way it cost tens
/// of ms per ResNet-32 step.
pub(crate) fn cpu_values<S: Shape, E: Float>(t: &Tensor<S, E, Cpu>) -> Vec<E>
where
    Cpu: Device<E>,
{
    let t = t.clone().contiguous();
    let mut out = vec![E::zero(); t.shape().num_elements()];
    t.copy_into(&mut out);
    out
}

/// Host values of a tensor (any tape) as f64.
pub fn host<S: Shape, E: Float, D: SarDevice<E>, T>(t: &Tensor<S, E, D, T>) -> Vec<f64> {
    t.as_vec().into_iter().map(to_f64).collect()
}

/// The host parts of L_aux (see [`AnchorCeOutput`]).
#[derive(Debug, Clone)]
pub struct AnchorCeParts {
    /// p_c.
    pub confidence: Vec<f64>,
    /// ℓ_c.
    pub nll: Vec<f64>,
    /// w_c.
    pub weights: Vec<f64>,
    /// |U|.
    pub uncertain: usize,
}

/// Eq. 5–7 on anchor logits `[C, C]` carrying any tape: ℓ_c = −log_softmax(Z)_cc,
/// p_c = e^{−ℓ_c}, U = {c : p_c ≤ τ}, w_c = ln q_c / (Σ ln q + ε) with ln q_c = −ℓ_c on U and
/// 0 elsewhere, L = Σ_c w_c ℓ_c. `Attached` keeps w in the graph (spec §3), `Detached` makes
/// it a constant, `Uniform` sets w_c = 1/C (no re-weighting: the plain mean of the ℓ_c). Returns the loss (with the input's tape) and the host values.
pub fn anchor_ce<E: Float, D: SarDevice<E>, T: Tape<E, D>>(
    logits: Tensor<(usize, usize), E, D, T>,
    tau: f64,
    mode: WeightMode,
) -> Result<(Tensor<Rank0, E, D, T>, AnchorCeParts)> {
    let (c, c2) = *logits.shape();
    if c != c2 || c == 0 {
        return shape_err(format!("anchor logits must be [C, C], got [{c}, {c2}]"));
    }
    sar_math::config::SarConfig {
        tau,
        ..Default::default()
    }
    .validate()?;
    if logits.as_vec().iter().any(|v| !v.is_finite()) {
        return Err(SarError::NonFinite {
            op: sar_math::Op::AnchorCe,
            what: "anchor logits",
        }
        .into());
    }
    let dev = logits.device().clone();
    let mut eye = vec![E::default(); c * c];
    for i in 0..c {
        eye[i * c + i] = E::ONE;
    }
    let eye = dev.tensor_from_vec(eye, (c, c));
    // The diagonal of the (max-shifted) log-softmax.
    let nll = (logits.log_softmax::<Axis<1>>() * eye)
        .sum::<(usize,), Axis<1>>()
        .negate();
    let nll_host = host(&nll);
    let p = nll.retaped::<NoneTape>().negate().exp();
    let p_host = host(&p);
    // U decided in the dtype's precision, like the kernels.
    let tau_e: E = from_f64(tau);
    let in_u: Vec<E> = p
        .as_vec()
        .iter()
        .map(|&pc| if pc <= tau_e { E::ONE } else { E::default() })
        .collect();
    let uncertain = in_u.iter().filter(|&&m| m == E::ONE).count();
    let mask = dev.tensor_from_vec(in_u, (c,));
    let ln_q = nll.retaped::<T>().negate() * mask;
    let eps: E = from_f64(sar_math::anchor_ce::EPSILON);
    let (loss, w_host) = match mode {
        WeightMode::Attached => {
            let denom = ln_q.retaped::<T>().sum::<Rank0, _>() + eps;
            let w = ln_q / denom.broadcast_like(&(c,));
            let w_host = host(&w);
            ((w * nll).sum::<Rank0, _>(), w_host)
        }
        WeightMode::Uniform => {
            let w = dev.tensor_from_vec(vec![E::ONE / from_f64::<E>(c as f64); c], (c,));
            let w_host = host(&w);
            ((nll * w).sum::<Rank0, _>(), w_host)
        }
        WeightMode::Detached => {
            let ln_q = ln_q.retaped::<NoneTape>();
            let denom = ln_q.clone().sum::<Rank0, _>() + eps;
            let w = ln_q / denom.broadcast_like(&(c,));
            let w_host = host(&w);
            ((nll * w).sum::<Rank0, _>(), w_host)
        }
    };
    Ok((
        loss,
        AnchorCeParts {
            confidence: p_host,
            nll: nll_host,
            weights: w_host,
            uncertain,
        },
    ))
}

/// Checks every label is in `0..classes` or equals `ignore_index`.
pub fn validate_labels(labels: &[i64], classes: usize, ignore_index: i64) -> Result<()> {
    match labels
        .iter()
        .enumerate()
        .find(|&(_, &v)| v != ignore_index && !(0..classes as i64).contains(&v))
    {
        None => Ok(()),
        Some((index, &label)) => Err(SarError::Label {
            op: sar_math::Op::P2a,
            index,
            label,
            classes,
        }
        .into()),
    }
}

/// `weight`·L_p2a (Eq. 4) of rows `[N, D]` (any tape) with labels `[N]` toward constant
/// `anchors` `[C, D]`: Ω = rows whose label is not `ignore_index` (and whose class is active,
/// per-class gate); L = Σ_Ω ‖f − Â_y‖² / (|Ω|·D), 0 when Ω is empty. Only the rows in Ω are
/// gathered, so a NaN outside Ω reaches neither the loss nor the gradient. Returns the
/// weighted loss, the unweighted value and |Ω|.
pub fn p2a_rows<E: Float, D: SarDevice<E>, T: Tape<E, D>>(
    features: Tensor<(usize, usize), E, D, T>,
    labels: &[i64],
    anchors: &Tensor<(usize, usize), E, D>,
    ignore_index: i64,
    class_active: Option<&[bool]>,
    weight: f64,
) -> Result<P2aParts<E, D, T>> {
    let (n, d) = *features.shape();
    let (classes, ad) = *anchors.shape();
    if ad != d || labels.len() != n {
        return shape_err(format!(
            "p2a: features [{n}, {d}] with {} labels toward anchors [{classes}, {ad}]",
            labels.len()
        ));
    }
    if let Some(a) = class_active {
        if a.len() != classes {
            return shape_err(format!(
                "p2a: class_active has {} entries for {classes} classes",
                a.len()
            ));
        }
    }
    validate_labels(labels, classes, ignore_index)?;
    let (rows, classes_of): (Vec<usize>, Vec<usize>) = labels
        .iter()
        .enumerate()
        .filter(|&(_, &y)| y != ignore_index && class_active.is_none_or(|a| a[y as usize]))
        .map(|(i, &y)| (i, y as usize))
        .unzip();
    let valid = rows.len();
    let dev = anchors.device().clone();
    if valid == 0 {
        // Ω empty: L = 0 with a zero gradient. (dfdx's gather does not take an empty index.)
        // The scalar keeps the features' tape so that it still joins the caller's graph.
        let (_, tape) = features.split_tape();
        return Ok((dev.zeros::<Rank0>().put_tape(tape), 0.0, 0));
    }
    let rows = dev.tensor_from_vec(rows, (valid,));
    let classes_of = dev.tensor_from_vec(classes_of, (valid,));
    let picked: Tensor<(usize, usize), E, D, T> = features.gather(rows);
    let targets: Tensor<(usize, usize), E, D> = anchors.clone().gather(classes_of);
    let sum = (picked - targets).square().sum::<Rank0, _>();
    let scale = if valid == 0 {
        0.0
    } else {
        1.0 / (valid as f64 * d as f64)
    };
    let value = to_f64(sum.as_vec()[0]) * scale;
    Ok((sum * from_f64::<E>(weight * scale), value, valid))
}

/// `weight`·L_p2a (Eq. 4) of rows `[N, D]` (any tape) with MixUp targets
/// λ·Â_{a_n} + (1−λ)·Â_{b_n} toward constant `anchors` `[C, D]`; rows count when both labels
/// are valid (and active, per-class gate; see [`Mixup`]). Only the rows in Ω are gathered.
/// Returns the weighted loss, the unweighted value and |Ω|.
pub fn p2a_mixup_rows<E: Float, D: SarDevice<E>, T: Tape<E, D>>(
    features: Tensor<(usize, usize), E, D, T>,
    mixup: Mixup<'_>,
    anchors: &Tensor<(usize, usize), E, D>,
    ignore_index: i64,
    class_active: Option<&[bool]>,
    weight: f64,
) -> Result<P2aParts<E, D, T>> {
    let (n, d) = *features.shape();
    let (classes, ad) = *anchors.shape();
    if ad != d {
        return shape_err(format!(
            "mixup p2a: features [{n}, {d}] toward anchors [{classes}, {ad}]"
        ));
    }
    if let Some(a) = class_active {
        if a.len() != classes {
            return shape_err(format!(
                "p2a: class_active has {} entries for {classes} classes",
                a.len()
            ));
        }
    }
    mixup.check(n, classes, ignore_index)?;
    let keep: Vec<usize> = mixup
        .in_omega(ignore_index, class_active)
        .into_iter()
        .enumerate()
        .filter_map(|(i, ok)| ok.then_some(i))
        .collect();
    let valid = keep.len();
    let dev = anchors.device().clone();
    if valid == 0 {
        // Ω empty: see `p2a_rows`.
        let (_, tape) = features.split_tape();
        return Ok((dev.zeros::<Rank0>().put_tape(tape), 0.0, 0));
    }
    let pick =
        |ys: &[i64]| dev.tensor_from_vec(keep.iter().map(|&i| ys[i] as usize).collect(), (valid,));
    let ta: Tensor<(usize, usize), E, D> = anchors.clone().gather(pick(mixup.labels_a));
    let tb: Tensor<(usize, usize), E, D> = anchors.clone().gather(pick(mixup.labels_b));
    let target = ta * from_f64::<E>(mixup.lambda) + tb * from_f64::<E>(1.0 - mixup.lambda);
    let rows: Tensor<(usize, usize), E, D, T> =
        features.gather(dev.tensor_from_vec(keep, (valid,)));
    let sum = (rows - target).square().sum::<Rank0, _>();
    let scale = 1.0 / (valid as f64 * d as f64);
    let value = to_f64(sum.as_vec()[0]) * scale;
    Ok((sum * from_f64::<E>(weight * scale), value, valid))
}

/// `leaf` on a fresh tape whose gradient for `leaf` is allocated up front (zeros if the loss
/// turns out not to reach it).
fn trace<E: Float, D: SarDevice<E>>(
    leaf: &Tensor<(usize,), E, D>,
) -> Result<Flat<E, D, OwnedTape<E, D>>> {
    let mut grads = Gradients::leaky();
    grads.try_alloc_for(leaf).map_err(dev_err)?;
    Ok(leaf.trace(grads))
}

/// The dfdx backend: a device and an element type (f32 or f64).
#[derive(Debug, Clone, Default)]
pub struct DfdxBackend<E: Float, D: SarDevice<E> = Cpu> {
    device: D,
    _elem: std::marker::PhantomData<E>,
}

impl<E: Float> DfdxBackend<E, Cpu>
where
    Cpu: SarDevice<E>,
{
    /// On dfdx's CPU device.
    pub fn cpu() -> Self {
        DfdxBackend::new(Cpu::default())
    }
}

impl<E: Float, D: SarDevice<E>> DfdxBackend<E, D> {
    /// On `device`.
    pub fn new(device: D) -> Self {
        DfdxBackend {
            device,
            _elem: std::marker::PhantomData,
        }
    }

    /// The device.
    pub fn device(&self) -> &D {
        &self.device
    }

    fn resample(&self, labels: &DfdxLabels, (h, w): (usize, usize)) -> Result<DfdxLabels> {
        let [b, lh, lw] = labels.shape[..] else {
            return shape_err(format!("labels must be [B, H, W], got {:?}", labels.shape));
        };
        if (lh, lw) == (h, w) {
            return Ok(labels.clone());
        }
        let mut out = vec![0i64; b * h * w];
        sar_math::resample::resample_labels_nearest(&labels.data, b, (lh, lw), (h, w), &mut out)?;
        Ok(DfdxLabels {
            data: out,
            shape: vec![b, h, w],
        })
    }
}

impl<E: Float, D: SarDevice<E>> SarBackend for DfdxBackend<E, D> {
    type Tensor = DfdxTensor<E, D>;
    type Labels = DfdxLabels;
    type Loss = DfdxLoss<E, D>;
    type Error = SarDfdxError;

    fn tensor(&self, shape: &[usize], data: &[f64]) -> Result<DfdxTensor<E, D>> {
        if shape.iter().product::<usize>() != data.len() {
            return shape_err(format!("{} values for shape {shape:?}", data.len()));
        }
        let v: Vec<E> = data.iter().map(|&x| from_f64(x)).collect();
        Ok(DfdxTensor {
            data: self.device.tensor_from_vec(v, (data.len(),)),
            shape: shape.to_vec(),
        })
    }

    fn labels(&self, shape: &[usize], data: &[i64]) -> Result<DfdxLabels> {
        if shape.iter().product::<usize>() != data.len() {
            return shape_err(format!("{} labels for shape {shape:?}", data.len()));
        }
        Ok(DfdxLabels {
            data: data.to_vec(),
            shape: shape.to_vec(),
        })
    }

    fn to_host(&self, t: &DfdxTensor<E, D>) -> Result<Vec<f64>> {
        Ok(host(&t.data))
    }

    fn loss_value(&self, loss: &DfdxLoss<E, D>) -> Result<f64> {
        Ok(loss.value)
    }

    fn loss_gradient(&self, loss: &DfdxLoss<E, D>, wrt: &DfdxTensor<E, D>) -> Result<Vec<f64>> {
        if let Some(l) = loss.tape.borrow_mut().take() {
            *loss.grads.borrow_mut() = Some(l.try_backward().map_err(dev_err)?);
        }
        // Gradients are keyed by tensor id; a tensor the loss does not reach gets zeros.
        match loss.grads.borrow_mut().as_mut() {
            Some(grads) => {
                grads.try_alloc_for(&wrt.data).map_err(dev_err)?;
                Ok(host(&grads.get(&wrt.data)))
            }
            None => Err(SarDfdxError::Device("the loss has no tape".into())),
        }
    }

    fn detach(&self, t: &DfdxTensor<E, D>) -> DfdxTensor<E, D> {
        t.clone()
    }

    fn anchor_ce(
        &self,
        logits: &DfdxTensor<E, D>,
        tau: f64,
        mode: WeightMode,
    ) -> Result<AnchorCeOutput<DfdxLoss<E, D>>> {
        self.anchor_ce_on(logits, trace(&logits.data)?, tau, mode)
    }

    fn ema_update(
        &self,
        semantic: &mut DfdxTensor<E, D>,
        embedded: &DfdxTensor<E, D>,
        alpha: f64,
        rows: &[bool],
        initialized: &mut [bool],
    ) -> Result<usize> {
        let [c, d] = semantic.shape[..] else {
            return shape_err(format!(
                "ema: semantic anchors must be [C, D], got {:?}",
                semantic.shape
            ));
        };
        if embedded.shape != [c, d] || rows.len() != c || initialized.len() != c {
            return shape_err(format!(
                "ema: semantic {:?}, embedded {:?}, rows {}, initialized {} disagree",
                semantic.shape,
                embedded.shape,
                rows.len(),
                initialized.len()
            ));
        }
        let updated = ema_rows(
            &mut semantic.data,
            &embedded.data,
            alpha,
            rows,
            initialized,
            d,
        )?;
        Ok(updated)
    }

    fn resample_labels(&self, labels: &DfdxLabels, out_hw: (usize, usize)) -> Result<DfdxLabels> {
        self.resample(labels, out_hw)
    }

    fn p2a(
        &self,
        features: &DfdxTensor<E, D>,
        labels: &DfdxLabels,
        anchors: &DfdxTensor<E, D>,
        ignore_index: i64,
        class_active: Option<&[bool]>,
        weight: f64,
    ) -> Result<P2aOutput<DfdxLoss<E, D>>> {
        let traced = trace(&features.data)?;
        let args = (ignore_index, class_active, weight);
        self.p2a_on(features, traced, labels, anchors, args)
    }

    fn p2a_mixup(
        &self,
        features: &DfdxTensor<E, D>,
        mixup: Mixup<'_>,
        anchors: &DfdxTensor<E, D>,
        ignore_index: i64,
        class_active: Option<&[bool]>,
        weight: f64,
    ) -> Result<P2aOutput<DfdxLoss<E, D>>> {
        let traced = trace(&features.data)?;
        let args = (ignore_index, class_active, weight);
        self.p2a_mixup_on(features, traced, mixup, anchors, args)
    }
}

/// The ignore index, the per-class mask and λ2 of a p2a call.
type P2aArgs<'a> = (i64, Option<&'a [bool]>, f64);

impl<E: Float, D: SarDevice<E>> DfdxBackend<E, D> {
    /// L_aux of `logits` (a backend tensor) computed on `traced`, its values on a tape: a fresh
    /// leaf ([`SarBackend::anchor_ce`]) or the caller's graph ([`TapedBackend`]).
    fn anchor_ce_on(
        &self,
        logits: &DfdxTensor<E, D>,
        traced: Flat<E, D, OwnedTape<E, D>>,
        tau: f64,
        mode: WeightMode,
    ) -> Result<AnchorCeOutput<DfdxLoss<E, D>>> {
        let [c, c2] = logits.shape[..] else {
            return shape_err(format!(
                "anchor logits must be [C, C], got {:?}",
                logits.shape
            ));
        };
        if c != c2 || c == 0 {
            return shape_err(format!(
                "anchor logits must be [C, C], got {:?}",
                logits.shape
            ));
        }
        let (loss, parts) = anchor_ce(traced.reshape_like(&(c, c)), tau, mode)?;
        Ok(AnchorCeOutput {
            loss: DfdxLoss::new(loss),
            confidence: parts.confidence,
            nll: parts.nll,
            weights: parts.weights,
            uncertain: parts.uncertain,
        })
    }

    /// [`SarBackend::p2a`] on `traced`, the features' values on a tape (see
    /// [`DfdxBackend::anchor_ce_on`]).
    fn p2a_on(
        &self,
        features: &DfdxTensor<E, D>,
        traced: Flat<E, D, OwnedTape<E, D>>,
        labels: &DfdxLabels,
        anchors: &DfdxTensor<E, D>,
        (ignore_index, class_active, weight): P2aArgs<'_>,
    ) -> Result<P2aOutput<DfdxLoss<E, D>>> {
        let [classes, d] = anchors.shape[..] else {
            return shape_err(format!(
                "p2a: anchors must be [C, D], got {:?}",
                anchors.shape
            ));
        };
        let a = anchors.matrix(classes, d);
        let (rows, labels) = feature_rows(self, "p2a", features, traced, labels, Some(d))?;
        let (loss, value, valid) = p2a_rows(rows, &labels, &a, ignore_index, class_active, weight)?;
        Ok(P2aOutput {
            loss: DfdxLoss::new(loss),
            value,
            valid,
        })
    }

    /// [`SarBackend::p2a_mixup`] on `traced` (see [`DfdxBackend::p2a_on`]).
    fn p2a_mixup_on(
        &self,
        features: &DfdxTensor<E, D>,
        traced: Flat<E, D, OwnedTape<E, D>>,
        mixup: Mixup<'_>,
        anchors: &DfdxTensor<E, D>,
        (ignore_index, class_active, weight): P2aArgs<'_>,
    ) -> Result<P2aOutput<DfdxLoss<E, D>>> {
        let ([classes, d], [n, fd]) = (&anchors.shape[..], &features.shape[..]) else {
            return shape_err(format!(
                "mixup p2a: features {:?} and anchors {:?} must be [N, D] and [C, D]",
                features.shape, anchors.shape
            ));
        };
        let rows = traced.reshape_like(&(*n, *fd));
        let a = anchors.matrix(*classes, *d);
        let (loss, value, valid) =
            p2a_mixup_rows(rows, mixup, &a, ignore_index, class_active, weight)?;
        Ok(P2aOutput {
            loss: DfdxLoss::new(loss),
            value,
            valid,
        })
    }
}

/// Eq. 8 on a flat `[C, D]` tensor: rows with `rows[c]` become E_c the first time and
/// αÂ_c + (1−α)E_c afterwards (1−α rounded in the dtype as `sar-math` does). Returns the rows
/// updated. Shared by the backend and the SAR head.
pub fn ema_rows<E: Float, D: SarDevice<E>>(
    semantic: &mut Tensor<(usize,), E, D>,
    embedded: &Tensor<(usize,), E, D>,
    alpha: f64,
    rows: &[bool],
    initialized: &mut [bool],
    dim: usize,
) -> Result<usize> {
    sar_math::config::SarConfig {
        alpha,
        ..Default::default()
    }
    .validate()?;
    let c = rows.len();
    if embedded.as_vec().iter().any(|v| !v.is_finite()) {
        return Err(SarError::NonFinite {
            op: sar_math::Op::Ema,
            what: "embedded anchors",
        }
        .into());
    }
    let alpha_e: E = from_f64(alpha);
    let beta_e = E::ONE - alpha_e;
    let (mut a, mut b) = (vec![E::ONE; c * dim], vec![E::default(); c * dim]);
    let mut updated = 0;
    for r in 0..c {
        if rows[r] {
            let (ar, br) = if initialized[r] {
                (alpha_e, beta_e)
            } else {
                (E::default(), E::ONE)
            };
            a[r * dim..(r + 1) * dim].fill(ar);
            b[r * dim..(r + 1) * dim].fill(br);
            initialized[r] = true;
            updated += 1;
        }
    }
    let dev = semantic.device().clone();
    let n = c * dim;
    let a = dev.tensor_from_vec(a, (n,));
    let b = dev.tensor_from_vec(b, (n,));
    *semantic = semantic.clone() * a + embedded.clone() * b;
    Ok(updated)
}

/// Features as rows: `[B, D, H, W]` (any tape) permuted to `[B·H·W, D]` with the labels
/// resampled to the map, or `[N, D]` with `[N]`. With `dim`, D must be it. Labels unchecked.
fn feature_rows<E: Float, D: SarDevice<E>, T: Tape<E, D>>(
    backend: &DfdxBackend<E, D>,
    op: &str,
    features: &DfdxTensor<E, D>,
    traced: Flat<E, D, T>,
    labels: &DfdxLabels,
    dim: Option<usize>,
) -> Result<(Matrix<E, D, T>, Vec<i64>)> {
    let fits = |fd: usize| dim.is_none_or(|d| d == fd);
    match (&features.shape[..], &labels.shape[..]) {
        (&[b, d, h, w], &[lb, _, _]) if b == lb && fits(d) => {
            let y = backend.resample(labels, (h, w))?;
            let rows = traced
                .reshape_like(&(b, d, h, w))
                .permute::<_, Axes4<0, 2, 3, 1>>()
                .reshape_like(&(b * h * w, d));
            Ok((rows, y.data))
        }
        (&[n, d], &[ln]) if n == ln && fits(d) => {
            Ok((traced.reshape_like(&(n, d)), labels.data.clone()))
        }
        (f, l) => {
            let d = dim.map_or("D".to_string(), |d| d.to_string());
            shape_err(format!(
                "{op}: features {f:?} and labels {l:?} must be [B, {d}, H, W] with [B, H', W'], or [N, {d}] with [N]"
            ))
        }
    }
}

/// The baselines' rows ([`feature_rows`]), labels checked against `classes`.
fn baseline_rows<E: Float, D: SarDevice<E>, T: Tape<E, D>>(
    backend: &DfdxBackend<E, D>,
    op: &str,
    features: &DfdxTensor<E, D>,
    traced: Flat<E, D, T>,
    labels: &DfdxLabels,
    classes: usize,
    ignore_index: i64,
) -> Result<(Matrix<E, D, T>, Vec<i64>)> {
    let (rows, y) = feature_rows(backend, op, features, traced, labels, None)?;
    validate_labels(&y, classes, ignore_index)?;
    Ok((rows, y))
}

/// `weight`·max(m², 1e-5) of rows `[M, D]` (any tape) toward constant `prototypes` `[C, D]`,
/// m = Σ_Ω |f − P_y| / (M·D) (spec §7; labels checked). |x| is x·sign(x) with the sign a
/// constant, so that sign(0) = 0 as in PyTorch. Only the rows in Ω are gathered. Returns the
/// weighted loss, the unweighted value and |Ω|.
pub fn car_rows<E: Float, D: SarDevice<E>, T: Tape<E, D>>(
    rows: Matrix<E, D, T>,
    labels: &[i64],
    prototypes: &Matrix<E, D>,
    ignore_index: i64,
    weight: f64,
) -> Result<P2aParts<E, D, T>> {
    let (m, d) = *rows.shape();
    let (picked, classes_of): (Vec<usize>, Vec<usize>) = labels
        .iter()
        .enumerate()
        .filter(|&(_, &y)| y != ignore_index)
        .map(|(i, &y)| (i, y as usize))
        .unzip();
    let valid = picked.len();
    let dev = prototypes.device().clone();
    let min = sar_math::prototype::CAR_MIN_LOSS;
    if valid == 0 {
        // m = 0: the clipped value, zero gradient; the rows' tape joins the caller's graph.
        let (_, tape) = rows.split_tape();
        let loss = (dev.zeros::<Rank0>() + from_f64::<E>(min * weight)).put_tape(tape);
        return Ok((loss, min, 0));
    }
    let picked = rows.gather(dev.tensor_from_vec(picked, (valid,)));
    let targets = prototypes
        .clone()
        .gather(dev.tensor_from_vec(classes_of, (valid,)));
    let diff = picked - targets;
    let sign: Vec<E> = diff
        .as_vec()
        .into_iter()
        .map(|v| {
            if v > E::default() {
                E::ONE
            } else if v < E::default() {
                E::default() - E::ONE
            } else {
                E::default()
            }
        })
        .collect();
    let sign = dev.tensor_from_vec(sign, (valid, d));
    let mean = (diff * sign).sum::<Rank0, _>() * from_f64::<E>(1.0 / (m * d) as f64);
    let raw = mean.square();
    let raw_value = to_f64(raw.as_vec()[0]);
    if !raw_value.is_finite() {
        return Err(SarError::NonFinite {
            op: sar_math::Op::Car,
            what: "CAR loss (features inside Ω)",
        }
        .into());
    }
    Ok(if raw_value >= min {
        (raw * from_f64::<E>(weight), raw_value, valid)
    } else {
        // torch.clamp below the bound: the bound's value, zero gradient.
        (
            (raw * E::default() + from_f64::<E>(min)) * from_f64::<E>(weight),
            min,
            valid,
        )
    })
}

impl<E: Float, D: SarDevice<E>> DfdxBackend<E, D> {
    /// [`BaselineBackend::class_prototypes`] on the host (the per-class sums are a few
    /// hundred values; the features are read once).
    fn prototypes_host(
        &self,
        features: &DfdxTensor<E, D>,
        labels: &DfdxLabels,
        classes: usize,
        ignore_index: i64,
    ) -> Result<(DfdxTensor<E, D>, Vec<u64>)> {
        let (rows, y) = baseline_rows(
            self,
            "prototypes",
            features,
            features.data.clone(),
            labels,
            classes,
            ignore_index,
        )?;
        let (_, d) = *rows.shape();
        let values = host(&rows);
        let (mut sums, mut counts) = (vec![0.0f64; classes * d], vec![0u64; classes]);
        for (i, &label) in y.iter().enumerate() {
            if label == ignore_index {
                continue;
            }
            let c = label as usize;
            counts[c] += 1;
            for k in 0..d {
                sums[c * d + k] += values[i * d + k];
            }
        }
        let mut p = vec![E::default(); classes * d];
        for c in 0..classes {
            if counts[c] > 0 {
                for k in 0..d {
                    p[c * d + k] = from_f64(sums[c * d + k] / counts[c] as f64);
                }
            }
        }
        Ok((
            DfdxTensor {
                data: self.device.tensor_from_vec(p, (classes * d,)),
                shape: vec![classes, d],
            },
            counts,
        ))
    }

    /// [`BaselineBackend::car`] on `traced` (see [`DfdxBackend::p2a_on`]).
    pub(crate) fn car_on(
        &self,
        features: &DfdxTensor<E, D>,
        traced: Flat<E, D, OwnedTape<E, D>>,
        labels: &DfdxLabels,
        prototypes: &DfdxTensor<E, D>,
        ignore_index: i64,
        weight: f64,
    ) -> Result<P2aOutput<DfdxLoss<E, D>>> {
        let [classes, d] = prototypes.shape[..] else {
            return shape_err(format!(
                "car: prototypes must be [C, D], got {:?}",
                prototypes.shape
            ));
        };
        let (rows, y) =
            baseline_rows(self, "car", features, traced, labels, classes, ignore_index)?;
        if rows.shape().1 != d {
            return shape_err(format!(
                "car: prototypes {:?} for features {:?}",
                prototypes.shape, features.shape
            ));
        }
        let p = prototypes.matrix(classes, d);
        let (loss, value, valid) = car_rows(rows, &y, &p, ignore_index, weight)?;
        Ok(P2aOutput {
            loss: DfdxLoss::new(loss),
            value,
            valid,
        })
    }
}

impl<E: Float, D: SarDevice<E>> BaselineBackend for DfdxBackend<E, D> {
    fn class_prototypes(
        &self,
        features: &DfdxTensor<E, D>,
        labels: &DfdxLabels,
        classes: usize,
        ignore_index: i64,
    ) -> Result<(DfdxTensor<E, D>, Vec<u64>)> {
        self.prototypes_host(features, labels, classes, ignore_index)
    }

    fn car(
        &self,
        features: &DfdxTensor<E, D>,
        labels: &DfdxLabels,
        prototypes: &DfdxTensor<E, D>,
        ignore_index: i64,
        weight: f64,
    ) -> Result<P2aOutput<DfdxLoss<E, D>>> {
        let traced = trace(&features.data)?;
        self.car_on(features, traced, labels, prototypes, ignore_index, weight)
    }
}
