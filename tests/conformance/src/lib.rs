//! # sar-conformance: one suite, every backend
//!
//! Each `check_*` function runs one family of cases against any
//! [`SarBackend`] and compares it with `sar-math` evaluated in f64 on the same inputs (rounded
//! to the backend's precision first, so only the arithmetic differs). The
//! [`conformance_tests!`] macro turns the whole suite into `#[test]`s for one backend; the
//! crate's integration tests instantiate it for ndarray, candle's fused CPU path, candle's
//! composite path (the one CUDA runs) and dfdx, in f32 and f64, and candle-CUDA and dfdx-CUDA
//! with `--features cuda`.
//!
//! Gradients compared are the backend's own: analytic for ndarray, **autograd** for candle and
//! dfdx.
//! Tolerances ([`Tol`]): f64 within 1e-10 relative; f32 within 2e-5 relative for values and
//! 1e-4 for gradients, with small absolute floors (stated in the constants).

use sar_math::anchor_ce::{anchor_ce_owned, gate};
use sar_math::backend::{BackendSarState, BaselineBackend, P2aOutput, SarBackend};
use sar_math::rng::SeededRng;

mod mixup;
pub use mixup::{check_p2a_mixup, check_steps_mixup};
use sar_math::p2a::{p2a_nchw, p2a_rows, FeatureGeometry, P2aTargets, RowLabels};
use sar_math::state::{FeatureInput, StepBuffers, StepInput};
use sar_math::{GateMode, SarConfig, SarState, WeightMode};

/// The precision a backend computes in, and how close it must come to the f64 reference.
#[derive(Debug, Clone, Copy)]
pub struct Tol {
    /// Inputs are rounded to f32 before both sides see them.
    pub f32_inputs: bool,
    /// Relative tolerance of values.
    pub rel: f64,
    /// Absolute floor of values.
    pub abs: f64,
    /// Relative tolerance of gradients.
    pub grad_rel: f64,
    /// Absolute floor of gradients.
    pub grad_abs: f64,
}

impl Tol {
    /// f64 backends.
    pub const F64: Tol = Tol {
        f32_inputs: false,
        rel: 1e-10,
        abs: 1e-13,
        grad_rel: 1e-10,
        grad_abs: 1e-13,
    };
    /// f32 backends.
    pub const F32: Tol = Tol {
        f32_inputs: true,
        rel: 2e-5,
        abs: 1e-6,
        grad_rel: 1e-4,
        grad_abs: 1e-6,
    };

    fn round(&self, v: &[f64]) -> Vec<f64> {
        if self.f32_inputs {
            v.iter().map(|&x| x as f32 as f64).collect()
        } else {
            v.to_vec()
        }
    }
}

/// A failed comparison, in words.
pub type Check = Result<(), String>;

fn close(what: &str, got: &[f64], want: &[f64], rel: f64, abs: f64) -> Check {
    if got.len() != want.len() {
        return Err(format!(
            "{what}: {} values, expected {}",
            got.len(),
            want.len()
        ));
    }
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let within = (g - w).abs() <= abs + rel * w.abs(); // false for NaN too
        if !within {
            return Err(format!(
                "{what}[{i}]: got {g:e}, expected {w:e} (|diff| {:e})",
                (g - w).abs()
            ));
        }
    }
    Ok(())
}

fn e<E: std::fmt::Display>(ctx: &str) -> impl Fn(E) -> String + '_ {
    move |err| format!("{ctx}: {err}")
}

fn normals(rng: &mut SeededRng, n: usize, scale: f64) -> Vec<f64> {
    (0..n).map(|_| scale * rng.next_normal()).collect()
}

/// Logits `[C, C]` with a random diagonal boost (some anchors confident, some not).
fn logits(rng: &mut SeededRng, c: usize, scale: f64, boost: f64) -> Vec<f64> {
    let mut z = normals(rng, c * c, scale);
    for i in 0..c {
        z[i * c + i] += boost * rng.next_f64();
    }
    z
}

