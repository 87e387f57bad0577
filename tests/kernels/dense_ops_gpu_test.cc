// Compare tests: every CUDA dense op (kernels/cuda/*.cu, gemm.cc) against the CPU oracle in
// kernels/ref on fresh random inputs, odd shapes, poisoned outputs and NaN checks.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "asynctls/kernels/ref.h"
#include "kernels/test_util.h"

#if ASYNCTLS_HAVE_CUDA
#include <cuda_runtime_api.h>

#include "asynctls/kernels/cuda_ops.h"

namespace asynctls::kernels {
namespace {

namespace kt = ::asynctls::kernels::testing;
using kt::DeviceBuffer;

#define ASSERT_CUDA_OK(expr)                                             \
  do {                                                                   \
    const cudaError_t _e = (expr);                                       \
    ASSERT_EQ(_e, cudaSuccess) << #expr << ": " << cudaGetErrorName(_e); \
  } while (0)

// STYLE.md's tolerance table for these ops.
constexpr double kF32ElementwiseNmse = 1e-7;
constexpr double kF32GemmNmse = 1e-7;
constexpr double kBf16GemmNmse = 1e-5;

const std::vector<int> kRows = {1, 17, 97};
const std::vector<int> kDims = {64, 128, 576, 1536, 4096};

template <typename T>
DeviceBuffer Upload(const std::vector<T>& host) {
  DeviceBuffer d;
  EXPECT_EQ(d.Upload(host), cudaSuccess);
  return d;
}

template <typename T>
std::vector<T> Download(const DeviceBuffer& d, size_t count, size_t offset_elems = 0) {
  std::vector<T> host(count);
  EXPECT_EQ(
      cudaMemcpy(host.data(), d.as<T>() + offset_elems, count * sizeof(T), cudaMemcpyDeviceToHost),
      cudaSuccess);
  return host;
}

// Every element finite and NMSE within `nmse` of the oracle.
void ExpectClose(const std::vector<float>& actual, const std::vector<float>& expected,
                 double nmse) {
  ASSERT_EQ(actual.size(), expected.size());
  EXPECT_EQ(kt::CountNonFinite(actual), 0u) << "non-finite outputs (poison not overwritten?)";
  EXPECT_LE(kt::Nmse(actual, expected), nmse) << "max-abs " << kt::MaxAbsDiff(actual, expected);
}

template <typename T>
void ExpectBitExact(const std::vector<T>& actual, const std::vector<T>& expected) {
  ASSERT_EQ(actual.size(), expected.size());
  size_t mismatches = 0, first = 0;
  for (size_t i = 0; i < actual.size(); ++i) {
    if (std::memcmp(&actual[i], &expected[i], sizeof(T)) != 0) {
      if (mismatches++ == 0) first = i;
    }
  }
  EXPECT_EQ(mismatches, 0u) << "first mismatch at element " << first;
}

class DenseOpsGpuTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!kt::HasCudaDevice()) GTEST_SKIP() << "no CUDA device";
    seed_ = std::random_device{}();
    kt::Reseed(seed_);
  }
  std::string SeedTrace() const { return "seed " + std::to_string(seed_); }
  uint64_t seed_ = 0;
};

TEST_F(DenseOpsGpuTest, EmbeddingMatchesOracleExactly) {
  SCOPED_TRACE(SeedTrace());
  constexpr int kVocab = 1000;
  for (DType dtype : {DType::kF32, DType::kBF16}) {
    for (int dim : {64, 66, 576, 1536, 4096}) {
      for (int tokens : kRows) {
        SCOPED_TRACE(::testing::Message()
                     << "dtype " << int(dtype) << " dim " << dim << " tokens " << tokens);
        const kt::TypedBuffer table = kt::MakeTyped(kt::RandomNormal(size_t{kVocab} * dim), dtype);
        std::vector<int32_t> ids(tokens);
        std::uniform_int_distribution<int32_t> id_dist(0, kVocab - 1);
        for (auto& id : ids) id = id_dist(kt::Rng());
        ids.back() = kVocab - 1;

        std::vector<float> expected(size_t(tokens) * dim);
        ref::Embedding({table.data(), ids.data(), expected.data(), dtype, tokens, dim, kVocab});

        DeviceBuffer d_table = Upload(table.bytes), d_ids = Upload(ids);
        DeviceBuffer d_out(expected.size() * sizeof(float));
        ASSERT_CUDA_OK(d_out.Poison());
        ASSERT_CUDA_OK(cuda::Embedding(
            {d_table.get(), d_ids.as<int32_t>(), d_out.as<float>(), dtype, tokens, dim, kVocab},
            nullptr));
        ExpectBitExact(Download<float>(d_out, expected.size()), expected);
      }
    }
  }
}

