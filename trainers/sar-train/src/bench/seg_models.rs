//! `sar bench --workload seg-models`: one training step of each of the paper's newer
//! segmentation models at a small size, without and with SAR, and (with `--torch PYTHON`) the
//! PyTorch peer's step of the same network, interleaved in one run.
//!
//! Models: OCRNet on HRNetV2-W18, SegFormer MiT-B0, UPerNet on Swin-T (window 7), full widths,
//! 19 classes, on candle (± SAR) and on dfdx (without SAR; `--backend` picks one library). Step: a batch of 2 random 256 × 256 images and labels, the trainer's
//! training-mode forward and losses ([`crate::seg::seg_forward_losses`]: cross-entropy on
//! logits resized to 256 × 256, + 0.4 × the auxiliary or soft-region head's), SAR's
//! λ1·L_aux + λ2·L_p2a with its gate held open (the anchor logits shifted as in the FCN step,
//! so that L_p2a runs on every timed step), backward, AdamW (lr 6e-5, weight decay 0.01).
//! Neither side applies dropout or stochastic depth here (the peer's modules have none).
//!
//! The peer is `tests/torch/seg_models_step_peer.py --serve THREADS`, kept running: each of
//! its steps is requested in turn with ours (ours, ours + SAR, PyTorch, ours, …), so drift of
//! the machine affects all alike; its steps are timed by the same clock here (the pipe's
//! round trip is microseconds beside steps of 100 ms and more).

use super::{gate_opening, interleaved, BenchRow, Runner};
use candle_core::{Device, Tensor};
use sar_math::rng::SeededRng;
use std::path::Path;

/// Classes, batch and crop of every model's step.
const CLASSES: usize = 19;
const BATCH: usize = 2;
const SIZE: usize = 256;

/// One benchmarked network: the name the peer knows it by, the label of its rows and its
/// `[model]` config keys.
pub struct SegBenchModel {
    /// The peer's name.
    pub name: &'static str,
    /// Row label.
    pub label: &'static str,
    /// `[model]` keys.
    pub keys: &'static str,
}

/// The models `seg-models` times.
pub const SEG_BENCH_MODELS: [SegBenchModel; 3] = [
    SegBenchModel {
        name: "ocr-hr18",
        label: "OCRNet HRNetV2-W18",
        keys: "backbone = \"hrnetv2-w18\"\nhead = \"ocr\"",
    },
    SegBenchModel {
        name: "segformer-b0",
        label: "SegFormer MiT-B0",
        keys: "backbone = \"mit-b0\"\nhead = \"segformer\"\ndrop_path = 0.0",
    },
    SegBenchModel {
        name: "upernet-swin-t",
        label: "UPerNet Swin-T",
        keys: "backbone = \"swin-t\"\nhead = \"uper\"\nwindow = 7\ndrop_path = 0.0",
    },
];

impl SegBenchModel {
    /// The variant names of its rows: ours (candle), ours with SAR, the peer's, dfdx's.
    fn variants(&self) -> [String; 4] {
        let plain = format!("{} b{BATCH} {SIZE}² step", self.label);
        [
            plain.clone(),
            format!("{plain} + SAR"),
            format!("PyTorch: {plain}"),
            format!("dfdx: {plain}"),
        ]
    }
}

/// The config of `m`'s step, with SAR when `sar`.
fn step_config(m: &SegBenchModel, sar: bool) -> anyhow::Result<crate::config::TrainConfig> {
    crate::config::parse(
        &format!(
            "[data]\ndataset = \"mosaic\"\nseg_crop = [{SIZE}, {SIZE}]\n[model]\n{}\n\
             dropout = 0.0\n[sar]\nenabled = {sar}\n",
            m.keys
        ),
        &[],
    )
}

/// The step's random images `[N, 3, S, S]` and labels.
fn step_batch() -> (Vec<f32>, Vec<u8>) {
    let mut rng = SeededRng::new(13);
    let x: Vec<f32> = (0..BATCH * 3 * SIZE * SIZE)
        .map(|_| rng.next_normal() as f32)
        .collect();
    let y: Vec<u8> = (0..BATCH * SIZE * SIZE)
        .map(|_| (rng.next_u64() % CLASSES as u64) as u8)
        .collect();
    (x, y)
}

/// `m`'s step on dfdx (without SAR), from the same weights and batch as candle's.
pub fn dfdx_seg_model_runner(m: &SegBenchModel) -> anyhow::Result<Runner> {
    let (x, y) = step_batch();
    crate::trainees::dfdx::seg_model_runner(
        &step_config(m, false)?,
        CLASSES,
        x,
        y,
        (BATCH, SIZE, SIZE),
    )
}

