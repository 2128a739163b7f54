//! # sar-dfdx-models: sar-models' networks on dfdx
//!
//! The networks of `sar-models` (candle) written over `sar-dfdx`'s [`Params`], with the same
//! variable names, shapes and layouts, so a checkpoint written by one library loads in the
//! other (and torchvision's ImageNet weights load into the ResNets). Activations are NHWC rows
//! `[N·H·W, C]` (see [`sar_dfdx::conv`]). Every network runs in f32 (training) and f64 (the
//! cross-checks against candle), on any dfdx device.
//!
//! - [`Forward`]: a forward pass's variables, gather indices and mode, with conv / BatchNorm /
//!   linear layers by name. BatchNorm in training mode normalises with the batch's biased
//!   variance (eps from `sar_math::batch_norm`, 1e-5) and updates the running statistics with
//!   its momentum (0.1) and the unbiased variance, like PyTorch; in evaluation mode it uses the
//!   running statistics.
//! - [`Classifier`]: the small CNN (three conv3×3-BN-ReLU stages, 32/64/128 channels, strides
//!   1/2/2, global average pooling, `fc`), its max-pooling variant `cnn-pool` (strides 1, a 2×2
//!   max-pool after the first two stages, [`max_pool_2x2`]), the CIFAR ResNets (depth 6n+2,
//!   option-A shortcuts, global average pooling, `fc`) and torchvision's ResNet-18 / ResNet-50
//!   (v1.5: a Bottleneck's stride is on its 3×3 conv) with either stem — [`Stem::Imagenet`]:
//!   `conv1` 7×7/2 (padding 3) → `bn1` → ReLU → max-pool 3×3/2 (padding 1, [`max_pool2d`]);
//!   [`Stem::Cifar`]: `conv1` 3×3/1 (padding 1) → `bn1` → ReLU — then `layer1..4` (base widths
//!   64/128/256/512, stride 2 from `layer2` on, projection shortcuts
//!   `layerX.0.downsample.{0 (1×1 conv), 1 (BN)}`), global average pooling to the 512-d
//!   (ResNet-18) or 2048-d (ResNet-50) feature, `fc`.
//! - [`cross_entropy`] against soft targets (MixUp) and [`one_hot`].
//! - [`seg`]: the segmentation networks under mmsegmentation's names: the dilated ResNet V1c
//!   with FCN or DeepLabV3's ASPP and the auxiliary FCN head, HRNetV2 with FCN or OCRNet's
//!   heads, SegFormer on a Mix Transformer ([`mit`]), UPerNet on a Swin Transformer
//!   ([`swin`]), with the token pieces they share in [`transformer`].
//!
//! SAR itself on dfdx (the backend, the SAR head, conv/norm ops, [`Params`], SGD) is
//! `sar-dfdx`.

use num_traits::NumCast;
use sar_dfdx::conv::{conv2d, max_pool2d, max_pool_2x2, option_a, ConvGeometry, GatherCache};
use sar_dfdx::dfdx::prelude::*;
use sar_dfdx::nn::{linear, Params, Rows};
use sar_dfdx::{ConvOut, Float, Result, SarDevice, SarDfdxError};
use sar_math::batch_norm::{EPS as BN_EPS, MOMENTUM as BN_MOMENTUM};

pub mod mit;
pub mod seg;
pub mod swin;
pub mod transformer;

fn shape_err<T>(msg: String) -> Result<T> {
    Err(SarDfdxError::Shape(msg))
}

/// `v` in element type `E` (f32 and f64 represent every value these conversions see).
fn cast<E: Float>(v: f64) -> E {
    <E as NumCast>::from(v).unwrap_or_else(E::nan)
}

/// What a forward pass needs besides the input: variables, gather indices, the mode.
pub struct Forward<'a, D, E = f32>
where
    E: Float,
    D: SarDevice<E>,
{
    /// Variables (running statistics are updated in training mode).
    pub params: &'a mut Params<D, E>,
    /// Gather indices by geometry.
    pub cache: &'a mut GatherCache<D>,
    /// Training mode (BatchNorm batch statistics).
    pub train: bool,
}

