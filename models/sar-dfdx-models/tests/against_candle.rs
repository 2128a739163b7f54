//! The dfdx convolution, models and SAR head against candle: forward values and every
//! gradient, in f32, from identical weights.

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarMap;
use sar_dfdx::conv::{conv2d, nchw_to_rows, rows_to_nchw, ConvGeometry, GatherCache};
use sar_dfdx::dfdx::prelude::*;
use sar_dfdx::nn::{Params, SarHead, SarHeadConfig};
use sar_dfdx_models::{cross_entropy, one_hot, Arch, Classifier, Forward};
use sar_math::rng::SeededRng;

fn normals(seed: u64, n: usize) -> Vec<f32> {
    let mut r = SeededRng::new(seed);
    (0..n).map(|_| r.next_normal() as f32).collect()
}

/// `f` run on a rayon pool of `threads` threads (dfdx's CPU ops and ours use the current pool).
fn on_threads<R: Send>(threads: usize, f: impl FnOnce() -> R + Send) -> R {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .unwrap()
        .install(f)
}

/// |a − b| ≤ tol·(1 + max|b|) everywhere: the f32 error of sums grows with their scale.
fn assert_close(what: &str, got: &[f32], want: &[f32], tol: f32) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    let scale = 1.0 + want.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() <= tol * scale,
            "{what}[{i}]: dfdx {g}, candle {w} (scale {scale})"
        );
    }
}

