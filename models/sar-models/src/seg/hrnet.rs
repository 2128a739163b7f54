//! HRNetV2 (Wang et al.), as mmsegmentation builds `HRNet` for `fcn_hr18` / `fcn_hr48`,
//! under `backbone.*` names.
//!
//! - Stem: `conv1` 3×3/2 (3 → 64) → `bn1` → ReLU → `conv2` 3×3/2 → `bn2` → ReLU (stride 4).
//! - `layer1`: 4 Bottlenecks (64 → 256).
//! - `transition1`: `transition1.0` (3×3, 256 → W; `.0` conv, `.1` BN, ReLU) and
//!   `transition1.1.0` (3×3/2, 256 → 2W).
//! - `stage2` (1 module, 2 branches), `stage3` (4 modules, 3 branches), `stage4` (3 modules,
//!   4 branches), every branch 4 BasicBlocks with widths W/2W/4W/8W; between stages,
//!   `transition{2,3}.{new}.0` is a 3×3/2 conv from the previous lowest-resolution branch.
//! - An HR module runs its branches (`stageS.M.branches.B.K.*`), then fuses: output i is
//!   ReLU(Σ_j f_ij(x_j)) with f_ii the identity; for j > i, `fuse_layers.i.j.0` 1×1 conv +
//!   `.1` BN, upsampled bilinearly by 2^(j−i) (align_corners = False); for j < i, i − j
//!   strided 3×3 convs `fuse_layers.i.j.k.{0,1}` (ReLU between, none after the last).
//!   (mmsegmentation upsamples by 2^(j−i) and then resizes to the target size; one bilinear
//!   resize is the same whenever the input side is a multiple of 32.)
//!
//! Returns the four branch outputs at strides 4/8/16/32.

use super::ConvBn;
use crate::layers::{Bn, Conv, ConvInit, ConvSpec};
use crate::params::Scope;
use crate::resize::resize_bilinear;
use crate::resnet::Block;
use crate::{Cost, Result};
use candle_core::Tensor;

enum Fuse {
    Identity,
    /// 1×1 conv + BN, then bilinear upsampling to the target size.
    Up(ConvBn),
    /// Strided 3×3 convs.
    Down(Vec<ConvBn>),
}

struct HrModule {
    branches: Vec<Vec<Block>>,
    fuse: Vec<Vec<Fuse>>,
}

fn basic_block(b: &Scope, cin: usize, cout: usize) -> Result<Block> {
    let how = ConvInit::KaimingFanOut;
    let convs = vec![
        (
            Conv::new(&b.pp("conv1"), ConvSpec::new(cin, cout, 3), how)?,
            Bn::new(&b.pp("bn1"), cout)?,
        ),
        (
            Conv::new(&b.pp("conv2"), ConvSpec::new(cout, cout, 3), how)?,
            Bn::new(&b.pp("bn2"), cout)?,
        ),
    ];
    let downsample = if cin != cout {
        Some((
            Conv::new(&b.pp("downsample").pp(0), ConvSpec::new(cin, cout, 1), how)?,
            Bn::new(&b.pp("downsample").pp(1), cout)?,
        ))
    } else {
        None
    };
    Ok(Block { convs, downsample })
}

fn bottleneck(s: &Scope, cin: usize, planes: usize) -> Result<Block> {
    let how = ConvInit::KaimingFanOut;
    let out = planes * 4;
    let mut convs = Vec::new();
    for (j, spec) in [
        ConvSpec::new(cin, planes, 1),
        ConvSpec::new(planes, planes, 3),
        ConvSpec::new(planes, out, 1),
    ]
    .into_iter()
    .enumerate()
    {
        convs.push((
            Conv::new(&s.pp(format!("conv{}", j + 1)), spec, how)?,
            Bn::new(&s.pp(format!("bn{}", j + 1)), spec.out_ch)?,
        ));
    }
    let downsample = if cin != out {
        Some((
            Conv::new(&s.pp("downsample").pp(0), ConvSpec::new(cin, out, 1), how)?,
            Bn::new(&s.pp("downsample").pp(1), out)?,
        ))
    } else {
        None
    };
    Ok(Block { convs, downsample })
}