/// Eq. 5–7: loss, p, ℓ, w, |U| and dL/dZ (the backend's own gradient), every weight mode
/// (attached, detached, uniform = no re-weighting).
pub fn check_anchor_ce<B: SarBackend>(b: &B, tol: Tol) -> Check {
    let mut rng = SeededRng::new(11);
    for (c, scale, boost) in [
        (1, 1.0, 0.0),
        (2, 1.0, 3.0),
        (5, 2.0, 6.0),
        (19, 1.5, 9.0),
        (7, 40.0, 80.0),
        (4, 0.1, 0.0),
    ] {
        for mode in [
            WeightMode::Attached,
            WeightMode::Detached,
            WeightMode::Uniform,
        ] {
            for tau in [0.9, 0.5] {
                let z = tol.round(&logits(&mut rng, c, scale, boost));
                let want = anchor_ce_owned(&z, c, tau, mode).map_err(e("reference"))?;
                let (p, l, w, g) = (
                    &want.confidence,
                    &want.nll,
                    &want.weights,
                    &want.grad_logits,
                );
                let want = want.value;
                let zt = b.tensor(&[c, c], &z).map_err(e("tensor"))?;
                let got = b.anchor_ce(&zt, tau, mode).map_err(e("anchor_ce"))?;
                let ctx = format!("C={c} scale={scale} {mode:?} tau={tau}");
                if got.uncertain != want.uncertain {
                    return Err(format!(
                        "{ctx}: |U| {} vs {}",
                        got.uncertain, want.uncertain
                    ));
                }
                close(
                    &format!("{ctx} loss"),
                    &[b.loss_value(&got.loss).map_err(e("value"))?],
                    &[want.loss],
                    tol.rel,
                    tol.abs,
                )?;
                close(
                    &format!("{ctx} confidence"),
                    &got.confidence,
                    p,
                    tol.rel,
                    tol.abs,
                )?;
                close(&format!("{ctx} nll"), &got.nll, l, tol.rel, tol.abs)?;
                close(&format!("{ctx} weights"), &got.weights, w, tol.rel, tol.abs)?;
                let grad = b.loss_gradient(&got.loss, &zt).map_err(e("gradient"))?;
                close(
                    &format!("{ctx} dL/dZ"),
                    &grad,
                    g,
                    tol.grad_rel,
                    tol.grad_abs,
                )?;
            }
        }
    }
    Ok(())
}

/// Every anchor confident (Z = 50·I): L_aux is exactly 0 with an exactly zero gradient, and the
/// gate passes; on every backend.
pub fn check_all_confident<B: SarBackend>(b: &B, _tol: Tol) -> Check {
    for c in [1, 4, 19] {
        let mut z = vec![0.0; c * c];
        for i in 0..c {
            z[i * c + i] = 50.0;
        }
        let zt = b.tensor(&[c, c], &z).map_err(e("tensor"))?;
        let out = b
            .anchor_ce(&zt, 0.9, WeightMode::Attached)
            .map_err(e("anchor_ce"))?;
        let loss = b.loss_value(&out.loss).map_err(e("value"))?;
        let grad = b.loss_gradient(&out.loss, &zt).map_err(e("gradient"))?;
        if loss != 0.0 || grad.iter().any(|&g| g != 0.0) || out.uncertain != 0 {
            return Err(format!(
                "C={c}: L_aux {loss}, |U| {}, max |grad| {:e}",
                out.uncertain,
                grad.iter().fold(0.0f64, |m, g| m.max(g.abs()))
            ));
        }
        let mut pass = vec![false; c];
        if !b
            .gate(&zt, &out.nll, 0.8, GateMode::Global, &mut pass)
            .map_err(e("gate"))?
        {
            return Err(format!("C={c}: the gate failed for confident anchors"));
        }
    }
    Ok(())
}

/// The δ gate, global and per class, including rows with a wrong argmax.
pub fn check_gate<B: SarBackend>(b: &B, tol: Tol) -> Check {
    let mut rng = SeededRng::new(12);
    for case in 0..40 {
        let c = 1 + case % 6;
        let z = tol.round(&logits(&mut rng, c, 1.0, 8.0 * (case % 3) as f64));
        let l = anchor_ce_owned(&z, c, 0.9, WeightMode::Attached)
            .map_err(e("reference"))?
            .nll;
        let zt = b.tensor(&[c, c], &z).map_err(e("tensor"))?;
        let got_ce = b
            .anchor_ce(&zt, 0.9, WeightMode::Attached)
            .map_err(e("anchor_ce"))?;
        for mode in [GateMode::Global, GateMode::PerClass] {
            let mut want_pass = vec![false; c];
            let want = gate(&z, c, &l, 0.8, mode, &mut want_pass).map_err(e("reference gate"))?;
            let mut pass = vec![false; c];
            let got = b
                .gate(&zt, &got_ce.nll, 0.8, mode, &mut pass)
                .map_err(e("gate"))?;
            if (got, &pass) != (want, &want_pass) {
                return Err(format!(
                    "case {case} {mode:?}: gate {got} {pass:?}, expected {want} {want_pass:?}"
                ));
            }
        }
    }
    Ok(())
}

