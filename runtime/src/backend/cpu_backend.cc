// The CPU backend: the embedded default without a GPU. GEMMs through OpenBLAS, attention with
// a tiled online-softmax loop spread over a thread pool; the cheap element-wise ops reuse the
// reference kernels (they cost nothing next to the GEMMs).
#include <cblas.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "asynctls/kernels/ref.h"
#include "asynctls/kernels/tls_ref.h"
#include "asynctls/runtime/backend.h"
#include "asynctls/runtime/logging.h"
#include "asynctls/runtime/status.h"
#include "backend/thread_pool.h"

extern "C" void openblas_set_num_threads(int num_threads);
extern "C" char* openblas_get_corename(void);

namespace asynctls {
namespace {

using kernels::Bf16;
using kernels::Bf16ToFloat;
using kernels::DType;
using kernels::kKvBlockSize;

constexpr int kQueryTile = 16;  // query rows per prefill task

// OpenBLAS picks its GEMM kernels from the CPU model when it loads. A model it does not know
// (a virtualized Xeon with AVX-512, for one) gets the SSE3 "Prescott" kernels: on such a 2-core
// machine the quickstart's 2,269-token prefill took 19.2 s, and 14.0 s with the AVX-512 ones
// (OPENBLAS_CORETYPE=SkylakeX). The choice cannot change after loading, so say it once.
void WarnIfBlasKernelsAreGeneric() {
  static std::once_flag once;
  std::call_once(once, [] {
    const char* core = openblas_get_corename();
    if (core == nullptr || std::getenv("OPENBLAS_CORETYPE") != nullptr) return;
    const std::string name = core;
    if (name != "Prescott" && name != "Core2" && name != "Penryn" && name != "Nehalem") return;
    const char *isa = nullptr, *better = nullptr;
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl")) {
      isa = "AVX-512", better = "SkylakeX";
    } else if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
      isa = "AVX2", better = "Haswell";
    }
    if (better == nullptr) return;
    ASYNCTLS_LOG_WARN("cpu: OpenBLAS chose its ", name, " kernels on a CPU with ", isa,
                      "; set OPENBLAS_CORETYPE=", better, " for faster GEMMs");
  });
}

// Q rows of one (sequence, KV head) task: `num_rows` rows, each with its own causal limit.
struct AttentionTask {
  const float* const* q_rows;  // [num_rows] -> head_dim floats
  float* const* out_rows;      // [num_rows]
  const int32_t* visible;      // [num_rows] positions [0, visible) are attended
  float* maybe_lse;            // [num_rows] or null (strided by lse_stride)
  int num_rows;
};

// Online-softmax attention over the paged cache of one sequence and one KV head, a block of
// 64 keys at a time (converted from bf16 once per block for all rows).
void AttendPaged(const AttentionTask& task, const void* k_cache, const void* v_cache,
                 const int32_t* block_table, int kv_head, int num_kv_heads, int head_dim,
                 float scale, float* const* lse_out) {
  const int max_visible = *std::max_element(task.visible, task.visible + task.num_rows);
  const int num_blocks = (max_visible + kKvBlockSize - 1) / kKvBlockSize;
  // K transposed ([dim][key]) so the scores accumulate over dims into independent keys (a loop
  // the compiler vectorizes; a dot product per key is one dependent chain of adds). The adds run
  // in the same order as that dot product, so the scores are bit-identical to it.
  std::vector<float> kt(head_dim * kKvBlockSize), v(kKvBlockSize * head_dim);
  std::vector<float> m(task.num_rows, -std::numeric_limits<float>::infinity());
  std::vector<float> l(task.num_rows, 0.f);
  std::vector<float> acc(static_cast<size_t>(task.num_rows) * head_dim, 0.f);
  float s[kKvBlockSize];
  for (int blk = 0; blk < num_blocks; ++blk) {
    const int64_t base =
        (int64_t{block_table[blk]} * num_kv_heads + kv_head) * kKvBlockSize * head_dim;
    const int n = std::min(kKvBlockSize, max_visible - blk * kKvBlockSize);
    const Bf16* kb = static_cast<const Bf16*>(k_cache) + base;
    const Bf16* vb = static_cast<const Bf16*>(v_cache) + base;
    for (int j = 0; j < n; ++j) {
      for (int d = 0; d < head_dim; ++d)
        kt[d * kKvBlockSize + j] = Bf16ToFloat(kb[j * head_dim + d]);
    }
    for (int i = 0; i < n * head_dim; ++i) v[i] = Bf16ToFloat(vb[i]);
    for (int r = 0; r < task.num_rows; ++r) {
      const int limit = std::min(n, task.visible[r] - blk * kKvBlockSize);
      if (limit <= 0) continue;
      const float* q = task.q_rows[r];
      float block_max = -std::numeric_limits<float>::infinity();
      std::fill(s, s + limit, 0.f);
      for (int d = 0; d < head_dim; ++d) {
        const float qd = q[d];
        const float* kd = &kt[d * kKvBlockSize];
        for (int j = 0; j < limit; ++j) s[j] += qd * kd[j];
      }
      for (int j = 0; j < limit; ++j) {
        s[j] *= scale;
        block_max = std::max(block_max, s[j]);
      }
      const float new_m = std::max(m[r], block_max);
      const float correction = std::exp(m[r] - new_m);
      float* a = &acc[static_cast<size_t>(r) * head_dim];
      for (int d = 0; d < head_dim; ++d) a[d] *= correction;
      float sum = 0.f;
      for (int j = 0; j < limit; ++j) {
        const float p = std::exp(s[j] - new_m);
        sum += p;
        const float* vr = &v[j * head_dim];
        for (int d = 0; d < head_dim; ++d) a[d] += p * vr[d];
      }
      l[r] = l[r] * correction + sum;
      m[r] = new_m;
    }
  }
  for (int r = 0; r < task.num_rows; ++r) {
    const float inv = 1.f / l[r];
    for (int d = 0; d < head_dim; ++d) task.out_rows[r][d] = acc[static_cast<size_t>(r) * head_dim + d] * inv;
    if (lse_out && lse_out[r]) *lse_out[r] = m[r] + std::log(l[r]);
  }
}

