#!/usr/bin/env bash
# Speed of the two-level sparse attention (TLS) decode step on a GPU machine, one call (issue 4,
# item 6): build (kernels-only config), the TLS GPU compare tests first, bench/kernels/tls_bench
# (TLS in one CUDA graph + per-stage breakdown, our dense paged decode, Quest-style, token-only,
# bytes moved and the HBM floor), the PyTorch SDPA decode baseline (cuDNN and flash) at the
# same GQA shapes, and one combined table. MLA has no SDPA baseline (SDPA's flash and cuDNN
# backends take no 576-dim head); its dense row is our sparse kernel over every position, and
# its PyTorch baseline is matmul + softmax + matmul over a contiguous latent cache
# (attention_sdpa.py --mode mla).
#
#   OUT=$OUT bash bench/gpu/tls_bench.sh      # from the repository root; logs + JSON in $OUT
#
# $OUT gets at most eight files (what the device returns): tls_bench.log (progress, test
# summary, SDPA output), ctest_gpu.log, tls_bench_raw.log, tls_bench.json, sdpa_kv8.json,
# sdpa_kv4.json, sdpa_mla.json, tls_summary.txt; the configure and build logs stay in /tmp.
#
# Env: OUT (default ./tls-bench-out), BUILD_DIR (default build), QUICK=1 (batch 1/8, 32K/128K,
# k_t 1024 only), ONLY=gqa|mla (one layout and its PyTorch baselines), SKIP_TESTS=1, SKIP_SDPA=1
# (no PyTorch baselines), SAMPLES
# (default 15), COMMIT (the commit the header names; a copied tree's git metadata may be stale,
# so pass COMMIT=<hash> from the caller), BENCH (a tls_bench built elsewhere, e.g. carried with
# its libraries by ../shared/tools/bundle-libs.sh: no build, no tests). Needs cmake, ninja, nvcc
# (CUDA 13), python3 with torch for the SDPA baseline, GoogleTest sources in .deps/googletest.
set -uo pipefail
export PATH=/usr/local/cuda/bin:$PATH
cd "$(dirname "$0")/../.."
OUT=${OUT:-$PWD/tls-bench-out}
BUILD_DIR=${BUILD_DIR:-build}
SAMPLES=${SAMPLES:-15}
mkdir -p "$OUT"
QUICK_FLAG=""
[[ "${QUICK:-0}" == 1 ]] && QUICK_FLAG="--quick"
[[ -n "${ONLY:-}" ]] && QUICK_FLAG="$QUICK_FLAG --only $ONLY"
status=0
log() { echo "== $*" | tee -a "$OUT/tls_bench.log"; }
t0=$(date +%s)

log "$(date -u +%FT%TZ) commit ${COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}" \
  "$(git status --porcelain 2>/dev/null | grep -q . && echo '(dirty tree)')"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv 2>&1 |
  tee -a "$OUT/tls_bench.log"

bench=${BENCH:-$BUILD_DIR/bench/tls_bench}
if [[ -n "${BENCH:-}" ]]; then
  SKIP_TESTS=1
  log "prebuilt $BENCH"
else
  log "configure + build ($BUILD_DIR)"
  if ! cmake -S . -B "$BUILD_DIR" -G Ninja -DASYNCTLS_KERNELS_ONLY=ON > /tmp/tls-bench-cmake.log 2>&1; then
    tail -30 /tmp/tls-bench-cmake.log; echo "configure failed"; exit 1
  fi
  targets="tls_bench"
  [[ "${SKIP_TESTS:-0}" == 1 ]] ||
    targets="$targets tls_index_gpu_test tls_select_gpu_test tls_attention_gpu_test"
  if ! ninja -C "$BUILD_DIR" $targets > /tmp/tls-bench-build.log 2>&1; then
    grep -E "error|Error" /tmp/tls-bench-build.log | head -40; echo "build failed"; exit 1
  fi
  log "built in $(( $(date +%s) - t0 )) s"
fi

if [[ "${SKIP_TESTS:-0}" != 1 ]]; then
  log "ctest -L gpu -R tls"
  ctest --test-dir "$BUILD_DIR" -L gpu -R tls --output-on-failure -j 3 \
    > "$OUT/ctest_gpu.log" 2>&1 || status=1
  tail -8 "$OUT/ctest_gpu.log" | tee -a "$OUT/tls_bench.log"
  grep -E "Failure|Expected|Which is|differs|error|Skipped" "$OUT/ctest_gpu.log" | head -40 |
    tee -a "$OUT/tls_bench.log"
fi

log "tls_bench ($(( $(date +%s) - t0 )) s in)"
"$bench" --json "$OUT/tls_bench.json" --samples "$SAMPLES" $QUICK_FLAG 2>&1 |
  tee "$OUT/tls_bench_raw.log" || status=1

batches=1,2,4,8; contexts=32768,65536,131072
[[ "${QUICK:-0}" == 1 ]] && { batches=1,8; contexts=32768,131072; }
if [[ "${SKIP_SDPA:-0}" != 1 && "${ONLY:-}" != mla ]]; then
  for kv in 8 4; do
    log "PyTorch SDPA decode baseline, 32 q / $kv kv heads ($(( $(date +%s) - t0 )) s in)"
    python3 bench/attention_sdpa.py --mode decode --q-heads 32 --kv-heads "$kv" \
      --batches "$batches" --contexts "$contexts" --samples "$SAMPLES" \
      --json "$OUT/sdpa_kv$kv.json" 2>&1 | tee -a "$OUT/tls_bench.log" || status=1
  done
fi
if [[ "${SKIP_SDPA:-0}" != 1 && "${ONLY:-}" != gqa ]]; then
  log "PyTorch MLA decode baseline (matmul + softmax + matmul) ($(( $(date +%s) - t0 )) s in)"
  python3 bench/attention_sdpa.py --mode mla --batches "$batches" --contexts 32768,131072 \
    --samples "$SAMPLES" --json "$OUT/sdpa_mla.json" 2>&1 | tee -a "$OUT/tls_bench.log" ||
    status=1
fi

log "combined ($(( $(date +%s) - t0 )) s in)"
python3 bench/gpu/tls_summary.py "$OUT" 2>&1 | tee "$OUT/tls_summary.txt"
log "done in $(( $(date +%s) - t0 )) s, status $status; files in $OUT"
exit $status
