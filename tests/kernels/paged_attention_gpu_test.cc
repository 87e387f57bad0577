// CUDA paged attention (decode with split-K, chunked causal prefill) against the CPU oracle:
// fresh random inputs, odd lengths (1, 17, 97, 1000+), shuffled block tables, NaN in every
// cache slot no sequence owns, outputs and split-K workspace poisoned before every run (NaN, then
// a huge finite value), each decode run several times and required to be bit-identical, LSE
// compared too, batches whose short sequences leave most splits empty, a decode replayed from a
// CUDA graph, and decodes from several host threads on their own streams at once. All device
// work of a case is ordered on one stream. Skips without a GPU.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include "asynctls/kernels/ref.h"
#include "kernels/test_util.h"

#if ASYNCTLS_HAVE_CUDA
#include <cuda_runtime_api.h>

#include "asynctls/kernels/cuda_attention.h"
#endif

namespace asynctls::kernels {
namespace {

#if ASYNCTLS_HAVE_CUDA

using testing::DeviceBuffer;
using testing::DevicePagedKvCache;
using testing::MakePagedKvCache;
using testing::MakeTyped;
using testing::PagedKvCache;

#define ASSERT_CUDA_OK(expr)                                                   \
  do {                                                                         \
    const cudaError_t _err = (expr);                                           \
    ASSERT_EQ(_err, cudaSuccess) << #expr << ": " << cudaGetErrorString(_err); \
  } while (0)

class PagedAttentionGpuTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!testing::HasCudaDevice()) GTEST_SKIP() << "no CUDA device";
  }
};

std::string DTypeName(DType t) { return t == DType::kBF16 ? "bf16" : "f32"; }

void ExpectClose(const std::vector<float>& got, const std::vector<float>& want,
                 const std::string& what) {
  SCOPED_TRACE(what);
  ASSERT_EQ(got.size(), want.size());
  EXPECT_EQ(testing::CountNonFinite(got), 0u);
  EXPECT_LE(testing::Nmse(got, want), testing::kBf16AttentionTol.nmse);
  EXPECT_LE(testing::MaxAbsDiff(got, want), testing::kBf16AttentionTol.max_abs);
}

struct DecodeCase {
  std::vector<int32_t> seq_lens;
  int num_q_heads, num_kv_heads, head_dim;
  DType io;
  bool with_lse;
};

std::string Describe(const DecodeCase& c) {
  std::string s = "q" + std::to_string(c.num_q_heads) + "/kv" + std::to_string(c.num_kv_heads) +
                  " d" + std::to_string(c.head_dim) + " " + DTypeName(c.io) + " lens";
  for (int32_t l : c.seq_lens) s += " " + std::to_string(l);
  return s;
}

