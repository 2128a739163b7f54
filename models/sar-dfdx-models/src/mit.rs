//! SegFormer on dfdx: the Mix Transformer backbone (MiT-B0 … B5) and SegFormer's all-MLP
//! decode head, as `sar-models`' candle `seg::mit` and `seg::segformer`, under the same names
//! (mmsegmentation's `backbone.layers.*`, `decode_head.*`) and shapes.
//!
//! Activations are NHWC rows: an h × w grid of C-channel tokens of N images is `[N·h·w, C]`,
//! which is the token sequence `[N, L, C]` (L = h·w) flattened, so a conv's output is already
//! the tokens and the tokens already the next conv's input.
//!
//! **Backbone.** Stage i (widths C_i = E·(1, 2, 5, 8)_i, E = E₀·width/64 with E₀ 32 for B0 and
//! 64 otherwise, depths below) is `backbone.layers.{i}`:
//!
//! - `.0` overlapping patch embedding: a k×k conv with bias `.0.projection` (k = 7, stride 4 in
//!   stage 0; k = 3, stride 2 after; padding k/2) to the grid (h_i, w_i), then LayerNorm
//!   `.0.norm`;
//! - `.1.{j}`, j < depth_i, a block: x ← x + DropPath(Attn(LN₁ x)),
//!   x ← x + DropPath(FFN(LN₂ x)) with LayerNorms `norm1`, `norm2`;
//! - `.2` a final LayerNorm: the stage output `[N·h_i·w_i, C_i]` (strides 4, 8, 16, 32).
//!
//! Every LayerNorm has ε = 1e-6.
//!
//! **Efficient self-attention** (`attn`, mmsegmentation's `EfficientMultiheadAttention`) on
//! tokens X `[N·L, C]` with heads H = (1, 2, 5, 8)_i of width d = C/H and reduction ratio
//! sr = (8, 4, 2, 1)_i: keys and values come from X_r = LN(conv_{sr×sr, stride sr}(X))
//! (`attn.sr` with bias, `attn.norm`; `[N·L_r, C]`, L_r = ⌊h/sr⌋·⌊w/sr⌋) when sr > 1, else from
//! X. With `attn.attn.in_proj_weight` W `[3C, C]` (rows W_q, W_k, W_v) and `in_proj_bias` b
//! `[3C]` (PyTorch's `nn.MultiheadAttention`): Q = X W_qᵀ + b_q, K = X_r W_kᵀ + b_k,
//! V = X_r W_vᵀ + b_v; per image and head, A = softmax(Q Kᵀ/√d) V over the L_r keys; the heads
//! concatenated `[N·L, C]` go through `attn.attn.out_proj` (weight `[C, C]`, bias). The heads
//! are a batch of N·H matrices: `[N·L, C]` viewed as `[N, L, H, d]`, permuted to
//! `[N, H, L, d]` and laid out afresh as `[N·H, L, d]` for dfdx's batched matmul.
//!
//! **Mix-FFN** (`ffn.layers`): 1×1 conv with bias C → 4C (`.0`), depth-wise 3×3 conv with bias
//! (`.1`, weight `[4C, 1, 3, 3]`, padding 1), exact GELU, 1×1 conv with bias 4C → C (`.4`).
//! The depth-wise conv is `y[p, c] = b[c] + Σ_{u,v<3} w[c, u, v]·x[p + (u − 1, v − 1), c]`
//! (zero outside the image): [`sar_dfdx::depthwise`], on the CPU one op with its own backward;
//! on other devices the 9 taps of every pixel gathered as in the dense conv (`[M, 9, C]`), times
//! the weight as `[9, C]` broadcast over the pixels, summed over the taps.
//!
//! **Stochastic depth**: block k of the K blocks of all stages (counted across stages) drops
//! each of its two residual branches per image with probability p_k = rate·k/(K − 1) in
//! training (kept branches scaled by 1/(1 − p_k)); per block the attention branch's masks are
//! drawn before the FFN branch's, image by image, and a branch with p_k = 0 draws nothing
//! (block 0), as the candle network draws them.
//!
//! | variant | E₀ | depths | head D₀ |
//! |---|---|---|---|
//! | B0 | 32 | 2, 2, 2, 2 | 256 |
//! | B1 | 64 | 2, 2, 2, 2 | 256 |
//! | B2 | 64 | 3, 4, 6, 3 | 768 |
//! | B3 | 64 | 3, 4, 18, 3 | 768 |
//! | B4 | 64 | 3, 8, 27, 3 | 768 |
//! | B5 | 64 | 3, 6, 40, 3 | 768 |
//!
//! **Head** (`decode_head`, mmsegmentation's `SegformerHead`, D = D₀·width/64): stage i's
//! output through the 1×1 ConvModule `convs.{i}` (conv without bias → BatchNorm → ReLU) to D
//! channels, resized bilinearly (`align_corners=False`) to stage 0's grid (h₀, w₀); the four
//! concatenated in stage order (`[N·h₀·w₀, 4D]`, as mmsegmentation's `SegformerHead` and the
//! candle network; the original SegFormer repository's head reverses them) and fused by the
//! 1×1 ConvModule `fusion_conv` into F `[N·h₀·w₀, D]`. Dropout and `conv_seg` are the
//! caller's ([`crate::seg::SegNet::classify`]).

