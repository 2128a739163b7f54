//! The second stages on dfdx (`stage.kind = "mislas"` or `"disalign"` with
//! `run.backend = "dfdx"`): the losses and calibrated logits the candle tasks compute
//! (`crate::cls` and `crate::seg`), in dfdx ops with a CUDA path, over the same variables.
//!
//! The first-stage model is frozen ([`Params::freeze_unless`]): its forward runs without a
//! tape, so no gradient reaches it; only the stage's variables (MiSLAS: `fc.*` and
//! `stage.lws_scale`; DisAlign: `stage.disalign.*`) are traced and trained.
//!
//! - MiSLAS: logits z = fc(f)·s (s = `stage.lws_scale` `[C]` when on), label-aware smoothed
//!   cross-entropy mean_i [(1 − ε_i)(−log p_{i,y_i}) + ε_i·mean_c(−log p_ic)], ε_i = ε_{y_i}
//!   (spec §8.4).
//! - DisAlign on a classifier: σ = sigmoid(f·v + b) (`gate.weight` `[D]`, `gate.bias` `[1]`),
//!   z' = z + σ·(z·s + m) (`scale`, `bias` `[C]`), class-weighted cross-entropy
//!   Σ w_{y_i}·nll_i / Σ w_{y_i} (PyTorch's weighted mean).
//! - DisAlign on a segmenter: per pixel σ = sigmoid(ReLU(BN(conv1×1(F)))) (`gate.conv.weight`
//!   `[1, D, 1, 1]`, `gate.bn.*`), z' = z + σ·(s·z + m − z) (spec §8.5), the class-weighted
//!   pixel cross-entropy ([`sar_dfdx_models::seg::seg_weighted_cross_entropy`]).

use anyhow::ensure;
use sar_dfdx::dfdx::prelude::*;
use sar_dfdx::nn::{linear, Params, Rows};
use sar_dfdx::SarDevice;
use sar_dfdx_models::Forward;

/// The prefix of DisAlign's variables (shared with the candle tasks).
const DISALIGN: &str = crate::cls::DISALIGN;

/// Σ_i Σ_c W[i, c]·(−log softmax(z_i)_c) over logit rows `[N, C]`, times `scale`.
fn weighted_log_loss<D: SarDevice<f32>, T: Tape<f32, D>>(
    logits: Rows<D, T>,
    w: Vec<f32>,
    scale: f32,
) -> Tensor<Rank0, f32, D, T> {
    let (n, c) = *logits.shape();
    let dev = logits.device().clone();
    let w: Rows<D, NoneTape> = dev.tensor_from_vec(w, (n, c));
    (logits.log_softmax::<Axis<1>>() * w).sum::<Rank0, _>() * (-scale)
}

/// The class of each row, checked against C.
fn classes_of(labels: &[i64], n: usize, c: usize) -> anyhow::Result<Vec<usize>> {
    ensure!(
        labels.len() == n,
        "{} labels for {n} logit rows",
        labels.len()
    );
    labels
        .iter()
        .map(|&y| {
            usize::try_from(y)
                .ok()
                .filter(|&y| y < c)
                .ok_or_else(|| anyhow::anyhow!("label {y} is not one of the {c} classes"))
        })
        .collect()
}

/// MiSLAS's stage-2 loss of features `f` `[N, D]` (traced: the extractor's output, cut from
/// it): `fc`, the weight scaling `stage.lws_scale` when `lws`, the label-aware smoothed
/// cross-entropy with ε per class `epsilon`.
pub(crate) fn mislas_loss<D: SarDevice<f32>, T: Tape<f32, D>>(
    params: &Params<D>,
    f: Rows<D, T>,
    labels: &[i64],
    epsilon: &[f32],
    lws: bool,
) -> anyhow::Result<Tensor<Rank0, f32, D, T>> {
    let logits = mislas_logits(params, f, lws)?;
    let (n, c) = *logits.shape();
    ensure!(
        epsilon.len() == c,
        "{} smoothing values for {c} classes",
        epsilon.len()
    );
    let ys = classes_of(labels, n, c)?;
    // (1 − ε_i) on the label's log-probability plus ε_i/C on every one, averaged over rows.
    let mut w = vec![0f32; n * c];
    for (i, &y) in ys.iter().enumerate() {
        let eps = epsilon[y];
        w[i * c..(i + 1) * c].fill(eps / c as f32);
        w[i * c + y] += 1.0 - eps;
    }
    Ok(weighted_log_loss(logits, w, 1.0 / n as f32))
}

