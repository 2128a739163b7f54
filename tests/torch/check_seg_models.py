"""Cross-check sar-models' segmentation networks against an independent PyTorch version.

The PyTorch modules below are written from mmsegmentation's definitions (ResNetV1c with
dilations (1, 1, 2, 4), strides (1, 2, 1, 1) and contract_dilation; FCNHead with concat_input;
ASPPHead; HRNet with HRModule fusion; HRNetV2's resize-concat FCN head), with mmsegmentation's
module names, so `load_state_dict(strict=True)` checks every parameter name and shape of the
Rust model. The Rust example `seg_torch_check` writes its weights (random BatchNorm running
statistics), an input batch and its logits in eval and train mode; this script loads the
weights, runs the same input and compares.

Usage (needs torch + safetensors):
    python tests/torch/check_seg_models.py [--keep DIR]
"""
import argparse, copy, os, subprocess, sys, tempfile
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file


class ConvModule(nn.Module):
    """mmcv ConvModule: conv (no bias), bn, relu, named conv/bn."""

    def __init__(self, cin, cout, k, s=1, d=1):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, s, padding=d * (k - 1) // 2, dilation=d, bias=False)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def conv_bn(cin, cout, k, s=1, d=1):
    return ConvModule(cin, cout, k, s, d)


class Basic(nn.Module):
    expansion = 1

    def __init__(self, cin, planes, stride=1, dilation=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 3, stride, padding=dilation, dilation=dilation, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)  # not dilated (mmseg)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x):
        o = F.relu(self.bn1(self.conv1(x)))
        o = self.bn2(self.conv2(o))
        return F.relu(o + (self.downsample(x) if self.downsample is not None else x))


class Bottle(nn.Module):
    expansion = 4

    def __init__(self, cin, planes, stride=1, dilation=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.downsample = downsample

    def forward(self, x):
        o = F.relu(self.bn1(self.conv1(x)))
        o = F.relu(self.bn2(self.conv2(o)))
        o = self.bn3(self.conv3(o))
        return F.relu(o + (self.downsample(x) if self.downsample is not None else x))


class ResNetV1c(nn.Module):
    def __init__(self, block, counts):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, 32, 3, 2, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
            nn.Conv2d(32, 32, 3, 1, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
            nn.Conv2d(32, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU())
        cin = 64
        for i, (n, s, d) in enumerate(zip(counts, (1, 2, 1, 1), (1, 1, 2, 4))):
            planes = 64 * 2 ** i
            out = planes * block.expansion
            ds = None
            if s != 1 or cin != out:
                ds = nn.Sequential(nn.Conv2d(cin, out, 1, s, bias=False), nn.BatchNorm2d(out))
            first = d // 2 if d > 1 else d  # contract_dilation
            layers = [block(cin, planes, s, first, ds)] + [block(out, planes, 1, d) for _ in range(n - 1)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*layers))
            cin = out

    def forward(self, x):
        x = F.max_pool2d(self.stem(x), 3, 2, 1)
        outs = []
        for i in range(4):
            x = getattr(self, f"layer{i + 1}")(x)
            outs.append(x)
        return outs


class HRModule(nn.Module):
    def __init__(self, ch):
        super().__init__()
        n = len(ch)
        self.branches = nn.ModuleList([nn.Sequential(*[Basic(c, c) for _ in range(4)]) for c in ch])
        self.fuse_layers = nn.ModuleList()
        for i in range(n):
            row = nn.ModuleList()
            for j in range(n):
                if j > i:
                    row.append(nn.Sequential(nn.Conv2d(ch[j], ch[i], 1, bias=False), nn.BatchNorm2d(ch[i]),
                                             nn.Upsample(scale_factor=2 ** (j - i), mode="bilinear", align_corners=False)))
                elif j == i:
                    row.append(None)
                else:
                    downs = []
                    for k in range(i - j):
                        if k == i - j - 1:
                            downs.append(nn.Sequential(nn.Conv2d(ch[j], ch[i], 3, 2, 1, bias=False), nn.BatchNorm2d(ch[i])))
                        else:
                            downs.append(nn.Sequential(nn.Conv2d(ch[j], ch[j], 3, 2, 1, bias=False), nn.BatchNorm2d(ch[j]), nn.ReLU()))
                    row.append(nn.Sequential(*downs))
            self.fuse_layers.append(row)

    def forward(self, xs):
        xs = [b(x) for b, x in zip(self.branches, xs)]
        out = []
        for i, row in enumerate(self.fuse_layers):
            y = 0
            for j, f in enumerate(row):
                if j == i:
                    t = xs[j]
                elif j > i:
                    t = F.interpolate(f(xs[j]), size=xs[i].shape[2:], mode="bilinear", align_corners=False)
                else:
                    t = f(xs[j])
                y = y + t
            out.append(F.relu(y))
        return out


class HRNetV2(nn.Module):
    def __init__(self, w):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, 2, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.conv2 = nn.Conv2d(64, 64, 3, 2, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(64)
        ds = nn.Sequential(nn.Conv2d(64, 256, 1, bias=False), nn.BatchNorm2d(256))
        self.layer1 = nn.Sequential(Bottle(64, 64, downsample=ds), *[Bottle(256, 64) for _ in range(3)])
        ch = [w, 2 * w, 4 * w, 8 * w]
        pre = [256]
        for s, mods in ((2, 1), (3, 4), (4, 3)):
            cur = ch[:s]
            trans = nn.ModuleList()
            for i, c in enumerate(cur):
                if i < len(pre):
                    trans.append(None if pre[i] == c else nn.Sequential(nn.Conv2d(pre[i], c, 3, 1, 1, bias=False), nn.BatchNorm2d(c), nn.ReLU()))
                else:
                    trans.append(nn.Sequential(nn.Sequential(nn.Conv2d(pre[-1], c, 3, 2, 1, bias=False), nn.BatchNorm2d(c), nn.ReLU())))
            setattr(self, f"transition{s - 1}", trans)
            setattr(self, f"stage{s}", nn.Sequential(*[HRModule(cur) for _ in range(mods)]))
            pre = cur

    def forward(self, x):
        x = F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))
        ys = [self.layer1(x)]
        for s in (2, 3, 4):
            trans = getattr(self, f"transition{s - 1}")
            xs = []
            for i, t in enumerate(trans):
                src = ys[i] if i < len(ys) else ys[-1]
                xs.append(src if t is None else t(src))
            for m in getattr(self, f"stage{s}"):
                xs = m(xs)
            ys = xs
        return ys


