#include "dense_common.cuh"
#include "gemm_epilogue.h"

namespace asynctls::kernels::cuda::detail {
namespace {

constexpr int kThreads = 256;

__global__ void __launch_bounds__(kThreads)
    AddBiasRowsKernel(const float* __restrict__ bias, float* __restrict__ out, int rows, int cols) {
  const int64_t total = int64_t{rows} * cols;
  for (int64_t i = int64_t{blockIdx.x} * blockDim.x + threadIdx.x; i < total;
       i += int64_t{gridDim.x} * blockDim.x) {
    out[i] += bias[i % cols];
  }
}

}  // namespace

cudaError_t AddBiasRows(const float* bias, float* out, int32_t rows, int32_t cols,
                        cudaStream_t stream) {
  if (rows <= 0 || cols <= 0) return cudaSuccess;
  AddBiasRowsKernel<<<GridFor(int64_t{rows} * cols, kThreads), kThreads, 0, stream>>>(bias, out,
                                                                                      rows, cols);
  return cudaGetLastError();
}

}  // namespace asynctls::kernels::cuda::detail