impl HrModule {
    fn new(m: &Scope, channels: &[usize]) -> Result<Self> {
        let mut branches = Vec::new();
        for (b, &c) in channels.iter().enumerate() {
            let mut blocks = Vec::new();
            for k in 0..4 {
                blocks.push(basic_block(&m.pp("branches").pp(b).pp(k), c, c)?);
            }
            branches.push(blocks);
        }
        let n = channels.len();
        let mut fuse = Vec::new();
        for i in 0..n {
            let mut row = Vec::new();
            for j in 0..n {
                let f = m.pp("fuse_layers").pp(i).pp(j);
                row.push(if j == i {
                    Fuse::Identity
                } else if j > i {
                    Fuse::Up(ConvBn::plain(
                        &f.pp(0),
                        &f.pp(1),
                        ConvSpec::new(channels[j], channels[i], 1),
                        false,
                    )?)
                } else {
                    let mut convs = Vec::new();
                    for k in 0..i - j {
                        let last = k == i - j - 1;
                        let cout = if last { channels[i] } else { channels[j] };
                        convs.push(ConvBn::plain(
                            &f.pp(k).pp(0),
                            &f.pp(k).pp(1),
                            ConvSpec::new(channels[j], cout, 3).stride(2),
                            !last,
                        )?);
                    }
                    Fuse::Down(convs)
                });
            }
            fuse.push(row);
        }
        Ok(HrModule { branches, fuse })
    }

    fn forward(&self, xs: &[Tensor], train: bool) -> candle_core::Result<Vec<Tensor>> {
        let mut ys = Vec::with_capacity(xs.len());
        for (x, blocks) in xs.iter().zip(&self.branches) {
            let mut x = x.clone();
            for b in blocks {
                x = b.forward(&x, train)?;
            }
            ys.push(x);
        }
        let mut out = Vec::with_capacity(ys.len());
        for (i, row) in self.fuse.iter().enumerate() {
            let (_, _, h, w) = ys[i].dims4()?;
            let mut acc: Option<Tensor> = None;
            for (j, f) in row.iter().enumerate() {
                let t = match f {
                    Fuse::Identity => ys[j].clone(),
                    Fuse::Up(m) => resize_bilinear(&m.forward(&ys[j], train)?, h, w)?,
                    Fuse::Down(ms) => {
                        let mut t = ys[j].clone();
                        for m in ms {
                            t = m.forward(&t, train)?;
                        }
                        t
                    }
                };
                acc = Some(match acc {
                    None => t,
                    Some(a) => (a + t)?,
                });
            }
            out.push(acc.expect("at least one branch").relu()?);
        }
        Ok(out)
    }

    fn cost(&self, sizes: &[(usize, usize)]) -> Cost {
        let mut total = Cost { params: 0, macs: 0 };
        for (blocks, &(h, w)) in self.branches.iter().zip(sizes) {
            for b in blocks {
                total = total + b.cost(h, w).0;
            }
        }
        for row in &self.fuse {
            for (j, f) in row.iter().enumerate() {
                let (h, w) = sizes[j];
                match f {
                    Fuse::Identity => {}
                    Fuse::Up(m) => total = total + m.cost(h, w).0,
                    Fuse::Down(ms) => {
                        let (mut h, mut w) = (h, w);
                        for m in ms {
                            let (c, oh, ow) = m.cost(h, w);
                            total = total + c;
                            (h, w) = (oh, ow);
                        }
                    }
                }
            }
        }
        total
    }
}

/// The transitions into a stage (`None`: the branch passes through) and its modules.
type Stage = (Vec<Option<Vec<ConvBn>>>, Vec<HrModule>);

/// See the module docs.
pub struct HrNetV2 {
    stem: Vec<ConvBn>,
    layer1: Vec<Block>,
    /// Per stage 2..4: transitions (None: pass the branch through) and modules.
    stages: Vec<Stage>,
    channels: [usize; 4],
}

