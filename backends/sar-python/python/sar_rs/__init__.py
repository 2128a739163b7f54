"""sar_rs: Semantic Anchor Regularization (SAR, Ge, Nie et al., AAAI 2024) from sar-math.

NumPy functions over the Rust kernels of ``sar-math`` (float32 or float64 arrays, any layout:
non-contiguous inputs are copied to C order), ``reference`` (one SAR step with exactly the
tensor and option names of ``sar reference``), ``SarState`` (Â, the flags and the gate, with
``step``), ``sar_rs.testing.verify`` (check your own SAR code against this one) and, when torch
is installed, ``sar_rs.torch`` (autograd Functions and ``SarLoss``).

Every bad input raises ``ValueError`` naming the tensor or option. The GIL is released inside
the kernels.
"""

import numpy as np

from . import _sar_rs as _native

__all__ = [
    "DEFAULT_OPTIONS",
    "OUTPUT_NAMES",
    "SarState",
    "anchor_ce",
    "car_intra_class",
    "class_prototypes",
    "ema_update",
    "ema_update_per_class",
    "gate",
    "generate_anchors",
    "options",
    "p2a_nchw",
    "p2a_rows",
    "reference",
    "resample_labels_nearest",
]

#: The options of ``sar reference`` with their defaults (the paper's).
DEFAULT_OPTIONS = dict(
    tau=0.9, delta=0.8, alpha=0.999, lambda_aux=1.0, lambda_p2a=0.1,
    ignore_index=255, gate="global", weights="attached",
)

#: Input tensor names of ``reference``; the last two are optional.
INPUT_NAMES = ("anchor_logits", "embedded_anchors", "features", "labels",
               "semantic_anchors", "initialized")

#: Output tensor names of ``reference`` (all float64), in the order of ``sar reference``.
OUTPUT_NAMES = ("anchor_confidence", "anchor_nll", "anchor_weights", "loss_aux",
                "grad_anchor_logits", "gate", "semantic_anchors", "initialized", "loss_p2a",
                "grad_features", "loss_sar")


def _floats(name, x, dtype=None):
    a = np.asarray(x)
    if a.dtype not in (np.float32, np.float64):
        raise ValueError(f"tensor `{name}`: dtype must be float32 or float64, got {a.dtype}")
    return np.ascontiguousarray(a, dtype=dtype)


def _labels(name, x):
    a = np.asarray(x)
    if a.dtype.kind not in "iu":
        raise ValueError(f"tensor `{name}`: dtype must be an integer type, got {a.dtype}")
    if a.dtype == np.uint64 and a.size and a.max() > np.iinfo(np.int64).max:
        raise ValueError(f"tensor `{name}`: value {a.max()} does not fit int64")
    return np.ascontiguousarray(a, dtype=np.int64)


def _flags(name, x):
    a = np.asarray(x)
    if a.dtype != np.bool_ and a.dtype.kind not in "iuf":
        raise ValueError(f"tensor `{name}`: dtype must be bool or a number, got {a.dtype}")
    return np.ascontiguousarray(a != 0)


def _opt_flags(name, x):
    return None if x is None else _flags(name, x)


def options(opts=None):
    """The validated options: ``DEFAULT_OPTIONS`` updated by ``opts`` (unknown keys rejected)."""
    return _native.options(dict(opts or {}))


def anchor_ce(logits, tau=0.9, weights="attached"):
    """Anchor cross-entropy (Eq. 5-7) of ``logits`` ``[C, C]``.

    Returns a dict: ``loss`` (L_aux, float), ``uncertain`` (|U|), ``nll_sum`` (S),
    ``confidence``, ``nll``, ``weights`` (``[C]``) and ``grad_logits`` (dL_aux/dZ, ``[C, C]``).
    """
    loss, unc, s, p, nll, w, g = _native.anchor_ce(_floats("logits", logits), float(tau), weights)
    return dict(loss=loss, uncertain=unc, nll_sum=s, confidence=p, nll=nll, weights=w,
                grad_logits=g)


def gate(logits, nll, delta=0.8, mode="global"):
    """The δ gate: ``(passed, pass)`` with ``pass`` the per-anchor test (bool ``[C]``)."""
    z = _floats("logits", logits)
    return _native.gate(z, _floats("nll", nll, z.dtype), float(delta), mode)


def ema_update(semantic, initialized, embedded, alpha=0.999, passed=True):
    """Global EMA (Eq. 8): ``(semantic', initialized', changed)``; inputs are not modified."""
    s = _floats("semantic", semantic)
    return _native.ema_update(s, bool(initialized), _floats("embedded", embedded, s.dtype),
                              float(alpha), bool(passed))


