"""PyTorch peer of `sar bench --workload seg-models`: one training step of OCRNet on
HRNetV2-W18, SegFormer MiT-B0 and UPerNet on Swin-T (window 7), full widths, 19 classes, batch
2 of 256 x 256 random images and labels, from the module definitions the cross-checks use
(check_seg_models.py, check_segformer.py, check_uper_swin.py; no dropout, no stochastic depth
on either side): training-mode forward, logits resized bilinearly to 256 x 256, cross-entropy
(ignore 255, mean over all pixels) + 0.4 x the auxiliary / soft-region head's, backward,
torch.optim.AdamW (lr 6e-5, weight decay 0.01). Without SAR: the peer times the plain step
our first row per model times.

Serve mode (`--serve THREADS`, what `sar bench --torch PYTHON` runs; peer_serve.py): model
names on stdin, one JSON line with each step's seconds back; a model is built on its first
request, with one untimed warm-up step. Stand-alone: `python tests/torch/seg_models_step_peer.py [THREADS] [REPS]` prints the
median of REPS steps per model.
"""
import json, os, sys, time
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from check_seg_models import Seg  # noqa: E402
from check_segformer import SegFormer  # noqa: E402
from check_uper_swin import UperSwin  # noqa: E402
from peer_serve import serving  # noqa: E402

CLASSES, BATCH, SIZE = 19, 2, 256


def build(name):
    if name == "ocr-hr18":
        m = Seg("ocr-hr18", CLASSES)
        heads = lambda x: (lambda o: (o["main"], o["aux"]))(m(x))
    elif name == "segformer-b0":
        m = SegFormer("mit-b0", 64, CLASSES)
        heads = lambda x: (m(x), None)
    elif name == "upernet-swin-t":
        m = UperSwin("swin-t", 64, 7, CLASSES)
        heads = lambda x: m(x)
    else:
        return None
    m.train()
    opt = torch.optim.AdamW(m.parameters(), lr=6e-5, weight_decay=0.01)
    g = torch.Generator().manual_seed(13)
    x = torch.randn(BATCH, 3, SIZE, SIZE, generator=g)
    y = torch.randint(0, CLASSES, (BATCH, SIZE, SIZE), generator=g)

    def ce(logits):
        up = F.interpolate(logits, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
        return F.cross_entropy(up, y, ignore_index=255)

    def step():
        t = time.perf_counter()
        main, aux = heads(x)
        loss = ce(main) if aux is None else ce(main) + 0.4 * ce(aux)
        opt.zero_grad()
        loss.backward()
        opt.step()
        return time.perf_counter() - t

    step()
    return step


def main():
    if serving(sys.argv, build):
        return
    threads = int(sys.argv[1]) if len(sys.argv) > 1 else 2
    reps = int(sys.argv[2]) if len(sys.argv) > 2 else 5
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    out = {"torch": torch.__version__, "threads": threads, "reps": reps}
    for name in ("ocr-hr18", "segformer-b0", "upernet-swin-t"):
        step = build(name)
        times = sorted(step() for _ in range(reps))
        out[f"{name}_b{BATCH}_{SIZE}_step_s"] = times[len(times) // 2]
    print(json.dumps(out))


if __name__ == "__main__":
    main()
