//! One model's `seg-models` benchmark step (without SAR) in a loop, for a profiler, timing
//! its phases: forward with the losses, backward, AdamW.
//!
//! `cargo run --release -p sar-train --example seg_model_profile -- segformer-b0 10`
//! (`perf record -g` on the binary for the call graph). Models: `ocr-hr18`, `segformer-b0`,
//! `upernet-swin-t`.

use candle_core::{Device, Tensor};
use sar_math::rng::SeededRng;
use sar_train::bench::seg_models::SEG_BENCH_MODELS;
use std::time::Instant;

const CLASSES: usize = 19;
const BATCH: usize = 2;
const SIZE: usize = 256;

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let name = args.next().unwrap_or_else(|| "segformer-b0".into());
    let steps: usize = args.next().map(|s| s.parse()).transpose()?.unwrap_or(10);
    let m = SEG_BENCH_MODELS
        .iter()
        .find(|m| m.name == name)
        .ok_or_else(|| anyhow::anyhow!("no benchmarked model {name:?}"))?;
    let cfg = sar_train::config::parse(
        &format!(
            "[data]\ndataset = \"mosaic\"\nseg_crop = [{SIZE}, {SIZE}]\n[model]\n{}\n\
             dropout = 0.0\n[sar]\nenabled = false\n",
            m.keys
        ),
        &[],
    )?;
    let aux_weight = cfg.model.segmenter()?.aux_weight;
    let setup = sar_train::seg::build_seg(&cfg, CLASSES)?;
    let mut rng = SeededRng::new(13);
    let x: Vec<f32> = (0..BATCH * 3 * SIZE * SIZE)
        .map(|_| rng.next_normal() as f32)
        .collect();
    let y: Vec<u8> = (0..BATCH * SIZE * SIZE)
        .map(|_| (rng.next_u64() % CLASSES as u64) as u8)
        .collect();
    let x = Tensor::from_vec(x, (BATCH, 3, SIZE, SIZE), &Device::Cpu)?;
    let mut named: Vec<(String, candle_core::Var)> = setup
        .varmap
        .data()
        .lock()
        .expect("varmap lock")
        .iter()
        .filter(|(n, _)| !sar_models::params::is_running_stat(n))
        .map(|(n, v)| (n.clone(), v.clone()))
        .collect();
    named.sort_by(|a, b| a.0.cmp(&b.0));
    let mut opt = sar_train::optim::AdamW::named(named, 6e-5, (0.9, 0.999), 1e-8, 0.01);
    println!("forward ms  backward ms  adamw ms  step ms");
    for _ in 0..steps {
        let t0 = Instant::now();
        let mut noise = SeededRng::new(1);
        let fw = sar_train::seg::seg_forward_losses(
            setup.model.as_ref(),
            &x,
            &y,
            0.0,
            aux_weight,
            &mut noise,
        )?;
        let mut loss = fw.ce;
        if let Some(a) = fw.aux_ce {
            loss = (loss + a)?;
        }
        let t1 = Instant::now();
        let grads = loss.backward()?;
        let t2 = Instant::now();
        opt.step(&grads, &|lr| lr)?;
        let t3 = Instant::now();
        let ms = |a: Instant, b: Instant| (b - a).as_secs_f64() * 1e3;
        println!(
            "{:10.1} {:12.1} {:9.1} {:8.1}",
            ms(t0, t1),
            ms(t1, t2),
            ms(t2, t3),
            ms(t0, t3)
        );
    }
    Ok(())
}
