#!/usr/bin/env bash
# Installs the pinned CUDA 13.0 toolchain from PyPI wheels (no GPU, no system CUDA needed) and
# prints the environment to build actrain's CUDA path with it.
#
#   eval "$(bash scripts/cuda-toolkit.sh)"             # full toolkit: nvcc + nvrtc/cuBLAS/cuRAND + libcuda stub
#   eval "$(bash scripts/cuda-toolkit.sh --nvcc-only)" # only what `nvcc --ptx` needs (CI kernel check)
#
# Layout (all under $ACTRAIN_CUDA_DIR, default <repo>/.cuda, git-ignored by its own .gitignore):
#   venv/   python venv holding the nvidia-* wheels (site-packages/nvidia/cu13 is a toolkit tree)
#   root/   the "cuda root": bin, include, nvvm -> the wheel's; lib/ with unversioned links
#           (libcudart.so, libnvrtc.so, libcublas.so, libcublasLt.so, libcurand.so) and
#           lib/stubs/libcuda.so, a generated link-time stub of the driver (NEVER ship it: at run
#           time the real driver's libcuda.so.1 is used).
# Versions: PTX from nvcc 13.0 (PTX ISA 9.0) is what the GPU machines' driver 580 (CUDA 13.0) can
# JIT; newer nvcc emits PTX it rejects. See /work/shared/reference/cuda-build.md.
#
# Idempotent: each stage leaves a stamp and is skipped when its stamp matches.
# Progress goes to stderr; stdout carries only the `export` lines.
set -euo pipefail

mode=full
case "${1:-}" in
  --nvcc-only) mode=nvcc ;;
  ""|--full) ;;
  *) echo "usage: $0 [--nvcc-only|--full]" >&2; exit 2 ;;
esac

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
dir=${ACTRAIN_CUDA_DIR:-$repo/.cuda}
venv=$dir/venv
croot=$dir/root
log() { echo "[cuda-toolkit] $*" >&2; }

# Pinned: nvidia-cuda-runtime must be pinned too, else pip pulls the newest (13.5) as nvcc's dep.
NVCC_PKGS=(
  nvidia-cuda-nvcc==13.0.88
  nvidia-cuda-crt==13.0.88
  nvidia-nvvm==13.0.88
  nvidia-cuda-runtime==13.0.96
)
FULL_PKGS=(
  "${NVCC_PKGS[@]}"
  nvidia-cuda-cccl==13.0.85
  nvidia-cuda-nvrtc==13.0.88
  nvidia-cublas==13.0.2.14
  nvidia-curand==10.4.0.35
)
if [ "$mode" = nvcc ]; then pkgs=("${NVCC_PKGS[@]}"); else pkgs=("${FULL_PKGS[@]}"); fi

mkdir -p "$dir"
# Keep the 1.2 GB tree out of git (and so out of anything that copies the working tree).
[ -f "$dir/.gitignore" ] || echo '*' >"$dir/.gitignore"

# --- 1. wheels -----------------------------------------------------------------------------
stamp_ok() { [ "$(cat "$dir/.stamp-$1" 2>/dev/null || true)" = "$2" ]; }
if stamp_ok full "${FULL_PKGS[*]}" || { [ "$mode" = nvcc ] && stamp_ok nvcc "${NVCC_PKGS[*]}"; }; then
  log "wheels already installed ($mode)"
else
  if [ ! -x "$venv/bin/python" ]; then
    log "creating venv $venv"
    python3 -m venv "$venv"
  fi
  log "installing ${pkgs[*]}"
  t0=$(date +%s)
  "$venv/bin/pip" install --quiet --disable-pip-version-check "${pkgs[@]}" >&2
  log "wheels installed in $(( $(date +%s) - t0 )) s"
  echo "${NVCC_PKGS[*]}" >"$dir/.stamp-nvcc"
  [ "$mode" = nvcc ] || echo "${FULL_PKGS[*]}" >"$dir/.stamp-full"
fi

cu13=$("$venv/bin/python" -c 'import nvidia, os; print(next(p for p in (os.path.join(q, "cu13") for q in nvidia.__path__) if os.path.isdir(p)))')

# --- 2. cuda root ---------------------------------------------------------------------------
mkdir -p "$croot/lib"
for d in bin include nvvm; do
  ln -sfn "$cu13/$d" "$croot/$d"
done
ln -sfn lib "$croot/lib64"
# Every versioned library gets a same-name link plus an unversioned one (libX.so.13 -> libX.so).
shopt -s nullglob
for f in "$cu13"/lib/lib*.so.*; do
  base=$(basename "$f")
  ln -sfn "$f" "$croot/lib/$base"
  ln -sfn "$base" "$croot/lib/${base%%.so.*}.so"
done
shopt -u nullglob

# --- 3. libcuda stub (link time only) -------------------------------------------------------
if [ "$mode" = full ]; then
  stub=$croot/lib/stubs/libcuda.so
  if [ -f "$stub" ] && [ "$stub" -nt "$cu13/include/cuda.h" ]; then
    log "libcuda stub present"
  else
    log "generating libcuda stub from cuda.h"
    mkdir -p "$croot/lib/stubs"
    tmp=$(mktemp -d)
    # Every driver entry point returns CUresult; after preprocessing the names are the real
    # exported symbols (cuCtxCreate -> cuCtxCreate_v2 etc.). 34 = CUDA_ERROR_STUB_LIBRARY.
    gcc -E -P -I"$cu13/include" "$cu13/include/cuda.h" |
      grep -oE '\bCUresult[[:space:]]+cu[A-Za-z0-9_]+[[:space:]]*\(' |
      sed -E 's/^CUresult[[:space:]]+//; s/[[:space:]]*\($//' | sort -u |
      awk '{ printf "int %s(void) { return 34; }\n", $1 }' >"$tmp/stub.c"
    n=$(wc -l <"$tmp/stub.c")
    [ "$n" -gt 300 ] || { log "only $n symbols found in cuda.h: refusing"; exit 1; }
    gcc -shared -fPIC -O0 -Wl,-soname,libcuda.so.1 -o "$stub" "$tmp/stub.c"
    ln -sfn libcuda.so "$croot/lib/stubs/libcuda.so.1"
    rm -rf "$tmp"
    log "stub with $n symbols: $stub"
  fi
fi

"$croot/bin/nvcc" --version | grep -q 'release 13\.0' || { log "nvcc is not 13.0"; exit 1; }

# --- 4. environment ------------------------------------------------------------------------
cat <<EOF
export CUDA_ROOT='$croot'
export CUDA_HOME='$croot'
export CUDA_PATH='$croot'
export NVCC='$croot/bin/nvcc'
export PATH='$croot/bin':"\$PATH"
export CUDA_COMPUTE_CAP=\${CUDA_COMPUTE_CAP:-90}
export CUDAFORGE_THREADS=\${CUDAFORGE_THREADS:-2}
EOF
if [ "$mode" = full ]; then
  # Linking only: the build finds libcuda.so in lib/stubs; never put stubs on LD_LIBRARY_PATH.
  echo "export LIBRARY_PATH='$croot/lib:$croot/lib/stubs'\${LIBRARY_PATH:+:\$LIBRARY_PATH}"
fi
