#!/usr/bin/env bash
# Source trees for bench/gpu/tls_ab.sh, made on the workstation from git revisions: each
# LETTER=REV becomes .ab/LETTER (kernels, bench, tests, cmake, CMakeLists.txt of REV, without
# bench/results and with .deps linked). .ab/ is git-ignored: the device gets it by carrying it
# (carry [".ab", ".deps"]), and a call that carries it again replaces it whole, build folders
# included. tests/data is kept for the trees whose GPU tests run (all but A); A drops it.
#
#   bash bench/gpu/ab_trees.sh a=main b=block-branch c=early-copies
#   # then, on the device: A=.ab/a B=.ab/b C=.ab/c RUNS=... bash bench/gpu/tls_ab.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
[[ $# -gt 0 ]] || { echo "usage: $0 LETTER=REV ..." >&2; exit 2; }
for spec in "$@"; do
  letter=${spec%%=*} rev=${spec#*=}
  [[ $letter =~ ^[a-e]$ && -n $rev && $rev != "$spec" ]] || {
    echo "bad tree '$spec' (want a..e=REV)" >&2
    exit 2
  }
  git rev-parse --verify -q "$rev^{commit}" > /dev/null || { echo "unknown revision $rev" >&2; exit 2; }
  dir=.ab/$letter
  rm -rf "$dir"
  mkdir -p "$dir"
  git archive "$rev" kernels bench tests CMakeLists.txt cmake | tar x -C "$dir"
  rm -rf "$dir/bench/results"
  [[ $letter == a ]] && rm -rf "$dir/tests/data"
  ln -s ../../.deps "$dir/.deps"
  echo ".ab/$letter = $(git rev-parse --short "$rev") ($rev)"
done
du -sh .ab
