"""sar_rs.reference against the Rust program `sar reference`, and every kernel against the
values of sar-math's whole step (the example case and random cases)."""
import numpy as np
import pytest

import sar_rs
from sar_rs.testing import KINDS, make_case


def test_reference_equals_the_sar_program_on_the_example_case(example_case, example_expected):
    case, opts = example_case
    out = sar_rs.reference(case, opts)
    assert tuple(out) == sar_rs.OUTPUT_NAMES
    assert set(out) == set(example_expected)
    for name, want in example_expected.items():
        got = out[name]
        assert got.dtype == np.float64 and got.shape == want.shape, name
        np.testing.assert_array_equal(got, want, err_msg=name)  # same code, same bits
    assert out["gate"] == 1.0 and out["loss_p2a"] > 0


def _kernels_agree(inputs, opts):
    """Composes the kernels as the spec's order and compares with reference()."""
    o = sar_rs.options(opts)
    ref = sar_rs.reference(inputs, opts)
    z = inputs["anchor_logits"]
    ce = sar_rs.anchor_ce(z, o["tau"], o["weights"])
    np.testing.assert_array_equal(ce["confidence"], ref["anchor_confidence"])
    np.testing.assert_array_equal(ce["nll"], ref["anchor_nll"])
    np.testing.assert_array_equal(ce["weights"], ref["anchor_weights"])
    np.testing.assert_array_equal(ce["grad_logits"], ref["grad_anchor_logits"])
    assert ce["loss"] == ref["loss_aux"]
    passed, passes = sar_rs.gate(z, ce["nll"], o["delta"], o["gate"])
    per_class = o["gate"] == "per-class"
    np.testing.assert_array_equal(passes.astype(float) if per_class else float(passed), ref["gate"])
    c, d = inputs["embedded_anchors"].shape
    sem = inputs.get("semantic_anchors", np.zeros((c, d)))
    init = np.broadcast_to(np.asarray(inputs.get("initialized", "semantic_anchors" in inputs)), (c,))
    if per_class:
        sem2, init2, _ = sar_rs.ema_update_per_class(sem, init, inputs["embedded_anchors"], o["alpha"], passes)
    else:
        sem2, i2, _ = sar_rs.ema_update(sem, bool(init[0]), inputs["embedded_anchors"], o["alpha"], passed)
        init2 = np.full(c, i2)
    np.testing.assert_array_equal(sem2, ref["semantic_anchors"])
    np.testing.assert_array_equal(init2.astype(float) if per_class else float(init2.all()), ref["initialized"])
    f, y = inputs["features"], inputs["labels"]
    act = passes if per_class else None
    if not passed:
        assert ref["loss_p2a"] == 0 and not ref["grad_features"].any()
        return
    if f.ndim == 4:
        loss, valid, g = sar_rs.p2a_nchw(f, y, sem2, o["ignore_index"], act)
        # the same through explicit resampling + the rows kernel
        yr = sar_rs.resample_labels_nearest(y, f.shape[2:])
        rows = np.moveaxis(f, 1, -1).reshape(-1, d)
        loss_r, valid_r, _ = sar_rs.p2a_rows(rows, yr.reshape(-1), sem2, o["ignore_index"], class_active=act)
        assert valid_r == valid and loss_r == pytest.approx(loss, rel=1e-12)
    else:
        loss, valid, g = sar_rs.p2a_rows(f, y, sem2, o["ignore_index"], class_active=act)
    assert loss == ref["loss_p2a"]
    np.testing.assert_array_equal(g, ref["grad_features"])
    assert ref["loss_sar"] == o["lambda_aux"] * ce["loss"] + o["lambda_p2a"] * loss


def test_kernels_compose_to_the_reference_on_the_example_case(example_case):
    _kernels_agree(*example_case)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("kind", KINDS)
def test_kernels_compose_to_the_reference_on_random_cases(kind, seed):
    rng = np.random.default_rng(1000 * seed + KINDS.index(kind))
    _kernels_agree(*make_case(kind, rng))


