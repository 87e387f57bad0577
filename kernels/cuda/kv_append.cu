// Appends each token's K and V rows (fp32, rounded to bf16) to its slot of the paged cache.
// A negative slot means "no slot" (a padding token) and writes nothing.
#include "asynctls/kernels/cuda_ops.h"
#include "dense_common.cuh"

namespace asynctls::kernels::cuda {
namespace {

using detail::Vec;

constexpr int kThreads = 256;

// Tier 1: grid-stride over (token, kv head, VEC-wide piece of head_dim); each piece writes both
// K and V.
template <int VEC>
__global__ void __launch_bounds__(kThreads)
    KvAppendKernel(const float* __restrict__ k, const float* __restrict__ v,
                   const int32_t* __restrict__ slots, Bf16* __restrict__ k_cache,
                   Bf16* __restrict__ v_cache, int num_tokens, int num_kv_heads, int head_dim,
                   int k_stride, int v_stride) {
  const int pieces_per_head = head_dim / VEC;
  const int64_t total = int64_t{num_tokens} * num_kv_heads * pieces_per_head;
  for (int64_t idx = int64_t{blockIdx.x} * blockDim.x + threadIdx.x; idx < total;
       idx += int64_t{gridDim.x} * blockDim.x) {
    const int d = static_cast<int>(idx % pieces_per_head) * VEC;
    const int h = static_cast<int>((idx / pieces_per_head) % num_kv_heads);
    const int64_t t = idx / (int64_t{pieces_per_head} * num_kv_heads);
    const int64_t slot = slots[t];
    if (slot < 0) continue;
    const int64_t block = slot / kKvBlockSize, in_block = slot % kKvBlockSize;
    const int64_t dst = ((block * num_kv_heads + h) * kKvBlockSize + in_block) * head_dim + d;
    const Vec<float, VEC> kv = detail::LoadVec<float, VEC>(k + t * k_stride + h * head_dim + d);
    const Vec<float, VEC> vv = detail::LoadVec<float, VEC>(v + t * v_stride + h * head_dim + d);
    Vec<Bf16, VEC> ko, vo;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      ko.v[j] = FloatToBf16(kv.v[j]);
      vo.v[j] = FloatToBf16(vv.v[j]);
    }
    detail::StoreVec<Bf16, VEC>(k_cache + dst, ko);
    detail::StoreVec<Bf16, VEC>(v_cache + dst, vo);
  }
}

// Tier 2.
template <int VEC>
cudaError_t LaunchKvAppend(const KvAppendParams& p, cudaStream_t stream) {
  const int64_t work = int64_t{p.num_tokens} * p.num_kv_heads * (p.head_dim / VEC);
  KvAppendKernel<VEC><<<detail::GridFor(work, kThreads), kThreads, 0, stream>>>(
      p.k, p.v, p.slots, static_cast<Bf16*>(p.k_cache), static_cast<Bf16*>(p.v_cache), p.num_tokens,
      p.num_kv_heads, p.head_dim, p.k_stride, p.v_stride);
  return cudaGetLastError();
}

}  // namespace

// Tier 3.
cudaError_t KvAppend(const KvAppendParams& p, cudaStream_t stream) {
  if (p.num_tokens < 0 || p.num_kv_heads <= 0 || p.head_dim <= 0 ||
      p.k_stride < p.num_kv_heads * p.head_dim || p.v_stride < p.num_kv_heads * p.head_dim) {
    return cudaErrorInvalidValue;
  }
  if (p.num_tokens == 0) return cudaSuccess;
  const bool vec4 = p.head_dim % 4 == 0 && p.k_stride % 4 == 0 && p.v_stride % 4 == 0 &&
                    detail::IsVecAligned<float, 4>(p.k) && detail::IsVecAligned<float, 4>(p.v) &&
                    detail::IsVecAligned<Bf16, 4>(p.k_cache) &&
                    detail::IsVecAligned<Bf16, 4>(p.v_cache);
  return vec4 ? LaunchKvAppend<4>(p, stream) : LaunchKvAppend<1>(p, stream);
}

}  // namespace asynctls::kernels::cuda