impl<E: Float, D: SarDevice<E>> Forward<'_, D, E> {
    /// A conv without bias, `{prefix}.weight [cout, cin, k, k]`, over NHWC rows of `(n, h, w)`
    /// pixels; returns the rows and the output (h, w).
    pub fn conv<T: Tape<E, D>>(
        &mut self,
        x: Rows<D, T, E>,
        prefix: &str,
        (n, h, w): (usize, usize, usize),
        stride: usize,
        pad: usize,
    ) -> Result<ConvOut<E, D, T>> {
        self.conv_dilated(x, prefix, (n, h, w), stride, pad, 1)
    }

    /// [`Forward::conv`] with dilation `dilation`.
    pub fn conv_dilated<T: Tape<E, D>>(
        &mut self,
        x: Rows<D, T, E>,
        prefix: &str,
        (n, h, w): (usize, usize, usize),
        stride: usize,
        pad: usize,
        dilation: usize,
    ) -> Result<ConvOut<E, D, T>> {
        let name = format!("{prefix}.weight");
        let &[cout, cin, k, k2] = self.params.shape(&name)? else {
            return shape_err(format!("{name} must be [Cout, Cin, K, K]"));
        };
        if k != k2 || x.shape().1 != cin {
            return shape_err(format!(
                "{name} {:?} does not fit {} input channels",
                self.params.shape(&name)?,
                x.shape().1
            ));
        }
        let geom = ConvGeometry::new(n, (h, w), k, stride, pad).dilated(dilation);
        conv2d(self.cache, x, self.params.taped(&name)?, geom, cout)
    }

    /// BatchNorm over rows `[R, C]` (`{prefix}.{weight,bias,running_mean,running_var}`),
    /// optionally followed by ReLU. See the module docs for the two modes.
    pub fn bn<T: Tape<E, D>>(
        &mut self,
        x: Rows<D, T, E>,
        prefix: &str,
        relu: bool,
    ) -> Result<Rows<D, T, E>> {
        let (r, c) = *x.shape();
        let p = |s: &str| format!("{prefix}.{s}");
        let gamma = self.params.taped::<T>(&p("weight"))?;
        let beta = self.params.taped::<T>(&p("bias"))?;
        if gamma.shape().0 != c {
            return shape_err(format!(
                "{prefix} has {} channels, the input {c}",
                gamma.shape().0
            ));
        }
        if self.train {
            let (y, mean, var) = D::batch_norm_train(x, gamma, beta, BN_EPS, relu)?;
            // The running statistics, outside the graph (unbiased variance, like PyTorch).
            let unbias = if r > 1 {
                r as f64 / (r as f64 - 1.0)
            } else {
                1.0
            };
            let rm = self.params.get(&p("running_mean"))?.as_vec();
            let rv = self.params.get(&p("running_var"))?.as_vec();
            let f = |v: &E| v.to_f64().unwrap_or(f64::NAN);
            let new_mean = rm
                .iter()
                .zip(&mean)
                .map(|(a, b)| cast((1.0 - BN_MOMENTUM) * f(a) + BN_MOMENTUM * f(b)))
                .collect();
            let new_var = rv
                .iter()
                .zip(&var)
                .map(|(a, b)| cast((1.0 - BN_MOMENTUM) * f(a) + BN_MOMENTUM * f(b) * unbias))
                .collect();
            self.params.set(&p("running_mean"), new_mean)?;
            self.params.set(&p("running_var"), new_var)?;
            return Ok(y);
        }
        let rm = self.params.get(&p("running_mean"))?.clone();
        let rv = self.params.get(&p("running_var"))?.clone();
        let inv = (rv + cast::<E>(BN_EPS)).sqrt().recip();
        let normed = (x - rm.broadcast_like::<_, Axis<0>>(&(r, c)))
            * inv.broadcast_like::<_, Axis<0>>(&(r, c));
        let y = normed * gamma.broadcast_like::<_, Axis<0>>(&(r, c))
            + beta.broadcast_like::<_, Axis<0>>(&(r, c));
        Ok(if relu { y.relu() } else { y })
    }

    /// `x W^T + b` with `{prefix}.weight [out, in]`, `{prefix}.bias [out]`.
    pub fn linear<T: Tape<E, D>>(
        &mut self,
        x: Rows<D, T, E>,
        prefix: &str,
    ) -> Result<Rows<D, T, E>> {
        linear(self.params, x, prefix)
    }

    /// torchvision's residual block `name` (`layerX.i`) on rows of `(n, h, w)` pixels with
    /// `cin` channels: BasicBlock (3×3 `conv1` with `stride` → `bn1` → ReLU → 3×3 `conv2` →
    /// `bn2`) or Bottleneck (1×1 `conv1` → `bn1` → ReLU → 3×3 `conv2` with `stride` → `bn2` →
    /// ReLU → 1×1 `conv3` → `bn3`), the strided 3×3 conv dilated by `dilation` (padding =
    /// dilation; a BasicBlock's second conv is never dilated, as in mmsegmentation), plus
    /// the shortcut (`downsample.0` 1×1 conv with `stride` → `downsample.1` BN when the stride
    /// or the width changes, else the identity), then ReLU. Returns the rows and (h, w).
    pub fn residual_block<T: Tape<E, D>>(
        &mut self,
        x: Rows<D, T, E>,
        name: &str,
        (n, h, w): (usize, usize, usize),
        block: Block,
    ) -> Result<ConvOut<E, D, T>> {
        let Block {
            bottleneck,
            width,
            stride,
            dilation,
        } = block;
        let cin = x.shape().1;
        let out = if bottleneck { 4 * width } else { width };
        let shortcut = if stride != 1 || cin != out {
            let (s, _) = self.conv(
                x.retaped::<T>(),
                &format!("{name}.downsample.0"),
                (n, h, w),
                stride,
                0,
            )?;
            self.bn(s, &format!("{name}.downsample.1"), false)?
        } else {
            x.retaped::<T>()
        };
        let d = dilation;
        let (y, hw) = if bottleneck {
            let (y, _) = self.conv(x, &format!("{name}.conv1"), (n, h, w), 1, 0)?;
            let y = self.bn(y, &format!("{name}.bn1"), true)?;
            let (y, hw) =
                self.conv_dilated(y, &format!("{name}.conv2"), (n, h, w), stride, d, d)?;
            let y = self.bn(y, &format!("{name}.bn2"), true)?;
            let (y, _) = self.conv(y, &format!("{name}.conv3"), (n, hw.0, hw.1), 1, 0)?;
            (self.bn(y, &format!("{name}.bn3"), false)?, hw)
        } else {
            // mmsegmentation dilates only a BasicBlock's first conv (torchvision's BasicBlock
            // has no dilation at all).
            let (y, hw) =
                self.conv_dilated(x, &format!("{name}.conv1"), (n, h, w), stride, d, d)?;
            let y = self.bn(y, &format!("{name}.bn1"), true)?;
            let (y, _) = self.conv(y, &format!("{name}.conv2"), (n, hw.0, hw.1), 1, 1)?;
            (self.bn(y, &format!("{name}.bn2"), false)?, hw)
        };
        if *y.shape() != *shortcut.shape() {
            return shape_err(format!(
                "{name}: the block's output {:?} and its shortcut {:?} differ",
                y.shape(),
                shortcut.shape()
            ));
        }
        Ok(((y + shortcut).relu(), hw))
    }
}

