// CUDA TLS selection ops. Score arithmetic follows tls_math.h in the reference's order, so
// scores and selected sets equal the CPU reference bit for bit.
#include <cuda_bf16.h>
#include <cuda_pipeline.h>

#include <algorithm>
#include <type_traits>

#include "asynctls/kernels/cuda_tls.h"
#include "tls_common.cuh"

namespace asynctls::kernels::cuda {
namespace {

using tls_detail::AlignUp;
using tls_detail::AlphaFromExps;
using tls_detail::Bf16BitsToFloat;
using tls_detail::BlockExclusiveScan;
using tls_detail::BlockTopK;
using tls_detail::CodeFragments;
using tls_detail::EnsureDynamicSmem;
using tls_detail::ExpFixed;
using tls_detail::FromOrderedBits;
using tls_detail::Int4CodeToFloat;
using tls_detail::Int4HeadDot;
using tls_detail::Int4WordToFloats;
using tls_detail::LaunchAfterPrevious;
using tls_detail::LetNextGridLaunch;
using tls_detail::LoadIo;
using tls_detail::LoadQueryFragments;
using tls_detail::MmaS8U8;
using tls_detail::NumSms;
using tls_detail::QuantizeHeadWarp;
using tls_detail::QueryFragmentSlice;
using tls_detail::TokenCodeStride;
using tls_detail::TopKShared;
using tls_detail::UseStoredLogits;
using tls_detail::WaitForPreviousGrid;
using tls_detail::WarpRadixDigit;

__device__ __forceinline__ int32_t SelectLen(const int32_t* maybe_select_lens,
                                             const int32_t* seq_lens, int b) {
  return maybe_select_lens ? maybe_select_lens[b] : seq_lens[b];
}

// ---- block scores -------------------------------------------------------------------------
// grid (ceil(max_blocks / kScoreBlocks), batch * num_kv_heads). The group's query is summed into
// qpos / qneg (heads in order) in shared memory, stored slice-major (entry j * 8 + c holds dim
// c * width + j) so that the 8 lanes of a team read 8 consecutive floats. Each team of
// kTlsBlockScoreSlices lanes then scores blocks: lane c loads slice c of the block's kmax / kmin,
// chains it in dim order, and an xor butterfly over the team adds the 8 slice sums in
// TlsSumBlockSlices's order. WIDTH: dims per slice known at compile time, or 0 for any width
// (scalar loads). Slices of more than two 16-byte vectors (MLA's nine) are "slotted": loaded
// into registers, ptxas issued them two at a time between the FMAs, a memory round trip each
// (~25 us per MLA CTA), so each team copies the block's two rows into shared-memory slots with
// cp.async, all in flight at once and in row order (each copy instruction reads whole 128-byte
// lines: lanes loading their own 144-byte slices touched each line in halves, run 51 of
// bench/results/tls-kernels-h200.md: 21-32 us -> 15-22 us at batch 8), and the group's query
// (MLA: 128 heads x 576 dims) is staged through the same region before its sums. GQA's one- and
// two-vector slices measured slower that way (run 35) and load straight into registers. The grid
// counts the block table's width, not the rows' lengths.
constexpr int kScoreThreads = 256;
constexpr int kScoreBlocks = 64;
constexpr int kScoreTeams = kScoreThreads / kTlsBlockScoreSlices;
static_assert(kScoreBlocks % kScoreTeams == 0, "each team scores the same number of blocks");

// A block index row's values: bf16 bits, or the int8 form's codes (tls_params.h), and the
// vector of 8 of them that the score loads (16 or 8 bytes).
__device__ __forceinline__ float BoundValue(uint16_t bf16_bits) {
  return Bf16BitsToFloat(bf16_bits);
}
__device__ __forceinline__ float BoundValue(int8_t code) { return static_cast<float>(code); }
template <typename Code>
using BoundVec = std::conditional_t<sizeof(Code) == 2, uint4, uint2>;

// Value e of a loaded vector of 8 (e known at compile time). An int8 code's float without I2F,
// which issues at a quarter of the FMA rate on sm_90 and was one per FMA of the int8 block
// score: the code biased by 128 becomes the low byte of 2^23's float (one byte permute), and
// 2^23 + 128 comes off again, exactly (the same bits as BoundValue).
__device__ __forceinline__ float BoundValueAt(const uint4& v, int e) {
  return BoundValue(reinterpret_cast<const uint16_t*>(&v)[e]);
}
__device__ __forceinline__ float BoundValueAt(const uint2& v, int e) {
  const uint32_t biased = (e < 4 ? v.x : v.y) ^ 0x80808080u;
  return __fsub_rn(__uint_as_float(__byte_perm(biased, 0x4B000000u, 0x7540u | (e & 3))), 8388736.f);
}

// Blocks a team's slots hold at once: an int8 block's two rows take half a bf16 block's bytes,
// so the int8 form copies a team's second block while it scores its first (one DRAM round trip
// per team instead of two) in about the bf16 form's region, and the query stage keeps its size
// (a half-size stage doubled the stages at 128 heads: block score 13.4 -> 18.3 us, run 86).
template <typename Code>
constexpr int ScoreSlotBlocks() {
  return sizeof(Code) == 1 ? 2 : 1;
}

// Vectors of one block's kmax / kmin rows in a team's slots, in row order (2 * 8 * WIDTH / 8);
// lane c reads its slice's vectors c * WIDTH / 8 .., so the 8 lanes of one read start 9 vectors
// apart (MLA) and hit distinct banks.
template <int WIDTH>
constexpr int ScoreBlockVecs() {
  return 16 * (WIDTH / 8);
}

// Vectors of one team's slots. A 16-byte read is served per quarter warp, one team; an 8-byte
// one (int8 rows) per half warp, two teams, whose slots 8 vectors of padding put on distinct
// banks (team strides of a multiple of 128 bytes would share them).
template <int WIDTH, typename Code>
constexpr int ScoreTeamSlotVecs() {
  return ScoreSlotBlocks<Code>() * ScoreBlockVecs<WIDTH>() + (sizeof(Code) == 1 ? 8 : 0);
}

// Shared-memory bytes of the teams' slots.
template <int WIDTH, bool SLOTTED, typename Code>
constexpr int ScoreSlotBytes() {
  return SLOTTED ? kScoreTeams * ScoreTeamSlotVecs<WIDTH, Code>() * int(sizeof(BoundVec<Code>)) : 0;
}
static_assert(ScoreSlotBytes<72, true, int8_t>() >= ScoreSlotBytes<72, true, uint16_t>(),
              "the int8 form stages the query in as few stages as the bf16 form");

// Lane c's share of copying one block's two rows into a team's block slots, in row order (lane
// c: vectors c, c + 8, ..., so each copy instruction reads whole 128-byte lines), committed as
// one cp.async group.
template <int WIDTH, typename Code>
__device__ __forceinline__ void CopyBlockRows(BoundVec<Code>* block_slots, const Code* kmax_row,
                                              const Code* kmin_row, int c) {
  using Vec = BoundVec<Code>;
  constexpr int kVecs = WIDTH / 8;
#pragma unroll
  for (int i = 0; i < kVecs; ++i) {
    const int w = 8 * i + c;
    __pipeline_memcpy_async(block_slots + w, kmax_row + 8 * w, sizeof(Vec));
    __pipeline_memcpy_async(block_slots + 8 * kVecs + w, kmin_row + 8 * w, sizeof(Vec));
  }
  __pipeline_commit();
}

// Slice c of one block's score. kmax / kmin: the block's rows (head_dim values each). PREFETCHED
// (slotted only): `slots` already holds the block's rows, landed (the int8 form's copies).
template <int WIDTH, bool SLOTTED, typename Code, bool PREFETCHED = false>
__device__ __forceinline__ float BlockSliceScore(const float* qpos, const float* qneg,
                                                 const Code* kmax_row, const Code* kmin_row,
                                                 BoundVec<Code>* slots, unsigned team_mask,
                                                 int width, int c) {
  using Vec = BoundVec<Code>;
  const Code* kmax = kmax_row + c * width;
  const Code* kmin = kmin_row + c * width;
  float s = 0.f;
  if constexpr (WIDTH == 0) {
    for (int j = 0; j < width; ++j) {
      const int at = j * kTlsBlockScoreSlices + c;
      s = TlsFma(qpos[at], BoundValue(kmax[j]), s);
      s = TlsFma(qneg[at], BoundValue(kmin[j]), s);
    }
  } else {
    static_assert(WIDTH % 8 == 0, "slices load whole vectors of 8 values");
    constexpr int kVecs = WIDTH / 8;
    Vec a[SLOTTED ? 1 : kVecs], n[SLOTTED ? 1 : kVecs];
    if constexpr (SLOTTED && PREFETCHED) {
      // The caller's copies of the rows landed in `slots`.
    } else if constexpr (SLOTTED) {
      // The team copies both rows into its slots, then each lane reads its slice's.
      __syncwarp(team_mask);  // the team's lanes are done with the previous block's slots
      CopyBlockRows<WIDTH, Code>(slots, kmax_row, kmin_row, c);
      __pipeline_wait_prior(0);
      __syncwarp(team_mask);  // every lane's copies landed
    } else {
#pragma unroll
      for (int v = 0; v < kVecs; ++v) {
        a[v] = reinterpret_cast<const Vec*>(kmax)[v];
        n[v] = reinterpret_cast<const Vec*>(kmin)[v];
      }
    }
#pragma unroll
    for (int j = 0; j < WIDTH; ++j) {
      Vec av4, nv4;
      if constexpr (SLOTTED) {
        av4 = slots[c * kVecs + j / 8];
        nv4 = slots[8 * kVecs + c * kVecs + j / 8];
      } else {
        av4 = a[j / 8];
        nv4 = n[j / 8];
      }
      const int at = j * kTlsBlockScoreSlices + c;
      s = TlsFma(qpos[at], BoundValueAt(av4, j % 8), s);
      s = TlsFma(qneg[at], BoundValueAt(nv4, j % 8), s);
    }
  }
  return s;
}

// Where dim d of qpos / qneg lies in their slice-major layout (entry j * 8 + c holds dim
// c * width + j: the 8 lanes of a scoring team read 8 consecutive floats).
__device__ __forceinline__ int SliceMajor(int d, int width) {
  return (d % width) * kTlsBlockScoreSlices + d / width;
}

// Adds heads [h0, h0 + heads) of the group's query, read from `src` (those heads, io_dtype), to
// qpos / qneg (slice-major) per dim in head order; h0 == 0 starts the sums.
__device__ __forceinline__ void AddQueryHeads(const TlsBlockScoreParams& p, const void* src, int h0,
                                              int heads, int width, float* qpos, float* qneg) {
  for (int d = threadIdx.x; d < p.head_dim; d += kScoreThreads) {
    const int at = SliceMajor(d, width);
    float pos = h0 == 0 ? 0.f : qpos[at], neg = h0 == 0 ? 0.f : qneg[at];
#pragma unroll 8
    for (int h = 0; h < heads; ++h) {
      const float v = LoadIo(src, p.io_dtype, int64_t{h} * p.head_dim + d);
      pos = __fadd_rn(pos, v > 0.f ? v : 0.f);
      neg = __fadd_rn(neg, v < 0.f ? v : 0.f);
    }
    qpos[at] = pos;
    qneg[at] = neg;
  }
}

// This thread's share of copying `bytes` (a multiple of 16) of the group's query from `from`
// into the stage, every copy in flight at once (the caller commits the group).
__device__ __forceinline__ void CopyQueryToStage(unsigned char* stage, const unsigned char* from,
                                                 int bytes) {
  for (int i = threadIdx.x * 16; i < bytes; i += kScoreThreads * 16) {
    __pipeline_memcpy_async(stage + i, from + i, 16);
  }
}

// The group's query summed per dim in head order into qpos / qneg (slice-major), staged through
// `stage_region` (stage_bytes of shared memory) a whole number of heads at a time, every load of
// a stage in flight at once. A query not 16-byte aligned is summed straight from global memory
// (slower, the same sums). Ends with a barrier.
__device__ __forceinline__ void SumStagedQuery(const TlsBlockScoreParams& p, int b, int g,
                                               int group, int width, float* qpos, float* qneg,
                                               void* stage_region, int stage_bytes) {
  const int elem = DTypeSize(p.io_dtype);
  const int stage_heads = min(group, max(1, stage_bytes / (p.head_dim * elem)));
  unsigned char* stage = static_cast<unsigned char*>(stage_region);
  const unsigned char* group_q =
      static_cast<const unsigned char*>(p.q) +
      (int64_t{b} * p.num_q_heads + int64_t{g} * group) * p.head_dim * elem;
  const bool staged = reinterpret_cast<uintptr_t>(group_q) % 16 == 0;
  for (int h0 = 0; h0 < group; h0 += stage_heads) {
    const int heads = min(stage_heads, group - h0);
    const unsigned char* from = group_q + int64_t{h0} * p.head_dim * elem;
    if (staged) {
      CopyQueryToStage(stage, from, heads * p.head_dim * elem);  // head_dim % 8 == 0
      __pipeline_commit();
      __pipeline_wait_prior(0);
      __syncthreads();
    }
    AddQueryHeads(p, staged ? static_cast<const void*>(stage) : from, h0, heads, width, qpos, qneg);
    __syncthreads();  // the next stage (or the slots) overwrite this one; scoring reads qpos / qneg
  }
}

// Code: uint16_t (bf16 rows) or int8_t (the int8 form: the team's sum times the row's scale).
template <int WIDTH, bool SLOTTED, typename Code>
__global__ void __launch_bounds__(kScoreThreads) BlockScoreKernel(TlsBlockScoreParams p) {
  // qpos [head_dim], qneg [head_dim] (slice-major), then (slotted) the query stage / the slots.
  extern __shared__ __align__(16) float q_sum[];
  const int bg = blockIdx.y;
  const int b = bg / p.num_kv_heads, g = bg % p.num_kv_heads;
  const int group = p.num_q_heads / p.num_kv_heads;
  const int num_blocks = (p.seq_lens[b] + kKvBlockSize - 1) / kKvBlockSize;
  const int first = blockIdx.x * kScoreBlocks;
  if (first >= num_blocks) return;
  const int count = min(kScoreBlocks, num_blocks - first);
  const int width = WIDTH > 0 ? WIDTH : p.head_dim / kTlsBlockScoreSlices;
  float* qpos = q_sum;
  float* qneg = q_sum + p.head_dim;
  // The team's index rows, loaded before the query sums: their round trip was a second one
  // before each block's copy (block score 14.9 -> 13.3 us at MLA 16 heads batch 8 128K, 15.5 ->
  // 13.4 at 128 heads batch 8 32K; run 65 of bench/results/tls-kernels-h200.md).
  const int team = threadIdx.x / kTlsBlockScoreSlices, c = threadIdx.x % kTlsBlockScoreSlices;
  const int32_t* rows = p.index_table + int64_t{b} * p.max_blocks_per_seq + first;
  int32_t team_rows[kScoreBlocks / kScoreTeams];
#pragma unroll
  for (int k = 0; k < kScoreBlocks / kScoreTeams; ++k) {
    const int i = team + k * kScoreTeams;
    team_rows[k] = i < count ? rows[i] : 0;
  }
  if constexpr (SLOTTED) {
    SumStagedQuery(p, b, g, group, width, qpos, qneg, q_sum + 2 * p.head_dim,
                   ScoreSlotBytes<WIDTH, SLOTTED, Code>());
  } else {  // few heads straight from global memory (the loop measured before staging)
    const int elem = DTypeSize(p.io_dtype);
    const int64_t q0 = (int64_t{b} * p.num_q_heads + int64_t{g} * group) * p.head_dim;
    AddQueryHeads(p, static_cast<const unsigned char*>(p.q) + q0 * elem, 0, group, width, qpos,
                  qneg);
    __syncthreads();
  }
  const unsigned team_mask = 0xffu << (threadIdx.x % 32 / kTlsBlockScoreSlices * 8);
  constexpr bool kInt8 = sizeof(Code) == 1;
  const Code* kmax = static_cast<const Code*>(p.block_kmax);
  const Code* kmin = static_cast<const Code*>(p.block_kmin);
  BoundVec<Code>* slots = reinterpret_cast<BoundVec<Code>*>(q_sum + 2 * p.head_dim) +
                          team * ScoreTeamSlotVecs<WIDTH, Code>();
  // Slotted int8 rows: the copies of the team's first kDepth blocks go out at once (a cp.async
  // group per block, empty past the team's last), and block k's slots take block k + kDepth's
  // once scored. The bf16 rows copy each block inside BlockSliceScore.
  constexpr bool kPrefetch = SLOTTED && kInt8;
  constexpr int kDepth = ScoreSlotBlocks<Code>();
  auto block_offset = [&](int k) {
    return (int64_t{team_rows[k]} * p.num_kv_heads + g) * p.head_dim;
  };
  if constexpr (kPrefetch) {
#pragma unroll
    for (int k = 0; k < kDepth; ++k) {
      if (team + k * kScoreTeams < count) {
        CopyBlockRows<WIDTH, Code>(slots + k * ScoreBlockVecs<WIDTH>(), kmax + block_offset(k),
                                   kmin + block_offset(k), c);
      } else {
        __pipeline_commit();
      }
    }
  }
  float* scores = p.scores + int64_t{bg} * p.max_blocks_per_seq + first;
#pragma unroll
  for (int k = 0; k < kScoreBlocks / kScoreTeams; ++k) {
    const int i = team + k * kScoreTeams;
    if (i >= count) break;
    const int64_t index_row = int64_t{team_rows[k]} * p.num_kv_heads + g;
    const int64_t off = block_offset(k);
    // The int8 row's scale, loaded beside the row (lane 0 applies it).
    const float row_scale = kInt8 && c == 0 ? p.maybe_block_scales[index_row] : 1.f;
    BoundVec<Code>* block_slots = slots + (kPrefetch ? k % kDepth * ScoreBlockVecs<WIDTH>() : 0);
    if constexpr (kPrefetch) {
      __pipeline_wait_prior(kDepth - 1);  // block k's group: later ones may be in flight
      __syncwarp(team_mask);              // every lane's copies landed
    }
    float s = BlockSliceScore<WIDTH, SLOTTED, Code, kPrefetch>(
        qpos, qneg, kmax + off, kmin + off, block_slots, team_mask, width, c);
    if constexpr (kPrefetch) {  // block k's slots are read: block k + kDepth's copy
      __syncwarp(team_mask);
      if (k + kDepth < kScoreBlocks / kScoreTeams && i + kDepth * kScoreTeams < count) {
        CopyBlockRows<WIDTH, Code>(block_slots, kmax + block_offset(k + kDepth),
                                   kmin + block_offset(k + kDepth), c);
      } else {
        __pipeline_commit();
      }
    }
    // Butterfly: after step k every lane holds the sum of its aligned 2^k-lane group, and both
    // halves add the same two values (commuted), so the team ends with one bit pattern.
#pragma unroll
    for (int step = 1; step < kTlsBlockScoreSlices; step *= 2) {
      s = __fadd_rn(s, __shfl_xor_sync(team_mask, s, step));
    }
    if (c == 0) scores[i] = kInt8 ? TlsMul(s, row_scale) : s;
  }
}

template <int WIDTH, bool SLOTTED, typename Code>
cudaError_t LaunchBlockScore(const TlsBlockScoreParams& p, dim3 grid, cudaStream_t stream) {
  static_assert(!SLOTTED || WIDTH / 8 > 2, "slots pay off for slices of more than 2 vectors");
  constexpr auto kKernel = BlockScoreKernel<WIDTH, SLOTTED, Code>;
  const size_t smem = 2 * p.head_dim * sizeof(float) + ScoreSlotBytes<WIDTH, SLOTTED, Code>();
  if constexpr (SLOTTED) {  // only the slots pass the default 48 KB
    const cudaError_t err = EnsureDynamicSmem<kKernel>(smem);
    if (err != cudaSuccess) return err;
  }
  kKernel<<<grid, kScoreThreads, smem, stream>>>(p);
  return cudaGetLastError();
}

// ---- the group's query sums, once per row ---------------------------------------------------
// Every block-score CTA needs its row's qpos / qneg. Summed in each CTA, a large group costs a
// staging round trip per 16 heads: at 128 MLA heads, eight of them before any block is scored
// (H100, batch 8 32K: the 128-head block score took 15.9 us, the 16-head one 6.3, run 132 of
// bench/results/tls-kernels-h200.md). With a workspace (maybe_query_sums) QuerySumsKernel sums
// each row once: a CTA per (row, 32 dims) loads the group's columns with every load in flight,
// then warp 0 chains the positive and warp 1 the negative parts in head order (AddQueryHeads'
// additions, so the same bits), written slice-major as the block-score CTAs keep them.
constexpr int kSumDims = 32;
constexpr int kSumThreads = 256;
constexpr int kSumMaxGroup = 256;  // the columns in shared memory: group x 32 floats, <= 32 KB

__global__ void __launch_bounds__(kSumThreads) QuerySumsKernel(TlsBlockScoreParams p) {
  extern __shared__ float column[];  // [group][kSumDims]
  LetNextGridLaunch();  // the block score may start; it waits for these sums before reading them
  const int bg = blockIdx.y;
  const int b = bg / p.num_kv_heads, g = bg % p.num_kv_heads;
  const int group = p.num_q_heads / p.num_kv_heads;
  const int lane = threadIdx.x % kSumDims, d = blockIdx.x * kSumDims + lane;
  if (d < p.head_dim) {
    const int64_t q0 = (int64_t{b} * p.num_q_heads + int64_t{g} * group) * p.head_dim + d;
#pragma unroll 8
    for (int h = threadIdx.x / kSumDims; h < group; h += kSumThreads / kSumDims) {
      column[h * kSumDims + lane] = LoadIo(p.q, p.io_dtype, q0 + int64_t{h} * p.head_dim);
    }
  }
  __syncthreads();
  const int warp = threadIdx.x / 32;
  if (warp >= 2 || d >= p.head_dim) return;
  float sum = 0.f;
#pragma unroll 8
  for (int h = 0; h < group; ++h) {
    const float v = column[h * kSumDims + lane];
    sum = __fadd_rn(sum, warp == 0 ? (v > 0.f ? v : 0.f) : (v < 0.f ? v : 0.f));
  }
  const int width = p.head_dim / kTlsBlockScoreSlices;
  p.maybe_query_sums[(int64_t{bg} * 2 + warp) * p.head_dim + SliceMajor(d, width)] = sum;
}

// ---- streaming block scores (slotted rows: MLA) -----------------------------------------------
// The lagged step's block branch runs beside the token kernel and the attention, so what it
// costs the step is mostly its SM time (bench/results/tls-kernels-h200.md run 97: the MLA
// 16-head batch-8 128K step is 8 us faster without it). BlockScoreKernel's CTAs spend theirs on
// a chain: index rows, query stage and sums, then each team's blocks copied and scored one at a
// time, each block's 144-FMA chain waiting on shared-memory loads of the query sums. Here one
// CTA per SM streams a run of one row's blocks: the query's stage and the run's index rows load
// first, each team's first blocks copy while the query is summed, each lane holds its slice of
// the sums in registers, and a team keeps its next block in flight (cp.async into a ring of
// slots) while it scores one. The same arithmetic in the same order as BlockSliceScore, so the
// same bits. H100, runs 101-102: the 16-head step 0.3-1.8 us faster, 32-64 heads unchanged; at
// 128 heads its small query stage (8 rounds) made the 128K step 6 us slower, so groups whose
// query needs more than kStreamMaxStages stages keep BlockScoreKernel, unless QuerySumsKernel
// sums their query (UsesQuerySums).
constexpr int kStreamTeamBytes = 4608;    // a team's ring: 2 bf16 or 4 int8 blocks of 576 dims
constexpr int kStreamStageBytes = 18432;  // the query stage: 16 heads x 576 bf16 at once
constexpr int kStreamMaxRun = 1024;       // blocks per CTA at most (their index rows in smem)
constexpr int kStreamMaxStages = 4;       // query stages at most (64 bf16 or 32 fp32 heads)

// Blocks a team's ring holds, and its stride in vectors (int8: 8 vectors of padding put the two
// teams of a half-warp read on distinct banks, as ScoreTeamSlotVecs).
template <int WIDTH, typename Code>
constexpr int StreamDepth() {
  return kStreamTeamBytes / (ScoreBlockVecs<WIDTH>() * int(sizeof(BoundVec<Code>)));
}
template <int WIDTH, typename Code>
constexpr int StreamTeamVecs() {
  return StreamDepth<WIDTH, Code>() * ScoreBlockVecs<WIDTH>() + (sizeof(Code) == 1 ? 8 : 0);
}
template <int WIDTH, typename Code>
constexpr size_t StreamSmemBytes(int head_dim) {
  return 2 * head_dim * sizeof(float) + kStreamStageBytes + kStreamMaxRun * 2 * sizeof(int32_t) +
         size_t(kScoreTeams) * StreamTeamVecs<WIDTH, Code>() * sizeof(BoundVec<Code>);
}

// grid (ceil(max_blocks / run), batch * num_kv_heads): blocks [x * run, + run) of row y.
template <int WIDTH, typename Code>
__global__ void __launch_bounds__(kScoreThreads, 1)
    BlockScoreStreamKernel(TlsBlockScoreParams p, int run) {
  constexpr int kDepth = StreamDepth<WIDTH, Code>();
  constexpr bool kInt8 = sizeof(Code) == 1;
  static_assert(kDepth >= 2, "a team scores one block while the next loads");
  // qpos, qneg [head_dim] (slice-major), the query stage, the run's index rows and (int8) row
  // scales, then the teams' rings.
  extern __shared__ __align__(16) float q_sum[];
  float* qpos = q_sum;
  float* qneg = q_sum + p.head_dim;
  unsigned char* stage = reinterpret_cast<unsigned char*>(q_sum + 2 * p.head_dim);
  int32_t* rows_s = reinterpret_cast<int32_t*>(stage + kStreamStageBytes);
  float* scale_s = reinterpret_cast<float*>(rows_s + kStreamMaxRun);
  const int team = threadIdx.x / kTlsBlockScoreSlices, c = threadIdx.x % kTlsBlockScoreSlices;
  BoundVec<Code>* ring = reinterpret_cast<BoundVec<Code>*>(scale_s + kStreamMaxRun) +
                         team * StreamTeamVecs<WIDTH, Code>();
  const int bg = blockIdx.y;
  const int b = bg / p.num_kv_heads, g = bg % p.num_kv_heads;
  const int group = p.num_q_heads / p.num_kv_heads;
  const int num_blocks = (p.seq_lens[b] + kKvBlockSize - 1) / kKvBlockSize;
  const int first = blockIdx.x * run;
  if (first >= num_blocks) return;
  const int count = min(run, num_blocks - first);

  // The query's first stage in flight (the oldest cp.async group of every thread).
  const int elem = DTypeSize(p.io_dtype);
  const int stage_heads = min(group, max(1, kStreamStageBytes / (p.head_dim * elem)));
  const unsigned char* group_q =
      static_cast<const unsigned char*>(p.q) +
      (int64_t{b} * p.num_q_heads + int64_t{g} * group) * p.head_dim * elem;
  // maybe_query_sums: set only where QuerySumsKernel, the grid before, writes the row's sums.
  const bool summed = p.maybe_query_sums != nullptr;
  const bool staged = !summed && reinterpret_cast<uintptr_t>(group_q) % 16 == 0;
  auto stage_heads_from = [&](int h0) {
    CopyQueryToStage(stage, group_q + int64_t{h0} * p.head_dim * elem,
                     min(stage_heads, group - h0) * p.head_dim * elem);
  };
  if (staged) stage_heads_from(0);
  __pipeline_commit();  // (empty when summed: the block copies' group count stays the same)

  // The run's index rows (and int8 scales), then each team's first kDepth blocks in flight.
  const int32_t* table = p.index_table + int64_t{b} * p.max_blocks_per_seq + first;
  for (int i = threadIdx.x; i < count; i += kScoreThreads) rows_s[i] = table[i];
  __syncthreads();
  const Code* kmax = static_cast<const Code*>(p.block_kmax);
  const Code* kmin = static_cast<const Code*>(p.block_kmin);
  auto copy_block = [&](int k) {  // team's k-th block into its ring slot k % kDepth
    const int i = team + k * kScoreTeams;
    if (i < count) {
      const int64_t off = (int64_t{rows_s[i]} * p.num_kv_heads + g) * p.head_dim;
      CopyBlockRows<WIDTH, Code>(ring + k % kDepth * ScoreBlockVecs<WIDTH>(), kmax + off,
                                 kmin + off, c);
    } else {
      __pipeline_commit();
    }
  };
#pragma unroll
  for (int k = 0; k < kDepth; ++k) copy_block(k);
  if constexpr (kInt8) {
    for (int i = threadIdx.x; i < count; i += kScoreThreads) {
      scale_s[i] = p.maybe_block_scales[int64_t{rows_s[i]} * p.num_kv_heads + g];
    }
  }

  // The group's query summed per dim in head order (SumStagedQuery's arithmetic): the first
  // stage waits only for itself; later stages (groups over 16 bf16 heads) wait for everything.
  // Or the row's sums from QuerySumsKernel (launched before this grid, which it may overlap).
  if (summed) {
    WaitForPreviousGrid();
    const float* sums = p.maybe_query_sums + int64_t{bg} * 2 * p.head_dim;
    for (int i = threadIdx.x; i < 2 * p.head_dim; i += kScoreThreads) q_sum[i] = __ldcg(sums + i);
  }
  for (int h0 = 0; !summed && h0 < group; h0 += stage_heads) {
    const int heads = min(stage_heads, group - h0);
    if (staged) {
      if (h0 == 0) {
        __pipeline_wait_prior(kDepth);
      } else {
        __syncthreads();  // every thread is done with the previous stage
        stage_heads_from(h0);
        __pipeline_commit();
        __pipeline_wait_prior(0);
      }
      __syncthreads();
    }
    const unsigned char* from = group_q + int64_t{h0} * p.head_dim * elem;
    AddQueryHeads(p, staged ? static_cast<const void*>(stage) : from, h0, heads, WIDTH, qpos, qneg);
  }
  __syncthreads();  // qpos / qneg and (int8) the scales, for every team

  const unsigned team_mask = 0xffu << (threadIdx.x % 32 / kTlsBlockScoreSlices * 8);
  // This lane's slice of the query sums in registers for the whole run: each block's chain of
  // 2 * WIDTH FMAs then waits only on its own rows' loads (BlockSliceScore's order).
  float qp[WIDTH], qn[WIDTH];
#pragma unroll
  for (int j = 0; j < WIDTH; ++j) {
    qp[j] = qpos[j * kTlsBlockScoreSlices + c];
    qn[j] = qneg[j * kTlsBlockScoreSlices + c];
  }
  using Vec = BoundVec<Code>;
  constexpr int kVecs = WIDTH / 8;
  float* scores = p.scores + int64_t{bg} * p.max_blocks_per_seq + first;
  for (int k = 0; team + k * kScoreTeams < count; ++k) {
    const int i = team + k * kScoreTeams;
    __pipeline_wait_prior(kDepth - 1);  // block k's group; the next ones may be in flight
    __syncwarp(team_mask);              // every lane's copies landed
    const Vec* slot = ring + k % kDepth * ScoreBlockVecs<WIDTH>();
    float s = 0.f;
#pragma unroll
    for (int v = 0; v < kVecs; ++v) {
      const Vec av4 = slot[c * kVecs + v], nv4 = slot[8 * kVecs + c * kVecs + v];
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        s = TlsFma(qp[8 * v + e], BoundValueAt(av4, e), s);
        s = TlsFma(qn[8 * v + e], BoundValueAt(nv4, e), s);
      }
    }
    __syncwarp(team_mask);  // the slot is read: block k + kDepth's copy
    copy_block(k + kDepth);
#pragma unroll
    for (int step = 1; step < kTlsBlockScoreSlices; step *= 2) {
      s = __fadd_rn(s, __shfl_xor_sync(team_mask, s, step));
    }
    if (c == 0) scores[i] = kInt8 ? TlsMul(s, scale_s[i]) : s;
  }
}

// Whether the block score takes its query sums from QuerySumsKernel: given a workspace, for
// MLA rows (the streaming kernel) whose group's query takes more than two stages. H100, batch
// 8, bf16: 64 heads (four stages) 10.2 -> 8.1 us at 32K, 128 heads 15.9 -> 8.6 us at 32K and
// 26.6 -> 18.7 at 128K; 32 heads (two) 7.9 -> 8.3 us, so they keep summing in each CTA (run 136).
bool UsesQuerySums(const TlsBlockScoreParams& p) {
  const int group = p.num_q_heads / p.num_kv_heads;
  return p.maybe_query_sums != nullptr && p.head_dim / kTlsBlockScoreSlices == 72 &&
         group <= kSumMaxGroup &&
         int64_t{group} * p.head_dim * DTypeSize(p.io_dtype) > 2 * kStreamStageBytes;
}

// Whether BlockScoreStreamKernel takes a block score: its group's query summed once per row,
// or in a few stages.
bool StreamsBlockScore(const TlsBlockScoreParams& p) {
  const int64_t query_bytes =
      int64_t{p.num_q_heads / p.num_kv_heads} * p.head_dim * DTypeSize(p.io_dtype);
  return UsesQuerySums(p) || query_bytes <= int64_t{kStreamMaxStages} * kStreamStageBytes;
}

// About one CTA per SM (half as many measured 4-7 us slower at 16 heads: long-lived CTAs keep
// SMs the attention needs once the token kernel ends, run 98), each a run of a multiple of 32
// blocks (one per team).
template <int WIDTH, typename Code>
cudaError_t LaunchBlockScoreStream(const TlsBlockScoreParams& p, cudaStream_t stream) {
  constexpr auto kKernel = BlockScoreStreamKernel<WIDTH, Code>;
  const int rows = p.batch * p.num_kv_heads;
  const int64_t total = int64_t{rows} * p.max_blocks_per_seq;
  const int64_t ctas = NumSms();
  int run = static_cast<int>((total + ctas - 1) / ctas);
  run = std::clamp((run + kScoreTeams - 1) / kScoreTeams * kScoreTeams, kScoreTeams, kStreamMaxRun);
  const size_t smem = StreamSmemBytes<WIDTH, Code>(p.head_dim);
  cudaError_t err = EnsureDynamicSmem<kKernel>(smem);
  if (err != cudaSuccess) return err;
  const dim3 grid((p.max_blocks_per_seq + run - 1) / run, rows);
  if (!UsesQuerySums(p)) {
    TlsBlockScoreParams own = p;
    own.maybe_query_sums = nullptr;  // each CTA sums its query
    kKernel<<<grid, kScoreThreads, smem, stream>>>(own, run);
    return cudaGetLastError();
  }
  const int group = p.num_q_heads / p.num_kv_heads;
  QuerySumsKernel<<<dim3((p.head_dim + kSumDims - 1) / kSumDims, rows), kSumThreads,
                    size_t(group) * kSumDims * sizeof(float), stream>>>(p);
  err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  return LaunchAfterPrevious<kKernel>(grid, kScoreThreads, smem, stream, p, run);
}

// The kernel for the rows' element type and the slice width.
template <typename Code>
cudaError_t LaunchBlockScoreFor(const TlsBlockScoreParams& p, dim3 grid, cudaStream_t stream) {
  switch (p.head_dim / kTlsBlockScoreSlices) {
    case 8:  // head_dim 64
      return LaunchBlockScore<8, false, Code>(p, grid, stream);
    case 16:  // head_dim 128
      return LaunchBlockScore<16, false, Code>(p, grid, stream);
    case 72:  // MLA, 576
      return StreamsBlockScore(p) ? LaunchBlockScoreStream<72, Code>(p, stream)
                                  : LaunchBlockScore<72, true, Code>(p, grid, stream);
    default:
      return LaunchBlockScore<0, false, Code>(p, grid, stream);
  }
}

// ---- top-k kernels ------------------------------------------------------------------------
constexpr int kSelectThreads = 512;
// Token rows are up to 8192 candidates: twice the threads halve the serial work per radix pass.
constexpr int kTokenSelectThreads = 1024;

// Longer rows than BlockSelectRegKernel holds, up to this many items, are first copied into shared
// memory (one coalesced pass), so the count, radix and compaction passes of BlockTopK read shared
// memory instead of L2.
constexpr int kSelectCacheItems = 8192;

// One block per (sequence, KV head). CACHED: the row's scores in dynamic shared memory.
template <bool CACHED>
__global__ void __launch_bounds__(kSelectThreads) BlockSelectKernel(TlsBlockSelectParams p) {
  __shared__ TopKShared sh;
  extern __shared__ float score_s[];  // [n] when CACHED
  const int bg = blockIdx.x;
  const int b = bg / p.num_kv_heads;
  const int end = TlsEligibleEnd(p.seq_lens[b]);
  const int begin = p.sink_blocks;
  const float* scores = p.scores + int64_t{bg} * p.max_blocks_per_seq;
  int32_t* out = p.blocks + int64_t{bg} * p.max_kept_blocks;
  const int n = max(0, end - begin);
  if (CACHED) {
    for (int j = threadIdx.x; j < n; j += kSelectThreads) score_s[j] = scores[begin + j];
    __syncthreads();
  }
  const int kept = BlockTopK<kSelectThreads>(
      n, p.k,
      [&](int j, float* s, int32_t* id) {
        *id = begin + j;
        *s = CACHED ? score_s[j] : scores[begin + j];
        return true;
      },
      [&](int rank, int32_t id) { out[rank] = id; }, sh);
  if (threadIdx.x == 0) p.num_blocks[bg] = kept;
}

// Rows of up to ITEMS * kSelectThreads blocks (ITEMS 4: 128K tokens; 8: 256K): thread t holds
// the keys of blocks begin + t * ITEMS .. + ITEMS - 1 in registers, so the radix passes and the
// ordered compaction read no memory. The passes start at the highest bit where the row's
// largest and smallest keys differ (the bits above are the same for every key) and stop when
// the k-th key's bin is taken whole; every warp decides each pass itself from the shared
// histogram (three of them, each zeroed two passes ahead), so a pass costs one barrier, and the
// kept blocks' ranks come from one block scan. BlockSelectKernel (BlockTopK) took 7-11 us on
// rows of 512-2,048 blocks, nearly all of it per-item loops and barriers; this takes 5.9 us
// (runs 49 and 55 of bench/results/tls-kernels-h200.md).
struct RegSelectShared {
  int hist[3][256];
  int warp_count[32];
  uint32_t warp_max[32], warp_min[32];
  int scan[33];
};

template <int ITEMS>
__global__ void __launch_bounds__(kSelectThreads) BlockSelectRegKernel(TlsBlockSelectParams p) {
  __shared__ RegSelectShared sh;
  constexpr int kWarps = kSelectThreads / 32;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int bg = blockIdx.x;
  const int b = bg / p.num_kv_heads;
  const int end = TlsEligibleEnd(p.seq_lens[b]);
  const int first = p.sink_blocks + tid * ITEMS;
  const float* scores = p.scores + int64_t{bg} * p.max_blocks_per_seq;
  uint32_t key[ITEMS];
  int valid_local = 0;
  uint32_t key_max = 0u, key_min = 0xffffffffu;
#pragma unroll
  for (int u = 0; u < ITEMS; ++u) {
    const bool valid = first + u < end;
    key[u] = valid ? TlsOrderedBits(scores[first + u]) : 0u;
    valid_local += valid ? 1 : 0;
    key_max = valid ? max(key_max, key[u]) : key_max;
    key_min = valid ? min(key_min, key[u]) : key_min;
  }
  const int valid_items = max(0, min(ITEMS, end - first));  // this thread's: a prefix of u
  for (int i = tid; i < 2 * 256; i += kSelectThreads) sh.hist[i / 256][i % 256] = 0;
  valid_local = __reduce_add_sync(0xffffffffu, valid_local);
  key_max = __reduce_max_sync(0xffffffffu, key_max);
  key_min = __reduce_min_sync(0xffffffffu, key_min);
  if (lane == 0) {
    sh.warp_count[warp] = valid_local;
    sh.warp_max[warp] = key_max;
    sh.warp_min[warp] = key_min;
  }
  __syncthreads();
  const bool slot = lane < kWarps;
  const int num_valid = __reduce_add_sync(0xffffffffu, slot ? sh.warp_count[lane] : 0);
  key_max = __reduce_max_sync(0xffffffffu, slot ? sh.warp_max[lane] : 0u);
  key_min = __reduce_min_sync(0xffffffffu, slot ? sh.warp_min[lane] : 0xffffffffu);
  const int k = p.k;
  const bool take_all = num_valid <= k;
  // Keys are compared on the bits of `mask` only (as BlockTopK).
  uint32_t threshold = 0u, mask = 0u;
  int need_equal = 0;
  if (!take_all && k > 0) {
    const uint32_t differ = key_max ^ key_min;
    const int top = differ == 0u ? -1 : 31 - __clz(differ);  // highest differing bit
    mask = top == 31 ? 0u : ~0u << (top + 1);  // every valid key has key_max's bits there
    uint32_t prefix = key_max & mask;
    int remaining = k;
    for (int shift = top - 7, pass = 0; top >= 0; shift -= 8, ++pass) {
      // The last pass may overlap decided bits: they equal prefix's for every counted key.
      const int lo = max(shift, 0);
      int* hist = sh.hist[pass % 3];
#pragma unroll
      for (int u = 0; u < ITEMS; ++u) {
        if (u < valid_items && (key[u] & mask) == prefix) {
          atomicAdd(&hist[(key[u] >> lo) & 255u], 1);
        }
      }
      __syncthreads();
      // Every warp has decided the previous pass: its histogram is free for two passes on.
      for (int i = tid; i < 256; i += kSelectThreads) sh.hist[(pass + 2) % 3][i] = 0;
      bool done = false;
      const uint32_t digit = WarpRadixDigit(hist, remaining, &remaining, &done);
      prefix |= digit << lo;
      mask |= 255u << lo;
      if (done || lo == 0) break;
    }
    threshold = prefix;
    need_equal = remaining;
  }
  // Ordered compaction: a kept block's rank = (kept-above blocks before it) + min(equal blocks
  // before it, need_equal); both counts per thread packed in one scan (rows < 2^16 blocks).
  bool above[ITEMS], equal[ITEMS];
  int above_count = 0, equal_count = 0;
#pragma unroll
  for (int u = 0; u < ITEMS; ++u) {
    const uint32_t masked = key[u] & mask;
    above[u] = u < valid_items && k > 0 && (take_all || masked > threshold);
    equal[u] = u < valid_items && k > 0 && !take_all && masked == threshold;
    above_count += above[u] ? 1 : 0;
    equal_count += equal[u] ? 1 : 0;
  }
  int total = 0;
  const int before =
      BlockExclusiveScan<kSelectThreads>(above_count | (equal_count << 16), sh.scan, &total);
  int above_before = before & 0xffff, equal_before = before >> 16;
  int32_t* out = p.blocks + int64_t{bg} * p.max_kept_blocks;
#pragma unroll
  for (int u = 0; u < ITEMS; ++u) {
    if (above[u]) {
      out[above_before + min(equal_before, need_equal)] = first + u;
      ++above_before;
    } else if (equal[u]) {
      if (equal_before < need_equal) out[above_before + equal_before] = first + u;
      ++equal_before;
    }
  }
  if (tid == 0) p.num_blocks[bg] = (total & 0xffff) + min(total >> 16, need_equal);
}

// Writes the sink and recent parts of a positions row around `middle` entries.
__device__ void WriteAlways(const TlsGeometry& geo, int middle, int32_t* row) {
  for (int i = threadIdx.x; i < geo.sink_end; i += blockDim.x) row[i] = i;
  const int base = geo.sink_end + middle;
  for (int i = threadIdx.x; i < geo.len - geo.recent_start; i += blockDim.x) {
    row[base + i] = geo.recent_start + i;
  }
}

// CACHED: alpha and candidate ids of the row in dynamic shared memory ([max_candidates] each).
template <bool CACHED>
// One CTA per SM is all the grid needs; the 1 lets ptxas use 64 registers (no spills).
__global__ void __launch_bounds__(kTokenSelectThreads, 1)
    TokenSelectKernel(TlsTokenSelectParams p) {
  __shared__ TopKShared sh;
  extern __shared__ float alpha_s[];  // [max_candidates], then int32 cand [max_candidates]
  int32_t* cand_s = reinterpret_cast<int32_t*>(alpha_s + (CACHED ? p.max_candidates : 0));
  LetNextGridLaunch();  // the sparse attention may launch; it waits for these positions
  const int bg = blockIdx.x;
  const int b = bg / p.num_kv_heads;
  const TlsGeometry geo = MakeTlsGeometry(
      p.seq_lens[b], SelectLen(p.maybe_select_lens, p.seq_lens, b), p.sink_blocks, p.window);
  const float* alpha = p.alpha + int64_t{bg} * p.max_candidates;
  const int32_t* cand = p.cand_positions + int64_t{bg} * p.max_candidates;
  int32_t* row = p.positions + int64_t{bg} * p.max_positions;
  int32_t* middle = row + geo.sink_end;
  if (CACHED) {
    // kLoadUnroll independent loads of each array in flight per thread (the row is 8 loads per
    // thread at 8192 candidates); alpha is read unconditionally (the buffer spans the row) and
    // dropped for non-candidates, whose alpha is unspecified.
    constexpr int kLoadUnroll = 8;
    for (int j0 = threadIdx.x; j0 < p.max_candidates; j0 += kLoadUnroll * kTokenSelectThreads) {
      int32_t ids[kLoadUnroll];
      float vals[kLoadUnroll];
#pragma unroll
      for (int u = 0; u < kLoadUnroll; ++u) {
        const int j = j0 + u * kTokenSelectThreads;
        ids[u] = j < p.max_candidates ? __ldg(cand + j) : -1;
        vals[u] = j < p.max_candidates ? __ldg(alpha + j) : 0.f;
      }
#pragma unroll
      for (int u = 0; u < kLoadUnroll; ++u) {
        const int j = j0 + u * kTokenSelectThreads;
        if (j < p.max_candidates) {
          cand_s[j] = ids[u];
          alpha_s[j] = ids[u] >= 0 ? vals[u] : 0.f;
        }
      }
    }
    __syncthreads();
  }
  const int kept = BlockTopK<kTokenSelectThreads>(
      p.max_candidates, p.k,
      [&](int j, float* s, int32_t* id) {
        *id = CACHED ? cand_s[j] : cand[j];
        *s = CACHED ? alpha_s[j] : alpha[j];
        return *id >= 0;
      },
      [&](int rank, int32_t id) { middle[rank] = id; }, sh);
  WriteAlways(geo, kept, row);
  if (threadIdx.x == 0) p.num_positions[bg] = geo.sink_end + kept + (geo.len - geo.recent_start);
}

constexpr int kExpandThreads = 256;

__global__ void __launch_bounds__(kExpandThreads) BlockExpandKernel(TlsBlockExpandParams p) {
  __shared__ int scan[kExpandThreads / 32 + 1];
  __shared__ int offsets[kExpandThreads];
  __shared__ int32_t tile_blocks[kExpandThreads];
  LetNextGridLaunch();  // the sparse attention may launch; it waits for these positions
  const int bg = blockIdx.x;
  const int b = bg / p.num_kv_heads;
  const TlsGeometry geo = MakeTlsGeometry(
      p.seq_lens[b], SelectLen(p.maybe_select_lens, p.seq_lens, b), p.sink_blocks, p.window);
  const int num_listed =
      p.maybe_blocks ? p.maybe_num_blocks[bg] : max(0, geo.first_recent_block - p.sink_blocks);
  const int32_t* listed =
      p.maybe_blocks ? p.maybe_blocks + int64_t{bg} * p.max_kept_blocks : nullptr;
  int32_t* row = p.positions + int64_t{bg} * p.max_positions;
  int written = 0;
  for (int base = 0; base < num_listed; base += kExpandThreads) {
    const int i = base + threadIdx.x;
    int count = 0;
    if (i < num_listed) {
      const int32_t block = listed ? listed[i] : p.sink_blocks + i;
      count = max(0, TlsBlockCandEnd(geo, block) - TlsBlockCandBegin(geo, block));
      tile_blocks[threadIdx.x] = block;
    }
    int total;
    const int offset = BlockExclusiveScan<kExpandThreads>(count, scan, &total);
    offsets[threadIdx.x] = offset;
    __syncthreads();
    const int tile = min(kExpandThreads, num_listed - base);
    for (int e = threadIdx.x; e < tile * kKvBlockSize; e += kExpandThreads) {
      const int t = e / kKvBlockSize;
      const int32_t block = tile_blocks[t];
      const int32_t pos = block * kKvBlockSize + e % kKvBlockSize;
      const int32_t lo = TlsBlockCandBegin(geo, block);
      if (pos >= lo && pos < TlsBlockCandEnd(geo, block)) {
        row[geo.sink_end + written + offsets[t] + (pos - lo)] = pos;
      }
    }
    written += total;
    __syncthreads();
  }
  WriteAlways(geo, written, row);
  if (threadIdx.x == 0) p.num_positions[bg] = geo.sink_end + written + (geo.len - geo.recent_start);
}

// ---- token scores -------------------------------------------------------------------------
// Three passes over the candidates (grid (ceil(max_candidates / candidates per CTA), batch *
// num_kv_heads)); each recomputes the per-head logits (NC fmas from the INT4 row) instead of
// storing them. Softmax shifts are chunk-local (tls_math.h): chunk k is candidate slots
// [32k, 32k + 32), the slots j of the reference (listed block j / 64, token j % 64).
//   pass 0: per (chunk, head) and per head the max scaled dot y (ordered bits)
//   pass 1: per head the sum of the chunks' exp sums, each shifted by c_max - c (exact uint64
//           fixed point, atomicAdd)
//   pass 2: alpha = sum_h e_h * w_h (heads in order; w: the chunk's TlsChunkWeight), and the
//           candidate positions
// A warp's 32 lanes are one chunk's 32 slots in every pass (CTAs start at multiples of 32
// slots), so a chunk's max and exp sum are warp reductions, written by one lane.
// HS = 1: one thread per candidate walks every head (128 candidates per CTA). HS > 1 (large
// groups, e.g. MLA): warp w of HS handles heads w, w + HS, ... for the CTA's 32 candidates, so
// HS times more threads share the logit work; pass 2 stages e_h in shared memory and one thread
// per candidate then accumulates alpha over the heads in order, the same fma chain as HS = 1,
// so the scores are unchanged bit for bit.
// STORED (wide channel sets with large groups, MLA): pass 0 is TokenLogitsKernel, a tiled
// product that writes every logit to the workspace; passes 1-2 read them instead of
// recomputing NC fmas per head (each logit is the same fma chain either way); pass 1 writes
// each exp back over its logit, so pass 2 reads e_h instead of recomputing the exp.
constexpr int kTokenThreads = 128;

template <int HS>
struct TokenTile {
  static constexpr int kThreads = HS == 1 ? kTokenThreads : 32 * HS;
  static constexpr int kCands = HS == 1 ? kTokenThreads : 32;
  static constexpr int kChunks = kCands / kTlsSoftmaxChunk;  // HS = 1: warp w's slots, chunk w
  static_assert(kCands % kTlsSoftmaxChunk == 0 && kTlsSoftmaxChunk == 32,
                "a chunk is one warp's slots, whole within a CTA");
};

// Softmax chunks of a row of max_candidates slots.
__host__ __device__ __forceinline__ int SoftmaxChunks(int max_candidates) {
  return (max_candidates + kTlsSoftmaxChunk - 1) / kTlsSoftmaxChunk;
}

// Whether a max key (ordered bits; 0 for none or NaN) is above -inf's: the reference leaves a
// chunk out of the softmax when no candidate's y in it is (its chunk max stays -inf).
__device__ __forceinline__ bool ChunkHasMax(uint32_t key) {
  return key > TlsOrderedBits(__int_as_float(0xff800000));
}

// Per-row scratch of the token passes: per (row, head) a max and an exp sum, per (row, chunk,
// head) the chunk's max, zeroed before each call, and the row's quantized queries
// (QuantizeQueryKernel).
struct TokenStats {
  uint32_t* max_bits;        // [batch * num_kv_heads * group]
  uint32_t* chunk_max_bits;  // [batch * num_kv_heads, SoftmaxChunks(max_candidates), group]
  unsigned long long* exp_sum;
  float* qcode;     // [batch * num_kv_heads * group, num_channels] int8 codes as floats
  float* qscale;    // [batch * num_kv_heads * group]
  int* qsum;        // [batch * num_kv_heads * group] sum of each head's codes
  uint32_t* qfrag;  // groups of 16s: IMMA A fragments per 16-head tile (LoadQueryFragments)
  int* row_done;    // [batch * num_kv_heads] tickets of the MLA row's CTAs (RowTickets)
};

// Rows x heads.
size_t TokenStatsCount(const TlsTokenScoreParams& p) {
  return size_t(p.batch) * p.num_kv_heads *
         (p.num_kv_heads > 0 ? p.num_q_heads / p.num_kv_heads : 0);
}

// Byte offsets in the workspace: exp sums, max bits and chunk max bits (the zeroed counters),
// then the query codes, scales, code sums and A fragments, and the head-tile counters (zeroed by
// QuantizeQueryKernel); `bytes` the total.
struct TokenStatsLayout {
  size_t max_bits, chunk_max_bits, qcode, qscale, qsum, qfrag, row_done, bytes;
};

TokenStatsLayout MakeTokenStatsLayout(const TlsTokenScoreParams& p) {
  const size_t n = TokenStatsCount(p);
  TokenStatsLayout l;
  l.max_bits = AlignUp(n * 8, 256);
  l.chunk_max_bits = l.max_bits + AlignUp(n * 4, 256);
  l.qcode = l.chunk_max_bits + AlignUp(n * SoftmaxChunks(std::max(0, p.max_candidates)) * 4, 256);
  l.qscale = l.qcode + AlignUp(n * std::max(0, p.num_channels) * 4, 256);
  l.qsum = l.qscale + AlignUp(n * 4, 256);
  l.qfrag = l.qsum + AlignUp(n * 4, 256);
  l.row_done = l.qfrag + AlignUp(n * std::max(0, p.num_channels), 256);  // a byte per code
  l.bytes = l.row_done + AlignUp(size_t(p.batch) * std::max(0, p.num_kv_heads) * 4, 256);
  return l;
}

size_t TokenStatsBytes(const TlsTokenScoreParams& p) { return MakeTokenStatsLayout(p).bytes; }

TokenStats TokenStatsIn(void* workspace, const TlsTokenScoreParams& p) {
  const TokenStatsLayout l = MakeTokenStatsLayout(p);
  char* base = static_cast<char*>(workspace);
  TokenStats s;
  s.exp_sum = reinterpret_cast<unsigned long long*>(base);
  s.max_bits = reinterpret_cast<uint32_t*>(base + l.max_bits);
  s.chunk_max_bits = reinterpret_cast<uint32_t*>(base + l.chunk_max_bits);
  s.qcode = reinterpret_cast<float*>(base + l.qcode);
  s.qscale = reinterpret_cast<float*>(base + l.qscale);
  s.qsum = reinterpret_cast<int*>(base + l.qsum);
  s.qfrag = reinterpret_cast<uint32_t*>(base + l.qfrag);
  s.row_done = reinterpret_cast<int*>(base + l.row_done);
  return s;
}

// Token scoring's query side (tls_math.h), once per row before the passes: the group's int8
// query codes on the row's channel set, their scales and code sums. A warp per head, blockDim
// / 32 heads per CTA, grid (rows, group / heads): a row's heads quantize side by side. For
// groups of 16s a CTA holds 16 heads and also packs their IMMA A fragments (qfrag), so the
// tensor-core kernels load them with one 16-byte load per slice instead of 4 * NC / 8 scalar
// loads per lane.
constexpr int kQuantizeHeads = kTokenThreads / 32;
constexpr int kQuantizeTileHeads = 16;

template <int NC>
__global__ void __launch_bounds__(kQuantizeTileHeads * 32)
    QuantizeQueryKernel(TlsTokenScoreParams p, TokenStats stats) {
  const int bg = blockIdx.x;
  const int group = p.num_q_heads / p.num_kv_heads;
  const int heads = static_cast<int>(blockDim.x) / 32;
  const int hh = blockIdx.y * heads + threadIdx.x / 32;
  const int64_t head = int64_t{bg} * group + hh;
  // An MLA token kernel launched after this one (LaunchClustersAfterQueries) may start now: it
  // reads what this grid writes only after WaitForPreviousGrid.
  LetNextGridLaunch();
  if (blockIdx.y == 0 && threadIdx.x == 0) stats.row_done[bg] = 0;  // before the token kernel
  if (hh < group) {
    const int sum = QuantizeHeadWarp<NC>(p, bg / p.num_kv_heads, bg % p.num_kv_heads, hh,
                                         stats.qcode + head * NC, stats.qscale + head);
    if ((threadIdx.x & 31) == 0) stats.qsum[head] = sum;
  }
  if (heads != kQuantizeTileHeads) return;
  __syncthreads();  // the tile's codes (global, written by this CTA) are complete
  const int sl = threadIdx.x / 32, lane = threadIdx.x & 31;
  if (sl < NC / 32) {
    const int64_t tile = (int64_t{bg} * group + blockIdx.y * heads) / kQuantizeTileHeads;
    uint32_t a[4];
    QueryFragmentSlice<NC>(stats.qcode + tile * kQuantizeTileHeads * NC, sl, lane, a);
    reinterpret_cast<uint4*>(stats.qfrag)[(tile * (NC / 32) + sl) * 32 + lane] =
        make_uint4(a[0], a[1], a[2], a[3]);
  }
}

template <int NC>
cudaError_t LaunchQuantizeQueries(const TlsTokenScoreParams& p, TokenStats stats,
                                  cudaStream_t stream) {
  const int group = p.num_q_heads / p.num_kv_heads;
  const int heads = group % kQuantizeTileHeads == 0 ? kQuantizeTileHeads : kQuantizeHeads;
  const dim3 grid(p.batch * p.num_kv_heads, (group + heads - 1) / heads);
  QuantizeQueryKernel<NC><<<grid, heads * 32, 0, stream>>>(p, stats);
  return cudaGetLastError();
}

// Zeroes the counters and quantizes the queries.
template <int NC>
cudaError_t PrepareTokenStats(const TlsTokenScoreParams& p, TokenStats* stats,
                              cudaStream_t stream) {
  *stats = TokenStatsIn(p.workspace, p);
  const cudaError_t err =
      cudaMemsetAsync(p.workspace, 0, MakeTokenStatsLayout(p).qcode, stream);  // the counters
  if (err != cudaSuccess) return err;
  return LaunchQuantizeQueries<NC>(p, *stats, stream);
}

// Stored logits: channel sets of 64+ and groups of 16, 32, 64 or 128 (MLA's heads on 128
// channels), candidate rows up to 16,384 (two-level budgets; token-only over a whole
// context would need rows x group x context floats). Laid out [row, head, candidate].
constexpr int kStoredMaxCandidates = 16384;

size_t StoredLogitsBytes(const TlsTokenScoreParams& p) {
  if (!UseStoredLogits(p)) return 0;
  return AlignUp(size_t(p.batch) * p.num_q_heads * p.max_candidates * sizeof(float), 256);
}

float* StoredLogitsIn(void* workspace, const TlsTokenScoreParams& p) {
  return reinterpret_cast<float*>(static_cast<char*>(workspace) + TokenStatsBytes(p));
}

// Pass 0 of the stored path on integer tensor cores (MmaS8U8, tls_common.cuh): the scaled dots of
// listed KV blocks' 64 candidates for every head of the group, a GROUP x NC by NC x 64 product
// per block. A CTA loads the group's query codes once and walks blocks blockIdx.x, + gridDim.x,
// ...; also the per-head and per (chunk, head) maxima (atomicMax on ordered bits: a block's two
// chunks, whole in the CTA, may span two warps).
constexpr int kLogitCands = kKvBlockSize;
constexpr int kLogitThreads = 128;  // 4 warps

template <int NC, int GROUP>
struct LogitTile {
  static constexpr int kMTiles = GROUP / 16;                        // 16-head row tiles
  static constexpr int kWarpM = kMTiles >= 4 ? kMTiles / 4 : 1;     // row tiles per warp
  static constexpr int kMGroups = kMTiles / kWarpM;                 // warps along heads
  static constexpr int kWarpN = 8 / (4 / kMGroups);                 // 8-candidate tiles per warp
  static constexpr int kSlabs = NC / 32;                            // k steps of 32 channels
  // Softmax chunks a warp's 8 * kWarpN candidates touch (8-candidate tiles never straddle one).
  static constexpr int kWarpChunks = (8 * kWarpN + kTlsSoftmaxChunk - 1) / kTlsSoftmaxChunk;
  static_assert((8 * kWarpN) % kTlsSoftmaxChunk == 0 || kTlsSoftmaxChunk % (8 * kWarpN) == 0,
                "a warp's candidates start a chunk or lie in one");
  static constexpr int kCodeStride = TokenCodeStride<NC>();
  static constexpr size_t kSmem = sizeof(float) * kLogitCands + sizeof(int) * GROUP +
                                  sizeof(uint32_t) * kLogitCands * kCodeStride;
};

template <int NC, int GROUP>
__global__ void __launch_bounds__(kLogitThreads)
    TokenLogitsKernel(TlsTokenScoreParams p, TokenStats stats, float* logits) {
  using Tile = LogitTile<NC, GROUP>;
  extern __shared__ float logit_smem[];
  float* scale_s = logit_smem;                // [64] token scales of the block
  int* qsum_s = reinterpret_cast<int*>(scale_s + kLogitCands);           // [GROUP]
  uint32_t* codes_s = reinterpret_cast<uint32_t*>(qsum_s + GROUP);       // [64][kCodeStride]
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int bg = blockIdx.y;
  const int b = bg / p.num_kv_heads, g = bg % p.num_kv_heads;
  const TlsGeometry geo = MakeTlsGeometry(
      p.seq_lens[b], SelectLen(p.maybe_select_lens, p.seq_lens, b), p.sink_blocks, p.window);
  const int num_listed =
      p.maybe_blocks ? p.maybe_num_blocks[bg] : max(0, geo.first_recent_block - p.sink_blocks);
  if (static_cast<int>(blockIdx.x) >= num_listed) return;  // passes 1-2 read valid logits only
  const int64_t stat = int64_t{bg} * GROUP;
  uint32_t* chunk_bits = stats.chunk_max_bits + stat * SoftmaxChunks(p.max_candidates);
  for (int hh = tid; hh < GROUP; hh += kLogitThreads) {
    qsum_s[hh] = stats.qsum[stat + hh];
  }
  __syncthreads();

  const int r = lane >> 2, t = lane & 3;
  const int mg = warp % Tile::kMGroups, ng = warp / Tile::kMGroups;
  // The query fragments, prepacked by QuantizeQueryKernel (a loop staging the group's codes in
  // shared memory first was a chain of L2 round trips).
  uint32_t a[Tile::kWarpM][Tile::kSlabs][4];
#pragma unroll
  for (int mi = 0; mi < Tile::kWarpM; ++mi) {
    LoadQueryFragments<NC>(stats.qfrag, (stat + 16 * (mg * Tile::kWarpM + mi)) / 16, lane, a[mi]);
  }
  uint32_t head_max[Tile::kWarpM][2] = {};
  for (int i = blockIdx.x; i < num_listed; i += gridDim.x) {
    const int32_t block =
        p.maybe_blocks ? p.maybe_blocks[int64_t{bg} * p.max_kept_blocks + i] : p.sink_blocks + i;
    const int64_t row = p.index_table[int64_t{b} * p.max_blocks_per_seq + block];
    const int64_t tok0 = (row * p.num_kv_heads + g) * kKvBlockSize;
    __syncthreads();  // the previous block's codes are consumed
    const uint32_t* src = reinterpret_cast<const uint32_t*>(p.token_codes + tok0 * (NC / 2));
    for (int e = tid; e < kLogitCands * (NC / 8); e += kLogitThreads) {
      codes_s[(e / (NC / 8)) * Tile::kCodeStride + e % (NC / 8)] = __ldg(src + e);
    }
    if (tid < kLogitCands) scale_s[tid] = p.token_scales[tok0 + tid];
    __syncthreads();

    int acc[Tile::kWarpM][Tile::kWarpN][4] = {};
#pragma unroll
    for (int sl = 0; sl < Tile::kSlabs; ++sl) {
#pragma unroll
      for (int ni = 0; ni < Tile::kWarpN; ++ni) {
        uint32_t b0, b1;
        CodeFragments(codes_s + (8 * (ng * Tile::kWarpN + ni) + r) * Tile::kCodeStride, sl, lane,
                      &b0, &b1);
#pragma unroll
        for (int mi = 0; mi < Tile::kWarpM; ++mi) MmaS8U8(acc[mi][ni], a[mi][sl], b0, b1);
      }
    }

    const int cbeg = TlsBlockCandBegin(geo, block), cend = TlsBlockCandEnd(geo, block);
    uint32_t chunk_max[Tile::kWarpM][2][Tile::kWarpChunks] = {};
#pragma unroll
    for (int mi = 0; mi < Tile::kWarpM; ++mi) {
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int head = 16 * (mg * Tile::kWarpM + mi) + r + 8 * half;
        const int offset = 8 * qsum_s[head];
        float* dst = logits + (stat + head) * p.max_candidates + i * kLogitCands;
#pragma unroll
        for (int ni = 0; ni < Tile::kWarpN; ++ni) {
          const int j = 8 * (ng * Tile::kWarpN + ni) + 2 * t;
          float out[2];
#pragma unroll
          for (int u = 0; u < 2; ++u) {
            const int32_t cpos = block * kKvBlockSize + j + u;
            const bool valid = cpos >= cbeg && cpos < cend;
            const float dot = static_cast<float>(acc[mi][ni][2 * half + u] - offset);
            out[u] = valid ? TlsTokenScaledDot(dot, scale_s[j + u]) : 0.f;
            if (valid) {
              uint32_t& m = chunk_max[mi][half][8 * ni / kTlsSoftmaxChunk];
              m = max(m, TlsOrderedBits(out[u]));
            }
          }
          *reinterpret_cast<float2*>(dst + j) = make_float2(out[0], out[1]);
        }
      }
    }
    // The four lanes of a quad hold one head's candidates. This warp's first chunk: slot
    // i * 64 + 8 * ng * kWarpN over 32; its entry of the quad's first head.
    const int chunk0 = (i * kLogitCands + 8 * ng * Tile::kWarpN) / kTlsSoftmaxChunk;
    uint32_t* quad_bits = chunk_bits + (chunk0 * GROUP + 16 * mg * Tile::kWarpM + r);
#pragma unroll
    for (int mi = 0; mi < Tile::kWarpM; ++mi) {
#pragma unroll
      for (int half = 0; half < 2; ++half) {
#pragma unroll
        for (int wc = 0; wc < Tile::kWarpChunks; ++wc) {
          uint32_t key = chunk_max[mi][half][wc];
          key = max(key, __shfl_xor_sync(0xffffffffu, key, 1));
          key = max(key, __shfl_xor_sync(0xffffffffu, key, 2));
          head_max[mi][half] = max(head_max[mi][half], key);
          if (t == 0 && ChunkHasMax(key)) {
            atomicMax(quad_bits + (wc * GROUP + 16 * mi + 8 * half), key);
          }
        }
      }
    }
  }
#pragma unroll
  for (int mi = 0; mi < Tile::kWarpM; ++mi) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int head = 16 * (mg * Tile::kWarpM + mi) + r + 8 * half;
      if (t == 0 && ChunkHasMax(head_max[mi][half])) {
        atomicMax(stats.max_bits + stat + head, head_max[mi][half]);
      }
    }
  }
}