// Runs one decode case on the GPU (optionally through a captured CUDA graph) and the CPU.
void RunDecodeCase(const DecodeCase& dc, uint64_t seed, bool through_graph = false) {
  SCOPED_TRACE(Describe(dc) + " seed " + std::to_string(seed));
  testing::Reseed(seed);
  const PagedKvCache c = MakePagedKvCache(dc.seq_lens, dc.num_kv_heads, dc.head_dim);
  const int batch = c.batch(), d = dc.head_dim;
  const size_t q_elems = size_t(batch) * dc.num_q_heads * d;
  auto q = MakeTyped(testing::RandomNormal(q_elems), dc.io);

  PagedDecodeParams p{};
  p.io_dtype = dc.io;
  p.batch = batch;
  p.num_q_heads = dc.num_q_heads;
  p.num_kv_heads = dc.num_kv_heads;
  p.head_dim = d;
  p.max_blocks_per_seq = c.max_blocks_per_seq;
  p.max_seq_len = c.max_seq_len();
  p.scale = 1.f / std::sqrt(float(d));
  ASSERT_TRUE(cuda::PagedAttentionCanImplement(d, dc.io, dc.num_q_heads / dc.num_kv_heads));

  // CPU oracle.
  std::vector<uint8_t> ref_out(q.bytes.size());
  std::vector<float> ref_lse(size_t(batch) * dc.num_q_heads);
  PagedDecodeParams hp = p;
  hp.q = q.data();
  hp.k_cache = c.k.data();
  hp.v_cache = c.v.data();
  hp.block_table = c.block_table.data();
  hp.seq_lens = c.seq_lens.data();
  hp.out = ref_out.data();
  hp.maybe_lse = ref_lse.data();
  ref::PagedDecodeAttention(hp);

  // Every device operation of the case goes to one stream. (The first version of this test
  // uploaded and poisoned on the legacy default stream and launched on a non-blocking stream:
  // with other processes on the GPU the launch could overtake the q upload or the poison
  // memsets, which showed up as all-NaN or slightly wrong outputs under `ctest -j`.)
  cudaStream_t stream;
  ASSERT_CUDA_OK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  struct StreamGuard {
    cudaStream_t s;
    ~StreamGuard() {
      cudaStreamSynchronize(s);
      cudaStreamDestroy(s);
    }
  } stream_guard{stream};

  DevicePagedKvCache dev;
  ASSERT_CUDA_OK(dev.Upload(c, stream));
  DeviceBuffer dq, dout(q.bytes.size()), dlse(ref_lse.size() * sizeof(float)), dws;
  ASSERT_CUDA_OK(dq.Upload(q.bytes, stream));
  p.q = dq.get();
  p.k_cache = dev.k.get();
  p.v_cache = dev.v.get();
  p.block_table = dev.block_table.as<int32_t>();
  p.seq_lens = dev.seq_lens.as<int32_t>();
  p.out = dout.get();
  p.maybe_lse = dc.with_lse ? dlse.as<float>() : nullptr;
  const size_t ws_bytes = cuda::PagedDecodeWorkspaceBytes(p);
  ASSERT_CUDA_OK(dws.Resize(ws_bytes));
  p.workspace = dws.get();

  cudaGraphExec_t exec = nullptr;
  if (through_graph) {
    cudaGraph_t graph;
    ASSERT_CUDA_OK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeGlobal));
    const cudaError_t launch = cuda::PagedDecodeAttention(p, stream);
    ASSERT_CUDA_OK(cudaStreamEndCapture(stream, &graph));
    ASSERT_CUDA_OK(launch);
    ASSERT_CUDA_OK(cudaGraphInstantiate(&exec, graph, 0));
    cudaGraphDestroy(graph);
  }
  struct ExecGuard {
    cudaGraphExec_t e;
    ~ExecGuard() {
      if (e) cudaGraphExecDestroy(e);
    }
  } exec_guard{exec};

  // Several runs, each after re-poisoning out, LSE and the split-K workspace, alternately with
  // NaN (0xff bytes) and with a huge finite value (0x7f bytes, ~3.4e38 in fp32 and bf16): a read
  // of anything the kernels did not write this run shows as NaN or as a wrong value, even where
  // NaN would be swallowed (fmaxf). The kernels are deterministic (fixed split plan, fixed
  // reduction order), so every run must also match the first bit for bit.
  constexpr int kRuns = 4;
  std::vector<uint8_t> first_out;
  std::vector<float> first_lse;
  for (int run = 0; run < kRuns; ++run) {
    SCOPED_TRACE("run " + std::to_string(run));
    const int poison = run % 2 == 0 ? 0xff : 0x7f;
    ASSERT_CUDA_OK(dout.FillBytes(poison, stream));
    ASSERT_CUDA_OK(dlse.FillBytes(poison, stream));
    ASSERT_CUDA_OK(dws.FillBytes(poison, stream));
    if (through_graph) {
      ASSERT_CUDA_OK(cudaGraphLaunch(exec, stream));
    } else {
      ASSERT_CUDA_OK(cuda::PagedDecodeAttention(p, stream));
    }
    std::vector<uint8_t> out_bytes(q.bytes.size());
    ASSERT_CUDA_OK(dout.Download(out_bytes.data(), out_bytes.size(), stream));
    ExpectClose(testing::ReadTyped(out_bytes.data(), dc.io, q_elems),
                testing::ReadTyped(ref_out.data(), dc.io, q_elems), "decode out");
    if (run == 0) {
      first_out = out_bytes;
    } else {
      EXPECT_TRUE(out_bytes == first_out) << "decode out differs from run 0 (not deterministic)";
    }
    if (dc.with_lse) {
      std::vector<float> lse(ref_lse.size());
      ASSERT_CUDA_OK(dlse.Download(lse.data(), lse.size() * sizeof(float), stream));
      EXPECT_EQ(testing::CountNonFinite(lse), 0u);
      // The LSE of bf16-rounded scores: error ~ |score| * 2^-9.
      EXPECT_LE(testing::MaxAbsDiff(lse, ref_lse), 2e-2) << "decode lse";
      if (run == 0) {
        first_lse = lse;
      } else {
        EXPECT_TRUE(std::memcmp(lse.data(), first_lse.data(), lse.size() * sizeof(float)) == 0)
            << "decode lse differs from run 0 (not deterministic)";
      }
    }
    if (::testing::Test::HasFailure()) return;  // one report per case is enough
  }
}

