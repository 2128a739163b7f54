//! A CPU 2-D convolution for f32 with a fast backward pass, as a candle custom op.
//!
//! candle 0.11 computes the input gradient of a convolution with a direct
//! `conv_transpose2d` loop (one dot product per output element, no blocking), which made a
//! ResNet-32 training step about 20× slower than PyTorch's. This op does forward and both
//! gradients as matrix products ([`sar_cpu::gemm`]: the `gemm` crate candle itself uses, with
//! its AVX-512 kernels enabled), image by image:
//!
//! - forward: `col_n = im2col(x_n)` `[C·k·k, P]` (P = OH·OW), `y_n = W · col_n` `[O, P]`;
//! - input gradient: `dx_n = col2im(Wᵀ · dy_n)`; for a stride-1 conv whose output has the
//!   input's size ("same", e.g. 3×3 with padding 1) and O ≤ C, the equal
//!   `dx_n = W' · im2col(dy_n)` with the flipped kernel `W'[c, o] = W[o, c]` rotated by 180°
//!   (`[C, O·k·k]`): a product whose inner dimension is O·k·k instead of O (16 in ResNet-32's
//!   first stage), and a gather instead of col2im's scatter. Inputs that are not part of the
//!   graph (a first layer's images) get no input gradient;
//! - weight gradient: `dW = Σ_n dy_n · col_nᵀ`, summed within 16 fixed groups of images and
//!   then over the groups in order, so the bits do not depend on the thread count.
//!
//! A stride-1 "same" convolution (3×3 with padding 1, the dilated 3×3s; not 1×1) on a CPU with
//! AVX-512F takes none of these products: [`sar_cpu::same_conv`] computes the forward and the
//! input gradient (the flipped kernel) directly from the images, and the weight gradient from
//! a zero-bordered copy of each image and `dy` transposed, for `O` a multiple of 16. Against
//! im2col + gemm in one process (`SAR_DIRECT_CONV=0`, `conv_profile fcn`): FCN-R18-d8's
//! 512-channel dilated layer forward + backward 599 → 564 ms, its 64-channel layer at 128²
//! 62 → 39 ms, the whole FCN-R18-d8 step ~4.3 → ~4.0 s, ResNet-32's b128 step 421 → 362 ms
//! (`docs/results/direct-conv-2026-12-08.txt`). With fewer images than threads each image's
//! output channels are split over threads too. The paths below are the fallback.
//!
//! Images are processed in parallel (rayon); each product runs on one thread. A 1×1 conv with
//! stride 1 and no padding skips im2col (`col_n = x_n`). For a stride-1 conv whose output has
//! the input's size (3×3 with padding 1, the dilated 3×3s), each row `(c, ky, kx)` of `col_n`
//! is the whole plane `x_n[c]` shifted by `(ky·d − p)·W + kx·d − p`: one copy, then zeros in
//! the columns that wrapped round a row edge (and the same shift, run backwards, for col2im).
//! The weight gradient is accumulated column-major (`dWᵀ [C·k·k, O]`), so that the gemm crate
//! packs `dy_n` `[O, P]` rather than `col_n` `[C·k·k, P]` for every image. Together these took
//! ResNet-32's b128 step from 826–850 to 637–689 ms (README, Benchmarks). A strided conv whose
//! output is the input's size divided by the stride, rounded up (3×3 / 2 with padding 1), gets
//! the same treatment through the image's `stride²` phase planes `x[s·i + py, s·j + px]`: each
//! tap reads one phase plane shifted, so the image is split into its planes once and each im2col
//! row is one copy (the small CNN's Fashion-MNIST-LT epoch 9.25 → 8.45 s, where the strided
//! gather per output row had been 18 % of the epoch's CPU time). The im2col buffers
//! are each thread's [`sar_cpu::scratch`] buffer, kept between calls. The copy loops are
//! compiled for baseline x86-64 and for AVX2 + FMA and pick at run time (`multiversion`).
//!
//! Layout NCHW, weights `[O, C, k, k]`, dilation (atrous convolution: tap `k` reads input
//! offset `k·dilation`), no groups, no bias (the models put a BatchNorm after every conv).
//! Other devices and dtypes use candle's own `conv2d`.

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Shape, Tensor};
use rayon::prelude::*;
use sar_cpu::gemm::{matmul, Mat, MatMut};
use sar_cpu::same_conv::{Orientation, PackedFilters, SameConv, CHANNEL_TILE};
use sar_cpu::scratch::with_scratch;

#[derive(Debug, Clone, Copy)]
pub(crate) struct Geometry {
    n: usize,
    c: usize,
    h: usize,
    w: usize,
    o: usize,
    k: usize,
    stride: usize,
    pad: usize,
    dil: usize,
    oh: usize,
    ow: usize,
}

