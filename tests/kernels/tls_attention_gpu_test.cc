// GPU compare tests of the TLS sparse attention against the CPU reference: position lists from
// the reference selection (TLS budgets) and dense lists long enough to use split-K; GQA group
// sizes 1..8 at head dim 64/128, MLA (576/512, V = first 512 dims of K; tensor-core kernels) with
// 16 to 128 heads (bf16: the pipelined 16-head kernel, or from 32 heads the wide kernel, 32 or
// 64 heads per CTA), fp32 and bf16 io, V shared with K or in a pool of its own; and the device
// selection followed by the attention on one stream (the programmatic launch between them).
#include <gtest/gtest.h>

#include <cmath>
#include <vector>

#include "kernels/tls_test_util.h"

#if ASYNCTLS_HAVE_CUDA
#include "asynctls/kernels/cuda_tls.h"

namespace asynctls::kernels {
namespace {

using testing::DeviceBuffer;
using testing::Download;

#define ASSERT_CUDA(expr) ASSERT_EQ((expr), cudaSuccess) << cudaGetErrorString(expr)

struct AttnShape {
  std::vector<int32_t> lens;
  int nq, nkv, dim;
  bool mla;
  bool separate_v = false;  // MLA: V rows from a copy of the K pool (not the same pointer)
};

// The device attention over the reference's position lists against the reference attention.
// With `select_on_device` the lists come from cuda::TlsDecodeSelect into poisoned buffers on
// the same stream right before the attention, which may launch before the selection ends
// (programmatic dependent launch) and must still read its lists.
void RunCompare(const AttnShape& s, DType dtype, TlsMode mode, bool select_on_device = false) {
  SCOPED_TRACE(::testing::Message()
               << "dim " << s.dim << " G " << s.nq / s.nkv << " dtype " << int(dtype) << " mode "
               << int(mode) << " select on device " << select_on_device);
  const int nc = s.mla ? 128 : 32;
  const testing::TlsCase c = testing::MakeTlsCase(s.lens, s.nq, s.nkv, s.dim, nc, dtype, s.mla);
  testing::TlsSelectBuffers buf;
  const TlsPolicy pol = testing::MakePolicy(mode, TlsLag::kSameStep, 32, 1024, 1, 64);
  const TlsDecodeSelectParams select = testing::MakeDecodeSelectParams(c, pol, buf);
  ref::TlsDecodeSelect(select);

  const int v_dim = c.v_head_dim;
  const size_t out_elems = size_t(c.batch) * c.num_q_heads * v_dim;
  std::vector<uint8_t> out(out_elems * DTypeSize(dtype));
  std::vector<float> lse(size_t(c.batch) * c.num_q_heads);
  TlsSparseAttentionParams p{};
  p.q = c.q.data();
  p.k_cache = c.kv.k.data();
  p.v_cache = s.mla ? c.kv.k.data() : c.kv.v.data();
  p.block_table = c.kv.block_table.data();
  p.positions = buf.positions.data();
  p.num_positions = buf.num_positions.data();
  p.out = out.data();
  p.maybe_lse = lse.data();
  p.io_dtype = dtype;
  p.batch = c.batch;
  p.num_q_heads = c.num_q_heads;
  p.num_kv_heads = c.num_kv_heads;
  p.head_dim = c.head_dim;
  p.v_head_dim = v_dim;
  p.max_blocks_per_seq = c.max_blocks_per_seq();
  p.max_positions = buf.max_positions;
  p.scale = 1.f / std::sqrt(float(c.head_dim));
  ref::TlsSparseAttention(p);
  const auto want = testing::ReadTyped(out.data(), dtype, out_elems);

  testing::DeviceTlsCase d;
  ASSERT_CUDA(d.Upload(c));
  DeviceBuffer v_copy;
  if (s.separate_v) ASSERT_CUDA(v_copy.Upload(c.kv.k));
  DeviceBuffer dpos, dnum, dout(out.size()), dlse(lse.size() * 4);
  ASSERT_CUDA(dpos.Upload(buf.positions));
  ASSERT_CUDA(dnum.Upload(buf.num_positions));
  ASSERT_CUDA(dout.Poison());
  ASSERT_CUDA(dlse.Poison());
  TlsSparseAttentionParams g = p;
  g.q = d.q.get();
  g.k_cache = d.k.get();
  g.v_cache = !s.mla ? d.v.get() : s.separate_v ? v_copy.get() : d.k.get();
  g.block_table = d.block_table.as<int32_t>();
  g.positions = dpos.as<int32_t>();
  g.num_positions = dnum.as<int32_t>();
  g.out = dout.get();
  g.maybe_lse = dlse.as<float>();
  DeviceBuffer ws(std::max<size_t>(1, cuda::TlsSparseAttentionWorkspaceBytes(g)));
  g.workspace = ws.get();
  ASSERT_TRUE(cuda::TlsSparseAttentionCanImplement(g.head_dim, g.v_head_dim, s.nq / s.nkv, dtype));
  testing::DeviceSelectRun run;
  cudaStream_t stream = nullptr;
  if (select_on_device) {
    ASSERT_CUDA(run.Prepare(select, d, buf));
    ASSERT_CUDA(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
    g.positions = run.positions.as<int32_t>();
    g.num_positions = run.num_positions.as<int32_t>();
    ASSERT_CUDA(cuda::TlsDecodeSelect(run.params, stream));
  }
  ASSERT_CUDA(cuda::TlsSparseAttention(g, stream));
  ASSERT_CUDA(cudaStreamSynchronize(stream));
  if (stream) ASSERT_CUDA(cudaStreamDestroy(stream));
  std::vector<uint8_t> gout(out.size());
  ASSERT_CUDA(dout.Download(gout.data(), gout.size()));
  const auto got = testing::ReadTyped(gout.data(), dtype, out_elems);
  const auto glse = Download<float>(dlse, lse.size());
  EXPECT_EQ(testing::CountNonFinite(got), 0u);
  EXPECT_EQ(testing::CountNonFinite(glse), 0u);
  const testing::Tolerance tol =
      dtype == DType::kBF16 ? testing::kBf16AttentionTol : testing::Tolerance{1e-9, 1e-4};
  EXPECT_LE(testing::Nmse(got, want), tol.nmse);
  // bf16 outputs may round the other way (another summation order): one ulp, 2^-7 of the
  // value, allowed on top of max_abs (which alone is under one ulp from magnitude 4 up).
  const double ulp = dtype == DType::kBF16 ? 1.0 / 128 : 0.0;
  size_t worst = 0;
  double excess = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    const double e = std::fabs(double{got[i]} - want[i]) - ulp * std::fabs(want[i]);
    if (e > excess) excess = e, worst = i;
  }
  EXPECT_LE(excess, tol.max_abs) << "element " << worst << ": got " << got[worst] << ", want "
                                 << want[worst];
  EXPECT_LE(testing::MaxAbsDiff(glse, lse), 1e-3);
}

TEST(TlsSparseAttentionGpuTest, GqaMatchesReference) {
  if (!testing::HasCudaDevice()) GTEST_SKIP() << "no CUDA device";
  testing::Reseed(301);
  const std::vector<AttnShape> shapes = {
      {{1, 17, 97, 3000}, 9, 3, 64, false},  // G = 3
      {{2200, 65}, 4, 4, 64, false},         // G = 1
      {{4100, 333}, 32, 8, 128, false},      // G = 4
      {{1500}, 8, 1, 128, false},            // G = 8
      {{700}, 12, 1, 128, false},            // G = 12: two head chunks
      // 128 (sequence, KV head) rows: dense splits of 672 positions, over the 512 pool rows a
      // CTA looks up at once (two look-ups per split)
      {{4000, 3900, 3800, 3700}, 32, 32, 64, false},
  };
  for (const AttnShape& s : shapes) {
    for (DType dtype : {DType::kF32, DType::kBF16}) {
      for (TlsMode mode : {TlsMode::kTwoLevel, TlsMode::kDense}) RunCompare(s, dtype, mode);
    }
  }
}

TEST(TlsSparseAttentionGpuTest, MlaMatchesReference) {
  if (!testing::HasCudaDevice()) GTEST_SKIP() << "no CUDA device";
  testing::Reseed(302);
  const std::vector<AttnShape> shapes = {
      {{2100, 90}, 16, 1, 576, true},
      {{1300}, 32, 1, 576, true},
      {{200}, 20, 1, 576, true},  // GLM-4.7-Flash head count: a partial head chunk
      {{700, 64}, 64, 1, 576, true},
      {{300}, 128, 1, 576, true},
      // Dense lists of these lengths give the wide kernel (bf16) 3+ tiles per CTA: 64 heads, a
      // 32-head second chunk (96), RT 2 with a 16-head second chunk (48), one-token rows.
      {{9000, 4000}, 64, 1, 576, true},
      {{1, 7000}, 96, 1, 576, true},
      {{5000, 1}, 48, 1, 576, true},
      {{900, 33}, 32, 1, 576, true, true},
      // Eight rows at 16 heads (bf16: the pipelined kernel, one wave of 16 splits per row):
      // dense splits of 9 tiles (both buffers reused, their barriers' phases flip), TLS
      // splits of a full tile and a partial one, empty splits of the short rows.
      {{9000, 4000, 70, 3000, 2500, 1, 130, 600}, 16, 1, 576, true},
  };
  for (const AttnShape& s : shapes) {
    for (DType dtype : {DType::kBF16, DType::kF32}) {
      for (TlsMode mode : {TlsMode::kTwoLevel, TlsMode::kDense}) RunCompare(s, dtype, mode);
    }
  }
}

TEST(TlsSparseAttentionGpuTest, SelectThenAttendOnOneStream) {
  if (!testing::HasCudaDevice()) GTEST_SKIP() << "no CUDA device";
  testing::Reseed(303);
  const std::vector<AttnShape> shapes = {
      {{6000, 333, 4100}, 32, 8, 128, false},  // G = 4: the fused token kernel, split-K
      {{5000}, 32, 4, 128, false},             // G = 8
      {{6100, 2000}, 128, 1, 576, true},       // MLA token kernels, split-K
  };
  for (const AttnShape& s : shapes) {
    for (TlsMode mode : {TlsMode::kTwoLevel, TlsMode::kBlockOnly}) {
      RunCompare(s, DType::kBF16, mode, true);
    }
  }
}

}  // namespace
}  // namespace asynctls::kernels

#else
TEST(TlsSparseAttentionGpuTest, NoCudaBuild) { GTEST_SKIP() << "built without CUDA"; }
#endif  // ASYNCTLS_HAVE_CUDA
