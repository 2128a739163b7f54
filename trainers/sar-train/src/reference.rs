//! `sar reference`: one SAR step computed by `sar-math` in f64 from tensors in a safetensors
//! file, so that any other SAR implementation (a PyTorch one, say) can be checked against it.
//!
//! # Input tensors (F64 or F32; labels I64, or I32/U32/U16/U8)
//! | name | shape | |
//! |---|---|---|
//! | `anchor_logits` | `[C, C]` | row c = classifier logits of embedded anchor c (Z) |
//! | `embedded_anchors` | `[C, D]` | E = h_ψ(A) this step |
//! | `semantic_anchors` | `[C, D]` | optional: Â before this step; absent = not initialised |
//! | `initialized` | `[]` or `[C]` | optional flags (BOOL/U8/number, non-zero = true); default: true iff `semantic_anchors` is given |
//! | `features` | `[B, D, H, W]` or `[N, D]` | F |
//! | `labels` | `[B, H', W']` or `[N]` | y; resampled to H×W with PyTorch's legacy `nearest` |
//!
//! # Options (JSON object, every key optional)
//! `tau` 0.9, `delta` 0.8, `alpha` 0.999, `lambda_aux` 1, `lambda_p2a` 0.1,
//! `ignore_index` 255, `gate` `"global"` | `"per-class"`, `weights` `"attached"` | `"detached"`.
//! Unknown keys are rejected.
//!
//! # Output tensors (all F64)
//! `anchor_confidence` `[C]`, `anchor_nll` `[C]`, `anchor_weights` `[C]`, `loss_aux` `[]`,
//! `grad_anchor_logits` `[C, C]`, `gate` (`[]` global, `[C]` per-class; 1.0 / 0.0),
//! `semantic_anchors` `[C, D]` (after this step), `initialized` (`[]` or `[C]`), `loss_p2a` `[]`,
//! `grad_features` (the shape of `features`), `loss_sar` `[]` (= λ1·L_aux + λ2·L_p2a).
//! Losses are unweighted except `loss_sar`, and gradients are those of the unweighted losses.
//!
//! Any bad input is an error naming the tensor and the problem, and no output file is written.

use crate::tensorio::{serialize, write_atomic, HostTensor, OutTensor, TensorError, TensorFile};
use anyhow::{bail, Context};
use sar_math::p2a::{FeatureGeometry, RowLabels};
use sar_math::state::{FeatureInput, StepBuffers, StepInput, StepReport};
use sar_math::{GateMode, SarConfig, SarState};
use std::collections::HashMap;
use std::path::Path;

/// One reference case, validated.
#[derive(Debug, Clone)]
pub struct ReferenceCase {
    /// C.
    pub classes: usize,
    /// D.
    pub dim: usize,
    /// Z, `[C, C]`.
    pub anchor_logits: Vec<f64>,
    /// E, `[C, D]`.
    pub embedded_anchors: Vec<f64>,
    /// Â before the step, `[C, D]` (zeros when absent).
    pub semantic_anchors: Vec<f64>,
    /// Per-class initialised flags.
    pub initialized: Vec<bool>,
    /// Shape of `features`.
    pub feature_shape: Vec<usize>,
    /// F.
    pub features: Vec<f64>,
    /// Shape of `labels`.
    pub label_shape: Vec<usize>,
    /// y.
    pub labels: Vec<i64>,
}

fn shape_err(name: &str, found: &[usize], expected: impl Into<String>) -> TensorError {
    TensorError::Shape {
        name: name.into(),
        found: found.to_vec(),
        expected: expected.into(),
    }
}

/// Parses the options JSON into a validated [`SarConfig`].
pub fn parse_options(json: &str) -> anyhow::Result<SarConfig> {
    let config: SarConfig = serde_json::from_str(json).context("options")?;
    config.validate().context("options")?;
    Ok(config)
}

