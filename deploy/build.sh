#!/usr/bin/env bash
# Configures and builds asynctls into ${BUILD_DIR:-build}. The CUDA kernels are compiled
# (sm_90a) whenever the CUDA toolkit is present, GPU or not. Extra args go to cmake.
set -euo pipefail
cd "$(dirname "$0")/.."
build_dir=${BUILD_DIR:-build}
if ! command -v nvcc >/dev/null && [ -x /usr/local/cuda/bin/nvcc ]; then
  export CUDACXX=/usr/local/cuda/bin/nvcc
fi
cmake -S . -B "$build_dir" -G Ninja -DCMAKE_BUILD_TYPE=Release "$@" >"$build_dir.configure.log" 2>&1 ||
  { cat "$build_dir.configure.log"; exit 1; }
ninja -C "$build_dir" -j"$(nproc)"
