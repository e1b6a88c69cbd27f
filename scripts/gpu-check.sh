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
# CPU reference runs), GPU_CHECKS (space-separated subset of: tests bench fit max-batch
# profile-memory; default all), MAXB_MEMORY (default 8GiB), MAXB_LEVELS (default L0..L4),
# MAXB_MODELS (default "resnet50 gpt-small").
set -uo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
timeout_s=${CHECK_TIMEOUT:-240}
fit_steps=${FIT_STEPS:-100}
checks=${GPU_CHECKS:-"tests bench fit max-batch profile-memory"}
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

# --- 1. CUDA tests: kernel parity (CPU vs GPU bits) and GPU training vs the CPU -------------
if want tests; then
  for t in cuda cuda_train; do
    if [ -x "$bindir/test-$t" ]; then
      run_check "test-$t" "$bindir/test-$t" --test-threads=1 --nocapture
    else
      rows+=("test-$t|SKIP|0|no test-$t in the bundle (build-cuda.sh --tests)")
    fi
  done
fi

# --- 1b. a card that is not there: a clear error naming the flag, not a panic -------------------
if want tests; then
  log=$logdir/no-such-gpu.log
  if "$bin" fit --device cuda:7 --max-steps 1 --quiet >"$log" 2>&1; then
    rows+=("no-such-gpu|FAIL|0|--device cuda:7 did not fail")
  elif grep -q -- "--device cuda:7" "$log" && ! grep -q "panicked" "$log"; then
    rows+=("no-such-gpu|PASS|0|$(grep -m1 -- '--device cuda:7' "$log" | cut -c1-80)")
  else
    rows+=("no-such-gpu|FAIL|0|$(tail -n1 "$log" | cut -c1-80)")
  fi
fi

# --- 2. kernel benchmarks (BENCH lines: bandwidth vs a device-to-device copy) -----------------
if want bench && [ -n "$test_bin" ]; then
  run_check bench "$test_bin" --ignored --nocapture --test-threads=1 bench_
  while IFS= read -r l; do benches+=("$l"); done < <(grep '^BENCH' "$logdir/bench.log" || true)
fi

# --- 3. training through the binary: GPU vs CPU -------------------------------------------------
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

# --- 4. max-batch on the card, L0..L4: a ResNet-50 and a GPT-2-small-shaped transformer --------
# --memory emulates an 8 GiB card (README's table; ratios to compare with ActNN's 16 GB T4); MAXB_MEMORY overrides it.
maxb_memory=${MAXB_MEMORY:-8GiB}
maxb_levels=${MAXB_LEVELS:-L0,L1,L2,L3,L4}
maxb() {  # maxb NAME MODEL DATA [extra flags]
  local name=$1 model=$2 data=$3; shift 3
  run_check "$name" "$bin" max-batch --device cuda:0 --model "$model" --data "$data" \
    --memory "$maxb_memory" --levels "$maxb_levels" --steps 2 --json "$@"
  python3 - "$logdir/$name.log" "$name" <<'PYEOF' >>"$logdir/maxb-rows.txt"
import json, sys
for l in open(sys.argv[1], errors="replace"):
    l = l.strip()
    if not l.startswith("{"):
        continue
    try:
        d = json.loads(l)
    except ValueError:
        continue
    if "max_batch" in d:
        r = d.get("ratio_vs_l0")
        p = d.get("peak_bytes")
        sps = d.get("samples_per_second")
        print(f"MAXBATCH {sys.argv[2]:<18} {d['level']:<3} batch {d['max_batch']:>6}"
              f"  vs L0 {('%.2fx' % r) if r else '-':>6}"
              f"  peak {('%.2f GiB' % (p / 2**30)) if p else '-':>10}"
              f"  {('%.1f samples/s' % sps) if sps else ''}")
PYEOF
}
# Uniform bits (no allocator passes per probe) and a coarse grid keep each model within minutes.
if want max-batch; then
  rm -f "$logdir/maxb-rows.txt"
  for m in ${MAXB_MODELS:-resnet50 gpt-small}; do
    case $m in
      resnet50) maxb max-batch-resnet50 resnet50 synthetic:3x224x224:1000:64 \
        --allocator uniform --start 32 --multiple-of 16 ;;
      gpt-small) maxb max-batch-gpt-small models/gpt-small.toml synthetic-text:256:256:64 \
        --seq-len 256 --allocator uniform --start 16 --multiple-of 8 ;;
      *) rows+=("max-batch-$m|SKIP|0|unknown model in MAXB_MODELS") ;;
    esac
  done
  [ -f "$logdir/maxb-rows.txt" ] && while IFS= read -r l; do benches+=("$l"); done <"$logdir/maxb-rows.txt"
fi

# --- 5. profile-memory on the card ----------------------------------------------------------------
if want profile-memory; then
  run_check profile-memory-resnet50 "$bin" profile-memory --device cuda:0 --model resnet50 \
    --data synthetic:3x224x224:1000:64 --batch-size 32 --levels L0,L3
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
