// Private to gemm.cc: the bias add used when cuBLASLt offers no BIAS epilogue for a shape.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace asynctls::kernels::cuda::detail {

// out[r, c] += bias[c] for out [rows, cols] row-major.
cudaError_t AddBiasRows(const float* bias, float* out, int32_t rows, int32_t cols,
                        cudaStream_t stream);

}  // namespace asynctls::kernels::cuda::detail
