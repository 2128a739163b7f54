//! `sar_rs._sar_rs`: the native module of the `sar_rs` Python package. Each function takes
//! C-contiguous NumPy arrays (the Python layer in `python/sar_rs/` makes them so and documents
//! the API), checks dtypes and shapes naming the tensor, releases the GIL and calls the
//! `sar-math` kernel (or `sar-capi`'s whole step). Errors are `ValueError`s. No SAR arithmetic
//! lives here.

use num_traits::Zero;
use numpy::ndarray::{ArrayD, IxDyn};
use numpy::{Element, IntoPyArray, PyArrayDyn, PyReadonlyArrayDyn, PyUntypedArrayMethods};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyDict;
use sar_math::anchor_ce::{anchor_ce as ce_kernel, gate as gate_kernel, AnchorCeBuffers};
use sar_math::p2a::{FeatureGeometry, P2aTargets, RowLabels};
use sar_math::state::StepBuffers;
use sar_math::{GateMode, Real, SarConfig, WeightMode};

type Arr<'py, T> = PyReadonlyArrayDyn<'py, T>;

fn err(msg: impl Into<String>) -> PyErr {
    PyValueError::new_err(msg.into())
}

fn sar_err(e: impl std::fmt::Display) -> PyErr {
    err(e.to_string())
}

fn dtype_name(obj: &Bound<'_, PyAny>) -> String {
    obj.getattr("dtype")
        .and_then(|d| d.str())
        .map(|s| s.to_string())
        .unwrap_or_else(|_| obj.get_type().to_string())
}

/// The array `obj` as `T`, or a `ValueError` naming the tensor and both dtypes.
fn arr<'py, T: Element>(name: &str, obj: &Bound<'py, PyAny>, want: &str) -> PyResult<Arr<'py, T>> {
    let a: Arr<'py, T> = obj.extract().map_err(|_| {
        err(format!(
            "tensor `{name}`: dtype must be {want}, got {}",
            dtype_name(obj)
        ))
    })?;
    if !a.is_c_contiguous() {
        return Err(err(format!("tensor `{name}`: must be C-contiguous")));
    }
    Ok(a)
}

fn slice<'a, T: Element>(name: &str, a: &'a Arr<'_, T>) -> PyResult<&'a [T]> {
    a.as_slice()
        .map_err(|_| err(format!("tensor `{name}`: must be C-contiguous")))
}

fn shape_err(name: &str, shape: &[usize], want: &str) -> PyErr {
    err(format!("tensor `{name}`: shape {shape:?}, expected {want}"))
}

/// Whether the primary float tensor is f64 (`true`) or f32; anything else is an error.
fn is_f64(name: &str, obj: &Bound<'_, PyAny>) -> PyResult<bool> {
    if obj.extract::<Arr<'_, f64>>().is_ok() {
        Ok(true)
    } else if obj.extract::<Arr<'_, f32>>().is_ok() {
        Ok(false)
    } else {
        Err(err(format!(
            "tensor `{name}`: dtype must be float32 or float64, got {}",
            dtype_name(obj)
        )))
    }
}

fn float_name<F: Real>() -> &'static str {
    if std::mem::size_of::<F>() == 8 {
        "float64 (the dtype of the first float tensor)"
    } else {
        "float32 (the dtype of the first float tensor)"
    }
}

fn out<'py, T: Element>(py: Python<'py>, shape: &[usize], v: Vec<T>) -> Bound<'py, PyArrayDyn<T>> {
    ArrayD::from_shape_vec(IxDyn(shape), v)
        .expect("shape matches the data")
        .into_pyarray(py)
}

fn weight_mode(s: &str) -> PyResult<WeightMode> {
    match s {
        "attached" => Ok(WeightMode::Attached),
        "detached" => Ok(WeightMode::Detached),
        "uniform" => Ok(WeightMode::Uniform),
        _ => Err(err(format!(
            "option `weights`: must be \"attached\", \"detached\" or \"uniform\", got {s:?}"
        ))),
    }
}

