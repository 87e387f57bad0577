// The CPU oracle of paged attention (ref::PagedDecodeAttention / PagedPrefillAttention) against
// a naive dense formula in double precision over contiguous copies of each sequence's K/V, on
// caches with shuffled block tables and NaN in every slot no sequence owns.
#include <gtest/gtest.h>

#include <cmath>
#include <vector>

#include "asynctls/kernels/ref.h"
#include "kernels/test_util.h"

namespace asynctls::kernels {
namespace {

using testing::MakePagedKvCache;
using testing::MakeTyped;
using testing::PagedKvCache;

// softmax(scale * q K^T) V over the first n rows of dense K/V ([n, d]); returns the LSE.
double DenseAttention(const float* q, const std::vector<float>& k, const std::vector<float>& v,
                      int n, int d, float scale, std::vector<double>* out) {
  std::vector<double> s(n);
  double mx = -INFINITY;
  for (int j = 0; j < n; ++j) {
    double dot = 0;
    for (int i = 0; i < d; ++i) dot += double{q[i]} * k[size_t(j) * d + i];
    s[j] = dot * scale;
    mx = std::max(mx, s[j]);
  }
  double den = 0;
  for (int j = 0; j < n; ++j) den += std::exp(s[j] - mx);
  out->assign(d, 0.0);
  for (int j = 0; j < n; ++j) {
    const double w = std::exp(s[j] - mx) / den;
    for (int i = 0; i < d; ++i) (*out)[i] += w * v[size_t(j) * d + i];
  }
  return mx + std::log(den);
}

struct Shape {
  int num_q_heads, num_kv_heads, head_dim;
  DType io;
};

class PagedAttentionRefTest : public ::testing::TestWithParam<Shape> {};

TEST_P(PagedAttentionRefTest, DecodeMatchesDenseFormula) {
  const Shape sh = GetParam();
  testing::Reseed(17 + sh.num_q_heads * 31 + sh.head_dim);
  const std::vector<int32_t> lens = {1, 17, 97, 130, 64};
  const PagedKvCache c = MakePagedKvCache(lens, sh.num_kv_heads, sh.head_dim);
  const int batch = c.batch(), d = sh.head_dim;
  auto q = MakeTyped(testing::RandomNormal(size_t(batch) * sh.num_q_heads * d), sh.io);
  std::vector<uint8_t> out(q.bytes.size());
  std::vector<float> lse(size_t(batch) * sh.num_q_heads, NAN);

  PagedDecodeParams p{};
  p.q = q.data();
  p.k_cache = c.k.data();
  p.v_cache = c.v.data();
  p.block_table = c.block_table.data();
  p.seq_lens = c.seq_lens.data();
  p.out = out.data();
  p.maybe_lse = lse.data();
  p.io_dtype = sh.io;
  p.batch = batch;
  p.num_q_heads = sh.num_q_heads;
  p.num_kv_heads = sh.num_kv_heads;
  p.head_dim = d;
  p.max_blocks_per_seq = c.max_blocks_per_seq;
  p.max_seq_len = c.max_seq_len();
  p.scale = 1.f / std::sqrt(float(d));
  ref::PagedDecodeAttention(p);

  const auto got = testing::ReadTyped(out.data(), sh.io, q.size());
  const int group = sh.num_q_heads / sh.num_kv_heads;
  std::vector<float> want(q.size()), want_lse(lse.size());
  for (int b = 0; b < batch; ++b) {
    for (int h = 0; h < sh.num_q_heads; ++h) {
      const auto k = c.Dense(c.k, b, h / group), v = c.Dense(c.v, b, h / group);
      std::vector<double> o;
      const size_t row = size_t(b) * sh.num_q_heads + h;
      want_lse[row] = float(DenseAttention(&q.values[row * d], k, v, lens[b], d, p.scale, &o));
      for (int i = 0; i < d; ++i) {
        // bf16 io rounds the output once; compare against the same rounding.
        want[row * d + i] = sh.io == DType::kBF16 ? RoundToBf16(float(o[i])) : float(o[i]);
      }
    }
  }
  EXPECT_EQ(testing::CountNonFinite(got), 0u);
  const double tol_nmse = sh.io == DType::kBF16 ? 1e-5 : 1e-10;
  EXPECT_LE(testing::Nmse(got, want), tol_nmse);
  EXPECT_LE(testing::MaxAbsDiff(got, want), sh.io == DType::kBF16 ? 1e-2 : 1e-5);
  EXPECT_LE(testing::MaxAbsDiff(lse, want_lse), 1e-4);
}

TEST_P(PagedAttentionRefTest, PrefillMatchesDenseCausalFormula) {
  const Shape sh = GetParam();
  testing::Reseed(23 + sh.num_q_heads * 7 + sh.head_dim);
  // (seq_len, q_len): a fresh prompt, chunks continuing a cache, a single-token chunk.
  const std::vector<int32_t> lens = {97, 150, 1, 65};
  const std::vector<int32_t> q_lens = {97, 33, 1, 1};
  const PagedKvCache c = MakePagedKvCache(lens, sh.num_kv_heads, sh.head_dim);
  const auto cu = testing::CumulativeLens(q_lens);
  const int tokens = cu.back(), d = sh.head_dim;
  auto q = MakeTyped(testing::RandomNormal(size_t(tokens) * sh.num_q_heads * d), sh.io);
  std::vector<uint8_t> out(q.bytes.size());

  PagedPrefillParams p{};
  p.q = q.data();
  p.cu_q_lens = cu.data();
  p.k_cache = c.k.data();
  p.v_cache = c.v.data();
  p.block_table = c.block_table.data();
  p.seq_lens = c.seq_lens.data();
  p.out = out.data();
  p.io_dtype = sh.io;
  p.batch = c.batch();
  p.num_tokens = tokens;
  p.num_q_heads = sh.num_q_heads;
  p.num_kv_heads = sh.num_kv_heads;
  p.head_dim = d;
  p.max_blocks_per_seq = c.max_blocks_per_seq;
  p.max_q_len = 97;
  p.scale = 1.f / std::sqrt(float(d));
  ref::PagedPrefillAttention(p);

  const auto got = testing::ReadTyped(out.data(), sh.io, q.size());
  const int group = sh.num_q_heads / sh.num_kv_heads;
  std::vector<float> want(q.size());
  for (int b = 0; b < c.batch(); ++b) {
    for (int h = 0; h < sh.num_q_heads; ++h) {
      const auto k = c.Dense(c.k, b, h / group), v = c.Dense(c.v, b, h / group);
      for (int i = 0; i < q_lens[b]; ++i) {
        const size_t row = size_t(cu[b] + i) * sh.num_q_heads + h;
        std::vector<double> o;
        DenseAttention(&q.values[row * d], k, v, lens[b] - q_lens[b] + i + 1, d, p.scale, &o);
        for (int e = 0; e < d; ++e)
          want[row * d + e] = sh.io == DType::kBF16 ? RoundToBf16(float(o[e])) : float(o[e]);
      }
    }
  }
  EXPECT_EQ(testing::CountNonFinite(got), 0u);
  EXPECT_LE(testing::Nmse(got, want), sh.io == DType::kBF16 ? 1e-5 : 1e-10);
  EXPECT_LE(testing::MaxAbsDiff(got, want), sh.io == DType::kBF16 ? 1e-2 : 1e-5);
}

INSTANTIATE_TEST_SUITE_P(Shapes, PagedAttentionRefTest,
                         ::testing::Values(Shape{4, 4, 64, DType::kF32},
                                           Shape{9, 3, 64, DType::kF32},
                                           Shape{8, 2, 128, DType::kBF16},
                                           Shape{6, 1, 128, DType::kF32}));

}  // namespace
}  // namespace asynctls::kernels
