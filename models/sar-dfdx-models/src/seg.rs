//! Segmentation networks on dfdx: mmsegmentation's dilated ResNet V1c with the FCN or
//! DeepLabV3 (ASPP) decode head and the auxiliary FCN head, under the names `sar-models`' candle
//! networks use (`backbone.*`, `decode_head.*`, `auxiliary_head.*`), so either library loads
//! the other's checkpoints.
//!
//! Activations are NHWC rows `[N·h·w, C]` (see [`sar_dfdx::conv`]).
//!
//! - Backbone, base width w: stem `backbone.stem.{0,3,6}` 3×3 convs (3 → w/2 stride 2,
//!   w/2 → w/2, w/2 → w) each with BatchNorm `stem.{1,4,7}` and ReLU, then a 3×3/2 max-pool
//!   (padding 1); stages `layer1..4` of widths w·2^s (×4 for Bottlenecks), strides 1/2/1/1 and
//!   dilations 1/1/2/4, the first block of a dilated stage at half its dilation
//!   (`contract_dilation`); a BasicBlock's second conv is not dilated. Output stride 8.
//! - FCN decode head on stage 4 (C channels, D = C/4): `convs.0` 3×3 (C → D), `convs.1` 3×3
//!   (D → D), `conv_cat` 3×3 over the channel concatenation [stage 4, convs] (C + D → D), each
//!   a ConvModule (`{name}.conv` → `{name}.bn` → ReLU).
//! - ASPP decode head on stage 4: `image_pool.1` (the per-image mean of stage 4, a 1×1
//!   ConvModule, broadcast back to every pixel), `aspp_modules.0` 1×1 and `aspp_modules.1..3`
//!   3×3 with dilations 12, 24, 36 (padding = dilation), concatenated in that order after the
//!   pool (5·D channels), `bottleneck` 3×3 → D.
//! - Auxiliary head on stage 3 (C₃ channels): `auxiliary_head.convs.0` 3×3 ConvModule →
//!   C₃/4.
//! - Classifiers: `decode_head.conv_seg` and `auxiliary_head.conv_seg`, 1×1 convs with bias
//!   (weight `[K, D, 1, 1]`), applied to rows, so SAR's anchors go through the same weights.
//!
//! [`SegNet::features`] returns the decode head's features F (what SAR pulls toward its
//! anchors, before dropout and `conv_seg`) and, in training mode with an auxiliary head, the
//! auxiliary features.

use crate::{Block, Forward};
use sar_dfdx::conv::max_pool2d;
use sar_dfdx::dfdx::prelude::*;
use sar_dfdx::nn::{linear, Params, Rows};
use sar_dfdx::{ConvOut, Float, Result, SarDevice, SarDfdxError};

/// Depth of the dilated ResNet V1c.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum V1cDepth {
    /// BasicBlocks [2, 2, 2, 2].
    R18,
    /// Bottlenecks [3, 4, 6, 3].
    R50,
    /// Bottlenecks [3, 4, 23, 3].
    R101,
}

/// The decode head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SegHead {
    /// FCN (two 3×3 ConvModules and `conv_cat`).
    Fcn,
    /// DeepLabV3's ASPP.
    Aspp,
}

/// A segmentation network (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegNet {
    /// Backbone depth.
    pub depth: V1cDepth,
    /// Decode head.
    pub head: SegHead,
    /// With the auxiliary FCN head on stage 3.
    pub aux: bool,
    /// Base width w of the stages (64 is the standard network).
    pub width: usize,
}

/// What [`SegNet::features`] computes.
pub struct SegOut<E: Float, D: SarDevice<E>, T> {
    /// The decode head's features F `[N·h·w, D]`.
    pub main: Rows<D, T, E>,
    /// The auxiliary head's features `[N·h·w, C₃/4]` (training mode, with an auxiliary head).
    pub aux: Option<Rows<D, T, E>>,
    /// The features' (h, w): the input's / 8, rounded up per strided layer.
    pub hw: (usize, usize),
}

fn config_err<T>(msg: String) -> Result<T> {
    Err(SarDfdxError::Shape(msg))
}

impl SegNet {
    /// The network, checked: the width a multiple of 4, at least 4.
    pub fn new(depth: V1cDepth, head: SegHead, aux: bool, width: usize) -> Result<Self> {
        if width < 4 || !width.is_multiple_of(4) {
            return config_err(format!(
                "the backbone width must be a multiple of 4 (≥ 4), got {width}"
            ));
        }
        Ok(SegNet {
            depth,
            head,
            aux,
            width,
        })
    }

