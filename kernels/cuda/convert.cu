// fp32 -> bf16 conversion (round to nearest even, NaN stays NaN), bit-identical to the host's
// FloatToBf16.
#include "asynctls/kernels/cuda_ops.h"
#include "dense_common.cuh"

namespace asynctls::kernels::cuda {
namespace {

using detail::Vec;

constexpr int kThreads = 256;

// Tier 1: VEC-wide pieces grid-stride; the count % VEC tail is done by the first threads.
template <int VEC>
__global__ void __launch_bounds__(kThreads)
    ConvertF32ToBf16Kernel(const float* __restrict__ in, Bf16* __restrict__ out, int64_t count) {
  const int64_t pieces = count / VEC;
  const int64_t tid = int64_t{blockIdx.x} * blockDim.x + threadIdx.x;
  for (int64_t i = tid; i < pieces; i += int64_t{gridDim.x} * blockDim.x) {
    const Vec<float, VEC> x = detail::LoadVec<float, VEC>(in + i * VEC);
    Vec<Bf16, VEC> y;
#pragma unroll
    for (int j = 0; j < VEC; ++j) y.v[j] = FloatToBf16(x.v[j]);
    detail::StoreVec<Bf16, VEC>(out + i * VEC, y);
  }
  const int64_t tail = pieces * VEC + tid;
  if (tail < count && tid < VEC) out[tail] = FloatToBf16(in[tail]);
}

// Tier 2.
template <int VEC>
cudaError_t LaunchConvert(const float* in, Bf16* out, int64_t count, cudaStream_t stream) {
  const int64_t pieces = count / VEC;
  ConvertF32ToBf16Kernel<VEC>
      <<<detail::GridFor(pieces > 0 ? pieces : 1, kThreads), kThreads, 0, stream>>>(in, out, count);
  return cudaGetLastError();
}

}  // namespace

// Tier 3.
cudaError_t ConvertF32ToBf16(const float* in, void* out_bf16, int64_t count, cudaStream_t stream) {
  if (count < 0) return cudaErrorInvalidValue;
  if (count == 0) return cudaSuccess;
  Bf16* out = static_cast<Bf16*>(out_bf16);
  if (detail::IsVecAligned<float, 4>(in) && detail::IsVecAligned<Bf16, 4>(out)) {
    return LaunchConvert<4>(in, out, count, stream);
  }
  return LaunchConvert<1>(in, out, count, stream);
}

}  // namespace asynctls::kernels::cuda
