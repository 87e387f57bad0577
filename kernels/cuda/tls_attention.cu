// CUDA sparse decode attention over selected positions of the paged bf16 KV cache: split-K
// over the positions, one block per (split, sequence, KV head, chunk of the group's heads), so
// each gathered K/V row is read once for up to HPC query heads; fp32 online softmax in the
// log2 domain; a merge kernel combines the splits and writes the log-sum-exp. GQA head dims
// (64, 128; groups of 1-16) use fp32 CUDA-core math (SparseAttnKernel: the split's pool rows
// looked up at once, cp.async K/V tiles two deep); MLA (576 / 512, 16+
// heads on one latent row) uses tensor cores: 16 heads per CTA, with bulk-copy row gathers three
// tiles deep (mla::MlaPipeAttnKernel, bf16 io with V inside the K rows) or one tile at a time
// (mla::MlaAttnKernel, fp32 io or a V pool of its own), or 32-64 heads per CTA with
// double-buffered tiles where each CTA gets several (mla::MlaWideAttnKernel, bf16).
#include <cuda_bf16.h>

#include <algorithm>
#include <cmath>

#include "asynctls/kernels/cuda_tls.h"
#include "paged_attention_common.cuh"
#include "tls_common.cuh"

namespace asynctls::kernels::cuda {
namespace {

using attention_detail::Bf16Io;
using attention_detail::BulkCopyToShared;
using attention_detail::CpAsync16;
using attention_detail::CpAsyncCommit;
using attention_detail::CpAsyncWait;
using attention_detail::F32Io;
using attention_detail::FenceMbarInit;
using attention_detail::kLog2e;
using attention_detail::LdMatrixX2;
using attention_detail::LdMatrixX4;
using attention_detail::LdMatrixX4Trans;
using attention_detail::MbarArriveExpectTx;
using attention_detail::MbarInit;
using attention_detail::MbarWait;
using attention_detail::MmaBf16;
using attention_detail::PackBf16;
using attention_detail::SmemAddr;
using attention_detail::TileOffset;
using tls_detail::AlignUp;
using tls_detail::EnsureDynamicSmem;
using tls_detail::LaunchAfterPrevious;
using tls_detail::LetNextGridLaunch;
using tls_detail::LoadIo;
using tls_detail::NumSms;
using tls_detail::StoreIo;
using tls_detail::WaitForPreviousGrid;

constexpr int kAttnThreads = 256;
constexpr int kAttnWarps = kAttnThreads / 32;
constexpr int kTile = 32;   // positions per tile: one per lane in the softmax update
constexpr int kRowPad = 8;  // bf16 elements of padding per smem row (conflict-free 16 B reads)
constexpr float kLn2 = 0.69314718055994531f;

// Element offsets in the paged pool of the rows of tile positions [t0, t0 + cnt), one per
// thread below `tile` (0 past cnt: those rows are zero-filled or never read).
__device__ __forceinline__ void TileRowOffsets(const TlsSparseAttentionParams& p,
                                               const int32_t* positions, const int32_t* table,
                                               int g, int t0, int cnt, int tile, int row_elems,
                                               int64_t* row_off) {
  const int tid = threadIdx.x;
  if (tid >= tile) return;
  int64_t off = 0;
  if (tid < cnt) {
    const int32_t pos = positions[t0 + tid];
    const int64_t block = table[pos / kKvBlockSize];
    off = ((block * p.num_kv_heads + g) * kKvBlockSize + pos % kKvBlockSize) * row_elems;
  }
  row_off[tid] = off;
}

// Pool rows a GQA CTA looks up at once (int32 row indices: pools of under 2^31 rows): a split
// of up to this many positions pays the position -> block table chain once; longer splits
// look up the next chunk when they reach it.
constexpr int kAttnSlots = 512;

struct AttnLayout {
  size_t q, p, stats, slots, k, v, bytes;
};

// Two K (and V) tile buffers: tile i + 1's rows load (cp.async) while tile i is computed.
template <int HEAD_DIM, int V_DIM, int HPC>
constexpr AttnLayout MakeAttnLayout(bool shared_kv) {
  AttnLayout l{};
  size_t off = 0;
  l.q = off;
  off += sizeof(float) * HPC * HEAD_DIM;
  l.p = off;
  off += sizeof(float) * HPC * kTile;
  l.stats = off;
  off += sizeof(float) * 3 * HPC;
  off = (off + 15) / 16 * 16;
  l.slots = off;
  off += sizeof(int32_t) * kAttnSlots;
  l.k = off;
  off += 2 * 2 * kTile * (HEAD_DIM + kRowPad);
  l.v = off;
  if (!shared_kv) off += 2 * 2 * kTile * (V_DIM + kRowPad);
  l.bytes = off;
  return l;
}

template <int HEAD_DIM, int V_DIM, int HPC>
__global__ void __launch_bounds__(kAttnThreads)
    SparseAttnKernel(TlsSparseAttentionParams p, int split_tokens, int num_splits, float* ws_acc,
                     float* ws_ml) {
  extern __shared__ __align__(16) unsigned char smem[];
  const bool shared_kv = p.v_cache == p.k_cache;
  constexpr AttnLayout kL = MakeAttnLayout<HEAD_DIM, V_DIM, HPC>(true);
  float* q_s = reinterpret_cast<float*>(smem + kL.q);
  float* p_s = reinterpret_cast<float*>(smem + kL.p);
  float* m_s = reinterpret_cast<float*>(smem + kL.stats);
  float* l_s = m_s + HPC;
  float* corr_s = l_s + HPC;
  int32_t* slot_s = reinterpret_cast<int32_t*>(smem + kL.slots);
  __nv_bfloat16* k_s = reinterpret_cast<__nv_bfloat16*>(smem + kL.k);
  __nv_bfloat16* v_s = shared_kv ? k_s : reinterpret_cast<__nv_bfloat16*>(smem + kL.v);
  constexpr int kKStride = HEAD_DIM + kRowPad;
  constexpr int kVStrideSep = V_DIM + kRowPad;
  const int v_stride = shared_kv ? kKStride : kVStrideSep;
  constexpr int kKBuf = kTile * kKStride, kVBufSep = kTile * kVStrideSep;

  const int split = blockIdx.x, bg = blockIdx.y;
  const int b = bg / p.num_kv_heads, g = bg % p.num_kv_heads;
  const int group = p.num_q_heads / p.num_kv_heads;
  const int h0 = blockIdx.z * HPC;
  const int heads = min(HPC, group - h0);
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const float q_scale = p.scale * 1.4426950408889634f;

  // Before the wait: the selection kernel ahead does not write the query (see MlaAttnKernel).
  for (int e = tid; e < HPC * HEAD_DIM; e += kAttnThreads) {
    const int hh = e / HEAD_DIM, d = e % HEAD_DIM;
    q_s[e] = hh < heads
                 ? LoadIo(p.q, p.io_dtype,
                          (int64_t{b} * p.num_q_heads + g * group + h0 + hh) * HEAD_DIM + d) *
                       q_scale
                 : 0.f;
  }
  if (tid < HPC) {
    m_s[tid] = -INFINITY;
    l_s[tid] = 0.f;
  }
  WaitForPreviousGrid();  // the selection before this kernel wrote the positions
  const int n = p.num_positions[bg];
  const int t_begin = split * split_tokens;
  const int t_end = min(n, t_begin + split_tokens);
  constexpr int kPairs2 = HPC * V_DIM / 2;
  constexpr int kAcc = (kPairs2 + kAttnThreads - 1) / kAttnThreads;
  float2 acc[kAcc];
#pragma unroll
  for (int i = 0; i < kAcc; ++i) acc[i] = make_float2(0.f, 0.f);

  const int32_t* positions = p.positions + int64_t{bg} * p.max_positions;
  const int32_t* table = p.block_table + int64_t{b} * p.max_blocks_per_seq;
  const __nv_bfloat16* k_cache = static_cast<const __nv_bfloat16*>(p.k_cache);
  const __nv_bfloat16* v_cache = static_cast<const __nv_bfloat16*>(p.v_cache);
  constexpr int kVecs = HEAD_DIM / 8;
  constexpr int kScorePairs = HPC * kTile;
  constexpr int kTpp = kAttnThreads / kScorePairs > 0 ? kAttnThreads / kScorePairs : 1;

  const int num_tiles = (max(t_end - t_begin, 0) + kTile - 1) / kTile;
  // The pool rows of positions [c0, c0 + kAttnSlots) of the split, all loads in flight together.
  auto look_up = [&](int c0) {
    const int cnt = min(kAttnSlots, t_end - c0);
    for (int i = tid; i < cnt; i += kAttnThreads) {
      const int32_t pos = positions[c0 + i];
      slot_s[i] = static_cast<int32_t>((int64_t{table[pos / kKvBlockSize]} * p.num_kv_heads + g) *
                                           kKvBlockSize +
                                       pos % kKvBlockSize);
    }
  };
  // Tile `tile`'s K (and V) rows into buffer tile % 2, one cp.async group; rows past the split's
  // end are zero-filled. Its slots are in slot_s (the caller looked them up).
  auto issue_tile = [&](int tile) {
    const int t0 = t_begin + tile * kTile, cnt = min(kTile, t_end - t0);
    const int s0 = (t0 - t_begin) % kAttnSlots;
    __nv_bfloat16* kb = k_s + (tile & 1) * kKBuf;
    for (int e = tid; e < kTile * kVecs; e += kAttnThreads) {
      const int r = e / kVecs, c = e % kVecs;
      const int64_t row = r < cnt ? slot_s[s0 + r] : 0;
      CpAsync16(SmemAddr(kb + r * kKStride + 8 * c), k_cache + row * HEAD_DIM + 8 * c, r < cnt);
    }
    if (!shared_kv) {
      __nv_bfloat16* vb = v_s + (tile & 1) * kVBufSep;
      for (int e = tid; e < kTile * (V_DIM / 8); e += kAttnThreads) {
        const int r = e / (V_DIM / 8), c = e % (V_DIM / 8);
        const int64_t row = r < cnt ? slot_s[s0 + r] : 0;
        CpAsync16(SmemAddr(vb + r * kVStrideSep + 8 * c), v_cache + row * V_DIM + 8 * c, r < cnt);
      }
    }
    CpAsyncCommit();
  };
  constexpr int kTilesPerChunk = kAttnSlots / kTile;
  if (num_tiles > 0) {
    look_up(t_begin);
    __syncthreads();
    issue_tile(0);
  }
  for (int tile = 0; tile < num_tiles; ++tile) {
    const int t0 = t_begin + tile * kTile, cnt = min(kTile, t_end - t0);
    if (tile + 1 < num_tiles) {
      if ((tile + 1) % kTilesPerChunk == 0) {  // the next chunk's rows (this tile's are issued)
        __syncthreads();
        look_up(t_begin + (tile + 1) * kTile);
        __syncthreads();
      }
      issue_tile(tile + 1);
      CpAsyncWait<1>();
    } else {
      CpAsyncWait<0>();
    }
    __syncthreads();  // this tile's rows, from every thread's copies
    const __nv_bfloat16* kb = k_s + (tile & 1) * kKBuf;
    const __nv_bfloat16* vb = shared_kv ? kb : v_s + (tile & 1) * kVBufSep;
    // Scores (log2 domain): kTpp threads per (head, position) pair.
    for (int pair = tid / kTpp; pair < kScorePairs; pair += kAttnThreads / kTpp) {
      const int hh = pair / kTile, t = pair % kTile, sub = tid % kTpp;
      const float* qrow = q_s + hh * HEAD_DIM;
      const __nv_bfloat16* krow = kb + t * kKStride;
      float s = 0.f;
      for (int c = sub; c < kVecs; c += kTpp) {
        const uint4 kv = *reinterpret_cast<const uint4*>(krow + 8 * c);
        const float4 qa = *reinterpret_cast<const float4*>(qrow + 8 * c);
        const float4 qb = *reinterpret_cast<const float4*>(qrow + 8 * c + 4);
        const __nv_bfloat162* k2 = reinterpret_cast<const __nv_bfloat162*>(&kv);
        const float2 k01 = __bfloat1622float2(k2[0]), k23 = __bfloat1622float2(k2[1]);
        const float2 k45 = __bfloat1622float2(k2[2]), k67 = __bfloat1622float2(k2[3]);
        s += qa.x * k01.x + qa.y * k01.y + qa.z * k23.x + qa.w * k23.y;
        s += qb.x * k45.x + qb.y * k45.y + qb.z * k67.x + qb.w * k67.y;
      }
#pragma unroll
      for (int o = kTpp / 2; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
      if (sub == 0) p_s[hh * kTile + t] = t < cnt ? s : -INFINITY;
    }
    __syncthreads();
    for (int hh = warp; hh < HPC; hh += kAttnWarps) {
      const float s = p_s[hh * kTile + lane];
      float tmax = s;
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) tmax = fmaxf(tmax, __shfl_xor_sync(0xffffffffu, tmax, o));
      const float m_old = m_s[hh];
      const float m_new = fmaxf(m_old, tmax);
      const float pe = exp2f(s - m_new);
      float sum = pe;
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
      p_s[hh * kTile + lane] = pe;
      if (lane == 0) {
        const float corr = exp2f(m_old - m_new);
        m_s[hh] = m_new;
        l_s[hh] = l_s[hh] * corr + sum;
        corr_s[hh] = corr;
      }
    }
    __syncthreads();
#pragma unroll
    for (int i = 0; i < kAcc; ++i) {
      const int e2 = tid + i * kAttnThreads;
      if (kPairs2 % kAttnThreads == 0 || e2 < kPairs2) {
        const int hh = e2 / (V_DIM / 2), d2 = e2 % (V_DIM / 2);
        const float corr = corr_s[hh];
        float2 a = make_float2(acc[i].x * corr, acc[i].y * corr);
        const float* prow = p_s + hh * kTile;
        for (int t = 0; t < cnt; ++t) {
          const float2 v = __bfloat1622float2(
              *reinterpret_cast<const __nv_bfloat162*>(vb + t * v_stride + 2 * d2));
          a.x += prow[t] * v.x;
          a.y += prow[t] * v.y;
        }
        acc[i] = a;
      }
    }
    __syncthreads();
  }
  __syncthreads();  // m_s / l_s visible even when this split had no positions
  LetNextGridLaunch();  // the merge may launch; it waits for the partials written below

#pragma unroll
  for (int i = 0; i < kAcc; ++i) {
    const int e2 = tid + i * kAttnThreads;
    if (kPairs2 % kAttnThreads != 0 && e2 >= kPairs2) continue;
    const int hh = e2 / (V_DIM / 2), d2 = e2 % (V_DIM / 2);
    if (hh >= heads) continue;
    const int64_t qh = int64_t{b} * p.num_q_heads + g * group + h0 + hh;
    if (num_splits == 1) {
      const float l = l_s[hh];
      const float inv = l > 0.f ? 1.f / l : 0.f;
      StoreIo(p.out, p.io_dtype, qh * V_DIM + 2 * d2, acc[i].x * inv);
      StoreIo(p.out, p.io_dtype, qh * V_DIM + 2 * d2 + 1, acc[i].y * inv);
    } else {
      float* dst = ws_acc + (int64_t{split} * p.batch * p.num_q_heads + qh) * V_DIM + 2 * d2;
      dst[0] = acc[i].x;
      dst[1] = acc[i].y;
    }
  }
  if (tid < heads) {
    const int64_t qh = int64_t{b} * p.num_q_heads + g * group + h0 + tid;
    const float m = m_s[tid], l = l_s[tid];
    if (num_splits == 1) {
      if (p.maybe_lse) p.maybe_lse[qh] = l > 0.f ? (m + log2f(l)) * kLn2 : -INFINITY;
    } else {
      float* ml = ws_ml + (int64_t{split} * p.batch * p.num_q_heads + qh) * 2;
      ml[0] = m;
      ml[1] = l;
    }
  }
}

// A split-K attention CTA's place: blockIdx = (split, sequence * KV heads + KV head, chunk of
// `rows` query heads), the chunk's valid heads and its first query row.
struct CtaRows {
  int split, bg, b, g, heads;
  int64_t q_row0;
};
__device__ __forceinline__ CtaRows ThisCtaRows(const TlsSparseAttentionParams& p, int rows) {
  CtaRows c;
  c.split = blockIdx.x;
  c.bg = blockIdx.y;
  c.b = c.bg / p.num_kv_heads;
  c.g = c.bg % p.num_kv_heads;
  const int group = p.num_q_heads / p.num_kv_heads, h0 = blockIdx.z * rows;
  c.heads = min(rows, group - h0);
  c.q_row0 = int64_t{c.b} * p.num_q_heads + c.g * group + h0;
  return c;
}

// ---- MLA on tensor cores -------------------------------------------------------------------
// MLA's 576-dim latent rows (V = their first 512 dims) are shared by all query heads of a
// sequence, so a CTA takes 16 heads (one mma row tile) against 64 gathered positions at a time:
// S = Q K^T and O += P V on mma.sync bf16 m16n8k16 with fp32 accumulators. (32 heads per CTA,
// each K/V fragment feeding two row tiles, measured slower on the H200: half the CTAs per SM.)
// Queries enter unscaled (bf16 input is then exact; the scale multiplies the fp32 scores); with
// fp32 io the queries and the probabilities are each split into bf16 hi + lo parts (twice the
// mmas), which keeps the fp32 reference's precision.
namespace mla {

constexpr int kDim = 576, kVDim = 512, kKeys = 64, kRows = 16;
constexpr int kThreads = 256, kWarps = kThreads / 32;
constexpr int kChunks = kDim / 8, kVChunks = kVDim / 8;  // 16-byte chunks per row
constexpr int kKSteps = kDim / 16;
constexpr int kWarpDims = kVDim / kWarps;  // value dims per warp: 64 (8 mma n-tiles)
static_assert(kKeys == 8 * kWarps, "one 8-key n-tile of the scores per warp");

struct Layout {
  uint32_t q_hi, q_lo, k, v, p_hi, p_lo, s, stats, row_off, bytes;
};

constexpr Layout MakeLayout(bool split, bool shared_kv) {
  Layout l{};
  uint32_t off = 0;
  const uint32_t q_bytes = uint32_t(kRows) * kDim * 2, kv_bytes = uint32_t(kKeys) * kDim * 2;
  const uint32_t p_bytes = uint32_t(kRows) * kKeys * 2;
  l.q_hi = off, off += q_bytes;
  l.q_lo = off, off += split ? q_bytes : 0;
  l.k = off, off += kv_bytes;
  l.v = shared_kv ? l.k : off, off += shared_kv ? 0 : kv_bytes;  // V rows keep K's stride
  l.p_hi = off, off += p_bytes;
  l.p_lo = off, off += split ? p_bytes : 0;
  l.s = off, off += 4u * kRows * kKeys;
  l.stats = off, off += 4u * 3 * kRows;
  off = (off + 15) / 16 * 16;
  l.row_off = off, off += 8u * kKeys;
  l.bytes = off;
  return l;
}

// Row `row`, element `col` of a swizzled bf16 tile with D elements per row.
template <int D>
__device__ __forceinline__ uint32_t ElemOffset(int row, int col) {
  return TileOffset<D>(row, col >> 3) + 2 * (col & 7);
}

__device__ __forceinline__ void SplitBf16(float x, __nv_bfloat16* hi, __nv_bfloat16* lo) {
  *hi = __float2bfloat16_rn(x);
  *lo = __float2bfloat16_rn(x - __bfloat162float(*hi));
}

// The epilogue of the MLA kernels, for one warp's 16 rows [row0, row0 + 16) of O (value dims
// [64 warp, 64 warp + 64), C-fragment layout): normalized into p.out when the positions are not
// split, else the split's partials into ws_acc.
template <typename Io>
__device__ __forceinline__ void StoreRowTile(const TlsSparseAttentionParams& p,
                                             const float (&o)[kWarpDims / 8][4], int row0,
                                             int heads, const float* l_s, int64_t q_row0, int split,
                                             int num_splits, float* ws_acc) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int c_row = lane >> 2, c_col = 2 * (lane & 3);
  typename Io::T* out = static_cast<typename Io::T*>(p.out);
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int row = row0 + c_row + 8 * half;
    if (row >= heads) continue;
    const int64_t qh = q_row0 + row;
    const float l = l_s[row];
    const float inv = l > 0.f ? 1.f / l : 0.f;
#pragma unroll
    for (int j = 0; j < kWarpDims / 8; ++j) {
      const int d = kWarpDims * warp + 8 * j + c_col;
      const float v0 = o[j][2 * half], v1 = o[j][2 * half + 1];
      if (num_splits == 1) {
        Io::Store2(out + qh * kVDim + d, v0 * inv, v1 * inv);
      } else {
        float* dst = ws_acc + (int64_t{split} * p.batch * p.num_q_heads + qh) * kVDim + d;
        *reinterpret_cast<float2*>(dst) = make_float2(v0, v1);
      }
    }
  }
}

// The rows' log-sum-exp (positions not split) or the split's (m, l) pairs, one thread per row.
__device__ __forceinline__ void StoreRowStats(const TlsSparseAttentionParams& p, const float* m_s,
                                              const float* l_s, int heads, int64_t q_row0,
                                              int split, int num_splits, float* ws_ml) {
  const int tid = threadIdx.x;
  if (tid >= heads) return;
  const int64_t qh = q_row0 + tid;
  const float m = m_s[tid], l = l_s[tid];
  if (num_splits == 1) {
    if (p.maybe_lse) p.maybe_lse[qh] = l > 0.f ? (m + log2f(l)) * kLn2 : -INFINITY;
  } else {
    float* ml = ws_ml + (int64_t{split} * p.batch * p.num_q_heads + qh) * 2;
    ml[0] = m;
    ml[1] = l;
  }
}

template <typename Io>
__global__ void __launch_bounds__(kThreads)
    MlaAttnKernel(TlsSparseAttentionParams p, int split_tokens, int num_splits, float* ws_acc,
                  float* ws_ml) {
  constexpr bool kSplit = Io::kDType == DType::kF32;
  extern __shared__ __align__(128) uint8_t smem[];
  const bool shared_kv = p.v_cache == p.k_cache;
  const Layout L = MakeLayout(kSplit, shared_kv);
  const uint32_t base = SmemAddr(smem);
  float* s_s = reinterpret_cast<float*>(smem + L.s);  // [kRows][kKeys] log2-domain scores
  float* m_s = reinterpret_cast<float*>(smem + L.stats);
  float* l_s = m_s + kRows;
  float* corr_s = l_s + kRows;
  int64_t* row_off = reinterpret_cast<int64_t*>(smem + L.row_off);

  const auto [split, bg, b, g, heads, q_row0] = ThisCtaRows(p, kRows);
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const float mul = p.scale * kLog2e;

  // The query to shared memory before the wait below: the selection kernel ahead of this one
  // does not write it (and lets this grid launch only after its own wait, tls_common.cuh), so
  // its load overlaps that kernel's tail instead of adding round trips after it. bf16 queries
  // are their own hi part: copied as they are, all in flight at once (cp.async).
  const typename Io::T* q = static_cast<const typename Io::T*>(p.q);
  for (int idx = tid; idx < kRows * kChunks; idx += kThreads) {
    const int r = idx / kChunks, c = idx % kChunks;
    if constexpr (kSplit) {
      float v[8] = {};
      if (r < heads) Io::Load8(q + (q_row0 + r) * kDim + 8 * c, v);
      __align__(16) __nv_bfloat16 hi[8], lo[8];
#pragma unroll
      for (int i = 0; i < 8; ++i) SplitBf16(v[i], &hi[i], &lo[i]);
      *reinterpret_cast<uint4*>(smem + L.q_hi + TileOffset<kDim>(r, c)) =
          *reinterpret_cast<const uint4*>(hi);
      *reinterpret_cast<uint4*>(smem + L.q_lo + TileOffset<kDim>(r, c)) =
          *reinterpret_cast<const uint4*>(lo);
    } else {
      CpAsync16(base + L.q_hi + TileOffset<kDim>(r, c),
                q + (q_row0 + min(r, heads - 1)) * kDim + 8 * c, r < heads);
    }
  }
  CpAsyncCommit();  // waited for with the first tile's rows (or before the epilogue)
  if (tid < kRows) {
    m_s[tid] = -INFINITY;
    l_s[tid] = 0.f;
  }
  WaitForPreviousGrid();  // the selection before this kernel wrote the positions
  const int n = p.num_positions[bg];
  const int t_begin = split * split_tokens;
  const int t_end = min(n, t_begin + split_tokens);
  float o[kWarpDims / 8][4] = {};

  const int32_t* positions = p.positions + int64_t{bg} * p.max_positions;
  const int32_t* table = p.block_table + int64_t{b} * p.max_blocks_per_seq;
  const __nv_bfloat16* k_cache = static_cast<const __nv_bfloat16*>(p.k_cache);
  const __nv_bfloat16* v_cache = static_cast<const __nv_bfloat16*>(p.v_cache);
  // Fragment roles of this lane (see ScoreTile / AccumulateValues in paged_attention_common).
  const int a_row = ((lane >> 3) & 1) * 8 + (lane & 7), a_chunk = lane >> 4;
  const int k_key = 8 * warp + (lane & 7), k_chunk = lane >> 3;
  const int c_row = lane >> 2, c_col = 2 * (lane & 3);

  for (int t0 = t_begin; t0 < t_end; t0 += kKeys) {
    const int cnt = min(kKeys, t_end - t0);
    TileRowOffsets(p, positions, table, g, t0, cnt, kKeys, kDim, row_off);
    __syncthreads();
    for (int idx = tid; idx < kKeys * kChunks; idx += kThreads) {
      const int r = idx / kChunks, c = idx % kChunks;
      CpAsync16(base + L.k + TileOffset<kDim>(r, c), k_cache + row_off[r] + 8 * c, r < cnt);
    }
    if (!shared_kv) {
      for (int idx = tid; idx < kKeys * kVChunks; idx += kThreads) {
        const int r = idx / kVChunks, c = idx % kVChunks;
        CpAsync16(base + L.v + TileOffset<kDim>(r, c), v_cache + row_off[r] + 8 * c, r < cnt);
      }
    }
    CpAsyncCommit();
    CpAsyncWait<0>();
    __syncthreads();

    // Scores of keys [8 warp, 8 warp + 8); even / odd k-steps in separate accumulators (two
    // independent mma chains).
    float sa[4] = {}, sb[4] = {};
#pragma unroll 2
    for (int kk = 0; kk < kKSteps; kk += 2) {
      uint32_t kb[4], qa[4], qb[4];
      LdMatrixX4(kb, base + L.k + TileOffset<kDim>(k_key, 2 * kk + k_chunk));
      LdMatrixX4(qa, base + L.q_hi + TileOffset<kDim>(a_row, 2 * kk + a_chunk));
      LdMatrixX4(qb, base + L.q_hi + TileOffset<kDim>(a_row, 2 * kk + 2 + a_chunk));
      MmaBf16(sa, qa, kb[0], kb[1]);
      MmaBf16(sb, qb, kb[2], kb[3]);
      if constexpr (kSplit) {
        LdMatrixX4(qa, base + L.q_lo + TileOffset<kDim>(a_row, 2 * kk + a_chunk));
        LdMatrixX4(qb, base + L.q_lo + TileOffset<kDim>(a_row, 2 * kk + 2 + a_chunk));
        MmaBf16(sa, qa, kb[0], kb[1]);
        MmaBf16(sb, qb, kb[2], kb[3]);
      }
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int row = c_row + 8 * (i >> 1), key = 8 * warp + c_col + (i & 1);
      s_s[row * kKeys + key] = key < cnt ? (sa[i] + sb[i]) * mul : -INFINITY;
    }
    __syncthreads();

    // Online softmax, one row per warp at a time, two keys per lane; P as bf16 (hi [+ lo]).
    for (int row = warp; row < kRows; row += kWarps) {
      const float x0 = s_s[row * kKeys + lane], x1 = s_s[row * kKeys + lane + 32];
      float mx = fmaxf(x0, x1);
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, off));
      const float m_old = m_s[row];
      const float m_new = fmaxf(m_old, mx);
      const float m_base = m_new == -INFINITY ? 0.f : m_new;  // every key masked so far
      const float e0 = exp2f(x0 - m_base), e1 = exp2f(x1 - m_base);
      float sum = e0 + e1;
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, off);
      __nv_bfloat16 h0v, l0v, h1v, l1v;
      SplitBf16(e0, &h0v, &l0v);
      SplitBf16(e1, &h1v, &l1v);
      *reinterpret_cast<__nv_bfloat16*>(smem + L.p_hi + ElemOffset<kKeys>(row, lane)) = h0v;
      *reinterpret_cast<__nv_bfloat16*>(smem + L.p_hi + ElemOffset<kKeys>(row, lane + 32)) = h1v;
      if constexpr (kSplit) {
        *reinterpret_cast<__nv_bfloat16*>(smem + L.p_lo + ElemOffset<kKeys>(row, lane)) = l0v;
        *reinterpret_cast<__nv_bfloat16*>(smem + L.p_lo + ElemOffset<kKeys>(row, lane + 32)) = l1v;
      }
      if (lane == 0) {
        const float corr = exp2f(m_old - m_base);
        m_s[row] = m_new;
        l_s[row] = l_s[row] * corr + sum;
        corr_s[row] = corr;
      }
    }
    __syncthreads();

    // O[:, 64 warp .. +64) += P V.
    const float c0 = corr_s[c_row], c1 = corr_s[c_row + 8];
