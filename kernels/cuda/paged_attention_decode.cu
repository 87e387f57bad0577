// Paged decode attention (one query token per sequence), flash-decoding style:
//
//   grid (split, kv_head x row_tile, sequence); 4 warps per CTA.
//   A CTA streams the pages [split * pages_per_split, ...) of one sequence and one KV head
//   through a STAGES-deep cp.async ring of (K page, V page) tiles, and serves all the query heads
//   of that KV head at once (up to 16, the M of one mma tile; larger groups take several row
//   tiles), so K and V cross HBM once per group. Warp w takes keys [16w, 16w + 16) of every
//   page: S = Q K^T and O += P V on tensor cores (mma.sync bf16 m16n8k16, fp32 accumulation),
//   with an online softmax per warp. The four warps merge through shared memory at the end; the
//   CTA writes either the final output (one split) or a normalized partial + its log-sum-exp to
//   the workspace, which a combine kernel reduces over the splits.
//
// The split count fills the GPU with one wave (SMs x resident CTAs per SM), so batch 1 at long
// context still streams from every SM.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdlib>

#include "asynctls/kernels/cuda_attention.h"
#include "paged_attention_common.cuh"

namespace asynctls::kernels::cuda {
namespace attention_detail {
namespace {

inline constexpr int kDecodeThreads = 128;
inline constexpr int kDecodeWarps = kDecodeThreads / kWarpSize;
inline constexpr int kRowTile = 16;  // query heads per CTA (the mma M)

template <int D>
struct DecodeConfig {
  static constexpr int kStages = D == 128 ? 3 : 4;
  static constexpr int kTileBytes = kPage * D * 2;
  static constexpr int kQueryBytes = kRowTile * D * 2;
  static constexpr int kSmemBytes = kStages * 2 * kTileBytes + kQueryBytes;
  // Shared memory of the final cross-warp merge (reuses the ring).
  static constexpr int kMergeStride = D + 4;
  static constexpr int kMergeBytes =
      (kDecodeWarps * kRowTile * kMergeStride + 2 * kDecodeWarps * kRowTile + 3 * kRowTile +
       kDecodeWarps * kRowTile) *
      4;
  static_assert(kMergeBytes <= kStages * 2 * kTileBytes, "merge buffer must fit in the ring");
};

struct DecodeSplit {
  int pages_per_split = 1;
  int num_splits = 1;
};

template <int D, typename Io>
__global__ void __launch_bounds__(kDecodeThreads, 2)
    PagedDecodeKernel(const PagedDecodeParams p, const int pages_per_split, const int row_tiles,
                      float* __restrict__ o_part, float* __restrict__ lse_part) {
  using Cfg = DecodeConfig<D>;
  using T = typename Io::T;
  extern __shared__ __align__(128) uint8_t smem[];

  const int split = blockIdx.x;
  const int num_splits = gridDim.x;
  const int kv_head = blockIdx.y / row_tiles, row_tile = blockIdx.y % row_tiles;
  const int b = blockIdx.z;
  const int group = p.num_q_heads / p.num_kv_heads;
  const int seq_len = p.seq_lens[b];
  const int num_pages = (seq_len + kPage - 1) / kPage;
  const int page_begin = split * pages_per_split;
  if (page_begin >= num_pages) return;  // the combine kernel reads only the splits that exist
  const int page_end = min(num_pages, page_begin + pages_per_split);
  const int num_iters = page_end - page_begin;
  const int rows = min(kRowTile, group - row_tile * kRowTile);
  const int head0 = kv_head * group + row_tile * kRowTile;

  const int tid = threadIdx.x, warp = tid / kWarpSize, lane = tid % kWarpSize;
  const uint32_t ring = SmemAddr(smem);
  uint8_t* q_tile = smem + Cfg::kStages * 2 * Cfg::kTileBytes;
  const int32_t* table = p.block_table + static_cast<int64_t>(b) * p.max_blocks_per_seq;
  const auto* k_cache = static_cast<const __nv_bfloat16*>(p.k_cache);
  const auto* v_cache = static_cast<const __nv_bfloat16*>(p.v_cache);

  auto load_page = [&](int iter, int block) {
    const int page = page_begin + iter;
    const int stage = iter % Cfg::kStages;
    const int64_t off = (static_cast<int64_t>(block) * p.num_kv_heads + kv_head) * (kPage * D);
    const int valid = min(kPage, seq_len - page * kPage);
    const uint32_t k_tile = ring + stage * 2 * Cfg::kTileBytes;
    LoadPageAsync<D, kDecodeThreads>(k_tile, k_cache + off, valid, tid);
    LoadPageAsync<D, kDecodeThreads>(k_tile + Cfg::kTileBytes, v_cache + off, valid, tid);
  };

  // Start streaming before anything else.
#pragma unroll
  for (int s = 0; s < Cfg::kStages - 1; ++s) {
    if (s < num_iters) load_page(s, table[page_begin + s]);
    CpAsyncCommit();
  }
  // Block id of the next page to load, read one iteration early so that issuing its copies
  // never waits on the table.
  int next_block = Cfg::kStages - 1 < num_iters ? table[page_begin + Cfg::kStages - 1] : 0;

  const T* q = static_cast<const T*>(p.q) + (static_cast<int64_t>(b) * p.num_q_heads + head0) * D;
  StoreQueryTile<D, kRowTile, kDecodeThreads, Io>(
      q_tile, [&](int r) { return q + r * D; }, rows, p.scale * kLog2e, tid);
  __syncthreads();
  uint32_t qa[D / 16][4];
  LoadRowFragments<D>(qa, SmemAddr(q_tile), 0, lane);

  float o[D / 8][4];
#pragma unroll
  for (int n = 0; n < D / 8; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.f;
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};
  const int g = lane / 4, tig = lane % 4;

  for (int iter = 0; iter < num_iters; ++iter) {
    CpAsyncWait<Cfg::kStages - 2>();
    __syncthreads();  // page `iter` landed for all threads; stage iter-1 is free again
    if (iter + Cfg::kStages - 1 < num_iters) {
      load_page(iter + Cfg::kStages - 1, next_block);
      if (iter + Cfg::kStages < num_iters) next_block = table[page_begin + iter + Cfg::kStages];
    }
    CpAsyncCommit();

    const int key0 = (page_begin + iter) * kPage + warp * 16;  // absolute position
    if (key0 >= seq_len) continue;                             // warp-uniform
    const uint32_t k_tile = ring + (iter % Cfg::kStages) * 2 * Cfg::kTileBytes;
    float s[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
    ScoreTile<D, 2>(s, qa, k_tile, warp * 16, lane);
    if (key0 + 16 > seq_len) {
#pragma unroll
      for (int j = 0; j < 2; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e)
          if (key0 + j * 8 + 2 * tig + (e & 1) >= seq_len) s[j][e] = -INFINITY;
    }
    OnlineSoftmax<D, 2>(s, o, m, l);
    AccumulateValues<D, 2>(o, s, k_tile + Cfg::kTileBytes, warp * 16, lane);
  }
  l[0] = QuadSum(l[0]);
  l[1] = QuadSum(l[1]);

  // Merge the four warps' (m, l, o) through shared memory (the ring is free now).
  CpAsyncWait<0>();
  __syncthreads();
  float* merge_o = reinterpret_cast<float*>(smem);  // [warp][row][kMergeStride]
  float* merge_m = merge_o + kDecodeWarps * kRowTile * Cfg::kMergeStride;  // [warp][row]
  float* merge_l = merge_m + kDecodeWarps * kRowTile;
  float* row_scale = merge_l + kDecodeWarps * kRowTile;  // [warp][row]: exp2(m_w - M) / L
  float* row_lse = row_scale + kDecodeWarps * kRowTile;  // [row]
#pragma unroll
  for (int n = 0; n < D / 8; ++n) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float* dst = merge_o + (warp * kRowTile + g + 8 * r) * Cfg::kMergeStride + n * 8 + 2 * tig;
      dst[0] = o[n][2 * r];
      dst[1] = o[n][2 * r + 1];
    }
  }
  if (tig == 0) {
    merge_m[warp * kRowTile + g] = m[0];
    merge_m[warp * kRowTile + g + 8] = m[1];
    merge_l[warp * kRowTile + g] = l[0];
    merge_l[warp * kRowTile + g + 8] = l[1];
  }
  __syncthreads();
  if (tid < kRowTile) {
    float mx = -INFINITY;
#pragma unroll
    for (int w = 0; w < kDecodeWarps; ++w) mx = fmaxf(mx, merge_m[w * kRowTile + tid]);
    float sum = 0.f;
    float scale[kDecodeWarps];
#pragma unroll
    for (int w = 0; w < kDecodeWarps; ++w) {
      scale[w] =
          merge_m[w * kRowTile + tid] == -INFINITY ? 0.f : exp2f(merge_m[w * kRowTile + tid] - mx);
      sum += merge_l[w * kRowTile + tid] * scale[w];
    }
    const float inv = 1.f / sum;
#pragma unroll
    for (int w = 0; w < kDecodeWarps; ++w) row_scale[w * kRowTile + tid] = scale[w] * inv;
    row_lse[tid] = (mx + log2f(sum)) * kLn2;
  }
  __syncthreads();