use crate::seg::{conv_bn, resize_bilinear, DropPath};
use crate::transformer::{conv_bias, drop_path, gelu, layer_norm};
use crate::Forward;
use sar_dfdx::conv::ConvGeometry;
use sar_dfdx::dfdx::prelude::*;
use sar_dfdx::nn::{linear, Params, Rows};
use sar_dfdx::{ConvOut, Float, Result, SarDevice, SarDfdxError};
use sar_math::rng::SeededRng;

/// Every LayerNorm's ε.
const LN_EPS: f64 = 1e-6;
/// Attention heads per stage (also the stage widths in units of E).
const HEADS: [usize; 4] = [1, 2, 5, 8];
/// Spatial-reduction ratio of the keys and values per stage.
const REDUCTION: [usize; 4] = [8, 4, 2, 1];

fn shape_err<R>(msg: String) -> Result<R> {
    Err(SarDfdxError::Shape(msg))
}

/// `v` in element type `E` (f32 and f64 represent every value these conversions see).
fn cast<E: Float>(v: f64) -> E {
    <E as num_traits::NumCast>::from(v).unwrap_or_else(E::nan)
}

/// (E₀, depths) of MiT-B`b` (see the module docs), `None` past B5.
fn dims(b: u8) -> Option<(usize, [usize; 4])> {
    Some(match b {
        0 => (32, [2, 2, 2, 2]),
        1 => (64, [2, 2, 2, 2]),
        2 => (64, [3, 4, 6, 3]),
        3 => (64, [3, 4, 18, 3]),
        4 => (64, [3, 8, 27, 3]),
        5 => (64, [3, 6, 40, 3]),
        _ => return None,
    })
}

/// SegFormer's decode-head width D for MiT-B`b` at `width` (256 for B0/B1, 768 for B2–B5,
/// times width/64).
pub fn head_channels(b: u8, width: usize) -> usize {
    (if b <= 1 { 256 } else { 768 }) * width / 64
}