#pragma unroll
    for (int j = 0; j < kWarpDims / 8; ++j) {
      o[j][0] *= c0, o[j][1] *= c0, o[j][2] *= c1, o[j][3] *= c1;
    }
    const int v_key = ((lane >> 3) & 1) * 8 + (lane & 7), v_chunk = lane >> 4;
#pragma unroll
    for (int ks = 0; ks < kKeys / 16; ++ks) {
      uint32_t pa[4], pl[4];
      LdMatrixX4(pa, base + L.p_hi + TileOffset<kKeys>(a_row, 2 * ks + a_chunk));
      if constexpr (kSplit) LdMatrixX4(pl, base + L.p_lo + TileOffset<kKeys>(a_row, 2 * ks + a_chunk));
#pragma unroll
      for (int jj = 0; jj < kWarpDims / 16; ++jj) {
        uint32_t vb[4];
        LdMatrixX4Trans(vb, base + L.v + TileOffset<kDim>(16 * ks + v_key,
                                                          kWarpDims / 8 * warp + 2 * jj + v_chunk));
        MmaBf16(o[2 * jj], pa, vb[0], vb[1]);
        MmaBf16(o[2 * jj + 1], pa, vb[2], vb[3]);
        if constexpr (kSplit) {
          MmaBf16(o[2 * jj], pl, vb[0], vb[1]);
          MmaBf16(o[2 * jj + 1], pl, vb[2], vb[3]);
        }
      }
    }
    __syncthreads();
  }
  CpAsyncWait<0>();     // a split with no positions never waited for its query copy
  __syncthreads();      // m_s / l_s visible even when this split had no positions
  LetNextGridLaunch();  // the merge may launch; it waits for the partials written below

  StoreRowTile<Io>(p, o, 0, heads, l_s, q_row0, split, num_splits, ws_acc);
  StoreRowStats(p, m_s, l_s, heads, q_row0, split, num_splits, ws_ml);
}