fn gate_mode(s: &str) -> PyResult<GateMode> {
    match s {
        "global" => Ok(GateMode::Global),
        "per-class" => Ok(GateMode::PerClass),
        _ => Err(err(format!(
            "option `gate`: must be \"global\" or \"per-class\", got {s:?}"
        ))),
    }
}

/// Dispatches a generic body on the dtype of the primary tensor.
macro_rules! by_dtype {
    ($name:literal, $obj:expr, $f:ident => $body:expr) => {
        if is_f64($name, $obj)? {
            type $f = f64;
            $body
        } else {
            type $f = f32;
            $body
        }
    };
}

fn square_logits<'py, F: Real + Element>(
    obj: &Bound<'py, PyAny>,
) -> PyResult<(Arr<'py, F>, usize)> {
    let z = arr::<F>("logits", obj, float_name::<F>())?;
    let c = match z.shape() {
        &[c, c2] if c == c2 && c > 0 => c,
        s => return Err(shape_err("logits", s, "[C, C] with C ≥ 1")),
    };
    Ok((z, c))
}

/// Anchor cross-entropy: `(loss, uncertain, nll_sum, confidence, nll, weights, grad_logits)`.
#[pyfunction]
#[allow(clippy::type_complexity)]
fn anchor_ce<'py>(
    py: Python<'py>,
    logits: &Bound<'py, PyAny>,
    tau: f64,
    weights: &str,
) -> PyResult<Bound<'py, PyAny>> {
    let mode = weight_mode(weights)?;
    by_dtype!("logits", logits, F => {
        let (z, c) = square_logits::<F>(logits)?;
        let zs = slice("logits", &z)?;
        let (mut p, mut l, mut w, mut g) = (vec![F::zero(); c], vec![F::zero(); c], vec![F::zero(); c], vec![F::zero(); c * c]);
        let v = py.detach(|| ce_kernel(zs, c, tau, mode, AnchorCeBuffers {
            confidence: &mut p, nll: &mut l, weights: &mut w, grad_logits: Some(&mut g) }))
            .map_err(sar_err)?;
        Ok((v.loss.as_f64(), v.uncertain, v.nll_sum.as_f64(), out(py, &[c], p), out(py, &[c], l),
            out(py, &[c], w), out(py, &[c, c], g)).into_pyobject(py)?.into_any())
    })
}

/// The δ gate: `(passed, pass[C])`.
#[pyfunction]
fn gate<'py>(
    py: Python<'py>,
    logits: &Bound<'py, PyAny>,
    nll: &Bound<'py, PyAny>,
    delta: f64,
    mode: &str,
) -> PyResult<Bound<'py, PyAny>> {
    let gm = gate_mode(mode)?;
    by_dtype!("logits", logits, F => {
        let (z, c) = square_logits::<F>(logits)?;
        let l = arr::<F>("nll", nll, float_name::<F>())?;
        if l.shape() != [c] {
            return Err(shape_err("nll", l.shape(), "[C]"));
        }
        let (zs, ls) = (slice("logits", &z)?, slice("nll", &l)?);
        let mut pass = vec![false; c];
        let passed = py.detach(|| gate_kernel(zs, c, ls, delta, gm, &mut pass)).map_err(sar_err)?;
        Ok((passed, out(py, &[c], pass)).into_pyobject(py)?.into_any())
    })
}

fn cd_shape(name: &str, shape: &[usize]) -> PyResult<(usize, usize)> {
    match *shape {
        [c, d] if c > 0 && d > 0 => Ok((c, d)),
        _ => Err(shape_err(name, shape, "[C, D] with C, D ≥ 1")),
    }
}