/// SegFormer on MiT-B`b` at `width` (E scaled by width/64) over NHWC rows of `(n, h, w)`
/// images: the decode head's features F `[N·h₄·w₄, D]` (before dropout and `conv_seg`) and
/// (h₄, w₄), the stage-0 grid (stride 4). `drop` (used only in training mode) applies
/// stochastic depth (see the module docs).
pub fn segformer<E, D, T>(
    f: &mut Forward<D, E>,
    x: Rows<D, T, E>,
    (n, h, w): (usize, usize, usize),
    b: u8,
    width: usize,
    drop: Option<DropPath<'_>>,
) -> Result<ConvOut<E, D, T>>
where
    E: Float + num_traits::float::FloatCore,
    D: SarDevice<E>,
    T: Tape<E, D>,
{
    let Some((embed, depths)) = dims(b) else {
        return shape_err(format!("MiT-B0 … B5 exist, not B{b}"));
    };
    if width == 0 || !(width * embed).is_multiple_of(64) {
        return shape_err(format!(
            "MiT-B{b} at width {width} would have a fractional width (E = {embed}·width/64)"
        ));
    }
    let rows = x.shape().0;
    if n == 0 || rows != n * h * w {
        return shape_err(format!("SegFormer: {rows} rows for {n}×{h}×{w} pixels"));
    }
    let embed = embed * width / 64;
    let mut drop = if f.train { drop } else { None };
    let rate = drop.as_ref().map_or(0.0, |d| d.rate);
    if !(0.0..1.0).contains(&rate) {
        return shape_err(format!(
            "the stochastic-depth rate must be in [0, 1), got {rate}"
        ));
    }
    let total: usize = depths.iter().sum();
    let mut k = 0usize;
    let mut stages: Vec<ConvOut<E, D, T>> = Vec::with_capacity(4);
    let (mut cur, mut hw) = (x, (h, w));
    for (i, &depth) in depths.iter().enumerate() {
        let s = format!("backbone.layers.{i}");
        let c = embed * HEADS[i];
        let (kernel, stride) = if i == 0 { (7, 4) } else { (3, 2) };
        let (t, o) = conv_bias(
            f,
            cur,
            &format!("{s}.0.projection"),
            (n, hw.0, hw.1),
            stride,
            kernel / 2,
        )?;
        if t.shape().1 != c {
            return shape_err(format!(
                "{s}.0.projection gives {} channels, MiT-B{b} at width {width} has {c}",
                t.shape().1
            ));
        }
        hw = o;
        let mut t = layer_norm(f.params, t, &format!("{s}.0.norm"), LN_EPS)?;
        for j in 0..depth {
            // torch.linspace(0, rate, K)[k], the candle network's expression.
            let p = if total > 1 {
                rate * k as f64 / (total - 1) as f64
            } else {
                0.0
            };
            let rng = drop.as_mut().map(|d| &mut *d.rng);
            let geometry = (n, hw.0, hw.1);
            t = block(f, t, &format!("{s}.1.{j}"), geometry, i, p, rng)?;
            k += 1;
        }
        let out = layer_norm(f.params, t, &format!("{s}.2"), LN_EPS)?;
        // The next stage starts from a copy with an empty tape (after the last stage an unused
        // one); the stage's own tape goes on through the head's `convs.{i}`, and the tapes
        // join at the concatenation.
        cur = out.retaped::<T>();
        stages.push((out, hw));
    }
    let (h0, w0) = stages
        .first()
        .map(|s| s.1)
        .ok_or_else(|| SarDfdxError::Shape("SegFormer without stages".into()))?;
    let d = head_channels(b, width);
    let mut cat: Option<Rows<D, T, E>> = None;
    for (i, (s, (sh, sw))) in stages.into_iter().enumerate() {
        let name = format!("decode_head.convs.{i}");
        let (y, _) = conv_bn(f, s, &name, (n, sh, sw), (0, 1))?;
        if y.shape().1 != d {
            return shape_err(format!(
                "{name} gives {} channels, the head has {d}",
                y.shape().1
            ));
        }
        let y = resize_bilinear(y, (n, sh, sw), (h0, w0))?;
        cat = Some(match cat {
            None => y,
            Some(c) => (c, y).concat_along(Axis::<1>),
        });
    }
    let cat = cat.ok_or_else(|| SarDfdxError::Shape("SegFormer without stages".into()))?;
    let (main, _) = conv_bn(f, cat, "decode_head.fusion_conv", (n, h0, w0), (0, 1))?;
    Ok((main, (h0, w0)))
}

