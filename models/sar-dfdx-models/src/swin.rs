//! UPerNet on a Swin Transformer (Swin-T/S/B/L) on dfdx, under `sar-models`' candle names
//! (`backbone.*`, `decode_head.*`, `auxiliary_head.*`): the same network as `sar-models`'
//! `seg::swin` + `seg::uper`, the same parameters and the same order of random draws.
//!
//! Activations are NHWC rows `[N·h·w, C]`, which are also the token sequences `[N, L, C]`
//! (L = h·w) flattened: the transformer blocks, the convs and BatchNorms all read the same
//! rows. Every rearrangement (padding, windows, the cyclic shift, heads, the patch unfold) is
//! one row gather by an index built on the host from the sizes (padding rows read an appended
//! zero row), so its backward is dfdx's scatter-add and it runs on every dfdx device.
//!
//! # Backbone (`backbone`)
//!
//! - `patch_embed`: the image padded at the bottom and right to a multiple of 4 (mmcv's
//!   "corner" padding; a gather), a 4×4 conv with stride 4 and bias (`projection`) to tokens
//!   `[N·H/4·W/4, E]`, LayerNorm `norm`.
//! - `stages.{i}`, i < 4, at width C_i = E·2ⁱ with `heads_i` heads, on an h × w grid:
//!   `blocks.{j}`, j < depth_i, each x ← x + DropPath(W-MSA(LN₁(x))),
//!   x ← x + DropPath(FFN(LN₂(x))):
//!   - window partition: the normed tokens padded with zeros at the bottom and right to
//!     Hp × Wp (multiples of the window M), in odd blocks cyclically shifted by −s = −⌊M/2⌋ on
//!     both axes (`torch.roll`: shifted\[y\] = padded\[(y + s) mod Hp\]), cut into the
//!     nW = (Hp/M)·(Wp/M) windows of L = M² tokens: window rows `[N·nW·L, C]`, window
//!     b = n·nW + wy·(Wp/M) + wx, token t = ty·M + tx. One gather.
//!   - attention (`attn.w_msa`): `qkv` linear C → 3C, whose columns are (j, head, d) for
//!     q, k, v (j = 0, 1, 2) and heads of width d = C/heads; q, k, v each gathered to
//!     `[N·nW·heads, L, d]`; S = (q·d^-½)·kᵀ + B + mask, softmax over the last axis
//!     (directly on the contiguous sum: see below), A·v gathered back to `[N·nW·L, C]`
//!     (channel head·d + e), `proj` C → C. B `[heads, L, L]` is the relative position bias:
//!     `relative_position_bias_table` `[(2M − 1)², heads]` gathered at
//!     (Δy + M − 1)·(2M − 1) + (Δx + M − 1) for the tokens' offsets Δ, per head, broadcast
//!     over the windows. The mask (shifted blocks only, a constant `[nW, heads, L, L]`
//!     broadcast over the images) is −100 between tokens of different regions of the shifted
//!     grid (rows and columns split at Hp − M and Hp − s); padded tokens are not masked
//!     (mmsegmentation's behaviour).
//!   - window reverse: one gather from the window rows back to the h × w grid, undoing the
//!     shift and cropping the padding.
//!   - FFN (`ffn.layers`): linear C → 4C (`0.0`), exact GELU, linear 4C → C (`1`).
//!
//!   After stages 0–2, `downsample` (mmcv's `PatchMerging`): the grid padded to even size,
//!   each 2 × 2 patch unfolded into 4C channels in `nn.Unfold`'s order, channel
//!   c·4 + 2·ky + kx (a gather to `[R, 4, C]`, then the transposition to `[R, C, 4]`),
//!   LayerNorm `norm` (4C), `reduction` linear 4C → 2C without bias.
//! - Stage outputs S_i: the stage's tokens (before `downsample`) normed by `norm{i}`, on grids
//!   at strides 4, 8, 16, 32.
//!
//! Every LayerNorm has ε = 1e-5. Stochastic depth (training, [`DropPath`]): block k of all K
//! blocks drops each residual branch per image with probability rate·k/(K − 1), its masks
//! drawn attention branch first, block by block, as candle draws them.
//!
//! | variant | E | depths | heads |
//! |---|---|---|---|
//! | T | 96 | 2, 2, 6, 2 | 3, 6, 12, 24 |
//! | S | 96 | 2, 2, 18, 2 | 3, 6, 12, 24 |
//! | B | 128 | 2, 2, 18, 2 | 4, 8, 16, 32 |
//! | L | 192 | 2, 2, 18, 2 | 6, 12, 24, 48 |
//!
//! `width` scales E by width/64 (64: the published networks), and the head's widths with it.
//!
//! # UPerNet head (`decode_head`, D = [`UPER_CHANNELS`]·width/64)
//!
//! - Pyramid pooling on S₃ (h₃ × w₃, scales s = 1, 2, 3, 6): PyTorch's adaptive average
//!   pooling (bin i of n inputs spans ⌊i·n/s⌋ … ⌈(i+1)·n/s⌉ − 1) as a batched product with a
//!   constant `[N, s², h₃·w₃]` matrix of averaging weights, a 1×1 ConvModule
//!   `psp_modules.{k}.1`, resized bilinearly back to h₃ × w₃; [S₃, the four pooled maps]
//!   concatenated and fused by the 3×3 ConvModule `bottleneck` into P₃.
//! - Laterals `lateral_convs.{i}` (1×1, i < 3) give P_i from S_i; top-down
//!   P_{i−1} ← P_{i−1} + resize(P_i) for i = 3, 2, 1; `fpn_convs.{i}` (3×3, i < 3) on
//!   P₀…P₂ (P₃ as it is); all resized to S₀'s grid, concatenated in level order and fused by
//!   `fpn_bottleneck` (3×3, 4D → D) into F `[N·h₀·w₀, D]`.
//! - Auxiliary head (training, `auxiliary_head`): the 3×3 ConvModule `convs.0` on S₂ →
//!   [`UPER_AUX_CHANNELS`]·width/64.
//!
//! A ConvModule is conv (no bias) → BatchNorm → ReLU (`seg::conv_bn`). The classifiers
//! (`decode_head.conv_seg`, `auxiliary_head.conv_seg`) are the caller's.
//!
//! # dfdx notes
//!
//! A tensor used twice is used once through a copy with an empty tape (`retaped`), and every
//! copy's ops reach the output's tape through the other uses (dfdx sorts the merged
//! operations by creation, so the order of merging does not matter). dfdx 0.13's softmax
//! gives wrong gradients on a permuted (non-contiguous) input, so it only ever sees the
//! contiguous output of an addition.

