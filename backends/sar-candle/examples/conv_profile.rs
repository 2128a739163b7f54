//! Times the CPU convolution op (`sar_candle::ops::conv::conv2d`) on ResNet-32's layer
//! shapes at batch 128, or (`fcn`) on FCN-R18-d8's distinct 3×3 layer shapes at batch 2 of
//! 512² (the dilated ResNet-18-v1c backbone, the decode head with 128 channels, the auxiliary
//! head with 64): forward, and forward + backward of `sum(y)`, with GFLOP/s.
//!
//! `cargo run --release -p sar-candle --example conv_profile [reps] [fcn]` (PyTorch peer:
//! `tests/torch/conv_layers_peer.py [threads] [reps] [fcn]`); with
//! `SAR_DIRECT_CONV=0` the "same" convolutions take the im2col + gemm path instead of
//! `sar_cpu::same_conv` (read by that module; for side-by-side runs).

use candle_core::{Device, Tensor, Var};
use std::time::Instant;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> candle_core::Result<()> {
    let reps: usize = std::env::args()
        .nth(1)
        .map(|s| s.parse().expect("reps"))
        .unwrap_or(5);
    let fcn = std::env::args().nth(2).is_some_and(|a| a == "fcn");
    // (N, C, H, O, k, stride, pad, dilation)
    let resnet32 = [
        (128, 3, 32, 16, 3, 1, 1, 1),
        (128, 16, 32, 16, 3, 1, 1, 1),
        (128, 16, 32, 32, 3, 2, 1, 1),
        (128, 32, 16, 32, 3, 1, 1, 1),
        (128, 32, 16, 64, 3, 2, 1, 1),
        (128, 64, 8, 64, 3, 1, 1, 1),
    ];
    let fcn_r18_d8 = [
        (2, 3, 512, 32, 3, 2, 1, 1),
        (2, 32, 256, 32, 3, 1, 1, 1),
        (2, 32, 256, 64, 3, 1, 1, 1),
        (2, 64, 128, 64, 3, 1, 1, 1),
        (2, 64, 128, 128, 3, 2, 1, 1),
        (2, 128, 64, 128, 3, 1, 1, 1),
        (2, 128, 64, 256, 3, 1, 1, 1),
        (2, 256, 64, 256, 3, 1, 2, 2),
        (2, 256, 64, 512, 3, 1, 2, 2),
        (2, 512, 64, 512, 3, 1, 4, 4),
        (2, 512, 64, 128, 3, 1, 1, 1),
        (2, 128, 64, 128, 3, 1, 1, 1),
        (2, 640, 64, 128, 3, 1, 1, 1),
        (2, 256, 64, 64, 3, 1, 1, 1),
    ];
    let shapes: &[_] = if fcn { &fcn_r18_d8 } else { &resnet32 };
    println!("input            weight           fwd ms  GFLOP/s  fwd+bwd ms  GFLOP/s");
    for &(n, c, h, o, k, s, p, d) in shapes {
        let x = Var::from_tensor(&Tensor::randn(0f32, 1., (n, c, h, h), &Device::Cpu)?)?;
        let w = Var::from_tensor(&Tensor::randn(0f32, 0.1, (o, c, k, k), &Device::Cpu)?)?;
        let oh = (h + 2 * p - d * (k - 1) - 1) / s + 1;
        let flops = 2.0 * (n * o * oh * oh * c * k * k) as f64;
        let (mut fwd, mut all) = (Vec::new(), Vec::new());
        for _ in 0..reps {
            let t = Instant::now();
            let _y = sar_candle::ops::conv::conv2d(x.as_tensor(), w.as_tensor(), s, p, d)?;
            fwd.push(t.elapsed().as_secs_f64());
            let t = Instant::now();
            let y = sar_candle::ops::conv::conv2d(x.as_tensor(), w.as_tensor(), s, p, d)?;
            let g = y.sum_all()?.backward()?;
            all.push(t.elapsed().as_secs_f64());
            drop(g);
        }
        let (f, a) = (median(fwd), median(all));
        println!(
            "{:16} {:16} {:7.1} {:8.1} {:11.1} {:8.1}",
            format!("{n}x{c}x{h}x{h}"),
            format!("{o}x{c}x{k}x{k}/{s}d{d}"),
            f * 1e3,
            flops / f / 1e9,
            a * 1e3,
            3.0 * flops / a / 1e9
        );
    }
    Ok(())
}
