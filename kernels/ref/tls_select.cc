// Reference TLS selection ops: block scores, block top-k, token scores, token top-k, block
// expansion (Quest / dense position lists) and the per-step composition of a TlsPolicy.
#include <algorithm>
#include <cmath>
#include <functional>
#include <vector>

#include "asynctls/kernels/tls_ref.h"
#include "tls_common.h"

namespace asynctls::kernels::ref {

using tls_internal::LoadAs;

namespace {

int32_t SelectLen(const int32_t* maybe_select_lens, const int32_t* seq_lens, int b) {
  return maybe_select_lens ? maybe_select_lens[b] : seq_lens[b];
}

// Indices of the min(k, n) largest keys, in ascending index order.
std::vector<int> TopKAscending(const std::vector<uint64_t>& keys, const std::vector<int>& ids,
                               int k) {
  std::vector<int> order(keys.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = static_cast<int>(i);
  const size_t n = std::min<size_t>(std::max(k, 0), keys.size());
  std::sort(order.begin(), order.end(), [&](int a, int b) { return keys[a] > keys[b]; });
  std::vector<int> out;
  for (size_t i = 0; i < n; ++i) out.push_back(ids[order[i]]);
  std::sort(out.begin(), out.end());
  return out;
}

// Writes sink ++ middle ++ recent into one positions row; returns the count.
int32_t Compose(const TlsGeometry& geo, const std::vector<int>& middle, int32_t* row,
                int32_t max_positions) {
  const int64_t count =
      int64_t{geo.sink_end} + static_cast<int64_t>(middle.size()) + (geo.len - geo.recent_start);
  ASYNCTLS_TLS_REF_CHECK(count <= max_positions);
  int32_t n = 0;
  for (int32_t pos = 0; pos < geo.sink_end; ++pos) row[n++] = pos;
  for (int pos : middle) row[n++] = pos;
  for (int32_t pos = geo.recent_start; pos < geo.len; ++pos) row[n++] = pos;
  return n;
}

}  // namespace

void TlsBlockScore(const TlsBlockScoreParams& p) {
  ASYNCTLS_TLS_REF_CHECK(p.num_kv_heads > 0 && p.num_q_heads % p.num_kv_heads == 0);
  ASYNCTLS_TLS_REF_CHECK(p.head_dim % kTlsBlockScoreSlices == 0);
  const int group = p.num_q_heads / p.num_kv_heads;
  const int width = p.head_dim / kTlsBlockScoreSlices;  // dims per slice
  // The block's bound per dim: bf16 values, or int8 codes (as floats) whose sum the row's
  // scale multiplies once (tls_math.h).
  const bool int8_rows = p.maybe_block_scales != nullptr;
  auto bound = [&](const void* index, int64_t at) {
    return int8_rows ? static_cast<float>(static_cast<const int8_t*>(index)[at])
                     : Bf16ToFloat(static_cast<const Bf16*>(index)[at]);
  };
  std::vector<float> qpos(p.head_dim), qneg(p.head_dim);
  for (int b = 0; b < p.batch; ++b) {
    const int num_blocks = (p.seq_lens[b] + kKvBlockSize - 1) / kKvBlockSize;
    ASYNCTLS_TLS_REF_CHECK(num_blocks <= p.max_blocks_per_seq);
    for (int g = 0; g < p.num_kv_heads; ++g) {
      for (int d = 0; d < p.head_dim; ++d) {
        float pos = 0.f, neg = 0.f;
        for (int h = g * group; h < (g + 1) * group; ++h) {
          const float v =
              LoadAs(p.q, p.io_dtype, (int64_t{b} * p.num_q_heads + h) * p.head_dim + d);
          pos += v > 0.f ? v : 0.f;
          neg += v < 0.f ? v : 0.f;
        }
        qpos[d] = pos;
        qneg[d] = neg;
      }
      for (int i = 0; i < num_blocks; ++i) {
        const int64_t row = p.index_table[int64_t{b} * p.max_blocks_per_seq + i];
        const int64_t off = (row * p.num_kv_heads + g) * p.head_dim;
        float slice[kTlsBlockScoreSlices];
        for (int c = 0; c < kTlsBlockScoreSlices; ++c) {
          float s = 0.f;
          for (int d = c * width; d < (c + 1) * width; ++d) {
            s = TlsFma(qpos[d], bound(p.block_kmax, off + d), s);
            s = TlsFma(qneg[d], bound(p.block_kmin, off + d), s);
          }
          slice[c] = s;
        }
        const float sum = TlsSumBlockSlices(slice);
        p.scores[(int64_t{b} * p.num_kv_heads + g) * p.max_blocks_per_seq + i] =
            int8_rows ? TlsMul(sum, p.maybe_block_scales[row * p.num_kv_heads + g]) : sum;
      }
    }
  }
}

void TlsBlockSelect(const TlsBlockSelectParams& p) {
  ASYNCTLS_TLS_REF_CHECK(p.k >= 0 && p.k <= p.max_kept_blocks);
  for (int b = 0; b < p.batch; ++b) {
    const int end = TlsEligibleEnd(p.seq_lens[b]);
    for (int g = 0; g < p.num_kv_heads; ++g) {
      const float* scores = p.scores + (int64_t{b} * p.num_kv_heads + g) * p.max_blocks_per_seq;
      std::vector<uint64_t> keys;
      std::vector<int> ids;
      for (int i = p.sink_blocks; i < end; ++i) {
        keys.push_back(TlsSelectKey(scores[i], i));
        ids.push_back(i);
      }
      const std::vector<int> kept = TopKAscending(keys, ids, p.k);
      int32_t* row = p.blocks + (int64_t{b} * p.num_kv_heads + g) * p.max_kept_blocks;
      for (size_t i = 0; i < kept.size(); ++i) row[i] = kept[i];
      p.num_blocks[int64_t{b} * p.num_kv_heads + g] = static_cast<int32_t>(kept.size());
    }
  }
}

void TlsTokenScore(const TlsTokenScoreParams& p) {
  ASYNCTLS_TLS_REF_CHECK(p.num_kv_heads > 0 && p.num_q_heads % p.num_kv_heads == 0);
  ASYNCTLS_TLS_REF_CHECK(p.num_channels % 8 == 0 && p.num_channels <= kTlsMaxChannels);
  const int group = p.num_q_heads / p.num_kv_heads;
  const int words_per_row = p.num_channels / 8;
  const float exp_scale = p.scale * kTlsLog2E;
  std::vector<float> qc(int64_t{group} * p.num_channels);  // int8 query codes (as floats)
  std::vector<float> qscale(group);
  std::vector<uint32_t> words(words_per_row);
  for (int b = 0; b < p.batch; ++b) {
    const int32_t len = p.seq_lens[b];
    const int32_t select_len = SelectLen(p.maybe_select_lens, p.seq_lens, b);
    const TlsGeometry geo = MakeTlsGeometry(len, select_len, p.sink_blocks, p.window);
    for (int g = 0; g < p.num_kv_heads; ++g) {
      const int64_t bg = int64_t{b} * p.num_kv_heads + g;
      int num_listed;
      const int32_t* listed = nullptr;
      if (p.maybe_blocks) {
        num_listed = p.maybe_num_blocks[bg];
        listed = p.maybe_blocks + bg * p.max_kept_blocks;
        for (int i = 1; i < num_listed; ++i) ASYNCTLS_TLS_REF_CHECK(listed[i - 1] < listed[i]);
      } else {
        num_listed = std::max(0, geo.first_recent_block - p.sink_blocks);
      }
      ASYNCTLS_TLS_REF_CHECK(int64_t{num_listed} * kKvBlockSize <= p.max_candidates);
      for (int hh = 0; hh < group; ++hh) {
        float* qh = qc.data() + int64_t{hh} * p.num_channels;
        float absmax = 0.f;
        for (int c = 0; c < p.num_channels; ++c) {
          const int ch = p.channels[int64_t{g} * p.num_channels + c];
          qh[c] = LoadAs(p.q, p.io_dtype, (int64_t{b} * p.num_q_heads + g * group + hh) * p.head_dim + ch);
          absmax = std::max(absmax, std::fabs(qh[c]));
        }
        qscale[hh] = TlsInt8Scale(absmax);
        for (int c = 0; c < p.num_channels; ++c) qh[c] = static_cast<float>(TlsInt8Code(qh[c], qscale[hh]));
      }
      int32_t* cand = p.cand_positions + bg * p.max_candidates;
      float* alpha = p.alpha + bg * p.max_candidates;
      std::vector<float> logits;  // [group, candidates]
      std::vector<int> valid;     // candidate slots j in order
      for (int j = 0; j < p.max_candidates; ++j) {
        cand[j] = -1;
        const int i = j / kKvBlockSize;
        if (i >= num_listed) continue;
        const int32_t block = listed ? listed[i] : p.sink_blocks + i;
        const int32_t pos = block * kKvBlockSize + j % kKvBlockSize;
        if (pos < TlsBlockCandBegin(geo, block) || pos >= TlsBlockCandEnd(geo, block)) continue;
        cand[j] = pos;
        valid.push_back(j);
      }
      const size_t n = valid.size();
      logits.assign(n * group, 0.f);
      for (size_t v = 0; v < n; ++v) {
        const int32_t pos = cand[valid[v]];
        const int64_t row = p.index_table[int64_t{b} * p.max_blocks_per_seq + pos / kKvBlockSize];
        const int64_t tok = (row * p.num_kv_heads + g) * kKvBlockSize + pos % kKvBlockSize;
        std::memcpy(words.data(), p.token_codes + tok * (p.num_channels / 2), p.num_channels / 2);
        for (int hh = 0; hh < group; ++hh) {  // scaled dots: the logits before the query scale
          logits[hh * n + v] = TlsTokenScaledDot(
              TlsInt4Dot(qc.data() + int64_t{hh} * p.num_channels, words.data(), p.num_channels),
              p.token_scales[tok]);
        }
      }
      if (n == 0) continue;
      // Chunk-local shifts (tls_math.h): per (chunk, head) c, the exps, their fixed-point sums;
      // then the head's denominator from the sums shifted by c_max - c, and alpha's weights.
      const int chunks = (p.max_candidates + kTlsSoftmaxChunk - 1) / kTlsSoftmaxChunk;
      std::vector<float> exps(n * group), weight(size_t(chunks) * group);
      std::vector<float> chunk_max(chunks), shift_c(chunks);
      std::vector<uint64_t> chunk_sum(chunks);
      for (int hh = 0; hh < group; ++hh) {
        const float a = TlsMul(qscale[hh], exp_scale);
        const float* y = logits.data() + hh * n;
        std::fill(chunk_max.begin(), chunk_max.end(), -INFINITY);
        std::fill(chunk_sum.begin(), chunk_sum.end(), 0u);
        for (size_t v = 0; v < n; ++v) {
          float& m = chunk_max[valid[v] / kTlsSoftmaxChunk];
          m = std::max(m, y[v]);
        }
        float c_max = -INFINITY;
        for (int k = 0; k < chunks; ++k) {  // -inf: no candidate (or only NaN y) in the chunk
          shift_c[k] = TlsChunkShift(chunk_max[k], a);
          c_max = std::max(c_max, shift_c[k]);
        }
        for (size_t v = 0; v < n; ++v) {
          const int k = valid[v] / kTlsSoftmaxChunk;
          const float e = TlsTokenExp(TlsTokenExpArg(y[v], TlsChunkExpShift(a, shift_c[k])));
          exps[hh * n + v] = e;
          chunk_sum[k] += TlsExpToFixed(e);
        }
        uint64_t z = 0;
        for (int k = 0; k < chunks; ++k) z += TlsChunkScaledSum(chunk_sum[k], shift_c[k], c_max);
        const float inv = TlsInvDenominator(z, group);
        for (int k = 0; k < chunks; ++k) {
          weight[size_t(k) * group + hh] = TlsChunkWeight(inv, shift_c[k], c_max);
        }
      }
      for (size_t v = 0; v < n; ++v) {
        const float* w = weight.data() + size_t(valid[v] / kTlsSoftmaxChunk) * group;
        float a = 0.f;  // kTlsAlphaHeadTile-head partial chains, added in tile order
        for (int h0 = 0; h0 < group; h0 += kTlsAlphaHeadTile) {
          float part = 0.f;
          for (int hh = h0; hh < std::min(group, h0 + kTlsAlphaHeadTile); ++hh) {
            part = TlsAlphaTerm(exps[hh * n + v], w[hh], part);
          }
          a = h0 == 0 ? part : TlsAdd(a, part);
        }
        alpha[valid[v]] = a;
      }
    }
  }
}

void TlsTokenSelect(const TlsTokenSelectParams& p) {
  for (int b = 0; b < p.batch; ++b) {
    const TlsGeometry geo = MakeTlsGeometry(
        p.seq_lens[b], SelectLen(p.maybe_select_lens, p.seq_lens, b), p.sink_blocks, p.window);
    for (int g = 0; g < p.num_kv_heads; ++g) {
      const int64_t bg = int64_t{b} * p.num_kv_heads + g;
      const float* alpha = p.alpha + bg * p.max_candidates;
      const int32_t* cand = p.cand_positions + bg * p.max_candidates;
      std::vector<uint64_t> keys;
      std::vector<int> ids;
      for (int j = 0; j < p.max_candidates; ++j) {
        if (cand[j] < 0) continue;
        keys.push_back(TlsSelectKey(alpha[j], cand[j]));
        ids.push_back(cand[j]);
      }
      p.num_positions[bg] = Compose(geo, TopKAscending(keys, ids, p.k),
                                    p.positions + bg * p.max_positions, p.max_positions);
    }
  }
}

void TlsBlockExpand(const TlsBlockExpandParams& p) {
  for (int b = 0; b < p.batch; ++b) {
    const TlsGeometry geo = MakeTlsGeometry(
        p.seq_lens[b], SelectLen(p.maybe_select_lens, p.seq_lens, b), p.sink_blocks, p.window);
    for (int g = 0; g < p.num_kv_heads; ++g) {
      const int64_t bg = int64_t{b} * p.num_kv_heads + g;
      std::vector<int> middle;
      const int num_listed = p.maybe_blocks ? p.maybe_num_blocks[bg]
                                            : std::max(0, geo.first_recent_block - p.sink_blocks);
      for (int i = 0; i < num_listed; ++i) {
        const int32_t block =
            p.maybe_blocks ? p.maybe_blocks[bg * p.max_kept_blocks + i] : p.sink_blocks + i;
        ASYNCTLS_TLS_REF_CHECK(middle.empty() || block * kKvBlockSize > middle.back());
        for (int32_t pos = TlsBlockCandBegin(geo, block); pos < TlsBlockCandEnd(geo, block); ++pos)
          middle.push_back(pos);
      }
      p.num_positions[bg] =
          Compose(geo, middle, p.positions + bg * p.max_positions, p.max_positions);
    }
  }
}

void TlsDecodeSelect(const TlsDecodeSelectParams& p) {
  const TlsPolicy& pol = p.policy;
  ASYNCTLS_TLS_REF_CHECK(p.max_positions >= TlsMaxSelectedTokens(pol, p.max_blocks_per_seq) ||
                         pol.mode == TlsMode::kDense);
  const int64_t rows = int64_t{p.batch} * p.num_kv_heads;
  auto select_blocks = [&](int k) {
    ASYNCTLS_TLS_REF_CHECK(k <= p.max_kept_blocks);
    std::vector<float> scores(rows * p.max_blocks_per_seq, 0.f);
    TlsBlockScore(DecodeBlockScoreParams(p, p.q, scores.data()));
    TlsBlockSelectParams sel{
        scores.data(),        p.seq_lens,        p.blocks, p.num_blocks,   p.batch, p.num_kv_heads,
        p.max_blocks_per_seq, p.max_kept_blocks, k,        pol.sink_blocks};
    TlsBlockSelect(sel);
  };
  auto select_tokens = [&](const int32_t* blocks, const int32_t* num_blocks,
                           const int32_t* select_lens) {
    const int32_t max_candidates =
        kKvBlockSize * (blocks ? p.max_kept_blocks : p.max_blocks_per_seq);
    std::vector<float> alpha(rows * max_candidates);
    std::vector<int32_t> cand(rows * max_candidates);
    TlsTokenScoreParams s{};
    s.q = p.q;
    s.channels = p.channels;
    s.token_codes = p.token_codes;
    s.token_scales = p.token_scales;
    s.index_table = p.index_table;
    s.seq_lens = p.seq_lens;
    s.maybe_select_lens = select_lens;
    s.maybe_blocks = blocks;
    s.maybe_num_blocks = num_blocks;
    s.alpha = alpha.data();
    s.cand_positions = cand.data();
    s.io_dtype = p.io_dtype;
    s.batch = p.batch;
    s.num_q_heads = p.num_q_heads;
    s.num_kv_heads = p.num_kv_heads;
    s.head_dim = p.head_dim;
    s.num_channels = p.num_channels;
    s.max_blocks_per_seq = p.max_blocks_per_seq;
    s.max_kept_blocks = p.max_kept_blocks;
    s.max_candidates = max_candidates;
    s.sink_blocks = pol.sink_blocks;
    s.window = pol.window;
    s.scale = p.scale;
    TlsTokenScore(s);
    TlsTokenSelectParams sel{alpha.data(),   cand.data(),     p.seq_lens,       select_lens,
                             p.positions,    p.num_positions, p.batch,          p.num_kv_heads,
                             max_candidates, p.max_positions, pol.token_budget, pol.sink_blocks,
                             pol.window};
    TlsTokenSelect(sel);
  };
  auto expand = [&](const int32_t* blocks, const int32_t* num_blocks) {
    TlsBlockExpandParams e{
        blocks,          num_blocks,      p.seq_lens,     nullptr,           p.positions,
        p.num_positions, p.batch,         p.num_kv_heads, p.max_kept_blocks, p.max_blocks_per_seq,
        p.max_positions, pol.sink_blocks, pol.window};
    TlsBlockExpand(e);
  };
  switch (pol.mode) {
    case TlsMode::kDense:
      expand(nullptr, nullptr);
      break;
    case TlsMode::kBlockOnly:
      select_blocks(TlsKeptBlocks(pol));
      expand(p.blocks, p.num_blocks);
      break;
    case TlsMode::kTokenOnly:
      select_tokens(nullptr, nullptr, nullptr);
      break;
    case TlsMode::kTwoLevel:
      if (pol.lag == TlsLag::kOneStep) {
        select_tokens(p.prev_blocks, p.prev_num_blocks, p.prev_select_lens);
        select_blocks(pol.block_budget);
      } else {
        select_blocks(pol.block_budget);
        select_tokens(p.blocks, p.num_blocks, nullptr);
      }
      break;
  }
}

}  // namespace asynctls::kernels::ref
