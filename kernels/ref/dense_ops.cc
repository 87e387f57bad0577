#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "asynctls/kernels/ref.h"

namespace asynctls::kernels::ref {
namespace {

float Load(const void* base, DType dtype, int64_t i) {
  if (dtype == DType::kBF16) return Bf16ToFloat(static_cast<const Bf16*>(base)[i]);
  return static_cast<const float*>(base)[i];
}

void Store(void* base, DType dtype, int64_t i, float v) {
  if (dtype == DType::kBF16) {
    static_cast<Bf16*>(base)[i] = FloatToBf16(v);
  } else {
    static_cast<float*>(base)[i] = v;
  }
}

// Offset of (slot, kv_head, dim 0) in a paged pool.
int64_t CacheOffset(int64_t slot, int kv_head, int num_kv_heads, int head_dim) {
  const int64_t block = slot / kKvBlockSize, in_block = slot % kKvBlockSize;
  return ((block * num_kv_heads + kv_head) * kKvBlockSize + in_block) * head_dim;
}

// Exact softmax attention of one query row over positions [0, n) of one sequence's cache.
// Returns the log-sum-exp of the scaled scores.
float AttendOne(const float* q, const void* k_cache, const void* v_cache,
                const int32_t* block_table, int n, int kv_head, int num_kv_heads, int head_dim,
                float scale, float* out) {
  std::vector<float> scores(n);
  float max_score = -std::numeric_limits<float>::infinity();
  for (int j = 0; j < n; ++j) {
    const int64_t slot = int64_t{block_table[j / kKvBlockSize]} * kKvBlockSize + j % kKvBlockSize;
    const int64_t off = CacheOffset(slot, kv_head, num_kv_heads, head_dim);
    float s = 0.f;
    for (int d = 0; d < head_dim; ++d) s += q[d] * Load(k_cache, DType::kBF16, off + d);
    scores[j] = s * scale;
    max_score = std::max(max_score, scores[j]);
  }
  float denom = 0.f;
  for (int j = 0; j < n; ++j) {
    scores[j] = std::exp(scores[j] - max_score);
    denom += scores[j];
  }
  for (int d = 0; d < head_dim; ++d) out[d] = 0.f;
  for (int j = 0; j < n; ++j) {
    const int64_t slot = int64_t{block_table[j / kKvBlockSize]} * kKvBlockSize + j % kKvBlockSize;
    const int64_t off = CacheOffset(slot, kv_head, num_kv_heads, head_dim);
    const float w = scores[j] / denom;
    for (int d = 0; d < head_dim; ++d) out[d] += w * Load(v_cache, DType::kBF16, off + d);
  }
  return max_score + std::log(denom);
}

}  // namespace

void Embedding(const EmbeddingParams& p) {
  for (int t = 0; t < p.num_tokens; ++t) {
    const int64_t row = p.ids[t];
    for (int i = 0; i < p.dim; ++i) p.out[int64_t{t} * p.dim + i] = Load(p.table, p.table_dtype, row * p.dim + i);
  }
}

void RmsNorm(const RmsNormParams& p) {
  void* const out = p.maybe_out_bf16 ? static_cast<void*>(p.maybe_out_bf16) : p.out;
  const DType out_dtype = p.maybe_out_bf16 ? DType::kBF16 : DType::kF32;
  for (int r = 0; r < p.rows; ++r) {
    const float* x = p.x + int64_t{r} * p.dim;
    float sum_sq = 0.f;
    for (int i = 0; i < p.dim; ++i) sum_sq += x[i] * x[i];
    const float inv = 1.f / std::sqrt(sum_sq / p.dim + p.eps);
    for (int i = 0; i < p.dim; ++i) {
      Store(out, out_dtype, int64_t{r} * p.dim + i, x[i] * inv * p.weight[i]);
    }
  }
}

void SplitQkv(const SplitQkvParams& p) {
  const int64_t heads = p.num_q_heads + 2 * p.num_kv_heads, hd = p.head_dim;
  for (int64_t t = 0; t < p.num_tokens; ++t) {
    for (int64_t j = 0; j < heads; ++j) {
      const float* src = p.qkv + (t * heads + j) * hd;
      float* dst = j < p.num_q_heads ? p.q + (t * p.num_q_heads + j) * hd
                   : j < p.num_q_heads + p.num_kv_heads
                       ? p.k + (t * p.num_kv_heads + j - p.num_q_heads) * hd
                       : p.v + (t * p.num_kv_heads + j - p.num_q_heads - p.num_kv_heads) * hd;
      std::copy(src, src + hd, dst);
    }
  }
  if (p.maybe_q_norm) {
    RmsNorm({p.q, p.maybe_q_norm, p.q, p.num_tokens * p.num_q_heads, p.head_dim, p.eps});
    RmsNorm({p.k, p.maybe_k_norm, p.k, p.num_tokens * p.num_kv_heads, p.head_dim, p.eps});
  }
  Rope({p.q, p.k, p.positions, p.inv_freq, p.num_tokens, p.num_q_heads, p.num_kv_heads, p.head_dim,
        p.rotary_dim, p.style});
}

void Gemm(const GemmParams& p) {
  const void* const x = p.maybe_x_bf16 ? static_cast<const void*>(p.maybe_x_bf16) : p.x;
  const DType x_dtype = p.maybe_x_bf16 ? DType::kBF16 : DType::kF32;
  for (int m = 0; m < p.m; ++m) {
    for (int n = 0; n < p.n; ++n) {
      float acc = 0.f;
      for (int k = 0; k < p.k; ++k) {
        acc += Load(x, x_dtype, int64_t{m} * p.k + k) * Load(p.w, p.w_dtype, int64_t{n} * p.k + k);
      }
      if (p.maybe_bias) acc += p.maybe_bias[n];
      float& o = p.out[int64_t{m} * p.n + n];
      o = (p.beta == 0.f ? 0.f : p.beta * o) + acc;
    }
  }
}

void Rope(const RopeParams& p) {
  const int half = p.rotary_dim / 2;
  auto rotate = [&](float* head, float angle, int i) {
    const int a = p.style == RopeStyle::kInterleaved ? 2 * i : i;
    const int b = p.style == RopeStyle::kInterleaved ? 2 * i + 1 : i + half;
    const float c = std::cos(angle), s = std::sin(angle);
    const float x0 = head[a], x1 = head[b];
    head[a] = x0 * c - x1 * s;
    head[b] = x0 * s + x1 * c;
  };
  for (int t = 0; t < p.num_tokens; ++t) {
    for (int i = 0; i < half; ++i) {
      const float angle = static_cast<float>(p.positions[t]) * p.inv_freq[i];
      for (int h = 0; h < p.num_q_heads; ++h)
        rotate(p.q + (int64_t{t} * p.num_q_heads + h) * p.head_dim, angle, i);
      for (int h = 0; h < p.num_kv_heads; ++h)
        rotate(p.k + (int64_t{t} * p.num_kv_heads + h) * p.head_dim, angle, i);
    }
  }
}

void SiluMul(const SiluMulParams& p) {
  void* const out = p.maybe_out_bf16 ? static_cast<void*>(p.maybe_out_bf16) : p.out;
  const DType out_dtype = p.maybe_out_bf16 ? DType::kBF16 : DType::kF32;
  for (int r = 0; r < p.rows; ++r) {
    const float* g = p.gate_up + int64_t{r} * 2 * p.dim;
    for (int i = 0; i < p.dim; ++i) {
      const float x = g[i];
      Store(out, out_dtype, int64_t{r} * p.dim + i, x / (1.f + std::exp(-x)) * g[p.dim + i]);
    }
  }
}

void GreedyPick(const GreedyPickParams& p) {
  for (int r = 0; r < p.rows; ++r) {
    const float* l = p.logits + int64_t{r} * p.vocab;
    float max = -std::numeric_limits<float>::infinity();
    for (int32_t i = 0; i < p.vocab; ++i) max = l[i] > max ? l[i] : max;  // NaN compares false
    int32_t best = 0;
    while (best < p.vocab && l[best] != max) ++best;
    if (best == p.vocab) best = 0;  // every logit NaN
    double total = 0;
    for (int32_t i = 0; i < p.vocab; ++i) {
      const float d = l[i] - max;  // NaN for NaN logits and when max is -inf
      if (d == d) total += std::exp(double{d});
    }
    p.token[r] = best;
    p.logprob[r] = static_cast<float>(-std::log(total));
  }
}

void KvAppend(const KvAppendParams& p) {
  for (int t = 0; t < p.num_tokens; ++t) {
    for (int h = 0; h < p.num_kv_heads; ++h) {
      const int64_t off = CacheOffset(p.slots[t], h, p.num_kv_heads, p.head_dim);
      for (int d = 0; d < p.head_dim; ++d) {
        Store(p.k_cache, DType::kBF16, off + d, p.k[int64_t{t} * p.k_stride + h * p.head_dim + d]);
        Store(p.v_cache, DType::kBF16, off + d, p.v[int64_t{t} * p.v_stride + h * p.head_dim + d]);
      }
    }
  }
}

void PagedDecodeAttention(const PagedDecodeParams& p) {
  const int group = p.num_q_heads / p.num_kv_heads;
  std::vector<float> q(p.head_dim), out(p.head_dim);
  for (int b = 0; b < p.batch; ++b) {
    for (int h = 0; h < p.num_q_heads; ++h) {
      const int64_t row = (int64_t{b} * p.num_q_heads + h) * p.head_dim;
      for (int d = 0; d < p.head_dim; ++d) q[d] = Load(p.q, p.io_dtype, row + d);
      const float lse = AttendOne(q.data(), p.k_cache, p.v_cache,
                                  p.block_table + int64_t{b} * p.max_blocks_per_seq, p.seq_lens[b],
                                  h / group, p.num_kv_heads, p.head_dim, p.scale, out.data());
      for (int d = 0; d < p.head_dim; ++d) Store(p.out, p.io_dtype, row + d, out[d]);
      if (p.maybe_lse) p.maybe_lse[int64_t{b} * p.num_q_heads + h] = lse;
    }
  }
}

void PagedPrefillAttention(const PagedPrefillParams& p) {
  const int group = p.num_q_heads / p.num_kv_heads;
  std::vector<float> q(p.head_dim), out(p.head_dim);
  for (int b = 0; b < p.batch; ++b) {
    const int q_begin = p.cu_q_lens[b], q_len = p.cu_q_lens[b + 1] - q_begin;
    for (int i = 0; i < q_len; ++i) {
      const int visible = p.seq_lens[b] - q_len + i + 1;  // causal: positions <= own
      for (int h = 0; h < p.num_q_heads; ++h) {
        const int64_t row = (int64_t{q_begin + i} * p.num_q_heads + h) * p.head_dim;
        for (int d = 0; d < p.head_dim; ++d) q[d] = Load(p.q, p.io_dtype, row + d);
        AttendOne(q.data(), p.k_cache, p.v_cache, p.block_table + int64_t{b} * p.max_blocks_per_seq,
                  visible, h / group, p.num_kv_heads, p.head_dim, p.scale, out.data());
        for (int d = 0; d < p.head_dim; ++d) Store(p.out, p.io_dtype, row + d, out[d]);
      }
    }
  }
}

void RandomFill(const RandomFillParams& p) {
  for (int64_t i = 0; i < p.count; ++i)
    Store(p.dst, p.dtype, i, p.offset + p.scale * (2.f * CounterUniform(p.seed, i) - 1.f));
}

void CopyRows(const CopyRowsParams& p) {
  const size_t bytes = sizeof(int32_t) * p.row_words;
  for (int32_t i = 0; i < p.num_rows; ++i) {
    std::memcpy(p.dst + int64_t{p.dst_rows[i]} * p.row_words,
                p.src + int64_t{p.src_rows[i]} * p.row_words, bytes);
  }
}

}  // namespace asynctls::kernels::ref
