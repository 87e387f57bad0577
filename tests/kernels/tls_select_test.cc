// CPU tests of the TLS reference selection ops against brute-force definitions.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <map>
#include <numeric>
#include <set>
#include <vector>

#include "asynctls/kernels/tls_math.h"
#include "asynctls/kernels/tls_ref.h"
#include "kernels/tls_test_util.h"

namespace asynctls::kernels {
namespace {

using testing::MakePolicy;
using testing::MakeTlsCase;
using testing::TlsCase;
using testing::TlsSelectBuffers;

std::vector<float> BlockScores(const TlsCase& c) {
  std::vector<float> scores(size_t(c.batch) * c.num_kv_heads * c.max_blocks_per_seq(), NAN);
  ref::TlsBlockScore({c.q.data(), c.kmax.data(), c.kmin.data(), c.index_table.data(),
                      c.kv.seq_lens.data(), scores.data(), c.q.dtype, c.batch, c.num_q_heads,
                      c.num_kv_heads, c.head_dim, c.max_blocks_per_seq()});
  return scores;
}

TEST(TlsBlockScoreTest, EqualsQuestBoundAndBoundsTrueScores) {
  testing::Reseed(21);
  const TlsCase c = MakeTlsCase({1, 64, 65, 300}, 8, 2, 64, 32, DType::kBF16);
  const std::vector<float> scores = BlockScores(c);
  const int G = c.group();
  for (int b = 0; b < c.batch; ++b) {
    const int len = c.seq_lens()[b];
    for (int g = 0; g < c.num_kv_heads; ++g) {
      const std::vector<float> k = c.kv.Dense(c.kv.k, b, g);
      for (int blk = 0; blk * 64 < len; ++blk) {
        const size_t off =
            (size_t(c.index_table[b * c.max_blocks_per_seq() + blk]) * c.num_kv_heads + g) *
            c.head_dim;
        double quest = 0, scale_sum = 0;
        for (int h = g * G; h < (g + 1) * G; ++h) {
          for (int d = 0; d < c.head_dim; ++d) {
            const double q = c.q.values[(size_t(b) * c.num_q_heads + h) * c.head_dim + d];
            const double a = q * Bf16ToFloat(c.kmax[off + d]), e = q * Bf16ToFloat(c.kmin[off + d]);
            quest += std::max(a, e);
            scale_sum += std::fabs(a) + std::fabs(e);
          }
        }
        const float s = scores[(size_t(b) * c.num_kv_heads + g) * c.max_blocks_per_seq() + blk];
        ASSERT_NEAR(s, quest, 1e-5 * scale_sum) << "b=" << b << " blk=" << blk;
        // Upper bound of sum_h q_h . k_t for every token of the block.
        for (int t = blk * 64; t < std::min(len, blk * 64 + 64); ++t) {
          double dot = 0;
          for (int h = g * G; h < (g + 1) * G; ++h) {
            for (int d = 0; d < c.head_dim; ++d) {
              dot += c.q.values[(size_t(b) * c.num_q_heads + h) * c.head_dim + d] *
                     k[size_t(t) * c.head_dim + d];
            }
          }
          ASSERT_LE(dot, s + 1e-5 * scale_sum);
        }
      }
    }
  }
}

// The int8 block index (tls_params.h): each score is the row's scale times the codes' bound,
// and never below the bf16 index's bound (codes round outward; both in exact arithmetic here).
TEST(TlsBlockScoreTest, Int8ScoresAreScaledCodeBoundsAboveBf16) {
  testing::Reseed(22);
  for (const bool mla : {false, true}) {
    const TlsCase c = mla ? MakeTlsCase({97, 300}, 16, 1, 576, 128, DType::kBF16, true)
                          : MakeTlsCase({1, 64, 65, 300}, 8, 2, 64, 32, DType::kBF16);
    const testing::Int8BlockIndex x = testing::MakeInt8BlockIndex(c);
    std::vector<float> scores(size_t(c.batch) * c.num_kv_heads * c.max_blocks_per_seq(), NAN);
    TlsBlockScoreParams p{
        c.q.data(),           x.kmax.data(),  x.kmin.data(), c.index_table.data(),
        c.kv.seq_lens.data(), scores.data(),  c.q.dtype,     c.batch,
        c.num_q_heads,        c.num_kv_heads, c.head_dim,    c.max_blocks_per_seq(),
        x.scales.data()};
    ref::TlsBlockScore(p);
    const int G = c.group();
    for (int b = 0; b < c.batch; ++b) {
      for (int g = 0; g < c.num_kv_heads; ++g) {
        std::vector<double> qpos(c.head_dim, 0.0), qneg(c.head_dim, 0.0);
        for (int h = g * G; h < (g + 1) * G; ++h) {
          for (int d = 0; d < c.head_dim; ++d) {
            const double q = c.q.values[(size_t(b) * c.num_q_heads + h) * c.head_dim + d];
            (q > 0 ? qpos : qneg)[d] += q;
          }
        }
        for (int blk = 0; blk * 64 < c.seq_lens()[b]; ++blk) {
          const size_t row = size_t(c.index_table[b * c.max_blocks_per_seq() + blk]);
          const size_t off = (row * c.num_kv_heads + g) * c.head_dim;
          const double scale = x.scales[row * c.num_kv_heads + g];
          double codes = 0, bf16 = 0, magnitude = 0;
          for (int d = 0; d < c.head_dim; ++d) {
            codes += qpos[d] * x.kmax[off + d] + qneg[d] * x.kmin[off + d];
            bf16 += qpos[d] * Bf16ToFloat(c.kmax[off + d]) + qneg[d] * Bf16ToFloat(c.kmin[off + d]);
            magnitude += (qpos[d] - qneg[d]) * 127.0 * scale;
          }
          const float s = scores[(size_t(b) * c.num_kv_heads + g) * c.max_blocks_per_seq() + blk];
          ASSERT_NEAR(s, codes * scale, 1e-5 * magnitude)
              << "mla " << mla << " b=" << b << " blk=" << blk;
          ASSERT_GE(codes * scale, bf16 - 1e-9 * magnitude) << "mla " << mla << " b=" << b;
        }
      }
    }
  }
}

// The spec's order (tls_math.h): the group's heads summed in order into qpos / qneg, eight
// slice chains of head_dim / 8 dims (kmax term, then kmin term, per dim), slices added as the
// fixed tree. The GPU kernels reproduce exactly this; any other order differs in the last bits.
TEST(TlsBlockScoreTest, SlicedChainsInTheSpecOrderBitForBit) {
  testing::Reseed(22);
  for (const int head_dim : {64, 96, 576}) {
    const int nq = head_dim == 576 ? 16 : 8, nkv = head_dim == 576 ? 1 : 2;
    const TlsCase c = MakeTlsCase({200, 700}, nq, nkv, head_dim, 32, DType::kF32);
    const std::vector<float> scores = BlockScores(c);
    const int G = c.group(), width = head_dim / kTlsBlockScoreSlices;
    for (int b = 0; b < c.batch; ++b) {
      for (int g = 0; g < c.num_kv_heads; ++g) {
        std::vector<float> qpos(head_dim, 0.f), qneg(head_dim, 0.f);
        for (int h = g * G; h < (g + 1) * G; ++h) {
          for (int d = 0; d < head_dim; ++d) {
            const float v = c.q.values[(size_t(b) * c.num_q_heads + h) * head_dim + d];
            qpos[d] += v > 0.f ? v : 0.f;
            qneg[d] += v < 0.f ? v : 0.f;
          }
        }
        for (int blk = 0; blk * 64 < c.seq_lens()[b]; ++blk) {
          const size_t off =
              (size_t(c.index_table[b * c.max_blocks_per_seq() + blk]) * c.num_kv_heads + g) *
              head_dim;
          float slice[kTlsBlockScoreSlices];
          for (int k = 0; k < kTlsBlockScoreSlices; ++k) {
            float acc = 0.f;
            for (int d = k * width; d < (k + 1) * width; ++d) {
              acc = std::fma(qpos[d], Bf16ToFloat(c.kmax[off + d]), acc);
              acc = std::fma(qneg[d], Bf16ToFloat(c.kmin[off + d]), acc);
            }
            slice[k] = acc;
          }
          const float want = ((slice[0] + slice[1]) + (slice[2] + slice[3])) +
                             ((slice[4] + slice[5]) + (slice[6] + slice[7]));
          const float got = scores[(size_t(b) * c.num_kv_heads + g) * c.max_blocks_per_seq() + blk];
          ASSERT_EQ(FloatToBits(got), FloatToBits(want))
              << "head_dim " << head_dim << " b " << b << " g " << g << " blk " << blk;
        }
      }
    }
  }
}

TEST(TlsBlockSelectTest, TopKWithTiesSinkAndOpenBlockExcluded) {
  // One sequence of 10 blocks (len 601: last block 9 is open), 1 kv head.
  const int mbps = 12;
  std::vector<float> scores(mbps, 0.f);
  const float vals[10] = {100, 3, 5, 5, 1, 5, 2, 0, 5, 100};
  std::copy(vals, vals + 10, scores.begin());
  std::vector<int32_t> lens = {601}, blocks(4, -1), num(1, -1);
  ref::TlsBlockSelect({scores.data(), lens.data(), blocks.data(), num.data(), 1, 1, mbps, 4, 3, 1});
  EXPECT_EQ(num[0], 3);
  // 5s at blocks 2, 3, 5, 8: ties go to the lower ids.
  EXPECT_EQ(std::vector<int32_t>(blocks.begin(), blocks.begin() + 3),
            (std::vector<int32_t>{2, 3, 5}));
  // k larger than the eligible set (blocks 1..8): all of them.
  std::vector<int32_t> all(12, -1);
  ref::TlsBlockSelect({scores.data(), lens.data(), all.data(), num.data(), 1, 1, mbps, 12, 12, 1});
  EXPECT_EQ(num[0], 8);
  for (int i = 0; i < 8; ++i) EXPECT_EQ(all[i], i + 1);
  // Short sequences: nothing eligible.
  std::vector<int32_t> short_lens = {128};
  ref::TlsBlockSelect(
      {scores.data(), short_lens.data(), all.data(), num.data(), 1, 1, mbps, 12, 4, 1});
  EXPECT_EQ(num[0], 0);
}

TEST(TlsGeometryTest, AlwaysKeptRanges) {
  // Same step, len 300: sink [0,64), recent from min(256, 300-64=236) = 236.
  TlsGeometry g = MakeTlsGeometry(300, 300, 1, 64);
  EXPECT_EQ(g.sink_end, 64);
  EXPECT_EQ(g.recent_start, 236);
  EXPECT_EQ(g.first_recent_block, 4);
  // One-step lag across a block boundary: M chosen at 256 tokens (block 3 open), now 257.
  g = MakeTlsGeometry(257, 256, 1, 0);
  EXPECT_EQ(g.first_recent_block, 3);
  EXPECT_EQ(g.recent_start, 192);
  // Tiny sequences: everything is sink.
  g = MakeTlsGeometry(5, 5, 1, 64);
  EXPECT_EQ(g.sink_end, 5);
  EXPECT_EQ(g.recent_start, 5);
  g = MakeTlsGeometry(1, 1, 2, 0);
  EXPECT_EQ(g.sink_end, 1);
  EXPECT_EQ(g.recent_start, 1);
}

struct TokenScoreOut {
  std::vector<float> alpha;
  std::vector<int32_t> cand;
  int max_candidates;
};

TokenScoreOut TokenScores(const TlsCase& c, const int32_t* blocks, const int32_t* num_blocks,
                          int max_kept, const int32_t* select_lens, int window) {
  TokenScoreOut o;
  o.max_candidates = 64 * (blocks ? max_kept : c.max_blocks_per_seq());
  const size_t rows = size_t(c.batch) * c.num_kv_heads;
  o.alpha.assign(rows * o.max_candidates, NAN);
  o.cand.assign(rows * o.max_candidates, -7);
  TlsTokenScoreParams p{};
  p.q = c.q.data();
  p.channels = c.channels.data();
  p.token_codes = c.codes.data();
  p.token_scales = c.scales.data();
  p.index_table = c.index_table.data();
  p.seq_lens = c.kv.seq_lens.data();
  p.maybe_select_lens = select_lens;
  p.maybe_blocks = blocks;
  p.maybe_num_blocks = num_blocks;
  p.alpha = o.alpha.data();
  p.cand_positions = o.cand.data();
  p.io_dtype = c.q.dtype;
  p.batch = c.batch;
  p.num_q_heads = c.num_q_heads;
  p.num_kv_heads = c.num_kv_heads;
  p.head_dim = c.head_dim;
  p.num_channels = c.num_channels;
  p.max_blocks_per_seq = c.max_blocks_per_seq();
  p.max_kept_blocks = max_kept;
  p.max_candidates = o.max_candidates;
  p.sink_blocks = 1;
  p.window = window;
  p.scale = 1.f / std::sqrt(float(c.head_dim));
  ref::TlsTokenScore(p);
  return o;
}

TEST(TlsTokenScoreTest, MeanOfPerHeadSoftmaxOverAllTokens) {
  testing::Reseed(31);
  const TlsCase c = MakeTlsCase({40, 200, 333}, 6, 2, 64, 32, DType::kF32);
  const int window = 30;
  const TokenScoreOut o = TokenScores(c, nullptr, nullptr, 0, nullptr, window);
  const int G = c.group();
  for (int b = 0; b < c.batch; ++b) {
    const int len = c.seq_lens()[b];
    const TlsGeometry geo = MakeTlsGeometry(len, len, 1, window);
    for (int g = 0; g < c.num_kv_heads; ++g) {
      const size_t row = (size_t(b) * c.num_kv_heads + g) * o.max_candidates;
      std::vector<int> cands;
      for (int j = 0; j < o.max_candidates; ++j) {
        const int pos = o.cand[row + j];
        if (pos < 0) continue;
        ASSERT_EQ(pos, 64 + j);  // token-only: blocks 1, 2, ... in order
        ASSERT_GE(pos, geo.sink_end);
        ASSERT_LT(pos, geo.recent_start);
        cands.push_back(pos);
      }
      ASSERT_EQ(int(cands.size()), std::max(0, geo.recent_start - 64));
      if (cands.empty()) continue;
      // Double-precision definition with dequantized keys and the int8 query codes of each
      // head's channel set (tls_math.h: integer token logits).
      std::vector<double> alpha(cands.size(), 0.0);
      for (int h = g * G; h < (g + 1) * G; ++h) {
        const float* qh = c.q.values.data() + (size_t(b) * c.num_q_heads + h) * c.head_dim;
        float absmax = 0.f;
        for (int ch = 0; ch < c.num_channels; ++ch) {
          absmax = std::max(absmax, std::fabs(qh[c.channels[g * c.num_channels + ch]]));
        }
        const float qscale = TlsInt8Scale(absmax);
        std::vector<double> logit(cands.size());
        for (size_t v = 0; v < cands.size(); ++v) {
          const int pos = cands[v];
          const size_t tok =
              (size_t(c.index_table[b * c.max_blocks_per_seq() + pos / 64]) * c.num_kv_heads + g) *
                  64 +
              pos % 64;
          double dot = 0;
          for (int ch = 0; ch < c.num_channels; ++ch) {
            const uint8_t byte = c.codes[tok * (c.num_channels / 2) + ch / 2];
            const int code = (ch % 2 ? byte >> 4 : byte & 15) - 8;
            const int qcode = TlsInt8Code(qh[c.channels[g * c.num_channels + ch]], qscale);
            dot += double(qcode) * qscale * code * c.scales[tok];
          }
          logit[v] = dot / std::sqrt(double(c.head_dim));
        }
        const double m = *std::max_element(logit.begin(), logit.end());
        double z = 0;
        for (double l : logit) z += std::exp(l - m);
        for (size_t v = 0; v < cands.size(); ++v) alpha[v] += std::exp(logit[v] - m) / z / G;
      }
      double sum = 0;
      for (size_t v = 0; v < cands.size(); ++v) {
        const float a = o.alpha[row + (cands[v] - 64)];
        // Each head's exp enters alpha rounded to bf16 (TlsAlphaTerm: relative 2^-9).
        ASSERT_NEAR(a, alpha[v], 2e-6 + 0x1p-8 * alpha[v]) << "b=" << b << " pos=" << cands[v];
        sum += a;
      }
      EXPECT_NEAR(sum, 1.0, 0x1p-9);
    }
  }
}

// The spec's summation order of alpha (tls_math.h): 16-head fma chains, added in tile order.
// G = 40 gives tiles of 16, 16 and 8 heads; the logits, chunk shifts, exps and weights are
// rebuilt from the same primitives, so only the order of the head sum can differ.
TEST(TlsTokenScoreTest, AlphaSumsHeadTilesInSpecOrderBitForBit) {
  testing::Reseed(33);
  const TlsCase c = MakeTlsCase({300, 1000}, 40, 1, 64, 32, DType::kF32);
  const int window = 64;
  const TokenScoreOut o = TokenScores(c, nullptr, nullptr, 0, nullptr, window);
  const int G = c.group(), nc = c.num_channels;
  const float exp_scale = (1.f / std::sqrt(float(c.head_dim))) * kTlsLog2E;
  for (int b = 0; b < c.batch; ++b) {
    std::vector<float> qcode(size_t(G) * nc), qscale(G);
    for (int h = 0; h < G; ++h) {
      const float* qh = c.q.values.data() + (size_t(b) * c.num_q_heads + h) * c.head_dim;
      float absmax = 0.f;
      for (int ch = 0; ch < nc; ++ch) absmax = std::max(absmax, std::fabs(qh[c.channels[ch]]));
      qscale[h] = TlsInt8Scale(absmax);
      for (int ch = 0; ch < nc; ++ch) {
        qcode[size_t(h) * nc + ch] = float(TlsInt8Code(qh[c.channels[ch]], qscale[h]));
      }
    }
    const size_t row = size_t(b) * o.max_candidates;
    std::vector<int> slots;
    for (int j = 0; j < o.max_candidates; ++j) {
      if (o.cand[row + j] >= 0) slots.push_back(j);
    }
    ASSERT_FALSE(slots.empty());
    std::vector<float> logit(size_t(G) * slots.size());
    for (size_t v = 0; v < slots.size(); ++v) {
      const int pos = o.cand[row + slots[v]];
      const size_t tok =
          size_t(c.index_table[b * c.max_blocks_per_seq() + pos / 64]) * 64 + pos % 64;
      std::vector<uint32_t> words(nc / 8);
      std::memcpy(words.data(), c.codes.data() + tok * (nc / 2), nc / 2);
      for (int h = 0; h < G; ++h) {
        logit[h * slots.size() + v] = TlsTokenScaledDot(
            TlsInt4Dot(qcode.data() + size_t(h) * nc, words.data(), nc), c.scales[tok]);
      }
    }
    // Chunk-local shifts (tls_math.h): slot j's chunk is j / 32.
    std::vector<float> e(logit.size()), w(logit.size());
    for (int h = 0; h < G; ++h) {
      const float* l = logit.data() + h * slots.size();
      const float a = qscale[h] * exp_scale;
      std::map<int, float> chunk_max;
      for (size_t v = 0; v < slots.size(); ++v) {
        auto [it, fresh] = chunk_max.try_emplace(slots[v] / 32, l[v]);
        if (!fresh) it->second = std::max(it->second, l[v]);
      }
      std::map<int, float> shift;  // c per chunk
      float c_max = -INFINITY;
      for (const auto& [k, m] : chunk_max) {
        shift[k] = TlsChunkShift(m, a);
        c_max = std::max(c_max, shift[k]);
      }
      std::map<int, uint64_t> chunk_sum;
      for (size_t v = 0; v < slots.size(); ++v) {
        const int k = slots[v] / 32;
        e[h * slots.size() + v] = TlsTokenExp(TlsTokenExpArg(l[v], TlsChunkExpShift(a, shift[k])));
        chunk_sum[k] += TlsExpToFixed(e[h * slots.size() + v]);
      }
      uint64_t z = 0;
      for (const auto& [k, sum] : chunk_sum) z += TlsChunkScaledSum(sum, shift[k], c_max);
      const float inv = TlsInvDenominator(z, G);
      for (size_t v = 0; v < slots.size(); ++v) {
        w[h * slots.size() + v] = TlsChunkWeight(inv, shift[slots[v] / 32], c_max);
      }
    }
    for (size_t v = 0; v < slots.size(); ++v) {
      float tile[3] = {0.f, 0.f, 0.f};
      for (int h = 0; h < G; ++h) {
        const size_t i = h * slots.size() + v;
        tile[h / 16] = std::fma(e[i], w[i], tile[h / 16]);
      }
      const float want = (tile[0] + tile[1]) + tile[2];
      ASSERT_EQ(FloatToBits(o.alpha[row + slots[v]]), FloatToBits(want)) << "b " << b << " v " << v;
    }
  }
}

TEST(TlsTokenSelectTest, ComposesSinkTopKRecentWithTies) {
  // len 400, window 10, same step: sink [0,64), recent [min(384, 390)=384, 400).
  const int max_candidates = 64 * 2;
  std::vector<float> alpha(max_candidates, 0.f);
  std::vector<int32_t> cand(max_candidates, -1);
  // Candidates: block 2 (128..191) and block 5 (320..383).
  for (int o = 0; o < 64; ++o) {
    cand[o] = 128 + o;
    cand[64 + o] = 320 + o;
    alpha[o] = 0.1f;
    alpha[64 + o] = 0.1f;
  }
  alpha[64 + 7] = 0.9f;  // 327
  alpha[3] = 0.5f;       // 131
  std::vector<int32_t> lens = {400}, positions(200, -7), num(1);
  ref::TlsTokenSelect({alpha.data(), cand.data(), lens.data(), nullptr, positions.data(),
                       num.data(), 1, 1, max_candidates, 200, 4, 1, 10});
  std::vector<int32_t> want(64);
  std::iota(want.begin(), want.end(), 0);
  for (int p : {128, 129, 131, 327}) want.push_back(p);  // ties at 0.1: lowest positions
  for (int p = 384; p < 400; ++p) want.push_back(p);
  ASSERT_EQ(num[0], int(want.size()));
  EXPECT_EQ(std::vector<int32_t>(positions.begin(), positions.begin() + num[0]), want);
}

TEST(TlsBlockExpandTest, QuestAndDensePositionLists) {
  std::vector<int32_t> lens = {300, 20}, blocks = {1, 3, 0, 0}, num = {2, 0};
  std::vector<int32_t> positions(2 * 400, -7), count(2);
  ref::TlsBlockExpand({blocks.data(), num.data(), lens.data(), nullptr, positions.data(),
                       count.data(), 2, 1, 2, 5, 400, 1, 64});
  // len 300: sink 0..63, block 1 (64..127), block 3 (192..235: recent starts at 236), recent.
  std::vector<int32_t> want;
  for (int p = 0; p < 128; ++p) want.push_back(p);
  for (int p = 192; p < 300; ++p) want.push_back(p);
  ASSERT_EQ(count[0], int(want.size()));
  EXPECT_EQ(std::vector<int32_t>(positions.begin(), positions.begin() + count[0]), want);
  ASSERT_EQ(count[1], 20);
  // Dense: every position.
  ref::TlsBlockExpand({nullptr, nullptr, lens.data(), nullptr, positions.data(), count.data(), 2, 1,
                       0, 5, 400, 1, 64});
  ASSERT_EQ(count[0], 300);
  for (int p = 0; p < 300; ++p) ASSERT_EQ(positions[p], p);
  ASSERT_EQ(count[1], 20);
  for (int p = 0; p < 20; ++p) ASSERT_EQ(positions[400 + p], p);
}

void ExpectSortedUnique(const std::vector<int32_t>& row, int len) {
  for (size_t i = 0; i < row.size(); ++i) {
    ASSERT_GE(row[i], 0);
    ASSERT_LT(row[i], len);
    if (i) ASSERT_LT(row[i - 1], row[i]);
  }
}

TEST(TlsDecodeSelectTest, ModesAndBudgets) {
  testing::Reseed(41);
  const TlsCase c = MakeTlsCase({1, 63, 64, 700, 1500}, 8, 2, 128, 32, DType::kBF16);
  for (TlsMode mode :
       {TlsMode::kDense, TlsMode::kBlockOnly, TlsMode::kTokenOnly, TlsMode::kTwoLevel}) {
    SCOPED_TRACE(int(mode));
    TlsSelectBuffers buf;
    const TlsPolicy pol = MakePolicy(mode, TlsLag::kSameStep, 6, 128, 1, 32);
    TlsDecodeSelectParams p = testing::MakeDecodeSelectParams(c, pol, buf);
    ref::TlsDecodeSelect(p);
    const auto rows = testing::Rows(buf.positions, buf.num_positions, buf.max_positions);
    for (int b = 0; b < c.batch; ++b) {
      const int len = c.seq_lens()[b];
      const TlsGeometry geo = MakeTlsGeometry(len, len, 1, 32);
      for (int g = 0; g < c.num_kv_heads; ++g) {
        const auto& row = rows[b * c.num_kv_heads + g];
        ExpectSortedUnique(row, len);
        const int always = geo.sink_end + (len - geo.recent_start);
        const int cands = geo.recent_start - geo.sink_end;
        switch (mode) {
          case TlsMode::kDense:
            EXPECT_EQ(int(row.size()), len);
            break;
          case TlsMode::kBlockOnly:
            EXPECT_LE(int(row.size()), always + 128);
            break;
          case TlsMode::kTokenOnly:
            EXPECT_EQ(int(row.size()), always + std::min(128, cands));
            break;
          case TlsMode::kTwoLevel: {
            const int kept = buf.num_blocks[b * c.num_kv_heads + g];
            EXPECT_EQ(kept, std::min(6, std::max(0, TlsEligibleEnd(len) - 1)));
            int in_blocks = 0;
            for (int i = 0; i < kept; ++i) {
              const int blk = buf.blocks[(b * c.num_kv_heads + g) * buf.max_kept_blocks + i];
              in_blocks += std::max(0, TlsBlockCandEnd(geo, blk) - TlsBlockCandBegin(geo, blk));
            }
            EXPECT_EQ(int(row.size()), always + std::min(128, in_blocks));
            // Every non-always position lies in a kept block.
            for (int pos : row) {
              if (pos < geo.sink_end || pos >= geo.recent_start) continue;
              bool found = false;
              for (int i = 0; i < kept; ++i) {
                found |= buf.blocks[(b * c.num_kv_heads + g) * buf.max_kept_blocks + i] == pos / 64;
              }
              EXPECT_TRUE(found) << pos;
            }
            break;
          }
        }
      }
    }
  }
}

// The one-step-lag variant selects tokens from the previous step's blocks and returns this
// step's blocks; with prev = this step's blocks it equals the same-step variant.
TEST(TlsDecodeSelectTest, OneStepLagUsesPreviousBlocks) {
  testing::Reseed(42);
  const TlsCase c = MakeTlsCase({900, 1200}, 4, 1, 64, 16, DType::kF32);
  TlsSelectBuffers same;
  const TlsPolicy pol_same = MakePolicy(TlsMode::kTwoLevel, TlsLag::kSameStep, 5, 96);
  ref::TlsDecodeSelect(testing::MakeDecodeSelectParams(c, pol_same, same));

  TlsSelectBuffers lag;
  lag.prev_blocks = same.blocks;
  lag.prev_num_blocks = same.num_blocks;
  lag.prev_select_lens = c.seq_lens();
  const TlsPolicy pol_lag = MakePolicy(TlsMode::kTwoLevel, TlsLag::kOneStep, 5, 96);
  ref::TlsDecodeSelect(testing::MakeDecodeSelectParams(c, pol_lag, lag));
  EXPECT_EQ(lag.blocks, same.blocks);
  EXPECT_EQ(testing::Rows(lag.positions, lag.num_positions, lag.max_positions),
            testing::Rows(same.positions, same.num_positions, same.max_positions));

  // Different previous blocks: the candidates come from them.
  TlsSelectBuffers lag2;
  lag2.prev_blocks.assign(same.blocks.size(), 0);
  lag2.prev_num_blocks = {1, 1};
  lag2.prev_blocks[0] = 2;
  lag2.prev_blocks[lag2.prev_blocks.size() / 2] = 7;
  lag2.prev_select_lens = {899, 1199};
  ref::TlsDecodeSelect(testing::MakeDecodeSelectParams(c, pol_lag, lag2));
  EXPECT_EQ(lag2.blocks, same.blocks);
  const auto rows = testing::Rows(lag2.positions, lag2.num_positions, lag2.max_positions);
  for (int b = 0; b < 2; ++b) {
    const TlsGeometry geo = MakeTlsGeometry(c.seq_lens()[b], lag2.prev_select_lens[b], 1, 64);
    int middle = 0;
    for (int pos : rows[b]) {
      if (pos < geo.sink_end || pos >= geo.recent_start) continue;
      EXPECT_EQ(pos / 64, b == 0 ? 2 : 7);
      ++middle;
    }
    EXPECT_EQ(middle, 64);
  }
}

// Structured data: a needle token whose key matches the query is selected by every sparse mode.
TEST(TlsDecodeSelectTest, NeedleIsSelected) {
  testing::Reseed(43);
  TlsCase c = MakeTlsCase({2000}, 4, 1, 64, 32, DType::kF32);
  const int needle = 1234;
  // Needle key = 4 * sum of the queries (direction of every head), then rebuild the index.
  const size_t off = c.kv.Offset(0, needle, 0);
  for (int d = 0; d < 64; ++d) {
    float s = 0;
    for (int h = 0; h < 4; ++h) s += c.q.values[h * 64 + d];
    c.kv.k[off + d] = FloatToBf16(2.f * s);
  }
  std::vector<int32_t> start = {0};
  TlsIndexUpdateParams u{c.kv.k.data(),
                         c.kv.block_table.data(),
                         c.index_table.data(),
                         start.data(),
                         c.kv.seq_lens.data(),
                         c.kmax.data(),
                         c.kmin.data(),
                         c.channels.data(),
                         c.codes.data(),
                         c.scales.data(),
                         1,
                         1,
                         64,
                         32,
                         c.max_blocks_per_seq(),
                         2000};
  ref::TlsIndexUpdate(u);
  for (TlsMode mode : {TlsMode::kBlockOnly, TlsMode::kTokenOnly, TlsMode::kTwoLevel}) {
    TlsSelectBuffers buf;
    ref::TlsDecodeSelect(
        testing::MakeDecodeSelectParams(c, MakePolicy(mode, TlsLag::kSameStep, 4, 64), buf));
    const auto row = testing::Rows(buf.positions, buf.num_positions, buf.max_positions)[0];
    EXPECT_TRUE(std::binary_search(row.begin(), row.end(), needle)) << int(mode);
  }
}

}  // namespace
}  // namespace asynctls::kernels