class CpuBackend final : public Backend {
 public:
  explicit CpuBackend(int num_threads) : pool_(num_threads) {
    openblas_set_num_threads(num_threads);
    WarnIfBlasKernelsAreGeneric();
  }

  DeviceKind kind() const override { return DeviceKind::kCpu; }
  std::string Describe() const override { return absl::StrCat("cpu (", pool_.size(), " threads)"); }

  absl::StatusOr<DeviceBuffer> Allocate(size_t bytes) override {
    void* p = std::aligned_alloc(64, (std::max<size_t>(bytes, 1) + 63) / 64 * 64);
    if (!p) return absl::ResourceExhaustedError(absl::StrCat("cpu: cannot allocate ", bytes, " bytes"));
    return DeviceBuffer(this, p, bytes);
  }
  absl::Status CopyToDevice(void* dst, const void* src, size_t bytes) override {
    std::memcpy(dst, src, bytes);
    return absl::OkStatus();
  }
  absl::Status CopyToHost(void* dst, const void* src, size_t bytes) override {
    std::memcpy(dst, src, bytes);
    return absl::OkStatus();
  }
  absl::Status Fill(void* dst, int byte_value, size_t bytes) override {
    std::memset(dst, byte_value, bytes);
    return absl::OkStatus();
  }
  absl::Status Synchronize() override { return absl::OkStatus(); }
  int64_t FreeMemoryBytes() override {
    return int64_t{sysconf(_SC_AVPHYS_PAGES)} * sysconf(_SC_PAGESIZE);
  }

  absl::Status Embedding(const kernels::EmbeddingParams& p) override {
    kernels::ref::Embedding(p);
    return absl::OkStatus();
  }
  absl::Status RmsNorm(const kernels::RmsNormParams& p) override {
    kernels::ref::RmsNorm(p);
    return absl::OkStatus();
  }
  absl::Status SplitQkv(const kernels::SplitQkvParams& p) override {
    kernels::ref::SplitQkv(p);
    return absl::OkStatus();
  }
  absl::Status Rope(const kernels::RopeParams& p) override {
    kernels::ref::Rope(p);
    return absl::OkStatus();
  }
  absl::Status SiluMul(const kernels::SiluMulParams& p) override {
    kernels::ref::SiluMul(p);
    return absl::OkStatus();
  }
  absl::Status GreedyPick(const kernels::GreedyPickParams& p) override {
    kernels::ref::GreedyPick(p);
    return absl::OkStatus();
  }
  absl::Status KvAppend(const kernels::KvAppendParams& p) override {
    kernels::ref::KvAppend(p);
    return absl::OkStatus();
  }
  absl::Status CopyRows(const kernels::CopyRowsParams& p) override {
    kernels::ref::CopyRows(p);
    return absl::OkStatus();
  }

  absl::Status RandomFill(const kernels::RandomFillParams& p) override {
    kernels::ref::RandomFill(p);
    return absl::OkStatus();
  }

  // The TLS ops run the plain reference (single-threaded): selections equal the GPU's.
  absl::Status TlsIndexUpdate(const kernels::TlsIndexUpdateParams& p) override {
    kernels::ref::TlsIndexUpdate(p);
    return absl::OkStatus();
  }
  absl::Status TlsDecodeSelect(const kernels::TlsDecodeSelectParams& p) override {
    kernels::ref::TlsDecodeSelect(p);
    return absl::OkStatus();
  }
  absl::Status TlsSparseAttention(const kernels::TlsSparseAttentionParams& p) override {
    kernels::ref::TlsSparseAttention(p);
    return absl::OkStatus();
  }

