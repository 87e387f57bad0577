// GPU compare tests of the TLS index ops: calibration, block index and INT4 token index must
// equal the CPU reference bit for bit (prefill build and incremental appends).
#include <gtest/gtest.h>

#include <cstring>
#include <tuple>
#include <vector>

#include "kernels/tls_test_util.h"

#if ASYNCTLS_HAVE_CUDA
#include "asynctls/kernels/cuda_tls.h"

namespace asynctls::kernels {
namespace {

using testing::DeviceBuffer;
using testing::Download;

#define ASSERT_CUDA(expr) ASSERT_EQ((expr), cudaSuccess) << cudaGetErrorString(expr)

template <typename T>
void ExpectBitEqual(const std::vector<T>& a, const std::vector<T>& b, const char* what) {
  ASSERT_EQ(a.size(), b.size()) << what;
  for (size_t i = 0; i < a.size(); ++i) {
    ASSERT_EQ(std::memcmp(&a[i], &b[i], sizeof(T)), 0) << what << " differs at " << i;
  }
}

TEST(TlsIndexGpuTest, CalibrationMatchesReference) {
  if (!testing::HasCudaDevice()) GTEST_SKIP() << "no CUDA device";
  testing::Reseed(101);
  for (DType dtype : {DType::kF32, DType::kBF16}) {
    const std::vector<std::tuple<int, int, int, int>> shapes = {
        {9, 3, 64, 32}, {32, 8, 128, 32}, {16, 1, 576, 128}};
    for (auto [nq, nkv, dim, nc] : shapes) {
      const int tokens = 97;
      const auto q = testing::MakeTyped(testing::RandomNormal(size_t(tokens) * nq * dim), dtype);
      const auto k = testing::MakeTyped(testing::RandomNormal(size_t(tokens) * nkv * dim), dtype);
      std::vector<float> qa(size_t(nq) * dim, 0.f), ka(size_t(nkv) * dim, 0.f);
      ref::TlsCalibStats({q.data(), k.data(), qa.data(), ka.data(), dtype, tokens, nq, nkv, dim});
      std::vector<int32_t> channels(size_t(nkv) * nc);
      std::vector<float> scores(size_t(nkv) * dim);
      ref::TlsCalibSelect({qa.data(), ka.data(), channels.data(), scores.data(), nq, nkv, dim, nc});

      DeviceBuffer dq, dk, dqa(qa.size() * 4), dka(ka.size() * 4), dch(channels.size() * 4),
          dsc(scores.size() * 4);
      ASSERT_CUDA(dq.Upload(q.bytes));
      ASSERT_CUDA(dk.Upload(k.bytes));
      ASSERT_CUDA(cudaMemset(dqa.get(), 0, dqa.bytes()));
      ASSERT_CUDA(cudaMemset(dka.get(), 0, dka.bytes()));
      ASSERT_CUDA(cuda::TlsCalibStats(
          {dq.get(), dk.get(), dqa.as<float>(), dka.as<float>(), dtype, tokens, nq, nkv, dim},
          nullptr));
      ASSERT_CUDA(cuda::TlsCalibSelect(
          {dqa.as<float>(), dka.as<float>(), dch.as<int32_t>(), dsc.as<float>(), nq, nkv, dim, nc},
          nullptr));
      ASSERT_CUDA(cudaDeviceSynchronize());
      ExpectBitEqual(Download<float>(dqa, qa.size()), qa, "q_absmax");
      ExpectBitEqual(Download<float>(dka, ka.size()), ka, "k_absmax");
      ExpectBitEqual(Download<float>(dsc, scores.size()), scores, "channel scores");
      EXPECT_EQ(Download<int32_t>(dch, channels.size()), channels);
    }
  }
}

struct IndexShape {
  std::vector<int32_t> lens;
  int nq, nkv, dim, nc;
  bool mla;
};

// cuda::TlsIndexUpdate over every cached token of the case, all at once (chunk 0) or `chunk`
// tokens of each sequence at a time, into the index pools `u` points at (the K cache and the
// tables are the device case's).
void UpdateInChunks(const testing::TlsCase& c, const testing::DeviceTlsCase& d, int chunk,
                    TlsIndexUpdateParams u) {
  int max_len = 0;
  for (int32_t l : c.seq_lens()) max_len = std::max(max_len, l);
  u.k_cache = d.k.get();
  u.block_table = d.block_table.as<int32_t>();
  u.index_table = d.index_table.as<int32_t>();
  u.batch = c.batch;
  u.num_kv_heads = c.num_kv_heads;
  u.head_dim = c.head_dim;
  u.max_blocks_per_seq = c.max_blocks_per_seq();
  u.max_new_tokens = chunk ? chunk : max_len;
  std::vector<int32_t> done(c.batch, 0);
  DeviceBuffer dstart, dend;
  for (bool more = true; more;) {
    std::vector<int32_t> end(c.batch);
    more = false;
    for (int b = 0; b < c.batch; ++b) {
      end[b] = chunk == 0 ? c.seq_lens()[b] : std::min(c.seq_lens()[b], done[b] + chunk);
    }
    ASSERT_CUDA(dstart.Upload(done));
    ASSERT_CUDA(dend.Upload(end));
    u.start_pos = dstart.as<int32_t>();
    u.seq_lens = dend.as<int32_t>();
    ASSERT_CUDA(cuda::TlsIndexUpdate(u, nullptr));
    ASSERT_CUDA(cudaStreamSynchronize(nullptr));  // before dstart / dend are reused
    done = end;
    for (int b = 0; b < c.batch; ++b) more |= done[b] < c.seq_lens()[b];
  }
}

TEST(TlsIndexGpuTest, BuildAndAppendMatchReference) {
  if (!testing::HasCudaDevice()) GTEST_SKIP() << "no CUDA device";
  const std::vector<IndexShape> shapes = {
      {{1, 17, 64, 97, 200}, 9, 3, 64, 32, false},
      {{65, 300, 1}, 8, 2, 128, 32, false},
      {{129, 513}, 4, 1, 128, 16, false},
      {{97, 250}, 16, 1, 576, 128, true},
      {{40}, 32, 1, 576, 64, true},
  };
  testing::Reseed(102);
  for (const IndexShape& s : shapes) {
    SCOPED_TRACE(::testing::Message() << "dim " << s.dim << " nc " << s.nc);
    const testing::TlsCase c =
        testing::MakeTlsCase(s.lens, s.nq, s.nkv, s.dim, s.nc, DType::kF32, s.mla);
    testing::DeviceTlsCase d;
    ASSERT_CUDA(d.Upload(c));
    // Poison the index pools the same way the reference's were before its build.
    std::vector<Bf16> poison_bf16(c.kmax.size(), testing::kBf16NaN);
    std::vector<uint8_t> poison_codes(c.codes.size(), 0xff);
    std::vector<float> poison_scales(c.scales.size(), std::numeric_limits<float>::quiet_NaN());
    for (int chunk : {0, 1, 23}) {  // 0: one-shot build; else appends of `chunk` tokens
      ASSERT_CUDA(d.kmax.Upload(poison_bf16));
      ASSERT_CUDA(d.kmin.Upload(poison_bf16));
      ASSERT_CUDA(d.codes.Upload(poison_codes));
      ASSERT_CUDA(d.scales.Upload(poison_scales));
      TlsIndexUpdateParams u{};
      u.block_kmax = d.kmax.get();
      u.block_kmin = d.kmin.get();
      u.channels = d.channels.as<int32_t>();
      u.maybe_token_codes = d.codes.as<uint8_t>();
      u.maybe_token_scales = d.scales.as<float>();
      u.num_channels = c.num_channels;
      ASSERT_NO_FATAL_FAILURE(UpdateInChunks(c, d, chunk, u));
      ASSERT_CUDA(cudaDeviceSynchronize());
      ExpectBitEqual(Download<Bf16>(d.kmax, c.kmax.size()), c.kmax, "kmax");
      ExpectBitEqual(Download<Bf16>(d.kmin, c.kmin.size()), c.kmin, "kmin");
      ExpectBitEqual(Download<uint8_t>(d.codes, c.codes.size()), c.codes, "codes");
      ExpectBitEqual(Download<float>(d.scales, c.scales.size()), c.scales, "scales");
    }
  }
}

// The int8 block index (tls_params.h): built at once and appended token by token and in
// chunks (one starting mid-block and spanning three), its codes and scales equal the reference's
// (MakeInt8BlockIndex) bit for bit, whether an append's codes merge into the row or re-code it;
// with the token index in the same launch. The last shape plants zero and NaN keys.
TEST(TlsIndexGpuTest, Int8BlockIndexMatchesReference) {
  if (!testing::HasCudaDevice()) GTEST_SKIP() << "no CUDA device";
  struct Shape {
    IndexShape s;
    bool plant;  // PlantInt8EdgeKeys (c's token index then no longer matches: not compared)
  };
  const std::vector<Shape> shapes = {
      {{{1, 17, 64, 97, 200}, 9, 3, 64, 32, false}, false},
      {{{65, 300, 1}, 8, 2, 128, 32, false}, false},
      {{{97, 250}, 16, 1, 576, 128, true}, false},
      {{{200, 90}, 8, 2, 128, 32, false}, true},
  };
  testing::Reseed(103);
  for (const Shape& shape : shapes) {
    const IndexShape& s = shape.s;
    SCOPED_TRACE(::testing::Message() << "dim " << s.dim << " plant " << shape.plant);
    testing::TlsCase c = testing::MakeTlsCase(s.lens, s.nq, s.nkv, s.dim, s.nc, DType::kF32, s.mla);
    if (shape.plant) testing::PlantInt8EdgeKeys(c);
    const testing::Int8BlockIndex want = testing::MakeInt8BlockIndex(c);
    testing::DeviceTlsCase d;
    ASSERT_CUDA(d.Upload(c));
    for (int chunk : {0, 1, 23, 130}) {  // 0: one-shot build; else appends of `chunk` tokens
      SCOPED_TRACE(::testing::Message() << "chunk " << chunk);
      DeviceBuffer kmax, kmin, scales;
      ASSERT_CUDA(kmax.Upload(std::vector<int8_t>(want.kmax.size(), 0x55)));
      ASSERT_CUDA(kmin.Upload(std::vector<int8_t>(want.kmin.size(), 0x55)));
      ASSERT_CUDA(scales.Upload(
          std::vector<float>(want.scales.size(), std::numeric_limits<float>::quiet_NaN())));
      ASSERT_CUDA(d.codes.Upload(std::vector<uint8_t>(c.codes.size(), 0xff)));
      TlsIndexUpdateParams u{};
      u.block_kmax = kmax.get();
      u.block_kmin = kmin.get();
      u.maybe_block_scales = scales.as<float>();
      if (!shape.plant) {
        u.channels = d.channels.as<int32_t>();
        u.maybe_token_codes = d.codes.as<uint8_t>();
        u.maybe_token_scales = d.scales.as<float>();
        u.num_channels = c.num_channels;
      }
      ASSERT_NO_FATAL_FAILURE(UpdateInChunks(c, d, chunk, u));
      ASSERT_CUDA(cudaDeviceSynchronize());
      ExpectBitEqual(Download<int8_t>(kmax, want.kmax.size()), want.kmax, "int8 kmax");
      ExpectBitEqual(Download<int8_t>(kmin, want.kmin.size()), want.kmin, "int8 kmin");
      ExpectBitEqual(Download<float>(scales, want.scales.size()), want.scales, "block scales");
      if (!shape.plant) {
        ExpectBitEqual(Download<uint8_t>(d.codes, c.codes.size()), c.codes, "codes");
      }
    }
  }
}

}  // namespace
}  // namespace asynctls::kernels

#else
TEST(TlsIndexGpuTest, NoCudaBuild) { GTEST_SKIP() << "built without CUDA"; }
#endif  // ASYNCTLS_HAVE_CUDA