// ---- MLA, many heads per CTA ---------------------------------------------------------------
// At 32+ heads the 16-head CTAs above gather every K/V row once per 16 heads and pay the
// position -> block table -> row chain before each tile. Here a CTA takes 16 * RT heads (RT
// row tiles) against 32-key tiles: the row slots of all its positions are looked up once (all
// loads in flight together), then the tiles are double-buffered (tile i + 1's rows load while
// tile i is scored and accumulated) and each gathered row feeds all RT row tiles. bf16 io with
// V inside the K rows only (the runtime's layout; fp32 io and a separate V pool take
// MlaAttnKernel).
//   scores: warp w takes row tile w % RT and 4 / (8 / RT) of the tile's four 8-key n-tiles;
//   softmax: 8 lanes per row, 4 keys per lane, a warp's 2 RT rows side by side;
//   P V: warp w owns value dims [64 w, 64 w + 64) of every row tile (RT * 32 fp32
//   accumulators per thread), so each V fragment feeds RT mmas.
constexpr int kWideKeys = 32;
constexpr int kWidePStride = kWideKeys + 8;  // bf16 per P row: 80 B, conflict-free ldmatrix
constexpr int kWideSStride = kWideKeys + 8;  // floats per score row: 2-way score stores, not 4
constexpr int kWideSlotsPerThread = 8;
constexpr int kWideSlots = kWideSlotsPerThread * kThreads;  // positions looked up at once

