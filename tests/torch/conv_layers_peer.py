"""PyTorch peer of `cargo run --release -p sar-candle --example conv_profile`: the same
convolutions (ResNet-32's layer shapes at batch 128, no bias) timed forward, and forward +
backward of sum(y), with GFLOP/s (2·N·O·OH·OW·C·k² per pass; ×3 for forward + backward).

    python tests/torch/conv_layers_peer.py [THREADS] [REPS]
"""
import statistics, sys, time
import torch

SHAPES = [(128, 3, 32, 16, 3, 1, 1), (128, 16, 32, 16, 3, 1, 1), (128, 16, 32, 32, 3, 2, 1),
          (128, 32, 16, 32, 3, 1, 1), (128, 32, 16, 64, 3, 2, 1), (128, 64, 8, 64, 3, 1, 1)]


def main():
    threads = int(sys.argv[1]) if len(sys.argv) > 1 else 2
    reps = int(sys.argv[2]) if len(sys.argv) > 2 else 9
    torch.set_num_threads(threads)
    print(f"torch {torch.__version__}, {threads} threads")
    print("input            weight           fwd ms  GFLOP/s  fwd+bwd ms  GFLOP/s")
    for (n, c, h, o, k, s, p) in SHAPES:
        x = torch.randn(n, c, h, h, requires_grad=True)
        w = torch.randn(o, c, k, k, requires_grad=True)
        oh = (h + 2 * p - k) // s + 1
        flops = 2 * n * o * oh * oh * c * k * k
        fwd, both = [], []
        for _ in range(reps):
            t = time.perf_counter()
            torch.nn.functional.conv2d(x, w, stride=s, padding=p)
            fwd.append(time.perf_counter() - t)
            t = time.perf_counter()
            torch.nn.functional.conv2d(x, w, stride=s, padding=p).sum().backward()
            both.append(time.perf_counter() - t)
            x.grad = w.grad = None
        f, a = statistics.median(fwd), statistics.median(both)
        print(f"{f'{n}x{c}x{h}x{h}':16} {f'{o}x{c}x{k}x{k}/{s}':16} {f * 1e3:7.1f} {flops / f / 1e9:8.1f}"
              f" {a * 1e3:11.1f} {3 * flops / a / 1e9:8.1f}")


if __name__ == "__main__":
    main()