TEST_F(DenseOpsGpuTest, EmbeddingOutOfRangeIdGivesNanRow) {
  constexpr int kVocab = 10, kDim = 64;
  const std::vector<float> table = kt::RandomNormal(kVocab * kDim);
  const std::vector<int32_t> ids = {3, kVocab, -1};
  DeviceBuffer d_table = Upload(table), d_ids = Upload(ids), d_out(3 * kDim * sizeof(float));
  ASSERT_CUDA_OK(cuda::Embedding(
      {d_table.get(), d_ids.as<int32_t>(), d_out.as<float>(), DType::kF32, 3, kDim, kVocab},
      nullptr));
  const std::vector<float> out = Download<float>(d_out, 3 * kDim);
  EXPECT_EQ(kt::CountNonFinite(out.data(), kDim), 0u);
  EXPECT_EQ(kt::CountNonFinite(out.data() + kDim, 2 * kDim), size_t{2 * kDim});
}

TEST_F(DenseOpsGpuTest, RmsNormMatchesOracle) {
  SCOPED_TRACE(SeedTrace());
  std::vector<int> dims = kDims;
  dims.push_back(130);  // not a multiple of 4: scalar path
  dims.push_back(250);  // warp-per-row path, scalar
  for (int dim : dims) {
    for (int rows : kRows) {
      for (bool in_place : {false, true}) {
        SCOPED_TRACE(::testing::Message()
                     << "dim " << dim << " rows " << rows << " in_place " << in_place);
        const std::vector<float> x = kt::RandomNormal(size_t(rows) * dim, 3.f);
        const std::vector<float> weight = kt::RandomF32(dim, 0.5f, 1.5f);
        constexpr float kEps = 1e-5f;
        std::vector<float> expected(x.size());
        ref::RmsNorm({x.data(), weight.data(), expected.data(), rows, dim, kEps});

        DeviceBuffer d_x = Upload(x), d_w = Upload(weight), d_out(x.size() * sizeof(float));
        ASSERT_CUDA_OK(d_out.Poison());
        float* out = in_place ? d_x.as<float>() : d_out.as<float>();
        ASSERT_CUDA_OK(
            cuda::RmsNorm({d_x.as<float>(), d_w.as<float>(), out, rows, dim, kEps}, nullptr));
        ExpectClose(Download<float>(in_place ? d_x : d_out, x.size()), expected,
                    kF32ElementwiseNmse);
      }
    }
  }
}

std::vector<float> InvFreq(int rotary_dim, float theta) {
  std::vector<float> inv(rotary_dim / 2);
  for (int i = 0; i < rotary_dim / 2; ++i) {
    inv[i] = static_cast<float>(1.0 / std::pow(double{theta}, 2.0 * i / rotary_dim));
  }
  return inv;
}

// maybe_out_bf16: the fp32 results' bits rounded to bf16, nothing else (what the next GEMM's own
// conversion would have made of them), on the vector and scalar paths.
TEST_F(DenseOpsGpuTest, RmsNormAndSiluMulWriteBf16AsTheGemmWouldRound) {
  SCOPED_TRACE(SeedTrace());
  for (int dim : {64, 130, 250, 4096, 12288}) {
    for (int rows : kRows) {
      SCOPED_TRACE(::testing::Message() << "dim " << dim << " rows " << rows);
      const std::vector<float> x = kt::RandomNormal(size_t(rows) * 2 * dim, 3.f);
      const std::vector<float> weight = kt::RandomF32(dim, 0.5f, 1.5f);
      DeviceBuffer d_x = Upload(x), d_w = Upload(weight), d_f32(x.size() * sizeof(float)),
                   d_bf16(x.size() * sizeof(Bf16));
      auto rounded = [&](const DeviceBuffer& f32, size_t n) {
        std::vector<uint16_t> bits;
        for (float v : Download<float>(f32, n)) bits.push_back(FloatToBf16(v).bits);
        return bits;
      };
      auto bf16_bits = [&](size_t n) {
        std::vector<uint16_t> bits;
        for (Bf16 v : Download<Bf16>(d_bf16, n)) bits.push_back(v.bits);
        return bits;
      };
      const size_t n = size_t(rows) * dim;
      constexpr float kEps = 1e-5f;
      ASSERT_CUDA_OK(cuda::RmsNorm(
          {d_x.as<float>(), d_w.as<float>(), d_f32.as<float>(), rows, dim, kEps}, nullptr));
      ASSERT_CUDA_OK(d_bf16.Poison());
      ASSERT_CUDA_OK(cuda::RmsNorm(
          {d_x.as<float>(), d_w.as<float>(), nullptr, rows, dim, kEps, d_bf16.as<Bf16>()},
          nullptr));
      EXPECT_EQ(bf16_bits(n), rounded(d_f32, n)) << "RmsNorm";
      ASSERT_CUDA_OK(cuda::SiluMul({d_x.as<float>(), d_f32.as<float>(), rows, dim}, nullptr));
      ASSERT_CUDA_OK(d_bf16.Poison());
      ASSERT_CUDA_OK(
          cuda::SiluMul({d_x.as<float>(), nullptr, rows, dim, d_bf16.as<Bf16>()}, nullptr));
      EXPECT_EQ(bf16_bits(n), rounded(d_f32, n)) << "SiluMul";
    }
  }
}

