//! `sar bench`: one SAR step, forward and backward, per backend, beside a memory copy of the
//! feature bytes measured in the same run.
//!
//! Workloads (the shapes the PyTorch peer timed, see `docs/results/2026-11-26-bench-cpu.txt`):
//! - **seg**: Cityscapes/HRNet scale, f32 features `[2, 720, 128, 256]`, labels `[2, 512, 1024]`
//!   (random classes, the top 40 rows ignored), C = 19;
//! - **cls**: CIFAR scale, f32 features `[128, 64]`, labels `[128]`, C = 100.
//!
//! Whole training steps: **resnet32** (ResNet-32 b128 ± SAR, candle and dfdx), **seg-step**
//! (FCN-R18-D8 b2 512² ± SAR) and **seg-models** ([`seg_models`]: OCRNet, SegFormer, UPerNet
//! at b2 256² ± SAR, beside the PyTorch peer's step when one is given).
//!
//! A step is L_aux (with dL/dZ), the gate, the EMA, and λ2·L_p2a with dL/dF materialised:
//! ndarray and the candle fused op get the gradient from the fused kernel, candle's composite
//! path from autograd. Anchor logits are N(0,1) plus 12·I, so that the gate passes and p2a runs
//! on every step (the peer adds 8·I and applies p2a whether or not its gate passes). The floor is reading the features and writing their gradient once,
//! which is what the copy moves.

mod peer;
pub mod seg_models;

use crate::config::BackendKind;
pub use peer::Rusage;

use candle_core::{DType, Device, Tensor, Var};
use ndarray::{ArrayD, IxDyn};
use rayon::prelude::*;
use sar_candle::{CandleBackend, Kernels};
use sar_math::backend::{BackendSarState, SarBackend};
use sar_math::rng::SeededRng;
use sar_math::SarConfig;
use sar_ndarray::NdarrayBackend;
use std::cell::RefCell;
use std::path::Path;
use std::rc::Rc;
use std::time::Instant;

/// One workload's host data.
pub struct Workload {
    /// Name (`seg` or `cls`).
    pub name: &'static str,
    /// Feature shape.
    pub feature_shape: Vec<usize>,
    /// Label shape.
    pub label_shape: Vec<usize>,
    /// C.
    pub classes: usize,
    /// Features (f32 values held as f64 for the backends' host constructors).
    pub features: Vec<f32>,
    /// Labels.
    pub labels: Vec<i64>,
    /// Z, `[C, C]`.
    pub logits: Vec<f64>,
    /// E, `[C, D]`.
    pub embedded: Vec<f64>,
}

impl Workload {
    /// The Cityscapes/HRNet-scale segmentation step.
    pub fn seg() -> Self {
        Self::build("seg", vec![2, 720, 128, 256], vec![2, 512, 1024], 19, 40)
    }
    /// The CIFAR-scale classification step.
    pub fn cls() -> Self {
        Self::build("cls", vec![128, 64], vec![128], 100, 0)
    }
    fn build(
        name: &'static str,
        feature_shape: Vec<usize>,
        label_shape: Vec<usize>,
        classes: usize,
        ignored_rows: usize,
    ) -> Self {
        let mut rng = SeededRng::new(7);
        let d = feature_shape[1];
        let n: usize = feature_shape.iter().product();
        let features = (0..n).map(|_| rng.next_f64() as f32).collect();
        let width = *label_shape.last().unwrap();
        let rows_per_image = if label_shape.len() == 3 {
            label_shape[1]
        } else {
            1
        };
        let labels = (0..label_shape.iter().product::<usize>())
            .map(|i| {
                if (i / width) % rows_per_image < ignored_rows {
                    255
                } else {
                    (rng.next_u64() % classes as u64) as i64
                }
            })
            .collect();
        let mut logits: Vec<f64> = (0..classes * classes).map(|_| rng.next_normal()).collect();
        for c in 0..classes {
            logits[c * classes + c] += 12.0;
        }
        let embedded = (0..classes * d).map(|_| rng.next_f64()).collect();
        Workload {
            name,
            feature_shape,
            label_shape,
            classes,
            features,
            labels,
            logits,
            embedded,
        }
    }
    /// Bytes read and written by the floor (features in, gradient out).
    pub fn floor_bytes(&self) -> usize {
        2 * self.features.len() * std::mem::size_of::<f32>()
    }
}

