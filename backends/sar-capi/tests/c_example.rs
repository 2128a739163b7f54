//! Compiles `examples/step.c` against the static library with the system C compiler (through
//! the `cc` crate), runs it, and checks its step, in f64 and f32, against `sar-math` computed
//! here on the inputs it printed, and each error status with its message.

use sar_math::p2a::FeatureGeometry;
use sar_math::state::{FeatureInput, StepBuffers, StepInput};
use sar_math::{Real, SarConfig, SarState};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

const C: usize = 3;
const D: usize = 4;
const GEOMETRY: FeatureGeometry = FeatureGeometry {
    batch: 1,
    channels: D,
    height: 3,
    width: 3,
    label_height: 5,
    label_width: 5,
};

/// The static library cargo built beside this test (`target/<profile>/deps/`).
fn static_lib() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let deps = exe.parent().unwrap();
    for dir in [deps, deps.parent().unwrap()] {
        let p = dir.join("libsar_capi.a");
        if p.exists() {
            return p;
        }
    }
    panic!("libsar_capi.a not found beside {}", exe.display());
}

fn run_example() -> HashMap<String, Vec<String>> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out_dir = std::env::temp_dir().join(format!("sar-capi-c-{}", std::process::id()));
    std::fs::create_dir_all(&out_dir).unwrap();
    let exe = out_dir.join("step");
    let compiler = cc::Build::new()
        .cargo_metadata(false)
        .target(env!("SAR_CAPI_TARGET"))
        .host(env!("SAR_CAPI_HOST"))
        .opt_level(0)
        .get_compiler();
    let mut cmd = compiler.to_command();
    cmd.args(["-std=c99", "-Wall", "-Wextra", "-Werror", "-I"])
        .arg(dir.join("include"))
        .arg(dir.join("examples/step.c"))
        .arg(static_lib())
        .args(["-lpthread", "-ldl", "-lm", "-o"])
        .arg(&exe);
    let built = cmd.output().expect("running the C compiler");
    assert!(
        built.status.success(),
        "C compile failed: {cmd:?}\n{}",
        String::from_utf8_lossy(&built.stderr)
    );
    let run = Command::new(&exe).output().expect("running the C example");
    let stdout = String::from_utf8(run.stdout).unwrap();
    assert!(run.status.success(), "C example failed:\n{stdout}");
    let _ = std::fs::remove_dir_all(&out_dir);
    stdout
        .lines()
        .map(|l| {
            let mut it = l.split(' ');
            let key = it.next().unwrap().to_string();
            if key == "err" {
                let what = it.next().unwrap();
                (
                    format!("err.{what}"),
                    vec![it.collect::<Vec<_>>().join(" ")],
                )
            } else {
                (key, it.map(String::from).collect())
            }
        })
        .collect()
}

fn nums<T: std::str::FromStr>(out: &HashMap<String, Vec<String>>, key: &str) -> Vec<T>
where
    T::Err: std::fmt::Debug,
{
    out.get(key)
        .unwrap_or_else(|| panic!("no line {key}"))
        .iter()
        .map(|v| v.parse().unwrap())
        .collect()
}

struct Expected<F> {
    conf: Vec<F>,
    nll: Vec<F>,
    weights: Vec<F>,
    grad_logits: Vec<F>,
    pass: Vec<bool>,
    semantic: Vec<F>,
    grad_features: Vec<F>,
    report: sar_math::state::StepReport<F>,
}

fn expected<F: Real>(z: &[F], e: &[F], s: &[F], f: &[F], labels: &[i64]) -> Expected<F> {
    let mut state =
        SarState::<F, _, _>::from_parts(SarConfig::default(), C, D, s.to_vec(), vec![true; C])
            .unwrap();
    let zero = F::zero();
    let (mut conf, mut nll, mut weights, mut pass) =
        (vec![zero; C], vec![zero; C], vec![zero; C], vec![false; C]);
    let (mut gl, mut gf) = (vec![zero; C * C], vec![zero; f.len()]);
    let report = state
        .step(
            StepInput {
                anchor_logits: z,
                embedded_anchors: e,
                features: FeatureInput::Nchw {
                    features: f,
                    labels,
                    geometry: GEOMETRY,
                },
            },
            StepBuffers {
                confidence: &mut conf,
                nll: &mut nll,
                weights: &mut weights,
                class_pass: &mut pass,
                grad_logits: Some(&mut gl),
                grad_features: Some(&mut gf),
            },
        )
        .unwrap();
    Expected {
        conf,
        nll,
        weights,
        grad_logits: gl,
        pass,
        semantic: state.semantic_anchors().to_vec(),
        grad_features: gf,
        report,
    }
}