/// Global EMA: `(semantic', initialized', changed)`; the inputs are not modified.
#[pyfunction]
fn ema_update<'py>(
    py: Python<'py>,
    semantic: &Bound<'py, PyAny>,
    initialized: bool,
    embedded: &Bound<'py, PyAny>,
    alpha: f64,
    passed: bool,
) -> PyResult<Bound<'py, PyAny>> {
    by_dtype!("semantic", semantic, F => {
        let s = arr::<F>("semantic", semantic, float_name::<F>())?;
        let (c, d) = cd_shape("semantic", s.shape())?;
        let e = arr::<F>("embedded", embedded, float_name::<F>())?;
        if e.shape() != [c, d] {
            return Err(shape_err("embedded", e.shape(), "[C, D] as `semantic`"));
        }
        let mut sv = slice("semantic", &s)?.to_vec();
        let es = slice("embedded", &e)?;
        let mut init = initialized;
        let changed = py.detach(|| sar_math::ema::ema_update(&mut sv, &mut init, es, c, d, alpha, passed)).map_err(sar_err)?;
        Ok((out(py, &[c, d], sv), init, changed).into_pyobject(py)?.into_any())
    })
}

fn flags<'py>(name: &str, obj: &Bound<'py, PyAny>, c: usize) -> PyResult<Arr<'py, bool>> {
    let a = arr::<bool>(name, obj, "bool")?;
    if a.shape() != [c] {
        return Err(shape_err(name, a.shape(), &format!("[C] = [{c}]")));
    }
    Ok(a)
}

/// Per-class EMA: `(semantic', initialized', updated)`; the inputs are not modified.
#[pyfunction]
fn ema_update_per_class<'py>(
    py: Python<'py>,
    semantic: &Bound<'py, PyAny>,
    initialized: &Bound<'py, PyAny>,
    embedded: &Bound<'py, PyAny>,
    alpha: f64,
    passed: &Bound<'py, PyAny>,
) -> PyResult<Bound<'py, PyAny>> {
    by_dtype!("semantic", semantic, F => {
        let s = arr::<F>("semantic", semantic, float_name::<F>())?;
        let (c, d) = cd_shape("semantic", s.shape())?;
        let e = arr::<F>("embedded", embedded, float_name::<F>())?;
        if e.shape() != [c, d] {
            return Err(shape_err("embedded", e.shape(), "[C, D] as `semantic`"));
        }
        let i = flags("initialized", initialized, c)?;
        let p = flags("passed", passed, c)?;
        let mut sv = slice("semantic", &s)?.to_vec();
        let mut iv = slice("initialized", &i)?.to_vec();
        let (es, ps) = (slice("embedded", &e)?, slice("passed", &p)?);
        let n = py.detach(|| sar_math::ema::ema_update_per_class(&mut sv, &mut iv, es, c, d, alpha, ps)).map_err(sar_err)?;
        Ok((out(py, &[c, d], sv), out(py, &[c], iv), n).into_pyobject(py)?.into_any())
    })
}

fn labels<'py>(name: &str, obj: &Bound<'py, PyAny>) -> PyResult<Arr<'py, i64>> {
    arr::<i64>(name, obj, "int64")
}

/// Legacy-`nearest` label resampling of `[B, H', W']` int64 labels to `[B, out_h, out_w]`.
#[pyfunction]
fn resample_labels_nearest<'py>(
    py: Python<'py>,
    labels_in: &Bound<'py, PyAny>,
    out_h: usize,
    out_w: usize,
) -> PyResult<Bound<'py, PyArrayDyn<i64>>> {
    let l = labels("labels", labels_in)?;
    let &[b, h, w] = l.shape() else {
        return Err(shape_err("labels", l.shape(), "[B, H', W']"));
    };
    let ls = slice("labels", &l)?;
    let mut o = vec![0i64; b * out_h * out_w];
    py.detach(|| {
        sar_math::resample::resample_labels_nearest(ls, b, (h, w), (out_h, out_w), &mut o)
    })
    .map_err(sar_err)?;
    Ok(out(py, &[b, out_h, out_w], o))
}

