//! Convolution and the option-A shortcut from stable dfdx ops.
//!
//! dfdx 0.13's `conv2d` needs its `nightly` feature, which does not build here, so convolution
//! is composed from two ops that are stable and run on every dfdx device, each with dfdx's own
//! backward:
//!
//! 1. Activations are **NHWC rows** `X [N·H·W, C]` (row `(n·H + y)·W + x` holds the C channels
//!    of one pixel). One zero row is appended: `X̃ [N·H·W + 1, C]`.
//! 2. A **row gather** with an index `I [M, K·K]`, M = N·OH·OW, where `I[(n, oy, ox), (ky, kx)]`
//!    is the row of input pixel (oy·s − p + ky·d, ox·s − p + kx·d) of image n (d the
//!    dilation), or the zero row when that pixel lies in the padding: `P = X̃[I]` `[M, K·K, C]`, viewed as `[M, K·K·C]`
//!    (im2col, tap-major, channel-minor). Its backward scatter-adds into X̃ (the zero row's
//!    gradient is dropped with the concatenation's backward).
//! 3. A **matmul** with the kernel: the weight `W [Cout, Cin, K, K]` (PyTorch's layout, the
//!    names and layout every backend shares) permuted to `[K, K, Cin, Cout]` and viewed as
//!    `W' [K·K·Cin, Cout]`: `Y = P·W' [M, Cout]`, already NHWC rows of the output.
//!
//! `y[n, o, oy, ox] = Σ_{c, ky, kx} w[o, c, ky, kx] · x[n, c, oy·s − p + ky·d, ox·s − p + kx·d]`
//! (zero outside the image), exactly PyTorch's `conv2d` without bias or groups; OH =
//! ⌊(H + 2p − d·(K − 1) − 1)/s⌋ + 1.
//!
//! On other devices than the CPU (CUDA), these are dfdx's `concat_along`, `gather` and `matmul`
//! ([`conv_rows_generic`]). On dfdx's `Cpu`, steps 2–3 are one op with its own backward, the
//! same arithmetic parallel over images ([`ConvKernel`]).
//! The gather indices depend only on the geometry and are cached ([`GatherCache`]). The
//! option-A shortcut of the CIFAR ResNets (keep every `s`-th row and column, zero-pad the
//! channels on both sides) is a row gather followed by a concatenation with zero columns.
//!
//! Max-pooling ([`max_pool2d`]: K×K windows, stride s, padding p; [`max_pool_2x2`]) is K·K row
//! gathers from the rows with one −∞ row appended (the padding), the window's taps in
//! row-major order, folded by `choose(tap > best, tap, best)`: ties keep the earlier tap, so
//! the gradient of each output goes to the first maximum of its window, as in PyTorch (dfdx's
//! own `maximum` would split it between tied values).

use crate::{shape_err, Float, Result, SarDevice};
use dfdx::prelude::*;
use dfdx::tensor_ops::Device;
use sar_cpu::gemm::{matmul, Mat, MatMut};
use sar_cpu::scratch::with_scratch;
use std::collections::HashMap;

/// The geometry of one convolution over NHWC rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ConvGeometry {
    /// Batch.
    pub n: usize,
    /// Input height.
    pub h: usize,
    /// Input width.
    pub w: usize,
    /// Kernel size (square).
    pub k: usize,
    /// Stride.
    pub stride: usize,
    /// Zero padding on every side.
    pub pad: usize,
    /// Dilation d (atrous convolution: tap k reads input offset k·d; 1 is a plain conv).
    pub dilation: usize,
}

impl ConvGeometry {
    /// A K×K convolution of `n` images of `h`×`w` pixels with `stride` and `pad`, dilation 1.
    pub fn new(n: usize, (h, w): (usize, usize), k: usize, stride: usize, pad: usize) -> Self {
        ConvGeometry {
            n,
            h,
            w,
            k,
            stride,
            pad,
            dilation: 1,
        }
    }

    /// The same geometry with dilation `d`.
    pub fn dilated(self, d: usize) -> Self {
        ConvGeometry {
            dilation: d,
            ..self
        }
    }

    /// Output height and width: ⌊(H + 2p − d·(K − 1) − 1)/s⌋ + 1.
    pub fn out_hw(&self) -> Result<(usize, usize)> {
        let (h, w, k, s, p, d) = (self.h, self.w, self.k, self.stride, self.pad, self.dilation);
        let extent = d * k.saturating_sub(1) + 1;
        if k == 0 || s == 0 || d == 0 || h + 2 * p < extent || w + 2 * p < extent {
            return shape_err(format!(
                "conv: kernel {k}, stride {s}, padding {p}, dilation {d} do not fit a {h}×{w} input"
            ));
        }
        Ok(((h + 2 * p - extent) / s + 1, (w + 2 * p - extent) / s + 1))
    }