TEST_F(DenseOpsGpuTest, RopeMatchesOracle) {
  SCOPED_TRACE(SeedTrace());
  struct Shape {
    int head_dim, rotary_dim, num_q_heads, num_kv_heads;
  };
  const std::vector<Shape> shapes = {
      {64, 64, 9, 3}, {128, 128, 32, 8}, {64, 32, 9, 3}, {128, 64, 4, 1}, {576, 64, 2, 1},
  };
  for (RopeStyle style : {RopeStyle::kInterleaved, RopeStyle::kHalf}) {
    for (const Shape& s : shapes) {
      for (int tokens : kRows) {
        for (int misalign : {0, 1}) {  // 1: q/k start one float in, no float2 access
          SCOPED_TRACE(::testing::Message()
                       << "style " << int(style) << " head_dim " << s.head_dim << " rotary "
                       << s.rotary_dim << " tokens " << tokens << " misalign " << misalign);
          const size_t q_n = size_t(tokens) * s.num_q_heads * s.head_dim;
          const size_t k_n = size_t(tokens) * s.num_kv_heads * s.head_dim;
          std::vector<float> q = kt::RandomNormal(q_n), k = kt::RandomNormal(k_n);
          std::vector<int32_t> positions(tokens);
          std::uniform_int_distribution<int32_t> pos_dist(0, 131071);
          for (auto& p : positions) p = pos_dist(kt::Rng());
          positions[0] = 0;
          const std::vector<float> inv_freq = InvFreq(s.rotary_dim, 100000.f);

          std::vector<float> q_pad(misalign, 0.f), k_pad(misalign, 0.f);
          q_pad.insert(q_pad.end(), q.begin(), q.end());
          k_pad.insert(k_pad.end(), k.begin(), k.end());
          DeviceBuffer d_q = Upload(q_pad), d_k = Upload(k_pad), d_pos = Upload(positions),
                       d_inv = Upload(inv_freq);

          ref::Rope({q.data(), k.data(), positions.data(), inv_freq.data(), tokens, s.num_q_heads,
                     s.num_kv_heads, s.head_dim, s.rotary_dim, style});
          ASSERT_CUDA_OK(cuda::Rope({d_q.as<float>() + misalign, d_k.as<float>() + misalign,
                                     d_pos.as<int32_t>(), d_inv.as<float>(), tokens, s.num_q_heads,
                                     s.num_kv_heads, s.head_dim, s.rotary_dim, style},
                                    nullptr));
          const std::vector<float> got_q = Download<float>(d_q, q_n, misalign);
          const std::vector<float> got_k = Download<float>(d_k, k_n, misalign);
          ExpectClose(got_q, q, kF32ElementwiseNmse);
          ExpectClose(got_k, k, kF32ElementwiseNmse);
          EXPECT_LE(kt::MaxAbsDiff(got_q, q), kt::kF32ElementwiseTol.max_abs);
          // Dims past rotary_dim pass through untouched.
          if (s.rotary_dim < s.head_dim) {
            EXPECT_EQ(got_q[s.head_dim - 1], q[s.head_dim - 1]);
          }
        }
      }
    }
  }
}

TEST_F(DenseOpsGpuTest, RopeRejectsBadRotaryDim) {
  RopeParams p{};
  p.num_tokens = 1;
  p.num_q_heads = 1;
  p.head_dim = 64;
  p.rotary_dim = 65;
  EXPECT_EQ(cuda::Rope(p, nullptr), cudaErrorInvalidValue);
  p.rotary_dim = 128;
  EXPECT_EQ(cuda::Rope(p, nullptr), cudaErrorInvalidValue);
}

