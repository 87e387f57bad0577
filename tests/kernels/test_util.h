// Shared helpers for kernel compare tests and benchmarks: seeded random fills, error metrics
// (NMSE, max-abs, NaN count), bf16 buffers, paged KV cache builders with shuffled block tables,
// and (when the build has CUDA) a device-buffer RAII type and a "is there a GPU" probe.
//
// Header-only so that CPU tests, GPU tests (.cc built by the host compiler) and benchmarks
// (.cu built by nvcc) can all include it. Nothing here allocates on the device unless asked.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "asynctls/kernels/types.h"

#if ASYNCTLS_HAVE_CUDA
#include <cuda_runtime_api.h>
#endif

namespace asynctls::kernels::testing {

// ---- random fills -------------------------------------------------------------------------

// Seeded per call site; tests print the seed on failure through SCOPED_TRACE.
inline std::mt19937_64& Rng() {
  static thread_local std::mt19937_64 rng(0x5eed);
  return rng;
}
inline void Reseed(uint64_t seed) { Rng().seed(seed); }

inline std::vector<float> RandomF32(size_t n, float lo = -1.f, float hi = 1.f) {
  std::uniform_real_distribution<float> dist(lo, hi);
  std::vector<float> v(n);
  for (auto& x : v) x = dist(Rng());
  return v;
}

inline std::vector<float> RandomNormal(size_t n, float stddev = 1.f) {
  std::normal_distribution<float> dist(0.f, stddev);
  std::vector<float> v(n);
  for (auto& x : v) x = dist(Rng());
  return v;
}

inline std::vector<Bf16> ToBf16(const std::vector<float>& v) {
  std::vector<Bf16> out(v.size());
  for (size_t i = 0; i < v.size(); ++i) out[i] = FloatToBf16(v[i]);
  return out;
}

inline std::vector<float> ToF32(const std::vector<Bf16>& v) {
  std::vector<float> out(v.size());
  for (size_t i = 0; i < v.size(); ++i) out[i] = Bf16ToFloat(v[i]);
  return out;
}

inline std::vector<Bf16> RandomBf16(size_t n, float stddev = 1.f) {
  return ToBf16(RandomNormal(n, stddev));
}

inline constexpr Bf16 kBf16NaN{0x7fc0};

// Activations stored as `dtype` (kF32 or kBF16) in a byte vector, plus the float values the
// oracle sees (bf16-rounded when dtype is bf16, so both sides read identical inputs).
struct TypedBuffer {
  DType dtype = DType::kF32;
  std::vector<uint8_t> bytes;
  std::vector<float> values;
  size_t size() const { return values.size(); }
  void* data() { return bytes.data(); }
  const void* data() const { return bytes.data(); }
};

inline TypedBuffer MakeTyped(const std::vector<float>& v, DType dtype) {
  TypedBuffer t;
  t.dtype = dtype;
  t.values = v;
  t.bytes.resize(v.size() * DTypeSize(dtype));
  for (size_t i = 0; i < v.size(); ++i) {
    if (dtype == DType::kBF16) {
      const Bf16 h = FloatToBf16(v[i]);
      t.values[i] = Bf16ToFloat(h);
      std::memcpy(t.bytes.data() + 2 * i, &h, 2);
    } else {
      std::memcpy(t.bytes.data() + 4 * i, &v[i], 4);
    }
  }
  return t;
}

// Reads `count` elements of `dtype` from raw bytes as floats.
inline std::vector<float> ReadTyped(const void* bytes, DType dtype, size_t count) {
  std::vector<float> out(count);
  for (size_t i = 0; i < count; ++i) {
    if (dtype == DType::kBF16) {
      Bf16 h;
      std::memcpy(&h, static_cast<const uint8_t*>(bytes) + 2 * i, 2);
      out[i] = Bf16ToFloat(h);
    } else {
      std::memcpy(&out[i], static_cast<const uint8_t*>(bytes) + 4 * i, 4);
    }
  }
  return out;
}

// ---- error metrics -------------------------------------------------------------------------

// Normalized mean squared error sum((a-b)^2) / sum(b^2), b the reference. NaN anywhere -> NaN.
inline double Nmse(const float* actual, const float* expected, size_t n) {
  double num = 0, den = 0;
  for (size_t i = 0; i < n; ++i) {
    const double d = double{actual[i]} - double{expected[i]};
    num += d * d;
    den += double{expected[i]} * double{expected[i]};
  }
  if (den == 0) return num == 0 ? 0 : std::numeric_limits<double>::infinity();
  return num / den;
}
inline double Nmse(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() != b.size() ? std::numeric_limits<double>::infinity()
                              : Nmse(a.data(), b.data(), a.size());
}

// max |a - b|; NaN anywhere -> NaN.
inline double MaxAbsDiff(const float* a, const float* b, size_t n) {
  double m = 0;
  for (size_t i = 0; i < n; ++i) {
    const double d = std::fabs(double{a[i]} - double{b[i]});
    if (std::isnan(d)) return std::numeric_limits<double>::quiet_NaN();
    m = std::max(m, d);
  }
  return m;
}
inline double MaxAbsDiff(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() != b.size() ? std::numeric_limits<double>::infinity()
                              : MaxAbsDiff(a.data(), b.data(), a.size());
}

inline size_t CountNonFinite(const float* a, size_t n) {
  size_t c = 0;
  for (size_t i = 0; i < n; ++i) c += !std::isfinite(a[i]);
  return c;
}
inline size_t CountNonFinite(const std::vector<float>& a) {
  return CountNonFinite(a.data(), a.size());
}

// Tolerances of STYLE.md's table, one per output kind.
struct Tolerance {
  double nmse;
  double max_abs;
};
inline constexpr Tolerance kBf16AttentionTol{5e-4, 2e-2};
inline constexpr Tolerance kF32ElementwiseTol{1e-7, 1e-5};

// ---- paged KV cache ------------------------------------------------------------------------

// A paged bf16 K/V pool ([num_blocks, num_kv_heads, kKvBlockSize, head_dim]) with one block
// table per sequence. Blocks are handed out in a shuffled order (tables are not monotonic and
// sequences interleave), a few spare blocks stay unused, and every slot that no sequence owns
// (unused blocks, the tail of each last block) holds NaN: a kernel that reads past seq_len or
// trusts table entries beyond the sequence shows up as NaN in its output.
struct PagedKvCache {
  int num_kv_heads = 0, head_dim = 0, num_blocks = 0, max_blocks_per_seq = 0;
  std::vector<int32_t> seq_lens;     // [batch]
  std::vector<int32_t> block_table;  // [batch, max_blocks_per_seq]; see unused_entry below
  std::vector<Bf16> k, v;            // pools