use crate::seg::{conv_bn, resize_bilinear, DropPath, SegOut, SwinVariant};
use crate::transformer::{conv_bias, drop_path, gelu, layer_norm};
use crate::{cast, Forward};
use sar_dfdx::dfdx::prelude::*;
use sar_dfdx::nn::{linear, Params, Rows};
use sar_dfdx::{Float, Result, SarDevice, SarDfdxError};
use sar_math::rng::SeededRng;

/// UPerNet's decode-head width D at width 64 (scaled by width/64).
pub const UPER_CHANNELS: usize = 512;
/// The auxiliary FCN head's width at width 64 (scaled by width/64).
pub const UPER_AUX_CHANNELS: usize = 256;

const LN_EPS: f64 = 1e-5;
const PATCH: usize = 4;
const MLP_RATIO: usize = 4;
/// mmsegmentation's `masked_fill` value between tokens of different shifted regions.
const MASKED: f64 = -100.0;
const POOL_SCALES: [usize; 4] = [1, 2, 3, 6];

fn shape_err<X>(msg: String) -> Result<X> {
    Err(SarDfdxError::Shape(msg))
}

/// (E, depths, heads) of the published variant (see the module docs).
fn dims(variant: SwinVariant) -> (usize, [usize; 4], [usize; 4]) {
    match variant {
        SwinVariant::Tiny => (96, [2, 2, 6, 2], [3, 6, 12, 24]),
        SwinVariant::Small => (96, [2, 2, 18, 2], [3, 6, 12, 24]),
        SwinVariant::Base => (128, [2, 2, 18, 2], [4, 8, 16, 32]),
        SwinVariant::Large => (192, [2, 2, 18, 2], [6, 12, 24, 48]),
    }
}

/// UPerNet on Swin `variant` with window M = `window` at `width` (E scaled by width/64), with
/// the auxiliary head when `aux`, over NHWC rows of `(n, h, w)` images: the decode head's
/// features F `[N·h₄·w₄, D]` at the stage-0 grid (stride 4, [`SegOut::hw`]) and, in training
/// mode with `aux`, the auxiliary head's features on stage 2's grid (stride 16,
/// [`SegOut::aux_hw`]). `drop` (training only) is the stochastic depth.
pub fn upernet<E, D, T>(
    f: &mut Forward<D, E>,
    x: Rows<D, T, E>,
    size: (usize, usize, usize),
    (variant, window, width, aux): (SwinVariant, usize, usize, bool),
    drop: Option<DropPath<'_>>,
) -> Result<SegOut<E, D, T>>
where
    E: Float + num_traits::float::FloatCore,
    D: SarDevice<E>,
    T: Tape<E, D>,
{
    let (embed, depths, heads) = dims(variant);
    if !(width * embed).is_multiple_of(64) || !(width * UPER_AUX_CHANNELS).is_multiple_of(64) {
        return shape_err(format!(
            "Swin-{variant:?} at width {width} would have a fractional width (E = {embed}·width/64)"
        ));
    }
    if window < 2 {
        return shape_err(format!(
            "the Swin window size must be at least 2, got {window}"
        ));
    }
    let embed = embed * width / 64;
    for (i, &h) in heads.iter().enumerate() {
        if embed << i == 0 || !(embed << i).is_multiple_of(h) {
            return shape_err(format!(
                "Swin stage {i}: width {} is not a positive multiple of its {h} heads",
                embed << i
            ));
        }
    }
    let mut drop = drop.filter(|_| f.train);
    if let Some(d) = &drop {
        if !(0.0..1.0).contains(&d.rate) {
            return shape_err(format!(
                "the stochastic-depth rate must be in [0, 1), got {}",
                d.rate
            ));
        }
    }
    let n = size.0;
    let (stages, sizes) = swin(f, x, size, (depths, heads, window), &mut drop)?;
    // The auxiliary head reads a copy of S₂; S₂'s own tape goes on through its lateral.
    let aux_out = if f.train && aux {
        let (h2, w2) = sizes[2];
        let name = "auxiliary_head.convs.0";
        Some(conv_bn(f, stages[2].retaped::<T>(), name, (n, h2, w2), (1, 1))?.0)
    } else {
        None
    };
    let main = uper_head(f, stages, &sizes, n)?;
    Ok(SegOut {
        main,
        aux: aux_out,
        hw: sizes[0],
        aux_hw: sizes[2],
    })
}

