// SwiGLU activation: out[r, i] = silu(gate_up[r, i]) * gate_up[r, dim + i], in fp32 or (for
// the next bf16 GEMM) bf16.
#include "asynctls/kernels/cuda_ops.h"
#include "dense_common.cuh"

namespace asynctls::kernels::cuda {
namespace {

using detail::Vec;

constexpr int kThreads = 256;

// Tier 1: grid-stride over rows * dim / VEC pieces.
template <typename OutT, int VEC>
__global__ void __launch_bounds__(kThreads)
    SiluMulKernel(const float* __restrict__ gate_up, OutT* __restrict__ out, int rows, int dim) {
  const int pieces_per_row = dim / VEC;
  const int64_t total = int64_t{rows} * pieces_per_row;
  for (int64_t idx = int64_t{blockIdx.x} * blockDim.x + threadIdx.x; idx < total;
       idx += int64_t{gridDim.x} * blockDim.x) {
    const int64_t r = idx / pieces_per_row;
    const int c = static_cast<int>(idx % pieces_per_row) * VEC;
    const float* row = gate_up + r * 2 * dim;
    const Vec<float, VEC> g = detail::LoadVec<float, VEC>(row + c);
    const Vec<float, VEC> u = detail::LoadVec<float, VEC>(row + dim + c);
    Vec<float, VEC> o;
#pragma unroll
    for (int j = 0; j < VEC; ++j) o.v[j] = g.v[j] / (1.f + expf(-g.v[j])) * u.v[j];
    detail::StoreVecAs<OutT, VEC>(out + r * dim + c, o);
  }
}

// Tier 2.
template <typename OutT, int VEC>
cudaError_t LaunchSiluMul(const SiluMulParams& p, OutT* out, cudaStream_t stream) {
  const unsigned blocks = detail::GridFor(int64_t{p.rows} * (p.dim / VEC), kThreads);
  SiluMulKernel<OutT, VEC><<<blocks, kThreads, 0, stream>>>(p.gate_up, out, p.rows, p.dim);
  return cudaGetLastError();
}

template <typename OutT>
cudaError_t DispatchSiluMul(const SiluMulParams& p, OutT* out, cudaStream_t stream) {
  if (p.dim % 4 == 0 && detail::IsVecAligned<float, 4>(p.gate_up) &&
      detail::IsVecAligned<OutT, 4>(out)) {
    return LaunchSiluMul<OutT, 4>(p, out, stream);
  }
  return LaunchSiluMul<OutT, 1>(p, out, stream);
}

}  // namespace

// Tier 3.
cudaError_t SiluMul(const SiluMulParams& p, cudaStream_t stream) {
  if (p.rows < 0 || p.dim <= 0) return cudaErrorInvalidValue;
  if (p.rows == 0) return cudaSuccess;
  return p.maybe_out_bf16 ? DispatchSiluMul(p, p.maybe_out_bf16, stream)
                          : DispatchSiluMul(p, p.out, stream);
}

}  // namespace asynctls::kernels::cuda
