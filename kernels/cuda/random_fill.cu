// Seeded weights generated on the GPU (performance runs at real sizes without a checkpoint).
#include <algorithm>

#include "asynctls/kernels/cuda_ops.h"
#include "dense_common.cuh"

namespace asynctls::kernels::cuda {
namespace {

constexpr int kThreads = 256;

// Tier 1: grid-stride, one element per step (runs once at load; simplicity over speed).
template <typename T>
__global__ void __launch_bounds__(kThreads) RandomFillKernel(RandomFillParams p) {
  T* dst = static_cast<T*>(p.dst);
  for (int64_t i = int64_t{blockIdx.x} * blockDim.x + threadIdx.x; i < p.count;
       i += int64_t{gridDim.x} * blockDim.x) {
    const float v = p.offset + p.scale * (2.f * CounterUniform(p.seed, i) - 1.f);
    if constexpr (sizeof(T) == 2) {
      dst[i] = FloatToBf16(v);
    } else {
      dst[i] = v;
    }
  }
}

}  // namespace

// Tier 3.
cudaError_t RandomFill(const RandomFillParams& p, cudaStream_t stream) {
  if (p.count <= 0) return cudaSuccess;
  const unsigned grid = static_cast<unsigned>(std::min<int64_t>((p.count + kThreads - 1) / kThreads, 65535));
  if (p.dtype == DType::kBF16) {
    RandomFillKernel<Bf16><<<grid, kThreads, 0, stream>>>(p);
  } else if (p.dtype == DType::kF32) {
    RandomFillKernel<float><<<grid, kThreads, 0, stream>>>(p);
  } else {
    return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

}  // namespace asynctls::kernels::cuda
