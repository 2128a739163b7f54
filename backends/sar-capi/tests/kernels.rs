//! Each kernel's `extern "C"` function, called from Rust, against the `sar-math` kernel it
//! wraps (f64 and f32), plus null pointers and zero dims.

use sar_capi::*;
use sar_math::p2a::{p2a_nchw, p2a_rows, FeatureGeometry, P2aTargets, RowLabels};
use sar_math::{anchor_ce, ema, prototype, resample, WeightMode};
use std::ffi::CStr;
use std::ptr::{null, null_mut};

fn message() -> String {
    // SAFETY: a NUL-terminated buffer of this thread.
    unsafe { CStr::from_ptr(sar_last_error_message()) }
        .to_string_lossy()
        .into_owned()
}

fn seq(n: usize, seed: u64) -> Vec<f64> {
    let mut rng = sar_math::rng::SeededRng::new(seed);
    (0..n).map(|_| rng.next_normal()).collect()
}

const G: SarGeometry = SarGeometry {
    batch: 2,
    channels: 3,
    height: 3,
    width: 2,
    label_height: 5,
    label_width: 4,
};
const C: usize = 4;

fn geometry() -> FeatureGeometry {
    G.into()
}

fn labels() -> Vec<i64> {
    (0..40)
        .map(|i| if i % 9 == 4 { 255 } else { (i % C) as i64 })
        .collect()
}

#[test]
fn anchor_ce_and_gate_match_sar_math_in_both_modes_and_types() {
    let mut z = seq(C * C, 1);
    z[0] += 5.0;
    for mode in [SAR_WEIGHTS_ATTACHED, SAR_WEIGHTS_DETACHED] {
        let wm = if mode == 0 {
            WeightMode::Attached
        } else {
            WeightMode::Detached
        };
        let want = anchor_ce::anchor_ce_owned(&z, C, 0.9, wm).unwrap();
        let (mut p, mut l, mut w, mut g) =
            (vec![0.0; C], vec![0.0; C], vec![0.0; C], vec![0.0; C * C]);
        let mut v = SarAnchorCeValue::default();
        let s = unsafe {
            sar_anchor_ce_f64(
                z.as_ptr(),
                C,
                0.9,
                mode,
                p.as_mut_ptr(),
                l.as_mut_ptr(),
                w.as_mut_ptr(),
                g.as_mut_ptr(),
                &mut v,
            )
        };
        assert_eq!(s, SarStatus::SarOk);
        assert_eq!(
            (p, l.clone(), w, g),
            (
                want.confidence,
                want.nll.clone(),
                want.weights,
                want.grad_logits
            )
        );
        assert_eq!(
            (v.loss, v.uncertain, v.nll_sum),
            (want.value.loss, want.value.uncertain, want.value.nll_sum)
        );
        // f32
        let z32: Vec<f32> = z.iter().map(|&x| x as f32).collect();
        let want32 = anchor_ce::anchor_ce_owned(&z32, C, 0.9, wm).unwrap();
        let (mut p, mut l32, mut w) = (vec![0f32; C], vec![0f32; C], vec![0f32; C]);
        let s = unsafe {
            sar_anchor_ce_f32(
                z32.as_ptr(),
                C,
                0.9,
                mode,
                p.as_mut_ptr(),
                l32.as_mut_ptr(),
                w.as_mut_ptr(),
                null_mut(),
                &mut v,
            )
        };
        assert_eq!(s, SarStatus::SarOk);
        assert_eq!((p, w), (want32.confidence, want32.weights));
        // gate
        for (kind, gm) in [
            (SAR_GATE_GLOBAL, sar_math::GateMode::Global),
            (SAR_GATE_PER_CLASS, sar_math::GateMode::PerClass),
        ] {
            let mut want_pass = vec![false; C];
            let want = anchor_ce::gate(&z, C, &l, 0.8, gm, &mut want_pass).unwrap();
            let (mut pass, mut passed) = (vec![true; C], !want);
            let s = unsafe {
                sar_gate_f64(
                    z.as_ptr(),
                    C,
                    l.as_ptr(),
                    0.8,
                    kind,
                    pass.as_mut_ptr(),
                    &mut passed,
                )
            };
            assert_eq!((s, pass, passed), (SarStatus::SarOk, want_pass, want));
        }
    }
    // bad enum, null, zero classes
    let mut v = SarAnchorCeValue::default();
    let s = unsafe {
        sar_anchor_ce_f64(
            z.as_ptr(),
            C,
            0.9,
            9,
            null_mut(),
            null_mut(),
            null_mut(),
            null_mut(),
            &mut v,
        )
    };
    assert_eq!(s, SarStatus::SarErrParam);
    assert!(message().contains("weights must be"));
    let s = unsafe {
        sar_anchor_ce_f64(
            null(),
            C,
            0.9,
            0,
            null_mut(),
            null_mut(),
            null_mut(),
            null_mut(),
            &mut v,
        )
    };
    assert_eq!(
        (s, message()),
        (
            SarStatus::SarErrNullPointer,
            "`logits` is a null pointer".into()
        )
    );
    let s = unsafe {
        sar_anchor_ce_f64(
            null(),
            0,
            0.9,
            0,
            null_mut(),
            null_mut(),
            null_mut(),
            null_mut(),
            &mut v,
        )
    };
    assert_eq!(s, SarStatus::SarErrShape);
}

