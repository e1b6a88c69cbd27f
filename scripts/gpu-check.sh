#!/usr/bin/env bash
# The one script to run ON the GPU machine: no Rust, no network there. It runs whatever CUDA
# checks and benchmarks the carried binaries offer and prints a short table last.
#
# Here (no GPU):   bash scripts/build-cuda.sh --tests      -> target/cuda/gpu-bundle.tar.gz
# There (device tool):
#   run(command="bash scripts/gpu-check.sh", carry=["target/cuda/gpu-bundle.tar.gz"])
#
# Binaries are taken from target/cuda/gpu-bundle.tar.gz (actrain + test-cuda), else from
# target/cuda/release/actrain. Libraries: the image's Python venv ships the CUDA 13 user-space
# libraries (cuBLAS, cuRAND, NVRTC, cudart) under nvidia/cu13/lib; the driver provides
# libcuda.so.1. Logs (and the table, as table.txt) go to $OUT/gpu-check when $OUT is set.
#
# Env: CHECK_TIMEOUT (s per check, default 240), FIT_STEPS (default 100), SKIP_CPU=1 (skip the
# CPU reference runs), GPU_CHECKS (space-separated subset of: tests bench selftest fit
# max-batch profile-memory; default all).
set -uo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
timeout_s=${CHECK_TIMEOUT:-240}
fit_steps=${FIT_STEPS:-100}
checks=${GPU_CHECKS:-"tests bench selftest fit max-batch profile-memory"}
logdir=${OUT:-${TMPDIR:-/tmp}/actrain-gpu-check}/gpu-check
mkdir -p "$logdir"
rows=()   # "name|status|seconds|note"
benches=()

say() { echo "[gpu-check] $*"; }
want() { [[ " $checks " == *" $1 "* ]]; }

# --- binaries ----------------------------------------------------------------------------------
bindir=""
if [ -f target/cuda/gpu-bundle.tar.gz ]; then
  work=${TMPDIR:-/tmp}/actrain-gpu-bundle
  rm -rf "$work" && mkdir -p "$work"
  tar -xzf target/cuda/gpu-bundle.tar.gz -C "$work" && bindir=$work/gpu-bundle
elif [ -x target/cuda/release/actrain ]; then
  bindir=target/cuda/release
fi
if [ -z "$bindir" ] || [ ! -x "$bindir/actrain" ]; then
  say "no CUDA binary: build one with scripts/build-cuda.sh and carry target/cuda/gpu-bundle.tar.gz"
  exit 2
fi
bin=$bindir/actrain
test_bin=""
[ -x "$bindir/test-cuda" ] && test_bin=$bindir/test-cuda