    fn expansion(&self) -> usize {
        match self.depth {
            V1cDepth::R18 => 1,
            V1cDepth::R50 | V1cDepth::R101 => 4,
        }
    }

    /// Channels of stage s (0-based).
    fn stage_width(&self, s: usize) -> usize {
        (self.width << s) * self.expansion()
    }

    /// D, the decode head's feature width (stage 4's / 4).
    pub fn feature_dim(&self) -> usize {
        self.stage_width(3) / 4
    }

    /// The auxiliary head's feature width (stage 3's / 4).
    pub fn aux_dim(&self) -> usize {
        self.stage_width(2) / 4
    }

    /// Decode (and, in training mode with an auxiliary head, auxiliary) features of images
    /// given as NHWC rows `[N·H·W, C]`.
    pub fn features<E: Float, D: SarDevice<E>, T: Tape<E, D>>(
        &self,
        f: &mut Forward<D, E>,
        x: Rows<D, T, E>,
        (n, h, w): (usize, usize, usize),
    ) -> Result<SegOut<E, D, T>> {
        let (stage3, hw3, stage4, hw4) = self.backbone(f, x, (n, h, w))?;
        let aux = if self.aux && f.train {
            let (a, _) = conv_bn(
                f,
                stage3,
                "auxiliary_head.convs.0",
                (n, hw3.0, hw3.1),
                (1, 1),
            )?;
            Some(a)
        } else {
            None
        };
        let main = match self.head {
            SegHead::Fcn => self.fcn(f, stage4, (n, hw4.0, hw4.1))?,
            SegHead::Aspp => self.aspp(f, stage4, (n, hw4.0, hw4.1))?,
        };
        Ok(SegOut { main, aux, hw: hw4 })
    }

    /// Logits `[M, K]` of feature rows: `decode_head.conv_seg`, or `auxiliary_head.conv_seg`
    /// with `aux`.
    pub fn classify<E: Float, D: SarDevice<E>, T: Tape<E, D>>(
        &self,
        params: &Params<D, E>,
        features: Rows<D, T, E>,
        aux: bool,
    ) -> Result<Rows<D, T, E>> {
        let head = if aux { "auxiliary_head" } else { "decode_head" };
        linear(params, features, &format!("{head}.conv_seg"))
    }

    /// Stage 3 and stage 4 with their sizes.
    #[allow(clippy::type_complexity)]
    fn backbone<E: Float, D: SarDevice<E>, T: Tape<E, D>>(
        &self,
        f: &mut Forward<D, E>,
        x: Rows<D, T, E>,
        (n, h, w): (usize, usize, usize),
    ) -> Result<(Rows<D, T, E>, (usize, usize), Rows<D, T, E>, (usize, usize))> {
        let mut x = x;
        let mut hw = (h, w);
        for (i, stride) in [(0, 2), (3, 1), (6, 1)] {
            let conv = format!("backbone.stem.{i}");
            let bn = format!("backbone.stem.{}", i + 1);
            let (y, o) = f.conv(x, &conv, (n, hw.0, hw.1), stride, 1)?;
            x = f.bn(y, &bn, true)?;
            hw = o;
        }
        (x, hw) = max_pool2d(f.cache, x, (n, hw.0, hw.1), 3, 2, 1)?;
        let counts: [usize; 4] = match self.depth {
            V1cDepth::R18 => [2, 2, 2, 2],
            V1cDepth::R50 => [3, 4, 6, 3],
            V1cDepth::R101 => [3, 4, 23, 3],
        };
        let (strides, dilations) = ([1usize, 2, 1, 1], [1usize, 1, 2, 4]);
        let mut stage3 = None;
        for stage in 0..4 {
            for i in 0..counts[stage] {
                let d = dilations[stage];
                let block = Block {
                    bottleneck: self.expansion() == 4,
                    width: self.width << stage,
                    stride: if i == 0 { strides[stage] } else { 1 },
                    dilation: if i == 0 && d > 1 { d / 2 } else { d },
                };
                let name = format!("backbone.layer{}.{i}", stage + 1);
                (x, hw) = f.residual_block(x, &name, (n, hw.0, hw.1), block)?;
            }
            if stage == 2 {
                stage3 = Some((x.retaped::<T>(), hw));
            }
        }
        let (s3, hw3) = stage3.ok_or_else(|| SarDfdxError::Shape("no stage 3".into()))?;
        // Stage 3's copy carries an empty tape; the backbone's joins through stage 4.
        Ok((s3, hw3, x, hw))
    }