  const int64_t out_row0 = static_cast<int64_t>(b) * p.num_q_heads + head0;
  for (int idx = tid; idx < rows * D; idx += kDecodeThreads) {
    const int r = idx / D, d = idx % D;
    float v = 0.f;
#pragma unroll
    for (int w = 0; w < kDecodeWarps; ++w)
      v += merge_o[(w * kRowTile + r) * Cfg::kMergeStride + d] * row_scale[w * kRowTile + r];
    if (num_splits == 1) {
      Io::Store(static_cast<T*>(p.out) + (out_row0 + r) * D + d, v);
    } else {
      o_part[((out_row0 + r) * num_splits + split) * D + d] = v;
    }
  }
  if (tid < rows) {
    if (num_splits == 1) {
      if (p.maybe_lse) p.maybe_lse[out_row0 + tid] = row_lse[tid];
    } else {
      lse_part[(out_row0 + tid) * num_splits + split] = row_lse[tid];
    }
  }
}

// One CTA per (sequence, query head): out = sum_s w_s o_s / sum_s w_s with
// w_s = exp(lse_s - max lse), over the splits that sequence actually has. Warp w takes splits
// w, w + kCombineWarps, ...; the warps' sums meet in shared memory. (One warp per row walked
// every split in one chain of dependent loads: 10 us per layer at batch 1, Qwen3-8B shapes,
// H200, against a 36 us attention.)
inline constexpr int kCombineWarps = 4;

template <int D, typename Io>
__global__ void __launch_bounds__(kCombineWarps* kWarpSize)
    PagedDecodeCombineKernel(const PagedDecodeParams p, const int pages_per_split,
                             const int num_splits, const float* __restrict__ o_part,
                             const float* __restrict__ lse_part) {
  constexpr int kPerLane = D / kWarpSize;  // 4 or 2 consecutive dims
  __shared__ float acc_s[kCombineWarps][D];
  __shared__ float sum_s[kCombineWarps];
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  const int64_t row = blockIdx.x;
  const int b = static_cast<int>(row / p.num_q_heads);
  const int num_pages = (p.seq_lens[b] + kPage - 1) / kPage;
  // The splits this sequence has, i.e. those whose CTA did not exit at once (split s covers
  // pages [s * pages_per_split, ...) and exits when that is past the sequence's last page);
  // the empty ones wrote nothing and are never read. Clamped to the grid so that a seq_len
  // above max_seq_len (a broken caller contract) cannot read past the workspace.
  const int splits = min(num_splits, (num_pages + pages_per_split - 1) / pages_per_split);
  const float* lse = lse_part + row * num_splits;
  const float* part = o_part + row * num_splits * D + lane * kPerLane;

  float mx = -INFINITY;  // every warp finds the max itself (no barrier before the sums)
  for (int s = lane; s < splits; s += kWarpSize) mx = fmaxf(mx, lse[s]);
#pragma unroll
  for (int off = 16; off > 0; off /= 2) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, off));

