#!/usr/bin/env python3
"""Train-loop parity: `sar train` against its PyTorch mirror (train_mirror.py), per variant.

Each variant is the embedded digits with the small CNN (`small-cnn`, or `cnn-pool`), a few dozen steps, logging and
checkpointing every step;
the variants cover SGD with and without Nesterov and weight decay, warm-up, the cosine, step
and poly schedules, MixUp, and SAR on and off. For each: `sar train --debug-dump`, then the
mirror replays the dumped batches in PyTorch and compares every step's loss parts and learning
rate and the final parameters, momentum buffers, BatchNorm statistics and SAR state.

    python3 tests/torch/check_training.py path/to/sar [--steps 40] [--keep DIR]

Needs torch and safetensors. Prints one summary line per variant; exits non-zero on a mismatch.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))

VARIANTS = {
    "sar-cosine": [],
    "baseline": ["sar.enabled=false"],
    "sar-mixup": ["data.mixup_alpha=1.0"],
    "nesterov-warmup-step": ["optim.nesterov=true", "optim.warmup_epochs=1", "optim.schedule=\"step\"",
                             "optim.milestones=[2]", "optim.gamma=0.2"],
    "no-weight-decay-poly": ["optim.weight_decay=0.0", "optim.schedule=\"poly\"", "optim.power=0.9"],
    "no-momentum-constant": ["optim.momentum=0.0", "optim.schedule=\"constant\"", "sar.lambda_p2a=1.0"],
    "sar-detached-weights-mixup": ["sar.weights=\"detached\"", "data.mixup_alpha=0.4", "optim.nesterov=true"],
    "cnn-pool-sar": ["model.arch=\"cnn-pool\""],
    "cnn-pool-baseline-mixup": ["model.arch=\"cnn-pool\"", "sar.enabled=false", "data.mixup_alpha=1.0"],
}

DIGITS = """dataset = "digits"
imbalance = 10.0"""

# --fashion-mnist ROOT: the real long-tailed set (Debian's dataset-fashion-mnist), as
# configs/fashion-mnist-lt-cnn-pool.toml trains it.
FASHION = """dataset = "mnist-idx"
root = {root!r}
imbalance = 100.0
augment = "crop-flip"
pad = 2"""

CONFIG = """[run]
seed = {seed}
output = {out!r}
[data]
{data}
[model]
arch = "small-cnn"
[optim]
lr = 0.05
[train]
epochs = 3
batch_size = {batch}
log_every = 1
max_steps = {steps}
checkpoint_every_steps = 1
keep_checkpoints = 1000
plots = false
"""


def drift(path):
    """The free-running trajectory in one line: the first step whose loss differs by more than
    1e-4 relative, and the last step's difference."""
    try:
        steps = json.load(open(path))["steps"]
    except (OSError, ValueError):
        return None
    first = next((r["step"] for r in steps if r["rel_err"]["loss"] > 1e-4), None)
    return (f"loss within 1e-4 relative {'for all ' + str(len(steps)) + ' steps' if first is None else 'up to step ' + str(first - 1)}; "
            f"last step {steps[-1]['rel_err']['loss']:.1e}, final state {steps[-1].get('state_err', float('nan')):.1e}")


