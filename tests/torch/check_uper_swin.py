"""Cross-check sar-models' UPerNet on a Swin Transformer against independent PyTorch versions.

1. A PyTorch UPerNet + Swin written below from mmsegmentation's definitions (SwinTransformer
   with ShiftWindowMSA / WindowMSA, mmcv's PatchEmbed and PatchMerging with "corner" padding,
   UPerHead with its PPM, and the auxiliary FCNHead), under mmsegmentation's parameter names,
   loaded with `strict=True`: the four stage outputs and eval-mode logits in f64, train-mode
   logits (main and auxiliary) against torch's own f32 error, and every parameter's gradient
   of L = sum(logits * R) + sum(aux * R_aux) in train mode, in f64 on both sides.
2. Hugging Face `transformers`' `UperNetForSemanticSegmentation` on its `SwinBackbone`, the
   same weights mapped from mmsegmentation's names to Hugging Face's (`to_hf`;
   `models/README.md` documents the mapping), loaded strictly: the four stage outputs, the
   decode head's logits (before Hugging Face's resize to the input size) and the auxiliary
   head's, in eval mode. Hugging Face's Swin shrinks the window to a stage's grid when the grid
   is no larger than it (the original Swin's rule; mmsegmentation pads instead), so this part
   runs only where every stage's grid exceeds the window.

The Rust example `uper_torch_check` writes the weights (random BatchNorm statistics, LayerNorm
scales and biases, bias tables), the input (62 x 90 by default: every padding path runs), the stage
outputs, logits, R, R_aux and the f64 gradients.

Usage (needs torch + safetensors; transformers for part 2, skipped with a note without it):
    python tests/torch/check_uper_swin.py [--keep DIR] [--models swin-t:16:4,swin-t:16:2:130x226]
(each model KIND:WIDTH:WINDOW[:HxW]; the input is 62 x 90 unless HxW is given)
"""
import argparse, copy, os, subprocess, tempfile
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file

DIMS = {"swin-t": (96, [2, 2, 6, 2], [3, 6, 12, 24]), "swin-s": (96, [2, 2, 18, 2], [3, 6, 12, 24]),
        "swin-b": (128, [2, 2, 18, 2], [4, 8, 16, 32]), "swin-l": (192, [2, 2, 18, 2], [6, 12, 24, 48])}
POOL_SCALES = (1, 2, 3, 6)


def corner_pad(x, multiple):
    """mmcv's AdaptivePadding(padding="corner") for kernel = stride = `multiple`: zeros at the
    bottom and right up to the next multiple."""
    h, w = x.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    return F.pad(x, [0, pw, 0, ph]) if ph or pw else x


class PatchEmbed(nn.Module):
    def __init__(self, cin, c):
        super().__init__()
        self.projection = nn.Conv2d(cin, c, 4, 4)
        self.norm = nn.LayerNorm(c)

    def forward(self, x):
        x = self.projection(corner_pad(x, 4))
        hw = x.shape[2:]
        return self.norm(x.flatten(2).transpose(1, 2)), hw


class WindowMSA(nn.Module):
    def __init__(self, c, heads, m):
        super().__init__()
        self.heads, self.m = heads, m
        self.scale = (c // heads) ** -0.5
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * m - 1) ** 2, heads))
        # mmsegmentation's double_step_seq construction, kept as written there.
        seq1 = torch.arange(0, (2 * m - 1) * m, 2 * m - 1)
        seq2 = torch.arange(0, m, 1)
        coords = (seq1[:, None] + seq2[None, :]).reshape(1, -1)
        self.register_buffer("relative_position_index", (coords + coords.T).flip(1).contiguous(),
                             persistent=False)
        self.qkv = nn.Linear(c, 3 * c)
        self.proj = nn.Linear(c, c)

    def forward(self, x, mask=None):
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = (q * self.scale) @ k.transpose(-2, -1)
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)].view(
            n, n, -1).permute(2, 0, 1).contiguous()
        attn = attn + bias.unsqueeze(0)
        if mask is not None:
            nw = mask.shape[0]
            attn = attn.view(b // nw, nw, self.heads, n, n) + mask.unsqueeze(1).unsqueeze(0)
            attn = attn.view(-1, self.heads, n, n)
        attn = attn.softmax(-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))