/// The four normed stage outputs and their grids.
type Stages<E, D, T> = ([Rows<D, T, E>; 4], [(usize, usize); 4]);

/// The Swin backbone (see the module docs): the four stage outputs S_i and their grids.
fn swin<E, D, T>(
    f: &mut Forward<D, E>,
    x: Rows<D, T, E>,
    (n, h, w): (usize, usize, usize),
    (depths, heads, m): ([usize; 4], [usize; 4], usize),
    drop: &mut Option<DropPath<'_>>,
) -> Result<Stages<E, D, T>>
where
    E: Float + num_traits::float::FloatCore,
    D: SarDevice<E>,
    T: Tape<E, D>,
{
    if n == 0 || h == 0 || w == 0 || x.shape().0 != n * h * w {
        return shape_err(format!(
            "Swin: {} rows for {n} images of {h}×{w}",
            x.shape().0
        ));
    }
    let dev = x.device().clone();
    // mmcv's "corner" padding: zeros at the bottom and right only, which a conv's symmetric
    // padding cannot express.
    let (hp, wp) = (h.div_ceil(PATCH) * PATCH, w.div_ceil(PATCH) * PATCH);
    let x = if (hp, wp) == (h, w) {
        x
    } else {
        let idx = dev.tensor_from_vec(corner_pad_rows(n, (h, w), (hp, wp)), (n * hp * wp,));
        let padded: Rows<D, T, E> = with_zero_row(x).gather(idx);
        padded
    };
    let (t, (mut gh, mut gw)) = conv_bias(
        f,
        x,
        "backbone.patch_embed.projection",
        (n, hp, wp),
        PATCH,
        0,
    )?;
    let mut t = layer_norm(f.params, t, "backbone.patch_embed.norm", LN_EPS)?;
    let total: usize = depths.iter().sum();
    let mut k = 0usize;
    let mut outs: Vec<Rows<D, T, E>> = Vec::with_capacity(4);
    let mut sizes = [(0, 0); 4];
    for i in 0..4 {
        let c = t.shape().1;
        let geo = Windows::new(&dev, (n, gh, gw), m, heads[i], c)?;
        for j in 0..depths[i] {
            let rate = match drop {
                Some(d) if total > 1 => d.rate * k as f64 / (total - 1) as f64,
                _ => 0.0,
            };
            let noise = drop.as_mut().map(|d| &mut *d.rng);
            let name = format!("backbone.stages.{i}.blocks.{j}");
            t = block(f, t, &name, &geo, j % 2 == 1, (rate, noise))?;
            k += 1;
        }
        sizes[i] = (gh, gw);
        let norm = format!("backbone.norm{i}");
        if i == 3 {
            // The last stage's output carries the backbone's tape on.
            outs.push(layer_norm(f.params, t, &norm, LN_EPS)?);
            break;
        }
        outs.push(layer_norm(f.params, t.retaped::<T>(), &norm, LN_EPS)?);
        t = patch_merging(
            f,
            t,
            (n, gh, gw),
            &format!("backbone.stages.{i}.downsample"),
        )?;
        (gh, gw) = (gh.div_ceil(2), gw.div_ceil(2));
    }
    let outs: [Rows<D, T, E>; 4] = outs
        .try_into()
        .map_err(|_| SarDfdxError::Shape("Swin: not four stages".into()))?;
    Ok((outs, sizes))
}

/// `x` with one zero row appended, the target of the padding rows of a gather index.
fn with_zero_row<E: Float, D: SarDevice<E>, T: Tape<E, D>>(x: Rows<D, T, E>) -> Rows<D, T, E> {
    let c = x.shape().1;
    let zero: Rows<D, NoneTape, E> = x.device().zeros_like(&(1, c));
    (x, zero).concat_along(Axis::<0>)
}

/// The rows of `n` `h × w` images padded at the bottom and right to `hp × wp`: indices into
/// the rows with a zero row appended (index n·h·w).
fn corner_pad_rows(n: usize, (h, w): (usize, usize), (hp, wp): (usize, usize)) -> Vec<usize> {
    let zero = n * h * w;
    let mut idx = Vec::with_capacity(n * hp * wp);
    for b in 0..n {
        for y in 0..hp {
            for x in 0..wp {
                idx.push(if y < h && x < w {
                    (b * h + y) * w + x
                } else {
                    zero
                });
            }
        }
    }
    idx
}