def check_plan_render(sar, root, steps):
    """`--debug-dump-plan` against `--debug-dump`: the mirror's rendering of each step from the
    stored pixels and the plan (train_mirror.render) equals the batch the run rendered, with
    crop, flip and MixUp all on. Returns an error message or None."""
    import torch
    from safetensors.torch import load_file
    sys.path.insert(0, HERE)
    from train_mirror import render
    d = os.path.join(root, "plan-render")
    os.makedirs(d, exist_ok=True)
    cfg = os.path.join(d, "run.toml")
    with open(cfg, "w") as f:
        f.write(CONFIG.format(seed=3, out=os.path.join(d, "run"), steps=steps, data=DIGITS, batch=32))
    sets = ["--set", "data.flip=true", "--set", "data.mixup_alpha=0.4", "--set", "data.pad=2"]
    base = [sar, "train", "-q", "--config", cfg, "--overwrite", *sets]
    subprocess.run(base + ["--debug-dump", os.path.join(d, "batches")], check=True, stdout=subprocess.DEVNULL)
    subprocess.run(base + ["--debug-dump", os.path.join(d, "plan"), "--debug-dump-plan"], check=True,
                   stdout=subprocess.DEVNULL)
    data = load_file(os.path.join(d, "plan", "data.safetensors"))
    mean, std, mx = data["mean"].float(), data["std"].float(), float(data["max_value"])
    run_cfg = __import__("tomllib").load(open(os.path.join(d, "run", "config.toml"), "rb"))
    worst, flips = 0.0, 0
    for line in open(os.path.join(d, "plan", "plan.jsonl")):
        rec = json.loads(line)
        flips += sum(1 for c in rec["crop"] if c[2])
        mine = render(data, rec, run_cfg["data"], mean, std, mx)
        ours = load_file(os.path.join(d, "batches", f"batch-{rec['step']:06}.safetensors"))
        if not torch.equal(mine["labels"], ours["labels"]) or not torch.equal(mine["labels_b"], ours["labels_b"]):
            return f"step {rec['step']}: labels differ"
        worst = max(worst, float((mine["x"].double() - ours["x"]).abs().max()))
    if flips == 0:
        return "no sample was flipped: the check did not cover flips"
    print(f"plan replay: {steps} steps rendered from the stored pixels and the plan, max |Δx| {worst:.1e} "
          f"against the run's own batches ({flips} flipped samples, MixUp on)")
    return None if worst < 1e-5 else f"rendered batches differ by {worst}"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("sar")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--keep")
    ap.add_argument("--fashion-mnist", metavar="ROOT",
                    help="the variants on Fashion-MNIST-LT (imbalance 100, crop-flip, batch 128) from "
                         "the IDX files in ROOT instead of the embedded digits")
    args = ap.parse_args()
    data = FASHION.format(root=args.fashion_mnist) if args.fashion_mnist else DIGITS
    batch = 128 if args.fashion_mnist else 32
    root = args.keep or tempfile.mkdtemp()
    failed = []
    for i, (name, sets) in enumerate(VARIANTS.items()):
        d = os.path.join(root, name)
        os.makedirs(d, exist_ok=True)
        cfg = os.path.join(d, "run.toml")
        out = os.path.join(d, "run")
        with open(cfg, "w") as f:
            f.write(CONFIG.format(seed=i, out=out, steps=args.steps, data=data, batch=batch))
        cmd = [args.sar, "train", "-q", "--config", cfg, "--overwrite", "--debug-dump", os.path.join(d, "dump")]
        for s in sets:
            cmd += ["--set", s]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        mirror = [sys.executable, os.path.join(HERE, "train_mirror.py"), out, os.path.join(d, "dump")]
        # Gate: every step from the run's own state of the step before, in f32 (rounding only),
        # the state judged against PyTorch in f64 (train_mirror --rounding): ours must stay
        # within 4x of PyTorch f32's distance to f64. A direct f32-vs-f32 tolerance is not a
        # fair gate: on some CPUs PyTorch's own f32 step lands 1e-1 away from f64 on the digits
        # (baseline, step 3, a near-degenerate BatchNorm channel) while ours stays at 4e-7.
        rounding = ["--rounding"]
        tf = subprocess.run(mirror + rounding + ["--teacher-forced", "--tol", "1e-5", "--tol-state", "1e-4",
                                      "--json", os.path.join(d, "teacher-forced.json")],
                            text=True, capture_output=True)
        # Report: the free-running trajectory, where rounding differences compound.
        free = subprocess.run(mirror + ["--json", os.path.join(d, "free.json")], text=True, capture_output=True)
        last = lambda r: r.stdout.strip().splitlines()[-1] if r.stdout.strip() else r.stderr.strip()[-500:]
        print(f"{name:<28} {' '.join(sets) or '(defaults)'}\n    teacher-forced: {last(tf)}"
              f"\n    free-running:   {drift(os.path.join(d, 'free.json')) or last(free)}")
        if tf.returncode != 0:
            failed.append(name)
            print(tf.stdout[-4000:], tf.stderr[-3000:])
    err = check_plan_render(args.sar, root, min(args.steps, 10))
    if err:
        failed.append("plan-render")
        print(f"plan replay: {err}")
    print(f"{len(VARIANTS) + 1 - len(failed)} passed, {len(failed)} failed")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