class ShiftWindowMSA(nn.Module):
    def __init__(self, c, heads, m, shift):
        super().__init__()
        self.m, self.shift = m, shift
        self.w_msa = WindowMSA(c, heads, m)

    def partition(self, x):
        b, h, w, c = x.shape
        m = self.m
        x = x.view(b, h // m, m, w // m, m, c).permute(0, 1, 3, 2, 4, 5).contiguous()
        return x.view(-1, m, m, c)

    def reverse(self, win, h, w):
        m = self.m
        b = int(win.shape[0] / (h * w / m / m))
        x = win.view(b, h // m, w // m, m, m, -1).permute(0, 1, 3, 2, 4, 5).contiguous()
        return x.view(b, h, w, -1)

    def forward(self, query, hw):
        b, l, c = query.shape
        h, w = hw
        m, s = self.m, self.shift
        query = query.view(b, h, w, c)
        pad_r, pad_b = (m - w % m) % m, (m - h % m) % m
        query = F.pad(query, (0, 0, 0, pad_r, 0, pad_b))
        hp, wp = query.shape[1], query.shape[2]
        if s > 0:
            shifted = torch.roll(query, shifts=(-s, -s), dims=(1, 2))
            img_mask = torch.zeros((1, hp, wp, 1), device=query.device)
            slices = (slice(0, -m), slice(-m, -s), slice(-s, None))
            cnt = 0
            for hs in slices:
                for ws in slices:
                    img_mask[:, hs, ws, :] = cnt
                    cnt += 1
            mw = self.partition(img_mask).view(-1, m * m)
            mask = mw.unsqueeze(1) - mw.unsqueeze(2)
            mask = mask.masked_fill(mask != 0, -100.0).masked_fill(mask == 0, 0.0).to(query.dtype)
        else:
            shifted, mask = query, None
        win = self.partition(shifted).view(-1, m * m, c)
        att = self.w_msa(win, mask=mask).view(-1, m, m, c)
        shifted = self.reverse(att, hp, wp)
        x = torch.roll(shifted, shifts=(s, s), dims=(1, 2)) if s > 0 else shifted
        return x[:, :h, :w, :].contiguous().view(b, h * w, c)


class FFN(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.layers = nn.Sequential(nn.Sequential(nn.Linear(c, 4 * c), nn.GELU(), nn.Dropout(0.0)),
                                    nn.Linear(4 * c, c), nn.Dropout(0.0))

    def forward(self, x, identity):
        return identity + self.layers(x)


class SwinBlock(nn.Module):
    def __init__(self, c, heads, m, shift):
        super().__init__()
        self.norm1 = nn.LayerNorm(c)
        self.attn = ShiftWindowMSA(c, heads, m, shift)
        self.norm2 = nn.LayerNorm(c)
        self.ffn = FFN(c)

    def forward(self, x, hw):
        x = x + self.attn(self.norm1(x), hw)
        return self.ffn(self.norm2(x), identity=x)


class PatchMerging(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.sampler = nn.Unfold(kernel_size=2, stride=2)
        self.norm = nn.LayerNorm(4 * c)
        self.reduction = nn.Linear(4 * c, 2 * c, bias=False)

    def forward(self, x, hw):
        b, l, c = x.shape
        h, w = hw
        x = corner_pad(x.view(b, h, w, c).permute(0, 3, 1, 2), 2)
        oh, ow = x.shape[2] // 2, x.shape[3] // 2
        x = self.sampler(x).transpose(1, 2)
        return self.reduction(self.norm(x)), (oh, ow)


class Stage(nn.Module):
    def __init__(self, c, depth, heads, m, downsample):
        super().__init__()
        self.blocks = nn.ModuleList([SwinBlock(c, heads, m, 0 if j % 2 == 0 else m // 2)
                                     for j in range(depth)])
        self.downsample = PatchMerging(c) if downsample else None

    def forward(self, x, hw):
        for b in self.blocks:
            x = b(x, hw)
        if self.downsample is None:
            return x, hw, x, hw
        y, yhw = self.downsample(x, hw)
        return y, yhw, x, hw


class Swin(nn.Module):
    def __init__(self, embed, depths, heads, m):
        super().__init__()
        self.patch_embed = PatchEmbed(3, embed)
        self.stages = nn.ModuleList([Stage(embed << i, depths[i], heads[i], m, i < 3)
                                     for i in range(4)])
        for i in range(4):
            self.add_module(f"norm{i}", nn.LayerNorm(embed << i))

    def forward(self, x):
        x, hw = self.patch_embed(x)
        outs = []
        for i, stage in enumerate(self.stages):
            x, hw, out, ohw = stage(x, hw)
            out = getattr(self, f"norm{i}")(out)
            outs.append(out.view(-1, *ohw, out.shape[-1]).permute(0, 3, 1, 2).contiguous())
        return outs


class ConvModule(nn.Module):
    def __init__(self, cin, cout, k):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, padding=k // 2, bias=False)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def resize(x, size):
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


class UPerHead(nn.Module):
    def __init__(self, widths, ch, classes):
        super().__init__()
        self.psp_modules = nn.ModuleList([nn.Sequential(nn.AdaptiveAvgPool2d(s),
                                                        ConvModule(widths[3], ch, 1))
                                          for s in POOL_SCALES])
        self.bottleneck = ConvModule(widths[3] + len(POOL_SCALES) * ch, ch, 3)
        self.lateral_convs = nn.ModuleList([ConvModule(c, ch, 1) for c in widths[:-1]])
        self.fpn_convs = nn.ModuleList([ConvModule(ch, ch, 3) for _ in widths[:-1]])
        self.fpn_bottleneck = ConvModule(len(widths) * ch, ch, 3)
        self.conv_seg = nn.Conv2d(ch, classes, 1)

    def forward(self, xs):
        top = xs[-1]
        psp = [top] + [resize(p(top), top.shape[2:]) for p in self.psp_modules]
        laterals = [c(xs[i]) for i, c in enumerate(self.lateral_convs)]
        laterals.append(self.bottleneck(torch.cat(psp, 1)))
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + resize(laterals[i], laterals[i - 1].shape[2:])
        outs = [self.fpn_convs[i](laterals[i]) for i in range(len(laterals) - 1)] + [laterals[-1]]
        for i in range(len(outs) - 1, 0, -1):
            outs[i] = resize(outs[i], outs[0].shape[2:])
        return self.conv_seg(self.fpn_bottleneck(torch.cat(outs, 1)))


class FCNHead(nn.Module):
    def __init__(self, cin, ch, classes):
        super().__init__()
        self.convs = nn.Sequential(ConvModule(cin, ch, 3))
        self.conv_seg = nn.Conv2d(ch, classes, 1)

    def forward(self, x):
        return self.conv_seg(self.convs(x))


class UperSwin(nn.Module):
    def __init__(self, kind, width, window, classes):
        super().__init__()
        embed, depths, heads = DIMS[kind]
        embed = embed * width // 64
        widths = [embed << i for i in range(4)]
        self.backbone = Swin(embed, depths, heads, window)
        self.decode_head = UPerHead(widths, 512 * width // 64, classes)
        self.auxiliary_head = FCNHead(widths[2], 256 * width // 64, classes)

    def forward(self, x):
        s = self.backbone(x)
        return self.decode_head(s), self.auxiliary_head(s[2])


# Hugging Face renamed Swin's modules in transformers 5 (`backbone.swin.*`, `q_proj`, `mlp.fc1`);
# both layouts map.
HF_OLD = {"root": "backbone.", "q": "attention.self.query", "k": "attention.self.key",
          "v": "attention.self.value", "attn.w_msa.proj": "attention.output.dense",
          "table": "attention.self.relative_position_bias_table",
          "ffn.layers.0.0": "intermediate.dense", "ffn.layers.1": "output.dense"}
HF_NEW = {"root": "backbone.swin.", "q": "attention.q_proj", "k": "attention.k_proj",
          "v": "attention.v_proj", "attn.w_msa.proj": "attention.o_proj",
          "table": "attention.relative_position_bias.relative_position_bias_table",
          "ffn.layers.0.0": "mlp.fc1", "ffn.layers.1": "mlp.fc2"}


def to_hf(state, hf_keys):
    """mmsegmentation's names -> Hugging Face UperNetForSemanticSegmentation's (SwinBackbone)."""
    names = HF_NEW if any(k.startswith("backbone.swin.") for k in hf_keys) else HF_OLD
    root = names["root"]
    out = {}
    for k, v in state.items():
        p = k.split(".")
        if p[0] == "backbone":
            if p[1] == "patch_embed":
                sub = {"projection": "patch_embeddings.projection", "norm": "norm"}[p[2]]
                n = f"{root}embeddings.{sub}.{p[3]}"
            elif p[1].startswith("norm"):
                n = f"backbone.hidden_states_norms.stage{int(p[1][4:]) + 1}.{p[2]}"
            elif p[3] == "downsample":
                n = f"{root}encoder.layers.{p[2]}.downsample.{p[4]}.{p[5]}"
                # nn.Unfold orders a 2x2 patch's channels c*4 + 2*ky + kx; Hugging Face
                # concatenates the patches (0,0), (1,0), (0,1), (1,1) of all channels:
                # (ky + 2*kx)*C + c.
                if p[4] == "reduction":
                    c = v.shape[1] // 4
                    v = v.view(v.shape[0], c, 2, 2).permute(0, 3, 2, 1).reshape(v.shape[0], 4 * c)
                else:
                    c = v.shape[0] // 4
                    v = v.view(c, 2, 2).permute(2, 1, 0).reshape(4 * c)
            else:
                b = f"{root}encoder.layers.{p[2]}.blocks.{p[4]}."
                rest = ".".join(p[5:])
                if rest.startswith("attn.w_msa.qkv."):
                    c = v.shape[0] // 3
                    for part, q in enumerate(["q", "k", "v"]):
                        out[b + f"{names[q]}.{p[-1]}"] = v[part * c:(part + 1) * c].clone()
                    continue
                if rest == "attn.w_msa.relative_position_bias_table":
                    n = b + names["table"]
                else:
                    mod, leaf = rest.rsplit(".", 1)
                    mod = {"norm1": "layernorm_before", "norm2": "layernorm_after"}.get(mod) \
                        or names[mod]
                    n = b + mod + "." + leaf
        else:
            rest = ".".join(p[1:]).replace("conv_seg", "classifier").replace(".bn.", ".batch_norm.")
            n = p[0] + "." + rest
        out[n] = v
    unknown = sorted(set(out) - set(hf_keys))
    if unknown:
        raise SystemExit(f"to_hf made names Hugging Face lacks: {unknown[:8]}")
    return out


def rel(ours, ref):
    ref = ref.double()
    return ((ours.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--keep")
    ap.add_argument("--models", default="swin-t:16:4,swin-t:16:7,swin-t:16:2:130x226,swin-t:16:7:260x292,swin-s:8:3")
    args = ap.parse_args()
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    subprocess.run(["cargo", "build", "--release", "-q", "-p", "sar-models", "--example",
                    "uper_torch_check"], cwd=root, check=True)
    exe = os.path.join(root, os.environ.get("CARGO_TARGET_DIR", "target"), "release",
                       "examples", "uper_torch_check")
    tmp = args.keep or tempfile.mkdtemp()
    os.makedirs(tmp, exist_ok=True)
    torch.set_num_threads(2)
    try:
        import transformers
        from transformers import SwinConfig, UperNetConfig, UperNetForSemanticSegmentation
    except ImportError:
        transformers = None
        print("transformers not installed: the Hugging Face comparison is skipped")
    ok = True

    def report(kind, what, shape, r, bound, extra=""):
        nonlocal ok
        good = r < bound
        ok &= good
        print(f"{kind:16s} {what:40s} {str(tuple(shape)):16s} max|ours - ref|/max|ref| = {r:.2e}"
              f"{extra}  {'ok' if good else 'MISMATCH'}")

    for item in args.models.split(","):
        kind, width, window, *size = item.split(":")
        width, window = int(width), int(window)
        name = f"{kind}-w{width}-m{window}" + (f"-{size[0]}" if size else "")
        prefix = os.path.join(tmp, name)
        env = dict(os.environ, INPUT=size[0]) if size else None
        subprocess.run([exe, kind, str(width), str(window), prefix], check=True,
                       stdout=subprocess.DEVNULL, env=env)
        state = load_file(prefix + ".weights.safetensors")
        io = load_file(prefix + ".io.safetensors")
        m = UperSwin(kind, width, window, 7)
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
                report(name, f"eval Swin stage {i}", s.shape, rel(io[f"stage{i}"], s), 1e-4)
            logits64, aux_logits64 = m64(x.double())
            report(name, "eval logits", io["logits_eval"].shape,
                   rel(io["logits_eval"], logits64), 1e-4)
            report(name, "eval aux logits", io["aux_logits_eval"].shape,
                   rel(io["aux_logits_eval"], aux_logits64), 1e-4)
        # Train mode: BatchNorm with batch statistics; the reference is torch in f64, our f32
        # logits must be within 3x torch's own f32 error against it (1e-4 passes in any case).
        m.train(), m64.train()
        with torch.no_grad():
            out32, aux32 = m(x)
        out64, aux64 = m64(x.double())
        ((out64 * io["loss_weights"].double()).sum()
         + (aux64 * io["aux_loss_weights"].double()).sum()).backward()
        for what, ours, r32, r64 in (("train logits", io["logits_train"], out32, out64),
                                     ("train aux logits", io["aux_logits_train"], aux32, aux64)):
            t_rel = rel(r32.detach(), r64.detach())
            report(name, what, r64.shape, rel(ours, r64.detach()), max(1e-4, 3 * t_rel),
                   f" (torch f32 {t_rel:.1e})")
        # A gradient that vanishes in exact arithmetic (a bias before a train-mode BatchNorm)
        # holds only rounding noise on both sides: errors are measured against the larger of
        # its own scale and 1e-6 of the network's largest gradient.
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
        grids = [tuple(io[f"stage{i}"].shape[2:]) for i in range(4)]
        if transformers is not None and all(min(g) > window for g in grids):
            embed, depths, heads = DIMS[kind]
            embed = embed * width // 64
            ch = 512 * width // 64
            bc = SwinConfig(embed_dim=embed, depths=depths, num_heads=heads, window_size=window,
                            mlp_ratio=4.0, qkv_bias=True, hidden_dropout_prob=0.0,
                            attention_probs_dropout_prob=0.0, drop_path_rate=0.0,
                            layer_norm_eps=1e-5, use_absolute_embeddings=False,
                            out_features=["stage1", "stage2", "stage3", "stage4"])
            cfg = UperNetConfig(backbone_config=bc, hidden_size=ch, pool_scales=list(POOL_SCALES),
                                use_auxiliary_head=True, auxiliary_in_channels=embed * 4,
                                auxiliary_channels=256 * width // 64, auxiliary_num_convs=1,
                                auxiliary_concat_input=False, num_labels=7)
            hf = UperNetForSemanticSegmentation(cfg).double().eval()
            hf_state = hf.state_dict()
            mapped = to_hf(state, hf_state.keys())
            # Hugging Face keeps the relative-position index and BatchNorm counters as buffers,
            # and a final LayerNorm after stage 4 that its backbone output does not use.
            for k, v in hf_state.items():
                if k not in mapped and (k.endswith("relative_position_index")
                                        or k.endswith("num_batches_tracked")
                                        or ".layernorm." in k):
                    mapped[k] = v
            hf.load_state_dict({k: v.double() for k, v in mapped.items()}, strict=True)
            with torch.no_grad():
                feats = hf.backbone.forward_with_filtered_kwargs(x.double()).feature_maps \
                    if hasattr(hf.backbone, "forward_with_filtered_kwargs") \
                    else hf.backbone(x.double()).feature_maps
                v = transformers.__version__
                for i, s in enumerate(feats):
                    report(name, f"HF transformers {v} stage {i}", s.shape,
                           rel(io[f"stage{i}"], s), 1e-4)
                report(name, f"HF transformers {v} decode logits", io["logits_eval"].shape,
                       rel(io["logits_eval"], hf.decode_head(feats)), 1e-4)
                report(name, f"HF transformers {v} aux logits", io["aux_logits_eval"].shape,
                       rel(io["aux_logits_eval"], hf.auxiliary_head(feats)), 1e-4)
        elif transformers is not None:
            print(f"{name:16s} Hugging Face part skipped: a stage grid {grids} is not larger than "
                  f"the window {window}")
    print("all match" if ok else "MISMATCH")
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