/// Median seconds of `reps` runs of `f` after `warmup` runs.
pub fn median_secs(
    warmup: usize,
    reps: usize,
    mut f: impl FnMut() -> anyhow::Result<()>,
) -> anyhow::Result<f64> {
    for _ in 0..warmup {
        f()?;
    }
    let mut t = Vec::with_capacity(reps);
    for _ in 0..reps {
        let s = Instant::now();
        f()?;
        t.push(s.elapsed().as_secs_f64());
    }
    t.sort_by(f64::total_cmp);
    Ok(t[t.len() / 2])
}

/// One measured line of the table.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BenchRow {
    /// Workload name.
    pub workload: String,
    /// What ran.
    pub variant: String,
    /// Median seconds.
    pub seconds: f64,
    /// Floor bytes / seconds, in GB/s.
    pub gb_per_s: f64,
}

fn row(w: &Workload, variant: &str, seconds: f64) -> BenchRow {
    BenchRow {
        workload: w.name.into(),
        variant: variant.into(),
        seconds,
        gb_per_s: w.floor_bytes() as f64 / seconds / 1e9,
    }
}

/// A prepared step: call it to run one SAR step (forward and backward).
pub type Runner = Box<dyn FnMut() -> anyhow::Result<()>>;

/// The ndarray step on `w` (fused kernel, analytic gradients).
pub fn ndarray_runner(w: &Workload) -> anyhow::Result<Runner> {
    let b = NdarrayBackend::<f32>::new();
    let features = ArrayD::from_shape_vec(IxDyn(&w.feature_shape), w.features.clone())?;
    let labels = b.labels(&w.label_shape, &w.labels)?;
    let z = b.tensor(&[w.classes, w.classes], &w.logits)?;
    let d = w.feature_shape[1];
    let e = b.tensor(&[w.classes, d], &w.embedded)?;
    let mut state = BackendSarState::new(
        SarConfig::default(),
        w.classes,
        ArrayD::zeros(IxDyn(&[w.classes, d])),
    )?;
    Ok(Box::new(move || {
        let s = state.step(&b, &z, &e, &features, &labels)?;
        anyhow::ensure!(
            s.p2a.is_some(),
            "the gate did not pass: no p2a was measured"
        );
        Ok(())
    }))
}

/// The candle CPU step on `w` with `kernels`, gradients from candle's backward.
pub fn candle_runner(w: &Workload, kernels: Kernels) -> anyhow::Result<Runner> {
    let b = CandleBackend::new(Device::Cpu, DType::F32)?.with_kernels(kernels);
    let features = Var::from_tensor(&Tensor::from_slice(
        &w.features,
        w.feature_shape.as_slice(),
        &Device::Cpu,
    )?)?;
    let features = features.as_tensor().clone();
    let labels = b.labels(&w.label_shape, &w.labels)?;
    let z = b.tensor(&[w.classes, w.classes], &w.logits)?;
    let d = w.feature_shape[1];
    let e = b.tensor(&[w.classes, d], &w.embedded)?;
    let mut state = BackendSarState::new(
        SarConfig::default(),
        w.classes,
        Tensor::zeros((w.classes, d), DType::F32, &Device::Cpu)?,
    )?;
    let lambda1 = state.config.lambda_aux;
    Ok(Box::new(move || {
        let s = state.step(&b, &z, &e, &features, &labels)?;
        let p2a = s
            .p2a
            .ok_or_else(|| anyhow::anyhow!("the gate did not pass: no p2a was measured"))?;
        let total = ((s.aux.loss * lambda1)? + p2a.loss)?;
        let grads = total.backward()?;
        anyhow::ensure!(grads.get(&features).is_some(), "no feature gradient");
        Ok(())
    }))
}