TEST_F(DenseOpsGpuTest, SplitQkvMatchesOracle) {
  SCOPED_TRACE(SeedTrace());
  struct Shape {
    int head_dim, rotary_dim, num_q_heads, num_kv_heads;
    bool norm;
  };
  const std::vector<Shape> shapes = {
      {64, 64, 9, 3, false},    // SmolLM2: 15 rows, a partial last group of 4
      {128, 128, 32, 8, true},  // Qwen3-8B: q/k norm
      {128, 64, 4, 1, true},    // partial rotary
      {256, 256, 2, 1, false},  // the largest head
  };
  for (RopeStyle style : {RopeStyle::kInterleaved, RopeStyle::kHalf}) {
    for (const Shape& s : shapes) {
      for (int tokens : kRows) {
        SCOPED_TRACE(::testing::Message() << "style " << int(style) << " head_dim " << s.head_dim
                                          << " norm " << s.norm << " tokens " << tokens);
        const int heads = s.num_q_heads + 2 * s.num_kv_heads;
        const size_t q_n = size_t(tokens) * s.num_q_heads * s.head_dim;
        const size_t k_n = size_t(tokens) * s.num_kv_heads * s.head_dim;
        const std::vector<float> qkv = kt::RandomNormal(size_t(tokens) * heads * s.head_dim);
        const std::vector<float> qw = kt::RandomNormal(s.head_dim),
                                 kw = kt::RandomNormal(s.head_dim);
        std::vector<int32_t> positions(tokens);
        std::uniform_int_distribution<int32_t> pos_dist(0, 131071);
        for (auto& p : positions) p = pos_dist(kt::Rng());
        const std::vector<float> inv_freq = InvFreq(s.rotary_dim, 1000000.f);
        std::vector<float> q(q_n), k(k_n), v(k_n);
        ref::SplitQkv({qkv.data(), q.data(), k.data(), v.data(), s.norm ? qw.data() : nullptr,
                       s.norm ? kw.data() : nullptr, 1e-6f, positions.data(), inv_freq.data(),
                       tokens, s.num_q_heads, s.num_kv_heads, s.head_dim, s.rotary_dim, style});
        DeviceBuffer d_qkv = Upload(qkv), d_qw = Upload(qw), d_kw = Upload(kw),
                     d_pos = Upload(positions), d_inv = Upload(inv_freq);
        DeviceBuffer d_q = Upload(std::vector<float>(q_n)), d_k = Upload(std::vector<float>(k_n)),
                     d_v = Upload(std::vector<float>(k_n));
        ASSERT_CUDA_OK(cuda::SplitQkv(
            {d_qkv.as<float>(), d_q.as<float>(), d_k.as<float>(), d_v.as<float>(),
             s.norm ? d_qw.as<float>() : nullptr, s.norm ? d_kw.as<float>() : nullptr, 1e-6f,
             d_pos.as<int32_t>(), d_inv.as<float>(), tokens, s.num_q_heads, s.num_kv_heads,
             s.head_dim, s.rotary_dim, style},
            nullptr));
        ExpectClose(Download<float>(d_q, q_n), q, kF32ElementwiseNmse);
        ExpectClose(Download<float>(d_k, k_n), k, kF32ElementwiseNmse);
        EXPECT_EQ(Download<float>(d_v, k_n), v);  // v rows are copied as they are
      }
    }
  }
}

TEST_F(DenseOpsGpuTest, SplitQkvRejectsBadShapes) {
  SplitQkvParams p{};
  p.num_tokens = 1;
  p.num_q_heads = 1;
  p.num_kv_heads = 1;
  p.head_dim = 512;  // more than one warp's shared row
  p.rotary_dim = 64;
  EXPECT_EQ(cuda::SplitQkv(p, nullptr), cudaErrorInvalidValue);
  p.head_dim = 64;
  const float w = 1.f;
  p.maybe_q_norm = &w;  // q norm without k norm
  EXPECT_EQ(cuda::SplitQkv(p, nullptr), cudaErrorInvalidValue);
}

TEST_F(DenseOpsGpuTest, SiluMulMatchesOracle) {
  SCOPED_TRACE(SeedTrace());
  std::vector<int> dims = kDims;
  dims.push_back(1537);
  for (int dim : dims) {
    for (int rows : kRows) {
      SCOPED_TRACE(::testing::Message() << "dim " << dim << " rows " << rows);
      std::vector<float> gate_up = kt::RandomNormal(size_t(rows) * 2 * dim, 4.f);
      gate_up[0] = -120.f;  // exp overflow side of silu
      gate_up[1] = 120.f;
      std::vector<float> expected(size_t(rows) * dim);
      ref::SiluMul({gate_up.data(), expected.data(), rows, dim});
      DeviceBuffer d_in = Upload(gate_up), d_out(expected.size() * sizeof(float));
      ASSERT_CUDA_OK(d_out.Poison());
      ASSERT_CUDA_OK(cuda::SiluMul({d_in.as<float>(), d_out.as<float>(), rows, dim}, nullptr));
      ExpectClose(Download<float>(d_out, expected.size()), expected, kF32ElementwiseNmse);
    }
  }
}

// Greedy picks on the device: the oracle's tokens exactly, its logprobs to float precision.
// Vocabularies with and without 16-byte rows, a tie, NaN and all -inf / all NaN rows.
TEST_F(DenseOpsGpuTest, GreedyPickMatchesOracle) {
  SCOPED_TRACE(SeedTrace());
  const float inf = std::numeric_limits<float>::infinity(), nan = std::nanf("");
  for (int vocab : {5, 1000, 49152, 151936, 151937}) {
    const int rows = 8;
    SCOPED_TRACE(::testing::Message() << "vocab " << vocab);
    std::vector<float> logits = kt::RandomNormal(size_t(rows) * vocab, 3.f);
    logits[1] = 50.f;  // row 0: a tie between ids 1 and vocab - 1
    logits[vocab - 1] = 50.f;
    logits[vocab] = nan;                                                   // row 1: NaN first
    for (int i = 0; i < vocab; ++i) logits[2 * size_t(vocab) + i] = -inf;  // row 2
    for (int i = 0; i < vocab; ++i) logits[3 * size_t(vocab) + i] = nan;   // row 3
    std::vector<int32_t> token(rows);
    std::vector<float> logprob(rows);
    ref::GreedyPick({logits.data(), token.data(), logprob.data(), rows, vocab});
    DeviceBuffer d_logits = Upload(logits), d_token(rows * sizeof(int32_t)),
                 d_logprob(rows * sizeof(float));
    ASSERT_CUDA_OK(cuda::GreedyPick(
        {d_logits.as<float>(), d_token.as<int32_t>(), d_logprob.as<float>(), rows, vocab},
        nullptr));
    EXPECT_EQ(Download<int32_t>(d_token, rows), token);
    const std::vector<float> got = Download<float>(d_logprob, rows);
    for (int r = 0; r < rows; ++r) {
      if (std::isinf(logprob[r])) {
        EXPECT_EQ(got[r], logprob[r]) << "row " << r;
      } else {
        EXPECT_NEAR(got[r], logprob[r], 1e-5f * std::max(1.f, std::fabs(logprob[r])))
            << "row " << r;
      }
    }
  }
  EXPECT_EQ(cuda::GreedyPick({nullptr, nullptr, nullptr, 1, 0}, nullptr), cudaErrorInvalidValue);
}

