"""Cross-check sar-models' SegFormer (MiT + all-MLP head) against independent PyTorch versions.

1. A PyTorch SegFormer written below from mmsegmentation's definitions (MixVisionTransformer with
   `nn.MultiheadAttention`, MixFFN as 1x1 / depth-wise 3x3 / GELU / 1x1 convs, SegformerHead with
   ConvModules), under mmsegmentation's parameter names, loaded with `strict=True`: eval- and
   train-mode logits, and every parameter's gradient of L = sum(logits * R) in train mode.
2. Hugging Face `transformers`' `SegformerModel` (its MiT encoder), the same weights mapped from
   mmsegmentation's names to Hugging Face's (`to_hf`; transformers 4 and 5 name them
   differently; `models/README.md` documents the mapping), loaded strictly: the four stage
   outputs.

The Rust example `segformer_torch_check` writes the weights (random BatchNorm statistics,
LayerNorm scales and biases), the input, its stage outputs, logits, R and gradients.

Usage (needs torch + safetensors; transformers for part 2, skipped with a note without it):
    python tests/torch/check_segformer.py [--keep DIR] [--models mit-b0:64,mit-b1:16]
"""
import argparse, copy, math, os, subprocess, tempfile
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file

HEADS = [1, 2, 5, 8]
SR = [8, 4, 2, 1]
DIMS = {"mit-b0": (32, [2, 2, 2, 2], 256), "mit-b1": (64, [2, 2, 2, 2], 256),
        "mit-b2": (64, [3, 4, 6, 3], 768)}