// The bf16 query rows [q_row0, q_row0 + ROWS) of a CTA to swizzled shared memory at `dst`
// (cp.async, one commit group); rows past `heads` read as zeros.
template <int ROWS>
__device__ __forceinline__ void StageQueryRows(const TlsSparseAttentionParams& p, uint32_t dst,
                                               int64_t q_row0, int heads) {
  const __nv_bfloat16* q = static_cast<const __nv_bfloat16*>(p.q);
  for (int idx = threadIdx.x; idx < ROWS * kChunks; idx += kThreads) {
    const int r = idx / kChunks, c = idx % kChunks;
    CpAsync16(dst + TileOffset<kDim>(r, c), q + (q_row0 + min(r, heads - 1)) * kDim + 8 * c,
              r < heads);
  }
  CpAsyncCommit();
}

// The pool rows of split positions [t_begin, t_begin + split_tokens) of row bg (at most
// PER_THREAD * kThreads) into slot_s, all loads in flight together (int32: pools of under 2^31
// rows, ~2.5 TB of MLA cache); returns the split's end t_end (the row's count may end it
// early). The count and the positions load side by side, one dependent round trip fewer before
// the block table's: positions past the count are read (inside the row's max_positions) and
// dropped.
template <int PER_THREAD>
__device__ __forceinline__ int LookUpPoolRows(const TlsSparseAttentionParams& p, int bg, int b,
                                              int g, int t_begin, int split_tokens,
                                              int32_t* slot_s) {
  const int tid = threadIdx.x;
  const int32_t* positions = p.positions + int64_t{bg} * p.max_positions;
  const int32_t* table = p.block_table + int64_t{b} * p.max_blocks_per_seq;
  const int t_stop = min(p.max_positions, t_begin + split_tokens);
  int32_t pos[PER_THREAD], block[PER_THREAD];
#pragma unroll
  for (int i = 0; i < PER_THREAD; ++i) {
    const int t = t_begin + i * kThreads + tid;
    pos[i] = t < t_stop ? positions[t] : 0;
  }
  const int t_end = min(p.num_positions[bg], t_begin + split_tokens);
#pragma unroll
  for (int i = 0; i < PER_THREAD; ++i) {
    const bool listed = t_begin + i * kThreads + tid < t_end;
    pos[i] = listed ? pos[i] : 0;
    block[i] = listed ? table[pos[i] / kKvBlockSize] : 0;
  }
#pragma unroll
  for (int i = 0; i < PER_THREAD; ++i) {
    slot_s[i * kThreads + tid] =
        (block[i] * p.num_kv_heads + g) * kKvBlockSize + pos[i] % kKvBlockSize;
  }
  return t_end;
}

template <int RT>
struct WideLayout {
  static constexpr uint32_t kRowsPerCta = 16 * RT;
  static constexpr uint32_t kQ = 0;
  static constexpr uint32_t kK = kQ + kRowsPerCta * kDim * 2;  // two buffers
  static constexpr uint32_t kKBytes = uint32_t(kWideKeys) * kDim * 2;
  static constexpr uint32_t kS = kK + 2 * kKBytes;
  static constexpr uint32_t kP = kS + 4 * kRowsPerCta * kWideSStride;
  static constexpr uint32_t kStats = kP + 2 * kRowsPerCta * kWidePStride;
  static constexpr uint32_t kSlots = kStats + 4 * 3 * kRowsPerCta;
  static constexpr uint32_t kBytes = kSlots + 4 * kWideSlots;
};

template <int RT>
__global__ void __launch_bounds__(kThreads, 1)
    MlaWideAttnKernel(TlsSparseAttentionParams p, int split_tokens, int num_splits, float* ws_acc,
                      float* ws_ml) {
  using L = WideLayout<RT>;
  constexpr int kRowsPerCta = 16 * RT;
  constexpr int kKeyTiles = kWideKeys / 8 / (kWarps / RT);  // 8-key n-tiles per warp (scores)
  static_assert(kWarps % RT == 0 && RT % 2 == 0 && kKeyTiles >= 1, "RT: 2, 4 or 8");
  extern __shared__ __align__(128) uint8_t smem[];
  const uint32_t base = SmemAddr(smem);
  float* s_s = reinterpret_cast<float*>(smem + L::kS);  // [row][key] log2-domain scores
  __nv_bfloat16* p_s = reinterpret_cast<__nv_bfloat16*>(smem + L::kP);
  float* m_s = reinterpret_cast<float*>(smem + L::kStats);
  float* l_s = m_s + kRowsPerCta;
  float* corr_s = l_s + kRowsPerCta;
  int32_t* slot_s = reinterpret_cast<int32_t*>(smem + L::kSlots);  // pool row per position

  const auto [split, bg, b, g, heads, q_row0] = ThisCtaRows(p, kRowsPerCta);
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const float mul = p.scale * kLog2e;

  // The query before the wait (see MlaAttnKernel).
  StageQueryRows<kRowsPerCta>(p, base + L::kQ, q_row0, heads);
  if (tid < kRowsPerCta) {
    m_s[tid] = -INFINITY;
    l_s[tid] = 0.f;
  }
  WaitForPreviousGrid();  // the selection before this kernel wrote the positions
  const int t_begin = split * split_tokens;
  // The plan keeps a split's positions within the slots.
  const int t_end =
      LookUpPoolRows<kWideSlotsPerThread>(p, bg, b, g, t_begin, split_tokens, slot_s);
  const __nv_bfloat16* k_cache = static_cast<const __nv_bfloat16*>(p.k_cache);
  float o[RT][kWarpDims / 8][4] = {};

  // Fragment roles of this lane (see ScoreTile / AccumulateValues in paged_attention_common).
  const int a_row = ((lane >> 3) & 1) * 8 + (lane & 7), a_chunk = lane >> 4;
  const int k_chunk = lane >> 3;
  const int c_row = lane >> 2, c_col = 2 * (lane & 3);
  const int v_key = ((lane >> 3) & 1) * 8 + (lane & 7), v_chunk = lane >> 4;
  const int rt_s = warp % RT, key0 = 8 * kKeyTiles * (warp / RT);  // this warp's scores

  __syncthreads();  // the slots
  // Tile t0's rows into buffer `buf`.
  auto issue_tile = [&](int t0, int buf) {
    const int cnt = min(kWideKeys, t_end - t0);
    const uint32_t dst = base + L::kK + buf * L::kKBytes;
    for (int idx = tid; idx < kWideKeys * kChunks; idx += kThreads) {
      const int r = idx / kChunks, c = idx % kChunks;
      const int64_t row = r < cnt ? slot_s[t0 - t_begin + r] : 0;
      CpAsync16(dst + TileOffset<kDim>(r, c), k_cache + row * kDim + 8 * c, r < cnt);
    }
    CpAsyncCommit();
  };
  if (t_begin < t_end) issue_tile(t_begin, 0);

  for (int t0 = t_begin, buf = 0; t0 < t_end; t0 += kWideKeys, buf ^= 1) {
    const int cnt = min(kWideKeys, t_end - t0);
    CpAsyncWait<0>();  // this tile's rows (and, the first time, the query)
    __syncthreads();   // ... for every thread; the last tile's P V is done with the other buffer
    if (t0 + kWideKeys < t_end) issue_tile(t0 + kWideKeys, buf ^ 1);  // lands under this tile
    const uint32_t kbuf = base + L::kK + buf * L::kKBytes;

    // Scores of row tile rt_s against keys [key0, key0 + 8 kKeyTiles); even / odd k-steps in
    // separate accumulators. The fragments of k-steps kk + 2, kk + 3 load while kk, kk + 1
    // multiply (the asm wrappers are volatile: the compiler keeps their order, so the
    // pipelining is written out). Measured within 1% of the plain loop (run 62): the phase is
    // bound by shared-memory bandwidth (Q re-read per tile), not ldmatrix latency.
    float sa[kKeyTiles][4] = {}, sb[kKeyTiles][4] = {};
    uint32_t qa[2][4], qb[2][4], kb[2][kKeyTiles][4];
    auto load_frags = [&](int kk, int slot) {
      LdMatrixX4(qa[slot], base + L::kQ + TileOffset<kDim>(16 * rt_s + a_row, 2 * kk + a_chunk));
      LdMatrixX4(qb[slot],
                 base + L::kQ + TileOffset<kDim>(16 * rt_s + a_row, 2 * kk + 2 + a_chunk));
#pragma unroll
      for (int j = 0; j < kKeyTiles; ++j) {
        LdMatrixX4(kb[slot][j],
                   kbuf + TileOffset<kDim>(key0 + 8 * j + (lane & 7), 2 * kk + k_chunk));
      }
    };
    load_frags(0, 0);
#pragma unroll
    for (int kk = 0; kk < kKSteps; kk += 2) {
      const int slot = (kk / 2) & 1;
      if (kk + 2 < kKSteps) load_frags(kk + 2, slot ^ 1);
#pragma unroll
      for (int j = 0; j < kKeyTiles; ++j) {
        MmaBf16(sa[j], qa[slot], kb[slot][j][0], kb[slot][j][1]);
        MmaBf16(sb[j], qb[slot], kb[slot][j][2], kb[slot][j][3]);
      }
    }
#pragma unroll
    for (int j = 0; j < kKeyTiles; ++j) {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int row = 16 * rt_s + c_row + 8 * (i >> 1), key = key0 + 8 * j + c_col + (i & 1);
        s_s[row * kWideSStride + key] = key < cnt ? (sa[j][i] + sb[j][i]) * mul : -INFINITY;
      }
    }
    __syncthreads();

    // Online softmax: each warp's 2 RT rows, 8 lanes per row and 4 keys per lane (rows side
    // by side: one row at a time per warp was ~40% of the kernel's stall samples, a chain of
    // shuffles per row); P as bf16.
#pragma unroll
    for (int pass = 0; pass < RT / 2; ++pass) {
      const int row = 2 * RT * warp + 4 * pass + (lane >> 3), k4 = 4 * (lane & 7);
      const float4 x = *reinterpret_cast<const float4*>(s_s + row * kWideSStride + k4);
      float mx = fmaxf(fmaxf(x.x, x.y), fmaxf(x.z, x.w));
#pragma unroll
      for (int off = 4; off > 0; off >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, off));
      const float m_old = m_s[row];
      const float m_new = fmaxf(m_old, mx);
      const float m_base = m_new == -INFINITY ? 0.f : m_new;  // every key masked so far
      const float e0 = exp2f(x.x - m_base), e1 = exp2f(x.y - m_base);
      const float e2 = exp2f(x.z - m_base), e3 = exp2f(x.w - m_base);
      float sum = (e0 + e1) + (e2 + e3);
#pragma unroll
      for (int off = 4; off > 0; off >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, off);
      *reinterpret_cast<uint2*>(p_s + row * kWidePStride + k4) =
          make_uint2(PackBf16(e0, e1), PackBf16(e2, e3));
      if ((lane & 7) == 0) {
        const float corr = exp2f(m_old - m_base);
        m_s[row] = m_new;
        l_s[row] = l_s[row] * corr + sum;
        corr_s[row] = corr;
      }
    }
    __syncthreads();

    // O[:, 64 warp .. +64) += P V for every row tile.
