//! Swin Transformer (Swin-T/S/B/L), UPerNet's backbone in mmsegmentation, as its
//! `SwinTransformer` with its parameter names.
//!
//! - `backbone.patch_embed`: the image padded at the bottom and right to a multiple of 4
//!   (mmcv's "corner" adaptive padding), a 4×4 conv with stride 4 and bias (`projection`) to
//!   `[N, E, H/4, W/4]`, flattened to tokens `[N, L, E]` and layer-normed (`norm`).
//! - `backbone.stages.{i}`, i < 4, at width C_i = E·2ⁱ with `heads_i` heads: `blocks.{j}`,
//!   j < depth_i, each on tokens x of an h × w grid:
//!   x ← x + DropPath(SW-MSA(LN₁(x))), x ← x + DropPath(FFN(LN₂(x))), where
//!   - the normed tokens are padded with zeros at the bottom and right to multiples of the
//!     window size M; odd blocks (j odd) cyclically shift the padded grid by −⌊M/2⌋ on both
//!     axes (`torch.roll`) and mask attention between tokens of different regions of the
//!     shifted grid (−100 added to their scores; mmsegmentation's regions: rows and columns
//!     split at Hp − M and Hp − ⌊M/2⌋). Padded tokens are not masked (mmsegmentation's
//!     behaviour, not the original Swin's window clipping).
//!   - window attention (`attn.w_msa`) on each M × M window of L = M² tokens: `qkv` linear
//!     C → 3C (rows q, k, v; heads of width C/heads), scores (q·d^-½)·kᵀ plus the relative
//!     position bias `relative_position_bias_table` `[(2M − 1)², heads]` indexed by
//!     (Δy + M − 1)·(2M − 1) + (Δx + M − 1) for tokens at offsets Δ, plus the shift mask,
//!     softmax, times v, and `proj` C → C; the windows are merged and the shift undone, the
//!     padding cropped.
//!   - FFN (`ffn.layers`): linear C → 4C (`0.0`), exact GELU, linear 4C → C (`1`).
//!
//!   After each stage but the last, `downsample` (mmcv's `PatchMerging`): the map padded to
//!   even size, every 2 × 2 patch unfolded into 4C channels in `nn.Unfold`'s order (channel
//!   c·4 + 2·ky + kx), layer-normed (`norm`, 4C) and projected by `reduction` (4C → 2C, no
//!   bias).
//! - Outputs: stage i's tokens before the downsampling, layer-normed by `backbone.norm{i}` and
//!   reshaped to `[N, C_i, H_i, W_i]` (strides 4, 8, 16, 32).
//!
//! Every LayerNorm has ε = 1e-5. Stochastic depth: block k of all K blocks drops its residual
//! branches per sample with probability `drop_path·k/(K − 1)` in training.
//!
//! | variant | E | depths | heads | window (mmsegmentation's ADE20K configs) |
//! |---|---|---|---|---|
//! | T | 96 | 2, 2, 6, 2 | 3, 6, 12, 24 | 7 |
//! | S | 96 | 2, 2, 18, 2 | 3, 6, 12, 24 | 7 |
//! | B | 128 | 2, 2, 18, 2 | 4, 8, 16, 32 | 7 (12 for the 384²-pretrained weights) |
//! | L | 192 | 2, 2, 18, 2 | 6, 12, 24, 48 | 12 |
//!
//! `SegSpec::width` scales E by width/64 (64: the published networks; the heads stay).
//!
//! Initialisation (mmsegmentation's `init_weights` without a checkpoint): linear weights and
//! the bias tables N(0, 0.02²) (truncated at ±2, which never binds), linear biases 0,
//! LayerNorms 1/0; the patch-embedding conv keeps PyTorch's default,
//! U(±1/√fan_in) for weight and bias.

use super::transformer::{drop_path, gelu, linear, to_map, to_tokens, LayerNorm};
use crate::params::{Init, Scope};
use crate::{Cost, ModelError, Result};
use candle_core::{Tensor, D};
use sar_math::rng::SeededRng;

const LN_EPS: f64 = 1e-5;
const MLP_RATIO: usize = 4;
const PATCH: usize = 4;
/// mmsegmentation's `masked_fill` value between tokens of different shifted regions.
const MASKED: f32 = -100.0;

/// Which Swin Transformer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SwinVariant {
    /// Swin-T.
    Tiny,
    /// Swin-S.
    Small,
    /// Swin-B.
    Base,
    /// Swin-L.
    Large,
}

