//! A residual block in training mode as one candle op (CPU, f32).
//!
//! For layers i = 0 … L−1, each a convolution `W_i` followed by a BatchNorm `(γ_i, β_i)` with
//! batch statistics, and a parameter-free shortcut S ([`Shortcut`]: x itself, or the CIFAR
//! ResNets' option A, x subsampled with zero channels added):
//!
//! - a₀ = x, y_i = W_i ⊛ a_i, a_{i+1} = relu(BN_i(y_i)) for i < L−1;
//! - out = relu(BN_{L−1}(y_{L−1}) + S(x)).
//!
//! The backward runs the same kernels as the separate ops ([`super::conv`],
//! [`super::batch_norm`]) from the last layer to the first: g = d_out·𝟙(out > 0) is the
//! shortcut's gradient and the last BatchNorm's, each earlier BatchNorm's gradient is masked by
//! its own ReLU, and dx = Sᵀ(g) + (the first convolution's input gradient).
//!
//! Why one op: candle's backward gives every graph node's gradient a fresh `zeros_like`, then
//! `add`s each contribution into it. As separate ops a ResNet BasicBlock has five
//! activation-sized nodes between its input and output (y₀, a₁, y₁, BN₁'s output, and the ReLU
//! mask's result, which goes to two of them), and option A four more; here the block's
//! intermediate tensors live in the op, and only x and the parameters get candle gradients.
//! Blocks run one after another can be one op too ([`residual_blocks_train`]): the gradients
//! between them then stay inside it as well.
//!
//! Shapes: x `[N, C, H, W]`; W_i `[O_i, C_i, k_i, k_i]` (C₀ = C, C_{i+1} = O_i), γ_i, β_i `[O_i]`;
//! the last layer's output must have the shortcut's shape. The parameters enter as one flat
//! tensor, `[W₀, γ₀, β₀, W₁, γ₁, β₁, …]` (each flattened), so that the op has two inputs; their
//! gradient comes back through `cat`, at parameter size. Layout NCHW, contiguous.

use super::batch_norm::{self, BatchStats, Relu};
use super::conv::{self, Conv2dCpu, Geometry};
use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Shape, Tensor};
use std::sync::{Arc, Mutex};

/// One convolution + BatchNorm of a block.
#[derive(Debug, Clone, Copy)]
pub struct ConvBn<'a> {
    /// `[O, C, k, k]`.
    pub weight: &'a Tensor,
    /// γ `[O]`.
    pub gamma: &'a Tensor,
    /// β `[O]`.
    pub beta: &'a Tensor,
    /// The convolution's stride, padding and dilation.
    pub conv: Conv2dCpu,
}

/// A block's shortcut from its input x `[N, C, H, W]` to the sum before the last ReLU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shortcut {
    /// x itself (the last layer's output must have x's shape).
    Identity,
    /// The CIFAR ResNets' option A: `x[:, :, ::stride, ::stride]` (the first of every `stride`
    /// rows and columns, ⌈H/stride⌉ × ⌈W/stride⌉) with `pad` zero channels on each side; no
    /// parameters.
    Subsample {
        /// Stride of the subsampling.
        stride: usize,
        /// Zero channels added before and after x's.
        pad: usize,
    },
}

impl Shortcut {
    /// The shortcut's `[N, C', H', W']` for an input of `[N, C, H, W]`.
    fn out_dims(self, x: &[usize]) -> Vec<usize> {
        match self {
            Shortcut::Identity => x.to_vec(),
            Shortcut::Subsample { stride, pad } => {
                let s = stride.max(1);
                vec![x[0], x[1] + 2 * pad, x[2].div_ceil(s), x[3].div_ceil(s)]
            }
        }
    }