template <int NC, int PASS, int HS, bool STORED>
__global__ void __launch_bounds__(TokenTile<HS>::kThreads)
    TokenScoreKernel(TlsTokenScoreParams p, TokenStats stats, float* logits) {
  constexpr int kThreads = TokenTile<HS>::kThreads;
  constexpr int kCands = TokenTile<HS>::kCands;
  constexpr int kChunks = TokenTile<HS>::kChunks;
  // [group, NC] query codes, then per head the exp factor a and the row's c_max, per (chunk of
  // the CTA, head) the exp shift's b and the chunk's c (pass 1) or alpha weight (pass 2), then
  // (HS > 1, pass 2) e [kCands, group + 1]
  extern __shared__ float q_s[];
  const int bg = blockIdx.y;
  const int b = bg / p.num_kv_heads, g = bg % p.num_kv_heads;
  const int group = p.num_q_heads / p.num_kv_heads;
  const TlsGeometry geo = MakeTlsGeometry(
      p.seq_lens[b], SelectLen(p.maybe_select_lens, p.seq_lens, b), p.sink_blocks, p.window);
  const int num_listed =
      p.maybe_blocks ? p.maybe_num_blocks[bg] : max(0, geo.first_recent_block - p.sink_blocks);
  const int sub = HS == 1 ? 0 : static_cast<int>(threadIdx.x) / 32;  // warp-uniform
  const int local = HS == 1 ? static_cast<int>(threadIdx.x) : static_cast<int>(threadIdx.x) % 32;
  const int j = blockIdx.x * kCands + local;
  const int first = blockIdx.x * kCands;
  if (first >= num_listed * kKvBlockSize) {
    if (PASS == 2 && sub == 0 && j < p.max_candidates)
      p.cand_positions[int64_t{bg} * p.max_candidates + j] = -1;
    return;
  }
  float* shift_a = q_s + (STORED ? 0 : group * NC);
  float* cmax_s = shift_a + group;
  float* shift_b = cmax_s + group;             // [kChunks][group]
  float* chunk_s = shift_b + kChunks * group;  // [kChunks][group]: c (pass 1), weight (pass 2)
  float* e_s = chunk_s + kChunks * group;
  const int64_t stat = int64_t{bg} * group;
  const int chunks = SoftmaxChunks(p.max_candidates);
  // The row's [chunk, head] maxima, from the CTA's first chunk.
  uint32_t* chunk_bits = stats.chunk_max_bits + (stat * chunks + first / kTlsSoftmaxChunk * group);
  for (int e = threadIdx.x; !STORED && e < group * NC; e += kThreads) {
    q_s[e] = stats.qcode[stat * NC + e];
  }
  const float exp_scale = p.scale * kTlsLog2E;
  if (PASS >= 1) {
    // c_max = TlsChunkShift of the row's max y, which is the largest chunk c: TlsChunkShift is
    // monotone in y for a >= 0 (rounding up, ceil and the clamp are), so the chunk holding the
    // max has the max c. An empty chunk (ChunkHasMax false) has no exp sum and weight 0, as in
    // the reference; its exps (NaN or -inf y only) are 2^-126 whatever the shift.
    for (int e = threadIdx.x; e < kChunks * group; e += kThreads) {
      const int k = e / group, hh = e % group;
      const float a = TlsMul(stats.qscale[stat + hh], exp_scale);
      const float c_max = TlsChunkShift(FromOrderedBits(stats.max_bits[stat + hh]), a);
      const bool in_row = first / kTlsSoftmaxChunk + k < chunks;
      const uint32_t key = in_row ? chunk_bits[e] : 0u;
      const bool has_max = ChunkHasMax(key);
      const float c = has_max ? TlsChunkShift(FromOrderedBits(key), a) : 0.f;
      shift_b[e] = TlsChunkExpShift(a, c).b;
      if (k == 0) {
        shift_a[hh] = a;
        cmax_s[hh] = c_max;
      }
      if (PASS == 1) {
        chunk_s[e] = c;
      } else {
        chunk_s[e] =
            has_max ? TlsChunkWeight(TlsInvDenominator(stats.exp_sum[stat + hh], group), c, c_max)
                    : 0.f;
      }
    }
  }
  __syncthreads();
  int32_t pos = -1;
  if (j < num_listed * kKvBlockSize) {
    const int i = j / kKvBlockSize;
    const int32_t block =
        p.maybe_blocks ? p.maybe_blocks[int64_t{bg} * p.max_kept_blocks + i] : p.sink_blocks + i;
    const int32_t cpos = block * kKvBlockSize + j % kKvBlockSize;
    if (cpos >= TlsBlockCandBegin(geo, block) && cpos < TlsBlockCandEnd(geo, block)) pos = cpos;
  }
  if (PASS == 2 && sub == 0 && j < p.max_candidates) {
    p.cand_positions[int64_t{bg} * p.max_candidates + j] = pos;
  }
  const bool valid = pos >= 0;
  uint32_t words[NC / 8];
#pragma unroll
  for (int w = 0; w < NC / 8; ++w) words[w] = 0u;
  float tok_scale = 0.f;
  if (valid && !STORED) {
    const int64_t row = p.index_table[int64_t{b} * p.max_blocks_per_seq + pos / kKvBlockSize];
    const int64_t tok = (row * p.num_kv_heads + g) * kKvBlockSize + pos % kKvBlockSize;
    const uint32_t* src = reinterpret_cast<const uint32_t*>(p.token_codes + tok * (NC / 2));
#pragma unroll
    for (int w = 0; w < NC / 8; ++w) words[w] = src[w];
    tok_scale = p.token_scales[tok];
  }
  // The codes are the same for every head: decode them once (kHoist) instead of once per head.
  // The scaled dot is TlsTokenScaledDot of TlsInt4Dot's exact sum, bit for bit.
  constexpr bool kHoist = NC <= 64 && !STORED;
  float codes[kHoist ? NC : 1];
  if (kHoist) {
#pragma unroll
    for (int w = 0; w < NC / 8; ++w) Int4WordToFloats(words[w], codes + 8 * w);
  }
  // This warp's chunk in the CTA: its [head] entries of shift_b / chunk_s / chunk_bits.
  const int kc = HS == 1 ? static_cast<int>(threadIdx.x) / 32 : 0;
  const float* chunk_b = shift_b + kc * group;
  const float* chunk_v = chunk_s + kc * group;
  float alpha = 0.f, part = 0.f;
  // Stored: the logit before pass 1, its exp after (pass 1 writes e back, pass 2 reads it).
  // Each is an L2 round trip, so a batch of heads' loads go out together before the math (a
  // plain loop waited for each in turn: the stored passes were latency-bound).
  constexpr int kHeadBatch = STORED ? 4 : 1;
  for (int hh0 = sub; hh0 < group; hh0 += kHeadBatch * HS) {
    float pre[kHeadBatch];
#pragma unroll
    for (int k = 0; k < kHeadBatch; ++k) {
      const int hh = hh0 + k * HS;
      pre[k] = STORED && valid && hh < group
                   ? logits[(int64_t{bg} * group + hh) * p.max_candidates + j]
                   : 0.f;
    }
#pragma unroll
    for (int k = 0; k < kHeadBatch; ++k) {
      const int hh = hh0 + k * HS;
      if (hh >= group) break;
      float* stored = STORED ? logits + (int64_t{bg} * group + hh) * p.max_candidates + j : nullptr;
      float logit = 0.f;
      if (STORED) {
        logit = pre[k];
      } else {
        const float acc = Int4HeadDot<NC, kHoist>(q_s + hh * NC, codes, words);  // NC % 16 == 0
        logit = valid ? TlsTokenScaledDot(acc, tok_scale) : 0.f;
      }
      if (PASS == 0) {
        const uint32_t key = valid ? TlsOrderedBits(logit) : 0u;
        const uint32_t wmax = __reduce_max_sync(0xffffffffu, key);  // the chunk's max
        if ((threadIdx.x & 31) == 0 && ChunkHasMax(wmax)) {
          chunk_bits[kc * group + hh] = wmax;  // this warp's alone
          atomicMax(stats.max_bits + stat + hh, wmax);
        }
      } else {
        const float e = !valid ? 0.f
                        : STORED && PASS == 2
                            ? logit
                            : TlsTokenExp(TlsTokenExpArg(logit, {shift_a[hh], chunk_b[hh]}));
        if (STORED && PASS == 1 && valid) *stored = e;
        if (PASS == 1) {
          // 32 terms of at most 2^23: the chunk's sum fits 32 bits.
          const uint32_t fixed = __reduce_add_sync(0xffffffffu, ExpFixed(e));
          if ((threadIdx.x & 31) == 0 && fixed != 0u) {  // 0 for an empty chunk
            const unsigned long long scaled = TlsChunkScaledSum(fixed, chunk_v[hh], cmax_s[hh]);
            if (scaled != 0ull) atomicAdd(stats.exp_sum + stat + hh, scaled);
          }
        } else if (HS == 1) {  // heads in order: close each kTlsAlphaHeadTile-head chain
          part = TlsAlphaTerm(e, chunk_v[hh], part);
          if (hh % kTlsAlphaHeadTile == kTlsAlphaHeadTile - 1 || hh == group - 1) {
            alpha = hh < kTlsAlphaHeadTile ? part : TlsAdd(alpha, part);
            part = 0.f;
          }
        } else {
          e_s[local * (group + 1) + hh] = e;  // padded row: the serial reads below hit 32 banks
        }
      }
    }
  }
  if (PASS == 2) {
    if (HS > 1) {
      __syncthreads();
      if (sub != 0) return;
      alpha = AlphaFromExps(e_s + local * (group + 1), 1, chunk_s, group);  // the CTA's chunk
    }
    if (valid) p.alpha[int64_t{bg} * p.max_candidates + j] = alpha;
  }
}

