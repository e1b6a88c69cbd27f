#!/usr/bin/env bash
# Compiles every kernels/*.cu to PTX with the pinned nvcc 13.0 (the PTX ISA the GPU machines'
# driver can JIT), failing on any error or warning. No GPU needed; installs only the nvcc wheels
# (nvcc, crt headers, nvvm, runtime headers; ~280 MB) into .cuda/ on first use.
#
#   bash scripts/check-kernels.sh            # PTX goes to a temporary folder
#   PTX_OUT=dir bash scripts/check-kernels.sh  # keep the PTX in dir
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
t0=$(date +%s.%N)
eval "$(bash scripts/cuda-toolkit.sh --nvcc-only)"
t1=$(date +%s.%N)
out=${PTX_OUT:-$(mktemp -d)}
mkdir -p "$out"
arch=sm_${CUDA_COMPUTE_CAP:-90}
shopt -s nullglob
files=(kernels/*.cu)
[ ${#files[@]} -gt 0 ] || { echo "no kernels/*.cu" >&2; exit 1; }
fail=0
for f in "${files[@]}"; do
  ptx=$out/$(basename "${f%.cu}").ptx
  if "$NVCC" --ptx -arch="$arch" -O3 -Werror all-warnings -o "$ptx" "$f"; then
    ver=$(grep -m1 '^\.version' "$ptx" | awk '{print $2}')
    entries=$(grep -c '^\.visible \.entry' "$ptx" || true)
    echo "ok   $f -> $ptx (PTX $ver, $entries entry points, $(wc -c <"$ptx") bytes)"
    # Driver 580 (CUDA 13.0) JITs PTX ISA <= 9.0 only.
    [ "$ver" = "9.0" ] || { echo "FAIL $f: PTX ISA $ver, expected 9.0 (nvcc 13.0)" >&2; fail=1; }
  else
    echo "FAIL $f" >&2
    fail=1
  fi
done
t2=$(date +%s.%N)
awk -v a="$t0" -v b="$t1" -v c="$t2" 'BEGIN { printf "toolkit %.1f s, compile %.1f s\n", b - a, c - b }'
exit $fail
