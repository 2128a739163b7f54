//! SarHead end to end on a tiny linear classifier: the gate, the EMA, gradients reaching h_ψ and
//! the shared classifier, reproducible initialisation, and the buffers' round trip.
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{Module, Optimizer, VarMap, SGD};
use sar_candle::{CandleBackend, EmbeddingKind, SarHead, SarHeadConfig};
use sar_math::anchors::AnchorKind;
use sar_math::SarConfig;

const C: usize = 3;
const D: usize = 4;

fn head(varmap: &VarMap, kind: EmbeddingKind, seed: u64) -> SarHead {
    let backend = CandleBackend::new(Device::Cpu, DType::F64).unwrap();
    let cfg = SarHeadConfig::new(SarConfig::default(), C, D)
        .kind(kind)
        .anchor_kind(AnchorKind::Normal)
        .seed(seed);
    SarHead::new(varmap, backend, &cfg).unwrap()
}

#[test]
fn trains_the_anchors_apart_then_gates_and_pulls_features() {
    let varmap = VarMap::new();
    let mut sar = head(&varmap, EmbeddingKind::Classification, 3);
    // The shared classifier g_θ: a linear map D → C, trained by L_aux too.
    let w = Var::from_tensor(&Tensor::zeros((C, D), DType::F64, &Device::Cpu).unwrap()).unwrap();
    let classifier = candle_nn::Linear::new(w.as_tensor().clone(), None);
    let mut params = varmap.all_vars();
    params.push(w.clone());
    let names: Vec<String> = {
        let mut n: Vec<String> = varmap.data().lock().unwrap().keys().cloned().collect();
        n.sort();
        n
    };
    assert_eq!(
        names,
        [
            "sar.embed.bn1.bias",
            "sar.embed.bn1.weight",
            "sar.embed.bn2.bias",
            "sar.embed.bn2.weight",
            "sar.embed.fc1.bias",
            "sar.embed.fc1.weight",
            "sar.embed.fc2.bias",
            "sar.embed.fc2.weight",
        ]
    );
    let mut opt = SGD::new(params, 0.5).unwrap();
    let features = Var::from_tensor(
        &Tensor::new(
            &[[1.0f64, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0]],
            &Device::Cpu,
        )
        .unwrap(),
    )
    .unwrap();
    let labels = Tensor::new(&[0i64, 2], &Device::Cpu).unwrap();
    let mut first_pass = None;
    for step in 0..200 {
        let w_before = w.as_tensor().to_vec2::<f64>().unwrap();
        let out = sar
            .step(&|e| classifier.forward(e), features.as_tensor(), &labels)
            .unwrap();
        let grads = out.loss.backward().unwrap();
        if step == 0 {
            // L_aux trains both h_ψ and the shared classifier.
            assert!(
                grads.get(w.as_tensor()).is_some(),
                "no gradient reached the classifier"
            );
            let fc1 = varmap.data().lock().unwrap()["sar.embed.fc1.weight"]
                .as_tensor()
                .clone();
            assert!(grads.get(&fc1).is_some(), "no gradient reached h_ψ");
            assert!(
                !out.gate_passed && out.loss_p2a == 0.0,
                "zero classifier: anchors are not separated"
            );
        }
        if out.gate_passed && first_pass.is_none() {
            first_pass = Some(step);
            assert!(sar.fully_initialized());
            assert!(out.loss_p2a > 0.0 && out.valid == 2);
            let g = grads
                .get(features.as_tensor())
                .expect("p2a reaches the features");
            assert!(
                g.abs()
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .to_scalar::<f64>()
                    .unwrap()
                    > 0.0
            );
        }
        opt.step(&grads).unwrap();
        // L_aux moves the classifier while some anchor is below τ; once all are above, L_aux is
        // exactly 0 with a zero gradient, and p2a (toward the detached Â) moves only features.
        let moved = w_before != w.as_tensor().to_vec2::<f64>().unwrap();
        assert_eq!(
            moved,
            out.loss_aux > 0.0,
            "step {step}: L_aux {}",
            out.loss_aux
        );
        if first_pass.is_some() && step > first_pass.unwrap() + 2 {
            break;
        }
    }
    assert!(
        first_pass.is_some(),
        "the gate never passed in 200 steps of SGD on L_aux"
    );
}

