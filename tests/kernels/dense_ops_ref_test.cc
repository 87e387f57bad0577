// Sanity of the CPU oracle itself (kernels/ref/dense_ops.cc) against hand-computed values, so
// that the GPU compare tests compare against something known to be right.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "asynctls/kernels/ref.h"

namespace asynctls::kernels {
namespace {

constexpr float kTol = 1e-6f;

Bf16 B(float f) { return FloatToBf16(f); }

TEST(DenseOpsRefTest, Bf16RoundsToNearestEven) {
  EXPECT_EQ(FloatToBf16(1.0f).bits, 0x3f80);
  EXPECT_EQ(RoundToBf16(1.00390625f), 1.0f);       // tie, 1.0 has the even mantissa
  EXPECT_EQ(RoundToBf16(1.01171875f), 1.015625f);  // tie, rounds up to even
  EXPECT_EQ(RoundToBf16(1.0040f), 1.0078125f);     // above the tie
  EXPECT_EQ(RoundToBf16(-2.5f), -2.5f);
  EXPECT_TRUE(std::isinf(RoundToBf16(std::numeric_limits<float>::infinity())));
  float halfway_to_inf;  // between the largest bf16 (odd mantissa) and inf: ties to inf
  const uint32_t halfway_bits = 0x7f7f8000u;
  std::memcpy(&halfway_to_inf, &halfway_bits, 4);
  EXPECT_TRUE(std::isinf(RoundToBf16(halfway_to_inf)));
  EXPECT_EQ(FloatToBf16(std::nextafter(halfway_to_inf, 0.f)).bits, 0x7f7f);
  EXPECT_TRUE(std::isnan(RoundToBf16(std::numeric_limits<float>::quiet_NaN())));
  // A NaN whose payload sits only in the low 16 bits must stay NaN, not become inf.
  const uint32_t low_payload_nan = 0x7f800001u;
  float f;
  std::memcpy(&f, &low_payload_nan, 4);
  EXPECT_TRUE(std::isnan(RoundToBf16(f)));
}

TEST(DenseOpsRefTest, EmbeddingCopiesRows) {
  const std::vector<float> table = {1, 2, 3, 4, 5, 6};  // [3, 2]
  const std::vector<int32_t> ids = {2, 0, 2};
  std::vector<float> out(6, -1.f);
  ref::Embedding({table.data(), ids.data(), out.data(), DType::kF32, 3, 2, 3});
  EXPECT_EQ(out, (std::vector<float>{5, 6, 1, 2, 5, 6}));

  const std::vector<Bf16> table_bf16 = {B(1.5f), B(-2.f), B(0.25f), B(8.f)};  // [2, 2]
  std::vector<float> out2(2);
  const int32_t id = 1;
  ref::Embedding({table_bf16.data(), &id, out2.data(), DType::kBF16, 1, 2, 2});
  EXPECT_EQ(out2, (std::vector<float>{0.25f, 8.f}));
}

TEST(DenseOpsRefTest, RmsNormByHand) {
  // Row [3, 4]: mean square 12.5; rows [0, 0] with eps 1: 0.
  const std::vector<float> x = {3, 4, 0, 0};
  const std::vector<float> w = {1, 2};
  std::vector<float> out(4);
  ref::RmsNorm({x.data(), w.data(), out.data(), 2, 2, 0.f});
  const float inv = 1.f / std::sqrt(12.5f);
  EXPECT_NEAR(out[0], 3 * inv, kTol);
  EXPECT_NEAR(out[1], 8 * inv, kTol);
  EXPECT_TRUE(std::isnan(out[2]));  // 0 / sqrt(0): eps is the caller's job
  ref::RmsNorm({x.data() + 2, w.data(), out.data() + 2, 1, 2, 1.f});
  EXPECT_EQ(out[2], 0.f);
  // In place.
  std::vector<float> y = {3, 4};
  ref::RmsNorm({y.data(), w.data(), y.data(), 1, 2, 0.f});
  EXPECT_NEAR(y[0], 3 * inv, kTol);
  EXPECT_NEAR(y[1], 8 * inv, kTol);
}

// maybe_out_bf16 / maybe_x_bf16: the fp32 results rounded to bf16, and a GEMM over bf16 x equal
// to one over the same values in fp32.
TEST(DenseOpsRefTest, Bf16OutputsAndInputs) {
  const std::vector<float> x = {3.3f, -4.1f, 0.7f, 9.9f}, w = {1.1f, 2.3f, 0.3f, 0.9f};
  std::vector<float> f32(4);
  std::vector<Bf16> b(4);
  ref::RmsNorm({x.data(), w.data(), f32.data(), 1, 4, 1e-5f});
  ref::RmsNorm({x.data(), w.data(), nullptr, 1, 4, 1e-5f, b.data()});
  for (int i = 0; i < 4; ++i) EXPECT_EQ(b[i].bits, FloatToBf16(f32[i]).bits) << i;
  ref::SiluMul({x.data(), f32.data(), 1, 2});
  ref::SiluMul({x.data(), nullptr, 1, 2, b.data()});
  for (int i = 0; i < 2; ++i) EXPECT_EQ(b[i].bits, FloatToBf16(f32[i]).bits) << i;
  std::vector<Bf16> xb, wb;
  std::vector<float> xr;
  for (float v : x) xb.push_back(FloatToBf16(v)), xr.push_back(RoundToBf16(v));
  for (float v : w) wb.push_back(FloatToBf16(v));
  float out_f32 = 0.f, out_bf16 = 0.f;
  ref::Gemm({xr.data(), wb.data(), nullptr, &out_f32, DType::kBF16, 1, 1, 4, 0.f});
  ref::Gemm({nullptr, wb.data(), nullptr, &out_bf16, DType::kBF16, 1, 1, 4, 0.f, xb.data()});
  EXPECT_EQ(out_bf16, out_f32);
}

TEST(DenseOpsRefTest, GemmBiasAndBeta) {
  const std::vector<float> x = {1, 2, 3, 4};        // [2, 2]
  const std::vector<float> w = {1, 0, 0, 1, 1, 1};  // [3, 2]
  const std::vector<float> bias = {10, 20, 30};
  const float nan = std::numeric_limits<float>::quiet_NaN();
  std::vector<float> out(6, nan);  // beta 0 must not read out
  ref::Gemm({x.data(), w.data(), bias.data(), out.data(), DType::kF32, 2, 3, 2, 0.f});
  EXPECT_EQ(out, (std::vector<float>{11, 22, 33, 13, 24, 37}));
  std::vector<float> acc(6, 1.f);
  ref::Gemm({x.data(), w.data(), nullptr, acc.data(), DType::kF32, 2, 3, 2, 1.f});
  EXPECT_EQ(acc, (std::vector<float>{2, 3, 4, 4, 5, 8}));
  // bf16 weights: w = [[0.5, -1.5]], out = 2 * 0.5 + 4 * -1.5 = -5.
  const std::vector<Bf16> w_bf16 = {B(0.5f), B(-1.5f)};
  const std::vector<float> x2 = {2, 4};
  float o = 0.f;
  ref::Gemm({x2.data(), w_bf16.data(), nullptr, &o, DType::kBF16, 1, 1, 2, 0.f});
  EXPECT_EQ(o, -5.f);
}

TEST(DenseOpsRefTest, RopeStylesByHand) {
  const std::vector<float> inv_freq = {1.f, 0.5f};
  const int32_t pos = 1;
  const float c1 = std::cos(1.f), s1 = std::sin(1.f), c5 = std::cos(0.5f), s5 = std::sin(0.5f);
  {
    // Interleaved: pairs (0,1) at angle 1, (2,3) at angle 0.5.
    std::vector<float> q = {1, 0, 0, 1}, k = {2, 0, 0, 0};
    ref::Rope({q.data(), k.data(), &pos, inv_freq.data(), 1, 1, 1, 4, 4, RopeStyle::kInterleaved});
    EXPECT_NEAR(q[0], c1, kTol);
    EXPECT_NEAR(q[1], s1, kTol);
    EXPECT_NEAR(q[2], -s5, kTol);
    EXPECT_NEAR(q[3], c5, kTol);
    EXPECT_NEAR(k[0], 2 * c1, kTol);
    EXPECT_NEAR(k[1], 2 * s1, kTol);
  }
  {
    // Half: pairs (0,2) at angle 1, (1,3) at angle 0.5.
    std::vector<float> q = {1, 0, 0, 1}, k = {0, 0, 0, 0};
    ref::Rope({q.data(), k.data(), &pos, inv_freq.data(), 1, 1, 1, 4, 4, RopeStyle::kHalf});
    EXPECT_NEAR(q[0], c1, kTol);
    EXPECT_NEAR(q[2], s1, kTol);
    EXPECT_NEAR(q[1], -s5, kTol);
    EXPECT_NEAR(q[3], c5, kTol);
  }
  {
    // rotary_dim 2 of head_dim 4: only (0,1) rotates; position 0 is the identity.
    std::vector<float> q = {1, 0, 7, 8}, k = {0, 1, 9, 10};
    ref::Rope({q.data(), k.data(), &pos, inv_freq.data(), 1, 1, 1, 4, 2, RopeStyle::kHalf});
    EXPECT_NEAR(q[0], c1, kTol);
    EXPECT_NEAR(q[1], s1, kTol);
    EXPECT_EQ(q[2], 7.f);
    EXPECT_EQ(q[3], 8.f);
    EXPECT_EQ(k[2], 9.f);
    const int32_t zero = 0;
    std::vector<float> q0 = {1, 2, 3, 4}, k0 = {5, 6, 7, 8};
    ref::Rope(
        {q0.data(), k0.data(), &zero, inv_freq.data(), 1, 1, 1, 4, 4, RopeStyle::kInterleaved});
    EXPECT_EQ(q0, (std::vector<float>{1, 2, 3, 4}));
  }
}

TEST(DenseOpsRefTest, SplitQkvByHand) {
  // Two tokens, 1 q head, 1 kv head, head_dim 2, rotary 2, position 0 (the identity): rows
  // split by kind; with norm weights q and k rows are normalized (v never is).
  const std::vector<float> qkv = {3, 4, 0, 2, 5, 6, 1, 0, 0, 0, 7, 8};  // [2, 3, 2]
  const std::vector<int32_t> pos = {0, 0};
  const std::vector<float> inv_freq = {1.f}, w = {1.f, 2.f};
  std::vector<float> q(4), k(4), v(4);
  ref::SplitQkv({qkv.data(), q.data(), k.data(), v.data(), nullptr, nullptr, 1e-6f, pos.data(),
                 inv_freq.data(), 2, 1, 1, 2, 2, RopeStyle::kHalf});
  EXPECT_EQ(q, (std::vector<float>{3, 4, 1, 0}));
  EXPECT_EQ(k, (std::vector<float>{0, 2, 0, 0}));
  EXPECT_EQ(v, (std::vector<float>{5, 6, 7, 8}));
  ref::SplitQkv({qkv.data(), q.data(), k.data(), v.data(), w.data(), w.data(), 1e-6f, pos.data(),
                 inv_freq.data(), 2, 1, 1, 2, 2, RopeStyle::kHalf});
  const float rms = std::sqrt((9.f + 16.f) / 2);  // token 0's q row
  EXPECT_NEAR(q[0], 3 / rms, kTol);
  EXPECT_NEAR(q[1], 2 * 4 / rms, kTol);
  EXPECT_NEAR(k[1], 2 * 2 / std::sqrt(2.f), kTol);
  EXPECT_EQ(v, (std::vector<float>{5, 6, 7, 8}));
}

TEST(DenseOpsRefTest, SiluMulByHand) {
  const std::vector<float> gate_up = {0.f, 1.f, -1.f, 5.f, 2.f, 1.f};  // [1, 2*3]
  std::vector<float> out(3);
  ref::SiluMul({gate_up.data(), out.data(), 1, 3});
  EXPECT_EQ(out[0], 0.f);
  EXPECT_NEAR(out[1], 2.f / (1.f + std::exp(-1.f)), kTol);
  EXPECT_NEAR(out[2], -1.f / (1.f + std::exp(1.f)), kTol);
}

TEST(DenseOpsRefTest, GreedyPickByHand) {
  const float inf = std::numeric_limits<float>::infinity(), nan = std::nanf("");
  // Rows: a tie (the first wins), NaN beside the max, all -inf, all NaN, NaN then -inf.
  const std::vector<float> logits = {1.f,  3.f,  3.f, 0.f, nan, 2.f, nan, -1.f, -inf, -inf,
                                     -inf, -inf, nan, nan, nan, nan, nan, -inf, nan,  -inf};
  std::vector<int32_t> token(5, -1);
  std::vector<float> logprob(5);
  ref::GreedyPick({logits.data(), token.data(), logprob.data(), 5, 4});
  EXPECT_EQ(token, (std::vector<int32_t>{1, 1, 0, 0, 1}));
  EXPECT_NEAR(logprob[0], -std::log(2 + std::exp(-2.f) + std::exp(-3.f)), kTol);
  EXPECT_NEAR(logprob[1], -std::log(1 + std::exp(-3.f)), kTol);  // NaN terms left out
  EXPECT_EQ(logprob[2], inf);                                    // no finite logit
  EXPECT_EQ(logprob[3], inf);
  EXPECT_EQ(logprob[4], inf);
}

TEST(DenseOpsRefTest, CopyRowsGathersByIndex) {
  // 4 source rows of 3 words; dst rows 2, 0 and 3 from src rows 1, 3 and 1; dst row 1 untouched.
  const std::vector<int32_t> src = {0, 1, 2, 10, 11, 12, 20, 21, 22, 30, 31, 32};
  std::vector<int32_t> dst(12, -1);
  const std::vector<int32_t> from = {1, 3, 1}, to = {2, 0, 3};
  ref::CopyRows({src.data(), dst.data(), from.data(), to.data(), 3, 3});
  EXPECT_EQ(dst, (std::vector<int32_t>{30, 31, 32, -1, -1, -1, 10, 11, 12, 10, 11, 12}));
}

TEST(DenseOpsRefTest, KvAppendWritesPagedSlot) {
  constexpr int kHeads = 2, kDim = 2, kBlocks = 2;
  std::vector<Bf16> k_cache(kBlocks * kHeads * kKvBlockSize * kDim, B(0.f));
  std::vector<Bf16> v_cache = k_cache;
  // One token, stride 6 (k/v rows inside a wider row); slot 65 = block 1, offset 1.
  const std::vector<float> k = {1.00390625f, 2.f, 3.f, 4.f, -9.f, -9.f};
  const std::vector<float> v = {5.f, 6.f, 7.f, 1.01171875f, -9.f, -9.f};
  const int32_t slot = kKvBlockSize + 1;
  ref::KvAppend({k.data(), v.data(), &slot, k_cache.data(), v_cache.data(), 1, kHeads, kDim, 6, 6});
  auto at = [&](const std::vector<Bf16>& c, int h, int d) {
    return Bf16ToFloat(c[((1 * kHeads + h) * kKvBlockSize + 1) * kDim + d]);
  };
  EXPECT_EQ(at(k_cache, 0, 0), 1.f);  // rounded to bf16
  EXPECT_EQ(at(k_cache, 0, 1), 2.f);
  EXPECT_EQ(at(k_cache, 1, 0), 3.f);
  EXPECT_EQ(at(k_cache, 1, 1), 4.f);
  EXPECT_EQ(at(v_cache, 1, 1), 1.015625f);
  int nonzero = 0;
  for (const Bf16& b : k_cache) nonzero += b.bits != 0;
  EXPECT_EQ(nonzero, 4);
}

TEST(DenseOpsRefTest, DecodeAttentionByHand) {
  // One KV head, head_dim 2, one sequence of two tokens in block 1 (block 0 unused).
  constexpr int kDim = 2;
  std::vector<Bf16> k_cache(2 * kKvBlockSize * kDim, B(0.f)), v_cache = k_cache;
  auto put = [&](std::vector<Bf16>& c, int pos, float a, float b) {
    c[(kKvBlockSize + pos) * kDim] = B(a);
    c[(kKvBlockSize + pos) * kDim + 1] = B(b);
  };
  put(k_cache, 0, 1.f, 0.f);
  put(k_cache, 1, 0.f, 1.f);
  put(v_cache, 0, 2.f, 4.f);
  put(v_cache, 1, 6.f, 8.f);
  const std::vector<float> q = {1.f, 0.f};
  const int32_t table = 1, len = 2;
  std::vector<float> out(2);
  float lse = 0.f;
  PagedDecodeParams p{};
  p.q = q.data();
  p.k_cache = k_cache.data();
  p.v_cache = v_cache.data();
  p.block_table = &table;
  p.seq_lens = &len;
  p.out = out.data();
  p.maybe_lse = &lse;
  p.io_dtype = DType::kF32;
  p.batch = p.num_q_heads = p.num_kv_heads = p.max_blocks_per_seq = 1;
  p.head_dim = kDim;
  p.max_seq_len = 2;
  p.scale = 1.f;
  ref::PagedDecodeAttention(p);
  // Scores [1, 0]: weights e/(e+1), 1/(e+1).
  const float w0 = std::exp(1.f) / (std::exp(1.f) + 1.f), w1 = 1.f - w0;
  EXPECT_NEAR(out[0], 2 * w0 + 6 * w1, kTol);
  EXPECT_NEAR(out[1], 4 * w0 + 8 * w1, kTol);
  EXPECT_NEAR(lse, std::log(std::exp(1.f) + 1.f), kTol);
}

}  // namespace
}  // namespace asynctls::kernels