#[test]
fn ema_both_gates_match_sar_math() {
    let (c, d) = (3, 2);
    let e = seq(c * d, 2);
    let s0 = seq(c * d, 3);
    let (mut want, mut wi) = (s0.clone(), true);
    ema::ema_update(&mut want, &mut wi, &e, c, d, 0.9, true).unwrap();
    let (mut got, mut gi, mut changed) = (s0.clone(), true, false);
    let s = unsafe {
        sar_ema_update_f64(
            got.as_mut_ptr(),
            &mut gi,
            e.as_ptr(),
            c,
            d,
            0.9,
            true,
            &mut changed,
        )
    };
    assert_eq!((s, got, gi, changed), (SarStatus::SarOk, want, wi, true));
    let pass = [true, false, true];
    let (mut want, mut wi) = (s0.clone(), vec![false, true, true]);
    let wn = ema::ema_update_per_class(&mut want, &mut wi, &e, c, d, 0.9, &pass).unwrap();
    let (mut got, mut gi, mut n) = (s0.clone(), vec![false, true, true], 0usize);
    let s = unsafe {
        sar_ema_update_per_class_f64(
            got.as_mut_ptr(),
            gi.as_mut_ptr(),
            e.as_ptr(),
            c,
            d,
            0.9,
            pass.as_ptr(),
            &mut n,
        )
    };
    assert_eq!((s, got, gi, n), (SarStatus::SarOk, want, wi, wn));
    // f32, alpha out of range
    let mut s32: Vec<f32> = s0.iter().map(|&x| x as f32).collect();
    let e32: Vec<f32> = e.iter().map(|&x| x as f32).collect();
    let mut i = false;
    let s = unsafe {
        sar_ema_update_f32(
            s32.as_mut_ptr(),
            &mut i,
            e32.as_ptr(),
            c,
            d,
            1.0,
            true,
            null_mut(),
        )
    };
    assert_eq!(s, SarStatus::SarErrParam);
    assert!(message().contains("alpha"), "{}", message());
    let s = unsafe {
        sar_ema_update_f32(
            s32.as_mut_ptr(),
            &mut i,
            e32.as_ptr(),
            c,
            d,
            0.5,
            true,
            null_mut(),
        )
    };
    assert_eq!(
        (s, &s32[..], i),
        (SarStatus::SarOk, &e32[..], true),
        "first pass copies E"
    );
}