  int batch() const { return static_cast<int>(seq_lens.size()); }
  int max_seq_len() const {
    return seq_lens.empty() ? 0 : *std::max_element(seq_lens.begin(), seq_lens.end());
  }
  size_t PoolElements() const {
    return size_t(num_blocks) * num_kv_heads * kKvBlockSize * head_dim;
  }
  // Offset of (sequence b, position pos, kv head h, dim 0) in the pools.
  size_t Offset(int b, int pos, int h) const {
    const int64_t block = block_table[size_t(b) * max_blocks_per_seq + pos / kKvBlockSize];
    return ((size_t(block) * num_kv_heads + h) * kKvBlockSize + pos % kKvBlockSize) * head_dim;
  }
  // Dense copy of one sequence's K (or V) for head h: [seq_len, head_dim] floats.
  std::vector<float> Dense(const std::vector<Bf16>& pool, int b, int h) const {
    std::vector<float> out(size_t(seq_lens[b]) * head_dim);
    for (int t = 0; t < seq_lens[b]; ++t) {
      const size_t off = Offset(b, t, h);
      for (int d = 0; d < head_dim; ++d) out[size_t(t) * head_dim + d] = Bf16ToFloat(pool[off + d]);
    }
    return out;
  }
};

// `unused_entry` fills table entries past each sequence's last block: a valid block id (0) by
// default so a kernel that reads them does not fault but sees NaN data; pass -1 to make such
// reads fault under a memory checker.
inline PagedKvCache MakePagedKvCache(const std::vector<int32_t>& seq_lens, int num_kv_heads,
                                     int head_dim, int spare_blocks = 3, int extra_table_cols = 1,
                                     float stddev = 1.f, int32_t unused_entry = 0) {
  PagedKvCache c;
  c.num_kv_heads = num_kv_heads;
  c.head_dim = head_dim;
  c.seq_lens = seq_lens;
  int total = 0;
  for (int32_t len : seq_lens) {
    const int blocks = (len + kKvBlockSize - 1) / kKvBlockSize;
    c.max_blocks_per_seq = std::max(c.max_blocks_per_seq, blocks);
    total += blocks;
  }
  c.max_blocks_per_seq += extra_table_cols;
  c.num_blocks = total + spare_blocks;
  std::vector<int32_t> ids(c.num_blocks);
  std::iota(ids.begin(), ids.end(), 0);
  std::shuffle(ids.begin(), ids.end(), Rng());
  c.block_table.assign(size_t(c.batch()) * c.max_blocks_per_seq, unused_entry);
  // Round-robin over sequences so that consecutive ids of one sequence are not adjacent.
  std::vector<int> next(c.batch(), 0);
  size_t cursor = 0;
  for (bool more = true; more;) {
    more = false;
    for (int b = 0; b < c.batch(); ++b) {
      const int blocks = (seq_lens[b] + kKvBlockSize - 1) / kKvBlockSize;
      if (next[b] < blocks) {
        c.block_table[size_t(b) * c.max_blocks_per_seq + next[b]++] = ids[cursor++];
        more = true;
      }
    }
  }
  c.k.assign(c.PoolElements(), kBf16NaN);
  c.v.assign(c.PoolElements(), kBf16NaN);
  std::normal_distribution<float> dist(0.f, stddev);
  for (int b = 0; b < c.batch(); ++b) {
    for (int t = 0; t < seq_lens[b]; ++t) {
      for (int h = 0; h < num_kv_heads; ++h) {
        const size_t off = c.Offset(b, t, h);
        for (int d = 0; d < head_dim; ++d) {
          c.k[off + d] = FloatToBf16(dist(Rng()));
          c.v[off + d] = FloatToBf16(dist(Rng()));
        }
      }
    }
  }
  return c;
}

// Exclusive prefix sums with a leading 0: [0, a0, a0+a1, ...].
inline std::vector<int32_t> CumulativeLens(const std::vector<int32_t>& lens) {
  std::vector<int32_t> cu(lens.size() + 1, 0);
  for (size_t i = 0; i < lens.size(); ++i) cu[i + 1] = cu[i] + lens[i];
  return cu;
}

// ---- CUDA helpers --------------------------------------------------------------------------

#if ASYNCTLS_HAVE_CUDA
// True when a CUDA device is usable; GPU tests GTEST_SKIP otherwise.
inline bool HasCudaDevice() {
  int n = 0;
  return cudaGetDeviceCount(&n) == cudaSuccess && n > 0;
}

// Owning device allocation (test/bench only: aborts the check through the returned status).
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  explicit DeviceBuffer(size_t bytes) { Resize(bytes); }
  ~DeviceBuffer() { Free(); }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  DeviceBuffer(DeviceBuffer&& o) noexcept : ptr_(o.ptr_), bytes_(o.bytes_) {
    o.ptr_ = nullptr;
    o.bytes_ = 0;
  }
  DeviceBuffer& operator=(DeviceBuffer&& o) noexcept {
    if (this != &o) {
      Free();
      ptr_ = o.ptr_;
      bytes_ = o.bytes_;
      o.ptr_ = nullptr;
      o.bytes_ = 0;
    }
    return *this;
  }