/// Eq. 8: first-pass copies, averages, untouched rows, over several updates.
pub fn check_ema<B: SarBackend>(b: &B, tol: Tol) -> Check {
    let mut rng = SeededRng::new(13);
    let (c, d, alpha) = (5, 7, 0.9);
    let mut want = vec![0.0; c * d];
    let mut want_init = vec![false; c];
    let mut got = b.tensor(&[c, d], &want).map_err(e("tensor"))?;
    let mut got_init = vec![false; c];
    for step in 0..6 {
        let emb = tol.round(&normals(&mut rng, c * d, 1.0));
        let rows: Vec<bool> = (0..c).map(|r| (r + step) % 3 != 0).collect();
        sar_math::ema::ema_update_per_class(&mut want, &mut want_init, &emb, c, d, alpha, &rows)
            .map_err(e("reference"))?;
        let et = b.tensor(&[c, d], &emb).map_err(e("tensor"))?;
        let n = b
            .ema_update(&mut got, &et, alpha, &rows, &mut got_init)
            .map_err(e("ema"))?;
        if got_init != want_init || n != rows.iter().filter(|&&r| r).count() {
            return Err(format!(
                "step {step}: initialised {got_init:?} (updated {n}), expected {want_init:?}"
            ));
        }
        close(
            &format!("step {step} semantic anchors"),
            &b.to_host(&got).map_err(e("host"))?,
            &want,
            tol.rel,
            tol.abs,
        )?;
    }
    Ok(())
}

/// A random NCHW p2a problem (features, labels with ignores, anchors).
struct Problem {
    features: Vec<f64>,
    labels: Vec<i64>,
    anchors: Vec<f64>,
}

fn problem(
    rng: &mut SeededRng,
    tol: Tol,
    geometry: FeatureGeometry,
    classes: usize,
    ignore_share: u64,
) -> Problem {
    let features = tol.round(&normals(rng, geometry.feature_len().unwrap(), 1.0));
    let labels = (0..geometry.label_len().unwrap())
        .map(|_| {
            if rng.next_u64() % 100 < ignore_share {
                255
            } else {
                (rng.next_u64() % classes as u64) as i64
            }
        })
        .collect();
    let anchors = tol.round(&normals(rng, classes * geometry.channels, 1.0));
    Problem {
        features,
        labels,
        anchors,
    }
}

fn geometry(b: usize, d: usize, h: usize, w: usize, lh: usize, lw: usize) -> FeatureGeometry {
    FeatureGeometry {
        batch: b,
        channels: d,
        height: h,
        width: w,
        label_height: lh,
        label_width: lw,
    }
}

/// Checks a backend's p2a output against `sar-math`'s `want` = (|Ω|, L_p2a, dL_p2a/dF), with the
/// backend's loss carrying the weight: |Ω|, the unweighted value, `weight`·L_p2a and its
/// gradient w.r.t. the features `ft`. Returns that gradient.
fn check_p2a_output<B: SarBackend>(
    b: &B,
    ctx: &str,
    got: &P2aOutput<B::Loss>,
    ft: &B::Tensor,
    (valid, loss, grad_unweighted): (usize, f64, &[f64]),
    weight: f64,
    tol: Tol,
) -> Result<Vec<f64>, String> {
    if got.valid != valid {
        return Err(format!("{ctx}: |Ω| {} vs {valid}", got.valid));
    }
    close(
        &format!("{ctx} value"),
        &[got.value],
        &[loss],
        tol.rel,
        tol.abs,
    )?;
    close(
        &format!("{ctx} loss"),
        &[b.loss_value(&got.loss).map_err(e("value"))?],
        &[weight * loss],
        tol.rel,
        tol.abs,
    )?;
    let grad = b.loss_gradient(&got.loss, ft).map_err(e("gradient"))?;
    let scaled: Vec<f64> = grad_unweighted.iter().map(|g| weight * g).collect();
    close(
        &format!("{ctx} dL/dF"),
        &grad,
        &scaled,
        tol.grad_rel,
        tol.grad_abs,
    )?;
    Ok(grad)
}