#pragma unroll
    for (int rt = 0; rt < RT; ++rt) {
      const float c0r = corr_s[16 * rt + c_row], c1r = corr_s[16 * rt + c_row + 8];
#pragma unroll
      for (int j = 0; j < kWarpDims / 8; ++j) {
        o[rt][j][0] *= c0r, o[rt][j][1] *= c0r, o[rt][j][2] *= c1r, o[rt][j][3] *= c1r;
      }
    }
#pragma unroll
    for (int ks = 0; ks < kWideKeys / 16; ++ks) {  // every fragment of a k-step, then its mmas
      uint32_t pa[RT][4], vb[kWarpDims / 16][4];
#pragma unroll
      for (int rt = 0; rt < RT; ++rt) {
        LdMatrixX4(pa[rt],
                   base + L::kP + 2 * ((16 * rt + a_row) * kWidePStride + 16 * ks + 8 * a_chunk));
      }
#pragma unroll
      for (int jj = 0; jj < kWarpDims / 16; ++jj) {
        LdMatrixX4Trans(vb[jj], kbuf + TileOffset<kDim>(16 * ks + v_key,
                                                        kWarpDims / 8 * warp + 2 * jj + v_chunk));
      }
#pragma unroll
      for (int jj = 0; jj < kWarpDims / 16; ++jj) {
#pragma unroll
        for (int rt = 0; rt < RT; ++rt) {
          MmaBf16(o[rt][2 * jj], pa[rt], vb[jj][0], vb[jj][1]);
          MmaBf16(o[rt][2 * jj + 1], pa[rt], vb[jj][2], vb[jj][3]);
        }
      }
    }
    // The next iteration's first barrier orders these reads of P, the stats and this buffer
    // before anything overwrites them.
  }
  CpAsyncWait<0>();     // a split with no positions never waited for its query copy
  __syncthreads();      // m_s / l_s visible even when this split had no positions
  LetNextGridLaunch();  // the merge may launch; it waits for the partials written below

#pragma unroll
  for (int rt = 0; rt < RT; ++rt) {
    StoreRowTile<Bf16Io>(p, o[rt], 16 * rt, heads, l_s, q_row0, split, num_splits, ws_acc);
  }
  StoreRowStats(p, m_s, l_s, heads, q_row0, split, num_splits, ws_ml);
}

// ---- MLA, 16 heads per CTA, pipelined ------------------------------------------------------
// A 16-head CTA of MlaAttnKernel loads a tile, then scores it, then loads the next: at sparse
// budgets (1-3 tiles per CTA, one CTA per SM) the SM idles behind each load, and its 8 warps
// each re-read the whole query from shared memory per tile (the scores' main cost). Here (bf16
// io, V inside the K rows) the split's pool rows are looked up at once, each gathered row is one
// bulk copy (the copy engine, not 72 cp.async per row) completing on its buffer's mbarrier,
// three 48-key buffers are in flight (a split of up to 144 positions loads all at once), and
// each warp keeps its slice of the query in registers for the whole split:
//   scores: warp w takes latent k-steps [9 (w % 4), +9) of keys [24 (w / 4), +24): three
//   independent mma chains, no query reads; the four slices' partial scores meet in shared
//   memory, where the softmax adds them (16 lanes per row, a warp's two rows side by side);
//   P V: warp w owns value dims [64 w, 64 w + 64), as in MlaAttnKernel.
// Rows sit 1,168 B apart (576 bf16 + 16 B): the bulk copy cannot swizzle, and the 16-byte shift
// per row keeps ldmatrix's 8 rows on distinct banks.
constexpr int kPipeKeys = 48;
constexpr int kPipeStages = 3;
constexpr uint32_t kPipeRowBytes = kDim * 2 + 16;
constexpr int kPipeSlices = 4;                          // warps along the latent dims (scores)
constexpr int kPipeSliceSteps = kKSteps / kPipeSlices;  // 9 k-steps of 16 dims each
constexpr int kPipeWarpKeys = kPipeKeys / (kWarps / kPipeSlices);  // 24: three 8-key n-tiles
constexpr int kPipeSStride = kPipeKeys + 8;  // floats per partial-score row: 2-way stores
constexpr int kPipePStride = kPipeKeys + 8;  // bf16 per P row: 112 B, conflict-free ldmatrix
constexpr int kPipeSlotsPerThread = 8;
constexpr int kPipeSlots = kPipeSlotsPerThread * kThreads;  // positions per CTA at most
static_assert(kKSteps % kPipeSlices == 0 && kPipeWarpKeys == 24, "4 slices x 2 key thirds");

struct PipeLayout {
  static constexpr uint32_t kQ = 0;
  static constexpr uint32_t kK = kQ + uint32_t(kRows) * kDim * 2;  // kPipeStages buffers
  static constexpr uint32_t kKBytes = kPipeKeys * kPipeRowBytes;
  static constexpr uint32_t kS = kK + kPipeStages * kKBytes;  // [slice][row][key] partials
  static constexpr uint32_t kP = kS + 4 * kPipeSlices * kRows * kPipeSStride;
  static constexpr uint32_t kStats = kP + 2 * kRows * kPipePStride;
  static constexpr uint32_t kSlots = kStats + 4 * 3 * kRows;
  static constexpr uint32_t kBars = kSlots + 4 * kPipeSlots;  // one 8-byte mbarrier per buffer
  static constexpr uint32_t kBytes = kBars + 8 * kPipeStages;
  static_assert(kBars % 8 == 0 && kK % 16 == 0 && kS % 16 == 0, "aligned barriers and rows");
};

