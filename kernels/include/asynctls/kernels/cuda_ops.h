// CUDA entries of the dense model ops (same params as ref.h, device pointers). Each enqueues
// on `stream`, never allocates or synchronizes, and returns the launch's cudaError_t.
#pragma once

#include <cuda_runtime_api.h>

#include "asynctls/kernels/dense_params.h"

namespace asynctls::kernels::cuda {

cudaError_t Embedding(const EmbeddingParams& p, cudaStream_t stream);
cudaError_t RmsNorm(const RmsNormParams& p, cudaStream_t stream);
cudaError_t Rope(const RopeParams& p, cudaStream_t stream);
cudaError_t SplitQkv(const SplitQkvParams& p, cudaStream_t stream);
cudaError_t SiluMul(const SiluMulParams& p, cudaStream_t stream);
cudaError_t GreedyPick(const GreedyPickParams& p, cudaStream_t stream);
cudaError_t KvAppend(const KvAppendParams& p, cudaStream_t stream);
cudaError_t CopyRows(const CopyRowsParams& p, cudaStream_t stream);
// fp32 -> bf16 element-wise (activations before a bf16 GEMM).
cudaError_t RandomFill(const RandomFillParams& p, cudaStream_t stream);
cudaError_t ConvertF32ToBf16(const float* in, void* out_bf16, int64_t count, cudaStream_t stream);

// GEMMs through cuBLASLt. A GemmRunner owns the cuBLASLt handle and a workspace; create one
// per stream. fp32 weights: fp32 GEMM with fp32 math (no TF32), so results track the CPU.
// bf16 weights: x is converted to bf16 into the runner's scratch, bf16 x bf16 -> fp32 with
// fp32 accumulation.
class GemmRunner {
 public:
  // `max_x_elements` sizes the bf16 scratch for x (m * k of the largest GEMM).
  static cudaError_t Create(int64_t max_x_elements, GemmRunner** out);
  ~GemmRunner();
  // Not thread-safe (caches cuBLASLt plans per shape; one runner per stream). The first call
  // of a shape queries cuBLASLt's heuristic; later calls only enqueue (graph-capturable).
  cudaError_t Run(const GemmParams& p, cudaStream_t stream);
  // What failed in the last unsuccessful call, e.g. "cublasLtMatmul(...): CUBLAS_STATUS_...".
  const char* last_error_detail() const;

 private:
  GemmRunner() = default;
  struct State;
  State* state_ = nullptr;
};

}  // namespace asynctls::kernels::cuda
