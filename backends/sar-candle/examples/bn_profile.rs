//! Times the CPU BatchNorm ops (`sar_candle::ops::batch_norm`) on ResNet-32's activation
//! shapes at batch 128: the training forward (with ReLU), and forward + backward of `Σ y·u`.
//!
//! `cargo run --release -p sar-candle --example bn_profile [reps]`

use candle_core::{Device, Tensor, Var};
use sar_candle::ops::batch_norm::{BatchStats, BnTrain};
use std::sync::{Arc, Mutex};
use std::time::Instant;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> candle_core::Result<()> {
    let reps: usize = std::env::args()
        .nth(1)
        .map(|s| s.parse().expect("reps"))
        .unwrap_or(9);
    println!("input            fwd ms  fwd+bwd ms");
    for (n, c, h) in [(128, 16, 32), (128, 32, 16), (128, 64, 8)] {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0f32, 1., (n, c, h, h), &dev)?)?;
        let gamma = Var::from_tensor(&Tensor::ones(c, candle_core::DType::F32, &dev)?)?;
        let beta = Var::from_tensor(&Tensor::zeros(c, candle_core::DType::F32, &dev)?)?;
        let up = Tensor::randn(0f32, 1., (n, c, h, h), &dev)?;
        let op = || BnTrain {
            eps: 1e-5,
            relu: true,
            stats: Arc::new(Mutex::new(BatchStats::default())),
        };
        let (mut fwd, mut all) = (Vec::new(), Vec::new());
        for _ in 0..reps {
            let t = Instant::now();
            let y = x.apply_op3(gamma.as_tensor(), beta.as_tensor(), op())?;
            fwd.push(t.elapsed().as_secs_f64());
            let t = Instant::now();
            let g = (y * &up)?.sum_all()?.backward()?;
            all.push(t.elapsed().as_secs_f64() + fwd[fwd.len() - 1]);
            drop(g);
        }
        println!(
            "{:16} {:7.2} {:11.2}",
            format!("{n}x{c}x{h}x{h}"),
            median(fwd) * 1e3,
            median(all) * 1e3
        );
    }
    Ok(())
}
