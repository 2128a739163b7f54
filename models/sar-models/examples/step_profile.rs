//! Times the parts of a ResNet-32 batch-128 training step (forward, loss, backward) on the CPU.
use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use sar_models::{build, Arch, ModelSpec, Stem};
use std::time::Instant;

fn main() {
    let varmap = VarMap::new();
    let spec = ModelSpec {
        arch: Arch::ResNet32,
        stem: Stem::Cifar,
        in_channels: 3,
        classes: 100,
        seed: 0,
        init: Default::default(),
    };
    let m = build(&spec, &varmap, &Device::Cpu, DType::F32).unwrap();
    let x = Tensor::randn(0f32, 1.0, (128, 3, 32, 32), &Device::Cpu).unwrap();
    let y = Tensor::zeros(128, DType::U32, &Device::Cpu).unwrap();
    for rep in 0..4 {
        let t = Instant::now();
        let logits = m.forward(&x, true).unwrap();
        let loss = candle_nn::loss::cross_entropy(&logits, &y).unwrap();
        let _ = loss.to_scalar::<f32>().unwrap();
        let f = t.elapsed().as_secs_f64();
        let t = Instant::now();
        let g = loss.backward().unwrap();
        let b = t.elapsed().as_secs_f64();
        let t = Instant::now();
        let e = m.forward(&x, false).unwrap();
        let _ = e.sum_all().unwrap().to_scalar::<f32>().unwrap();
        let ev = t.elapsed().as_secs_f64();
        println!("rep {rep}: forward(train) {:.0} ms, backward {:.0} ms, forward(eval) {:.0} ms, {} grads", f * 1e3, b * 1e3, ev * 1e3, varmap.all_vars().iter().filter(|v| g.get(v.as_tensor()).is_some()).count());
    }
}