template <int NC, int HS, bool STORED>
cudaError_t LaunchTokenScorePasses(const TlsTokenScoreParams& p, TokenStats stats,
                                   float* logits, cudaStream_t stream) {
  using Tile = TokenTile<HS>;
  const int group = p.num_q_heads / p.num_kv_heads;
  const size_t smem =
      (size_t(STORED ? 0 : group) * NC + (2 + 2 * Tile::kChunks) * size_t(group)) * sizeof(float);
  const size_t smem2 = smem + (HS > 1 ? size_t(Tile::kCands) * (group + 1) * sizeof(float) : 0);
  const dim3 grid((p.max_candidates + Tile::kCands - 1) / Tile::kCands, p.batch * p.num_kv_heads);
  cudaError_t err = EnsureDynamicSmem<TokenScoreKernel<NC, 0, HS, STORED>>(smem);
  if (err == cudaSuccess) err = EnsureDynamicSmem<TokenScoreKernel<NC, 1, HS, STORED>>(smem);
  if (err == cudaSuccess) err = EnsureDynamicSmem<TokenScoreKernel<NC, 2, HS, STORED>>(smem2);
  if (err != cudaSuccess) return err;
  if (!STORED) {  // pass 0 of the stored path is TokenLogitsKernel
    TokenScoreKernel<NC, 0, HS, false><<<grid, Tile::kThreads, smem, stream>>>(p, stats, logits);
  }
  TokenScoreKernel<NC, 1, HS, STORED><<<grid, Tile::kThreads, smem, stream>>>(p, stats, logits);
  TokenScoreKernel<NC, 2, HS, STORED><<<grid, Tile::kThreads, smem2, stream>>>(p, stats, logits);
  return cudaGetLastError();
}