    /// The subsampled, channel-padded x (`Subsample` only).
    fn subsample(x: &[f32], dims: &[usize], stride: usize, pad: usize) -> Vec<f32> {
        let (n, c, h, w) = (dims[0], dims[1], dims[2], dims[3]);
        let (oh, ow) = (h.div_ceil(stride), w.div_ceil(stride));
        let co = c + 2 * pad;
        let mut r = vec![0.0f32; n * co * oh * ow];
        for (i, image) in r.chunks_exact_mut(co * oh * ow).enumerate() {
            for ch in 0..c {
                let src = &x[(i * c + ch) * h * w..][..h * w];
                let dst = &mut image[(ch + pad) * oh * ow..][..oh * ow];
                for (y, row) in dst.chunks_exact_mut(ow).enumerate() {
                    let from = &src[y * stride * w..][..w];
                    for (v, &u) in row.iter_mut().zip(from.iter().step_by(stride)) {
                        *v = u;
                    }
                }
            }
        }
        r
    }

    /// The adjoint of [`Shortcut::subsample`]: `g` `[N, C + 2·pad, ⌈H/s⌉, ⌈W/s⌉]` scattered into
    /// a zero `[N, C, H, W]`.
    fn subsample_adjoint(g: &[f32], dims: &[usize], stride: usize, pad: usize) -> Vec<f32> {
        let (n, c, h, w) = (dims[0], dims[1], dims[2], dims[3]);
        let (oh, ow) = (h.div_ceil(stride), w.div_ceil(stride));
        let co = c + 2 * pad;
        let mut dx = vec![0.0f32; n * c * h * w];
        for (i, image) in dx.chunks_exact_mut(c * h * w).enumerate() {
            for (ch, plane) in image.chunks_exact_mut(h * w).enumerate() {
                let src = &g[(i * co + ch + pad) * oh * ow..][..oh * ow];
                for (y, row) in src.chunks_exact(ow).enumerate() {
                    let to = &mut plane[y * stride * w..][..w];
                    for (v, &u) in to.iter_mut().step_by(stride).zip(row) {
                        *v = u;
                    }
                }
            }
        }
        dx
    }
}

/// What the forward pass keeps of one block for the backward: y_i, a_i (i ≥ 1), each layer's
/// statistics and geometry.
#[derive(Default)]
struct SavedBlock {
    ys: Vec<Vec<f32>>,
    acts: Vec<Vec<f32>>,
    stats: Vec<BatchStats>,
    geometry: Vec<Geometry>,
}

/// What the forward pass keeps for the backward: the parameters, each block's state, and the
/// inputs of the blocks after the first (the outputs of the ones before).
#[derive(Default)]
struct Saved {
    params: Vec<f32>,
    blocks: Vec<SavedBlock>,
    inputs: Vec<(Vec<f32>, Vec<usize>)>,
}

/// One block's layers (where each layer's weight, γ and β lie in the block's part of the flat
/// parameters, and its weight shape) and its shortcut.
#[derive(Debug, Clone)]
struct Block {
    convs: Vec<Conv2dCpu>,
    weight_dims: Vec<[usize; 4]>,
    shortcut: Shortcut,
}

impl Block {
    /// `(weight, γ, β)` ranges of layer `i`.
    fn ranges(&self, i: usize) -> [std::ops::Range<usize>; 3] {
        let mut at = 0;
        for d in &self.weight_dims[..i] {
            at += d.iter().product::<usize>() + 2 * d[0];
        }
        let d = self.weight_dims[i];
        let w = d.iter().product::<usize>();
        [
            at..at + w,
            at + w..at + w + d[0],
            at + w + d[0]..at + w + 2 * d[0],
        ]
    }

    /// The block's number of parameters.
    fn len(&self) -> usize {
        self.ranges(self.convs.len() - 1)[2].end
    }