/// One residual block of [`Forward::residual_block`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Block {
    /// Bottleneck (1×1, 3×3, 1×1, output 4·width) or BasicBlock (3×3, 3×3, output width).
    pub bottleneck: bool,
    /// Base width (64, 128, 256, 512 in torchvision's stages).
    pub width: usize,
    /// Stride of the block's strided conv and of its shortcut.
    pub stride: usize,
    /// Dilation of its 3×3 convs (1 in the classification networks).
    pub dilation: usize,
}

/// Which network.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    /// The small CNN.
    SmallCnn,
    /// The small CNN with max-pooling (`cnn-pool`).
    CnnPool,
    /// A CIFAR ResNet of depth 6n+2.
    CifarResNet {
        /// Depth (32 for ResNet-32).
        depth: usize,
    },
    /// torchvision's ResNet-18 or ResNet-50 with a stem.
    ResNet {
        /// ResNet-18 or ResNet-50.
        depth: Depth,
        /// The ImageNet or the CIFAR stem.
        stem: Stem,
    },
}

/// Which torchvision ResNet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Depth {
    /// BasicBlocks [2, 2, 2, 2].
    R18,
    /// Bottlenecks [3, 4, 6, 3].
    R50,
}

/// The first layers of a torchvision ResNet (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stem {
    /// `conv1` 7×7/2, `bn1`, ReLU, max-pool 3×3/2.
    Imagenet,
    /// `conv1` 3×3/1, `bn1`, ReLU.
    Cifar,
}

