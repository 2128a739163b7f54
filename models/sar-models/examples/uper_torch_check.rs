//! Writes an UPerNet-on-Swin's weights (BatchNorm statistics, LayerNorm affine parameters and
//! biases randomised), an input batch, the four Swin stage outputs, eval- and train-mode
//! logits, the train-mode auxiliary logits and, for the train-mode loss
//! L = Σ logits ⊙ R + Σ aux ⊙ R_aux (R and R_aux written too), every parameter's gradient
//! computed in f64 from the same weights, as safetensors, for `tests/torch/check_uper_swin.py`
//! to compare against independent PyTorch versions (its own, written from mmsegmentation's
//! definitions, and Hugging Face `transformers`' Swin encoder). Stochastic depth is off (no
//! generator), so both sides compute the same function.
//!
//!     [INPUT=HxW] cargo run --release -p sar-models --example uper_torch_check -- swin-t WIDTH WINDOW OUT_PREFIX
use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use sar_models::params::Scope;
use sar_models::seg::uper::UperNet;
use sar_models::seg::{SegBackbone, SegHeadKind, SegSpec, Segmenter};
use std::collections::HashMap;

mod common;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 5 {
        eprintln!("usage: uper_torch_check swin-t|swin-s|swin-b|swin-l WIDTH WINDOW OUT_PREFIX");
        std::process::exit(2);
    }
    let backbone = match args[1].as_str() {
        "swin-t" => SegBackbone::SwinT,
        "swin-s" => SegBackbone::SwinS,
        "swin-b" => SegBackbone::SwinB,
        "swin-l" => SegBackbone::SwinL,
        other => panic!("unknown backbone {other}"),
    };
    let width: usize = args[2].parse().expect("width");
    let window: usize = args[3].parse().expect("window");
    let prefix = &args[4];
    let dev = Device::Cpu;
    let spec = SegSpec {
        backbone,
        head: SegHeadKind::Uper,
        aux: true,
        width,
        in_channels: 3,
        classes: 7,
        seed: 3,
        drop_path: 0.3,
        window: Some(window),
    };
    let variant = backbone.swin().unwrap();
    let varmap = VarMap::new();
    let init = Scope::new(&varmap, dev.clone(), DType::F32, spec.seed);
    let m = UperNet::new(&init, &spec, variant, spec.window).unwrap();
    drop(init);
    let mut rng =
        sar_math::rng::SeededRng::new(std::env::var("SEED").map_or(9, |s| s.parse().unwrap()));
    let weights = common::randomise_and_save(&varmap, &mut rng, &dev, prefix);
    // INPUT=HxW (default 62x90: not a multiple of the patch, so the corner padding of the
    // embedding, of the windows (grids 16 × 23, 8 × 12, 4 × 6, 2 × 3) and of patch merging
    // all run).
    let (h, w) = std::env::var("INPUT").map_or((62, 90), |s| {
        let (h, w) = s.split_once('x').expect("INPUT=HxW");
        (
            h.parse().expect("INPUT height"),
            w.parse().expect("INPUT width"),
        )
    });
    let x: Vec<f32> = (0..2 * 3 * h * w)
        .map(|_| rng.next_normal() as f32)
        .collect();
    let x = Tensor::from_vec(x, (2, 3, h, w), &dev).unwrap();
    let eval = m.logits(&x).unwrap();
    let aux_eval = m.auxiliary_logits_eval(&x).unwrap();
    let f = m.features(&x, true).unwrap();
    let train = m.classify(&f.main).unwrap();
    let aux = m.classify_aux(f.aux.as_ref().unwrap()).unwrap();
    let mut normal_like = |t: &Tensor| {
        let v: Vec<f32> = (0..t.elem_count())
            .map(|_| rng.next_normal() as f32)
            .collect();
        Tensor::from_vec(v, t.shape(), &dev).unwrap()
    };
    let r = normal_like(&train);
    let r_aux = normal_like(&aux);
    // Gradients in f64, from the same weights: in f32, a pre-activation within rounding of a
    // ReLU's kink flips its mask now and then, whichever side rounds; in f64 that does not.
    let varmap64 = VarMap::new();
    let init64 = Scope::new(&varmap64, dev.clone(), DType::F64, spec.seed);
    let m64 = UperNet::new(&init64, &spec, variant, spec.window).unwrap();
    drop(init64);
    common::load_f64(&varmap64, &weights);
    let x64 = x.to_dtype(DType::F64).unwrap();
    let f64s = m64.features(&x64, true).unwrap();
    let train64 = m64.classify(&f64s.main).unwrap();
    let aux64 = m64.classify_aux(f64s.aux.as_ref().unwrap()).unwrap();
    let loss = ((&train64 * r.to_dtype(DType::F64).unwrap())
        .unwrap()
        .sum_all()
        .unwrap()
        + (&aux64 * r_aux.to_dtype(DType::F64).unwrap())
            .unwrap()
            .sum_all()
            .unwrap())
    .unwrap();
    let grads = loss.backward().unwrap();
    let mut io = HashMap::from([
        ("input".to_string(), x.clone()),
        ("logits_eval".to_string(), eval),
        ("logits_train".to_string(), train),
        ("aux_logits_train".to_string(), aux),
        ("aux_logits_eval".to_string(), aux_eval),
        ("loss_weights".to_string(), r),
        ("aux_loss_weights".to_string(), r_aux),
    ]);
    for (name, var) in varmap64.data().lock().unwrap().iter() {
        if let Some(g) = grads.get(var.as_tensor()) {
            io.insert(format!("grad.{name}"), g.clone());
        }
    }
    for (i, s) in m.backbone_outputs(&x).unwrap().into_iter().enumerate() {
        io.insert(format!("stage{i}"), s);
    }
    candle_core::safetensors::save(&io, format!("{prefix}.io.safetensors")).unwrap();
    println!("wrote {prefix}.weights.safetensors and {prefix}.io.safetensors");
}
