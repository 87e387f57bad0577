// The CPU backend's fast paths (BLAS GEMM, tiled attention) against the reference kernels.
#include <gtest/gtest.h>

#include <cmath>
#include <numeric>
#include <random>
#include <vector>

#include "asynctls/kernels/ref.h"
#include "asynctls/runtime/backend.h"

namespace asynctls {
namespace {

using kernels::Bf16;
using kernels::DType;
using kernels::kKvBlockSize;

double Nmse(const std::vector<float>& got, const std::vector<float>& want) {
  double num = 0, den = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    num += (got[i] - want[i]) * double(got[i] - want[i]);
    den += want[i] * double(want[i]);
  }
  return num / std::max(den, 1e-30);
}

std::vector<float> Random(size_t n, std::mt19937& rng) {
  std::normal_distribution<float> d;
  std::vector<float> v(n);
  for (auto& x : v) x = d(rng);
  return v;
}

TEST(CpuBackendTest, HostBuffersHoldTheirBytesAndCopiesFillThem) {
  auto backend = MakeCpuBackend(1);
  auto host = backend->AllocateHost(1000 * sizeof(float));
  ASSERT_TRUE(host.ok()) << host.status();
  EXPECT_EQ(host->bytes(), 1000 * sizeof(float));
  auto device = backend->Allocate(1000 * sizeof(float));
  ASSERT_TRUE(device.ok());
  std::vector<float> x(1000);
  std::iota(x.begin(), x.end(), 0.f);
  ASSERT_TRUE(backend->CopyToDevice(device->data(), x.data(), device->bytes()).ok());
  ASSERT_TRUE(backend->CopyToHost(host->data(), device->data(), device->bytes()).ok());
  EXPECT_EQ(std::vector<float>(host->as<float>(), host->as<float>() + 1000), x);
  HostBuffer moved = std::move(*host);  // ownership moves; freed once
  EXPECT_EQ(moved.bytes(), 1000 * sizeof(float));
  EXPECT_TRUE(backend->AllocateHost(0).ok());
}

TEST(CpuBackendTest, GemmWithBiasAndResidualMatchesReference) {
  std::mt19937 rng(1);
  auto backend = MakeCpuBackend(2);
  const int m = 17, n = 97, k = 64;
  auto x = Random(m * k, rng), w = Random(n * k, rng), bias = Random(n, rng), out0 = Random(m * n, rng);
  for (float beta : {0.f, 1.f}) {
    auto got = out0, want = out0;
    ASSERT_TRUE(backend->Gemm({x.data(), w.data(), bias.data(), got.data(), DType::kF32, m, n, k, beta}).ok());
    kernels::ref::Gemm({x.data(), w.data(), bias.data(), want.data(), DType::kF32, m, n, k, beta});
    EXPECT_LT(Nmse(got, want), 1e-10) << "beta " << beta;
  }
}

// Builds a paged cache with a shuffled block table for `lens` sequences.
struct PagedCase {
  int kv_heads, head_dim, max_blocks;
  std::vector<Bf16> k, v;
  std::vector<int32_t> table;
};

PagedCase MakeCache(const std::vector<int>& lens, int kv_heads, int head_dim, std::mt19937& rng) {
  PagedCase c{kv_heads, head_dim, 0, {}, {}, {}};
  for (int l : lens) c.max_blocks = std::max(c.max_blocks, (l + kKvBlockSize - 1) / kKvBlockSize);
  const int total_blocks = c.max_blocks * static_cast<int>(lens.size());
  std::vector<int32_t> perm(total_blocks);
  std::iota(perm.begin(), perm.end(), 0);
  std::shuffle(perm.begin(), perm.end(), rng);
  c.table = perm;
  const size_t elems = size_t(total_blocks) * kv_heads * kKvBlockSize * head_dim;
  std::normal_distribution<float> d;
  c.k.resize(elems);
  c.v.resize(elems);
  for (size_t i = 0; i < elems; ++i) {
    c.k[i] = kernels::FloatToBf16(d(rng));
    c.v[i] = kernels::FloatToBf16(d(rng));
  }
  return c;
}

TEST(CpuBackendTest, PagedDecodeAttentionMatchesReference) {
  std::mt19937 rng(2);
  auto backend = MakeCpuBackend(2);
  const std::vector<int> lens = {1, 17, 97, 300};
  for (int head_dim : {64, 128}) {
    const int q_heads = 12, kv_heads = 3, batch = static_cast<int>(lens.size());
    PagedCase c = MakeCache(lens, kv_heads, head_dim, rng);
    auto q = Random(size_t(batch) * q_heads * head_dim, rng);
    std::vector<float> got(q.size(), NAN), want(q.size()), lse_got(batch * q_heads), lse_want(batch * q_heads);
    kernels::PagedDecodeParams p{};
    p.q = q.data();
    p.k_cache = c.k.data();
    p.v_cache = c.v.data();
    p.block_table = c.table.data();
    p.seq_lens = lens.data();
    p.io_dtype = DType::kF32;
    p.batch = batch;
    p.num_q_heads = q_heads;
    p.num_kv_heads = kv_heads;
    p.head_dim = head_dim;
    p.max_blocks_per_seq = c.max_blocks;
    p.max_seq_len = 300;
    p.scale = 1.f / std::sqrt(float(head_dim));
    p.out = got.data();
    p.maybe_lse = lse_got.data();
    ASSERT_TRUE(backend->PagedDecodeAttention(p).ok());
    p.out = want.data();
    p.maybe_lse = lse_want.data();
    kernels::ref::PagedDecodeAttention(p);
    EXPECT_LT(Nmse(got, want), 1e-10);
    EXPECT_LT(Nmse(lse_got, lse_want), 1e-10);
  }
}

TEST(CpuBackendTest, PagedPrefillAttentionMatchesReference) {
  std::mt19937 rng(3);
  auto backend = MakeCpuBackend(2);
  const std::vector<int> lens = {17, 130, 97};
  const std::vector<int> q_lens = {17, 33, 1};  // full prompt, a later chunk, one token
  std::vector<int32_t> cu = {0};
  for (int l : q_lens) cu.push_back(cu.back() + l);
  const int q_heads = 9, kv_heads = 3, head_dim = 64, batch = 3;
  PagedCase c = MakeCache(lens, kv_heads, head_dim, rng);
  auto q = Random(size_t(cu.back()) * q_heads * head_dim, rng);
  std::vector<float> got(q.size(), NAN), want(q.size());
  kernels::PagedPrefillParams p{};
  p.q = q.data();
  p.cu_q_lens = cu.data();
  p.k_cache = c.k.data();
  p.v_cache = c.v.data();
  p.block_table = c.table.data();
  p.seq_lens = lens.data();
  p.io_dtype = DType::kF32;
  p.batch = batch;
  p.num_tokens = cu.back();
  p.num_q_heads = q_heads;
  p.num_kv_heads = kv_heads;
  p.head_dim = head_dim;
  p.max_blocks_per_seq = c.max_blocks;
  p.max_q_len = 33;
  p.scale = 0.125f;
  p.out = got.data();
  ASSERT_TRUE(backend->PagedPrefillAttention(p).ok());
  p.out = want.data();
  kernels::ref::PagedPrefillAttention(p);
  EXPECT_LT(Nmse(got, want), 1e-10);
}

}  // namespace
}  // namespace asynctls