    /// The block's output and output shape for input `x` of shape `dims`, with what its backward
    /// needs.
    fn forward(
        &self,
        x: &[f32],
        x_dims: &[usize],
        params: &[f32],
        eps: f64,
    ) -> candle_core::Result<(Vec<f32>, Vec<usize>, SavedBlock)> {
        let mut saved = SavedBlock::default();
        let mut dims = x_dims.to_vec();
        let last = self.convs.len() - 1;
        let mut out = Vec::new();
        for (i, (&op, wd)) in self.convs.iter().zip(&self.weight_dims).enumerate() {
            let g = Geometry::new(&dims, wd, op)?;
            let [w, gamma, beta] = self.ranges(i).map(|r| &params[r]);
            let input = if i == 0 { x } else { &saved.acts[i - 1] };
            let y = conv::forward(input, w, &g);
            let [n, o, oh, ow] = g.out_dims();
            let shape = (n, o, oh * ow);
            dims = vec![n, o, oh, ow];
            let subsampled;
            let residual = if i == last {
                let want = self.shortcut.out_dims(x_dims);
                if dims != want {
                    candle_core::bail!(
                        "residual block: the last layer's output {dims:?} is not the shortcut's {want:?} (input {x_dims:?}, {:?})",
                        self.shortcut
                    );
                }
                Some(match self.shortcut {
                    Shortcut::Identity => x,
                    Shortcut::Subsample { stride, pad } => {
                        subsampled = Shortcut::subsample(x, x_dims, stride, pad);
                        &subsampled[..]
                    }
                })
            } else {
                None
            };
            let (a, st) = batch_norm::train_forward(&y, gamma, beta, shape, eps, true, residual);
            saved.ys.push(y);
            saved.stats.push(st);
            saved.geometry.push(g);
            if i == last {
                out = a;
            } else {
                saved.acts.push(a);
            }
        }
        Ok((out, dims, saved))
    }

    /// dL/dx (of x's shape; only the shortcut's share without `want_dx`) and the gradient of
    /// the block's parameters, written into `dparams`.
    fn backward(
        &self,
        (x, x_dims): (&[f32], &[usize]),
        (dout, out): (&[f32], &[f32]),
        saved: &SavedBlock,
        params: &[f32],
        dparams: &mut [f32],
        want_dx: bool,
    ) -> Vec<f32> {
        // The shortcut's gradient, and the last BatchNorm's (its ReLU is the block's).
        let shortcut = batch_norm::relu_backward(dout, out);
        // x's share through the shortcut.
        let through_shortcut = match self.shortcut {
            Shortcut::Identity => None,
            Shortcut::Subsample { stride, pad } => {
                Some(Shortcut::subsample_adjoint(&shortcut, x_dims, stride, pad))
            }
        };
        let dx_shortcut = through_shortcut.as_deref().unwrap_or(&shortcut);
        let mut upstream: Option<Vec<f32>> = None;
        let mut dx = None;
        for i in (0..self.convs.len()).rev() {
            let g = saved.geometry[i];
            let [rw, rg, rb] = self.ranges(i);
            // The last BatchNorm's gradient is the shortcut's (masked by the block's ReLU);
            // the others' ReLUs are their own.
            let (dy_in, relu) = match &upstream {
                None => (&shortcut[..], Relu::None),
                Some(u) => (
                    &u[..],
                    Relu::Fused {
                        beta: &params[rb.clone()],
                    },
                ),
            };
            let [n, o, oh, ow] = g.out_dims();
            let shape = (n, o, oh * ow);
            let gamma = &params[rg.clone()];
            let (dy, dgamma, dbeta) =
                batch_norm::backward(&saved.ys[i], dy_in, relu, &saved.stats[i], gamma, shape);
            let input = if i == 0 { x } else { &saved.acts[i - 1] };
            dparams[rw.clone()].copy_from_slice(&conv::grad_weight(input, &dy, &g));
            dparams[rg].copy_from_slice(&dgamma);
            dparams[rb].copy_from_slice(&dbeta);
            let w = &params[rw];
            if i > 0 {
                upstream = Some(conv::grad_input(w, &dy, &g, None));
            } else if want_dx {
                dx = Some(conv::grad_input(w, &dy, &g, Some(dx_shortcut)));
            }
        }
        // Without `want_dx` the caller does not use it, but it has x's shape.
        dx.unwrap_or_else(|| through_shortcut.unwrap_or(shortcut))
    }
}

/// The forward op of a chain of blocks on (x, flat parameters).
struct ResidualTrain {
    blocks: Vec<Block>,
    eps: f64,
    saved: Arc<Mutex<Saved>>,
}

/// Where each block's parameters start in the flat parameters (and, last, their total).
fn block_offsets(blocks: &[Block]) -> Vec<usize> {
    let mut at = vec![0];
    for b in blocks {
        at.push(at[at.len() - 1] + b.len());
    }
    at
}

