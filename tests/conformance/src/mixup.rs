//! MixUp cases: [`SarBackend::p2a_mixup`] alone and inside whole steps.

use crate::{check_p2a_output, close, e, logits, normals, Check, Tol};
use sar_math::backend::{BackendSarState, Mixup, SarBackend};
use sar_math::p2a::{p2a_rows, P2aTargets};
use sar_math::rng::SeededRng;
use sar_math::state::{FeatureInput, StepBuffers, StepInput};
use sar_math::{GateMode, SarConfig, SarState};

/// Eq. 4 with MixUp targets ([`SarBackend::p2a_mixup`]) against `sar-math`'s rows kernel:
/// ignored labels on either side, equal labels on both sides, λ at 0, 1 and between, a
/// per-class mask, λ2 folded in, empty Ω; in f64 the gradient also against central finite
/// differences of the backend's own loss; bad labels and λ are errors.
pub fn check_p2a_mixup<B: SarBackend>(b: &B, tol: Tol) -> Check {
    let mut rng = SeededRng::new(18);
    let cases = [
        (1usize, 1usize, 1usize, 0.5f64, None::<Vec<bool>>),
        (9, 4, 3, 0.3, None),
        (32, 16, 10, 0.71, None),
        (12, 5, 4, 0.0, Some(vec![true, false, true, true])),
        (7, 3, 3, 1.0, None),
        (6, 2, 2, 0.4, Some(vec![false, false])), // Ω empty
    ];
    for (i, (n, d, c, lambda, active)) in cases.into_iter().enumerate() {
        let f = tol.round(&normals(&mut rng, n * d, 1.0));
        let label = |rng: &mut SeededRng, k: usize, every: usize| -> i64 {
            if k % every == every - 1 {
                255
            } else {
                (rng.next_u64() % c as u64) as i64
            }
        };
        let la: Vec<i64> = (0..n).map(|k| label(&mut rng, k, 7)).collect();
        // Every third row mixes a class with itself.
        let lb: Vec<i64> = (0..n)
            .map(|k| {
                if k % 3 == 1 {
                    la[k]
                } else {
                    label(&mut rng, k, 5)
                }
            })
            .collect();
        let a = tol.round(&normals(&mut rng, c * d, 1.0));
        let targets = P2aTargets {
            anchors: &a,
            classes: c,
            ignore_index: 255,
            class_active: active.as_deref(),
        };
        let mixup = Mixup {
            labels_a: &la,
            labels_b: &lb,
            lambda,
        };
        let mut want_grad = vec![0.0; n * d];
        let want = p2a_rows(&f, mixup.row_labels(), d, &targets, Some(&mut want_grad))
            .map_err(e("reference"))?;
        let at = b.detach(&b.tensor(&[c, d], &a).map_err(e("tensor"))?);
        for weight in [1.0, 0.1] {
            let ctx = format!("case {i} weight {weight}");
            let ft = b.tensor(&[n, d], &f).map_err(e("tensor"))?;
            let got = b
                .p2a_mixup(&ft, mixup, &at, 255, active.as_deref(), weight)
                .map_err(e("p2a_mixup"))?;
            let want = (want.valid, want.loss, &want_grad[..]);
            let grad = check_p2a_output(b, &ctx, &got, &ft, want, weight, tol)?;
            if !tol.f32_inputs && n * d <= 64 {
                let fd = mixup_finite_differences(b, &f, (n, d), mixup, &at, &active, weight)?;
                close(
                    &format!("{ctx} dL/dF vs finite differences"),
                    &grad,
                    &fd,
                    1e-6,
                    1e-8,
                )?;
            }
        }
    }
    let ft = b.tensor(&[2, 2], &[0.0; 4]).map_err(e("tensor"))?;
    let at = b.detach(&b.tensor(&[3, 2], &[0.0; 6]).map_err(e("tensor"))?);
    let bad = [
        ([0i64, 3], [0i64, 1], 0.5, "label 3 for 3 classes"),
        ([0, 1], [-1, 1], 0.5, "label -1"),
        ([0, 1], [0, 1], 1.5, "λ = 1.5"),
        ([0, 1], [0, 1], f64::NAN, "λ = NaN"),
    ];
    for (la, lb, lambda, what) in bad {
        let mixup = Mixup {
            labels_a: &la,
            labels_b: &lb,
            lambda,
        };
        if b.p2a_mixup(&ft, mixup, &at, 255, None, 1.0).is_ok() {
            return Err(format!("mixup p2a accepted {what}"));
        }
    }
    let short = Mixup {
        labels_a: &[0],
        labels_b: &[0, 1],
        lambda: 0.5,
    };
    if b.p2a_mixup(&ft, short, &at, 255, None, 1.0).is_ok() {
        return Err("mixup p2a accepted one label a for two rows".into());
    }
    Ok(())
}

