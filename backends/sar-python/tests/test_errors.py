"""Bad input raises ValueError naming the tensor or option, never a crash."""
import numpy as np
import pytest

import sar_rs
from sar_rs.testing import make_case


@pytest.fixture
def case():
    inputs, _ = make_case("random", np.random.default_rng(0))
    return inputs


def test_wrong_dtype(case):
    with pytest.raises(ValueError, match="tensor `anchor_logits`: dtype"):
        sar_rs.reference(dict(case, anchor_logits=case["anchor_logits"].astype(np.int32)))
    with pytest.raises(ValueError, match="tensor `labels`: dtype"):
        sar_rs.reference(dict(case, labels=case["labels"].astype(np.float64)))
    with pytest.raises(ValueError, match="tensor `logits`: dtype"):
        sar_rs.anchor_ce(np.zeros((2, 2), dtype=np.complex128))
    with pytest.raises(ValueError, match="tensor `anchors`: dtype"):
        sar_rs._native.p2a_rows(np.zeros((1, 2)), np.zeros(1, np.int64), np.zeros((1, 2), np.float32), 255)


def test_wrong_shape(case):
    c, d = case["embedded_anchors"].shape
    with pytest.raises(ValueError, match="tensor `embedded_anchors`: shape"):
        sar_rs.reference(dict(case, embedded_anchors=np.zeros((c, d + 1))))
    with pytest.raises(ValueError, match="tensor `anchor_logits`: shape"):
        sar_rs.reference(dict(case, anchor_logits=np.zeros((c, c + 1))))
    with pytest.raises(ValueError, match="tensor `features`: shape"):
        sar_rs.reference(dict(case, features=np.zeros((2, d, 3))))
    with pytest.raises(ValueError, match="tensor `labels`"):
        sar_rs.reference(dict(case, labels=case["labels"][:, :1, :1].repeat(2, axis=0)))
    with pytest.raises(ValueError, match="tensor `semantic_anchors`: shape"):
        sar_rs.reference(dict(case, semantic_anchors=np.zeros((c + 1, d))))
    with pytest.raises(ValueError, match="tensor `initialized`"):
        sar_rs.reference(dict(case, initialized=np.ones(c + 1)))
    with pytest.raises(ValueError, match="tensor `features`: shape"):
        sar_rs.p2a_nchw(np.zeros((1, 2, 3)), np.zeros((1, 3, 3), np.int64), np.zeros((2, 2)))
    with pytest.raises(ValueError, match="tensor `nll`: shape"):
        sar_rs.gate(np.zeros((3, 3)), np.zeros(2))


def test_label_out_of_range(case):
    c = case["anchor_logits"].shape[0]
    y = case["labels"].copy()
    y.reshape(-1)[5] = c
    with pytest.raises(ValueError, match=f"label {c} at position 5 is out of range"):
        sar_rs.reference(dict(case, labels=y))
    with pytest.raises(ValueError, match="label -1"):
        sar_rs.p2a_rows(np.zeros((1, 2)), [-1], np.zeros((2, 2)))


def test_nan(case):
    z = case["anchor_logits"].copy()
    z[0, 1] = np.nan
    with pytest.raises(ValueError, match="anchor logits is not finite"):
        sar_rs.reference(dict(case, anchor_logits=z))
    e = case["embedded_anchors"].copy()
    e[0, 0] = np.inf
    with pytest.raises(ValueError, match="embedded anchors is not finite"):
        sar_rs.reference(dict(case, embedded_anchors=e))


def test_options_and_names(case):
    with pytest.raises(ValueError, match="unknown option `taux`"):
        sar_rs.reference(case, {"taux": 0.5})
    with pytest.raises(ValueError, match="tau = 2 is outside"):
        sar_rs.reference(case, {"tau": 2})
    with pytest.raises(ValueError, match="option `gate`"):
        sar_rs.reference(case, {"gate": "perclass"})
    with pytest.raises(ValueError, match="unknown input tensor"):
        sar_rs.reference(dict(case, feature=case["features"]))
    with pytest.raises(ValueError, match="tensor `labels` is missing"):
        sar_rs.reference({k: v for k, v in case.items() if k != "labels"})
    mixed = np.array([True] + [False] * (case["anchor_logits"].shape[0] - 1))
    with pytest.raises(ValueError, match="global gate needs all flags equal"):
        sar_rs.reference(dict(case, initialized=mixed))


def test_state_is_unchanged_by_a_failed_step(case):
    c, d = case["embedded_anchors"].shape
    st = sar_rs.SarState(c, d)
    st.step(case["anchor_logits"], case["embedded_anchors"], case["features"], case["labels"])
    before = st.state_dict()
    y = case["labels"].copy()
    y.reshape(-1)[0] = 99
    with pytest.raises(ValueError):
        st.step(case["anchor_logits"], case["embedded_anchors"] + 1, case["features"], y)
    np.testing.assert_array_equal(st.semantic_anchors, before["semantic_anchors"])