/// Reads and validates a case (shapes, dtypes, finiteness, label range).
pub fn load_case(file: &TensorFile, config: &SarConfig) -> anyhow::Result<ReferenceCase> {
    let logits = file.f64("anchor_logits")?;
    let [c, c2] = logits.shape[..] else {
        return Err(shape_err("anchor_logits", &logits.shape, "[C, C]").into());
    };
    if c != c2 || c == 0 {
        return Err(shape_err("anchor_logits", &logits.shape, "[C, C] (square, C ≥ 1)").into());
    }
    let embedded = file.f64("embedded_anchors")?;
    let features = file.f64("features")?;
    let dim = match features.shape[..] {
        [_, d, _, _] | [_, d] => d,
        _ => return Err(shape_err("features", &features.shape, "[B, D, H, W] or [N, D]").into()),
    };
    if dim == 0 {
        return Err(shape_err("features", &features.shape, "D ≥ 1").into());
    }
    if embedded.shape != [c, dim] {
        return Err(shape_err(
            "embedded_anchors",
            &embedded.shape,
            format!("[C, D] = [{c}, {dim}] (C from anchor_logits, D from features)"),
        )
        .into());
    }
    let labels = file.i64("labels")?;
    let label_ok = match (&features.shape[..], &labels.shape[..]) {
        ([b, _, h, w], [lb, lh, lw]) => b == lb && (h * w == 0 || lh * lw > 0),
        ([n, _], [ln]) => n == ln,
        _ => false,
    };
    if !label_ok {
        let want = if features.shape.len() == 4 {
            format!(
                "[B, H', W'] with B = {} and a non-empty map",
                features.shape[0]
            )
        } else {
            format!("[N] with N = {}", features.shape[0])
        };
        return Err(shape_err("labels", &labels.shape, want).into());
    }
    if let Some((i, &l)) = labels
        .data
        .iter()
        .enumerate()
        .find(|&(_, &l)| l != config.ignore_index && !(0..c as i64).contains(&l))
    {
        bail!(
            "tensor `labels`: value {l} at flat index {i} is not a class in 0..{c} nor the ignore index {}",
            config.ignore_index
        );
    }
    let semantic = file.f64_opt("semantic_anchors")?;
    if let Some(s) = &semantic {
        if s.shape != [c, dim] {
            return Err(shape_err(
                "semantic_anchors",
                &s.shape,
                format!("[C, D] = [{c}, {dim}]"),
            )
            .into());
        }
    }
    let initialized = match file.flags_opt("initialized")? {
        None => vec![semantic.is_some(); c],
        Some(HostTensor { shape, data }) => {
            let flags = match shape[..] {
                [] => vec![data[0]; c],
                [n] if n == c => data,
                _ => {
                    return Err(
                        shape_err("initialized", &shape, format!("[] or [C] = [{c}]")).into(),
                    )
                }
            };
            if config.gate == GateMode::Global && flags.iter().any(|&f| f != flags[0]) {
                bail!("tensor `initialized`: the global gate needs all flags equal, found a mix");
            }
            if semantic.is_none() && flags.iter().any(|&f| f) {
                bail!("tensor `initialized` marks anchors as initialised but `semantic_anchors` is missing");
            }
            flags
        }
    };
    Ok(ReferenceCase {
        classes: c,
        dim,
        anchor_logits: logits.data,
        embedded_anchors: embedded.data,
        semantic_anchors: semantic.map_or_else(|| vec![0.0; c * dim], |s| s.data),
        initialized,
        feature_shape: features.shape,
        features: features.data,
        label_shape: labels.shape,
        labels: labels.data,
    })
}

/// The result of [`run_case`]: the output tensors and the step report.
#[derive(Debug, Clone)]
pub struct ReferenceOutput {
    /// Named output tensors, in the contract's order.
    pub tensors: Vec<(String, OutTensor)>,
    /// Scalar results.
    pub report: StepReport<f64>,
}