__global__ void __launch_bounds__(kThreads, 1)
    MlaPipeAttnKernel(TlsSparseAttentionParams p, int split_tokens, int num_splits, float* ws_acc,
                      float* ws_ml) {
  using L = PipeLayout;
  extern __shared__ __align__(128) uint8_t smem[];
  const uint32_t base = SmemAddr(smem);
  float* s_s = reinterpret_cast<float*>(smem + L::kS);
  __nv_bfloat16* p_s = reinterpret_cast<__nv_bfloat16*>(smem + L::kP);
  float* m_s = reinterpret_cast<float*>(smem + L::kStats);
  float* l_s = m_s + kRows;
  float* corr_s = l_s + kRows;
  int32_t* slot_s = reinterpret_cast<int32_t*>(smem + L::kSlots);  // pool row per position

  const auto [split, bg, b, g, heads, q_row0] = ThisCtaRows(p, kRows);
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const float mul = p.scale * kLog2e;

  // The query before the wait (see MlaAttnKernel).
  StageQueryRows<kRows>(p, base + L::kQ, q_row0, heads);
  if (tid < kRows) {
    m_s[tid] = -INFINITY;
    l_s[tid] = 0.f;
  }
  if (tid == 0) {
    for (int st = 0; st < kPipeStages; ++st) MbarInit(base + L::kBars + 8 * st, 1);
    FenceMbarInit();
  }
  WaitForPreviousGrid();  // the selection before this kernel wrote the positions
  const int t_begin = split * split_tokens;
  const int t_end =
      LookUpPoolRows<kPipeSlotsPerThread>(p, bg, b, g, t_begin, split_tokens, slot_s);
  const char* k_cache = static_cast<const char*>(p.k_cache);
  CpAsyncWait<0>();
  __syncthreads();  // slots, the query, the stats and the mbarriers, for every thread

  // Tile `tile`'s rows into its buffer. Thread 0 posts the bytes; the rows' copies are spread
  // over the warps (a copy is a warp-uniform instruction: one warp issues its lanes' one at a
  // time). Rows past the list's end are zeroed: P is 0 there, but V must not be NaN.
  const int num_tiles = (max(t_end - t_begin, 0) + kPipeKeys - 1) / kPipeKeys;
  auto issue_tile = [&](int tile) {
    const int t0 = t_begin + tile * kPipeKeys, cnt = min(kPipeKeys, t_end - t0);
    const int buf = tile % kPipeStages;
    for (int idx = cnt * kChunks + tid; idx < kPipeKeys * kChunks; idx += kThreads) {
      const int r = idx / kChunks, c = idx % kChunks;
      *reinterpret_cast<uint4*>(smem + L::kK + buf * L::kKBytes + r * kPipeRowBytes + 16 * c) =
          make_uint4(0, 0, 0, 0);
    }
    const uint32_t bar = base + L::kBars + 8 * buf;
    if (tid == 0) MbarArriveExpectTx(bar, uint32_t(cnt) * kDim * 2);
    for (int r = warp + kWarps * lane; r < cnt; r += kThreads) {
      BulkCopyToShared(base + L::kK + buf * L::kKBytes + r * kPipeRowBytes,
                       k_cache + int64_t{slot_s[t0 - t_begin + r]} * (kDim * 2), kDim * 2, bar);
    }
  };
  for (int tile = 0; tile < min(num_tiles, kPipeStages); ++tile) issue_tile(tile);

  // This warp's query slice in registers: A fragments of k-steps [9 slice, 9 slice + 9).
  const int slice = warp % kPipeSlices, key0 = kPipeWarpKeys * (warp / kPipeSlices);
  const int a_row = ((lane >> 3) & 1) * 8 + (lane & 7), a_chunk = lane >> 4;
  uint32_t qf[kPipeSliceSteps][4];
#pragma unroll
  for (int j = 0; j < kPipeSliceSteps; ++j) {
    LdMatrixX4(qf[j],
               base + L::kQ + TileOffset<kDim>(a_row, 2 * (kPipeSliceSteps * slice + j) + a_chunk));
  }
  const int c_row = lane >> 2, c_col = 2 * (lane & 3);
  // ldmatrix lanes: scores take keys (two 8-key n-tiles per x4, one per x2) at one k-step's
  // two chunks; P V takes 16 keys x two 8-dim chunks, transposed.
  const int k_key = 8 * (lane >> 4) + (lane & 7), k_chunk = (lane >> 3) & 1;
  const int v_key = ((lane >> 3) & 1) * 8 + (lane & 7), v_chunk = lane >> 4;
  float o[kWarpDims / 8][4] = {};

  for (int tile = 0; tile < num_tiles; ++tile) {
    const int cnt = min(kPipeKeys, t_end - (t_begin + tile * kPipeKeys));
    const int buf = tile % kPipeStages;
    const uint32_t kbuf = base + L::kK + buf * L::kKBytes;
    MbarWait(base + L::kBars + 8 * buf, (tile / kPipeStages) & 1);

    float s[3][4] = {};
#pragma unroll
    for (int j = 0; j < kPipeSliceSteps; ++j) {
      const uint32_t chunk = 16 * (2 * (kPipeSliceSteps * slice + j) + k_chunk);
      uint32_t kb[4], kc[2];
      LdMatrixX4(kb, kbuf + (key0 + k_key) * kPipeRowBytes + chunk);
      LdMatrixX2(kc, kbuf + (key0 + 16 + (lane & 7)) * kPipeRowBytes + chunk);
      MmaBf16(s[0], qf[j], kb[0], kb[1]);
      MmaBf16(s[1], qf[j], kb[2], kb[3]);
      MmaBf16(s[2], qf[j], kc[0], kc[1]);
    }
    float* s_slice = s_s + slice * kRows * kPipeSStride;
#pragma unroll
    for (int nt = 0; nt < 3; ++nt) {
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        *reinterpret_cast<float2*>(s_slice + (c_row + 8 * half) * kPipeSStride + key0 + 8 * nt +
                                   c_col) = make_float2(s[nt][2 * half], s[nt][2 * half + 1]);
      }
    }
    __syncthreads();

    // Online softmax of rows 2 warp and 2 warp + 1, 16 lanes per row (12 with keys), 4 keys
    // per lane.
    {
      const int row = 2 * warp + (lane >> 4), k4 = 4 * (lane & 15);
      float x[4] = {-INFINITY, -INFINITY, -INFINITY, -INFINITY};
      if (k4 < kPipeKeys) {
        float sum4[4] = {};
#pragma unroll
        for (int sl = 0; sl < kPipeSlices; ++sl) {
          const float4 v =
              *reinterpret_cast<const float4*>(s_s + (sl * kRows + row) * kPipeSStride + k4);
          sum4[0] += v.x, sum4[1] += v.y, sum4[2] += v.z, sum4[3] += v.w;
        }
#pragma unroll
        for (int i = 0; i < 4; ++i) x[i] = k4 + i < cnt ? sum4[i] * mul : -INFINITY;
      }
      float mx = fmaxf(fmaxf(x[0], x[1]), fmaxf(x[2], x[3]));
#pragma unroll
      for (int off = 8; off > 0; off >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, off));
      const float m_old = m_s[row];
      const float m_new = fmaxf(m_old, mx);
      const float m_base = m_new == -INFINITY ? 0.f : m_new;  // every key masked so far
      const float e0 = exp2f(x[0] - m_base), e1 = exp2f(x[1] - m_base);
      const float e2 = exp2f(x[2] - m_base), e3 = exp2f(x[3] - m_base);
      float sum = (e0 + e1) + (e2 + e3);
#pragma unroll
      for (int off = 8; off > 0; off >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, off);
      if (k4 < kPipeKeys) {
        *reinterpret_cast<uint2*>(p_s + row * kPipePStride + k4) =
            make_uint2(PackBf16(e0, e1), PackBf16(e2, e3));
      }
      __syncwarp();  // every lane of the row read m_old before lane 0 / 16 replaces it
      if ((lane & 15) == 0) {
        const float corr = exp2f(m_old - m_base);
        m_s[row] = m_new;
        l_s[row] = l_s[row] * corr + sum;
        corr_s[row] = corr;
      }
    }
    __syncthreads();

    // O[:, 64 warp .. +64) += P V.
    const float c0 = corr_s[c_row], c1 = corr_s[c_row + 8];
#pragma unroll
    for (int j = 0; j < kWarpDims / 8; ++j) {
      o[j][0] *= c0, o[j][1] *= c0, o[j][2] *= c1, o[j][3] *= c1;
    }
#pragma unroll
    for (int ks = 0; ks < kPipeKeys / 16; ++ks) {
      uint32_t pa[4], vb[kWarpDims / 16][4];
      LdMatrixX4(pa, base + L::kP + 2 * (a_row * kPipePStride + 16 * ks + 8 * a_chunk));
#pragma unroll
      for (int jj = 0; jj < kWarpDims / 16; ++jj) {
        LdMatrixX4Trans(vb[jj], kbuf + (16 * ks + v_key) * kPipeRowBytes +
                                    16 * (kWarpDims / 8 * warp + 2 * jj + v_chunk));
      }
#pragma unroll
      for (int jj = 0; jj < kWarpDims / 16; ++jj) {
        MmaBf16(o[2 * jj], pa, vb[jj][0], vb[jj][1]);
        MmaBf16(o[2 * jj + 1], pa, vb[jj][2], vb[jj][3]);
      }
    }
    __syncthreads();  // every warp is done with this buffer, P and the stats
    if (tile + kPipeStages < num_tiles) issue_tile(tile + kPipeStages);
  }
  LetNextGridLaunch();  // the merge may launch; it waits for the partials written below

  StoreRowTile<Bf16Io>(p, o, 0, heads, l_s, q_row0, split, num_splits, ws_acc);
  StoreRowStats(p, m_s, l_s, heads, q_row0, split, num_splits, ws_ml);
}

}  // namespace mla

constexpr int kMergeThreads = 128;
constexpr int kMaxSplits = 256;
constexpr int kManySplits = 16;  // from here on MergeManySplitsKernel (see there)

// Warp 0 of a merge CTA of query head qh: each split's weight exp2(m_s - m) into weight[], the
// total l into *total, and the head's log-sum-exp (by the first CTA of the head); then a barrier.
__device__ __forceinline__ void SplitWeights(const TlsSparseAttentionParams& p, int num_splits,
                                             const float* ws_ml, int64_t qh, float* weight,
                                             float* total) {
  const int64_t rows = int64_t{p.batch} * p.num_q_heads;
  if (threadIdx.x < 32) {
    float m = -INFINITY;
    for (int s = threadIdx.x; s < num_splits; s += 32) m = fmaxf(m, ws_ml[(s * rows + qh) * 2]);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
    float l = 0.f;
    for (int s = threadIdx.x; s < num_splits; s += 32) {
      const float ms = ws_ml[(s * rows + qh) * 2], ls = ws_ml[(s * rows + qh) * 2 + 1];
      const float w = ls > 0.f ? exp2f(ms - m) : 0.f;
      weight[s] = w;
      l += ls * w;
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) l += __shfl_xor_sync(0xffffffffu, l, o);
    if (threadIdx.x == 0) {
      *total = l;
      if (p.maybe_lse && blockIdx.y == 0) {
        p.maybe_lse[qh] = l > 0.f ? (m + log2f(l)) * kLn2 : -INFINITY;
      }
    }
  }
  __syncthreads();
}