/// Eq. 4 on NCHW features: non-integer and integer label resampling, ignore labels, per-class
/// masks, λ2 folded in, empty Ω, C = 1.
pub fn check_p2a_nchw<B: SarBackend>(b: &B, tol: Tol) -> Check {
    let mut rng = SeededRng::new(14);
    let cases = [
        (geometry(2, 6, 5, 7, 26, 22), 4, 15, None),
        (geometry(1, 3, 8, 8, 32, 32), 19, 10, None),
        (geometry(2, 5, 6, 4, 6, 4), 3, 0, None),
        (
            geometry(1, 4, 7, 9, 13, 29),
            5,
            20,
            Some(vec![true, false, true, true, false]),
        ),
        (geometry(1, 2, 3, 3, 9, 9), 1, 30, None),
        (geometry(1, 3, 4, 4, 8, 8), 3, 100, None), // Ω empty
    ];
    for (i, (g, c, ignore_share, active)) in cases.into_iter().enumerate() {
        let p = problem(&mut rng, tol, g, c, ignore_share);
        let targets = P2aTargets {
            anchors: &p.anchors,
            classes: c,
            ignore_index: 255,
            class_active: active.as_deref(),
        };
        let mut want_grad = vec![0.0; p.features.len()];
        let want = p2a_nchw(&p.features, &p.labels, &g, &targets, Some(&mut want_grad))
            .map_err(e("reference"))?;
        for weight in [1.0, 0.1] {
            let ft = b
                .tensor(&[g.batch, g.channels, g.height, g.width], &p.features)
                .map_err(e("tensor"))?;
            let lt = b
                .labels(&[g.batch, g.label_height, g.label_width], &p.labels)
                .map_err(e("labels"))?;
            let at = b
                .tensor(&[c, g.channels], &p.anchors)
                .map_err(e("tensor"))?;
            let at = b.detach(&at);
            let got = b
                .p2a(&ft, &lt, &at, 255, active.as_deref(), weight)
                .map_err(e("p2a"))?;
            let ctx = format!("case {i} weight {weight}");
            let want = (want.valid, want.loss, &want_grad[..]);
            check_p2a_output(b, &ctx, &got, &ft, want, weight, tol)?;
        }
    }
    Ok(())
}

/// Eq. 4 on `[N, D]` features (classification), with ignored rows.
pub fn check_p2a_rows<B: SarBackend>(b: &B, tol: Tol) -> Check {
    let mut rng = SeededRng::new(15);
    for (n, d, c) in [(1, 1, 1), (9, 4, 3), (32, 16, 10)] {
        let f = tol.round(&normals(&mut rng, n * d, 1.0));
        let labels: Vec<i64> = (0..n)
            .map(|i| {
                if i % 7 == 6 {
                    255
                } else {
                    (rng.next_u64() % c as u64) as i64
                }
            })
            .collect();
        let a = tol.round(&normals(&mut rng, c * d, 1.0));
        let targets = P2aTargets {
            anchors: &a,
            classes: c,
            ignore_index: 255,
            class_active: None,
        };
        let mut want_grad = vec![0.0; n * d];
        let want = p2a_rows(
            &f,
            RowLabels::Plain(&labels),
            d,
            &targets,
            Some(&mut want_grad),
        )
        .map_err(e("reference"))?;
        let ft = b.tensor(&[n, d], &f).map_err(e("tensor"))?;
        let lt = b.labels(&[n], &labels).map_err(e("labels"))?;
        let at = b.detach(&b.tensor(&[c, d], &a).map_err(e("tensor"))?);
        let got = b.p2a(&ft, &lt, &at, 255, None, 1.0).map_err(e("p2a"))?;
        close(
            &format!("N={n} value"),
            &[got.value],
            &[want.loss],
            tol.rel,
            tol.abs,
        )?;
        let grad = b.loss_gradient(&got.loss, &ft).map_err(e("gradient"))?;
        close(
            &format!("N={n} dL/dF"),
            &grad,
            &want_grad,
            tol.grad_rel,
            tol.grad_abs,
        )?;
    }
    Ok(())
}

