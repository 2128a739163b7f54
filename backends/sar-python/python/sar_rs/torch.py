"""PyTorch integration of sar_rs (optional: ``import sar_rs.torch`` needs torch).

``torch.autograd.Function``s over the Rust kernels for CPU tensors (float32/float64; inputs
reach Rust through NumPy without a copy when they are contiguous, and the gradients come back
without one): ``AnchorCE`` (L_aux and dL_aux/dZ), ``P2a`` (L_p2a toward given anchors, NCHW or
``[N, D]``), ``SarStep`` (one whole step, functional: Â in, Â' out) and ``SarLoss``, an
``nn.Module`` that keeps Â, the flags and the gate as buffers (so ``state_dict`` holds them).

CUDA tensors raise ``ValueError`` (the kernels run on the CPU; move the tensors with
``.cpu()`` yourself if a host round trip is acceptable).

Example::

    sar = SarLoss(classes=10, dim=64)                  # the paper's options by default
    emb = embed(anchors)                               # E = h_psi(A), [C, D]
    loss = ce(model_logits, y) + sar(features, y, emb, classifier(emb))
    loss.backward()                                    # dL/dZ through the classifier, dL/dF
"""

import numpy as np
import torch

import sar_rs
from sar_rs import _floats, _labels, _native

__all__ = ["AnchorCE", "P2a", "SarStep", "SarLoss", "anchor_ce", "p2a", "sar_step"]


def _np(name, t, labels=False, flags=False):
    if not isinstance(t, torch.Tensor):
        t = torch.as_tensor(t)
    if t.device.type != "cpu":
        raise ValueError(f"tensor `{name}` is on {t.device}: sar_rs.torch runs on CPU tensors "
                         f"(move it with .cpu(); the kernels have no GPU form)")
    a = t.detach().contiguous().numpy()
    if labels:
        return _labels(name, a)
    if flags:
        return np.ascontiguousarray(a != 0)
    return _floats(name, a)


def _t(a, like):
    return torch.from_numpy(np.ascontiguousarray(a)).to(like.dtype)


class AnchorCE(torch.autograd.Function):
    """L_aux of anchor logits Z ``[C, C]`` (Eq. 5-7); backward is the analytic dL_aux/dZ of
    ``weights`` mode ("attached", the released code's; "detached"; or "uniform", no re-weighting)."""

    @staticmethod
    def forward(ctx, logits, tau=0.9, weights="attached"):
        r = _native.anchor_ce(_np("anchor_logits", logits), float(tau), weights)
        ctx.save_for_backward(_t(r[6], logits))
        return logits.new_tensor(r[0])

    @staticmethod
    def backward(ctx, grad):
        (g,) = ctx.saved_tensors
        return grad * g, None, None


class P2a(torch.autograd.Function):
    """L_p2a (Eq. 4) of features (``[B, D, H, W]`` with labels ``[B, H', W']``, or ``[N, D]``
    with ``[N]``) toward constant ``anchors`` ``[C, D]``; gradient for the features only."""

    @staticmethod
    def forward(ctx, features, labels, anchors, ignore_index=255, class_active=None):
        f = _np("features", features)
        y = _np("labels", labels, labels=True)
        a = _np("anchors", anchors).astype(f.dtype, copy=False)
        act = None if class_active is None else _np("class_active", class_active, flags=True)
        if f.ndim == 4:
            loss, _, g = _native.p2a_nchw(f, y, a, int(ignore_index), act, True)
        else:
            loss, _, g = _native.p2a_rows(f, y, a, int(ignore_index), None, 1.0, act, True)
        ctx.save_for_backward(_t(g, features))
        return features.new_tensor(loss)

    @staticmethod
    def backward(ctx, grad):
        (g,) = ctx.saved_tensors
        return grad * g, None, None, None, None


