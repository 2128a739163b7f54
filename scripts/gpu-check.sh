#!/usr/bin/env bash
# The GPU checks, in one run, on a machine with an NVIDIA GPU, its driver and PyTorch but no
# Rust toolchain. Build the inputs on a development machine first (scripts/build-cuda.sh puts
# them in .gpu/): the CUDA conformance test binary and a CPU `sar` binary.
#
#   bash scripts/gpu-check.sh [DIR]     # DIR defaults to .gpu; logs to $OUT (or ./gpu-out)
#
# 1. candle-CUDA conformance: the suite of tests/conformance against candle on the GPU, f32
#    and f64 (SAR_REQUIRE_CUDA=1 makes a missing device fail instead of skip).
#    Then dfdx-CUDA conformance, a short digits training and a short mosaic segmentation
#    training on the GPU with each backend.
# 2. `sar reference` against an independent PyTorch implementation, on the CPU and on the GPU.
# Prints a short table at the end; exits non-zero if any part failed.
set -uo pipefail
dir=${1:-.gpu}
out=${OUT:-./gpu-out}
mkdir -p "$out"
log="$out/gpu-check.log"
: > "$log"
say() { echo "$*" | tee -a "$log"; }

say "== device"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | tee -a "$log"
python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(0))' 2>&1 | tee -a "$log"

# CUDA libraries: the driver's libcuda, and cuBLAS/cuRAND/cudart/NVRTC from PyTorch's wheels.
nv=$(python3 -c 'import nvidia, os; print(os.path.dirname(nvidia.__file__))' 2>/dev/null)
libdirs=$(find "$nv" /usr/local/nvidia/lib64 /usr/lib/x86_64-linux-gnu -maxdepth 3 -type d -name lib\* 2>/dev/null | tr '\n' ':')
export LD_LIBRARY_PATH="${libdirs}${LD_LIBRARY_PATH:-}"

# scripts/build-cuda.sh gzips the binaries (the machine takes 64 MiB per call).
for z in "$dir"/*.gz; do
  [ -e "$z" ] && gunzip -kf "$z"
done

results=()
say "== 1. candle-CUDA conformance"
t=$(ls "$dir"/backends-* 2>/dev/null | grep -v '\.gz$' | head -n 1)
if [ -z "$t" ]; then
  say "missing: $dir/backends-* (build it with scripts/build-cuda.sh)"; results+=("conformance: NOT RUN")
else
  chmod +x "$t"
  ldd "$t" | grep -E "cuda|cublas|curand|nvrtc|not found" | tee -a "$log"
  SAR_REQUIRE_CUDA=1 "$t" candle_cuda --test-threads=1 2>&1 | tee -a "$log"
  rc=${PIPESTATUS[0]}
  results+=("candle-CUDA conformance: $([ $rc -eq 0 ] && echo PASS || echo "FAIL (rc $rc)") ($(grep -c '^test candle_cuda.* ok$' "$log") tests ok)")
fi

say "== 1b. dfdx-CUDA conformance"
if [ -n "$t" ]; then
  SAR_REQUIRE_CUDA=1 "$t" dfdx_cuda --test-threads=1 2>&1 | tee -a "$log"
  rc=${PIPESTATUS[0]}
  results+=("dfdx-CUDA conformance: $([ $rc -eq 0 ] && echo PASS || echo "FAIL (rc $rc)") ($(grep -c '^test dfdx_cuda.* ok$' "$log") tests ok)")
fi

say "== 1c. short training on the GPU: embedded digits, small CNN + SAR, 10 epochs, dfdx and candle"
if [ -x "$dir/sar-cuda" ] || chmod +x "$dir/sar-cuda" 2>/dev/null; then
  for backend in dfdx candle; do
    "$dir/sar-cuda" train --config configs/digits-small-cnn.toml --backend "$backend" --quiet \
      --set run.device='"cuda"' --set train.epochs=10 --set train.plots=false \
      --output "$out/train-$backend" 2>&1 | tail -n 3 | tee -a "$log"
    rc=${PIPESTATUS[0]}
    results+=("train on CUDA ($backend): $([ $rc -eq 0 ] && echo PASS || echo "FAIL (rc $rc)") $(grep -o '"top1": [0-9.]*' "$out/train-$backend/report.json" 2>/dev/null)")
  done
  say "== 1d. segmentation on the GPU: the glyph mosaic, FCN-R18-V1c + SAR, 200 iterations, dfdx and candle"
  for backend in dfdx candle; do
    "$dir/sar-cuda" train --config configs/mosaic-fcn-r18.toml --backend "$backend" --quiet \
      --set run.device='"cuda"' --set train.iters=200 --set train.plots=false \
      --output "$out/seg-$backend" 2>&1 | tail -n 3 | tee -a "$log"
    rc=${PIPESTATUS[0]}
    results+=("segmentation on CUDA ($backend): $([ $rc -eq 0 ] && echo PASS || echo "FAIL (rc $rc)") $(grep -o '"miou": [0-9.]*' "$out/seg-$backend/report.json" 2>/dev/null)")
  done
else
  say "missing: $dir/sar-cuda"; results+=("train on CUDA: NOT RUN")
fi

say "== 2. sar reference vs PyTorch"
chmod +x "$dir/sar" 2>/dev/null
for device in cpu cuda; do
  python3 tests/torch/check_reference.py "$dir/sar" --cases 2000 --seed 11 --device "$device" 2>&1 | tail -n 16 | tee -a "$log"
  rc=${PIPESTATUS[0]}
  results+=("sar reference vs torch ($device): $([ $rc -eq 0 ] && echo PASS || echo "FAIL (rc $rc)")")
done

say "== 3. PyTorch nearest on CUDA vs the f32 rule, sizes 1..80"
python3 - <<'PY' 2>&1 | tee -a "$log"
import torch, torch.nn.functional as F
bad = 0
for i in range(1, 81):
    for o in range(1, 81):
        x = torch.arange(i, dtype=torch.float32, device="cuda")[None, None, :, None].expand(1, 1, i, 1).contiguous()
        got = F.interpolate(x, size=(o, 1), mode="nearest")[0, 0, :, 0].long().cpu().tolist()
        s = torch.tensor(i, dtype=torch.float32) / torch.tensor(o, dtype=torch.float32)
        want = [d if o == i else (d >> 1 if o == 2 * i else min(int(torch.floor(torch.tensor(d, dtype=torch.float32) * s)), i - 1)) for d in range(o)]
        bad += got != want
print(f"CUDA nearest: {bad} of 6400 size pairs differ from the f32 rule")
raise SystemExit(1 if bad else 0)
PY
rc=${PIPESTATUS[0]}
results+=("torch CUDA nearest = f32 rule: $([ $rc -eq 0 ] && echo PASS || echo FAIL)")

say ""
say "== summary"
fail=0
for r in "${results[@]}"; do say "$r"; case "$r" in *PASS*) ;; *) fail=1 ;; esac; done
exit $fail
