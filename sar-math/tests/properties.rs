//! Property tests of the SAR equations (spec §3–§5): invariants, finite differences in f64,
//! and f32 against f64.
use approx::assert_relative_eq;
use proptest::prelude::*;
use sar_math::anchor_ce::{anchor_ce_owned, EPSILON};
use sar_math::ema::ema_update;
use sar_math::p2a::{p2a_nchw, p2a_rows, FeatureGeometry, P2aTargets, RowLabels};
use sar_math::prototype::car_intra_class;
use sar_math::WeightMode;

const IGNORE: i64 = 255;

/// Runs anchor_ce in f64 and returns (loss, grad, confidence, weights).
fn ce64(z: &[f64], c: usize, tau: f64, mode: WeightMode) -> (f64, Vec<f64>, Vec<f64>, Vec<f64>) {
    let o = anchor_ce_owned(z, c, tau, mode).unwrap();
    (o.value.loss, o.grad_logits, o.confidence, o.weights)
}

/// Square logit matrices, C in 1..=6, values in ±6 (plus a diagonal boost so some anchors are
/// confident and others not).
fn logits() -> impl Strategy<Value = (usize, Vec<f64>)> {
    (1usize..=6).prop_flat_map(|c| {
        (
            Just(c),
            prop::collection::vec(-6.0f64..6.0, c * c),
            prop::collection::vec(0.0f64..8.0, c),
        )
            .prop_map(|(c, mut z, boost)| {
                for i in 0..c {
                    z[i * c + i] += boost[i];
                }
                (c, z)
            })
    })
}

/// An NCHW problem: geometry, features, labels (some ignored), anchors.
#[derive(Debug, Clone)]
struct Nchw {
    g: FeatureGeometry,
    classes: usize,
    f: Vec<f64>,
    labels: Vec<i64>,
    anchors: Vec<f64>,
}

fn nchw() -> impl Strategy<Value = Nchw> {
    (
        1usize..=2,
        1usize..=4,
        1usize..=5,
        1usize..=5,
        1usize..=9,
        1usize..=9,
        1usize..=4,
    )
        .prop_flat_map(|(b, d, h, w, lh, lw, c)| {
            let g = FeatureGeometry {
                batch: b,
                channels: d,
                height: h,
                width: w,
                label_height: lh,
                label_width: lw,
            };
            (
                Just(g),
                Just(c),
                prop::collection::vec(-3.0f64..3.0, b * d * h * w),
                prop::collection::vec(
                    prop_oneof![4 => 0..c as i64, 1 => Just(IGNORE)],
                    b * lh * lw,
                ),
                prop::collection::vec(-2.0f64..2.0, c * d),
            )
        })
        .prop_map(|(g, classes, f, labels, anchors)| Nchw {
            g,
            classes,
            f,
            labels,
            anchors,
        })
}

fn targets(p: &Nchw) -> P2aTargets<'_, f64> {
    P2aTargets {
        anchors: &p.anchors,
        classes: p.classes,
        ignore_index: IGNORE,
        class_active: None,
    }
}

