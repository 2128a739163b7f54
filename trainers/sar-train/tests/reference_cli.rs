//! End-to-end tests of `sar reference`: the shipped example, values checked against naive
//! loops written here, and every class of bad input (non-zero exit, a message naming the
//! tensor, no output file).
use sar_train::tensorio::{serialize, OutTensor, TensorFile};
use std::path::{Path, PathBuf};
use std::process::Command;

const SAR: &str = env!("CARGO_BIN_EXE_sar");

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn write_case(dir: &Path, name: &str, tensors: &[(String, OutTensor)]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, serialize(tensors, Default::default()).unwrap()).unwrap();
    p
}

fn run(input: &Path, options: Option<&str>, output: &Path) -> (bool, String) {
    let mut cmd = Command::new(SAR);
    cmd.args(["reference", "--quiet", "--input"])
        .arg(input)
        .arg("--output")
        .arg(output);
    let opt_path;
    if let Some(json) = options {
        opt_path = output.with_extension("json");
        std::fs::write(&opt_path, json).unwrap();
        cmd.arg("--options").arg(&opt_path);
    }
    let out = cmd.output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn shipped_example_is_current() {
    let path = repo_root().join("examples/reference/case.safetensors");
    let want = serialize(&sar_train::reference::example_case(), Default::default()).unwrap();
    if std::env::var_os("SAR_BLESS").is_some() {
        std::fs::write(&path, &want).unwrap();
    }
    assert_eq!(
        std::fs::read(&path).unwrap(),
        want,
        "regenerate with SAR_BLESS=1 cargo test -p sar-train"
    );
}

#[test]
fn example_values_match_naive_loops() {
    let dir = tempfile::tempdir().unwrap();
    let input = repo_root().join("examples/reference/case.safetensors");
    let output = dir.path().join("out.safetensors");
    let (ok, err) = run(
        &input,
        Some(
            &std::fs::read_to_string(repo_root().join("examples/reference/options.json")).unwrap(),
        ),
        &output,
    );
    assert!(ok, "{err}");
    let case = TensorFile::open(&input).unwrap();
    let out = TensorFile::open(&output).unwrap();
    let z = case.f64("anchor_logits").unwrap().data;
    let e = case.f64("embedded_anchors").unwrap().data;
    let prev = case.f64("semantic_anchors").unwrap().data;
    let f = case.f64("features").unwrap().data;
    let y = case.i64("labels").unwrap().data;
    let (c, d, h, w) = (4usize, 6usize, 4usize, 4usize);
    // p_c by a plain softmax.
    let conf = out.f64("anchor_confidence").unwrap();
    assert_eq!(conf.shape, [c]);
    for r in 0..c {
        let row = &z[r * c..(r + 1) * c];
        let p = row[r].exp() / row.iter().map(|v| v.exp()).sum::<f64>();
        assert!((conf.data[r] - p).abs() < 1e-14);
    }
    // Gate passed (asserted by the example's design), so Â = αÂ₀ + (1−α)E.
    assert_eq!(out.f64("gate").unwrap().data, [1.0]);
    assert_eq!(out.f64("gate").unwrap().shape, Vec::<usize>::new());
    let sem = out.f64("semantic_anchors").unwrap().data;
    for i in 0..c * d {
        assert!((sem[i] - (0.999 * prev[i] + 0.001 * e[i])).abs() < 1e-15);
    }
    // p2a by a naive loop over the ×2-subsampled labels (rows/cols 0, 2, 4, 6).
    let mut valid = 0;
    let mut sum = 0.0;
    for py in 0..h {
        for px in 0..w {
            let l = y[(2 * py) * 8 + 2 * px];
            if l == 255 {
                continue;
            }
            valid += 1;
            for k in 0..d {
                let diff = f[(k * h + py) * w + px] - sem[l as usize * d + k];
                sum += diff * diff;
            }
        }
    }
    assert_eq!(valid, 12);
    let l_p2a = out.f64("loss_p2a").unwrap().data[0];
    assert!((l_p2a - sum / (valid * d) as f64).abs() < 1e-14);
    let l_aux = out.f64("loss_aux").unwrap().data[0];
    assert!(l_aux > 0.0);
    let l_sar = out.f64("loss_sar").unwrap().data[0];
    assert!((l_sar - (l_aux + 0.1 * l_p2a)).abs() < 1e-15);
    assert_eq!(out.f64("grad_features").unwrap().shape, [1, d, h, w]);
    assert_eq!(out.f64("grad_anchor_logits").unwrap().shape, [c, c]);
}

fn rows_case(labels: &[i64]) -> Vec<(String, OutTensor)> {
    vec![
        (
            "anchor_logits".into(),
            OutTensor::f64(&[2, 2], &[5.0, 0.0, 0.0, 5.0]),
        ),
        (
            "embedded_anchors".into(),
            OutTensor::f64(&[2, 3], &[1.0, 0.0, 0.0, 0.0, 1.0, 0.0]),
        ),
        (
            "features".into(),
            OutTensor::f64(&[labels.len(), 3], &vec![0.5; labels.len() * 3]),
        ),
        ("labels".into(), OutTensor::i64(&[labels.len()], labels)),
    ]
}

#[test]
fn rows_per_class_and_first_initialisation() {
    let dir = tempfile::tempdir().unwrap();
    let input = write_case(dir.path(), "rows.safetensors", &rows_case(&[0, 1, 1]));
    let output = dir.path().join("out.safetensors");
    let (ok, err) = run(
        &input,
        Some(r#"{"gate": "per-class", "weights": "detached"}"#),
        &output,
    );
    assert!(ok, "{err}");
    let out = TensorFile::open(&output).unwrap();
    assert_eq!(out.f64("gate").unwrap().data, [1.0, 1.0]);
    assert_eq!(out.f64("initialized").unwrap().data, [1.0, 1.0]);
    // First pass copies E; L_p2a = mean over rows and D of (0.5 − Â)².
    assert_eq!(
        out.f64("semantic_anchors").unwrap().data,
        [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    );
    assert!((out.f64("loss_p2a").unwrap().data[0] - 0.25).abs() < 1e-15);
}

#[test]
fn f32_inputs_are_accepted() {
    let dir = tempfile::tempdir().unwrap();
    let mut case = rows_case(&[0, 1]);
    for (_, t) in case.iter_mut().filter(|(n, _)| n != "labels") {
        let v: Vec<f32> = t
            .bytes
            .chunks(8)
            .map(|b| f64::from_le_bytes(b.try_into().unwrap()) as f32)
            .collect();
        *t = OutTensor {
            dtype: safetensors::Dtype::F32,
            shape: t.shape.clone(),
            bytes: v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        };
    }
    let input = write_case(dir.path(), "f32.safetensors", &case);
    let (ok, err) = run(&input, None, &dir.path().join("out.safetensors"));
    assert!(ok, "{err}");
}

/// One bad case: name, tensors, options, and a fragment the message must contain.
type BadCase<'a> = (&'a str, Vec<(String, OutTensor)>, Option<&'a str>, &'a str);

#[test]
fn bad_inputs_fail_cleanly_without_output() {
    let dir = tempfile::tempdir().unwrap();
    let good = rows_case(&[0, 1]);
    let replace = |name: &str, t: OutTensor| -> Vec<(String, OutTensor)> {
        good.iter()
            .map(|(n, v)| {
                if n == name {
                    (n.clone(), t.clone())
                } else {
                    (n.clone(), v.clone())
                }
            })
            .collect()
    };
    let without = |name: &str| -> Vec<(String, OutTensor)> {
        good.iter().filter(|(n, _)| n != name).cloned().collect()
    };
    let cases: Vec<BadCase> = vec![
        (
            "label_out_of_range",
            replace("labels", OutTensor::i64(&[2], &[0, 2])),
            None,
            "tensor `labels`: value 2 at flat index 1",
        ),
        (
            "negative_label",
            replace("labels", OutTensor::i64(&[2], &[-1, 0])),
            None,
            "tensor `labels`: value -1",
        ),
        (
            "mismatched_d",
            replace("embedded_anchors", OutTensor::f64(&[2, 2], &[0.0; 4])),
            None,
            "tensor `embedded_anchors` has shape [2, 2]",
        ),
        (
            "non_square_logits",
            replace("anchor_logits", OutTensor::f64(&[2, 3], &[0.0; 6])),
            None,
            "tensor `anchor_logits` has shape [2, 3]",
        ),
        (
            "wrong_dtype",
            replace(
                "labels",
                OutTensor {
                    dtype: safetensors::Dtype::F16,
                    shape: vec![2],
                    bytes: vec![0; 4],
                },
            ),
            None,
            "tensor `labels` has dtype F16",
        ),
        (
            "missing_tensor",
            without("features"),
            None,
            "missing tensor `features`",
        ),
        (
            "nan_feature",
            replace(
                "features",
                OutTensor::f64(&[2, 3], &[0.0, f64::NAN, 0.0, 0.0, 0.0, 0.0]),
            ),
            None,
            "tensor `features` holds a non-finite value at flat index 1",
        ),
        (
            "label_count",
            replace("labels", OutTensor::i64(&[3], &[0, 1, 1])),
            None,
            "tensor `labels` has shape [3]",
        ),
        (
            "bad_option",
            good.clone(),
            Some(r#"{"alpha": 1.0}"#),
            "alpha = 1 is outside [0, 1)",
        ),
        (
            "unknown_option",
            good.clone(),
            Some(r#"{"gates": "global"}"#),
            "unknown field `gates`",
        ),
        (
            "bad_gate",
            good.clone(),
            Some(r#"{"gate": "sometimes"}"#),
            "unknown variant `sometimes`",
        ),
        (
            "initialized_without_anchors",
            {
                let mut v = good.clone();
                v.push(("initialized".into(), OutTensor::f64(&[], &[1.0])));
                v
            },
            None,
            "`semantic_anchors` is missing",
        ),
    ];
    for (name, tensors, options, want) in cases {
        let input = write_case(dir.path(), &format!("{name}.safetensors"), &tensors);
        let output = dir.path().join(format!("{name}.out.safetensors"));
        let (ok, err) = run(&input, options, &output);
        assert!(!ok, "{name} should fail");
        assert!(err.contains(want), "{name}: message {err:?} lacks {want:?}");
        assert_eq!(
            err.trim_end().lines().count(),
            1,
            "{name}: message is not one line: {err:?}"
        );
        assert!(!output.exists(), "{name}: output written despite the error");
    }
    // A corrupt file and a missing file.
    let corrupt = dir.path().join("corrupt.safetensors");
    std::fs::write(&corrupt, b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\":").unwrap();
    let (ok, err) = run(&corrupt, None, &dir.path().join("c.out"));
    assert!(!ok && err.contains("not a valid safetensors file"), "{err}");
    let (ok, err) = run(
        &dir.path().join("nope.safetensors"),
        None,
        &dir.path().join("n.out"),
    );
    assert!(!ok && err.contains("nope.safetensors"), "{err}");
    assert!(!dir.path().join("c.out").exists() && !dir.path().join("n.out").exists());
}
