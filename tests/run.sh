#!/usr/bin/env bash
# The tests: install what is missing, build, fetch the test model once, run every test
# (GPU tests skip without a GPU), then prove the CPU-only configuration builds and passes.
set -euo pipefail
cd "$(dirname "$0")/.."
bash deploy/install-deps.sh
bash deploy/build.sh
model=$(./build/cli/asynctls fetch-model)
export ASYNCTLS_MODEL_PATH="$model"
jobs=$(nproc)
(cd build && ctest --output-on-failure -j"$jobs" --timeout 900)
if [ -d build/kernels ] && grep -q "ASYNCTLS_CUDA:BOOL=ON" build/CMakeCache.txt; then
  echo "--- CPU-only configuration (-DASYNCTLS_CUDA=OFF) ---"
  BUILD_DIR=build-cpu bash deploy/build.sh -DASYNCTLS_CUDA=OFF
  (cd build-cpu && ctest --output-on-failure -j"$jobs" --timeout 900)
fi