impl Geometry {
    pub(crate) fn new(x: &[usize], wt: &[usize], op: Conv2dCpu) -> candle_core::Result<Self> {
        let (stride, pad, dil) = (op.stride, op.padding, op.dilation);
        let (&[n, c, h, w], &[o, c2, k, k2]) = (x, wt) else {
            candle_core::bail!(
                "conv2d needs [N, C, H, W] input and [O, C, k, k] weight, got {x:?} and {wt:?}"
            );
        };
        let extent = dil * k.saturating_sub(1) + 1;
        if c != c2
            || k != k2
            || k == 0
            || stride == 0
            || dil == 0
            || h + 2 * pad < extent
            || w + 2 * pad < extent
        {
            candle_core::bail!(
                "conv2d: input {x:?} does not fit weight {wt:?} (stride {stride}, padding {pad}, dilation {dil})"
            );
        }
        Ok(Geometry {
            n,
            c,
            h,
            w,
            o,
            k,
            stride,
            pad,
            dil,
            oh: (h + 2 * pad - extent) / stride + 1,
            ow: (w + 2 * pad - extent) / stride + 1,
        })
    }
    /// The output's `[N, O, OH, OW]`.
    pub(crate) fn out_dims(&self) -> [usize; 4] {
        [self.n, self.o, self.oh, self.ow]
    }
    fn ckk(&self) -> usize {
        self.c * self.k * self.k
    }
    fn p(&self) -> usize {
        self.oh * self.ow
    }
    fn pointwise(&self) -> bool {
        self.k == 1 && self.stride == 1 && self.pad == 0
    }
    /// Stride 1 and the output the input's size: im2col rows are shifted planes.
    fn same(&self) -> bool {
        self.stride == 1 && self.oh == self.h && self.ow == self.w
    }
    /// A strided conv whose output is the input's size divided by the stride, rounded up (e.g.
    /// 3×3, stride 2, padding 1): in the input's `stride²` phase planes
    /// `x[s·i + py, s·j + px]` (`OH × OW` each, zero past the input) every tap reads one plane
    /// shifted, so its im2col row is one copy as for [`same`](Self::same).
    fn phased(&self) -> bool {
        self.stride > 1
            && self.oh == self.h.div_ceil(self.stride)
            && self.ow == self.w.div_ceil(self.stride)
    }
    /// For a [`phased`](Self::phased) conv, tap `(ky, kx)` reads phase plane `py·s + px` at
    /// output position `(oy + ay, ox + ax)`: returns `(py·s + px, ay, ax)`.
    fn phase_tap(&self, ky: usize, kx: usize) -> (usize, isize, isize) {
        let s = self.stride as isize;
        let offset = |k: usize| (k * self.dil) as isize - self.pad as isize;
        let (ty, tx) = (offset(ky), offset(kx));
        (
            (ty.rem_euclid(s) * s + tx.rem_euclid(s)) as usize,
            ty.div_euclid(s),
            tx.div_euclid(s),
        )
    }
    /// For a [`same`](Self::same) conv, tap `(ky, kx)`'s row of im2col is
    /// `row[q] = plane[q + shift]` for `q` in `first..end` (zero elsewhere, and in the wrapped
    /// columns): returns `(first, end, first + shift)` (an empty run starts at 0: a tap
    /// that reads only padding, e.g. a dilation beyond the map).
    fn shifted_run(&self, ky: usize, kx: usize) -> (usize, usize, usize) {
        let shift = ((ky * self.dil) as isize - self.pad as isize) * self.w as isize
            + (kx * self.dil) as isize
            - self.pad as isize;
        run_of(self.p(), shift)
    }
}

/// The run of a plane of `p` elements shifted by `shift`: `row[q] = plane[q + shift]` for `q`
/// in `first..end`; returns `(first, end, first + shift)` (an empty run starts at 0).
fn run_of(p: usize, shift: isize) -> (usize, usize, usize) {
    let p = p as isize;
    let first = (-shift).clamp(0, p);
    let end = (p - shift).clamp(first, p);
    let from = if first < end { first + shift } else { 0 };
    (first as usize, end as usize, from as usize)
}

/// Output columns `ox` whose input column `ox·stride + kx·dilation − pad` lies inside `[0, w)`.
#[inline]
fn valid_columns(g: &Geometry, kx: usize) -> (usize, usize) {
    let kx = kx * g.dil;
    let lo = g.pad.saturating_sub(kx).div_ceil(g.stride);
    // ox·s + kx − pad ≤ w − 1  ⇔  ox ≤ (w − 1 + pad − kx) / s
    let hi = if g.w + g.pad > kx {
        ((g.w - 1 + g.pad - kx) / g.stride + 1).min(g.ow)
    } else {
        0
    };
    (lo.min(hi), hi)
}

#[multiversion::multiversion(targets("x86_64+avx+avx2+fma"))]
fn im2col(x: &[f32], g: &Geometry, col: &mut [f32]) {
    let (p, ow, s) = (g.p(), g.ow, g.stride);
    if g.same() {
        return im2col_same(x, g, col);
    }
    if g.phased() {
        return im2col_phased(x, g, col);
    }
    for c in 0..g.c {
        let plane = &x[c * g.h * g.w..(c + 1) * g.h * g.w];
        for ky in 0..g.k {
            for kx in 0..g.k {
                let (lo, hi) = valid_columns(g, kx);
                let row = &mut col[((c * g.k + ky) * g.k + kx) * p..][..p];
                for oy in 0..g.oh {
                    let iy = (oy * s + ky * g.dil) as isize - g.pad as isize;
                    let out = &mut row[oy * ow..(oy + 1) * ow];
                    if iy < 0 || iy >= g.h as isize {
                        out.fill(0.0);
                        continue;
                    }
                    let src = &plane[iy as usize * g.w..(iy as usize + 1) * g.w];
                    out[..lo].fill(0.0);
                    out[hi..].fill(0.0);
                    if lo < hi {
                        let first = lo * s + kx * g.dil - g.pad;
                        if s == 1 {
                            out[lo..hi].copy_from_slice(&src[first..first + (hi - lo)]);
                        } else {
                            for (v, &xv) in
                                out[lo..hi].iter_mut().zip(src[first..].iter().step_by(s))
                            {
                                *v = xv;
                            }
                        }
                    }
                }
            }
        }
    }
}

