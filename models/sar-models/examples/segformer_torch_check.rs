//! Writes a SegFormer's weights (BatchNorm statistics randomised), an input batch, the four
//! MiT stage outputs, eval- and train-mode logits and, for the train-mode loss
//! L = Σ logits ⊙ R (R written too), every parameter's gradient computed in f64 from the same
//! weights, as safetensors, for
//! `tests/torch/check_segformer.py` to compare against independent PyTorch versions (its own,
//! written from mmsegmentation's definitions, and Hugging Face `transformers`' MiT encoder).
//! Stochastic depth is off (no generator), so both sides compute the same function.
//!
//!     cargo run --release -p sar-models --example segformer_torch_check -- mit-b0 WIDTH OUT_PREFIX
use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use sar_models::params::Scope;
use sar_models::seg::segformer::SegFormer;
use sar_models::seg::{SegBackbone, SegHeadKind, SegSpec, Segmenter};
use std::collections::HashMap;

mod common;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let backbone = match args[1].as_str() {
        "mit-b0" => SegBackbone::MitB0,
        "mit-b1" => SegBackbone::MitB1,
        "mit-b2" => SegBackbone::MitB2,
        other => panic!("unknown backbone {other}"),
    };
    let width: usize = args[2].parse().expect("width");
    let prefix = &args[3];
    let dev = Device::Cpu;
    let varmap = VarMap::new();
    let spec = SegSpec {
        backbone,
        head: SegHeadKind::Segformer,
        aux: false,
        width,
        in_channels: 3,
        classes: 7,
        seed: 3,
        drop_path: 0.1,
        window: None,
    };
    let init = Scope::new(&varmap, dev.clone(), DType::F32, spec.seed);
    let m = SegFormer::new(&init, &spec, backbone.mit().unwrap(), spec.drop_path).unwrap();
    drop(init);
    let mut rng =
        sar_math::rng::SeededRng::new(std::env::var("SEED").map_or(9, |s| s.parse().unwrap()));
    let weights = common::randomise_and_save(&varmap, &mut rng, &dev, prefix);
    let x: Vec<f32> = (0..2 * 3 * 64 * 96)
        .map(|_| rng.next_normal() as f32)
        .collect();
    let x = Tensor::from_vec(x, (2, 3, 64, 96), &dev).unwrap();
    let eval = m.logits(&x).unwrap();
    let f = m.features(&x, true).unwrap();
    let train = m.classify(&f.main).unwrap();
    let r: Vec<f32> = (0..train.elem_count())
        .map(|_| rng.next_normal() as f32)
        .collect();
    let r = Tensor::from_vec(r, train.shape(), &dev).unwrap();
    // Gradients in f64, from the same weights: in f32, a pre-activation within rounding of a
    // ReLU's kink flips its mask now and then (one pixel's upstream gradient, ~1e-3 of a
    // BatchNorm bias's gradient), whichever side rounds; in f64 that does not happen.
    let varmap64 = VarMap::new();
    let init64 = Scope::new(&varmap64, dev.clone(), DType::F64, spec.seed);
    let m64 = SegFormer::new(&init64, &spec, backbone.mit().unwrap(), spec.drop_path).unwrap();
    drop(init64);
    common::load_f64(&varmap64, &weights);
    let x64 = x.to_dtype(DType::F64).unwrap();
    let train64 = m64
        .classify(&m64.features(&x64, true).unwrap().main)
        .unwrap();
    let grads = (&train64 * r.to_dtype(DType::F64).unwrap())
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let mut io = HashMap::from([
        ("input".to_string(), x.clone()),
        ("logits_eval".to_string(), eval),
        ("logits_train".to_string(), train),
        ("loss_weights".to_string(), r),
    ]);
    for (name, var) in varmap64.data().lock().unwrap().iter() {
        if let Some(g) = grads.get(var.as_tensor()) {
            io.insert(format!("grad.{name}"), g.clone());
        }
    }
    let mit = m.backbone_outputs(&x).unwrap();
    for (i, s) in mit.into_iter().enumerate() {
        io.insert(format!("stage{i}"), s);
    }
    candle_core::safetensors::save(&io, format!("{prefix}.io.safetensors")).unwrap();
    println!("wrote {prefix}.weights.safetensors and {prefix}.io.safetensors");
}
