"""Cross-check sar-models' ResNet-18/50 against torchvision's, layer names included.

For each architecture: a torchvision model with random weights (and random BatchNorm running
statistics), its state_dict written to safetensors exactly as a user would export it, an input
batch, and torchvision's logits and features in eval mode and logits in train mode. The Rust
example `torch_check` loads the file through `sar_models::pretrained::load_pretrained` (strict
name matching) and compares.

Usage (needs torch + torchvision + safetensors):
    python tests/torch/check_models.py [--keep DIR]
"""
import argparse, os, subprocess, sys, tempfile
import torch, torchvision
from safetensors.torch import save_file

def case(arch, path, size):
    torch.manual_seed(0)
    m = getattr(torchvision.models, arch)()
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.5, 0.5)
                mod.running_var.uniform_(0.5, 2.0)
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.uniform_(-0.2, 0.2)
    state = {k: v.contiguous() for k, v in m.state_dict().items()}
    save_file(state, path + ".weights.safetensors")
    x = torch.randn(2, 3, size, size)
    m.eval()
    with torch.no_grad():
        body = torch.nn.Sequential(*list(m.children())[:-1])
        feats = body(x).flatten(1)
        logits_eval = m.fc(feats)
        m.train()
        logits_train = m(x)
    save_file({"input": x, "features_eval": feats, "logits_eval": logits_eval,
               "logits_train": logits_train,
               "bn1_running_mean_after_train": m.bn1.running_mean.clone()},
              path + ".io.safetensors")

def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--keep")
    args = ap.parse_args()
    d = args.keep or tempfile.mkdtemp()
    os.makedirs(d, exist_ok=True)
    ok = True
    for arch, size in [("resnet18", 64), ("resnet50", 64)]:
        p = os.path.join(d, arch)
        case(arch, p, size)
        r = subprocess.run(["cargo", "run", "-q", "--release", "-p", "sar-models", "--example",
                            "torch_check", "--", arch, p], text=True)
        ok &= r.returncode == 0
    sys.exit(0 if ok else 1)

if __name__ == "__main__":
    main()
