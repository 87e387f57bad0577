// Helpers private to the TLS reference files.
#pragma once

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "asynctls/kernels/tls_math.h"
#include "asynctls/kernels/tls_params.h"

namespace asynctls::kernels::ref::tls_internal {

#define ASYNCTLS_TLS_REF_CHECK(cond)                                                           \
  do {                                                                                         \
    if (!(cond)) {                                                                             \
      std::fprintf(stderr, "%s:%d: TLS reference contract violated: %s\n", __FILE__, __LINE__, \
                   #cond);                                                                     \
      std::abort();                                                                            \
    }                                                                                          \
  } while (0)

inline float LoadAs(const void* base, DType dtype, int64_t i) {
  if (dtype == DType::kBF16) return Bf16ToFloat(static_cast<const Bf16*>(base)[i]);
  return static_cast<const float*>(base)[i];
}

inline void StoreAs(void* base, DType dtype, int64_t i, float v) {
  if (dtype == DType::kBF16) {
    static_cast<Bf16*>(base)[i] = FloatToBf16(v);
  } else {
    static_cast<float*>(base)[i] = v;
  }
}

// Offset of (pool block, kv head, in-block offset, dim 0) in a paged pool.
inline int64_t PoolOffset(int64_t block, int kv_head, int offset, int num_kv_heads, int head_dim) {
  return ((block * num_kv_heads + kv_head) * kKvBlockSize + offset) * head_dim;
}

}  // namespace asynctls::kernels::ref::tls_internal