fn p2a_of(p: &Nchw, f: &[f64]) -> f64 {
    p2a_nchw(f, &p.labels, &p.g, &targets(p), None)
        .unwrap()
        .loss
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// L_p2a ≥ 0, and = 0 iff every feature in Ω equals its anchor.
    #[test]
    fn p2a_nonnegative_and_zero_at_anchors(p in nchw()) {
        let v = p2a_nchw(&p.f, &p.labels, &p.g, &targets(&p), None).unwrap();
        prop_assert!(v.loss >= 0.0);
        // Move every feature onto the anchor of its (resampled) label: loss becomes exactly 0.
        let (h, w, d) = (p.g.height, p.g.width, p.g.channels);
        let mut on = p.f.clone();
        for b in 0..p.g.batch {
            for y in 0..h {
                for x in 0..w {
                    let sy = sar_math::resample::nearest_source_index(p.g.label_height, h, y);
                    let sx = sar_math::resample::nearest_source_index(p.g.label_width, w, x);
                    let l = p.labels[(b * p.g.label_height + sy) * p.g.label_width + sx];
                    if l != IGNORE {
                        for k in 0..d {
                            on[((b * d + k) * h + y) * w + x] = p.anchors[l as usize * d + k];
                        }
                    }
                }
            }
        }
        prop_assert_eq!(p2a_of(&p, &on), 0.0);
        if v.valid > 0 && v.loss == 0.0 {
            prop_assert_eq!(&on, &p.f);
        }
    }

    /// Changing features at ignored pixels changes neither the loss nor the gradient elsewhere,
    /// and their gradient is 0 (even for NaN features).
    #[test]
    fn ignored_pixels_change_nothing(p in nchw(), junk in prop_oneof![Just(f64::NAN), Just(1e30), -50.0f64..50.0]) {
        let mut g1 = vec![0.0; p.f.len()];
        let v1 = p2a_nchw(&p.f, &p.labels, &p.g, &targets(&p), Some(&mut g1)).unwrap();
        // All-ignored labels at the same positions: which pixels are outside Ω?
        let mut ones = vec![0.0; p.f.len()];
        let probe = Nchw { anchors: vec![0.0; p.anchors.len()], f: vec![1.0; p.f.len()], ..p.clone() };
        p2a_nchw(&probe.f, &probe.labels, &probe.g, &targets(&probe), Some(&mut ones)).unwrap();
        let mut f2 = p.f.clone();
        for (x, &o) in f2.iter_mut().zip(&ones) {
            if o == 0.0 { *x = junk; }
        }
        let mut g2 = vec![0.0; p.f.len()];
        let v2 = p2a_nchw(&f2, &p.labels, &p.g, &targets(&p), Some(&mut g2)).unwrap();
        prop_assert_eq!(v1, v2);
        prop_assert_eq!(&g1, &g2);
        for (g, &o) in g2.iter().zip(&ones) {
            if o == 0.0 { prop_assert_eq!(*g, 0.0); }
        }
    }

    /// Permuting the rows (samples with their labels), or relabelling classes consistently,
    /// leaves L_p2a unchanged.
    #[test]
    fn p2a_rows_permutation_invariant(
        (n, d, c) in (1usize..8, 1usize..5, 1usize..5),
        seed in any::<u64>(),
    ) {
        let mut rng = sar_math::rng::SeededRng::new(seed);
        let f: Vec<f64> = (0..n * d).map(|_| rng.next_normal()).collect();
        let labels: Vec<i64> = (0..n).map(|_| (rng.next_u64() % c as u64) as i64).collect();
        let anchors: Vec<f64> = (0..c * d).map(|_| rng.next_normal()).collect();
        let t = P2aTargets { anchors: &anchors, classes: c, ignore_index: -1, class_active: None };
        let base = p2a_rows(&f, RowLabels::Plain(&labels), d, &t, None).unwrap().loss;
        // Reverse the rows.
        let fr: Vec<f64> = f.chunks(d).rev().flatten().copied().collect();
        let lr: Vec<i64> = labels.iter().rev().copied().collect();
        prop_assert!((p2a_rows(&fr, RowLabels::Plain(&lr), d, &t, None).unwrap().loss - base).abs() <= 1e-12 * base.max(1.0));
        // Relabel classes c → c−1−c with the anchor rows swapped accordingly.
        let ar: Vec<f64> = anchors.chunks(d).rev().flatten().copied().collect();
        let lm: Vec<i64> = labels.iter().map(|&l| c as i64 - 1 - l).collect();
        let tr = P2aTargets { anchors: &ar, ..t };
        prop_assert_eq!(p2a_rows(&f, RowLabels::Plain(&lm), d, &tr, None).unwrap().loss, base);
    }

    /// All anchors above τ ⇒ L_aux = 0 with a zero gradient; otherwise w ≥ 0 and Σw = S/(S−ε) ≈ 1.
    #[test]
    fn aux_weights((c, z) in logits(), tau in 0.05f64..0.99, detached in any::<bool>()) {
        let mode = if detached { WeightMode::Detached } else { WeightMode::Attached };
        let (loss, g, p, w) = ce64(&z, c, tau, mode);
        prop_assert!(loss >= 0.0 && loss.is_finite());
        if p.iter().all(|&pc| pc > tau) {
            prop_assert_eq!(loss, 0.0);
            prop_assert!(g.iter().all(|&x| x == 0.0));
        } else {
            prop_assert!(w.iter().all(|&x| x >= 0.0));
            let s: f64 = p.iter().filter(|&&pc| pc <= tau).map(|pc| -pc.ln()).sum();
            prop_assert!((w.iter().sum::<f64>() - s / (s - EPSILON)).abs() < 1e-9);
            prop_assert!((w.iter().sum::<f64>() - 1.0).abs() < 1e-6);
        }
    }

    /// Analytic dL_aux/dZ equals central finite differences (both weight modes). Cases where
    /// the step would move an anchor across τ (where L jumps) are skipped.
    #[test]
    fn aux_gradient_matches_finite_differences((c, z) in logits(), tau in 0.05f64..0.99, detached in any::<bool>()) {
        let mode = if detached { WeightMode::Detached } else { WeightMode::Attached };
        let (_, g, p, w) = ce64(&z, c, tau, mode);
        let h = 1e-6;
        for i in 0..c * c {
            let (mut zp, mut zm) = (z.clone(), z.clone());
            zp[i] += h;
            zm[i] -= h;
            let (lp, _, pp, _) = ce64(&zp, c, tau, WeightMode::Attached);
            let (lm, _, pm, _) = ce64(&zm, c, tau, WeightMode::Attached);
            let crossed = |q: &[f64]| q.iter().zip(&p).any(|(a, b)| (*a > tau) != (*b > tau));
            if crossed(&pp) || crossed(&pm) {
                continue;
            }
            let fd = if detached {
                // With w held constant, L = Σ w_c ℓ_c(Z).
                let nll = |zz: &[f64]| -> f64 {
                    (0..c).map(|r| {
                        let row = &zz[r * c..(r + 1) * c];
                        let m = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                        let lse = m + row.iter().map(|v| (v - m).exp()).sum::<f64>().ln();
                        w[r] * (lse - row[r])
                    }).sum()
                };
                (nll(&zp) - nll(&zm)) / (2.0 * h)
            } else {
                (lp - lm) / (2.0 * h)
            };
            prop_assert!((g[i] - fd).abs() <= 1e-6 * (1.0 + fd.abs()), "i={} analytic {} fd {}", i, g[i], fd);
        }
    }

    /// Analytic dL_p2a/dF equals central finite differences (L is quadratic, so FD is exact up
    /// to rounding).
    #[test]
    fn p2a_gradient_matches_finite_differences(p in nchw()) {
        let mut g = vec![0.0; p.f.len()];
        p2a_nchw(&p.f, &p.labels, &p.g, &targets(&p), Some(&mut g)).unwrap();
        let h = 1e-4;
        for i in 0..p.f.len() {
            let (mut fp, mut fm) = (p.f.clone(), p.f.clone());
            fp[i] += h;
            fm[i] -= h;
            let fd = (p2a_of(&p, &fp) - p2a_of(&p, &fm)) / (2.0 * h);
            prop_assert!((g[i] - fd).abs() < 1e-9, "i={} analytic {} fd {}", i, g[i], fd);
        }
    }

    /// MixUp rows: gradient equals finite differences, and λ = 1 equals plain labels y_a.
    #[test]
    fn p2a_mixup_gradient((n, d, c) in (1usize..5, 1usize..4, 1usize..4), lambda in 0.0f64..=1.0, seed in any::<u64>()) {
        let mut rng = sar_math::rng::SeededRng::new(seed);
        let f: Vec<f64> = (0..n * d).map(|_| rng.next_normal()).collect();
        let la: Vec<i64> = (0..n).map(|_| (rng.next_u64() % c as u64) as i64).collect();
        let lb: Vec<i64> = (0..n).map(|_| (rng.next_u64() % c as u64) as i64).collect();
        let anchors: Vec<f64> = (0..c * d).map(|_| rng.next_normal()).collect();
        let t = P2aTargets { anchors: &anchors, classes: c, ignore_index: -1, class_active: None };
        let loss = |f: &[f64]| p2a_rows(f, RowLabels::Mixup { a: &la, b: &lb, lambda }, d, &t, None).unwrap().loss;
        let mut g = vec![0.0; f.len()];
        p2a_rows(&f, RowLabels::Mixup { a: &la, b: &lb, lambda }, d, &t, Some(&mut g)).unwrap();
        for i in 0..f.len() {
            let (mut fp, mut fm) = (f.clone(), f.clone());
            fp[i] += 1e-4;
            fm[i] -= 1e-4;
            prop_assert!((g[i] - (loss(&fp) - loss(&fm)) / 2e-4).abs() < 1e-9);
        }
        let one = p2a_rows(&f, RowLabels::Mixup { a: &la, b: &lb, lambda: 1.0 }, d, &t, None).unwrap().loss;
        let plain = p2a_rows(&f, RowLabels::Plain(&la), d, &t, None).unwrap().loss;
        prop_assert!((one - plain).abs() <= 1e-15 * plain.max(1.0));
    }

    /// CAR's gradient equals finite differences away from the clip and from |F − P| = 0.
    #[test]
    fn car_gradient_matches_finite_differences(p in nchw()) {
        let t = targets(&p);
        let mut g = vec![0.0; p.f.len()];
        let l = car_intra_class(&p.f, &p.labels, &p.g, &t, Some(&mut g)).unwrap();
        prop_assume!(l > 2e-5);
        let h = 1e-7;
        for i in 0..p.f.len() {
            let (mut fp, mut fm) = (p.f.clone(), p.f.clone());
            fp[i] += h;
            fm[i] -= h;
            let lp = car_intra_class(&fp, &p.labels, &p.g, &t, None).unwrap();
            let lm = car_intra_class(&fm, &p.labels, &p.g, &t, None).unwrap();
            prop_assert!((g[i] - (lp - lm) / (2.0 * h)).abs() < 1e-6);
        }
    }

    /// α = 0 copies E; a constant E is approached geometrically: Â_k − E = α^k (Â_0 − E).
    #[test]
    fn ema_copies_and_converges(a0 in prop::collection::vec(-5.0f64..5.0, 6), e in prop::collection::vec(-5.0f64..5.0, 6), alpha in 0.0f64..0.99, k in 1usize..20) {
        let mut a = a0.clone();
        let mut init = true;
        ema_update(&mut a, &mut init, &e, 2, 3, 0.0, true).unwrap();
        prop_assert_eq!(&a, &e);
        let mut a = a0.clone();
        for _ in 0..k {
            ema_update(&mut a, &mut init, &e, 2, 3, alpha, true).unwrap();
        }
        for i in 0..6 {
            let want = e[i] + alpha.powi(k as i32) * (a0[i] - e[i]);
            prop_assert!((a[i] - want).abs() < 1e-12 * (1.0 + want.abs()) * k as f64);
        }
    }

    /// f32 results agree with f64: L_aux and its gradient within 1e-4 relative (+1e-5 absolute),
    /// L_p2a within 1e-5 relative (f32 with f64 accumulation of tile sums).
    #[test]
    fn f32_agrees_with_f64((c, z) in logits(), p in nchw()) {
        let tau = 0.9;
        let (l64, g64, _, _) = ce64(&z, c, tau, WeightMode::Attached);
        let z32: Vec<f32> = z.iter().map(|&v| v as f32).collect();
        let o32 = anchor_ce_owned(&z32, c, tau, WeightMode::Attached).unwrap();
        let (v32, gg) = (o32.value, o32.grad_logits);
        // Anchors within f32 rounding of τ may switch sides; skip those.
        let z32_as_64: Vec<f64> = z32.iter().map(|&v| v as f64).collect();
        let (_, _, p64, _) = ce64(&z32_as_64, c, tau, WeightMode::Attached);
        prop_assume!(p64.iter().all(|&q| (q - tau).abs() > 1e-5));
        let (l64b, g64b, _, _) = ce64(&z32_as_64, c, tau, WeightMode::Attached);
        let _ = (l64, g64);
        prop_assert!((v32.loss as f64 - l64b).abs() <= 1e-4 * l64b + 1e-5, "{} vs {}", v32.loss, l64b);
        for (a, b) in gg.iter().zip(&g64b) {
            prop_assert!((*a as f64 - b).abs() <= 1e-4 * b.abs() + 1e-5);
        }
        let f32s: Vec<f32> = p.f.iter().map(|&v| v as f32).collect();
        let a32: Vec<f32> = p.anchors.iter().map(|&v| v as f32).collect();
        let t32 = P2aTargets { anchors: &a32, classes: p.classes, ignore_index: IGNORE, class_active: None };
        let v = p2a_nchw(&f32s, &p.labels, &p.g, &t32, None).unwrap().loss as f64;
        let p64 = Nchw { f: f32s.iter().map(|&v| v as f64).collect(), anchors: a32.iter().map(|&v| v as f64).collect(), ..p.clone() };
        let want = p2a_of(&p64, &p64.f);
        prop_assert!((v - want).abs() <= 1e-5 * want + 1e-12);
    }
}

#[test]
fn f64_hand_value_of_p2a_through_resampling() {
    // 1×1×2×2 features from a 4×4 label map (exact ×2 reduction: labels at (0,0),(0,2),(2,0),(2,2)).
    let g = FeatureGeometry {
        batch: 1,
        channels: 1,
        height: 2,
        width: 2,
        label_height: 4,
        label_width: 4,
    };
    let labels: [i64; 16] = [0, 9, 1, 9, 9, 9, 9, 9, 255, 9, 0, 9, 9, 9, 9, 9];
    let mut anchors = vec![0.0f64; 10];
    anchors[1] = 2.0;
    anchors[9] = 100.0; // label 9 is never sampled
    let t = P2aTargets {
        anchors: &anchors,
        classes: 10,
        ignore_index: 255,
        class_active: None,
    };
    let v = p2a_nchw(&[1.0, 1.0, 7.0, 3.0], &labels, &g, &t, None).unwrap();
    // Ω = {(0,0): class 0, (0,1): class 1, (1,1): class 0}: (1−0)² + (1−2)² + (3−0)² = 11, /3.
    assert_eq!(v.valid, 3);
    assert_relative_eq!(v.loss, 11.0 / 3.0, epsilon = 1e-15);
}