/// [`im2col`] of a stride-1 convolution whose output has the input's size: each row of `col`
/// is the whole plane shifted by `(ky·d − p)·W + kx·d − p`, so it is one copy (instead of one
/// per output row), after which the few columns that wrapped round a row edge are zeroed.
#[multiversion::multiversion(targets("x86_64+avx+avx2+fma"))]
fn im2col_same(x: &[f32], g: &Geometry, col: &mut [f32]) {
    let p = g.p();
    for (c, plane) in x.chunks_exact(p).enumerate().take(g.c) {
        for ky in 0..g.k {
            for kx in 0..g.k {
                let row = &mut col[((c * g.k + ky) * g.k + kx) * p..][..p];
                let (first, end, from) = g.shifted_run(ky, kx);
                row[..first].fill(0.0);
                row[end..].fill(0.0);
                row[first..end].copy_from_slice(&plane[from..from + (end - first)]);
                zero_wrapped_columns(row, g, kx);
            }
        }
    }
}

/// `x += col2im(col)`: the adjoint of [`im2col`]. `col` is scratch: a stride-1 "same"
/// convolution zeroes its wrapped columns and adds each row as one shifted run.
#[multiversion::multiversion(targets("x86_64+avx+avx2+fma"))]
fn col2im_add(col: &mut [f32], g: &Geometry, x: &mut [f32]) {
    let (p, ow, s) = (g.p(), g.ow, g.stride);
    if g.same() {
        return col2im_add_same(col, g, x);
    }
    if g.phased() {
        return col2im_add_phased(col, g, x);
    }
    for c in 0..g.c {
        let plane = &mut x[c * g.h * g.w..(c + 1) * g.h * g.w];
        for ky in 0..g.k {
            for kx in 0..g.k {
                let (lo, hi) = valid_columns(g, kx);
                if lo >= hi {
                    continue;
                }
                let first = lo * s + kx * g.dil - g.pad;
                let row = &col[((c * g.k + ky) * g.k + kx) * p..][..p];
                for oy in 0..g.oh {
                    let iy = (oy * s + ky * g.dil) as isize - g.pad as isize;
                    if iy < 0 || iy >= g.h as isize {
                        continue;
                    }
                    let dst = &mut plane[iy as usize * g.w..(iy as usize + 1) * g.w];
                    let src = &row[oy * ow + lo..oy * ow + hi];
                    if s == 1 {
                        for (d, v) in dst[first..first + (hi - lo)].iter_mut().zip(src) {
                            *d += v;
                        }
                    } else {
                        for (d, v) in dst[first..].iter_mut().step_by(s).zip(src) {
                            *d += v;
                        }
                    }
                }
            }
        }
    }
}

/// Zeroes the columns of a "same" im2col row (`[H, W]`) that tap `kx` reads from outside the
/// image.
#[inline]
fn zero_wrapped_columns(row: &mut [f32], g: &Geometry, kx: usize) {
    zero_columns_outside(row, g.w, valid_columns(g, kx));
}

/// The adjoint of [`im2col_same`] (see [`col2im_add`]).
#[multiversion::multiversion(targets("x86_64+avx+avx2+fma"))]
fn col2im_add_same(col: &mut [f32], g: &Geometry, x: &mut [f32]) {
    let p = g.p();
    for (c, plane) in x.chunks_exact_mut(p).enumerate().take(g.c) {
        for ky in 0..g.k {
            for kx in 0..g.k {
                let row = &mut col[((c * g.k + ky) * g.k + kx) * p..][..p];
                zero_wrapped_columns(row, g, kx);
                let (first, end, from) = g.shifted_run(ky, kx);
                for (d, v) in plane[from..].iter_mut().zip(&row[first..end]) {
                    *d += v;
                }
            }
        }
    }
}

/// Per phase tap: the run `row[q] = plane[q + shift]` for `q` in `first..end` of an
/// `OH × OW` plane shifted by `(ay, ax)` (as [`Geometry::shifted_run`]), and the output columns
/// `lo..hi` whose column `ox + ax` lies inside the plane.
fn phase_run(g: &Geometry, ay: isize, ax: isize) -> ((usize, usize, usize), (usize, usize)) {
    let ow = g.ow as isize;
    let lo = (-ax).clamp(0, ow);
    let hi = (ow - ax).clamp(lo, ow);
    (run_of(g.p(), ay * ow + ax), (lo as usize, hi as usize))
}

/// Zeroes the columns of a row of `[rows, w]` (one plane, flattened) outside `lo..hi`, column
/// by column: a `fill` per image row would call memset for one or two floats.
#[inline]
fn zero_columns_outside(row: &mut [f32], w: usize, (lo, hi): (usize, usize)) {
    for x in (0..lo).chain(hi..w) {
        for v in row[x..].iter_mut().step_by(w) {
            *v = 0.0;
        }
    }
}

