// Token scoring and token top-k of the two-level path in one launch (TlsTokenScoreSelect).
//
// The separate ops (tls_select.cu) take three scoring passes joined by global atomics, a memset
// and a top-k kernel: four dependent launches of a few microseconds each for ~100 KB of token
// index per row, so the token branch was latency-bound. Here a thread cluster of up to 8 CTAs
// owns one (sequence, KV head) row, one candidate per thread: each thread decodes its INT4 row
// once and keeps the group's logits in registers; the per-head softmax max and exact fixed-point
// sums, the radix histograms and the compaction counts cross the cluster through distributed
// shared memory. The arithmetic is the separate ops' (tls_math.h order), so scores and the
// selected set equal theirs and the CPU reference's bit for bit.
#include <cooperative_groups.h>
#include <cuda_bf16.h>

#include "asynctls/kernels/cuda_tls.h"
#include "tls_common.cuh"

namespace asynctls::kernels::cuda {
namespace {

namespace cg = cooperative_groups;
using tls_detail::BlockExclusiveScan;
using tls_detail::FromOrderedBits;
using tls_detail::Int4CodeToFloat;
using tls_detail::Int4HeadDot;
using tls_detail::LoadIo;
using tls_detail::RadixPassDecide;
using tls_detail::WarpInclusiveSum;

constexpr int kFusedThreads = 1024;              // threads per CTA (one CTA per SM at 64 registers)
constexpr int kFusedWarps = kFusedThreads / 32;  // <= 32: one warp scans per-warp counts
// Portable cluster size: rows of up to 8 * 1024 candidates. (512-thread CTAs in clusters of 16
// measured no faster at batch 1 and 1.5x slower at batch 8 on the H200.)
constexpr int kFusedMaxCluster = 8;
constexpr int kFusedMaxGroup = 16;  // logits of the group live in registers

constexpr int kFusedMaxItems = 4;   // candidates per thread (registers: items * group <= 16)
constexpr int kFusedMaxWork = 512;  // largest group * num_channels fused (see CanFuse)

template <int ITEMS>
struct FusedShared {
  float q[kFusedMaxGroup * kTlsMaxChannels];   // the group's queries on the channel set
  uint32_t max_bits[kFusedMaxGroup];           // this CTA's per-head max logit (ordered bits)
  unsigned long long exp_sum[kFusedMaxGroup];  // this CTA's per-head fixed-point exp sums
  float max_f[kFusedMaxGroup];                 // cluster-wide max per head
  float inv[kFusedMaxGroup];                   // 1 / (G * softmax denominator) per head
  int hist[2][256];                            // radix pass p uses hist[p & 1]
  int hist_sum[256];                           // cluster-wide histogram of the pass
  int counts[3];                               // this CTA's valid, above, equal counts
  int num_valid;                               // cluster-wide valid candidates
  int above_before, equal_before, kept;        // ranks before this CTA; cluster-wide kept
  int scan[kFusedWarps + 1];
  // Per (item, warp) entry in candidate order: counts, then exclusive prefixes within the CTA.
  int entry_above[ITEMS][kFusedWarps];
  int entry_equal[ITEMS][kFusedWarps];
  uint32_t prefix;
  int remaining;
  int done;
};

// Sum of `field` over the cluster's `size` CTAs. The remote loads are independent (unrolled to
// the largest cluster), so they are in flight together: one distributed-shared-memory latency.
template <typename T>
__device__ __forceinline__ T ClusterSum(cg::cluster_group& cluster, T* field, int size) {
  T v[kFusedMaxCluster];
#pragma unroll
  for (int r = 0; r < kFusedMaxCluster; ++r) {
    v[r] = r < size ? *cluster.map_shared_rank(field, r) : 0;
  }
  T s = 0;
#pragma unroll
  for (int r = 0; r < kFusedMaxCluster; ++r) s += v[r];
  return s;
}

// MAXG: the group size rounded up to 4, 8 or 16 (the logits' register array). ITEMS: candidates
// per thread; item u of thread t is candidate (rank * ITEMS + u) * kFusedThreads + t, so candidate
// order is (rank, item, thread) order, which is position order.
template <int NC, int MAXG, int ITEMS>
__global__ void __launch_bounds__(kFusedThreads, 1)
    TokenScoreSelectKernel(TlsTokenScoreParams p, TlsTokenSelectParams sel) {
  __shared__ FusedShared<ITEMS> sh;
  cg::cluster_group cluster = cg::this_cluster();
  const int rank = static_cast<int>(cluster.block_rank());
  const int size = static_cast<int>(cluster.num_blocks());
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int bg = blockIdx.y;
  const int b = bg / p.num_kv_heads, g = bg % p.num_kv_heads;
  const int group = p.num_q_heads / p.num_kv_heads;
  const int32_t select_len = p.maybe_select_lens ? p.maybe_select_lens[b] : p.seq_lens[b];
  const TlsGeometry geo = MakeTlsGeometry(p.seq_lens[b], select_len, p.sink_blocks, p.window);
  const int num_listed =
      p.maybe_blocks ? p.maybe_num_blocks[bg] : max(0, geo.first_recent_block - p.sink_blocks);

  for (int e = tid; e < group * NC; e += kFusedThreads) {
    const int hh = e / NC, c = e % NC;
    const int ch = p.channels[int64_t{g} * NC + c];
    sh.q[e] =
        LoadIo(p.q, p.io_dtype, (int64_t{b} * p.num_q_heads + g * group + hh) * p.head_dim + ch);
  }
  if (tid < kFusedMaxGroup) {
    sh.max_bits[tid] = 0u;
    sh.exp_sum[tid] = 0ull;
  }
  for (int i = tid; i < 256; i += kFusedThreads) sh.hist[0][i] = 0;

  int32_t pos[ITEMS];
  int64_t tok[ITEMS];
#pragma unroll
  for (int u = 0; u < ITEMS; ++u) {
    const int j = (rank * ITEMS + u) * kFusedThreads + tid;
    pos[u] = -1;
    tok[u] = 0;
    if (j < num_listed * kKvBlockSize) {
      const int i = j / kKvBlockSize;
      const int32_t block =
          p.maybe_blocks ? p.maybe_blocks[int64_t{bg} * p.max_kept_blocks + i] : p.sink_blocks + i;
      const int32_t cpos = block * kKvBlockSize + j % kKvBlockSize;
      if (cpos >= TlsBlockCandBegin(geo, block) && cpos < TlsBlockCandEnd(geo, block)) {
        pos[u] = cpos;
        const int64_t row = p.index_table[int64_t{b} * p.max_blocks_per_seq + block];
        tok[u] = (row * p.num_kv_heads + g) * kKvBlockSize + cpos % kKvBlockSize;
      }
    }
  }
  __syncthreads();

  // Logits: TlsInt4Dot's fma chain (channels in order, then the scale), per head.
  float logit[ITEMS][MAXG];
  uint32_t head_max[MAXG];
#pragma unroll
  for (int hh = 0; hh < MAXG; ++hh) head_max[hh] = 0u;
#pragma unroll
  for (int u = 0; u < ITEMS; ++u) {
    const bool valid = pos[u] >= 0;
    uint32_t words[NC / 8];
#pragma unroll
    for (int w = 0; w < NC / 8; ++w) words[w] = 0u;
    float tok_scale = 0.f;
    if (valid) {
      if (NC == 16) {
        const uint2 v = __ldg(reinterpret_cast<const uint2*>(p.token_codes + tok[u] * (NC / 2)));
        words[0] = v.x;
        words[1] = v.y;
      } else {
        const uint4* src = reinterpret_cast<const uint4*>(p.token_codes + tok[u] * (NC / 2));
#pragma unroll
        for (int w = 0; w < NC / 32; ++w) {
          const uint4 v = __ldg(src + w);
          words[4 * w] = v.x;
          words[4 * w + 1] = v.y;
          words[4 * w + 2] = v.z;
          words[4 * w + 3] = v.w;
        }
      }
      tok_scale = __ldg(p.token_scales + tok[u]);
    }
    constexpr bool kHoist = NC <= 32;
    float codes[kHoist ? NC : 1];
    if (kHoist) {
#pragma unroll
      for (int c = 0; c < NC; ++c) codes[c] = Int4CodeToFloat(words[c >> 3], c & 7);
    }
#pragma unroll
    for (int hh = 0; hh < MAXG; ++hh) {
      logit[u][hh] = 0.f;
      if (hh < group) {
        const float acc = Int4HeadDot<NC, kHoist>(sh.q + hh * NC, codes, words);
        logit[u][hh] = valid ? TlsMul(acc, tok_scale) : 0.f;
        if (valid) head_max[hh] = max(head_max[hh], TlsOrderedBits(logit[u][hh]));
      }
    }
  }
#pragma unroll
  for (int hh = 0; hh < MAXG; ++hh) {
    if (hh < group) {
      const uint32_t wmax = __reduce_max_sync(0xffffffffu, head_max[hh]);
      if (lane == 0 && wmax != 0u) atomicMax(&sh.max_bits[hh], wmax);
    }
  }
  cluster.sync();
  if (tid < group) {
    uint32_t v[kFusedMaxCluster];
#pragma unroll
    for (int r = 0; r < kFusedMaxCluster; ++r) {
      v[r] = r < size ? *cluster.map_shared_rank(&sh.max_bits[tid], r) : 0u;
    }
    uint32_t m = 0u;
#pragma unroll
    for (int r = 0; r < kFusedMaxCluster; ++r) m = max(m, v[r]);
    sh.max_f[tid] = FromOrderedBits(m);
  }
  __syncthreads();

  // Per-head exp, summed exactly in fixed point (order-free, as the separate ops' atomics).
  const float exp_scale = p.scale * kTlsLog2E;
  int valid_local = 0;
#pragma unroll
  for (int u = 0; u < ITEMS; ++u) valid_local += pos[u] >= 0 ? 1 : 0;
#pragma unroll
  for (int hh = 0; hh < MAXG; ++hh) {
    if (hh < group) {
      unsigned long long fixed = 0ull;
#pragma unroll
      for (int u = 0; u < ITEMS; ++u) {
        const bool valid = pos[u] >= 0;
        logit[u][hh] = valid ? TlsExp2((logit[u][hh] - sh.max_f[hh]) * exp_scale) : 0.f;
        fixed += valid ? TlsExpToFixed(logit[u][hh]) : 0ull;
      }
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) fixed += __shfl_xor_sync(0xffffffffu, fixed, o);
      if (lane == 0 && fixed != 0ull) atomicAdd(&sh.exp_sum[hh], fixed);
    }
  }
  const int valid_cta = tls_detail::BlockSum<kFusedThreads>(valid_local, sh.scan);
  if (tid == 0) sh.counts[0] = valid_cta;
  cluster.sync();
  if (tid < group) {
    sh.inv[tid] = TlsInvDenominator(ClusterSum(cluster, &sh.exp_sum[tid], size), group);
  }
  if (tid == kFusedThreads - 1) sh.num_valid = ClusterSum(cluster, &sh.counts[0], size);
  __syncthreads();
  const int num_valid = sh.num_valid;
  uint32_t key[ITEMS];
#pragma unroll
  for (int u = 0; u < ITEMS; ++u) {
    float alpha = 0.f;
#pragma unroll
    for (int hh = 0; hh < MAXG; ++hh) {
      if (hh < group) alpha = TlsFma(logit[u][hh], sh.inv[hh], alpha);
    }
    key[u] = pos[u] >= 0 ? TlsOrderedBits(alpha) : 0u;
  }