TEST_F(PagedAttentionGpuTest, DecodeOddLengthsAllShapes) {
  const std::vector<std::vector<int32_t>> lens = {
      {1}, {17, 97, 1, 1000, 64, 65}, {1031, 5, 128, 63}};
  uint64_t seed = 1;
  for (int d : {64, 128}) {
    for (DType io : {DType::kF32, DType::kBF16}) {
      for (auto [hq, hkv] : {std::pair{4, 4}, {8, 2}, {9, 3}, {16, 1}, {20, 1}, {32, 8}}) {
        for (const auto& l : lens) {
          RunDecodeCase({l, hq, hkv, d, io, /*with_lse=*/(seed % 2) == 1}, seed);
          ++seed;
          if (HasFatalFailure()) return;
        }
      }
    }
  }
}

TEST_F(PagedAttentionGpuTest, DecodeLongContextManySplits) {
  // Batch 1 forces many splits; batch 6 with mixed lengths leaves some sequences with fewer
  // splits than the grid has (their extra CTAs exit, the combine reads only real splits).
  RunDecodeCase({{20000}, 32, 8, 128, DType::kBF16, true}, 101);
  RunDecodeCase({{4100, 1, 9000, 17, 2048, 333}, 32, 8, 128, DType::kBF16, true}, 102);
  RunDecodeCase({{7777, 65}, 9, 3, 64, DType::kF32, true}, 103);
}

TEST_F(PagedAttentionGpuTest, DecodeManyEmptySplits) {
  // The split count follows max_seq_len, so next to one long sequence the short ones (1, 2, 63
  // tokens: one partial page) own one split and leave every other split of the grid empty; the
  // combine must read only the splits that exist. Also page-boundary lengths (64, 65, 128, 129).
  const std::vector<int32_t> mixed = {5000, 1, 2, 63, 64, 65, 1, 129};
  RunDecodeCase({mixed, 16, 1, 64, DType::kF32, true}, 501);
  RunDecodeCase({mixed, 32, 8, 128, DType::kBF16, true}, 502);
  RunDecodeCase({mixed, 9, 3, 64, DType::kBF16, true}, 503);
  RunDecodeCase({mixed, 20, 1, 128, DType::kF32, true}, 504);
  RunDecodeCase({{1, 1, 1, 9000}, 4, 4, 128, DType::kBF16, true}, 505);
  RunDecodeCase({{12345}, 4, 4, 64, DType::kBF16, true}, 506);
  RunDecodeCase({{3, 2500, 128, 1, 4097}, 8, 2, 64, DType::kF32, false}, 507);
}

TEST_F(PagedAttentionGpuTest, DecodeSingleSplitLargeBatch) {
  // Enough (sequence, KV head) units to fill the GPU on their own: one split, the decode kernel
  // writes the output directly (no workspace, no combine), over many pages per CTA.
  std::vector<int32_t> lens;
  for (int i = 0; i < 64; ++i) lens.push_back(200 + 37 * i);
  RunDecodeCase({lens, 32, 8, 128, DType::kBF16, true}, 601);
  RunDecodeCase({lens, 16, 16, 64, DType::kF32, true}, 602);
}