/// Transformer block `name` (`backbone.layers.{i}.1.{j}`) of stage `stage` on tokens `x` of
/// `(n, h, w)`, its branches dropped with probability `p` when `rng` is given.
fn block<E, D, T>(
    f: &mut Forward<D, E>,
    x: Rows<D, T, E>,
    name: &str,
    size: (usize, usize, usize),
    stage: usize,
    p: f64,
    mut rng: Option<&mut SeededRng>,
) -> Result<Rows<D, T, E>>
where
    E: Float + num_traits::float::FloatCore,
    D: SarDevice<E>,
    T: Tape<E, D>,
{
    let n = size.0;
    let y = layer_norm(f.params, x.retaped::<T>(), &format!("{name}.norm1"), LN_EPS)?;
    let heads = (HEADS[stage], REDUCTION[stage]);
    let a = attention(f, y, &format!("{name}.attn"), size, heads)?;
    // The attention branch's masks first, then the FFN's (the candle network's order).
    let a = drop_path(a, n, p, rng.as_deref_mut())?;
    let x = x + a;
    let y = layer_norm(f.params, x.retaped::<T>(), &format!("{name}.norm2"), LN_EPS)?;
    let m = mix_ffn(f, y, &format!("{name}.ffn"), size)?;
    let m = drop_path(m, n, p, rng)?;
    Ok(x + m)
}

/// Efficient self-attention `name` (`….attn`) on normalised tokens `x` `[N·h·w, C]` with
/// `(heads, sr)` (see the module docs).
fn attention<E, D, T>(
    f: &mut Forward<D, E>,
    x: Rows<D, T, E>,
    name: &str,
    (n, h, w): (usize, usize, usize),
    (heads, sr): (usize, usize),
) -> Result<Rows<D, T, E>>
where
    E: Float + num_traits::float::FloatCore,
    D: SarDevice<E>,
    T: Tape<E, D>,
{
    let c = x.shape().1;
    if heads == 0 || !c.is_multiple_of(heads) {
        return shape_err(format!(
            "{name}: {c} channels do not split into {heads} heads"
        ));
    }
    let (d, l) = (c / heads, h * w);
    let (kv, lk) = if sr > 1 {
        let sr_name = format!("{name}.sr");
        let (y, (rh, rw)) = conv_bias(f, x.retaped::<T>(), &sr_name, (n, h, w), sr, 0)?;
        (
            layer_norm(f.params, y, &format!("{name}.norm"), LN_EPS)?,
            rh * rw,
        )
    } else {
        (x.retaped::<T>(), l)
    };
    let mha = format!("{name}.attn");
    // `x`'s own tape goes on with the queries; the keys' and values' copies join in the
    // matmuls below.
    let q = split_heads(project(f.params, x, &mha, 0)?, (n, l), heads);
    let k = split_heads(
        project(f.params, kv.retaped::<T>(), &mha, 1)?,
        (n, lk),
        heads,
    );
    let v = split_heads(project(f.params, kv, &mha, 2)?, (n, lk), heads);
    let scale: E = cast(1.0 / (d as f64).sqrt());
    // The softmax runs over the last axis of the matmul's contiguous output (dfdx's softmax
    // gives wrong gradients on a permuted view, see `seg::ocr`).
    let att = (q.matmul(k.permute::<_, Axes3<0, 2, 1>>()) * scale).softmax::<Axis<2>>();
    let out = att
        .matmul(v)
        .reshape_like(&(n, heads, l, d))
        .permute::<_, Axes4<0, 2, 1, 3>>()
        .reshape_like(&(n * l, c));
    linear(f.params, out, &format!("{mha}.out_proj"))
}

