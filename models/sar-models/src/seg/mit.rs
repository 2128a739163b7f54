//! Mix Transformer (MiT-B0 … B5), SegFormer's backbone, as mmsegmentation's
//! `MixVisionTransformer`, with its parameter names.
//!
//! Four stages; stage i (widths `C_i = E·(1, 2, 5, 8)_i`, E the embedding width) is
//! `backbone.layers.{i}`:
//!
//! - `.0` overlapping patch embedding: a k×k conv with bias (`projection`; k = 7 with stride 4
//!   for stage 0, k = 3 with stride 2 after; padding k/2) to `[N, C_i, H_i, W_i]`, flattened to
//!   tokens `[N, H_i·W_i, C_i]` and layer-normed (`norm`);
//! - `.1.{j}`, j < depth_i, a transformer block on tokens x:
//!   x ← x + DropPath(Attn(LN₁(x))), x ← x + DropPath(FFN(LN₂(x))), with
//!   - efficient self-attention (`attn`): queries from x; keys and values from x reduced by a
//!     `sr`×`sr` conv with stride `sr` (`attn.sr`, bias) and a LayerNorm (`attn.norm`) when the
//!     stage's reduction ratio sr = (8, 4, 2, 1)_i exceeds 1; `nn.MultiheadAttention`'s
//!     parameters `attn.attn.in_proj_weight` `[3C, C]` (rows q, k, v), `in_proj_bias`,
//!     `out_proj.{weight,bias}`; heads (1, 2, 5, 8)_i of width E; softmax(q kᵀ/√E) v;
//!   - Mix-FFN (`ffn.layers`): 1×1 conv C → 4C (`.0`), depth-wise 3×3 conv with bias (`.1`),
//!     exact GELU, 1×1 conv 4C → C (`.4`);
//! - `.2` a final LayerNorm, and the tokens reshaped to the stage's output `[N, C_i, H_i, W_i]`
//!   (strides 4, 8, 16, 32).
//!
//! Every LayerNorm has ε = 1e-6. Stochastic depth: block k of the K blocks of all stages drops
//! its residual branch per sample with probability `drop_path·k/(K − 1)` in training (kept
//! branches scaled by 1/(1 − p)), masks from the caller's generator.
//!
//! | variant | E | depths |
//! |---|---|---|
//! | B0 | 32 | 2, 2, 2, 2 |
//! | B1 | 64 | 2, 2, 2, 2 |
//! | B2 | 64 | 3, 4, 6, 3 |
//! | B3 | 64 | 3, 4, 18, 3 |
//! | B4 | 64 | 3, 8, 27, 3 |
//! | B5 | 64 | 3, 6, 40, 3 |
//!
//! `SegSpec::width` scales E by width/64 (64: the published networks).
//!
//! Initialisation (mmsegmentation's `init_weights` without a checkpoint): linear weights
//! N(0, 0.02²) (truncated at ±2, which never binds at that width), `in_proj_weight` Xavier
//! uniform (PyTorch's `MultiheadAttention`), convs N(0, 2/fan_out) with fan_out = k²·out/groups,
//! biases 0, LayerNorms 1/0.

use super::transformer::{drop_path, gelu, linear, to_map, to_tokens, LayerNorm};
use crate::params::{Init, Scope};
use crate::{Cost, Result};
use candle_core::{Tensor, D};
use sar_math::rng::SeededRng;

const LN_EPS: f64 = 1e-6;
const HEADS: [usize; 4] = [1, 2, 5, 8];
const REDUCTION: [usize; 4] = [8, 4, 2, 1];
const MLP_RATIO: usize = 4;

/// Which Mix Transformer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MitVariant {
    /// MiT-B0 … MiT-B5 by number.
    B(u8),
}

impl MitVariant {
    /// (E, depths) of the published network.
    pub fn dims(self) -> (usize, [usize; 4]) {
        let MitVariant::B(b) = self;
        match b {
            0 => (32, [2, 2, 2, 2]),
            1 => (64, [2, 2, 2, 2]),
            2 => (64, [3, 4, 6, 3]),
            3 => (64, [3, 4, 18, 3]),
            4 => (64, [3, 8, 27, 3]),
            _ => (64, [3, 6, 40, 3]),
        }
    }
}

