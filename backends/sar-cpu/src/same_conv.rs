//! A direct 2-D convolution for stride-1 "same" convolutions (output the input's size), f32,
//! AVX-512: no im2col matrix, no packing of the images.
//!
//! For one image `x` `[C, H, W]` (row-major planes, `P = H·W` positions) and filters `w`
//! `[O, C, k, k]` with odd `k`, dilation `d` and padding `d·(k−1)/2`:
//!
//! `y[o, q] (+)= Σ_c Σ_(ky, kx) w[o, c, ky, kx] · x[c, q + s(ky, kx)]`,
//! `s(ky, kx) = (ky·d − pad)·W + (kx·d − pad)`,
//!
//! where a term whose input row or column falls outside the image is zero (the padding). Each
//! input plane shifted by `s` is read straight from `x` with unaligned loads, lanes that would
//! read padding (or past the plane) masked off, so the inner loop is 4 loads of 16 positions,
//! 6 broadcast filter values and 24 fused multiply-adds into a register tile of 64 positions ×
//! 6 output channels. The filters are packed once per call ([`PackedFilters`],
//! `[⌈O/6⌉][C][k·k][6]`, zero-filled past `O`).
//!
//! The same kernel gives a "same" convolution's input gradient: `dx = conv(dy, w')` with
//! `w'[c, o, ky, kx] = w[o, c, k−1−ky, k−1−kx]` ([`Orientation::Flipped`]), because tap
//! `(ky, kx)` reads offset `s` and the flipped tap `−s`. The filter gradient
//! ([`SameConv::weight_grad_transposed`], `O` a multiple of 16) is an outer-product loop
//! instead: per position, one input value of each of 6 filter positions `(c, ky, kx)` times
//! `dy`'s 64 output channels at that position, from a zero-bordered copy of the image and `dy`
//! transposed to `[H·W, O]`, so that no lane reads padding and no sum crosses lanes.
//!
//! Every output sums its terms in one fixed order (channels in blocks of 64 and taps row by
//! row within a channel; positions in order for the filter gradient), whatever the number of
//! threads. Against the `gemm` crate on products of the same sizes (one thread, 2-core AMD
//! EPYC Zen 4, GFLOP/s; the gemm figures leave out the im2col copy it needs): forward 109 vs
//! 104 on a 512-channel 3×3 layer at 64², 114 vs 80 on 64 channels at 128², 106 vs 44 on 32
//! channels at 256²; filter gradient 105 vs 103, 102 vs 88, 95 vs 82
//! (`cargo run --release -p sar-cpu --example same_conv_bench`; the FMA peak is 117.5).
//!
//! [`SameConv::new`] returns `None` where the kernel does not apply (even `k`, a CPU without
//! AVX-512F, or turned off: `SAR_DIRECT_CONV=0`, [`without`]); callers then use im2col and a
//! matrix product.

use std::cell::Cell;
use std::sync::OnceLock;

/// Output channels per register tile: [`SameConv::forward_channels`] splits start at its
/// multiples.
pub const CHANNEL_TILE: usize = 6;
const NR: usize = CHANNEL_TILE;
/// Positions per register tile (4 vectors of 16).
const TILE: usize = 64;
/// Input channels per pass over the output (cache blocking: the pass's input rows and filter
/// panels stay in L2).
const CHANNEL_BLOCK: usize = 64;
/// Position tiles per filter panel (the panel is reused over this many tiles from L1/L2).
const TILES_PER_PANEL: usize = 8;

/// Off where the environment variable `SAR_DIRECT_CONV` is `0` (read once).
fn enabled_by_env() -> bool {
    static ENABLED: OnceLock<bool> = OnceLock::new();
    *ENABLED.get_or_init(|| std::env::var_os("SAR_DIRECT_CONV").is_none_or(|v| v != "0"))
}

thread_local! {
    static OFF_ON_THIS_THREAD: Cell<bool> = const { Cell::new(false) };
}

/// Whether this CPU runs the kernel (AVX-512F) and it is on: not turned off for the process
/// (`SAR_DIRECT_CONV=0`, for side-by-side runs) nor on this thread ([`without`]).
pub fn available() -> bool {
    enabled_by_env() && !OFF_ON_THIS_THREAD.with(Cell::get) && cpu_has_avx512f()
}

/// Runs `f` with the kernel off on the calling thread: [`SameConv::new`] returns `None` there
/// until `f` returns, so callers that decide on their own thread take their other path (the
/// CPU convolutions decide before they hand work to rayon). For tests of that path.
pub fn without<R>(f: impl FnOnce() -> R) -> R {
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            OFF_ON_THIS_THREAD.with(|off| off.set(self.0));
        }
    }
    let _restore = Restore(OFF_ON_THIS_THREAD.with(|off| off.replace(true)));
    f()
}

#[cfg(target_arch = "x86_64")]
fn cpu_has_avx512f() -> bool {
    std::arch::is_x86_feature_detected!("avx512f")
}

#[cfg(not(target_arch = "x86_64"))]
fn cpu_has_avx512f() -> bool {
    false
}

/// Which filters a [`PackedFilters`] holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Orientation {
    /// `w` `[O, C, k, k]` as given: the convolution from `C` to `O` channels.
    Forward,
    /// `w` `[O, C, k, k]` of the forward convolution, transposed and rotated by 180°: the
    /// convolution from `O` to `C` channels that computes the forward's input gradient.
    Flipped,
}