#[test]
fn initialisation_is_reproducible_and_buffers_round_trip() {
    let (a, b) = (VarMap::new(), VarMap::new());
    let (h1, h2) = (
        head(&a, EmbeddingKind::Segmentation, 9),
        head(&b, EmbeddingKind::Segmentation, 9),
    );
    let e1 = h1.embed().unwrap().to_vec2::<f64>().unwrap();
    assert_eq!(e1, h2.embed().unwrap().to_vec2::<f64>().unwrap());
    // E ≥ 0 (ReLU last) and BatchNorm over the C anchors: each column has mean β = 0 before ReLU.
    assert!(e1.iter().flatten().all(|&v| v >= 0.0));
    assert!(a
        .data()
        .lock()
        .unwrap()
        .contains_key("sar.embed.conv.weight"));
    let c = VarMap::new();
    let h3 = head(&c, EmbeddingKind::Segmentation, 10);
    assert_ne!(e1, h3.embed().unwrap().to_vec2::<f64>().unwrap());
    // Buffers under stable names, restored into another head.
    let bufs = h1.buffers().unwrap();
    let names: Vec<&str> = bufs.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        ["sar.anchors", "sar.semantic_anchors", "sar.initialized"]
    );
    let mut h4 = head(&VarMap::new(), EmbeddingKind::Segmentation, 11);
    let get = |n: &str| bufs.iter().find(|(k, _)| k == n).map(|(_, t)| t.clone());
    h4.load_buffers(&get).unwrap();
    let anchors = |h: &SarHead| h.buffers().unwrap()[0].1.to_vec2::<f64>().unwrap();
    assert_eq!(anchors(&h1), anchors(&h4));
    // A checkpoint of another shape is refused with the tensor's name.
    let wrong = |n: &str| {
        if n == "sar.anchors" {
            Some(Tensor::zeros((2, 2), DType::F64, &Device::Cpu).unwrap())
        } else {
            get(n)
        }
    };
    let err = h4.load_buffers(&wrong).unwrap_err().to_string();
    assert!(
        err.contains("sar.anchors") && err.contains("[2, 2]"),
        "{err}"
    );
}

#[test]
fn mixup_p2a_matches_sar_math_rows_in_value_and_gradient() {
    use sar_math::p2a::{p2a_rows, P2aTargets, RowLabels};
    let varmap = VarMap::new();
    let mut sar = head(&varmap, EmbeddingKind::Classification, 5);
    let ignore = sar.config().ignore_index;
    // A classifier that is confident on every anchor, so the gate passes at once (Â = E).
    let confident = (Tensor::eye(C, DType::F64, &Device::Cpu).unwrap() * 10.0).unwrap();
    let classifier = |e: &Tensor| (e.sum_keepdim(1)? * 0.0)?.broadcast_add(&confident);
    let values: Vec<f64> = (0..4 * D).map(|i| (i as f64 * 0.37).sin()).collect();
    let features =
        Var::from_tensor(&Tensor::from_vec(values.clone(), (4, D), &Device::Cpu).unwrap()).unwrap();
    let (a, b, lambda) = ([0i64, 2, 1, ignore], [1i64, 2, 0, 0], 0.3);
    let out = sar
        .step_mixup(&classifier, features.as_tensor(), &a, &b, lambda)
        .unwrap();
    assert!(out.gate_passed);
    assert_eq!(out.valid, 3, "the row with an ignored label is not in Ω");
    let anchors: Vec<f64> = sar
        .semantic_anchors()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let targets = P2aTargets {
        anchors: &anchors,
        classes: C,
        ignore_index: ignore,
        class_active: None,
    };
    let mut grad = vec![0.0; 4 * D];
    let want = p2a_rows(
        &values,
        RowLabels::Mixup {
            a: &a,
            b: &b,
            lambda,
        },
        D,
        &targets,
        Some(&mut grad),
    )
    .unwrap();
    assert!(
        (out.loss_p2a - want.loss).abs() < 1e-14,
        "{} vs {}",
        out.loss_p2a,
        want.loss
    );
    let g: Vec<f64> = out
        .loss
        .backward()
        .unwrap()
        .get(features.as_tensor())
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let lambda2 = sar.config().lambda_p2a;
    for (x, y) in g.iter().zip(&grad) {
        assert!((x - lambda2 * y).abs() < 1e-14, "{x} vs {}", lambda2 * y);
    }
    // Bad input is an error, not a panic.
    let e = sar
        .step_mixup(&classifier, features.as_tensor(), &[0, 1, 2, 7], &b, lambda)
        .unwrap_err();
    assert!(e.to_string().contains("label 7"), "{e}");
    assert!(sar
        .step_mixup(&classifier, features.as_tensor(), &a, &b, 1.5)
        .is_err());
}
