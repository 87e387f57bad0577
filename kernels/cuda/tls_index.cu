// CUDA TLS index ops: channel calibration statistics and selection, block index (key max/min)
// and INT4 token index updates.
#include <cuda_bf16.h>

#include "asynctls/kernels/cuda_tls.h"
#include "tls_common.cuh"

namespace asynctls::kernels::cuda {
namespace {

using tls_detail::Bf16BitsToFloat;
using tls_detail::LoadIo;

// ---- calibration ------------------------------------------------------------------------

// grid (ceil(columns / 256), token chunks); |x| >= 0, so float order equals int order.
__global__ void CalibStatsKernel(const void* x, float* absmax, DType dtype, int num_tokens,
                                 int columns, int tokens_per_chunk) {
  const int col = blockIdx.x * blockDim.x + threadIdx.x;
  if (col >= columns) return;
  const int t0 = blockIdx.y * tokens_per_chunk;
  const int t1 = min(num_tokens, t0 + tokens_per_chunk);
  float m = 0.f;
  for (int t = t0; t < t1; ++t) {
    const float v = fabsf(LoadIo(x, dtype, int64_t{t} * columns + col));
    if (v > m) m = v;  // NaN never wins, as in the reference
  }
  atomicMax(reinterpret_cast<int*>(absmax + col), __float_as_int(m));
}

// One block per KV head. O(head_dim^2) ranking: head_dim is at most a few hundred.
__global__ void CalibSelectKernel(TlsCalibSelectParams p) {
  extern __shared__ uint64_t keys[];  // [head_dim], then int ranks[head_dim]
  int* ranks = reinterpret_cast<int*>(keys + p.head_dim);
  const int g = blockIdx.x;
  const int group = p.num_q_heads / p.num_kv_heads;
  for (int i = threadIdx.x; i < p.head_dim; i += blockDim.x) {
    float sum = 0.f;
    for (int h = g * group; h < (g + 1) * group; ++h) {
      sum = __fadd_rn(sum, p.q_absmax[int64_t{h} * p.head_dim + i]);
    }
    const float score = __fmul_rn(__fdiv_rn(sum, static_cast<float>(group)),
                                  p.k_absmax[int64_t{g} * p.head_dim + i]);
    keys[i] = TlsSelectKey(score, i);
    if (p.maybe_channel_scores) p.maybe_channel_scores[int64_t{g} * p.head_dim + i] = score;
  }
  __syncthreads();
  for (int i = threadIdx.x; i < p.head_dim; i += blockDim.x) {
    int rank = 0;
    for (int j = 0; j < p.head_dim; ++j) rank += keys[j] > keys[i] ? 1 : 0;
    ranks[i] = rank;
  }
  __syncthreads();
  for (int i = threadIdx.x; i < p.head_dim; i += blockDim.x) {
    if (ranks[i] >= p.num_channels) continue;
    int slot = 0;  // selected channels below i
    for (int j = 0; j < i; ++j) slot += ranks[j] < p.num_channels ? 1 : 0;
    p.channels[int64_t{g} * p.num_channels + slot] = i;
  }
}

// ---- index update -----------------------------------------------------------------------

constexpr int kIndexThreads = 128;

// The bf16 block index row `index_row` merged with tokens [tok_lo, tok_hi) of the block whose
// K rows start at `block_k` (re-initialised when tok_lo opens the block): a thread per dim.
__device__ __forceinline__ void UpdateBf16BlockRow(const TlsIndexUpdateParams& p,
                                                   const uint16_t* block_k, int tok_lo, int tok_hi,
                                                   bool fresh, int64_t index_row) {
  uint16_t* kmax = static_cast<uint16_t*>(p.block_kmax) + index_row * p.head_dim;
  uint16_t* kmin = static_cast<uint16_t*>(p.block_kmin) + index_row * p.head_dim;
  for (int d = threadIdx.x; d < p.head_dim; d += blockDim.x) {
    uint16_t mx = kmax[d], mn = kmin[d];
    for (int t = tok_lo; t < tok_hi; ++t) {
      const uint16_t bits = block_k[int64_t{t % kKvBlockSize} * p.head_dim + d];
      const float v = Bf16BitsToFloat(bits);
      if (fresh && t == tok_lo) {
        mx = bits;
        mn = bits;
      } else {
        if (v > Bf16BitsToFloat(mx)) mx = bits;
        if (v < Bf16BitsToFloat(mn)) mn = bits;
      }
    }
    kmax[d] = mx;
    kmin[d] = mn;
  }
}

// ---- int8 block index rows (tls_params.h) ----
// The reference rebuilds an open block's row from all its K rows at every append (a larger
// absmax re-codes the row). Codes are monotone in the key at a fixed scale and the scale is
// monotone in the absmax, so while an append's rows do not raise the scale, taking the max / min
// of the row's codes and theirs gives the rebuild's codes bit for bit: only appends that raise
// it (a few per block) read the block's earlier rows again.
constexpr int kInt8IndexThreads = 256;
constexpr int kIndexMaxDim = 576;
constexpr int kIndexVec = 8;  // dims per 16-byte K load

struct Int8RowShared {
  float mx[kIndexMaxDim], mn[kIndexMaxDim];  // the rows' per-dim max / min
  // Per (row lane, dim) partials: lanes * head_dim <= threads * kIndexVec.
  float part_mx[kInt8IndexThreads * kIndexVec], part_mn[kInt8IndexThreads * kIndexVec];
  uint32_t absmax_bits[2];  // of the appended rows, then of the earlier ones (|x| orders as bits)
};

// Per-dim max / min (TlsBlockIndexMax / Min) of K rows [r0, r1) of a block (`k`: its row 0), into
// sh.mx / sh.mn, or merged with them when `merge`; their absmax (NaNs skipped) into
// sh.absmax_bits[slot]. Thread t loads dim vector t % cols of rows t / cols, + lanes, ..., so each
// thread has several independent 16-byte loads in flight (one thread per dim walked a chain of up
// to 64 dependent loads); the lanes' partials meet in shared memory. Ends with the CTA in step.
__device__ void BlockRowsMaxMin(const uint16_t* k, int head_dim, int r0, int r1, bool merge,
                                int slot, Int8RowShared& sh) {
  const int cols = head_dim / kIndexVec, lanes = blockDim.x / cols;
  const int col = threadIdx.x % cols, lane = threadIdx.x / cols;
  uint32_t local = 0u;
  if (lane < lanes) {
    float mx[kIndexVec], mn[kIndexVec];
#pragma unroll
    for (int i = 0; i < kIndexVec; ++i) {
      mx[i] = -INFINITY;  // identities of TlsBlockIndexMax / Min
      mn[i] = INFINITY;
    }
#pragma unroll 8
    for (int r = r0 + lane; r < r1; r += lanes) {
      const uint4 w = *reinterpret_cast<const uint4*>(k + int64_t{r} * head_dim + col * kIndexVec);
      const uint32_t words[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
      for (int i = 0; i < kIndexVec; ++i) {
        const float v =
            __uint_as_float(i % 2 == 0 ? words[i / 2] << 16 : words[i / 2] & 0xffff0000u);
        mx[i] = TlsBlockIndexMax(mx[i], v);
        mn[i] = TlsBlockIndexMin(mn[i], v);
        local = max(local, __float_as_uint(TlsBlockIndexAbs(v)));
      }
    }
#pragma unroll
    for (int i = 0; i < kIndexVec; ++i) {
      sh.part_mx[lane * head_dim + col * kIndexVec + i] = mx[i];
      sh.part_mn[lane * head_dim + col * kIndexVec + i] = mn[i];
    }
  }
  local = __reduce_max_sync(0xffffffffu, local);
  if ((threadIdx.x & 31) == 0) atomicMax(&sh.absmax_bits[slot], local);
  __syncthreads();
  for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
    float mx = merge ? sh.mx[d] : sh.part_mx[d], mn = merge ? sh.mn[d] : sh.part_mn[d];
    for (int l = merge ? 0 : 1; l < lanes; ++l) {
      mx = TlsBlockIndexMax(mx, sh.part_mx[l * head_dim + d]);
      mn = TlsBlockIndexMin(mn, sh.part_mn[l * head_dim + d]);
    }
    sh.mx[d] = mx;
    sh.mn[d] = mn;
  }
  __syncthreads();
}

// The int8 row `index_row` after K rows [r0, r1) of its block were appended (`fresh`: r0 opens
// the block): their codes merged into the row when they keep its scale, else the row rebuilt from
// rows [0, r1).
__device__ __forceinline__ void UpdateInt8BlockRow(const TlsIndexUpdateParams& p,
                                                   const uint16_t* block_k, int r0, int r1,
                                                   bool fresh, int64_t index_row) {
  __shared__ Int8RowShared sh;
  if (threadIdx.x < 2) sh.absmax_bits[threadIdx.x] = 0u;
  __syncthreads();
  BlockRowsMaxMin(block_k, p.head_dim, r0, r1, /*merge=*/false, 0, sh);
  int8_t* kmax = static_cast<int8_t*>(p.block_kmax) + index_row * p.head_dim;
  int8_t* kmin = static_cast<int8_t*>(p.block_kmin) + index_row * p.head_dim;
  if (!fresh) {
    const float row_scale = p.maybe_block_scales[index_row];
    if (TlsBlockIndexScale(__uint_as_float(sh.absmax_bits[0])) <= row_scale) {
      for (int d = threadIdx.x; d < p.head_dim; d += blockDim.x) {
        kmax[d] = static_cast<int8_t>(max(int{kmax[d]}, TlsBlockMaxCode(sh.mx[d], row_scale)));
        kmin[d] = static_cast<int8_t>(min(int{kmin[d]}, TlsBlockMinCode(sh.mn[d], row_scale)));
      }
      return;
    }
    BlockRowsMaxMin(block_k, p.head_dim, 0, r0, /*merge=*/true, 1, sh);
  }
  const float scale =
      TlsBlockIndexScale(__uint_as_float(max(sh.absmax_bits[0], sh.absmax_bits[1])));
  for (int d = threadIdx.x; d < p.head_dim; d += blockDim.x) {
    kmax[d] = static_cast<int8_t>(TlsBlockMaxCode(sh.mx[d], scale));
    kmin[d] = static_cast<int8_t>(TlsBlockMinCode(sh.mn[d], scale));
  }
  if (threadIdx.x == 0) p.maybe_block_scales[index_row] = scale;
}

// grid (touched block slots, num_kv_heads, batch), kIndexThreads (INT8: kInt8IndexThreads) per
// CTA. Block index over the head dims, then one warp per token for the token index.
template <int NC, bool INT8>
__global__ void __launch_bounds__(INT8 ? kInt8IndexThreads : kIndexThreads)
    IndexUpdateKernel(TlsIndexUpdateParams p) {
  const int b = blockIdx.z, g = blockIdx.y;
  const int begin = p.start_pos[b], end = p.seq_lens[b];
  if (begin >= end) return;
  const int logical = begin / kKvBlockSize + blockIdx.x;
  const int tok_lo = max(begin, logical * kKvBlockSize);
  const int tok_hi = min(end, (logical + 1) * kKvBlockSize);
  if (tok_lo >= tok_hi) return;
  const int64_t pool_block = p.block_table[int64_t{b} * p.max_blocks_per_seq + logical];
  const int64_t row = p.index_table[int64_t{b} * p.max_blocks_per_seq + logical];
  const uint16_t* k_cache = static_cast<const uint16_t*>(p.k_cache);
  const int64_t kbase = ((pool_block * p.num_kv_heads + g) * kKvBlockSize) * p.head_dim;
  const bool fresh = tok_lo % kKvBlockSize == 0;
  if constexpr (INT8) {
    UpdateInt8BlockRow(p, k_cache + kbase, tok_lo - logical * kKvBlockSize,
                       tok_hi - logical * kKvBlockSize, fresh, row * p.num_kv_heads + g);
  } else {
    UpdateBf16BlockRow(p, k_cache + kbase, tok_lo, tok_hi, fresh, row * p.num_kv_heads + g);
  }
  if constexpr (NC > 0) {
    if (p.maybe_token_codes == nullptr) return;
    constexpr int kPerLane = (NC + 31) / 32;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int32_t* channels = p.channels + int64_t{g} * NC;
    for (int t = tok_lo + warp; t < tok_hi; t += blockDim.x / 32) {
      const int64_t krow = kbase + int64_t{t % kKvBlockSize} * p.head_dim;
      float v[kPerLane];
      float absmax = 0.f;
#pragma unroll
      for (int i = 0; i < kPerLane; ++i) {
        const int c = lane + 32 * i;
        v[i] = c < NC ? Bf16BitsToFloat(k_cache[krow + channels[c]]) : 0.f;
        absmax = fmaxf(absmax, fabsf(v[i]));
      }
#pragma unroll
      for (int o = 16; o > 0; o >>= 1)
        absmax = fmaxf(absmax, __shfl_xor_sync(0xffffffffu, absmax, o));
      const float scale = TlsInt4Scale(absmax);
      const int64_t tok = (row * p.num_kv_heads + g) * kKvBlockSize + t % kKvBlockSize;
      if (lane == 0) p.maybe_token_scales[tok] = scale;
      uint8_t* codes = p.maybe_token_codes + tok * (NC / 2);
#pragma unroll
      for (int i = 0; i < kPerLane; ++i) {
        const int c = lane + 32 * i;
        const int nibble = TlsInt4Code(v[i], scale) + 8;
        const int next = __shfl_down_sync(0xffffffffu, nibble, 1);
        if (c < NC && (c & 1) == 0) codes[c / 2] = static_cast<uint8_t>(nibble | (next << 4));
      }
    }
  }
}

template <int NC>
cudaError_t LaunchIndexUpdate(const TlsIndexUpdateParams& p, cudaStream_t stream) {
  const int slots = (p.max_new_tokens + kKvBlockSize - 1) / kKvBlockSize + 1;
  const dim3 grid(slots, p.num_kv_heads, p.batch);
  if (p.maybe_block_scales != nullptr) {
    IndexUpdateKernel<NC, true><<<grid, kInt8IndexThreads, 0, stream>>>(p);
  } else {
    IndexUpdateKernel<NC, false><<<grid, kIndexThreads, 0, stream>>>(p);
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t TlsCalibStats(const TlsCalibStatsParams& p, cudaStream_t stream) {
  if (p.num_tokens <= 0) return cudaSuccess;
  constexpr int kTokensPerChunk = 64;
  const int chunks = (p.num_tokens + kTokensPerChunk - 1) / kTokensPerChunk;
  if (chunks > 65535) return cudaErrorInvalidValue;
  const int q_cols = p.num_q_heads * p.head_dim, k_cols = p.num_kv_heads * p.head_dim;
  CalibStatsKernel<<<dim3((q_cols + 255) / 256, chunks), 256, 0, stream>>>(
      p.q, p.q_absmax, p.io_dtype, p.num_tokens, q_cols, kTokensPerChunk);
  CalibStatsKernel<<<dim3((k_cols + 255) / 256, chunks), 256, 0, stream>>>(
      p.k, p.k_absmax, p.io_dtype, p.num_tokens, k_cols, kTokensPerChunk);
  return cudaGetLastError();
}

cudaError_t TlsCalibSelect(const TlsCalibSelectParams& p, cudaStream_t stream) {
  if (p.num_kv_heads <= 0 || p.num_q_heads % p.num_kv_heads != 0 || p.num_channels <= 0 ||
      p.num_channels > p.head_dim || p.head_dim > 4096) {
    return cudaErrorInvalidValue;
  }
  CalibSelectKernel<<<p.num_kv_heads, 256, p.head_dim*(sizeof(uint64_t) + sizeof(int)), stream>>>(
      p);
  return cudaGetLastError();
}

cudaError_t TlsIndexUpdate(const TlsIndexUpdateParams& p, cudaStream_t stream) {
  if (p.batch <= 0 || p.max_new_tokens <= 0) return cudaSuccess;
  if (p.head_dim <= 0 || p.num_kv_heads <= 0) return cudaErrorInvalidValue;
  if (p.maybe_block_scales != nullptr &&
      (p.head_dim > kIndexMaxDim || p.head_dim % kIndexVec != 0)) {
    return cudaErrorInvalidValue;
  }
  if (p.maybe_token_codes == nullptr) return LaunchIndexUpdate<0>(p, stream);
  switch (p.num_channels) {
    case 16:
      return LaunchIndexUpdate<16>(p, stream);
    case 32:
      return LaunchIndexUpdate<32>(p, stream);
    case 64:
      return LaunchIndexUpdate<64>(p, stream);
    case 128:
      return LaunchIndexUpdate<128>(p, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace asynctls::kernels::cuda