/// The constant gathers and the mask of one stage's window attention (see the module docs),
/// for `n` images on an `h × w` grid, window `m`, `heads` heads of width `c / heads`.
struct Windows<E: Float, D: SarDevice<E>> {
    n: usize,
    /// Windows per image nW, tokens per window L = M².
    nw: usize,
    l: usize,
    heads: usize,
    c: usize,
    m: usize,
    /// Token rows (plus the zero row) → window rows `[N·nW·L]`: unshifted, shifted.
    part: [Tensor<(usize,), usize, D>; 2],
    /// Window rows → token rows `[N·h·w]` (the shift undone, the padding cropped).
    unpart: [Tensor<(usize,), usize, D>; 2],
    /// Rows of the `qkv` output viewed as `[N·nW·L·3·heads, d]` → q, k, v `[N·nW·heads·L, d]`.
    qkv: [Tensor<(usize,), usize, D>; 3],
    /// Rows of A·v `[N·nW·heads·L, d]` → `[N·nW·L·heads, d]` (= `[N·nW·L, C]`).
    merge: Tensor<(usize,), usize, D>,
    /// The flat bias table `[(2M − 1)²·heads]` → B `[heads·L·L]`.
    bias: Tensor<(usize,), usize, D>,
    /// The shifted blocks' mask `[nW·heads·L·L]`.
    mask: Tensor<(usize,), E, D>,
}

impl<E: Float, D: SarDevice<E>> Windows<E, D> {
    fn new(
        dev: &D,
        (n, h, w): (usize, usize, usize),
        m: usize,
        heads: usize,
        c: usize,
    ) -> Result<Self> {
        if heads == 0 || !c.is_multiple_of(heads) {
            return shape_err(format!("window attention: {c} channels in {heads} heads"));
        }
        let (hp, wp) = (h.div_ceil(m) * m, w.div_ceil(m) * m);
        let (nw, l) = ((hp / m) * (wp / m), m * m);
        let b = n * nw;
        let shift = m / 2;
        let idx = |v: Vec<usize>| {
            let len = v.len();
            dev.tensor_from_vec(v, (len,))
        };
        let mask: Vec<E> = shift_mask(hp, wp, m, shift)
            .chunks(l * l)
            .flat_map(|win| (0..heads).flat_map(move |_| win.iter().map(|&v| cast::<E>(v))))
            .collect();
        let mask_len = mask.len();
        Ok(Windows {
            n,
            nw,
            l,
            heads,
            c,
            m,
            part: [
                idx(window_rows(n, (h, w), m, 0)),
                idx(window_rows(n, (h, w), m, shift)),
            ],
            unpart: [
                idx(token_rows(n, (h, w), m, 0)),
                idx(token_rows(n, (h, w), m, shift)),
            ],
            qkv: [0, 1, 2].map(|j| idx(head_rows(b, l, heads, j))),
            merge: idx(merge_rows(b, l, heads)),
            bias: idx(bias_rows(m, heads)),
            mask: dev.tensor_from_vec(mask, (mask_len,)),
        })
    }
}

/// Window rows `[N·nW·L]` (window b = n·nW + wy·(Wp/M) + wx, token ty·M + tx) of the grid padded
/// to Hp × Wp and rolled by −`shift`: indices into the `n·h·w` token rows with a zero row
/// appended (index n·h·w) for the padding.
fn window_rows(n: usize, (h, w): (usize, usize), m: usize, shift: usize) -> Vec<usize> {
    let (hp, wp) = (h.div_ceil(m) * m, w.div_ceil(m) * m);
    let zero = n * h * w;
    let mut idx = Vec::with_capacity(n * hp * wp);
    for b in 0..n {
        for wy in 0..hp / m {
            for wx in 0..wp / m {
                for ty in 0..m {
                    for tx in 0..m {
                        // torch.roll by −shift: shifted[y] = padded[(y + shift) mod Hp].
                        let y = (wy * m + ty + shift) % hp;
                        let x = (wx * m + tx + shift) % wp;
                        idx.push(if y < h && x < w {
                            (b * h + y) * w + x
                        } else {
                            zero
                        });
                    }
                }
            }
        }
    }
    idx
}

/// The inverse of [`window_rows`] on the real tokens: for each of the `n·h·w` token rows, its
/// window row (the roll by +`shift` and the crop).
fn token_rows(n: usize, (h, w): (usize, usize), m: usize, shift: usize) -> Vec<usize> {
    let (hp, wp) = (h.div_ceil(m) * m, w.div_ceil(m) * m);
    let (nh, nw) = (hp / m, wp / m);
    let mut idx = Vec::with_capacity(n * h * w);
    for b in 0..n {
        for y in 0..h {
            for x in 0..w {
                let (py, px) = ((y + hp - shift) % hp, (x + wp - shift) % wp);
                let window = (b * nh + py / m) * nw + px / m;
                idx.push(window * m * m + (py % m) * m + px % m);
            }
        }
    }
    idx
}

/// q (j = 0), k (1) or v (2) of `b` windows of `l` tokens: rows `[b·heads·l]` (window, head,
/// token) of the `qkv` output viewed as `[b·l·3·heads, d]` (token, j, head).
fn head_rows(b: usize, l: usize, heads: usize, j: usize) -> Vec<usize> {
    let mut idx = Vec::with_capacity(b * heads * l);
    for bb in 0..b {
        for hh in 0..heads {
            for t in 0..l {
                idx.push(((bb * l + t) * 3 + j) * heads + hh);
            }
        }
    }
    idx
}