/// Runs every variant on `w` and returns the rows.
pub fn run_workload(w: &Workload, reps: usize) -> anyhow::Result<Vec<BenchRow>> {
    let src = &w.features;
    let mut dst = vec![0f32; src.len()];
    let threads = rayon::current_num_threads();
    let chunk = src.len().div_ceil(threads).max(1);
    let copy1 = median_secs(2, reps, || {
        dst.copy_from_slice(std::hint::black_box(src));
        Ok(())
    })?;
    let copy_all = median_secs(2, reps, || {
        dst.par_chunks_mut(chunk)
            .zip(src.par_chunks(chunk))
            .for_each(|(d, s)| d.copy_from_slice(s));
        Ok(())
    })?;
    Ok(vec![
        row(w, "memcpy, 1 thread", copy1),
        row(w, &format!("memcpy, {threads} threads"), copy_all),
        row(
            w,
            "ndarray (fused kernel)",
            median_secs(2, reps, ndarray_runner(w)?)?,
        ),
        row(
            w,
            "candle CPU, fused op",
            median_secs(2, reps, candle_runner(w, Kernels::Auto)?)?,
        ),
        row(
            w,
            "candle CPU, composite ops",
            median_secs(2, reps, candle_runner(w, Kernels::Composite)?)?,
        ),
    ])
}

/// Formats rows as a table with ratios to the all-thread copy (the floor) and to the fused
/// ndarray step.
pub fn table(rows: &[BenchRow]) -> String {
    let mut out = format!(
        "{:<5} {:<28} {:>11} {:>9} {:>9} {:>9}\n",
        "work", "variant", "median ms", "GB/s", "x floor", "x fused"
    );
    for r in rows {
        let floor = rows.iter().find(|x| {
            x.workload == r.workload
                && x.variant.starts_with("memcpy")
                && !x.variant.contains("1 thread")
        });
        let fused = rows
            .iter()
            .find(|x| x.workload == r.workload && x.variant.starts_with("ndarray"));
        let ratio = |o: Option<&BenchRow>| {
            o.map_or("-".to_string(), |o| format!("{:.2}", r.seconds / o.seconds))
        };
        out += &format!(
            "{:<5} {:<28} {:>11.3} {:>9.2} {:>9} {:>9}\n",
            r.workload,
            r.variant,
            r.seconds * 1e3,
            r.gb_per_s,
            ratio(floor),
            ratio(fused)
        );
    }
    out
}

/// One ResNet-32 training step on a CIFAR-100 batch of 128 (forward with BatchNorm in training
/// mode, cross-entropy, with SAR's λ1·L_aux + λ2·L_p2a when `sar`, backward, SGD), the peer's
/// `resnet32_step` workload. Random images; the SAR head's classifier is the model's `fc`.
pub fn resnet32_runner(sar: bool, batch: usize) -> anyhow::Result<Runner> {
    cls_step_runner(&ClsStep::resnet32(batch), sar)
}

/// A classification training step to time: the `[model]` table, the images' shape, the
/// classes, the batch, and the seed of its random batch.
pub struct ClsStep {
    /// `[model]` keys, e.g. `arch = "resnet18"\nstem = "imagenet"`.
    pub model: &'static str,
    /// Channels, height, width.
    pub shape: (usize, usize, usize),
    /// Classes.
    pub classes: usize,
    /// Images per batch.
    pub batch: usize,
    /// Seed of the random images and labels.
    pub seed: u64,
}

impl ClsStep {
    /// ResNet-32 on CIFAR-100 images.
    pub fn resnet32(batch: usize) -> Self {
        ClsStep {
            model: "arch = \"resnet32\"",
            shape: (3, 32, 32),
            classes: 100,
            batch,
            seed: 11,
        }
    }

    /// ResNet-18 with the ImageNet stem on CUB-200's 224×224 crops.
    pub fn resnet18_cub(batch: usize) -> Self {
        ClsStep {
            model: "arch = \"resnet18\"\nstem = \"imagenet\"",
            shape: (3, 224, 224),
            classes: 200,
            batch,
            seed: 12,
        }
    }

    /// The config and the candle setup (seeded weights and SAR head) of this step.
    pub(crate) fn setup(
        &self,
        sar: bool,
    ) -> anyhow::Result<(crate::config::TrainConfig, crate::cls::Setup)> {
        let text = format!(
            "[data]\ndataset = \"digits\"\n[model]\n{}\n[sar]\nenabled = {sar}\n",
            self.model
        );
        let cfg = crate::config::parse(&text, &[])?;
        let setup = crate::cls::build(&cfg, self.shape.0, self.classes)?;
        Ok((cfg, setup))
    }

    /// Random images (NCHW, host) and labels of one batch.
    pub(crate) fn batch_data(&self) -> (Vec<f32>, Vec<i64>) {
        let (c, h, w) = self.shape;
        let mut rng = SeededRng::new(self.seed);
        let x: Vec<f32> = (0..self.batch * c * h * w)
            .map(|_| rng.next_normal() as f32)
            .collect();
        let y = (0..self.batch)
            .map(|_| (rng.next_u64() % self.classes as u64) as i64)
            .collect();
        (x, y)
    }
}

