// The CUDA backend: one device, one non-blocking stream, a cuBLASLt GemmRunner and the
// decode-attention workspace; every op enqueues a kernels::cuda entry on the stream. Ops never
// allocate unless a scratch must grow, and never while the stream is being captured into a
// CUDA graph (they return FAILED_PRECONDITION instead), so a warmed-up decode step is
// graph-capturable. Debug builds synchronize after every op to pin errors on the op.
//
// Without CUDA (-DASYNCTLS_CUDA=OFF) the factories return UNAVAILABLE.
#include "asynctls/runtime/cuda_backend.h"

#include <memory>

#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "asynctls/runtime/backend.h"
#include "asynctls/runtime/status.h"

#if ASYNCTLS_HAVE_CUDA

#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

#include "asynctls/kernels/cuda_attention.h"
#include "asynctls/kernels/cuda_ops.h"
#include "asynctls/kernels/cuda_tls.h"
#include "backend/cuda_check.h"

namespace asynctls {
namespace {

using kernels::DType;
namespace kc = kernels::cuda;

// fp32 elements staged per chunk when converting a weight to bf16 on the device.
constexpr size_t kUploadChunkElements = size_t{16} << 20;

struct StreamDeleter {
  void operator()(CUstream_st* s) const { cudaStreamDestroy(s); }
};
struct CudaFreeDeleter {
  void operator()(void* p) const { cudaFree(p); }
};
using UniqueStream = std::unique_ptr<CUstream_st, StreamDeleter>;
struct EventDeleter {
  void operator()(cudaEvent_t e) const { cudaEventDestroy(e); }
};
using UniqueEvent = std::unique_ptr<CUevent_st, EventDeleter>;
using UniqueCudaMemory = std::unique_ptr<void, CudaFreeDeleter>;

// Status of a kernels::cuda entry's result, naming the op.
#define ASYNCTLS_CUDA_OP(expr)                                      \
  do {                                                              \
    ASYNCTLS_CUDA_RETURN_IF_ERROR(expr);                            \
    ASYNCTLS_RETURN_IF_ERROR(DebugSync(#expr, __FILE__, __LINE__)); \
  } while (0)

class CudaBackend final : public Backend {
 public:
  static absl::StatusOr<std::unique_ptr<Backend>> Create(const CudaBackendOptions& options);
  ~CudaBackend() override;

  DeviceKind kind() const override { return DeviceKind::kCuda; }
  cudaStream_t stream() const { return stream_.get(); }
  std::string Describe() const override {
    return absl::StrCat("cuda:", options_.device_ordinal, " ", device_name_);
  }

  absl::StatusOr<DeviceBuffer> Allocate(size_t bytes) override;
  absl::Status CopyToDevice(void* dst, const void* src, size_t bytes) override;
  absl::Status CopyToHost(void* dst, const void* src, size_t bytes) override;
  absl::StatusOr<HostBuffer> AllocateHost(size_t bytes) override;
  absl::Status Fill(void* dst, int byte_value, size_t bytes) override;
  absl::Status Synchronize() override;
  int64_t FreeMemoryBytes() override;

  absl::Status Embedding(const kernels::EmbeddingParams& p) override;
  absl::Status RmsNorm(const kernels::RmsNormParams& p) override;
  absl::Status Gemm(const kernels::GemmParams& p) override;
  absl::Status Rope(const kernels::RopeParams& p) override;
  absl::Status SplitQkv(const kernels::SplitQkvParams& p) override;
  absl::Status SiluMul(const kernels::SiluMulParams& p) override;
  absl::Status GreedyPick(const kernels::GreedyPickParams& p) override;
  absl::Status CopyRows(const kernels::CopyRowsParams& p) override;
  absl::Status KvAppend(const kernels::KvAppendParams& p) override;
  absl::Status PagedDecodeAttention(const kernels::PagedDecodeParams& p) override;
  absl::Status PagedPrefillAttention(const kernels::PagedPrefillParams& p) override;
  absl::Status RandomFill(const kernels::RandomFillParams& p) override;
  absl::Status TlsIndexUpdate(const kernels::TlsIndexUpdateParams& p) override;
  absl::Status TlsDecodeSelect(const kernels::TlsDecodeSelectParams& p) override;
  absl::Status TlsSparseAttention(const kernels::TlsSparseAttentionParams& p) override;

  absl::StatusOr<DeviceBuffer> UploadWeight(const float* host, size_t count,
                                            kernels::DType preferred,
                                            kernels::DType* stored_dtype) override;
  bool CanCaptureOps() const override { return true; }
  absl::StatusOr<int> CaptureOps(const std::function<absl::Status()>& ops) override;
  absl::Status LaunchCaptured(int id) override;
  absl::Status ReleaseCaptured(int id) override;

 protected:
  void Free(void* data) override;

 private:
  explicit CudaBackend(const CudaBackendOptions& options) : options_(options) {}

  absl::Status Activate() const;
  absl::StatusOr<bool> Capturing() const;
  // Records that an op using the owned scratch is being captured into a graph.
  absl::Status NoteCapture();
  absl::Status DebugSync(const char* what, const char* file, int line) const;
  struct Workspace {
    UniqueCudaMemory memory;
    size_t bytes = 0;
  };
  // Makes `ws` at least `bytes` (outside a capture only); `what` names the op in errors.
  absl::Status EnsureWorkspace(Workspace& ws, size_t bytes, const char* what);
  absl::Status EnsureDecodeWorkspace(size_t bytes) {
    return EnsureWorkspace(decode_workspace_, bytes, "decode attention");
  }
  absl::Status EnsureGemmScratch(int64_t x_elements);
  absl::Status ReserveDecodeWorkspace();

  CudaBackendOptions options_;
  std::string device_name_;
  UniqueStream stream_;
  // The one-step lag's block branch (M_t for the next step) runs on block_stream_, forked at its
  // TlsDecodeSelect and joined into stream_ by JoinBlockBranch at the next op that may read M_t
  // or change the branch's inputs (see backend.h): beside the token branch, the attention and
  // the FFN. It reads its own copy of the query (block_q_), which the next layer's q GEMM
  // would otherwise overwrite.
  UniqueStream block_stream_;
  UniqueEvent block_fork_, block_join_;
  Workspace block_q_;
  bool block_pending_ = false;
  absl::Status JoinBlockBranch();
  void JoinBranchOfFailedSelect();
  std::unique_ptr<kc::GemmRunner> gemm_;
  int64_t gemm_x_capacity_ = 0;
  Workspace decode_workspace_;
  Workspace tls_select_workspace_;     // TlsDecodeSelect scratch
  Workspace tls_attention_workspace_;  // TlsSparseAttention split-K partials
  // A CUDA graph captured from this stream holds raw pointers to the scratch buffers above.
  // Once one has been, a grown buffer's predecessor is retired (kept until destruction) instead
  // of freed, so replaying that graph never touches freed memory.
  bool scratch_captured_ = false;
  std::vector<std::unique_ptr<kc::GemmRunner>> retired_gemm_;
  std::vector<UniqueCudaMemory> retired_workspaces_;
  struct GraphExecDeleter {
    void operator()(CUgraphExec_st* g) const { cudaGraphExecDestroy(g); }
  };
  // CaptureOps's graphs by id (ids are not reused).
  absl::flat_hash_map<int, std::unique_ptr<CUgraphExec_st, GraphExecDeleter>> graphs_;
  int next_graph_id_ = 0;
};

absl::StatusOr<std::unique_ptr<Backend>> CudaBackend::Create(const CudaBackendOptions& options) {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess || count == 0) {
    cudaGetLastError();
    return absl::UnavailableError("no CUDA device is available");
  }
  if (options.device_ordinal < 0 || options.device_ordinal >= count) {
    return absl::UnavailableError(absl::StrCat("CUDA device ", options.device_ordinal,
                                               " does not exist (", count, " present)"));
  }
  if (options.max_gemm_x_elements < 0 || options.max_decode_batch < 0 || options.max_seq_len < 0) {
    return absl::InvalidArgumentError("CudaBackendOptions: negative size");
  }
  std::unique_ptr<CudaBackend> backend(new CudaBackend(options));
  ASYNCTLS_RETURN_IF_ERROR(backend->Activate());
  cudaDeviceProp prop{};
  ASYNCTLS_CUDA_RETURN_IF_ERROR(cudaGetDeviceProperties(&prop, options.device_ordinal));
  backend->device_name_ = prop.name;
  cudaStream_t stream = nullptr;
  ASYNCTLS_CUDA_RETURN_IF_ERROR(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  backend->stream_.reset(stream);
  ASYNCTLS_CUDA_RETURN_IF_ERROR(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  backend->block_stream_.reset(stream);
  cudaEvent_t event = nullptr;
  ASYNCTLS_CUDA_RETURN_IF_ERROR(cudaEventCreateWithFlags(&event, cudaEventDisableTiming));
  backend->block_fork_.reset(event);
  ASYNCTLS_CUDA_RETURN_IF_ERROR(cudaEventCreateWithFlags(&event, cudaEventDisableTiming));
  backend->block_join_.reset(event);
  ASYNCTLS_RETURN_IF_ERROR(backend->EnsureGemmScratch(options.max_gemm_x_elements));
  ASYNCTLS_RETURN_IF_ERROR(backend->ReserveDecodeWorkspace());
  return std::unique_ptr<Backend>(std::move(backend));
}

CudaBackend::~CudaBackend() {
  if (Activate().ok() && stream_) {
    (void)JoinBlockBranch();
    cudaStreamSynchronize(stream_.get());
  }
  graphs_.clear();
  gemm_.reset();
  retired_gemm_.clear();
  decode_workspace_.memory.reset();
  tls_select_workspace_.memory.reset();
  tls_attention_workspace_.memory.reset();
  retired_workspaces_.clear();
  stream_.reset();
}

absl::Status CudaBackend::Activate() const {
  ASYNCTLS_CUDA_RETURN_IF_ERROR(cudaSetDevice(options_.device_ordinal));
  return absl::OkStatus();
}

absl::StatusOr<bool> CudaBackend::Capturing() const {
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  ASYNCTLS_CUDA_RETURN_IF_ERROR(cudaStreamIsCapturing(stream_.get(), &capture));
  return capture != cudaStreamCaptureStatusNone;
}

absl::Status CudaBackend::NoteCapture() {
  if (scratch_captured_) return absl::OkStatus();
  ASYNCTLS_ASSIGN_OR_RETURN(scratch_captured_, Capturing());
  return absl::OkStatus();
}

absl::Status CudaBackend::DebugSync(const char* what, const char* file, int line) const {
#ifndef NDEBUG
  ASYNCTLS_ASSIGN_OR_RETURN(const bool capturing, Capturing());
  if (!capturing) {
    const cudaError_t e = cudaStreamSynchronize(stream_.get());
    if (e != cudaSuccess) {
      return cuda_check::ToStatus(e, absl::StrCat("cudaStreamSynchronize after ", what), file,
                                  line);
    }
  }
#endif
  return absl::OkStatus();
}

absl::Status CudaBackend::EnsureGemmScratch(int64_t x_elements) {
  if (gemm_ && x_elements <= gemm_x_capacity_) return absl::OkStatus();
  if (gemm_) {
    ASYNCTLS_ASSIGN_OR_RETURN(const bool capturing, Capturing());
    if (capturing) {
      return absl::FailedPreconditionError(absl::StrCat(
          "GEMM activations of ", x_elements, " elements exceed the bf16 scratch (",
          gemm_x_capacity_, ") during a CUDA graph capture; raise max_gemm_x_elements"));
    }
    // The old scratch may still be read by enqueued GEMMs.
    ASYNCTLS_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream_.get()));
    x_elements = std::max(x_elements, 2 * gemm_x_capacity_);
    if (scratch_captured_) retired_gemm_.push_back(std::move(gemm_));
  }
  gemm_.reset();
  kc::GemmRunner* runner = nullptr;
  ASYNCTLS_CUDA_RETURN_IF_ERROR(kc::GemmRunner::Create(x_elements, &runner));
  gemm_.reset(runner);
  gemm_x_capacity_ = x_elements;
  return absl::OkStatus();
}

absl::Status CudaBackend::EnsureWorkspace(Workspace& ws, size_t bytes, const char* what) {
  if (bytes <= ws.bytes) return absl::OkStatus();
  ASYNCTLS_ASSIGN_OR_RETURN(const bool capturing, Capturing());
  if (capturing) {
    return absl::FailedPreconditionError(absl::StrCat(
        what, " needs ", bytes, " bytes of workspace (", ws.bytes,
        " reserved) during a CUDA graph capture; run the step once before capturing it"));
  }
  ASYNCTLS_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream_.get()));
  if (scratch_captured_ && ws.memory) retired_workspaces_.push_back(std::move(ws.memory));
  ws.memory.reset();
  ws.bytes = 0;
  const size_t grown = std::max(bytes, bytes / 2 * 3);  // headroom against creeping growth
  void* ptr = nullptr;
  ASYNCTLS_CUDA_RETURN_IF_ERROR(cudaMalloc(&ptr, grown));
  ws.memory.reset(ptr);
  ws.bytes = grown;
  return absl::OkStatus();
}

// The split-K workspace depends on batch, heads and context (fewer sequences get more splits),
// so the reservation takes the largest need over batch sizes up to the maximum.
absl::Status CudaBackend::ReserveDecodeWorkspace() {
  const CudaBackendOptions& o = options_;
  if (o.max_decode_batch == 0 || o.max_seq_len == 0 || o.num_q_heads == 0 || o.num_kv_heads == 0 ||
      o.head_dim == 0) {
    return absl::OkStatus();
  }
  kernels::PagedDecodeParams p{};  // the size query reads the shape only
  p.num_q_heads = o.num_q_heads;
  p.num_kv_heads = o.num_kv_heads;
  p.head_dim = o.head_dim;
  p.max_seq_len = o.max_seq_len;
  p.max_blocks_per_seq = (o.max_seq_len + kernels::kKvBlockSize - 1) / kernels::kKvBlockSize;
  p.scale = 1.f;
  size_t need = 0;
  for (DType io : {DType::kF32, DType::kBF16}) {
    p.io_dtype = io;
    for (int batch = 1;; batch = std::min(2 * batch, o.max_decode_batch)) {
      p.batch = batch;
      need = std::max(need, kc::PagedDecodeWorkspaceBytes(p));
      if (batch == o.max_decode_batch) break;
    }
  }
  cudaGetLastError();  // the size query may leave a non-sticky error for unsupported shapes
  return EnsureDecodeWorkspace(need);
}

absl::StatusOr<DeviceBuffer> CudaBackend::Allocate(size_t bytes) {
  if (bytes == 0) return DeviceBuffer(this, nullptr, 0);
  ASYNCTLS_RETURN_IF_ERROR(Activate());
  void* ptr = nullptr;
  const cudaError_t e = cudaMalloc(&ptr, bytes);
  if (e != cudaSuccess) {
    cudaGetLastError();
    return cuda_check::ToStatus(e, absl::StrCat("cudaMalloc(", bytes, " bytes)"), __FILE__,
                                __LINE__);
  }
  return DeviceBuffer(this, ptr, bytes);
}

void CudaBackend::Free(void* data) {
  if (data == nullptr) return;
  cudaSetDevice(options_.device_ordinal);
  cudaFree(data);
}

absl::Status CudaBackend::CopyToDevice(void* dst, const void* src, size_t bytes) {
  if (bytes == 0) return absl::OkStatus();
  ASYNCTLS_RETURN_IF_ERROR(Activate());
  ASYNCTLS_RETURN_IF_ERROR(JoinBlockBranch());
  ASYNCTLS_CUDA_OP(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDefault, stream_.get()));
  return absl::OkStatus();
}

