//! # sar-dfdx-models: the classification networks on dfdx
//!
//! The networks of `sar-models` (candle) written over `sar-dfdx`'s [`Params`], with the same
//! variable names, shapes and layouts, so a checkpoint written by one library loads in the
//! other. Activations are NHWC rows `[N·H·W, C]` (see [`sar_dfdx::conv`]).
//!
//! - [`Forward`]: a forward pass's variables, gather indices and mode, with conv / BatchNorm /
//!   linear layers by name. BatchNorm in training mode normalises with the batch's biased
//!   variance (eps from `sar_math::batch_norm`, 1e-5) and updates the running statistics with
//!   its momentum (0.1) and the unbiased variance, like PyTorch; in evaluation mode it uses the
//!   running statistics.
//! - [`Classifier`]: the small CNN (three conv3×3-BN-ReLU stages, 32/64/128 channels, strides
//!   1/2/2, global average pooling, `fc`), its max-pooling variant `cnn-pool` (strides 1, a 2×2
//!   max-pool after the first two stages, [`max_pool_2x2`]) and the CIFAR ResNets (depth 6n+2, option-A
//!   shortcuts, global average pooling, `fc`).
//! - [`cross_entropy`] against soft targets (MixUp) and [`one_hot`].
//!
//! SAR itself on dfdx (the backend, the SAR head, conv/norm ops, [`Params`], SGD) is
//! `sar-dfdx`.

use sar_dfdx::conv::{conv2d, max_pool_2x2, option_a, ConvGeometry, GatherCache};
use sar_dfdx::dfdx::prelude::*;
use sar_dfdx::nn::{linear, Params, Rows};
use sar_dfdx::{Result, SarDevice, SarDfdxError};
use sar_math::batch_norm::{EPS as BN_EPS, MOMENTUM as BN_MOMENTUM};

fn shape_err<T>(msg: String) -> Result<T> {
    Err(SarDfdxError::Shape(msg))
}

/// What a forward pass needs besides the input: variables, gather indices, the mode.
pub struct Forward<'a, D: SarDevice<f32>> {
    /// Variables (running statistics are updated in training mode).
    pub params: &'a mut Params<D>,
    /// Gather indices by geometry.
    pub cache: &'a mut GatherCache<D>,
    /// Training mode (BatchNorm batch statistics).
    pub train: bool,
}

impl<D: SarDevice<f32>> Forward<'_, D> {
    /// A conv without bias, `{prefix}.weight [cout, cin, k, k]`, over NHWC rows of `(n, h, w)`
    /// pixels; returns the rows and the output (h, w).
    pub fn conv<T: Tape<f32, D>>(
        &mut self,
        x: Rows<D, T>,
        prefix: &str,
        (n, h, w): (usize, usize, usize),
        stride: usize,
        pad: usize,
    ) -> Result<(Rows<D, T>, (usize, usize))> {
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
        let geom = ConvGeometry {
            n,
            h,
            w,
            k,
            stride,
            pad,
        };
        conv2d(self.cache, x, self.params.taped(&name)?, geom, cout)
    }

    /// BatchNorm over rows `[R, C]` (`{prefix}.{weight,bias,running_mean,running_var}`),
    /// optionally followed by ReLU. See the module docs for the two modes.
    pub fn bn<T: Tape<f32, D>>(
        &mut self,
        x: Rows<D, T>,
        prefix: &str,
        relu: bool,
    ) -> Result<Rows<D, T>> {
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
            let new_mean = rm
                .iter()
                .zip(&mean)
                .map(|(&a, &b)| ((1.0 - BN_MOMENTUM) * a as f64 + BN_MOMENTUM * b as f64) as f32)
                .collect();
            let new_var = rv
                .iter()
                .zip(&var)
                .map(|(&a, &b)| {
                    ((1.0 - BN_MOMENTUM) * a as f64 + BN_MOMENTUM * b as f64 * unbias) as f32
                })
                .collect();
            self.params.set(&p("running_mean"), new_mean)?;
            self.params.set(&p("running_var"), new_var)?;
            return Ok(y);
        }
        let rm = self.params.get(&p("running_mean"))?.clone();
        let rv = self.params.get(&p("running_var"))?.clone();
        let inv = (rv + BN_EPS as f32).sqrt().recip();
        let normed = (x - rm.broadcast_like::<_, Axis<0>>(&(r, c)))
            * inv.broadcast_like::<_, Axis<0>>(&(r, c));
        let y = normed * gamma.broadcast_like::<_, Axis<0>>(&(r, c))
            + beta.broadcast_like::<_, Axis<0>>(&(r, c));
        Ok(if relu { y.relu() } else { y })
    }

    /// `x W^T + b` with `{prefix}.weight [out, in]`, `{prefix}.bias [out]`.
    pub fn linear<T: Tape<f32, D>>(&mut self, x: Rows<D, T>, prefix: &str) -> Result<Rows<D, T>> {
        linear(self.params, x, prefix)
    }
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
        }
    }

    /// Features `[N, D]` of images given as NHWC rows `[N·H·W, C]`.
    pub fn features<D: SarDevice<f32>, T: Tape<f32, D>>(
        &self,
        f: &mut Forward<D>,
        x: Rows<D, T>,
        (n, mut h, mut w): (usize, usize, usize),
    ) -> Result<Rows<D, T>> {
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
        }
        // Global average pooling: [N·H·W, C] → [N, C].
        let ch = x.shape().1;
        Ok(x.reshape_like(&(n, h * w, ch))
            .mean::<(usize, usize), Axis<1>>())
    }

    /// Logits `[N, K]` = `fc`(features).
    pub fn classify<D: SarDevice<f32>, T: Tape<f32, D>>(
        &self,
        params: &Params<D>,
        features: Rows<D, T>,
    ) -> Result<Rows<D, T>> {
        linear(params, features, "fc")
    }
}

/// Mean cross-entropy of logits `[N, K]` against soft targets `[N, K]` (one-hot labels, or
/// λ·onehot(a) + (1−λ)·onehot(b) for MixUp): −(1/N) Σ_n Σ_k t_nk log_softmax(z)_nk.
pub fn cross_entropy<D: SarDevice<f32>, T: Tape<f32, D>>(
    logits: Rows<D, T>,
    targets: Vec<f32>,
) -> Result<Tensor<Rank0, f32, D, T>> {
    let (n, k) = *logits.shape();
    if targets.len() != n * k || n == 0 {
        return shape_err(format!(
            "cross-entropy: {} targets for logits [{n}, {k}]",
            targets.len()
        ));
    }
    let t = logits.device().tensor_from_vec(targets, (n, k));
    Ok((logits.log_softmax::<Axis<1>>() * t).sum::<Rank0, _>() * (-1.0 / n as f32))
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