/// One training step of `m` (see the module docs), with SAR's loss when `sar`.
pub fn seg_model_runner(m: &SegBenchModel, sar: bool) -> anyhow::Result<Runner> {
    let cfg = step_config(m, sar)?;
    let aux_weight = cfg.model.segmenter()?.aux_weight;
    let setup = crate::seg::build_seg(&cfg, CLASSES)?;
    let (x, y) = step_batch();
    let y64: Vec<i64> = y.iter().map(|&v| v as i64).collect();
    let x = Tensor::from_vec(x, (BATCH, 3, SIZE, SIZE), &Device::Cpu)?;
    let y_t = Tensor::from_vec(y64, (BATCH, SIZE, SIZE), &Device::Cpu)?;
    let mut named: Vec<(String, candle_core::Var)> = setup
        .varmap
        .data()
        .lock()
        .expect("varmap lock")
        .iter()
        .filter(|(n, _)| !sar_models::params::is_running_stat(n))
        .map(|(n, v)| (n.clone(), v.clone()))
        .collect();
    named.sort_by(|a, b| a.0.cmp(&b.0));
    let mut opt = crate::optim::AdamW::named(named, 6e-5, (0.9, 0.999), 1e-8, 0.01);
    let crate::seg::SegSetup {
        model, mut head, ..
    } = setup;
    Ok(Box::new(move || {
        let mut noise = SeededRng::new(1);
        let fw =
            crate::seg::seg_forward_losses(model.as_ref(), &x, &y, 0.0, aux_weight, &mut noise)?;
        let mut loss = fw.ce;
        if let Some(a) = fw.aux_ce {
            loss = (loss + a)?;
        }
        if let Some(hd) = head.as_mut() {
            let s = hd.step(&|e| gate_opening(model.classify(e)?), &fw.features, &y_t)?;
            anyhow::ensure!(s.gate_passed, "the benchmark's SAR gate did not pass");
            loss = (loss + s.loss)?;
        }
        let grads = loss.backward()?;
        opt.step(&grads, &|lr| lr)?;
        Ok(())
    }))
}

/// Every model's step without and with SAR and, given `torch` (a Python with PyTorch), the
/// peer's, interleaved per model; `gb_per_s` holds images per second. Also returns the peer's
/// header (torch version, threads) when it ran.
pub fn run_seg_models(
    reps: usize,
    torch: Option<&Path>,
    backend: Option<crate::config::BackendKind>,
) -> anyhow::Result<(Vec<BenchRow>, Option<serde_json::Value>)> {
    use crate::config::BackendKind;
    let peer = super::start_peer(torch, "seg_models_step_peer.py")?;
    let mut rows = Vec::new();
    for m in &SEG_BENCH_MODELS {
        let [plain, with_sar, torch_label, on_dfdx] = m.variants();
        let (mut runners, mut names) = (Vec::new(), Vec::new());
        if backend.is_none_or(|b| b == BackendKind::Candle) {
            runners.extend([seg_model_runner(m, false)?, seg_model_runner(m, true)?]);
            names.extend([plain, with_sar]);
        }
        if backend.is_none_or(|b| b == BackendKind::Dfdx) {
            runners.push(dfdx_seg_model_runner(m)?);
            names.push(on_dfdx);
        }
        if let Some(p) = &peer {
            runners.push(super::peer_runner(p, m.name));
            names.push(torch_label);
        }
        let batch = BATCH as f64;
        rows.extend(interleaved(runners, names, "seg-models", batch, reps)?);
    }
    let header = super::peer_header(&peer)?;
    Ok((rows, header))
}

/// The table of [`run_seg_models`]' rows: per model, ours (candle), ours + SAR, dfdx's, the
/// peer's and the ratios of candle's and dfdx's steps to it.
pub fn seg_models_table(rows: &[BenchRow], header: Option<&serde_json::Value>) -> String {
    let mut out = format!(
        "\nsegmentation models, b{BATCH} {SIZE}², {CLASSES} classes (median ms; {} threads{})\n\
         {:<22} {:>10} {:>10} {:>10} {:>10} {:>12} {:>12}\n",
        rayon::current_num_threads(),
        header.map_or(String::new(), |h| format!(", torch {}", h["torch"])),
        "model",
        "ours",
        "ours+SAR",
        "dfdx",
        "PyTorch",
        "ours/PyTorch",
        "dfdx/PyTorch"
    );
    for m in &SEG_BENCH_MODELS {
        let [plain, sar, torch, on_dfdx] = m
            .variants()
            .map(|v| rows.iter().find(|r| r.variant == v).map(|r| r.seconds));
        let ms = |s: Option<f64>| s.map_or("–".to_string(), |s| format!("{:.1}", s * 1e3));
        let ratio = |a: Option<f64>| match (a, torch) {
            (Some(a), Some(b)) => format!("{:.2}×", a / b),
            _ => "–".into(),
        };
        out += &format!(
            "{:<22} {:>10} {:>10} {:>10} {:>10} {:>12} {:>12}\n",
            m.label,
            ms(plain),
            ms(sar),
            ms(on_dfdx),
            ms(torch),
            ratio(plain),
            ratio(on_dfdx)
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The table pairs each model's rows by name: ratio of ours to the peer's, a dash where
    /// the peer did not run.
    #[test]
    fn table_pairs_rows_by_model() {
        let row = |variant: &str, seconds: f64| BenchRow {
            workload: "seg-models".into(),
            variant: variant.into(),
            seconds,
            gb_per_s: 0.0,
        };
        let [a, b, c, f] = SEG_BENCH_MODELS[0].variants();
        let [d, e, _, _] = SEG_BENCH_MODELS[1].variants();
        let rows = [
            row(&a, 2.0),
            row(&b, 2.1),
            row(&c, 0.8),
            row(&d, 0.5),
            row(&e, 0.6),
            row(&f, 1.2),
        ];
        let t = seg_models_table(&rows, None);
        let line = |label: &str| {
            t.lines()
                .find(|l| l.starts_with(label))
                .unwrap()
                .to_string()
        };
        let ocr = line(SEG_BENCH_MODELS[0].label);
        assert!(
            ocr.contains("2000.0") && ocr.contains("2100.0") && ocr.contains("800.0"),
            "{t}"
        );
        assert!(ocr.contains("1200.0") && ocr.contains("2.50×"), "{t}");
        assert!(ocr.ends_with("1.50×"), "{t}");
        let segformer = line(SEG_BENCH_MODELS[1].label);
        assert!(
            segformer.contains("500.0") && segformer.ends_with('–'),
            "{t}"
        );
        assert!(line(SEG_BENCH_MODELS[2].label).contains('–'), "{t}");
    }
}
