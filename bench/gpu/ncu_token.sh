#!/usr/bin/env bash
# Where a TLS kernel's time goes, per tls_bench selection, on a GPU machine in one call: a
# kernels-only build, then for each selection Nsight Compute's full set over one eager step's
# launch of KERNEL, its source page through ncu_segments.py (phases between barriers, stall
# reasons), and every kernel's duration in that step.
#
#   KERNEL=MlaScoreSelectKernel RUNS="mla_h128 --batches 2 --contexts 32768 --k-t 512" \
#     OUT=$OUT bash bench/gpu/ncu_token.sh
#
# Env: KERNEL (a regex of kernel names, default MlaScoreSelectKernel), RUNS (';'-separated
# `tls_bench --only` arguments, required), OUT (default ./ncu-out), BUILD_DIR (default build-k),
# CACHE (ncu --cache-control: all flushes the caches before the kernel, the default; none keeps
# them warm, as in a decode step), BENCH (a tls_bench built elsewhere, e.g. carried with its
# libraries: skips the build).
# Writes one segments-N.txt per selection (phases, stalls, pipe utilization), its source page
# (source-N.csv.gz, per SASS instruction) and durations.txt.
set -uo pipefail
export PATH=/usr/local/cuda/bin:$PATH
cd "$(dirname "$0")/../.." || exit 1
: "${RUNS:?tls_bench selections, e.g. RUNS=\"mla_h128 --batches 2 --contexts 32768 --k-t 512\"}"
KERNEL=${KERNEL:-MlaScoreSelectKernel}
OUT=${OUT:-$PWD/ncu-out}
BUILD_DIR=${BUILD_DIR:-build-k}
CACHE=${CACHE:-all}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
bench=${BENCH:-$BUILD_DIR/bench/tls_bench}
if [ -z "${BENCH:-}" ]; then
  cmake -S . -B "$BUILD_DIR" -G Ninja -DASYNCTLS_KERNELS_ONLY=ON > /tmp/ncu-cmake.log 2>&1 &&
    ninja -C "$BUILD_DIR" tls_bench > /tmp/ncu-build.log 2>&1 ||
    { grep -h -A8 error /tmp/ncu-*.log | head -30; exit 1; }
fi
i=0
IFS=';' read -ra runs <<< "$RUNS"
for run in "${runs[@]}"; do
  i=$((i + 1))
  # shellcheck disable=SC2086  # $run: tls_bench arguments
  ncu --clock-control none --cache-control "$CACHE" --profile-from-start off \
    --kernel-name "regex:$KERNEL" \
    --launch-count 1 --set full --import-source yes -f -o "/tmp/ncu-$i" \
    "$bench" --profile-steps 1 --only $run > "/tmp/ncu-$i.log" 2>&1 ||
    { tail -5 "/tmp/ncu-$i.log"; continue; }
  ncu -i "/tmp/ncu-$i.ncu-rep" --page source --csv --print-source sass > "/tmp/ncu-$i.csv"
  {
    echo "== $run"
    ncu -i "/tmp/ncu-$i.ncu-rep" --page details --csv 2>/dev/null |
      grep -E '"(Duration|Grid Size|Block Size|Registers Per Thread|Cluster Size)"' |
      awk -F'","' '{print $(NF-2) " " $(NF-1) " " $NF}' | head -6
    python3 bench/gpu/ncu_segments.py "/tmp/ncu-$i.csv"
    echo "-- issue and pipes (% of peak while active)"
    ncu -i "/tmp/ncu-$i.ncu-rep" --page raw --csv > "/tmp/ncu-$i-raw.csv" 2>/dev/null &&
      python3 bench/gpu/ncu_pipes.py "/tmp/ncu-$i-raw.csv"
  } > "$OUT/segments-$i.txt" 2>&1
  gzip -c "/tmp/ncu-$i.csv" > "$OUT/source-$i.csv.gz"
  # shellcheck disable=SC2086
  ncu --clock-control none --profile-from-start off --metrics gpu__time_duration.sum --csv \
    "$bench" --profile-steps 1 --only $run 2>/dev/null |
    awk -F'","' -v run="$run" 'NR == 1 {print "== " run} /gpu__time_duration/ {
      split($5, k, "("); print $NF " " k[1]}' >> "$OUT/durations.txt"
  head -30 "$OUT/segments-$i.txt"; tail -25 "$OUT/segments-$i.txt"
done