// The merge of few splits (fewer than kManySplits): one block per (sequence, query head), VEC
// dims per thread (MLA's 512: 4, so every thread has work; GQA's 64 / 128: 1), every split's
// partial loaded at once. (A thread per dim loading split after split, skipping the empty ones,
// was a chain of dependent round trips: 17 us for MLA's 11 splits of 16 heads at batch 8, ncu.)
template <int VEC>
__global__ void __launch_bounds__(kMergeThreads)
    MergeSplitsKernel(TlsSparseAttentionParams p, int num_splits, const float* ws_acc,
                      const float* ws_ml) {
  using Vec = std::conditional_t<VEC == 4, float4, float>;
  __shared__ float weight[kMaxSplits];
  __shared__ float total[1];
  WaitForPreviousGrid();  // the attention kernel wrote the partials
  const int64_t qh = blockIdx.x;
  const int64_t rows = int64_t{p.batch} * p.num_q_heads;
  SplitWeights(p, num_splits, ws_ml, qh, weight, total);
  const float inv = total[0] > 0.f ? 1.f / total[0] : 0.f;
  // (Its loads stay behind the weights: loaded before them, the partials' registers stayed live
  // across SplitWeights, 112 -> 139 per thread, 4 -> 3 CTAs per SM, and 128 heads batch 8 took
  // 1.5 us more, H100.)
  for (int d = VEC * threadIdx.x; d < p.v_head_dim; d += VEC * kMergeThreads) {
    Vec a[kManySplits - 1];
#pragma unroll
    for (int s = 0; s < kManySplits - 1; ++s) {
      if (s < num_splits) {
        a[s] = *reinterpret_cast<const Vec*>(ws_acc + (s * rows + qh) * p.v_head_dim + d);
      }
    }
    float o[VEC] = {};
#pragma unroll
    for (int s = 0; s < kManySplits - 1; ++s) {
      // An empty split's partial is never written: its load is garbage, weight 0 skips it.
      if (s < num_splits && weight[s] != 0.f) {
        const float* v = reinterpret_cast<const float*>(&a[s]);
#pragma unroll
        for (int i = 0; i < VEC; ++i) o[i] += weight[s] * v[i];
      }
    }
#pragma unroll
    for (int i = 0; i < VEC; ++i) StoreIo(p.out, p.io_dtype, qh * p.v_head_dim + d + i, o[i] * inv);
  }
}

// The merge of many splits (at least kManySplits), grid (batch * query heads, ceil(v_head_dim /
// kMergeDims)): each CTA's kMergeParts thread groups sum every kMergeParts-th split of
// kMergeDims dims with their loads in flight together, then add up in shared memory. (With one
// thread walking every split of its dims in turn, 256 splits of 16 heads were a 0.3 ms chain of
// dependent L2 round trips.) With few splits MergeSplitsKernel's fewer, fuller CTAs win (MLA,
// 128 heads, batch 8: 52 vs 61 us for the attention stage).
constexpr int kMergeDims = 64;
constexpr int kMergeParts = 4;
constexpr int kManyMergeThreads = kMergeDims * kMergeParts;
constexpr int kMergeEarly = 4;  // splits per thread loaded before the weights (16 splits: all)

__global__ void __launch_bounds__(kManyMergeThreads)
    MergeManySplitsKernel(TlsSparseAttentionParams p, int num_splits, const float* ws_acc,
                          const float* ws_ml) {
  __shared__ float weight[kMaxSplits];
  __shared__ float total[1];
  __shared__ float part_sum[kMergeParts - 1][kMergeDims];
  WaitForPreviousGrid();  // the attention kernel wrote the partials
  const int64_t qh = blockIdx.x;
  const int64_t rows = int64_t{p.batch} * p.num_q_heads;
  const int col = threadIdx.x % kMergeDims, part = threadIdx.x / kMergeDims;
  const int d = blockIdx.y * kMergeDims + col;
  const float* acc = ws_acc + qh * p.v_head_dim + d;
  const int64_t stride = rows * p.v_head_dim;
  // This thread's first kMergeEarly splits load beside the (m, l) pairs the weights need.
  float early[kMergeEarly];
#pragma unroll
  for (int k = 0; k < kMergeEarly; ++k) {
    const int s = part + k * kMergeParts;
    early[k] = d < p.v_head_dim && s < num_splits ? acc[s * stride] : 0.f;
  }
  SplitWeights(p, num_splits, ws_ml, qh, weight, total);
  float o = 0.f;
  if (d < p.v_head_dim) {
#pragma unroll
    for (int k = 0; k < kMergeEarly; ++k) {
      const int s = part + k * kMergeParts;
      const float w = s < num_splits ? weight[s] : 0.f;
      o += w != 0.f ? w * early[k] : 0.f;  // an empty split's partial is never written
    }
#pragma unroll 8
    for (int s = part + kMergeEarly * kMergeParts; s < num_splits; s += kMergeParts) {
      const float w = weight[s], a = acc[s * stride];
      o += w != 0.f ? w * a : 0.f;
    }
  }
  if (part > 0) part_sum[part - 1][col] = o;
  __syncthreads();
  if (part == 0 && d < p.v_head_dim) {
#pragma unroll
    for (int k = 0; k < kMergeParts - 1; ++k) o += part_sum[k][col];
    const float inv = total[0] > 0.f ? 1.f / total[0] : 0.f;
    StoreIo(p.out, p.io_dtype, qh * p.v_head_dim + d, o * inv);
  }
}

struct SplitPlan {
  int hpc = 0, head_chunks = 0, split_tokens = 0, num_splits = 0;
};

// The kernel of an MLA call (GQA head dims take SparseAttnKernel).
enum class MlaKernel {
  kTiles,      // MlaAttnKernel: fp32 io or V in a pool of its own
  kPipelined,  // MlaPipeAttnKernel: bf16 io, V inside the K rows, 16 heads per CTA
  kWide2,      // MlaWideAttnKernel<2>: 32 heads per CTA
  kWide4,      // MlaWideAttnKernel<4>: 64 heads per CTA
};

int WideRowTiles(MlaKernel k) {
  return k == MlaKernel::kWide4 ? 4 : k == MlaKernel::kWide2 ? 2 : 0;
}

// MLA with bf16 io and V inside the K rows (the layout the pipelined and wide kernels take).
bool MlaBf16SharedKv(const TlsSparseAttentionParams& p) {
  return p.head_dim == mla::kDim && p.io_dtype == DType::kBF16 && p.v_cache == p.k_cache;
}

// The wide kernel for this call's heads (kTiles where it cannot take them): 4 row tiles (64 heads
// per CTA) from 64 heads, 2 from 32, bf16 io with V inside the K rows only.
MlaKernel WideKernel(const TlsSparseAttentionParams& p) {
  if (!MlaBf16SharedKv(p)) return MlaKernel::kTiles;
  const int group = p.num_q_heads / p.num_kv_heads;
  return group >= 64 ? MlaKernel::kWide4 : group >= 32 ? MlaKernel::kWide2 : MlaKernel::kTiles;
}

// Resident CTAs per SM of `kernel` with `bytes` of dynamic shared memory (1 if it cannot say).
template <typename Kernel>
int CtasPerSm(Kernel* kernel, int threads, size_t bytes) {
  int n = 0;
  if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kernel, threads, bytes) != cudaSuccess) {
    (void)cudaGetLastError();
    return 1;
  }
  return std::max(n, 1);
}

// SparseAttnKernel<D, D, HPC>'s, with V in a pool of its own or inside the K rows (registers
// or shared memory bound it: 4 at head dim 128 with 4 heads per CTA), asked once per shape.
template <int D, int HPC>
int SparseAttnCtasPerSm(bool shared_kv) {
  static const int separate =
      CtasPerSm(SparseAttnKernel<D, D, HPC>, kAttnThreads, MakeAttnLayout<D, D, HPC>(false).bytes);
  static const int shared =
      CtasPerSm(SparseAttnKernel<D, D, HPC>, kAttnThreads, MakeAttnLayout<D, D, HPC>(true).bytes);
  return shared_kv ? shared : separate;
}

template <int D>
int GqaCtasPerSm(int hpc, bool shared_kv) {
  switch (hpc) {
    case 1:
      return SparseAttnCtasPerSm<D, 1>(shared_kv);
    case 2:
      return SparseAttnCtasPerSm<D, 2>(shared_kv);
    case 4:
      return SparseAttnCtasPerSm<D, 4>(shared_kv);
    default:
      return SparseAttnCtasPerSm<D, 8>(shared_kv);
  }
}

// kernel: MLA's (ignored for GQA head dims).
SplitPlan PlanSplits(const TlsSparseAttentionParams& p, MlaKernel kernel) {
  SplitPlan s;
  const int group = p.num_q_heads / p.num_kv_heads;
  const bool mla = p.head_dim == mla::kDim;
  const int wide_rt = mla ? WideRowTiles(kernel) : 0;
  const bool pipelined = mla && kernel == MlaKernel::kPipelined;
  // The pipelined and wide kernels walk their tiles with the next one loading (one CTA per SM);
  // the others load, then compute, tile after tile.
  const bool one_wave = mla && kernel != MlaKernel::kTiles;
  s.hpc = 1;
  if (wide_rt > 0) {
    s.hpc = 16 * wide_rt;
  } else if (mla) {
    s.hpc = mla::kRows;
  } else {
    while (s.hpc < group && s.hpc < 8) s.hpc *= 2;
  }
  const int tile = wide_rt > 0 ? mla::kWideKeys : mla ? mla::kKeys : kTile;
  s.head_chunks = (group + s.hpc - 1) / s.hpc;
  const int64_t base = int64_t{p.batch} * p.num_kv_heads * s.head_chunks;
  // A CTA's tiles are latency-bound steps (GQA: the next tile loads during this one's math;
  // MlaAttnKernel: load, then math): aim for one full wave of CTAs so the tiles of a row run side
  // by side. GQA: as many as fit an SM, and no more (ncu, run 94: 1.21 waves of 4 per SM at 128K
  // batch 8 k_t 2048, where the plan assumed 5, and the partial second wave took as long as a
  // whole one). MlaAttnKernel: 2 per SM (tensor cores, ~100-125 KB of shared memory) or more.
  // The pipelined and wide CTAs: one per SM, one wave and no more.
  const bool shared_kv = p.v_cache == p.k_cache;
  const int64_t ctas_per_sm = mla                ? (one_wave ? 1 : 2)
                              : p.head_dim == 64 ? GqaCtasPerSm<64>(s.hpc, shared_kv)
                                                 : GqaCtasPerSm<128>(s.hpc, shared_kv);
  const int64_t wave = ctas_per_sm * NumSms();
  const int64_t want =
      std::max<int64_t>(1, mla && !one_wave ? (wave + base - 1) / base : wave / base);
  const int max_positions = std::max(1, p.max_positions);
  int tokens = static_cast<int>((max_positions + want - 1) / want);
  if (pipelined) {
    // Its tiles need not be full (a split of 80 positions loads 80 rows, in tiles of 48 and
    // 32), so the split follows the wave, in steps of 16 positions; at least one full tile.
    tokens = std::max(mla::kPipeKeys, (tokens + 15) / 16 * 16);
  } else {
    // One tile per split is allowed: at batch 1 a 512-token budget then spreads over ~20
    // splits per (sequence, KV head) instead of 5, and each CTA pays the position -> table ->
    // K/V load chain once; the merge reads at most a few KB per query head.
    tokens = std::max(tile, (tokens + tile - 1) / tile * tile);
  }
  // A pipelined or wide CTA holds the pool rows of a bounded number of positions (more splits).
  if (wide_rt > 0) tokens = std::min(tokens, mla::kWideSlots);
  if (pipelined) tokens = std::min(tokens, mla::kPipeSlots);
  // Keep the split count under the merge kernel's limit.
  tokens = std::max(tokens, (max_positions + kMaxSplits - 1) / kMaxSplits);
  s.split_tokens = tokens;
  s.num_splits = (max_positions + tokens - 1) / tokens;
  return s;
}