/// Checks `[B, D, H, W]` features, `[B, H', W']` labels and `[C, D]` anchors.
fn nchw_geometry(
    f: &[usize],
    l: &[usize],
    a_name: &str,
    a: &[usize],
) -> PyResult<(FeatureGeometry, usize)> {
    let &[b, d, h, w] = f else {
        return Err(shape_err("features", f, "[B, D, H, W]"));
    };
    let &[lb, lh, lw] = l else {
        return Err(shape_err("labels", l, "[B, H', W']"));
    };
    if lb != b {
        return Err(shape_err(
            "labels",
            l,
            &format!("[B, H', W'] with B = {b} (from features)"),
        ));
    }
    let c = match *a {
        [c, ad] if ad == d && c > 0 => c,
        _ => {
            return Err(shape_err(
                a_name,
                a,
                &format!("[C, D] with D = {d} (from features)"),
            ))
        }
    };
    Ok((
        FeatureGeometry {
            batch: b,
            channels: d,
            height: h,
            width: w,
            label_height: lh,
            label_width: lw,
        },
        c,
    ))
}

fn active_flags<'py>(
    obj: Option<&Bound<'py, PyAny>>,
    c: usize,
) -> PyResult<Option<Arr<'py, bool>>> {
    obj.filter(|o| !o.is_none())
        .map(|o| flags("class_active", o, c))
        .transpose()
}

/// p2a for NCHW features: `(loss, valid, grad or None)`.
#[pyfunction]
#[pyo3(signature = (features, labels_in, anchors, ignore_index, class_active=None, grad=true))]
fn p2a_nchw<'py>(
    py: Python<'py>,
    features: &Bound<'py, PyAny>,
    labels_in: &Bound<'py, PyAny>,
    anchors: &Bound<'py, PyAny>,
    ignore_index: i64,
    class_active: Option<&Bound<'py, PyAny>>,
    grad: bool,
) -> PyResult<Bound<'py, PyAny>> {
    by_dtype!("features", features, F => {
        let f = arr::<F>("features", features, float_name::<F>())?;
        let l = labels("labels", labels_in)?;
        let a = arr::<F>("anchors", anchors, float_name::<F>())?;
        let (geometry, c) = nchw_geometry(f.shape(), l.shape(), "anchors", a.shape())?;
        let act = active_flags(class_active, c)?;
        let (fs, ls, as_) = (slice("features", &f)?, slice("labels", &l)?, slice("anchors", &a)?);
        let acts = act.as_ref().map(|x| slice("class_active", x)).transpose()?;
        let mut g = if grad { vec![F::zero(); fs.len()] } else { Vec::new() };
        let t = P2aTargets { anchors: as_, classes: c, ignore_index, class_active: acts };
        let v = py.detach(|| sar_math::p2a::p2a_nchw(fs, ls, &geometry, &t, grad.then_some(&mut g[..]))).map_err(sar_err)?;
        let g = grad.then(|| out(py, f.shape(), g));
        Ok((v.loss.as_f64(), v.valid, g).into_pyobject(py)?.into_any())
    })
}

fn rows_shapes(f: &[usize], a: &[usize]) -> PyResult<(usize, usize, usize)> {
    let &[n, d] = f else {
        return Err(shape_err("features", f, "[N, D]"));
    };
    match *a {
        [c, ad] if ad == d && c > 0 && d > 0 => Ok((n, d, c)),
        _ => Err(shape_err(
            "anchors",
            a,
            &format!("[C, D] with D = {d} (from features)"),
        )),
    }
}