// Gathers into a random permutation of rows (16-byte and 4-byte row widths); the rows no index
// names come back unchanged.
TEST_F(DenseOpsGpuTest, CopyRowsMatchesOracleExactly) {
  SCOPED_TRACE(SeedTrace());
  for (int row_words : {1, 3, 4, 1032}) {
    for (int rows : {1, 7, 300}) {
      SCOPED_TRACE(::testing::Message() << "row_words " << row_words << " rows " << rows);
      const int src_rows = rows + 5, dst_rows = rows + 2;
      std::vector<int32_t> src(size_t(src_rows) * row_words), dst(size_t(dst_rows) * row_words);
      std::uniform_int_distribution<int32_t> value(-1000000, 1000000);
      for (int32_t& v : src) v = value(kt::Rng());
      for (int32_t& v : dst) v = value(kt::Rng());
      std::vector<int32_t> to(dst_rows), from(rows);
      std::iota(to.begin(), to.end(), 0);
      std::shuffle(to.begin(), to.end(), kt::Rng());
      to.resize(rows);
      std::uniform_int_distribution<int32_t> pick(0, src_rows - 1);
      for (int32_t& r : from) r = pick(kt::Rng());
      std::vector<int32_t> expected = dst;
      ref::CopyRows({src.data(), expected.data(), from.data(), to.data(), rows, row_words});
      DeviceBuffer d_src = Upload(src), d_dst = Upload(dst), d_from = Upload(from),
                   d_to = Upload(to);
      ASSERT_CUDA_OK(cuda::CopyRows({d_src.as<int32_t>(), d_dst.as<int32_t>(), d_from.as<int32_t>(),
                                     d_to.as<int32_t>(), rows, row_words},
                                    nullptr));
      EXPECT_EQ(Download<int32_t>(d_dst, expected.size()), expected);
    }
  }
}

TEST_F(DenseOpsGpuTest, KvAppendMatchesOracleExactly) {
  SCOPED_TRACE(SeedTrace());
  struct Shape {
    int num_kv_heads, head_dim, extra_stride;
  };
  // extra_stride > 0: K/V rows sit inside a wider fused qkv row (strided access).
  const std::vector<Shape> shapes = {{3, 64, 0}, {8, 128, 4096}, {3, 64, 576}, {2, 66, 1}};
  for (const Shape& s : shapes) {
    for (int tokens : kRows) {
      SCOPED_TRACE(::testing::Message()
                   << "kv_heads " << s.num_kv_heads << " head_dim " << s.head_dim << " stride+"
                   << s.extra_stride << " tokens " << tokens);
      const int row = s.num_kv_heads * s.head_dim, stride = row + s.extra_stride;
      const int num_blocks = (tokens + kKvBlockSize - 1) / kKvBlockSize + 3;
      const size_t pool = size_t(num_blocks) * s.num_kv_heads * kKvBlockSize * s.head_dim;
      // Distinct random slots over the whole pool; the rest of the cache is random too and
      // must come back unchanged.
      std::vector<int32_t> all_slots(num_blocks * kKvBlockSize);
      std::iota(all_slots.begin(), all_slots.end(), 0);
      std::shuffle(all_slots.begin(), all_slots.end(), kt::Rng());
      std::vector<int32_t> slots(all_slots.begin(), all_slots.begin() + tokens);
      const std::vector<float> k = kt::RandomNormal(size_t(tokens) * stride);
      const std::vector<float> v = kt::RandomNormal(size_t(tokens) * stride);
      std::vector<Bf16> k_cache = kt::RandomBf16(pool), v_cache = kt::RandomBf16(pool);

      DeviceBuffer d_k = Upload(k), d_v = Upload(v), d_slots = Upload(slots),
                   d_kc = Upload(k_cache), d_vc = Upload(v_cache);
      ref::KvAppend({k.data(), v.data(), slots.data(), k_cache.data(), v_cache.data(), tokens,
                     s.num_kv_heads, s.head_dim, stride, stride});
      ASSERT_CUDA_OK(
          cuda::KvAppend({d_k.as<float>(), d_v.as<float>(), d_slots.as<int32_t>(), d_kc.get(),
                          d_vc.get(), tokens, s.num_kv_heads, s.head_dim, stride, stride},
                         nullptr));
      ExpectBitExact(Download<Bf16>(d_kc, pool), k_cache);
      ExpectBitExact(Download<Bf16>(d_vc, pool), v_cache);
    }
  }
}