/// A dense conv with bias: weight `[out, in, k, k]`.
struct BiasConv {
    weight: Tensor,
    bias: Tensor,
    kernel: usize,
    stride: usize,
    padding: usize,
}

impl BiasConv {
    fn new(
        p: &Scope,
        cin: usize,
        cout: usize,
        kernel: usize,
        stride: usize,
        padding: usize,
    ) -> Result<Self> {
        let std = (2.0 / (kernel * kernel * cout) as f64).sqrt();
        Ok(BiasConv {
            weight: p.get_or_insert("weight", &[cout, cin, kernel, kernel], Init::Normal(std))?,
            bias: p.get_or_insert("bias", &[cout], Init::Const(0.0))?,
            kernel,
            stride,
            padding,
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let y = sar_candle::ops::conv::conv2d(x, &self.weight, self.stride, self.padding, 1)?;
        sar_candle::ops::bias::bias_add(&y, &self.bias, 1)
    }

    fn out_size(&self, h: usize, w: usize) -> (usize, usize) {
        let o = |s: usize| (s + 2 * self.padding - self.kernel) / self.stride + 1;
        (o(h), o(w))
    }

    fn cost(&self, h: usize, w: usize) -> (Cost, usize, usize) {
        let (oh, ow) = self.out_size(h, w);
        let weights = self.weight.elem_count() as u64;
        (
            Cost {
                params: weights + self.bias.elem_count() as u64,
                macs: weights * (oh * ow) as u64,
            },
            oh,
            ow,
        )
    }
}

/// Efficient self-attention (mmsegmentation's `EfficientMultiheadAttention`).
struct Attention {
    in_proj_weight: Tensor,
    in_proj_bias: Tensor,
    out_weight: Tensor,
    out_bias: Tensor,
    reduce: Option<(BiasConv, LayerNorm)>,
    heads: usize,
    channels: usize,
}

impl Attention {
    fn new(p: &Scope, channels: usize, heads: usize, sr: usize) -> Result<Self> {
        let a = p.pp("attn");
        let xavier = (6.0 / (4 * channels) as f64).sqrt();
        let reduce = if sr > 1 {
            Some((
                BiasConv::new(&p.pp("sr"), channels, channels, sr, sr, 0)?,
                LayerNorm::new(&p.pp("norm"), channels, LN_EPS)?,
            ))
        } else {
            None
        };
        Ok(Attention {
            in_proj_weight: a.get_or_insert(
                "in_proj_weight",
                &[3 * channels, channels],
                Init::Uniform(xavier),
            )?,
            in_proj_bias: a.get_or_insert("in_proj_bias", &[3 * channels], Init::Const(0.0))?,
            out_weight: a.pp("out_proj").get_or_insert(
                "weight",
                &[channels, channels],
                Init::Normal(0.02),
            )?,
            out_bias: a
                .pp("out_proj")
                .get_or_insert("bias", &[channels], Init::Const(0.0))?,
            reduce,
            heads,
            channels,
        })
    }

    fn project(&self, x: &Tensor, part: usize) -> candle_core::Result<Tensor> {
        let c = self.channels;
        linear(
            x,
            &self.in_proj_weight.narrow(0, part * c, c)?,
            &self.in_proj_bias.narrow(0, part * c, c)?,
        )
    }

    /// `[N, L, C]` → `[N, heads, L, C/heads]`.
    fn split_heads(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (n, l, c) = x.dims3()?;
        x.reshape((n, l, self.heads, c / self.heads))?
            .transpose(1, 2)?
            .contiguous()
    }

    fn forward(&self, x: &Tensor, h: usize, w: usize) -> candle_core::Result<Tensor> {
        let (n, l, c) = x.dims3()?;
        let kv = match &self.reduce {
            Some((conv, norm)) => norm.forward(&to_tokens(&conv.forward(&to_map(x, h, w)?)?)?)?,
            None => x.clone(),
        };
        let q = self.split_heads(&self.project(x, 0)?)?;
        let k = self.split_heads(&self.project(&kv, 1)?)?;
        let v = self.split_heads(&self.project(&kv, 2)?)?;
        let scale = 1.0 / ((c / self.heads) as f64).sqrt();
        let scores = (q.matmul(&k.t()?.contiguous()?)? * scale)?;
        let att = candle_nn::ops::softmax(&scores, D::Minus1)?;
        let out = att.matmul(&v)?.transpose(1, 2)?.reshape((n, l, c))?;
        linear(&out, &self.out_weight, &self.out_bias)
    }

    /// Cost on an `h × w` token grid.
    fn cost(&self, h: usize, w: usize) -> Cost {
        let c = self.channels as u64;
        let l = (h * w) as u64;
        let mut cost = Cost {
            params: 4 * c * c + 4 * c,
            macs: 0,
        };
        let lk = match &self.reduce {
            Some((conv, norm)) => {
                let (cc, oh, ow) = conv.cost(h, w);
                cost = cost + cc;
                cost.params += norm.params();
                (oh * ow) as u64
            }
            None => l,
        };
        // q and out projections over L tokens, k and v over Lk, q·kᵀ and att·v.
        cost.macs += 2 * l * c * c + 2 * lk * c * c + 2 * l * lk * c;
        cost
    }
}

/// Mix-FFN: 1×1 conv, depth-wise 3×3 conv, GELU, 1×1 conv (`ffn.layers.{0,1,4}`).
struct MixFfn {
    fc1: (Tensor, Tensor),
    dw: (Tensor, Tensor),
    fc2: (Tensor, Tensor),
    channels: usize,
}

impl MixFfn {
    fn new(p: &Scope, channels: usize) -> Result<Self> {
        let hidden = channels * MLP_RATIO;
        let conv = |p: &Scope, cin: usize, cout: usize, k: usize, groups: usize| -> Result<_> {
            let std = (2.0 / (k * k * cout / groups) as f64).sqrt();
            Ok((
                p.get_or_insert("weight", &[cout, cin / groups, k, k], Init::Normal(std))?,
                p.get_or_insert("bias", &[cout], Init::Const(0.0))?,
            ))
        };
        let l = p.pp("layers");
        Ok(MixFfn {
            fc1: conv(&l.pp(0), channels, hidden, 1, 1)?,
            dw: conv(&l.pp(1), hidden, hidden, 3, hidden)?,
            fc2: conv(&l.pp(4), hidden, channels, 1, 1)?,
            channels,
        })
    }

    fn forward(&self, x: &Tensor, h: usize, w: usize) -> candle_core::Result<Tensor> {
        let y = linear(x, &self.fc1.0, &self.fc1.1)?;
        let y = gelu(&sar_candle::ops::depthwise::depthwise_conv2d(
            &to_map(&y, h, w)?,
            &self.dw.0,
            &self.dw.1,
        )?)?;
        linear(&to_tokens(&y)?, &self.fc2.0, &self.fc2.1)
    }

    fn cost(&self, h: usize, w: usize) -> Cost {
        let (c, hid, l) = (
            self.channels as u64,
            (self.channels * MLP_RATIO) as u64,
            (h * w) as u64,
        );
        Cost {
            params: 2 * c * hid + hid + c + 9 * hid + hid,
            macs: l * (2 * c * hid + 9 * hid),
        }
    }
}

struct Block {
    norm1: LayerNorm,
    attn: Attention,
    norm2: LayerNorm,
    ffn: MixFfn,
    drop_path: f64,
}

struct Stage {
    embed: BiasConv,
    embed_norm: LayerNorm,
    blocks: Vec<Block>,
    norm: LayerNorm,
    channels: usize,
}

/// The Mix Transformer (see the module docs).
pub struct MixVisionTransformer {
    stages: Vec<Stage>,
}

impl MixVisionTransformer {
    /// Builds the network in scope `p` (`backbone`): `embed` is E, `in_channels` the image's.
    pub fn new(
        p: &Scope,
        in_channels: usize,
        embed: usize,
        depths: [usize; 4],
        drop_path: f64,
    ) -> Result<Self> {
        let total: usize = depths.iter().sum();
        let mut k = 0usize;
        let mut stages = Vec::with_capacity(4);
        let mut cin = in_channels;
        for i in 0..4 {
            let s = p.pp("layers").pp(i);
            let c = embed * HEADS[i];
            let (kernel, stride) = if i == 0 { (7, 4) } else { (3, 2) };
            let embed_scope = s.pp(0);
            let patch = BiasConv::new(
                &embed_scope.pp("projection"),
                cin,
                c,
                kernel,
                stride,
                kernel / 2,
            )?;
            let embed_norm = LayerNorm::new(&embed_scope.pp("norm"), c, LN_EPS)?;
            let mut blocks = Vec::with_capacity(depths[i]);
            for j in 0..depths[i] {
                let b = s.pp(1).pp(j);
                // torch.linspace(0, drop_path, total)[k].
                let rate = if total > 1 {
                    drop_path * k as f64 / (total - 1) as f64
                } else {
                    0.0
                };
                blocks.push(Block {
                    norm1: LayerNorm::new(&b.pp("norm1"), c, LN_EPS)?,
                    attn: Attention::new(&b.pp("attn"), c, HEADS[i], REDUCTION[i])?,
                    norm2: LayerNorm::new(&b.pp("norm2"), c, LN_EPS)?,
                    ffn: MixFfn::new(&b.pp("ffn"), c)?,
                    drop_path: rate,
                });
                k += 1;
            }
            stages.push(Stage {
                embed: patch,
                embed_norm,
                blocks,
                norm: LayerNorm::new(&s.pp(2), c, LN_EPS)?,
                channels: c,
            });
            cin = c;
        }
        Ok(MixVisionTransformer { stages })
    }

    /// The four stages' widths.
    pub fn widths(&self) -> Vec<usize> {
        self.stages.iter().map(|s| s.channels).collect()
    }

    /// The four stage outputs `[N, C_i, H/s_i, W/s_i]`; `noise` (training) draws the
    /// stochastic-depth masks.
    pub fn forward(
        &self,
        x: &Tensor,
        mut noise: Option<&mut SeededRng>,
    ) -> candle_core::Result<Vec<Tensor>> {
        let mut outs = Vec::with_capacity(4);
        let mut x = x.clone();
        for s in &self.stages {
            let map = s.embed.forward(&x)?;
            let (_, _, h, w) = map.dims4()?;
            let mut t = s.embed_norm.forward(&to_tokens(&map)?)?;
            for b in &s.blocks {
                let a = b.attn.forward(&b.norm1.forward(&t)?, h, w)?;
                t = (&t + drop_path(&a, b.drop_path, noise.as_deref_mut())?)?;
                let f = b.ffn.forward(&b.norm2.forward(&t)?, h, w)?;
                t = (&t + drop_path(&f, b.drop_path, noise.as_deref_mut())?)?;
            }
            x = to_map(&s.norm.forward(&t)?, h, w)?;
            outs.push(x.clone());
        }
        Ok(outs)
    }

    /// Cost on an `h × w` image, and the stage output sizes.
    pub fn cost(&self, h: usize, w: usize) -> (Cost, Vec<(usize, usize)>) {
        let (mut h, mut w) = (h, w);
        let mut total = Cost { params: 0, macs: 0 };
        let mut sizes = Vec::with_capacity(4);
        for s in &self.stages {
            let (c, oh, ow) = s.embed.cost(h, w);
            (h, w) = (oh, ow);
            total = total + c;
            total.params += s.embed_norm.params() + s.norm.params();
            for b in &s.blocks {
                total = total + b.attn.cost(h, w) + b.ffn.cost(h, w);
                total.params += b.norm1.params() + b.norm2.params();
            }
            sizes.push((h, w));
        }
        (total, sizes)
    }
}