/// A classification network over NHWC rows (see the module docs).
#[derive(Debug, Clone, Copy)]
pub struct Classifier {
    /// The network.
    pub arch: Arch,
}

impl Classifier {
    /// A network; checks the depth.
    pub fn new(arch: Arch) -> Result<Self> {
        if let Arch::CifarResNet { depth } = arch {
            if depth < 8 || !(depth - 2).is_multiple_of(6) {
                return shape_err(format!(
                    "a CIFAR ResNet has depth 6n+2 (20, 32, 44, …), got {depth}"
                ));
            }
        }
        Ok(Classifier { arch })
    }

    /// The feature dimension D.
    pub fn feature_dim(&self) -> usize {
        match self.arch {
            Arch::SmallCnn | Arch::CnnPool => 128,
            Arch::CifarResNet { .. } => 64,
            Arch::ResNet {
                depth: Depth::R18, ..
            } => 512,
            Arch::ResNet {
                depth: Depth::R50, ..
            } => 2048,
        }
    }

    /// Features `[N, D]` of images given as NHWC rows `[N·H·W, C]`.
    pub fn features<E: Float, D: SarDevice<E>, T: Tape<E, D>>(
        &self,
        f: &mut Forward<D, E>,
        x: Rows<D, T, E>,
        (n, mut h, mut w): (usize, usize, usize),
    ) -> Result<Rows<D, T, E>> {
        let mut x = x;
        match self.arch {
            Arch::SmallCnn | Arch::CnnPool => {
                let pooled = self.arch == Arch::CnnPool;
                for i in 0..3 {
                    let stride = if i == 0 || pooled { 1 } else { 2 };
                    let name = format!("stage{}", i + 1);
                    let (y, hw) = f.conv(x, &format!("{name}.conv"), (n, h, w), stride, 1)?;
                    x = f.bn(y, &format!("{name}.bn"), true)?;
                    (h, w) = hw;
                    if pooled && i < 2 {
                        (x, (h, w)) = max_pool_2x2(f.cache, x, (n, h, w))?;
                    }
                }
            }
            Arch::CifarResNet { depth } => {
                let (y, _) = f.conv(x, "conv1", (n, h, w), 1, 1)?;
                x = f.bn(y, "bn1", true)?;
                let mut c = 16;
                for (stage, width) in [16usize, 32, 64].into_iter().enumerate() {
                    for i in 0..(depth - 2) / 6 {
                        let stride = if stage > 0 && i == 0 { 2 } else { 1 };
                        let name = format!("layer{}.{i}", stage + 1);
                        let shortcut = if stride == 1 && width == c {
                            x.retaped::<T>()
                        } else {
                            option_a(
                                f.cache,
                                x.retaped::<T>(),
                                (n, h, w),
                                stride,
                                (width - c) / 2,
                            )?
                        };
                        let (y, hw) = f.conv(x, &format!("{name}.conv1"), (n, h, w), stride, 1)?;
                        let y = f.bn(y, &format!("{name}.bn1"), true)?;
                        let (y, hw2) =
                            f.conv(y, &format!("{name}.conv2"), (n, hw.0, hw.1), 1, 1)?;
                        let y = f.bn(y, &format!("{name}.bn2"), false)?;
                        x = (y + shortcut).relu();
                        (h, w) = hw2;
                        c = width;
                    }
                }
            }
            Arch::ResNet { depth, stem } => {
                let (y, hw) = match stem {
                    Stem::Imagenet => f.conv(x, "conv1", (n, h, w), 2, 3)?,
                    Stem::Cifar => f.conv(x, "conv1", (n, h, w), 1, 1)?,
                };
                x = f.bn(y, "bn1", true)?;
                (h, w) = hw;
                if stem == Stem::Imagenet {
                    (x, (h, w)) = max_pool2d(f.cache, x, (n, h, w), 3, 2, 1)?;
                }
                let (counts, bottleneck) = match depth {
                    Depth::R18 => ([2usize, 2, 2, 2], false),
                    Depth::R50 => ([3, 4, 6, 3], true),
                };
                for (stage, (&count, width)) in
                    counts.iter().zip([64usize, 128, 256, 512]).enumerate()
                {
                    for i in 0..count {
                        let block = Block {
                            bottleneck,
                            width,
                            stride: if stage > 0 && i == 0 { 2 } else { 1 },
                            dilation: 1,
                        };
                        let name = format!("layer{}.{i}", stage + 1);
                        (x, (h, w)) = f.residual_block(x, &name, (n, h, w), block)?;
                    }
                }
            }
        }
        // Global average pooling: [N·H·W, C] → [N, C].
        let ch = x.shape().1;
        Ok(x.reshape_like(&(n, h * w, ch))
            .mean::<(usize, usize), Axis<1>>())
    }