/// Label resampling equals `sar-math`'s (PyTorch's legacy `nearest`), for down- and up-sampling.
pub fn check_resample<B: SarBackend>(b: &B, _tol: Tol) -> Check {
    let mut rng = SeededRng::new(16);
    for (ih, iw, oh, ow) in [
        (26, 22, 22, 26),
        (512, 1024, 128, 256),
        (5, 5, 10, 10),
        (7, 3, 3, 7),
        (4, 4, 4, 4),
    ] {
        let labels: Vec<i64> = (0..2 * ih * iw)
            .map(|_| (rng.next_u64() % 300) as i64)
            .collect();
        let mut want = vec![0i64; 2 * oh * ow];
        sar_math::resample::resample_labels_nearest(&labels, 2, (ih, iw), (oh, ow), &mut want)
            .map_err(e("reference"))?;
        let lt = b.labels(&[2, ih, iw], &labels).map_err(e("labels"))?;
        let got = b.resample_labels(&lt, (oh, ow)).map_err(e("resample"))?;
        // Compare through a p2a with D = 1 and identity-sized labels: both sides see the same map.
        let ones = b
            .tensor(&[2, 1, oh, ow], &vec![0.0; 2 * oh * ow])
            .map_err(e("tensor"))?;
        let anchors: Vec<f64> = (0..300).map(|c| c as f64).collect();
        let at = b.detach(&b.tensor(&[300, 1], &anchors).map_err(e("tensor"))?);
        let out = b.p2a(&ones, &got, &at, -1, None, 1.0).map_err(e("p2a"))?;
        let grad = b.loss_gradient(&out.loss, &ones).map_err(e("gradient"))?;
        // dL/dF = 2(0 − label)/(N·1): recovers each resampled label.
        let n = (2 * oh * ow) as f64;
        let recovered: Vec<f64> = grad.iter().map(|g| -g * n / 2.0).collect();
        let want_f: Vec<f64> = want.iter().map(|&v| v as f64).collect();
        close(
            &format!("{ih}×{iw} → {oh}×{ow}"),
            &recovered,
            &want_f,
            1e-6,
            1e-3,
        )?;
    }
    Ok(())
}

/// Whole steps: [`BackendSarState::step`] on the backend against [`SarState::step`], over a
/// sequence in which the gate first fails, then passes (first copy, then EMA), both gate modes.
pub fn check_steps<B: SarBackend>(b: &B, tol: Tol) -> Check {
    for gate_mode in [GateMode::Global, GateMode::PerClass] {
        let mut rng = SeededRng::new(17);
        let (c, g) = (4, geometry(2, 5, 4, 6, 9, 13));
        let config = SarConfig {
            gate: gate_mode,
            alpha: 0.8,
            ..SarConfig::default()
        };
        let mut want_state =
            SarState::<f64, _, _>::new(config, c, g.channels).map_err(e("reference"))?;
        let zeros = b.detach(
            &b.tensor(&[c, g.channels], &vec![0.0; c * g.channels])
                .map_err(e("tensor"))?,
        );
        let mut got_state = BackendSarState::new(config, c, zeros).map_err(e("state"))?;
        for step in 0..5 {
            // Boost grows with the step: the gate fails at first, then passes.
            let z = tol.round(&logits(&mut rng, c, 1.0, 4.0 * step as f64));
            let emb = tol.round(
                &normals(&mut rng, c * g.channels, 1.0)
                    .iter()
                    .map(|v| v.max(0.0))
                    .collect::<Vec<_>>(),
            );
            let p = problem(&mut rng, tol, g, c, 10);
            let (mut pc, mut l, mut w, mut pass) =
                (vec![0.0; c], vec![0.0; c], vec![0.0; c], vec![false; c]);
            let mut want_grad = vec![0.0; p.features.len()];
            let want = want_state
                .step(
                    StepInput {
                        anchor_logits: &z,
                        embedded_anchors: &emb,
                        features: FeatureInput::Nchw {
                            features: &p.features,
                            labels: &p.labels,
                            geometry: g,
                        },
                    },
                    StepBuffers {
                        confidence: &mut pc,
                        nll: &mut l,
                        weights: &mut w,
                        class_pass: &mut pass,
                        grad_logits: None,
                        grad_features: Some(&mut want_grad),
                    },
                )
                .map_err(e("reference step"))?;
            let zt = b.tensor(&[c, c], &z).map_err(e("tensor"))?;
            let et = b.tensor(&[c, g.channels], &emb).map_err(e("tensor"))?;
            let ft = b
                .tensor(&[g.batch, g.channels, g.height, g.width], &p.features)
                .map_err(e("tensor"))?;
            let lt = b
                .labels(&[g.batch, g.label_height, g.label_width], &p.labels)
                .map_err(e("labels"))?;
            let got = got_state.step(b, &zt, &et, &ft, &lt).map_err(e("step"))?;
            let ctx = format!("{gate_mode:?} step {step}");
            if got.gate_passed != want.gate_passed
                || got.class_pass != pass
                || got.updated_classes != want.updated_classes
            {
                return Err(format!(
                    "{ctx}: gate {} {:?} updated {}, expected {} {pass:?} {}",
                    got.gate_passed,
                    got.class_pass,
                    got.updated_classes,
                    want.gate_passed,
                    want.updated_classes
                ));
            }
            close(
                &format!("{ctx} L_aux"),
                &[b.loss_value(&got.aux.loss).map_err(e("value"))?],
                &[want.loss_aux],
                tol.rel,
                tol.abs,
            )?;
            close(
                &format!("{ctx} Â"),
                &b.to_host(&got_state.semantic).map_err(e("host"))?,
                want_state.semantic_anchors(),
                tol.rel,
                tol.abs,
            )?;
            match &got.p2a {
                None if want.gate_passed => {
                    return Err(format!("{ctx}: p2a missing although the gate passed"))
                }
                Some(_) if !want.gate_passed => {
                    return Err(format!("{ctx}: p2a applied although the gate failed"))
                }
                None => {}
                Some(p2a) => {
                    close(
                        &format!("{ctx} L_p2a"),
                        &[p2a.value],
                        &[want.loss_p2a],
                        tol.rel,
                        tol.abs,
                    )?;
                    let grad = b.loss_gradient(&p2a.loss, &ft).map_err(e("gradient"))?;
                    let scaled: Vec<f64> =
                        want_grad.iter().map(|v| config.lambda_p2a * v).collect();
                    close(
                        &format!("{ctx} λ2·dL_p2a/dF"),
                        &grad,
                        &scaled,
                        tol.grad_rel,
                        tol.grad_abs,
                    )?;
                }
            }
        }
        if !got_state.fully_initialized() && gate_mode == GateMode::Global {
            return Err("the global gate never passed: the sequence does not test the EMA".into());
        }
    }
    Ok(())
}

