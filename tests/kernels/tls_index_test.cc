// CPU tests of the TLS reference index ops: calibration, block index, INT4 token index.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <random>
#include <vector>

#include "asynctls/kernels/tls_math.h"
#include "asynctls/kernels/tls_ref.h"
#include "kernels/tls_test_util.h"

namespace asynctls::kernels {
namespace {

using testing::MakeTlsCase;
using testing::TlsCase;

TEST(TlsCalibTest, StatsAccumulateAbsMax) {
  // 2 tokens, 2 q heads, 1 kv head, dim 3.
  const std::vector<float> q = {1, -5, 2, 0, 3, -1, /*t1*/ -2, 1, 0, 4, -4, 0.5f};
  const std::vector<float> k = {0.5f, -1, 2, /*t1*/ -3, 0, 1};
  std::vector<float> qa(6, 0.f), ka(3, 0.f);
  ref::TlsCalibStats({q.data(), k.data(), qa.data(), ka.data(), DType::kF32, 2, 2, 1, 3});
  EXPECT_EQ(qa, (std::vector<float>{2, 5, 2, 4, 4, 1}));
  EXPECT_EQ(ka, (std::vector<float>{3, 1, 2}));
  const std::vector<float> q2(6, 10.f), k2 = {0, 0, -7};
  ref::TlsCalibStats({q2.data(), k2.data(), qa.data(), ka.data(), DType::kF32, 1, 2, 1, 3});
  EXPECT_EQ(qa, std::vector<float>(6, 10.f));
  EXPECT_EQ(ka, (std::vector<float>{3, 1, 7}));
}

TEST(TlsCalibTest, SelectTopChannelsTiesToLowerChannel) {
  // 2 kv heads, group 2, dim 6, pick 2.
  const std::vector<float> qa = {1,        1, 1, 1, 1, 1, /*h1*/ 3, 1, 1, 1, 1, 1,
                                 /*h2*/ 1, 1, 1, 1, 1, 1, /*h3*/ 1, 1, 1, 1, 1, 1};
  const std::vector<float> ka = {1, 2, 2, 0, 2, 0.5f, /*g1*/ 0, 0, 0, 5, 0, 5};
  std::vector<int32_t> channels(4, -1);
  std::vector<float> scores(12);
  ref::TlsCalibSelect({qa.data(), ka.data(), channels.data(), scores.data(), 4, 2, 6, 2});
  // g0 scores: ch0 = (1+3)/2*1 = 2, ch1 = 2, ch2 = 2, ch4 = 2: ties -> channels 0 and 1.
  EXPECT_FLOAT_EQ(scores[0], 2.f);
  EXPECT_FLOAT_EQ(scores[1], 2.f);
  EXPECT_EQ(channels[0], 0);
  EXPECT_EQ(channels[1], 1);
  EXPECT_EQ(channels[2], 3);
  EXPECT_EQ(channels[3], 5);
}

// Brute force over the cache: block max/min and INT4 rows.
void ExpectIndexMatchesCache(const TlsCase& c) {
  const int rb = c.num_channels / 2;
  for (int b = 0; b < c.batch; ++b) {
    const int len = c.seq_lens()[b];
    for (int g = 0; g < c.num_kv_heads; ++g) {
      const std::vector<float> k = c.kv.Dense(c.kv.k, b, g);
      for (int blk = 0; blk * kKvBlockSize < len; ++blk) {
        const int64_t row = c.index_table[size_t(b) * c.max_blocks_per_seq() + blk];
        const size_t off = (size_t(row) * c.num_kv_heads + g) * c.head_dim;
        for (int d = 0; d < c.head_dim; ++d) {
          float mx = -INFINITY, mn = INFINITY;
          for (int t = blk * kKvBlockSize; t < std::min(len, (blk + 1) * kKvBlockSize); ++t) {
            mx = std::max(mx, k[size_t(t) * c.head_dim + d]);
            mn = std::min(mn, k[size_t(t) * c.head_dim + d]);
          }
          ASSERT_EQ(Bf16ToFloat(c.kmax[off + d]), mx) << "b=" << b << " blk=" << blk << " d=" << d;
          ASSERT_EQ(Bf16ToFloat(c.kmin[off + d]), mn);
        }
      }
      for (int t = 0; t < len; ++t) {
        const int64_t row = c.index_table[size_t(b) * c.max_blocks_per_seq() + t / kKvBlockSize];
        const size_t tok = (size_t(row) * c.num_kv_heads + g) * kKvBlockSize + t % kKvBlockSize;
        const float scale = c.scales[tok];
        float absmax = 0.f;
        for (int ch = 0; ch < c.num_channels; ++ch) {
          absmax = std::max(
              absmax,
              std::fabs(k[size_t(t) * c.head_dim + c.channels[size_t(g) * c.num_channels + ch]]));
        }
        ASSERT_EQ(scale, TlsInt4Scale(absmax));  // absmax / 7 to 22 significant bits
        for (int ch = 0; ch < c.num_channels; ++ch) {
          const uint8_t byte = c.codes[tok * rb + ch / 2];
          const int nibble = ch % 2 ? byte >> 4 : byte & 15;
          ASSERT_GE(nibble, 1);
          ASSERT_LE(nibble, 15);
          const float x = k[size_t(t) * c.head_dim + c.channels[size_t(g) * c.num_channels + ch]];
          ASSERT_LE(std::fabs((nibble - 8) * scale - x), 0.5f * scale * 1.0001f + 1e-30f);
        }
      }
    }
  }
}

TEST(TlsIndexTest, BuildMatchesBruteForceGqa) {
  testing::Reseed(11);
  const TlsCase c = MakeTlsCase({1, 17, 64, 65, 200}, 6, 2, 64, 32, DType::kF32);
  ExpectIndexMatchesCache(c);
}

TEST(TlsIndexTest, BuildMatchesBruteForceMla) {
  testing::Reseed(12);
  const TlsCase c = MakeTlsCase({97, 130}, 4, 1, 576, 128, DType::kBF16, /*mla=*/true);
  ExpectIndexMatchesCache(c);
}

TEST(TlsIndexTest, ChannelsAreAscendingAndDistinct) {
  testing::Reseed(13);
  const TlsCase c = MakeTlsCase({70}, 8, 2, 128, 32, DType::kF32);
  for (int g = 0; g < 2; ++g) {
    for (int i = 1; i < 32; ++i) EXPECT_LT(c.channels[g * 32 + i - 1], c.channels[g * 32 + i]);
  }
  // The scaled channels (every 7th) dominate k_absmax, so calibration prefers them.
  int multiples = 0;
  for (int i = 0; i < 32; ++i) multiples += c.channels[i] % 7 == 0;
  EXPECT_GE(multiples, 12);  // 19 of the 128 channels are scaled; chance gives ~5
}

// Appending in chunks (a prefill in pieces, then single decode tokens) gives the same index as
// building at once, bit for bit.
TEST(TlsIndexTest, IncrementalEqualsBuild) {
  testing::Reseed(14);
  const TlsCase c = MakeTlsCase({150, 64, 3}, 4, 2, 128, 16, DType::kF32);
  std::vector<Bf16> kmax(c.kmax.size(), testing::kBf16NaN), kmin(c.kmin.size(), testing::kBf16NaN);
  std::vector<uint8_t> codes(c.codes.size(), 0xff);
  std::vector<float> scales(c.scales.size(), NAN);
  std::vector<int32_t> done(c.batch, 0);
  const std::vector<int> steps = {5, 59, 1, 1, 70, 1, 13, 1, 100};
  for (int step : steps) {
    std::vector<int32_t> start = done, end(c.batch);
    for (int b = 0; b < c.batch; ++b) end[b] = std::min(c.seq_lens()[b], done[b] + step);
    TlsIndexUpdateParams u{c.kv.k.data(),
                           c.kv.block_table.data(),
                           c.index_table.data(),
                           start.data(),
                           end.data(),
                           kmax.data(),
                           kmin.data(),
                           c.channels.data(),
                           codes.data(),
                           scales.data(),
                           c.batch,
                           c.num_kv_heads,
                           c.head_dim,
                           c.num_channels,
                           c.max_blocks_per_seq(),
                           step};
    ref::TlsIndexUpdate(u);
    done = end;
  }
  ASSERT_EQ(done, c.seq_lens());
  for (size_t i = 0; i < kmax.size(); ++i) {
    ASSERT_EQ(kmax[i].bits, c.kmax[i].bits) << i;
    ASSERT_EQ(kmin[i].bits, c.kmin[i].bits) << i;
  }
  EXPECT_EQ(codes, c.codes);
  for (size_t i = 0; i < scales.size(); ++i) {
    if (std::isnan(c.scales[i])) {
      EXPECT_TRUE(std::isnan(scales[i]));
    } else {
      EXPECT_EQ(scales[i], c.scales[i]);
    }
  }
}

TEST(TlsIndexTest, BlockIndexOnlyWhenNoTokenCodes) {
  testing::Reseed(15);
  const TlsCase c = MakeTlsCase({80}, 2, 1, 64, 16, DType::kF32);
  std::vector<Bf16> kmax(c.kmax.size()), kmin(c.kmin.size());
  std::vector<int32_t> start = {0};
  TlsIndexUpdateParams u{c.kv.k.data(),
                         c.kv.block_table.data(),
                         c.index_table.data(),
                         start.data(),
                         c.kv.seq_lens.data(),
                         kmax.data(),
                         kmin.data(),
                         nullptr,
                         nullptr,
                         nullptr,
                         1,
                         1,
                         64,
                         0,
                         c.max_blocks_per_seq(),
                         80};
  ref::TlsIndexUpdate(u);
  for (int blk = 0; blk < 2; ++blk) {
    const size_t off = size_t(c.index_table[blk]) * 64;
    for (int d = 0; d < 64; ++d) EXPECT_EQ(kmax[off + d].bits, c.kmax[off + d].bits);
  }
}

// The int8 block index: per row one scale, codes that bound the keys' max / min from outside by
// less than one scale step, and at least one code at +-127.
void ExpectInt8RowsBoundTheKeys(const TlsCase& c, const testing::Int8BlockIndex& x) {
  for (int b = 0; b < c.batch; ++b) {
    const int len = c.seq_lens()[b];
    for (int g = 0; g < c.num_kv_heads; ++g) {
      for (int blk = 0; blk * kKvBlockSize < len; ++blk) {
        const size_t row = size_t(c.index_table[size_t(b) * c.max_blocks_per_seq() + blk]);
        const size_t off = (row * c.num_kv_heads + g) * c.head_dim;
        const float scale = x.scales[row * c.num_kv_heads + g];
        float absmax = 0.f;
        int widest = 0;
        for (int d = 0; d < c.head_dim; ++d) {  // c.kmax / kmin: the exact bf16 max / min
          absmax = std::max({absmax, std::fabs(Bf16ToFloat(c.kmax[off + d])),
                             std::fabs(Bf16ToFloat(c.kmin[off + d]))});
        }
        ASSERT_EQ(scale, TlsBlockIndexScale(absmax)) << "b=" << b << " blk=" << blk;
        for (int d = 0; d < c.head_dim; ++d) {
          const double mx = Bf16ToFloat(c.kmax[off + d]), mn = Bf16ToFloat(c.kmin[off + d]);
          const int cmax = x.kmax[off + d], cmin = x.kmin[off + d];
          ASSERT_GE(static_cast<double>(cmax) * scale, mx)
              << "b=" << b << " blk=" << blk << " d=" << d;
          ASSERT_LE(static_cast<double>(cmin) * scale, mn)
              << "b=" << b << " blk=" << blk << " d=" << d;
          ASSERT_LT(static_cast<double>(cmax - 1) * scale, mx);
          ASSERT_GT(static_cast<double>(cmin + 1) * scale, mn);
          ASSERT_LE(cmin, cmax);
          widest = std::max({widest, std::abs(cmax), std::abs(cmin)});
        }
        EXPECT_EQ(widest, absmax > 0.f ? 127 : 0);
      }
    }
  }
}

TEST(TlsIndexTest, Int8RowsBoundTheKeysGqa) {
  testing::Reseed(16);
  const TlsCase c = MakeTlsCase({1, 17, 64, 65, 200}, 6, 2, 64, 32, DType::kF32);
  ExpectInt8RowsBoundTheKeys(c, testing::MakeInt8BlockIndex(c));
}

TEST(TlsIndexTest, Int8RowsBoundTheKeysMla) {
  testing::Reseed(17);
  const TlsCase c = MakeTlsCase({97, 130}, 4, 1, 576, 128, DType::kBF16, /*mla=*/true);
  ExpectInt8RowsBoundTheKeys(c, testing::MakeInt8BlockIndex(c));
}

// Appending in chunks (the open block's row rebuilt at every append) gives the rows of one build.
TEST(TlsIndexTest, Int8IncrementalEqualsBuild) {
  testing::Reseed(18);
  const TlsCase c = MakeTlsCase({150, 64, 3}, 4, 2, 128, 16, DType::kF32);
  const testing::Int8BlockIndex once = testing::MakeInt8BlockIndex(c);
  const testing::Int8BlockIndex steps =
      testing::MakeInt8BlockIndex(c, {5, 59, 1, 1, 70, 1, 13, 1, 100});
  EXPECT_EQ(steps.kmax, once.kmax);
  EXPECT_EQ(steps.kmin, once.kmin);
  for (size_t i = 0; i < once.scales.size(); ++i) {
    if (std::isnan(once.scales[i])) {
      EXPECT_TRUE(std::isnan(steps.scales[i])) << i;  // a row no sequence uses
    } else {
      EXPECT_EQ(steps.scales[i], once.scales[i]) << i;
    }
  }
}

// Zero and NaN keys (PlantInt8EdgeKeys): appended in steps, the rows equal one build's; a NaN
// key's dim codes to +-127, a block of zero keys so far has scale 0, and NaNs leave the scale.
TEST(TlsIndexTest, Int8ZeroAndNanKeys) {
  testing::Reseed(19);
  TlsCase c = MakeTlsCase({150, 90}, 4, 2, 64, 16, DType::kF32);
  testing::PlantInt8EdgeKeys(c);
  const testing::Int8BlockIndex once = testing::MakeInt8BlockIndex(c);
  EXPECT_EQ(testing::MakeInt8BlockIndex(c, {1, 1, 1, 1, 60, 1, 1, 1, 2, 1, 3, 100}).kmax,
            once.kmax);
  const testing::Int8BlockIndex steps = testing::MakeInt8BlockIndex(c, {64, 1, 1, 1, 1, 100});
  EXPECT_EQ(steps.kmax, once.kmax);
  EXPECT_EQ(steps.kmin, once.kmin);
  auto row = [&](int b, int blk, int g) {
    return size_t(c.index_table[size_t(b) * c.max_blocks_per_seq() + blk]) * c.num_kv_heads + g;
  };
  EXPECT_EQ(once.kmax[row(0, 0, 0) * c.head_dim + 3], 127);
  EXPECT_EQ(once.kmin[row(0, 0, 0) * c.head_dim + 3], -127);
  EXPECT_EQ(once.kmax[row(0, 1, 1) * c.head_dim + c.head_dim - 1], 127);
  EXPECT_EQ(once.kmin[row(1, 1, 0) * c.head_dim], -127);
  for (size_t i = 0; i < once.scales.size(); ++i) {
    if (!std::isnan(once.scales[i])) EXPECT_EQ(steps.scales[i], once.scales[i]) << i;
  }
  EXPECT_GT(once.scales[row(0, 1, 0)], 0.f);  // re-coded after its zero keys
  EXPECT_FALSE(std::isnan(once.scales[row(0, 0, 0)]));
  // Three zero keys alone: scale 0, every code 0.
  const testing::Int8BlockIndex zeros = testing::MakeInt8BlockIndex(c, {64, 1, 1, 1});
  EXPECT_EQ(zeros.scales[row(0, 1, 0)], 0.f);
  EXPECT_EQ(zeros.kmax[row(0, 1, 0) * c.head_dim], 0);
}

// The GPU's int8 row update (tls_index.cu): an append whose keys keep the row's scale takes the
// max / min of the row's codes and theirs; one that raises it re-codes the row from all its keys.
// Over random appends (magnitudes that grow, shrink and jump, zero and NaN keys) that equals
// re-coding from all keys every time, as the reference does.
TEST(TlsMathTest, Int8RowMergeWhileTheScaleHoldsEqualsRecoding) {
  std::mt19937 rng(20);
  std::uniform_real_distribution<float> uni(-1.f, 1.f);
  constexpr int kDim = 16;
  int merged = 0, recoded = 0;
  for (int block = 0; block < 400; ++block) {
    std::vector<float> mx(kDim), mn(kDim);  // of all keys so far
    std::vector<int> cmax(kDim), cmin(kDim);
    float absmax = 0.f, scale = 0.f;
    for (int t = 0; t < kKvBlockSize; ++t) {
      const float mag = std::ldexp(1.f, static_cast<int>(rng() % 24) - 12);
      std::vector<float> key(kDim);
      float key_absmax = 0.f;
      for (int d = 0; d < kDim; ++d) {
        const unsigned r = rng() % 200;
        key[d] = r == 0 ? std::numeric_limits<float>::quiet_NaN()
                        : (r < 20 ? 0.f : Bf16ToFloat(FloatToBf16(uni(rng) * mag)));
        key_absmax = std::max(key_absmax, TlsBlockIndexAbs(key[d]));
        mx[d] = t == 0 ? key[d] : TlsBlockIndexMax(mx[d], key[d]);
        mn[d] = t == 0 ? key[d] : TlsBlockIndexMin(mn[d], key[d]);
      }
      absmax = std::max(absmax, key_absmax);
      if (t > 0 && TlsBlockIndexScale(key_absmax) <= scale) {
        ++merged;
        for (int d = 0; d < kDim; ++d) {
          cmax[d] = std::max(cmax[d], TlsBlockMaxCode(key[d], scale));
          cmin[d] = std::min(cmin[d], TlsBlockMinCode(key[d], scale));
        }
      } else {
        ++recoded;
        scale = TlsBlockIndexScale(absmax);
        for (int d = 0; d < kDim; ++d) {
          cmax[d] = TlsBlockMaxCode(mx[d], scale);
          cmin[d] = TlsBlockMinCode(mn[d], scale);
        }
      }
      ASSERT_EQ(scale, TlsBlockIndexScale(absmax)) << block << " " << t;
      for (int d = 0; d < kDim; ++d) {
        ASSERT_EQ(cmax[d], TlsBlockMaxCode(mx[d], scale)) << block << " " << t << " " << d;
        ASSERT_EQ(cmin[d], TlsBlockMinCode(mn[d], scale)) << block << " " << t << " " << d;
      }
    }
  }
  EXPECT_GT(merged, 10000);
  EXPECT_GT(recoded, 1000);
}

TEST(TlsMathTest, BlockIndexNanKeysGetTheWidestCodes) {
  const float nan = std::numeric_limits<float>::quiet_NaN();
  EXPECT_EQ(TlsBlockMaxCode(nan, 1.f), 127);
  EXPECT_EQ(TlsBlockMinCode(nan, 1.f), -127);
  EXPECT_EQ(TlsBlockMaxCode(nan, 0.f), 127);
  EXPECT_TRUE(std::isnan(TlsBlockIndexMax(nan, 1.f)));
  EXPECT_TRUE(std::isnan(TlsBlockIndexMax(1.f, nan)));
  EXPECT_TRUE(std::isnan(TlsBlockIndexMin(nan, 1.f)));
  EXPECT_TRUE(std::isnan(TlsBlockIndexMin(1.f, nan)));
  EXPECT_EQ(TlsBlockIndexMax(-INFINITY, 2.f), 2.f);  // the GPU's identities
  EXPECT_EQ(TlsBlockIndexMin(INFINITY, 2.f), 2.f);
  EXPECT_EQ(TlsBlockIndexAbs(nan), 0.f);
  EXPECT_EQ(TlsBlockIndexAbs(-3.f), 3.f);
}

TEST(TlsMathTest, BlockIndexCodesRoundOutward) {
  EXPECT_EQ(TlsBlockIndexScale(127.f), 1.f);
  EXPECT_EQ(TlsBlockIndexScale(0.f), 0.f);
  EXPECT_EQ(TlsBlockMaxCode(2.5f, 1.f), 3);
  EXPECT_EQ(TlsBlockMinCode(2.5f, 1.f), 2);
  EXPECT_EQ(TlsBlockMaxCode(-2.5f, 1.f), -2);
  EXPECT_EQ(TlsBlockMinCode(-2.5f, 1.f), -3);
  EXPECT_EQ(TlsBlockMaxCode(2.f, 1.f), 2);
  EXPECT_EQ(TlsBlockMinCode(2.f, 1.f), 2);
  EXPECT_EQ(TlsBlockMaxCode(5.f, 0.f), 0);
  EXPECT_EQ(TlsBlockMinCode(-5.f, 0.f), 0);
  // 127 * scale never falls short of the row's absmax, so +-absmax code to +-127 and bound it.
  int raised = 0;
  for (float a = 1e-3f; a < 1e3f; a *= 1.0137f) {
    const float s = TlsBlockIndexScale(a);
    raised += s != a / 127.f;
    ASSERT_GE(127.f * s, a) << a;
    ASSERT_EQ(TlsBlockMaxCode(a, s), 127) << a;
    ASSERT_EQ(TlsBlockMinCode(-a, s), -127) << a;
    ASSERT_GE(TlsBlockMaxCode(a, s) * s, a);
  }
  EXPECT_GT(raised, 0);  // the ulp raise is exercised
}

// TlsTokenExp is 2^x rounded to nearest bf16 on every grid point of [-126, 0] (the GPU's
// MUFU gives the same: TokenExpMatchesReference in tls_select_gpu_test.cc).
TEST(TlsMathTest, TokenExpIsTheNearestBf16OnTheGrid) {
  EXPECT_EQ(TlsTokenExp(0.f), 1.f);
  EXPECT_EQ(TlsTokenExp(-0.f), 1.f);
  EXPECT_EQ(TlsTokenExp(-1.f), 0.5f);
  EXPECT_EQ(TlsTokenExp(-126.f), std::ldexp(1.f, -126));
  EXPECT_EQ(TlsExpToFixed(TlsTokenExp(-126.f)), 0u);  // below the fixed-point sums' unit
  EXPECT_EQ(TlsExpToFixed(TlsTokenExp(0.f)), uint64_t{1} << 23);
  for (int j = 0; j <= 126 * 256; ++j) {
    const float x = -j / 256.f;
    const double exact = std::exp2(-j / 256.0);
    const float e = TlsTokenExp(x);
    ASSERT_EQ(e, RoundToBf16(e)) << x;  // a bf16 value
    // The nearest one: within half a bf16 ulp (2^-8 relative to [1, 2)'s) of the exact value.
    const double ulp = std::ldexp(1.0, std::ilogb(e) - 7);
    ASSERT_LE(std::fabs(e - exact), 0.5 * ulp) << x;
  }
}

// The chunk shift c rounds max * a up to an integer, so every argument of a chunk's softmax is
// <= 0 (no exp exceeds 1, which ExpFixed's sums need), also where max * a rounds up to nearest;
// and every argument lies on the grid in [-126, 0].
TlsExpShift ChunkExpShiftOf(float max_y, float query_scale, float exp_scale) {
  const float a = TlsMul(query_scale, exp_scale);
  return TlsChunkExpShift(a, TlsChunkShift(max_y, a));
}

TEST(TlsMathTest, TokenExpArgumentsLieOnTheGridAndAreNeverPositive) {
  std::mt19937 rng(7);
  std::uniform_real_distribution<float> y_dist(-50.f, 50.f), scale_dist(1e-4f, 2.f);
  for (int i = 0; i < 20000; ++i) {
    const float max_y = y_dist(rng), a_scale = scale_dist(rng), e_scale = scale_dist(rng);
    const TlsExpShift s = ChunkExpShiftOf(max_y, a_scale, e_scale);
    const float c = TlsChunkShift(max_y, s.a);
    for (const float y : {max_y, std::nextafter(max_y, -INFINITY), max_y - 1.f, y_dist(rng)}) {
      if (y > max_y) continue;
      const float x = TlsTokenExpArg(y, s);
      ASSERT_LE(x, 0.f) << max_y;
      ASSERT_GE(x, -126.f) << max_y;
      ASSERT_EQ(x * 256.f, std::nearbyint(x * 256.f)) << x;  // on the grid
      // The exact y * a - c rounded to the grid (the fma rounds once), unless clamped.
      const double exact = double{y} * s.a - c;
      if (exact > -125.0) ASSERT_NEAR(x, exact, 0.5 / 256 + 1e-6) << y;
    }
    ASSERT_GT(TlsTokenExpArg(max_y, s), -1.f - 1.f / 256) << max_y;  // the max's exp >= ~1/2
  }
  // Degenerate chunks: no max (NaN), an infinite max, a zero query scale (every exp 1), a NaN y.
  EXPECT_EQ(TlsTokenExpArg(1.f, ChunkExpShiftOf(NAN, 1.f, 1.f)), -126.f);
  EXPECT_EQ(TlsTokenExpArg(1.f, ChunkExpShiftOf(INFINITY, 1.f, 1.f)), -126.f);
  EXPECT_EQ(TlsTokenExpArg(-5.f, ChunkExpShiftOf(3.f, 0.f, 1.f)), 0.f);
  EXPECT_EQ(TlsTokenExpArg(NAN, ChunkExpShiftOf(3.f, 1.f, 1.f)), -126.f);
  // A hugely negative max keeps the offset exact (c clamped at -2^23): the max's argument is
  // at most 0.
  EXPECT_LE(TlsTokenExpArg(-1e12f, ChunkExpShiftOf(-1e12f, 1.f, 1.f)), 0.f);
  EXPECT_EQ(TlsNegMulDown(0.f, 3.f), 0.f);
  EXPECT_EQ(TlsNegMulDown(1.f, 0.5f), -0.5f);  // exact products stay exact
  // 3 * float(1/3) = 1 + 2^-25 + ...: nearest is -1, rounded down the float below it.
  EXPECT_EQ(TlsNegMulDown(3.f, 1.f / 3.f), std::nextafter(-1.f, -INFINITY));
}

// Chunk-local shifts: c rounds max * a up to an integer, so every argument of the chunk is <= 0;
// the sums and weights scale by exact powers of two.
TEST(TlsMathTest, ChunkShiftsAreIntegersAboveTheChunkAndScaleExactly) {
  std::mt19937 rng(5);
  std::uniform_real_distribution<float> y_dist(-50.f, 50.f), a_dist(1e-4f, 2.f);
  for (int i = 0; i < 20000; ++i) {
    const float max_y = y_dist(rng), a = a_dist(rng);
    const float c = TlsChunkShift(max_y, a);
    ASSERT_EQ(c, std::ceil(c)) << max_y;
    ASSERT_GE(double{c}, double{max_y} * a) << max_y;
    ASSERT_LT(double{c}, double{max_y} * a + 1.0 + 1e-6) << max_y;
    const TlsExpShift s = TlsChunkExpShift(a, c);
    ASSERT_LE(TlsTokenExpArg(max_y, s), 0.f) << max_y;
    ASSERT_GT(TlsTokenExpArg(max_y, s), -1.01f) << max_y;  // the max's exp stays above 1/2
  }
  EXPECT_EQ(TlsChunkShift(NAN, 1.f), INFINITY);
  EXPECT_EQ(TlsChunkShift(-INFINITY, 0.f), -INFINITY);  // no candidate in the chunk
  EXPECT_EQ(TlsChunkScaledSum(0, -INFINITY, -INFINITY), 0u);
  EXPECT_EQ(TlsChunkWeight(0.5f, -INFINITY, 3.f), 0.f);
  EXPECT_EQ(TlsChunkShift(-1e12f, 1.f), -8388608.f);  // clamped: bias - c stays exact
  EXPECT_EQ(TlsChunkShift(3.f, 0.5f), 2.f);           // 1.5 up
  EXPECT_EQ(TlsChunkShift(2.f, 0.5f), 1.f);           // exact
  EXPECT_EQ(TlsChunkScaledSum(1000, 5.f, 5.f), 1000u);
  EXPECT_EQ(TlsChunkScaledSum(1000, 2.f, 5.f), 125u);  // 1000 / 8
  EXPECT_EQ(TlsChunkScaledSum(1003, 2.f, 5.f), 125u);  // truncated
  EXPECT_EQ(TlsChunkScaledSum(~uint64_t{0}, -100.f, 5.f), 0u);
  EXPECT_EQ(TlsChunkWeight(0.75f, 5.f, 5.f), 0.75f);
  EXPECT_EQ(TlsChunkWeight(0.75f, 2.f, 5.f), 0.09375f);
  EXPECT_EQ(TlsChunkWeight(0.75f, -200.f, 5.f), 0.f);
}

TEST(TlsMathTest, SelectKeyOrdersScoreThenId) {
  EXPECT_GT(TlsSelectKey(1.f, 5), TlsSelectKey(0.5f, 0));
  EXPECT_GT(TlsSelectKey(-1.f, 5), TlsSelectKey(-2.f, 0));
  EXPECT_GT(TlsSelectKey(0.f, 3), TlsSelectKey(0.f, 4));
  EXPECT_GT(TlsSelectKey(-INFINITY, 0), TlsSelectKey(NAN, 0));
  EXPECT_GT(TlsSelectKey(0.f, 9), TlsSelectKey(-0.f, 1));
}

// Token scales keep 22 significant bits, so that the MLA token kernels' one-fma scaled dot
// (B + dot) * scale - B * scale, B = 1.5 * 2^23, equals TlsTokenScaledDot(dot, scale) bit for bit.
TEST(TlsMathTest, Int4ScaleMakesTheBiasedScaledDotExact) {
  std::mt19937 rng(7);
  std::uniform_real_distribution<float> absmax_dist(1e-6f, 1e4f);
  std::uniform_int_distribution<int> dot_dist(-(1 << 21), 1 << 21);
  const float bias = 12582912.f;
  for (int i = 0; i < 20000; ++i) {
    const float scale = TlsInt4Scale(absmax_dist(rng));
    ASSERT_EQ(FloatToBits(scale) & 3u, 0u) << scale;
    const float nb = -bias * scale;
    ASSERT_EQ(double(nb), -double(bias) * double(scale)) << scale;  // exact
    const int dot = dot_dist(rng);
    ASSERT_EQ(FloatToBits(std::fma(bias + float(dot), scale, nb)),
              FloatToBits(TlsTokenScaledDot(float(dot), scale)))
        << dot << " " << scale;
  }
  EXPECT_EQ(TlsInt4Scale(0.f), 0.f);
  EXPECT_EQ(TlsInt4Scale(7.f), 1.f);
}

TEST(TlsMathTest, Int4CodeRoundTrip) {
  const float scale = TlsInt4Scale(3.5f);
  EXPECT_EQ(TlsInt4Code(3.5f, scale), 7);
  EXPECT_EQ(TlsInt4Code(-3.5f, scale), -7);
  EXPECT_EQ(TlsInt4Code(0.25f, scale), 0);  // 0.5 -> half to even
  EXPECT_EQ(TlsInt4Code(1.f, 0.f), 0);
}

TEST(TlsMathTest, Int8QueryCodes) {
  const float scale = TlsInt8Scale(127.f);  // exactly 1
  EXPECT_EQ(scale, 1.f);
  EXPECT_EQ(TlsInt8Code(127.f, scale), 127);
  EXPECT_EQ(TlsInt8Code(-127.f, scale), -127);
  EXPECT_EQ(TlsInt8Code(1000.f, scale), 127);  // clamped
  EXPECT_EQ(TlsInt8Code(0.5f, scale), 0);       // half to even
  EXPECT_EQ(TlsInt8Code(1.5f, scale), 2);
  EXPECT_EQ(TlsInt8Code(-2.5f, scale), -2);
  EXPECT_EQ(TlsInt8Code(1.f, 0.f), 0);
}

// The token logit's sum is an exact integer, so the GPU may add the channel products in any
// order (tensor cores, split warps): the extreme codes of 128 channels, summed forwards and
// backwards, give TlsInt4Dot's value exactly.
TEST(TlsMathTest, Int4DotIsExactInAnyOrder) {
  constexpr int kChannels = 128;
  std::vector<float> q(kChannels);
  std::vector<uint32_t> words(kChannels / 8, 0u);
  int64_t want = 0;
  for (int c = 0; c < kChannels; ++c) {
    q[c] = (c % 3 == 0) ? -127.f : 127.f - float(c % 5);
    const int code = (c % 2 == 0) ? 7 : -7 + (c % 4 == 1);  // nibble = code + 8
    words[c / 8] |= uint32_t(code + 8) << (4 * (c % 8));
    want += int64_t(q[c]) * code;
  }
  EXPECT_EQ(TlsInt4Dot(q.data(), words.data(), kChannels), float(want));
  float backwards = 0.f;
  for (int c = kChannels - 1; c >= 0; --c) {
    const int code = int((words[c / 8] >> (4 * (c % 8))) & 15u) - 8;
    backwards = TlsFma(q[c], float(code), backwards);
  }
  EXPECT_EQ(backwards, float(want));
  EXPECT_EQ(TlsTokenScaledDot(float(want), 0.5f), float(want) * 0.5f);
  // The exp2 argument of the chunk's max is 0 where max * a is an integer; others are
  // y * a - c rounded to the grid.
  const float a = TlsMul(0.25f, 2.f);
  const TlsExpShift s = TlsChunkExpShift(a, TlsChunkShift(4.f, a));
  EXPECT_EQ(TlsTokenExpArg(4.f, s), 0.f);
  EXPECT_EQ(TlsTokenExpArg(2.f, s), -1.f);
  EXPECT_EQ(TlsTokenExpArg(3.998f, s), 0.f);          // -0.001: the nearest grid point is 0
  EXPECT_EQ(TlsTokenExpArg(3.98f, s), -0.01171875f);  // -0.01: the nearest is -3 * 2^-8
}

}  // namespace
}  // namespace asynctls::kernels