    /// The im2col row indices `[N·OH·OW, K·K]` (see the module docs); `N·H·W` is the zero row.
    pub fn im2col_rows(&self) -> Result<Vec<usize>> {
        let (oh, ow) = self.out_hw()?;
        let (h, w, k) = (self.h as isize, self.w as isize, self.k);
        let zero = self.n * self.h * self.w;
        let mut idx = Vec::with_capacity(self.n * oh * ow * k * k);
        for b in 0..self.n {
            for oy in 0..oh {
                for ox in 0..ow {
                    for ky in 0..k {
                        for kx in 0..k {
                            let (sy, sx) = (oy * self.stride, ox * self.stride);
                            let d = self.dilation;
                            let iy = (sy + ky * d) as isize - self.pad as isize;
                            let ix = (sx + kx * d) as isize - self.pad as isize;
                            idx.push(if (0..h).contains(&iy) && (0..w).contains(&ix) {
                                (b * self.h + iy as usize) * self.w + ix as usize
                            } else {
                                zero
                            });
                        }
                    }
                }
            }
        }
        Ok(idx)
    }
}

/// Gather indices by geometry, uploaded once per device (and kept on the host for the CPU
/// kernel).
pub struct GatherCache<D: Storage<usize>> {
    conv: HashMap<ConvGeometry, Tensor<(usize, usize), usize, D>>,
    host: HashMap<ConvGeometry, std::sync::Arc<Vec<usize>>>,
    subsample: HashMap<(usize, usize, usize, usize), crate::Flat<usize, D>>,
    pool: HashMap<PoolKey, Vec<crate::Flat<usize, D>>>,
}

impl<D: Storage<usize>> Default for GatherCache<D> {
    fn default() -> Self {
        GatherCache {
            conv: HashMap::new(),
            host: HashMap::new(),
            subsample: HashMap::new(),
            pool: HashMap::new(),
        }
    }
}

impl<D: Storage<usize>> GatherCache<D> {
    /// [`ConvGeometry::im2col_rows`] on the host, built once per geometry (the CPU kernels').
    pub(crate) fn host_rows(&mut self, geom: ConvGeometry) -> Result<std::sync::Arc<Vec<usize>>> {
        if let Some(i) = self.host.get(&geom) {
            return Ok(i.clone());
        }
        let i = std::sync::Arc::new(geom.im2col_rows()?);
        self.host.insert(geom, i.clone());
        Ok(i)
    }
}

impl<D: Storage<usize>> std::fmt::Debug for GatherCache<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "GatherCache({} conv, {} subsample)",
            self.conv.len(),
            self.subsample.len()
        )
    }
}

/// A max-pool's gather indices by (N, H, W, K, stride, padding).
type PoolKey = (usize, usize, usize, usize, usize, usize);

/// The convolution proper, `Y = im2col(X)·W'` (see the module docs), with its backward on the
/// tape: `x` NHWC rows `[N·H·W, Cin]`, `kernel` the matrix `W' [K·K·Cin, Cout]`; returns the
/// output rows `[N·OH·OW, Cout]`, or a shape error naming the operands.
pub trait ConvKernel<E: Float>: Device<E> + Default {
    /// `im2col(x) · kernel` for `geom`.
    fn conv_rows<T: Tape<E, Self>>(
        cache: &mut GatherCache<Self>,
        x: crate::Matrix<E, Self, T>,
        kernel: crate::Matrix<E, Self, T>,
        geom: ConvGeometry,
    ) -> Result<crate::Matrix<E, Self, T>>;
}

/// im2col from dfdx's own ops on any device: a zero row appended by concatenation, then a row
/// gather whose backward is dfdx's scatter-add.
pub fn im2col_gather<E: Float, D: Device<E> + Default, T: Tape<E, D>>(
    cache: &mut GatherCache<D>,
    x: crate::Matrix<E, D, T>,
    geom: ConvGeometry,
) -> Result<crate::Matrix<E, D, T>> {
    let (_, cin) = *x.shape();
    let (oh, ow) = geom.out_hw()?;
    let (m, k) = (geom.n * oh * ow, geom.k);
    let dev = x.device().clone();
    let idx = match cache.conv.get(&geom) {
        Some(i) => i.clone(),
        None => {
            let i = dev.tensor_from_vec(geom.im2col_rows()?, (m, k * k));
            cache.conv.insert(geom, i.clone());
            i
        }
    };
    let zero_row: crate::Matrix<E, D> = dev.zeros_like(&(1, cin));
    let padded = (x, zero_row).concat_along(Axis::<0>);
    let patches: Tensor<(usize, usize, usize), E, D, T> = padded.gather(idx);
    Ok(patches.reshape_like(&(m, k * k * cin)))
}

