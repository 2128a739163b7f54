//! The backend the SAR head steps with (see [`TapedBackend`]).

use crate::{
    trace, DfdxBackend, DfdxLabels, DfdxLoss, DfdxTensor, Flat, Float, Matrix, Result, SarDevice,
    SarDfdxError,
};
use dfdx::prelude::*;
use sar_math::backend::{AnchorCeOutput, BaselineBackend, Mixup, P2aOutput, SarBackend};
use sar_math::WeightMode;
use std::cell::RefCell;

/// A flat tensor on the caller's tape, until a loss consumes it.
type Carried<E, D> = RefCell<Option<Flat<E, D, OwnedTape<E, D>>>>;

/// The backend [`crate::nn::SarHead`] steps with: [`DfdxBackend`], except that the anchor logits and
/// the features it is handed carry the caller's tape (the model's graph), so that L_aux and
/// L_p2a continue it and gradients reach h_ψ, the classifier and the network. Each carried
/// tensor is consumed by the first loss computed from it; tensors without one (and later
/// uses) are traced as fresh leaves, as in [`DfdxBackend`].
pub(crate) struct TapedBackend<E: Float, D: SarDevice<E>> {
    inner: DfdxBackend<E, D>,
    logits: Carried<E, D>,
    features: Carried<E, D>,
}

impl<E: Float, D: SarDevice<E>> TapedBackend<E, D> {
    /// A backend on `device` with anchor logits `[C, C]` and features `[N, D]` carrying the
    /// caller's tape; returns it with the two as (untraced) backend tensors.
    pub(crate) fn carrying(
        device: &D,
        logits: Matrix<E, D, OwnedTape<E, D>>,
        features: Matrix<E, D, OwnedTape<E, D>>,
    ) -> (Self, DfdxTensor<E, D>, DfdxTensor<E, D>) {
        let flat = |t: Matrix<E, D, OwnedTape<E, D>>| {
            let (r, c) = *t.shape();
            let t = t.reshape_like(&(r * c,));
            let leaf = DfdxTensor {
                data: t.retaped::<NoneTape>(),
                shape: vec![r, c],
            };
            (t, leaf)
        };
        let (z, zt) = flat(logits);
        let (f, ft) = flat(features);
        let b = TapedBackend {
            inner: DfdxBackend::new(device.clone()),
            logits: RefCell::new(Some(z)),
            features: RefCell::new(Some(f)),
        };
        (b, zt, ft)
    }

    /// A backend carrying only the features' tape (the baselines have no anchor logits).
    pub(crate) fn carrying_features(
        device: &D,
        features: Matrix<E, D, OwnedTape<E, D>>,
    ) -> (Self, DfdxTensor<E, D>) {
        let (r, c) = *features.shape();
        let f = features.reshape_like(&(r * c,));
        let leaf = DfdxTensor {
            data: f.retaped::<NoneTape>(),
            shape: vec![r, c],
        };
        let b = TapedBackend {
            inner: DfdxBackend::new(device.clone()),
            logits: RefCell::new(None),
            features: RefCell::new(Some(f)),
        };
        (b, leaf)
    }

    /// The carried features' tape when no loss consumed it (the gate failed): the caller joins
    /// it to its graph.
    pub(crate) fn take_features(&self) -> Option<Flat<E, D, OwnedTape<E, D>>> {
        self.features.borrow_mut().take()
    }

    fn carried(slot: &Carried<E, D>, t: &DfdxTensor<E, D>) -> Result<Flat<E, D, OwnedTape<E, D>>> {
        match slot.borrow_mut().take() {
            Some(taped) => Ok(taped),
            None => trace(&t.data),
        }
    }
}

impl<E: Float, D: SarDevice<E>> SarBackend for TapedBackend<E, D> {
    type Tensor = DfdxTensor<E, D>;
    type Labels = DfdxLabels;
    type Loss = DfdxLoss<E, D>;
    type Error = SarDfdxError;

    fn tensor(&self, shape: &[usize], data: &[f64]) -> Result<DfdxTensor<E, D>> {
        self.inner.tensor(shape, data)
    }
    fn labels(&self, shape: &[usize], data: &[i64]) -> Result<DfdxLabels> {
        self.inner.labels(shape, data)
    }
    fn to_host(&self, t: &DfdxTensor<E, D>) -> Result<Vec<f64>> {
        self.inner.to_host(t)
    }
    fn loss_value(&self, loss: &DfdxLoss<E, D>) -> Result<f64> {
        self.inner.loss_value(loss)
    }
    fn loss_gradient(&self, loss: &DfdxLoss<E, D>, wrt: &DfdxTensor<E, D>) -> Result<Vec<f64>> {
        self.inner.loss_gradient(loss, wrt)
    }
    fn detach(&self, t: &DfdxTensor<E, D>) -> DfdxTensor<E, D> {
        self.inner.detach(t)
    }
    fn anchor_ce(
        &self,
        logits: &DfdxTensor<E, D>,
        tau: f64,
        mode: WeightMode,
    ) -> Result<AnchorCeOutput<DfdxLoss<E, D>>> {
        let traced = Self::carried(&self.logits, logits)?;
        self.inner.anchor_ce_on(logits, traced, tau, mode)
    }
    fn ema_update(
        &self,
        semantic: &mut DfdxTensor<E, D>,
        embedded: &DfdxTensor<E, D>,
        alpha: f64,
        rows: &[bool],
        initialized: &mut [bool],
    ) -> Result<usize> {
        self.inner
            .ema_update(semantic, embedded, alpha, rows, initialized)
    }
    fn resample_labels(&self, labels: &DfdxLabels, out_hw: (usize, usize)) -> Result<DfdxLabels> {
        self.inner.resample_labels(labels, out_hw)
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
        let traced = Self::carried(&self.features, features)?;
        self.inner.p2a_on(
            features,
            traced,
            labels,
            anchors,
            (ignore_index, class_active, weight),
        )
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
        let traced = Self::carried(&self.features, features)?;
        self.inner.p2a_mixup_on(
            features,
            traced,
            mixup,
            anchors,
            (ignore_index, class_active, weight),
        )
    }
}

impl<E: Float, D: SarDevice<E>> BaselineBackend for TapedBackend<E, D> {
    fn class_prototypes(
        &self,
        features: &DfdxTensor<E, D>,
        labels: &DfdxLabels,
        classes: usize,
        ignore_index: i64,
    ) -> Result<(DfdxTensor<E, D>, Vec<u64>)> {
        self.inner
            .class_prototypes(features, labels, classes, ignore_index)
    }
    fn car(
        &self,
        features: &DfdxTensor<E, D>,
        labels: &DfdxLabels,
        prototypes: &DfdxTensor<E, D>,
        ignore_index: i64,
        weight: f64,
    ) -> Result<P2aOutput<DfdxLoss<E, D>>> {
        let traced = Self::carried(&self.features, features)?;
        self.inner
            .car_on(features, traced, labels, prototypes, ignore_index, weight)
    }
}