    /// Logits `[N, K]` = `fc`(features).
    pub fn classify<E: Float, D: SarDevice<E>, T: Tape<E, D>>(
        &self,
        params: &Params<D, E>,
        features: Rows<D, T, E>,
    ) -> Result<Rows<D, T, E>> {
        linear(params, features, "fc")
    }
}

/// Mean cross-entropy of logits `[N, K]` against soft targets `[N, K]` (one-hot labels, or
/// λ·onehot(a) + (1−λ)·onehot(b) for MixUp): −(1/N) Σ_n Σ_k t_nk log_softmax(z)_nk.
pub fn cross_entropy<E: Float, D: SarDevice<E>, T: Tape<E, D>>(
    logits: Rows<D, T, E>,
    targets: Vec<E>,
) -> Result<Tensor<Rank0, E, D, T>> {
    let (n, k) = *logits.shape();
    if targets.len() != n * k || n == 0 {
        return shape_err(format!(
            "cross-entropy: {} targets for logits [{n}, {k}]",
            targets.len()
        ));
    }
    let t = logits.device().tensor_from_vec(targets, (n, k));
    Ok((logits.log_softmax::<Axis<1>>() * t).sum::<Rank0, _>() * cast::<E>(-1.0 / n as f64))
}

/// One-hot rows `[N, K]` for labels `y` (checked to be in `0..K`).
pub fn one_hot(y: &[i64], k: usize) -> Result<Vec<f32>> {
    let mut t = vec![0.0f32; y.len() * k];
    for (i, &c) in y.iter().enumerate() {
        if !(0..k as i64).contains(&c) {
            return Err(sar_math::SarError::Label {
                op: sar_math::Op::P2a,
                index: i,
                label: c,
                classes: k,
            }
            .into());
        }
        t[i * k + c as usize] = 1.0;
    }
    Ok(t)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_variables_and_bad_shapes_are_errors() {
        let dev = Cpu::default();
        let mut params = Params::from_host(
            &dev,
            [("fc.weight".to_string(), vec![3, 4], vec![0.0f32; 12])],
        )
        .unwrap();
        let x: Rows<Cpu, NoneTape> = dev.zeros_like(&(2, 4));
        let mut cache = GatherCache::default();
        let mut f = Forward {
            params: &mut params,
            cache: &mut cache,
            train: true,
        };
        let e = f.bn(x, "bn1", false).err().unwrap().to_string();
        assert!(e.contains("bn1.weight"), "{e}");
        assert!(cross_entropy(dev.zeros_like(&(2, 3)), vec![0.0; 5]).is_err());
        assert!(one_hot(&[0, 3], 3).is_err());
    }
}
