#!/usr/bin/env python3
"""Cross-check `sar reference` against an independent PyTorch implementation of the spec.

The PyTorch side follows the released code's formulation (softmax/log-softmax, masked weights,
F.interpolate(mode='nearest') for the labels) and takes every gradient from autograd, so it
shares no arithmetic with sar-math's analytic formulas.

    python3 check_reference.py path/to/sar [--cases 300] [--seed 0] [--device cpu]

Prints one line per failing case and a summary table; exits non-zero on any mismatch.
"""
import argparse
import json
import math
import os
import subprocess
import sys
import tempfile

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

DEFAULTS = dict(tau=0.9, delta=0.8, alpha=0.999, lambda_aux=1.0, lambda_p2a=0.1,
                ignore_index=255, gate="global", weights="attached")


def torch_l_aux(z, tau, weights):
    """Eq. 5-7 as the released code: p = softmax diagonal, q = 1 where p > tau, else p;
    w = ln q / (sum ln q + eps); L_aux = sum w * CE. Returns L_aux and the per-anchor CE, p and w."""
    nll = -torch.log_softmax(z, dim=1).diagonal()
    p = torch.exp(-nll)
    lnq = torch.where(p > tau, torch.zeros_like(nll), -nll)
    w = lnq / (lnq.sum() + 1e-9)
    if weights == "detached":
        w = w.detach()
    return (w * nll).sum(), nll, p, w


def torch_sar(case, opt, device):
    """One SAR step in float64 with autograd. Returns the output dict of the contract."""
    tau, delta, alpha = opt["tau"], opt["delta"], opt["alpha"]
    ignore, per_class = opt["ignore_index"], opt["gate"] == "per-class"
    z = case["anchor_logits"].to(device).clone().requires_grad_(True)
    emb = case["embedded_anchors"].to(device)
    c, d = emb.shape
    l_aux, nll, p, w = torch_l_aux(z, tau, opt["weights"])
    (g_z,) = torch.autograd.grad(l_aux, z, allow_unused=True)
    g_z = torch.zeros_like(z) if g_z is None else g_z
    # Gate: argmax == c and CE_c < -ln(delta).
    with torch.no_grad():
        arange = torch.arange(c, device=device)
        passes = (z.argmax(dim=1) == arange) & (nll < -math.log(delta)) if delta > 0 else (z.argmax(dim=1) == arange)
        passed = bool(passes.all()) if not per_class else bool(passes.any())
    # EMA (Eq. 8).
    prev = case.get("semantic_anchors")
    prev = torch.zeros(c, d, dtype=torch.float64, device=device) if prev is None else prev.to(device).clone()
    init = case.get("initialized")
    if init is None:
        init = torch.full((c,), "semantic_anchors" in case, dtype=torch.bool, device=device)
    else:
        init = init.to(device).bool().reshape(-1).expand(c).clone()
    sem = prev.clone()
    rows = passes if per_class else torch.full((c,), passed, dtype=torch.bool, device=device)
    for r in range(c):
        if rows[r]:
            sem[r] = alpha * prev[r] + (1 - alpha) * emb[r] if init[r] else emb[r]
            init[r] = True
    # p2a (Eq. 4) toward the updated anchors.
    feat = case["features"].to(device).clone().requires_grad_(True)
    lab = case["labels"].to(device)
    if feat.dim() == 4:
        y = F.interpolate(lab[:, None].to(torch.float64), size=feat.shape[2:], mode="nearest")[:, 0].long()
    else:
        y = lab.long()
    valid = y != ignore
    yc = y.clamp(0, c - 1)
    if per_class:
        valid = valid & passes[yc]
    tgt = sem[yc]
    if feat.dim() == 4:
        tgt = tgt.permute(0, 3, 1, 2)
        mask = valid[:, None].to(torch.float64)
    else:
        mask = valid[:, None].to(torch.float64)
    n = int(valid.sum())
    if passed and n > 0:
        l_p2a = (((feat - tgt) ** 2) * mask).sum() / (n * d)
        (g_f,) = torch.autograd.grad(l_p2a, feat)
    else:
        l_p2a = torch.zeros((), dtype=torch.float64, device=device)
        g_f = torch.zeros_like(feat)
    flag = lambda t: t.to(torch.float64)
    return {
        "anchor_confidence": p.detach(),
        "anchor_nll": nll.detach(),
        "anchor_weights": w.detach(),
        "loss_aux": l_aux.detach(),
        "grad_anchor_logits": g_z,
        "gate": flag(passes) if per_class else torch.tensor(float(passed), dtype=torch.float64),
        "semantic_anchors": sem,
        "initialized": flag(init) if per_class else torch.tensor(float(bool(init.all())), dtype=torch.float64),
        "loss_p2a": l_p2a.detach(),
        "grad_features": g_f,
        "loss_sar": (opt["lambda_aux"] * l_aux + opt["lambda_p2a"] * l_p2a).detach(),
    }


