"""The table of scripts/bench-table.sh from the logs it wrote into OUT (run by it; run alone
to rebuild OUT/table.md): `python3 scripts/bench_table.py OUT`."""
import json, re, statistics, sys, os
out = sys.argv[1]
rows = []
def usage(text, who):
    m = re.search(rf"^{who}: user ([\d.]+) s, sys ([\d.]+) s \(([\d.]+) % of CPU time\), peak RSS (\d+) MB", text, re.M)
    return (float(m.group(3)), int(m.group(4))) if m else (float("nan"), 0)
for w, images, label in [("resnet32", 128, "ResNet-32 b128"), ("seg-step", 2, "FCN-R18-d8 b2 512²")]:
    for b in ["candle", "dfdx"]:
        path = f"{out}/{w}-{b}.json"
        if not os.path.exists(path):
            continue
        r = json.load(open(path))
        text = open(f"{out}/{w}-{b}.txt").read()
        ours_sys, ours_rss = usage(text, "this process")
        peer_sys, peer_rss = usage(text, "PyTorch peer")
        peer = {("+ SAR" in x["variant"]): x["seconds"] for x in r if x["variant"].startswith("PyTorch: ")}
        for x in r:
            v = x["variant"]
            if v.startswith("PyTorch: ") or v.startswith("SAR head"):
                continue
            sar = "+ SAR" in v
            t = peer.get(sar, peer.get(False))
            rows.append((f"{label}{' + SAR' if sar else ''}", b, images / x["seconds"], images / t,
                         x["seconds"] / t, ours_sys, peer_sys, ours_rss, peer_rss))
ep, images = {}, 0
for line in open(f"{out}/epoch.txt"):
    if line.startswith("epoch images "):
        images = int(line.split()[-1])
    m = re.match(r"epoch (\w+) (\w+) round \d+: train ([\d.]+) s; process user/sys s, peak KiB: ([\d.]+) ([\d.]+) (\d+)", line)
    if m:
        arm, who, secs, u, s, kib = m.groups()
        ep.setdefault((arm, who), []).append((float(secs), 100 * float(s) / (float(u) + float(s)), int(kib) // 1000))
for arm in ["base", "sar"]:
    if (arm, "torch") not in ep:
        continue
    t = statistics.median(x[0] for x in ep[(arm, "torch")])
    tsys = statistics.median(x[1] for x in ep[(arm, "torch")])
    trss = max(x[2] for x in ep[(arm, "torch")])
    for b in ["candle", "dfdx"]:
        if (arm, b) not in ep:
            continue
        s = statistics.median(x[0] for x in ep[(arm, b)])
        rows.append((f"small CNN, Fashion-MNIST-LT epoch{' + SAR' if arm == 'sar' else ''}", b, images / s, images / t, s / t,
                     statistics.median(x[1] for x in ep[(arm, b)]), tsys, max(x[2] for x in ep[(arm, b)]), trss))
head = "| work | library | ours images/s | PyTorch images/s | ours / PyTorch (time) | ours sys % | PyTorch sys % | ours peak RSS MB | PyTorch peak RSS MB |\n|---|---|---|---|---|---|---|---|---|\n"
fmt = lambda x: f"{x:.0f}" if x >= 100 else f"{x:.3g}"
body = "".join(f"| {w} | {b} | {fmt(a)} | {fmt(p)} | {r:.2f}× | {s1:.1f} | {s2:.1f} | {m1} | {m2} |\n" for w, b, a, p, r, s1, s2, m1, m2 in rows)
open(f"{out}/table.md", "w").write(head + body)
print(head + body)
