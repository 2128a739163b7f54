"""PyTorch peer of `sar bench --workload resnet32`: one ResNet-32 training step on a CIFAR-100
batch of 128 random 3 x 32 x 32 images, without and with SAR, on the CPU.

The network is the CIFAR ResNet of sar-models' `cifar_resnet` module docs (He et al. 2016,
§4.2; LDAM-DRW / MiSLAS): a 3x3 stem with 16 channels, three stages of 5 BasicBlocks with 16,
32 and 64 channels (stride 2 at the start of stages 2 and 3), option-A shortcuts (subsample by
2, zero-pad the channels), global average pooling to the 64-d feature, `fc` to 100 classes.
The step: training-mode forward, cross-entropy, with SAR λ1·L_aux + λ2·L_p2a (docs/spec.md:
h_ψ = [Linear → BatchNorm1d → ReLU] × 2 on 100 fixed random anchors, classified by `fc`, the
released code's re-weighted L_aux with attached weights, the global gate with τ 0.9, δ 0.8,
the EMA α 0.999 and L_p2a = mean squared distance to the class anchors, λ1 = 1, λ2 = 0.1),
backward, torch.optim.SGD (lr 0.1, momentum 0.9, weight decay 5e-4): the work of our rows.
From random initialisation the gate stays closed on both sides, so L_p2a is not computed,
as in ours.

    python tests/torch/resnet32_step_peer.py [THREADS] [REPS]
    python tests/torch/resnet32_step_peer.py --serve THREADS   # for sar bench --torch (peer_serve.py)

prints one JSON line with the median seconds of REPS steps (after two warm-up steps) of each.
"""
import json, math, sys, time
import torch
import torch.nn as nn
import torch.nn.functional as F
from peer_serve import serving

CLASSES, BATCH = 100, 128
TAU, DELTA, ALPHA, LAMBDA_AUX, LAMBDA_P2A = 0.9, 0.8, 0.999, 1.0, 0.1


class Block(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.stride, self.pad = stride, (cout - cin) // 2

    def forward(self, x):
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        if self.stride != 1 or self.pad:
            x = F.pad(x[:, :, :: self.stride, :: self.stride], (0, 0, 0, 0, self.pad, self.pad))
        return F.relu(out + x)


class ResNet32(nn.Module):
    def __init__(self, classes):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        blocks, cin = [], 16
        for cout, stride in [(16, 1), (32, 2), (64, 2)]:
            for i in range(5):
                blocks.append(Block(cin, cout, stride if i == 0 else 1))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(64, classes)

    def features(self, x):
        return self.blocks(F.relu(self.bn1(self.conv1(x)))).mean(dim=(2, 3))


class Embed(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, d), nn.Linear(d, d)
        self.bn1, self.bn2 = nn.BatchNorm1d(d), nn.BatchNorm1d(d)

    def forward(self, a):
        return F.relu(self.bn2(self.fc2(F.relu(self.bn1(self.fc1(a))))))


def stepper(sar):
    g = torch.Generator().manual_seed(11)
    net = ResNet32(CLASSES)
    embed = Embed(64) if sar else None
    anchors = torch.randn(CLASSES, 64, generator=g)
    semantic, initialised = torch.zeros(CLASSES, 64), False
    params = list(net.parameters()) + (list(embed.parameters()) if sar else [])
    opt = torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=5e-4)
    x = torch.randn(BATCH, 3, 32, 32, generator=g)
    y = torch.randint(0, CLASSES, (BATCH,), generator=g)
    net.train()

    def step():
        nonlocal semantic, initialised
        t = time.perf_counter()
        f = net.features(x)
        loss = F.cross_entropy(net.fc(f), y)
        if sar:
            e = embed(anchors)
            z = net.fc(e)
            nll = -torch.log_softmax(z, dim=1).diagonal()
            p = torch.exp(-nll)
            lnq = torch.where(p > TAU, torch.zeros_like(nll), -nll)
            w = lnq / (lnq.sum() + 1e-9)
            loss = loss + LAMBDA_AUX * (w * nll).sum()
            with torch.no_grad():
                gate = bool(((z.argmax(1) == torch.arange(CLASSES)) & (nll < -math.log(DELTA))).all())
            if gate:
                with torch.no_grad():
                    semantic = ALPHA * semantic + (1 - ALPHA) * e.detach() if initialised else e.detach().clone()
                    initialised = True
                loss = loss + LAMBDA_P2A * ((f - semantic[y]) ** 2).sum() / f.numel()
        opt.zero_grad()
        loss.backward()
        opt.step()
        return time.perf_counter() - t

    return step


def serve_step(name):
    """A step for peer_serve (`resnet32` or `resnet32-sar`), after two warm-up steps."""
    if name not in ("resnet32", "resnet32-sar"):
        return None
    step = stepper(name == "resnet32-sar")
    step(), step()
    return step


def main():
    if serving(sys.argv, serve_step):
        return
    threads = int(sys.argv[1]) if len(sys.argv) > 1 else 2
    reps = int(sys.argv[2]) if len(sys.argv) > 2 else 9
    torch.set_num_threads(threads)
    steps = {"resnet32_b128_step_s": stepper(False), "resnet32_b128_sar_step_s": stepper(True)}
    for s in steps.values():
        s(), s()
    times = {k: [] for k in steps}
    for _ in range(reps):  # interleaved, as ours
        for k, s in steps.items():
            times[k].append(s())
    out = {"torch": torch.__version__, "threads": threads, "reps": reps}
    out.update({k: sorted(v)[len(v) // 2] for k, v in times.items()})
    print(json.dumps(out))


if __name__ == "__main__":
    main()
