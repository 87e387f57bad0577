// Reference sparse decode attention over selected positions of a paged bf16 KV cache.
#include <cmath>
#include <limits>
#include <vector>

#include "asynctls/kernels/tls_ref.h"
#include "tls_common.h"

namespace asynctls::kernels::ref {

using tls_internal::LoadAs;
using tls_internal::PoolOffset;
using tls_internal::StoreAs;

void TlsSparseAttention(const TlsSparseAttentionParams& p) {
  ASYNCTLS_TLS_REF_CHECK(p.num_kv_heads > 0 && p.num_q_heads % p.num_kv_heads == 0);
  ASYNCTLS_TLS_REF_CHECK(p.v_head_dim <= p.head_dim);
  const int group = p.num_q_heads / p.num_kv_heads;
  const Bf16* k_cache = static_cast<const Bf16*>(p.k_cache);
  const Bf16* v_cache = static_cast<const Bf16*>(p.v_cache);
  std::vector<float> q(p.head_dim), out(p.v_head_dim), scores;
  for (int b = 0; b < p.batch; ++b) {
    const int32_t* table = p.block_table + int64_t{b} * p.max_blocks_per_seq;
    for (int h = 0; h < p.num_q_heads; ++h) {
      const int g = h / group;
      const int64_t bg = int64_t{b} * p.num_kv_heads + g;
      const int n = p.num_positions[bg];
      ASYNCTLS_TLS_REF_CHECK(n >= 0 && n <= p.max_positions);
      const int32_t* positions = p.positions + bg * p.max_positions;
      const int64_t qrow = (int64_t{b} * p.num_q_heads + h) * p.head_dim;
      for (int d = 0; d < p.head_dim; ++d) q[d] = LoadAs(p.q, p.io_dtype, qrow + d);
      scores.assign(n, 0.f);
      float max_score = -std::numeric_limits<float>::infinity();
      for (int j = 0; j < n; ++j) {
        const int32_t pos = positions[j];
        const int64_t off = PoolOffset(table[pos / kKvBlockSize], g, pos % kKvBlockSize,
                                       p.num_kv_heads, p.head_dim);
        float s = 0.f;
        for (int d = 0; d < p.head_dim; ++d) s += q[d] * Bf16ToFloat(k_cache[off + d]);
        scores[j] = s * p.scale;
        max_score = std::max(max_score, scores[j]);
      }
      float denom = 0.f;
      for (int j = 0; j < n; ++j) {
        scores[j] = std::exp(scores[j] - max_score);
        denom += scores[j];
      }
      for (int d = 0; d < p.v_head_dim; ++d) out[d] = 0.f;
      for (int j = 0; j < n; ++j) {
        const int32_t pos = positions[j];
        const int64_t off = PoolOffset(table[pos / kKvBlockSize], g, pos % kKvBlockSize,
                                       p.num_kv_heads, p.head_dim);
        const float w = scores[j] / denom;
        for (int d = 0; d < p.v_head_dim; ++d) out[d] += w * Bf16ToFloat(v_cache[off + d]);
      }
      const int64_t orow = (int64_t{b} * p.num_q_heads + h) * p.v_head_dim;
      for (int d = 0; d < p.v_head_dim; ++d) StoreAs(p.out, p.io_dtype, orow + d, n ? out[d] : 0.f);
      if (p.maybe_lse) {
        p.maybe_lse[int64_t{b} * p.num_q_heads + h] =
            n ? max_score + std::log(denom) : -std::numeric_limits<float>::infinity();
      }
    }
  }
}

}  // namespace asynctls::kernels::ref
