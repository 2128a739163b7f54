#!/usr/bin/env bash
# Compile-checks the `cuda` features (candle's CUDA backend, real kernels through nvcc) on a
# machine without a GPU: candle's and dfdx's backends and everything built on them. Prints SKIPPED and exits 0 when the toolkit wheels cannot be had.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=cuda-env.sh
if ! source scripts/cuda-env.sh; then
  echo "SKIPPED: could not install the CUDA toolkit wheels from PyPI; the cuda features were not checked"
  exit 0
fi
echo "nvcc: $(nvcc --version | tail -n 1)"
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-target/cuda-check}
# nvcc writes its intermediate files under TMPDIR: keep them
# beside the build, not on a /tmp that may be a small separate disk.
mkdir -p "$CARGO_TARGET_DIR/nvcc-tmp"
export TMPDIR
TMPDIR=$(cd "$CARGO_TARGET_DIR/nvcc-tmp" && pwd)
cargo check -p sar-candle -p sar-dfdx -p sar-conformance -p sar-train --features sar-candle/cuda,sar-dfdx/cuda,sar-conformance/cuda,sar-train/cuda --all-targets
echo "cuda features: cargo check passed"