/// One image's phase planes `[C, s², OH, OW]`: `planes[c, py·s + px, i, j] = x[c, s·i + py,
/// s·j + px]`, zero past the input. Row by input row; stride 2 splits each row into its even
/// and odd elements in one pass (pairs), which vectorises.
#[multiversion::multiversion(targets("x86_64+avx+avx2+fma"))]
fn to_phases(x: &[f32], g: &Geometry) -> Vec<f32> {
    let (s, p, ow) = (g.stride, g.p(), g.ow);
    let mut planes = vec![0.0f32; g.c * s * s * p];
    for (c, per_channel) in planes.chunks_exact_mut(s * s * p).enumerate() {
        let image = &x[c * g.h * g.w..(c + 1) * g.h * g.w];
        for (iy, src) in image.chunks_exact(g.w).enumerate() {
            let (py, i) = (iy % s, iy / s);
            let rows = &mut per_channel[py * s * p..(py + 1) * s * p];
            if s == 2 {
                let (even, odd) = rows.split_at_mut(p);
                let (even, odd) = (&mut even[i * ow..][..ow], &mut odd[i * ow..][..ow]);
                for ((e, o), pair) in even.iter_mut().zip(odd.iter_mut()).zip(src.chunks_exact(2)) {
                    (*e, *o) = (pair[0], pair[1]);
                }
                if g.w % 2 == 1 {
                    even[ow - 1] = src[g.w - 1];
                }
                continue;
            }
            for px in 0..s {
                let out = &mut rows[px * p + i * ow..][..ow];
                for (v, &xv) in out.iter_mut().zip(src.iter().skip(px).step_by(s)) {
                    *v = xv;
                }
            }
        }
    }
    planes
}

/// [`im2col`] of a [`phased`](Geometry::phased) convolution: the image split into its phase
/// planes once, then each row of `col` one shifted copy of a plane with the wrapped columns
/// zeroed (a strided gather per output row before).
#[multiversion::multiversion(targets("x86_64+avx+avx2+fma"))]
fn im2col_phased(x: &[f32], g: &Geometry, col: &mut [f32]) {
    let (s, p) = (g.stride, g.p());
    let planes = to_phases(x, g);
    for (c, per_channel) in planes.chunks_exact(s * s * p).enumerate() {
        for ky in 0..g.k {
            for kx in 0..g.k {
                let (phase, ay, ax) = g.phase_tap(ky, kx);
                let plane = &per_channel[phase * p..(phase + 1) * p];
                let row = &mut col[((c * g.k + ky) * g.k + kx) * p..][..p];
                let ((first, end, from), columns) = phase_run(g, ay, ax);
                row[..first].fill(0.0);
                row[end..].fill(0.0);
                row[first..end].copy_from_slice(&plane[from..from + (end - first)]);
                zero_columns_outside(row, g.ow, columns);
            }
        }
    }
}

/// The adjoint of [`im2col_phased`]: each row added into its phase plane, then the planes
/// added into `x`.
#[multiversion::multiversion(targets("x86_64+avx+avx2+fma"))]
fn col2im_add_phased(col: &mut [f32], g: &Geometry, x: &mut [f32]) {
    let (s, p) = (g.stride, g.p());
    let mut planes = vec![0.0f32; g.c * s * s * p];
    for (c, per_channel) in planes.chunks_exact_mut(s * s * p).enumerate() {
        for ky in 0..g.k {
            for kx in 0..g.k {
                let (phase, ay, ax) = g.phase_tap(ky, kx);
                let plane = &mut per_channel[phase * p..(phase + 1) * p];
                let row = &mut col[((c * g.k + ky) * g.k + kx) * p..][..p];
                let ((first, end, from), columns) = phase_run(g, ay, ax);
                zero_columns_outside(row, g.ow, columns);
                for (d, v) in plane[from..].iter_mut().zip(&row[first..end]) {
                    *d += v;
                }
            }
        }
        let image = &mut x[c * g.h * g.w..(c + 1) * g.h * g.w];
        for (phase, plane) in per_channel.chunks_exact(p).enumerate() {
            let (py, px) = (phase / s, phase % s);
            for (i, src) in plane.chunks_exact(g.ow).enumerate() {
                let iy = s * i + py;
                if iy >= g.h {
                    break;
                }
                let dst = &mut image[iy * g.w..(iy + 1) * g.w];
                for (d, &v) in dst.iter_mut().skip(px).step_by(s).zip(src) {
                    *d += v;
                }
            }
        }
    }
}

/// The direct kernel for this convolution, where it applies: a "same" convolution (not 1×1)
/// on a CPU with AVX-512F.
fn direct(g: &Geometry) -> Option<SameConv> {
    if !g.same() || g.pointwise() {
        return None;
    }
    SameConv::new(g.c, g.o, (g.h, g.w), g.k, g.dil)
}

/// Work units per thread the direct kernel's images are split into at least (output-channel
/// ranges of an image), so that rayon can even out threads slowed by other work.
const UNITS_PER_THREAD: usize = 4;

/// `out` `[N, conv.out_channels, H, W]` (+)= `conv(input)` image by image with the direct
/// kernel. With fewer images than threads each image's output channels are split too (in
/// multiples of 6, which leaves every output's sum, and so its bits, unchanged).
fn direct_images(
    conv: &SameConv,
    filters: &PackedFilters,
    input: &[f32],
    out: &mut [f32],
    accumulate: bool,
) {
    let (image_in, image_out) = (conv.input_len(), conv.output_len());
    let (c_out, p) = (conv.out_channels(), conv.positions());
    let n = out.len() / image_out;
    let split = (UNITS_PER_THREAD * rayon::current_num_threads())
        .div_ceil(n.max(1))
        .clamp(1, c_out.div_ceil(CHANNEL_TILE));
    let per_unit = c_out.div_ceil(CHANNEL_TILE).div_ceil(split) * CHANNEL_TILE;
    out.par_chunks_mut(image_out)
        .enumerate()
        .for_each(|(i, y)| {
            let x = &input[i * image_in..(i + 1) * image_in];
            if split == 1 {
                return conv.forward(x, filters, y, accumulate);
            }
            y.par_chunks_mut(per_unit * p)
                .enumerate()
                .for_each(|(u, part)| {
                    let o0 = u * per_unit;
                    conv.forward_channels(x, filters, o0..o0 + part.len() / p, part, accumulate);
                });
        });
}

