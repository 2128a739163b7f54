"""Cross-check sar-models' ResNet-18/50 against torchvision's, layer names included.

For each architecture: a torchvision model with random weights (and random BatchNorm running
statistics), its state_dict written to safetensors exactly as a user would export it, an input
batch, and torchvision's logits and features in eval mode and logits in train mode. The Rust
example `torch_check` loads the file through `sar_models::pretrained::load_pretrained` (strict
name matching) and compares.

Usage (needs torch + torchvision + safetensors):
    python tests/torch/check_models.py [--keep DIR]
"""
import argparse, copy, os, subprocess, sys, tempfile
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
    x = torch.randn(4, 3, size, size)
    m.eval()
    with torch.no_grad():
        body = torch.nn.Sequential(*list(m.children())[:-1])
        feats = body(x).flatten(1)
        logits_eval = m.fc(feats)
    # Gradients of a train-mode backward in f64 (the reference) and torch's own f32 error
    # against it: random-init networks in train mode are ill-conditioned (BatchNorm backward),
    # so f32 gradients differ from exact ones by about 1 % in PyTorch too; ours must be as
    # close to the f64 reference as PyTorch's f32 is (within 3x).
    m64 = copy.deepcopy(m).double()
    m.train()
    m64.train()
    logits_train = m(x)
    up = torch.randn_like(logits_train)
    (logits_train * up).sum().backward()
    (m64(x.double()) * up.double()).sum().backward()
    p32 = dict(m.named_parameters())
    grads = {}
    for k, p in m64.named_parameters():
        if k in GRADS:
            grads["grad64." + k] = p.grad.float().contiguous()
            err = (p32[k].grad.double() - p.grad).abs().max() / p.grad.abs().max()
            grads["torch_f32_error." + k] = torch.tensor([float(err)], dtype=torch.float32)
    save_file({"input": x, "features_eval": feats, "logits_eval": logits_eval,
               "logits_train": logits_train.detach(), "upstream": up,
               "bn1_running_mean_after_train": m.bn1.running_mean.clone(), **grads},
              path + ".io.safetensors")

# Parameter gradients compared after one train-mode backward: the stem conv and BN (through the
# max-pool), a downsample conv, the last block's BN, the classifier.
GRADS = ["conv1.weight", "bn1.weight", "bn1.bias", "layer2.0.downsample.0.weight",
         "layer4.1.bn2.weight", "layer1.0.conv1.weight", "fc.weight"]

def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--keep")
    args = ap.parse_args()
    d = args.keep or tempfile.mkdtemp()
    os.makedirs(d, exist_ok=True)
    ok = True
    for arch, size in [("resnet18", 64), ("resnet50", 128)]:
        p = os.path.join(d, arch)
        case(arch, p, size)
        r = subprocess.run(["cargo", "run", "-q", "--release", "-p", "sar-models", "--example",
                            "torch_check", "--", arch, p], text=True)
        ok &= r.returncode == 0
    sys.exit(0 if ok else 1)

if __name__ == "__main__":
    main()