absl::StatusOr<HostBuffer> CudaBackend::AllocateHost(size_t bytes) {
  ASYNCTLS_RETURN_IF_ERROR(Activate());
  void* ptr = nullptr;
  const cudaError_t e = cudaMallocHost(&ptr, bytes == 0 ? 1 : bytes);
  if (e != cudaSuccess) {
    cudaGetLastError();
    return absl::ResourceExhaustedError(
        absl::StrCat("cudaMallocHost(", bytes, " bytes): ", cudaGetErrorString(e)));
  }
  return HostBuffer(ptr, bytes, [](void* p) { cudaFreeHost(p); });
}

absl::Status CudaBackend::CopyToHost(void* dst, const void* src, size_t bytes) {
  if (bytes == 0) return absl::OkStatus();
  ASYNCTLS_RETURN_IF_ERROR(Activate());
  ASYNCTLS_RETURN_IF_ERROR(JoinBlockBranch());
  ASYNCTLS_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDefault, stream_.get()));
  ASYNCTLS_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream_.get()));
  return absl::OkStatus();
}

absl::Status CudaBackend::Fill(void* dst, int byte_value, size_t bytes) {
  if (bytes == 0) return absl::OkStatus();
  ASYNCTLS_RETURN_IF_ERROR(Activate());
  ASYNCTLS_RETURN_IF_ERROR(JoinBlockBranch());
  ASYNCTLS_CUDA_OP(cudaMemsetAsync(dst, byte_value, bytes, stream_.get()));
  return absl::OkStatus();
}