/// One training step of `step` on candle (see [`resnet32_runner`]).
pub fn cls_step_runner(step: &ClsStep, sar: bool) -> anyhow::Result<Runner> {
    let (_, setup) = step.setup(sar)?;
    let (x, y) = step.batch_data();
    let (c, h, w) = step.shape;
    let x = Tensor::from_vec(x, (step.batch, c, h, w), &Device::Cpu)?;
    let y = Tensor::from_vec(y, step.batch, &Device::Cpu)?;
    let vars = setup.varmap.all_vars();
    let mut opt = crate::optim::Sgd::new(vars, 0.1, 0.9, 5e-4, false);
    let crate::cls::Setup {
        model, mut head, ..
    } = setup;
    Ok(Box::new(move || {
        let feats = model.features(&x, true)?;
        let mut loss = candle_nn::loss::cross_entropy(&model.classify(&feats)?, &y)?;
        if let Some(h) = head.as_mut() {
            let s = h.step(&|e| model.classify(e), &feats, &y)?;
            loss = (loss + s.loss)?;
        }
        let grads = loss.backward()?;
        opt.step(&grads)?;
        Ok(())
    }))
}

/// SAR's part of a ResNet-32 step alone: [`sar_candle::SarHead::step`] with ResNet-32's `fc`
/// on fixed `[128, 64]` features, and the backward of its loss.
pub fn sar_head_runner() -> anyhow::Result<Runner> {
    let cfg = crate::config::parse(
        "[data]\ndataset = \"digits\"\n[model]\narch = \"resnet32\"\n",
        &[],
    )?;
    let setup = crate::cls::build(&cfg, 3, 100)?;
    let mut head = setup.head.ok_or_else(|| anyhow::anyhow!("SAR is off"))?;
    let model = setup.model;
    let mut rng = SeededRng::new(12);
    let f: Vec<f32> = (0..128 * 64).map(|_| rng.next_normal() as f32).collect();
    let feats = Var::from_tensor(&Tensor::from_vec(f, (128, 64), &Device::Cpu)?)?;
    let y: Vec<i64> = (0..128).map(|i| i % 100).collect();
    let y = Tensor::from_vec(y, 128, &Device::Cpu)?;
    Ok(Box::new(move || {
        let s = head.step(&|e| model.classify(e), feats.as_tensor(), &y)?;
        s.loss.backward()?;
        Ok(())
    }))
}

/// The config of the segmentation step benchmark: FCN with the auxiliary head on a dilated
/// ResNet-18 V1c (full width), 19 classes, crop 512 × 512, batch 2.
pub(crate) fn seg_bench_config(sar: bool) -> anyhow::Result<crate::config::TrainConfig> {
    crate::config::parse(
        &format!(
            "[data]\ndataset = \"mosaic\"\nseg_crop = [512, 512]\n[model]\nbackbone = \"resnet18-v1c\"\n[sar]\nenabled = {sar}\n"
        ),
        &[],
    )
}

/// The segmentation step's batch: 2 images of 512 × 512.
pub(crate) const SEG_BENCH_SIZE: (usize, usize, usize) = (2, 512, 512);

/// The segmentation step's random images (NCHW) and labels over 19 classes.
pub(crate) fn seg_bench_batch() -> (Vec<f32>, Vec<u8>) {
    let (n, h, w) = SEG_BENCH_SIZE;
    let mut rng = SeededRng::new(13);
    let x = (0..n * 3 * h * w)
        .map(|_| rng.next_normal() as f32)
        .collect();
    let y = (0..n * h * w)
        .map(|_| (rng.next_u64() % 19) as u8)
        .collect();
    (x, y)
}