  float acc[kPerLane] = {};
  float sum = 0.f;
#pragma unroll 4
  for (int s = warp; s < splits; s += kCombineWarps) {
    const float w = __expf(lse[s] - mx);
    sum += w;
    if constexpr (kPerLane == 4) {
      const float4 v = *reinterpret_cast<const float4*>(part + s * D);
      acc[0] += w * v.x, acc[1] += w * v.y, acc[2] += w * v.z, acc[3] += w * v.w;
    } else {
      const float2 v = *reinterpret_cast<const float2*>(part + s * D);
      acc[0] += w * v.x, acc[1] += w * v.y;
    }
  }
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) acc_s[warp][lane * kPerLane + i] = acc[i];
  if (lane == 0) sum_s[warp] = sum;
  __syncthreads();
  if (warp != 0) return;
  float total = 0.f;
#pragma unroll
  for (int w = 0; w < kCombineWarps; ++w) total += sum_s[w];
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) {
    acc[i] = 0.f;
#pragma unroll
    for (int w = 0; w < kCombineWarps; ++w) acc[i] += acc_s[w][lane * kPerLane + i];
  }
  const float inv = 1.f / total;
  using T = typename Io::T;
  T* out = static_cast<T*>(p.out) + row * D + lane * kPerLane;
#pragma unroll
  for (int i = 0; i < kPerLane; i += 2) Io::Store2(out + i, acc[i] * inv, acc[i + 1] * inv);
  if (p.maybe_lse && lane == 0) p.maybe_lse[row] = mx + __logf(total);
}