/// Central differences (step 1e-6) of the backend's own weighted MixUp loss w.r.t. each
/// feature.
fn mixup_finite_differences<B: SarBackend>(
    b: &B,
    f: &[f64],
    (n, d): (usize, usize),
    mixup: Mixup<'_>,
    anchors: &B::Tensor,
    active: &Option<Vec<bool>>,
    weight: f64,
) -> Result<Vec<f64>, String> {
    let h = 1e-6;
    let loss = |x: &[f64]| -> Result<f64, String> {
        let t = b.tensor(&[n, d], x).map_err(e("tensor"))?;
        let out = b
            .p2a_mixup(&t, mixup, anchors, 255, active.as_deref(), weight)
            .map_err(e("p2a_mixup"))?;
        b.loss_value(&out.loss).map_err(e("value"))
    };
    let mut grad = vec![0.0; f.len()];
    let mut x = f.to_vec();
    for k in 0..f.len() {
        x[k] = f[k] + h;
        let up = loss(&x)?;
        x[k] = f[k] - h;
        let down = loss(&x)?;
        x[k] = f[k];
        grad[k] = (up - down) / (2.0 * h);
    }
    Ok(grad)
}

/// Whole MixUp steps: [`BackendSarState::step_mixup`] on the backend against
/// [`SarState::step`] with [`sar_math::p2a::RowLabels::Mixup`] rows, over a sequence in which the gate first
/// fails, then passes (first copy, then EMA), both gate modes.
pub fn check_steps_mixup<B: SarBackend>(b: &B, tol: Tol) -> Check {
    for gate_mode in [GateMode::Global, GateMode::PerClass] {
        let mut rng = SeededRng::new(19);
        let (c, n, d) = (4, 10, 6);
        let config = SarConfig {
            gate: gate_mode,
            alpha: 0.8,
            ..SarConfig::default()
        };
        let mut want_state = SarState::<f64, _, _>::new(config, c, d).map_err(e("reference"))?;
        let zeros = b.detach(&b.tensor(&[c, d], &vec![0.0; c * d]).map_err(e("tensor"))?);
        let mut got_state = BackendSarState::new(config, c, zeros).map_err(e("state"))?;
        for step in 0..6 {
            // Boost grows with the step: the gate fails at first, then passes.
            let z = tol.round(&logits(&mut rng, c, 1.0, 6.0 * step as f64));
            let emb = tol.round(
                &normals(&mut rng, c * d, 1.0)
                    .iter()
                    .map(|v| v.max(0.0))
                    .collect::<Vec<_>>(),
            );
            let f = tol.round(&normals(&mut rng, n * d, 1.0));
            let la: Vec<i64> = (0..n)
                .map(|k| {
                    if k == 3 {
                        255
                    } else {
                        (rng.next_u64() % c as u64) as i64
                    }
                })
                .collect();
            let lb: Vec<i64> = (0..n).map(|_| (rng.next_u64() % c as u64) as i64).collect();
            let mixup = Mixup {
                labels_a: &la,
                labels_b: &lb,
                lambda: 0.35,
            };
            let (mut pc, mut l, mut w, mut pass) =
                (vec![0.0; c], vec![0.0; c], vec![0.0; c], vec![false; c]);
            let mut want_grad = vec![0.0; n * d];
            let want = want_state
                .step(
                    StepInput {
                        anchor_logits: &z,
                        embedded_anchors: &emb,
                        features: FeatureInput::Rows {
                            features: &f,
                            labels: mixup.row_labels(),
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
            let et = b.tensor(&[c, d], &emb).map_err(e("tensor"))?;
            let ft = b.tensor(&[n, d], &f).map_err(e("tensor"))?;
            let got = got_state
                .step_mixup(b, &zt, &et, &ft, mixup)
                .map_err(e("step"))?;
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
                &format!("{ctx} Â"),
                &b.to_host(&got_state.semantic).map_err(e("host"))?,
                want_state.semantic_anchors(),
                tol.rel,
                tol.abs,
            )?;
            match (&got.p2a, want.gate_passed) {
                (None, false) => {}
                (Some(p2a), true) => {
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
                (got, _) => {
                    return Err(format!(
                        "{ctx}: p2a {} although the gate {}",
                        if got.is_some() { "applied" } else { "missing" },
                        if want.gate_passed { "passed" } else { "failed" }
                    ))
                }
            }
        }
        if !got_state.fully_initialized() && gate_mode == GateMode::Global {
            return Err("the global gate never passed: the sequence does not test the EMA".into());
        }
    }
    Ok(())
}