/// The convolution from dfdx's own ops on any device ([`im2col_gather`], then dfdx's matmul
/// and their backward ops): what CUDA runs, and the reference the CPU kernel is tested against.
pub fn conv_rows_generic<E: Float, D: Device<E> + Default, T: Tape<E, D>>(
    cache: &mut GatherCache<D>,
    x: crate::Matrix<E, D, T>,
    kernel: crate::Matrix<E, D, T>,
    geom: ConvGeometry,
) -> Result<crate::Matrix<E, D, T>> {
    rows_conv(*x.shape(), *kernel.shape(), geom)?;
    Ok(im2col_gather(cache, x, geom)?.matmul(kernel))
}

/// Images per gradient partial on the CPU: the kernel's gradient is summed per group of
/// images, then over the groups in order, so the result does not depend on the thread count
/// or on rayon's scheduling (resumed runs stay bit-identical).
const CPU_GROUPS: usize = 16;

/// Patch values the CPU op builds at once per thread: an image's patch matrix
/// `[OH·OW, K·K·Cin]` is built and multiplied in blocks of output rows of at most this many
/// values (16 MB in f32), so the per-thread buffers stay small at segmentation sizes (one
/// 64×64 map of 3×3×512 patches is 75 MB) while each GEMM keeps hundreds of rows. Every
/// ResNet-32 and ResNet-18 geometry fits whole.
const PATCH_BLOCK: usize = 1 << 22;

/// The sizes of one convolution over rows, as the CPU op uses them.
#[derive(Clone, Copy)]
struct RowsConv {
    /// Input rows N·H·W (the zero row's index) and channels Cin.
    rows: usize,
    cin: usize,
    /// Taps K·K, patch width K·K·Cin, output channels Cout.
    taps: usize,
    width: usize,
    cout: usize,
    /// Output pixels per image OH·OW, input values per image H·W·Cin.
    per_out: usize,
    per_in: usize,
}

/// Checks the operands of [`ConvKernel::conv_rows`] against `geom`.
fn rows_conv(x: (usize, usize), kernel: (usize, usize), geom: ConvGeometry) -> Result<RowsConv> {
    let ((rows, cin), (width, cout)) = (x, kernel);
    let (oh, ow) = geom.out_hw()?;
    let taps = geom.k * geom.k;
    if rows != geom.n * geom.h * geom.w || width != taps * cin {
        return shape_err(format!(
            "conv: input rows [{rows}, {cin}] and kernel matrix [{width}, {cout}] for {geom:?}"
        ));
    }
    Ok(RowsConv {
        rows,
        cin,
        taps,
        width,
        cout,
        per_out: oh * ow,
        per_in: geom.h * geom.w * cin,
    })
}

impl RowsConv {
    /// Copies one image's patches (`[OH·OW, K·K·Cin]`, zeros for padding taps) into `patches`;
    /// `taps` are the image's rows of the im2col index.
    fn fill_patches<E: Float>(&self, patches: &mut [E], x: &[E], taps: &[usize]) {
        let cin = self.cin;
        for (dst, &src) in patches.chunks_mut(cin).zip(taps) {
            if src < self.rows {
                dst.copy_from_slice(&x[src * cin..(src + 1) * cin]);
            } else {
                dst.fill(E::zero());
            }
        }
    }

    /// Output rows per block of the patch matrix (see [`PATCH_BLOCK`]).
    fn block_rows(&self) -> usize {
        (PATCH_BLOCK / self.width.max(1)).clamp(1, self.per_out.max(1))
    }