// ---- launcher ------------------------------------------------------------------------------

// Debug knob (see the bench): ASYNCTLS_DECODE_WAVES scales the split count (default 1 wave).
int DecodeWaves() {
  static const int waves = [] {
    const char* env = std::getenv("ASYNCTLS_DECODE_WAVES");
    const int v = env ? std::atoi(env) : 1;
    return v >= 1 && v <= 64 ? v : 1;
  }();
  return waves;
}

template <int D, typename Io>
cudaError_t PlanDecodeSplit(const PagedDecodeParams& p, DecodeSplit* split) {
  KernelResidency res;
  const cudaError_t err =
      PrepareKernel<PagedDecodeKernel<D, Io>, kDecodeThreads, DecodeConfig<D>::kSmemBytes>(&res);
  if (err != cudaSuccess) return err;
  const int group = p.num_q_heads / p.num_kv_heads;
  const int row_tiles = (group + kRowTile - 1) / kRowTile;
  const int64_t units = static_cast<int64_t>(p.batch) * p.num_kv_heads * row_tiles;
  const int max_pages = std::max(1, (p.max_seq_len + kPage - 1) / kPage);
  // One wave: every resident CTA slot of the GPU gets one split (more with the debug knob).
  const int64_t slots = static_cast<int64_t>(res.sms) * res.resident * DecodeWaves();
  const int64_t wanted = std::max<int64_t>(1, slots / std::max<int64_t>(1, units));
  const int splits_cap = static_cast<int>(std::min<int64_t>(wanted, max_pages));
  split->pages_per_split = (max_pages + splits_cap - 1) / splits_cap;
  split->num_splits = (max_pages + split->pages_per_split - 1) / split->pages_per_split;
  return cudaSuccess;
}

