// A compute backend: memory plus the dense model ops of kernels/dense_params.h. The model
// forward is written once against this interface; the CPU backend (BLAS + threads) and the
// CUDA backend (kernels + cuBLASLt) implement it. Ops are enqueued in order on the backend's
// stream; the CPU backend runs them before returning. Params carry pointers from Allocate().
// Not thread-safe: one backend serves one engine (one rank).
#pragma once

#include <cstddef>
#include <functional>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "asynctls/kernels/dense_params.h"
#include "asynctls/kernels/tls_params.h"

namespace asynctls {

enum class DeviceKind { kCpu, kCuda };

class Backend;

// Owns one allocation of a backend; frees it on destruction. Move-only.
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  DeviceBuffer(Backend* owner, void* data, size_t bytes) : owner_(owner), data_(data), bytes_(bytes) {}
  DeviceBuffer(DeviceBuffer&& o) noexcept { *this = std::move(o); }
  DeviceBuffer& operator=(DeviceBuffer&& o) noexcept;
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  ~DeviceBuffer() { Reset(); }

  void Reset();
  void* data() const { return data_; }
  size_t bytes() const { return bytes_; }
  template <typename T>
  T* as() const {
    return static_cast<T*>(data_);
  }

 private:
  Backend* owner_ = nullptr;
  void* data_ = nullptr;
  size_t bytes_ = 0;
};

// Host memory from Backend::AllocateHost, freed on destruction. Move-only.
class HostBuffer {
 public:
  using FreeFn = void (*)(void*);
  HostBuffer() = default;
  HostBuffer(void* data, size_t bytes, FreeFn free_fn)
      : data_(data, free_fn), bytes_(data ? bytes : 0) {}
  void* data() const { return data_.get(); }
  size_t bytes() const { return bytes_; }
  template <typename T>
  T* as() const {
    return static_cast<T*>(data_.get());
  }

 private:
  std::unique_ptr<void, FreeFn> data_{nullptr, nullptr};
  size_t bytes_ = 0;
};

class Backend {
 public:
  virtual ~Backend() = default;

  virtual DeviceKind kind() const = 0;
  virtual std::string Describe() const = 0;  // e.g. "cpu (2 threads)", "cuda:0 NVIDIA H200"

  // Memory. Allocate returns RESOURCE_EXHAUSTED when the device is full. Copies are ordered
  // with the ops on the stream; CopyToHost blocks until the data is on the host.
  virtual absl::StatusOr<DeviceBuffer> Allocate(size_t bytes) = 0;
  virtual absl::Status CopyToDevice(void* dst, const void* src, size_t bytes) = 0;
  virtual absl::Status CopyToHost(void* dst, const void* src, size_t bytes) = 0;
  // Host memory that CopyToHost fills fastest: page-locked on CUDA (a copy into pageable memory
  // goes through the driver's staging buffers at a fraction of the link's speed), plain on the
  // CPU. RESOURCE_EXHAUSTED when it cannot be had.
  virtual absl::StatusOr<HostBuffer> AllocateHost(size_t bytes);
  virtual absl::Status Fill(void* dst, int byte_value, size_t bytes) = 0;
  virtual absl::Status Synchronize() = 0;
  // Bytes the device could still allocate (CPU: available system memory).
  virtual int64_t FreeMemoryBytes() = 0;

  // Ops (see kernels/dense_params.h). PagedDecodeAttention's workspace is provided by the
  // backend itself (params.workspace is ignored).
  virtual absl::Status Embedding(const kernels::EmbeddingParams& p) = 0;
  virtual absl::Status RmsNorm(const kernels::RmsNormParams& p) = 0;
  virtual absl::Status Gemm(const kernels::GemmParams& p) = 0;
  virtual absl::Status Rope(const kernels::RopeParams& p) = 0;
  virtual absl::Status SplitQkv(const kernels::SplitQkvParams& p) = 0;
  virtual absl::Status SiluMul(const kernels::SiluMulParams& p) = 0;
  virtual absl::Status GreedyPick(const kernels::GreedyPickParams& p) = 0;
  virtual absl::Status KvAppend(const kernels::KvAppendParams& p) = 0;
  // Row gather / scatter by index lists (per-sequence state between its slots and batch order).
  virtual absl::Status CopyRows(const kernels::CopyRowsParams& p) = 0;
  virtual absl::Status PagedDecodeAttention(const kernels::PagedDecodeParams& p) = 0;
  virtual absl::Status PagedPrefillAttention(const kernels::PagedPrefillParams& p) = 0;
  // Seeded uniform values, identical on every backend (random weights for perf runs).
  virtual absl::Status RandomFill(const kernels::RandomFillParams& p) = 0;
  // Two-level sparse attention (kernels/tls_params.h); the backend provides the workspaces
  // (params.workspace is ignored). Selections are identical on every backend. With the one-step
  // lag a backend may finish TlsDecodeSelect's block branch (M_t: blocks, num_blocks) in the
  // background, from its own copy of q: until the next TlsIndexUpdate, TlsDecodeSelect,
  // CopyRows, copy, Fill or Synchronize (which wait for it first), callers must not read M_t
  // nor change that layer's block index, the index table or seq_lens.
  virtual absl::Status TlsIndexUpdate(const kernels::TlsIndexUpdateParams& p) = 0;
  virtual absl::Status TlsDecodeSelect(const kernels::TlsDecodeSelectParams& p) = 0;
  virtual absl::Status TlsSparseAttention(const kernels::TlsSparseAttentionParams& p) = 0;

  // Op sequences recorded once and replayed (CUDA graphs): CaptureOps records the ops `ops`
  // enqueues without running them and returns the sequence's id; LaunchCaptured runs one;
  // ReleaseCaptured frees one (waiting for its launches first). The ops must not copy from the
  // host nor allocate (the CUDA backend's ops refuse to grow a scratch while capturing). A failed
  // capture leaves the backend as it was. UNIMPLEMENTED on backends without graphs (the CPU
  // one), for which CanCaptureOps is false; INVALID_ARGUMENT for an unknown id.
  virtual bool CanCaptureOps() const { return false; }
  virtual absl::StatusOr<int> CaptureOps(const std::function<absl::Status()>& ops) {
    (void)ops;
    return absl::UnimplementedError("this backend does not capture op sequences");
  }
  virtual absl::Status LaunchCaptured(int id) {
    (void)id;
    return absl::UnimplementedError("this backend does not capture op sequences");
  }
  virtual absl::Status ReleaseCaptured(int id) {
    (void)id;
    return absl::UnimplementedError("this backend does not capture op sequences");
  }

  // Converts a host fp32 weight to the dtype the backend's GEMMs read for `preferred`
  // (CPU: always fp32; CUDA: fp32 or bf16) and uploads it.
  virtual absl::StatusOr<DeviceBuffer> UploadWeight(const float* host, size_t count,
                                                    kernels::DType preferred,
                                                    kernels::DType* stored_dtype) = 0;

 protected:
  friend class DeviceBuffer;
  virtual void Free(void* data) = 0;
};

// The CPU backend, `num_threads` 0 = all cores.
std::unique_ptr<Backend> MakeCpuBackend(int num_threads = 0);

// The CUDA backend on `device_ordinal`; UNAVAILABLE when the build has no CUDA or no GPU.
absl::StatusOr<std::unique_ptr<Backend>> MakeCudaBackend(int device_ordinal = 0);

// True when this build has CUDA and a GPU is present.
bool CudaAvailable();

}  // namespace asynctls