template <int NC, int GROUP>
cudaError_t LaunchTokenLogits(const TlsTokenScoreParams& p, TokenStats stats, float* logits,
                              cudaStream_t stream) {
  const size_t smem = LogitTile<NC, GROUP>::kSmem;
  const cudaError_t err = EnsureDynamicSmem<TokenLogitsKernel<NC, GROUP>>(smem);
  if (err != cudaSuccess) return err;
  // Resident CTAs of the GPU (asked once; every device assumed the same kind).
  static const int slots = [smem] {
    int device = 0, sms = 132, per_sm = 1;
    if (cudaGetDevice(&device) == cudaSuccess) {
      cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
    }
    if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, TokenLogitsKernel<NC, GROUP>,
                                                      kLogitThreads, smem) != cudaSuccess) {
      (void)cudaGetLastError();
      per_sm = 1;
    }
    return sms * std::max(1, per_sm);
  }();
  // Blocks per CTA: the fewest that fit every CTA in one wave (queries loaded once per CTA).
  const int rows = p.batch * p.num_kv_heads, blocks = p.max_candidates / kLogitCands;
  const int per_cta = std::max(1, (rows * blocks + slots - 1) / slots);
  const dim3 grid((blocks + per_cta - 1) / per_cta, rows);
  TokenLogitsKernel<NC, GROUP><<<grid, kLogitThreads, smem, stream>>>(p, stats, logits);
  return cudaGetLastError();
}