template <int D, typename Io>
cudaError_t LaunchDecode(const PagedDecodeParams& p, cudaStream_t stream) {
  DecodeSplit split;
  cudaError_t err = PlanDecodeSplit<D, Io>(p, &split);
  if (err != cudaSuccess) return err;
  const int group = p.num_q_heads / p.num_kv_heads;
  const int row_tiles = (group + kRowTile - 1) / kRowTile;
  float* o_part = nullptr;
  float* lse_part = nullptr;
  if (split.num_splits > 1) {
    if (!p.workspace) return cudaErrorInvalidValue;
    const int64_t rows = static_cast<int64_t>(p.batch) * p.num_q_heads;
    o_part = static_cast<float*>(p.workspace);
    lse_part = o_part + rows * split.num_splits * D;
  }
  const dim3 grid(split.num_splits, p.num_kv_heads * row_tiles, p.batch);
  PagedDecodeKernel<D, Io><<<grid, kDecodeThreads, DecodeConfig<D>::kSmemBytes, stream>>>(
      p, split.pages_per_split, row_tiles, o_part, lse_part);
  err = cudaGetLastError();
  if (err != cudaSuccess || split.num_splits == 1) return err;
  const int64_t rows = static_cast<int64_t>(p.batch) * p.num_q_heads;
  PagedDecodeCombineKernel<D, Io>
      <<<static_cast<unsigned>(rows), kCombineWarps * kWarpSize, 0, stream>>>(
          p, split.pages_per_split, split.num_splits, o_part, lse_part);
  return cudaGetLastError();
}

// The shape alone decides the split plan, so the workspace size needs no pointers.
bool ValidDecodeShape(const PagedDecodeParams& p) {
  return p.batch >= 0 && p.num_kv_heads > 0 && p.num_q_heads > 0 &&
         p.num_q_heads % p.num_kv_heads == 0 && p.max_blocks_per_seq > 0 && p.max_seq_len >= 1 &&
         p.batch <= 65535 && p.max_seq_len <= p.max_blocks_per_seq * kPage;
}

bool ValidDecode(const PagedDecodeParams& p) {
  return p.q && p.k_cache && p.v_cache && p.block_table && p.seq_lens && p.out &&
         ValidDecodeShape(p);
}

struct DecodeProbe {
  template <int D, typename Io>
  cudaError_t operator()() const {
    return cudaSuccess;
  }
};

struct DecodeWorkspaceSize {
  const PagedDecodeParams& p;
  size_t* bytes;
  template <int D, typename Io>
  cudaError_t operator()() const {
    DecodeSplit split;
    const cudaError_t err = PlanDecodeSplit<D, Io>(p, &split);
    if (err != cudaSuccess || split.num_splits == 1) return err;
    const size_t rows = static_cast<size_t>(p.batch) * p.num_q_heads;
    *bytes = rows * split.num_splits * (D + 1) * sizeof(float);
    return cudaSuccess;
  }
};

struct DecodeLaunch {
  const PagedDecodeParams& p;
  cudaStream_t stream;
  template <int D, typename Io>
  cudaError_t operator()() const {
    return LaunchDecode<D, Io>(p, stream);
  }
};

}  // namespace
}  // namespace attention_detail

bool PagedAttentionCanImplement(int head_dim, DType io_dtype, int group_size) {
  return group_size >= 1 && attention_detail::DispatchHeadDimIo(
                                head_dim, io_dtype, attention_detail::DecodeProbe{}) == cudaSuccess;
}

size_t PagedDecodeWorkspaceBytes(const PagedDecodeParams& p) {
  using namespace attention_detail;
  if (!ValidDecodeShape(p) || p.batch == 0) return 0;
  size_t bytes = 0;
  DispatchHeadDimIo(p.head_dim, p.io_dtype, DecodeWorkspaceSize{p, &bytes});
  return bytes;
}

cudaError_t PagedDecodeAttention(const PagedDecodeParams& p, cudaStream_t stream) {
  using namespace attention_detail;
  if (!ValidDecode(p)) return cudaErrorInvalidValue;
  if (p.batch == 0) return cudaSuccess;
  return DispatchHeadDimIo(p.head_dim, p.io_dtype, DecodeLaunch{p, stream});
}

}  // namespace asynctls::kernels::cuda
