// Options of the CUDA backend (the factory with defaults is MakeCudaBackend in backend.h).
// CUDA-free: this header compiles in a CPU-only build, where the factory returns UNAVAILABLE.
#pragma once

#include <cstdint>
#include <memory>

#include "absl/status/statusor.h"
#include "asynctls/runtime/backend.h"

namespace asynctls {

struct CudaBackendOptions {
  int device_ordinal = 0;
  // Largest m * k of the activations of a GEMM with bf16 weights (they are converted to bf16
  // in a scratch of this many elements). Grows on demand, but not during a CUDA graph capture.
  int64_t max_gemm_x_elements = int64_t{4096} * 4096;
  // Decode-attention split-K workspace reserved at creation for up to this batch / context of
  // a model with these heads. 0 reserves nothing. The workspace also grows on demand, but not
  // during a graph capture (PagedDecodeAttention then returns FAILED_PRECONDITION): reserve
  // before capturing.
  int max_decode_batch = 0;
  int max_seq_len = 0;
  int num_q_heads = 0;
  int num_kv_heads = 0;
  int head_dim = 0;
};

// The CUDA backend with explicit options. UNAVAILABLE without CUDA or without that device;
// RESOURCE_EXHAUSTED when the reservations do not fit.
absl::StatusOr<std::unique_ptr<Backend>> MakeCudaBackend(const CudaBackendOptions& options);

// The cudaStream_t (as void*) that a CUDA backend enqueues on, for callers that order their own
// work with it: copy streams waiting on events, CUDA graph capture of a decode step. Null when
// `backend` is not a CUDA backend. Ops enqueued during a capture never allocate: a scratch that
// would have to grow returns FAILED_PRECONDITION instead (reserve through CudaBackendOptions or
// run the step once before capturing).
void* CudaBackendStream(Backend& backend);

}  // namespace asynctls
