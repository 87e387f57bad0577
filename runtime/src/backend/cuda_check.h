// CUDA and cuBLAS errors -> absl::Status naming the call, file and line. Private to the CUDA
// backend (includes CUDA headers; never include from a public header).
#pragma once

#include <cublasLt.h>
#include <cuda_runtime_api.h>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"

namespace asynctls::cuda_check {

// One-to-one with gRPC codes: out of memory -> RESOURCE_EXHAUSTED, a shape or value the kernels
// reject -> INVALID_ARGUMENT, no usable device/driver -> UNAVAILABLE, capture misuse ->
// FAILED_PRECONDITION, anything else (a dead context, a faulting kernel) -> INTERNAL.
inline absl::StatusCode CodeOf(cudaError_t e) {
  switch (e) {
    case cudaErrorMemoryAllocation:
      return absl::StatusCode::kResourceExhausted;
    case cudaErrorInvalidValue:
    case cudaErrorInvalidConfiguration:
    case cudaErrorNotSupported:
      return absl::StatusCode::kInvalidArgument;
    case cudaErrorNoDevice:
    case cudaErrorInvalidDevice:
    case cudaErrorInsufficientDriver:
    case cudaErrorDevicesUnavailable:
    case cudaErrorSystemDriverMismatch:
    case cudaErrorCompatNotSupportedOnDevice:
      return absl::StatusCode::kUnavailable;
    case cudaErrorStreamCaptureUnsupported:
    case cudaErrorStreamCaptureInvalidated:
    case cudaErrorStreamCaptureImplicit:
    case cudaErrorCapturedEvent:
    case cudaErrorNoKernelImageForDevice:
      return absl::StatusCode::kFailedPrecondition;
    default:
      return absl::StatusCode::kInternal;
  }
}

inline absl::StatusCode CodeOf(cublasStatus_t s) {
  switch (s) {
    case CUBLAS_STATUS_ALLOC_FAILED:
      return absl::StatusCode::kResourceExhausted;
    case CUBLAS_STATUS_INVALID_VALUE:
    case CUBLAS_STATUS_NOT_SUPPORTED:
      return absl::StatusCode::kInvalidArgument;
    case CUBLAS_STATUS_NOT_INITIALIZED:
    case CUBLAS_STATUS_ARCH_MISMATCH:
      return absl::StatusCode::kUnavailable;
    default:
      return absl::StatusCode::kInternal;
  }
}

inline absl::string_view BaseName(absl::string_view path) {
  const size_t slash = path.find_last_of('/');
  return slash == absl::string_view::npos ? path : path.substr(slash + 1);
}

// "cudaMalloc(&p, n) at cuda_backend.cc:42: cudaErrorMemoryAllocation (out of memory)[: detail]"
inline absl::Status ToStatus(cudaError_t e, absl::string_view call, const char* file, int line,
                             absl::string_view detail = {}) {
  if (e == cudaSuccess) return absl::OkStatus();
  return absl::Status(CodeOf(e), absl::StrCat(call, " at ", BaseName(file), ":", line, ": ",
                                              cudaGetErrorName(e), " (", cudaGetErrorString(e), ")",
                                              detail.empty() ? "" : ": ", detail));
}

inline absl::Status ToStatus(cublasStatus_t s, absl::string_view call, const char* file, int line) {
  if (s == CUBLAS_STATUS_SUCCESS) return absl::OkStatus();
  return absl::Status(
      CodeOf(s), absl::StrCat(call, " at ", BaseName(file), ":", line, ": ",
                              cublasLtGetStatusName(s), " (", cublasLtGetStatusString(s), ")"));
}

}  // namespace asynctls::cuda_check

// Returns a Status naming the call, file and line when `expr` (a cudaError_t or cublasStatus_t)
// fails. A failed allocation's non-sticky error is cleared so later launches do not report it.
#define ASYNCTLS_CUDA_RETURN_IF_ERROR(expr)                                              \
  do {                                                                                   \
    const auto _asynctls_cuda_err = (expr);                                              \
    ::absl::Status _asynctls_cuda_status =                                               \
        ::asynctls::cuda_check::ToStatus(_asynctls_cuda_err, #expr, __FILE__, __LINE__); \
    if (!_asynctls_cuda_status.ok()) {                                                   \
      ::cudaGetLastError();                                                              \
      return _asynctls_cuda_status;                                                      \
    }                                                                                    \
  } while (0)
