// Embedding lookup: out[t, :] = table[ids[t], :] for an fp32 or bf16 table, fp32 out.
#include "asynctls/kernels/cuda_ops.h"
#include "dense_common.cuh"

namespace asynctls::kernels::cuda {
namespace {

using detail::Vec;

constexpr int kThreads = 128;

// Tier 1: blockIdx.x = token, threads stride over the row in VEC-wide pieces. An id outside
// [0, vocab) yields a NaN row instead of reading out of bounds.
template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads)
    EmbeddingKernel(const T* __restrict__ table, const int32_t* __restrict__ ids,
                    float* __restrict__ out, int dim, int vocab) {
  const int t = blockIdx.x;
  const int32_t id = ids[t];
  const bool valid = id >= 0 && id < vocab;
  const T* src = table + int64_t{valid ? id : 0} * dim;
  float* dst = out + int64_t{t} * dim;
  for (int i = (blockIdx.y * blockDim.x + threadIdx.x) * VEC; i < dim;
       i += gridDim.y * blockDim.x * VEC) {
    Vec<float, VEC> o;
    if (valid) {
      const Vec<T, VEC> in = detail::LoadVec<T, VEC>(src + i);
#pragma unroll
      for (int j = 0; j < VEC; ++j) o.v[j] = detail::ToFloat(in.v[j]);
    } else {
#pragma unroll
      for (int j = 0; j < VEC; ++j) o.v[j] = __int_as_float(0x7fc00000);
    }
    detail::StoreVec<float, VEC>(dst + i, o);
  }
}

// Tier 2: one block row per token; a few column blocks when the row is long.
template <typename T, int VEC>
cudaError_t LaunchEmbedding(const EmbeddingParams& p, cudaStream_t stream) {
  const int col_blocks = static_cast<int>(detail::CeilDiv(p.dim / VEC, kThreads));
  const dim3 grid(p.num_tokens, col_blocks < 1 ? 1 : col_blocks);
  EmbeddingKernel<T, VEC>
      <<<grid, kThreads, 0, stream>>>(static_cast<const T*>(p.table), p.ids, p.out, p.dim, p.vocab);
  return cudaGetLastError();
}

template <typename T>
cudaError_t DispatchVec(const EmbeddingParams& p, cudaStream_t stream) {
  if (p.dim % 4 == 0 && detail::IsVecAligned<T, 4>(p.table) &&
      detail::IsVecAligned<float, 4>(p.out)) {
    return LaunchEmbedding<T, 4>(p, stream);
  }
  return LaunchEmbedding<T, 1>(p, stream);
}

}  // namespace

// Tier 3.
cudaError_t Embedding(const EmbeddingParams& p, cudaStream_t stream) {
  if (p.num_tokens < 0 || p.dim <= 0 || p.vocab <= 0) return cudaErrorInvalidValue;
  if (p.num_tokens == 0) return cudaSuccess;
  switch (p.table_dtype) {
    case DType::kF32:
      return DispatchVec<float>(p, stream);
    case DType::kBF16:
      return DispatchVec<Bf16>(p, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace asynctls::kernels::cuda