  cudaError_t Resize(size_t bytes) {
    Free();
    bytes_ = bytes;
    return bytes ? cudaMalloc(&ptr_, bytes) : cudaSuccess;
  }

  // Stream ordering: without a stream these use the legacy default stream (cudaMemcpy /
  // cudaMemset), and a kernel launched on a cudaStreamNonBlocking stream is NOT ordered after
  // them: cudaMemset is asynchronous to the host, and a cudaMemcpy from pageable memory may
  // return before its DMA has landed. Pass the stream the kernel runs on (or synchronize the
  // device before launching). With a stream, Download waits for that stream.
  template <typename T>
  cudaError_t Upload(const std::vector<T>& host, cudaStream_t stream = nullptr) {
    cudaError_t err = cudaSuccess;
    if (bytes_ < host.size() * sizeof(T)) err = Resize(host.size() * sizeof(T));
    if (err != cudaSuccess) return err;
    const size_t bytes = host.size() * sizeof(T);
    return stream ? cudaMemcpyAsync(ptr_, host.data(), bytes, cudaMemcpyHostToDevice, stream)
                  : cudaMemcpy(ptr_, host.data(), bytes, cudaMemcpyHostToDevice);
  }
  cudaError_t Download(void* host, size_t bytes, cudaStream_t stream = nullptr) const {
    if (!stream) return cudaMemcpy(host, ptr_, bytes, cudaMemcpyDeviceToHost);
    const cudaError_t err = cudaMemcpyAsync(host, ptr_, bytes, cudaMemcpyDeviceToHost, stream);
    return err != cudaSuccess ? err : cudaStreamSynchronize(stream);
  }
  // Sets every byte of the buffer to `byte`.
  cudaError_t FillBytes(int byte, cudaStream_t stream = nullptr) {
    if (!ptr_) return cudaSuccess;
    return stream ? cudaMemsetAsync(ptr_, byte, bytes_, stream) : cudaMemset(ptr_, byte, bytes_);
  }
  // Byte fill: 0xff gives NaN for fp32 and bf16 alike (poisoned outputs).
  cudaError_t Poison(cudaStream_t stream = nullptr) { return FillBytes(0xff, stream); }

  void* get() const { return ptr_; }
  template <typename T>
  T* as() const {
    return static_cast<T*>(ptr_);
  }
  size_t bytes() const { return bytes_; }

 private:
  void Free() {
    if (ptr_) cudaFree(ptr_);
    ptr_ = nullptr;
    bytes_ = 0;
  }
  void* ptr_ = nullptr;
  size_t bytes_ = 0;
};

// Device copies of a PagedKvCache.
struct DevicePagedKvCache {
  DeviceBuffer k, v, block_table, seq_lens;
  // On `stream` when given (see DeviceBuffer: launches on another stream must not race it).
  cudaError_t Upload(const PagedKvCache& c, cudaStream_t stream = nullptr) {
    cudaError_t e;
    if ((e = k.Upload(c.k, stream)) != cudaSuccess) return e;
    if ((e = v.Upload(c.v, stream)) != cudaSuccess) return e;
    if ((e = block_table.Upload(c.block_table, stream)) != cudaSuccess) return e;
    return seq_lens.Upload(c.seq_lens, stream);
  }
};
#endif  // ASYNCTLS_HAVE_CUDA

}  // namespace asynctls::kernels::testing
