//! Every sar-math kernel and the per-step state on arbitrary dimensions, labels, options and
//! floats (NaN, ±inf, subnormals, huge): each call returns `Ok` or a `SarError`, never panics
//! or reads out of bounds; for finite inputs the losses are finite and ≥ 0.
#![no_main]
use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use sar_math::anchor_ce::{anchor_ce, gate, AnchorCeBuffers};
use sar_math::p2a::{p2a_nchw, p2a_rows, FeatureGeometry, P2aTargets, RowLabels};
use sar_math::prototype::{car_intra_class, class_prototypes};
use sar_math::state::{FeatureInput, StepBuffers, StepInput};
use sar_math::{GateMode, SarConfig, SarState, WeightMode};

#[derive(Arbitrary, Debug)]
struct Input {
    classes: u8,
    dims: [u8; 6],
    tau: f64,
    delta: f64,
    alpha: f64,
    lambda: f64,
    ignore: i16,
    per_class: bool,
    detached: bool,
    rows: bool,
    values: Vec<f32>,
    labels: Vec<i16>,
}

fn take(values: &[f32], n: usize, offset: usize) -> Vec<f64> {
    (0..n).map(|i| if values.is_empty() { 0.0 } else { values[(offset + i) % values.len()] as f64 }).collect()
}

fuzz_target!(|inp: Input| {
    let c = (inp.classes % 12) as usize;
    let [b, d, h, w, lh, lw] = inp.dims.map(|x| (x % 9) as usize);
    let g = FeatureGeometry { batch: b, channels: d, height: h, width: w, label_height: lh, label_width: lw };
    let n_feat = b * d * h * w;
    let z = take(&inp.values, c * c, 0);
    let emb = take(&inp.values, c * d, 7);
    let f = take(&inp.values, n_feat, 13);
    let labels: Vec<i64> = (0..b * lh * lw).map(|i| inp.labels.get(i % inp.labels.len().max(1)).copied().unwrap_or(0) as i64).collect();
    let finite = |v: &[f64]| v.iter().all(|x| x.is_finite());
    let mode = if inp.detached { WeightMode::Detached } else { WeightMode::Attached };
    let gmode = if inp.per_class { GateMode::PerClass } else { GateMode::Global };

    let (mut p, mut l, mut wt, mut gz) = (vec![0.0; c], vec![0.0; c], vec![0.0; c], vec![0.0; c * c]);
    if let Ok(v) = anchor_ce(&z, c, inp.tau, mode, AnchorCeBuffers { confidence: &mut p, nll: &mut l, weights: &mut wt, grad_logits: Some(&mut gz) }) {
        assert!(v.loss.is_finite() && gz.iter().all(|x| x.is_finite()));
        if inp.tau < 1.0 - 1e-6 {
            assert!(v.loss >= 0.0, "L_aux {} < 0", v.loss);
        }
        let mut pass = vec![false; c];
        let _ = gate(&z, c, &l, inp.delta, gmode, &mut pass);
    }
    let targets = P2aTargets { anchors: &emb, classes: c, ignore_index: inp.ignore as i64, class_active: None };
    let mut grad = vec![0.0; n_feat];
    if let Ok(v) = p2a_nchw(&f, &labels, &g, &targets, Some(&mut grad)) {
        assert!(v.loss.is_finite() && v.loss >= 0.0);
        if finite(&f) && finite(&emb) {
            assert!(grad.iter().all(|x| x.is_finite()));
        }
    } else if finite(&f) && finite(&emb) && n_feat > 0 && c > 0 && labels.iter().all(|&y| y == inp.ignore as i64 || (0..c as i64).contains(&y)) && g.height * g.width > 0 && g.label_height * g.label_width > 0 && emb.iter().all(|x| x.abs() < 1e150) && f.iter().all(|x| x.abs() < 1e150) {
        panic!("p2a refused valid finite input");
    }
    let rows_n = if d == 0 { 0 } else { f.len() / d };
    let _ = p2a_rows(&f, RowLabels::Mixup { a: &labels[..rows_n.min(labels.len())], b: &labels[..rows_n.min(labels.len())], lambda: inp.lambda }, d, &targets, Some(&mut grad));
    let _ = car_intra_class(&f, &labels, &g, &targets, Some(&mut grad));
    let (mut protos, mut counts) = (vec![0.0; c * d], vec![0u64; c]);
    let _ = class_prototypes(&f, &labels, &g, &targets, &mut protos, &mut counts);

    let cfg = SarConfig { tau: inp.tau, delta: inp.delta, alpha: inp.alpha, lambda_p2a: inp.lambda, ignore_index: inp.ignore as i64, gate: gmode, weights: mode, ..SarConfig::default() };
    if let Ok(mut state) = SarState::<f64, _, _>::new(cfg, c, d) {
        let features = if inp.rows {
            FeatureInput::Rows { features: &f[..rows_n * d], labels: RowLabels::Plain(&labels[..rows_n.min(labels.len())]) }
        } else {
            FeatureInput::Nchw { features: &f, labels: &labels, geometry: g }
        };
        let mut pass = vec![false; c];
        let mut gf = vec![0.0; features.features().len()];
        if let Ok(r) = state.step(
            StepInput { anchor_logits: &z, embedded_anchors: &emb, features },
            StepBuffers { confidence: &mut p, nll: &mut l, weights: &mut wt, class_pass: &mut pass, grad_logits: Some(&mut gz), grad_features: Some(&mut gf) },
        ) {
            assert!(r.loss_aux.is_finite() && r.loss_p2a.is_finite() && r.loss_p2a >= 0.0);
        }
    }
});
