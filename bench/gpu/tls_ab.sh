#!/usr/bin/env bash
# A/B(/C/D/E) of TLS kernel changes on a GPU machine, one call: two to five source trees built
# side by side (kernels-only config), the TLS GPU tests of every tree but A, then each tls_bench
# selection run on every tree in turn, REPS times, its rows prefixed with the tree's letter.
# Ratios between trees are only meaningful inside one call (clocks and neighbours move).
#
#   bash bench/gpu/ab_trees.sh a=<base-rev> c=<rev>   # on the workstation: git-ignored trees
#                                                     # .ab/a, .ab/c (carry .ab and .deps)
#   A=.ab/a RUNS="mla_h128 --batches 8 --contexts 32768,131072 --k-t 512;gqa_g8 --batches 8" \
#     OUT=$OUT bash bench/gpu/tls_ab.sh
#
# Env: A (tree A, required), B (tree B, default the repository root), C, D, E (optional more
# trees, e.g. to bisect with TESTS=0; one tree may appear under two letters with different
# CMAKE_<letter> options, e.g. A=$PWD B=$PWD CMAKE_B=-DASYNCTLS_LOCAL_TOPK16=ON, since each
# letter builds in its own build-ab-<letter>), RUNS (';'-separated `tls_bench --only` arguments,
# required), REPS (default 2), SAMPLES (default 15), TESTS=0 to skip the GPU tests, TEST_TREES
# (e.g. bd: only those trees' GPU tests), OUT (default ./tls-ab-out). A tree holding bin/tls_bench
# and lib/ (built on the workstation, bundled by ../shared/tools/bundle-libs.sh TREE
# build/bench/tls_bench) is not built here and runs no tests. Writes ab.log (the rows
# as they come, then their means per tree and row) and the full tls_bench output per tree; build
# logs stay in /tmp (the device returns few files).
set -uo pipefail
export PATH=/usr/local/cuda/bin:$PATH
cd "$(dirname "$0")/../.." || exit 1
: "${A:?tree A: a directory with kernels/, bench/, tests/, cmake/, CMakeLists.txt}"
: "${RUNS:?tls_bench selections, e.g. RUNS=\"mla_h128 --batches 8 --k-t 512\"}"
B=${B:-$PWD}
OUT=${OUT:-$PWD/tls-ab-out}
REPS=${REPS:-2}
SAMPLES=${SAMPLES:-15}
mkdir -p "$OUT"
t0=$(date +%s)
log() { echo "== $*" | tee -a "$OUT/ab.log"; }

build() {  # tree letter targets...
  local tree=$1 letter=$2
  shift 2
  local options_var="CMAKE_${letter^^}"
  # shellcheck disable=SC2086  # CMAKE_<letter>: a list of options
  (cd "$tree" && cmake -S . -B "build-ab-$letter" -G Ninja -DASYNCTLS_KERNELS_ONLY=ON \
    ${!options_var:-} > "/tmp/ab-cmake-$letter.log" 2>&1 && ninja -C "build-ab-$letter" "$@" \
    > "/tmp/ab-build-$letter.log" 2>&1)
}
tests=""
[[ "${TESTS:-1}" == 1 ]] && tests="tls_index_gpu_test tls_select_gpu_test tls_attention_gpu_test tls_math_gpu_test"
declare -A trees=([a]=$A [b]=$B)
[[ -n "${C:-}" ]] && trees[c]=$C
[[ -n "${D:-}" ]] && trees[d]=$D
[[ -n "${E:-}" ]] && trees[e]=$E
letters=$(printf '%s\n' "${!trees[@]}" | sort | tr '\n' ' ')
declare -A pids
prebuilt() { [[ -x "${trees[$1]}/bin/tls_bench" ]]; }
bench_of() {
  if prebuilt "$1"; then echo "${trees[$1]}/bin/tls_bench"; else
    echo "${trees[$1]}/build-ab-$1/bench/tls_bench"; fi
}
for letter in $letters; do
  prebuilt "$letter" && continue
  targets="tls_bench"
  [[ $letter != a ]] && targets="$targets $tests"
  # shellcheck disable=SC2086  # $targets: a list of targets
  build "${trees[$letter]}" "$letter" $targets & pids[$letter]=$!
done
status=0
for letter in $letters; do
  prebuilt "$letter" && continue
  wait "${pids[$letter]}" || {
    log "tree ${letter^^} build failed"
    grep -h -A8 error /tmp/ab-*-"$letter".log | head -30
    status=1
  }
done
[[ $status == 0 ]] || exit 1
log "built in $(( $(date +%s) - t0 )) s"

if [[ -n "$tests" ]]; then
  for letter in $letters; do
    [[ $letter == a || ( -n "${TEST_TREES:-}" && $TEST_TREES != *$letter* ) ]] && continue
    prebuilt "$letter" && continue
    # A kernel that hangs fails its test after 120 s instead of taking the device call's time.
    ctest --test-dir "${trees[$letter]}/build-ab-$letter" -L gpu -R tls --output-on-failure -j 3 \
      --timeout 120 \
      > "$OUT/ctest_$letter.log" 2>&1 || status=1
    grep -E "tests passed|Failed|\*\*\*" "$OUT/ctest_$letter.log" | sed "s/^/${letter^^} /" |
      tee -a "$OUT/ab.log"
  done
fi

IFS=';' read -ra runs <<< "$RUNS"
for ((r = 1; r <= REPS; ++r)); do
  for run in "${runs[@]}"; do
    for letter in $letters; do
      # shellcheck disable=SC2086  # the selection is a list of arguments
      LD_LIBRARY_PATH="${trees[$letter]}/lib:${LD_LIBRARY_PATH:-}" timeout 300 \
        "$(bench_of "$letter")" --samples "$SAMPLES" --only $run > /tmp/ab-run.log 2>&1 || status=1
      cat /tmp/ab-run.log >> "$OUT/tls_bench_$letter.log"
      grep -E "^(gqa|mla)" /tmp/ab-run.log | sed "s/^/${letter^^} /" | tee -a "$OUT/ab.log"
    done
  done
done
log "per tree and row, us, means over the reps: TLS, Quest-style | x dense, TLS / Quest-style |" \
  "block score, token branch, attention graphed alone (TLS's positions, Quest-style's)"
grep -E "^[A-E] (gqa|mla)" "$OUT/ab.log" | awk '{
    k = $1 " " $2 " " $3 " " $4 " " $5; n[k]++
    t[k] += $7; q[k] += $10; x[k] += $13; r[k] += $14; b[k] += $20; tb[k] += $24; a[k] += $25; qa[k] += $26
  } END {
    for (k in n) printf "%s | %6.1f %6.1f | %6.2f %5.2f | %5.1f %5.1f %5.1f %5.1f\n", k,
      1000 * t[k] / n[k], 1000 * q[k] / n[k], x[k] / n[k], r[k] / n[k], 1000 * b[k] / n[k],
      1000 * tb[k] / n[k], 1000 * a[k] / n[k], 1000 * qa[k] / n[k]
  }' | sort -k2,2 -k3,3n -k4,4n -k5,5n -k1,1 | tee -a "$OUT/ab.log"
log "done in $(( $(date +%s) - t0 )) s, status $status"
exit $status