def random_case(g):
    """A random case and options; sizes and ratios chosen to exercise the resampling rule."""
    r = lambda lo, hi: int(torch.randint(lo, hi + 1, (1,), generator=g))
    u = lambda: float(torch.rand((), generator=g))
    c, d = r(1, 8), r(1, 6)
    z = torch.randn(c, c, generator=g, dtype=torch.float64) * (0.5 + 3 * u())
    z += torch.diag(torch.rand(c, generator=g, dtype=torch.float64) * 12 * u())
    case = {"anchor_logits": z, "embedded_anchors": torch.rand(c, d, generator=g, dtype=torch.float64) * 2}
    ignore = 255 if u() < 0.7 else -1
    opt = dict(DEFAULTS, ignore_index=ignore, tau=round(0.5 + 0.49 * u(), 3), delta=round(0.3 + 0.69 * u(), 3),
               alpha=round(0.99 * u(), 3), lambda_p2a=round(u(), 3),
               gate="per-class" if u() < 0.35 else "global", weights="detached" if u() < 0.35 else "attached")
    if u() < 0.6:
        case["semantic_anchors"] = torch.randn(c, d, generator=g, dtype=torch.float64)
        if opt["gate"] == "per-class":
            case["initialized"] = (torch.rand(c, generator=g) < 0.6).to(torch.uint8)
    if u() < 0.7:
        b, h, w = r(1, 2), r(1, 9), r(1, 9)
        lh = r(1, 30) if u() < 0.7 else h * r(1, 4)
        lw = r(1, 30) if u() < 0.7 else w * r(1, 4)
        case["features"] = torch.randn(b, d, h, w, generator=g, dtype=torch.float64)
        lab = torch.randint(0, c, (b, lh, lw), generator=g)
    else:
        n = r(1, 12)
        case["features"] = torch.randn(n, d, generator=g, dtype=torch.float64)
        lab = torch.randint(0, c, (n,), generator=g)
    lab[torch.rand(lab.shape, generator=g) < 0.2 * u()] = ignore
    case["labels"] = lab.to(torch.int64)
    return case, opt


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("sar")
    ap.add_argument("--cases", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--rtol", type=float, default=1e-9)
    ap.add_argument("--atol", type=float, default=1e-12)
    a = ap.parse_args()
    g = torch.Generator().manual_seed(a.seed)
    worst = {}
    failures = 0
    gates = 0
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(a.cases):
            case, opt = random_case(g)
            inp, out, optf = (os.path.join(tmp, f"{i}.{x}") for x in ("in.safetensors", "out.safetensors", "json"))
            save_file({k: v.contiguous() for k, v in case.items()}, inp)
            with open(optf, "w") as f:
                json.dump(opt, f)
            res = subprocess.run([a.sar, "reference", "--quiet", "--input", inp, "--options", optf, "--output", out],
                                 capture_output=True, text=True)
            if res.returncode != 0:
                print(f"case {i}: sar failed: {res.stderr.strip()}  opt={opt}")
                failures += 1
                continue
            ours = load_file(out)
            want = torch_sar(case, opt, a.device)
            gates += int(float(want["gate"].sum()) > 0)
            bad = []
            for k, v in want.items():
                o = ours[k]
                v = v.detach().cpu().to(torch.float64)
                if tuple(o.shape) != tuple(v.shape):
                    bad.append(f"{k}: shape {tuple(o.shape)} vs {tuple(v.shape)}")
                    continue
                err = float((o - v).abs().max()) if o.numel() else 0.0
                worst[k] = max(worst.get(k, 0.0), err)
                if not torch.allclose(o, v, rtol=a.rtol, atol=a.atol):
                    bad.append(f"{k}: max |diff| {err:.3e}")
            if bad:
                failures += 1
                print(f"case {i}: " + "; ".join(bad) + f"  opt={opt} shapes="
                      + str({k: tuple(v.shape) for k, v in case.items()}))
    print(f"\n{a.cases} cases on torch {torch.__version__} ({a.device}); gate passed in {gates}; "
          f"tolerance rtol {a.rtol:g} atol {a.atol:g}")
    print(f"{'output':22s} max |sar - torch|")
    for k, v in worst.items():
        print(f"{k:22s} {v:.3e}")
    print(f"{a.cases - failures} passed, {failures} failed")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