TEST_F(DenseOpsGpuTest, KvAppendSkipsNegativeSlots) {
  constexpr int kHeads = 2, kDim = 64, kTokens = 3;
  const size_t pool = size_t(2) * kHeads * kKvBlockSize * kDim;
  const std::vector<float> k = kt::RandomNormal(kTokens * kHeads * kDim);
  const std::vector<float> v = kt::RandomNormal(kTokens * kHeads * kDim);
  const std::vector<int32_t> slots = {70, -1, 5};
  std::vector<Bf16> k_cache = kt::RandomBf16(pool), v_cache = kt::RandomBf16(pool);
  DeviceBuffer d_k = Upload(k), d_v = Upload(v), d_slots = Upload(slots), d_kc = Upload(k_cache),
               d_vc = Upload(v_cache);
  ASSERT_CUDA_OK(
      cuda::KvAppend({d_k.as<float>(), d_v.as<float>(), d_slots.as<int32_t>(), d_kc.get(),
                      d_vc.get(), kTokens, kHeads, kDim, kHeads * kDim, kHeads * kDim},
                     nullptr));
  // The oracle for the tokens that have a slot, one at a time.
  for (int t : {0, 2}) {
    ref::KvAppend({k.data() + t * kHeads * kDim, v.data() + t * kHeads * kDim, &slots[t],
                   k_cache.data(), v_cache.data(), 1, kHeads, kDim, kHeads * kDim, kHeads * kDim});
  }
  ExpectBitExact(Download<Bf16>(d_kc, pool), k_cache);
  ExpectBitExact(Download<Bf16>(d_vc, pool), v_cache);
}

TEST_F(DenseOpsGpuTest, ConvertF32ToBf16MatchesHostRounding) {
  SCOPED_TRACE(SeedTrace());
  for (int64_t count : {int64_t{1}, int64_t{17}, int64_t{97}, int64_t{97} * 4096 + 3}) {
    for (int misalign : {0, 1}) {
      SCOPED_TRACE(::testing::Message() << "count " << count << " misalign " << misalign);
      std::vector<float> in = kt::RandomNormal(count + misalign, 100.f);
      in[misalign] = std::numeric_limits<float>::quiet_NaN();
      if (count > 4) {
        in[misalign + 1] = std::numeric_limits<float>::infinity();
        in[misalign + 2] = 3.3961776e38f;  // 0x7f7f8000: halfway to inf, ties up to inf
        in[misalign + 3] = 1.00390625f;    // a tie: rounds to even (1.0)
      }
      std::vector<Bf16> expected(count);
      for (int64_t i = 0; i < count; ++i) expected[i] = FloatToBf16(in[misalign + i]);
      DeviceBuffer d_in = Upload(in), d_out((count + 1) * sizeof(Bf16));
      ASSERT_CUDA_OK(d_out.Poison());
      ASSERT_CUDA_OK(
          cuda::ConvertF32ToBf16(d_in.as<float>() + misalign, d_out.get(), count, nullptr));
      const std::vector<Bf16> got = Download<Bf16>(d_out, count);
      ExpectBitExact(got, expected);
    }
  }
}

struct GemmCase {
  int m, n, k;
  bool bias;
  float beta;
  int x_offset;  // floats: 1 leaves x only 4-byte aligned
  int bias_offset;
};

std::string Describe(const GemmCase& c, DType dtype) {
  return (::testing::Message() << (dtype == DType::kBF16 ? "bf16" : "fp32") << " m " << c.m << " n "
                               << c.n << " k " << c.k << " bias " << c.bias << " beta " << c.beta
                               << " x+" << c.x_offset << " bias+" << c.bias_offset)
      .GetString();
}

