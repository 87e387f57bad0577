// Parameters of the two-level sparse attention (TLS) ops: plain CUDA-free structs with the shape
// of every pointer, shared by the CPU reference (tls_ref.h, host pointers), the CUDA entries
// (cuda_tls.h, device pointers), the tests and the benchmarks.
//
// Decode step per layer and KV group (DESIGN.md §1, PAPER.md §2-3):
//   1. block scores    s_i = sum_h max(q_h,0)·kmax_i + min(q_h,0)·kmin_i        TlsBlockScore
//   2. block top-k_b   M = the k_b best eligible blocks                        TlsBlockSelect
//   3. token scores    alpha_j = mean_h softmax_j(q~_h[C] · dequant(k~_j) * scale) TlsTokenScore
//   4. token top-k_t   S = always ∪ the k_t best candidates                     TlsTokenSelect
//   5. exact attention of every query head over S (paged K/V, split-K, LSE)     TlsSparseAttention
// TlsDecodeSelect runs 1-4 for one TlsPolicy (TLS same-step or one-step-lag, Quest, token-only,
// dense); baselines reuse the same ops so budgets and the always-kept set are identical.
//
// ---- Geometry (tokens that are always kept; see TlsGeometry in tls_math.h) ---------------------
//   len   = seq_lens[b] (tokens in the cache, the current token included)
//   L_sel = length of the sequence when the block set M in use was chosen (== len for the
//           same-step variant; len - 1 for the one-step lag of the paper: S_t from M_{t-1}).
//   sink      = positions [0, sink_end), sink_end = min(64 * sink_blocks, len)
//   recent    = positions [recent_start, len) with
//               recent_start = max(sink_end, min(64 * ((L_sel - 1) / 64), len - window)):
//               the block that was open when M was chosen, every newer block, and the last
//               `window` tokens. Kept whole, so a block that fills between selections is never
//               lost for a step.
//   eligible blocks for block selection at length L: [sink_blocks, (L - 1) / 64)
//   candidates for token selection: positions p of blocks in M with sink_end <= p < recent_start
//   selected positions = sink ++ top-k_t candidates (ascending) ++ recent: sorted, disjoint.
//   Requires 1 <= L_sel <= len and len - L_sel <= 64.
//
// ---- Indices (one set per layer) -------------------------------------------------------------
// Index rows are paged like the KV cache: `index_table[b, i]` maps sequence b's logical block i
// to a row of the index pools. A runtime that keeps every block resident can pass the KV block
// table; one that offloads KV keeps an index row per logical block (indices never leave the GPU).
//   block index: kmax, kmin   bf16 [num_index_rows, num_kv_heads, head_dim]: element-wise
//                max / min of the block's keys (bf16 max/min is exact, so bf16 storage loses
//                nothing). Rows of the open block cover the tokens appended so far.
//     int8 form (maybe_block_scales set): kmax, kmin int8 codes of the same shape and one fp32
//       scale per row and KV head, scales [num_index_rows, num_kv_heads]:
//       scale = TlsBlockIndexScale(the largest |key| of the block, NaNs skipped), codes rounded
//       outward (TlsBlockMaxCode / TlsBlockMinCode: code * scale >= max, <= min; a NaN key's
//       dim gets +-127), so the block score stays an upper bound. Half the bytes of the bf16
//       form; accuracy-neutral in bench/results/tls-accuracy.md (k). The open block's row is
//       that of all its K rows after every append (a new scale re-codes the row). CUDA needs
//       head_dim a multiple of 8, at most 576.
//   token index: codes  uint8 [num_index_rows, num_kv_heads, 64, num_channels / 2]
//                scales fp32  [num_index_rows, num_kv_heads, 64]
//                channels int32 [num_kv_heads, num_channels]: the calibrated set C, ascending.
//     INT4 scheme: per token and KV head, symmetric absmax over the C channels:
//       scale = absmax / 7 to 22 significant bits (TlsInt4Scale), code = rint(k[C_c] / scale)
//       clamped to [-7, 7] (0 when absmax == 0),
//       stored as the nibble code + 8; byte i holds channel 2i in its low and 2i+1 in its high
//       nibble. Dequantized value = code * scale. 4 + 32/num_channels bits per channel.
//       num_channels is a multiple of 8 in [8, kTlsMaxChannels] (rows are whole 32-bit words).
//     Query side (q~ above): per query head, symmetric absmax over its group's C channels:
//       qscale = absmax / 127, qcode = rint(q[C_c] / qscale) in [-127, 127]; the token logit is
//       (sum_c qcode_c * code_c) * scale * qscale, the sum an exact integer (tls_math.h), so
//       integer tensor cores, dp4a or fp32 fmas in any order give the same logit. (Measured
//       accuracy-neutral against fp32 queries: bench/results/tls-accuracy.md (d).)
//
// ---- MLA ------------------------------------------------------------------------------------
// One KV head of head_dim 576 (512 latent + 64 rope), G = all query heads (absorbed queries of
// 576 dims). K is the full 576-dim row; V is the first v_head_dim = 512 dims of the same row:
// pass v_cache = k_cache. Block index and calibration cover all 576 dims.
//
// ---- Determinism (CPU and GPU select the same sets; tests compare them exactly) ---------------
// Selection scores use only IEEE operations in one defined order on both sides (explicit fma,
// sequential sums or fixed trees of them, an exp2 built from fma, exact integer sums for token
// logits and softmax denominators), so the CUDA kernels reproduce the CPU's scores bit for bit;
// top-k orders by (score desc, id asc) through TlsSelectKey. See tls_math.h.
#pragma once

