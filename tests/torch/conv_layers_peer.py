"""PyTorch peer of `cargo run --release -p sar-candle --example conv_profile`: the same
convolutions (ResNet-32's layer shapes at batch 128, or with `fcn` FCN-R18-d8's distinct 3×3
layer shapes at batch 2 of 512², dilated as there; no bias) timed forward, and forward +
backward of sum(y), with GFLOP/s (2·N·O·OH·OW·C·k² per pass; ×3 for forward + backward).

    python tests/torch/conv_layers_peer.py [THREADS] [REPS] [fcn]
"""
import statistics, sys, time
import torch

# (N, C, H, O, k, stride, pad, dilation), as conv_profile's lists.
RESNET32 = [(128, 3, 32, 16, 3, 1, 1, 1), (128, 16, 32, 16, 3, 1, 1, 1), (128, 16, 32, 32, 3, 2, 1, 1),
            (128, 32, 16, 32, 3, 1, 1, 1), (128, 32, 16, 64, 3, 2, 1, 1), (128, 64, 8, 64, 3, 1, 1, 1)]
FCN_R18_D8 = [(2, 3, 512, 32, 3, 2, 1, 1), (2, 32, 256, 32, 3, 1, 1, 1), (2, 32, 256, 64, 3, 1, 1, 1),
              (2, 64, 128, 64, 3, 1, 1, 1), (2, 64, 128, 128, 3, 2, 1, 1), (2, 128, 64, 128, 3, 1, 1, 1),
              (2, 128, 64, 256, 3, 1, 1, 1), (2, 256, 64, 256, 3, 1, 2, 2), (2, 256, 64, 512, 3, 1, 2, 2),
              (2, 512, 64, 512, 3, 1, 4, 4), (2, 512, 64, 128, 3, 1, 1, 1), (2, 128, 64, 128, 3, 1, 1, 1),
              (2, 640, 64, 128, 3, 1, 1, 1), (2, 256, 64, 64, 3, 1, 1, 1)]


def main():
    threads = int(sys.argv[1]) if len(sys.argv) > 1 else 2
    reps = int(sys.argv[2]) if len(sys.argv) > 2 else 9
    shapes = FCN_R18_D8 if len(sys.argv) > 3 and sys.argv[3] == "fcn" else RESNET32
    torch.set_num_threads(threads)
    print(f"torch {torch.__version__}, {threads} threads")
    print("input            weight           fwd ms  GFLOP/s  fwd+bwd ms  GFLOP/s")
    for (n, c, h, o, k, s, p, d) in shapes:
        x = torch.randn(n, c, h, h, requires_grad=True)
        w = torch.randn(o, c, k, k, requires_grad=True)
        oh = (h + 2 * p - d * (k - 1) - 1) // s + 1
        flops = 2 * n * o * oh * oh * c * k * k
        fwd, both = [], []
        for _ in range(reps):
            t = time.perf_counter()
            torch.nn.functional.conv2d(x, w, stride=s, padding=p, dilation=d)
            fwd.append(time.perf_counter() - t)
            t = time.perf_counter()
            torch.nn.functional.conv2d(x, w, stride=s, padding=p, dilation=d).sum().backward()
            both.append(time.perf_counter() - t)
            x.grad = w.grad = None
        f, a = statistics.median(fwd), statistics.median(both)
        print(f"{f'{n}x{c}x{h}x{h}':16} {f'{o}x{c}x{k}x{k}/{s}d{d}':16} {f * 1e3:7.1f} {flops / f / 1e9:8.1f}"
              f" {a * 1e3:11.1f} {3 * flops / a / 1e9:8.1f}")


if __name__ == "__main__":
    main()