/// One segmentation training step (the benchmark): FCN + auxiliary head on a dilated
/// ResNet-18 V1c, batch 2, 512 × 512 random images and labels over 19 classes; forward in
/// training mode, Dropout2d, logits resized to 512 × 512, cross-entropy (+0.4 × auxiliary),
/// with SAR's λ1·L_aux + λ2·L_p2a when `sar`, backward, SGD. The anchor logits the SAR head
/// sees are shifted by 20·I (`gate_opening`) so that its gate passes and L_p2a runs on every
/// timed step, as in a trained model (an untrained one would time L_aux alone).
pub fn seg_step_runner(sar: bool) -> anyhow::Result<Runner> {
    let cfg = seg_bench_config(sar)?;
    let setup = crate::seg::build_seg(&cfg, 19)?;
    let (n, h, w) = SEG_BENCH_SIZE;
    let (x, y) = seg_bench_batch();
    let y64: Vec<i64> = y.iter().map(|&v| v as i64).collect();
    let x = Tensor::from_vec(x, (n, 3, h, w), &Device::Cpu)?;
    let y_t = Tensor::from_vec(y64, (n, h, w), &Device::Cpu)?;
    let mut opt = crate::optim::Sgd::new(setup.varmap.all_vars(), 0.01, 0.9, 5e-4, false);
    let crate::seg::SegSetup {
        model, mut head, ..
    } = setup;
    Ok(Box::new(move || {
        let f = model.features(&x, true)?;
        let mut drop_rng = SeededRng::new(1);
        let logits = model.classify(&crate::seg::dropout2d(&f.main, 0.1, &mut drop_rng)?)?;
        let mut loss = crate::seg::seg_cross_entropy(&logits, &y, (n, h, w))?;
        if let Some(a) = &f.aux {
            let la = model.classify_aux(&crate::seg::dropout2d(a, 0.1, &mut drop_rng)?)?;
            loss = (loss + (crate::seg::seg_cross_entropy(&la, &y, (n, h, w))? * 0.4)?)?;
        }
        if let Some(hd) = head.as_mut() {
            let s = hd.step(&|e| gate_opening(model.classify(e)?), &f.main, &y_t)?;
            anyhow::ensure!(s.gate_passed, "the benchmark's SAR gate did not pass");
            loss = (loss + s.loss)?;
        }
        let grads = loss.backward()?;
        opt.step(&grads)?;
        Ok(())
    }))
}

/// Anchor logits `[C, C]` plus 20·I: every anchor classified as its own class with
/// confidence above δ, so the gate passes (benchmarks only).
fn gate_opening(z: Tensor) -> candle_core::Result<Tensor> {
    let c = z.dim(0)?;
    let eye = Tensor::eye(c, z.dtype(), z.device())?;
    z + (eye * 20.0)?
}

/// SAR's part of the segmentation step alone: the head's step on fixed `[2, 128, 64, 64]`
/// features (the FCN head's D at output stride 8) with `[2, 512, 512]` labels, the gate held
/// open (`gate_opening`) so L_p2a and its gradient are included, and its backward.
pub fn seg_head_runner() -> anyhow::Result<Runner> {
    let cfg = seg_bench_config(true)?;
    let setup = crate::seg::build_seg(&cfg, 19)?;
    let mut head = setup.head.ok_or_else(|| anyhow::anyhow!("SAR is off"))?;
    let model = setup.model;
    let mut rng = SeededRng::new(14);
    let d = model.feature_dim();
    let f: Vec<f32> = (0..2 * d * 64 * 64)
        .map(|_| rng.next_normal() as f32)
        .collect();
    let feats = Var::from_tensor(&Tensor::from_vec(f, (2, d, 64, 64), &Device::Cpu)?)?;
    let y: Vec<i64> = (0..2 * 512 * 512)
        .map(|_| (rng.next_u64() % 19) as i64)
        .collect();
    let y = Tensor::from_vec(y, (2, 512, 512), &Device::Cpu)?;
    Ok(Box::new(move || {
        let s = head.step(&|e| gate_opening(model.classify(e)?), feats.as_tensor(), &y)?;
        anyhow::ensure!(
            s.gate_passed && s.valid > 0,
            "the benchmark's SAR gate did not pass"
        );
        s.loss.backward()?;
        Ok(())
    }))
}

