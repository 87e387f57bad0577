// Row copies by index lists (CopyRowsParams): one block per row, 16-byte words where the rows
// allow them.
#include "asynctls/kernels/cuda_ops.h"
#include "dense_common.cuh"

namespace asynctls::kernels::cuda {
namespace {

constexpr int kThreads = 128;

// Rows of `row_words` elements of T (int32_t, or int4 when rows are whole 16-byte words).
template <typename T>
__global__ void __launch_bounds__(kThreads)
    CopyRowsKernel(const T* __restrict__ src, T* __restrict__ dst,
                   const int32_t* __restrict__ src_rows, const int32_t* __restrict__ dst_rows,
                   int row_words) {
  const T* from = src + int64_t{src_rows[blockIdx.x]} * row_words;
  T* to = dst + int64_t{dst_rows[blockIdx.x]} * row_words;
  for (int i = threadIdx.x; i < row_words; i += kThreads) to[i] = from[i];
}

}  // namespace

cudaError_t CopyRows(const CopyRowsParams& p, cudaStream_t stream) {
  if (p.num_rows < 0 || p.row_words <= 0) return cudaErrorInvalidValue;
  if (p.num_rows == 0) return cudaSuccess;
  if (p.row_words % 4 == 0 && detail::IsVecAligned<int32_t, 4>(p.src) &&
      detail::IsVecAligned<int32_t, 4>(p.dst)) {
    CopyRowsKernel<int4><<<p.num_rows, kThreads, 0, stream>>>(
        reinterpret_cast<const int4*>(p.src), reinterpret_cast<int4*>(p.dst), p.src_rows,
        p.dst_rows, p.row_words / 4);
  } else {
    CopyRowsKernel<int32_t>
        <<<p.num_rows, kThreads, 0, stream>>>(p.src, p.dst, p.src_rows, p.dst_rows, p.row_words);
  }
  return cudaGetLastError();
}

}  // namespace asynctls::kernels::cuda