    /// FCN on stage 4 (see the module docs).
    fn fcn<E: Float, D: SarDevice<E>, T: Tape<E, D>>(
        &self,
        f: &mut Forward<D, E>,
        x: Rows<D, T, E>,
        size: (usize, usize, usize),
    ) -> Result<Rows<D, T, E>> {
        let (y, _) = conv_bn(f, x.retaped::<T>(), "decode_head.convs.0", size, (1, 1))?;
        let (y, _) = conv_bn(f, y, "decode_head.convs.1", size, (1, 1))?;
        let cat = (x, y).concat_along(Axis::<1>);
        Ok(conv_bn(f, cat, "decode_head.conv_cat", size, (1, 1))?.0)
    }

    /// DeepLabV3's ASPP on stage 4 (see the module docs).
    fn aspp<E: Float, D: SarDevice<E>, T: Tape<E, D>>(
        &self,
        f: &mut Forward<D, E>,
        x: Rows<D, T, E>,
        (n, h, w): (usize, usize, usize),
    ) -> Result<Rows<D, T, E>> {
        let c = x.shape().1;
        let pooled = x
            .retaped::<T>()
            .reshape_like(&(n, h * w, c))
            .mean::<(usize, usize), Axis<1>>();
        let (pooled, _) = conv_bn(f, pooled, "decode_head.image_pool.1", (n, 1, 1), (0, 1))?;
        // Every pixel takes its image's row (the gather's backward sums over the pixels).
        let dev = pooled.device().clone();
        let rows: Vec<usize> = (0..n * h * w).map(|p| p / (h * w)).collect();
        let mut out = pooled.gather(dev.tensor_from_vec(rows, (n * h * w,)));
        for (i, d) in [1usize, 12, 24, 36].into_iter().enumerate() {
            let name = format!("decode_head.aspp_modules.{i}");
            let geometry = if d == 1 { (0, 1) } else { (d, d) };
            let (b, _) = conv_bn(f, x.retaped::<T>(), &name, (n, h, w), geometry)?;
            out = (out, b).concat_along(Axis::<1>);
        }
        // `x`'s own tape (the backbone) joins the head's here.
        let (out, tape) = out.split_tape();
        let (_, x_tape) = x.split_tape();
        let out = out.put_tape(tape.merge(x_tape));
        Ok(conv_bn(f, out, "decode_head.bottleneck", (n, h, w), (1, 1))?.0)
    }
}

/// mmcv's ConvModule `{name}.conv` (no bias) → `{name}.bn` → ReLU, stride 1, with `(padding,
/// dilation)`.
fn conv_bn<E: Float, D: SarDevice<E>, T: Tape<E, D>>(
    f: &mut Forward<D, E>,
    x: Rows<D, T, E>,
    name: &str,
    size: (usize, usize, usize),
    (pad, dilation): (usize, usize),
) -> Result<ConvOut<E, D, T>> {
    let (y, hw) = f.conv_dilated(x, &format!("{name}.conv"), size, 1, pad, dilation)?;
    Ok((f.bn(y, &format!("{name}.bn"), true)?, hw))
}

/// Bilinear resize (PyTorch's `align_corners=False`,
/// [`sar_math::resample::bilinear_source`] per axis, coordinates in `E`) of NHWC rows
/// `[N·H·W, C]` of `(n, h, w)` pixels to `(oh, ow)`: rows `[N·OH·OW, C]`. Each output row is
/// the weighted sum of four gathered source rows (the same row twice at a border), so its
/// backward is dfdx's scatter-add; any dfdx device. The same size returns `x`.
pub fn resize_bilinear<E, D, T>(
    x: Rows<D, T, E>,
    (n, h, w): (usize, usize, usize),
    (oh, ow): (usize, usize),
) -> Result<Rows<D, T, E>>
where
    E: Float + num_traits::float::FloatCore,
    D: SarDevice<E>,
    T: Tape<E, D>,
{
    let (rows, c) = *x.shape();
    if rows != n * h * w || h == 0 || w == 0 || oh == 0 || ow == 0 {
        return config_err(format!(
            "resize: {rows} rows for {n}×{h}×{w} pixels, to {oh}×{ow}"
        ));
    }
    if (h, w) == (oh, ow) {
        return Ok(x);
    }
    let ys: Vec<(usize, usize, E)> = (0..oh)
        .map(|o| sar_math::resample::bilinear_source::<E>(h, oh, o))
        .collect();
    let xs: Vec<(usize, usize, E)> = (0..ow)
        .map(|o| sar_math::resample::bilinear_source::<E>(w, ow, o))
        .collect();
    let m = n * oh * ow;
    // Taps (y0, x0), (y0, x1), (y1, x0), (y1, x1): source rows and weights per output pixel.
    let mut idx: [Vec<usize>; 4] = std::array::from_fn(|_| Vec::with_capacity(m));
    let mut wts: [Vec<E>; 4] = std::array::from_fn(|_| Vec::with_capacity(m));
    for b in 0..n {
        for &(y0, y1, ly) in &ys {
            for &(x0, x1, lx) in &xs {
                let taps = [
                    (y0, x0, (E::one() - ly) * (E::one() - lx)),
                    (y0, x1, (E::one() - ly) * lx),
                    (y1, x0, ly * (E::one() - lx)),
                    (y1, x1, ly * lx),
                ];
                for (k, (yy, xx, wt)) in taps.into_iter().enumerate() {
                    idx[k].push((b * h + yy) * w + xx);
                    wts[k].push(wt);
                }
            }
        }
    }
    let dev = x.device().clone();
    let mut out: Option<Rows<D, T, E>> = None;
    for (i, wt) in idx.into_iter().zip(wts) {
        let tap: Rows<D, T, E> = x.retaped::<T>().gather(dev.tensor_from_vec(i, (m,)));
        let wt: Tensor<(usize,), E, D> = dev.tensor_from_vec(wt, (m,));
        let term = tap * wt.broadcast_like::<_, Axis<1>>(&(m, c));
        out = Some(match out {
            None => term,
            Some(o) => o + term,
        });
    }
    let out = out.ok_or_else(|| SarDfdxError::Shape("resize: no taps".into()))?;
    // The taps were gathered from copies with empty tapes: `x`'s own joins here.
    let (out, tape) = out.split_tape();
    let (_, x_tape) = x.split_tape();
    Ok(out.put_tape(tape.merge(x_tape)))
}

