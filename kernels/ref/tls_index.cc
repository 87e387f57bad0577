// Reference TLS index ops: channel calibration, block index (key max/min) and INT4 token index.
#include <algorithm>
#include <cmath>
#include <vector>

#include "asynctls/kernels/tls_ref.h"
#include "tls_common.h"

namespace asynctls::kernels::ref {

using tls_internal::LoadAs;
using tls_internal::PoolOffset;

void TlsCalibStats(const TlsCalibStatsParams& p) {
  for (int t = 0; t < p.num_tokens; ++t) {
    for (int h = 0; h < p.num_q_heads; ++h) {
      for (int i = 0; i < p.head_dim; ++i) {
        const float v =
            std::fabs(LoadAs(p.q, p.io_dtype, (int64_t{t} * p.num_q_heads + h) * p.head_dim + i));
        float& m = p.q_absmax[int64_t{h} * p.head_dim + i];
        if (v > m) m = v;
      }
    }
    for (int h = 0; h < p.num_kv_heads; ++h) {
      for (int i = 0; i < p.head_dim; ++i) {
        const float v =
            std::fabs(LoadAs(p.k, p.io_dtype, (int64_t{t} * p.num_kv_heads + h) * p.head_dim + i));
        float& m = p.k_absmax[int64_t{h} * p.head_dim + i];
        if (v > m) m = v;
      }
    }
  }
}

void TlsCalibSelect(const TlsCalibSelectParams& p) {
  ASYNCTLS_TLS_REF_CHECK(p.num_kv_heads > 0 && p.num_q_heads % p.num_kv_heads == 0);
  ASYNCTLS_TLS_REF_CHECK(p.num_channels > 0 && p.num_channels <= p.head_dim);
  const int group = p.num_q_heads / p.num_kv_heads;
  std::vector<float> score(p.head_dim);
  std::vector<uint64_t> keys(p.head_dim);
  for (int g = 0; g < p.num_kv_heads; ++g) {
    for (int i = 0; i < p.head_dim; ++i) {
      float sum = 0.f;
      for (int h = g * group; h < (g + 1) * group; ++h)
        sum += p.q_absmax[int64_t{h} * p.head_dim + i];
      score[i] = sum / static_cast<float>(group) * p.k_absmax[int64_t{g} * p.head_dim + i];
      keys[i] = TlsSelectKey(score[i], i);
      if (p.maybe_channel_scores) p.maybe_channel_scores[int64_t{g} * p.head_dim + i] = score[i];
    }
    std::vector<uint64_t> sorted = keys;
    std::sort(sorted.begin(), sorted.end(), std::greater<uint64_t>());
    const uint64_t threshold = sorted[p.num_channels - 1];
    int n = 0;
    for (int i = 0; i < p.head_dim; ++i) {
      if (keys[i] >= threshold) p.channels[int64_t{g} * p.num_channels + n++] = i;
    }
  }
}

namespace {

// The int8 block index row of every block that positions [begin, end) of sequence b touch,
// rebuilt from all of the block's tokens so far (a new scale re-codes the whole row).
void RebuildInt8BlockRows(const TlsIndexUpdateParams& p, int b, int begin, int end) {
  const Bf16* k_cache = static_cast<const Bf16*>(p.k_cache);
  int8_t* kmax = static_cast<int8_t*>(p.block_kmax);
  int8_t* kmin = static_cast<int8_t*>(p.block_kmin);
  std::vector<float> mx(p.head_dim), mn(p.head_dim);
  for (int logical = begin / kKvBlockSize; logical * kKvBlockSize < end; ++logical) {
    const int64_t pool_block = p.block_table[int64_t{b} * p.max_blocks_per_seq + logical];
    const int64_t row = p.index_table[int64_t{b} * p.max_blocks_per_seq + logical];
    const int tokens = std::min(end - logical * kKvBlockSize, kKvBlockSize);
    for (int g = 0; g < p.num_kv_heads; ++g) {
      float absmax = 0.f;
      for (int t = 0; t < tokens; ++t) {
        const int64_t koff = PoolOffset(pool_block, g, t, p.num_kv_heads, p.head_dim);
        for (int d = 0; d < p.head_dim; ++d) {
          const float v = Bf16ToFloat(k_cache[koff + d]);
          mx[d] = t == 0 ? v : TlsBlockIndexMax(mx[d], v);
          mn[d] = t == 0 ? v : TlsBlockIndexMin(mn[d], v);
          absmax = std::max(absmax, TlsBlockIndexAbs(v));
        }
      }
      const float scale = TlsBlockIndexScale(absmax);
      const int64_t ioff = (row * p.num_kv_heads + g) * p.head_dim;
      for (int d = 0; d < p.head_dim; ++d) {
        kmax[ioff + d] = static_cast<int8_t>(TlsBlockMaxCode(mx[d], scale));
        kmin[ioff + d] = static_cast<int8_t>(TlsBlockMinCode(mn[d], scale));
      }
      p.maybe_block_scales[row * p.num_kv_heads + g] = scale;
    }
  }
}

}  // namespace

void TlsIndexUpdate(const TlsIndexUpdateParams& p) {
  ASYNCTLS_TLS_REF_CHECK(!p.maybe_token_codes ||
                         (p.num_channels % 8 == 0 && p.num_channels <= kTlsMaxChannels &&
                          p.channels != nullptr && p.maybe_token_scales != nullptr));
  const Bf16* k_cache = static_cast<const Bf16*>(p.k_cache);
  const bool int8_rows = p.maybe_block_scales != nullptr;
  Bf16* kmax = static_cast<Bf16*>(p.block_kmax);
  Bf16* kmin = static_cast<Bf16*>(p.block_kmin);
  const int row_bytes = p.num_channels / 2;
  std::vector<float> key(p.head_dim);
  for (int b = 0; b < p.batch; ++b) {
    const int begin = p.start_pos[b], end = p.seq_lens[b];
    if (int8_rows && begin < end) RebuildInt8BlockRows(p, b, begin, end);
    for (int pos = begin; pos < end; ++pos) {
      const int logical = pos / kKvBlockSize, offset = pos % kKvBlockSize;
      const int64_t pool_block = p.block_table[int64_t{b} * p.max_blocks_per_seq + logical];
      const int64_t row = p.index_table[int64_t{b} * p.max_blocks_per_seq + logical];
      // The first token of a block re-initialises its row, later ones merge.
      const bool fresh = offset == 0;
      for (int g = 0; g < p.num_kv_heads; ++g) {
        const int64_t koff = PoolOffset(pool_block, g, offset, p.num_kv_heads, p.head_dim);
        const int64_t ioff = (row * p.num_kv_heads + g) * p.head_dim;
        for (int d = 0; d < p.head_dim; ++d) {
          const float v = Bf16ToFloat(k_cache[koff + d]);
          key[d] = v;
          if (int8_rows) continue;  // rebuilt above
          if (fresh) {
            kmax[ioff + d] = k_cache[koff + d];
            kmin[ioff + d] = k_cache[koff + d];
          } else {
            if (v > Bf16ToFloat(kmax[ioff + d])) kmax[ioff + d] = k_cache[koff + d];
            if (v < Bf16ToFloat(kmin[ioff + d])) kmin[ioff + d] = k_cache[koff + d];
          }
        }
        if (!p.maybe_token_codes) continue;
        const int32_t* channels = p.channels + int64_t{g} * p.num_channels;
        float absmax = 0.f;
        for (int c = 0; c < p.num_channels; ++c)
          absmax = std::max(absmax, std::fabs(key[channels[c]]));
        const float scale = TlsInt4Scale(absmax);
        const int64_t tok = (row * p.num_kv_heads + g) * kKvBlockSize + offset;
        p.maybe_token_scales[tok] = scale;
        uint8_t* codes = p.maybe_token_codes + tok * row_bytes;
        for (int i = 0; i < row_bytes; ++i) {
          const int lo = TlsInt4Code(key[channels[2 * i]], scale) + 8;
          const int hi = TlsInt4Code(key[channels[2 * i + 1]], scale) + 8;
          codes[i] = static_cast<uint8_t>(lo | (hi << 4));
        }
      }
    }
  }
}

}  // namespace asynctls::kernels::ref
