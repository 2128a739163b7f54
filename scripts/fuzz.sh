#!/usr/bin/env bash
# Runs every cargo-fuzz target (or those named) for SECONDS each, with the committed seeds and
# past crashes replayed first. Needs cargo-fuzz (`cargo install cargo-fuzz`); stable Rust works
# with --sanitizer none.
#   scripts/fuzz.sh [SECONDS] [TARGET...]      (default 20 s, every target)
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
seconds="${1:-20}"
shift || true
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  mapfile -t targets < <(cargo fuzz list)
fi
for target in "${targets[@]}"; do
  mkdir -p "corpus/$target" "regressions/$target"
  echo "--- $target: ${seconds}s"
  cargo fuzz run --sanitizer none "$target" "corpus/$target" "seeds/$target" "regressions/$target" -- \
    -max_total_time="$seconds" -rss_limit_mb=4096 2>&1 | tail -n 3
  test "${PIPESTATUS[0]}" -eq 0
done