/// Runs one step on a validated case.
pub fn run_case(case: &ReferenceCase, config: &SarConfig) -> anyhow::Result<ReferenceOutput> {
    let (c, d) = (case.classes, case.dim);
    let mut state = SarState::<f64, _, _>::from_parts(
        *config,
        c,
        d,
        case.semantic_anchors.clone(),
        case.initialized.clone(),
    )
    .context("semantic_anchors")?;
    let features = match case.feature_shape[..] {
        [b, _, h, w] => FeatureInput::Nchw {
            features: &case.features,
            labels: &case.labels,
            geometry: FeatureGeometry {
                batch: b,
                channels: d,
                height: h,
                width: w,
                label_height: case.label_shape[1],
                label_width: case.label_shape[2],
            },
        },
        _ => FeatureInput::Rows {
            features: &case.features,
            labels: RowLabels::Plain(&case.labels),
        },
    };
    let (mut conf, mut nll, mut weights, mut pass) =
        (vec![0.0; c], vec![0.0; c], vec![0.0; c], vec![false; c]);
    let mut grad_logits = vec![0.0; c * c];
    let mut grad_features = vec![0.0; case.features.len()];
    let report = state
        .step(
            StepInput {
                anchor_logits: &case.anchor_logits,
                embedded_anchors: &case.embedded_anchors,
                features,
            },
            StepBuffers {
                confidence: &mut conf,
                nll: &mut nll,
                weights: &mut weights,
                class_pass: &mut pass,
                grad_logits: Some(&mut grad_logits),
                grad_features: Some(&mut grad_features),
            },
        )
        .context("SAR step")?;
    let flag = |b: bool| if b { 1.0 } else { 0.0 };
    let (gate, initialized) = match config.gate {
        GateMode::Global => (
            OutTensor::scalar(flag(report.gate_passed)),
            OutTensor::scalar(flag(state.fully_initialized())),
        ),
        GateMode::PerClass => (
            OutTensor::f64(&[c], &pass.iter().map(|&p| flag(p)).collect::<Vec<_>>()),
            OutTensor::f64(
                &[c],
                &state
                    .initialized()
                    .iter()
                    .map(|&p| flag(p))
                    .collect::<Vec<_>>(),
            ),
        ),
    };
    let tensors = vec![
        ("anchor_confidence".into(), OutTensor::f64(&[c], &conf)),
        ("anchor_nll".into(), OutTensor::f64(&[c], &nll)),
        ("anchor_weights".into(), OutTensor::f64(&[c], &weights)),
        ("loss_aux".into(), OutTensor::scalar(report.loss_aux)),
        (
            "grad_anchor_logits".into(),
            OutTensor::f64(&[c, c], &grad_logits),
        ),
        ("gate".into(), gate),
        (
            "semantic_anchors".into(),
            OutTensor::f64(&[c, d], state.semantic_anchors()),
        ),
        ("initialized".into(), initialized),
        ("loss_p2a".into(), OutTensor::scalar(report.loss_p2a)),
        (
            "grad_features".into(),
            OutTensor::f64(&case.feature_shape, &grad_features),
        ),
        ("loss_sar".into(), OutTensor::scalar(report.loss_sar)),
    ];
    Ok(ReferenceOutput { tensors, report })
}

/// Reads `input` and `options`, runs the step, writes `output` atomically (only on success).
pub fn run_files(
    input: &Path,
    options: Option<&Path>,
    output: &Path,
) -> anyhow::Result<ReferenceOutput> {
    let json = match options {
        Some(p) => std::fs::read_to_string(p)
            .with_context(|| format!("reading options {}", p.display()))?,
        None => "{}".into(),
    };
    let config = parse_options(&json).with_context(|| match options {
        Some(p) => p.display().to_string(),
        None => "default options".into(),
    })?;
    let file = TensorFile::open(input)?;
    let case = load_case(&file, &config).with_context(|| input.display().to_string())?;
    let out = run_case(&case, &config).with_context(|| input.display().to_string())?;
    let mut meta = HashMap::new();
    meta.insert(
        "producer".into(),
        format!("sar reference {}", env!("CARGO_PKG_VERSION")),
    );
    meta.insert("options".into(), serde_json::to_string(&config)?);
    let bytes =
        serialize(&out.tensors, meta).map_err(|e| anyhow::anyhow!("serialising output: {e}"))?;
    write_atomic(output, &bytes)?;
    Ok(out)
}

/// The example case shipped in `examples/reference/`: C = 4, D = 6, one 4×4 feature map with
/// 8×8 labels (label row 6, which the ×2 resampling samples, is ignored), anchors already initialised and separated, so the gate
/// passes and both losses are active.
pub fn example_case() -> Vec<(String, OutTensor)> {
    let (c, d, h, w) = (4usize, 6usize, 4usize, 4usize);
    let mut rng = sar_math::rng::SeededRng::new(2024);
    let mut normal = |n: usize, s: f64| (0..n).map(|_| s * rng.next_normal()).collect::<Vec<f64>>();
    let mut logits = normal(c * c, 1.0);
    for i in 0..c {
        logits[i * c + i] += if i == 3 { 2.5 } else { 6.0 }; // anchor 3 is less confident (p < τ)
    }
    let embedded: Vec<f64> = normal(c * d, 1.0).iter().map(|v| v.max(0.0)).collect();
    let semantic = normal(c * d, 0.5);
    let features = normal(d * h * w, 1.0);
    let labels: Vec<i64> = (0..64)
        .map(|i| {
            if i / 8 == 6 {
                255
            } else {
                ((i / 2 + i / 16) % c) as i64
            }
        })
        .collect();
    vec![
        ("anchor_logits".into(), OutTensor::f64(&[c, c], &logits)),
        (
            "embedded_anchors".into(),
            OutTensor::f64(&[c, d], &embedded),
        ),
        (
            "semantic_anchors".into(),
            OutTensor::f64(&[c, d], &semantic),
        ),
        ("features".into(), OutTensor::f64(&[1, d, h, w], &features)),
        ("labels".into(), OutTensor::i64(&[1, 8, 8], &labels)),
    ]
}
