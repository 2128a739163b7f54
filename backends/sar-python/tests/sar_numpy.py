"""An independent NumPy SAR step in the `sar_rs.reference` convention, used as "a user's own
implementation" to test `sar_rs.testing.verify`. It follows the released code's formulation
(softmax, masked weights, legacy nearest) and takes every gradient by central finite
differences of its own forward pass, so it shares no gradient formula with sar-math. The flags
introduce the mistakes `verify` must catch."""
import numpy as np


def nearest_index(n_in, n_out, integer=False):
    dst = np.arange(n_out)
    if n_out == n_in:
        return dst
    if n_out == 2 * n_in:
        return dst // 2
    if integer:  # the mistake: exact integer arithmetic instead of PyTorch's f32 scale
        return np.minimum(dst * n_in // n_out, n_in - 1)
    scale = np.float32(n_in) / np.float32(n_out)
    return np.minimum(np.floor(dst.astype(np.float32) * scale).astype(np.int64), n_in - 1)


def _aux(z, tau, w_fixed=None):
    m = z.max(axis=1, keepdims=True)
    logp = z - m - np.log(np.exp(z - m).sum(axis=1, keepdims=True))
    nll = -np.diagonal(logp)
    p = np.exp(-nll)
    lnq = np.where(p > tau, 0.0, -nll)
    w = lnq / (lnq.sum() + 1e-9) if w_fixed is None else w_fixed
    return float((w * nll).sum()), p, nll, w


def _fd(fn, x, h=1e-6):
    g = np.zeros_like(x)
    flat, gf = x.reshape(-1), g.reshape(-1)
    for i in range(flat.size):
        old = flat[i]
        flat[i] = old + h
        up = fn(x)
        flat[i] = old - h
        down = fn(x)
        flat[i] = old
        gf[i] = (up - down) / (2 * h)
    return g


def sar_step(inputs, options, detached_weights=False, per_class_gate=False,
             integer_nearest=False):
    o = dict(tau=0.9, delta=0.8, alpha=0.999, lambda_aux=1.0, lambda_p2a=0.1,
             ignore_index=255, gate="global", weights="attached")
    o.update(options)
    z = inputs["anchor_logits"].astype(np.float64)
    e = inputs["embedded_anchors"].astype(np.float64)
    c, d = e.shape
    loss_aux, p, nll, w = _aux(z, o["tau"])
    detached = o["weights"] == "detached" or detached_weights
    g_z = _fd(lambda zz: _aux(zz, o["tau"], w if detached else None)[0], z.copy())
    passes = (z.argmax(axis=1) == np.arange(c)) & (nll < -np.log(o["delta"]))
    per_class = o["gate"] == "per-class" or per_class_gate
    passed = passes.any() if per_class else passes.all()
    sem = inputs.get("semantic_anchors")
    sem = np.zeros((c, d)) if sem is None else sem.astype(np.float64).copy()
    init = inputs.get("initialized")
    init = np.full(c, "semantic_anchors" in inputs) if init is None else \
        np.broadcast_to(np.asarray(init) != 0, (c,)).copy()
    rows = passes if per_class else np.full(c, passed)
    for r in range(c):
        if rows[r]:
            sem[r] = e[r] if not init[r] else o["alpha"] * sem[r] + (1 - o["alpha"]) * e[r]
            init[r] = True
    f = inputs["features"].astype(np.float64)
    y = inputs["labels"].astype(np.int64)
    if f.ndim == 4:
        _, _, h, wd = f.shape
        yi = nearest_index(y.shape[1], h, integer_nearest)
        xi = nearest_index(y.shape[2], wd, integer_nearest)
        yr = y[:, yi][:, :, xi]
        feats = np.moveaxis(f, 1, -1).reshape(-1, d)
        lab = yr.reshape(-1)
    else:
        feats, lab = f, y
    valid = lab != o["ignore_index"]
    if per_class:
        valid &= np.where(valid, passes[np.where(valid, lab, 0)], False)

    def p2a(ff):
        if f.ndim == 4:
            fr = np.moveaxis(ff, 1, -1).reshape(-1, d)
        else:
            fr = ff
        n = valid.sum()
        if n == 0:
            return 0.0
        diff = fr[valid] - sem[lab[valid]]
        return float((diff ** 2).sum() / (n * d))

    if passed:
        loss_p2a = p2a(f)
        g_f = _fd(p2a, f.copy())
    else:
        loss_p2a, g_f = 0.0, np.zeros_like(f)
    gate = passes.astype(np.float64) if o["gate"] == "per-class" else np.float64(passed)
    initialized = init.astype(np.float64) if o["gate"] == "per-class" else np.float64(init.all())
    return dict(anchor_confidence=p, anchor_nll=nll, anchor_weights=w, loss_aux=loss_aux,
                grad_anchor_logits=g_z, gate=gate, semantic_anchors=sem,
                initialized=initialized, loss_p2a=loss_p2a, grad_features=g_f,
                loss_sar=o["lambda_aux"] * loss_aux + o["lambda_p2a"] * loss_p2a)