class SelfAttentionBlock(nn.Module):
    """mmseg's _SelfAttentionBlock as ObjectAttentionBlock configures it: 2 key/query
    ConvModules, 1 value and 1 out ConvModule, matmul_norm, no downsampling."""

    def __init__(self, cin, ch):
        super().__init__()
        self.key_project = nn.Sequential(conv_bn(cin, ch, 1), conv_bn(ch, ch, 1))
        self.query_project = nn.Sequential(conv_bn(cin, ch, 1), conv_bn(ch, ch, 1))
        self.value_project = conv_bn(cin, ch, 1)
        self.out_project = conv_bn(ch, cin, 1)
        self.bottleneck = conv_bn(2 * cin, cin, 1)
        self.ch = ch

    def forward(self, query_feats, key_feats):
        b = query_feats.size(0)
        q = self.query_project(query_feats)
        q = q.reshape(*q.shape[:2], -1).permute(0, 2, 1)
        k = self.key_project(key_feats)
        v = self.value_project(key_feats)
        k = k.reshape(*k.shape[:2], -1)
        v = v.reshape(*v.shape[:2], -1).permute(0, 2, 1)
        sim = F.softmax((self.ch ** -0.5) * torch.matmul(q, k), dim=-1)
        ctx = torch.matmul(sim, v).permute(0, 2, 1).reshape(b, -1, *query_feats.shape[2:])
        ctx = self.out_project(ctx)
        return self.bottleneck(torch.cat([ctx, query_feats], 1))


def spatial_gather(feats, probs):
    """mmseg's SpatialGatherModule (scale 1): [b, c, k, 1] object representations."""
    b, k, h, w = probs.shape
    probs = F.softmax(probs.view(b, k, -1), dim=2)
    ctx = torch.matmul(probs, feats.view(b, feats.size(1), -1).permute(0, 2, 1))
    return ctx.permute(0, 2, 1).contiguous().unsqueeze(3)


