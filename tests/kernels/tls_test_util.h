// Case generators for the TLS op tests (CPU and GPU) and benchmarks: a paged KV cache with its
// block and token indices built by the reference, queries, and the policies to sweep.
#pragma once

#include <algorithm>
#include <cstdint>
#include <limits>
#include <set>
#include <vector>

#include "asynctls/kernels/tls_params.h"
#include "asynctls/kernels/tls_ref.h"
#include "kernels/test_util.h"

namespace asynctls::kernels::testing {

struct TlsCase {
  int batch = 0, num_q_heads = 0, num_kv_heads = 0, head_dim = 0, v_head_dim = 0;
  int num_channels = 0;
  bool mla = false;  // v_cache = k_cache, v_head_dim = 512
  PagedKvCache kv;
  // Index rows: one per KV pool block; index_table = the KV block table.
  int num_index_rows = 0;
  std::vector<int32_t> index_table;
  std::vector<Bf16> kmax, kmin;   // [rows, kv heads, head_dim]
  std::vector<int32_t> channels;  // [kv heads, num_channels]
  std::vector<uint8_t> codes;     // [rows, kv heads, 64, num_channels / 2]
  std::vector<float> scales;      // [rows, kv heads, 64]
  TypedBuffer q;                  // [batch, q heads, head_dim]