class PatchEmbed(nn.Module):
    def __init__(self, cin, c, k, s):
        super().__init__()
        self.projection = nn.Conv2d(cin, c, k, s, padding=k // 2)
        self.norm = nn.LayerNorm(c, eps=1e-6)

    def forward(self, x):
        x = self.projection(x)
        h, w = x.shape[2:]
        return self.norm(x.flatten(2).transpose(1, 2)), (h, w)


class EfficientMHA(nn.Module):
    def __init__(self, c, heads, sr):
        super().__init__()
        self.attn = nn.MultiheadAttention(c, heads, batch_first=True)
        self.sr_ratio = sr
        if sr > 1:
            self.sr = nn.Conv2d(c, c, sr, sr)
            self.norm = nn.LayerNorm(c, eps=1e-6)

    def forward(self, x, hw):
        kv = x
        if self.sr_ratio > 1:
            n, l, c = x.shape
            m = x.transpose(1, 2).reshape(n, c, *hw)
            kv = self.norm(self.sr(m).flatten(2).transpose(1, 2))
        return self.attn(x, kv, kv, need_weights=False)[0]


class MixFFN(nn.Module):
    def __init__(self, c):
        super().__init__()
        h = 4 * c
        self.layers = nn.Sequential(nn.Conv2d(c, h, 1), nn.Conv2d(h, h, 3, padding=1, groups=h),
                                    nn.GELU(), nn.Dropout(0.0), nn.Conv2d(h, c, 1), nn.Dropout(0.0))

    def forward(self, x, hw):
        n, l, c = x.shape
        y = self.layers(x.transpose(1, 2).reshape(n, c, *hw))
        return y.flatten(2).transpose(1, 2)


class Block(nn.Module):
    def __init__(self, c, heads, sr):
        super().__init__()
        self.norm1 = nn.LayerNorm(c, eps=1e-6)
        self.attn = EfficientMHA(c, heads, sr)
        self.norm2 = nn.LayerNorm(c, eps=1e-6)
        self.ffn = MixFFN(c)

    def forward(self, x, hw):
        x = x + self.attn(self.norm1(x), hw)
        return x + self.ffn(self.norm2(x), hw)


class MiT(nn.Module):
    def __init__(self, embed, depths):
        super().__init__()
        self.layers = nn.ModuleList()
        cin = 3
        for i in range(4):
            c = embed * HEADS[i]
            k, s = (7, 4) if i == 0 else (3, 2)
            self.layers.append(nn.ModuleList([
                PatchEmbed(cin, c, k, s),
                nn.ModuleList([Block(c, HEADS[i], SR[i]) for _ in range(depths[i])]),
                nn.LayerNorm(c, eps=1e-6)]))
            cin = c

    def forward(self, x):
        outs = []
        for embed, blocks, norm in self.layers:
            t, hw = embed(x)
            for b in blocks:
                t = b(t, hw)
            t = norm(t)
            x = t.transpose(1, 2).reshape(t.shape[0], -1, *hw)
            outs.append(x)
        return outs


class ConvModule(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 1, bias=False)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


class Head(nn.Module):
    def __init__(self, widths, ch, classes):
        super().__init__()
        self.convs = nn.ModuleList([ConvModule(w, ch) for w in widths])
        self.fusion_conv = ConvModule(4 * ch, ch)
        self.conv_seg = nn.Conv2d(ch, classes, 1)

    def forward(self, xs):
        size = xs[0].shape[2:]
        outs = [F.interpolate(c(x), size=size, mode="bilinear", align_corners=False)
                for c, x in zip(self.convs, xs)]
        return self.conv_seg(self.fusion_conv(torch.cat(outs, 1)))


class SegFormer(nn.Module):
    def __init__(self, kind, width, classes):
        super().__init__()
        embed, depths, ch = DIMS[kind]
        embed, ch = embed * width // 64, ch * width // 64
        self.backbone = MiT(embed, depths)
        self.decode_head = Head([embed * h for h in HEADS], ch, classes)

    def forward(self, x):
        return self.decode_head(self.backbone(x))


# Hugging Face renamed SegFormer's modules in transformers 5 (`stages.*`); both layouts map.
HF_OLD = {"patch": "encoder.patch_embeddings.{i}.", "embed_proj": "proj", "embed_norm": "layer_norm",
          "final": "encoder.layer_norm.{i}.", "block": "encoder.block.{i}.{j}.",
          "q": "attention.self.query", "k": "attention.self.key", "v": "attention.self.value",
          "norm1": "layer_norm_1", "norm2": "layer_norm_2",
          "attn.attn.out_proj": "attention.output.dense", "attn.sr": "attention.self.sr",
          "attn.norm": "attention.self.layer_norm", "ffn.layers.0": "mlp.dense1",
          "ffn.layers.1": "mlp.dwconv.dwconv", "ffn.layers.4": "mlp.dense2"}
HF_NEW = {"patch": "stages.{i}.patch_embeddings.", "embed_proj": "proj", "embed_norm": "layer_norm",
          "final": "stages.{i}.layer_norm.", "block": "stages.{i}.blocks.{j}.",
          "q": "attention.q_proj", "k": "attention.k_proj", "v": "attention.v_proj",
          "norm1": "layernorm_before", "norm2": "layernorm_after",
          "attn.attn.out_proj": "attention.o_proj",
          "attn.sr": "attention.sequence_reduction.sequence_reduction",
          "attn.norm": "attention.sequence_reduction.layer_norm", "ffn.layers.0": "mlp.fc1",
          "ffn.layers.1": "mlp.dwconv.dwconv", "ffn.layers.4": "mlp.fc2"}


def to_hf(state, names):
    """mmsegmentation's MiT names -> Hugging Face SegformerModel's (`names`: HF_OLD / HF_NEW)."""
    out = {}
    for k, v in state.items():
        if not k.startswith("backbone."):
            continue
        p = k.split(".")
        i = int(p[2])
        if p[3] == "0":
            sub = {"projection": names["embed_proj"], "norm": names["embed_norm"]}[p[4]]
            out[names["patch"].format(i=i) + f"{sub}.{p[5]}"] = v
        elif p[3] == "2":
            out[names["final"].format(i=i) + p[4]] = v
        else:
            j, rest = int(p[4]), ".".join(p[5:])
            b = names["block"].format(i=i, j=j)
            if rest.startswith("attn.attn.in_proj_"):
                kind = rest.split("_")[-1]
                c = v.shape[0] // 3
                for part, name in enumerate(["q", "k", "v"]):
                    out[b + f"{names[name]}.{kind}"] = v[part * c:(part + 1) * c].clone()
                continue
            mod, leaf = rest.rsplit(".", 1)
            t = v
            if mod in ("ffn.layers.0", "ffn.layers.4") and leaf == "weight":
                t = v.reshape(v.shape[0], v.shape[1])
            out[b + names[mod] + "." + leaf] = t
    return out


def rel(ours, ref):
    ref = ref.double()
    return ((ours.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--keep")
    ap.add_argument("--models", default="mit-b0:64,mit-b1:16,mit-b2:16")
    args = ap.parse_args()
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    subprocess.run(["cargo", "build", "--release", "-q", "-p", "sar-models", "--example",
                    "segformer_torch_check"], cwd=root, check=True)
    exe = os.path.join(root, "target", "release", "examples", "segformer_torch_check")
    tmp = args.keep or tempfile.mkdtemp()
    os.makedirs(tmp, exist_ok=True)
    torch.set_num_threads(2)
    try:
        import transformers
        from transformers import SegformerConfig, SegformerModel
    except ImportError:
        transformers = None
        print("transformers not installed: the Hugging Face comparison is skipped")
    ok = True

    def report(kind, what, shape, r, bound, extra=""):
        nonlocal ok
        good = r < bound
        ok &= good
        print(f"{kind:12s} {what:34s} {str(tuple(shape)):16s} max|ours - ref|/max|ref| = {r:.2e}"
              f"{extra}  {'ok' if good else 'MISMATCH'}")

    for item in args.models.split(","):
        kind, width = item.split(":")
        width = int(width)
        name = f"{kind}-w{width}"
        prefix = os.path.join(tmp, name)
        subprocess.run([exe, kind, str(width), prefix], check=True, stdout=subprocess.DEVNULL)
        state = load_file(prefix + ".weights.safetensors")
        io = load_file(prefix + ".io.safetensors")
        m = SegFormer(kind, width, 7)
        missing, unexpected = m.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.endswith("num_batches_tracked")]
        if missing or unexpected:
            print(f"{name}: NAME MISMATCH missing={missing[:5]} unexpected={unexpected[:5]}")
            ok = False
            continue
        x = io["input"]
        m64 = copy.deepcopy(m).double()
        m.eval(), m64.eval()
        with torch.no_grad():
            stages = m64.backbone(x.double())
            for i, s in enumerate(stages):
                report(name, f"eval MiT stage {i}", s.shape, rel(io[f"stage{i}"], s), 1e-4)
            report(name, "eval logits", io["logits_eval"].shape,
                   rel(io["logits_eval"], m64(x.double())), 1e-4)
        # Train mode: BatchNorm with batch statistics; the reference is torch in f64, our f32
        # logits must be within 3x torch's own f32 error against it (1e-4 passes in any case).
        # Gradients are compared in f64 on both sides (see the Rust example: in f32 a ReLU
        # mask flips now and then at the kink).
        m.train(), m64.train()
        r_w = io["loss_weights"]
        with torch.no_grad():
            out32 = m(x)
        out64 = m64(x.double())
        (out64 * r_w.double()).sum().backward()
        t_rel = rel(out32.detach(), out64.detach())
        report(name, "train logits", out64.shape, rel(io["logits_train"], out64.detach()),
               max(1e-4, 3 * t_rel), f" (torch f32 {t_rel:.1e})")
        # A parameter whose gradient vanishes in exact arithmetic (a bias right before a
        # train-mode BatchNorm, which removes any per-channel shift: the last MiT LayerNorm's
        # bias of each stage) has only rounding noise on both sides; errors are measured
        # against the larger of its own and 1e-6 of the largest gradient of the network.
        scale = max(p.grad.abs().max().item() for p in m64.parameters())
        worst, worst_name, grads, vanishing = 0.0, "", 0, 0
        for pname, p in m64.named_parameters():
            g = io.get(f"grad.{pname}")
            if g is None:
                print(f"{name}: no gradient written for {pname}")
                ok = False
                continue
            grads += 1
            ref_max = p.grad.abs().max().item()
            vanishing += ref_max < 1e-6 * scale
            r = (g.double() - p.grad).abs().max().item() / max(ref_max, 1e-6 * scale)
            if r > worst:
                worst, worst_name = r, pname
        report(name, f"train f64 grads ({grads} params), worst", (), worst, 1e-9,
               f" at {worst_name} ({vanishing} vanish in exact arithmetic)")
        if transformers is not None:
            embed, depths, _ = DIMS[kind]
            embed = embed * width // 64
            cfg = SegformerConfig(num_channels=3, num_encoder_blocks=4, depths=depths,
                                  sr_ratios=SR, hidden_sizes=[embed * h for h in HEADS],
                                  patch_sizes=[7, 3, 3, 3], strides=[4, 2, 2, 2],
                                  num_attention_heads=HEADS, mlp_ratios=[4] * 4,
                                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                                  drop_path_rate=0.0, layer_norm_eps=1e-6)
            hf = SegformerModel(cfg).double().eval()
            for mod in hf.modules():
                if isinstance(mod, nn.LayerNorm):
                    mod.eps = 1e-6  # some of Hugging Face's LayerNorms default to 1e-5
            names = HF_NEW if any(k.startswith("stages.") for k in hf.state_dict()) else HF_OLD
            hf.load_state_dict({k: v.double() for k, v in to_hf(state, names).items()},
                               strict=True)
            with torch.no_grad():
                hs = hf(x.double(), output_hidden_states=True).hidden_states
            for i, s in enumerate(hs):
                report(name, f"HF transformers {transformers.__version__} stage {i}", s.shape,
                       rel(io[f"stage{i}"], s), 1e-4)
    print("all match" if ok else "MISMATCH")
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