/// MiSLAS's logits: `fc` on features `[N, D]`, scaled per class by `stage.lws_scale` when
/// `lws` (training and evaluation).
pub(crate) fn mislas_logits<D: SarDevice<f32>, T: Tape<f32, D>>(
    params: &Params<D>,
    f: Rows<D, T>,
    lws: bool,
) -> anyhow::Result<Rows<D, T>> {
    let logits = linear(params, f, "fc")?;
    if !lws {
        return Ok(logits);
    }
    let shape = *logits.shape();
    let s = params.taped::<T>(crate::cls::LWS_SCALE)?;
    ensure!(
        s.shape().0 == shape.1,
        "{} has {} entries for {} classes",
        crate::cls::LWS_SCALE,
        s.shape().0,
        shape.1
    );
    Ok(logits * s.broadcast_like::<_, Axis<0>>(&shape))
}

/// DisAlign's calibrated logits z + σ·(z·s + m), σ = sigmoid(f·v + b), of features `f`
/// `[N, D]` (traced) and the frozen model's logits `z` `[N, C]`.
pub(crate) fn cls_disalign_logits<D: SarDevice<f32>, T: Tape<f32, D>>(
    params: &Params<D>,
    f: Rows<D, T>,
    z: Rows<D, NoneTape>,
) -> anyhow::Result<Rows<D, T>> {
    let (n, d) = *f.shape();
    let shape = *z.shape();
    ensure!(shape.0 == n, "{} logit rows for {n} feature rows", shape.0);
    let v = params
        .taped::<T>(&format!("{DISALIGN}gate.weight"))?
        .reshape_like(&(d, 1));
    let b = params.taped::<T>(&format!("{DISALIGN}gate.bias"))?;
    let sigma = (f.matmul(v) + b.broadcast_like::<_, Axis<0>>(&(n, 1))).sigmoid();
    let per_class = |name: &str| -> anyhow::Result<Tensor<(usize, usize), f32, D, T>> {
        Ok(params
            .taped::<T>(&format!("{DISALIGN}{name}"))?
            .broadcast_like::<_, Axis<0>>(&shape))
    };
    let a = per_class("scale")? * z.clone() + per_class("bias")?;
    let sigma = sigma
        .reshape_like(&(n,))
        .broadcast_like::<_, Axis<1>>(&shape);
    Ok(sigma * a + z)
}

/// The class-weighted cross-entropy Σ_i w_{y_i}·nll_i / Σ_i w_{y_i} of logits `[N, C]`.
pub(crate) fn class_weighted_cross_entropy<D: SarDevice<f32>, T: Tape<f32, D>>(
    logits: Rows<D, T>,
    labels: &[i64],
    weights: &[f32],
) -> anyhow::Result<Tensor<Rank0, f32, D, T>> {
    let (n, c) = *logits.shape();
    ensure!(
        weights.len() == c,
        "{} class weights for {c} classes",
        weights.len()
    );
    let ys = classes_of(labels, n, c)?;
    let mut w = vec![0f32; n * c];
    let mut total = 0f32;
    for (i, &y) in ys.iter().enumerate() {
        w[i * c + y] = weights[y];
        total += weights[y];
    }
    Ok(weighted_log_loss(logits, w, 1.0 / total))
}

/// DisAlign's calibrated segmentation logits z + σ·(s·z + m − z) of feature rows `f`
/// `[M, D]` and the frozen logits `z` `[M, K]`, σ = sigmoid(ReLU(BN(conv1×1(f)))) with the
/// gate's BatchNorm in `fw`'s mode.
pub(crate) fn seg_disalign_logits<D: SarDevice<f32>, T: Tape<f32, D>>(
    fw: &mut Forward<D>,
    f: Rows<D, T>,
    z: Rows<D, NoneTape>,
) -> anyhow::Result<Rows<D, T>> {
    let shape = *z.shape();
    ensure!(
        shape.0 == f.shape().0,
        "{} logit rows for {} feature rows",
        shape.0,
        f.shape().0
    );
    let g = linear(fw.params, f, &format!("{DISALIGN}gate.conv"))?;
    let sigma = fw.bn(g, &format!("{DISALIGN}gate.bn"), true)?.sigmoid();
    let params: &Params<D> = fw.params;
    let per_class = |name: &str| -> anyhow::Result<Tensor<(usize, usize), f32, D, T>> {
        Ok(params
            .taped::<T>(&format!("{DISALIGN}{name}"))?
            .broadcast_like::<_, Axis<0>>(&shape))
    };
    let a = per_class("scale")? * z.clone() + per_class("bias")? - z.clone();
    let sigma = sigma
        .reshape_like(&(shape.0,))
        .broadcast_like::<_, Axis<1>>(&shape);
    Ok(sigma * a + z)
}