  int group() const { return num_q_heads / num_kv_heads; }
  const std::vector<int32_t>& seq_lens() const { return kv.seq_lens; }
  int max_blocks_per_seq() const { return kv.max_blocks_per_seq; }
};

// Builds a case: random keys/values, channel set C calibrated by the reference from the queries
// and the cached keys, both indices built by ref::TlsIndexUpdate (pools poisoned first).
inline TlsCase MakeTlsCase(const std::vector<int32_t>& seq_lens, int num_q_heads, int num_kv_heads,
                           int head_dim, int num_channels, DType io_dtype, bool mla = false) {
  TlsCase c;
  c.batch = static_cast<int>(seq_lens.size());
  c.num_q_heads = num_q_heads;
  c.num_kv_heads = num_kv_heads;
  c.head_dim = head_dim;
  c.mla = mla;
  c.v_head_dim = mla ? 512 : head_dim;
  c.num_channels = num_channels;
  c.kv = MakePagedKvCache(seq_lens, num_kv_heads, head_dim);
  c.num_index_rows = c.kv.num_blocks;
  c.index_table = c.kv.block_table;
  // Give a few channels a larger scale so calibration has something to find.
  for (size_t i = 0; i < c.kv.k.size(); i += head_dim) {
    for (int d = 0; d < head_dim; d += 7) {
      const float v = Bf16ToFloat(c.kv.k[i + d]);
      if (!std::isnan(v)) c.kv.k[i + d] = FloatToBf16(v * 3.f);
    }
  }
  c.q = MakeTyped(RandomNormal(size_t(c.batch) * num_q_heads * head_dim), io_dtype);

  std::vector<float> q_absmax(size_t(num_q_heads) * head_dim, 0.f);
  std::vector<float> k_absmax(size_t(num_kv_heads) * head_dim, 0.f);
  for (int b = 0; b < c.batch; ++b) {
    std::vector<float> kd(size_t(seq_lens[b]) * num_kv_heads * head_dim);
    for (int h = 0; h < num_kv_heads; ++h) {
      const std::vector<float> dense = c.kv.Dense(c.kv.k, b, h);
      for (int t = 0; t < seq_lens[b]; ++t) {
        std::copy_n(dense.begin() + size_t(t) * head_dim, head_dim,
                    kd.begin() + (size_t(t) * num_kv_heads + h) * head_dim);
      }
    }
    // Keys: every cached token (q side disabled); queries: this sequence's row.
    ref::TlsCalibStats({nullptr, kd.data(), q_absmax.data(), k_absmax.data(), DType::kF32,
                        seq_lens[b], 0, num_kv_heads, head_dim});
    ref::TlsCalibStats({c.q.values.data() + size_t(b) * num_q_heads * head_dim, nullptr,
                        q_absmax.data(), k_absmax.data(), DType::kF32, 1, num_q_heads, 0,
                        head_dim});
  }
  c.channels.assign(size_t(num_kv_heads) * num_channels, 0);
  ref::TlsCalibSelect({q_absmax.data(), k_absmax.data(), c.channels.data(), nullptr, num_q_heads,
                       num_kv_heads, head_dim, num_channels});

  const size_t rows = size_t(c.num_index_rows) * num_kv_heads;
  c.kmax.assign(rows * head_dim, kBf16NaN);
  c.kmin.assign(rows * head_dim, kBf16NaN);
  c.codes.assign(rows * kKvBlockSize * (num_channels / 2), 0xff);
  c.scales.assign(rows * kKvBlockSize, std::numeric_limits<float>::quiet_NaN());
  std::vector<int32_t> start(c.batch, 0);
  int max_len = 0;
  for (int32_t l : seq_lens) max_len = std::max(max_len, l);
  TlsIndexUpdateParams u{c.kv.k.data(),
                         c.kv.block_table.data(),
                         c.index_table.data(),
                         start.data(),
                         c.kv.seq_lens.data(),
                         c.kmax.data(),
                         c.kmin.data(),
                         c.channels.data(),
                         c.codes.data(),
                         c.scales.data(),
                         c.batch,
                         num_kv_heads,
                         head_dim,
                         num_channels,
                         c.kv.max_blocks_per_seq,
                         max_len};
  ref::TlsIndexUpdate(u);
  return c;
}

// The case's block index in its int8 form (tls_params.h): ref::TlsIndexUpdate over the cached
// tokens, all at once or (steps) a chunk of each sequence at a time.
struct Int8BlockIndex {
  std::vector<int8_t> kmax, kmin;  // [rows, kv heads, head_dim]
  std::vector<float> scales;       // [rows, kv heads]
};

inline Int8BlockIndex MakeInt8BlockIndex(const TlsCase& c, const std::vector<int>& steps = {}) {
  const size_t rows = size_t(c.num_index_rows) * c.num_kv_heads;
  Int8BlockIndex x;
  x.kmax.assign(rows * c.head_dim, 0x55);
  x.kmin.assign(rows * c.head_dim, 0x55);
  x.scales.assign(rows, std::numeric_limits<float>::quiet_NaN());
  int max_len = 0;
  for (int32_t l : c.seq_lens()) max_len = std::max(max_len, l);
  std::vector<int32_t> done(c.batch, 0);
  for (size_t i = 0; i < std::max<size_t>(1, steps.size()); ++i) {
    const int step = steps.empty() ? max_len : steps[i];
    std::vector<int32_t> end(c.batch);
    for (int b = 0; b < c.batch; ++b) end[b] = std::min(c.seq_lens()[b], done[b] + step);
    TlsIndexUpdateParams u{};
    u.k_cache = c.kv.k.data();
    u.block_table = c.kv.block_table.data();
    u.index_table = c.index_table.data();
    u.start_pos = done.data();
    u.seq_lens = end.data();
    u.block_kmax = x.kmax.data();
    u.block_kmin = x.kmin.data();
    u.maybe_block_scales = x.scales.data();
    u.batch = c.batch;
    u.num_kv_heads = c.num_kv_heads;
    u.head_dim = c.head_dim;
    u.max_blocks_per_seq = c.max_blocks_per_seq();
    u.max_new_tokens = step;
    ref::TlsIndexUpdate(u);
    done = end;
  }
  return x;
}

// Keys the int8 block index must code exactly like the reference (planted after MakeTlsCase, so
// c's bf16 and token indices no longer match them): sequence 0's second block opens with three
// all-zero keys in every head (a row of scale 0, then merged at scale 0, then re-coded), and NaN
// keys (their dims code to +-127) in sequence 0's first and second blocks and at the last
// sequence's last position. Sequence 0 must hold more than 70 tokens.
inline void PlantInt8EdgeKeys(TlsCase& c) {
  auto set = [&](int b, int pos, int g, int d, float v) {
    c.kv.k[c.kv.Offset(b, pos, g) + d] = FloatToBf16(v);
  };
  const float nan = std::numeric_limits<float>::quiet_NaN();
  for (int pos = 64; pos < 67; ++pos) {
    for (int g = 0; g < c.num_kv_heads; ++g) {
      for (int d = 0; d < c.head_dim; ++d) set(0, pos, g, d, 0.f);
    }
  }
  set(0, 5, 0, 3, nan);
  set(0, 70, c.num_kv_heads - 1, c.head_dim - 1, nan);
  set(c.batch - 1, c.seq_lens().back() - 1, 0, 0, nan);
}

// Rows of a [rows, stride] positions buffer as sets, for exact comparisons.
inline std::vector<std::vector<int32_t>> Rows(const std::vector<int32_t>& data,
                                              const std::vector<int32_t>& counts, int stride) {
  std::vector<std::vector<int32_t>> out(counts.size());
  for (size_t r = 0; r < counts.size(); ++r) {
    out[r].assign(data.begin() + r * stride, data.begin() + r * stride + counts[r]);
  }
  return out;
}

inline TlsPolicy MakePolicy(TlsMode mode, TlsLag lag, int block_budget, int token_budget,
                            int sink_blocks = 1, int window = 64) {
  TlsPolicy p;
  p.mode = mode;
  p.lag = lag;
  p.block_budget = block_budget;
  p.token_budget = token_budget;
  p.sink_blocks = sink_blocks;
  p.window = window;
  return p;
}

// Host-side buffers of one TlsDecodeSelect call (outputs sized from the policy).
struct TlsSelectBuffers {
  int max_kept_blocks = 0, max_positions = 0;
  std::vector<int32_t> blocks, num_blocks, positions, num_positions;
  std::vector<int32_t> prev_blocks, prev_num_blocks, prev_select_lens;
};

inline TlsDecodeSelectParams MakeDecodeSelectParams(const TlsCase& c, const TlsPolicy& policy,
                                                    TlsSelectBuffers& buf) {
  buf.max_kept_blocks = std::max(1, TlsKeptBlocks(policy));
  buf.max_positions = TlsMaxSelectedTokens(policy, c.max_blocks_per_seq());
  const size_t rows = size_t(c.batch) * c.num_kv_heads;
  buf.blocks.assign(rows * buf.max_kept_blocks, -7);
  buf.num_blocks.assign(rows, -7);
  buf.positions.assign(rows * buf.max_positions, -7);
  buf.num_positions.assign(rows, -7);
  TlsDecodeSelectParams p{};
  p.policy = policy;
  p.q = c.q.data();
  p.seq_lens = c.kv.seq_lens.data();
  p.index_table = c.index_table.data();
  p.block_kmax = c.kmax.data();
  p.block_kmin = c.kmin.data();
  p.channels = c.channels.data();
  p.token_codes = c.codes.data();
  p.token_scales = c.scales.data();
  p.prev_blocks = buf.prev_blocks.empty() ? nullptr : buf.prev_blocks.data();
  p.prev_num_blocks = buf.prev_num_blocks.empty() ? nullptr : buf.prev_num_blocks.data();
  p.prev_select_lens = buf.prev_select_lens.empty() ? nullptr : buf.prev_select_lens.data();
  p.blocks = buf.blocks.data();
  p.num_blocks = buf.num_blocks.data();
  p.positions = buf.positions.data();
  p.num_positions = buf.num_positions.data();
  p.io_dtype = c.q.dtype;
  p.batch = c.batch;
  p.num_q_heads = c.num_q_heads;
  p.num_kv_heads = c.num_kv_heads;
  p.head_dim = c.head_dim;
  p.num_channels = c.num_channels;
  p.max_blocks_per_seq = c.max_blocks_per_seq();
  p.max_kept_blocks = buf.max_kept_blocks;
  p.max_positions = buf.max_positions;
  p.scale = 1.f / std::sqrt(static_cast<float>(c.head_dim));
  return p;
}

}  // namespace asynctls::kernels::testing

