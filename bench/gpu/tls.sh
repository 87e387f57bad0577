#!/usr/bin/env bash
# Two-level sparse attention (TLS) ops on a GPU machine, one call: build (kernels-only config),
# register/spill report of the TLS kernels, the TLS GPU compare tests (CUDA vs the CPU reference:
# bit-identical selection scores, exact selected sets, attention within the bf16 tolerances),
# the TLS CPU tests, and optionally compute-sanitizer memcheck over the GPU tests.
#
#   bash bench/gpu/tls.sh            # from the repository root; logs to $OUT
#
# Env: OUT (default ./tls-out), BUILD_DIR (default build), SANITIZE=1 (also run the GPU tests
# under compute-sanitizer memcheck; slow). Needs cmake, ninja, nvcc (CUDA 13) and GoogleTest
# sources in .deps/googletest when libgtest-dev is absent.
set -uo pipefail
export PATH=/usr/local/cuda/bin:$PATH
cd "$(dirname "$0")/../.."
OUT=${OUT:-$PWD/tls-out}
BUILD_DIR=${BUILD_DIR:-build}
mkdir -p "$OUT"
status=0
log() { echo "== $*" | tee -a "$OUT/tls.log"; }

log "$(date -u +%FT%TZ) commit ${COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}"
nvidia-smi --query-gpu=name,driver_version --format=csv 2>&1 | tee -a "$OUT/tls.log"

( for f in kernels/cuda/tls_*.cu; do
    nvcc -std=c++17 -O3 -gencode=arch=compute_90a,code=sm_90a --expt-relaxed-constexpr \
      -Xptxas -v -Ikernels/include -DASYNCTLS_HAVE_CUDA=1 -c "$f" -o /dev/null 2>&1 |
      grep -E "Compiling entry|registers|spill"
  done > "$OUT/ptxas.txt" 2>&1 ) &
ptxas_pid=$!

log "configure + build ($BUILD_DIR)"
if ! cmake -S . -B "$BUILD_DIR" -G Ninja -DASYNCTLS_KERNELS_ONLY=ON > "$OUT/cmake.log" 2>&1; then
  tail -30 "$OUT/cmake.log"; echo "configure failed"; exit 1
fi
gpu_tests="tls_index_gpu_test tls_select_gpu_test tls_attention_gpu_test"
cpu_tests="tls_index_test tls_select_test tls_attention_test"
if ! ninja -C "$BUILD_DIR" $gpu_tests $cpu_tests > "$OUT/build.log" 2>&1; then
  grep -E "error|Error" "$OUT/build.log" | head -40; echo "build failed"; exit 1
fi
wait $ptxas_pid
log "ptxas (registers / spills)"; cat "$OUT/ptxas.txt" >> "$OUT/tls.log"
grep -B1 -E "[1-9][0-9]* bytes spill" "$OUT/ptxas.txt" | head -20

log "ctest -L gpu -R tls"
ctest --test-dir "$BUILD_DIR" -L gpu -R tls --output-on-failure > "$OUT/ctest_gpu.log" 2>&1 ||
  status=1
tail -12 "$OUT/ctest_gpu.log" | tee -a "$OUT/tls.log"
grep -E "Failure|Expected|Which is|differs|error|trace|Skipped" "$OUT/ctest_gpu.log" | head -60 |
  tee -a "$OUT/tls.log"

log "ctest -L cpu -R tls"
ctest --test-dir "$BUILD_DIR" -L cpu -R tls --output-on-failure > "$OUT/ctest_cpu.log" 2>&1 ||
  status=1
tail -4 "$OUT/ctest_cpu.log" | tee -a "$OUT/tls.log"

if [[ "${SANITIZE:-0}" == 1 ]] && command -v compute-sanitizer > /dev/null; then
  for t in $gpu_tests; do
    log "compute-sanitizer memcheck $t"
    compute-sanitizer --tool memcheck --error-exitcode 9 "$BUILD_DIR/tests/$t" \
      > "$OUT/memcheck_$t.log" 2>&1 || status=1
    tail -3 "$OUT/memcheck_$t.log" | tee -a "$OUT/tls.log"
  done
fi

log "done, status $status; files in $OUT"
exit $status
