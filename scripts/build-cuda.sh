#!/usr/bin/env bash
# Builds what scripts/gpu-check.sh runs on a GPU machine that has no Rust toolchain, into .gpu/:
# the conformance test binary with candle's and dfdx's CUDA backends, a CPU `sar` binary and a
# CUDA `sar` binary. Needs the
# CUDA runtime wheels (cuBLAS, cuRAND, NVRTC; about 1 GB) and a stub libcuda to link.
set -euo pipefail
cd "$(dirname "$0")/.."
export SAR_CUDA_RUNTIME=1
# shellcheck source=cuda-env.sh
source scripts/cuda-env.sh
stub="$V/stub"
tdir=${CARGO_TARGET_DIR:-target/cuda}
if [ ! -f "$stub/libcuda.so" ]; then
  # Every driver-API function cudarc declares, as a no-op stub exported under libcuda.so.1: enough
  # to link. At run time the GPU machine's real libcuda.so.1 (its driver's) is the one loaded.
  cargo fetch -q
  # Every cudarc in the lock file: candle's (0.19) and dfdx's (0.9).
  : > "$stub/symbols.all"
  for version in $(grep -A1 '^name = "cudarc"' Cargo.lock | sed -n 's/^version = "\(.*\)"/\1/p'); do
    for sys in $(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-"$version"/src/driver/sys/*.rs 2>/dev/null); do
      grep -oE '^ +(pub )?fn cu[A-Za-z0-9_]+\(' "$sys" | sed -E 's/^ +(pub )?fn (cu[A-Za-z0-9_]+)\(/\2/' >> "$stub/symbols.all"
    done
  done
  sort -u "$stub/symbols.all" > "$stub/symbols.txt"
  [ -s "$stub/symbols.txt" ] || { echo "no driver symbols found in cudarc's sources"; exit 1; }
  sed 's/.*/int &(void) { return 999; }/' "$stub/symbols.txt" > "$stub/libcuda.c"
  cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$stub/libcuda.so" "$stub/libcuda.c"
  echo "libcuda stub: $(wc -l < "$stub/symbols.txt") driver symbols from cudarc"
fi
CARGO_TARGET_DIR=$tdir cargo test --release -p sar-conformance --features cuda --no-run 2>&1 | tail -n 3
mkdir -p .gpu
bin=$(ls -t $tdir/release/deps/backends-* | grep -v '\.d$' | head -n 1)
cp "$bin" .gpu/backends-cuda
strip .gpu/backends-cuda || true
cargo build --release -p sar-train --bin sar
cp target/release/sar .gpu/sar
# `sar` with both CUDA backends, for the short dfdx training on the GPU.
CARGO_TARGET_DIR=$tdir cargo build --release -p sar-train --bin sar --features cuda 2>&1 | tail -n 3
cp "$tdir/release/sar" .gpu/sar-cuda
strip .gpu/sar-cuda || true
# The GPU machine takes at most 64 MiB per call: the three binaries are ~130 MB, ~33 MB gzipped
# (mostly PTX). scripts/gpu-check.sh unpacks them.
gzip -9 -f .gpu/backends-cuda .gpu/sar .gpu/sar-cuda
ls -la .gpu