/// One image's geometry of a stride-1 convolution whose output has the input's size, with
/// its taps' plane offsets and read masks (computed once, shared by every image and thread).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SameConv {
    in_channels: usize,
    out_channels: usize,
    h: usize,
    w: usize,
    k: usize,
    dilation: usize,
    /// Per tap, `s(ky, kx)`.
    shifts: Vec<isize>,
    /// Per 64-position tile and tap, the lanes that read inside the image.
    masks: Vec<[u16; 4]>,
}

impl SameConv {
    /// The convolution from `in_channels` to `out_channels` over `h × w` planes with a `k × k`
    /// kernel, `dilation` and padding `dilation·(k−1)/2`; `None` for an even or zero `k`, a
    /// zero size, or where the kernel is not [`available`] (on this thread).
    pub fn new(
        in_channels: usize,
        out_channels: usize,
        (h, w): (usize, usize),
        k: usize,
        dilation: usize,
    ) -> Option<Self> {
        let sizes = [in_channels, out_channels, h, w, dilation];
        if k.is_multiple_of(2) || sizes.contains(&0) || !available() {
            return None;
        }
        let mut conv = SameConv {
            in_channels,
            out_channels,
            h,
            w,
            k,
            dilation,
            shifts: Vec::new(),
            masks: Vec::new(),
        };
        conv.shifts = (0..conv.taps())
            .map(|t| {
                let (sy, sx) = conv.offsets(t);
                sy * w as isize + sx
            })
            .collect();
        let (tiles, taps) = (conv.positions().div_ceil(TILE), conv.taps());
        let mut masks = vec![[0u16; 4]; tiles * taps];
        for (i, m) in masks.chunks_exact_mut(taps).enumerate() {
            conv.tap_masks(i * TILE, m);
        }
        conv.masks = masks;
        Some(conv)
    }

    /// The convolution with input and output channels swapped (the one that computes this
    /// one's input gradient with [`Orientation::Flipped`] filters).
    pub fn transposed(&self) -> Self {
        SameConv {
            in_channels: self.out_channels,
            out_channels: self.in_channels,
            ..self.clone()
        }
    }

    /// Input channels.
    pub fn in_channels(&self) -> usize {
        self.in_channels
    }

    /// Output channels.
    pub fn out_channels(&self) -> usize {
        self.out_channels
    }

    /// Positions per plane, `H·W`.
    pub fn positions(&self) -> usize {
        self.h * self.w
    }

    fn taps(&self) -> usize {
        self.k * self.k
    }

    fn pad(&self) -> isize {
        (self.dilation * (self.k - 1) / 2) as isize
    }

    /// Tap `t`'s row and column offsets `(ky·d − pad, kx·d − pad)`.
    fn offsets(&self, t: usize) -> (isize, isize) {
        let (ky, kx) = (t / self.k, t % self.k);
        let d = self.dilation as isize;
        (ky as isize * d - self.pad(), kx as isize * d - self.pad())
    }

    /// Input length of one image, `in_channels·H·W`.
    pub fn input_len(&self) -> usize {
        self.in_channels * self.positions()
    }

    /// Output length of one image, `out_channels·H·W`.
    pub fn output_len(&self) -> usize {
        self.out_channels * self.positions()
    }

    /// For the 64 positions from `q0`: per tap, which of each 16-lane vector's lanes read
    /// inside the image (bit `l` of `masks[t][j]` is position `q0 + 16j + l`; none past the
    /// plane).
    fn tap_masks(&self, q0: usize, masks: &mut [[u16; 4]]) {
        let (w, h) = (self.w as isize, self.h as isize);
        for (t, m) in masks.iter_mut().enumerate() {
            let (sy, sx) = self.offsets(t);
            *m = [0; 4];
            let (mut oy, mut ox) = (q0 / self.w, q0 % self.w);
            for lane in 0..TILE.min(self.positions() - q0) {
                let (iy, ix) = (oy as isize + sy, ox as isize + sx);
                if (0..h).contains(&iy) && (0..w).contains(&ix) {
                    m[lane / 16] |= 1 << (lane % 16);
                }
                ox += 1;
                if ox == self.w {
                    (oy, ox) = (oy + 1, 0);
                }
            }
        }
    }

    /// `y (+)= conv(x)` for one image: `x` `[in_channels, H, W]`, `y` `[out_channels, H, W]`;
    /// `accumulate = false` overwrites `y`. `filters` must come from this geometry (or, for
    /// [`Orientation::Flipped`], from the one it is the [`transposed`](Self::transposed) of).
    ///
    /// # Panics
    /// If a length does not match the geometry: the callers size the buffers from the same
    /// geometry, so this is a bug in the caller, never bad user input.
    pub fn forward(&self, x: &[f32], filters: &PackedFilters, y: &mut [f32], accumulate: bool) {
        self.forward_channels(x, filters, 0..self.out_channels, y, accumulate);
    }