#[test]
fn resample_p2a_prototypes_car_and_anchors_match_sar_math() {
    let l = labels();
    let f = seq(G.batch * G.channels * G.height * G.width, 4);
    let a = seq(C * G.channels, 5);
    // resample
    let mut want = vec![0i64; 2 * 3 * 2];
    resample::resample_labels_nearest(&l, 2, (5, 4), (3, 2), &mut want).unwrap();
    let mut got = vec![0i64; 12];
    let s = unsafe { sar_resample_labels_nearest_i64(l.as_ptr(), 2, 5, 4, 3, 2, got.as_mut_ptr()) };
    assert_eq!((s, got), (SarStatus::SarOk, want));
    assert_eq!(sar_nearest_source_index(26, 22, 11), 12);
    // p2a nchw, with and without class_active
    for active in [None, Some([true, false, true, true])] {
        let t = P2aTargets {
            anchors: &a,
            classes: C,
            ignore_index: 255,
            class_active: active.as_ref().map(|x| &x[..]),
        };
        let mut wg = vec![0.0; f.len()];
        let want = p2a_nchw(&f, &l, &geometry(), &t, Some(&mut wg)).unwrap();
        let (mut g, mut v) = (vec![0.0; f.len()], SarP2aValue::default());
        let ap = active.as_ref().map_or(null(), |x| x.as_ptr());
        let s = unsafe {
            sar_p2a_nchw_f64(
                f.as_ptr(),
                l.as_ptr(),
                G,
                a.as_ptr(),
                C,
                255,
                ap,
                g.as_mut_ptr(),
                &mut v,
            )
        };
        assert_eq!(
            (s, g, v.loss, v.valid),
            (SarStatus::SarOk, wg, want.loss, want.valid)
        );
    }
    // p2a rows and MixUp (f32)
    let rows = 5;
    let fr: Vec<f32> = seq(rows * G.channels, 6)
        .iter()
        .map(|&x| x as f32)
        .collect();
    let a32: Vec<f32> = a.iter().map(|&x| x as f32).collect();
    let (la, lb) = (vec![0i64, 1, 2, 3, 255], vec![3i64, 2, 1, 0, 255]);
    let t = P2aTargets {
        anchors: &a32,
        classes: C,
        ignore_index: 255,
        class_active: None,
    };
    let want = p2a_rows(&fr, RowLabels::Plain(&la), G.channels, &t, None).unwrap();
    let mut v = SarP2aValue::default();
    let s = unsafe {
        sar_p2a_rows_f32(
            fr.as_ptr(),
            rows,
            G.channels,
            la.as_ptr(),
            a32.as_ptr(),
            C,
            255,
            null(),
            null_mut(),
            &mut v,
        )
    };
    assert_eq!(
        (s, v.loss, v.valid),
        (SarStatus::SarOk, f64::from(want.loss), want.valid)
    );
    let mut wg = vec![0f32; fr.len()];
    let want = p2a_rows(
        &fr,
        RowLabels::Mixup {
            a: &la,
            b: &lb,
            lambda: 0.3,
        },
        G.channels,
        &t,
        Some(&mut wg),
    )
    .unwrap();
    let mut g = vec![0f32; fr.len()];
    let s = unsafe {
        sar_p2a_rows_mixup_f32(
            fr.as_ptr(),
            rows,
            G.channels,
            la.as_ptr(),
            lb.as_ptr(),
            0.3,
            a32.as_ptr(),
            C,
            255,
            null(),
            g.as_mut_ptr(),
            &mut v,
        )
    };
    assert_eq!((s, g, v.loss), (SarStatus::SarOk, wg, f64::from(want.loss)));
    // prototypes (counts given and null) and CAR
    let t = P2aTargets {
        anchors: &a,
        classes: C,
        ignore_index: 255,
        class_active: None,
    };
    let (mut wp, mut wc) = (vec![0.0; a.len()], vec![0u64; C]);
    prototype::class_prototypes(&f, &l, &geometry(), &t, &mut wp, &mut wc).unwrap();
    let (mut p, mut cnt) = (vec![0.0; a.len()], vec![0u64; C]);
    let s = unsafe {
        sar_class_prototypes_f64(
            f.as_ptr(),
            l.as_ptr(),
            G,
            a.as_ptr(),
            C,
            255,
            null(),
            p.as_mut_ptr(),
            cnt.as_mut_ptr(),
        )
    };
    assert_eq!((s, &p, cnt), (SarStatus::SarOk, &wp, wc));
    let mut p2 = vec![0.0; a.len()];
    let s = unsafe {
        sar_class_prototypes_f64(
            f.as_ptr(),
            l.as_ptr(),
            G,
            a.as_ptr(),
            C,
            255,
            null(),
            p2.as_mut_ptr(),
            null_mut(),
        )
    };
    assert_eq!((s, &p2), (SarStatus::SarOk, &wp));
    let tp = P2aTargets {
        anchors: &wp,
        classes: C,
        ignore_index: 255,
        class_active: None,
    };
    let mut wg = vec![0.0; f.len()];
    let want = prototype::car_intra_class(&f, &l, &geometry(), &tp, Some(&mut wg)).unwrap();
    let (mut g, mut loss) = (vec![0.0; f.len()], 0.0);
    let s = unsafe {
        sar_car_intra_class_f64(
            f.as_ptr(),
            l.as_ptr(),
            G,
            wp.as_ptr(),
            C,
            255,
            null(),
            g.as_mut_ptr(),
            &mut loss,
        )
    };
    assert_eq!((s, g, loss), (SarStatus::SarOk, wg, want));
    // anchors
    let mut want = vec![0.0; C * 5];
    sar_math::anchors::generate_anchors(sar_math::AnchorKind::Orthogonal, 7, C, 5, &mut want)
        .unwrap();
    let mut got = vec![0.0; C * 5];
    let s = unsafe { sar_generate_anchors_f64(SAR_ANCHORS_ORTHOGONAL, 7, C, 5, got.as_mut_ptr()) };
    assert_eq!((s, got), (SarStatus::SarOk, want));
    let s = unsafe { sar_generate_anchors_f32(3, 7, C, 5, null_mut()) };
    assert_eq!(s, SarStatus::SarErrParam);
}

