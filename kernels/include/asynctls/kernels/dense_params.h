// Parameters of the dense model ops: plain structs with the shape of every pointer, included
// by the CPU reference (host pointers), the CUDA kernels (device pointers) and the tests.
//
// Conventions: activations are fp32 row-major; the KV cache is paged, one K and one V pool
// per layer, each bf16 [num_blocks, num_kv_heads, kKvBlockSize, head_dim]; a token's slot is
// block_id * kKvBlockSize + offset_in_block.
#pragma once

#include <cstddef>
#include <cstdint>

#include "asynctls/kernels/types.h"

namespace asynctls::kernels {

// out[t, :] = table[ids[t], :]
struct EmbeddingParams {
  const void* table;     // [vocab, dim], table_dtype (kF32 or kBF16)
  const int32_t* ids;    // [num_tokens], each in [0, vocab)
  float* out;            // [num_tokens, dim]
  DType table_dtype;
  int32_t num_tokens, dim, vocab;
};

// out[r, :] = x[r, :] / sqrt(mean(x[r, :]^2) + eps) * weight[:]; out may alias x.
// Qwen3's per-head q/k norm is this op with rows = tokens * heads and dim = head_dim.
// With maybe_out_bf16 the result goes there instead, rounded to bf16 (the input form of the next
// bf16 GEMM, which then converts nothing: the same bits as rounding out).
struct RmsNormParams {
  const float* x;       // [rows, dim]
  const float* weight;  // [dim]
  float* out;           // [rows, dim]
  int32_t rows, dim;
  float eps;
  Bf16* maybe_out_bf16 = nullptr;  // [rows, dim]; out unused when set
};

// out[m, n] = beta * out[m, n] + sum_k x[m, k] * w[n, k] + bias[n]
// (beta 0: overwrite; 1: residual add; bias optional, Qwen2's q/k/v projections have one)
struct GemmParams {
  const float* x;           // [m, k]
  const void* w;            // [n, k] row-major, w_dtype (kF32 or kBF16)
  const float* maybe_bias;  // [n] or null
  float* out;               // [m, n]
  DType w_dtype;
  int32_t m, n, k;
  float beta;
  // x already in bf16 (bf16 weights only), e.g. RmsNorm's maybe_out_bf16; x unused when set.
  const Bf16* maybe_x_bf16 = nullptr;
};

enum class RopeStyle : int32_t {
  kInterleaved = 0,  // rotates pairs (2i, 2i+1): llama.cpp's GGUF Llama layout
  kHalf = 1,         // rotates pairs (i, i + rotary_dim/2): Hugging Face / NeoX / Qwen
};

// Rotates q and k in place. Angle for pair i at position p = p * inv_freq[i]; inv_freq is
// computed on the host from theta and the model's rope scaling (linear, llama3).
struct RopeParams {
  float* q;                  // [num_tokens, num_q_heads, head_dim]
  float* k;                  // [num_tokens, num_kv_heads, head_dim]
  const int32_t* positions;  // [num_tokens]
  const float* inv_freq;     // [rotary_dim / 2]
  int32_t num_tokens, num_q_heads, num_kv_heads, head_dim, rotary_dim;
  RopeStyle style;
};

// One layer's attention inputs from its fused q/k/v projection (per token the rows of the q
// heads, then the k heads, then the v heads): q, k and v into arrays of their own, q and k heads
// RMS-normalized when the weights are given (Qwen3's q/k norm), then q and k rotated as Rope
// does. Equals CopyRows, RmsNorm on q and on k, then Rope; one launch instead of four.
struct SplitQkvParams {
  const float* qkv;           // [num_tokens, num_q_heads + 2 * num_kv_heads, head_dim]
  float* q;                   // [num_tokens, num_q_heads, head_dim]
  float* k;                   // [num_tokens, num_kv_heads, head_dim]
  float* v;                   // [num_tokens, num_kv_heads, head_dim]
  const float* maybe_q_norm;  // [head_dim], or null: no q/k norm
  const float* maybe_k_norm;  // [head_dim]; given with maybe_q_norm
  float eps;
  const int32_t* positions;  // [num_tokens]
  const float* inv_freq;     // [rotary_dim / 2]
  int32_t num_tokens, num_q_heads, num_kv_heads, head_dim, rotary_dim;
  RopeStyle style;
};

// out[r, i] = silu(gate_up[r, i]) * gate_up[r, dim + i]
struct SiluMulParams {
  const float* gate_up;  // [rows, 2 * dim]: gate, then up
  float* out;            // [rows, dim]
  int32_t rows, dim;
  Bf16* maybe_out_bf16 = nullptr;  // [rows, dim], as RmsNormParams's; out unused when set
};

// Greedy sampling of logit rows where they are: per row the first index of its largest logit
// (NaN never wins; a row of NaN picks 0) and that token's log-softmax -log(sum_i e^(l_i -
// max)) (+inf when every logit is -inf or NaN). The host then needs neither the row nor a pass
// over it.
struct GreedyPickParams {
  const float* logits;  // [rows, vocab]
  int32_t* token;       // [rows]
  float* logprob;       // [rows]
  int32_t rows, vocab;
};

// Writes each token's K and V (rounded to bf16) into its slot of the paged cache.
struct KvAppendParams {
  const float* k;        // [num_tokens, num_kv_heads, head_dim] (row stride k_stride floats)
  const float* v;        // [num_tokens, num_kv_heads, head_dim] (row stride v_stride floats)
  const int32_t* slots;  // [num_tokens]
  void* k_cache;         // bf16 [num_blocks, num_kv_heads, kKvBlockSize, head_dim]
  void* v_cache;
  int32_t num_tokens, num_kv_heads, head_dim;
  int32_t k_stride, v_stride;  // floats between consecutive tokens' rows
};

// Decode attention: one query token per sequence over its whole paged cache (the current
// token's K/V already appended). GQA: query head h reads KV head h / (num_q_heads/num_kv_heads).
struct PagedDecodeParams {
  const void* q;               // [batch, num_q_heads, head_dim], io_dtype
  const void* k_cache;         // bf16 pool, see file comment
  const void* v_cache;
  const int32_t* block_table;  // [batch, max_blocks_per_seq]
  const int32_t* seq_lens;     // [batch] tokens in the cache, >= 1
  void* out;                   // [batch, num_q_heads, head_dim], io_dtype
  float* maybe_lse;            // [batch, num_q_heads] log-sum-exp of scaled scores, or null
  void* workspace;             // split-K scratch, PagedDecodeWorkspaceBytes(); null for ref
  DType io_dtype;              // kF32 or kBF16
  int32_t batch, num_q_heads, num_kv_heads, head_dim, max_blocks_per_seq;
  int32_t max_seq_len;         // upper bound of seq_lens (sizes the split-K grid)
  float scale;                 // usually 1/sqrt(head_dim)
};

// Chunked causal prefill: sequence b contributes q rows [cu_q_lens[b], cu_q_lens[b+1]), which
// are its last q_len positions of seq_lens[b] tokens (already appended to the cache). Row i
// of that chunk sits at position seq_lens[b] - q_len + i and attends to positions <= it.
struct PagedPrefillParams {
  const void* q;               // [num_tokens, num_q_heads, head_dim], io_dtype
  const int32_t* cu_q_lens;    // [batch + 1]
  const void* k_cache;
  const void* v_cache;
  const int32_t* block_table;  // [batch, max_blocks_per_seq]
  const int32_t* seq_lens;     // [batch]
  void* out;                   // [num_tokens, num_q_heads, head_dim], io_dtype
  DType io_dtype;
  int32_t batch, num_tokens, num_q_heads, num_kv_heads, head_dim, max_blocks_per_seq;
  int32_t max_q_len;           // upper bound of chunk lengths (sizes the grid)
  float scale;
};

// dst row dst_rows[i] = src row src_rows[i], for i < num_rows; rows of row_words 32-bit words.
// A gather / scatter of per-sequence state between its slots and batch order (the TLS block
// sets kept for the one-step lag). dst rows must be distinct and must not overlap src rows.
struct CopyRowsParams {
  const int32_t* src;
  int32_t* dst;
  const int32_t* src_rows;  // [num_rows]
  const int32_t* dst_rows;  // [num_rows]
  int32_t num_rows, row_words;
};

// dst[i] = offset + scale * (2 * U(seed, i) - 1) with U = CounterUniform: the same values on
// every backend (seeded random weights generated where they live, for performance runs).
struct RandomFillParams {
  void* dst;  // [count], dtype (kF32 or kBF16)
  DType dtype;
  int64_t count;
  uint64_t seed;
  float scale, offset;
};

// A counter-based uniform draw in [0, 1): a SplitMix64 finaliser over (seed, index).
ASYNCTLS_HD float CounterUniform(uint64_t seed, uint64_t index) {
  uint64_t x = seed * 0x9e3779b97f4a7c15ull + index + 0x632be59bd9b4e019ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  x ^= x >> 31;
  return static_cast<float>(x >> 40) * (1.0f / 16777216.0f);
}

}  // namespace asynctls::kernels