/// p2a for `[N, D]` rows, plain (`labels_b` None) or MixUp: `(loss, valid, grad or None)`.
#[pyfunction]
#[pyo3(signature = (features, labels_a, anchors, ignore_index, labels_b=None, lam=1.0, class_active=None, grad=true))]
#[allow(clippy::too_many_arguments)]
fn p2a_rows<'py>(
    py: Python<'py>,
    features: &Bound<'py, PyAny>,
    labels_a: &Bound<'py, PyAny>,
    anchors: &Bound<'py, PyAny>,
    ignore_index: i64,
    labels_b: Option<&Bound<'py, PyAny>>,
    lam: f64,
    class_active: Option<&Bound<'py, PyAny>>,
    grad: bool,
) -> PyResult<Bound<'py, PyAny>> {
    by_dtype!("features", features, F => {
        let f = arr::<F>("features", features, float_name::<F>())?;
        let a = arr::<F>("anchors", anchors, float_name::<F>())?;
        let (n, d, c) = rows_shapes(f.shape(), a.shape())?;
        let la = labels(if labels_b.is_some() { "labels_a" } else { "labels" }, labels_a)?;
        if la.shape() != [n] {
            return Err(shape_err("labels", la.shape(), &format!("[N] = [{n}]")));
        }
        let lb = labels_b.filter(|o| !o.is_none()).map(|o| labels("labels_b", o)).transpose()?;
        if let Some(lb) = &lb {
            if lb.shape() != [n] {
                return Err(shape_err("labels_b", lb.shape(), &format!("[N] = [{n}]")));
            }
        }
        let act = active_flags(class_active, c)?;
        let (fs, as_, las) = (slice("features", &f)?, slice("anchors", &a)?, slice("labels", &la)?);
        let lbs = lb.as_ref().map(|x| slice("labels_b", x)).transpose()?;
        let acts = act.as_ref().map(|x| slice("class_active", x)).transpose()?;
        let rl = match lbs {
            Some(b) => RowLabels::Mixup { a: las, b, lambda: lam },
            None => RowLabels::Plain(las),
        };
        let mut g = if grad { vec![F::zero(); fs.len()] } else { Vec::new() };
        let t = P2aTargets { anchors: as_, classes: c, ignore_index, class_active: acts };
        let v = py.detach(|| sar_math::p2a::p2a_rows(fs, rl, d, &t, grad.then_some(&mut g[..]))).map_err(sar_err)?;
        let g = grad.then(|| out(py, &[n, d], g));
        Ok((v.loss.as_f64(), v.valid, g).into_pyobject(py)?.into_any())
    })
}

/// Class prototypes: `(prototypes [C, D], counts [C] uint64)`.
#[pyfunction]
#[pyo3(signature = (features, labels_in, classes, ignore_index, class_active=None))]
fn class_prototypes<'py>(
    py: Python<'py>,
    features: &Bound<'py, PyAny>,
    labels_in: &Bound<'py, PyAny>,
    classes: usize,
    ignore_index: i64,
    class_active: Option<&Bound<'py, PyAny>>,
) -> PyResult<Bound<'py, PyAny>> {
    by_dtype!("features", features, F => {
        let f = arr::<F>("features", features, float_name::<F>())?;
        let l = labels("labels", labels_in)?;
        let d = f.shape().get(1).copied().unwrap_or(0);
        let (geometry, c) = nchw_geometry(f.shape(), l.shape(), "classes", &[classes, d])?;
        let act = active_flags(class_active, c)?;
        let (fs, ls) = (slice("features", &f)?, slice("labels", &l)?);
        let acts = act.as_ref().map(|x| slice("class_active", x)).transpose()?;
        let shape = vec![F::zero(); c * d]; // the kernel reads only its length
        let (mut p, mut n) = (vec![F::zero(); c * d], vec![0u64; c]);
        let t = P2aTargets { anchors: &shape, classes: c, ignore_index, class_active: acts };
        py.detach(|| sar_math::prototype::class_prototypes(fs, ls, &geometry, &t, &mut p, &mut n)).map_err(sar_err)?;
        Ok((out(py, &[c, d], p), out(py, &[c], n)).into_pyobject(py)?.into_any())
    })
}