    /// `Y = P·W'` per image, in parallel over images, each in blocks of output rows.
    fn forward<E: Float>(&self, x: &[E], kernel: &[E], idx: &[usize]) -> Result<Vec<E>> {
        use rayon::prelude::*;
        let (per_out, width, cout) = (self.per_out, self.width, self.cout);
        let mut y = vec![E::zero(); idx.len() / self.taps * cout];
        if y.is_empty() {
            return Ok(y);
        }
        let w = Mat::row_major(self.kernel_matrix(kernel)?, cout);
        let block = self.block_rows();
        y.par_chunks_mut(per_out * cout)
            .zip(idx.par_chunks(per_out * self.taps))
            .for_each(|(y_b, taps)| {
                with_scratch::<E, _>(block * width, |scratch| {
                    for (y_c, taps_c) in y_b
                        .chunks_mut(block * cout)
                        .zip(taps.chunks(block * self.taps))
                    {
                        let rows = y_c.len() / cout;
                        let patches = &mut scratch[..rows * width];
                        self.fill_patches(patches, x, taps_c);
                        let (p, y_c) = (
                            Mat::row_major(&*patches, width),
                            MatMut::row_major(y_c, cout),
                        );
                        matmul((rows, cout, width), p, w, y_c, false);
                    }
                })
            });
        Ok(y)
    }

    /// Adds `∂x` (scatter of `dY·W'ᵀ`) into `g_x` and returns `∂W' = Σ Pᵀ·dY`, in parallel over
    /// groups of images (see [`CPU_GROUPS`]).
    fn backward<E: Float>(
        &self,
        x: &[E],
        kernel: &[E],
        idx: &[usize],
        g_y: &[E],
        g_x: &mut [E],
    ) -> Result<Vec<E>> {
        use rayon::prelude::*;
        let (per_out, width, cout, cin) = (self.per_out, self.width, self.cout, self.cin);
        let mut g_w = vec![E::zero(); width * cout];
        if g_y.is_empty() || width == 0 || cout == 0 {
            return Ok(g_w);
        }
        let w_t = Mat::transposed(self.kernel_matrix(kernel)?, cout);
        let per_group = (idx.len() / (per_out * self.taps))
            .div_ceil(CPU_GROUPS)
            .max(1);
        let block = self.block_rows();
        let partials: Vec<Vec<E>> = g_x
            .par_chunks_mut((per_group * self.per_in).max(1))
            .zip(g_y.par_chunks(per_group * per_out * cout))
            .zip(idx.par_chunks(per_group * per_out * self.taps))
            .enumerate()
            .map(|(group, ((g_x, g_y), taps))| {
                let mut g_w = vec![E::zero(); width * cout];
                with_scratch::<E, _>(2 * block * width, |scratch| {
                    let (patches, g_patches) = scratch.split_at_mut(block * width);
                    // Input rows of this group receive only from its own output rows.
                    let first_row = group * per_group * self.per_in / cin;
                    // Each image in blocks of output rows (a block never spans two images).
                    let blocks = g_y
                        .chunks(per_out * cout)
                        .flat_map(|g| g.chunks(block * cout));
                    let tap_blocks = taps
                        .chunks(per_out * self.taps)
                        .flat_map(|t| t.chunks(block * self.taps));
                    for (g_y_b, taps_b) in blocks.zip(tap_blocks) {
                        let rows = g_y_b.len() / cout;
                        let patches = &mut patches[..rows * width];
                        let g_patches = &mut g_patches[..rows * width];
                        self.fill_patches(patches, x, taps_b);
                        let g_y_b = Mat::row_major(g_y_b, cout);
                        // ∂W' += Pᵀ·dY (accumulated over the group's blocks); ∂P = dY·W'ᵀ.
                        let (p_t, g_w) = (
                            Mat::transposed(&*patches, width),
                            MatMut::row_major(&mut g_w[..], cout),
                        );
                        matmul((width, cout, rows), p_t, g_y_b, g_w, true);
                        let g_p = MatMut::row_major(&mut g_patches[..], width);
                        matmul((rows, width, cout), g_y_b, w_t, g_p, false);
                        for (g_tap, &src) in g_patches.chunks(cin).zip(taps_b) {
                            if src < self.rows {
                                let at = (src - first_row) * cin;
                                for (d, &g) in g_x[at..at + cin].iter_mut().zip(g_tap) {
                                    *d += g;
                                }
                            }
                        }
                    }
                });
                g_w
            })
            .collect();
        for part in partials {
            for (d, p) in g_w.iter_mut().zip(part) {
                *d += p;
            }
        }
        Ok(g_w)
    }

    /// The kernel matrix `W' [K·K·Cin, Cout]` (row-major), checked for its length.
    fn kernel_matrix<'a, E: Float>(&self, kernel: &'a [E]) -> Result<&'a [E]> {
        if kernel.len() != self.width * self.cout {
            return shape_err(format!(
                "conv: {} kernel values for [{}, {}]",
                kernel.len(),
                self.width,
                self.cout
            ));
        }
        Ok(kernel)
    }
}