/// `y = W ⊛ x` (see the module docs): `x` `[N, C, H, W]`, `wt` `[O, C, k, k]`.
pub(crate) fn forward(x: &[f32], wt: &[f32], g: &Geometry) -> Vec<f32> {
    let (ckk, p) = (g.ckk(), g.p());
    let mut y = vec![0.0f32; g.n * g.o * p];
    if let Some(conv) = direct(g) {
        let filters = PackedFilters::new(&conv, wt, Orientation::Forward);
        direct_images(&conv, &filters, x, &mut y, false);
        return y;
    }
    let image = g.c * g.h * g.w;
    let w = Mat::row_major(wt, ckk);
    y.par_chunks_mut(g.o * p).enumerate().for_each(|(i, out)| {
        let xi = &x[i * image..(i + 1) * image];
        if g.pointwise() {
            let out = MatMut::row_major(out, p);
            return matmul((g.o, p, ckk), w, Mat::row_major(xi, p), out, false);
        }
        with_scratch(ckk * p, |col| {
            im2col(xi, g, col);
            matmul(
                (g.o, p, ckk),
                w,
                Mat::row_major(col, p),
                MatMut::row_major(out, p),
                false,
            );
        });
    });
    y
}

/// dL/dx for output gradient `dy`, added to `init` if given (else to zeros).
pub(crate) fn grad_input(wt: &[f32], dy: &[f32], g: &Geometry, init: Option<&[f32]>) -> Vec<f32> {
    let (ckk, p, image) = (g.ckk(), g.p(), g.c * g.h * g.w);
    let mut dx = init.map_or_else(|| vec![0.0f32; g.n * image], <[f32]>::to_vec);
    let acc = init.is_some();
    if let Some(conv) = direct(g) {
        // dx = conv(dy, W'), W' the filters transposed and rotated by 180° (module docs).
        let back = conv.transposed();
        let filters = PackedFilters::new(&back, wt, Orientation::Flipped);
        direct_images(&back, &filters, dy, &mut dx, acc);
        return dx;
    }
    if g.same() && !g.pointwise() && g.o <= g.c {
        // dx = conv(dy, W') with the same geometry (see `flipped_transpose`): an im2col
        // gather of dy and a product whose inner dimension is O·k·k, instead of a product
        // with inner dimension O (16 in ResNet-32's first stage) and a col2im scatter.
        let wf = flipped_transpose(wt, g);
        let gt = Geometry {
            c: g.o,
            o: g.c,
            ..*g
        };
        let okk = gt.ckk();
        let wf = Mat::row_major(&wf, okk);
        dx.par_chunks_mut(image).enumerate().for_each(|(i, out)| {
            let dyi = &dy[i * g.o * p..(i + 1) * g.o * p];
            with_scratch(okk * p, |col| {
                im2col(dyi, &gt, col);
                let out = MatMut::row_major(out, p);
                matmul((g.c, p, okk), wf, Mat::row_major(col, p), out, acc);
            });
        });
        return dx;
    }
    let w_t = Mat::transposed(wt, ckk);
    dx.par_chunks_mut(image).enumerate().for_each(|(i, out)| {
        let dyi = Mat::row_major(&dy[i * g.o * p..(i + 1) * g.o * p], p);
        if g.pointwise() {
            return matmul((ckk, p, g.o), w_t, dyi, MatMut::row_major(out, p), acc);
        }
        with_scratch(ckk * p, |dcol| {
            matmul((ckk, p, g.o), w_t, dyi, MatMut::row_major(dcol, p), false);
            col2im_add(dcol, g, out);
        });
    });
    dx
}