def ema_update_per_class(semantic, initialized, embedded, alpha, passed):
    """Per-class EMA: ``(semantic', initialized', rows_updated)``; inputs are not modified."""
    s = _floats("semantic", semantic)
    return _native.ema_update_per_class(s, _flags("initialized", initialized),
                                        _floats("embedded", embedded, s.dtype), float(alpha),
                                        _flags("passed", passed))


def resample_labels_nearest(labels, size):
    """PyTorch's legacy ``nearest`` (bit-exact) of ``[B, H', W']`` labels to ``size = (H, W)``."""
    h, w = size
    return _native.resample_labels_nearest(_labels("labels", labels), int(h), int(w))


def p2a_nchw(features, labels, anchors, ignore_index=255, class_active=None, grad=True):
    """L_p2a (Eq. 4) of NCHW ``features`` ``[B, D, H, W]`` with ``labels`` ``[B, H', W']``
    toward ``anchors`` ``[C, D]``: ``(loss, valid, grad_features or None)``."""
    f = _floats("features", features)
    return _native.p2a_nchw(f, _labels("labels", labels), _floats("anchors", anchors, f.dtype),
                            int(ignore_index), _opt_flags("class_active", class_active), grad)


def p2a_rows(features, labels, anchors, ignore_index=255, labels_b=None, lam=1.0,
             class_active=None, grad=True):
    """L_p2a of ``[N, D]`` rows, or MixUp p2a when ``labels_b`` is given (target
    λ·Â_a + (1-λ)·Â_b, ``lam`` = λ): ``(loss, valid, grad_features or None)``."""
    f = _floats("features", features)
    lb = None if labels_b is None else _labels("labels_b", labels_b)
    return _native.p2a_rows(f, _labels("labels", labels), _floats("anchors", anchors, f.dtype),
                            int(ignore_index), lb, float(lam),
                            _opt_flags("class_active", class_active), grad)


def class_prototypes(features, labels, classes, ignore_index=255, class_active=None):
    """Class prototypes (Eq. 1/3) of NCHW features: ``(prototypes [C, D], counts [C])``."""
    return _native.class_prototypes(_floats("features", features), _labels("labels", labels),
                                    int(classes), int(ignore_index),
                                    _opt_flags("class_active", class_active))


def car_intra_class(features, labels, prototypes, ignore_index=255, class_active=None,
                    grad=True):
    """CAR's intra-class loss toward (constant) ``prototypes``: ``(loss, grad or None)``."""
    f = _floats("features", features)
    return _native.car_intra_class(f, _labels("labels", labels),
                                   _floats("prototypes", prototypes, f.dtype),
                                   int(ignore_index), _opt_flags("class_active", class_active),
                                   grad)


def generate_anchors(kind, seed, classes, dim, dtype=np.float64):
    """Pre-defined anchors A ``[C, D]``: ``kind`` "normal", "orthogonal" or "simplex-etf"."""
    return _native.generate_anchors(kind, int(seed), int(classes), int(dim),
                                    np.dtype(dtype) == np.float64)


def _step(z, e, s, init, f, y, opts):
    return _native.step(z, e, s, init, f, y, dict(opts or {}))