class GemmGpuTest : public DenseOpsGpuTest {
 protected:
  void RunCase(cuda::GemmRunner& runner, const GemmCase& c, DType dtype) {
    SCOPED_TRACE(Describe(c, dtype));
    std::vector<float> x = kt::RandomNormal(size_t(c.m) * c.k + c.x_offset);
    const kt::TypedBuffer w = kt::MakeTyped(kt::RandomNormal(size_t(c.n) * c.k, 0.05f), dtype);
    std::vector<float> bias = kt::RandomNormal(c.n + c.bias_offset);
    std::vector<float> out0 = kt::RandomNormal(size_t(c.m) * c.n);

    // Oracle. bf16 weights: the runner rounds x to bf16 too, so the oracle reads rounded x.
    std::vector<float> x_ref(x.begin() + c.x_offset, x.end());
    if (dtype == DType::kBF16) {
      for (auto& v : x_ref) v = RoundToBf16(v);
    }
    std::vector<float> expected = out0;
    ref::Gemm({x_ref.data(), w.data(), c.bias ? bias.data() + c.bias_offset : nullptr,
               expected.data(), dtype, c.m, c.n, c.k, c.beta});

    DeviceBuffer d_x = Upload(x), d_w = Upload(w.bytes), d_bias = Upload(bias),
                 d_out(out0.size() * sizeof(float));
    if (c.beta == 0.f) {
      ASSERT_CUDA_OK(d_out.Poison());  // beta 0 must not read out
    } else {
      ASSERT_CUDA_OK(d_out.Upload(out0));
    }
    GemmParams p{d_x.as<float>() + c.x_offset,
                 d_w.get(),
                 c.bias ? d_bias.as<float>() + c.bias_offset : nullptr,
                 d_out.as<float>(),
                 dtype,
                 c.m,
                 c.n,
                 c.k,
                 c.beta};
    const cudaError_t e = runner.Run(p, nullptr);
    ASSERT_EQ(e, cudaSuccess) << cudaGetErrorName(e) << " " << runner.last_error_detail();
    ASSERT_CUDA_OK(cudaDeviceSynchronize());
    ExpectClose(Download<float>(d_out, out0.size()), expected,
                dtype == DType::kBF16 ? kBf16GemmNmse : kF32GemmNmse);

    // A second run of the same shape reuses the cached plan and must give the same result.
    if (c.beta == 0.f) {
      ASSERT_CUDA_OK(d_out.Poison());
      ASSERT_EQ(runner.Run(p, nullptr), cudaSuccess) << runner.last_error_detail();
      ExpectClose(Download<float>(d_out, out0.size()), expected,
                  dtype == DType::kBF16 ? kBf16GemmNmse : kF32GemmNmse);
    }
    if (dtype != DType::kBF16) return;
    // x handed over in bf16 (maybe_x_bf16, as the norms and SiLU write it): no conversion, the
    // same bits out as converting x.
    std::vector<float> f32_x_out = Download<float>(d_out, out0.size());
    std::vector<Bf16> x_bf16(x_ref.size());
    for (size_t i = 0; i < x_ref.size(); ++i) x_bf16[i] = FloatToBf16(x[c.x_offset + i]);
    DeviceBuffer d_xb = Upload(x_bf16);
    if (c.beta != 0.f) {
      ASSERT_CUDA_OK(d_out.Upload(out0));
      ASSERT_EQ(runner.Run(p, nullptr), cudaSuccess) << runner.last_error_detail();
      f32_x_out = Download<float>(d_out, out0.size());
      ASSERT_CUDA_OK(d_out.Upload(out0));
    } else {
      ASSERT_CUDA_OK(d_out.Poison());
    }
    GemmParams pb = p;
    pb.x = nullptr;
    pb.maybe_x_bf16 = d_xb.as<Bf16>();
    ASSERT_EQ(runner.Run(pb, nullptr), cudaSuccess) << runner.last_error_detail();
    ExpectBitExact(Download<float>(d_out, out0.size()), f32_x_out);
  }
};

const std::vector<GemmCase> kGemmCases = {
    {1, 576, 576, false, 0.f, 0, 0},   {17, 1536, 576, false, 0.f, 0, 0},
    {97, 576, 1536, false, 1.f, 0, 0}, {1, 4096, 4096, false, 1.f, 0, 0},
    {17, 128, 4096, true, 0.f, 0, 0},  {97, 64, 128, true, 1.f, 0, 0},
    {17, 576, 64, true, 0.f, 0, 1},    {1, 49152, 576, false, 0.f, 0, 0},
    {97, 1536, 576, false, 0.f, 1, 0}, {17, 97, 17, true, 1.f, 1, 1},
};

TEST_F(GemmGpuTest, Fp32MatchesOracle) {
  SCOPED_TRACE(SeedTrace());
  cuda::GemmRunner* raw = nullptr;
  ASSERT_CUDA_OK(cuda::GemmRunner::Create(0, &raw));
  std::unique_ptr<cuda::GemmRunner> runner(raw);
  for (const GemmCase& c : kGemmCases) RunCase(*runner, c, DType::kF32);
}

TEST_F(GemmGpuTest, Bf16MatchesOracleOnRoundedInputs) {
  SCOPED_TRACE(SeedTrace());
  cuda::GemmRunner* raw = nullptr;
  ASSERT_CUDA_OK(cuda::GemmRunner::Create(97 * 4096, &raw));
  std::unique_ptr<cuda::GemmRunner> runner(raw);
  for (const GemmCase& c : kGemmCases) {
    if (c.k % 8 != 0) continue;  // bf16 rows of w must be 16-byte aligned for cuBLASLt
    RunCase(*runner, c, DType::kBF16);
  }
}