  // Cluster-wide radix select of the k-th key (as BlockTopK, histograms summed over the ranks).
  const int k = sel.k;
  const bool take_all = num_valid <= k;
  uint32_t threshold = 0, mask = 0;
  int need_equal = 0;
  if (!take_all && k > 0) {
    uint32_t prefix = 0;
    int remaining = k;
    int pass = 0;
    for (int shift = 24; shift >= 0; shift -= 8, ++pass) {
      int* hist = sh.hist[pass & 1];
#pragma unroll
      for (int u = 0; u < ITEMS; ++u) {
        const uint32_t digit =
            pos[u] >= 0 && (key[u] & mask) == prefix ? (key[u] >> shift) & 255u : 256u;
        if (__any_sync(0xffffffffu, digit != 256u)) {
          const unsigned same = __match_any_sync(0xffffffffu, digit);
          if (digit != 256u && lane == __ffs(same) - 1) atomicAdd(&hist[digit], __popc(same));
        }
      }
      cluster.sync();  // every rank's histogram of this pass is complete
      for (int i = tid; i < 256; i += kFusedThreads) {
        sh.hist_sum[i] = ClusterSum(cluster, &hist[i], size);
        sh.hist[(pass + 1) & 1][i] = 0;  // read by the peers one pass ago, before this sync
      }
      __syncthreads();
      if (RadixPassDecide(sh.hist_sum, shift, &prefix, &remaining, &mask, &sh.prefix, &sh.remaining,
                          &sh.done)) {
        break;
      }
    }
    threshold = prefix;
    need_equal = remaining;
  }

