// RMSNorm: out[r, :] = x[r, :] / sqrt(mean(x[r, :]^2) + eps) * weight[:]; out may alias x. An
// fp32 out, or bf16 (maybe_out_bf16: the next GEMM's input, rounded as its conversion would).
// Short rows (<= kWarpRowMaxDim, e.g. Qwen3's per-head q/k norm) take one warp per row; longer
// rows one CTA per row with a block reduction.
#include "asynctls/kernels/cuda_ops.h"
#include "dense_common.cuh"

namespace asynctls::kernels::cuda {
namespace {

using detail::Vec;

constexpr int kWarpRowMaxDim = 256;
constexpr int kWarpsPerCta = 4;

// Tier 1a: one warp per row. x and out are not __restrict__: they may alias. Each lane reads
// and later writes the same elements, so in-place is safe.
template <typename OutT, int VEC>
__global__ void __launch_bounds__(kWarpsPerCta * 32)
    RmsNormWarpKernel(const float* x, const float* __restrict__ weight, OutT* out, int rows,
                      int dim, float eps) {
  const int row = blockIdx.x * kWarpsPerCta + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= rows) return;
  const float* xr = x + int64_t{row} * dim;
  OutT* outr = out + int64_t{row} * dim;
  float sum_sq = 0.f;
  for (int i = lane * VEC; i < dim; i += 32 * VEC) {
    const Vec<float, VEC> v = detail::LoadVec<float, VEC>(xr + i);
#pragma unroll
    for (int j = 0; j < VEC; ++j) sum_sq += v.v[j] * v.v[j];
  }
  sum_sq = detail::WarpSum(sum_sq);
  const float inv = 1.f / sqrtf(sum_sq / static_cast<float>(dim) + eps);
  for (int i = lane * VEC; i < dim; i += 32 * VEC) {
    Vec<float, VEC> v = detail::LoadVec<float, VEC>(xr + i);
    const Vec<float, VEC> w = detail::LoadVec<float, VEC>(weight + i);
#pragma unroll
    for (int j = 0; j < VEC; ++j) v.v[j] = v.v[j] * inv * w.v[j];
    detail::StoreVecAs<OutT, VEC>(outr + i, v);
  }
}

// Tier 1b: one CTA per row; warp sums, then the first warp sums the warp partials.
template <typename OutT, int VEC, int THREADS>
__global__ void __launch_bounds__(THREADS)
    RmsNormBlockKernel(const float* x, const float* __restrict__ weight, OutT* out, int dim,
                       float eps) {
  static_assert(THREADS % 32 == 0 && THREADS <= 1024);
  __shared__ float warp_sums[THREADS / 32];
  __shared__ float inv_shared;
  const float* xr = x + int64_t{blockIdx.x} * dim;
  OutT* outr = out + int64_t{blockIdx.x} * dim;
  float sum_sq = 0.f;
  for (int i = threadIdx.x * VEC; i < dim; i += THREADS * VEC) {
    const Vec<float, VEC> v = detail::LoadVec<float, VEC>(xr + i);
#pragma unroll
    for (int j = 0; j < VEC; ++j) sum_sq += v.v[j] * v.v[j];
  }
  sum_sq = detail::WarpSum(sum_sq);
  if (threadIdx.x % 32 == 0) warp_sums[threadIdx.x / 32] = sum_sq;
  __syncthreads();
  if (threadIdx.x < 32) {
    float s = threadIdx.x < THREADS / 32 ? warp_sums[threadIdx.x] : 0.f;
    s = detail::WarpSum(s);
    if (threadIdx.x == 0) inv_shared = 1.f / sqrtf(s / static_cast<float>(dim) + eps);
  }
  __syncthreads();
  const float inv = inv_shared;
  for (int i = threadIdx.x * VEC; i < dim; i += THREADS * VEC) {
    Vec<float, VEC> v = detail::LoadVec<float, VEC>(xr + i);
    const Vec<float, VEC> w = detail::LoadVec<float, VEC>(weight + i);
#pragma unroll
    for (int j = 0; j < VEC; ++j) v.v[j] = v.v[j] * inv * w.v[j];
    detail::StoreVecAs<OutT, VEC>(outr + i, v);
  }
}

// Tier 2.
template <typename OutT, int VEC>
cudaError_t LaunchRmsNorm(const RmsNormParams& p, OutT* out, cudaStream_t stream) {
  if (p.dim <= kWarpRowMaxDim) {
    const unsigned blocks = static_cast<unsigned>(detail::CeilDiv(p.rows, kWarpsPerCta));
    RmsNormWarpKernel<OutT, VEC>
        <<<blocks, kWarpsPerCta * 32, 0, stream>>>(p.x, p.weight, out, p.rows, p.dim, p.eps);
  } else if (p.dim / VEC <= 512) {
    RmsNormBlockKernel<OutT, VEC, 128>
        <<<p.rows, 128, 0, stream>>>(p.x, p.weight, out, p.dim, p.eps);
  } else {
    RmsNormBlockKernel<OutT, VEC, 256>
        <<<p.rows, 256, 0, stream>>>(p.x, p.weight, out, p.dim, p.eps);
  }
  return cudaGetLastError();
}

template <typename OutT>
cudaError_t DispatchRmsNorm(const RmsNormParams& p, OutT* out, cudaStream_t stream) {
  if (p.dim % 4 == 0 && detail::IsVecAligned<float, 4>(p.x) &&
      detail::IsVecAligned<float, 4>(p.weight) && detail::IsVecAligned<OutT, 4>(out)) {
    return LaunchRmsNorm<OutT, 4>(p, out, stream);
  }
  return LaunchRmsNorm<OutT, 1>(p, out, stream);
}

}  // namespace

// Tier 3.
cudaError_t RmsNorm(const RmsNormParams& p, cudaStream_t stream) {
  if (p.rows < 0 || p.dim <= 0) return cudaErrorInvalidValue;
  if (p.rows == 0) return cudaSuccess;
  return p.maybe_out_bf16 ? DispatchRmsNorm(p, p.maybe_out_bf16, stream)
                          : DispatchRmsNorm(p, p.out, stream);
}

}  // namespace asynctls::kernels::cuda