    /// [`forward`](Self::forward) for output channels `outputs` only (a multiple of 6 at its
    /// start): `y` holds those channels, `[outputs.len(), H, W]`. Splitting one image's
    /// output channels over threads gives the same bits as one call.
    ///
    /// # Panics
    /// As [`forward`](Self::forward), and if `outputs` does not start at a multiple of 6 or
    /// reaches past `out_channels`.
    pub fn forward_channels(
        &self,
        x: &[f32],
        filters: &PackedFilters,
        outputs: std::ops::Range<usize>,
        y: &mut [f32],
        accumulate: bool,
    ) {
        let (p, taps) = (self.positions(), self.taps());
        assert!(
            filters.out_channels == self.out_channels
                && filters.in_channels == self.in_channels
                && filters.taps == taps,
            "same_conv: filters packed for another geometry"
        );
        assert!(
            (outputs.start.is_multiple_of(NR) && outputs.start <= outputs.end)
                || outputs.is_empty(),
            "same_conv: output range {outputs:?} must start at a multiple of {NR}"
        );
        assert!(
            outputs.end <= self.out_channels,
            "same_conv: output range {outputs:?} past {} channels",
            self.out_channels
        );
        assert_eq!(x.len(), self.input_len(), "same_conv: input length");
        assert_eq!(y.len(), outputs.len() * p, "same_conv: output length");
        assert!(cpu_has_avx512f(), "same_conv: needs AVX-512F");
        let tiles = p.div_ceil(TILE);
        let store_mask = |i: usize| -> [u16; 4] {
            core::array::from_fn(|j| {
                let valid = p.saturating_sub(i * TILE + 16 * j).min(16);
                ((1u32 << valid) - 1) as u16
            })
        };
        let panel_len = self.in_channels * taps * NR;
        for c0 in (0..self.in_channels).step_by(CHANNEL_BLOCK) {
            let c1 = (c0 + CHANNEL_BLOCK).min(self.in_channels);
            let acc = accumulate || c0 > 0;
            for t0 in (0..tiles).step_by(TILES_PER_PANEL) {
                for o0 in outputs.clone().step_by(NR) {
                    let rows = NR.min(outputs.end - o0);
                    let panel = &filters.data[(o0 / NR) * panel_len..][..panel_len];
                    for i in t0..(t0 + TILES_PER_PANEL).min(tiles) {
                        let q0 = i * TILE;
                        let run = Run {
                            x,
                            q0,
                            plane: p,
                            channels: c0..c1,
                            shifts: &self.shifts,
                            masks: &self.masks[i * taps..(i + 1) * taps],
                            panel,
                            store_mask: store_mask(i),
                            accumulate: acc,
                        };
                        let out = &mut y[(o0 - outputs.start) * p + q0..];
                        // SAFETY: AVX-512F was checked above; `run_tile` reads `x` only at
                        // unmasked lanes, which lie inside the image (`tap_masks`), and writes
                        // `rows` rows of `out` (stride `p`) at the positions below `p`, which
                        // the length asserts keep inside `y`.
                        #[cfg(target_arch = "x86_64")]
                        unsafe {
                            match rows {
                                6 => run_tile::<6>(&run, out),
                                5 => run_tile::<5>(&run, out),
                                4 => run_tile::<4>(&run, out),
                                3 => run_tile::<3>(&run, out),
                                2 => run_tile::<2>(&run, out),
                                _ => run_tile::<1>(&run, out),
                            }
                        }
                    }
                }
            }
        }
    }

    /// Whether [`weight_grad_transposed`](Self::weight_grad_transposed) runs this geometry:
    /// output channels a multiple of 16 (one vector).
    pub fn has_weight_grad(&self) -> bool {
        self.out_channels.is_multiple_of(16)
    }

    /// One image's filter gradient, transposed: `dwt[(c, ky, kx), o] (+)= Σ_q dy[o, q] ·
    /// x[c, q + s(ky, kx)]` (padding terms zero), `x` `[in_channels, H, W]`, `dy`
    /// `[out_channels, H, W]`, `dwt` `[in_channels·k·k, out_channels]` (the gradient of `w`
    /// `[O, C, k, k]` in column-major order); `accumulate = false` overwrites `dwt`.
    ///
    /// The image is first copied with its zero border (`[C, H + 2·pad, W + 2·pad]`) and `dy`
    /// transposed to `[H·W, O]` (each thread's [`scratch`](crate::scratch) buffers); a
    /// register tile of up to 64 output channels (vectors of 16) × 24/vectors filter
    /// positions then adds `x` value × `dy` row for each position in order. Positions run in
    /// blocks of rows; each gradient is the same sum in the same order whatever the
    /// thread count.
    ///
    /// # Panics
    /// If a length does not match the geometry (a bug in the caller, as for
    /// [`forward`](Self::forward)), or without [`has_weight_grad`](Self::has_weight_grad).
    pub fn weight_grad_transposed(&self, x: &[f32], dy: &[f32], dwt: &mut [f32], accumulate: bool) {
        let (p, taps, o) = (self.positions(), self.taps(), self.out_channels);
        let k_len = self.in_channels * taps;
        assert!(
            self.has_weight_grad(),
            "same_conv: weight_grad needs O a multiple of 16"
        );
        assert_eq!(x.len(), self.input_len(), "same_conv: input length");
        assert_eq!(
            dy.len(),
            self.output_len(),
            "same_conv: output gradient length"
        );
        assert_eq!(dwt.len(), o * k_len, "same_conv: filter gradient length");
        assert!(cpu_has_avx512f(), "same_conv: needs AVX-512F");
        let pad = self.pad() as usize;
        let (hp, wp) = (self.h + 2 * pad, self.w + 2 * pad);
        crate::scratch::with_scratch(self.in_channels * hp * wp + p * o, |buf: &mut [f32]| {
            let (xpad, dyt) = buf.split_at_mut(self.in_channels * hp * wp);
            xpad.fill(0.0);
            for (src, dst) in x.chunks_exact(p).zip(xpad.chunks_exact_mut(hp * wp)) {
                for (row, dst_row) in src.chunks_exact(self.w).zip(dst[pad * wp..].chunks_mut(wp)) {
                    dst_row[pad..pad + self.w].copy_from_slice(row);
                }
            }
            transpose(dy, o, p, dyt);
            // Offsets of (c, t)'s first input in `xpad`: the tap's shift is the border's.
            let base = |kt: usize| {
                let (c, t) = (kt / taps, kt % taps);
                let (ky, kx) = (t / self.k, t % self.k);
                c * hp * wp + ky * self.dilation * wp + kx * self.dilation
            };
            let block = GradBlock {
                xpad,
                dyt,
                wp,
                w: self.w,
                o,
            };
            let row_block = (GRAD_POSITIONS / self.w).max(1);
            let mut o0 = 0;
            while o0 < o {
                let vectors = ((o - o0) / 16).min(4);
                for (b, oy0) in (0..self.h).step_by(row_block).enumerate() {
                    let rows = oy0..(oy0 + row_block).min(self.h);
                    let acc = accumulate || b > 0;
                    let tile = 24 / vectors;
                    for k0 in (0..k_len).step_by(tile) {
                        let live = tile.min(k_len - k0);
                        let mut bases = [0usize; 24];
                        for (i, b) in bases.iter_mut().enumerate().take(tile) {
                            *b = base(k0 + i.min(live - 1));
                        }
                        let dst = &mut dwt[k0 * o + o0..];
                        // SAFETY: AVX-512F was checked above; every index the block reads
                        // (`bases` + rows of `xpad`, rows × `o` of `dyt`) and writes (`live`
                        // rows of `o` from `o0`, `vectors` × 16 wide) lies inside the buffers
                        // sized above.
                        #[cfg(target_arch = "x86_64")]
                        unsafe {
                            match vectors {
                                4 => grad_block::<6, 4>(
                                    &block,
                                    &bases,
                                    rows.clone(),
                                    o0,
                                    dst,
                                    live,
                                    acc,
                                ),
                                3 => grad_block::<8, 3>(
                                    &block,
                                    &bases,
                                    rows.clone(),
                                    o0,
                                    dst,
                                    live,
                                    acc,
                                ),
                                2 => grad_block::<12, 2>(
                                    &block,
                                    &bases,
                                    rows.clone(),
                                    o0,
                                    dst,
                                    live,
                                    acc,
                                ),
                                _ => grad_block::<24, 1>(
                                    &block,
                                    &bases,
                                    rows.clone(),
                                    o0,
                                    dst,
                                    live,
                                    acc,
                                ),
                            }
                        }
                    }
                }
                o0 += 16 * vectors;
            }
        });
    }
}

