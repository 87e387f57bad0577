// GPU compare tests of the TLS selection ops: scores bit-identical to the CPU reference and
// selected sets exactly equal, for every mode and both lag variants, GQA and MLA shapes.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <vector>

#include "asynctls/kernels/tls_math.h"
#include "kernels/tls_test_util.h"

#if ASYNCTLS_HAVE_CUDA
#include "asynctls/kernels/cuda_tls.h"

namespace asynctls::kernels {
namespace {

using testing::DeviceBuffer;
using testing::Download;

#define ASSERT_CUDA(expr) ASSERT_EQ((expr), cudaSuccess) << cudaGetErrorString(expr)

struct SelectShape {
  std::vector<int32_t> lens;
  int nq, nkv, dim, nc;
  DType dtype;
  bool mla;
  std::vector<int> kbs = {16, 96};  // DecodeSelectMatchesReference's k_b (all but 16: two-level)
};

std::vector<SelectShape> Shapes() {
  const std::vector<int32_t> sixteen_rows = {8600, 300, 2000, 6100, 900,  5000, 1200, 64,
                                             3000, 700, 6000, 150,  2500, 3500, 800,  6400};
  return {
      {{1, 63, 64, 65, 700, 2100}, 9, 3, 64, 32, DType::kF32, false},  // SmolLM2-like, G = 3
      {{5000, 97, 1300}, 32, 8, 128, 32, DType::kBF16, false},         // Qwen3-8B-like, G = 4
      {{3000}, 8, 1, 128, 16, DType::kF32, false},                     // G = 8
      {{900, 130}, 6, 2, 96, 32, DType::kF32, false},  // head_dim 96: generic block-score slices
      // The fused GQA token kernel's tensor-core dots: a group of 16 (C rows r + 8), and 64- and
      // 128-channel token indexes (two and four k-slices).
      {{2600, 500}, 32, 2, 128, 32, DType::kBF16, false},
      {{2100, 90}, 16, 2, 128, 64, DType::kF32, false},
      {{1700}, 8, 2, 128, 128, DType::kBF16, false},
      {{2500, 333}, 16, 1, 576, 128, DType::kBF16, true},  // MLA, G = 16
      {{1800}, 32, 1, 576, 128, DType::kBF16, true},       // MLA, G = 32
      {{1500, 700}, 64, 1, 576, 128, DType::kBF16, true},  // MLA, G = 64
      {{2200}, 128, 1, 576, 128, DType::kBF16, true},      // MLA, G = 128
      // 72 and 48 rows of 6,144 candidates at k_b 96: more clusters of 6 and 3 CTAs than one
      // wave holds on the H200, so the fused token kernel takes 4 (G = 4) and 3 (G = 8)
      // candidates per thread.
      {{6500, 6400, 700, 6300, 64, 6200, 6100, 3000, 6150}, 32, 8, 128, 32, DType::kBF16, false},
      {{6600, 3000, 6200, 5000, 100, 6300}, 64, 8, 128, 32, DType::kBF16, false},
      // MLA, 16 rows of 6,144 candidates at k_b 96: TlsTokenScoreSelect takes the one-launch
      // row kernel (MlaScoreSelectKernel) with clusters of 6 CTAs on the H200; 8 rows: clusters
      // of 9 (a non-portable size, CTAs of 11 list entries, the last one partly empty). At k_b
      // 128 (8,192 candidates: clusters of 8-16 CTAs) 16 row clusters are more than one wave, so
      // the head tiles take the rows, at two candidates per thread (32 clusters of 4 CTAs).
      {sixteen_rows, 32, 1, 576, 128, DType::kBF16, true, {16, 96, 128}},
      {{6600, 6500, 300, 6100, 2000, 6400, 900, 6300}, 16, 1, 576, 128, DType::kBF16, true},
      // MLA, 4 rows x 128 heads of 6,144 candidates: 32 (row, 16-head tile) clusters of 6 CTAs
      // are more than one wave, so the row kernel takes them (two clusters per row where that
      // halves the list entries per CTA).
      {{6600, 300, 6100, 2000}, 128, 1, 576, 128, DType::kBF16, true},
      // MLA, 8 rows of 6,144 candidates: at 128 heads two clusters of 6 CTAs per row on the H200,
      // half the heads each, two candidates per thread (MlaScoreSelectKernel split; the row's last
      // cluster adds the other's partial alpha chains and selects); at 64 heads one of 9.
      {{6600, 300, 6100, 2000, 6400, 900, 6300, 5000}, 128, 1, 576, 128, DType::kBF16, true},
      {{6500, 6600, 1200, 6200, 64, 6000, 3000, 6400}, 64, 1, 576, 128, DType::kBF16, true},
      // MLA with a 64-channel token index (its own staged-row swizzle): one cluster per row at
      // G = 16 (8 rows: with the exps in shared memory), two per row at G = 128.
      {{2500, 333}, 16, 1, 576, 64, DType::kBF16, true},
      {{6600, 6500, 300, 6100, 2000, 6400, 900, 6300}, 16, 1, 576, 64, DType::kBF16, true},
      {{6600, 300, 6100, 2000, 6400, 900, 6300, 5000}, 128, 1, 576, 64, DType::kBF16, true},
  };
}

// The device run of decode-select `p` whose reference run filled `buf` (inputs from `d`,
// outputs poisoned first): the same positions and counts, and the same blocks for the modes
// that keep blocks.
// How a device selection is launched: on one stream, or (the one-step lag) with the block
// branch on a second stream, forked before the token branch, eagerly or from a captured graph
// (the runtime's launch).
enum class Launch { kOneStream, kTwoStreams, kTwoStreamsGraph };

void ExpectDeviceSelectMatches(const TlsDecodeSelectParams& p, const testing::DeviceTlsCase& d,
                               const testing::TlsSelectBuffers& buf, int rows, TlsMode mode,
                               Launch launch = Launch::kOneStream) {
  testing::DeviceSelectRun run;
  ASSERT_CUDA(run.Prepare(p, d, buf));
  if (launch != Launch::kOneStream) {
    cudaStream_t main = nullptr, side = nullptr;
    cudaEvent_t fork = nullptr, join = nullptr;
    ASSERT_CUDA(cudaStreamCreateWithFlags(&main, cudaStreamNonBlocking));
    ASSERT_CUDA(cudaStreamCreateWithFlags(&side, cudaStreamNonBlocking));
    ASSERT_CUDA(cudaEventCreateWithFlags(&fork, cudaEventDisableTiming));
    ASSERT_CUDA(cudaEventCreateWithFlags(&join, cudaEventDisableTiming));
    const bool graph = launch == Launch::kTwoStreamsGraph;
    if (graph) ASSERT_CUDA(cudaStreamBeginCapture(main, cudaStreamCaptureModeThreadLocal));
    ASSERT_CUDA(cuda::TlsDecodeSelect(run.params, main, side, run.params.q, fork, join));
    ASSERT_CUDA(cudaStreamWaitEvent(main, join, 0));
    if (graph) {
      cudaGraph_t g = nullptr;
      cudaGraphExec_t exec = nullptr;
      ASSERT_CUDA(cudaStreamEndCapture(main, &g));
      ASSERT_CUDA(cudaGraphInstantiate(&exec, g, 0));
      ASSERT_CUDA(cudaGraphLaunch(exec, main));
      ASSERT_CUDA(cudaStreamSynchronize(main));
      cudaGraphExecDestroy(exec);
      cudaGraphDestroy(g);
    }
    ASSERT_CUDA(cudaStreamSynchronize(main));  // main waited for the side branch
    EXPECT_EQ(cudaStreamQuery(side), cudaSuccess);
    cudaEventDestroy(fork);
    cudaEventDestroy(join);
    cudaStreamDestroy(side);
    cudaStreamDestroy(main);
  } else {
    ASSERT_CUDA(cuda::TlsDecodeSelect(run.params, nullptr));
  }
  ASSERT_CUDA(cudaDeviceSynchronize());
  const auto gpn = Download<int32_t>(run.num_positions, rows);
  ASSERT_EQ(gpn, buf.num_positions);
  EXPECT_EQ(
      testing::Rows(Download<int32_t>(run.positions, buf.positions.size()), gpn, buf.max_positions),
      testing::Rows(buf.positions, buf.num_positions, buf.max_positions));
  if (mode == TlsMode::kBlockOnly || mode == TlsMode::kTwoLevel) {
    const auto gn = Download<int32_t>(run.num_blocks, rows);
    ASSERT_EQ(gn, buf.num_blocks);
    EXPECT_EQ(
        testing::Rows(Download<int32_t>(run.blocks, buf.blocks.size()), gn, buf.max_kept_blocks),
        testing::Rows(buf.blocks, buf.num_blocks, buf.max_kept_blocks));
  }
}

// Block scores of case `c` (uploaded as `d`) on the device equal the reference's bit for bit:
// as given, with the query 4 bytes off 16-byte alignment, and behind a block table wider than
// the SMs' worth of CTAs; each without and with a query-sums workspace (MLA groups of 32+ heads
// then sum their query once per row, QuerySumsKernel).
void ExpectBlockScoresMatchOnce(const testing::TlsCase& c, const testing::DeviceTlsCase& d,
                                bool query_sums) {
  const int rows = c.batch * c.num_kv_heads, mbps = c.max_blocks_per_seq();
  std::vector<float> want(size_t(rows) * mbps, 0.f);
  TlsBlockScoreParams bp{c.q.data(),           c.kmax.data(),  c.kmin.data(), c.index_table.data(),
                         c.kv.seq_lens.data(), want.data(),    c.q.dtype,     c.batch,
                         c.num_q_heads,        c.num_kv_heads, c.head_dim,    mbps};
  ref::TlsBlockScore(bp);
  DeviceBuffer dscores;
  ASSERT_CUDA(dscores.Upload(std::vector<float>(want.size(), 0.f)));
  bp.q = d.q.get();
  bp.block_kmax = d.kmax.get();
  bp.block_kmin = d.kmin.get();
  bp.index_table = d.index_table.as<int32_t>();
  bp.seq_lens = d.seq_lens.as<int32_t>();
  bp.scores = dscores.as<float>();
  DeviceBuffer dsums;
  if (query_sums) {
    ASSERT_CUDA(dsums.Upload(
        std::vector<float>(cuda::TlsBlockScoreWorkspaceBytes(bp) / sizeof(float), -1.f)));
    bp.maybe_query_sums = dsums.as<float>();
  }
  ASSERT_CUDA(cuda::TlsBlockScore(bp, nullptr));
  auto got = Download<float>(dscores, want.size());
  for (size_t i = 0; i < want.size(); ++i) {
    ASSERT_EQ(std::memcmp(&got[i], &want[i], 4), 0) << i << ": " << got[i] << " vs " << want[i];
  }
  // A query 4 bytes off 16-byte alignment: the same scores (MLA shapes sum it straight from
  // global memory instead of staging it through shared memory).
  std::vector<uint8_t> shifted(4, 0);
  shifted.insert(shifted.end(), c.q.bytes.begin(), c.q.bytes.end());
  DeviceBuffer dshifted;
  ASSERT_CUDA(dshifted.Upload(shifted));
  ASSERT_CUDA(dscores.Upload(std::vector<float>(want.size(), 0.f)));
  bp.q = static_cast<const uint8_t*>(dshifted.get()) + 4;
  ASSERT_CUDA(cuda::TlsBlockScore(bp, nullptr));
  got = Download<float>(dscores, want.size());
  for (size_t i = 0; i < want.size(); ++i) {
    ASSERT_EQ(std::memcmp(&got[i], &want[i], 4), 0) << "unaligned q, " << i;
  }
  bp.q = d.q.get();
  // The same rows behind a block table wider than the SMs' worth of 64-block CTAs (the extra
  // CTAs find no blocks).
  int sms = 0;
  ASSERT_CUDA(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
  const int wide = 64 * (sms + 1);
  std::vector<int32_t> wide_table(size_t(c.batch) * wide, 0);
  for (int b = 0; b < c.batch; ++b) {
    std::copy_n(c.index_table.begin() + int64_t{b} * mbps, mbps,
                wide_table.begin() + int64_t{b} * wide);
  }
  DeviceBuffer dwide_table, dwide_scores;
  ASSERT_CUDA(dwide_table.Upload(wide_table));
  ASSERT_CUDA(dwide_scores.Upload(std::vector<float>(size_t(rows) * wide, 0.f)));
  bp.index_table = dwide_table.as<int32_t>();
  bp.scores = dwide_scores.as<float>();
  bp.max_blocks_per_seq = wide;
  ASSERT_CUDA(cuda::TlsBlockScore(bp, nullptr));
  const auto wide_got = Download<float>(dwide_scores, size_t(rows) * wide);
  for (int r = 0; r < rows; ++r) {
    ASSERT_EQ(std::memcmp(&wide_got[size_t(r) * wide], &want[size_t(r) * mbps], 4 * mbps), 0)
        << "wide block table, row " << r;
  }
}

void ExpectBlockScoresMatch(const testing::TlsCase& c, const testing::DeviceTlsCase& d) {
  for (const bool query_sums : {false, true}) {
    SCOPED_TRACE(query_sums ? "query sums workspace" : "no workspace");
    ASSERT_NO_FATAL_FAILURE(ExpectBlockScoresMatchOnce(c, d, query_sums));
  }
}

// MLA block scores of fp32 queries: G 32 (8 heads per query stage, four stages) takes the
// streaming kernel, G 64 (eight stages) BlockScoreKernel, and with a query-sums workspace both
// stream behind QuerySumsKernel; rows of different lengths over several CTAs each.
TEST(TlsSelectGpuTest, MlaBlockScoresOfFp32QueriesAreBitIdentical) {
  if (!testing::HasCudaDevice()) GTEST_SKIP() << "no CUDA device";
  testing::Reseed(207);
  for (const int group : {32, 64}) {
    SCOPED_TRACE(::testing::Message() << "G " << group);
    const testing::TlsCase c =
        testing::MakeTlsCase({6100, 300, 4500}, group, 1, 576, 128, DType::kF32, true);
    testing::DeviceTlsCase d;
    ASSERT_CUDA(d.Upload(c));
    ASSERT_NO_FATAL_FAILURE(ExpectBlockScoresMatch(c, d));
  }
}

TEST(TlsSelectGpuTest, ScoresAreBitIdentical) {
  if (!testing::HasCudaDevice()) GTEST_SKIP() << "no CUDA device";
  testing::Reseed(201);
  for (const SelectShape& s : Shapes()) {
    SCOPED_TRACE(::testing::Message() << "dim " << s.dim << " G " << s.nq / s.nkv);
    const testing::TlsCase c =
        testing::MakeTlsCase(s.lens, s.nq, s.nkv, s.dim, s.nc, s.dtype, s.mla);
    testing::DeviceTlsCase d;
    ASSERT_CUDA(d.Upload(c));
    const int rows = c.batch * c.num_kv_heads, mbps = c.max_blocks_per_seq();
    ASSERT_NO_FATAL_FAILURE(ExpectBlockScoresMatch(c, d));
    // Token scores over every block (token-only) and over a block list.
    for (bool listed : {false, true}) {
      const int kept = 7;
      std::vector<int32_t> blocks(size_t(rows) * kept, 0), num(rows, 0);
      for (int r = 0; r < rows; ++r) {
        const int len = c.seq_lens()[r / c.num_kv_heads];
        int n = 0;
        for (int blk = 1; blk < TlsEligibleEnd(len) && n < kept; blk += 1 + (r + blk) % 3) {
          blocks[r * kept + n++] = blk;
        }
        num[r] = n;
      }
      const int max_candidates = 64 * (listed ? kept : mbps);
      std::vector<float> alpha(size_t(rows) * max_candidates, 0.f);
      std::vector<int32_t> cand(alpha.size(), -7);
      TlsTokenScoreParams tp{};
      tp.q = c.q.data();
      tp.channels = c.channels.data();
      tp.token_codes = c.codes.data();
      tp.token_scales = c.scales.data();
      tp.index_table = c.index_table.data();
      tp.seq_lens = c.kv.seq_lens.data();
      tp.maybe_blocks = listed ? blocks.data() : nullptr;
      tp.maybe_num_blocks = listed ? num.data() : nullptr;
      tp.alpha = alpha.data();
      tp.cand_positions = cand.data();
      tp.io_dtype = c.q.dtype;
      tp.batch = c.batch;
      tp.num_q_heads = c.num_q_heads;
      tp.num_kv_heads = c.num_kv_heads;
      tp.head_dim = c.head_dim;
      tp.num_channels = c.num_channels;
      tp.max_blocks_per_seq = mbps;
      tp.max_kept_blocks = kept;
      tp.max_candidates = max_candidates;
      tp.sink_blocks = 1;
      tp.window = 48;
      tp.scale = 1.f / std::sqrt(float(c.head_dim));
      ref::TlsTokenScore(tp);
      DeviceBuffer dblocks, dnum, dalpha, dcand, dws(cuda::TlsTokenScoreWorkspaceBytes(tp));
      ASSERT_CUDA(dblocks.Upload(blocks));
      ASSERT_CUDA(dnum.Upload(num));
      ASSERT_CUDA(dalpha.Upload(std::vector<float>(alpha.size(), 0.f)));
      ASSERT_CUDA(dcand.Upload(std::vector<int32_t>(cand.size(), -7)));
      TlsTokenScoreParams gp = tp;
      gp.q = d.q.get();
      gp.channels = d.channels.as<int32_t>();
      gp.token_codes = d.codes.as<uint8_t>();
      gp.token_scales = d.scales.as<float>();
      gp.index_table = d.index_table.as<int32_t>();
      gp.seq_lens = d.seq_lens.as<int32_t>();
      gp.maybe_blocks = listed ? dblocks.as<int32_t>() : nullptr;
      gp.maybe_num_blocks = listed ? dnum.as<int32_t>() : nullptr;
      gp.alpha = dalpha.as<float>();
      gp.cand_positions = dcand.as<int32_t>();
      gp.workspace = dws.get();
      ASSERT_CUDA(cuda::TlsTokenScore(gp, nullptr));
      const auto galpha = Download<float>(dalpha, alpha.size());
      const auto gcand = Download<int32_t>(dcand, cand.size());
      ASSERT_EQ(gcand, cand);
      for (size_t i = 0; i < alpha.size(); ++i) {
        if (cand[i] < 0) continue;
        ASSERT_EQ(std::memcmp(&galpha[i], &alpha[i], 4), 0)
            << "listed " << listed << " j " << i << ": " << galpha[i] << " vs " << alpha[i];
      }
    }
  }
}

// Block scores over the int8 block index (tls_params.h) equal the reference's bit for bit, and
// so does a two-level selection that reads it (its block stage).
TEST(TlsSelectGpuTest, Int8BlockIndexScoresAndSelectionMatchReference) {
  if (!testing::HasCudaDevice()) GTEST_SKIP() << "no CUDA device";
  testing::Reseed(206);
  for (const SelectShape& s : Shapes()) {
    SCOPED_TRACE(::testing::Message() << "dim " << s.dim << " G " << s.nq / s.nkv);
    const testing::TlsCase c =
        testing::MakeTlsCase(s.lens, s.nq, s.nkv, s.dim, s.nc, s.dtype, s.mla);
    const testing::Int8BlockIndex x = testing::MakeInt8BlockIndex(c);
    testing::DeviceTlsCase d;
    ASSERT_CUDA(d.Upload(c));
    DeviceBuffer kmax, kmin, scales;
    ASSERT_CUDA(kmax.Upload(x.kmax));
    ASSERT_CUDA(kmin.Upload(x.kmin));
    ASSERT_CUDA(scales.Upload(x.scales));
    const int rows = c.batch * c.num_kv_heads, mbps = c.max_blocks_per_seq();
    std::vector<float> want(size_t(rows) * mbps, 0.f);
    TlsBlockScoreParams bp{
        c.q.data(),  x.kmax.data(), x.kmin.data(),  c.index_table.data(), c.kv.seq_lens.data(),
        want.data(), c.q.dtype,     c.batch,        c.num_q_heads,        c.num_kv_heads,
        c.head_dim,  mbps,          x.scales.data()};
    ref::TlsBlockScore(bp);
    DeviceBuffer dscores;
    ASSERT_CUDA(dscores.Upload(std::vector<float>(want.size(), 0.f)));
    bp.q = d.q.get();
    bp.block_kmax = kmax.get();
    bp.block_kmin = kmin.get();
    bp.maybe_block_scales = scales.as<float>();
    bp.index_table = d.index_table.as<int32_t>();
    bp.seq_lens = d.seq_lens.as<int32_t>();
    bp.scores = dscores.as<float>();
    ASSERT_CUDA(cuda::TlsBlockScore(bp, nullptr));
    const auto got = Download<float>(dscores, want.size());
    for (size_t i = 0; i < want.size(); ++i) {
      ASSERT_EQ(std::memcmp(&got[i], &want[i], 4), 0) << i << ": " << got[i] << " vs " << want[i];
    }
    const TlsPolicy pol = testing::MakePolicy(TlsMode::kTwoLevel, TlsLag::kSameStep, 8, 256);
    testing::TlsSelectBuffers buf;
    TlsDecodeSelectParams p = testing::MakeDecodeSelectParams(c, pol, buf);
    p.block_kmax = x.kmax.data();
    p.block_kmin = x.kmin.data();
    p.maybe_block_scales = x.scales.data();
    ref::TlsDecodeSelect(p);
    testing::DeviceSelectRun run;
    ASSERT_CUDA(run.Prepare(p, d, buf));
    run.params.block_kmax = kmax.get();
    run.params.block_kmin = kmin.get();
    run.params.maybe_block_scales = scales.as<float>();
    ASSERT_CUDA(cuda::TlsDecodeSelect(run.params, nullptr));
    ASSERT_CUDA(cudaDeviceSynchronize());
    const auto gn = Download<int32_t>(run.num_blocks, rows);
    ASSERT_EQ(gn, buf.num_blocks);
    EXPECT_EQ(
        testing::Rows(Download<int32_t>(run.blocks, buf.blocks.size()), gn, buf.max_kept_blocks),
        testing::Rows(buf.blocks, buf.num_blocks, buf.max_kept_blocks));
    const auto gpn = Download<int32_t>(run.num_positions, rows);
    ASSERT_EQ(gpn, buf.num_positions);
    EXPECT_EQ(testing::Rows(Download<int32_t>(run.positions, buf.positions.size()), gpn,
                            buf.max_positions),
              testing::Rows(buf.positions, buf.num_positions, buf.max_positions));
  }
}

// Block top-k of `scores` (one KV head per sequence, one sink block) on the GPU: the reference's
// blocks and counts.
void ExpectBlockSelectMatches(const std::vector<float>& scores, const std::vector<int32_t>& lens,
                              int mbps, int kept, int k) {
  const int batch = static_cast<int>(lens.size());
  std::vector<int32_t> blocks(size_t(batch) * kept, -1), num(batch, -1);
  const TlsBlockSelectParams p{
      scores.data(), lens.data(), blocks.data(), num.data(), batch, 1, mbps, kept, k, 1};
  ref::TlsBlockSelect(p);
  DeviceBuffer ds, dl, db, dn;
  ASSERT_CUDA(ds.Upload(scores));
  ASSERT_CUDA(dl.Upload(lens));
  ASSERT_CUDA(db.Upload(std::vector<int32_t>(blocks.size(), -1)));
  ASSERT_CUDA(dn.Upload(std::vector<int32_t>(batch, -1)));
  TlsBlockSelectParams g = p;
  g.scores = ds.as<float>();
  g.seq_lens = dl.as<int32_t>();
  g.blocks = db.as<int32_t>();
  g.num_blocks = dn.as<int32_t>();
  ASSERT_CUDA(cuda::TlsBlockSelect(g, nullptr));
  const auto gnum = Download<int32_t>(dn, batch);
  ASSERT_EQ(gnum, num);
  EXPECT_EQ(testing::Rows(Download<int32_t>(db, blocks.size()), gnum, kept),
            testing::Rows(blocks, num, kept));
}

// Top-k on hand-made scores with many exact ties: the GPU keeps the CPU's set.
TEST(TlsSelectGpuTest, TopKTiesMatchReference) {
  if (!testing::HasCudaDevice()) GTEST_SKIP() << "no CUDA device";
  testing::Reseed(202);
  const std::vector<int32_t> lens = {9000, 70, 4000, 640};
  const int mbps = 141, kept = 50, batch = 4;
  std::vector<float> scores(size_t(batch) * mbps);
  for (float& s : scores) s = float(int(testing::RandomF32(1, 0.f, 6.f)[0])) - 2.f;  // 6 values
  for (int k : {0, 1, 17, 50}) {
    SCOPED_TRACE(::testing::Message() << "k " << k);
    ExpectBlockSelectMatches(scores, lens, mbps, kept, k);
  }
}

// A score of row shape `shape` (BlockTopKScoreShapesMatchReference) from r in [-1, 1].
float ShapedScore(int shape, float r) {
  const float special[] = {0.f, -0.f, INFINITY, -INFINITY, 1e-40f, -1e-40f, 1.f};
  uint32_t low12 = 0x42000000u | (static_cast<uint32_t>((r + 1.f) * 2047.f) & 0xfffu);
  float low12_score;
  std::memcpy(&low12_score, &low12, 4);
  switch (shape) {
    case 0:
      return 1.5f;
    case 1:
      return r < 0.f ? -3.f : 7.f;
    case 2:
      return r * 50.f;
    case 3:
      return 1000.f + r;
    case 4:
      return low12_score;
    default:
      return special[static_cast<size_t>((r + 1.f) * 3.499f)];
  }
}

// Block top-k over score rows that take its radix select down different paths: all equal, two
// values (the k-th key's bin taken whole), mixed signs, a narrow positive range, keys that differ
// only in their low 12 bits (every pass needed), signed zeros, infinities and subnormals; rows
// of up to 2,048 and 3,000 blocks (keys in registers, 4 and 8 per thread), 6,000 (BlockTopK
// from shared memory) and 9,000 (from global memory).
TEST(TlsSelectGpuTest, BlockTopKScoreShapesMatchReference) {
  if (!testing::HasCudaDevice()) GTEST_SKIP() << "no CUDA device";
  testing::Reseed(205);
  const int kept = 256;
  for (const int mbps : {2048, 3000, 6000, 9000}) {
    const std::vector<int32_t> lens = {mbps * 64, mbps * 64 - 100, 64 * 700 + 5, 64 * 130};
    const int batch = int(lens.size());
    for (int shape = 0; shape < 6; ++shape) {
      std::vector<float> scores(size_t(batch) * mbps);
      const std::vector<float> r = testing::RandomF32(scores.size(), -1.f, 1.f);
      for (size_t i = 0; i < scores.size(); ++i) scores[i] = ShapedScore(shape, r[i]);
      for (int k : {1, 100, 256}) {
        SCOPED_TRACE(::testing::Message() << "blocks " << mbps << " shape " << shape << " k " << k);
        ExpectBlockSelectMatches(scores, lens, mbps, kept, k);
      }
    }
  }
}

// The whole step for every mode and lag: blocks, positions and counts equal the reference.
void ExpectDecodeSelectsMatch(const SelectShape& s) {
  const testing::TlsCase c = testing::MakeTlsCase(s.lens, s.nq, s.nkv, s.dim, s.nc, s.dtype, s.mla);
  testing::DeviceTlsCase d;
  ASSERT_CUDA(d.Upload(c));
  const int rows = c.batch * c.num_kv_heads;
  // k_b 16: rows of 1,024 candidates; 96: 6,144. MLA rows of 1-2 sequences take one cluster
  // per row at 16-64 heads (4 CTAs of 4 list entries; 16 of 6) and the head tiles at 128 (one
  // row: a cluster of one CTA per tile; of 6 at one candidate per thread).
  for (const int kb : s.kbs) {
    for (TlsMode mode :
         {TlsMode::kDense, TlsMode::kBlockOnly, TlsMode::kTokenOnly, TlsMode::kTwoLevel}) {
      for (TlsLag lag : {TlsLag::kSameStep, TlsLag::kOneStep}) {
        if (lag == TlsLag::kOneStep && mode != TlsMode::kTwoLevel) continue;
        if (kb != 16 && mode != TlsMode::kTwoLevel) continue;
        SCOPED_TRACE(::testing::Message() << "dim " << s.dim << " mode " << int(mode) << " lag "
                                          << int(lag) << " k_b " << kb);
        const TlsPolicy pol = testing::MakePolicy(mode, lag, kb, 256, 1, 64);
        testing::TlsSelectBuffers buf;
        if (lag == TlsLag::kOneStep) {
          // Previous step: the same-step blocks of a sequence one token shorter.
          buf.prev_blocks.assign(size_t(rows) * kb, 0);
          buf.prev_num_blocks.assign(rows, 0);
          buf.prev_select_lens = c.seq_lens();
          for (int r = 0; r < rows; ++r) {
            int32_t& l = buf.prev_select_lens[r / c.num_kv_heads];
            if (r % c.num_kv_heads == 0 && l > 1) l -= 1;
            int n = 0;
            for (int blk = 1 + r % 2; blk < TlsEligibleEnd(l) && n < kb; blk += 2) {
              buf.prev_blocks[r * kb + n++] = blk;
            }
            buf.prev_num_blocks[r] = n;
          }
        }
        TlsDecodeSelectParams p = testing::MakeDecodeSelectParams(c, pol, buf);
        ref::TlsDecodeSelect(p);

        ExpectDeviceSelectMatches(p, d, buf, rows, mode);
        if (lag == TlsLag::kOneStep) {
          {
            SCOPED_TRACE("block branch on a second stream");
            ExpectDeviceSelectMatches(p, d, buf, rows, mode, Launch::kTwoStreams);
          }
          SCOPED_TRACE("block branch on a second stream, from a graph");
          ExpectDeviceSelectMatches(p, d, buf, rows, mode, Launch::kTwoStreamsGraph);
        }
      }
    }
  }
}

TEST(TlsSelectGpuTest, DecodeSelectMatchesReference) {
  if (!testing::HasCudaDevice()) GTEST_SKIP() << "no CUDA device";
  testing::Reseed(203);
  for (const SelectShape& s : Shapes()) ExpectDecodeSelectsMatch(s);
}

// The benchmark's MLA rows at batch 4 and 8: 32, 64 and 128 heads over 8,192 candidates (k_b
// 128). 64 and 128 heads: row clusters taking their logits from warpgroup MMA (64-head blocks;
// the exps in shared memory at batch 4, in the L2 scratch at batch 8 on the fewest CTAs); 32
// heads: float exps in shared memory at batch 4, bf16 pairs at batch 8.
TEST(TlsSelectGpuTest, DecodeSelectAtBatchedMlaRowsMatchesReference) {
  if (!testing::HasCudaDevice()) GTEST_SKIP() << "no CUDA device";
  testing::Reseed(205);
  const std::vector<int32_t> four = {8600, 8400, 9000, 8500};
  const std::vector<int32_t> eight = {8600, 8400, 9000, 8500, 8700, 8450, 8900, 8800};
  for (const int heads : {32, 64, 128}) {
    for (const auto& lens : {four, eight}) {
      SCOPED_TRACE(::testing::Message() << heads << " heads, " << lens.size() << " rows");
      ExpectDecodeSelectsMatch({lens, heads, 1, 576, 128, DType::kBF16, true, {128}});
    }
  }
}

// The token top-k's cluster-wide radix passes on rows full of exact ties: every token of a row
// repeats one of `patterns` token-index rows, so the alphas take a few values and the k-th is
// settled inside a tie (equal keys taken in position order), at a pass that depends on the
// budget. Same-step two-level and token-only, GQA and MLA rows of up to 8,192 candidates (the
// GQA kernel; MLA 128 heads: the head tiles at 1 row, two row clusters per row at 2 (16 tile
// clusters of 8 CTAs are more than one wave on the H100 and H200); 64 heads: the row kernel at
// 8); the sets must equal the CPU's.
TEST(TlsSelectGpuTest, TokenTopKTiesMatchReference) {
  if (!testing::HasCudaDevice()) GTEST_SKIP() << "no CUDA device";
  testing::Reseed(204);
  const std::vector<SelectShape> shapes = {
      {{8150, 6500, 3000}, 32, 8, 128, 32, DType::kBF16, false},
      {{8150}, 128, 1, 576, 128, DType::kBF16, true},
      {{8150, 700}, 128, 1, 576, 128, DType::kBF16, true},
      {{8150, 6400, 5000, 2000, 8100, 64, 7000, 4000}, 64, 1, 576, 128, DType::kBF16, true},
  };
  for (const SelectShape& s : shapes) {
    testing::TlsCase c = testing::MakeTlsCase(s.lens, s.nq, s.nkv, s.dim, s.nc, s.dtype, s.mla);
    const size_t code_bytes = size_t(s.nc) / 2;
    for (const int patterns : {1, 3}) {
      // Token t of every index row and KV head copies token t % patterns of index row 0.
      for (int r = 0; r < c.num_index_rows; ++r) {
        for (int h = 0; h < c.num_kv_heads; ++h) {
          for (int t = 0; t < kKvBlockSize; ++t) {
            const size_t dst = (size_t(r) * c.num_kv_heads + h) * kKvBlockSize + t;
            const size_t src = size_t(h) * kKvBlockSize + t % patterns;
            c.scales[dst] = c.scales[src];
            std::memcpy(&c.codes[dst * code_bytes], &c.codes[src * code_bytes], code_bytes);
          }
        }
      }
      testing::DeviceTlsCase d;
      ASSERT_CUDA(d.Upload(c));
      const int rows = c.batch * c.num_kv_heads;
      for (TlsMode mode : {TlsMode::kTwoLevel, TlsMode::kTokenOnly}) {
        for (const int k_t : {1, 100, 1000, 2047}) {
          SCOPED_TRACE(::testing::Message() << "dim " << s.dim << " patterns " << patterns
                                            << " mode " << int(mode) << " k_t " << k_t);
          const TlsPolicy pol = testing::MakePolicy(mode, TlsLag::kSameStep, 128, k_t, 1, 64);
          testing::TlsSelectBuffers buf;
          TlsDecodeSelectParams p = testing::MakeDecodeSelectParams(c, pol, buf);
          ref::TlsDecodeSelect(p);
          ExpectDeviceSelectMatches(p, d, buf, rows, mode);
        }
      }
    }
  }
}

// The token top-k where the passes stop on a small bin and the ranks rank its few keys
// (GatheredBin): a quarter of the tokens copy another token of their sequence, half of them one
// of their block, half one anywhere in the sequence, so equal alphas lie in one warp, across
// warps and across the cluster's ranks, and many budgets cut through a pair of them. MLA rows of
// 16 heads (8 rows: the kernel with its exps in shared memory on the H200), 64 heads and GQA.
TEST(TlsSelectGpuTest, TokenTopKScatteredTiesMatchReference) {
  if (!testing::HasCudaDevice()) GTEST_SKIP() << "no CUDA device";
  testing::Reseed(205);
  const std::vector<SelectShape> shapes = {
      {{8150, 6500, 3000}, 32, 8, 128, 32, DType::kBF16, false},
      {{8150, 8150, 8150, 8150, 8150, 8150, 8150, 8150}, 16, 1, 576, 128, DType::kBF16, true},
      {{8150, 6400, 5000, 2000}, 64, 1, 576, 128, DType::kBF16, true},
  };
  std::mt19937 rng(205);
  for (const SelectShape& s : shapes) {
    testing::TlsCase c = testing::MakeTlsCase(s.lens, s.nq, s.nkv, s.dim, s.nc, s.dtype, s.mla);
    const size_t code_bytes = size_t(s.nc) / 2;
    const std::vector<uint8_t> codes = c.codes;
    const std::vector<float> scales = c.scales;
    auto slot = [&](int b, int pos, int h) {  // token-index slot of (sequence, position, head)
      const size_t row = c.index_table[size_t(b) * c.max_blocks_per_seq() + pos / kKvBlockSize];
      return (row * c.num_kv_heads + h) * kKvBlockSize + pos % kKvBlockSize;
    };
    for (int b = 0; b < c.batch; ++b) {
      const int len = c.seq_lens()[b];
      for (int h = 0; h < c.num_kv_heads; ++h) {
        for (int pos = 0; pos < len; ++pos) {
          if (rng() % 4 != 0) continue;
          const int block_start = pos / kKvBlockSize * kKvBlockSize;
          const int from = rng() % 2
                               ? block_start + rng() % std::min(kKvBlockSize, len - block_start)
                               : rng() % len;
          const size_t src = slot(b, from, h), dst = slot(b, pos, h);
          c.scales[dst] = scales[src];
          std::memcpy(&c.codes[dst * code_bytes], &codes[src * code_bytes], code_bytes);
        }
      }
    }
    testing::DeviceTlsCase d;
    ASSERT_CUDA(d.Upload(c));
    const int rows = c.batch * c.num_kv_heads;
    for (TlsMode mode : {TlsMode::kTwoLevel, TlsMode::kTokenOnly}) {
      for (const int k_t : {1, 37, 100, 257, 700, 1000, 1500, 2047}) {
        SCOPED_TRACE(::testing::Message()
                     << "heads " << s.nq << " mode " << int(mode) << " k_t " << k_t);
        const TlsPolicy pol = testing::MakePolicy(mode, TlsLag::kSameStep, 128, k_t, 1, 64);
        testing::TlsSelectBuffers buf;
        TlsDecodeSelectParams p = testing::MakeDecodeSelectParams(c, pol, buf);
        ref::TlsDecodeSelect(p);
        ExpectDeviceSelectMatches(p, d, buf, rows, mode);
      }
    }
  }
}

}  // namespace
}  // namespace asynctls::kernels

#else
TEST(TlsSelectGpuTest, NoCudaBuild) { GTEST_SKIP() << "built without CUDA"; }
#endif  // ASYNCTLS_HAVE_CUDA