/// dL/dW for input `x` and output gradient `dy`.
pub(crate) fn grad_weight(x: &[f32], dy: &[f32], g: &Geometry) -> Vec<f32> {
    let (ckk, p, image) = (g.ckk(), g.p(), g.c * g.h * g.w);
    let per_group = g.n.div_ceil(WEIGHT_GRAD_GROUPS).max(1);
    let groups: Vec<usize> = (0..g.n.div_ceil(per_group)).collect();
    let direct = direct(g).filter(SameConv::has_weight_grad);
    let partial: Vec<Vec<f32>> = groups
        .par_iter()
        .map(|&grp| {
            // Accumulated column-major ([C·k·k, O] row-major): the product then packs
            // dy_n (O × P) instead of the C·k·k × P im2col matrix, 9× less for a 3×3 conv.
            let mut dw_t = vec![0.0f32; g.o * ckk];
            let images = grp * per_group..((grp + 1) * per_group).min(g.n);
            if let Some(conv) = direct.as_ref() {
                for (j, i) in images.enumerate() {
                    let xi = &x[i * image..(i + 1) * image];
                    let dyi = &dy[i * g.o * p..(i + 1) * g.o * p];
                    conv.weight_grad_transposed(xi, dyi, &mut dw_t, j > 0);
                }
                return dw_t;
            }
            let scratch = if g.pointwise() { 0 } else { ckk * p };
            with_scratch(scratch, |col| {
                for (j, i) in images.enumerate() {
                    let xi = &x[i * image..(i + 1) * image];
                    let c: &[f32] = if g.pointwise() {
                        xi
                    } else {
                        im2col(xi, g, col);
                        col
                    };
                    let dyi = &dy[i * g.o * p..(i + 1) * g.o * p];
                    let dst = MatMut::column_major(&mut dw_t, g.o);
                    matmul(
                        (g.o, ckk, p),
                        Mat::row_major(dyi, p),
                        Mat::transposed(c, p),
                        dst,
                        j > 0,
                    );
                }
            });
            dw_t
        })
        .collect();
    // The groups summed in order in their own (column-major) layout, then one transpose in
    // tiles: adding each group straight into the row-major result would stride through it once
    // per group (1.4 % of an FCN-R18-d8 step, whose 512-channel 3×3 weights are 9 MB).
    let mut dw_t = vec![0.0f32; g.o * ckk];
    for part in &partial {
        for (d, v) in dw_t.iter_mut().zip(part) {
            *d += v;
        }
    }
    let mut dw = vec![0.0f32; g.o * ckk];
    const TILE: usize = 32;
    for r0 in (0..ckk).step_by(TILE) {
        for o0 in (0..g.o).step_by(TILE) {
            for r in r0..(r0 + TILE).min(ckk) {
                for oc in o0..(o0 + TILE).min(g.o) {
                    dw[oc * ckk + r] = dw_t[r * g.o + oc];
                }
            }
        }
    }
    dw
}

/// `W'[c, o, ky, kx] = W[o, c, k−1−ky, k−1−kx]` (`[C, O·k·k]`): for a "same" convolution
/// (stride 1, padding `d·(k−1)/2`) tap `(ky, kx)` reads offset `(ky·d − p, kx·d − p)` and the
/// flipped tap the opposite one, so `dx = conv(dy, W')` with the same geometry.
fn flipped_transpose(wt: &[f32], g: &Geometry) -> Vec<f32> {
    let kk = g.k * g.k;
    let mut wf = vec![0.0f32; wt.len()];
    for (o, filters) in wt.chunks_exact(g.c * kk).enumerate() {
        for (c, taps) in filters.chunks_exact(kk).enumerate() {
            let dst = &mut wf[(c * g.o + o) * kk..][..kk];
            for (d, v) in dst.iter_mut().zip(taps.iter().rev()) {
                *d = *v;
            }
        }
    }
    wf
}

/// The convolution op (see the module docs).
#[derive(Debug, Clone, Copy)]
pub struct Conv2dCpu {
    /// Stride.
    pub stride: usize,
    /// Zero padding on every side.
    pub padding: usize,
    /// Spacing of the kernel taps (1: an ordinary convolution).
    pub dilation: usize,
}

impl CustomOp2 for Conv2dCpu {
    fn name(&self) -> &'static str {
        "sar-conv2d"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let g = Geometry::new(l1.dims(), l2.dims(), *self)?;
        let x = super::cpu_f32("conv2d", s1, l1, "input")?;
        let wt = super::cpu_f32("conv2d", s2, l2, "weight")?;
        let y = forward(x, wt, &g);
        Ok((CpuStorage::F32(y), Shape::from((g.n, g.o, g.oh, g.ow))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        wt: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        // The images of a first layer need no gradient (candle then adds nothing either).
        let dx = if x.track_op() {
            Some(wt.apply_op3_no_bwd(&grad, x, &GradInput(*self))?)
        } else {
            None
        };
        let dw = x.apply_op3_no_bwd(&grad, wt, &GradWeight(*self))?;
        Ok((dx, Some(dw)))
    }
}

/// dL/dx from (W, dy, x-for-shape).
struct GradInput(Conv2dCpu);

impl CustomOp3 for GradInput {
    fn name(&self) -> &'static str {
        "sar-conv2d-grad-input"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        _s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let g = Geometry::new(l3.dims(), l1.dims(), self.0)?;
        let wt = super::cpu_f32("conv2d", s1, l1, "weight")?;
        let dy = super::cpu_f32("conv2d", s2, l2, "output gradient")?;
        let dx = grad_input(wt, dy, &g, None);
        Ok((CpuStorage::F32(dx), Shape::from(l3.dims())))
    }
}

/// dL/dW from (x, dy, W-for-shape).
struct GradWeight(Conv2dCpu);

/// Images are summed in this many fixed groups (then the groups in order): the result does
/// not depend on how many threads run them.
const WEIGHT_GRAD_GROUPS: usize = 16;

impl CustomOp3 for GradWeight {
    fn name(&self) -> &'static str {
        "sar-conv2d-grad-weight"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        _s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let g = Geometry::new(l1.dims(), l3.dims(), self.0)?;
        let x = super::cpu_f32("conv2d", s1, l1, "input")?;
        let dy = super::cpu_f32("conv2d", s2, l2, "output gradient")?;
        let dw = grad_weight(x, dy, &g);
        Ok((CpuStorage::F32(dw), Shape::from(l3.dims())))
    }
}

