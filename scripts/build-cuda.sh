#!/usr/bin/env bash
# Builds actrain's CUDA binary on a machine WITHOUT a GPU (toolkit from PyPI wheels, see
# scripts/cuda-toolkit.sh), in its own target dir so the CPU build cache stays warm.
#
#   bash scripts/build-cuda.sh            # target/cuda/release/actrain (+ the GPU bundle)
#   bash scripts/build-cuda.sh --tests    # also the CUDA test binaries (tests/cuda.rs, tests/cuda_train.rs)
#
# Output: target/cuda/release/actrain, and target/cuda/gpu-bundle.tar.gz holding the binary,
# the test binaries (with --tests) and nothing else: carry that one file to the GPU machine
# (device tool: carry=["target/cuda/gpu-bundle.tar.gz"]) and run scripts/gpu-check.sh there.
# Cost: ~7.5 min cold on 2 cores (candle's CUDA kernels dominate), seconds when warm.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"

tests=0
for a in "$@"; do
  case "$a" in
    --tests) tests=1 ;;
    *) echo "usage: $0 [--tests]" >&2; exit 2 ;;
  esac
done

eval "$(bash scripts/cuda-toolkit.sh)"
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$repo/target/cuda}
export CUDA_COMPUTE_CAP=90
export CUDAFORGE_THREADS=${CUDAFORGE_THREADS:-2}
# cudarc reads the toolkit version (13.0) from `nvcc --version`. Keep this environment identical
# between builds: cudarc/candle-kernels rebuild (~6 min) when any of these variables change.

t0=$(date +%s)
echo "[build-cuda] cargo build --release --features cuda (target dir $CARGO_TARGET_DIR)" >&2
cargo build --release --features cuda --bin actrain
bin=$CARGO_TARGET_DIR/release/actrain
test_bins=()
if [ "$tests" = 1 ]; then
  echo "[build-cuda] cargo test --release --features cuda --no-run" >&2
  # Only the CUDA tests (kernel parity, GPU training): the rest is covered by the CPU build.
  mapfile -t test_bins < <(
    cargo test --release --features cuda --test cuda --test cuda_train --no-run --message-format=json |
      python3 -c '
import json, sys
for line in sys.stdin:
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["profile"]["test"]:
        print(m["executable"])
')
fi
echo "[build-cuda] built in $(( $(date +%s) - t0 )) s" >&2

# Bundle for the GPU machine: binaries only, flat, with fixed names.
stage=$CARGO_TARGET_DIR/gpu-bundle
rm -rf "$stage"
mkdir -p "$stage"
cp "$bin" "$stage/actrain"
for t in "${test_bins[@]}"; do
  name=$(basename "$t")
  cp "$t" "$stage/test-${name%-*}"
done
(cd "$CARGO_TARGET_DIR" && tar -czf gpu-bundle.tar.gz gpu-bundle)

echo "binary: $bin ($(du -h "$bin" | cut -f1))"
for t in "${test_bins[@]}"; do echo "test:   $t ($(du -h "$t" | cut -f1))"; done
echo "bundle: $CARGO_TARGET_DIR/gpu-bundle.tar.gz ($(du -h "$CARGO_TARGET_DIR/gpu-bundle.tar.gz" | cut -f1); the device tool carries at most 64 MiB)"
echo "needs at run time (from the GPU machine's driver and its venv's nvidia/cu13/lib):"
readelf -d "$bin" | awk '/NEEDED/ { gsub(/[\[\]]/, "", $5); print "  " $5 }'