// Head split for the group size: more threads per candidate once a thread would walk 32 heads.
constexpr int kTokenHeadSplit = 8;

// The stored path's groups (16, 32, 64, 128).
template <int NC>
cudaError_t LaunchTokenLogitsForGroup(const TlsTokenScoreParams& p, TokenStats stats,
                                      float* logits, cudaStream_t stream) {
  switch (p.num_q_heads / p.num_kv_heads) {
    case 16:
      return LaunchTokenLogits<NC, 16>(p, stats, logits, stream);
    case 32:
      return LaunchTokenLogits<NC, 32>(p, stats, logits, stream);
    case 64:
      return LaunchTokenLogits<NC, 64>(p, stats, logits, stream);
    default:
      return LaunchTokenLogits<NC, 128>(p, stats, logits, stream);
  }
}

template <int NC>
cudaError_t LaunchTokenScore(const TlsTokenScoreParams& p, cudaStream_t stream) {
  const int group = p.num_q_heads / p.num_kv_heads;
  TokenStats stats;
  cudaError_t err = PrepareTokenStats<NC>(p, &stats, stream);
  if (err != cudaSuccess) return err;
  if constexpr (NC >= 64) {
    if (UseStoredLogits(p)) {
      float* logits = StoredLogitsIn(p.workspace, p);
      err = LaunchTokenLogitsForGroup<NC>(p, stats, logits, stream);
      if (err != cudaSuccess) return err;
      return group >= 32
                 ? LaunchTokenScorePasses<NC, kTokenHeadSplit, true>(p, stats, logits, stream)
                 : LaunchTokenScorePasses<NC, 1, true>(p, stats, logits, stream);
    }
  }
  return group >= 32
             ? LaunchTokenScorePasses<NC, kTokenHeadSplit, false>(p, stats, nullptr, stream)
             : LaunchTokenScorePasses<NC, 1, false>(p, stats, nullptr, stream);
}

