"""Speed of sar_rs from Python: the call overhead, and one SAR step at CIFAR and segmentation
scale beside the same step in plain PyTorch (tests/torch/check_reference.py's `torch_sar`,
autograd for the gradients) on the same tensors, in one run. Also runs `verify` on that
PyTorch implementation. Needs torch and safetensors (check_reference.py imports it).

    python backends/sar-python/bench/bench_step.py [REPS]
"""
import os
import sys
import time
import timeit

import numpy as np
import torch

import sar_rs
from sar_rs.testing import verify

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "..", "..", "tests", "torch"))
from check_reference import torch_sar  # noqa: E402


def median_time(fn, reps):
    fn()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return sorted(ts)[len(ts) // 2]


def case(c, d, shape, label_shape, seed=0):
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(c, c))
    z[np.arange(c), np.arange(c)] += 12.0  # separated: the gate passes, p2a runs
    inputs = dict(anchor_logits=z, embedded_anchors=rng.normal(size=(c, d)),
                  semantic_anchors=rng.normal(size=(c, d)), features=rng.normal(size=shape),
                  labels=rng.integers(0, c, size=label_shape).astype(np.int64))
    inputs["labels"].reshape(-1)[::7] = 255
    return inputs


def main():
    reps = int(sys.argv[1]) if len(sys.argv) > 1 else 10
    print(f"torch {torch.__version__}, numpy {np.__version__}, {os.cpu_count()} cores")
    n = 200000
    t = timeit.timeit(sar_rs._native.noop, number=n) / n
    print(f"call overhead: native no-op {t * 1e6:.2f} us")
    z = np.zeros((2, 2))
    t = timeit.timeit(lambda: sar_rs.anchor_ce(z), number=n // 10) / (n // 10)
    print(f"call overhead: sar_rs.anchor_ce on 2x2 (wrapper, checks, 7 outputs) {t * 1e6:.2f} us")
    zt = torch.zeros(2, 2, dtype=torch.float64, requires_grad=True)
    import sar_rs.torch as st
    t = timeit.timeit(lambda: st.anchor_ce(zt), number=n // 10) / (n // 10)
    print(f"call overhead: sar_rs.torch.anchor_ce on 2x2 (autograd Function) {t * 1e6:.2f} us")
    opts = sar_rs.options({})
    scales = [
        ("CIFAR: C=100, D=64, N=128 rows", case(100, 64, (128, 64), (128,))),
        ("segmentation: C=19, D=512, B=2, 64x64 features, 512x512 labels",
         case(19, 512, (2, 512, 64, 64), (2, 512, 512))),
    ]
    for threads in (1, 2):
        torch.set_num_threads(threads)
        for name, inp in scales:
            tin = {k: torch.from_numpy(v) for k, v in inp.items()}
            init = np.ones(inp["anchor_logits"].shape[0], dtype=bool)
            rust = median_time(lambda: sar_rs._native.step(
                inp["anchor_logits"], inp["embedded_anchors"], inp["semantic_anchors"], init,
                inp["features"], inp["labels"], opts), reps)
            ref = median_time(lambda: sar_rs.reference(inp, opts), reps)
            pt = median_time(lambda: torch_sar(tin, opts, "cpu"), reps)
            print(f"{name}, f64, torch threads {threads}: sar_rs step {rust * 1e3:.3f} ms, "
                  f"sar_rs.reference {ref * 1e3:.3f} ms, plain PyTorch {pt * 1e3:.3f} ms, "
                  f"PyTorch / sar_rs = {pt / rust:.2f}")
    torch.set_num_threads(2)

    def user_step(inputs, options):
        out = torch_sar({k: torch.from_numpy(np.asarray(v)) for k, v in inputs.items()},
                        sar_rs.options(options), "cpu")
        return {k: v.numpy() for k, v in out.items()}

    report = verify(user_step, cases=100, seed=0, rtol=1e-9)
    print("verify(tests/torch/check_reference.py's torch_sar, cases=100, rtol=1e-9):")
    print(report)


if __name__ == "__main__":
    main()