impl CustomOp2 for ResidualTrain {
    fn name(&self) -> &'static str {
        "sar-residual-blocks"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = super::cpu_f32("residual block", s1, l1, "input")?;
        let params = super::cpu_f32("residual block", s2, l2, "parameters")?;
        let at = block_offsets(&self.blocks);
        if params.len() != at[self.blocks.len()] {
            candle_core::bail!(
                "residual block: {} parameter values for layers needing {}",
                params.len(),
                at[self.blocks.len()]
            );
        }
        let mut saved = Saved {
            params: params.to_vec(),
            ..Saved::default()
        };
        let (mut out, mut dims) = (Vec::new(), l1.dims().to_vec());
        for (b, block) in self.blocks.iter().enumerate() {
            let input = match b {
                0 => x,
                _ => &saved.inputs[b - 1].0,
            };
            let (y, y_dims, state) =
                block.forward(input, &dims, &params[at[b]..at[b + 1]], self.eps)?;
            saved.blocks.push(state);
            if b + 1 < self.blocks.len() {
                saved.inputs.push((y, y_dims.clone()));
            } else {
                out = y;
            }
            dims = y_dims;
        }
        *self.saved.lock().expect("residual block state") = saved;
        Ok((CpuStorage::F32(out), Shape::from(dims)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        params: &Tensor,
        out: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let dparams = Arc::new(Mutex::new(Vec::new()));
        let op = ResidualBackward {
            blocks: self.blocks.clone(),
            saved: self.saved.clone(),
            want_dx: x.track_op(),
            dparams: dparams.clone(),
        };
        let dx = x.apply_op3_no_bwd(&grad.contiguous()?, out, &op)?;
        let dp = std::mem::take(&mut *dparams.lock().expect("residual block gradient"));
        let dp = Tensor::from_vec(dp, params.shape(), params.device())?;
        Ok((op.want_dx.then_some(dx), Some(dp)))
    }
}

/// dL/dx of [`ResidualTrain`] from (x, d_out, out); the parameters' gradient goes to `dparams`.
struct ResidualBackward {
    blocks: Vec<Block>,
    saved: Arc<Mutex<Saved>>,
    want_dx: bool,
    dparams: Arc<Mutex<Vec<f32>>>,
}

impl CustomOp3 for ResidualBackward {
    fn name(&self) -> &'static str {
        "sar-residual-blocks-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = super::cpu_f32("residual block", s1, l1, "input")?;
        let dout = super::cpu_f32("residual block", s2, l2, "output gradient")?;
        let out = super::cpu_f32("residual block", s3, l3, "output")?;
        let saved = self.saved.lock().expect("residual block state");
        let count = self.blocks.len();
        if saved.blocks.len() != count || saved.inputs.len() + 1 != count || dout.len() != out.len()
        {
            candle_core::bail!("residual block backward without its forward pass");
        }
        let at = block_offsets(&self.blocks);
        let mut dparams = vec![0.0f32; at[count]];
        // From the last block to the first, each block's input gradient the output gradient of
        // the one before.
        let mut upstream: Vec<f32> = Vec::new();
        for b in (0..count).rev() {
            let (input, dims) = match b {
                0 => (x, l1.dims()),
                _ => (&saved.inputs[b - 1].0[..], &saved.inputs[b - 1].1[..]),
            };
            let (d_out, output) = match b + 1 == count {
                true => (dout, out),
                false => (&upstream[..], &saved.inputs[b].0[..]),
            };
            let params = &saved.params[at[b]..at[b + 1]];
            upstream = self.blocks[b].backward(
                (input, dims),
                (d_out, output),
                &saved.blocks[b],
                params,
                &mut dparams[at[b]..at[b + 1]],
                b > 0 || self.want_dx,
            );
        }
        *self.dparams.lock().expect("residual block gradient") = dparams;
        Ok((CpuStorage::F32(upstream), l1.shape().clone()))
    }
}

/// One block of [`residual_blocks_train`]: its convolution + BatchNorm layers and its shortcut.
#[derive(Debug, Clone)]
pub struct ResidualBlock<'a> {
    /// The layers, in order.
    pub layers: Vec<ConvBn<'a>>,
    /// The shortcut.
    pub shortcut: Shortcut,
}