  absl::Status Gemm(const kernels::GemmParams& p) override {
    if (p.w_dtype != DType::kF32) return absl::InvalidArgumentError("cpu Gemm: weights must be fp32");
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, p.m, p.n, p.k, 1.f, p.x, p.k,
                static_cast<const float*>(p.w), p.k, p.beta, p.out, p.n);
    if (p.maybe_bias) {
      for (int64_t i = 0; i < p.m; ++i)
        for (int j = 0; j < p.n; ++j) p.out[i * p.n + j] += p.maybe_bias[j];
    }
    return absl::OkStatus();
  }

  absl::Status PagedDecodeAttention(const kernels::PagedDecodeParams& p) override {
    if (p.io_dtype != DType::kF32) return absl::InvalidArgumentError("cpu attention: fp32 q/out only");
    const int group = p.num_q_heads / p.num_kv_heads;
    const float* q = static_cast<const float*>(p.q);
    float* out = static_cast<float*>(p.out);
    pool_.ParallelFor(int64_t{p.batch} * p.num_kv_heads, [&](int64_t task_id) {
      const int b = static_cast<int>(task_id / p.num_kv_heads);
      const int kvh = static_cast<int>(task_id % p.num_kv_heads);
      std::vector<const float*> q_rows(group);
      std::vector<float*> out_rows(group), lse_rows(group, nullptr);
      std::vector<int32_t> visible(group, p.seq_lens[b]);
      for (int g = 0; g < group; ++g) {
        const int64_t row = int64_t{b} * p.num_q_heads + kvh * group + g;
        q_rows[g] = q + row * p.head_dim;
        out_rows[g] = out + row * p.head_dim;
        if (p.maybe_lse) lse_rows[g] = p.maybe_lse + row;
      }
      AttentionTask task{q_rows.data(), out_rows.data(), visible.data(), nullptr, group};
      AttendPaged(task, p.k_cache, p.v_cache, p.block_table + int64_t{b} * p.max_blocks_per_seq,
                  kvh, p.num_kv_heads, p.head_dim, p.scale, lse_rows.data());
    });
    return absl::OkStatus();
  }

  absl::Status PagedPrefillAttention(const kernels::PagedPrefillParams& p) override {
    if (p.io_dtype != DType::kF32) return absl::InvalidArgumentError("cpu attention: fp32 q/out only");
    const int group = p.num_q_heads / p.num_kv_heads;
    const float* q = static_cast<const float*>(p.q);
    float* out = static_cast<float*>(p.out);
    struct Tile {
      int b, kvh, first_row, rows;
    };
    std::vector<Tile> tiles;
    for (int b = 0; b < p.batch; ++b) {
      const int q_len = p.cu_q_lens[b + 1] - p.cu_q_lens[b];
      for (int kvh = 0; kvh < p.num_kv_heads; ++kvh)
        for (int r = 0; r < q_len; r += kQueryTile) tiles.push_back({b, kvh, r, std::min(kQueryTile, q_len - r)});
    }
    // Longest-first keeps the threads busy to the end (later rows see more keys).
    std::sort(tiles.begin(), tiles.end(), [](const Tile& a, const Tile& b) { return a.first_row > b.first_row; });
    pool_.ParallelFor(static_cast<int64_t>(tiles.size()), [&](int64_t t) {
      const Tile& tile = tiles[t];
      const int q_begin = p.cu_q_lens[tile.b];
      const int q_len = p.cu_q_lens[tile.b + 1] - q_begin;
      const int n = tile.rows * group;
      std::vector<const float*> q_rows(n);
      std::vector<float*> out_rows(n);
      std::vector<int32_t> visible(n);
      for (int i = 0; i < tile.rows; ++i) {
        const int token = q_begin + tile.first_row + i;
        for (int g = 0; g < group; ++g) {
          const int64_t row = int64_t{token} * p.num_q_heads + tile.kvh * group + g;
          q_rows[i * group + g] = q + row * p.head_dim;
          out_rows[i * group + g] = out + row * p.head_dim;
          visible[i * group + g] = p.seq_lens[tile.b] - q_len + tile.first_row + i + 1;
        }
      }
      AttentionTask task{q_rows.data(), out_rows.data(), visible.data(), nullptr, n};
      AttendPaged(task, p.k_cache, p.v_cache, p.block_table + int64_t{tile.b} * p.max_blocks_per_seq,
                  tile.kvh, p.num_kv_heads, p.head_dim, p.scale, nullptr);
    });
    return absl::OkStatus();
  }

  absl::StatusOr<DeviceBuffer> UploadWeight(const float* host, size_t count, DType preferred,
                                            DType* stored_dtype) override {
    ASYNCTLS_ASSIGN_OR_RETURN(DeviceBuffer buf, Allocate(count * sizeof(float)));
    std::memcpy(buf.data(), host, count * sizeof(float));
    *stored_dtype = DType::kF32;
    return buf;
  }

 protected:
  void Free(void* data) override { std::free(data); }

 private:
  ThreadPool pool_;
};

}  // namespace

std::unique_ptr<Backend> MakeCpuBackend(int num_threads) {
  if (num_threads <= 0) num_threads = std::max(1u, std::thread::hardware_concurrency());
  return std::make_unique<CpuBackend>(num_threads);
}

}  // namespace asynctls