  // Ordered compaction. The rank of a kept item = (items above the threshold before it) +
  // min(equal items before it, need_equal): prefixes over ranks, then (item, warp) entries,
  // then lanes.
  bool above[ITEMS], equal[ITEMS];
  unsigned above_bits[ITEMS], equal_bits[ITEMS];
#pragma unroll
  for (int u = 0; u < ITEMS; ++u) {
    const bool valid = pos[u] >= 0 && k > 0;
    above[u] = valid && (take_all || (key[u] & mask) > threshold);
    equal[u] = valid && !take_all && (key[u] & mask) == threshold;
    above_bits[u] = __ballot_sync(0xffffffffu, above[u]);
    equal_bits[u] = __ballot_sync(0xffffffffu, equal[u]);
    if (lane == 0) {
      sh.entry_above[u][warp] = __popc(above_bits[u]);
      sh.entry_equal[u][warp] = __popc(equal_bits[u]);
    }
  }
  __syncthreads();
  if (warp == 0) {  // exclusive prefixes over the entries in (item, warp) order, CTA totals
    int above_carry = 0, equal_carry = 0;
    for (int u = 0; u < ITEMS; ++u) {
      const bool entry = lane < kFusedWarps;
      const int a = entry ? sh.entry_above[u][lane] : 0;
      const int e = entry ? sh.entry_equal[u][lane] : 0;
      const int ai = WarpInclusiveSum(a), ei = WarpInclusiveSum(e);
      if (entry) {
        sh.entry_above[u][lane] = above_carry + ai - a;
        sh.entry_equal[u][lane] = equal_carry + ei - e;
      }
      above_carry += __shfl_sync(0xffffffffu, ai, 31);
      equal_carry += __shfl_sync(0xffffffffu, ei, 31);
    }
    if (lane == 0) {
      sh.counts[1] = above_carry;
      sh.counts[2] = equal_carry;
    }
  }
  cluster.sync();
  if (tid == 0) {
    int a[kFusedMaxCluster], e[kFusedMaxCluster];
#pragma unroll
    for (int r = 0; r < kFusedMaxCluster; ++r) {
      a[r] = r < size ? *cluster.map_shared_rank(&sh.counts[1], r) : 0;
      e[r] = r < size ? *cluster.map_shared_rank(&sh.counts[2], r) : 0;
    }
    int above_before = 0, equal_before = 0, above_all = 0, equal_all = 0;
#pragma unroll
    for (int r = 0; r < kFusedMaxCluster; ++r) {
      above_before += r < rank ? a[r] : 0;
      equal_before += r < rank ? e[r] : 0;
      above_all += a[r];
      equal_all += e[r];
    }
    sh.above_before = above_before;
    sh.equal_before = equal_before;
    sh.kept = above_all + min(equal_all, need_equal);
  }
  __syncthreads();
  int32_t* row = sel.positions + int64_t{bg} * sel.max_positions;
  const unsigned lane_lt = (1u << lane) - 1u;
#pragma unroll
  for (int u = 0; u < ITEMS; ++u) {
    const int above_before =
        sh.above_before + sh.entry_above[u][warp] + __popc(above_bits[u] & lane_lt);
    const int equal_before =
        sh.equal_before + sh.entry_equal[u][warp] + __popc(equal_bits[u] & lane_lt);
    if (above[u] || (equal[u] && equal_before < need_equal)) {
      row[geo.sink_end + above_before + min(equal_before, need_equal)] = pos[u];
    }
  }
  if (rank == 0) {
    const int kept = sh.kept;
    for (int i = tid; i < geo.sink_end; i += kFusedThreads) row[i] = i;
    const int recent_base = geo.sink_end + kept;
    for (int i = tid; i < geo.len - geo.recent_start; i += kFusedThreads) {
      row[recent_base + i] = geo.recent_start + i;
    }
    if (tid == 0) sel.num_positions[bg] = geo.sink_end + kept + (geo.len - geo.recent_start);
  }
  cluster.sync();  // peers may still read this CTA's shared memory
}

// CTAs per row (a power of two up to kFusedMaxCluster) for `items` candidates per thread.
int FusedClusterSize(int max_candidates, int items) {
  int size = 1;
  while (size * items * kFusedThreads < max_candidates) size *= 2;
  return size;
}

// Candidates per thread: the fewest that keep the grid within one wave (one CTA per SM), as
// far as the group's logits fit in registers (items * group <= 16).
int FusedItems(const TlsTokenScoreParams& p, int max_group) {
  static const int num_sms = [] {
    int device = 0, sms = 132;
    if (cudaGetDevice(&device) == cudaSuccess) {
      cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
    }
    return sms;
  }();
  const int rows = p.batch * p.num_kv_heads;
  int items = 1;
  while (items < kFusedMaxItems && items * 2 * max_group <= kFusedMaxGroup &&
         rows * FusedClusterSize(p.max_candidates, items) > num_sms) {
    items *= 2;
  }
  return items;
}

template <int NC, int MAXG, int ITEMS>
cudaError_t LaunchFused(const TlsTokenScoreParams& p, const TlsTokenSelectParams& sel,
                        cudaStream_t stream) {
  cudaLaunchConfig_t config{};
  const int size = FusedClusterSize(p.max_candidates, ITEMS);
  config.gridDim = dim3(size, p.batch * p.num_kv_heads);
  config.blockDim = dim3(kFusedThreads);
  config.stream = stream;
  cudaLaunchAttribute attr{};
  attr.id = cudaLaunchAttributeClusterDimension;
  attr.val.clusterDim.x = size;
  attr.val.clusterDim.y = 1;
  attr.val.clusterDim.z = 1;
  config.attrs = &attr;
  config.numAttrs = 1;
  return cudaLaunchKernelEx(&config, TokenScoreSelectKernel<NC, MAXG, ITEMS>, p, sel);
}

template <int NC, int MAXG>
cudaError_t LaunchForItems(const TlsTokenScoreParams& p, const TlsTokenSelectParams& sel,
                           cudaStream_t stream) {
  // More than one item per thread only for channel sets of up to 32 (the GQA configuration).
  const int items = NC <= 32 ? FusedItems(p, MAXG) : 1;
  if (NC <= 32 && MAXG <= 4 && items >= 4)
    return LaunchFused < NC, MAXG, NC <= 32 && MAXG <= 4 ? 4 : 1 > (p, sel, stream);
  if (NC <= 32 && MAXG <= 8 && items >= 2) {
    return LaunchFused < NC, MAXG, NC <= 32 && MAXG <= 8 ? 2 : 1 > (p, sel, stream);
  }
  return LaunchFused<NC, MAXG, 1>(p, sel, stream);
}

template <int NC>
cudaError_t LaunchForGroup(const TlsTokenScoreParams& p, const TlsTokenSelectParams& sel,
                           cudaStream_t stream) {
  const int group = p.num_q_heads / p.num_kv_heads;
  if (group <= 4) return LaunchForItems<NC, 4>(p, sel, stream);
  if (group <= 8) return LaunchForItems<NC, 8>(p, sel, stream);
  return LaunchForItems<NC, kFusedMaxGroup>(p, sel, stream);
}

}  // namespace