#[test]
fn conv_matches_candle_forward_and_gradients() {
    let dev = Cpu::default();
    let cases = [
        // (n, cin, h, w, cout, k, stride, pad)
        (2, 3, 7, 5, 4, 3, 1, 1),
        (1, 4, 8, 8, 6, 3, 2, 1),
        (2, 2, 9, 6, 3, 3, 2, 0),
        (3, 5, 4, 4, 2, 1, 1, 0),
        (1, 3, 6, 7, 5, 1, 2, 0),
        (2, 3, 5, 5, 2, 5, 1, 2),
    ];
    for (case, &(n, cin, h, w, cout, k, stride, pad)) in cases.iter().enumerate() {
        let x = normals(100 + case as u64, n * cin * h * w);
        let wt = normals(200 + case as u64, cout * cin * k * k);
        // Upstream gradient: a fixed random weighting of the outputs, so every output matters.
        let geom = ConvGeometry {
            n,
            h,
            w,
            k,
            stride,
            pad,
        };
        let (oh, ow) = geom.out_hw().unwrap();
        let r = normals(300 + case as u64, n * cout * oh * ow);

        // candle
        let cdev = Device::Cpu;
        let xv = Var::from_vec(x.clone(), (n, cin, h, w), &cdev).unwrap();
        let wv = Var::from_vec(wt.clone(), (cout, cin, k, k), &cdev).unwrap();
        // sar-candle's CPU conv (what the candle trainer runs; candle 0.11's own conv backward
        // fails on strided inputs whose size the stride does not divide).
        let y =
            sar_candle::ops::conv::conv2d(xv.as_tensor(), wv.as_tensor(), stride, pad, 1).unwrap();
        assert_eq!(y.dims(), &[n, cout, oh, ow]);
        let rt = Tensor::from_vec(r.clone(), (n, cout, oh, ow), &cdev).unwrap();
        let loss = (&y * &rt).unwrap().sum_all().unwrap();
        let g = loss.backward().unwrap();
        let y_c: Vec<f32> = y.flatten_all().unwrap().to_vec1().unwrap();
        let gx_c: Vec<f32> = g
            .get(xv.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let gw_c: Vec<f32> = g
            .get(wv.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();

        // dfdx
        let mut cache = GatherCache::default();
        let xr = dev.tensor_from_vec(nchw_to_rows(&x, n, cin, h, w), (n * h * w, cin));
        let wd = dev.tensor_from_vec(wt.clone(), (wt.len(),));
        let mut grads = Gradients::leaky();
        grads.try_alloc_for(&wd).unwrap();
        let (yd, hw) = conv2d(
            &mut cache,
            xr.trace(grads),
            wd.retaped::<OwnedTape<f32, Cpu>>(),
            geom,
            cout,
        )
        .unwrap();
        assert_eq!(hw, (oh, ow));
        let y_d = rows_to_nchw(&yd.as_vec(), n, cout, oh, ow);
        let rr = dev.tensor_from_vec(nchw_to_rows(&r, n, cout, oh, ow), (n * oh * ow, cout));
        let gd = (yd * rr).sum::<Rank0, _>().backward();
        let gx_d = rows_to_nchw(&gd.get(&xr).as_vec(), n, cin, h, w);
        let gw_d = gd.get(&wd).as_vec();

        let what = format!("case {case}");
        assert_close(&format!("{what} output"), &y_d, &y_c, 2e-6);
        assert_close(&format!("{what} dL/dx"), &gx_d, &gx_c, 2e-6);
        assert_close(&format!("{what} dL/dw"), &gw_d, &gw_c, 2e-6);
    }
}

#[test]
fn conv_rejects_bad_geometry_without_panicking() {
    let dev = Cpu::default();
    let mut cache = GatherCache::default();
    let x: sar_dfdx::nn::Rows<Cpu, NoneTape> = dev.zeros_like(&(4, 2));
    let w = dev.zeros_like(&(18,));
    let geom = ConvGeometry {
        n: 1,
        h: 2,
        w: 2,
        k: 3,
        stride: 1,
        pad: 0,
    };
    assert!(
        conv2d(&mut cache, x.clone(), w.clone(), geom, 1).is_err(),
        "kernel larger than the input"
    );
    let geom = ConvGeometry {
        n: 1,
        h: 2,
        w: 2,
        k: 3,
        stride: 1,
        pad: 1,
    };
    assert!(
        conv2d(&mut cache, x.clone(), w, geom, 2).is_err(),
        "weight size for 2 outputs is 36"
    );
    // The kernel matrix must have K·K·Cin = 18 rows, on both paths.
    use sar_dfdx::conv::{conv_rows_generic, ConvKernel};
    let kernel: sar_dfdx::nn::Rows<Cpu, NoneTape> = dev.zeros_like(&(17, 3));
    let err = conv_rows_generic(&mut cache, x.clone(), kernel.clone(), geom).unwrap_err();
    assert!(err.to_string().contains("[17, 3]"), "{err}");
    let err = <Cpu as ConvKernel<f32>>::conv_rows(&mut cache, x, kernel, geom).unwrap_err();
    assert!(err.to_string().contains("[17, 3]"), "{err}");
}

/// Every variable of a candle varmap as dfdx parameters.
fn params_from(varmap: &VarMap) -> Params<Cpu> {
    let data = varmap.data().lock().unwrap();
    let entries: Vec<_> = data
        .iter()
        .map(|(n, v)| {
            let t = v.as_tensor();
            (
                n.clone(),
                t.dims().to_vec(),
                t.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            )
        })
        .collect();
    Params::from_host(&Cpu::default(), entries).unwrap()
}

/// Features `[N, D]` of NCHW images on dfdx in training mode, traced with every variable's
/// gradient allocated.
fn dfdx_features(
    params: &mut Params<Cpu>,
    arch: Arch,
    x: &[f32],
    (n, c, h, w): (usize, usize, usize, usize),
) -> sar_dfdx::nn::Rows<Cpu, OwnedTape<f32, Cpu>> {
    let dev = Cpu::default();
    let xr = dev.tensor_from_vec(nchw_to_rows(x, n, c, h, w), (n * h * w, c));
    let traced = xr.traced(params.alloc_grads().unwrap());
    let mut cache = GatherCache::default();
    let mut f = Forward {
        params,
        cache: &mut cache,
        train: true,
    };
    Classifier::new(arch)
        .unwrap()
        .features(&mut f, traced, (n, h, w))
        .unwrap()
}

/// One training forward/backward of a whole network on both backends: logits, the loss, the
/// gradient of every parameter and the updated running statistics agree.
fn model_matches(
    arch: sar_models::Arch,
    dfdx_arch: Arch,
    (n, c, h, w): (usize, usize, usize, usize),
    classes: usize,
) {
    let varmap = VarMap::new();
    let spec = sar_models::ModelSpec {
        arch,
        stem: sar_models::Stem::Cifar,
        in_channels: c,
        classes,
        seed: 7,
        init: Default::default(),
    };
    let model = sar_models::build(&spec, &varmap, &Device::Cpu, DType::F32).unwrap();
    let mut params = params_from(&varmap);
    let x = normals(1, n * c * h * w);
    let y: Vec<i64> = (0..n as i64).map(|i| i % classes as i64).collect();

    // candle, training mode
    let xt = Tensor::from_vec(x.clone(), (n, c, h, w), &Device::Cpu).unwrap();
    let logits_c = model.forward(&xt, true).unwrap();
    let yt = Tensor::from_vec(y.clone(), n, &Device::Cpu).unwrap();
    let loss_c = candle_nn::loss::cross_entropy(&logits_c, &yt).unwrap();
    let grads_c = loss_c.backward().unwrap();

    // dfdx, training mode
    let dev = Cpu::default();
    let net = Classifier::new(dfdx_arch).unwrap();
    let mut cache = GatherCache::default();
    let xr = dev.tensor_from_vec(nchw_to_rows(&x, n, c, h, w), (n * h * w, c));
    let feats = dfdx_features(&mut params, dfdx_arch, &x, (n, c, h, w));
    let logits_d = net.classify(&params, feats).unwrap();
    let logits_host = logits_d.as_vec();
    let loss_d = cross_entropy(logits_d, one_hot(&y, classes).unwrap()).unwrap();
    let loss_value = loss_d.as_vec()[0];
    let grads_d = loss_d.backward();

    let lc: Vec<f32> = logits_c.flatten_all().unwrap().to_vec1().unwrap();
    assert_close("logits", &logits_host, &lc, 1e-4);
    let lv: f32 = loss_c.to_scalar().unwrap();
    assert!(
        (loss_value - lv).abs() < 1e-4 * (1.0 + lv.abs()),
        "loss {loss_value} vs {lv}"
    );
    let data = varmap.data().lock().unwrap();
    let mut checked = 0;
    for (name, var) in data.iter() {
        if sar_dfdx::nn::is_running_stat(name) {
            let want: Vec<f32> = var.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
            assert_close(
                &format!("{name} after the step"),
                &params.get(name).unwrap().as_vec(),
                &want,
                1e-4,
            );
            continue;
        }
        let want: Vec<f32> = grads_c
            .get(var.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let got = params.gradient(&grads_d, name).unwrap();
        assert_close(&format!("dL/d{name}"), &got, &want, 2e-4);
        checked += 1;
    }
    assert!(checked > 5);
    drop(data);

    // Evaluation mode uses the running statistics on both sides.
    let logits_c = model.forward(&xt, false).unwrap();
    let mut f = Forward {
        params: &mut params,
        cache: &mut cache,
        train: false,
    };
    let feats = net.features(&mut f, xr.clone(), (n, h, w)).unwrap();
    let logits_d = net.classify(&params, feats).unwrap();
    let lc: Vec<f32> = logits_c.flatten_all().unwrap().to_vec1().unwrap();
    assert_close("eval logits", &logits_d.as_vec(), &lc, 1e-4);
}

#[test]
fn small_cnn_matches_candle() {
    model_matches(sar_models::Arch::SmallCnn, Arch::SmallCnn, (4, 1, 8, 8), 10);
}

#[test]
fn cnn_pool_matches_candle() {
    // 11×11 inputs: the pools floor 11 → 5 and 5 → 2 (an odd row and column dropped each time).
    model_matches(sar_models::Arch::CnnPool, Arch::CnnPool, (3, 1, 11, 11), 10);
    model_matches(sar_models::Arch::CnnPool, Arch::CnnPool, (2, 1, 28, 28), 10);
}

#[test]
fn resnet32_matches_candle() {
    // Odd 9×9 inputs exercise the option-A subsampling of odd sizes (5×5, then 3×3).
    model_matches(
        sar_models::Arch::ResNet32,
        Arch::CifarResNet { depth: 32 },
        (3, 3, 9, 9),
        5,
    );
}

#[test]
fn sar_head_matches_candle() {
    use sar_candle::{CandleBackend, EmbeddingKind};
    let (n, c, h, w, classes) = (6, 1, 8, 8, 4);
    let varmap = VarMap::new();
    let spec = sar_models::ModelSpec {
        arch: sar_models::Arch::SmallCnn,
        stem: sar_models::Stem::Cifar,
        in_channels: c,
        classes,
        seed: 3,
        init: Default::default(),
    };
    let model = sar_models::build(&spec, &varmap, &Device::Cpu, DType::F32).unwrap();
    let cfg = sar_math::SarConfig::default();
    let head_cfg = sar_candle::SarHeadConfig::new(cfg, classes, 128)
        .kind(EmbeddingKind::Classification)
        .anchor_kind(sar_math::anchors::AnchorKind::Normal)
        .seed(3);
    let mut head_c = sar_candle::SarHead::new(
        &varmap,
        CandleBackend::new(Device::Cpu, DType::F32).unwrap(),
        &head_cfg,
    )
    .unwrap();
    // A classifier that separates the embedded anchors (fc rows = 10·E), so the gate passes
    // and L_p2a is compared too.
    let e = head_c.embed().unwrap();
    varmap.data().lock().unwrap()["fc.weight"]
        .set(&(e * 10.0).unwrap())
        .unwrap();
    let mut params = params_from(&varmap);
    let anchors: Vec<f32> = head_c.buffers().unwrap()[0]
        .1
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let mut head_d = SarHead::new(
        &Cpu::default(),
        &SarHeadConfig::new(cfg, classes, 128),
        anchors,
    )
    .unwrap();

    let x = normals(5, n * c * h * w);
    let y: Vec<i64> = vec![0, 1, 2, 3, 1, 255];
    let xt = Tensor::from_vec(x.clone(), (n, c, h, w), &Device::Cpu).unwrap();
    let feats_c = model.features(&xt, true).unwrap();
    let yt = Tensor::from_vec(y.clone(), n, &Device::Cpu).unwrap();
    let classify = |e: &Tensor| model.classify(e);
    let s_c = head_c.step(&classify, &feats_c, &yt).unwrap();
    let grads_c = s_c.loss.backward().unwrap();

    let feats = dfdx_features(&mut params, Arch::SmallCnn, &x, (n, c, h, w));
    let s_d = head_d.step(&params, feats, &y, None).unwrap();
    assert_eq!(s_d.gate_passed, s_c.gate_passed);
    assert!(s_d.gate_passed);
    assert_eq!(s_d.valid, s_c.valid);
    assert_eq!(s_d.valid, 5);
    assert!((s_d.loss_aux - s_c.loss_aux).abs() < 1e-5 * (1.0 + s_c.loss_aux.abs()));
    assert!((s_d.loss_p2a - s_c.loss_p2a).abs() < 1e-5 * (1.0 + s_c.loss_p2a.abs()));
    assert!(s_d.loss_p2a > 0.0);
    let grads_d = s_d.loss.backward();
    let data = varmap.data().lock().unwrap();
    for (name, var) in data.iter() {
        if sar_dfdx::nn::is_running_stat(name) {
            continue;
        }
        let want: Vec<f32> = match grads_c.get(var.as_tensor()) {
            Some(g) => g.flatten_all().unwrap().to_vec1().unwrap(),
            None => vec![0.0; var.elem_count()],
        };
        assert_close(
            &format!("dL/d{name}"),
            &params.gradient(&grads_d, name).unwrap(),
            &want,
            2e-4,
        );
    }
    let sem_c: Vec<f32> = head_c
        .semantic_anchors()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    assert_close("semantic anchors", &head_d.buffers()[1].2, &sem_c, 1e-5);
}

/// The CPU convolution op against dfdx's generic path (gather + matmul, what CUDA runs), in
/// f64: outputs, the input gradient (which also has another contribution) and the kernel
/// gradient agree to rounding. The batches of 17 and 20 images split unevenly into the
/// kernel's 16 gradient groups.
#[test]
fn cpu_conv_kernel_matches_the_generic_path() {
    use sar_dfdx::conv::{conv_rows_generic, ConvKernel};
    let dev = Cpu::default();
    for (case, &(n, c, h, w, k, stride, pad, cout)) in [
        (2, 3, 7, 5, 3, 1, 1, 4),
        (1, 4, 8, 8, 3, 2, 1, 3),
        (2, 2, 9, 6, 3, 2, 0, 5),
        (3, 5, 4, 4, 1, 1, 0, 2),
        (2, 3, 5, 5, 5, 1, 2, 3),
        (17, 2, 5, 4, 3, 2, 1, 3),
        (20, 3, 6, 6, 3, 1, 1, 2),
    ]
    .iter()
    .enumerate()
    {
        let geom = ConvGeometry {
            n,
            h,
            w,
            k,
            stride,
            pad,
        };
        let (oh, ow) = geom.out_hw().unwrap();
        let m = n * oh * ow;
        let f64s = |seed: u64, len: usize| -> Vec<f64> {
            normals(seed, len).into_iter().map(f64::from).collect()
        };
        let x = dev.tensor_from_vec(f64s(400 + case as u64, n * h * w * c), (n * h * w, c));
        let kmat =
            dev.tensor_from_vec(f64s(450 + case as u64, k * k * c * cout), (k * k * c, cout));
        let r = dev.tensor_from_vec(f64s(500 + case as u64, m * cout), (m, cout));
        let s = dev.tensor_from_vec(f64s(600 + case as u64, n * h * w * c), (n * h * w, c));
        let run = |generic: bool| {
            let mut cache = GatherCache::default();
            let t = x.leaky_trace();
            let other = (t.retaped::<OwnedTape<f64, Cpu>>() * s.clone()).sum::<Rank0, _>();
            let kt = kmat.retaped::<OwnedTape<f64, Cpu>>();
            let y = if generic {
                conv_rows_generic(&mut cache, t, kt, geom).unwrap()
            } else {
                <Cpu as ConvKernel<f64>>::conv_rows(&mut cache, t, kt, geom).unwrap()
            };
            let values = y.as_vec();
            let g = ((y * r.clone()).sum::<Rank0, _>() + other).backward();
            (values, g.get(&x).as_vec(), g.get(&kmat).as_vec())
        };
        let (yg, gxg, gkg) = run(true);
        let (yc, gxc, gkc) = run(false);
        for (what, got, want) in [
            ("output", &yc, &yg),
            ("dL/dx", &gxc, &gxg),
            ("dL/dW'", &gkc, &gkg),
        ] {
            assert_eq!(got.len(), want.len(), "case {case}: {what} length");
            let scale = 1.0 + want.iter().fold(0.0f64, |a, v| a.max(v.abs()));
            for (i, (g, w)) in got.iter().zip(want.iter()).enumerate() {
                assert!(
                    (g - w).abs() <= 1e-12 * scale,
                    "case {case}: {what}[{i}]: CPU op {g}, generic {w}"
                );
            }
        }
    }
}

/// The CPU convolution op is deterministic: the same inputs give bit-identical outputs and
/// gradients on a 1-thread and a 2-thread pool (resumed runs rely on it).
#[test]
fn cpu_conv_kernel_does_not_depend_on_the_thread_count() {
    let geom = ConvGeometry {
        n: 33,
        h: 6,
        w: 6,
        k: 3,
        stride: 1,
        pad: 1,
    };
    let (c, cout) = (4, 5);
    let run = |threads: usize| {
        on_threads(threads, || {
            let dev = Cpu::default();
            let x = dev.tensor_from_vec(normals(1, 33 * 36 * c), (33 * 36, c));
            let wt = dev.tensor_from_vec(normals(2, cout * c * 9), (cout * c * 9,));
            let r = dev.tensor_from_vec(normals(3, 33 * 36 * cout), (33 * 36, cout));
            let mut cache = GatherCache::default();
            let (y, _) = conv2d(&mut cache, x.leaky_trace(), wt.retaped(), geom, cout).unwrap();
            let values = y.as_vec();
            let g = (y * r).sum::<Rank0, _>().backward();
            (values, g.get(&x).as_vec(), g.get(&wt).as_vec())
        })
    };
    assert_eq!(run(1), run(2));
}

/// The CPU BatchNorm op against dfdx's generic composition, in f64, with and without ReLU:
/// output, batch statistics and the gradients of x (which has another contribution), γ and β
/// agree to rounding. 70 rows split unevenly into the op's blocks.
#[test]
fn cpu_batch_norm_matches_the_generic_path() {
    use sar_dfdx::norm::{batch_norm_train_generic, BatchNormKernel};
    let dev = Cpu::default();
    let f64s = |seed: u64, len: usize| -> Vec<f64> {
        normals(seed, len).into_iter().map(f64::from).collect()
    };
    for (case, &(r, c, relu)) in [(70, 3, false), (70, 3, true), (1, 4, true), (5, 1, false)]
        .iter()
        .enumerate()
    {
        let seed = 700 + 10 * case as u64;
        // Shifted and scaled inputs: the statistics are not the trivial ones.
        let xv: Vec<f64> = f64s(seed, r * c).iter().map(|v| 3.0 * v + 1.5).collect();
        let x = dev.tensor_from_vec(xv, (r, c));
        let gamma = dev.tensor_from_vec(f64s(seed + 1, c), (c,));
        let beta = dev.tensor_from_vec(f64s(seed + 2, c), (c,));
        let weights = dev.tensor_from_vec(f64s(seed + 3, r * c), (r, c));
        let s = dev.tensor_from_vec(f64s(seed + 4, r * c), (r, c));
        let run = |generic: bool| {
            let t = x.leaky_trace();
            let other = (t.retaped::<OwnedTape<f64, Cpu>>() * s.clone()).sum::<Rank0, _>();
            let (g, b) = (gamma.retaped(), beta.retaped());
            let (y, mean, var) = if generic {
                batch_norm_train_generic(t, g, b, 1e-5, relu).unwrap()
            } else {
                <Cpu as BatchNormKernel<f64>>::batch_norm_train(t, g, b, 1e-5, relu).unwrap()
            };
            let values = y.as_vec();
            let grads = ((y * weights.clone()).sum::<Rank0, _>() + other).backward();
            [
                values,
                mean,
                var,
                grads.get(&x).as_vec(),
                grads.get(&gamma).as_vec(),
                grads.get(&beta).as_vec(),
            ]
        };
        let (want, got) = (run(true), run(false));
        for (what, (g, w)) in ["y", "mean", "var", "dL/dx", "dL/dγ", "dL/dβ"]
            .iter()
            .zip(got.iter().zip(&want))
        {
            assert_eq!(g.len(), w.len(), "case {case}: {what} length");
            let scale = 1.0 + w.iter().fold(0.0f64, |a, v| a.max(v.abs()));
            for (i, (a, b)) in g.iter().zip(w).enumerate() {
                assert!(
                    (a - b).abs() <= 1e-11 * scale,
                    "case {case}: {what}[{i}]: CPU op {a}, generic {b}"
                );
            }
        }
    }
}

/// The CPU BatchNorm op: bit-identical on 1 and 2 threads, a NaN input reaches the output
/// through the ReLU (the trainer's NaN check must see it), and a channel-count mismatch is an
/// error.
#[test]
fn cpu_batch_norm_is_deterministic_keeps_nan_and_checks_shapes() {
    use sar_dfdx::norm::BatchNormKernel;
    let (r, c) = (301, 5);
    let run = |threads: usize, poison: bool| {
        on_threads(threads, || {
            let dev = Cpu::default();
            let mut xv = normals(11, r * c);
            if poison {
                xv[7] = f32::NAN;
            }
            let x = dev.tensor_from_vec(xv, (r, c));
            let gamma = dev.tensor_from_vec(normals(12, c), (c,));
            let beta = dev.tensor_from_vec(normals(13, c), (c,));
            let w = dev.tensor_from_vec(normals(14, r * c), (r, c));
            let (y, _, _) = <Cpu as BatchNormKernel<f32>>::batch_norm_train(
                x.leaky_trace(),
                gamma.retaped(),
                beta.retaped(),
                1e-5,
                true,
            )
            .unwrap();
            let values = y.as_vec();
            let g = (y * w).sum::<Rank0, _>().backward();
            (values, g.get(&x).as_vec(), g.get(&gamma).as_vec())
        })
    };
    let one = run(1, false);
    assert_eq!(one, run(2, false));
    let (poisoned, _, _) = run(2, true);
    // Channel 7 % 5 = 2 has a NaN mean: its whole column is NaN, the others are untouched.
    assert!((0..r).all(|i| poisoned[i * c + 2].is_nan()));
    assert!(poisoned
        .iter()
        .enumerate()
        .all(|(i, v)| i % c == 2 || v.to_bits() == one.0[i].to_bits()));
    let dev = Cpu::default();
    let x = dev.tensor_from_vec(vec![0f32; 12], (4, 3));
    let short = dev.tensor_from_vec(vec![1f32; 2], (2,));
    let err = <Cpu as BatchNormKernel<f32>>::batch_norm_train(x, short.clone(), short, 1e-5, false)
        .unwrap_err();
    assert!(err.to_string().contains("[4, 3]"), "{err}");
    for (rows, channels) in [(0, 3), (4, 0)] {
        let x = dev.tensor_from_vec(vec![0f32; rows * channels], (rows, channels));
        let p = dev.tensor_from_vec(vec![1f32; channels], (channels,));
        let err = <Cpu as BatchNormKernel<f32>>::batch_norm_train(x, p.clone(), p, 1e-5, true)
            .unwrap_err();
        assert!(err.to_string().contains("empty"), "{err}");
    }
}
