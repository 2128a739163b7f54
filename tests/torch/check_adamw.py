"""sar_math::adamw's rule, written out in NumPy float32 op by op in its documented order (the
scalars in Python floats), against torch.optim.AdamW on the same parameters and gradients.
The Rust kernel follows that order exactly (sar-math's `f32_rounds_each_operation` test).
PyTorch's CPU kernels vectorise (and may fuse) some of these ops on long tensors, so the two
agree to f32 rounding, not bit for bit: the check prints the share of identical elements and
max |rule − torch| / max |w|, and passes when that stays under 1e-6 for 20 steps.

Usage: python tests/torch/check_adamw.py
"""
import math
import numpy as np
import torch

torch.manual_seed(0)
lr, b1, b2, eps, wd = 0.01, 0.9, 0.999, 1e-8, 0.05
w = torch.randn(1000, dtype=torch.float32)
p = torch.nn.Parameter(w.clone())
opt = torch.optim.AdamW([p], lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd)
W, m, v = w.numpy().copy(), np.zeros(1000, np.float32), np.zeros(1000, np.float32)
ok = True
for t in range(1, 21):
    g = torch.randn(1000)
    p.grad = g.clone()
    opt.step()
    G = g.numpy()
    W = W * np.float32(1 - lr * wd)
    m = m + np.float32(1 - b1) * (G - m)
    v = v * np.float32(b2) + (G * G) * np.float32(1 - b2)
    den = np.sqrt(v) / np.float32(math.sqrt(1 - b2 ** t)) + np.float32(eps)
    W = W - np.float32(lr / (1 - b1 ** t)) * (m / den)
    T = p.detach().numpy()
    rel = np.abs(W - T).max() / np.abs(T).max()
    ok &= bool(rel < 1e-6)
    print(f"step {t:2d}: identical elements {np.mean(W == T):6.1%}, max |rule - torch| / max |w| = {rel:.1e}")
print(f"torch {torch.__version__}: " + ("within 1e-6 at every step" if ok else "MISMATCH"))
raise SystemExit(0 if ok else 1)