TEST_F(PagedAttentionGpuTest, DecodeConcurrentThreadsAndStreams) {
  // Host threads decoding on their own streams at once, from the first call of the process on
  // (the per-device setup cache is initialised concurrently), with kernels of different shapes
  // sharing the GPU: each must still match the oracle.
  const std::vector<DecodeCase> cases = {
      {{1031, 5, 128, 63}, 16, 1, 64, DType::kF32, true},
      {{4100, 1, 9000, 17}, 32, 8, 128, DType::kBF16, true},
      {{7777, 65}, 9, 3, 64, DType::kF32, true},
      {{1, 1000, 2}, 16, 1, 128, DType::kBF16, true},
  };
  std::vector<std::thread> threads;
  for (size_t i = 0; i < cases.size(); ++i) {
    threads.emplace_back([&cases, i] { RunDecodeCase(cases[i], 701 + i); });
  }
  for (auto& t : threads) t.join();
}

TEST_F(PagedAttentionGpuTest, DecodeReplaysFromCudaGraph) {
  RunDecodeCase({{3000, 97, 1}, 32, 8, 128, DType::kBF16, true}, 201, /*through_graph=*/true);
}

TEST_F(PagedAttentionGpuTest, RejectsUnsupportedShapes) {
  EXPECT_FALSE(cuda::PagedAttentionCanImplement(96, DType::kBF16, 4));
  EXPECT_FALSE(cuda::PagedAttentionCanImplement(128, DType::kF16, 4));
  EXPECT_FALSE(cuda::PagedAttentionCanImplement(128, DType::kBF16, 0));
  EXPECT_TRUE(cuda::PagedAttentionCanImplement(64, DType::kF32, 17));
  PagedDecodeParams p{};
  EXPECT_EQ(cuda::PagedDecodeAttention(p, nullptr), cudaErrorInvalidValue);
  PagedPrefillParams pp{};
  EXPECT_EQ(cuda::PagedPrefillAttention(pp, nullptr), cudaErrorInvalidValue);
}

// The split plan, so the workspace size, follows from the shape: a caller may size the buffer
// before it has the tensors (the TLS bench did, and got 0 bytes for a split launch).
TEST_F(PagedAttentionGpuTest, DecodeWorkspaceBytesNeedNoPointers) {
  PagedDecodeParams shape{};
  shape.io_dtype = DType::kBF16;
  shape.batch = 8;
  shape.num_q_heads = 32;
  shape.num_kv_heads = 8;
  shape.head_dim = 128;
  shape.max_seq_len = 131072;
  shape.max_blocks_per_seq = 2048;
  PagedDecodeParams full = shape;
  int32_t dummy = 0;
  full.q = full.k_cache = full.v_cache = full.out = &dummy;
  full.block_table = full.seq_lens = &dummy;
  EXPECT_GT(cuda::PagedDecodeWorkspaceBytes(shape), 0u);
  EXPECT_EQ(cuda::PagedDecodeWorkspaceBytes(shape), cuda::PagedDecodeWorkspaceBytes(full));
}

struct PrefillCase {
  std::vector<int32_t> seq_lens, q_lens;
  int num_q_heads, num_kv_heads, head_dim;
  DType io;
};

