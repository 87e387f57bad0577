// CPU tests of the TLS reference sparse attention: equals dense attention over all positions,
// and a double-precision gather-attend over any position subset (GQA and MLA).
#include <gtest/gtest.h>

#include <cmath>
#include <vector>

#include "asynctls/kernels/ref.h"
#include "asynctls/kernels/tls_ref.h"
#include "kernels/tls_test_util.h"

namespace asynctls::kernels {
namespace {

using testing::PagedKvCache;

struct AttnRun {
  std::vector<float> out, lse;
};

AttnRun RunSparse(const PagedKvCache& kv, const testing::TypedBuffer& q, int num_q_heads,
                  int v_head_dim, bool mla, const std::vector<int32_t>& positions,
                  const std::vector<int32_t>& counts, int max_positions) {
  const int batch = kv.batch();
  std::vector<uint8_t> out(size_t(batch) * num_q_heads * v_head_dim * DTypeSize(q.dtype));
  AttnRun r;
  r.lse.assign(size_t(batch) * num_q_heads, NAN);
  TlsSparseAttentionParams p{};
  p.q = q.data();
  p.k_cache = kv.k.data();
  p.v_cache = mla ? kv.k.data() : kv.v.data();
  p.block_table = kv.block_table.data();
  p.positions = positions.data();
  p.num_positions = counts.data();
  p.out = out.data();
  p.maybe_lse = r.lse.data();
  p.io_dtype = q.dtype;
  p.batch = batch;
  p.num_q_heads = num_q_heads;
  p.num_kv_heads = kv.num_kv_heads;
  p.head_dim = kv.head_dim;
  p.v_head_dim = v_head_dim;
  p.max_blocks_per_seq = kv.max_blocks_per_seq;
  p.max_positions = max_positions;
  p.scale = 1.f / std::sqrt(float(kv.head_dim));
  ref::TlsSparseAttention(p);
  r.out = testing::ReadTyped(out.data(), q.dtype, out.size() / DTypeSize(q.dtype));
  return r;
}

TEST(TlsSparseAttentionTest, AllPositionsEqualsDenseDecode) {
  for (int head_dim : {64, 128}) {
    for (DType dtype : {DType::kF32, DType::kBF16}) {
      testing::Reseed(51 + head_dim);
      const std::vector<int32_t> lens = {1, 17, 97, 300};
      const PagedKvCache kv = testing::MakePagedKvCache(lens, 2, head_dim);
      const int nq = 6;
      const auto q = testing::MakeTyped(testing::RandomNormal(size_t(4) * nq * head_dim), dtype);
      const int max_positions = 320;
      std::vector<int32_t> positions(4 * 2 * max_positions, -1), counts(8);
      for (int b = 0; b < 4; ++b) {
        for (int g = 0; g < 2; ++g) {
          counts[b * 2 + g] = lens[b];
          for (int t = 0; t < lens[b]; ++t) positions[(b * 2 + g) * max_positions + t] = t;
        }
      }
      const AttnRun sparse =
          RunSparse(kv, q, nq, head_dim, false, positions, counts, max_positions);
      std::vector<uint8_t> out(sparse.out.size() * DTypeSize(dtype));
      std::vector<float> lse(4 * nq);
      PagedDecodeParams d{q.data(),
                          kv.k.data(),
                          kv.v.data(),
                          kv.block_table.data(),
                          kv.seq_lens.data(),
                          out.data(),
                          lse.data(),
                          nullptr,
                          dtype,
                          4,
                          nq,
                          2,
                          head_dim,
                          kv.max_blocks_per_seq,
                          300,
                          1.f / std::sqrt(float(head_dim))};
      ref::PagedDecodeAttention(d);
      const auto dense = testing::ReadTyped(out.data(), dtype, sparse.out.size());
      EXPECT_EQ(sparse.out, dense);
      EXPECT_EQ(sparse.lse, lse);
    }
  }
}

// Double-precision gather-attend over arbitrary positions (duplicates not allowed, any order).
void ExpectMatchesGather(const PagedKvCache& kv, const testing::TypedBuffer& q, int nq,
                         int v_head_dim, bool mla, const std::vector<int32_t>& positions,
                         const std::vector<int32_t>& counts, int max_positions) {
  const AttnRun r = RunSparse(kv, q, nq, v_head_dim, mla, positions, counts, max_positions);
  const int G = nq / kv.num_kv_heads;
  const double scale = 1.0 / std::sqrt(double(kv.head_dim));
  std::vector<float> want(r.out.size()), want_lse(r.lse.size());
  for (int b = 0; b < kv.batch(); ++b) {
    for (int h = 0; h < nq; ++h) {
      const int g = h / G, row = b * kv.num_kv_heads + g;
      std::vector<double> s(counts[row]);
      double m = -INFINITY;
      for (int j = 0; j < counts[row]; ++j) {
        const size_t off = kv.Offset(b, positions[row * max_positions + j], g);
        double dot = 0;
        for (int d = 0; d < kv.head_dim; ++d) {
          dot += q.values[(size_t(b) * nq + h) * kv.head_dim + d] * Bf16ToFloat(kv.k[off + d]);
        }
        s[j] = dot * scale;
        m = std::max(m, s[j]);
      }
      double z = 0;
      for (double& x : s) z += (x = std::exp(x - m));
      for (int d = 0; d < v_head_dim; ++d) {
        double o = 0;
        for (int j = 0; j < counts[row]; ++j) {
          const size_t off = kv.Offset(b, positions[row * max_positions + j], g);
          o += s[j] / z * Bf16ToFloat((mla ? kv.k : kv.v)[off + d]);
        }
        want[(size_t(b) * nq + h) * v_head_dim + d] = float(o);
      }
      want_lse[b * nq + h] = float(m + std::log(z));
    }
  }
  const double tol = q.dtype == DType::kBF16 ? 1e-5 : 1e-10;
  EXPECT_LT(testing::Nmse(r.out, want), tol);
  EXPECT_LT(testing::MaxAbsDiff(r.lse, want_lse), 1e-4);
  EXPECT_EQ(testing::CountNonFinite(r.out), 0u);
}

TEST(TlsSparseAttentionTest, SubsetMatchesGatherGqa) {
  testing::Reseed(61);
  const std::vector<int32_t> lens = {5, 130, 400};
  const PagedKvCache kv = testing::MakePagedKvCache(lens, 3, 64);
  const auto q = testing::MakeTyped(testing::RandomNormal(3 * 9 * 64), DType::kF32);
  const int max_positions = 100;
  std::vector<int32_t> positions(3 * 3 * max_positions, -1), counts(9);
  for (int r = 0; r < 9; ++r) {
    const int len = lens[r / 3];
    int n = 0;
    for (int t = r % 3; t < len && n < max_positions; t += 1 + (t % 5))
      positions[r * max_positions + n++] = t;
    counts[r] = n;
  }
  ExpectMatchesGather(kv, q, 9, 64, false, positions, counts, max_positions);
}

TEST(TlsSparseAttentionTest, SubsetMatchesGatherMla) {
  testing::Reseed(62);
  const std::vector<int32_t> lens = {70, 129};
  const PagedKvCache kv = testing::MakePagedKvCache(lens, 1, 576);
  const int nq = 16;
  const auto q = testing::MakeTyped(testing::RandomNormal(2 * nq * 576, 0.3f), DType::kBF16);
  const int max_positions = 64;
  std::vector<int32_t> positions(2 * max_positions, -1), counts(2);
  for (int b = 0; b < 2; ++b) {
    int n = 0;
    for (int t = 0; t < lens[b] && n < max_positions; t += 2)
      positions[b * max_positions + n++] = t;
    counts[b] = n;
  }
  ExpectMatchesGather(kv, q, nq, 512, true, positions, counts, max_positions);
}

}  // namespace
}  // namespace asynctls::kernels
