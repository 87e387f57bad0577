// Private helpers of the dense-op kernels (not installed, not part of the public API).
#pragma once

#include <cstdint>
#include <type_traits>

#include "asynctls/kernels/types.h"

namespace asynctls::kernels::cuda::detail {

// N consecutive T loaded or stored as one aligned access (ld/st.global.v2/v4).
template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

template <typename T, int N>
__device__ __forceinline__ Vec<T, N> LoadVec(const T* p) {
  return *reinterpret_cast<const Vec<T, N>*>(p);
}

template <typename T, int N>
__device__ __forceinline__ void StoreVec(T* p, const Vec<T, N>& v) {
  *reinterpret_cast<Vec<T, N>*>(p) = v;
}

// fp32 results stored as OutT (float, or bf16 rounded to nearest even: what a bf16 GEMM's input
// conversion would make of them).
template <typename OutT, int N>
__device__ __forceinline__ void StoreVecAs(OutT* p, const Vec<float, N>& v) {
  if constexpr (std::is_same_v<OutT, float>) {
    StoreVec<float, N>(p, v);
  } else {
    Vec<Bf16, N> b;
#pragma unroll
    for (int j = 0; j < N; ++j) b.v[j] = FloatToBf16(v.v[j]);
    StoreVec<Bf16, N>(p, b);
  }
}

__device__ __forceinline__ float ToFloat(float x) { return x; }
__device__ __forceinline__ float ToFloat(Bf16 x) { return Bf16ToFloat(x); }

__device__ __forceinline__ float WarpSum(float x) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) x += __shfl_xor_sync(0xffffffffu, x, offset);
  return x;
}

// True when `p` is aligned for a Vec<T, N> access.
template <typename T, int N>
inline bool IsVecAligned(const void* p) {
  return reinterpret_cast<uintptr_t>(p) % (sizeof(T) * N) == 0;
}

inline int64_t CeilDiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Blocks for a grid-stride loop over `work` items: enough to fill the GPU, within grid.x limits.
inline unsigned GridFor(int64_t work, int threads) {
  const int64_t blocks = CeilDiv(work, threads);
  constexpr int64_t kMaxBlocks = int64_t{1} << 20;
  return static_cast<unsigned>(blocks < 1 ? 1 : (blocks > kMaxBlocks ? kMaxBlocks : blocks));
}

}  // namespace asynctls::kernels::cuda::detail