#include <cstddef>
#include <cstdint>

#include "asynctls/kernels/types.h"

namespace asynctls::kernels {

inline constexpr int kTlsMaxChannels = 128;            // largest num_channels (d_c) supported
inline constexpr int kTlsMaxLagTokens = kKvBlockSize;  // largest len - L_sel supported

enum class TlsMode : int32_t {
  kDense = 0,      // every token (baseline)
  kBlockOnly = 1,  // Quest-style: the best token_budget / 64 blocks, all their tokens
  kTokenOnly = 2,  // Double-Sparsity-style: channel index over every token, top token_budget
  kTwoLevel = 3,   // AsyncTLS: top block_budget blocks, then top token_budget tokens in them
};

enum class TlsLag : int32_t {
  kSameStep = 0,  // S_t = TokenSelect(q_t, M_t)
  kOneStep = 1,   // S_t = TokenSelect(q_t, M_{t-1}); M_t is computed for the next step
};

// Runtime policy of one decode step. Defaults are the paper's (k_b 128, k_t 1024) plus our
// always-kept set (one sink block, 64-token window).
struct TlsPolicy {
  TlsMode mode = TlsMode::kTwoLevel;
  TlsLag lag = TlsLag::kOneStep;
  int32_t block_budget = 128;   // k_b (kTwoLevel)
  int32_t token_budget = 1024;  // k_t (kTwoLevel, kTokenOnly); kBlockOnly keeps k_t / 64 blocks
  int32_t sink_blocks = 1;
  int32_t window = 64;
};

// Blocks kept by `policy` (row capacity needed for TlsDecodeSelectParams::blocks).
inline int32_t TlsKeptBlocks(const TlsPolicy& policy) {
  if (policy.mode == TlsMode::kTwoLevel) return policy.block_budget;
  if (policy.mode == TlsMode::kBlockOnly) {
    const int32_t n = policy.token_budget / kKvBlockSize;
    return n > 0 ? n : 1;
  }
  return 0;
}

// Upper bound of selected positions per (sequence, KV head) (row capacity of `positions`).
inline int32_t TlsMaxSelectedTokens(const TlsPolicy& policy, int32_t max_blocks_per_seq) {
  const int32_t all = max_blocks_per_seq * kKvBlockSize;
  if (policy.mode == TlsMode::kDense) return all;
  const int32_t recent_blocks = 1 + (kTlsMaxLagTokens + kKvBlockSize - 1) / kKvBlockSize;
  const int32_t recent =
      policy.window > recent_blocks * kKvBlockSize ? policy.window : recent_blocks * kKvBlockSize;
  const int32_t chosen = policy.mode == TlsMode::kBlockOnly ? TlsKeptBlocks(policy) * kKvBlockSize
                                                            : policy.token_budget;
  const int32_t bound = policy.sink_blocks * kKvBlockSize + chosen + recent;
  return bound < all ? bound : all;
}

// ---- Channel calibration ---------------------------------------------------------------------

// Running statistics: q_absmax[h, i] = max(q_absmax[h, i], |q[t, h, i]|) over the tokens, and
// likewise k_absmax. Initialise both to 0 before the first call.
struct TlsCalibStatsParams {
  const void* q;    // [num_tokens, num_q_heads, head_dim], io_dtype
  const void* k;    // [num_tokens, num_kv_heads, head_dim], io_dtype
  float* q_absmax;  // [num_q_heads, head_dim], in/out
  float* k_absmax;  // [num_kv_heads, head_dim], in/out
  DType io_dtype;   // kF32 or kBF16
  int32_t num_tokens, num_q_heads, num_kv_heads, head_dim;
};

// Channel set C per KV head: score_i = (sum_h q_absmax[h, i] / G) * k_absmax[i] over the G
// query heads of the group (sum in head order); the num_channels best channels (score desc,
// channel asc), written in ascending channel order.
struct TlsCalibSelectParams {
  const float* q_absmax;        // [num_q_heads, head_dim]
  const float* k_absmax;        // [num_kv_heads, head_dim]
  int32_t* channels;            // [num_kv_heads, num_channels]
  float* maybe_channel_scores;  // [num_kv_heads, head_dim] or null
  int32_t num_q_heads, num_kv_heads, head_dim, num_channels;
};

// ---- Index build / update --------------------------------------------------------------------

// Positions [start_pos[b], seq_lens[b]) of each sequence were just written to the KV cache
// (prefill: start 0; decode: len - 1). Updates the block index of every block they touch
// (bf16: a block whose first token is among them is re-initialised, otherwise max/min are
// merged with the stored row; int8: the row is rebuilt from every token of the block so far)
// and writes their token-index rows. Blocks of different sequences must map to different index
// rows.
struct TlsIndexUpdateParams {
  const void* k_cache;         // bf16 [num_kv_blocks, num_kv_heads, 64, head_dim]
  const int32_t* block_table;  // [batch, max_blocks_per_seq] logical block -> KV pool block
  const int32_t* index_table;  // [batch, max_blocks_per_seq] logical block -> index row
  const int32_t* start_pos;    // [batch]
  const int32_t* seq_lens;     // [batch]
  void* block_kmax;            // bf16 (int8 with scales) [num_index_rows, num_kv_heads, head_dim]
  void* block_kmin;            // the same
  const int32_t* channels;     // [num_kv_heads, num_channels]; null with maybe_token_codes
  uint8_t* maybe_token_codes;  // [num_index_rows, num_kv_heads, 64, num_channels / 2] or null
  float* maybe_token_scales;   // [num_index_rows, num_kv_heads, 64] (with codes)
  int32_t batch, num_kv_heads, head_dim, num_channels, max_blocks_per_seq;
  int32_t max_new_tokens;  // upper bound of seq_lens - start_pos (sizes the grid)
  float* maybe_block_scales;  // [num_index_rows, num_kv_heads]: the int8 block index, or null
};

// ---- Selection -------------------------------------------------------------------------------

// scores[b, g, i] for blocks i < ceil(len / 64) of every sequence; other entries untouched.
// The sum over the group's heads is taken on the query first (qpos = sum_h max(q_h, 0),
// qneg = sum_h min(q_h, 0), heads in order), so the "GEMM" of the paper is one dot product of
// 2 * head_dim per block: the score equals Quest's bound sum_h sum_d max(q·kmax, q·kmin).
struct TlsBlockScoreParams {
  const void* q;           // [batch, num_q_heads, head_dim], io_dtype
  const void* block_kmax;  // bf16 (int8 with scales) [num_index_rows, num_kv_heads, head_dim]
  const void* block_kmin;
  const int32_t* index_table;  // [batch, max_blocks_per_seq]
  const int32_t* seq_lens;     // [batch]
  float* scores;               // [batch, num_kv_heads, max_blocks_per_seq]
  DType io_dtype;              // kF32 or kBF16
  int32_t batch, num_q_heads, num_kv_heads, head_dim, max_blocks_per_seq;
  const float* maybe_block_scales;  // [num_index_rows, num_kv_heads]: int8 block index, or null
  // CUDA workspace of [batch, num_kv_heads, 2, head_dim] floats (TlsBlockScoreWorkspaceBytes),
  // or null: where a group's query is large (MLA's 64+ bf16 heads), its qpos / qneg are summed
  // there once per row instead of in every block-score CTA (the same sums). Ignored by the
  // reference.
  float* maybe_query_sums;
};

// M: the min(k, #eligible) best eligible blocks (score desc, block asc), written ascending.
struct TlsBlockSelectParams {
  const float* scores;      // [batch, num_kv_heads, max_blocks_per_seq]
  const int32_t* seq_lens;  // [batch]
  int32_t* blocks;          // [batch, num_kv_heads, max_kept_blocks]
  int32_t* num_blocks;      // [batch, num_kv_heads]
  int32_t batch, num_kv_heads, max_blocks_per_seq, max_kept_blocks;
  int32_t k;  // <= max_kept_blocks
  int32_t sink_blocks;
};

// alpha[b, g, j] for candidate j = (entry j / 64 of the block list, offset j % 64): the mean over
// the group's heads of each head's softmax over all valid candidates, with logits
// q_h[C] · dequant(k~) and softmax scale `scale` (1/sqrt(head_dim), the paper's full d).
// cand_positions[b, g, j] = the candidate's position, or -1 (alpha unspecified) when it is not
// a candidate (past the list, in the sink or recent range). Block list: maybe_blocks (M, e.g.
// TlsBlockSelect's output), or when null every block in [sink_blocks, ceil(L_sel / 64)) (the
// token-only baseline).
struct TlsTokenScoreParams {
  const void* q;               // [batch, num_q_heads, head_dim], io_dtype
  const int32_t* channels;     // [num_kv_heads, num_channels]
  const uint8_t* token_codes;  // see file comment
  const float* token_scales;
  const int32_t* index_table;        // [batch, max_blocks_per_seq]
  const int32_t* seq_lens;           // [batch]
  const int32_t* maybe_select_lens;  // [batch] L_sel, or null: L_sel = len
  const int32_t* maybe_blocks;       // [batch, num_kv_heads, max_kept_blocks] or null (all)
  const int32_t* maybe_num_blocks;   // [batch, num_kv_heads] (with maybe_blocks)
  float* alpha;                      // [batch, num_kv_heads, max_candidates]
  int32_t* cand_positions;           // [batch, num_kv_heads, max_candidates]
  void* workspace;                   // TlsTokenScoreWorkspaceBytes (CUDA); ignored by the ref
  DType io_dtype;
  int32_t batch, num_q_heads, num_kv_heads, head_dim, num_channels, max_blocks_per_seq;
  int32_t max_kept_blocks;  // row stride of maybe_blocks
  int32_t max_candidates;   // 64 * (maybe_blocks ? max_kept_blocks : max_blocks_per_seq)
  int32_t sink_blocks, window;
  float scale;
};

// positions[b, g, :] = sink ++ the min(k, #candidates) best candidates by alpha (alpha desc,
// position asc; written ascending) ++ recent; num_positions[b, g] = their count.
struct TlsTokenSelectParams {
  const float* alpha;                // [batch, num_kv_heads, max_candidates]
  const int32_t* cand_positions;     // [batch, num_kv_heads, max_candidates], -1 = none
  const int32_t* seq_lens;           // [batch]
  const int32_t* maybe_select_lens;  // [batch] or null
  int32_t* positions;                // [batch, num_kv_heads, max_positions]
  int32_t* num_positions;            // [batch, num_kv_heads]
  int32_t batch, num_kv_heads, max_candidates, max_positions;
  int32_t k;
  int32_t sink_blocks, window;
};

// positions = sink ++ every candidate position of the listed blocks (ascending) ++ recent.
// maybe_blocks null: every block (with L_sel = len this is dense attention's position list).
struct TlsBlockExpandParams {
  const int32_t* maybe_blocks;       // [batch, num_kv_heads, max_kept_blocks], ascending, or null
  const int32_t* maybe_num_blocks;   // [batch, num_kv_heads]
  const int32_t* seq_lens;           // [batch]
  const int32_t* maybe_select_lens;  // [batch] or null
  int32_t* positions;                // [batch, num_kv_heads, max_positions]
  int32_t* num_positions;            // [batch, num_kv_heads]
  int32_t batch, num_kv_heads, max_kept_blocks, max_blocks_per_seq, max_positions;
  int32_t sink_blocks, window;
};

// One decode step's selection for `policy`:
//   kDense:      positions = all tokens.
//   kBlockOnly:  M = top TlsKeptBlocks blocks (same step); positions = expand(M).
//   kTokenOnly:  positions = token select over every block.
//   kTwoLevel, kSameStep: M = top block_budget; positions = token select over M.
//   kTwoLevel, kOneStep:  positions = token select over prev_blocks (chosen at prev_select_lens);
//                         M = top block_budget at this step, for the next step.
// `blocks`/`num_blocks` receive M (kBlockOnly, kTwoLevel); the runtime keeps them (and seq_lens
// as the next prev_select_lens) and prefetches them.
struct TlsDecodeSelectParams {
  TlsPolicy policy;
  const void* q;               // [batch, num_q_heads, head_dim], io_dtype
  const int32_t* seq_lens;     // [batch]
  const int32_t* index_table;  // [batch, max_blocks_per_seq]
  const void* block_kmax;      // block index (kBlockOnly, kTwoLevel)
  const void* block_kmin;
  const int32_t* channels;  // token index (kTokenOnly, kTwoLevel)
  const uint8_t* token_codes;
  const float* token_scales;
  const int32_t* prev_blocks;       // [batch, num_kv_heads, max_kept_blocks] (kOneStep)
  const int32_t* prev_num_blocks;   // [batch, num_kv_heads]
  const int32_t* prev_select_lens;  // [batch]
  int32_t* blocks;                  // [batch, num_kv_heads, max_kept_blocks] M out
  int32_t* num_blocks;              // [batch, num_kv_heads]
  int32_t* positions;               // [batch, num_kv_heads, max_positions]
  int32_t* num_positions;           // [batch, num_kv_heads]
  void* workspace;                  // TlsDecodeSelectWorkspaceBytes (CUDA); ignored by the ref
  DType io_dtype;
  int32_t batch, num_q_heads, num_kv_heads, head_dim, num_channels, max_blocks_per_seq;
  int32_t max_kept_blocks;  // >= TlsKeptBlocks(policy)
  int32_t max_positions;    // >= TlsMaxSelectedTokens(policy, max_blocks_per_seq)
  float scale;              // softmax scale of the token scores, 1/sqrt(head_dim)
  const float* maybe_block_scales;  // [num_index_rows, num_kv_heads]: int8 block index, or null
};

// The block-score stage of a decode selection (both TlsDecodeSelect implementations): its
// query (the one-step lag's block branch reads a copy) and the rows it writes.
inline TlsBlockScoreParams DecodeBlockScoreParams(const TlsDecodeSelectParams& p, const void* q,
                                                  float* scores) {
  TlsBlockScoreParams s{};
  s.q = q;
  s.block_kmax = p.block_kmax;
  s.block_kmin = p.block_kmin;
  s.maybe_block_scales = p.maybe_block_scales;
  s.index_table = p.index_table;
  s.seq_lens = p.seq_lens;
  s.scores = scores;
  s.io_dtype = p.io_dtype;
  s.batch = p.batch;
  s.num_q_heads = p.num_q_heads;
  s.num_kv_heads = p.num_kv_heads;
  s.head_dim = p.head_dim;
  s.max_blocks_per_seq = p.max_blocks_per_seq;
  return s;
}

// ---- Sparse attention ------------------------------------------------------------------------

// out[b, h] = softmax(q[b, h] · K[P]^T * scale) V[P] over the positions P = positions[b, g, :n]
// of the query head's KV group g (n = num_positions[b, g] >= 1), K/V gathered from the paged
// pools through block_table; fp32 accumulation; lse[b, h] = log sum exp of the scaled scores.
// V is the first v_head_dim dims of each row of v_cache (rows of head_dim elements); MLA passes
// v_cache = k_cache and v_head_dim 512.
struct TlsSparseAttentionParams {
  const void* q;                 // [batch, num_q_heads, head_dim], io_dtype
  const void* k_cache;           // bf16 [num_kv_blocks, num_kv_heads, 64, head_dim]
  const void* v_cache;           // bf16, same layout (may equal k_cache)
  const int32_t* block_table;    // [batch, max_blocks_per_seq]
  const int32_t* positions;      // [batch, num_kv_heads, max_positions]
  const int32_t* num_positions;  // [batch, num_kv_heads]
  void* out;                     // [batch, num_q_heads, v_head_dim], io_dtype
  float* maybe_lse;              // [batch, num_q_heads] or null
  void* workspace;               // TlsSparseAttentionWorkspaceBytes (CUDA); ignored by the ref
  DType io_dtype;                // kF32 or kBF16
  int32_t batch, num_q_heads, num_kv_heads, head_dim, v_head_dim, max_blocks_per_seq;
  int32_t max_positions;  // row stride of positions and upper bound of num_positions
  float scale;
};

}  // namespace asynctls::kernels