absl::Status CudaBackend::Synchronize() {
  ASYNCTLS_RETURN_IF_ERROR(Activate());
  ASYNCTLS_RETURN_IF_ERROR(JoinBlockBranch());
  ASYNCTLS_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream_.get()));
  return absl::OkStatus();
}

absl::Status CudaBackend::Embedding(const kernels::EmbeddingParams& p) {
  ASYNCTLS_RETURN_IF_ERROR(Activate());
  ASYNCTLS_CUDA_OP(kc::Embedding(p, stream_.get()));
  return absl::OkStatus();
}

absl::Status CudaBackend::RmsNorm(const kernels::RmsNormParams& p) {
  ASYNCTLS_RETURN_IF_ERROR(Activate());
  ASYNCTLS_CUDA_OP(kc::RmsNorm(p, stream_.get()));
  return absl::OkStatus();
}

absl::Status CudaBackend::Gemm(const kernels::GemmParams& p) {
  ASYNCTLS_RETURN_IF_ERROR(Activate());
  if (p.w_dtype == DType::kBF16) {
    ASYNCTLS_RETURN_IF_ERROR(EnsureGemmScratch(int64_t{p.m} * p.k));
  }
  ASYNCTLS_RETURN_IF_ERROR(NoteCapture());
  const cudaError_t e = gemm_->Run(p, stream_.get());
  if (e != cudaSuccess) {
    cudaGetLastError();
    return cuda_check::ToStatus(
        e, absl::StrCat("GemmRunner::Run(m=", p.m, ", n=", p.n, ", k=", p.k, ")"), __FILE__,
        __LINE__, gemm_->last_error_detail());
  }
  return DebugSync("GemmRunner::Run", __FILE__, __LINE__);
}