class SarStep(torch.autograd.Function):
    """One whole SAR step, functional: inputs Z ``[C, C]`` (differentiable), F (differentiable),
    E ``[C, D]``, Â ``[C, D]``, the flags ``[C]``, labels and the options dict. Returns
    ``(loss_sar, semantic_anchors', initialized', stats)`` with ``stats`` =
    ``[loss_aux, loss_p2a, gate_passed]``; only ``loss_sar`` has a gradient:
    λ1·dL_aux/dZ and λ2·dL_p2a/dF."""

    @staticmethod
    def forward(ctx, anchor_logits, features, embedded_anchors, semantic_anchors, initialized,
                labels, options=None):
        opts = sar_rs.options(options)
        z = _np("anchor_logits", anchor_logits)
        dt = z.dtype
        r = _native.step(z, _np("embedded_anchors", embedded_anchors).astype(dt, copy=False),
                         _np("semantic_anchors", semantic_anchors).astype(dt, copy=False),
                         _np("initialized", initialized, flags=True),
                         _np("features", features).astype(dt, copy=False),
                         _np("labels", labels, labels=True), opts)
        ctx.save_for_backward(_t(r["grad_anchor_logits"], anchor_logits) * opts["lambda_aux"],
                              _t(r["grad_features"], features) * opts["lambda_p2a"])
        sem = _t(r["semantic_anchors"], semantic_anchors)
        init = torch.from_numpy(r["initialized"])
        stats = torch.tensor([r["loss_aux"], r["loss_p2a"], float(r["gate_passed"])],
                             dtype=torch.float64)
        ctx.mark_non_differentiable(sem, init, stats)
        return anchor_logits.new_tensor(r["loss_sar"]), sem, init, stats

    @staticmethod
    def backward(ctx, grad, *_):
        gz, gf = ctx.saved_tensors
        return grad * gz, grad * gf, None, None, None, None, None


def anchor_ce(logits, tau=0.9, weights="attached"):
    """``AnchorCE.apply``."""
    return AnchorCE.apply(logits, tau, weights)


def p2a(features, labels, anchors, ignore_index=255, class_active=None):
    """``P2a.apply``."""
    return P2a.apply(features, labels, anchors, ignore_index, class_active)


def sar_step(anchor_logits, features, embedded_anchors, semantic_anchors, initialized, labels,
             options=None):
    """``SarStep.apply``."""
    return SarStep.apply(anchor_logits, features, embedded_anchors, semantic_anchors,
                         initialized, labels, options)


class SarLoss(torch.nn.Module):
    """λ1·L_aux + λ2·L_p2a of one training step, with Â, the "initialised" flags and the last
    gate decision as buffers.

    ``forward(features, labels, embedded_anchors, anchor_logits)``: ``features`` F
    (``[B, D, H, W]`` or ``[N, D]``), ``labels`` (``[B, H', W']`` or ``[N]``),
    ``embedded_anchors`` E = h_ψ(A) ``[C, D]`` (used for the EMA, so not differentiated) and
    ``anchor_logits`` Z = g_θ(E) ``[C, C]`` (the model's classifier on E). The gradient reaches
    Z (hence the classifier and h_ψ) and F. In training mode each call updates the buffers
    (the EMA of Eq. 8); in eval mode the buffers are left as they are. ``last`` holds the
    step's ``loss_aux``, ``loss_p2a`` and ``gate_passed``.
    """

    def __init__(self, classes, dim, dtype=torch.float32, **options):
        super().__init__()
        self.options = sar_rs.options(options)
        self.register_buffer("semantic_anchors", torch.zeros(classes, dim, dtype=dtype))
        self.register_buffer("initialized", torch.zeros(classes, dtype=torch.bool))
        self.register_buffer("gate_passed", torch.zeros((), dtype=torch.bool))
        self.last = {}

    def forward(self, features, labels, embedded_anchors, anchor_logits):
        loss, sem, init, stats = SarStep.apply(anchor_logits, features, embedded_anchors.detach(),
                                               self.semantic_anchors, self.initialized, labels,
                                               self.options)
        if self.training:
            with torch.no_grad():
                self.semantic_anchors.copy_(sem)
                self.initialized.copy_(init)
                self.gate_passed.fill_(bool(stats[2]))
        self.last = dict(loss_aux=float(stats[0]), loss_p2a=float(stats[1]),
                         gate_passed=bool(stats[2]))
        return loss

    def extra_repr(self):
        c, d = self.semantic_anchors.shape
        return f"classes={c}, dim={d}, options={self.options}"