// The call's kernel and its plan. The wide kernel where WideKernel allows it and its plan
// gives each CTA kMlaWideMinTiles to kWideSlots positions' worth of tiles: with fewer (batch
// 1-2 at k_t 512, H200) its one CTA per SM, larger partials and longer prologue made the
// attention 1.4x slower than the 16-head CTAs'; from 3 tiles it was as fast or faster (up to
// 1.8x at 128 heads batch 8 k_t 2048, 2.4x over dense 32K lists; bench/results/
// tls-kernels-h200.md). Else 16-head CTAs: pipelined where the io and layout allow and a
// split's positions fit its slots (lists of up to ~500K positions), MlaAttnKernel otherwise.
constexpr int kMlaWideMinTiles = 3;
struct AttnChoice {
  MlaKernel kernel = MlaKernel::kTiles;
  SplitPlan plan;
};

AttnChoice ChooseKernel(const TlsSparseAttentionParams& p) {
  const MlaKernel wide = WideKernel(p);
  if (wide != MlaKernel::kTiles) {
    const SplitPlan plan = PlanSplits(p, wide);
    if (plan.split_tokens >= kMlaWideMinTiles * mla::kWideKeys &&
        plan.split_tokens <= mla::kWideSlots) {
      return {wide, plan};
    }
  }
  if (MlaBf16SharedKv(p)) {
    const SplitPlan plan = PlanSplits(p, MlaKernel::kPipelined);
    if (plan.split_tokens <= mla::kPipeSlots) return {MlaKernel::kPipelined, plan};
  }
  return {MlaKernel::kTiles, PlanSplits(p, MlaKernel::kTiles)};
}

// Launches an attention KERNEL over the plan's grid with its split-K partials in p.workspace
// (TlsSparseAttentionWorkspaceBytes: [split, batch * q heads, v_head_dim], then (m, l) pairs),
// then the merge when the positions are split.
template <auto KERNEL>
cudaError_t LaunchSplitK(const TlsSparseAttentionParams& p, const SplitPlan& plan, int threads,
                         size_t smem, cudaStream_t stream) {
  cudaError_t err = EnsureDynamicSmem<KERNEL>(smem);
  if (err != cudaSuccess) return err;
  float* ws_acc = nullptr;
  float* ws_ml = nullptr;
  if (plan.num_splits > 1) {
    ws_acc = static_cast<float*>(p.workspace);
    const size_t acc_bytes = AlignUp(
        size_t(plan.num_splits) * p.batch * p.num_q_heads * p.v_head_dim * sizeof(float), 256);
    ws_ml = reinterpret_cast<float*>(static_cast<char*>(p.workspace) + acc_bytes);
  }
  // Both launches may start before the kernel ahead of them ends (see LaunchAfterPrevious).
  const dim3 grid(plan.num_splits, p.batch * p.num_kv_heads, plan.head_chunks);
  err = LaunchAfterPrevious<KERNEL>(grid, threads, smem, stream, p, plan.split_tokens,
                                    plan.num_splits, ws_acc, ws_ml);
  if (err != cudaSuccess || plan.num_splits <= 1) return err;
  const int rows = p.batch * p.num_q_heads;
  if (plan.num_splits >= kManySplits) {
    const dim3 merge_grid(rows, (p.v_head_dim + kMergeDims - 1) / kMergeDims);
    return LaunchAfterPrevious<MergeManySplitsKernel>(merge_grid, kManyMergeThreads, 0, stream, p,
                                                      plan.num_splits, ws_acc, ws_ml);
  }
  if (p.v_head_dim % (4 * kMergeThreads) == 0) {
    return LaunchAfterPrevious<MergeSplitsKernel<4>>(dim3(rows), kMergeThreads, 0, stream, p,
                                                     plan.num_splits, ws_acc, ws_ml);
  }
  return LaunchAfterPrevious<MergeSplitsKernel<1>>(dim3(rows), kMergeThreads, 0, stream, p,
                                                   plan.num_splits, ws_acc, ws_ml);
}

template <int HEAD_DIM, int V_DIM, int HPC>
cudaError_t LaunchAttn(const TlsSparseAttentionParams& p, const SplitPlan& plan,
                       cudaStream_t stream) {
  const size_t smem = MakeAttnLayout<HEAD_DIM, V_DIM, HPC>(p.v_cache == p.k_cache).bytes;
  return LaunchSplitK<SparseAttnKernel<HEAD_DIM, V_DIM, HPC>>(p, plan, kAttnThreads, smem, stream);
}

template <typename Io>
cudaError_t LaunchMlaAttn(const TlsSparseAttentionParams& p, const SplitPlan& plan,
                          cudaStream_t stream) {
  const size_t smem = mla::MakeLayout(Io::kDType == DType::kF32, p.v_cache == p.k_cache).bytes;
  return LaunchSplitK<mla::MlaAttnKernel<Io>>(p, plan, mla::kThreads, smem, stream);
}

cudaError_t LaunchMlaPipeAttn(const TlsSparseAttentionParams& p, const SplitPlan& plan,
                              cudaStream_t stream) {
  return LaunchSplitK<mla::MlaPipeAttnKernel>(p, plan, mla::kThreads, mla::PipeLayout::kBytes,
                                              stream);
}

template <int RT>
cudaError_t LaunchMlaWideAttn(const TlsSparseAttentionParams& p, const SplitPlan& plan,
                              cudaStream_t stream) {
  return LaunchSplitK<mla::MlaWideAttnKernel<RT>>(p, plan, mla::kThreads,
                                                  mla::WideLayout<RT>::kBytes, stream);
}

template <int HEAD_DIM, int V_DIM>
cudaError_t DispatchHeads(const TlsSparseAttentionParams& p, const SplitPlan& plan,
                          cudaStream_t stream) {
  switch (plan.hpc) {
    case 1:
      return LaunchAttn<HEAD_DIM, V_DIM, 1>(p, plan, stream);
    case 2:
      return LaunchAttn<HEAD_DIM, V_DIM, 2>(p, plan, stream);
    case 4:
      return LaunchAttn<HEAD_DIM, V_DIM, 4>(p, plan, stream);
    case 8:
      return LaunchAttn<HEAD_DIM, V_DIM, 8>(p, plan, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace

bool TlsSparseAttentionCanImplement(int head_dim, int v_head_dim, int group_size, DType io_dtype) {
  const bool dims = (head_dim == 64 && v_head_dim == 64) ||
                    (head_dim == 128 && v_head_dim == 128) ||
                    (head_dim == 576 && v_head_dim == 512);
  return dims && group_size >= 1 && (io_dtype == DType::kF32 || io_dtype == DType::kBF16);
}

size_t TlsSparseAttentionWorkspaceBytes(const TlsSparseAttentionParams& p) {
  if (p.num_kv_heads <= 0 || p.batch <= 0) return 0;
  // Either MLA kernel's plan: the size may be asked with other pointers or io than the call's.
  int splits = PlanSplits(p, MlaKernel::kTiles).num_splits;
  if (p.head_dim == mla::kDim) {
    for (MlaKernel k : {MlaKernel::kPipelined, MlaKernel::kWide2, MlaKernel::kWide4}) {
      splits = std::max(splits, PlanSplits(p, k).num_splits);
    }
  }
  if (splits <= 1) return 0;
  const size_t rows = size_t(splits) * p.batch * p.num_q_heads;
  return AlignUp(rows * p.v_head_dim * sizeof(float), 256) + AlignUp(rows * 2 * sizeof(float), 256);
}

cudaError_t TlsSparseAttention(const TlsSparseAttentionParams& p, cudaStream_t stream) {
  if (p.batch <= 0) return cudaSuccess;
  if (p.num_kv_heads <= 0 || p.num_q_heads % p.num_kv_heads != 0 ||
      !TlsSparseAttentionCanImplement(p.head_dim, p.v_head_dim, p.num_q_heads / p.num_kv_heads,
                                      p.io_dtype)) {
    return cudaErrorInvalidValue;
  }
  const AttnChoice choice = ChooseKernel(p);
  const SplitPlan& plan = choice.plan;
  if (plan.num_splits > 1 && p.workspace == nullptr) return cudaErrorInvalidValue;
  if (choice.kernel == MlaKernel::kWide4) return LaunchMlaWideAttn<4>(p, plan, stream);
  if (choice.kernel == MlaKernel::kWide2) return LaunchMlaWideAttn<2>(p, plan, stream);
  if (choice.kernel == MlaKernel::kPipelined) return LaunchMlaPipeAttn(p, plan, stream);
  switch (p.head_dim) {
    case 64:
      return DispatchHeads<64, 64>(p, plan, stream);
    case 128:
      return DispatchHeads<128, 128>(p, plan, stream);
    case mla::kDim:
      return p.io_dtype == DType::kF32 ? LaunchMlaAttn<F32Io>(p, plan, stream)
                                       : LaunchMlaAttn<Bf16Io>(p, plan, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace asynctls::kernels::cuda