/// CAR intra-class loss: `(loss, grad or None)`.
#[pyfunction]
#[pyo3(signature = (features, labels_in, prototypes, ignore_index, class_active=None, grad=true))]
fn car_intra_class<'py>(
    py: Python<'py>,
    features: &Bound<'py, PyAny>,
    labels_in: &Bound<'py, PyAny>,
    prototypes: &Bound<'py, PyAny>,
    ignore_index: i64,
    class_active: Option<&Bound<'py, PyAny>>,
    grad: bool,
) -> PyResult<Bound<'py, PyAny>> {
    by_dtype!("features", features, F => {
        let f = arr::<F>("features", features, float_name::<F>())?;
        let l = labels("labels", labels_in)?;
        let a = arr::<F>("prototypes", prototypes, float_name::<F>())?;
        let (geometry, c) = nchw_geometry(f.shape(), l.shape(), "prototypes", a.shape())?;
        let act = active_flags(class_active, c)?;
        let (fs, ls, as_) = (slice("features", &f)?, slice("labels", &l)?, slice("prototypes", &a)?);
        let acts = act.as_ref().map(|x| slice("class_active", x)).transpose()?;
        let mut g = if grad { vec![F::zero(); fs.len()] } else { Vec::new() };
        let t = P2aTargets { anchors: as_, classes: c, ignore_index, class_active: acts };
        let loss = py.detach(|| sar_math::prototype::car_intra_class(fs, ls, &geometry, &t, grad.then_some(&mut g[..]))).map_err(sar_err)?;
        let g = grad.then(|| out(py, f.shape(), g));
        Ok((loss.as_f64(), g).into_pyobject(py)?.into_any())
    })
}

/// Pre-defined anchors A `[C, D]` (`kind`: "normal", "orthogonal", "simplex-etf").
#[pyfunction]
fn generate_anchors<'py>(
    py: Python<'py>,
    kind: &str,
    seed: u64,
    classes: usize,
    dim: usize,
    double: bool,
) -> PyResult<Bound<'py, PyAny>> {
    let k = match kind {
        "normal" => sar_math::AnchorKind::Normal,
        "orthogonal" => sar_math::AnchorKind::Orthogonal,
        "simplex-etf" => sar_math::AnchorKind::SimplexEtf,
        _ => {
            return Err(err(format!(
                "`kind`: must be \"normal\", \"orthogonal\" or \"simplex-etf\", got {kind:?}"
            )))
        }
    };
    fn run<F: Real + Element>(
        py: Python<'_>,
        k: sar_math::AnchorKind,
        seed: u64,
        c: usize,
        d: usize,
    ) -> PyResult<Bound<'_, PyAny>> {
        let n = c
            .checked_mul(d)
            .ok_or_else(|| err("classes × dim overflows"))?;
        let mut o = vec![F::zero(); n];
        sar_math::anchors::generate_anchors(k, seed, c, d, &mut o).map_err(sar_err)?;
        Ok(out(py, &[c, d], o).into_any())
    }
    if double {
        run::<f64>(py, k, seed, classes, dim)
    } else {
        run::<f32>(py, k, seed, classes, dim)
    }
}