/// Filters packed for [`SameConv`]: `[⌈O/6⌉][C][k·k][6]`, zero past `O`.
#[derive(Debug, Clone)]
pub struct PackedFilters {
    data: Vec<f32>,
    in_channels: usize,
    out_channels: usize,
    taps: usize,
}

impl PackedFilters {
    /// Packs `w` `[O, C, k, k]` for `conv` (see [`Orientation`]: `Flipped` packs the
    /// filters of the convolution `conv` is the [`transposed`](SameConv::transposed) of).
    ///
    /// # Panics
    /// If `w` does not have `O·C·k·k` elements.
    pub fn new(conv: &SameConv, w: &[f32], orientation: Orientation) -> Self {
        let (cin, cout, taps) = (conv.in_channels, conv.out_channels, conv.taps());
        assert_eq!(w.len(), cin * cout * taps, "same_conv: filter length");
        let blocks = cout.div_ceil(NR);
        let mut data = vec![0.0f32; blocks * cin * taps * NR];
        for (b, panel) in data.chunks_exact_mut(cin * taps * NR).enumerate() {
            for (c, per_channel) in panel.chunks_exact_mut(taps * NR).enumerate() {
                for (t, lanes) in per_channel.chunks_exact_mut(NR).enumerate() {
                    for (r, v) in lanes.iter_mut().enumerate() {
                        let o = b * NR + r;
                        if o >= cout {
                            break;
                        }
                        *v = match orientation {
                            // w[o, c, t]
                            Orientation::Forward => w[(o * cin + c) * taps + t],
                            // the forward's w[c, o, k·k − 1 − t] ([in, out] swapped)
                            Orientation::Flipped => w[(c * cout + o) * taps + taps - 1 - t],
                        };
                    }
                }
            }
        }
        PackedFilters {
            data,
            in_channels: cin,
            out_channels: cout,
            taps,
        }
    }
}

/// Output positions per block of the filter gradient (whole rows; the block's `dy` rows,
/// 256 B each, stay in L2 while every filter position passes over them).
const GRAD_POSITIONS: usize = 2048;

/// `dst` `[cols, rows]` = the transpose of `src` `[rows, cols]`, `rows` a multiple of 16: each
/// 16 × 16 block through registers (AVX-512 shuffles), the last `cols % 16` columns one by one.
///
/// # Panics
/// If the lengths are not `rows·cols` or `rows` is not a multiple of 16.
fn transpose(src: &[f32], rows: usize, cols: usize, dst: &mut [f32]) {
    assert!(
        src.len() == rows * cols && dst.len() == rows * cols && rows.is_multiple_of(16),
        "same_conv: transpose of {rows}×{cols}"
    );
    assert!(cpu_has_avx512f(), "same_conv: needs AVX-512F");
    let full = cols / 16 * 16;
    for r0 in (0..rows).step_by(16) {
        for c0 in (0..full).step_by(16) {
            // SAFETY: AVX-512F was checked; rows r0..r0 + 16 and columns c0..c0 + 16 lie
            // inside both matrices (r0 + 16 ≤ rows, c0 + 16 ≤ full ≤ cols).
            #[cfg(target_arch = "x86_64")]
            unsafe {
                transpose_block(src, cols, dst, rows, r0, c0)
            };
        }
        for r in r0..r0 + 16 {
            for c in full..cols {
                dst[c * rows + r] = src[r * cols + c];
            }
        }
    }
}