/// Heads back to tokens: rows `[b·l·heads]` (window, token, head) of `[b·heads·l, d]`.
fn merge_rows(b: usize, l: usize, heads: usize) -> Vec<usize> {
    let mut idx = Vec::with_capacity(b * l * heads);
    for bb in 0..b {
        for t in 0..l {
            for hh in 0..heads {
                idx.push((bb * heads + hh) * l + t);
            }
        }
    }
    idx
}

/// The relative-position index of an M × M window, `[M², M²]` row-major
/// ([`sar_math::windows::relative_position`]: (Δy + M − 1)·(2M − 1) + (Δx + M − 1)).
fn relative_position_index(m: usize) -> Vec<usize> {
    let l = m * m;
    (0..l * l)
        .map(|k| sar_math::windows::relative_position(m, k / l, k % l))
        .collect()
}

/// B `[heads, L, L]` from the flat table `[(2M − 1)², heads]`: entry (h, i, j) reads
/// table[index(i, j), h].
fn bias_rows(m: usize, heads: usize) -> Vec<usize> {
    let index = relative_position_index(m);
    (0..heads)
        .flat_map(|hh| index.iter().map(move |&r| r * heads + hh))
        .collect()
}

/// The shifted-window mask `[nW, M², M²]` (0 or −100) of a padded `hp × wp` grid, as candle's
/// ([`sar_math::windows::shift_region`]: regions split at size − M and size − shift).
fn shift_mask(hp: usize, wp: usize, m: usize, shift: usize) -> Vec<f64> {
    let region = |v: usize, size: usize| sar_math::windows::shift_region(v, size, m, shift);
    let (nh, nw, l) = (hp / m, wp / m, m * m);
    let mut mask = Vec::with_capacity(nh * nw * l * l);
    for wy in 0..nh {
        for wx in 0..nw {
            let ids: Vec<usize> = (0..l)
                .map(|t| {
                    let (y, x) = (wy * m + t / m, wx * m + t % m);
                    region(y, hp) * 3 + region(x, wp)
                })
                .collect();
            for &a in &ids {
                for &b in &ids {
                    mask.push(if a == b { 0.0 } else { MASKED });
                }
            }
        }
    }
    mask
}

/// Checks that `name` has shape `want`.
fn expect_shape<E: Float, D: SarDevice<E>>(
    params: &Params<D, E>,
    name: &str,
    want: &[usize],
) -> Result<()> {
    let got = params.shape(name)?;
    if got != want {
        return shape_err(format!("{name} is {got:?}, the network needs {want:?}"));
    }
    Ok(())
}

/// `a + b` with their shapes checked (dfdx panics on a mismatch).
fn add<E: Float, D: SarDevice<E>, T: Tape<E, D>>(
    a: Rows<D, T, E>,
    b: Rows<D, T, E>,
    what: &str,
) -> Result<Rows<D, T, E>> {
    if a.shape() != b.shape() {
        return shape_err(format!(
            "{what}: adding {:?} and {:?}",
            a.shape(),
            b.shape()
        ));
    }
    Ok(a + b)
}

/// One Swin block `name` on tokens `x` (see the module docs); `shifted` for odd blocks;
/// stochastic depth at `rate` with masks from `noise`.
fn block<E, D, T>(
    f: &mut Forward<D, E>,
    x: Rows<D, T, E>,
    name: &str,
    g: &Windows<E, D>,
    shifted: bool,
    (rate, mut noise): (f64, Option<&mut SeededRng>),
) -> Result<Rows<D, T, E>>
where
    E: Float + num_traits::float::FloatCore,
    D: SarDevice<E>,
    T: Tape<E, D>,
{
    let c = g.c;
    let y = layer_norm(f.params, x.retaped::<T>(), &format!("{name}.norm1"), LN_EPS)?;
    let y = attention(f.params, y, &format!("{name}.attn.w_msa"), g, shifted)?;
    let y = drop_path(y, g.n, rate, noise.as_deref_mut())?;
    let x = add(x, y, name)?;
    let ffn = format!("{name}.ffn.layers");
    expect_shape(f.params, &format!("{ffn}.0.0.weight"), &[MLP_RATIO * c, c])?;
    expect_shape(f.params, &format!("{ffn}.1.weight"), &[c, MLP_RATIO * c])?;
    let y = layer_norm(f.params, x.retaped::<T>(), &format!("{name}.norm2"), LN_EPS)?;
    let y = linear(f.params, y, &format!("{ffn}.0.0"))?;
    let y = linear(f.params, gelu(y), &format!("{ffn}.1"))?;
    let y = drop_path(y, g.n, rate, noise)?;
    add(x, y, name)
}