impl SwinVariant {
    /// (E, depths, heads, window) of the published network (see the module docs).
    pub fn dims(self) -> (usize, [usize; 4], [usize; 4], usize) {
        match self {
            SwinVariant::Tiny => (96, [2, 2, 6, 2], [3, 6, 12, 24], 7),
            SwinVariant::Small => (96, [2, 2, 18, 2], [3, 6, 12, 24], 7),
            SwinVariant::Base => (128, [2, 2, 18, 2], [4, 8, 16, 32], 7),
            SwinVariant::Large => (192, [2, 2, 18, 2], [6, 12, 24, 48], 12),
        }
    }
}

/// A linear layer's `weight` `[out, in]` (N(0, 0.02²)) and `bias` `[out]` (0) in scope `p`.
fn linear_params(
    p: &Scope,
    cin: usize,
    cout: usize,
    bias: bool,
) -> Result<(Tensor, Option<Tensor>)> {
    let w = p.get_or_insert("weight", &[cout, cin], Init::Normal(0.02))?;
    let b = if bias {
        Some(p.get_or_insert("bias", &[cout], Init::Const(0.0))?)
    } else {
        None
    };
    Ok((w, b))
}

fn apply(x: &Tensor, (w, b): &(Tensor, Option<Tensor>)) -> candle_core::Result<Tensor> {
    match b {
        Some(b) => linear(x, w, b),
        None => {
            let (n, l, c) = x.dims3()?;
            x.reshape((n * l, c))?
                .matmul(&w.t()?)?
                .reshape((n, l, w.dim(0)?))
        }
    }
}

/// The relative-position index of an M × M window, `[M², M²]` row-major
/// ([`sar_math::windows::relative_position`]).
fn relative_position_index(m: usize) -> Vec<u32> {
    let l = m * m;
    (0..l * l)
        .map(|k| sar_math::windows::relative_position(m, k / l, k % l) as u32)
        .collect()
}

/// The shifted-window mask `[nW, M², M²]` (0 or −100) of a padded `hp × wp` grid
/// ([`sar_math::windows::shift_region`]).
fn shift_mask(hp: usize, wp: usize, m: usize, shift: usize) -> Vec<f32> {
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
            for i in 0..l {
                for j in 0..l {
                    mask.push(if ids[i] == ids[j] { 0.0 } else { MASKED });
                }
            }
        }
    }
    mask
}

/// Window multi-head self-attention with relative position bias (`attn.w_msa`).
struct WindowAttention {
    qkv: (Tensor, Option<Tensor>),
    proj: (Tensor, Option<Tensor>),
    table: Tensor,
    index: Tensor,
    heads: usize,
    channels: usize,
    window: usize,
}

impl WindowAttention {
    fn new(p: &Scope, channels: usize, heads: usize, window: usize) -> Result<Self> {
        let idx = relative_position_index(window);
        let n = idx.len();
        Ok(WindowAttention {
            qkv: linear_params(&p.pp("qkv"), channels, 3 * channels, true)?,
            proj: linear_params(&p.pp("proj"), channels, channels, true)?,
            table: p.get_or_insert(
                "relative_position_bias_table",
                &[(2 * window - 1) * (2 * window - 1), heads],
                Init::Normal(0.02),
            )?,
            index: Tensor::from_vec(idx, n, p.device())?,
            heads,
            channels,
            window,
        })
    }

    /// Windows `[B, M², C]` (B = N·nW, window-major per image), `mask` `[nW, M², M²]`.
    fn forward(&self, x: &Tensor, mask: Option<&Tensor>) -> candle_core::Result<Tensor> {
        let (b, l, c) = x.dims3()?;
        let hd = c / self.heads;
        let qkv = apply(x, &self.qkv)?
            .reshape(vec![b, l, 3, self.heads, hd])?
            .permute((2, 0, 3, 1, 4))?;
        let q = (qkv.get(0)?.contiguous()? * (hd as f64).powf(-0.5))?;
        let k = qkv.get(1)?.contiguous()?;
        let v = qkv.get(2)?.contiguous()?;
        let bias = self
            .table
            .index_select(&self.index, 0)?
            .reshape((l, l, self.heads))?
            .permute((2, 0, 1))?
            .flatten_all()?;
        // The bias [heads, M², M²] is one "channel" axis of the scores [B, heads·M⁴]; the op's
        // backward sums windows in parallel (candle's reduction over the leading axis is serial).
        let mut scores = sar_candle::ops::bias::bias_add(
            &q.matmul(&k.t()?.contiguous()?)?
                .reshape((b, self.heads * l * l))?,
            &bias,
            1,
        )?
        .reshape((b, self.heads, l, l))?;
        if let Some(mask) = mask {
            let nw = mask.dim(0)?;
            scores = scores
                .reshape(vec![b / nw, nw, self.heads, l, l])?
                .broadcast_add(&mask.reshape(vec![1, nw, 1, l, l])?)?
                .reshape((b, self.heads, l, l))?;
        }
        let att = candle_nn::ops::softmax(&scores, D::Minus1)?;
        let out = att.matmul(&v)?.transpose(1, 2)?.reshape((b, l, c))?;
        apply(&out, &self.proj)
    }