/// On the CPU the convolution is one op with its own backward, parallel over images: per
/// image, the patches are built in a buffer that stays in cache and multiplied by the kernel
/// ([`sar_cpu::gemm`]). The backward rebuilds each image's patches, adds `Pᵀ·dY`
/// to its group's kernel gradient and scatter-adds `dY·W'ᵀ` into the image's input gradient.
/// The patches of the whole batch are never materialised. At ResNet-32's stage-1 geometry
/// (batch 128, 32×32, 16 → 16 channels) this op takes 22 ms forward and 50 ms backward where
/// the composition of dfdx ops (as on CUDA) takes 113 and 294 ms (`examples/conv_profile.rs`,
/// 2 cores).
impl<E: Float> ConvKernel<E> for Cpu
where
    Cpu: Device<E>,
    <Cpu as Storage<E>>::Vec: std::ops::DerefMut<Target = Vec<E>>,
{
    fn conv_rows<T: Tape<E, Self>>(
        cache: &mut GatherCache<Self>,
        x: crate::Matrix<E, Self, T>,
        kernel: crate::Matrix<E, Self, T>,
        geom: ConvGeometry,
    ) -> Result<crate::Matrix<E, Self, T>> {
        let sizes = rows_conv(*x.shape(), *kernel.shape(), geom)?;
        let idx = cache.host_rows(geom)?;
        let (x, tape_x) = x.split_tape();
        let (kernel, tape_k) = kernel.split_tape();
        let mut tape = tape_x.merge(tape_k);
        let (x_host, k_host) = (crate::cpu_values(&x), kernel.as_vec());
        let y = sizes.forward(&x_host, &k_host, &idx)?;
        let out = x
            .device()
            .tensor_from_vec(y, (geom.n * sizes.per_out, sizes.cout));
        // Ghosts (id and shape, no buffer): the backward reads the host copies above, so the
        // tape need not keep the input's and output's dfdx buffers alive until then.
        let (out_id, x_id, k_id) = (out.ghost(), x.ghost(), kernel.ghost());
        tape.add_backward_op(move |grads| {
            // The output's gradient is complete here and read only here: take it, don't copy.
            let g_y: Vec<E> = std::mem::take(&mut **grads.get_or_alloc_mut(&out_id)?);
            let g_x = grads.get_or_alloc_mut(&x_id)?;
            // The forward pass already built the same views, so this cannot fail in practice.
            let g_w = sizes
                .backward(&x_host, &k_host, &idx, &g_y, g_x)
                .map_err(|_| dfdx::tensor::CpuError::WrongNumElements)?;
            for (d, g) in grads.get_or_alloc_mut(&k_id)?.iter_mut().zip(g_w) {
                *d += g;
            }
            Ok(())
        });
        Ok(out.put_tape(tape))
    }
}

#[cfg(feature = "cuda")]
impl<E: Float> ConvKernel<E> for dfdx::tensor::Cuda
where
    dfdx::tensor::Cuda: Device<E>,
{
    fn conv_rows<T: Tape<E, Self>>(
        cache: &mut GatherCache<Self>,
        x: crate::Matrix<E, Self, T>,
        kernel: crate::Matrix<E, Self, T>,
        geom: ConvGeometry,
    ) -> Result<crate::Matrix<E, Self, T>> {
        conv_rows_generic(cache, x, kernel, geom)
    }
}

/// `x` NHWC rows `[N·H·W, Cin]` convolved with `weight` (flat `[Cout, Cin, K, K]`); returns
/// the output rows `[N·OH·OW, Cout]` and (OH, OW). Both operands may carry tapes.
pub fn conv2d<E: Float, D: SarDevice<E>, T: Tape<E, D>>(
    cache: &mut GatherCache<D>,
    x: Tensor<(usize, usize), E, D, T>,
    weight: Tensor<(usize,), E, D, T>,
    geom: ConvGeometry,
    out_channels: usize,
) -> Result<crate::ConvOut<E, D, T>> {
    let (rows, cin) = *x.shape();
    let k = geom.k;
    if rows != geom.n * geom.h * geom.w || weight.shape().0 != out_channels * cin * k * k {
        return shape_err(format!(
            "conv: input rows [{rows}, {cin}] for {}×{}×{} pixels with a {}-element weight; expected [{out_channels}, {cin}, {k}, {k}]",
            geom.n,
            geom.h,
            geom.w,
            weight.shape().0
        ));
    }
    let (oh, ow) = geom.out_hw()?;
    let kernel = weight
        .reshape_like(&(out_channels, cin, k, k))
        .permute::<_, Axes4<2, 3, 1, 0>>()
        .reshape_like(&(k * k * cin, out_channels));
    Ok((D::conv_rows(cache, x, kernel, geom)?, (oh, ow)))
}