def reference(inputs, options=None):
    """One SAR step in float64, equal to ``sar reference``.

    ``inputs``: a dict with ``anchor_logits`` ``[C, C]``, ``embedded_anchors`` ``[C, D]``,
    ``features`` ``[B, D, H, W]`` or ``[N, D]``, ``labels`` ``[B, H', W']`` or ``[N]`` and
    optionally ``semantic_anchors`` ``[C, D]`` (Â before the step; absent = not initialised)
    and ``initialized`` (``[]`` or ``[C]``; default: true iff ``semantic_anchors`` is given).
    Float inputs may be float32 or float64 (computed in float64). ``options``: a dict with any
    of ``DEFAULT_OPTIONS``' keys.

    Returns a dict of float64 arrays named ``OUTPUT_NAMES`` (scalars as 0-d arrays; ``gate``
    and ``initialized`` are ``[]`` for the global gate and ``[C]`` per class, 1.0/0.0).
    Losses are unweighted except ``loss_sar``; gradients are those of the unweighted losses.
    """
    if not isinstance(inputs, dict):
        raise ValueError("inputs must be a dict of arrays named as `sar reference`'s tensors")
    unknown = sorted(set(inputs) - set(INPUT_NAMES))
    if unknown:
        raise ValueError(f"unknown input tensor(s) {unknown} (known: {list(INPUT_NAMES)})")
    for name in INPUT_NAMES[:4]:
        if name not in inputs:
            raise ValueError(f"tensor `{name}` is missing")
    opts = _native.options(dict(options or {}))
    z = _floats("anchor_logits", inputs["anchor_logits"], np.float64)
    e = _floats("embedded_anchors", inputs["embedded_anchors"], np.float64)
    f = _floats("features", inputs["features"], np.float64)
    y = _labels("labels", inputs["labels"])
    if z.ndim != 2 or z.shape[0] != z.shape[1] or z.shape[0] == 0:
        raise ValueError(f"tensor `anchor_logits`: shape {list(z.shape)}, expected [C, C] (square, C ≥ 1)")
    c = z.shape[0]
    if f.ndim not in (2, 4):
        raise ValueError(f"tensor `features`: shape {list(f.shape)}, expected [B, D, H, W] or [N, D]")
    d = f.shape[1]
    sem = inputs.get("semantic_anchors")
    s = np.zeros((c, d)) if sem is None else _floats("semantic_anchors", sem, np.float64)
    if "initialized" in inputs and inputs["initialized"] is not None:
        flags = _flags("initialized", inputs["initialized"])
        if flags.shape == ():
            flags = np.full(c, bool(flags))
        elif flags.shape != (c,):
            raise ValueError(f"tensor `initialized`: shape {list(flags.shape)}, expected [] or [C] = [{c}]")
        if sem is None and flags.any():
            raise ValueError("tensor `initialized` marks anchors as initialised but `semantic_anchors` is missing")
    else:
        flags = np.full(c, sem is not None)
    out = _step(z, e, s, flags, f, y, opts)
    per_class = opts["gate"] == "per-class"
    f64 = lambda v: np.asarray(v, dtype=np.float64)  # noqa: E731
    init = out["initialized"]
    return dict(
        anchor_confidence=out["anchor_confidence"],
        anchor_nll=out["anchor_nll"],
        anchor_weights=out["anchor_weights"],
        loss_aux=f64(out["loss_aux"]),
        grad_anchor_logits=out["grad_anchor_logits"],
        gate=f64(out["class_pass"]) if per_class else f64(out["gate_passed"]),
        semantic_anchors=out["semantic_anchors"],
        initialized=f64(init) if per_class else f64(bool(init.all())),
        loss_p2a=f64(out["loss_p2a"]),
        grad_features=out["grad_features"],
        loss_sar=f64(out["loss_sar"]),
    )


class SarState:
    """One SAR regulariser's state: Â ``[C, D]``, the per-class "initialised" flags and the last
    gate decision, in ``dtype`` (float32 or float64), with the options of ``sar reference``.

    ``step(anchor_logits, embedded_anchors, features, labels)`` runs one SAR step (L_aux → gate
    → EMA → L_p2a toward the updated Â), updates the state and returns the native dict
    (``loss_aux``, ``loss_p2a``, ``loss_sar``, ``grad_anchor_logits``, ``grad_features``,
    ``anchor_confidence``, ``anchor_nll``, ``anchor_weights``, ``class_pass``, ``gate_passed``,
    ``semantic_anchors``, ``initialized``, ``valid``, ``uncertain``, ``updated_classes``).
    On an error the state is unchanged.
    """

    def __init__(self, classes, dim, dtype=np.float64, **opts):
        dtype = np.dtype(dtype)
        if dtype not in (np.float32, np.float64):
            raise ValueError(f"dtype must be float32 or float64, got {dtype}")
        if int(classes) < 1 or int(dim) < 1:
            raise ValueError(f"classes and dim must be at least 1, got {classes} and {dim}")
        self.options = _native.options(opts)
        self.dtype = dtype
        self.semantic_anchors = np.zeros((int(classes), int(dim)), dtype=dtype)
        self.initialized = np.zeros(int(classes), dtype=bool)
        self.gate_passed = False

    @property
    def classes(self):
        return self.semantic_anchors.shape[0]

    @property
    def dim(self):
        return self.semantic_anchors.shape[1]

    def step(self, anchor_logits, embedded_anchors, features, labels):
        z = _floats("anchor_logits", anchor_logits, self.dtype)
        e = _floats("embedded_anchors", embedded_anchors, self.dtype)
        f = _floats("features", features, self.dtype)
        out = _step(z, e, self.semantic_anchors, self.initialized, f,
                    _labels("labels", labels), self.options)
        self.semantic_anchors = out["semantic_anchors"]
        self.initialized = out["initialized"]
        self.gate_passed = bool(out["gate_passed"])
        return out

    def state_dict(self):
        return dict(semantic_anchors=self.semantic_anchors.copy(),
                    initialized=self.initialized.copy(), gate_passed=self.gate_passed)

    def load_state_dict(self, state):
        s = _floats("semantic_anchors", state["semantic_anchors"], self.dtype)
        i = _flags("initialized", state["initialized"])
        if s.shape != self.semantic_anchors.shape or i.shape != self.initialized.shape:
            raise ValueError(f"state of shape {s.shape}/{i.shape} does not fit "
                             f"{self.semantic_anchors.shape}/{self.initialized.shape}")
        self.semantic_anchors, self.initialized = s.copy(), i.copy()
        self.gate_passed = bool(state.get("gate_passed", False))


def _noop():
    """The binding's cheapest call (for measuring call overhead)."""
    _native.noop()