/// The segmentation step without and with SAR, interleaved, and SAR's head alone.
/// `gb_per_s` holds images per second.
///
/// Given `torch`, the peer `tests/torch/seg_step_peer.py` (the same network and step, without
/// SAR) runs interleaved with ours, as in [`run_resnet32`].
pub fn run_seg_step(
    reps: usize,
    torch: Option<&Path>,
    backend: Option<BackendKind>,
) -> anyhow::Result<(Vec<BenchRow>, Option<serde_json::Value>)> {
    use crate::trainees::dfdx::seg_step_runner as dfdx_runner;
    let (mut runners, mut names) = variants(
        backend,
        vec![
            candle("FCN-R18-d8 b2 512² step", || seg_step_runner(false)),
            candle("FCN-R18-d8 b2 512² step + SAR", || seg_step_runner(true)),
            dfdx("dfdx: FCN-R18-d8 b2 512² step", || dfdx_runner(false)),
            dfdx("dfdx: FCN-R18-d8 b2 512² step + SAR", || dfdx_runner(true)),
        ],
    )?;
    let peer = start_peer(torch, "seg_step_peer.py")?;
    let steps = [("fcn-r18-d8", "FCN-R18-d8 b2 512² step")];
    push_peer_steps(&peer, &steps, &mut runners, &mut names);
    let mut rows = interleaved(runners, names, "seg-step", 2.0, reps)?;
    rows.push(BenchRow {
        workload: "seg-step".into(),
        variant: "SAR head alone, fwd+bwd".into(),
        seconds: median_secs(2, reps.max(5), seg_head_runner()?)?,
        gb_per_s: 0.0,
    });
    Ok((rows, peer_header(&peer)?))
}

/// A variant of a model-step benchmark: its library, its label and how to build its runner.
type Variant = (
    BackendKind,
    &'static str,
    Box<dyn FnOnce() -> anyhow::Result<Runner>>,
);

fn candle(name: &'static str, f: impl FnOnce() -> anyhow::Result<Runner> + 'static) -> Variant {
    (BackendKind::Candle, name, Box::new(f))
}

fn dfdx(name: &'static str, f: impl FnOnce() -> anyhow::Result<Runner> + 'static) -> Variant {
    (BackendKind::Dfdx, name, Box::new(f))
}

/// The runners and labels of the variants on `backend` (every variant when `None`); the
/// others are not built, so their models take no memory.
fn variants(
    backend: Option<BackendKind>,
    all: Vec<Variant>,
) -> anyhow::Result<(Vec<Runner>, Vec<String>)> {
    let mut runners = Vec::new();
    let mut names = Vec::new();
    for (kind, name, build) in all {
        if backend.is_none_or(|b| b == kind) {
            runners.push(build()?);
            names.push(name.to_string());
        }
    }
    Ok((runners, names))
}

/// Runners timed in turn (A, B, C, A, B, C, …) after one warm-up each, so that drift of the
/// machine affects all alike; medians, with `images / median` as the rate.
fn interleaved(
    mut runners: Vec<Runner>,
    names: Vec<String>,
    workload: &str,
    images: f64,
    reps: usize,
) -> anyhow::Result<Vec<BenchRow>> {
    anyhow::ensure!(runners.len() == names.len(), "one name per runner");
    for r in runners.iter_mut() {
        r()?;
    }
    let mut times: Vec<Vec<f64>> = vec![Vec::new(); runners.len()];
    for _ in 0..reps {
        for (r, t) in runners.iter_mut().zip(times.iter_mut()) {
            let s = Instant::now();
            r()?;
            t.push(s.elapsed().as_secs_f64());
        }
    }
    Ok(times
        .iter_mut()
        .zip(names)
        .map(|(t, name)| {
            t.sort_by(f64::total_cmp);
            let s = t[t.len() / 2];
            BenchRow {
                workload: workload.into(),
                variant: name,
                seconds: s,
                gb_per_s: images / s,
            }
        })
        .collect())
}

/// The table of a model-step benchmark ([`run_resnet32`], [`run_seg_step`]): rows without
/// SAR, with SAR, and SAR's head alone, with ratios to the plain step.
pub fn model_step_table(title: &str, r: &[BenchRow]) -> String {
    let peer = |sar: bool| {
        let plain = r
            .iter()
            .find(|x| x.variant.starts_with(PEER_PREFIX) && x.variant.contains("+ SAR") == sar);
        plain.map(|x| x.seconds)
    };
    let (peer_plain, peer_sar) = (peer(false), peer(true));
    let with_peer = peer_plain.is_some();
    let mut out = format!(
        "\n{title:<34} {:>11} {:>9} {:>9}{}\n",
        "median ms",
        "images/s",
        "x first",
        if with_peer { "  x PyTorch" } else { "" }
    );
    for x in r {
        // Ours against the peer's step of the same kind (with SAR where it has one).
        let versus = match x.variant.contains("+ SAR") {
            true => peer_sar.or(peer_plain),
            false => peer_plain,
        };
        let versus = match versus {
            Some(t) if with_peer && x.gb_per_s > 0.0 => format!("{:>11.2}", x.seconds / t),
            _ if with_peer => format!("{:>11}", "–"),
            _ => String::new(),
        };
        out += &format!(
            "{:<34} {:>11.1} {:>9.2} {:>9.3}{versus}\n",
            x.variant,
            x.seconds * 1e3,
            x.gb_per_s,
            x.seconds / r[0].seconds
        );
    }
    let head = r.iter().find(|x| x.variant.starts_with("SAR head alone"));
    if let (Some(plain), Some(head)) = (r.first(), head) {
        out += &format!(
            "SAR head alone (fwd+bwd): {:.2} ms = {:.2}% of the plain step\n",
            head.seconds * 1e3,
            100.0 * head.seconds / plain.seconds
        );
    }
    out
}