/// Bad input is an error, not a panic: labels out of range, negative labels, non-square logits,
/// mismatched D.
pub fn check_errors<B: SarBackend>(b: &B, _tol: Tol) -> Check {
    let ft = b.tensor(&[1, 2, 2, 2], &[0.0; 8]).map_err(e("tensor"))?;
    let at = b.detach(&b.tensor(&[3, 2], &[0.0; 6]).map_err(e("tensor"))?);
    for bad in [3i64, -1, 1000] {
        let lt = b
            .labels(&[1, 2, 2], &[0, 1, bad, 255])
            .map_err(e("labels"))?;
        if b.p2a(&ft, &lt, &at, 255, None, 1.0).is_ok() {
            return Err(format!("label {bad} for 3 classes was accepted"));
        }
    }
    let z = b.tensor(&[2, 3], &[0.0; 6]).map_err(e("tensor"))?;
    if b.anchor_ce(&z, 0.9, WeightMode::Attached).is_ok() {
        return Err("non-square anchor logits were accepted".into());
    }
    let a3 = b.detach(&b.tensor(&[3, 3], &[0.0; 9]).map_err(e("tensor"))?);
    let lt = b.labels(&[1, 2, 2], &[0, 1, 2, 255]).map_err(e("labels"))?;
    if b.p2a(&ft, &lt, &a3, 255, None, 1.0).is_ok() {
        return Err("anchors with D = 3 for features with D = 2 were accepted".into());
    }
    Ok(())
}

/// The tensor and label shapes of a baseline problem: NCHW, or rows `[N, D]` when the map is
/// 1×1 and `rows` is set.
fn baseline_shapes(g: &FeatureGeometry, rows: bool) -> (Vec<usize>, Vec<usize>) {
    if rows {
        (vec![g.batch, g.channels], vec![g.batch])
    } else {
        (
            vec![g.batch, g.channels, g.height, g.width],
            vec![g.batch, g.label_height, g.label_width],
        )
    }
}