bool TlsTokenScoreSelectCanFuse(const TlsTokenScoreParams& p) {
  const int group = p.num_kv_heads > 0 ? p.num_q_heads / p.num_kv_heads : 0;
  // group * num_channels bounds the per-thread logit work: MLA's 16 heads x 128 channels on one
  // KV head is 16x the GQA row's and gets only batch * 8 CTAs, so it runs faster unfused.
  return group >= 1 && group <= kFusedMaxGroup && group * p.num_channels <= kFusedMaxWork &&
         p.num_q_heads % p.num_kv_heads == 0 &&
         p.max_candidates <= kFusedMaxCluster * kFusedThreads &&
         TlsSelectCanImplement(p.head_dim, p.num_channels, group);
}

cudaError_t TlsTokenScoreSelect(const TlsTokenScoreParams& p, const TlsTokenSelectParams& sel,
                                cudaStream_t stream) {
  if (p.batch <= 0) return cudaSuccess;
  if (!TlsTokenScoreSelectCanFuse(p) || sel.k < 0 || sel.batch != p.batch ||
      sel.num_kv_heads != p.num_kv_heads) {
    return cudaErrorInvalidValue;
  }
  switch (p.num_channels) {
    case 16:
      return LaunchForGroup<16>(p, sel, stream);
    case 32:
      return LaunchForGroup<32>(p, sel, stream);
    case 64:
      return LaunchForGroup<64>(p, sel, stream);
    case 128:
      return LaunchForGroup<128>(p, sel, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace asynctls::kernels::cuda
