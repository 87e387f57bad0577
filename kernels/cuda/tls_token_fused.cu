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
using tls_detail::LoadIo;
using tls_detail::WarpInclusiveSum;

constexpr int kFusedThreads = 1024;  // candidates per CTA (one per thread)
constexpr int kFusedWarps = kFusedThreads / 32;
constexpr int kFusedMaxCluster = 8;  // portable cluster size: rows up to 8192 candidates
constexpr int kFusedMaxGroup = 16;   // logits of the group live in registers

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
  int base, equal_before, kept;                // compaction offsets of this CTA, total kept
  int scan[kFusedWarps + 1];
  int warp_equal[kFusedWarps];
  int warp_take[kFusedWarps];
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
  for (int r = 0; r < kFusedMaxCluster; ++r)
    v[r] = r < size ? *cluster.map_shared_rank(field, r) : 0;
  T s = 0;
#pragma unroll
  for (int r = 0; r < kFusedMaxCluster; ++r) s += v[r];
  return s;
}

// MAXG: the group size rounded up to 4, 8 or 16 (the logits' register array).
template <int NC, int MAXG>
__global__ void __launch_bounds__(kFusedThreads, 1)
    TokenScoreSelectKernel(TlsTokenScoreParams p, TlsTokenSelectParams sel) {
  __shared__ FusedShared sh;
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

  // This thread's candidate j (ranks in candidate order, so ranks are in position order).
  const int j = rank * kFusedThreads + tid;
  int32_t pos = -1;
  if (j < num_listed * kKvBlockSize) {
    const int i = j / kKvBlockSize;
    const int32_t block =
        p.maybe_blocks ? p.maybe_blocks[int64_t{bg} * p.max_kept_blocks + i] : p.sink_blocks + i;
    const int32_t cpos = block * kKvBlockSize + j % kKvBlockSize;
    if (cpos >= TlsBlockCandBegin(geo, block) && cpos < TlsBlockCandEnd(geo, block)) pos = cpos;
  }
  const bool valid = pos >= 0;
  uint32_t words[NC / 8];
#pragma unroll
  for (int w = 0; w < NC / 8; ++w) words[w] = 0u;
  float tok_scale = 0.f;
  if (valid) {
    const int64_t row = p.index_table[int64_t{b} * p.max_blocks_per_seq + pos / kKvBlockSize];
    const int64_t tok = (row * p.num_kv_heads + g) * kKvBlockSize + pos % kKvBlockSize;
    const uint4* src = reinterpret_cast<const uint4*>(p.token_codes + tok * (NC / 2));
#pragma unroll
    for (int w = 0; w < NC / 32; ++w) {
      const uint4 v = __ldg(src + w);
      words[4 * w] = v.x;
      words[4 * w + 1] = v.y;
      words[4 * w + 2] = v.z;
      words[4 * w + 3] = v.w;
    }
    if (NC == 16) {
      const uint2 v = __ldg(reinterpret_cast<const uint2*>(src));
      words[0] = v.x;
      words[1] = v.y;
    }
    tok_scale = __ldg(p.token_scales + tok);
  }
  __syncthreads();

  // Logits: TlsInt4Dot's fma chain (channels in order, then the scale), per head.
  constexpr bool kHoist = NC <= 32;
  float codes[kHoist ? NC : 1];
  if (kHoist) {
#pragma unroll
    for (int c = 0; c < NC; ++c) codes[c] = Int4CodeToFloat(words[c >> 3], c & 7);
  }
  float logit[MAXG];
#pragma unroll
  for (int hh = 0; hh < MAXG; ++hh) {
    logit[hh] = 0.f;
    if (hh < group) {
      const float4* qh = reinterpret_cast<const float4*>(sh.q + hh * NC);
      float acc = 0.f;
#pragma unroll
      for (int c4 = 0; c4 < NC / 4; ++c4) {
        const float4 qv = qh[c4];
        const float qc[4] = {qv.x, qv.y, qv.z, qv.w};
#pragma unroll
        for (int u = 0; u < 4; ++u) {
          const int c = 4 * c4 + u;
          const float code = kHoist ? codes[kHoist ? c : 0] : Int4CodeToFloat(words[c >> 3], c & 7);
          acc = TlsFma(qc[u], code, acc);
        }
      }
      logit[hh] = valid ? TlsMul(acc, tok_scale) : 0.f;
      const uint32_t wmax = __reduce_max_sync(0xffffffffu, valid ? TlsOrderedBits(logit[hh]) : 0u);
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
#pragma unroll
  for (int hh = 0; hh < MAXG; ++hh) {
    if (hh < group) {
      logit[hh] = valid ? TlsExp2((logit[hh] - sh.max_f[hh]) * exp_scale) : 0.f;
      unsigned long long fixed = valid ? TlsExpToFixed(logit[hh]) : 0ull;
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) fixed += __shfl_xor_sync(0xffffffffu, fixed, o);
      if (lane == 0 && fixed != 0ull) atomicAdd(&sh.exp_sum[hh], fixed);
    }
  }
  const int valid_cta = tls_detail::BlockSum<kFusedThreads>(valid ? 1 : 0, sh.scan);
  if (tid == 0) sh.counts[0] = valid_cta;
  cluster.sync();
  if (tid < group) {
    sh.inv[tid] = TlsInvDenominator(ClusterSum(cluster, &sh.exp_sum[tid], size), group);
  }
  if (tid == kFusedThreads - 1) sh.num_valid = ClusterSum(cluster, &sh.counts[0], size);
  __syncthreads();
  const int num_valid = sh.num_valid;
  float alpha = 0.f;
#pragma unroll
  for (int hh = 0; hh < MAXG; ++hh) {
    if (hh < group) alpha = TlsFma(logit[hh], sh.inv[hh], alpha);
  }
  if (p.alpha != nullptr && valid) p.alpha[int64_t{bg} * p.max_candidates + j] = alpha;

  // Cluster-wide radix select of the k-th key (as BlockTopK, histograms summed over the ranks).
  const int k = sel.k;
  const bool take_all = num_valid <= k;
  const uint32_t key = valid ? TlsOrderedBits(alpha) : 0u;
  uint32_t threshold = 0, mask = 0;
  int need_equal = 0;
  if (!take_all && k > 0) {
    uint32_t prefix = 0;
    int remaining = k;
    int pass = 0;
    for (int shift = 24; shift >= 0; shift -= 8, ++pass) {
      int* hist = sh.hist[pass & 1];
      const uint32_t digit = valid && (key & mask) == prefix ? (key >> shift) & 255u : 256u;
      if (__any_sync(0xffffffffu, digit != 256u)) {
        const unsigned same = __match_any_sync(0xffffffffu, digit);
        if (digit != 256u && lane == __ffs(same) - 1) atomicAdd(&hist[digit], __popc(same));
      }
      cluster.sync();  // every rank's histogram of this pass is complete
      for (int i = tid; i < 256; i += kFusedThreads) {
        sh.hist_sum[i] = ClusterSum(cluster, &hist[i], size);
        sh.hist[(pass + 1) & 1][i] = 0;  // read by the peers one pass ago, before this sync
      }
      __syncthreads();
      if (tid < 32) {
        int local = 0;
        for (int i = 0; i < 8; ++i) local += sh.hist_sum[255 - 8 * tid - i];
        const int incl = WarpInclusiveSum(local);
        const int above = incl - local;
        if (above < remaining && remaining <= incl) {
          int acc = above;
          for (int i = 0; i < 8; ++i) {
            const int d = 255 - 8 * tid - i;
            if (remaining <= acc + sh.hist_sum[d]) {
              sh.prefix = prefix | (static_cast<uint32_t>(d) << shift);
              sh.remaining = remaining - acc;
              sh.done = remaining - acc == sh.hist_sum[d] ? 1 : 0;
              break;
            }
            acc += sh.hist_sum[d];
          }
        }
      }
      __syncthreads();
      prefix = sh.prefix;
      remaining = sh.remaining;
      const bool done = sh.done != 0;
      mask |= 255u << shift;
      __syncthreads();
      if (done) break;
    }
    threshold = prefix;
    need_equal = remaining;
  }

  // Ordered compaction across the cluster: ranks before this one, then warps before this one.
  bool take = valid && k > 0, equal = false;
  if (valid && !take_all) {
    take = (key & mask) > threshold;
    equal = (key & mask) == threshold;
  }
  const int warp_above = __popc(__ballot_sync(0xffffffffu, take));
  const int warp_equal = __popc(__ballot_sync(0xffffffffu, equal));
  if (lane == 0) {
    sh.warp_take[warp] = warp_above;
    sh.warp_equal[warp] = warp_equal;
  }
  __syncthreads();
  if (tid == 0) {
    int above = 0, eq = 0;
    for (int w = 0; w < kFusedWarps; ++w) {
      above += sh.warp_take[w];
      eq += sh.warp_equal[w];
    }
    sh.counts[1] = above;
    sh.counts[2] = eq;
  }
  cluster.sync();
  if (tid == 0) {
    int above[kFusedMaxCluster], eq[kFusedMaxCluster];
#pragma unroll
    for (int r = 0; r < kFusedMaxCluster; ++r) {
      above[r] = r < size ? *cluster.map_shared_rank(&sh.counts[1], r) : 0;
      eq[r] = r < size ? *cluster.map_shared_rank(&sh.counts[2], r) : 0;
    }
    int base = 0, equal_before = 0, kept = 0, eq_seen = 0;
#pragma unroll
    for (int r = 0; r < kFusedMaxCluster; ++r) {
      const int eq_take = max(0, min(eq[r], need_equal - eq_seen));
      if (r < rank) {
        base += above[r] + eq_take;
        equal_before += eq[r];
      }
      kept += above[r] + eq_take;
      eq_seen += eq[r];
    }
    sh.base = base;
    sh.equal_before = equal_before;
    sh.kept = kept;
  }
  __syncthreads();
  const int base = sh.base, equal_before = sh.equal_before, kept = sh.kept;
  int32_t* row = sel.positions + int64_t{bg} * sel.max_positions;
  int rank_pos = base;
  int eq_seen = equal_before;
  for (int w = 0; w < warp; ++w) {
    const int eq_w = sh.warp_equal[w];
    rank_pos += sh.warp_take[w] + max(0, min(eq_w, need_equal - eq_seen));
    eq_seen += eq_w;
  }
  const unsigned lane_lt = (1u << lane) - 1u;
  const unsigned equal_bits = __ballot_sync(0xffffffffu, equal);
  if (equal && eq_seen + __popc(equal_bits & lane_lt) < need_equal) take = true;
  const unsigned take_bits = __ballot_sync(0xffffffffu, take);
  if (take) row[geo.sink_end + rank_pos + __popc(take_bits & lane_lt)] = pos;
  if (rank == 0) {
    for (int i = tid; i < geo.sink_end; i += kFusedThreads) row[i] = i;
    const int recent_base = geo.sink_end + kept;
    for (int i = tid; i < geo.len - geo.recent_start; i += kFusedThreads) {
      row[recent_base + i] = geo.recent_start + i;
    }
    if (tid == 0) sel.num_positions[bg] = geo.sink_end + kept + (geo.len - geo.recent_start);
  }
  if (p.cand_positions != nullptr && j < p.max_candidates) {
    p.cand_positions[int64_t{bg} * p.max_candidates + j] = pos;
  }
  cluster.sync();  // peers may still read this CTA's shared memory
}

int FusedClusterSize(int max_candidates) {
  int size = 1;
  while (size * kFusedThreads < max_candidates) size *= 2;
  return size;
}

template <int NC, int MAXG>
cudaError_t LaunchFused(const TlsTokenScoreParams& p, const TlsTokenSelectParams& sel,
                        cudaStream_t stream) {
  cudaLaunchConfig_t config{};
  const int size = FusedClusterSize(p.max_candidates);
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
  return cudaLaunchKernelEx(&config, TokenScoreSelectKernel<NC, MAXG>, p, sel);
}

template <int NC>
cudaError_t LaunchForGroup(const TlsTokenScoreParams& p, const TlsTokenSelectParams& sel,
                           cudaStream_t stream) {
  const int group = p.num_q_heads / p.num_kv_heads;
  if (group <= 4) return LaunchFused<NC, 4>(p, sel, stream);
  if (group <= 8) return LaunchFused<NC, 8>(p, sel, stream);
  return LaunchFused<NC, kFusedMaxGroup>(p, sel, stream);
}

}  // namespace

bool TlsTokenScoreSelectCanFuse(const TlsTokenScoreParams& p) {
  const int group = p.num_kv_heads > 0 ? p.num_q_heads / p.num_kv_heads : 0;
  return group >= 1 && group <= kFusedMaxGroup && p.num_q_heads % p.num_kv_heads == 0 &&
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