class Seg(nn.Module):
    def __init__(self, kind, classes):
        super().__init__()
        if kind == "ocr-hr18":
            # CascadeEncoderDecoder: decode_head = [FCNHead (regions), OCRHead].
            self.backbone = HRNetV2(18)
            d = 270
            fcn, ocr = nn.Module(), nn.Module()
            fcn.convs = nn.ModuleList([conv_bn(d, d, 1)])
            fcn.conv_seg = nn.Conv2d(d, classes, 1)
            ocr.bottleneck = conv_bn(d, 512, 3)
            ocr.object_context_block = SelfAttentionBlock(512, 256)
            ocr.conv_seg = nn.Conv2d(512, classes, 1)
            self.decode_head = nn.ModuleList([fcn, ocr])
            self.kind, self.aux = "ocr", False
            return
        if kind == "fcn-hr18":
            self.backbone = HRNetV2(18)
            d = 270
            self.decode_head = nn.Module()
            self.decode_head.convs = nn.ModuleList([conv_bn(d, d, 1)])
            self.decode_head.conv_seg = nn.Conv2d(d, classes, 1)
            self.kind, self.aux = "hr", False
            return
        block, counts = {"fcn-r18": (Basic, (2, 2, 2, 2)), "aspp-r18": (Basic, (2, 2, 2, 2)),
                         "fcn-r50": (Bottle, (3, 4, 6, 3))}[kind]
        self.backbone = ResNetV1c(block, counts)
        cin = 512 * block.expansion
        ch = cin // 4
        self.decode_head = nn.Module()
        if kind.startswith("fcn"):
            self.kind = "fcn"
            self.decode_head.convs = nn.ModuleList([conv_bn(cin, ch, 3), conv_bn(ch, ch, 3)])
            self.decode_head.conv_cat = conv_bn(cin + ch, ch, 3)
        else:
            self.kind = "aspp"
            self.decode_head.image_pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), conv_bn(cin, ch, 1))
            self.decode_head.aspp_modules = nn.ModuleList(
                [conv_bn(cin, ch, 1 if d == 1 else 3, d=d) for d in (1, 12, 24, 36)])
            self.decode_head.bottleneck = conv_bn(5 * ch, ch, 3)
        self.decode_head.conv_seg = nn.Conv2d(ch, classes, 1)
        acin = 256 * block.expansion
        self.auxiliary_head = nn.Module()
        self.auxiliary_head.convs = nn.ModuleList([conv_bn(acin, acin // 4, 3)])
        self.auxiliary_head.conv_seg = nn.Conv2d(acin // 4, classes, 1)
        self.aux = True

    def forward(self, x):
        s = self.backbone(x)
        h = self.decode_head
        if self.kind == "ocr":
            size = s[0].shape[2:]
            x = torch.cat([F.interpolate(t, size=size, mode="bilinear", align_corners=False) for t in s], 1)
            fcn, ocr = h[0], h[1]
            regions = fcn.conv_seg(fcn.convs[0](x))
            feats = ocr.bottleneck(x)
            f = ocr.object_context_block(feats, spatial_gather(feats, regions))
            return {"main": ocr.conv_seg(f), "aux": regions}
        if self.kind == "hr":
            size = s[0].shape[2:]
            f = h.convs[0](torch.cat([F.interpolate(t, size=size, mode="bilinear", align_corners=False) for t in s], 1))
        elif self.kind == "fcn":
            y = h.convs[1](h.convs[0](s[3]))
            f = h.conv_cat(torch.cat([s[3], y], 1))
        else:
            x4 = s[3]
            pooled = F.interpolate(h.image_pool(x4), size=x4.shape[2:], mode="bilinear", align_corners=False)
            f = h.bottleneck(torch.cat([pooled] + [m(x4) for m in h.aspp_modules], 1))
        out = {"main": h.conv_seg(f)}
        if self.aux:
            a = self.auxiliary_head
            out["aux"] = a.conv_seg(a.convs[0](s[2]))
        return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--keep")
    ap.add_argument("--models", default="fcn-r18,aspp-r18,fcn-hr18,fcn-r50,ocr-hr18")
    args = ap.parse_args()
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    subprocess.run(["cargo", "build", "--release", "-q", "-p", "sar-models", "--example", "seg_torch_check"],
                   cwd=root, check=True)
    exe = os.path.join(root, "target", "release", "examples", "seg_torch_check")
    tmp = args.keep or tempfile.mkdtemp()
    os.makedirs(tmp, exist_ok=True)
    ok = True
    torch.set_num_threads(2)
    for kind in args.models.split(","):
        prefix = os.path.join(tmp, kind)
        subprocess.run([exe, kind, prefix], check=True, stdout=subprocess.DEVNULL)
        state = load_file(prefix + ".weights.safetensors")
        io = load_file(prefix + ".io.safetensors")
        m = Seg(kind, 7)
        missing, unexpected = m.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.endswith("num_batches_tracked")]
        if missing or unexpected:
            print(f"{kind}: NAME MISMATCH missing={missing[:5]} unexpected={unexpected[:5]}")
            ok = False
            continue
        x = io["input"]
        rows = []
        m.eval()
        with torch.no_grad():
            rows.append(("eval logits", m(x)["main"], io["logits_eval"]))
        # Train mode normalises with the statistics of small batches through dozens of
        # BatchNorms: f32 results of random-init networks are ill-conditioned there (as for
        # the classification ResNets). The reference is torch in f64; ours must be within 3x of
        # torch's own f32 error against it (and 1e-4 in any case passes).
        m64 = copy.deepcopy(m).double()
        m.train()
        m64.train()
        with torch.no_grad():
            out = m(x)
        out64 = m64(x.double())
        rows.append(("train logits", out64["main"], io["logits_train"], out["main"]))
        if "aux" in out:
            rows.append(("train aux logits", out64["aux"], io["aux_logits_train"], out["aux"]))
        # Parameter gradients in f64 on both sides, of L = sum(logits * R) (+ the auxiliary
        # head's, with its own R). A parameter whose gradient vanishes in exact arithmetic (a
        # bias before a train-mode BatchNorm) is measured against 1e-6 of the largest gradient.
        if "loss_weights" in io:
            loss = (out64["main"] * io["loss_weights"]).sum()
            if "aux" in out64:
                loss = loss + (out64["aux"] * io["aux_loss_weights"]).sum()
            m64.zero_grad()
            loss.backward()
            scale = max(p.grad.abs().max().item() for p in m64.parameters() if p.grad is not None)
            worst, at, count = 0.0, "", 0
            for pname, p in m64.named_parameters():
                g = io.get("grad." + pname)
                if g is None or p.grad is None:
                    print(f"{kind}: gradient of {pname} missing on one side")
                    ok = False
                    continue
                count += 1
                r = (g.double() - p.grad).abs().max().item() / max(p.grad.abs().max().item(), 1e-6 * scale)
                if r > worst:
                    worst, at = r, pname
            good = worst < 1e-9
            ok &= good
            print(f"{kind:9} f64 gradients ({count} parameters)  worst max |ours - torch| / max|torch| = {worst:.2e} at {at}  {'ok' if good else 'FAIL'}")
        for row in rows:
            what, ref, ours = row[:3]
            if ref.shape != ours.shape:
                print(f"{kind} {what}: shape {tuple(ours.shape)} vs torch {tuple(ref.shape)}")
                ok = False
                continue
            ref = ref.detach().double()
            rel = ((ours.double() - ref).abs().max() / ref.abs().max()).item()
            if len(row) == 4:
                torch_rel = ((row[3].double() - ref).abs().max() / ref.abs().max()).item()
                good = rel < max(1e-4, 3 * torch_rel)
                extra = f" (torch f32: {torch_rel:.2e}; reference torch f64)"
            else:
                good = rel < 1e-4
                extra = ""
            ok &= good
            print(f"{kind:9} {what:17} shape {tuple(ref.shape)}  max |ours - torch| / max|torch| = {rel:.2e}{extra}  {'ok' if good else 'FAIL'}")
    print("all match" if ok else "MISMATCH")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
