#!/usr/bin/env bash
# Every kernel GPU test on a GPU machine, one call: kernels-only build, then the gpu-labelled
# tests LOOPS times in parallel (-j 6, several processes sharing the GPU, which is what shook
# out a stream-ordering race once), then the cpu-labelled kernel tests. Logs under $OUT.
#   bash bench/gpu/kernels.sh        # env: OUT, BUILD_DIR (build), LOOPS (3)
set -uo pipefail
export PATH=/usr/local/cuda/bin:$PATH
cd "$(dirname "$0")/../.."
OUT=${OUT:-$PWD/kernels-out}
BUILD_DIR=${BUILD_DIR:-build}
LOOPS=${LOOPS:-3}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
cmake -S . -B "$BUILD_DIR" -G Ninja -DASYNCTLS_KERNELS_ONLY=ON > "$OUT/cmake.log" 2>&1 || { tail -30 "$OUT/cmake.log"; exit 1; }
ninja -C "$BUILD_DIR" > "$OUT/build.log" 2>&1 || { grep -E "error" "$OUT/build.log" | head -30; exit 1; }
status=0
for i in $(seq "$LOOPS"); do
  ctest --test-dir "$BUILD_DIR" -L gpu -j 6 --timeout 600 --output-on-failure > "$OUT/ctest_gpu_$i.log" 2>&1 || status=1
  echo "gpu loop $i: $(grep -E 'tests passed' "$OUT/ctest_gpu_$i.log")"
  grep -E "\*\*\*Failed|Exception|Timeout" "$OUT/ctest_gpu_$i.log" | head -10
done
ctest --test-dir "$BUILD_DIR" -L cpu -j 8 --timeout 600 > "$OUT/ctest_cpu.log" 2>&1 || status=1
echo "cpu kernel tests: $(grep -E 'tests passed' "$OUT/ctest_cpu.log")"
grep -E "\*\*\*Failed" "$OUT/ctest_cpu.log" | head -10
exit $status