absl::Status CudaBackend::Rope(const kernels::RopeParams& p) {
  ASYNCTLS_RETURN_IF_ERROR(Activate());
  ASYNCTLS_CUDA_OP(kc::Rope(p, stream_.get()));
  return absl::OkStatus();
}

absl::Status CudaBackend::SplitQkv(const kernels::SplitQkvParams& p) {
  ASYNCTLS_RETURN_IF_ERROR(Activate());
  ASYNCTLS_CUDA_OP(kc::SplitQkv(p, stream_.get()));
  return absl::OkStatus();
}

int64_t CudaBackend::FreeMemoryBytes() {
  size_t free_bytes = 0, total = 0;
  if (!Activate().ok() || cudaMemGetInfo(&free_bytes, &total) != cudaSuccess) return 0;
  return static_cast<int64_t>(free_bytes);
}

absl::Status CudaBackend::RandomFill(const kernels::RandomFillParams& p) {
  ASYNCTLS_RETURN_IF_ERROR(Activate());
  ASYNCTLS_CUDA_OP(kc::RandomFill(p, stream_.get()));
  return absl::OkStatus();
}

absl::Status CudaBackend::TlsIndexUpdate(const kernels::TlsIndexUpdateParams& p) {
  ASYNCTLS_RETURN_IF_ERROR(Activate());
  ASYNCTLS_RETURN_IF_ERROR(JoinBlockBranch());
  ASYNCTLS_CUDA_OP(kc::TlsIndexUpdate(p, stream_.get()));
  return absl::OkStatus();
}