TEST_F(GemmGpuTest, Bf16RejectsXLargerThanScratch) {
  cuda::GemmRunner* raw = nullptr;
  ASSERT_CUDA_OK(cuda::GemmRunner::Create(16, &raw));
  std::unique_ptr<cuda::GemmRunner> runner(raw);
  GemmParams p{};
  p.w_dtype = DType::kBF16;
  p.m = 2;
  p.n = 8;
  p.k = 16;
  EXPECT_EQ(runner->Run(p, nullptr), cudaErrorInvalidValue);
  EXPECT_NE(std::string(runner->last_error_detail()), "");
}

// The ops allocate nothing and synchronize nothing, so a decode step's sequence of them can be
// captured into a CUDA graph; the replayed graph must match the oracle. The GEMM shapes are
// first seen inside the capture (the runner's plan cache fills during capture).
TEST_F(GemmGpuTest, OpsReplayFromCudaGraph) {
  SCOPED_TRACE(SeedTrace());
  constexpr int kRows = 3, kDim = 576, kFfn = 1536;
  cuda::GemmRunner* raw = nullptr;
  ASSERT_CUDA_OK(cuda::GemmRunner::Create(kRows * kDim, &raw));
  std::unique_ptr<cuda::GemmRunner> runner(raw);
  const std::vector<float> x = kt::RandomNormal(kRows * kDim);
  const std::vector<float> norm_w = kt::RandomF32(kDim, 0.5f, 1.5f);
  const kt::TypedBuffer w_up =
      kt::MakeTyped(kt::RandomNormal(size_t{2} * kFfn * kDim, 0.05f), DType::kBF16);
  const std::vector<float> w_down = kt::RandomNormal(size_t{kDim} * kFfn, 0.05f);

  // Oracle: h = norm(x); gu = h . w_up^T (bf16); a = silu_mul(gu); x += a . w_down^T (fp32).
  std::vector<float> h(x.size()), gu(size_t{kRows} * 2 * kFfn), a(size_t{kRows} * kFfn);
  std::vector<float> expected = x;
  ref::RmsNorm({x.data(), norm_w.data(), h.data(), kRows, kDim, 1e-5f});
  std::vector<float> h_rounded = h;
  for (auto& v : h_rounded) v = RoundToBf16(v);
  ref::Gemm({h_rounded.data(), w_up.data(), nullptr, gu.data(), DType::kBF16, kRows, 2 * kFfn, kDim,
             0.f});
  ref::SiluMul({gu.data(), a.data(), kRows, kFfn});
  ref::Gemm(
      {a.data(), w_down.data(), nullptr, expected.data(), DType::kF32, kRows, kDim, kFfn, 1.f});

  DeviceBuffer d_x = Upload(x), d_norm_w = Upload(norm_w), d_w_up = Upload(w_up.bytes),
               d_w_down = Upload(w_down), d_h(h.size() * 4), d_gu(gu.size() * 4), d_a(a.size() * 4);
  cudaStream_t stream = nullptr;
  ASSERT_CUDA_OK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  cudaGraph_t graph = nullptr;
  ASSERT_CUDA_OK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
  cudaError_t e = cuda::RmsNorm(
      {d_x.as<float>(), d_norm_w.as<float>(), d_h.as<float>(), kRows, kDim, 1e-5f}, stream);
  if (e == cudaSuccess) {
    e = runner->Run({d_h.as<float>(), d_w_up.get(), nullptr, d_gu.as<float>(), DType::kBF16, kRows,
                     2 * kFfn, kDim, 0.f},
                    stream);
  }
  if (e == cudaSuccess) {
    e = cuda::SiluMul({d_gu.as<float>(), d_a.as<float>(), kRows, kFfn}, stream);
  }
  if (e == cudaSuccess) {
    e = runner->Run({d_a.as<float>(), d_w_down.get(), nullptr, d_x.as<float>(), DType::kF32, kRows,
                     kDim, kFfn, 1.f},
                    stream);
  }
  const cudaError_t end = cudaStreamEndCapture(stream, &graph);
  ASSERT_EQ(e, cudaSuccess) << cudaGetErrorName(e) << " " << runner->last_error_detail();
  ASSERT_CUDA_OK(end);
  cudaGraphExec_t exec = nullptr;
  ASSERT_CUDA_OK(cudaGraphInstantiate(&exec, graph, 0));
  // Nothing ran during capture: x is still the input. One replay applies the step once.
  EXPECT_EQ(Download<float>(d_x, x.size()), x);
  ASSERT_CUDA_OK(cudaGraphLaunch(exec, stream));
  ASSERT_CUDA_OK(cudaStreamSynchronize(stream));
  // The oracle's fp32 GEMM read the rounded-h path's result; compare at the bf16 GEMM bound.
  ExpectClose(Download<float>(d_x, x.size()), expected, kBf16GemmNmse);
  cudaGraphExecDestroy(exec);
  cudaGraphDestroy(graph);
  cudaStreamDestroy(stream);
}

}  // namespace
}  // namespace asynctls::kernels

#else  // !ASYNCTLS_HAVE_CUDA

TEST(DenseOpsGpuTest, NoCudaInThisBuild) { GTEST_SKIP() << "built without CUDA"; }

#endif  // ASYNCTLS_HAVE_CUDA