void RunPrefillCase(const PrefillCase& pc, uint64_t seed) {
  std::string what = "q" + std::to_string(pc.num_q_heads) + "/kv" +
                     std::to_string(pc.num_kv_heads) + " d" + std::to_string(pc.head_dim) + " " +
                     DTypeName(pc.io) + " (seq,q):";
  for (size_t i = 0; i < pc.seq_lens.size(); ++i)
    what += " (" + std::to_string(pc.seq_lens[i]) + "," + std::to_string(pc.q_lens[i]) + ")";
  SCOPED_TRACE(what + " seed " + std::to_string(seed));
  testing::Reseed(seed);
  const PagedKvCache c = MakePagedKvCache(pc.seq_lens, pc.num_kv_heads, pc.head_dim);
  const auto cu = testing::CumulativeLens(pc.q_lens);
  const int tokens = cu.back(), d = pc.head_dim;
  const size_t q_elems = size_t(tokens) * pc.num_q_heads * d;
  auto q = MakeTyped(testing::RandomNormal(q_elems), pc.io);

  PagedPrefillParams p{};
  p.io_dtype = pc.io;
  p.batch = c.batch();
  p.num_tokens = tokens;
  p.num_q_heads = pc.num_q_heads;
  p.num_kv_heads = pc.num_kv_heads;
  p.head_dim = d;
  p.max_blocks_per_seq = c.max_blocks_per_seq;
  p.max_q_len = *std::max_element(pc.q_lens.begin(), pc.q_lens.end());
  p.scale = 1.f / std::sqrt(float(d));

  std::vector<uint8_t> ref_out(q.bytes.size());
  PagedPrefillParams hp = p;
  hp.q = q.data();
  hp.cu_q_lens = cu.data();
  hp.k_cache = c.k.data();
  hp.v_cache = c.v.data();
  hp.block_table = c.block_table.data();
  hp.seq_lens = c.seq_lens.data();
  hp.out = ref_out.data();
  ref::PagedPrefillAttention(hp);

  DevicePagedKvCache dev;
  ASSERT_CUDA_OK(dev.Upload(c));
  DeviceBuffer dq, dcu, dout(q.bytes.size());
  ASSERT_CUDA_OK(dq.Upload(q.bytes));
  ASSERT_CUDA_OK(dcu.Upload(cu));
  ASSERT_CUDA_OK(dout.Poison());
  p.q = dq.get();
  p.cu_q_lens = dcu.as<int32_t>();
  p.k_cache = dev.k.get();
  p.v_cache = dev.v.get();
  p.block_table = dev.block_table.as<int32_t>();
  p.seq_lens = dev.seq_lens.as<int32_t>();
  p.out = dout.get();
  ASSERT_CUDA_OK(cuda::PagedPrefillAttention(p, nullptr));
  ASSERT_CUDA_OK(cudaDeviceSynchronize());
  std::vector<uint8_t> out_bytes(q.bytes.size());
  ASSERT_CUDA_OK(dout.Download(out_bytes.data(), out_bytes.size()));
  ExpectClose(testing::ReadTyped(out_bytes.data(), pc.io, q_elems),
              testing::ReadTyped(ref_out.data(), pc.io, q_elems), "prefill out");
}

TEST_F(PagedAttentionGpuTest, PrefillChunksAndOddLengths) {
  // Fresh prompts (q_len == seq_len), chunks continuing a cache (seq_len > q_len, unaligned to
  // the 64-token tiles), single-token chunks, and a long prompt with several query tiles.
  const std::vector<int32_t> seq = {1, 17, 97, 300, 700, 130};
  const std::vector<int32_t> ql = {1, 17, 97, 33, 700, 1};
  uint64_t seed = 301;
  for (int d : {64, 128}) {
    for (DType io : {DType::kF32, DType::kBF16}) {
      for (auto [hq, hkv] : {std::pair{4, 4}, {9, 3}, {8, 1}}) {
        RunPrefillCase({seq, ql, hq, hkv, d, io}, seed++);
        if (HasFatalFailure()) return;
      }
    }
  }
}

TEST_F(PagedAttentionGpuTest, PrefillLongPromptQwenGroup) {
  // Qwen3-8B's group of 4 on fewer heads (the CPU oracle is the slow side).
  RunPrefillCase({{1100}, {1100}, 8, 2, 128, DType::kBF16}, 401);
  RunPrefillCase({{2500, 700}, {400, 700}, 8, 2, 128, DType::kBF16}, 402);
  RunPrefillCase({{1500}, {1500}, 4, 1, 64, DType::kF32}, 403);
}

#else
TEST(PagedAttentionGpuTest, BuiltWithoutCuda) { GTEST_SKIP() << "built without CUDA"; }
#endif  // ASYNCTLS_HAVE_CUDA

}  // namespace
}  // namespace asynctls::kernels