/// Window attention `name` (`attn.w_msa`) of normed tokens `y` `[N·h·w, C]`, windows taken and
/// put back (see the module docs).
fn attention<E, D, T>(
    params: &Params<D, E>,
    y: Rows<D, T, E>,
    name: &str,
    g: &Windows<E, D>,
    shifted: bool,
) -> Result<Rows<D, T, E>>
where
    E: Float + num_traits::float::FloatCore,
    D: SarDevice<E>,
    T: Tape<E, D>,
{
    let (c, heads, l) = (g.c, g.heads, g.l);
    let (b, d) = (g.n * g.nw, c / heads);
    let s = usize::from(shifted);
    let table = format!("{name}.relative_position_bias_table");
    let span = 2 * g.m - 1;
    expect_shape(params, &table, &[span * span, heads])?;
    expect_shape(params, &format!("{name}.qkv.weight"), &[3 * c, c])?;
    expect_shape(params, &format!("{name}.proj.weight"), &[c, c])?;
    let windows: Rows<D, T, E> = with_zero_row(y).gather(g.part[s].clone());
    let qkv =
        linear(params, windows, &format!("{name}.qkv"))?.reshape_like(&(b * l * 3 * heads, d));
    let bh = b * heads;
    let take = |t: Rows<D, T, E>, j: usize| -> Tensor<(usize, usize, usize), E, D, T> {
        let rows: Rows<D, T, E> = t.gather(g.qkv[j].clone());
        rows.reshape_like(&(bh, l, d))
    };
    let q = take(qkv.retaped::<T>(), 0) * cast::<E>((d as f64).powf(-0.5));
    let k = take(qkv.retaped::<T>(), 1);
    let v = take(qkv, 2);
    let scores = q.matmul(k.permute::<_, Axes3<0, 2, 1>>());
    let bias: Tensor<(usize,), E, D, T> = params.taped::<T>(&table)?.gather(g.bias.clone());
    let bias = bias.broadcast_like::<_, Axis<0>>(&(b, heads * l * l));
    let mut scores = scores.reshape_like(&(b, heads * l * l)) + bias;
    if shifted {
        let per = g.nw * heads * l * l;
        scores = (scores.reshape_like(&(g.n, per))
            + g.mask.clone().broadcast_like::<_, Axis<0>>(&(g.n, per)))
        .reshape_like(&(b, heads * l * l));
    }
    // Softmax straight on the sum's contiguous output (never on a permuted view).
    let att = scores.reshape_like(&(bh, l, l)).softmax::<Axis<2>>();
    let heads_out: Rows<D, T, E> = att
        .matmul(v)
        .reshape_like(&(bh * l, d))
        .gather(g.merge.clone());
    let out = heads_out.reshape_like(&(b * l, c));
    let out = linear(params, out, &format!("{name}.proj"))?;
    Ok(out.gather(g.unpart[s].clone()))
}

/// mmcv's `PatchMerging` `name` on tokens of an `h × w` grid (see the module docs): tokens of
/// the ⌈h/2⌉ × ⌈w/2⌉ grid with 2C channels.
fn patch_merging<E, D, T>(
    f: &mut Forward<D, E>,
    x: Rows<D, T, E>,
    (n, h, w): (usize, usize, usize),
    name: &str,
) -> Result<Rows<D, T, E>>
where
    E: Float + num_traits::float::FloatCore,
    D: SarDevice<E>,
    T: Tape<E, D>,
{
    let c = x.shape().1;
    let (h2, w2) = (h.div_ceil(2), w.div_ceil(2));
    let r = n * h2 * w2;
    let dev = x.device().clone();
    let idx = dev.tensor_from_vec(unfold_rows(n, (h, w)), (4 * r,));
    // [R·4, C] (pixel, tap) → [R, C, 4]: nn.Unfold's channel c·4 + tap.
    let taps: Rows<D, T, E> = with_zero_row(x).gather(idx);
    let unfolded = taps
        .reshape_like(&(r, 4, c))
        .permute::<_, Axes3<0, 2, 1>>()
        .reshape_like(&(r, 4 * c));
    let y = layer_norm(f.params, unfolded, &format!("{name}.norm"), LN_EPS)?;
    linear(f.params, y, &format!("{name}.reduction"))
}

/// The 2 × 2 patches of `n` `h × w` grids padded to even size: rows `[N·⌈h/2⌉·⌈w/2⌉·4]`
/// (patch, tap 2·ky + kx) into the token rows with a zero row appended (index n·h·w).
fn unfold_rows(n: usize, (h, w): (usize, usize)) -> Vec<usize> {
    let (h2, w2) = (h.div_ceil(2), w.div_ceil(2));
    let zero = n * h * w;
    let mut idx = Vec::with_capacity(n * h2 * w2 * 4);
    for b in 0..n {
        for y2 in 0..h2 {
            for x2 in 0..w2 {
                for (ky, kx) in [(0, 0), (0, 1), (1, 0), (1, 1)] {
                    let (y, x) = (2 * y2 + ky, 2 * x2 + kx);
                    idx.push(if y < h && x < w {
                        (b * h + y) * w + x
                    } else {
                        zero
                    });
                }
            }
        }
    }
    idx
}

/// The `[s, n]` matrix of PyTorch's adaptive average pooling of n inputs to s outputs
/// ([`sar_math::windows::adaptive_pool_bin`]).
fn adaptive_pool_matrix(n: usize, s: usize) -> Vec<f64> {
    let mut m = vec![0.0f64; s * n];
    for i in 0..s {
        let (start, end) = sar_math::windows::adaptive_pool_bin(n, s, i);
        let weight = 1.0 / (end - start) as f64;
        for j in start..end {
            m[i * n + j] = weight;
        }
    }
    m
}