def test_float32_kernels_and_state():
    rng = np.random.default_rng(3)
    inputs, _ = make_case("random", rng)
    c, d = inputs["embedded_anchors"].shape
    z32 = inputs["anchor_logits"].astype(np.float32)
    ce = sar_rs.anchor_ce(z32)
    assert ce["grad_logits"].dtype == np.float32
    assert np.allclose(ce["confidence"], sar_rs.anchor_ce(inputs["anchor_logits"])["confidence"], rtol=1e-5)
    st = sar_rs.SarState(c, d, dtype=np.float32)
    out = st.step(z32, inputs["embedded_anchors"], inputs["features"], inputs["labels"])
    assert out["grad_features"].dtype == np.float32
    ref = sar_rs.reference({k: v for k, v in inputs.items() if k != "semantic_anchors"})
    np.testing.assert_allclose(out["grad_features"], ref["grad_features"], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(st.semantic_anchors, ref["semantic_anchors"], rtol=1e-6)


def test_sar_state_steps_like_repeated_reference_calls():
    rng = np.random.default_rng(5)
    inputs, _ = make_case("random", rng)
    c, d = inputs["embedded_anchors"].shape
    z = inputs["anchor_logits"].copy()
    z[np.arange(c), np.arange(c)] += 10  # gate passes
    st = sar_rs.SarState(c, d, alpha=0.5)
    case = dict(anchor_logits=z, embedded_anchors=inputs["embedded_anchors"],
                features=inputs["features"], labels=inputs["labels"])
    ref_sem = None
    for i in range(3):
        out = st.step(z, inputs["embedded_anchors"] * (i + 1), inputs["features"], inputs["labels"])
        c2 = dict(case, embedded_anchors=inputs["embedded_anchors"] * (i + 1))
        if ref_sem is not None:
            c2["semantic_anchors"] = ref_sem
        ref = sar_rs.reference(c2, {"alpha": 0.5})
        ref_sem = ref["semantic_anchors"]
        np.testing.assert_array_equal(st.semantic_anchors, ref_sem)
        assert out["loss_sar"] == ref["loss_sar"]
    assert st.gate_passed and st.initialized.all()
    saved = st.state_dict()
    st2 = sar_rs.SarState(c, d, alpha=0.5)
    st2.load_state_dict(saved)
    np.testing.assert_array_equal(st2.semantic_anchors, st.semantic_anchors)


def test_prototypes_car_and_anchors():
    rng = np.random.default_rng(7)
    f = rng.normal(size=(2, 3, 4, 4))
    y = rng.integers(0, 3, size=(2, 4, 4))
    y[0, 0, 0] = 255
    p, n = sar_rs.class_prototypes(f, y, 3)
    rows = np.moveaxis(f, 1, -1).reshape(-1, 3)
    lab = y.reshape(-1)
    for k in range(3):
        assert n[k] == (lab == k).sum()
        np.testing.assert_allclose(p[k], rows[lab == k].mean(axis=0), rtol=1e-12)
    loss, g = sar_rs.car_intra_class(f, y, p)
    m = np.abs(rows[lab != 255] - p[lab[lab != 255]]).sum() / rows.size
    assert loss == pytest.approx(max(m * m, 1e-5), rel=1e-12)
    assert g.shape == f.shape
    a = sar_rs.generate_anchors("orthogonal", 1, 4, 6)
    np.testing.assert_allclose(a @ a.T, np.eye(4), atol=1e-12)
    assert sar_rs.generate_anchors("normal", 1, 2, 3, np.float32).dtype == np.float32


def test_non_contiguous_inputs_are_accepted():
    rng = np.random.default_rng(9)
    z = rng.normal(size=(4, 4))
    assert sar_rs.anchor_ce(z.T)["loss"] == sar_rs.anchor_ce(np.ascontiguousarray(z.T))["loss"]