/// The 16 × 16 block at `(r0, c0)` of `src` (row length `cols`) into `dst` (row length `rows`)
/// at `(c0, r0)`: interleave 32-bit pairs, 64-bit pairs, then 128-bit quarters twice.
///
/// # Safety
/// AVX-512F; the block must lie inside both slices.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn transpose_block(
    src: &[f32],
    cols: usize,
    dst: &mut [f32],
    rows: usize,
    r0: usize,
    c0: usize,
) {
    use core::arch::x86_64::*;
    let mut r = [_mm512_setzero_ps(); 16];
    for (i, v) in r.iter_mut().enumerate() {
        // SAFETY: row r0 + i, 16 columns from c0: inside src.
        *v = unsafe { _mm512_loadu_ps(src.as_ptr().add((r0 + i) * cols + c0)) };
    }
    let mut t = [_mm512_setzero_ps(); 16];
    for i in 0..8 {
        t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    let pd = _mm512_castps_pd;
    for g in 0..4 {
        let b = 4 * g;
        r[b] = _mm512_castpd_ps(_mm512_unpacklo_pd(pd(t[b]), pd(t[b + 2])));
        r[b + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(pd(t[b]), pd(t[b + 2])));
        r[b + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(pd(t[b + 1]), pd(t[b + 3])));
        r[b + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(pd(t[b + 1]), pd(t[b + 3])));
    }
    for h in 0..2 {
        let b = 8 * h;
        for j in 0..4 {
            t[b + j] = _mm512_shuffle_f32x4::<0x88>(r[b + j], r[b + 4 + j]);
            t[b + 4 + j] = _mm512_shuffle_f32x4::<0xdd>(r[b + j], r[b + 4 + j]);
        }
    }
    for j in 0..8 {
        r[j] = _mm512_shuffle_f32x4::<0x88>(t[j], t[8 + j]);
        r[8 + j] = _mm512_shuffle_f32x4::<0xdd>(t[j], t[8 + j]);
    }
    for (i, v) in r.iter().enumerate() {
        // SAFETY: row c0 + i of dst, 16 columns from r0: inside dst.
        unsafe { _mm512_storeu_ps(dst.as_mut_ptr().add((c0 + i) * rows + r0), *v) };
    }
}

#[cfg(test)]
#[test]
fn transpose_matches_the_definition() {
    if !available() {
        return;
    }
    for (rows, cols) in [(16, 16), (16, 1), (32, 37), (48, 64), (16, 200)] {
        let src: Vec<f32> = (0..rows * cols).map(|i| i as f32).collect();
        let mut dst = vec![f32::NAN; rows * cols];
        transpose(&src, rows, cols, &mut dst);
        for r in 0..rows {
            for c in 0..cols {
                assert_eq!(
                    dst[c * rows + r],
                    src[r * cols + c],
                    "{rows}×{cols} at ({r}, {c})"
                );
            }
        }
    }
}

/// One image's padded input and transposed output gradient for [`grad_block`].
struct GradBlock<'a> {
    /// `[C, H + 2·pad, W + 2·pad]`.
    xpad: &'a [f32],
    /// `[H·W, O]`.
    dyt: &'a [f32],
    /// Padded row length.
    wp: usize,
    /// Row length.
    w: usize,
    /// Output channels (`dyt`'s and the destination's row length).
    o: usize,
}

/// `ROWS` filter positions (first inputs at `bases`) × `V` vectors of 16 output channels from
/// `o0`: `dst[i·o + o0 + 16v + l] (+)= Σ_(oy in rows, ox) xpad[bases[i] + oy·wp + ox] ·
/// dyt[(oy·w + ox)·o + o0 + 16v + l]`, for the first `live` rows.
///
/// # Safety
/// AVX-512F must be available; the indices above must lie inside the buffers.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn grad_block<const ROWS: usize, const V: usize>(
    block: &GradBlock<'_>,
    bases: &[usize; 24],
    rows: std::ops::Range<usize>,
    o0: usize,
    dst: &mut [f32],
    live: usize,
    accumulate: bool,
) {
    use core::arch::x86_64::*;
    let o = block.o;
    let mut acc = [[_mm512_setzero_ps(); V]; ROWS];
    if accumulate {
        for (i, row) in acc.iter_mut().enumerate().take(live) {
            for (v, a) in row.iter_mut().enumerate() {
                // SAFETY: row i < live, 16 channels from o0 + 16v < o.
                *a = unsafe { _mm512_loadu_ps(dst.as_ptr().add(i * o + 16 * v)) };
            }
        }
    }
    let x = block.xpad.as_ptr();
    let dyt = block.dyt.as_ptr().wrapping_add(o0);
    for oy in rows {
        for ox in 0..block.w {
            let at = oy * block.wp + ox;
            let q = oy * block.w + ox;
            let mut g = [_mm512_setzero_ps(); V];
            for (v, gv) in g.iter_mut().enumerate() {
                // SAFETY: position q < H·W, channels o0 + 16v.. < o.
                *gv = unsafe { _mm512_loadu_ps(dyt.add(q * o + 16 * v)) };
            }
            for (row, &b) in acc.iter_mut().zip(bases) {
                // SAFETY: bases[i] + oy·wp + ox lies inside xpad (a tap of an inner position).
                let xv = _mm512_set1_ps(unsafe { *x.add(b + at) });
                for (a, &gv) in row.iter_mut().zip(&g) {
                    *a = _mm512_fmadd_ps(xv, gv, *a);
                }
            }
        }
    }
    for (i, row) in acc.iter().enumerate().take(live) {
        for (v, a) in row.iter().enumerate() {
            // SAFETY: as for the loads.
            unsafe { _mm512_storeu_ps(dst.as_mut_ptr().add(i * o + 16 * v), *a) };
        }
    }
}

