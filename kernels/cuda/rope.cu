// Rotary position embedding, in place on q and k (Rope), or on the q and k heads that SplitQkv
// takes out of a fused q/k/v projection. Pair i of a head rotates by
// positions[t] * inv_freq[i]; kInterleaved pairs (2i, 2i+1), kHalf pairs (i, i + rotary_dim/2);
// dims >= rotary_dim pass through. Accurate sincosf (not __sincosf) and unfused multiplies so
// the result tracks the CPU reference to an ulp or two, even at large positions.
#include "asynctls/kernels/cuda_ops.h"
#include "dense_common.cuh"

namespace asynctls::kernels::cuda {
namespace {

using detail::Vec;

constexpr int kThreads = 128;

template <RopeStyle STYLE, bool VEC2>
__device__ __forceinline__ void RotatePair(float* head, int i, int half, float c, float s) {
  float x0, x1;
  if constexpr (STYLE == RopeStyle::kInterleaved && VEC2) {
    const Vec<float, 2> v = detail::LoadVec<float, 2>(head + 2 * i);
    x0 = v.v[0];
    x1 = v.v[1];
  } else {
    const int a = STYLE == RopeStyle::kInterleaved ? 2 * i : i;
    const int b = STYLE == RopeStyle::kInterleaved ? 2 * i + 1 : i + half;
    x0 = head[a];
    x1 = head[b];
  }
  const float y0 = __fsub_rn(__fmul_rn(x0, c), __fmul_rn(x1, s));
  const float y1 = __fadd_rn(__fmul_rn(x0, s), __fmul_rn(x1, c));
  if constexpr (STYLE == RopeStyle::kInterleaved && VEC2) {
    detail::StoreVec<float, 2>(head + 2 * i, Vec<float, 2>{{y0, y1}});
  } else {
    const int a = STYLE == RopeStyle::kInterleaved ? 2 * i : i;
    const int b = STYLE == RopeStyle::kInterleaved ? 2 * i + 1 : i + half;
    head[a] = y0;
    head[b] = y1;
  }
}

// The token's cos/sin table into shared memory: cos_sin[i] = cos, cos_sin[half + i] = sin of
// pair i's angle (one sincosf per thread; the caller syncs before reading it).
__device__ __forceinline__ void TokenCosSin(float pos, const float* inv_freq, int half,
                                            float* cos_sin) {
  for (int i = threadIdx.x; i < half; i += blockDim.x) {
    float s, c;
    sincosf(__fmul_rn(pos, inv_freq[i]), &s, &c);
    cos_sin[i] = c;
    cos_sin[half + i] = s;
  }
}

// Tier 1: one CTA per (token, group of kHeadsPerCta q/k heads). Each CTA computes the token's
// cos/sin table (rotary_dim/2 pairs, one sincosf per thread: at decode the table's sincosf at
// large arguments was most of the kernel) into shared memory, then its threads stride over
// (head, pair) of its heads. One CTA per token took 12 us per layer at batch 1 (Qwen3-8B shapes,
// H200): a single SM serialized 40 heads x 64 pairs behind 64 sincosf.
constexpr int kHeadsPerCta = 4;

template <RopeStyle STYLE, bool VEC2>
__global__ void __launch_bounds__(kThreads)
    RopeKernel(float* __restrict__ q, float* __restrict__ k, const int32_t* __restrict__ positions,
               const float* __restrict__ inv_freq, int num_q_heads, int num_kv_heads, int head_dim,
               int half) {
  extern __shared__ float cos_sin[];  // [half] cos, then [half] sin
  const int t = blockIdx.x;
  TokenCosSin(static_cast<float>(positions[t]), inv_freq, half, cos_sin);
  __syncthreads();
  const int h0 = blockIdx.y * kHeadsPerCta;
  const int heads = min(kHeadsPerCta, num_q_heads + num_kv_heads - h0);
  for (int item = threadIdx.x; item < heads * half; item += blockDim.x) {
    const int h = h0 + item / half, i = item % half;
    float* head = h < num_q_heads ? q + (int64_t{t} * num_q_heads + h) * head_dim
                                  : k + (int64_t{t} * num_kv_heads + (h - num_q_heads)) * head_dim;
    RotatePair<STYLE, VEC2>(head, i, half, cos_sin[i], cos_sin[half + i]);
  }
}

// Tier 2.
template <RopeStyle STYLE, bool VEC2>
cudaError_t LaunchRope(const RopeParams& p, cudaStream_t stream) {
  const int half = p.rotary_dim / 2;
  const size_t smem = sizeof(float) * 2 * half;
  const dim3 grid(p.num_tokens, (p.num_q_heads + p.num_kv_heads + kHeadsPerCta - 1) / kHeadsPerCta);
  RopeKernel<STYLE, VEC2><<<grid, kThreads, smem, stream>>>(
      p.q, p.k, p.positions, p.inv_freq, p.num_q_heads, p.num_kv_heads, p.head_dim, half);
  return cudaGetLastError();
}

// SplitQkv: one CTA per (token, kHeadsPerCta rows of its q | k | v heads), one warp per head
// row: the row from the fused projection to shared memory, RMS-normalized (q and k rows, when
// the weights are given; as RmsNormWarpKernel), rotated in shared memory by RotatePair with the
// token's cos/sin table (as RopeKernel), then stored to q, k or v.
constexpr int kMaxSplitHeadDim = 256;
static_assert(kThreads == 32 * kHeadsPerCta, "one warp per head row");

template <RopeStyle STYLE>
__global__ void __launch_bounds__(kThreads) SplitQkvKernel(const SplitQkvParams p, int half) {
  __shared__ float cos_sin[kMaxSplitHeadDim];  // [half] cos, then [half] sin
  __shared__ float rows[kHeadsPerCta][kMaxSplitHeadDim];
  const int t = blockIdx.x, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  TokenCosSin(static_cast<float>(p.positions[t]), p.inv_freq, half, cos_sin);
  __syncthreads();
  const int H = p.num_q_heads, KV = p.num_kv_heads, hd = p.head_dim;
  const int j = blockIdx.y * kHeadsPerCta + warp;
  if (j >= H + 2 * KV) return;
  const float* src = p.qkv + (int64_t{t} * (H + 2 * KV) + j) * hd;
  const bool is_q = j < H, is_k = !is_q && j < H + KV;
  float* dst = is_q   ? p.q + (int64_t{t} * H + j) * hd
               : is_k ? p.k + (int64_t{t} * KV + (j - H)) * hd
                      : p.v + (int64_t{t} * KV + (j - H - KV)) * hd;
  if (!is_q && !is_k) {
    for (int i = lane; i < hd; i += 32) dst[i] = src[i];
    return;
  }
  float* row = rows[warp];
  float sum_sq = 0.f;
  for (int i = lane; i < hd; i += 32) {
    const float x = src[i];
    row[i] = x;
    sum_sq += x * x;
  }
  const float* weight = is_q ? p.maybe_q_norm : p.maybe_k_norm;
  if (weight != nullptr) {
    sum_sq = detail::WarpSum(sum_sq);
    const float inv = 1.f / sqrtf(sum_sq / static_cast<float>(hd) + p.eps);
    for (int i = lane; i < hd; i += 32) row[i] = row[i] * inv * weight[i];
  }
  __syncwarp();
  for (int i = lane; i < half; i += 32) {
    RotatePair<STYLE, false>(row, i, half, cos_sin[i], cos_sin[half + i]);
  }
  __syncwarp();
  for (int i = lane; i < hd; i += 32) dst[i] = row[i];
}

}  // namespace

// Tier 3.
cudaError_t Rope(const RopeParams& p, cudaStream_t stream) {
  constexpr int kMaxRotaryDim = 8192;  // cos/sin table must fit the default 48 KB of smem
  if (p.num_tokens < 0 || p.num_q_heads < 0 || p.num_kv_heads < 0 || p.head_dim <= 0 ||
      p.rotary_dim <= 0 || p.rotary_dim % 2 != 0 || p.rotary_dim > p.head_dim ||
      p.rotary_dim > kMaxRotaryDim) {
    return cudaErrorInvalidValue;
  }
  if (p.num_tokens == 0 || p.num_q_heads + p.num_kv_heads == 0) return cudaSuccess;
  switch (p.style) {
    case RopeStyle::kInterleaved: {
      const bool vec2 = p.head_dim % 2 == 0 && detail::IsVecAligned<float, 2>(p.q) &&
                        detail::IsVecAligned<float, 2>(p.k);
      return vec2 ? LaunchRope<RopeStyle::kInterleaved, true>(p, stream)
                  : LaunchRope<RopeStyle::kInterleaved, false>(p, stream);
    }
    case RopeStyle::kHalf:
      return LaunchRope<RopeStyle::kHalf, false>(p, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

cudaError_t SplitQkv(const SplitQkvParams& p, cudaStream_t stream) {
  if (p.num_tokens < 0 || p.num_q_heads < 0 || p.num_kv_heads < 0 || p.head_dim <= 0 ||
      p.head_dim > kMaxSplitHeadDim || p.rotary_dim <= 0 || p.rotary_dim % 2 != 0 ||
      p.rotary_dim > p.head_dim || (p.maybe_q_norm == nullptr) != (p.maybe_k_norm == nullptr)) {
    return cudaErrorInvalidValue;
  }
  const int heads = p.num_q_heads + 2 * p.num_kv_heads;
  if (p.num_tokens == 0 || heads == 0) return cudaSuccess;
  const dim3 grid(p.num_tokens, (heads + kHeadsPerCta - 1) / kHeadsPerCta);
  switch (p.style) {
    case RopeStyle::kInterleaved:
      SplitQkvKernel<RopeStyle::kInterleaved><<<grid, kThreads, 0, stream>>>(p, p.rotary_dim / 2);
      break;
    case RopeStyle::kHalf:
      SplitQkvKernel<RopeStyle::kHalf><<<grid, kThreads, 0, stream>>>(p, p.rotary_dim / 2);
      break;
    default:
      return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

}  // namespace asynctls::kernels::cuda