/// `x ⊛ w` with this op on the CPU for contiguous f32, candle's `conv2d` otherwise.
pub fn conv2d(
    x: &Tensor,
    w: &Tensor,
    stride: usize,
    padding: usize,
    dilation: usize,
) -> candle_core::Result<Tensor> {
    if x.device().is_cpu()
        && x.dtype() == candle_core::DType::F32
        && w.dtype() == candle_core::DType::F32
    {
        x.contiguous()?.apply_op2(
            &w.contiguous()?,
            Conv2dCpu {
                stride,
                padding,
                dilation,
            },
        )
    } else {
        conv2d_composite(x, w, stride, padding, dilation)
    }
}

/// candle's `conv2d`, made safe for its backward. candle 0.11 takes the transposed
/// convolution's output padding of the input gradient from the height alone and applies it to
/// both axes, so a strided conv whose height and width leave different remainders
/// ((H + 2p − e) mod s ≠ (W + 2p − e) mod s, e = d·(K − 1) + 1; e.g. 9×8 with a 3×3/2 kernel)
/// fails in backward with a shape error. Such inputs are padded explicitly and the rows and
/// columns no output reads are cut off, so both remainders are 0: the same sums, and a
/// backward that fits (the cut's gradient is zero, as it is in truth).
fn conv2d_composite(
    x: &Tensor,
    w: &Tensor,
    stride: usize,
    padding: usize,
    dilation: usize,
) -> candle_core::Result<Tensor> {
    let (_, _, h, wd) = x.dims4()?;
    let (_, _, kh, kw) = w.dims4()?;
    let (eh, ew) = (
        dilation * (kh.max(1) - 1) + 1,
        dilation * (kw.max(1) - 1) + 1,
    );
    let (ph, pw) = (h + 2 * padding, wd + 2 * padding);
    if stride <= 1 || ph < eh || pw < ew || (ph - eh) % stride == (pw - ew) % stride {
        return x.conv2d(w, padding, stride, dilation, 1);
    }
    let used_h = (ph - eh) / stride * stride + eh;
    let used_w = (pw - ew) / stride * stride + ew;
    x.pad_with_zeros(2, padding, padding)?
        .pad_with_zeros(3, padding, padding)?
        .narrow(2, 0, used_h)?
        .narrow(3, 0, used_w)?
        .conv2d(w, 0, stride, dilation, 1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::test_util::{flat, randn};
    use candle_core::{DType, Device, Var};

    /// Direct f64 loops: y, dx and dw for upstream gradient `up`.
    #[allow(clippy::type_complexity)]
    fn naive(
        x: &[f64],
        w: &[f64],
        up: &[f64],
        (n, c, h, wd, o, k, s, p): (usize, usize, usize, usize, usize, usize, usize, usize),
        d: usize,
    ) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
        let e = d * (k - 1) + 1;
        let (oh, ow) = ((h + 2 * p - e) / s + 1, (wd + 2 * p - e) / s + 1);
        let mut y = vec![0.0; n * o * oh * ow];
        let mut dx = vec![0.0; x.len()];
        let mut dw = vec![0.0; w.len()];
        for i in 0..n {
            for oc in 0..o {
                for oy in 0..oh {
                    for ox in 0..ow {
                        let yi = ((i * o + oc) * oh + oy) * ow + ox;
                        for ic in 0..c {
                            for ky in 0..k {
                                for kx in 0..k {
                                    let iy = (oy * s + ky * d) as isize - p as isize;
                                    let ix = (ox * s + kx * d) as isize - p as isize;
                                    if iy < 0 || ix < 0 || iy >= h as isize || ix >= wd as isize {
                                        continue;
                                    }
                                    let xi = ((i * c + ic) * h + iy as usize) * wd + ix as usize;
                                    let wi = ((oc * c + ic) * k + ky) * k + kx;
                                    y[yi] += w[wi] * x[xi];
                                    dx[xi] += w[wi] * up[yi];
                                    dw[wi] += x[xi] * up[yi];
                                }
                            }
                        }
                    }
                }
            }
        }
        (y, dx, dw)
    }

    /// Forward and both gradients against direct f64 loops, for odd sizes, strides, padding
    /// and 1×1 kernels, with a random upstream gradient so every output element matters.
    /// (candle's own conv2d backward fails on the 5×4 stride-2 case: its transposed conv
    /// computes the output padding from the height only.)
    #[test]
    fn matches_direct_loops_forward_and_gradients() {
        let plain = [
            (3, 2, 7, 5, 4, 3, 1, 1),
            (2, 3, 8, 8, 5, 3, 2, 1),
            (2, 4, 6, 6, 3, 1, 1, 0),
            (17, 3, 5, 4, 2, 1, 2, 0),
            (2, 2, 9, 9, 3, 7, 2, 3),
            (1, 1, 3, 3, 1, 3, 1, 0),
            (2, 3, 6, 7, 2, 3, 2, 1),
            (2, 2, 4, 5, 3, 1, 2, 2),
            (1, 2, 3, 3, 2, 5, 1, 2),
            (2, 1, 5, 6, 2, 2, 3, 1),
            (2, 64, 8, 8, 256, 1, 1, 0),
            (3, 40, 9, 9, 72, 3, 1, 1),
            (2, 300, 4, 4, 20, 1, 1, 0),
            // N > 16: each of the weight gradient's 16 groups accumulates several images
            // (column-major); "same" 3×3 and 5×5 convs (shifted-plane im2col and col2im) on
            // non-square maps, and a 1-row map where every tap but the middle row wraps.
            (40, 2, 4, 4, 3, 3, 1, 1),
            (35, 3, 4, 4, 2, 1, 1, 0),
            (3, 4, 11, 6, 5, 3, 1, 1),
            (2, 3, 7, 9, 2, 5, 1, 2),
            (2, 2, 1, 5, 3, 3, 1, 1),
            // "Same" convs with O ≤ C: the input gradient as a conv of dy with the flipped
            // kernel (C = O as in the ResNets, and O < C).
            (3, 8, 6, 7, 8, 3, 1, 1),
            (2, 6, 5, 5, 4, 3, 1, 1),
            // "Same" convs with 16·m output channels: the direct kernel's filter gradient too
            // (with more images than the 16 weight-gradient groups, and O > C).
            (3, 4, 9, 10, 16, 3, 1, 1),
            (20, 2, 4, 4, 32, 3, 1, 1),
            (2, 3, 5, 7, 48, 5, 1, 2),
        ];
        // Dilated (atrous) geometries as the output-stride-8 backbones and ASPP use them.
        let dilated = [
            ((2, 3, 9, 9, 4, 3, 1, 2), 2),
            ((2, 3, 9, 11, 4, 3, 1, 4), 4),
            ((1, 2, 8, 7, 3, 3, 2, 2), 2),
            ((2, 2, 5, 6, 3, 3, 1, 3), 3),
            ((1, 2, 13, 13, 2, 3, 1, 12), 12),
            ((1, 2, 6, 6, 2, 3, 1, 1), 2),
            ((2, 5, 9, 8, 3, 3, 1, 2), 2),
            ((2, 3, 9, 9, 16, 3, 1, 4), 4),
        ];
        // f32 on the CPU runs this op, "same" convs through the direct kernel where the CPU
        // has AVX-512F and, with it turned off, through im2col + gemm like the others; f64
        // runs candle's conv2d (as other devices do), whose backward needed a fix for strided
        // convs with different remainders per axis (e.g. 6×7 and 4×5 with stride 2).
        let cases = plain.iter().map(|&g| (g, 1)).chain(dilated);
        let runs = [(DType::F32, true), (DType::F32, false), (DType::F64, true)];
        for ((geo, dil), (dtype, direct)) in cases.flat_map(|c| runs.map(|r| (c, r))) {
            let check = || check_against_loops(geo, dil, dtype, direct);
            if direct {
                check();
            } else {
                sar_cpu::same_conv::without(check);
            }
        }
    }

    /// One geometry of [`matches_direct_loops_forward_and_gradients`].
    fn check_against_loops(
        geo: (usize, usize, usize, usize, usize, usize, usize, usize),
        dil: usize,
        dtype: DType,
        direct: bool,
    ) {
        let (n, c, h, w, o, k, stride, pad) = geo;
        let x = Var::from_tensor(&randn((n, c, h, w)).to_dtype(dtype).unwrap()).unwrap();
        let wt = Var::from_tensor(&randn((o, c, k, k)).to_dtype(dtype).unwrap()).unwrap();
        let ours = conv2d(x.as_tensor(), wt.as_tensor(), stride, pad, dil).unwrap();
        let up = randn(ours.dims()).to_dtype(dtype).unwrap();
        let (y, dx, dw) = naive(
            &flat(x.as_tensor()),
            &flat(wt.as_tensor()),
            &flat(&up),
            geo,
            dil,
        );
        let g = (&ours * &up)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        for (what, a, b) in [
            ("forward", flat(&ours), y),
            ("input gradient", flat(g.get(x.as_tensor()).unwrap()), dx),
            ("weight gradient", flat(g.get(wt.as_tensor()).unwrap()), dw),
        ] {
            assert_eq!(a.len(), b.len(), "{what} {geo:?}");
            let scale = b.iter().fold(1.0f64, |m, v| m.max(v.abs()));
            for (u, v) in a.iter().zip(&b) {
                assert!(
                    (u - v).abs() < 1e-5 * scale,
                    "{what} {geo:?} dilation {dil} {dtype:?} direct {direct}: {u} vs {v}"
                );
            }
        }
    }

    /// Images that are not graph variables get no gradient; the weight's is unchanged.
    #[test]
    fn a_constant_input_gets_no_gradient() {
        let x = randn((2, 3, 6, 6));
        let wt = Var::from_tensor(&randn((4, 3, 3, 3))).unwrap();
        let grad_w = |x: &Tensor| {
            let g = conv2d(x, wt.as_tensor(), 1, 1, 1)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            (g.get(x).is_some(), flat(g.get(wt.as_tensor()).unwrap()))
        };
        let (has_dx, dw) = grad_w(&x);
        assert!(!has_dx);
        let (has_dx, dw_var) = grad_w(Var::from_tensor(&x).unwrap().as_tensor());
        assert!(has_dx);
        assert_eq!(dw, dw_var);
    }

    #[test]
    fn shape_errors_are_errors() {
        let dev = Device::Cpu;
        let x = Tensor::zeros((1, 2, 4, 4), candle_core::DType::F32, &dev).unwrap();
        let w = Tensor::zeros((3, 5, 3, 3), candle_core::DType::F32, &dev).unwrap();
        assert!(conv2d(&x, &w, 1, 1, 1).is_err());
        let w = Tensor::zeros((3, 2, 7, 7), candle_core::DType::F32, &dev).unwrap();
        assert!(conv2d(&x, &w, 1, 1, 1).is_err());
        let w = Tensor::zeros((3, 2, 3, 3), candle_core::DType::F32, &dev).unwrap();
        assert!(conv2d(&x, &w, 1, 0, 2).is_err(), "dilated extent 5 > 4");
    }
}