// ---- decode select workspace ---------------------------------------------------------------
struct DecodeWorkspace {
  float* block_scores;
  float* query_sums;  // TlsBlockScoreParams::maybe_query_sums
  float* alpha;
  int32_t* cand;
  void* token_stats;
  size_t bytes;
};

int32_t DecodeMaxCandidates(const TlsDecodeSelectParams& p) {
  switch (p.policy.mode) {
    case TlsMode::kTokenOnly:
      return kKvBlockSize * p.max_blocks_per_seq;
    case TlsMode::kTwoLevel:
      return kKvBlockSize * p.max_kept_blocks;
    default:
      return 0;
  }
}

TlsTokenScoreParams DecodeTokenScoreParams(const TlsDecodeSelectParams& p) {
  TlsTokenScoreParams s{};
  s.q = p.q;
  s.channels = p.channels;
  s.token_codes = p.token_codes;
  s.token_scales = p.token_scales;
  s.index_table = p.index_table;
  s.seq_lens = p.seq_lens;
  s.io_dtype = p.io_dtype;
  s.batch = p.batch;
  s.num_q_heads = p.num_q_heads;
  s.num_kv_heads = p.num_kv_heads;
  s.head_dim = p.head_dim;
  s.num_channels = p.num_channels;
  s.max_blocks_per_seq = p.max_blocks_per_seq;
  s.max_kept_blocks = p.max_kept_blocks;
  s.max_candidates = DecodeMaxCandidates(p);
  s.sink_blocks = p.policy.sink_blocks;
  s.window = p.policy.window;
  s.scale = p.scale;
  return s;
}