absl::Status CudaBackend::TlsDecodeSelect(const kernels::TlsDecodeSelectParams& p) {
  ASYNCTLS_RETURN_IF_ERROR(Activate());
  ASYNCTLS_RETURN_IF_ERROR(JoinBlockBranch());
  if (!kc::TlsSelectCanImplement(p.head_dim, p.num_channels, p.num_q_heads / p.num_kv_heads)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "tls select: head_dim ", p.head_dim, " / ", p.num_channels, " channels / group ",
        p.num_q_heads / p.num_kv_heads, " is not supported by the CUDA kernels"));
  }
  kernels::TlsDecodeSelectParams q = p;
  ASYNCTLS_RETURN_IF_ERROR(EnsureWorkspace(tls_select_workspace_,
                                           kc::TlsDecodeSelectWorkspaceBytes(q), "tls select"));
  ASYNCTLS_RETURN_IF_ERROR(NoteCapture());
  q.workspace = tls_select_workspace_.memory.get();
  if (q.policy.mode != kernels::TlsMode::kTwoLevel || q.policy.lag != kernels::TlsLag::kOneStep) {
    ASYNCTLS_CUDA_OP(kc::TlsDecodeSelect(q, stream_.get()));
    return absl::OkStatus();
  }
  const size_t q_bytes =
      size_t(q.batch) * q.num_q_heads * q.head_dim * kernels::DTypeSize(q.io_dtype);
  ASYNCTLS_RETURN_IF_ERROR(EnsureWorkspace(block_q_, q_bytes, "tls block query"));
  ASYNCTLS_CUDA_OP(cudaMemcpyAsync(block_q_.memory.get(), q.q, q_bytes, cudaMemcpyDeviceToDevice,
                                   stream_.get()));
  const cudaError_t e =
      kc::TlsDecodeSelect(q, stream_.get(), block_stream_.get(), block_q_.memory.get(),
                          block_fork_.get(), block_join_.get());
  if (e != cudaSuccess) {
    cudaGetLastError();
    JoinBranchOfFailedSelect();
    return cuda_check::ToStatus(e, "kernels::cuda::TlsDecodeSelect (one-step lag)", __FILE__,
                                __LINE__);
  }
  block_pending_ = true;
  return DebugSync("kernels::cuda::TlsDecodeSelect (one-step lag)", __FILE__, __LINE__);
}