/// Part `part` (0 queries, 1 keys, 2 values) of `nn.MultiheadAttention`'s input projection
/// `{prefix}.in_proj_weight` `[3C, C]` / `in_proj_bias` `[3C]` applied to rows `[R, C]`: the
/// part's C rows of the weight and entries of the bias are gathered (the gather's backward
/// scatters their gradients back into the whole tensors).
fn project<E, D, T>(
    params: &Params<D, E>,
    x: Rows<D, T, E>,
    prefix: &str,
    part: usize,
) -> Result<Rows<D, T, E>>
where
    E: Float,
    D: SarDevice<E>,
    T: Tape<E, D>,
{
    let (r, c) = *x.shape();
    let (wname, bname) = (
        format!("{prefix}.in_proj_weight"),
        format!("{prefix}.in_proj_bias"),
    );
    if params.shape(&wname)? != [3 * c, c] || params.shape(&bname)? != [3 * c] {
        return shape_err(format!(
            "{prefix}: in_proj_weight {:?} and in_proj_bias {:?} do not fit {c} channels",
            params.shape(&wname)?,
            params.shape(&bname)?
        ));
    }
    let dev = x.device().clone();
    let idx: Vec<usize> = (part * c..(part + 1) * c).collect();
    let wt = params
        .taped::<T>(&wname)?
        .reshape_like(&(3 * c, c))
        .gather(dev.tensor_from_vec(idx.clone(), (c,)));
    let bias = params
        .taped::<T>(&bname)?
        .gather(dev.tensor_from_vec(idx, (c,)));
    Ok(x.matmul(wt.permute::<_, Axes2<1, 0>>()) + bias.broadcast_like::<_, Axis<0>>(&(r, c)))
}

/// Rows `[N·L, C]` → the heads `[N·H, L, C/H]` (a fresh contiguous layout).
fn split_heads<E, D, T>(
    x: Rows<D, T, E>,
    (n, l): (usize, usize),
    heads: usize,
) -> Tensor<(usize, usize, usize), E, D, T>
where
    E: Float,
    D: SarDevice<E>,
    T: Tape<E, D>,
{
    let d = x.shape().1 / heads;
    x.reshape_like(&(n, l, heads, d))
        .permute::<_, Axes4<0, 2, 1, 3>>()
        .reshape_like(&(n * heads, l, d))
}

/// Mix-FFN `name` (`….ffn`) on normalised tokens `x` of `(n, h, w)` (see the module docs).
fn mix_ffn<E, D, T>(
    f: &mut Forward<D, E>,
    x: Rows<D, T, E>,
    name: &str,
    size: (usize, usize, usize),
) -> Result<Rows<D, T, E>>
where
    E: Float + num_traits::float::FloatCore,
    D: SarDevice<E>,
    T: Tape<E, D>,
{
    let y = linear(f.params, x, &format!("{name}.layers.0"))?;
    let y = gelu(depthwise_conv(f, y, &format!("{name}.layers.1"), size)?);
    linear(f.params, y, &format!("{name}.layers.4"))
}