DecodeWorkspace CarveDecodeWorkspace(const TlsDecodeSelectParams& p, void* base) {
  const size_t rows = size_t(p.batch) * p.num_kv_heads;
  const size_t cands = size_t(DecodeMaxCandidates(p));
  char* at = static_cast<char*>(base);
  DecodeWorkspace w{};
  size_t off = 0;
  auto take = [&](size_t bytes) {
    char* ptr = at ? at + off : nullptr;
    off += AlignUp(bytes, 256);
    return ptr;
  };
  w.block_scores = reinterpret_cast<float*>(take(rows * p.max_blocks_per_seq * sizeof(float)));
  w.query_sums = reinterpret_cast<float*>(
      take(TlsBlockScoreWorkspaceBytes(DecodeBlockScoreParams(p, p.q, nullptr))));
  w.alpha = reinterpret_cast<float*>(take(rows * cands * sizeof(float)));
  w.cand = reinterpret_cast<int32_t*>(take(rows * cands * sizeof(int32_t)));
  w.token_stats = take(TlsTokenScoreWorkspaceBytes(DecodeTokenScoreParams(p)));
  w.bytes = off;
  return w;
}

}  // namespace

namespace tls_detail {

bool UseStoredLogits(const TlsTokenScoreParams& p) {
  const int group = p.num_kv_heads > 0 ? p.num_q_heads / p.num_kv_heads : 0;
  return p.num_channels >= 64 && (group == 16 || group == 32 || group == 64 || group == 128) &&
         p.max_candidates <= kStoredMaxCandidates;
}

float* StoredExps(const TlsTokenScoreParams& p) { return StoredLogitsIn(p.workspace, p); }

cudaError_t QuantizeTokenQueries(const TlsTokenScoreParams& p, cudaStream_t stream) {
  if (!p.workspace) return cudaErrorInvalidValue;
  const TokenStats stats = TokenStatsIn(p.workspace, p);
  switch (p.num_channels) {
    case 16:
      return LaunchQuantizeQueries<16>(p, stats, stream);
    case 32:
      return LaunchQuantizeQueries<32>(p, stats, stream);
    case 64:
      return LaunchQuantizeQueries<64>(p, stats, stream);
    case 128:
      return LaunchQuantizeQueries<128>(p, stats, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

TokenQueries TokenQueriesIn(const TlsTokenScoreParams& p) {
  const TokenStats s = TokenStatsIn(p.workspace, p);
  return {s.qcode, s.qscale, s.qsum, s.qfrag, s.row_done};
}

}  // namespace tls_detail

bool TlsSelectCanImplement(int head_dim, int num_channels, int group_size) {
  const bool channels_ok =
      num_channels == 16 || num_channels == 32 || num_channels == 64 || num_channels == 128;
  return head_dim > 0 && head_dim % 8 == 0 && head_dim <= 4096 && channels_ok &&
         num_channels <= head_dim && group_size >= 1 && group_size * num_channels <= 16384;
}

size_t TlsBlockScoreWorkspaceBytes(const TlsBlockScoreParams& p) {
  return size_t(std::max(0, p.batch)) * std::max(0, p.num_kv_heads) * 2 * std::max(0, p.head_dim) *
         sizeof(float);
}

cudaError_t TlsBlockScore(const TlsBlockScoreParams& p, cudaStream_t stream) {
  if (p.batch <= 0) return cudaSuccess;
  if (p.head_dim % kTlsBlockScoreSlices != 0 || p.num_kv_heads <= 0 ||
      p.num_q_heads % p.num_kv_heads != 0) {
    return cudaErrorInvalidValue;
  }
  const dim3 grid((p.max_blocks_per_seq + kScoreBlocks - 1) / kScoreBlocks,
                  p.batch * p.num_kv_heads);
  return p.maybe_block_scales != nullptr ? LaunchBlockScoreFor<int8_t>(p, grid, stream)
                                         : LaunchBlockScoreFor<uint16_t>(p, grid, stream);
}

cudaError_t TlsBlockSelect(const TlsBlockSelectParams& p, cudaStream_t stream) {
  if (p.batch <= 0) return cudaSuccess;
  if (p.k < 0 || p.k > p.max_kept_blocks) return cudaErrorInvalidValue;
  const int rows = p.batch * p.num_kv_heads;
  if (p.max_blocks_per_seq <= 4 * kSelectThreads) {
    BlockSelectRegKernel<4><<<rows, kSelectThreads, 0, stream>>>(p);
  } else if (p.max_blocks_per_seq <= 8 * kSelectThreads) {
    BlockSelectRegKernel<8><<<rows, kSelectThreads, 0, stream>>>(p);
  } else if (p.max_blocks_per_seq <= kSelectCacheItems) {
    BlockSelectKernel<true>
        <<<rows, kSelectThreads, p.max_blocks_per_seq * sizeof(float), stream>>>(p);
  } else {
    BlockSelectKernel<false><<<rows, kSelectThreads, 0, stream>>>(p);
  }
  return cudaGetLastError();
}

size_t TlsTokenScoreWorkspaceBytes(const TlsTokenScoreParams& p) {
  return TokenStatsBytes(p) + StoredLogitsBytes(p);
}

cudaError_t TlsTokenScore(const TlsTokenScoreParams& p, cudaStream_t stream) {
  if (p.batch <= 0) return cudaSuccess;
  if (p.num_kv_heads <= 0 || p.num_q_heads % p.num_kv_heads != 0 ||
      !TlsSelectCanImplement(p.head_dim, p.num_channels, p.num_q_heads / p.num_kv_heads)) {
    return cudaErrorInvalidValue;
  }
  switch (p.num_channels) {
    case 16:
      return LaunchTokenScore<16>(p, stream);
    case 32:
      return LaunchTokenScore<32>(p, stream);
    case 64:
      return LaunchTokenScore<64>(p, stream);
    case 128:
      return LaunchTokenScore<128>(p, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

cudaError_t TlsTokenSelect(const TlsTokenSelectParams& p, cudaStream_t stream) {
  if (p.batch <= 0) return cudaSuccess;
  if (p.k < 0) return cudaErrorInvalidValue;
  if (p.max_candidates <= kSelectCacheItems) {
    const size_t smem = size_t(p.max_candidates) * (sizeof(float) + sizeof(int32_t));
    const cudaError_t err = EnsureDynamicSmem<TokenSelectKernel<true>>(smem);
    if (err != cudaSuccess) return err;
    TokenSelectKernel<true><<<p.batch * p.num_kv_heads, kTokenSelectThreads, smem, stream>>>(p);
  } else {
    TokenSelectKernel<false><<<p.batch * p.num_kv_heads, kTokenSelectThreads, 0, stream>>>(p);
  }
  return cudaGetLastError();
}

cudaError_t TlsBlockExpand(const TlsBlockExpandParams& p, cudaStream_t stream) {
  if (p.batch <= 0) return cudaSuccess;
  BlockExpandKernel<<<p.batch * p.num_kv_heads, kExpandThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

size_t TlsDecodeSelectWorkspaceBytes(const TlsDecodeSelectParams& p) {
  return CarveDecodeWorkspace(p, nullptr).bytes;
}

cudaError_t TlsDecodeSelect(const TlsDecodeSelectParams& p, cudaStream_t stream) {
  return TlsDecodeSelect(p, stream, nullptr, nullptr, nullptr, nullptr);
}

cudaError_t TlsDecodeSelect(const TlsDecodeSelectParams& p, cudaStream_t stream,
                            cudaStream_t block_stream, const void* block_q, cudaEvent_t fork,
                            cudaEvent_t join) {
  if (p.batch <= 0) return cudaSuccess;
  const TlsPolicy& pol = p.policy;
  if (pol.mode != TlsMode::kDense &&
      p.max_positions < TlsMaxSelectedTokens(pol, p.max_blocks_per_seq)) {
    return cudaErrorInvalidValue;
  }
  const DecodeWorkspace ws = CarveDecodeWorkspace(p, p.workspace);
  auto select_blocks = [&](int k, cudaStream_t on, const void* q) {
    if (k > p.max_kept_blocks) return cudaErrorInvalidValue;
    TlsBlockScoreParams score = DecodeBlockScoreParams(p, q, ws.block_scores);
    score.maybe_query_sums = ws.query_sums;
    cudaError_t err = TlsBlockScore(score, on);
    if (err != cudaSuccess) return err;
    const TlsBlockSelectParams sel{
        ws.block_scores,      p.seq_lens,        p.blocks, p.num_blocks,   p.batch, p.num_kv_heads,
        p.max_blocks_per_seq, p.max_kept_blocks, k,        pol.sink_blocks};
    return TlsBlockSelect(sel, on);
  };
  auto select_tokens = [&](const int32_t* blocks, const int32_t* num_blocks,
                           const int32_t* select_lens) {
    TlsTokenScoreParams s = DecodeTokenScoreParams(p);
    s.maybe_select_lens = select_lens;
    s.maybe_blocks = blocks;
    s.maybe_num_blocks = num_blocks;
    s.alpha = ws.alpha;
    s.cand_positions = ws.cand;
    s.workspace = ws.token_stats;
    const TlsTokenSelectParams sel{
        ws.alpha,         ws.cand,         p.seq_lens,     select_lens,      p.positions,
        p.num_positions,  p.batch,         p.num_kv_heads, s.max_candidates, p.max_positions,
        pol.token_budget, pol.sink_blocks, pol.window};
    if (TlsTokenScoreSelectCanFuse(s)) return TlsTokenScoreSelect(s, sel, stream);
    cudaError_t err = TlsTokenScore(s, stream);
    if (err != cudaSuccess) return err;
    return TlsTokenSelect(sel, stream);
  };
  auto expand = [&](const int32_t* blocks, const int32_t* num_blocks) {
    const TlsBlockExpandParams e{
        blocks,          num_blocks,      p.seq_lens,     nullptr,           p.positions,
        p.num_positions, p.batch,         p.num_kv_heads, p.max_kept_blocks, p.max_blocks_per_seq,
        p.max_positions, pol.sink_blocks, pol.window};
    return TlsBlockExpand(e, stream);
  };
  cudaError_t err = cudaSuccess;
  switch (pol.mode) {
    case TlsMode::kDense:
      return expand(nullptr, nullptr);
    case TlsMode::kBlockOnly:
      err = select_blocks(TlsKeptBlocks(pol), stream, p.q);
      return err != cudaSuccess ? err : expand(p.blocks, p.num_blocks);
    case TlsMode::kTokenOnly:
      return select_tokens(nullptr, nullptr, nullptr);
    case TlsMode::kTwoLevel:
      if (pol.lag == TlsLag::kOneStep && block_stream) {
        // The token branch first (its kernels take the SMs first), then M_t beside it.
        if ((err = cudaEventRecord(fork, stream)) != cudaSuccess ||
            (err = cudaStreamWaitEvent(block_stream, fork, 0)) != cudaSuccess ||
            (err = select_tokens(p.prev_blocks, p.prev_num_blocks, p.prev_select_lens)) !=
                cudaSuccess ||
            (err = select_blocks(pol.block_budget, block_stream, block_q)) != cudaSuccess) {
          return err;
        }
        return cudaEventRecord(join, block_stream);
      }
      if (pol.lag == TlsLag::kOneStep) {
        err = select_tokens(p.prev_blocks, p.prev_num_blocks, p.prev_select_lens);
        return err != cudaSuccess ? err : select_blocks(pol.block_budget, stream, p.q);
      }
      err = select_blocks(pol.block_budget, stream, p.q);
      return err != cudaSuccess ? err : select_tokens(p.blocks, p.num_blocks, nullptr);
  }
  return cudaErrorInvalidValue;
}

}  // namespace asynctls::kernels::cuda