/// The option-A shortcut on NHWC rows `[N·H·W, C]`: pixels (y, x) with y, x multiples of
/// `stride` (⌈H/s⌉×⌈W/s⌉, like PyTorch's `x[:, :, ::s, ::s]`), then `pad` zero channels on each
/// side. Returns rows `[N·⌈H/s⌉·⌈W/s⌉, C + 2·pad]`.
pub fn option_a<E: Float, D: SarDevice<E>, T: Tape<E, D>>(
    cache: &mut GatherCache<D>,
    x: Tensor<(usize, usize), E, D, T>,
    (n, h, w): (usize, usize, usize),
    stride: usize,
    pad: usize,
) -> Result<Tensor<(usize, usize), E, D, T>> {
    let (rows, _) = *x.shape();
    if rows != n * h * w || stride == 0 {
        return shape_err(format!(
            "option-A shortcut: {rows} rows for {n}×{h}×{w} pixels, stride {stride}"
        ));
    }
    let (oh, ow) = (h.div_ceil(stride), w.div_ceil(stride));
    let dev = x.device().clone();
    let key = (n, h, w, stride);
    let idx = match cache.subsample.get(&key) {
        Some(i) => i.clone(),
        None => {
            let mut v = Vec::with_capacity(n * oh * ow);
            for b in 0..n {
                for y in 0..oh {
                    for xx in 0..ow {
                        v.push((b * h + y * stride) * w + xx * stride);
                    }
                }
            }
            let i = dev.tensor_from_vec(v, (n * oh * ow,));
            cache.subsample.insert(key, i.clone());
            i
        }
    };
    let sub: Tensor<(usize, usize), E, D, T> = x.gather(idx);
    if pad == 0 {
        return Ok(sub);
    }
    let m = n * oh * ow;
    let left: Tensor<(usize, usize), E, D> = dev.zeros_like(&(m, pad));
    let right: Tensor<(usize, usize), E, D> = dev.zeros_like(&(m, pad));
    // The left operand's (empty) tape absorbs the right one's, so the graph stays whole.
    let left = left.put_tape(T::default());
    let out = (left, sub).concat_along(Axis::<1>);
    Ok((out, right).concat_along(Axis::<1>))
}

/// 2×2 max-pool with stride 2 over NHWC rows `[N·H·W, C]` of `(n, h, w)` pixels (odd sizes are
/// floored, like PyTorch's `nn.MaxPool2d(2)`): [`max_pool2d`] with K = 2, s = 2, p = 0.
pub fn max_pool_2x2<E: Float, D: SarDevice<E>, T: Tape<E, D>>(
    cache: &mut GatherCache<D>,
    x: Tensor<(usize, usize), E, D, T>,
    (n, h, w): (usize, usize, usize),
) -> Result<crate::ConvOut<E, D, T>> {
    max_pool2d(cache, x, (n, h, w), 2, 2, 0)
}