/// Adaptive average pooling of an `h × w` grid to `s × s` as one `[s², h·w]` matrix:
/// entry ((i, j), (y, x)) = P_h[i, y]·P_w[j, x].
fn pool_matrix(h: usize, w: usize, s: usize) -> Vec<f64> {
    let (ph, pw) = (adaptive_pool_matrix(h, s), adaptive_pool_matrix(w, s));
    let mut m = Vec::with_capacity(s * s * h * w);
    for i in 0..s {
        for j in 0..s {
            for y in 0..h {
                for x in 0..w {
                    m.push(ph[i * h + y] * pw[j * w + x]);
                }
            }
        }
    }
    m
}

/// UPerNet's decode head on the stage outputs of `n` images (see the module docs): F.
fn uper_head<E, D, T>(
    f: &mut Forward<D, E>,
    [s0, s1, s2, s3]: [Rows<D, T, E>; 4],
    sizes: &[(usize, usize); 4],
    n: usize,
) -> Result<Rows<D, T, E>>
where
    E: Float + num_traits::float::FloatCore,
    D: SarDevice<E>,
    T: Tape<E, D>,
{
    let head = "decode_head";
    let (h3, w3) = sizes[3];
    let c3 = s3.shape().1;
    let dev = s3.device().clone();
    // Pyramid pooling: per image, [s², h₃·w₃] · [h₃·w₃, C] (the matrix repeated per image).
    let mut pyramid = Vec::with_capacity(POOL_SCALES.len());
    for (k, &s) in POOL_SCALES.iter().enumerate() {
        let one = pool_matrix(h3, w3, s);
        let all: Vec<E> = (0..n)
            .flat_map(|_| one.iter().map(|&v| cast::<E>(v)))
            .collect();
        let p: Tensor<(usize, usize, usize), E, D> = dev.tensor_from_vec(all, (n, s * s, h3 * w3));
        let pooled = p
            .retaped::<T>()
            .matmul(s3.retaped::<T>().reshape_like(&(n, h3 * w3, c3)))
            .reshape_like(&(n * s * s, c3));
        let name = format!("{head}.psp_modules.{k}.1");
        let (y, _) = conv_bn(f, pooled, &name, (n, s, s), (0, 1))?;
        pyramid.push(resize_bilinear(y, (n, s, s), (h3, w3))?);
    }
    let mut cat = s3;
    for p in pyramid {
        cat = (cat, p).concat_along(Axis::<1>);
    }
    let (top, _) = conv_bn(f, cat, &format!("{head}.bottleneck"), (n, h3, w3), (1, 1))?;
    let mut levels = Vec::with_capacity(4);
    for (i, s) in [s0, s1, s2].into_iter().enumerate() {
        let (h, w) = sizes[i];
        let name = format!("{head}.lateral_convs.{i}");
        levels.push(conv_bn(f, s, &name, (n, h, w), (0, 1))?.0);
    }
    levels.push(top);
    // Top-down: each level's copy feeds the next finer one; the level itself goes on.
    for i in (1..4).rev() {
        let ((h, w), (hf, wf)) = (sizes[i], sizes[i - 1]);
        let up = resize_bilinear(levels[i].retaped::<T>(), (n, h, w), (hf, wf))?;
        let fine = levels.remove(i - 1);
        levels.insert(i - 1, add(fine, up, "UPerNet top-down")?);
    }
    let (h0, w0) = sizes[0];
    let mut cat: Option<Rows<D, T, E>> = None;
    for (i, level) in levels.into_iter().enumerate() {
        let (h, w) = sizes[i];
        let y = if i < 3 {
            let name = format!("{head}.fpn_convs.{i}");
            conv_bn(f, level, &name, (n, h, w), (1, 1))?.0
        } else {
            level
        };
        let y = resize_bilinear(y, (n, h, w), (h0, w0))?;
        cat = Some(match cat {
            None => y,
            Some(c) => (c, y).concat_along(Axis::<1>),
        });
    }
    let cat = cat.ok_or_else(|| SarDfdxError::Shape("UPerNet without levels".into()))?;
    let name = format!("{head}.fpn_bottleneck");
    Ok(conv_bn(f, cat, &name, (n, h0, w0), (1, 1))?.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Partition then reverse returns every token to its row, for both shifts, on grids that
    /// need padding; each window row reads a distinct token or the zero row.
    #[test]
    fn window_gathers_round_trip() {
        for (h, w, m) in [(9, 8, 4), (5, 4, 4), (2, 1, 4), (7, 7, 7), (3, 5, 2)] {
            let n = 2;
            for shift in [0, m / 2] {
                let part = window_rows(n, (h, w), m, shift);
                let back = token_rows(n, (h, w), m, shift);
                assert_eq!(part.len(), n * h.div_ceil(m) * m * w.div_ceil(m) * m);
                assert_eq!(back.len(), n * h * w);
                for (r, &p) in back.iter().enumerate() {
                    assert_eq!(part[p], r, "{h}×{w}, M = {m}, shift {shift}");
                }
                let real = part.iter().filter(|&&r| r < n * h * w).count();
                assert_eq!(real, n * h * w);
            }
        }
    }

    /// The shift against a direct roll of a padded grid: 4 × 4 tokens, M = 4, shift 2, one
    /// window whose token (0, 0) is the padded grid's (2, 2).
    #[test]
    fn shifted_window_reads_the_rolled_grid() {
        let part = window_rows(1, (3, 3), 4, 2);
        // Window token (ty, tx) reads padded ((ty + 2) % 4, (tx + 2) % 4); row 3 / col 3 pad.
        assert_eq!(part[0], 2 * 3 + 2);
        assert_eq!(part[1], 9);
        assert_eq!(part[2], 2 * 3);
        assert_eq!(part[10], 0);
    }

    /// The index is mmsegmentation's `double_step_seq` construction, written out for M = 2.
    #[test]
    fn relative_position_index_of_a_2x2_window() {
        assert_eq!(
            relative_position_index(2),
            vec![4, 3, 1, 0, 5, 4, 2, 1, 7, 6, 4, 3, 8, 7, 5, 4]
        );
        // Per head: head 1 of 2 reads column 1 of the table.
        assert_eq!(bias_rows(2, 2)[16..20], [9, 7, 3, 1]);
    }

    /// Heads out and back are inverse permutations.
    #[test]
    fn head_gathers_invert() {
        let (b, l, heads) = (3, 4, 2);
        let merge = merge_rows(b, l, heads);
        for j in 0..3 {
            let take = head_rows(b, l, heads, j);
            for (bb, t, hh) in (0..b)
                .flat_map(|bb| (0..l).flat_map(move |t| (0..heads).map(move |hh| (bb, t, hh))))
            {
                let out = merge[(bb * l + t) * heads + hh];
                assert_eq!(take[out], ((bb * l + t) * 3 + j) * heads + hh);
            }
        }
    }

    /// PyTorch's adaptive average pooling bins against a naive loop over output cells.
    #[test]
    fn pool_matrix_matches_a_naive_loop() {
        for (h, w, s) in [(2, 1, 6), (5, 3, 3), (16, 16, 6), (7, 9, 2), (3, 3, 1)] {
            let m = pool_matrix(h, w, s);
            for i in 0..s {
                for j in 0..s {
                    let (y0, y1) = (i * h / s, ((i + 1) * h).div_ceil(s));
                    let (x0, x1) = (j * w / s, ((j + 1) * w).div_ceil(s));
                    let area = ((y1 - y0) * (x1 - x0)) as f64;
                    for y in 0..h {
                        for x in 0..w {
                            let inside = (y0..y1).contains(&y) && (x0..x1).contains(&x);
                            let want = if inside { 1.0 / area } else { 0.0 };
                            let got = m[((i * s + j) * h + y) * w + x];
                            assert!((got - want).abs() < 1e-15, "{h}×{w} → {s}");
                        }
                    }
                }
            }
        }
    }

    /// The unfold's taps and padding.
    #[test]
    fn unfold_pads_to_even() {
        let idx = unfold_rows(1, (3, 3));
        assert_eq!(idx.len(), 4 * 4);
        assert_eq!(idx[..4], [0, 1, 3, 4]);
        assert_eq!(idx[4..8], [2, 9, 5, 9]);
        assert_eq!(idx[12..], [8, 9, 9, 9]);
    }

    /// The mask separates the shifted regions (a 4 × 4 grid in windows of 2 shifted by 1).
    #[test]
    fn shift_mask_separates_regions() {
        let m = shift_mask(4, 4, 2, 1);
        assert_eq!(m.len(), 4 * 16);
        assert!(m[..16].iter().all(|&v| v == 0.0));
        let w3 = &m[3 * 16..];
        for i in 0..4 {
            for j in 0..4 {
                assert_eq!(w3[i * 4 + j], if i == j { 0.0 } else { MASKED });
            }
        }
    }

    /// Bad configurations are errors, not panics.
    #[test]
    fn bad_configurations_are_errors() {
        use sar_dfdx::conv::GatherCache;
        let dev = Cpu::default();
        let mut params =
            Params::from_host(&dev, [("x".to_string(), vec![1], vec![0.0f32])]).unwrap();
        let mut cache = GatherCache::default();
        let mut f = Forward {
            params: &mut params,
            cache: &mut cache,
            train: false,
        };
        let x: Rows<Cpu, NoneTape> = dev.zeros_like(&(2 * 8 * 8, 3));
        let run = |f: &mut Forward<Cpu, f32>, x, window, width| {
            upernet(
                f,
                x,
                (2, 8, 8),
                (SwinVariant::Tiny, window, width, false),
                None,
            )
            .err()
        };
        assert!(run(&mut f, x.clone(), 1, 16).is_some());
        assert!(run(&mut f, x.clone(), 4, 10).is_some());
        // Missing variables.
        assert!(run(&mut f, x.clone(), 4, 16).is_some());
        let bad: Rows<Cpu, NoneTape> = dev.zeros_like(&(5, 3));
        assert!(run(&mut f, bad, 4, 16).is_some());
    }
}