/// The output of the blocks run one after another (each as in the module docs) and each
/// block's layers' batch statistics, from which the caller updates its running averages. `x`
/// and every parameter must be f32 on the CPU ([`super::batch_norm::fused_ok`]); `eps` is the
/// BatchNorms' ε. Chaining blocks in one op also spares candle's `zeros_like` + `add` for the
/// gradient of every block input but the first.
pub fn residual_blocks_train(
    x: &Tensor,
    blocks: &[ResidualBlock<'_>],
    eps: f64,
) -> candle_core::Result<(Tensor, Vec<Vec<BatchStats>>)> {
    if blocks.is_empty() {
        candle_core::bail!("residual blocks: none given");
    }
    let mut flat = Vec::new();
    let mut specs = Vec::with_capacity(blocks.len());
    for (b, block) in blocks.iter().enumerate() {
        if let Shortcut::Subsample { stride: 0, .. } = block.shortcut {
            candle_core::bail!("residual block {b}: a subsampling shortcut with stride 0");
        }
        if block.layers.is_empty() {
            candle_core::bail!("residual block {b} without layers");
        }
        let mut weight_dims = Vec::with_capacity(block.layers.len());
        for (i, l) in block.layers.iter().enumerate() {
            let (o, c, kh, kw) = l.weight.dims4()?;
            if l.gamma.dims() != [o] || l.beta.dims() != [o] {
                candle_core::bail!(
                    "residual block {b} layer {i}: BatchNorm parameters {:?} and {:?} for {o} channels",
                    l.gamma.dims(),
                    l.beta.dims()
                );
            }
            weight_dims.push([o, c, kh, kw]);
            flat.extend([l.weight.flatten_all()?, l.gamma.clone(), l.beta.clone()]);
        }
        specs.push(Block {
            convs: block.layers.iter().map(|l| l.conv).collect(),
            weight_dims,
            shortcut: block.shortcut,
        });
    }
    let all: Vec<&Tensor> = std::iter::once(x).chain(&flat).collect();
    if !super::all_cpu_f32(&all) {
        candle_core::bail!("residual block op: every tensor must be f32 on the CPU");
    }
    let params = Tensor::cat(&flat, 0)?;
    let saved = Arc::new(Mutex::new(Saved::default()));
    let op = ResidualTrain {
        blocks: specs,
        eps,
        saved: saved.clone(),
    };
    let out = x.contiguous()?.apply_op2(&params, op)?;
    let stats = saved
        .lock()
        .expect("residual block state")
        .blocks
        .iter()
        .map(|b| b.stats.clone())
        .collect();
    Ok((out, stats))
}

/// One block: [`residual_blocks_train`] with a single block.
pub fn residual_block_train(
    x: &Tensor,
    layers: &[ConvBn<'_>],
    shortcut: Shortcut,
    eps: f64,
) -> candle_core::Result<(Tensor, Vec<BatchStats>)> {
    let block = ResidualBlock {
        layers: layers.to_vec(),
        shortcut,
    };
    let (out, mut stats) = residual_blocks_train(x, &[block], eps)?;
    Ok((out, stats.pop().unwrap_or_default()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::batch_norm::{add_relu, BnTrain};
    use crate::ops::conv::conv2d;
    use crate::ops::test_util::{flat, randn};
    use candle_core::{DType, Var, D};

    struct Layer {
        w: Var,
        gamma: Var,
        beta: Var,
        conv: Conv2dCpu,
    }

    fn layer(o: usize, c: usize, k: usize, padding: usize, dilation: usize) -> Layer {
        let var = |t: Tensor| Var::from_tensor(&t).unwrap();
        Layer {
            w: var((randn((o, c, k, k)) * 0.3).unwrap()),
            gamma: var(randn(o).affine(0.2, 1.0).unwrap()),
            beta: var((randn(o) * 0.2).unwrap()),
            conv: Conv2dCpu {
                stride: 1,
                padding,
                dilation,
            },
        }
    }

    fn conv_bns(layers: &[Layer]) -> Vec<ConvBn<'_>> {
        layers
            .iter()
            .map(|l| ConvBn {
                weight: l.w.as_tensor(),
                gamma: l.gamma.as_tensor(),
                beta: l.beta.as_tensor(),
                conv: l.conv,
            })
            .collect()
    }

    /// The same block from the separate ops (f32), with each BatchNorm's statistics.
    fn separate(x: &Tensor, layers: &[Layer], shortcut: Shortcut) -> (Tensor, Vec<BatchStats>) {
        let mut a = x.clone();
        let mut stats = Vec::new();
        for (i, l) in layers.iter().enumerate() {
            let c = l.conv;
            let y = conv2d(&a, l.w.as_tensor(), c.stride, c.padding, c.dilation).unwrap();
            let st = Arc::new(Mutex::new(BatchStats::default()));
            let last = i + 1 == layers.len();
            let op = BnTrain {
                eps: 1e-5,
                relu: !last,
                stats: st.clone(),
            };
            a = y
                .apply_op3(l.gamma.as_tensor(), l.beta.as_tensor(), op)
                .unwrap();
            stats.push(st.lock().unwrap().clone());
        }
        (add_relu(&a, &option_a(x, shortcut)).unwrap(), stats)
    }

    /// The shortcut from candle's ops: strided rows and columns by reshaping (after padding
    /// to a multiple of the stride), then zero channels.
    fn option_a(x: &Tensor, shortcut: Shortcut) -> Tensor {
        let Shortcut::Subsample { stride: s, pad } = shortcut else {
            return x.clone();
        };
        let (n, c, h, w) = x.dims4().unwrap();
        let x = x
            .pad_with_zeros(2, 0, (s - h % s) % s)
            .unwrap()
            .pad_with_zeros(3, 0, (s - w % s) % s)
            .unwrap();
        let (hh, ww) = (h.div_ceil(s), w.div_ceil(s));
        x.reshape((n, c, hh, s, ww, s))
            .unwrap()
            .narrow(3, 0, 1)
            .unwrap()
            .narrow(5, 0, 1)
            .unwrap()
            .reshape((n, c, hh, ww))
            .unwrap()
            .pad_with_zeros(1, pad, pad)
            .unwrap()
    }

    /// The same block from candle's own ops in f64 (batch statistics, biased variance).
    fn reference_f64(x: &Tensor, layers: &[Layer], shortcut: Shortcut) -> Tensor {
        let f64 = |t: &Tensor| t.to_dtype(DType::F64).unwrap();
        let mut a = f64(x);
        for (i, l) in layers.iter().enumerate() {
            let c = l.conv;
            // f64 takes candle's own conv2d (made safe for strided backward by `conv2d`).
            let y = conv2d(&a, &f64(l.w.as_tensor()), c.stride, c.padding, c.dilation).unwrap();
            let per_channel = |t: &Tensor| {
                t.transpose(0, 1)
                    .unwrap()
                    .flatten_from(1)
                    .unwrap()
                    .mean_keepdim(D::Minus1)
                    .unwrap()
                    .reshape((1, (), 1, 1))
                    .unwrap()
            };
            let centred = y.broadcast_sub(&per_channel(&y)).unwrap();
            let var = per_channel(&centred.sqr().unwrap());
            let xhat = centred
                .broadcast_div(&(var + 1e-5).unwrap().sqrt().unwrap())
                .unwrap();
            let o = l.gamma.as_tensor().dim(0).unwrap();
            let bn = xhat
                .broadcast_mul(&f64(l.gamma.as_tensor()).reshape((1, o, 1, 1)).unwrap())
                .unwrap()
                .broadcast_add(&f64(l.beta.as_tensor()).reshape((1, o, 1, 1)).unwrap())
                .unwrap();
            a = if i + 1 == layers.len() {
                (bn + option_a(&f64(x), shortcut)).unwrap().relu().unwrap()
            } else {
                bn.relu().unwrap()
            };
        }
        a
    }

    fn close(what: &str, a: &[f64], b: &[f64], tol: f64) {
        assert_eq!(a.len(), b.len(), "{what}");
        let scale = b.iter().fold(1e-3f64, |m, v| m.max(v.abs()));
        for (i, (u, v)) in a.iter().zip(b).enumerate() {
            assert!(
                (u - v).abs() <= tol * scale,
                "{what}[{i}]: {u} vs {v} (scale {scale})"
            );
        }
    }

    /// Output, statistics and every gradient against the separate ops (f32, the same kernels in
    /// another order) and against candle's own ops in f64: a CIFAR BasicBlock on a non-square
    /// map, a dilated one, a bottleneck (1×1, 3×3, 1×1 with other widths inside), and a CIFAR
    /// block that halves odd and even sizes and widens 4 → 8 channels (option A).
    #[test]
    fn matches_the_separate_ops_and_candle_in_f64() {
        let mut strided = layer(8, 4, 3, 1, 1);
        strided.conv.stride = 2;
        let blocks: Vec<(usize, Vec<Layer>, Shortcut)> = vec![
            (
                4,
                vec![layer(4, 4, 3, 1, 1), layer(4, 4, 3, 1, 1)],
                Shortcut::Identity,
            ),
            (
                3,
                vec![layer(3, 3, 3, 2, 2), layer(3, 3, 3, 1, 1)],
                Shortcut::Identity,
            ),
            (
                6,
                vec![
                    layer(2, 6, 1, 0, 1),
                    layer(2, 2, 3, 2, 2),
                    layer(6, 2, 1, 0, 1),
                ],
                Shortcut::Identity,
            ),
            (
                4,
                vec![strided, layer(8, 8, 3, 1, 1)],
                Shortcut::Subsample { stride: 2, pad: 2 },
            ),
        ];
        for (b, (c, layers, shortcut)) in blocks.iter().enumerate() {
            let x = Var::from_tensor(&randn((5, *c, 7, 6))).unwrap();
            let (ours, stats) =
                residual_block_train(x.as_tensor(), &conv_bns(layers), *shortcut, 1e-5).unwrap();
            let up = randn(ours.dims());
            let (theirs, their_stats) = separate(x.as_tensor(), layers, *shortcut);
            let reference = reference_f64(x.as_tensor(), layers, *shortcut);
            close(
                &format!("block {b} output"),
                &flat(&ours),
                &flat(&theirs),
                1e-6,
            );
            close(
                &format!("block {b} output vs f64"),
                &flat(&ours),
                &flat(&reference),
                1e-5,
            );
            for (s, t) in stats.iter().zip(&their_stats) {
                close("mean", &s.mean, &t.mean, 1e-12);
                close("var", &s.var, &t.var, 1e-12);
                assert_eq!(s.count, t.count);
            }
            let grads = |t: &Tensor| (t * &up).unwrap().sum_all().unwrap().backward().unwrap();
            let (g, h) = (grads(&ours), grads(&theirs));
            let up64 = up.to_dtype(DType::F64).unwrap();
            let r = (reference * up64)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let mut vars = vec![&x];
            for l in layers {
                vars.extend([&l.w, &l.gamma, &l.beta]);
            }
            for (j, v) in vars.iter().enumerate() {
                let ours = flat(g.get(v.as_tensor()).unwrap());
                close(
                    &format!("block {b} gradient {j}"),
                    &ours,
                    &flat(h.get(v.as_tensor()).unwrap()),
                    1e-5,
                );
                close(
                    &format!("block {b} gradient {j} vs f64"),
                    &ours,
                    &flat(r.get(v.as_tensor()).unwrap()),
                    1e-4,
                );
            }
        }
    }

    /// Three blocks in one op (identity, option A widening 3 → 5 channels at stride 2,
    /// identity) against the same blocks as separate ops one after another: outputs, every
    /// gradient and every layer's statistics.
    #[test]
    fn a_chain_of_blocks_matches_the_blocks_one_by_one() {
        let mut strided = layer(5, 3, 3, 1, 1);
        strided.conv.stride = 2;
        let blocks: Vec<(Vec<Layer>, Shortcut)> = vec![
            (
                vec![layer(3, 3, 3, 1, 1), layer(3, 3, 3, 1, 1)],
                Shortcut::Identity,
            ),
            (
                vec![strided, layer(5, 5, 3, 1, 1)],
                Shortcut::Subsample { stride: 2, pad: 1 },
            ),
            (
                vec![layer(5, 5, 3, 1, 1), layer(5, 5, 3, 1, 1)],
                Shortcut::Identity,
            ),
        ];
        let x = Var::from_tensor(&randn((4, 3, 9, 8))).unwrap();
        let chain: Vec<ResidualBlock<'_>> = blocks
            .iter()
            .map(|(layers, shortcut)| ResidualBlock {
                layers: conv_bns(layers),
                shortcut: *shortcut,
            })
            .collect();
        let (ours, stats) = residual_blocks_train(x.as_tensor(), &chain, 1e-5).unwrap();
        let mut theirs = x.as_tensor().clone();
        let mut their_stats = Vec::new();
        for (layers, shortcut) in &blocks {
            let (y, st) = separate(&theirs, layers, *shortcut);
            theirs = y;
            their_stats.push(st);
        }
        close("chain output", &flat(&ours), &flat(&theirs), 1e-6);
        for (s, t) in stats.iter().flatten().zip(their_stats.iter().flatten()) {
            close("chain mean", &s.mean, &t.mean, 1e-12);
            close("chain var", &s.var, &t.var, 1e-12);
        }
        assert_eq!(stats.iter().flatten().count(), 6);
        let up = randn(ours.dims());
        let grads = |t: &Tensor| (t * &up).unwrap().sum_all().unwrap().backward().unwrap();
        let (g, h) = (grads(&ours), grads(&theirs));
        let mut vars = vec![&x];
        for (layers, _) in &blocks {
            for l in layers {
                vars.extend([&l.w, &l.gamma, &l.beta]);
            }
        }
        for (j, v) in vars.iter().enumerate() {
            let (a, b) = (g.get(v.as_tensor()).unwrap(), h.get(v.as_tensor()).unwrap());
            close(&format!("chain gradient {j}"), &flat(a), &flat(b), 1e-5);
        }
    }

    /// Images that are not variables get no gradient (and none is computed).
    #[test]
    fn a_constant_input_gets_no_gradient() {
        let layers = vec![layer(3, 3, 3, 1, 1), layer(3, 3, 3, 1, 1)];
        let x = randn((2, 3, 5, 5));
        let (out, _) =
            residual_block_train(&x, &conv_bns(&layers), Shortcut::Identity, 1e-5).unwrap();
        let g = out.sum_all().unwrap().backward().unwrap();
        assert!(g.get(&x).is_none());
        assert!(g.get(layers[0].w.as_tensor()).is_some());
    }

    #[test]
    fn bad_blocks_are_errors() {
        let x = randn((2, 3, 5, 5));
        let widen = vec![layer(3, 3, 3, 1, 1), layer(4, 3, 3, 1, 1)];
        let e = residual_block_train(&x, &conv_bns(&widen), Shortcut::Identity, 1e-5).unwrap_err();
        assert!(e.to_string().contains("not the shortcut's"), "{e}");
        let half = Shortcut::Subsample { stride: 2, pad: 0 };
        let same = vec![layer(3, 3, 3, 1, 1)];
        assert!(residual_block_train(&x, &conv_bns(&same), half, 1e-5).is_err());
        let zero = Shortcut::Subsample { stride: 0, pad: 0 };
        assert!(residual_block_train(&x, &conv_bns(&same), zero, 1e-5).is_err());
        let mut strided = vec![layer(3, 3, 3, 1, 1)];
        strided[0].conv.stride = 2;
        assert!(residual_block_train(&x, &conv_bns(&strided), Shortcut::Identity, 1e-5).is_err());
        let mismatched = vec![layer(3, 4, 3, 1, 1)];
        assert!(
            residual_block_train(&x, &conv_bns(&mismatched), Shortcut::Identity, 1e-5).is_err()
        );
        assert!(residual_block_train(&x, &[], Shortcut::Identity, 1e-5).is_err());
        let x64 = x.to_dtype(DType::F64).unwrap();
        let ok = vec![layer(3, 3, 3, 1, 1)];
        assert!(residual_block_train(&x64, &conv_bns(&ok), Shortcut::Identity, 1e-5).is_err());
    }
}