// The lagged TlsDecodeSelect records the fork, then launches, then records the join: one that
// failed may have forked the block branch without joining it. The join is recorded here so that
// the next JoinBlockBranch still orders stream_ after the branch and a capture can end (it must
// join every stream it forked). Outside a capture that is always right; inside one only when
// block_stream_ took part in it (its wait on the fork was captured): a wait on an event recorded
// outside the capture would break it.
void CudaBackend::JoinBranchOfFailedSelect() {
  cudaStreamCaptureStatus main = cudaStreamCaptureStatusNone;
  cudaStreamCaptureStatus branch = cudaStreamCaptureStatusNone;
  if (cudaStreamIsCapturing(stream_.get(), &main) == cudaSuccess &&
      cudaStreamIsCapturing(block_stream_.get(), &branch) == cudaSuccess &&
      (main == cudaStreamCaptureStatusNone || branch == cudaStreamCaptureStatusActive) &&
      cudaEventRecord(block_join_.get(), block_stream_.get()) == cudaSuccess) {
    block_pending_ = true;
  }
  cudaGetLastError();
}

absl::StatusOr<int> CudaBackend::CaptureOps(const std::function<absl::Status()>& ops) {
  ASYNCTLS_RETURN_IF_ERROR(Activate());
  ASYNCTLS_RETURN_IF_ERROR(JoinBlockBranch());  // nothing of an earlier step inside the graph
  ASYNCTLS_CUDA_RETURN_IF_ERROR(
      cudaStreamBeginCapture(stream_.get(), cudaStreamCaptureModeThreadLocal));
  absl::Status status = ops();
  // A capture ends only with every stream it forked joined: a pending block branch (the lag's)
  // rejoins inside the graph, also when an op after its fork failed. The first error is kept.
  if (absl::Status joined = JoinBlockBranch(); status.ok()) status = joined;
  // Ended whatever happened, so that the streams leave capture mode.
  cudaGraph_t graph = nullptr;
  const cudaError_t end = cudaStreamEndCapture(stream_.get(), &graph);
  if (status.ok() && end != cudaSuccess) {
    status = cuda_check::ToStatus(end, "cudaStreamEndCapture", __FILE__, __LINE__);
  }
  if (!status.ok()) {
    if (graph != nullptr) cudaGraphDestroy(graph);
    cudaGetLastError();  // a failed capture leaves no sticky error behind
    return status;
  }
  cudaGraphExec_t exec = nullptr;
  const cudaError_t inst = cudaGraphInstantiate(&exec, graph, 0);
  cudaGraphDestroy(graph);
  if (inst != cudaSuccess) {
    cudaGetLastError();
    return cuda_check::ToStatus(inst, "cudaGraphInstantiate", __FILE__, __LINE__);
  }
  const int id = next_graph_id_++;
  graphs_[id].reset(exec);
  return id;
}

absl::Status CudaBackend::LaunchCaptured(int id) {
  auto it = graphs_.find(id);
  if (it == graphs_.end()) {
    return absl::InvalidArgumentError(absl::StrCat("no captured op sequence ", id));
  }
  ASYNCTLS_RETURN_IF_ERROR(Activate());
  ASYNCTLS_RETURN_IF_ERROR(JoinBlockBranch());
  ASYNCTLS_CUDA_OP(cudaGraphLaunch(it->second.get(), stream_.get()));
  return absl::OkStatus();
}