# --- libraries ---------------------------------------------------------------------------------
libdir=$(python3 - <<'EOF' 2>/dev/null
import os
try:
    import nvidia
except ImportError:
    raise SystemExit(0)
for p in nvidia.__path__:
    d = os.path.join(p, "cu13", "lib")
    if os.path.isdir(d):
        print(d)
        break
EOF
)
if [ -n "$libdir" ]; then
  export LD_LIBRARY_PATH=$libdir${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
  say "LD_LIBRARY_PATH += $libdir"
else
  say "WARNING: no nvidia/cu13/lib found via python3; relying on the system library path"
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null |
  sed 's/^/[gpu-check] gpu: /' || say "nvidia-smi not available"
missing=$(ldd "$bin" 2>/dev/null | awk '/not found/ { print $1 }' | tr '\n' ' ')
if [ -n "$missing" ]; then
  say "missing libraries: $missing"
  rows+=("libraries|FAIL|0|missing: $missing")
fi

# --- runner ------------------------------------------------------------------------------------
# run_check NAME CMD...: runs with a timeout, logs to $logdir/NAME.log, records a row.
# A command the binary does not offer (or a binary without CUDA support) is a SKIP, not a FAIL.
run_check() {
  local name=$1; shift
  local log=$logdir/$name.log
  say "== $name: $*"
  local t0 t1 rc secs note status
  t0=$(date +%s.%N)
  timeout "$timeout_s" "$@" >"$log" 2>&1
  rc=$?
  t1=$(date +%s.%N)
  secs=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f", b - a }')
  tail -n 5 "$log" | sed 's/^/    /'
  if [ $rc -eq 0 ]; then
    status=PASS
  elif [ $rc -eq 124 ]; then
    status=TIMEOUT
  elif grep -qiE "without CUDA support|unrecognized subcommand|unexpected argument|not (yet )?supported|unsupported device|invalid value .*device" "$log"; then
    status=SKIP
  else
    status=FAIL
  fi
  note=$(summarize "$log")
  rows+=("$name|$status|$secs|$note")
  return 0
}

# One-line note for the table: a test harness's result line, the key fields of a JSON result,
# else the last line of output.
summarize() {
  python3 - "$1" <<'PYEOF'
import json, re, sys
lines = [l.rstrip() for l in open(sys.argv[1], errors="replace") if l.strip()]
res = [l for l in lines if l.startswith("test result:")]
if res:
    m = re.search(r"(\d+) passed; (\d+) failed", res[-1])
    note = f"{m.group(1)} passed, {m.group(2)} failed" if m else res[-1]
    failed = [l.split()[1] for l in lines if l.startswith("test ") and l.endswith("FAILED")]
    if failed:
        note += ": " + " ".join(failed)
    print(note[:90])
    raise SystemExit
for l in reversed(lines):
    if l.startswith("{"):
        try:
            d = json.loads(l)
        except ValueError:
            break
        if isinstance(d, dict):
            keys = ["steps", "seconds", "samples_per_second", "test_accuracy", "peak_bytes",
                    "context_bytes", "max_batch", "device"]
            parts = []
            for k in keys:
                if k in d and not isinstance(d[k], (dict, list)):
                    v = d[k]
                    parts.append(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}")
            print((" ".join(parts) or l)[:90])
            raise SystemExit
        break
print((lines[-1] if lines else "")[:90])
PYEOF
}

has_command() { "$bin" --help 2>/dev/null | grep -qE "^\s+$1(\s|$)"; }

# --- 1. kernel parity tests (CPU vs GPU bit identity) -------------------------------------------
if want tests; then
  if [ -n "$test_bin" ]; then
    run_check tests "$test_bin" --test-threads=1
  else
    rows+=("tests|SKIP|0|no test-cuda in the bundle (build-cuda.sh --tests)")
  fi
fi

# --- 2. kernel benchmarks ---------------------------------------------------------------------
if want bench && [ -n "$test_bin" ]; then
  run_check bench "$test_bin" --ignored --nocapture --test-threads=1 bench_
  while IFS= read -r l; do benches+=("$l"); done < <(grep '^BENCH' "$logdir/bench.log" || true)
fi

# --- 3. the binary's own self-test, if it has one ----------------------------------------------
if want selftest; then
  found=""
  for c in cuda-selftest cuda-self-test self-test selftest check-cuda; do
    if has_command "$c"; then found=$c; break; fi
  done
  if [ -n "$found" ]; then
    run_check selftest "$bin" "$found" --device cuda:0
  else
    rows+=("selftest|SKIP|0|binary has no self-test command")
  fi
fi

# --- 4. training: GPU vs CPU ----------------------------------------------------------------------
if want fit; then
  for level in L0 L3; do
    run_check "fit-$level-cuda" "$bin" fit --device cuda:0 --model cnn --data digits --level "$level" \
      --epochs 1 --max-steps "$fit_steps" --quiet --json
    if [ "${SKIP_CPU:-0}" != 1 ]; then
      run_check "fit-$level-cpu" "$bin" fit --device cpu --model cnn --data digits --level "$level" \
        --epochs 1 --max-steps "$fit_steps" --quiet --json
    fi
  done
fi

# --- 5. memory: max-batch and profile-memory on the GPU ----------------------------------------
if want max-batch; then
  if has_command max-batch; then
    run_check max-batch-cuda "$bin" max-batch --device cuda:0 --model cnn --data digits \
      --levels L0,L3 --json
  else
    rows+=("max-batch-cuda|SKIP|0|binary has no max-batch command")
  fi
fi
if want profile-memory; then
  if has_command profile-memory; then
    run_check profile-memory-cuda "$bin" profile-memory --device cuda:0 --model cnn --data digits \
      --levels L0,L3 --json
  else
    rows+=("profile-memory-cuda|SKIP|0|binary has no profile-memory command")
  fi
fi

# --- table (last) ---------------------------------------------------------------------------------
{
  echo
  echo "actrain gpu-check  $(date -u +%Y-%m-%dT%H:%MZ)  $(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n1)"
  printf '%-22s %-8s %8s  %s\n' check status seconds note
  for r in "${rows[@]}"; do
    IFS='|' read -r n s t note <<<"$r"
    printf '%-22s %-8s %8s  %s\n' "$n" "$s" "$t" "$note"
  done
  for b in "${benches[@]}"; do echo "$b"; done
} | tee "$logdir/table.txt"

# Exit status: 1 if anything FAILed or timed out (SKIPs are fine).
for r in "${rows[@]}"; do
  case "$r" in *"|FAIL|"*|*"|TIMEOUT|"*) exit 1 ;; esac
done
exit 0