/// The depth-wise k×k conv (k odd, stride 1, padding k/2) with bias `{prefix}.weight`
/// `[C, 1, k, k]`, `{prefix}.bias` `[C]` over NHWC rows `[N·h·w, C]` of `(n, h, w)` pixels:
/// [`sar_dfdx::depthwise::DepthwiseKernel`] with the weight as `[k², C]`, plus the bias (see
/// the module docs).
pub fn depthwise_conv<E, D, T>(
    f: &mut Forward<D, E>,
    x: Rows<D, T, E>,
    prefix: &str,
    (n, h, w): (usize, usize, usize),
) -> Result<Rows<D, T, E>>
where
    E: Float,
    D: SarDevice<E>,
    T: Tape<E, D>,
{
    let (rows, c) = *x.shape();
    let (wname, bname) = (format!("{prefix}.weight"), format!("{prefix}.bias"));
    let k = match *f.params.shape(&wname)? {
        [wc, 1, k, k2] if wc == c && k == k2 && k % 2 == 1 => k,
        ref s => {
            return shape_err(format!(
                "{wname} {s:?} is no depth-wise conv over {c} channels ([C, 1, k, k], k odd)"
            ))
        }
    };
    if f.params.shape(&bname)? != [c] || rows != n * h * w {
        return shape_err(format!(
            "{prefix}: bias {:?} for {c} channels, {rows} rows for {n}×{h}×{w} pixels",
            f.params.shape(&bname)?
        ));
    }
    let taps = k * k;
    let geom = ConvGeometry::new(n, (h, w), k, 1, k / 2);
    // [C, 1, k, k] → [k², C], laid out afresh (row t holds tap t's weight of every channel).
    let wt = f
        .params
        .taped::<T>(&wname)?
        .reshape_like(&(c, taps))
        .permute::<_, Axes2<1, 0>>()
        .reshape_like(&(taps, c));
    let y = D::depthwise_rows(f.cache, x, wt, geom)?;
    let bias = f.params.taped::<T>(&bname)?;
    Ok(y + bias.broadcast_like::<_, Axis<0>>(&(rows, c)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use sar_dfdx::conv::{nchw_to_rows, GatherCache};

    fn normals(seed: u64, len: usize) -> Vec<f64> {
        let mut r = SeededRng::new(seed);
        (0..len).map(|_| r.next_normal()).collect()
    }

    /// The depth-wise conv against the formula by loops (forward, dx, dw, db) in f64, on a
    /// grid with odd sizes and a 5×5 kernel as well.
    #[test]
    fn depthwise_conv_matches_loops() {
        let dev = Cpu::default();
        for (n, c, h, w, k) in [(2usize, 3usize, 5usize, 4usize, 3usize), (1, 2, 3, 6, 5)] {
            let x = normals(1, n * h * w * c);
            let wt = normals(2, c * k * k);
            let bias = normals(3, c);
            let r = normals(4, n * h * w * c);
            let mut params = Params::from_host(
                &dev,
                [
                    ("dw.weight".to_string(), vec![c, 1, k, k], wt.clone()),
                    ("dw.bias".to_string(), vec![c], bias.clone()),
                ],
            )
            .unwrap();
            let xt: Rows<Cpu, NoneTape, f64> = dev.tensor_from_vec(x.clone(), (n * h * w, c));
            let traced = xt.clone().traced(params.alloc_grads().unwrap());
            let mut cache = GatherCache::default();
            let mut f = Forward {
                params: &mut params,
                cache: &mut cache,
                train: true,
            };
            let y = depthwise_conv(&mut f, traced, "dw", (n, h, w)).unwrap();
            let got = y.as_vec();
            let rt = dev.tensor_from_vec(r.clone(), (n * h * w, c));
            let grads = (y * rt).sum::<Rank0, _>().backward();
            let (gx, gw, gb) = (
                grads.get(&xt).as_vec(),
                params.gradient(&grads, "dw.weight").unwrap(),
                params.gradient(&grads, "dw.bias").unwrap(),
            );
            // Rows: (b, i, j) pixel-major, channel-minor.
            let at = |b: usize, i: usize, j: usize, ch: usize| ((b * h + i) * w + j) * c + ch;
            let p = (k / 2) as isize;
            let (mut want, mut wx) = (vec![0.0; x.len()], vec![0.0; x.len()]);
            let (mut ww, mut wb) = (vec![0.0; wt.len()], vec![0.0; c]);
            for b in 0..n {
                for i in 0..h {
                    for j in 0..w {
                        for ch in 0..c {
                            let o = at(b, i, j, ch);
                            want[o] = bias[ch];
                            wb[ch] += r[o];
                            for u in 0..k {
                                for v in 0..k {
                                    let si = i as isize + u as isize - p;
                                    let sj = j as isize + v as isize - p;
                                    if si < 0 || sj < 0 || si >= h as isize || sj >= w as isize {
                                        continue;
                                    }
                                    let s = at(b, si as usize, sj as usize, ch);
                                    let wi = (ch * k + u) * k + v;
                                    want[o] += wt[wi] * x[s];
                                    wx[s] += wt[wi] * r[o];
                                    ww[wi] += x[s] * r[o];
                                }
                            }
                        }
                    }
                }
            }
            for (what, g, e) in [
                ("y", &got, &want),
                ("dx", &gx, &wx),
                ("dw", &gw, &ww),
                ("db", &gb, &wb),
            ] {
                for (a, b) in g.iter().zip(e.iter()) {
                    assert!((a - b).abs() < 1e-12, "{what}: {a} vs {b}");
                }
            }
        }
    }

    /// Stochastic depth draws its masks as the candle network does: training-mode features of
    /// MiT-B0 (width 16) with rate 0.3 from the same weights and the same generator state
    /// agree in f64, the generators end in the same state, and the masks changed the output.
    #[test]
    fn drop_path_masks_match_candle() {
        use candle_core::{DType, Device, Tensor as CTensor};
        use sar_models::seg::{build_segmenter, SegBackbone, SegHeadKind, SegSpec};
        let (n, c, h, w) = (4, 3, 33, 29);
        let spec = SegSpec {
            backbone: SegBackbone::MitB0,
            head: SegHeadKind::Segformer,
            aux: false,
            width: 16,
            in_channels: c,
            classes: 5,
            seed: 11,
            drop_path: 0.3,
            window: None,
        };
        let varmap = candle_nn::VarMap::new();
        let model = build_segmenter(&spec, &varmap, &Device::Cpu, DType::F64).unwrap();
        let entries: Vec<_> = varmap
            .data()
            .lock()
            .unwrap()
            .iter()
            .map(|(name, v)| {
                let t = v.as_tensor();
                let vals: Vec<f64> = t.flatten_all().unwrap().to_vec1().unwrap();
                (name.clone(), t.dims().to_vec(), vals)
            })
            .collect();
        let dev = Cpu::default();
        let mut params = Params::from_host(&dev, entries).unwrap();
        let x = normals(5, n * c * h * w);
        let xt = CTensor::from_vec(x.clone(), (n, c, h, w), &Device::Cpu).unwrap();
        let mut rng_c = SeededRng::new(99);
        let want = model
            .features_with_noise(&xt, true, Some(&mut rng_c))
            .unwrap()
            .main;
        let (_, d, fh, fw) = want.dims4().unwrap();
        let want = nchw_to_rows(
            &want.flatten_all().unwrap().to_vec1::<f64>().unwrap(),
            n,
            d,
            fh,
            fw,
        );
        let mut cache = GatherCache::default();
        let mut run = |rng: Option<&mut SeededRng>| {
            let xr: Rows<Cpu, NoneTape, f64> =
                dev.tensor_from_vec(nchw_to_rows(&x, n, c, h, w), (n * h * w, c));
            let mut f = Forward {
                params: &mut params,
                cache: &mut cache,
                train: true,
            };
            let drop = rng.map(|rng| DropPath { rate: 0.3, rng });
            let (y, hw) = segformer(&mut f, xr, (n, h, w), 0, 16, drop).unwrap();
            assert_eq!(hw, (fh, fw));
            y.as_vec()
        };
        let mut rng_d = SeededRng::new(99);
        let got = run(Some(&mut rng_d));
        let scale = 1.0 + want.iter().fold(0.0f64, |m, v| m.max(v.abs()));
        for (i, (a, b)) in got.iter().zip(&want).enumerate() {
            assert!((a - b).abs() <= 1e-10 * scale, "features[{i}]: {a} vs {b}");
        }
        assert_eq!(rng_d.next_f64(), rng_c.next_f64(), "generator states");
        let plain = run(None);
        assert!(
            plain.iter().zip(&got).any(|(a, b)| (a - b).abs() > 1e-6),
            "no branch was dropped"
        );
    }
}