/// The ResNet-18 step (ImageNet stem, batch `batch` of 224² CUB-size crops, 200 classes) on
/// candle and dfdx, without and with SAR, interleaved, from the same weights and batch.
pub fn run_resnet18(
    reps: usize,
    batch: usize,
    backend: Option<BackendKind>,
) -> anyhow::Result<Vec<BenchRow>> {
    use crate::trainees::dfdx::cls_step_runner as dfdx_runner;
    // ClsStep is a description (config, shape, seed): each runner builds the same one.
    let step = move || ClsStep::resnet18_cub(batch);
    let (runners, names) = variants(
        backend,
        vec![
            candle("ResNet-18 224² step", move || {
                cls_step_runner(&step(), false)
            }),
            candle("ResNet-18 224² step + SAR", move || {
                cls_step_runner(&step(), true)
            }),
            dfdx("dfdx: ResNet-18 224² step", move || {
                dfdx_runner(&step(), false)
            }),
            dfdx("dfdx: ResNet-18 224² step + SAR", move || {
                dfdx_runner(&step(), true)
            }),
        ],
    )?;
    interleaved(runners, names, "r18", batch as f64, reps)
}

/// The ResNet-32 step without and with SAR, interleaved (A, B, A, B, …) so that drift of
/// the machine affects both alike. `gb_per_s` holds images per second here.
///
/// Given `torch` (a Python with PyTorch), the project's peer `tests/torch/resnet32_step_peer.py`
/// runs the same step ± SAR in a process kept alive, its steps interleaved with ours; its
/// header (torch version, threads) is returned beside the rows.
pub fn run_resnet32(
    reps: usize,
    torch: Option<&Path>,
    backend: Option<BackendKind>,
) -> anyhow::Result<(Vec<BenchRow>, Option<serde_json::Value>)> {
    use crate::trainees::dfdx::cls_step_runner as dfdx_runner;
    // candle and dfdx side by side, interleaved, from the same weights and batch.
    let (mut runners, mut names) = variants(
        backend,
        vec![
            candle("ResNet-32 b128 step", || resnet32_runner(false, 128)),
            candle("ResNet-32 b128 step + SAR", || resnet32_runner(true, 128)),
            dfdx("dfdx: ResNet-32 b128 step", || {
                dfdx_runner(&ClsStep::resnet32(128), false)
            }),
            dfdx("dfdx: ResNet-32 b128 step + SAR", || {
                dfdx_runner(&ClsStep::resnet32(128), true)
            }),
        ],
    )?;
    let peer = start_peer(torch, "resnet32_step_peer.py")?;
    let steps = [
        ("resnet32", "ResNet-32 b128 step"),
        ("resnet32-sar", "ResNet-32 b128 step + SAR"),
    ];
    push_peer_steps(&peer, &steps, &mut runners, &mut names);
    let mut rows = interleaved(runners, names, "r32", 128.0, reps)?;
    // The two medians differ by less than the machine's drift between runs (several per
    // cent), so SAR's own work is also timed alone: the head's step (embed, classify, L_aux,
    // gate, EMA, p2a) and its backward on [128, 64] features.
    rows.push(BenchRow {
        workload: "r32".into(),
        variant: "SAR head alone, fwd+bwd".into(),
        seconds: median_secs(3, reps.max(5) * 4, sar_head_runner()?)?,
        gb_per_s: 0.0,
    });
    Ok((rows, peer_header(&peer)?))
}