/// One register tile's inputs.
struct Run<'a> {
    /// The whole image (`[C, H, W]`).
    x: &'a [f32],
    q0: usize,
    plane: usize,
    channels: std::ops::Range<usize>,
    shifts: &'a [isize],
    masks: &'a [[u16; 4]],
    panel: &'a [f32],
    store_mask: [u16; 4],
    accumulate: bool,
}

/// `R` output rows × 64 positions, summed over `run.channels` and all taps.
///
/// # Safety
/// AVX-512F must be available; `out` must hold `(R − 1)·plane` plus the tile's stored
/// positions; unmasked lanes must read inside the image (the masks of `tap_masks`).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn run_tile<const R: usize>(run: &Run<'_>, out: &mut [f32]) {
    use core::arch::x86_64::*;
    let taps = run.shifts.len();
    let mut acc = [[_mm512_setzero_ps(); 4]; R];
    for c in run.channels.clone() {
        // The tile's positions in channel c; shifted reads may start before or end after
        // the plane (masked lanes), so the address is computed with wrapping arithmetic.
        let xc = run.x.as_ptr().wrapping_add(c * run.plane + run.q0);
        let wc = &run.panel[c * taps * NR..(c + 1) * taps * NR];
        for ((&shift, m), wt) in run.shifts.iter().zip(run.masks).zip(wc.chunks_exact(NR)) {
            let base = xc.wrapping_offset(shift);
            // A full mask reads unmasked (cheaper on Zen 4); a partial one masked, which
            // neither reads nor faults on the lanes outside the image.
            let mut v = [_mm512_setzero_ps(); 4];
            for (j, vj) in v.iter_mut().enumerate() {
                let at = base.wrapping_add(16 * j);
                // SAFETY: the lanes read lie inside the image, by the masks.
                *vj = unsafe {
                    if m[j] == u16::MAX {
                        _mm512_loadu_ps(at)
                    } else {
                        _mm512_maskz_loadu_ps(m[j], at)
                    }
                };
            }
            for (r, row) in acc.iter_mut().enumerate() {
                let wv = _mm512_set1_ps(wt[r]);
                for (a, vj) in row.iter_mut().zip(v) {
                    *a = _mm512_fmadd_ps(vj, wv, *a);
                }
            }
        }
    }
    for (r, row) in acc.iter().enumerate() {
        let o = out[r * run.plane..].as_mut_ptr();
        for (j, &a) in row.iter().enumerate() {
            let m = run.store_mask[j];
            if m == 0 {
                continue;
            }
            let dst = o.wrapping_add(16 * j);
            // SAFETY: the lanes stored (mask m) are positions below `plane`, inside `out`.
            unsafe {
                let v = if run.accumulate {
                    _mm512_add_ps(a, _mm512_maskz_loadu_ps(m, dst))
                } else {
                    a
                };
                _mm512_mask_storeu_ps(dst, m, v);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Case {
        c: usize,
        o: usize,
        h: usize,
        w: usize,
        k: usize,
        d: usize,
    }

    fn values(len: usize, seed: u64) -> Vec<f32> {
        let mut rng = sar_math::rng::SeededRng::new(seed);
        (0..len).map(|_| rng.next_normal() as f32).collect()
    }

    /// Calls `f(o, c, t, out, inp)` for every term of the convolution by the definition: output
    /// channel `o`, input channel `c`, tap `t`, the output's position `out` in its plane and the
    /// input's position `inp` in its plane (taps that read padding skipped).
    fn for_each_term(g: &Case, mut f: impl FnMut(usize, usize, usize, usize, usize)) {
        let pad = (g.d * (g.k - 1) / 2) as isize;
        for o in 0..g.o {
            for c in 0..g.c {
                for t in 0..g.k * g.k {
                    for oy in 0..g.h {
                        for ox in 0..g.w {
                            let iy = (oy + (t / g.k) * g.d) as isize - pad;
                            let ix = (ox + (t % g.k) * g.d) as isize - pad;
                            if iy < 0 || ix < 0 || iy >= g.h as isize || ix >= g.w as isize {
                                continue;
                            }
                            f(o, c, t, oy * g.w + ox, iy as usize * g.w + ix as usize);
                        }
                    }
                }
            }
        }
    }

    /// `sums[at(term)] += term` and `scale[at(term)] += |term|` in f64 over every term.
    fn sum_terms(
        g: &Case,
        len: usize,
        mut term: impl FnMut(usize, usize, usize, usize, usize) -> (usize, f64),
    ) -> (Vec<f64>, Vec<f64>) {
        let (mut sums, mut scale) = (vec![0.0f64; len], vec![0.0f64; len]);
        for_each_term(g, |o, c, t, out, inp| {
            let (at, v) = term(o, c, t, out, inp);
            sums[at] += v;
            scale[at] += v.abs();
        });
        (sums, scale)
    }

    /// `y[o, q]` and `Σ |terms|` in f64 by the definition (the direct loops).
    fn reference(x: &[f32], w: &[f32], g: &Case) -> (Vec<f64>, Vec<f64>) {
        let (p, kk) = (g.h * g.w, g.k * g.k);
        sum_terms(g, g.o * p, |o, c, t, out, inp| {
            let v = f64::from(w[(o * g.c + c) * kk + t]) * f64::from(x[c * p + inp]);
            (o * p + out, v)
        })
    }

    /// The input gradient of `sum(y ⊙ dy)` in f64: `dx[c, i] = Σ w[o, c, t] · dy[o, q]` over
    /// the `(o, t, q)` whose tap `t` at output `q` reads input `i`.
    fn reference_grad_input(dy: &[f32], w: &[f32], g: &Case) -> (Vec<f64>, Vec<f64>) {
        let (p, kk) = (g.h * g.w, g.k * g.k);
        sum_terms(g, g.c * p, |o, c, t, out, inp| {
            let v = f64::from(w[(o * g.c + c) * kk + t]) * f64::from(dy[o * p + out]);
            (c * p + inp, v)
        })
    }

    fn assert_close(what: &str, got: &[f32], want: &[f64], scale: &[f64]) {
        assert_eq!(got.len(), want.len(), "{what}: length");
        for (i, ((&g, &w), &s)) in got.iter().zip(want).zip(scale).enumerate() {
            let tol = 1e-6 * s + 1e-30;
            assert!(
                (f64::from(g) - w).abs() <= tol,
                "{what}[{i}]: {g} against {w} (tolerance {tol:e})"
            );
        }
    }

    const CASES: &[Case] = &[
        // fewer positions than one tile, output-channel tails of every size
        Case {
            c: 3,
            o: 7,
            h: 5,
            w: 9,
            k: 3,
            d: 1,
        },
        Case {
            c: 2,
            o: 11,
            h: 4,
            w: 4,
            k: 3,
            d: 1,
        },
        // ResNet-32's first stage: tiles spanning two rows
        Case {
            c: 16,
            o: 16,
            h: 32,
            w: 32,
            k: 3,
            d: 1,
        },
        // rows narrower than a vector, odd sizes
        Case {
            c: 5,
            o: 13,
            h: 17,
            w: 3,
            k: 3,
            d: 2,
        },
        Case {
            c: 4,
            o: 5,
            h: 23,
            w: 1,
            k: 3,
            d: 1,
        },
        // a dilation beyond the map: taps that read only padding
        Case {
            c: 4,
            o: 6,
            h: 8,
            w: 8,
            k: 3,
            d: 5,
        },
        Case {
            c: 3,
            o: 4,
            h: 10,
            w: 70,
            k: 3,
            d: 4,
        },
        // 5×5, 1×1
        Case {
            c: 2,
            o: 3,
            h: 9,
            w: 11,
            k: 5,
            d: 1,
        },
        Case {
            c: 3,
            o: 2,
            h: 4,
            w: 33,
            k: 1,
            d: 1,
        },
        // more input channels than one channel block
        Case {
            c: 70,
            o: 8,
            h: 6,
            w: 6,
            k: 3,
            d: 1,
        },
        // rows of 64 (a tile per row), dilated as in FCN-R18-d8's last stage
        Case {
            c: 6,
            o: 7,
            h: 9,
            w: 64,
            k: 3,
            d: 4,
        },
    ];

    #[test]
    fn forward_matches_the_definition() {
        if !available() {
            eprintln!("skipped: this CPU has no AVX-512F, the kernel does not run here");
            return;
        }
        for (i, g) in CASES.iter().enumerate() {
            let conv = SameConv::new(g.c, g.o, (g.h, g.w), g.k, g.d).expect("odd k");
            let p = g.h * g.w;
            let x = values(g.c * p, 10 + i as u64);
            let w = values(g.o * g.c * g.k * g.k, 20 + i as u64);
            let filters = PackedFilters::new(&conv, &w, Orientation::Forward);
            let (want, scale) = reference(&x, &w, g);
            // Overwrite: old contents are not read.
            let mut y = vec![f32::NAN; g.o * p];
            conv.forward(&x, &filters, &mut y, false);
            assert_close(&format!("case {i} y"), &y, &want, &scale);
            // Accumulate: y + conv(x).
            let init = values(g.o * p, 30 + i as u64);
            let mut acc = init.clone();
            conv.forward(&x, &filters, &mut acc, true);
            let want_acc: Vec<f64> = want
                .iter()
                .zip(&init)
                .map(|(a, &b)| a + f64::from(b))
                .collect();
            let scale_acc: Vec<f64> = scale
                .iter()
                .zip(&init)
                .map(|(s, &b)| s + f64::from(b).abs())
                .collect();
            assert_close(&format!("case {i} y + init"), &acc, &want_acc, &scale_acc);
            // Output channels split over calls: the same bits.
            let mut split = vec![0.0f32; g.o * p];
            let cut = NR.min(g.o);
            let (head, tail) = split.split_at_mut(cut * p);
            conv.forward_channels(&x, &filters, 0..cut, head, false);
            conv.forward_channels(&x, &filters, cut..g.o, tail, false);
            assert!(
                split
                    .iter()
                    .zip(&y)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "case {i}: split output channels changed the bits"
            );
        }
    }

    #[test]
    fn flipped_filters_give_the_input_gradient() {
        if !available() {
            eprintln!("skipped: this CPU has no AVX-512F, the kernel does not run here");
            return;
        }
        for (i, g) in CASES.iter().enumerate() {
            let conv = SameConv::new(g.c, g.o, (g.h, g.w), g.k, g.d).expect("odd k");
            let back = conv.transposed();
            let p = g.h * g.w;
            let dy = values(g.o * p, 40 + i as u64);
            let w = values(g.o * g.c * g.k * g.k, 50 + i as u64);
            let filters = PackedFilters::new(&back, &w, Orientation::Flipped);
            let mut dx = vec![f32::NAN; g.c * p];
            back.forward(&dy, &filters, &mut dx, false);
            let (want, scale) = reference_grad_input(&dy, &w, g);
            assert_close(&format!("case {i} dx"), &dx, &want, &scale);
        }
    }

    /// `dw[o, c, t] = Σ_n Σ_q dy_n[o, q] · x_n[c, q + s_t]` and `Σ |terms|` in f64.
    fn reference_grad_weight(x: &[f32], dy: &[f32], g: &Case, n: usize) -> (Vec<f64>, Vec<f64>) {
        let (p, kk) = (g.h * g.w, g.k * g.k);
        sum_terms(g, g.o * g.c * kk, |o, c, t, out, inp| {
            let v = (0..n)
                .map(|i| {
                    f64::from(dy[(i * g.o + o) * p + out]) * f64::from(x[(i * g.c + c) * p + inp])
                })
                .sum::<f64>();
            ((o * g.c + c) * kk + t, v)
        })
    }

    #[test]
    fn weight_grad_matches_the_definition() {
        if !available() {
            eprintln!("skipped: this CPU has no AVX-512F, the kernel does not run here");
            return;
        }
        // Output channels that are multiples of 16: each tile width (4, 3, 2, 1 vectors).
        let cases = [
            Case {
                c: 3,
                o: 16,
                h: 5,
                w: 9,
                k: 3,
                d: 1,
            },
            Case {
                c: 5,
                o: 32,
                h: 17,
                w: 3,
                k: 3,
                d: 2,
            },
            Case {
                c: 2,
                o: 48,
                h: 9,
                w: 11,
                k: 5,
                d: 1,
            },
            Case {
                c: 4,
                o: 64,
                h: 8,
                w: 8,
                k: 3,
                d: 5,
            },
            Case {
                c: 7,
                o: 112,
                h: 6,
                w: 64,
                k: 3,
                d: 4,
            },
            Case {
                c: 3,
                o: 16,
                h: 70,
                w: 40,
                k: 3,
                d: 1,
            },
            Case {
                c: 3,
                o: 32,
                h: 4,
                w: 33,
                k: 1,
                d: 1,
            },
        ];
        for (i, g) in cases.iter().enumerate() {
            let conv = SameConv::new(g.c, g.o, (g.h, g.w), g.k, g.d).expect("odd k");
            assert!(conv.has_weight_grad());
            let (p, n, kk) = (g.h * g.w, 3, g.k * g.k);
            let x = values(n * g.c * p, 60 + i as u64);
            let dy = values(n * g.o * p, 70 + i as u64);
            let (want, scale) = reference_grad_weight(&x, &dy, g, n);
            let mut dwt = vec![f32::NAN; g.o * g.c * kk];
            for j in 0..n {
                let (xj, dyj) = (
                    &x[j * g.c * p..(j + 1) * g.c * p],
                    &dy[j * g.o * p..(j + 1) * g.o * p],
                );
                conv.weight_grad_transposed(xj, dyj, &mut dwt, j > 0);
            }
            let dw: Vec<f32> = (0..g.o * g.c * kk)
                .map(|at| dwt[(at % (g.c * kk)) * g.o + at / (g.c * kk)])
                .collect();
            assert_close(&format!("case {i} dw"), &dw, &want, &scale);
        }
        let odd = SameConv::new(3, 18, (5, 5), 3, 1).unwrap();
        assert!(
            !odd.has_weight_grad(),
            "18 output channels are not whole vectors"
        );
    }

    #[test]
    fn declines_what_it_cannot_compute() {
        assert!(SameConv::new(3, 4, (5, 5), 2, 1).is_none(), "even k");
        assert!(SameConv::new(3, 4, (5, 5), 0, 1).is_none(), "k = 0");
        assert!(
            SameConv::new(0, 4, (5, 5), 3, 1).is_none(),
            "no input channels"
        );
        assert!(SameConv::new(3, 4, (0, 5), 3, 1).is_none(), "empty plane");
        assert!(SameConv::new(3, 4, (5, 5), 3, 0).is_none(), "dilation 0");
        assert_eq!(SameConv::new(3, 4, (5, 5), 3, 1).is_some(), available());
        assert!(
            without(|| SameConv::new(3, 4, (5, 5), 3, 1)).is_none(),
            "turned off"
        );
        assert_eq!(
            SameConv::new(3, 4, (5, 5), 3, 1).is_some(),
            available(),
            "back on"
        );
    }

    #[test]
    #[should_panic(expected = "filters packed for another geometry")]
    fn filters_of_another_geometry_are_refused() {
        if !available() {
            panic!("filters packed for another geometry (skipped: no AVX-512F here)");
        }
        let conv = SameConv::new(3, 4, (5, 5), 3, 1).unwrap();
        let other = SameConv::new(4, 4, (5, 5), 3, 1).unwrap();
        let filters = PackedFilters::new(&other, &[0.0; 4 * 4 * 9], Orientation::Forward);
        conv.forward(&[0.0; 75], &filters, &mut [0.0; 100], false);
    }
}