    /// Cost over `windows` windows.
    fn cost(&self, windows: usize) -> Cost {
        let (c, l) = (self.channels as u64, (self.window * self.window) as u64);
        Cost {
            params: 4 * c * c + 4 * c + self.table.elem_count() as u64,
            macs: windows as u64 * (4 * l * c * c + 2 * l * l * c),
        }
    }
}

/// `[N, Hp, Wp, C]` → windows `[N·nW, M², C]`.
fn partition(x: &Tensor, m: usize) -> candle_core::Result<Tensor> {
    let (n, hp, wp, c) = x.dims4()?;
    x.reshape(vec![n, hp / m, m, wp / m, m, c])?
        .transpose(2, 3)?
        .contiguous()?
        .reshape((n * (hp / m) * (wp / m), m * m, c))
}

/// Windows `[N·nW, M², C]` → `[N, Hp, Wp, C]`.
fn merge(x: &Tensor, n: usize, hp: usize, wp: usize, m: usize) -> candle_core::Result<Tensor> {
    let c = x.dim(2)?;
    x.reshape(vec![n, hp / m, wp / m, m, m, c])?
        .transpose(2, 3)?
        .contiguous()?
        .reshape((n, hp, wp, c))
}

struct SwinBlock {
    norm1: LayerNorm,
    attn: WindowAttention,
    norm2: LayerNorm,
    fc1: (Tensor, Option<Tensor>),
    fc2: (Tensor, Option<Tensor>),
    shift: usize,
    drop_path: f64,
}

impl SwinBlock {
    fn forward(
        &self,
        x: &Tensor,
        h: usize,
        w: usize,
        mut noise: Option<&mut SeededRng>,
    ) -> candle_core::Result<Tensor> {
        let (n, _, c) = x.dims3()?;
        let m = self.attn.window;
        let (hp, wp) = (h.div_ceil(m) * m, w.div_ceil(m) * m);
        let mut y = self
            .norm1
            .forward(x)?
            .reshape((n, h, w, c))?
            .pad_with_zeros(1, 0, hp - h)?
            .pad_with_zeros(2, 0, wp - w)?;
        let s = self.shift as i32;
        let mask = if self.shift > 0 {
            y = y.roll(-s, 1)?.roll(-s, 2)?;
            let mask = shift_mask(hp, wp, m, self.shift);
            let nw = (hp / m) * (wp / m);
            Some(Tensor::from_vec(mask, (nw, m * m, m * m), x.device())?.to_dtype(x.dtype())?)
        } else {
            None
        };
        let att = self.attn.forward(&partition(&y, m)?, mask.as_ref())?;
        let mut y = merge(&att, n, hp, wp, m)?;
        if self.shift > 0 {
            y = y.roll(s, 1)?.roll(s, 2)?;
        }
        let y = y
            .narrow(1, 0, h)?
            .narrow(2, 0, w)?
            .contiguous()?
            .reshape((n, h * w, c))?;
        let x = (x + drop_path(&y, self.drop_path, noise.as_deref_mut())?)?;
        let f = apply(
            &gelu(&apply(&self.norm2.forward(&x)?, &self.fc1)?)?,
            &self.fc2,
        )?;
        &x + drop_path(&f, self.drop_path, noise)?
    }

    fn cost(&self, h: usize, w: usize) -> Cost {
        let m = self.attn.window;
        let windows = h.div_ceil(m) * w.div_ceil(m);
        let c = self.attn.channels as u64;
        let hid = c * MLP_RATIO as u64;
        let l = (h * w) as u64;
        let mut cost = self.attn.cost(windows);
        cost.params += self.norm1.params() + self.norm2.params() + 2 * c * hid + hid + c;
        cost.macs += 2 * l * c * hid;
        cost
    }
}