/// Rows timing a PyTorch peer start with this.
pub const PEER_PREFIX: &str = "PyTorch: ";

/// The peer `tests/torch/SCRIPT --serve THREADS` under `python`, when one is given.
fn start_peer(
    python: Option<&Path>,
    script: &str,
) -> anyhow::Result<Option<Rc<RefCell<peer::Peer>>>> {
    let Some(python) = python else {
        return Ok(None);
    };
    let script = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/torch")
        .join(script);
    let threads = rayon::current_num_threads();
    let p = peer::Peer::start(python, &script, threads)?;
    Ok(Some(Rc::new(RefCell::new(p))))
}

/// The peer's header (torch version, threads) with its CPU time and peak memory so far under
/// `rusage` ([`Rusage`]), when it runs.
fn peer_header(
    peer: &Option<Rc<RefCell<peer::Peer>>>,
) -> anyhow::Result<Option<serde_json::Value>> {
    let Some(p) = peer else {
        return Ok(None);
    };
    let mut p = p.borrow_mut();
    let mut header = p.header.clone();
    header["rusage"] = serde_json::to_value(p.rusage()?)?;
    Ok(Some(header))
}

/// Adds the peer's steps `(its name, our label)` to the runners, labelled [`PEER_PREFIX`] +
/// label, when it runs.
fn push_peer_steps(
    peer: &Option<Rc<RefCell<peer::Peer>>>,
    steps: &[(&'static str, &str)],
    runners: &mut Vec<Runner>,
    names: &mut Vec<String>,
) {
    if let Some(p) = peer {
        for &(name, label) in steps {
            runners.push(peer_runner(p, name));
            names.push(format!("{PEER_PREFIX}{label}"));
        }
    }
}

/// A runner that asks the peer for one step of `name`.
fn peer_runner(peer: &Rc<RefCell<peer::Peer>>, name: &'static str) -> Runner {
    let peer = Rc::clone(peer);
    Box::new(move || {
        peer.borrow_mut().step(name)?;
        Ok(())
    })
}

#[cfg(test)]
mod peer_table_tests {
    use super::*;

    fn row(variant: &str, seconds: f64, images: f64) -> BenchRow {
        BenchRow {
            workload: "r32".into(),
            variant: variant.into(),
            seconds,
            gb_per_s: images / seconds,
        }
    }

    /// Each of our rows is divided by the peer's step of its kind (with SAR by the peer's SAR
    /// step when there is one, else by its plain step); SAR's head alone has no ratio; without
    /// peer rows the column is absent.
    #[test]
    fn ratios_to_the_peer_pair_rows_by_kind() {
        let rows = [
            row("ResNet-32 b128 step", 0.6, 128.0),
            row("ResNet-32 b128 step + SAR", 0.9, 128.0),
            row("dfdx: step + SAR", 1.2, 128.0),
            row("PyTorch: ResNet-32 b128 step", 0.4, 128.0),
            row("PyTorch: ResNet-32 b128 step + SAR", 0.45, 128.0),
            row("SAR head alone, fwd+bwd", 0.001, 0.0),
        ];
        let t = model_step_table("model step", &rows);
        let ratio = |name: &str| {
            let line = t.lines().find(|l| l.starts_with(name)).unwrap();
            line.split_whitespace().last().unwrap().to_string()
        };
        assert!(t.contains("x PyTorch"), "{t}");
        assert_eq!(ratio("ResNet-32 b128 step  "), "1.50", "{t}");
        assert_eq!(ratio("ResNet-32 b128 step + SAR"), "2.00", "{t}");
        assert_eq!(ratio("dfdx: step + SAR"), "2.67", "{t}");
        assert_eq!(ratio("SAR head alone"), "–", "{t}");
        // Only a plain peer step (seg-step): SAR rows are held to it.
        let t = model_step_table("seg", &[rows[1].clone(), rows[3].clone()]);
        let line = t
            .lines()
            .find(|l| l.starts_with("ResNet-32 b128 step + SAR"))
            .unwrap();
        assert!(line.ends_with("2.25"), "{t}");
        let t = model_step_table("no peer", &rows[..3]);
        assert!(!t.contains("PyTorch"), "{t}");
    }

    #[test]
    fn interleaving_needs_one_name_per_runner() {
        let r: Runner = Box::new(|| Ok(()));
        assert!(interleaved(vec![r], vec![], "x", 1.0, 1).is_err());
    }
}
