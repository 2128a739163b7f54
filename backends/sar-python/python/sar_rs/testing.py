"""Check your own SAR implementation against sar-math: ``verify(step_fn)``.

``step_fn(inputs, options)`` takes the ``sar_rs.reference`` convention — a dict of NumPy
float64/int64 arrays named as ``sar reference``'s input tensors and a dict of options — and
returns a dict with any of ``sar_rs.OUTPUT_NAMES`` (NumPy arrays, torch tensors or numbers).
Every output it returns is compared with the Rust reference on each case::

    report = sar_rs.testing.verify(my_sar_step, cases=200, seed=0)
    print(report)          # per output: largest relative error, failing cases
    assert report.ok

The cases are the conformance suite's kinds: random steps, the gate failing, every anchor
confident (L_aux = 0), heavily ignored pixels, label maps whose resampling needs PyTorch's f32
``nearest`` rule, large logits, classification rows, the per-class gate, detached weights and
the first pass (no semantic anchors yet).
"""

import math

import numpy as np

from . import OUTPUT_NAMES, reference

KINDS = ("random", "gate_fails", "all_confident", "ignored_pixels", "f32_nearest",
         "large_logits", "rows", "per_class_gate", "detached_weights", "first_pass")


def make_case(kind, rng):
    """One case ``(inputs, options)`` of ``kind`` (one of ``KINDS``) from the NumPy ``rng``."""
    c = int(rng.integers(2, 7))
    d = int(rng.integers(2, 9))
    opts = {}
    b, h, w = int(rng.integers(1, 3)), int(rng.integers(2, 6)), int(rng.integers(2, 6))
    lh, lw = h * int(rng.integers(1, 3)), w * int(rng.integers(1, 3))
    scale_logits, diag = 1.0, 6.0
    ignore_frac = 0.1
    if kind == "gate_fails":
        diag = 0.0
    elif kind == "all_confident":
        diag = 40.0
    elif kind == "ignored_pixels":
        ignore_frac = 0.8
    elif kind == "f32_nearest":
        # 26 → 22 and 13 → 11: the f32 scale (PyTorch's) and an f64 one pick different rows.
        b, h, w, lh, lw = 1, 22, 11, 26, 13
        d = 3
    elif kind == "large_logits":
        scale_logits, diag = 60.0, 150.0
    elif kind == "per_class_gate":
        opts["gate"] = "per-class"
    elif kind == "detached_weights":
        opts["weights"] = "detached"
    elif kind == "random":
        diag = float(rng.uniform(0.0, 8.0))
        opts["tau"] = float(rng.uniform(0.5, 0.99))
    z = rng.normal(size=(c, c)) * scale_logits
    z[np.arange(c), np.arange(c)] += diag
    if kind == "per_class_gate":
        z[0, 0] -= diag  # anchor 0 fails its own test, others pass
    inputs = dict(
        anchor_logits=z,
        embedded_anchors=np.maximum(rng.normal(size=(c, d)), 0.0),
    )
    if kind != "first_pass":
        inputs["semantic_anchors"] = rng.normal(size=(c, d)) * 0.5
        if kind == "per_class_gate":
            inputs["initialized"] = (np.arange(c) % 2 == 0)
    if kind == "rows":
        n = int(rng.integers(1, 12))
        inputs["features"] = rng.normal(size=(n, d))
        y = rng.integers(0, c, size=n)
        y[rng.random(n) < ignore_frac] = 255
        inputs["labels"] = y.astype(np.int64)
    else:
        inputs["features"] = rng.normal(size=(b, d, h, w))
        y = rng.integers(0, c, size=(b, lh, lw))
        y[rng.random((b, lh, lw)) < ignore_frac] = 255
        inputs["labels"] = y.astype(np.int64)
    return inputs, opts


def _to_numpy(v):
    if hasattr(v, "detach"):  # a torch tensor
        v = v.detach().cpu().numpy()
    return np.asarray(v, dtype=np.float64)


def relative_error(got, want):
    """max |got − want| / max(max |want|, 1e-12); inf when the shapes differ."""
    got, want = _to_numpy(got), _to_numpy(want)
    if got.shape != want.shape:
        return math.inf
    if want.size == 0:
        return 0.0
    diff = np.abs(got - want)
    if not np.all(np.isfinite(got)):
        return math.inf
    return float(diff.max() / max(float(np.abs(want).max()), 1e-12))


class VerifyReport:
    """What ``verify`` found: ``ok``, ``max_rel_error`` (per output), ``failures`` (a list of
    ``(case, kind, output, relative_error)``), ``errors`` (cases where ``step_fn`` raised),
    ``cases`` and ``rtol``."""

    def __init__(self, cases, rtol):
        self.cases, self.rtol = cases, rtol
        self.max_rel_error = {}
        self.failures, self.errors = [], []
        self.compared = set()

    @property
    def ok(self):
        return not self.failures and not self.errors and bool(self.compared)

    def failing_cases(self, output):
        return [f[0] for f in self.failures if f[2] == output]

    def __str__(self):
        lines = [f"sar_rs.testing.verify: {self.cases} cases, rtol {self.rtol:g}: "
                 + ("OK" if self.ok else "FAILED")]
        lines.append(f"{'output':<20} {'max rel error':>14}  failing cases")
        for name in OUTPUT_NAMES:
            if name in self.max_rel_error:
                bad = self.failing_cases(name)
                kinds = sorted({f[1] for f in self.failures if f[2] == name})
                shown = ", ".join(map(str, bad[:8])) + (" …" if len(bad) > 8 else "")
                lines.append(f"{name:<20} {self.max_rel_error[name]:>14.3e}  "
                             + (f"{len(bad)}: {shown} ({', '.join(kinds)})" if bad else "-"))
        for case, kind, msg in self.errors[:5]:
            lines.append(f"case {case} ({kind}) raised: {msg}")
        if not self.compared:
            lines.append("step_fn returned none of the output names")
        return "\n".join(lines)

    __repr__ = __str__


def verify(step_fn, cases=100, seed=0, rtol=1e-6, kinds=KINDS):
    """Runs ``cases`` cases (cycling through ``kinds``) through ``step_fn`` and the Rust
    reference and returns a ``VerifyReport``. An output fails a case when its relative error
    (``relative_error``) exceeds ``rtol``; use about 1e-4 for a float32 implementation."""
    rng = np.random.default_rng(seed)
    report = VerifyReport(cases, rtol)
    for i in range(cases):
        kind = kinds[i % len(kinds)]
        inputs, opts = make_case(kind, rng)
        want = reference(inputs, opts)
        try:
            got = step_fn({k: v.copy() for k, v in inputs.items()}, dict(opts))
        except Exception as e:  # the user's code: report it, go on
            report.errors.append((i, kind, f"{type(e).__name__}: {e}"))
            continue
        for name in OUTPUT_NAMES:
            if name not in got:
                continue
            report.compared.add(name)
            err = relative_error(got[name], want[name])
            report.max_rel_error[name] = max(report.max_rel_error.get(name, 0.0), err)
            if not err <= rtol:
                report.failures.append((i, kind, name, err))
    return report