/// mmcv's `PatchMerging` (2 × 2, stride 2).
struct PatchMerging {
    norm: LayerNorm,
    reduction: (Tensor, Option<Tensor>),
    channels: usize,
}

impl PatchMerging {
    /// Tokens of an `h × w` grid → tokens of the ⌈h/2⌉ × ⌈w/2⌉ grid.
    fn forward(&self, x: &Tensor, h: usize, w: usize) -> candle_core::Result<Tensor> {
        let (n, _, c) = x.dims3()?;
        let (h2, w2) = (h.div_ceil(2), w.div_ceil(2));
        let map = to_map(x, h, w)?
            .pad_with_zeros(2, 0, 2 * h2 - h)?
            .pad_with_zeros(3, 0, 2 * w2 - w)?;
        let unfolded = map
            .reshape(vec![n, c, h2, 2, w2, 2])?
            .permute((0, 2, 4, 1, 3, 5))?
            .contiguous()?
            .reshape((n, h2 * w2, 4 * c))?;
        apply(&self.norm.forward(&unfolded)?, &self.reduction)
    }

    fn cost(&self, h: usize, w: usize) -> Cost {
        let c = self.channels as u64;
        Cost {
            params: self.norm.params() + 8 * c * c,
            macs: (h.div_ceil(2) * w.div_ceil(2)) as u64 * 8 * c * c,
        }
    }
}

struct SwinStage {
    blocks: Vec<SwinBlock>,
    downsample: Option<PatchMerging>,
    norm: LayerNorm,
    channels: usize,
}

/// The Swin Transformer (see the module docs).
pub struct SwinTransformer {
    embed_weight: Tensor,
    embed_bias: Tensor,
    embed_norm: LayerNorm,
    stages: Vec<SwinStage>,
}

impl SwinTransformer {
    /// Builds the network in scope `p` (`backbone`): embedding width `embed`, `window` M.
    pub fn new(
        p: &Scope,
        in_channels: usize,
        embed: usize,
        depths: [usize; 4],
        heads: [usize; 4],
        window: usize,
        drop_path: f64,
    ) -> Result<Self> {
        if window < 2 {
            return Err(ModelError::Config(format!(
                "the Swin window size must be at least 2, got {window}"
            )));
        }
        for (i, &h) in heads.iter().enumerate() {
            if !(embed << i).is_multiple_of(h) {
                return Err(ModelError::Config(format!(
                    "Swin stage {i}: width {} is not a multiple of its {h} heads",
                    embed << i
                )));
            }
        }
        let pe = p.pp("patch_embed");
        let bound = 1.0 / ((in_channels * PATCH * PATCH) as f64).sqrt();
        let proj = pe.pp("projection");
        let embed_weight = proj.get_or_insert(
            "weight",
            &[embed, in_channels, PATCH, PATCH],
            Init::Uniform(bound),
        )?;
        let embed_bias = proj.get_or_insert("bias", &[embed], Init::Uniform(bound))?;
        let embed_norm = LayerNorm::new(&pe.pp("norm"), embed, LN_EPS)?;
        let total: usize = depths.iter().sum();
        let mut k = 0usize;
        let mut stages = Vec::with_capacity(4);
        for i in 0..4 {
            let s = p.pp("stages").pp(i);
            let c = embed << i;
            let mut blocks = Vec::with_capacity(depths[i]);
            for j in 0..depths[i] {
                let b = s.pp("blocks").pp(j);
                let rate = if total > 1 {
                    drop_path * k as f64 / (total - 1) as f64
                } else {
                    0.0
                };
                let ffn = b.pp("ffn").pp("layers");
                blocks.push(SwinBlock {
                    norm1: LayerNorm::new(&b.pp("norm1"), c, LN_EPS)?,
                    attn: WindowAttention::new(&b.pp("attn").pp("w_msa"), c, heads[i], window)?,
                    norm2: LayerNorm::new(&b.pp("norm2"), c, LN_EPS)?,
                    fc1: linear_params(&ffn.pp(0).pp(0), c, MLP_RATIO * c, true)?,
                    fc2: linear_params(&ffn.pp(1), MLP_RATIO * c, c, true)?,
                    shift: if j % 2 == 1 { window / 2 } else { 0 },
                    drop_path: rate,
                });
                k += 1;
            }
            let downsample = if i < 3 {
                let d = s.pp("downsample");
                Some(PatchMerging {
                    norm: LayerNorm::new(&d.pp("norm"), 4 * c, LN_EPS)?,
                    reduction: linear_params(&d.pp("reduction"), 4 * c, 2 * c, false)?,
                    channels: c,
                })
            } else {
                None
            };
            stages.push(SwinStage {
                blocks,
                downsample,
                norm: LayerNorm::new(&p.pp(format!("norm{i}")), c, LN_EPS)?,
                channels: c,
            });
        }
        Ok(SwinTransformer {
            embed_weight,
            embed_bias,
            embed_norm,
            stages,
        })
    }