#[test]
fn labels_out_of_range_lengths_and_zero_dims() {
    let mut l = labels();
    l[3] = 9;
    let f = seq(36, 4);
    let a = seq(C * 3, 5);
    let mut v = SarP2aValue::default();
    let s = unsafe {
        sar_p2a_nchw_f64(
            f.as_ptr(),
            l.as_ptr(),
            G,
            a.as_ptr(),
            C,
            255,
            null(),
            null_mut(),
            &mut v,
        )
    };
    assert_eq!(s, SarStatus::SarErrLabel);
    assert!(message().contains("label 9 at position 3"), "{}", message());
    // Zero batch: empty arrays may be null, and the loss is 0 over an empty Ω.
    let g0 = SarGeometry { batch: 0, ..G };
    let s = unsafe {
        sar_p2a_nchw_f64(
            null(),
            null(),
            g0,
            a.as_ptr(),
            C,
            255,
            null(),
            null_mut(),
            &mut v,
        )
    };
    assert_eq!((s, v.loss, v.valid), (SarStatus::SarOk, 0.0, 0));
    // Zero channels is a shape error, not a crash.
    let gd = SarGeometry { channels: 0, ..G };
    let s = unsafe {
        sar_p2a_nchw_f64(
            null(),
            l.as_ptr(),
            gd,
            null(),
            C,
            255,
            null(),
            null_mut(),
            &mut v,
        )
    };
    assert_eq!(s, SarStatus::SarErrShape);
    // Overflowing dims.
    let gx = SarGeometry {
        batch: usize::MAX,
        ..G
    };
    let s = unsafe {
        sar_p2a_nchw_f64(
            f.as_ptr(),
            l.as_ptr(),
            gx,
            a.as_ptr(),
            C,
            255,
            null(),
            null_mut(),
            &mut v,
        )
    };
    assert_eq!(s, SarStatus::SarErrOverflow);
    assert!(!message().is_empty());
}

#[test]
fn step_rows_global_mix_and_defaults() {
    let o = sar_options_default();
    assert_eq!(
        (o.tau, o.delta, o.alpha, o.lambda_p2a, o.ignore_index),
        (0.9, 0.8, 0.999, 0.1, 255)
    );
    let (c, d, n) = (2usize, 3usize, 4usize);
    let mut z = vec![0.0; c * c];
    z[0] = 8.0;
    z[3] = 8.0;
    let e = seq(c * d, 8);
    let f = seq(n * d, 9);
    let lab = [0i64, 1, 255, 1];
    let (fs, ls) = ([n, d], [n]);
    let (mut sem, mut init) = (vec![0.0; c * d], vec![true, false]);
    let (mut p, mut l, mut w, mut pass) =
        (vec![0.0; c], vec![0.0; c], vec![0.0; c], vec![false; c]);
    let mut r = SarStepReport::default();
    let call = |sem: &mut Vec<f64>,
                init: &mut Vec<bool>,
                p: &mut Vec<f64>,
                l: &mut Vec<f64>,
                w: &mut Vec<f64>,
                pass: &mut Vec<bool>,
                r: &mut SarStepReport| unsafe {
        sar_step_f64(
            &o,
            c,
            d,
            z.as_ptr(),
            e.as_ptr(),
            sem.as_mut_ptr(),
            init.as_mut_ptr(),
            f.as_ptr(),
            fs.as_ptr(),
            2,
            lab.as_ptr(),
            ls.as_ptr(),
            p.as_mut_ptr(),
            l.as_mut_ptr(),
            w.as_mut_ptr(),
            pass.as_mut_ptr(),
            null_mut(),
            null_mut(),
            r,
        )
    };
    let s = call(
        &mut sem, &mut init, &mut p, &mut l, &mut w, &mut pass, &mut r,
    );
    assert_eq!(s, SarStatus::SarErrParam);
    assert!(message().contains("global gate needs all flags equal"));
    init = vec![false, false];
    let s = call(
        &mut sem, &mut init, &mut p, &mut l, &mut w, &mut pass, &mut r,
    );
    assert_eq!(s, SarStatus::SarOk, "{}", message());
    assert!(
        r.gate_passed && init == [true, true] && sem == e && r.valid == 3,
        "{r:?}"
    );
}