absl::Status CudaBackend::ReleaseCaptured(int id) {
  auto it = graphs_.find(id);
  if (it == graphs_.end()) {
    return absl::InvalidArgumentError(absl::StrCat("no captured op sequence ", id));
  }
  // A launch of it may still run (the graph's own block branch included, joined inside it).
  ASYNCTLS_RETURN_IF_ERROR(Synchronize());
  graphs_.erase(it);
  return absl::OkStatus();
}

absl::Status CudaBackend::JoinBlockBranch() {
  if (!block_pending_) return absl::OkStatus();
  block_pending_ = false;
  ASYNCTLS_CUDA_RETURN_IF_ERROR(cudaStreamWaitEvent(stream_.get(), block_join_.get(), 0));
  return absl::OkStatus();
}

absl::Status CudaBackend::TlsSparseAttention(const kernels::TlsSparseAttentionParams& p) {
  ASYNCTLS_RETURN_IF_ERROR(Activate());
  if (!kc::TlsSparseAttentionCanImplement(p.head_dim, p.v_head_dim,
                                          p.num_q_heads / p.num_kv_heads, p.io_dtype)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "tls attention: head_dim ", p.head_dim, " / v ", p.v_head_dim, " / group ",
        p.num_q_heads / p.num_kv_heads, " is not supported by the CUDA kernels"));
  }
  kernels::TlsSparseAttentionParams q = p;
  ASYNCTLS_RETURN_IF_ERROR(EnsureWorkspace(tls_attention_workspace_,
                                           kc::TlsSparseAttentionWorkspaceBytes(q),
                                           "tls attention"));
  ASYNCTLS_RETURN_IF_ERROR(NoteCapture());
  q.workspace = tls_attention_workspace_.memory.get();
  ASYNCTLS_CUDA_OP(kc::TlsSparseAttention(q, stream_.get()));
  return absl::OkStatus();
}

absl::Status CudaBackend::SiluMul(const kernels::SiluMulParams& p) {
  ASYNCTLS_RETURN_IF_ERROR(Activate());
  ASYNCTLS_CUDA_OP(kc::SiluMul(p, stream_.get()));
  return absl::OkStatus();
}

absl::Status CudaBackend::GreedyPick(const kernels::GreedyPickParams& p) {
  ASYNCTLS_RETURN_IF_ERROR(Activate());
  ASYNCTLS_CUDA_OP(kc::GreedyPick(p, stream_.get()));
  return absl::OkStatus();
}

absl::Status CudaBackend::CopyRows(const kernels::CopyRowsParams& p) {
  ASYNCTLS_RETURN_IF_ERROR(Activate());
  ASYNCTLS_RETURN_IF_ERROR(JoinBlockBranch());
  ASYNCTLS_CUDA_OP(kc::CopyRows(p, stream_.get()));
  return absl::OkStatus();
}

absl::Status CudaBackend::KvAppend(const kernels::KvAppendParams& p) {
  ASYNCTLS_RETURN_IF_ERROR(Activate());
  ASYNCTLS_CUDA_OP(kc::KvAppend(p, stream_.get()));
  return absl::OkStatus();
}

absl::Status CheckAttentionShape(int head_dim, DType io_dtype, int num_q_heads, int num_kv_heads) {
  if (num_kv_heads <= 0 || num_q_heads <= 0 || num_q_heads % num_kv_heads != 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "attention: ", num_q_heads, " query heads do not group over ", num_kv_heads, " KV heads"));
  }
  if (!kc::PagedAttentionCanImplement(head_dim, io_dtype, num_q_heads / num_kv_heads)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "attention: head_dim ", head_dim, " / dtype ", static_cast<int>(io_dtype), " / group ",
        num_q_heads / num_kv_heads, " is not supported by the CUDA kernels"));
  }
  return absl::OkStatus();
}