    /// The four stages' widths.
    pub fn widths(&self) -> Vec<usize> {
        self.stages.iter().map(|s| s.channels).collect()
    }

    /// The four stage outputs `[N, C_i, ⌈H/s_i⌉, ⌈W/s_i⌉]`; `noise` (training) draws the
    /// stochastic-depth masks.
    pub fn forward(
        &self,
        x: &Tensor,
        mut noise: Option<&mut SeededRng>,
    ) -> candle_core::Result<Vec<Tensor>> {
        let (_, _, ih, iw) = x.dims4()?;
        let x = x
            .pad_with_zeros(2, 0, ih.div_ceil(PATCH) * PATCH - ih)?
            .pad_with_zeros(3, 0, iw.div_ceil(PATCH) * PATCH - iw)?;
        let map = sar_candle::ops::bias::bias_add(
            &sar_candle::ops::conv::conv2d(&x, &self.embed_weight, PATCH, 0, 1)?,
            &self.embed_bias,
            1,
        )?;
        let (_, _, mut h, mut w) = map.dims4()?;
        let mut t = self.embed_norm.forward(&to_tokens(&map)?)?;
        let mut outs = Vec::with_capacity(4);
        for s in &self.stages {
            for b in &s.blocks {
                t = b.forward(&t, h, w, noise.as_deref_mut())?;
            }
            outs.push(to_map(&s.norm.forward(&t)?, h, w)?);
            if let Some(d) = &s.downsample {
                t = d.forward(&t, h, w)?;
                (h, w) = (h.div_ceil(2), w.div_ceil(2));
            }
        }
        Ok(outs)
    }

    /// Cost on an `h × w` image, and the stage output sizes.
    pub fn cost(&self, h: usize, w: usize) -> (Cost, Vec<(usize, usize)>) {
        let (mut h, mut w) = (h.div_ceil(PATCH), w.div_ceil(PATCH));
        let e = self.embed_weight.elem_count() as u64;
        let mut total = Cost {
            params: e + self.embed_bias.elem_count() as u64 + self.embed_norm.params(),
            macs: e * (h * w) as u64,
        };
        let mut sizes = Vec::with_capacity(4);
        for s in &self.stages {
            for b in &s.blocks {
                total = total + b.cost(h, w);
            }
            total.params += s.norm.params();
            sizes.push((h, w));
            if let Some(d) = &s.downsample {
                total = total + d.cost(h, w);
                (h, w) = (h.div_ceil(2), w.div_ceil(2));
            }
        }
        (total, sizes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The index is mmsegmentation's `double_step_seq` construction, written out for M = 2:
    /// coordinates (0,0), (0,1), (1,0), (1,1), index (Δy + 1)·3 + (Δx + 1).
    #[test]
    fn relative_position_index_of_a_2x2_window() {
        assert_eq!(
            relative_position_index(2),
            vec![4, 3, 1, 0, 5, 4, 2, 1, 7, 6, 4, 3, 8, 7, 5, 4]
        );
    }

    /// A 4 × 4 grid in windows of 2 shifted by 1: the last window row and column hold
    /// tokens of different regions; the first window is one region.
    #[test]
    fn shift_mask_separates_regions() {
        let m = shift_mask(4, 4, 2, 1);
        assert_eq!(m.len(), 4 * 16);
        assert!(m[..16].iter().all(|&v| v == 0.0));
        // Window 3 (bottom right): tokens (2,2), (2,3), (3,2), (3,3): regions 4, 5, 7, 8.
        let w3 = &m[3 * 16..];
        for i in 0..4 {
            for j in 0..4 {
                assert_eq!(w3[i * 4 + j], if i == j { 0.0 } else { MASKED });
            }
        }
        // Window 1 (top right): (0,2), (0,3), (1,2), (1,3): regions 1, 2, 1, 2.
        let w1 = &m[16..32];
        assert_eq!(w1[2], 0.0);
        assert_eq!(w1[1], MASKED);
    }
}