/// Spec §7: batch class prototypes (values and counts, absent classes zero) and CAR's
/// intra-class loss with its gradient toward them, on NCHW maps with label resampling and on
/// rows, with ignored pixels, an absent class, an empty Ω and the 1e-5 clip.
pub fn check_baselines<B: BaselineBackend>(b: &B, tol: Tol) -> Check {
    let mut rng = SeededRng::new(17);
    let cases = [
        (geometry(2, 6, 5, 7, 26, 22), 4, 15, false),
        (geometry(1, 3, 8, 8, 32, 32), 19, 10, false),
        (geometry(12, 5, 1, 1, 1, 1), 6, 20, true),
        (geometry(3, 4, 1, 1, 1, 1), 10, 0, true), // most classes absent
        (geometry(1, 3, 4, 4, 8, 8), 3, 100, false), // Ω empty
    ];
    for (i, (g, c, ignore_share, rows)) in cases.into_iter().enumerate() {
        let p = problem(&mut rng, tol, g, c, ignore_share);
        let zeros = vec![0.0; c * g.channels];
        let targets = P2aTargets {
            anchors: &zeros,
            classes: c,
            ignore_index: 255,
            class_active: None,
        };
        let (mut protos, mut counts) = (vec![0.0; c * g.channels], vec![0u64; c]);
        sar_math::prototype::class_prototypes(
            &p.features,
            &p.labels,
            &g,
            &targets,
            &mut protos,
            &mut counts,
        )
        .map_err(e("reference prototypes"))?;
        let (fs, ls) = baseline_shapes(&g, rows);
        let ft = b.tensor(&fs, &p.features).map_err(e("tensor"))?;
        let lt = b.labels(&ls, &p.labels).map_err(e("labels"))?;
        let (got_p, got_n) = b
            .class_prototypes(&ft, &lt, c, 255)
            .map_err(e("class_prototypes"))?;
        let ctx = format!("case {i}");
        if got_n != counts {
            return Err(format!("{ctx}: counts {got_n:?} vs {counts:?}"));
        }
        let got_p = b.to_host(&got_p).map_err(e("to_host"))?;
        close(
            &format!("{ctx} prototypes"),
            &got_p,
            &protos,
            tol.rel,
            tol.abs,
        )?;
        // CAR toward the reference prototypes (rounded like the inputs), and toward the
        // features' own values (m = 0: the clip).
        let protos = tol.round(&protos);
        for (what, features) in [("car", p.features.clone()), ("car clipped", Vec::new())] {
            let (features, prototypes) = if features.is_empty() {
                // Every valid pixel on its prototype: a constant map per class.
                let d = g.channels;
                let mut f = vec![0.0; g.feature_len().unwrap()];
                for (k, v) in f.iter_mut().enumerate() {
                    *v = (k / (g.height * g.width) % d) as f64;
                }
                let proto: Vec<f64> = (0..c * d).map(|k| (k % d) as f64).collect();
                (f, proto)
            } else {
                (features, protos.clone())
            };
            let targets = P2aTargets {
                anchors: &prototypes,
                classes: c,
                ignore_index: 255,
                class_active: None,
            };
            let mut want_grad = vec![0.0; features.len()];
            let want = sar_math::prototype::car_intra_class(
                &features,
                &p.labels,
                &g,
                &targets,
                Some(&mut want_grad),
            )
            .map_err(e("reference car"))?;
            let valid = sar_math::p2a::p2a_valid_count_nchw(&p.labels, &g, &targets)
                .map_err(e("reference count"))?;
            for weight in [1.0, 0.1] {
                let ft = b.tensor(&fs, &features).map_err(e("tensor"))?;
                let pt = b.detach(
                    &b.tensor(&[c, g.channels], &prototypes)
                        .map_err(e("tensor"))?,
                );
                let got = b.car(&ft, &lt, &pt, 255, weight).map_err(e("car"))?;
                let ctx = format!("{ctx} {what} weight {weight}");
                check_p2a_output(b, &ctx, &got, &ft, (valid, want, &want_grad), weight, tol)?;
            }
        }
    }
    // Bad labels are an error.
    let ft = b.tensor(&[2, 3], &[0.0; 6]).map_err(e("tensor"))?;
    let lt = b.labels(&[2], &[0, 7]).map_err(e("labels"))?;
    if b.class_prototypes(&ft, &lt, 3, 255).is_ok() {
        return Err("prototypes: label 7 for 3 classes was accepted".into());
    }
    Ok(())
}