/// The options dict of `sar reference` (every key optional, unknown keys rejected).
fn config(options: Option<&Bound<'_, PyDict>>) -> PyResult<SarConfig> {
    let mut c = SarConfig::default();
    if let Some(o) = options {
        for (k, v) in o.iter() {
            let key: String = k
                .extract()
                .map_err(|_| err("option names must be strings"))?;
            let num = |v: &Bound<'_, PyAny>| -> PyResult<f64> {
                v.extract::<f64>()
                    .map_err(|_| err(format!("option `{key}`: must be a number")))
            };
            match key.as_str() {
                "tau" => c.tau = num(&v)?,
                "delta" => c.delta = num(&v)?,
                "alpha" => c.alpha = num(&v)?,
                "lambda_aux" => c.lambda_aux = num(&v)?,
                "lambda_p2a" => c.lambda_p2a = num(&v)?,
                "ignore_index" => {
                    c.ignore_index = v.extract().map_err(|_| err("option `ignore_index`: must be an integer"))?
                }
                "gate" => c.gate = gate_mode(&v.extract::<String>().map_err(|_| err("option `gate`: must be a string"))?)?,
                "weights" => c.weights = weight_mode(&v.extract::<String>().map_err(|_| err("option `weights`: must be a string"))?)?,
                _ => return Err(err(format!(
                    "unknown option `{key}` (known: tau, delta, alpha, lambda_aux, lambda_p2a, ignore_index, gate, weights)"
                ))),
            }
        }
    }
    c.validate().map_err(|e| err(format!("options: {e}")))?;
    Ok(c)
}

/// One whole SAR step (`sar-capi`'s, equal to `sar reference`) in the dtype of
/// `anchor_logits`. Returns a dict: `anchor_confidence`, `anchor_nll`, `anchor_weights`,
/// `loss_aux`, `grad_anchor_logits`, `class_pass` (bool `[C]`), `gate_passed`,
/// `semantic_anchors`, `initialized` (bool `[C]`), `loss_p2a`, `grad_features`, `loss_sar`,
/// `valid`, `uncertain`, `updated_classes`. The input arrays are not modified.
#[pyfunction]
#[pyo3(signature = (anchor_logits, embedded_anchors, semantic_anchors, initialized, features, labels_in, options=None))]
#[allow(clippy::too_many_arguments)]
fn step<'py>(
    py: Python<'py>,
    anchor_logits: &Bound<'py, PyAny>,
    embedded_anchors: &Bound<'py, PyAny>,
    semantic_anchors: &Bound<'py, PyAny>,
    initialized: &Bound<'py, PyAny>,
    features: &Bound<'py, PyAny>,
    labels_in: &Bound<'py, PyAny>,
    options: Option<&Bound<'py, PyDict>>,
) -> PyResult<Bound<'py, PyDict>> {
    let cfg = config(options)?;
    by_dtype!("anchor_logits", anchor_logits, F => {
        let want = float_name::<F>();
        let z = arr::<F>("anchor_logits", anchor_logits, want)?;
        let c = match z.shape() {
            &[c, c2] if c == c2 && c > 0 => c,
            s => return Err(shape_err("anchor_logits", s, "[C, C] with C ≥ 1")),
        };
        let f = arr::<F>("features", features, want)?;
        let d = match f.shape() {
            &[_, d, _, _] | &[_, d] if d > 0 => d,
            s => return Err(shape_err("features", s, "[B, D, H, W] or [N, D] with D ≥ 1")),
        };
        let e = arr::<F>("embedded_anchors", embedded_anchors, want)?;
        if e.shape() != [c, d] {
            return Err(shape_err("embedded_anchors", e.shape(), &format!("[C, D] = [{c}, {d}] (C from anchor_logits, D from features)")));
        }
        let s = arr::<F>("semantic_anchors", semantic_anchors, want)?;
        if s.shape() != [c, d] {
            return Err(shape_err("semantic_anchors", s.shape(), &format!("[C, D] = [{c}, {d}]")));
        }
        let i = flags("initialized", initialized, c)?;
        let l = labels("labels", labels_in)?;
        let (fshape, lshape) = (f.shape().to_vec(), l.shape().to_vec());
        let case = sar_capi::StepCase {
            classes: c,
            dim: d,
            anchor_logits: slice("anchor_logits", &z)?,
            embedded_anchors: slice("embedded_anchors", &e)?,
            features: slice("features", &f)?,
            feature_shape: &fshape,
            labels: slice("labels", &l)?,
            label_shape: &lshape,
        };
        let mut sem = slice("semantic_anchors", &s)?.to_vec();
        let mut init = slice("initialized", &i)?.to_vec();
        let zero = F::zero();
        let (mut p, mut nll, mut w, mut pass) = (vec![zero; c], vec![zero; c], vec![zero; c], vec![false; c]);
        let (mut gl, mut gf) = (vec![zero; c * c], vec![zero; case.features.len()]);
        let r = py.detach(|| sar_capi::step(&cfg, &case, &mut sem, &mut init, StepBuffers {
            confidence: &mut p, nll: &mut nll, weights: &mut w, class_pass: &mut pass,
            grad_logits: Some(&mut gl), grad_features: Some(&mut gf),
        })).map_err(sar_err)?;
        let dict = PyDict::new(py);
        dict.set_item("anchor_confidence", out(py, &[c], p))?;
        dict.set_item("anchor_nll", out(py, &[c], nll))?;
        dict.set_item("anchor_weights", out(py, &[c], w))?;
        dict.set_item("loss_aux", r.loss_aux.as_f64())?;
        dict.set_item("grad_anchor_logits", out(py, &[c, c], gl))?;
        dict.set_item("class_pass", out(py, &[c], pass))?;
        dict.set_item("gate_passed", r.gate_passed)?;
        dict.set_item("semantic_anchors", out(py, &[c, d], sem))?;
        dict.set_item("initialized", out(py, &[c], init))?;
        dict.set_item("loss_p2a", r.loss_p2a.as_f64())?;
        dict.set_item("grad_features", out(py, &fshape, gf))?;
        dict.set_item("loss_sar", r.loss_sar.as_f64())?;
        dict.set_item("valid", r.valid)?;
        dict.set_item("uncertain", r.uncertain)?;
        dict.set_item("updated_classes", r.updated_classes)?;
        Ok(dict)
    })
}

