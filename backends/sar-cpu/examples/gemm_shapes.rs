//! Times [`sar_cpu::gemm::matmul`] on one thread, f32, on the CPU convolutions' product
//! shapes (ResNet-32's 16/32/64-channel layers at 32², 16², 8² per image; a 512-channel 3×3
//! layer at 64², as in FCN-R18-d8's last stage) and prints GFLOP/s, best of 3 loops of about
//! 1 GFLOP each:
//!
//! - fwd: `W · col` `[O, C·9] · [C·9, P]`;
//! - dx: `Wᵀ · dy` `[C·9, O] · [O, P]`;
//! - dw: `dy · colᵀ` `[O, P] · [P, C·9]` into a column-major destination.
//!
//! `cargo run --release -p sar-cpu --example gemm_shapes`. The gemm crate's AVX-512 kernels
//! are on (workspace feature `x86-v4`); removing that feature from the workspace's `gemm`
//! dependency gives its AVX2/FMA kernels for comparison.

use sar_cpu::gemm::{matmul, Mat, MatMut};
use std::time::Instant;

fn time(name: &str, (m, n, k): (usize, usize, usize), a_t: bool, b_t: bool, d_cm: bool) {
    let a = vec![1.0f32; m * k];
    let b = vec![1.0f32; k * n];
    let mut d = vec![0.0f32; m * n];
    let flops = 2.0 * (m * n * k) as f64;
    let reps = ((1e9 / flops) as usize).max(2);
    let mut best = f64::MAX;
    for _ in 0..3 {
        let t = Instant::now();
        for _ in 0..reps {
            let a = if a_t {
                Mat::transposed(&a, m)
            } else {
                Mat::row_major(&a, k)
            };
            let b = if b_t {
                Mat::transposed(&b, k)
            } else {
                Mat::row_major(&b, n)
            };
            let dst = if d_cm {
                MatMut::column_major(&mut d, m)
            } else {
                MatMut::row_major(&mut d, n)
            };
            matmul((m, n, k), a, b, dst, false);
        }
        best = best.min(t.elapsed().as_secs_f64());
    }
    println!(
        "{name:4} {:>16}: {:6.1} GFLOP/s",
        format!("{m}×{n}×{k}"),
        flops * reps as f64 / best / 1e9
    );
}

fn main() {
    for (o, c, p) in [
        (16, 16, 1024),
        (32, 32, 256),
        (64, 64, 64),
        (512, 512, 4096),
    ] {
        let ckk = c * 9;
        time("fwd", (o, p, ckk), false, false, false);
        time("dx", (ckk, p, o), true, false, false);
        time("dw", (o, ckk, p), false, true, true);
    }
}
