"""PyTorch peer of `sar bench --workload seg-step`: the same FCN + auxiliary head on a dilated
ResNet-18 V1c (the module definitions of check_seg_models.py), batch 2, 512×512 random images
and labels over 19 classes (no Dropout2d: a per-channel scaling, negligible beside the
convolutions), logits resized bilinearly to 512×512,
cross-entropy (ignore 255, mean over all pixels) + 0.4 × auxiliary, backward, SGD (lr 0.01,
momentum 0.9, wd 5e-4). Without SAR: the peer times the plain step that our benchmark's first
row times. Prints JSON with the median of REPS steps after one warm-up.

Usage: python tests/torch/seg_step_peer.py [THREADS] [REPS]
       python tests/torch/seg_step_peer.py --serve THREADS   # for sar bench --torch (peer_serve.py)
"""
import json, os, sys, time
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from check_seg_models import Seg  # noqa: E402
from peer_serve import serving  # noqa: E402


def stepper():
    """The step (after one warm-up step); each call runs one and returns its seconds."""
    torch.manual_seed(0)
    m = Seg("fcn-r18", 19)
    m.train()
    opt = torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    x = torch.randn(2, 3, 512, 512)
    y = torch.randint(0, 19, (2, 512, 512))

    def step():
        t = time.perf_counter()
        out = m(x)
        main = F.interpolate(out["main"], size=(512, 512), mode="bilinear", align_corners=False)
        aux = F.interpolate(out["aux"], size=(512, 512), mode="bilinear", align_corners=False)
        loss = F.cross_entropy(main, y, ignore_index=255) + 0.4 * F.cross_entropy(aux, y, ignore_index=255)
        opt.zero_grad()
        loss.backward()
        opt.step()
        return time.perf_counter() - t

    step()
    return step


def main():
    if serving(sys.argv, lambda name: stepper() if name == "fcn-r18-d8" else None):
        return
    threads = int(sys.argv[1]) if len(sys.argv) > 1 else 2
    reps = int(sys.argv[2]) if len(sys.argv) > 2 else 5
    torch.set_num_threads(threads)
    step = stepper()
    times = sorted(step() for _ in range(reps))
    print(json.dumps({"torch": torch.__version__, "threads": threads, "reps": reps,
                      "fcn_r18_d8_b2_512_step_s": times[len(times) // 2], "all_s": times}))


if __name__ == "__main__":
    main()
