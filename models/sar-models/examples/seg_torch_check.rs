//! Writes a segmentation model's weights (BatchNorm statistics randomised), an input batch and
//! its outputs (eval-mode and train-mode logits, auxiliary logits, and the f64 train-mode
//! gradients of every parameter for a random linear loss) as safetensors, for
//! `tests/torch/check_seg_models.py` to compare against an independent PyTorch
//! implementation that loads the same names strictly.
//!
//!     cargo run --release -p sar-models --example seg_torch_check -- fcn-r18 OUT_PREFIX
use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use sar_models::seg::{build_segmenter, SegBackbone, SegHeadKind, SegSpec};
use std::collections::HashMap;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (backbone, head, aux) = match args[1].as_str() {
        "fcn-r18" => (SegBackbone::ResNet18V1c, SegHeadKind::Fcn, true),
        "fcn-r50" => (SegBackbone::ResNet50V1c, SegHeadKind::Fcn, true),
        "aspp-r18" => (SegBackbone::ResNet18V1c, SegHeadKind::Aspp, true),
        "fcn-hr18" => (SegBackbone::HrNetV2W18, SegHeadKind::Fcn, false),
        "ocr-hr18" => (SegBackbone::HrNetV2W18, SegHeadKind::Ocr, true),
        other => panic!("unknown model {other}"),
    };
    let prefix = &args[2];
    let dev = Device::Cpu;
    let varmap = VarMap::new();
    let spec = SegSpec {
        backbone,
        head,
        aux,
        width: 64,
        in_channels: 3,
        classes: 7,
        seed: 3,
        drop_path: 0.1,
        window: None,
    };
    let m = build_segmenter(&spec, &varmap, &dev, DType::F32).unwrap();
    // Random BatchNorm running statistics, so that eval mode tests them.
    let mut rng = sar_math::rng::SeededRng::new(9);
    for (name, var) in varmap.data().lock().unwrap().iter() {
        let n = var.elem_count();
        let (lo, hi) = if name.ends_with("running_var") {
            (0.5, 2.0)
        } else if name.ends_with("running_mean") {
            (-0.3, 0.3)
        } else {
            continue;
        };
        let v: Vec<f32> = (0..n)
            .map(|_| (lo + (hi - lo) * rng.next_f64()) as f32)
            .collect();
        var.set(&Tensor::from_vec(v, var.shape(), &dev).unwrap())
            .unwrap();
    }
    let mut weights = HashMap::new();
    for (name, var) in varmap.data().lock().unwrap().iter() {
        weights.insert(name.clone(), var.as_tensor().copy().unwrap());
    }
    candle_core::safetensors::save(&weights, format!("{prefix}.weights.safetensors")).unwrap();
    let x: Vec<f32> = (0..2 * 3 * 64 * 96)
        .map(|_| rng.next_normal() as f32)
        .collect();
    let x = Tensor::from_vec(x, (2, 3, 64, 96), &dev).unwrap();
    let eval = m.logits(&x).unwrap();
    let f = m.features(&x, true).unwrap();
    let train = m.classify(&f.main).unwrap();
    let mut io = HashMap::from([
        ("input".to_string(), x),
        ("logits_eval".to_string(), eval),
        ("logits_train".to_string(), train),
    ]);
    if let Some(a) = &f.aux {
        io.insert("aux_logits_train".into(), m.classify_aux(a).unwrap());
    }
    // Train-mode gradients of L = Σ logits ⊙ R (+ Σ aux logits ⊙ R_aux), computed in f64 from
    // the same weights (in f32 a ReLU mask flips now and then at its kink, on either side).
    let varmap64 = VarMap::new();
    let m64 = build_segmenter(&spec, &varmap64, &dev, DType::F64).unwrap();
    for (name, var) in varmap64.data().lock().unwrap().iter() {
        var.set(&weights[name].to_dtype(DType::F64).unwrap())
            .unwrap();
    }
    let f64s = m64
        .features(&io["input"].to_dtype(DType::F64).unwrap(), true)
        .unwrap();
    let mut random_like = |t: &Tensor| {
        let v: Vec<f64> = (0..t.elem_count()).map(|_| rng.next_normal()).collect();
        Tensor::from_vec(v, t.shape(), &dev).unwrap()
    };
    let main = m64.classify(&f64s.main).unwrap();
    let r = random_like(&main);
    let mut loss = (&main * &r).unwrap().sum_all().unwrap();
    io.insert("loss_weights".into(), r);
    if let Some(a) = &f64s.aux {
        let aux = m64.classify_aux(a).unwrap();
        let ra = random_like(&aux);
        loss = (loss + (&aux * &ra).unwrap().sum_all().unwrap()).unwrap();
        io.insert("aux_loss_weights".into(), ra);
    }
    let grads = loss.backward().unwrap();
    for (name, var) in varmap64.data().lock().unwrap().iter() {
        if let Some(g) = grads.get(var.as_tensor()) {
            io.insert(format!("grad.{name}"), g.clone());
        }
    }
    candle_core::safetensors::save(&io, format!("{prefix}.io.safetensors")).unwrap();
    println!("wrote {prefix}.weights.safetensors and {prefix}.io.safetensors");
}