#if ASYNCTLS_HAVE_CUDA
#include "asynctls/kernels/cuda_tls.h"

namespace asynctls::kernels::testing {

// Device copies of a TlsCase (index pools included, as built by the reference).
struct DeviceTlsCase {
  DeviceBuffer k, v, block_table, index_table, seq_lens, kmax, kmin, channels, codes, scales, q;

  cudaError_t Upload(const TlsCase& c) {
    cudaError_t e;
    if ((e = k.Upload(c.kv.k)) != cudaSuccess) return e;
    if ((e = v.Upload(c.kv.v)) != cudaSuccess) return e;
    if ((e = block_table.Upload(c.kv.block_table)) != cudaSuccess) return e;
    if ((e = index_table.Upload(c.index_table)) != cudaSuccess) return e;
    if ((e = seq_lens.Upload(c.kv.seq_lens)) != cudaSuccess) return e;
    if ((e = kmax.Upload(c.kmax)) != cudaSuccess) return e;
    if ((e = kmin.Upload(c.kmin)) != cudaSuccess) return e;
    if ((e = channels.Upload(c.channels)) != cudaSuccess) return e;
    if ((e = codes.Upload(c.codes)) != cudaSuccess) return e;
    if ((e = scales.Upload(c.scales)) != cudaSuccess) return e;
    return q.Upload(c.q.bytes);
  }
};

// A device run of decode-select `p` (its reference run sized `buf`): the inputs from `d`, the
// previous step's lists from `buf`, outputs poisoned (-7) so a kernel that skips a slot shows.
struct DeviceSelectRun {
  DeviceBuffer prev_blocks, prev_num_blocks, prev_select_lens, blocks, num_blocks, positions,
      num_positions, workspace;
  TlsDecodeSelectParams params{};

