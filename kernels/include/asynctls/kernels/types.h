// Types shared by the CPU reference kernels, the CUDA kernels and their callers. CUDA-free.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define ASYNCTLS_HD __host__ __device__ __forceinline__
#else
#define ASYNCTLS_HD inline
#endif

namespace asynctls::kernels {

// Tokens per KV block: the unit of paging, of the block index and of host<->GPU transfers.
inline constexpr int kKvBlockSize = 64;

enum class DType : int32_t { kF32 = 0, kBF16 = 1, kF16 = 2, kI32 = 3 };

inline constexpr int DTypeSize(DType t) { return t == DType::kF32 || t == DType::kI32 ? 4 : 2; }

// bf16 stored as its 16 raw bits; conversions round to nearest even (NaN stays NaN).
struct Bf16 {
  uint16_t bits;
};

// The bits of a float and back, on host and device alike.
ASYNCTLS_HD float BitsToFloat(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, 4);
  return f;
#endif
}

ASYNCTLS_HD uint32_t FloatToBits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
#endif
}

ASYNCTLS_HD float Bf16ToFloat(Bf16 h) { return BitsToFloat(static_cast<uint32_t>(h.bits) << 16); }

ASYNCTLS_HD Bf16 FloatToBf16(float f) {
  uint32_t u = FloatToBits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return Bf16{static_cast<uint16_t>((u >> 16) | 0x40)};
  u += 0x7fffu + ((u >> 16) & 1u);
  return Bf16{static_cast<uint16_t>(u >> 16)};
}

// Rounds a float to the nearest bf16 value and back (what storing in a bf16 cache does).
ASYNCTLS_HD float RoundToBf16(float f) { return Bf16ToFloat(FloatToBf16(f)); }

}  // namespace asynctls::kernels
