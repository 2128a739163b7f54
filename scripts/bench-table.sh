#!/usr/bin/env bash
# One run of the training-speed comparison with PyTorch on the CPU: every workload on candle
# and on dfdx, each in its own process beside the project's PyTorch peer of the same work, so
# that each process's system-time share and peak memory are its own.
#
#   bash scripts/bench-table.sh PYTHON [REPS] [OUT]
#
# PYTHON: a Python with torch, numpy and safetensors. REPS: timed steps per variant (median;
# default 5). OUT: folder for the logs and the table (default docs/results/bench-table-DATE).
#
# 1. ResNet-32, batch 128, ± SAR and FCN-R18-d8 + auxiliary head, batch 2 of 512², ± SAR:
#    `sar bench --workload resnet32|seg-step --backend B --torch PYTHON`, ours and the peer's
#    steps interleaved in one run (the seg-step peer has no SAR variant: SAR's rows are divided
#    by its plain step).
# 2. One epoch of the small CNN on Fashion-MNIST-LT (imbalance 100, 14,886 images, batch 128,
#    crop + flip), baseline and SAR: `sar train` per backend, and PyTorch training on exactly
#    the same batches from the same initial weights (tests/torch/train_mirror.py --end-to-end,
#    fed by `sar train --debug-dump DIR --debug-dump-plan`), two rounds, alternating. Training
#    time only: ours is the report's wall_seconds (evaluation excluded), PyTorch's the mirror's
#    loop. The data: Debian's dataset-fashion-mnist (/usr/share/datasets/fashion-mnist).
#
# Prints the table (also OUT/table.md). Needs `/usr/bin/time` (GNU time) for the epoch runs.
set -euo pipefail
py=${1:?usage: bench-table.sh PYTHON [REPS] [OUT]}
reps=${2:-5}
out=${3:-docs/results/bench-table-$(date +%F)}
fm=/usr/share/datasets/fashion-mnist
mkdir -p "$out"
cargo build --release -p sar-train --bin sar
sar=target/release/sar
"$py" -c 'import torch, numpy, safetensors' || { echo "$py lacks torch, numpy or safetensors" >&2; exit 1; }

for w in resnet32 seg-step; do
  for b in candle dfdx; do
    echo "== $w on $b"
    "$sar" bench --workload "$w" --backend "$b" --torch "$py" --reps "$reps" \
      --json "$out/$w-$b.json" | tee "$out/$w-$b.txt"
  done
done

if [ -d "$fm" ]; then
  cfg=(--config configs/fashion-mnist-lt-cnn-pool.toml --set 'model.arch="small-cnn"'
       --set train.epochs=1 --set train.log_every=1000 --quiet --overwrite)
  work=$(mktemp -d)
  : > "$out/epoch.txt"
  trap 'rm -rf "$work"' EXIT
  for arm in base sar; do
    sar_on=$([ $arm = sar ] && echo true || echo false)
    # The batches and initial weights for the mirror (not timed: dumping costs time).
    "$sar" train "${cfg[@]}" --set sar.enabled=$sar_on --output "$work/dump-run-$arm" \
      --debug-dump "$work/dump-$arm" --debug-dump-plan > /dev/null
    echo "epoch images $("$py" -c "import json,sys; print(json.load(open(sys.argv[1]))['train_len'])" "$work/dump-$arm/meta.json")" >> "$out/epoch.txt"
    for round in 1 2; do
      for b in candle dfdx; do
        run="$work/$b-$arm-$round"
        /usr/bin/time -f "%U %S %M" -o "$run.time" "$sar" train "${cfg[@]}" --set sar.enabled=$sar_on \
          --backend $b --output "$run" > /dev/null
        secs=$("$py" -c "import json,sys; print(json.load(open(sys.argv[1]))['wall_seconds'])" "$run/report.json")
        echo "epoch $arm $b round $round: train ${secs} s; process user/sys s, peak KiB: $(cat "$run.time")" | tee -a "$out/epoch.txt"
      done
      /usr/bin/time -f "%U %S %M" -o "$work/torch.time" "$py" tests/torch/train_mirror.py \
        "$work/dump-run-$arm" "$work/dump-$arm" --end-to-end --json "$work/torch-$arm-$round.json" > "$work/torch.log"
      secs=$("$py" -c "import json,sys; print(json.load(open(sys.argv[1]))['torch']['seconds'])" "$work/torch-$arm-$round.json")
      echo "epoch $arm torch round $round: train ${secs} s; process user/sys s, peak KiB: $(cat "$work/torch.time")" | tee -a "$out/epoch.txt"
    done
  done
else
  echo "no $fm: the Fashion-MNIST epoch is skipped (apt-get install dataset-fashion-mnist)" | tee "$out/epoch.txt"
fi

"$py" scripts/bench_table.py "$out"
