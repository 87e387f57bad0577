// Greedy sampling on the device: each logit row's first largest logit and its log-softmax, so a
// greedy decode step copies 8 bytes per row to the host instead of the row (4.9 MB at batch 8
// of a 151,936-token vocabulary) and the host makes no pass over it.
#include <climits>
#include <cstdint>

#include "asynctls/kernels/cuda_ops.h"
#include "dense_common.cuh"

namespace asynctls::kernels::cuda {
namespace {

constexpr int kThreads = 1024;  // one CTA per row: a row is read twice, the second time from L2
constexpr int kWarps = kThreads / 32;

// (value, index) pairs: the larger value wins, then the lower index; NaN never enters (index
// INT_MAX = none yet, which any non-NaN value, -inf included, replaces).
struct Best {
  float value;
  int index;
};

__device__ __forceinline__ Best Better(Best a, Best b) {
  return (b.value > a.value || (b.value == a.value && b.index < a.index)) ? b : a;
}

// The warp's best pair, in every lane.
__device__ __forceinline__ Best WarpBest(Best best) {
  for (int o = 16; o > 0; o /= 2) {
    const Best other{__shfl_xor_sync(0xffffffffu, best.value, o),
                     __shfl_xor_sync(0xffffffffu, best.index, o)};
    best = Better(best, other);
  }
  return best;
}

__device__ __forceinline__ void Offer(Best& best, float x, int i) {
  if (x > best.value || (x == best.value && i < best.index)) best = {x, i};
}

__global__ void __launch_bounds__(kThreads)
    GreedyPickKernel(const float* __restrict__ logits, int32_t* __restrict__ token,
                     float* __restrict__ logprob, int vocab) {
  __shared__ Best warp_best[kWarps];
  __shared__ double warp_sum[kWarps];
  __shared__ Best row_best;
  const float* row = logits + int64_t{blockIdx.x} * vocab;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const bool vec = vocab % 4 == 0 && reinterpret_cast<uintptr_t>(logits) % 16 == 0;

  Best best{__int_as_float(0xff800000), INT_MAX};  // -inf, none
  if (vec) {
    const float4* row4 = reinterpret_cast<const float4*>(row);
    for (int i = threadIdx.x; i < vocab / 4; i += kThreads) {
      const float4 x = row4[i];
      Offer(best, x.x, 4 * i);
      Offer(best, x.y, 4 * i + 1);
      Offer(best, x.z, 4 * i + 2);
      Offer(best, x.w, 4 * i + 3);
    }
  } else {
    for (int i = threadIdx.x; i < vocab; i += kThreads) Offer(best, row[i], i);
  }
  best = WarpBest(best);
  if (lane == 0) warp_best[warp] = best;
  __syncthreads();
  if (warp == 0) {
    best = WarpBest(warp_best[lane]);  // kWarps == 32
    if (lane == 0) row_best = best;
  }
  __syncthreads();
  const float max = row_best.value;

  // sum_i e^(l_i - max): float per thread (a few hundred terms in [0, 1]), double across them.
  float sum = 0.f;
  for (int i = threadIdx.x; i < vocab; i += kThreads) {
    const float d = row[i] - max;  // NaN for NaN logits and when max is -inf: skipped
    sum += d == d ? expf(d) : 0.f;
  }
  double total = sum;
  for (int o = 16; o > 0; o /= 2) total += __shfl_xor_sync(0xffffffffu, total, o);
  if (lane == 0) warp_sum[warp] = total;
  __syncthreads();
  if (threadIdx.x == 0) {
    total = 0;
    for (int w = 0; w < kWarps; ++w) total += warp_sum[w];
    token[blockIdx.x] = row_best.index == INT_MAX ? 0 : row_best.index;
    logprob[blockIdx.x] = static_cast<float>(-log(total));
  }
}

}  // namespace

cudaError_t GreedyPick(const GreedyPickParams& p, cudaStream_t stream) {
  if (p.rows < 0 || p.vocab <= 0) return cudaErrorInvalidValue;
  if (p.rows == 0) return cudaSuccess;
  GreedyPickKernel<<<p.rows, kThreads, 0, stream>>>(p.logits, p.token, p.logprob, p.vocab);
  return cudaGetLastError();
}

}  // namespace asynctls::kernels::cuda