/// The validated options as a dict with every key (the defaults filled in).
#[pyfunction]
#[pyo3(signature = (options=None))]
fn options<'py>(
    py: Python<'py>,
    options: Option<&Bound<'py, PyDict>>,
) -> PyResult<Bound<'py, PyDict>> {
    let c = config(options)?;
    let d = PyDict::new(py);
    d.set_item("tau", c.tau)?;
    d.set_item("delta", c.delta)?;
    d.set_item("alpha", c.alpha)?;
    d.set_item("lambda_aux", c.lambda_aux)?;
    d.set_item("lambda_p2a", c.lambda_p2a)?;
    d.set_item("ignore_index", c.ignore_index)?;
    d.set_item(
        "gate",
        match c.gate {
            GateMode::Global => "global",
            GateMode::PerClass => "per-class",
        },
    )?;
    d.set_item(
        "weights",
        match c.weights {
            WeightMode::Attached => "attached",
            WeightMode::Detached => "detached",
            WeightMode::Uniform => "uniform",
        },
    )?;
    Ok(d)
}

/// Does nothing, for measuring the call overhead of the binding.
#[pyfunction]
fn noop() {}

#[pymodule]
fn _sar_rs(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(anchor_ce, m)?)?;
    m.add_function(wrap_pyfunction!(gate, m)?)?;
    m.add_function(wrap_pyfunction!(ema_update, m)?)?;
    m.add_function(wrap_pyfunction!(ema_update_per_class, m)?)?;
    m.add_function(wrap_pyfunction!(resample_labels_nearest, m)?)?;
    m.add_function(wrap_pyfunction!(p2a_nchw, m)?)?;
    m.add_function(wrap_pyfunction!(p2a_rows, m)?)?;
    m.add_function(wrap_pyfunction!(class_prototypes, m)?)?;
    m.add_function(wrap_pyfunction!(car_intra_class, m)?)?;
    m.add_function(wrap_pyfunction!(generate_anchors, m)?)?;
    m.add_function(wrap_pyfunction!(step, m)?)?;
    m.add_function(wrap_pyfunction!(options, m)?)?;
    m.add_function(wrap_pyfunction!(noop, m)?)?;
    Ok(())
}