  cudaError_t Prepare(const TlsDecodeSelectParams& p, const DeviceTlsCase& d,
                      const TlsSelectBuffers& buf) {
    auto or_zero = [](const std::vector<int32_t>& v) {
      return v.empty() ? std::vector<int32_t>{0} : v;
    };
    auto poisoned = [](const std::vector<int32_t>& v) {
      return std::vector<int32_t>(v.size(), -7);
    };
    cudaError_t e;
    if ((e = prev_blocks.Upload(or_zero(buf.prev_blocks))) != cudaSuccess) return e;
    if ((e = prev_num_blocks.Upload(or_zero(buf.prev_num_blocks))) != cudaSuccess) return e;
    if ((e = prev_select_lens.Upload(or_zero(buf.prev_select_lens))) != cudaSuccess) return e;
    if ((e = blocks.Upload(poisoned(buf.blocks))) != cudaSuccess) return e;
    if ((e = num_blocks.Upload(poisoned(buf.num_blocks))) != cudaSuccess) return e;
    if ((e = positions.Upload(poisoned(buf.positions))) != cudaSuccess) return e;
    if ((e = num_positions.Upload(poisoned(buf.num_positions))) != cudaSuccess) return e;
    params = p;
    params.q = d.q.get();
    params.seq_lens = d.seq_lens.as<int32_t>();
    params.index_table = d.index_table.as<int32_t>();
    params.block_kmax = d.kmax.get();
    params.block_kmin = d.kmin.get();
    params.channels = d.channels.as<int32_t>();
    params.token_codes = d.codes.as<uint8_t>();
    params.token_scales = d.scales.as<float>();
    params.maybe_block_scales = nullptr;  // `d` holds the bf16 index; callers set an int8 one
    params.prev_blocks = p.prev_blocks ? prev_blocks.as<int32_t>() : nullptr;
    params.prev_num_blocks = p.prev_num_blocks ? prev_num_blocks.as<int32_t>() : nullptr;
    params.prev_select_lens = p.prev_select_lens ? prev_select_lens.as<int32_t>() : nullptr;
    params.blocks = blocks.as<int32_t>();
    params.num_blocks = num_blocks.as<int32_t>();
    params.positions = positions.as<int32_t>();
    params.num_positions = num_positions.as<int32_t>();
    e = workspace.Resize(std::max<size_t>(1, cuda::TlsDecodeSelectWorkspaceBytes(params)));
    params.workspace = workspace.get();
    return e;
  }
};

template <typename T>
std::vector<T> Download(const DeviceBuffer& d, size_t count) {
  std::vector<T> out(count);
  if (count) d.Download(out.data(), count * sizeof(T));
  return out;
}

}  // namespace asynctls::kernels::testing
#endif  // ASYNCTLS_HAVE_CUDA