/// mmsegmentation's pixel cross-entropy of logit rows `[M, K]` (already at label resolution)
/// against `labels` (`M`, `ignore` skipped): Σ over labelled pixels of −log softmax(z)_label,
/// divided by all M pixels. A label ≥ K other than `ignore` is an error naming its position.
pub fn seg_cross_entropy<E: Float, D: SarDevice<E>, T: Tape<E, D>>(
    logits: Rows<D, T, E>,
    labels: &[u8],
    ignore: u8,
) -> Result<Tensor<Rank0, E, D, T>> {
    let (m, k) = *logits.shape();
    if labels.len() != m || m == 0 {
        return config_err(format!(
            "segmentation cross-entropy: {} labels for {m} logit rows",
            labels.len()
        ));
    }
    if let Some(i) = labels.iter().position(|&l| l != ignore && l as usize >= k) {
        return config_err(format!(
            "segmentation cross-entropy: label {} at pixel {i} is not a class (K = {k}) nor the ignore index {ignore}",
            labels[i]
        ));
    }
    let dev = logits.device().clone();
    let idx: Vec<usize> = labels
        .iter()
        .map(|&l| if l == ignore { 0 } else { l as usize })
        .collect();
    let keep: Vec<E> = labels
        .iter()
        .map(|&l| if l == ignore { E::zero() } else { E::one() })
        .collect();
    let picked: Tensor<(usize,), E, D, T> = logits
        .log_softmax::<Axis<1>>()
        .select(dev.tensor_from_vec(idx, (m,)));
    let total = E::from(m).unwrap_or_else(E::one);
    Ok((picked * dev.tensor_from_vec(keep, (m,))).sum::<Rank0, _>() * (-E::one() / total))
}

/// `Dropout2d` on NHWC rows `[N·h·w, C]` of `n` images: whole channels of an image zeroed with
/// probability `p`, the rest scaled by 1/(1 − p), the masks drawn from `rng` image by image
/// and channel by channel (`rng.next_f64() < p` drops), as the candle trainer draws them.
pub fn dropout2d<E: Float, D: SarDevice<E>, T: Tape<E, D>>(
    x: Rows<D, T, E>,
    n: usize,
    p: f64,
    rng: &mut sar_math::rng::SeededRng,
) -> Result<Rows<D, T, E>> {
    if p <= 0.0 {
        return Ok(x);
    }
    let (rows, c) = *x.shape();
    if n == 0 || rows % n != 0 {
        return config_err(format!("dropout: {rows} rows for {n} images"));
    }
    let keep = E::from((1.0 / (1.0 - p)) as f32).unwrap_or_else(E::one);
    let mask: Vec<E> = (0..n * c)
        .map(|_| if rng.next_f64() < p { E::zero() } else { keep })
        .collect();
    let per = rows / n;
    let full: Vec<E> = (0..rows)
        .flat_map(|r| mask[(r / per) * c..(r / per + 1) * c].iter().copied())
        .collect();
    let dev = x.device().clone();
    Ok(x * dev.tensor_from_vec(full, (rows, c)))
}
