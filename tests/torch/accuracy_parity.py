#!/usr/bin/env python3
"""Accuracy parity: `sar train` and its PyTorch mirror trained end to end, per network, arm and
seed, on one classification config (Fashion-MNIST-LT by default).

For each (arch, SAR off/on, seed): `sar train --debug-dump DIR --debug-dump-plan` (the run
writes its step-0 state, the stored pixels and each step's random choices), then
`train_mirror.py --end-to-end` trains the same network from the same step-0 state in PyTorch
on the same batches (rendered by the mirror itself from the stored pixels and the plan) with
torch.optim.SGD and the documented schedule, and evaluates it on the same test set. Both sides
therefore share the initial weights, the data order and the augmentation draws; they differ
only in their arithmetic, whose rounding differences grow chaotically over the run, so the
comparison is per seed like two seeds of one implementation.

    python3 tests/torch/accuracy_parity.py SAR --config configs/fashion-mnist-lt-cnn-pool.toml \
        --seeds 0,1,2 --archs small-cnn,cnn-pool [--set key=value ...] --out DIR

Writes DIR/<arch>-<arm>-seed<k>/{run,dump,mirror.json}, DIR/parity.json and DIR/parity.md (the
table: per arch and arm, mean ± std over seeds of top-1 and tail for ours and PyTorch, the mean
paired difference ours − PyTorch with its standard error, and whether it lies within 2
standard errors; then the SAR effect, paired by seed, on each side). Existing mirror.json files
are reused, so an interrupted comparison continues.
"""
import argparse
import json
import math
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def stats(xs):
    n = len(xs)
    m = sum(xs) / n
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1)) if n > 1 else float("nan")
    return m, sd, sd / math.sqrt(n) if n > 1 else float("nan")


def verdict(d, se):
    if not math.isfinite(se):
        return "one seed"
    if se == 0.0:
        return "identical" if d == 0.0 else "differs (no spread)"
    return "within 2 SE" if abs(d) <= 2 * se else ("higher" if d > 0 else "lower")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("sar")
    ap.add_argument("--config", default="configs/fashion-mnist-lt-cnn-pool.toml")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--archs", default="small-cnn,cnn-pool")
    ap.add_argument("--arms", default="baseline,sar")
    ap.add_argument("--set", action="append", default=[], dest="sets")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    rows = []
    t0 = time.time()
    for arch in args.archs.split(","):
        for arm in args.arms.split(","):
            for seed in seeds:
                d = os.path.join(args.out, f"{arch}-{arm}-seed{seed}")
                mj = os.path.join(d, "mirror.json")
                if not os.path.exists(mj):
                    sets = [f'model.arch="{arch}"', f"sar.enabled={'true' if arm == 'sar' else 'false'}",
                            f"run.seed={seed}", "train.plots=false", *args.sets]
                    cmd = [args.sar, "train", "-q", "--config", args.config, "--overwrite",
                           "--output", os.path.join(d, "run"), "--debug-dump", os.path.join(d, "dump"),
                           "--debug-dump-plan"]
                    for s in sets:
                        cmd += ["--set", s]
                    # A fresh plan (an earlier interrupted run may have appended to it).
                    subprocess.run(["rm", "-rf", os.path.join(d, "dump")], check=True)
                    started = time.time()
                    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
                    ours_s = time.time() - started
                    subprocess.run([sys.executable, os.path.join(HERE, "train_mirror.py"), "--end-to-end",
                                    os.path.join(d, "run"), os.path.join(d, "dump"), "--json", mj], check=True)
                    r = json.load(open(mj))
                    r["ours_wall_seconds"] = ours_s
                    json.dump(r, open(mj, "w"), indent=1)
                    # The dump's pixels are large and reproducible: keep the plan only.
                    os.remove(os.path.join(d, "dump", "data.safetensors"))
                r = json.load(open(mj))
                rows.append({"arch": arch, "arm": arm, "seed": seed, "ours": r["ours"], "torch": r["torch"],
                             "ours_s": r.get("ours_wall_seconds"), "torch_s": r["torch"]["seconds"]})
                print(f"{arch:<10} {arm:<8} seed {seed}: top-1 ours {100 * r['ours']['top1']:.2f} torch "
                      f"{100 * r['torch']['top1']:.2f}; tail ours {100 * r['ours']['tail']:.2f} torch "
                      f"{100 * r['torch']['tail']:.2f}", flush=True)
    json.dump(rows, open(os.path.join(args.out, "parity.json"), "w"), indent=1)
    lines = [f"# Accuracy parity: sar train vs its PyTorch mirror, end to end",
             "", f"config `{args.config}`, overrides {args.sets or 'none'}, seeds {seeds}; "
             f"wall time of the whole comparison {time.time() - t0:.0f} s (this invocation)", "",
             "Per seed both sides start from the same step-0 weights and see the same batches "
             "(order, crops, flips); they differ only in their arithmetic.", "",
             "| arch | arm | metric | ours (mean ± std) | PyTorch (mean ± std) | ours − PyTorch (paired, ± SE) | verdict |",
             "|---|---|---|---|---|---|---|"]
    groups = {}
    for r in rows:
        groups.setdefault((r["arch"], r["arm"]), []).append(r)
    for (arch, arm), rs in groups.items():
        for metric in ["top1", "head", "medium", "tail", "last_epoch_ce"]:
            scale = 1.0 if metric == "last_epoch_ce" else 100.0
            o = [scale * r["ours"][metric] for r in rs]
            t = [scale * r["torch"][metric] for r in rs]
            om, osd, _ = stats(o)
            tm, tsd, _ = stats(t)
            dm, _, dse = stats([a - b for a, b in zip(o, t)])
            f = ".4f" if metric == "last_epoch_ce" else ".2f"
            lines.append(f"| {arch} | {arm} | {metric} | {om:{f}} ± {osd:{f}} | {tm:{f}} ± {tsd:{f}} | "
                         f"{dm:+{f}} ± {dse:{f}} | {verdict(dm, dse)} |")
    lines += ["", "SAR effect (sar − baseline, paired by seed), on each side:", "",
              "| arch | side | metric | sar − baseline (mean ± SE) | seeds up | verdict |", "|---|---|---|---|---|---|"]
    for arch in args.archs.split(","):
        base = {r["seed"]: r for r in groups.get((arch, "baseline"), [])}
        sar = {r["seed"]: r for r in groups.get((arch, "sar"), [])}
        common = sorted(set(base) & set(sar))
        if not common:
            continue
        for side in ["ours", "torch"]:
            for metric in ["top1", "tail"]:
                diffs = [100 * (sar[s][side][metric] - base[s][side][metric]) for s in common]
                m, _, se = stats(diffs)
                up = sum(d > 0 for d in diffs)
                lines.append(f"| {arch} | {'ours' if side == 'ours' else 'PyTorch'} | {metric} | {m:+.2f} ± {se:.2f} | "
                             f"{up} of {len(diffs)} | {verdict(m, se)} |")
    secs = [r["ours_s"] for r in rows if r["ours_s"]], [r["torch_s"] for r in rows]
    if secs[0]:
        lines += ["", f"Training wall time per run (median): ours {sorted(secs[0])[len(secs[0]) // 2]:.0f} s "
                      f"(with the plan dump), PyTorch {sorted(secs[1])[len(secs[1]) // 2]:.0f} s (the training loop only)."]
    open(os.path.join(args.out, "parity.md"), "w").write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