impl HrNetV2 {
    /// HRNetV2-W`width` in scope `init` (W18: width 18; W48: 48).
    pub fn new(init: &Scope, in_channels: usize, width: usize) -> Result<Self> {
        let stem = vec![
            ConvBn::plain(
                &init.pp("conv1"),
                &init.pp("bn1"),
                ConvSpec::new(in_channels, 64, 3).stride(2),
                true,
            )?,
            ConvBn::plain(
                &init.pp("conv2"),
                &init.pp("bn2"),
                ConvSpec::new(64, 64, 3).stride(2),
                true,
            )?,
        ];
        let mut layer1 = Vec::new();
        for k in 0..4 {
            let cin = if k == 0 { 64 } else { 256 };
            layer1.push(bottleneck(&init.pp("layer1").pp(k), cin, 64)?);
        }
        let channels = [width, 2 * width, 4 * width, 8 * width];
        let mut stages = Vec::new();
        let mut pre: Vec<usize> = vec![256];
        for (s, modules) in [(2usize, 1usize), (3, 4), (4, 3)] {
            let cur = &channels[..s];
            let mut trans = Vec::new();
            for (i, &c) in cur.iter().enumerate() {
                let t = init.pp(format!("transition{}", s - 1)).pp(i);
                trans.push(if i < pre.len() {
                    if pre[i] == c {
                        None
                    } else {
                        Some(vec![ConvBn::plain(
                            &t.pp(0),
                            &t.pp(1),
                            ConvSpec::new(pre[i], c, 3),
                            true,
                        )?])
                    }
                } else {
                    let mut convs = Vec::new();
                    let extra = i + 1 - pre.len();
                    let cin = *pre.last().expect("a previous branch");
                    for j in 0..extra {
                        let cout = if j == i - pre.len() { c } else { cin };
                        convs.push(ConvBn::plain(
                            &t.pp(j).pp(0),
                            &t.pp(j).pp(1),
                            ConvSpec::new(cin, cout, 3).stride(2),
                            true,
                        )?);
                    }
                    Some(convs)
                });
            }
            let mut mods = Vec::new();
            for m in 0..modules {
                mods.push(HrModule::new(&init.pp(format!("stage{s}")).pp(m), cur)?);
            }
            stages.push((trans, mods));
            pre = cur.to_vec();
        }
        Ok(HrNetV2 {
            stem,
            layer1,
            stages,
            channels,
        })
    }

    /// Channels of the four branch outputs.
    pub fn widths(&self) -> [usize; 4] {
        self.channels
    }

    /// The four branch outputs (strides 4, 8, 16, 32).
    pub fn forward(&self, x: &Tensor, train: bool) -> candle_core::Result<Vec<Tensor>> {
        let mut x = x.clone();
        for m in &self.stem {
            x = m.forward(&x, train)?;
        }
        for b in &self.layer1 {
            x = b.forward(&x, train)?;
        }
        let mut ys = vec![x];
        for (trans, mods) in &self.stages {
            let mut xs = Vec::with_capacity(trans.len());
            for (i, t) in trans.iter().enumerate() {
                // mmsegmentation feeds a new branch from the last existing one.
                let src = if i < ys.len() {
                    &ys[i]
                } else {
                    ys.last().expect("branch")
                };
                xs.push(match t {
                    None => src.clone(),
                    Some(convs) => {
                        let mut y = src.clone();
                        for m in convs {
                            y = m.forward(&y, train)?;
                        }
                        y
                    }
                });
            }
            for m in mods {
                xs = m.forward(&xs, train)?;
            }
            ys = xs;
        }
        Ok(ys)
    }

    /// Cost on an `h × w` image, and the size of each branch output.
    pub fn cost(&self, mut h: usize, mut w: usize) -> (Cost, Vec<(usize, usize)>) {
        let mut total = Cost { params: 0, macs: 0 };
        for m in &self.stem {
            let (c, oh, ow) = m.cost(h, w);
            total = total + c;
            (h, w) = (oh, ow);
        }
        for b in &self.layer1 {
            total = total + b.cost(h, w).0;
        }
        let mut sizes = vec![(h, w)];
        for (trans, mods) in &self.stages {
            let mut new_sizes = Vec::new();
            for (i, t) in trans.iter().enumerate() {
                let (mut hh, mut ww) = if i < sizes.len() {
                    sizes[i]
                } else {
                    *sizes.last().expect("size")
                };
                if let Some(convs) = t {
                    for m in convs {
                        let (c, oh, ow) = m.cost(hh, ww);
                        total = total + c;
                        (hh, ww) = (oh, ow);
                    }
                }
                new_sizes.push((hh, ww));
            }
            for m in mods {
                total = total + m.cost(&new_sizes);
            }
            sizes = new_sizes;
        }
        (total, sizes)
    }
}