#[test]
fn c_program_step_matches_sar_math_and_reports_each_error() {
    let out = run_example();
    let z: Vec<f64> = nums(&out, "in.anchor_logits");
    let e: Vec<f64> = nums(&out, "in.embedded_anchors");
    let s: Vec<f64> = nums(&out, "in.semantic_anchors");
    let f: Vec<f64> = nums(&out, "in.features");
    let labels: Vec<i64> = nums(&out, "in.labels");

    // f64: the same code on the same inputs, so the same bits (%.17g round-trips).
    let x = expected(&z, &e, &s, &f, &labels);
    assert_eq!(nums::<f64>(&out, "f64.anchor_confidence"), x.conf);
    assert_eq!(nums::<f64>(&out, "f64.anchor_nll"), x.nll);
    assert_eq!(nums::<f64>(&out, "f64.anchor_weights"), x.weights);
    assert_eq!(nums::<f64>(&out, "f64.grad_anchor_logits"), x.grad_logits);
    let flags = |v: &[bool]| v.iter().map(|&b| u8::from(b)).collect::<Vec<_>>();
    assert_eq!(nums::<u8>(&out, "f64.gate"), flags(&x.pass));
    assert_eq!(nums::<f64>(&out, "f64.semantic_anchors"), x.semantic);
    assert_eq!(nums::<u8>(&out, "f64.initialized"), vec![1; C]);
    assert_eq!(nums::<f64>(&out, "f64.grad_features"), x.grad_features);
    let r = &x.report;
    assert!(
        r.gate_passed && r.valid > 0 && r.loss_p2a > 0.0,
        "the case exercises p2a"
    );
    let report: Vec<f64> = nums(&out, "f64.report");
    assert_eq!(
        report,
        vec![
            r.loss_aux,
            r.loss_p2a,
            r.loss_sar,
            f64::from(u8::from(r.gate_passed)),
            r.updated_classes as f64,
            r.uncertain as f64,
            r.valid as f64
        ]
    );

    // f32: the inputs rounded to float, the f32 kernels (%.9g round-trips f32).
    let to32 = |v: &[f64]| v.iter().map(|&x| x as f32).collect::<Vec<f32>>();
    let x = expected(&to32(&z), &to32(&e), &to32(&s), &to32(&f), &labels);
    assert_eq!(nums::<f32>(&out, "f32.anchor_confidence"), x.conf);
    assert_eq!(nums::<f32>(&out, "f32.grad_anchor_logits"), x.grad_logits);
    assert_eq!(nums::<f32>(&out, "f32.semantic_anchors"), x.semantic);
    assert_eq!(nums::<f32>(&out, "f32.grad_features"), x.grad_features);
    let report: Vec<f64> = nums(&out, "f32.report");
    assert_eq!(report[0], f64::from(x.report.loss_aux));
    assert_eq!(report[1], f64::from(x.report.loss_p2a));

    // Errors: status code, its name, and a message naming what is wrong.
    let err = |k: &str| out[&format!("err.{k}")][0].clone();
    let cases = [
        (
            "null_features",
            "1 SAR_ERR_NULL_POINTER `features` is a null pointer",
        ),
        (
            "null_options",
            "1 SAR_ERR_NULL_POINTER `options` is a null pointer",
        ),
        (
            "label",
            "5 SAR_ERR_LABEL p2a: label 3 at position 7 is out of range for 3 classes",
        ),
        (
            "zero_classes",
            "3 SAR_ERR_SHAPE tensor `anchor_logits`: shape must be [C, C] with C ≥ 1",
        ),
        (
            "rank",
            "3 SAR_ERR_SHAPE tensor `features`: shape must be [B, D, H, W] or [N, D] (rank 4 or 2)",
        ),
        ("tau", "6 SAR_ERR_PARAM config: tau = 2 is outside [0, 1]"),
        (
            "gate_enum",
            "6 SAR_ERR_PARAM gate must be SAR_GATE_GLOBAL (0) or SAR_GATE_PER_CLASS (1)",
        ),
        (
            "nan_logits",
            "7 SAR_ERR_NON_FINITE anchor_ce: anchor logits is not finite",
        ),
        (
            "ce_null_value",
            "1 SAR_ERR_NULL_POINTER `value` is a null pointer",
        ),
        (
            "ce_zero_classes",
            "3 SAR_ERR_SHAPE anchor_ce: classes must be at least 1",
        ),
        ("ok_after", "0 SAR_OK "),
    ];
    for (k, want) in cases {
        let got = err(k);
        assert!(got.starts_with(want), "{k}: got {got:?}, want {want:?}…");
    }
    assert_eq!(
        nums::<f64>(&out, "after_errors.semantic_anchors"),
        s,
        "failed calls left Â as it was"
    );
}
