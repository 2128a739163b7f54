"""sar_rs.testing.verify passes a correct independent implementation and catches the classic
mistakes: detached weights, a per-class gate, integer nearest resampling."""
import functools

import sar_numpy
from sar_rs.testing import verify

CASES = 30  # three rounds of the ten kinds
RTOL = 1e-5  # the NumPy implementation's gradients are finite differences


def test_a_correct_implementation_passes():
    r = verify(sar_numpy.sar_step, cases=CASES, seed=1, rtol=RTOL)
    print(r)
    assert r.ok, str(r)
    assert set(r.max_rel_error) == set(__import__("sar_rs").OUTPUT_NAMES)


def test_detached_weights_are_caught():
    r = verify(functools.partial(sar_numpy.sar_step, detached_weights=True), cases=CASES, seed=1, rtol=RTOL)
    print(r)
    assert not r.ok
    assert r.failing_cases("grad_anchor_logits")
    assert not r.failing_cases("loss_aux")  # the forward value is right


def test_per_class_gate_is_caught():
    r = verify(functools.partial(sar_numpy.sar_step, per_class_gate=True), cases=CASES, seed=1, rtol=RTOL)
    print(r)
    assert not r.ok
    assert r.failing_cases("gate") or r.failing_cases("semantic_anchors")


def test_integer_nearest_is_caught():
    r = verify(functools.partial(sar_numpy.sar_step, integer_nearest=True), cases=CASES, seed=1, rtol=RTOL)
    print(r)
    assert not r.ok
    kinds = {f[1] for f in r.failures}
    assert "f32_nearest" in kinds and r.failing_cases("grad_features")


def test_errors_of_the_user_code_are_reported():
    def broken(inputs, options):
        raise RuntimeError("my bug")

    r = verify(broken, cases=3)
    assert not r.ok and "my bug" in str(r)
