// Paged chunked causal prefill attention, flash-attention style:
//
//   grid (query head, query tile of 64 rows, sequence); 4 warps per CTA, 16 query rows each.
//   The CTA walks the key tiles (64 keys = one cache block) that its rows can see, through a
//   two-stage cp.async ring of (K page, V page) tiles in swizzled shared memory. Each warp does
//   S = Q K^T (16 x 64) and O += P V on tensor cores (mma.sync bf16 m16n8k16, fp32 accumulation)
//   with an online softmax in registers; Q stays in registers as A fragments for the whole walk.
//   Tiles past the diagonal are never loaded; only the tiles that straddle it are masked.
//
// Query heads of one KV group are adjacent in blockIdx.x, so the G CTAs that read the same K/V
// run together and share it through L2; query tiles run last-first, the longest walks first.
#include <cuda_runtime.h>

#include "asynctls/kernels/cuda_attention.h"
#include "paged_attention_common.cuh"

namespace asynctls::kernels::cuda {
namespace attention_detail {
namespace {

inline constexpr int kPrefillThreads = 128;
inline constexpr int kPrefillRows = 64;  // query rows per CTA (16 per warp)

template <int D>
struct PrefillConfig {
  static constexpr int kStages = 2;
  static constexpr int kTileBytes = kPage * D * 2;
  static constexpr int kQueryBytes = kPrefillRows * D * 2;
  static constexpr int kSmemBytes = kStages * 2 * kTileBytes + kQueryBytes;
};

template <int D, typename Io>
__global__ void __launch_bounds__(kPrefillThreads, 2)
    PagedPrefillKernel(const PagedPrefillParams p) {
  using Cfg = PrefillConfig<D>;
  using T = typename Io::T;
  extern __shared__ __align__(128) uint8_t smem[];

  const int head = blockIdx.x;
  const int q_tile = gridDim.y - 1 - blockIdx.y;
  const int b = blockIdx.z;
  const int q_begin = p.cu_q_lens[b];
  const int q_len = p.cu_q_lens[b + 1] - q_begin;
  const int m0 = q_tile * kPrefillRows;
  if (m0 >= q_len) return;
  const int seq_len = p.seq_lens[b];
  const int first_pos = seq_len - q_len;  // position of chunk row 0
  const int rows = min(kPrefillRows, q_len - m0);
  const int num_keys = first_pos + m0 + rows;  // keys the last valid row sees
  const int num_tiles = (num_keys + kPage - 1) / kPage;
  const int group = p.num_q_heads / p.num_kv_heads;
  const int kv_head = head / group;

  const int tid = threadIdx.x, warp = tid / kWarpSize, lane = tid % kWarpSize;
  const uint32_t ring = SmemAddr(smem);
  uint8_t* q_tile_smem = smem + Cfg::kStages * 2 * Cfg::kTileBytes;
  const int32_t* table = p.block_table + static_cast<int64_t>(b) * p.max_blocks_per_seq;
  const auto* k_cache = static_cast<const __nv_bfloat16*>(p.k_cache);
  const auto* v_cache = static_cast<const __nv_bfloat16*>(p.v_cache);

  auto load_tile = [&](int t, int block) {
    const int stage = t % Cfg::kStages;
    const int64_t off = (static_cast<int64_t>(block) * p.num_kv_heads + kv_head) * (kPage * D);
    const int valid = min(kPage, seq_len - t * kPage);
    const uint32_t k_tile = ring + stage * 2 * Cfg::kTileBytes;
    LoadPageAsync<D, kPrefillThreads>(k_tile, k_cache + off, valid, tid);
    LoadPageAsync<D, kPrefillThreads>(k_tile + Cfg::kTileBytes, v_cache + off, valid, tid);
  };

#pragma unroll
  for (int s = 0; s < Cfg::kStages - 1; ++s) {
    if (s < num_tiles) load_tile(s, table[s]);
    CpAsyncCommit();
  }
  // Block id of the next tile to load, read one iteration early (no stall on the table).
  int next_block = Cfg::kStages - 1 < num_tiles ? table[Cfg::kStages - 1] : 0;

  const T* q = static_cast<const T*>(p.q);
  const int64_t q_row_stride = static_cast<int64_t>(p.num_q_heads) * D;
  const T* q0 =
      q + (static_cast<int64_t>(q_begin) + m0) * q_row_stride + static_cast<int64_t>(head) * D;
  StoreQueryTile<D, kPrefillRows, kPrefillThreads, Io>(
      q_tile_smem, [&](int r) { return q0 + r * q_row_stride; }, rows, p.scale * kLog2e, tid);
  __syncthreads();
  uint32_t qa[D / 16][4];
  LoadRowFragments<D>(qa, SmemAddr(q_tile_smem), warp * 16, lane);

  float o[D / 8][4];
#pragma unroll
  for (int n = 0; n < D / 8; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.f;
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};
  const int g = lane / 4, tig = lane % 4;
  // Positions of this thread's two rows and the warp's first / last row.
  const int warp_pos0 = first_pos + m0 + warp * 16;
  const int pos[2] = {warp_pos0 + g, warp_pos0 + g + 8};

  for (int t = 0; t < num_tiles; ++t) {
    CpAsyncWait<Cfg::kStages - 2>();
    __syncthreads();
    if (t + Cfg::kStages - 1 < num_tiles) {
      load_tile(t + Cfg::kStages - 1, next_block);
      if (t + Cfg::kStages < num_tiles) next_block = table[t + Cfg::kStages];
    }
    CpAsyncCommit();

    const int key0 = t * kPage;
    // Warp-uniform skips: rows past the chunk, or a tile wholly above this warp's diagonal.
    if (m0 + warp * 16 >= q_len || key0 > warp_pos0 + 15) continue;
    const uint32_t k_tile = ring + (t % Cfg::kStages) * 2 * Cfg::kTileBytes;
    float s[kPage / 8][4];
#pragma unroll
    for (int j = 0; j < kPage / 8; ++j) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.f;
    ScoreTile<D, kPage / 8>(s, qa, k_tile, 0, lane);
    if (key0 + kPage - 1 > warp_pos0) {  // straddles the diagonal (or the end of the cache)
#pragma unroll
      for (int j = 0; j < kPage / 8; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e)
          if (key0 + j * 8 + 2 * tig + (e & 1) > pos[e >> 1]) s[j][e] = -INFINITY;
    }
    OnlineSoftmax<D, kPage / 8>(s, o, m, l);
    AccumulateValues<D, kPage / 8>(o, s, k_tile + Cfg::kTileBytes, 0, lane);
  }
  CpAsyncWait<0>();

  l[0] = QuadSum(l[0]);
  l[1] = QuadSum(l[1]);
  const float inv[2] = {1.f / l[0], 1.f / l[1]};
  T* out = static_cast<T*>(p.out);
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = m0 + warp * 16 + g + 8 * r;
    if (row >= q_len) continue;
    T* dst = out + (static_cast<int64_t>(q_begin) + row) * q_row_stride +
             static_cast<int64_t>(head) * D + 2 * tig;
#pragma unroll
    for (int n = 0; n < D / 8; ++n) {
      Io::Store2(dst + n * 8, o[n][2 * r] * inv[r], o[n][2 * r + 1] * inv[r]);
    }
  }
}

template <int D, typename Io>
cudaError_t LaunchPrefill(const PagedPrefillParams& p, cudaStream_t stream) {
  KernelResidency res;
  const cudaError_t err =
      PrepareKernel<PagedPrefillKernel<D, Io>, kPrefillThreads, PrefillConfig<D>::kSmemBytes>(&res);
  if (err != cudaSuccess) return err;
  const dim3 grid(p.num_q_heads, (p.max_q_len + kPrefillRows - 1) / kPrefillRows, p.batch);
  PagedPrefillKernel<D, Io><<<grid, kPrefillThreads, PrefillConfig<D>::kSmemBytes, stream>>>(p);
  return cudaGetLastError();
}

bool ValidPrefill(const PagedPrefillParams& p) {
  return p.q && p.cu_q_lens && p.k_cache && p.v_cache && p.block_table && p.seq_lens && p.out &&
         p.batch >= 0 && p.batch <= 65535 && p.num_kv_heads > 0 && p.num_q_heads > 0 &&
         p.num_q_heads % p.num_kv_heads == 0 && p.max_blocks_per_seq > 0 && p.max_q_len >= 0 &&
         (p.max_q_len + kPrefillRows - 1) / kPrefillRows <= 65535;
}

struct PrefillLaunch {
  const PagedPrefillParams& p;
  cudaStream_t stream;
  template <int D, typename Io>
  cudaError_t operator()() const {
    return LaunchPrefill<D, Io>(p, stream);
  }
};

}  // namespace
}  // namespace attention_detail

cudaError_t PagedPrefillAttention(const PagedPrefillParams& p, cudaStream_t stream) {
  using namespace attention_detail;
  if (!ValidPrefill(p)) return cudaErrorInvalidValue;
  if (p.batch == 0 || p.max_q_len == 0 || p.num_tokens == 0) return cudaSuccess;
  return DispatchHeadDimIo(p.head_dim, p.io_dtype, PrefillLaunch{p, stream});
}

}  // namespace asynctls::kernels::cuda