/// K×K max-pool with stride `s` and padding `p` (−∞) over NHWC rows `[N·H·W, C]` of
/// `(n, h, w)` pixels, PyTorch's `nn.MaxPool2d(k, s, p)`: output ⌊(H + 2p − K)/s⌋ + 1 per side
/// (floored), p at most K/2. Returns the rows `[N·OH·OW, C]` and (OH, OW). Each output takes
/// the first maximum of its window in row-major order (a NaN wins, as in PyTorch), and its
/// gradient goes there alone. Any dfdx device.
pub fn max_pool2d<E: Float, D: SarDevice<E>, T: Tape<E, D>>(
    cache: &mut GatherCache<D>,
    x: Tensor<(usize, usize), E, D, T>,
    (n, h, w): (usize, usize, usize),
    k: usize,
    s: usize,
    p: usize,
) -> Result<crate::ConvOut<E, D, T>> {
    let (rows, c) = *x.shape();
    if rows != n * h * w || k == 0 || s == 0 || 2 * p > k || h + 2 * p < k || w + 2 * p < k {
        return shape_err(format!(
            "{k}×{k} max-pool (stride {s}, padding {p}): {rows} rows for {n}×{h}×{w} pixels (the window must fit the padded input, and the padding be at most half the window)"
        ));
    }
    let (oh, ow) = ((h + 2 * p - k) / s + 1, (w + 2 * p - k) / s + 1);
    let dev = x.device().clone();
    // Index `rows` is the appended −∞ row: a padding tap never wins over a pixel.
    let taps = cache
        .pool
        .entry((n, h, w, k, s, p))
        .or_insert_with(|| {
            let mut per_tap = Vec::with_capacity(k * k);
            for ky in 0..k {
                for kx in 0..k {
                    let mut v = Vec::with_capacity(n * oh * ow);
                    for b in 0..n {
                        for y in 0..oh {
                            for xx in 0..ow {
                                let iy = (y * s + ky) as isize - p as isize;
                                let ix = (xx * s + kx) as isize - p as isize;
                                v.push(
                                    if (0..h as isize).contains(&iy)
                                        && (0..w as isize).contains(&ix)
                                    {
                                        (b * h + iy as usize) * w + ix as usize
                                    } else {
                                        rows
                                    },
                                );
                            }
                        }
                    }
                    per_tap.push(dev.tensor_from_vec(v, (n * oh * ow,)));
                }
            }
            per_tap
        })
        .clone();
    let source = if p > 0 {
        let neg = dev.tensor_from_vec(vec![E::neg_infinity(); c], (1, c));
        (x, neg).concat_along(Axis::<0>)
    } else {
        x
    };
    let mut best: Option<Tensor<(usize, usize), E, D, T>> = None;
    for idx in taps {
        let tap: Tensor<(usize, usize), E, D, T> = source.retaped::<T>().gather(idx);
        best = Some(match best {
            None => tap,
            Some(b) => {
                let (t0, b0) = (tap.retaped::<NoneTape>(), b.retaped::<NoneTape>());
                let is_nan = t0.clone().ne(&t0);
                let take = t0.gt(&b0) | is_nan;
                take.choose(tap, b)
            }
        });
    }
    // The taps were gathered from copies with fresh tapes: the source's own tape (everything
    // before the pool, and the padding's concatenation) joins the output's here.
    let out = best.ok_or_else(|| crate::SarDfdxError::Shape("max-pool: no taps".into()))?;
    let (out, tape) = out.split_tape();
    let (_, source_tape) = source.split_tape();
    Ok((out.put_tape(tape.merge(source_tape)), (oh, ow)))
}

/// NCHW values (host) to NHWC rows (host): `[N, C, H, W]` → `[N·H·W, C]`.
pub fn nchw_to_rows<V: Copy>(x: &[V], n: usize, c: usize, h: usize, w: usize) -> Vec<V> {
    let mut out = Vec::with_capacity(x.len());
    for b in 0..n {
        for p in 0..h * w {
            for ch in 0..c {
                out.push(x[(b * c + ch) * h * w + p]);
            }
        }
    }
    out
}

