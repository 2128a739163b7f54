//! The `resnet32` benchmark step (candle, without SAR) in a loop, for a profiler, timing its
//! phases: forward with the loss, backward, SGD.
//!
//! `cargo run --release -p sar-train --example cls_step_profile -- resnet32 10`
//! (`perf record -g` on the binary for the call graph). Models: `resnet32` (b128 32²),
//! `resnet18` (ImageNet stem, b16 224²).

use candle_core::{Device, Tensor};
use sar_math::rng::SeededRng;
use std::time::Instant;

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let name = args.next().unwrap_or_else(|| "resnet32".into());
    let steps: usize = args.next().map(|s| s.parse()).transpose()?.unwrap_or(10);
    let (keys, (c, h, w), classes, batch) = match name.as_str() {
        "resnet32" => ("arch = \"resnet32\"", (3, 32, 32), 100, 128),
        "resnet18" => (
            "arch = \"resnet18\"\nstem = \"imagenet\"",
            (3, 224, 224),
            200,
            16,
        ),
        other => anyhow::bail!("no profiled model {other:?} (resnet32, resnet18)"),
    };
    let cfg = sar_train::config::parse(
        &format!("[data]\ndataset = \"digits\"\n[model]\n{keys}\n[sar]\nenabled = false\n"),
        &[],
    )?;
    let setup = sar_train::cls::build(&cfg, c, classes)?;
    let mut rng = SeededRng::new(11);
    let x: Vec<f32> = (0..batch * c * h * w)
        .map(|_| rng.next_normal() as f32)
        .collect();
    let y: Vec<i64> = (0..batch)
        .map(|_| (rng.next_u64() % classes as u64) as i64)
        .collect();
    let x = Tensor::from_vec(x, (batch, c, h, w), &Device::Cpu)?;
    let y = Tensor::from_vec(y, batch, &Device::Cpu)?;
    let mut opt = sar_train::optim::Sgd::new(setup.varmap.all_vars(), 0.1, 0.9, 5e-4, false);
    println!("forward ms  backward ms  sgd ms  step ms");
    for _ in 0..steps {
        let t0 = Instant::now();
        let feats = setup.model.features(&x, true)?;
        let loss = candle_nn::loss::cross_entropy(&setup.model.classify(&feats)?, &y)?;
        let t1 = Instant::now();
        let grads = loss.backward()?;
        let t2 = Instant::now();
        opt.step(&grads)?;
        let t3 = Instant::now();
        let ms = |a: Instant, b: Instant| (b - a).as_secs_f64() * 1e3;
        println!(
            "{:10.1} {:12.1} {:7.1} {:8.1}",
            ms(t0, t1),
            ms(t1, t2),
            ms(t2, t3),
            ms(t0, t3)
        );
    }
    Ok(())
}
