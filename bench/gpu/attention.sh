#!/usr/bin/env bash
# Paged attention on a GPU machine, one call: build (kernels-only), GPU tests, our benchmark,
# the PyTorch SDPA baseline on the same shapes, and a combined table with ratios.
#
#   bash bench/gpu/attention.sh            # from the repository root; logs and JSON to $OUT
#
# Env: OUT (default ./attention-out), BUILD_DIR (default build), TEST_REGEX (ctest -R filter on
# gtest Suite.Test names, default PagedAttentionGpu; '.' runs every gpu-labelled test that was
# built), QUICK=1 (fewer shapes), SKIP_TESTS=1, SKIP_SDPA=1. Needs cmake, ninja, nvcc (CUDA 13), python3 with torch for the
# baseline, and GoogleTest sources in .deps/googletest when libgtest-dev is absent.
set -uo pipefail
export PATH=/usr/local/cuda/bin:$PATH
cd "$(dirname "$0")/../.."
OUT=${OUT:-$PWD/attention-out}
BUILD_DIR=${BUILD_DIR:-build}
TEST_REGEX=${TEST_REGEX:-PagedAttentionGpu}
mkdir -p "$OUT"
QUICK_FLAG=""
[[ "${QUICK:-0}" == 1 ]] && QUICK_FLAG="--quick"
status=0
log() { echo "== $*" | tee -a "$OUT/attention.log"; }

log "$(date -u +%FT%TZ) commit ${COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv 2>&1 | tee -a "$OUT/attention.log"

# Register / spill report of the attention kernels, in the background while the build runs.
( for f in kernels/cuda/paged_attention_*.cu; do
    obj="$OUT/$(basename "$f" .cu).o"
    nvcc -std=c++20 -O3 -gencode=arch=compute_90a,code=sm_90a --expt-relaxed-constexpr \
      -Xptxas -v -Ikernels/include -DASYNCTLS_HAVE_CUDA=1 -c "$f" -o "$obj" 2>&1 |
      grep -E "Compiling entry|registers|spill"
    if command -v cuobjdump > /dev/null; then  # tensor-core path present, no local memory
      echo "SASS $(basename "$f"): $(cuobjdump --dump-sass "$obj" |
        grep -oE '\b(HMMA|LDSM|LDGSTS|LDL|STL)\b' | sort | uniq -c | tr -s ' \n' ' ')"
    fi
    rm -f "$obj"
  done > "$OUT/ptxas.txt" 2>&1 ) &
ptxas_pid=$!

log "configure + build ($BUILD_DIR)"
if ! cmake -S . -B "$BUILD_DIR" -G Ninja -DASYNCTLS_KERNELS_ONLY=ON > "$OUT/cmake.log" 2>&1; then
  tail -30 "$OUT/cmake.log"; echo "configure failed"; exit 1
fi
targets="attention_bench"
[[ "${SKIP_TESTS:-0}" == 1 ]] || targets="$targets paged_attention_gpu_test paged_attention_ref_test"
if ! ninja -C "$BUILD_DIR" $targets > "$OUT/build.log" 2>&1; then
  grep -E "error|Error" "$OUT/build.log" | head -40; echo "build failed"; exit 1
fi
wait $ptxas_pid
log "ptxas (registers / spills)"; cat "$OUT/ptxas.txt" | tee -a "$OUT/attention.log"

if [[ "${SKIP_TESTS:-0}" != 1 ]]; then
  log "ctest -L gpu -R $TEST_REGEX (and the CPU oracle test)"
  ctest --test-dir "$BUILD_DIR" -L gpu -R "$TEST_REGEX" --output-on-failure -j 4 \
    > "$OUT/ctest_gpu.log" 2>&1 || status=1
  ctest --test-dir "$BUILD_DIR" -R PagedAttentionRef --output-on-failure \
    >> "$OUT/ctest_gpu.log" 2>&1 || status=1
  tail -15 "$OUT/ctest_gpu.log" | tee -a "$OUT/attention.log"
  grep -E "Failure|Expected|Which is|error|trace" "$OUT/ctest_gpu.log" | head -60 | tee -a "$OUT/attention.log"
fi

log "attention_bench"
"$BUILD_DIR/bench/attention_bench" --json "$OUT/attention_ours.json" $QUICK_FLAG 2>&1 |
  tee "$OUT/attention_bench.log" || status=1

if [[ "${SKIP_SDPA:-0}" != 1 ]]; then
  log "PyTorch SDPA baseline"
  python3 bench/attention_sdpa.py --json "$OUT/attention_sdpa.json" $QUICK_FLAG 2>&1 |
    tee "$OUT/attention_sdpa.log" || status=1
fi

log "combined (ratio = baseline ms / our ms: >1 means we are faster)"
python3 - "$OUT/attention_ours.json" "$OUT/attention_sdpa.json" <<'PY' 2>&1 | tee "$OUT/attention_summary.txt"
import json, os, sys
ours = json.load(open(sys.argv[1]))["results"]
base = json.load(open(sys.argv[2]))["results"] if os.path.exists(sys.argv[2]) else []
idx = {(r["impl"], r["kind"], r["batch"], r["context"]): r for r in base}
def ms(impl, r):
    b = idx.get((impl, r["kind"], r["batch"], r["context"]))
    return b["ms"] if b and b.get("ms") else None
def fmt(x, f="%8.4f"): return f % x if x else "%8s" % "n/a"
print("%-8s %5s %7s | %8s %9s | %8s %8s | %7s %7s | %s" % (
    "kind", "batch", "context", "ours ms", "GB/s|TF/s", "cudnn ms", "flash ms",
    "x cudnn", "x flash", "target"))
for r in ours:
    c, f = ms("sdpa_cudnn", r), ms("sdpa_flash", r)
    rate = r["gbps"] if r["kind"] == "decode" else r["tflops"]
    rc = c / r["ms"] if c else None
    rf = f / r["ms"] if f else None
    if r["kind"] == "decode":
        target = ">=0.9x cudnn: " + ("ok" if rc and rc >= 0.9 else "MISS" if rc else "n/a")
    else:
        target = ">=0.5x flash: " + ("ok" if rf and rf >= 0.5 else "MISS" if rf else "n/a")
    print("%-8s %5d %7d | %8.4f %9.1f | %s %s | %s %s | %s" % (
        r["kind"], r["batch"], r["context"], r["ms"], rate, fmt(c), fmt(f),
        fmt(rc, "%7.2f"), fmt(rf, "%7.2f"), target))
PY
log "done, status $status; files in $OUT"
exit $status