/// The EM-style prototype baseline over a sequence of batches ([`sar_math::backend::prototype_step`]):
/// the EMA of class prototypes (first sight copies, absent classes keep their row, never-seen
/// classes stay uninitialised) and the p2a loss toward it, against the host kernels.
pub fn check_prototype_steps<B: BaselineBackend>(b: &B, tol: Tol) -> Check {
    let (n, d, c) = (8, 3, 4);
    let mut rng = SeededRng::new(19);
    let cfg = SarConfig {
        alpha: 0.9,
        ..SarConfig::default()
    };
    let zeros = b.detach(&b.tensor(&[c, d], &vec![0.0; c * d]).map_err(e("tensor"))?);
    let mut got_state = BackendSarState::new(cfg, c, zeros).map_err(e("state"))?;
    let (mut semantic, mut initialized) = (vec![0.0; c * d], vec![false; c]);
    // Class 3 never occurs; class 2 is absent from the second batch.
    let batches: [&[i64]; 3] = [
        &[0, 1, 2, 0, 1, 2, 255, 0],
        &[0, 1, 1, 0, 255, 0, 1, 1],
        &[2, 2, 0, 1, 0, 1, 2, 255],
    ];
    for (step, labels) in batches.into_iter().enumerate() {
        let f = tol.round(&normals(&mut rng, n * d, 1.0));
        let g = geometry(n, d, 1, 1, 1, 1);
        let zeros = vec![0.0; c * d];
        let t = P2aTargets {
            anchors: &zeros,
            classes: c,
            ignore_index: 255,
            class_active: None,
        };
        let (mut protos, mut counts) = (vec![0.0; c * d], vec![0u64; c]);
        sar_math::prototype::class_prototypes(&f, labels, &g, &t, &mut protos, &mut counts)
            .map_err(e("reference prototypes"))?;
        let present: Vec<bool> = counts.iter().map(|&k| k > 0).collect();
        let protos = tol.round(&protos);
        sar_math::ema::ema_update_per_class(
            &mut semantic,
            &mut initialized,
            &protos,
            c,
            d,
            cfg.alpha,
            &present,
        )
        .map_err(e("reference ema"))?;
        let t = P2aTargets {
            anchors: &semantic,
            classes: c,
            ignore_index: 255,
            class_active: Some(&initialized),
        };
        let mut want_grad = vec![0.0; f.len()];
        let want = p2a_rows(&f, RowLabels::Plain(labels), d, &t, Some(&mut want_grad))
            .map_err(e("reference p2a"))?;
        let ft = b.tensor(&[n, d], &f).map_err(e("tensor"))?;
        let lt = b.labels(&[n], labels).map_err(e("labels"))?;
        let got = sar_math::backend::prototype_step(b, &mut got_state, &ft, &lt, 0.5)
            .map_err(e("prototype_step"))?;
        let ctx = format!("step {step}");
        if got_state.initialized != initialized {
            return Err(format!(
                "{ctx}: initialised {:?} vs {initialized:?}",
                got_state.initialized
            ));
        }
        let got_semantic = b.to_host(&got_state.semantic).map_err(e("to_host"))?;
        close(
            &format!("{ctx} EMA"),
            &got_semantic,
            &semantic,
            tol.rel,
            tol.abs,
        )?;
        let want = (want.valid, want.loss, &want_grad[..]);
        check_p2a_output(b, &ctx, &got.loss, &ft, want, 0.5, tol)?;
    }
    if initialized[3] {
        return Err("a class that never occurred was initialised".into());
    }
    Ok(())
}

/// Instantiates the whole suite as `#[test]`s in a module `$name`, for the backend that
/// `$make` builds (an `Option`: `None` skips, e.g. no GPU present) with tolerances `$tol`.
#[macro_export]
macro_rules! conformance_tests {
    ($name:ident, $make:expr, $tol:expr) => {
        mod $name {
            #[allow(unused_imports)]
            use super::*;
            $crate::conformance_tests!(@one $make, $tol, anchor_ce, check_anchor_ce);
            $crate::conformance_tests!(@one $make, $tol, all_confident, check_all_confident);
            $crate::conformance_tests!(@one $make, $tol, gate, check_gate);
            $crate::conformance_tests!(@one $make, $tol, ema, check_ema);
            $crate::conformance_tests!(@one $make, $tol, p2a_nchw, check_p2a_nchw);
            $crate::conformance_tests!(@one $make, $tol, p2a_rows, check_p2a_rows);
            $crate::conformance_tests!(@one $make, $tol, p2a_mixup, check_p2a_mixup);
            $crate::conformance_tests!(@one $make, $tol, resample, check_resample);
            $crate::conformance_tests!(@one $make, $tol, steps, check_steps);
            $crate::conformance_tests!(@one $make, $tol, steps_mixup, check_steps_mixup);
            $crate::conformance_tests!(@one $make, $tol, errors, check_errors);
            $crate::conformance_tests!(@one $make, $tol, baselines, check_baselines);
            $crate::conformance_tests!(@one $make, $tol, prototype_steps, check_prototype_steps);
        }
    };
    (@one $make:expr, $tol:expr, $test:ident, $check:ident) => {
        #[test]
        fn $test() {
            match $make {
                Some(backend) => {
                    if let Err(msg) = $crate::$check(&backend, $tol) {
                        panic!("{}: {}", stringify!($check), msg);
                    }
                }
                None => eprintln!("SKIPPED {}: backend not available here", stringify!($test)),
            }
        }
    };
}