absl::Status CudaBackend::PagedDecodeAttention(const kernels::PagedDecodeParams& p) {
  ASYNCTLS_RETURN_IF_ERROR(Activate());
  ASYNCTLS_RETURN_IF_ERROR(
      CheckAttentionShape(p.head_dim, p.io_dtype, p.num_q_heads, p.num_kv_heads));
  kernels::PagedDecodeParams q = p;
  ASYNCTLS_RETURN_IF_ERROR(EnsureDecodeWorkspace(kc::PagedDecodeWorkspaceBytes(q)));
  ASYNCTLS_RETURN_IF_ERROR(NoteCapture());
  q.workspace = decode_workspace_.memory.get();
  ASYNCTLS_CUDA_OP(kc::PagedDecodeAttention(q, stream_.get()));
  return absl::OkStatus();
}

absl::Status CudaBackend::PagedPrefillAttention(const kernels::PagedPrefillParams& p) {
  ASYNCTLS_RETURN_IF_ERROR(Activate());
  ASYNCTLS_RETURN_IF_ERROR(
      CheckAttentionShape(p.head_dim, p.io_dtype, p.num_q_heads, p.num_kv_heads));
  ASYNCTLS_CUDA_OP(kc::PagedPrefillAttention(p, stream_.get()));
  return absl::OkStatus();
}

absl::StatusOr<DeviceBuffer> CudaBackend::UploadWeight(const float* host, size_t count,
                                                       kernels::DType preferred,
                                                       kernels::DType* stored_dtype) {
  if (preferred != DType::kF32 && preferred != DType::kBF16) {
    return absl::InvalidArgumentError(
        absl::StrCat("UploadWeight: the CUDA backend stores weights as fp32 or bf16, not dtype ",
                     static_cast<int>(preferred)));
  }
  ASYNCTLS_RETURN_IF_ERROR(Activate());
  ASYNCTLS_ASSIGN_OR_RETURN(DeviceBuffer buffer, Allocate(count * kernels::DTypeSize(preferred)));
  if (stored_dtype) *stored_dtype = preferred;
  if (count == 0) return buffer;
  DeviceBuffer staging;
  if (preferred == DType::kF32) {
    ASYNCTLS_RETURN_IF_ERROR(CopyToDevice(buffer.data(), host, count * sizeof(float)));
  } else {
    // Convert on the device through an fp32 staging chunk: the host stays a plain memcpy and
    // the rounding is the kernels' (identical to the host's FloatToBf16).
    const size_t chunk = std::min(count, kUploadChunkElements);
    ASYNCTLS_ASSIGN_OR_RETURN(staging, Allocate(chunk * sizeof(float)));
    for (size_t begin = 0; begin < count; begin += chunk) {
      const size_t n = std::min(chunk, count - begin);
      ASYNCTLS_RETURN_IF_ERROR(CopyToDevice(staging.data(), host + begin, n * sizeof(float)));
      ASYNCTLS_CUDA_OP(kc::ConvertF32ToBf16(staging.as<float>(), buffer.as<kernels::Bf16>() + begin,
                                            static_cast<int64_t>(n), stream_.get()));
    }
  }
  ASYNCTLS_RETURN_IF_ERROR(Synchronize());  // the host data may go away; so does `staging`
  return buffer;
}

}  // namespace

absl::StatusOr<std::unique_ptr<Backend>> MakeCudaBackend(const CudaBackendOptions& options) {
  return CudaBackend::Create(options);
}

absl::StatusOr<std::unique_ptr<Backend>> MakeCudaBackend(int device_ordinal) {
  CudaBackendOptions options;
  options.device_ordinal = device_ordinal;
  return CudaBackend::Create(options);
}

void* CudaBackendStream(Backend& backend) {
  auto* cuda = dynamic_cast<CudaBackend*>(&backend);
  return cuda ? static_cast<void*>(cuda->stream()) : nullptr;
}

bool CudaAvailable() {
  int count = 0;
  const bool ok = cudaGetDeviceCount(&count) == cudaSuccess && count > 0;
  if (!ok) cudaGetLastError();
  return ok;
}

}  // namespace asynctls

#else  // !ASYNCTLS_HAVE_CUDA

namespace asynctls {

absl::StatusOr<std::unique_ptr<Backend>> MakeCudaBackend(const CudaBackendOptions&) {
  return absl::UnavailableError("this build has no CUDA (configured with -DASYNCTLS_CUDA=OFF)");
}

absl::StatusOr<std::unique_ptr<Backend>> MakeCudaBackend(int) {
  return MakeCudaBackend(CudaBackendOptions{});
}

void* CudaBackendStream(Backend&) { return nullptr; }

bool CudaAvailable() { return false; }

}  // namespace asynctls

#endif  // ASYNCTLS_HAVE_CUDA
