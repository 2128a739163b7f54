//! Times [`sar_cpu::same_conv`] (the direct "same" convolution) against the `gemm` crate's
//! products of the same sizes (the im2col matrix `col` already built) on one thread, f32, for
//! one image of FCN-R18-d8's and ResNet-32's 3×3 layer shapes; interleaved, best of 3 loops of
//! about 2 GFLOP each, GFLOP/s:
//!
//! - forward: `SameConv::forward` against `W · col` (`[O, C·k·k] · [C·k·k, P]`);
//! - filter gradient: `SameConv::weight_grad_transposed` against `dy · colᵀ` into a
//!   column-major destination, as candle's conv op computes it.
//!
//! `cargo run --release -p sar-cpu --example same_conv_bench`

use sar_cpu::gemm::{matmul, Mat, MatMut};
use sar_cpu::same_conv::{Orientation, PackedFilters, SameConv};
use std::time::Instant;

fn best_of_3(reps: usize, mut f: impl FnMut()) -> f64 {
    let mut best = f64::MAX;
    for _ in 0..3 {
        let t = Instant::now();
        for _ in 0..reps {
            f();
        }
        best = best.min(t.elapsed().as_secs_f64() / reps as f64);
    }
    best
}

fn main() {
    println!(
        "layer (C→O, H×W, dilation)       forward: direct   gemm   filter gradient: direct   gemm"
    );
    // (C, O, H, dilation)
    for (c, o, h, d) in [
        (512, 512, 64, 4),
        (256, 256, 64, 2),
        (128, 128, 64, 1),
        (640, 128, 64, 1),
        (64, 64, 128, 1),
        (32, 32, 256, 1),
        (16, 16, 32, 1),
        (32, 32, 16, 1),
        (64, 64, 8, 1),
    ] {
        let Some(conv) = SameConv::new(c, o, (h, h), 3, d) else {
            println!("this CPU has no AVX-512F: the direct convolution does not run here");
            return;
        };
        let p = h * h;
        let x: Vec<f32> = (0..c * p)
            .map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0)
            .collect();
        let w: Vec<f32> = (0..o * c * 9)
            .map(|i| ((i * 104729) % 1000) as f32 / 500.0 - 1.0)
            .collect();
        let col = vec![0.5f32; c * 9 * p];
        let mut y = vec![0.0f32; o * p];
        let filters = PackedFilters::new(&conv, &w, Orientation::Forward);
        let flops = 2.0 * (o * c * 9 * p) as f64;
        let reps = ((2e9 / flops) as usize).max(1);
        let direct = best_of_3(reps, || conv.forward(&x, &filters, &mut y, false));
        let gemm = best_of_3(reps, || {
            let (a, b) = (Mat::row_major(&w, c * 9), Mat::row_major(&col, p));
            matmul((o, p, c * 9), a, b, MatMut::row_major(&mut y, p), false)
        });
        let dy = y.clone();
        let mut dw = vec![0.0f32; o * c * 9];
        let direct_dw = best_of_3(reps, || {
            conv.weight_grad_transposed(&x, &dy, &mut dw, false)
        });
        let gemm_dw = best_of_3(reps, || {
            let (a, b) = (Mat::row_major(&dy, p), Mat::transposed(&col, p));
            matmul((o, c * 9, p), a, b, MatMut::column_major(&mut dw, o), false)
        });
        println!(
            "{:32} {:15.1} {:6.1} {:25.1} {:6.1}",
            format!("{c}→{o}, {h}×{h}, d{d}"),
            flops / direct / 1e9,
            flops / gemm / 1e9,
            flops / direct_dw / 1e9,
            flops / gemm_dw / 1e9
        );
    }
}