/// NHWC rows (host) back to NCHW (host).
pub fn rows_to_nchw<V: Copy + Default>(x: &[V], n: usize, c: usize, h: usize, w: usize) -> Vec<V> {
    let mut out = vec![V::default(); x.len()];
    for b in 0..n {
        for p in 0..h * w {
            for ch in 0..c {
                out[(b * c + ch) * h * w + p] = x[(b * h * w + p) * c + ch];
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn max_pool_2x2_floors_odd_sizes_and_sends_each_gradient_to_the_first_maximum() {
        let dev = Cpu::default();
        // One image 3×5, one channel (rows = pixels); the last row and column are dropped.
        #[rustfmt::skip]
        let v: Vec<f64> = vec![
            1.0, 7.0, 3.0, 3.0, 9.0,
            4.0, 2.0, 3.0, 3.0, 9.0,
            8.0, 8.0, 8.0, 8.0, 8.0,
        ];
        let x: Tensor<(usize, usize), f64, Cpu> = dev.tensor_from_vec(v, (15, 1));
        let mut cache = GatherCache::default();
        let (y, hw) = max_pool_2x2(&mut cache, x.leaky_trace(), (1, 3, 5)).unwrap();
        assert_eq!(hw, (1, 2));
        assert_eq!(y.as_vec(), [7.0, 3.0]);
        let w = dev.tensor_from_vec(vec![10.0, 100.0], (2, 1));
        let grads = (y * w).sum::<Rank0, _>().backward();
        // Window 2 holds four 3s: the first, pixel (0, 2), takes the whole gradient.
        let mut want = vec![0.0; 15];
        want[1] = 10.0;
        want[2] = 100.0;
        assert_eq!(grads.get(&x).as_vec(), want);
        // A NaN wins its window (as in PyTorch), and the channels pool independently.
        let x: Tensor<(usize, usize), f64, Cpu> =
            dev.tensor_from_vec(vec![1.0, 5.0, f64::NAN, 6.0, 2.0, 7.0, 0.5, 8.0], (4, 2));
        let (y, _) = max_pool_2x2(&mut cache, x, (1, 2, 2)).unwrap();
        let y = y.as_vec();
        assert!(y[0].is_nan() && y[1] == 8.0, "{y:?}");
        let bad: Tensor<(usize, usize), f64, Cpu> = dev.zeros_like(&(3, 1));
        assert!(max_pool_2x2(&mut cache, bad, (1, 1, 3)).is_err());
    }

    /// The ImageNet stem's pool (3×3, stride 2, padding 1) on a 4×4 image, by hand: windows
    /// overlap, so pixel (0, 1), the first maximum of two windows, takes both gradients; the
    /// −∞ padding never wins, also when every pixel is negative.
    #[test]
    fn max_pool_3x3_s2_p1_by_hand() {
        let dev = Cpu::default();
        #[rustfmt::skip]
        let v: Vec<f64> = vec![
            1.0, 5.0, 2.0, 0.0,
            3.0, 4.0, 5.0, 1.0,
            0.0, 2.0, 9.0, 9.0,
            6.0, 1.0, 2.0, 3.0,
        ];
        let mut cache = GatherCache::default();
        for offset in [0.0, -20.0] {
            let vals: Vec<f64> = v.iter().map(|a| a + offset).collect();
            let x: Tensor<(usize, usize), f64, Cpu> = dev.tensor_from_vec(vals, (16, 1));
            let (y, hw) = max_pool2d(&mut cache, x.leaky_trace(), (1, 4, 4), 3, 2, 1).unwrap();
            assert_eq!(hw, (2, 2));
            let want: Vec<f64> = [5.0, 5.0, 6.0, 9.0].iter().map(|a| a + offset).collect();
            assert_eq!(y.as_vec(), want);
            let up = dev.tensor_from_vec(vec![10.0, 100.0, 1000.0, 10000.0], (4, 1));
            let grads = (y * up).sum::<Rank0, _>().backward();
            let mut want = vec![0.0; 16];
            want[1] = 110.0;
            want[12] = 1000.0;
            want[10] = 10000.0;
            assert_eq!(grads.get(&x).as_vec(), want);
        }
        let x: Tensor<(usize, usize), f64, Cpu> = dev.zeros_like(&(16, 1));
        assert!(
            max_pool2d(&mut cache, x.clone(), (1, 4, 4), 3, 2, 2).is_err(),
            "p > k/2"
        );
        assert!(
            max_pool2d(&mut cache, x.clone(), (1, 4, 4), 3, 0, 1).is_err(),
            "stride 0"
        );
        assert!(
            max_pool2d(&mut cache, x, (1, 4, 3), 3, 2, 1).is_err(),
            "rows"
        );
    }

    /// Dilation moves the taps: a 3×3 kernel with d = 2 on a 5×5 input without padding has one
    /// output, reading pixels (0, 0), (0, 2), …, (4, 4).
    #[test]
    fn dilated_im2col_rows_by_hand() {
        let g = ConvGeometry::new(1, (5, 5), 3, 1, 0).dilated(2);
        assert_eq!(g.out_hw().unwrap(), (1, 1));
        assert_eq!(g.im2col_rows().unwrap(), [0, 2, 4, 10, 12, 14, 20, 22, 24]);
        // Padding 2 keeps the size (the segmentation backbones' rule p = d).
        let g = ConvGeometry::new(2, (4, 3), 3, 1, 2).dilated(2);
        assert_eq!(g.out_hw().unwrap(), (4, 3));
        let rows = g.im2col_rows().unwrap();
        // Output (image 1, 1, 1): taps at rows −1, 1, 3 and columns −1, 1, 3 → only (1, 1)
        // and (3, 1) are inside.
        let at = ((4 * 3) + (3 + 1)) * 9;
        let zero = 2 * 4 * 3;
        let want = [zero, zero, zero, zero, 12 + 4, zero, zero, 12 + 10, zero];
        assert_eq!(&rows[at..at + 9], want);
        assert!(ConvGeometry::new(1, (3, 3), 3, 1, 0)
            .dilated(2)
            .out_hw()
            .is_err());
        assert!(ConvGeometry::new(1, (3, 3), 3, 1, 0)
            .dilated(0)
            .out_hw()
            .is_err());
    }
}
