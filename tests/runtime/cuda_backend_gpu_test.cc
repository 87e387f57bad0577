// The CUDA backend through the Backend interface only (no CUDA headers: this file builds in
// a CPU-only configure too): memory, error codes, and every op against the CPU oracle.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "asynctls/kernels/ref.h"
#include "asynctls/runtime/backend.h"
#include "asynctls/runtime/cuda_backend.h"

#if ASYNCTLS_HAVE_CUDA
#include <cuda_runtime_api.h>
#endif

namespace asynctls {
namespace {

using kernels::Bf16;
using kernels::DType;
using kernels::kKvBlockSize;

constexpr double kF32ElementwiseNmse = 1e-7;
constexpr double kF32GemmNmse = 1e-7;
constexpr double kBf16GemmNmse = 1e-5;
constexpr double kAttentionNmse = 5e-4;
constexpr double kAttentionMaxAbs = 2e-2;

double Nmse(const std::vector<float>& a, const std::vector<float>& b) {
  double num = 0, den = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    num += (double{a[i]} - b[i]) * (double{a[i]} - b[i]);
    den += double{b[i]} * b[i];
  }
  return den == 0 ? (num == 0 ? 0 : std::numeric_limits<double>::infinity()) : num / den;
}

double MaxAbs(const std::vector<float>& a, const std::vector<float>& b) {
  double m = 0;
  for (size_t i = 0; i < a.size(); ++i) m = std::max(m, std::fabs(double{a[i]} - b[i]));
  return m;
}

size_t NonFinite(const std::vector<float>& a) {
  return std::count_if(a.begin(), a.end(), [](float x) { return !std::isfinite(x); });
}

void ExpectClose(const std::vector<float>& actual, const std::vector<float>& expected,
                 double nmse) {
  ASSERT_EQ(actual.size(), expected.size());
  EXPECT_EQ(NonFinite(actual), 0u);
  EXPECT_LE(Nmse(actual, expected), nmse) << "max-abs " << MaxAbs(actual, expected);
}

TEST(CudaBackendAvailabilityTest, UnavailableWithoutCuda) {
  if (CudaAvailable()) GTEST_SKIP() << "a CUDA device is present";
  const auto backend = MakeCudaBackend(0);
  EXPECT_EQ(backend.status().code(), absl::StatusCode::kUnavailable) << backend.status();
}

class CudaBackendTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!CudaAvailable()) GTEST_SKIP() << "no CUDA device";
    seed_ = std::random_device{}();
    rng_.seed(seed_);
    auto backend = MakeCudaBackend(0);
    ASSERT_TRUE(backend.ok()) << backend.status();
    backend_ = *std::move(backend);
  }

  std::vector<float> Normal(size_t n, float stddev = 1.f) {
    std::normal_distribution<float> dist(0.f, stddev);
    std::vector<float> v(n);
    for (auto& x : v) x = dist(rng_);
    return v;
  }

  template <typename T>
  DeviceBuffer Upload(const std::vector<T>& host) {
    auto buffer = backend_->Allocate(host.size() * sizeof(T));
    EXPECT_TRUE(buffer.ok()) << buffer.status();
    EXPECT_TRUE(backend_->CopyToDevice(buffer->data(), host.data(), host.size() * sizeof(T)).ok());
    return *std::move(buffer);
  }

  // A device buffer of `count` T filled with 0xff bytes (NaN for fp32 and bf16).
  template <typename T>
  DeviceBuffer Poisoned(size_t count) {
    auto buffer = backend_->Allocate(count * sizeof(T));
    EXPECT_TRUE(buffer.ok()) << buffer.status();
    EXPECT_TRUE(backend_->Fill(buffer->data(), 0xff, count * sizeof(T)).ok());
    return *std::move(buffer);
  }

  template <typename T>
  std::vector<T> Download(const DeviceBuffer& buffer, size_t count) {
    std::vector<T> host(count);
    const absl::Status s = backend_->CopyToHost(host.data(), buffer.data(), count * sizeof(T));
    EXPECT_TRUE(s.ok()) << s;
    return host;
  }

  std::string Seed() const { return "seed " + std::to_string(seed_); }

  uint64_t seed_ = 0;
  std::mt19937_64 rng_;
  std::unique_ptr<Backend> backend_;
};

TEST_F(CudaBackendTest, DescribesItself) {
  EXPECT_EQ(backend_->kind(), DeviceKind::kCuda);
  EXPECT_EQ(backend_->Describe().rfind("cuda:0 ", 0), 0u) << backend_->Describe();
}

TEST_F(CudaBackendTest, MissingDeviceIsUnavailable) {
  const auto backend = MakeCudaBackend(1 << 20);
  EXPECT_EQ(backend.status().code(), absl::StatusCode::kUnavailable) << backend.status();
}

TEST_F(CudaBackendTest, HugeAllocationIsResourceExhaustedAndRecoverable) {
  const auto huge = backend_->Allocate(size_t{1} << 50);
  EXPECT_EQ(huge.status().code(), absl::StatusCode::kResourceExhausted) << huge.status();
  EXPECT_NE(huge.status().message().find("cudaMalloc"), absl::string_view::npos);
  // The failed allocation leaves no error behind for the next op.
  const std::vector<float> x = Normal(64);
  DeviceBuffer d = Upload(x);
  DeviceBuffer w = Upload(std::vector<float>(64, 1.f));
  DeviceBuffer out = Poisoned<float>(64);
  ASSERT_TRUE(
      backend_->RmsNorm({d.as<float>(), w.as<float>(), out.as<float>(), 1, 64, 1e-6f}).ok());
  EXPECT_EQ(NonFinite(Download<float>(out, 64)), 0u);
}

TEST_F(CudaBackendTest, CopiesAndFills) {
  const std::vector<float> x = Normal(1000);
  DeviceBuffer d = Upload(x);
  EXPECT_EQ(Download<float>(d, x.size()), x);
  ASSERT_TRUE(backend_->Fill(d.data(), 0, d.bytes()).ok());
  EXPECT_EQ(Download<float>(d, x.size()), std::vector<float>(x.size(), 0.f));
  EXPECT_TRUE(backend_->Allocate(0).ok());
}

TEST_F(CudaBackendTest, CopiesToPageLockedHostMemory) {
  const std::vector<float> x = Normal(100000);
  DeviceBuffer d = Upload(x);
  auto host = backend_->AllocateHost(x.size() * sizeof(float));
  ASSERT_TRUE(host.ok()) << host.status();
  EXPECT_EQ(host->bytes(), x.size() * sizeof(float));
#if ASYNCTLS_HAVE_CUDA
  cudaPointerAttributes attr{};
  ASSERT_EQ(cudaPointerGetAttributes(&attr, host->data()), cudaSuccess);
  EXPECT_EQ(attr.type, cudaMemoryTypeHost);  // page-locked, not pageable
#endif
  ASSERT_TRUE(backend_->CopyToHost(host->data(), d.data(), d.bytes()).ok());
  EXPECT_EQ(std::vector<float>(host->as<float>(), host->as<float>() + x.size()), x);
  EXPECT_TRUE(backend_->AllocateHost(0).ok());
}

TEST_F(CudaBackendTest, BadShapeIsInvalidArgumentNamingTheOp) {
  DeviceBuffer q = Poisoned<float>(64), k = Poisoned<float>(64);
  const absl::Status s = backend_->Rope({q.as<float>(), k.as<float>(), nullptr, nullptr, 1, 1, 1,
                                         64, /*rotary_dim=*/65, kernels::RopeStyle::kHalf});
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
  EXPECT_NE(s.message().find("Rope"), absl::string_view::npos) << s;
  EXPECT_NE(s.message().find("cuda_backend.cc:"), absl::string_view::npos) << s;
}

TEST_F(CudaBackendTest, UploadWeightStoresRequestedDtype) {
  SCOPED_TRACE(Seed());
  // Longer than one 16M-element staging chunk, with an odd tail.
  const size_t count = (size_t{16} << 20) + 5;
  std::vector<float> host = Normal(count);
  host[3] = std::numeric_limits<float>::quiet_NaN();
  DType stored = DType::kI32;
  auto bf16 = backend_->UploadWeight(host.data(), count, DType::kBF16, &stored);
  ASSERT_TRUE(bf16.ok()) << bf16.status();
  EXPECT_EQ(stored, DType::kBF16);
  const std::vector<Bf16> got = Download<Bf16>(*bf16, count);
  size_t mismatches = 0;
  for (size_t i = 0; i < count; ++i) {
    mismatches += got[i].bits != kernels::FloatToBf16(host[i]).bits;
  }
  EXPECT_EQ(mismatches, 0u);

  auto f32 = backend_->UploadWeight(host.data(), 1000, DType::kF32, &stored);
  ASSERT_TRUE(f32.ok()) << f32.status();
  EXPECT_EQ(stored, DType::kF32);
  const std::vector<float> back = Download<float>(*f32, 1000);
  EXPECT_EQ(std::memcmp(back.data(), host.data(), 1000 * sizeof(float)), 0);

  EXPECT_EQ(backend_->UploadWeight(host.data(), 10, DType::kI32, &stored).status().code(),
            absl::StatusCode::kInvalidArgument);
}

// One Llama-style layer's dense ops on odd shapes, each compared with the oracle.
TEST_F(CudaBackendTest, DenseOpsMatchOracle) {
  SCOPED_TRACE(Seed());
  constexpr int kVocab = 500, kHidden = 576, kFfn = 1536, kHeads = 9, kKvHeads = 3, kHeadDim = 64;
  for (int tokens : {1, 17, 97}) {
    SCOPED_TRACE(::testing::Message() << "tokens " << tokens);
    // Embedding (bf16 table through UploadWeight).
    const std::vector<float> table = Normal(size_t{kVocab} * kHidden);
    DType table_dtype;
    auto d_table = backend_->UploadWeight(table.data(), table.size(), DType::kBF16, &table_dtype);
    ASSERT_TRUE(d_table.ok()) << d_table.status();
    std::vector<Bf16> table_bf16(table.size());
    for (size_t i = 0; i < table.size(); ++i) table_bf16[i] = kernels::FloatToBf16(table[i]);
    std::vector<int32_t> ids(tokens);
    for (auto& id : ids) id = static_cast<int32_t>(rng_() % kVocab);
    std::vector<float> x(size_t(tokens) * kHidden);
    kernels::ref::Embedding(
        {table_bf16.data(), ids.data(), x.data(), DType::kBF16, tokens, kHidden, kVocab});
    DeviceBuffer d_ids = Upload(ids), d_x = Poisoned<float>(x.size());
    ASSERT_TRUE(backend_
                    ->Embedding({d_table->data(), d_ids.as<int32_t>(), d_x.as<float>(), table_dtype,
                                 tokens, kHidden, kVocab})
                    .ok());
    ExpectClose(Download<float>(d_x, x.size()), x, 0.0);

    // RmsNorm.
    const std::vector<float> norm_w = Normal(kHidden, 0.2f);
    std::vector<float> h(x.size());
    kernels::ref::RmsNorm({x.data(), norm_w.data(), h.data(), tokens, kHidden, 1e-5f});
    DeviceBuffer d_norm_w = Upload(norm_w), d_h = Poisoned<float>(h.size());
    ASSERT_TRUE(backend_
                    ->RmsNorm({d_x.as<float>(), d_norm_w.as<float>(), d_h.as<float>(), tokens,
                               kHidden, 1e-5f})
                    .ok());
    ExpectClose(Download<float>(d_h, h.size()), h, kF32ElementwiseNmse);

    // fp32 GEMM with bias (qkv projection) and bf16 GEMM with residual accumulate.
    constexpr int kQkv = (kHeads + 2 * kKvHeads) * kHeadDim;
    const std::vector<float> w_qkv = Normal(size_t{kQkv} * kHidden, 0.05f);
    const std::vector<float> bias = Normal(kQkv);
    DType w_dtype;
    auto d_wqkv = backend_->UploadWeight(w_qkv.data(), w_qkv.size(), DType::kF32, &w_dtype);
    ASSERT_TRUE(d_wqkv.ok()) << d_wqkv.status();
    std::vector<float> qkv(size_t(tokens) * kQkv);
    kernels::ref::Gemm(
        {h.data(), w_qkv.data(), bias.data(), qkv.data(), DType::kF32, tokens, kQkv, kHidden, 0.f});
    DeviceBuffer d_bias = Upload(bias), d_qkv = Poisoned<float>(qkv.size());
    DeviceBuffer d_h_exact = Upload(h);  // the oracle's input, so only the GEMM is compared
    absl::Status s = backend_->Gemm({d_h_exact.as<float>(), d_wqkv->data(), d_bias.as<float>(),
                                     d_qkv.as<float>(), w_dtype, tokens, kQkv, kHidden, 0.f});
    ASSERT_TRUE(s.ok()) << s;
    ExpectClose(Download<float>(d_qkv, qkv.size()), qkv, kF32GemmNmse);

    const std::vector<float> w_up = Normal(size_t{2 * kFfn} * kHidden, 0.05f);
    auto d_wup = backend_->UploadWeight(w_up.data(), w_up.size(), DType::kBF16, &w_dtype);
    ASSERT_TRUE(d_wup.ok()) << d_wup.status();
    ASSERT_EQ(w_dtype, DType::kBF16);
    std::vector<Bf16> w_up_bf16(w_up.size());
    for (size_t i = 0; i < w_up.size(); ++i) w_up_bf16[i] = kernels::FloatToBf16(w_up[i]);
    std::vector<float> h_rounded = h;
    for (auto& v : h_rounded) v = kernels::RoundToBf16(v);
    std::vector<float> gate_up = Normal(size_t(tokens) * 2 * kFfn);  // residual accumulate
    DeviceBuffer d_gate_up = Upload(gate_up);
    kernels::ref::Gemm({h_rounded.data(), w_up_bf16.data(), nullptr, gate_up.data(), DType::kBF16,
                        tokens, 2 * kFfn, kHidden, 1.f});
    s = backend_->Gemm({d_h_exact.as<float>(), d_wup->data(), nullptr, d_gate_up.as<float>(),
                        DType::kBF16, tokens, 2 * kFfn, kHidden, 1.f});
    ASSERT_TRUE(s.ok()) << s;
    ExpectClose(Download<float>(d_gate_up, gate_up.size()), gate_up, kBf16GemmNmse);

    // SiluMul.
    std::vector<float> act(size_t(tokens) * kFfn);
    kernels::ref::SiluMul({gate_up.data(), act.data(), tokens, kFfn});
    DeviceBuffer d_gate_up_exact = Upload(gate_up), d_act = Poisoned<float>(act.size());
    ASSERT_TRUE(
        backend_->SiluMul({d_gate_up_exact.as<float>(), d_act.as<float>(), tokens, kFfn}).ok());
    ExpectClose(Download<float>(d_act, act.size()), act, kF32ElementwiseNmse);

    // Rope on separate q / k buffers, half style, partial rotary dim.
    std::vector<float> q = Normal(size_t(tokens) * kHeads * kHeadDim);
    std::vector<float> k = Normal(size_t(tokens) * kKvHeads * kHeadDim);
    std::vector<int32_t> positions(tokens);
    for (int t = 0; t < tokens; ++t) positions[t] = 5000 + 3 * t;
    std::vector<float> inv_freq(kHeadDim / 4);
    for (size_t i = 0; i < inv_freq.size(); ++i) {
      inv_freq[i] = static_cast<float>(std::pow(100000.0, -2.0 * i / (kHeadDim / 2)));
    }
    DeviceBuffer d_q = Upload(q), d_k = Upload(k), d_pos = Upload(positions),
                 d_inv = Upload(inv_freq);
    kernels::ref::Rope({q.data(), k.data(), positions.data(), inv_freq.data(), tokens, kHeads,
                        kKvHeads, kHeadDim, kHeadDim / 2, kernels::RopeStyle::kHalf});
    ASSERT_TRUE(
        backend_
            ->Rope({d_q.as<float>(), d_k.as<float>(), d_pos.as<int32_t>(), d_inv.as<float>(),
                    tokens, kHeads, kKvHeads, kHeadDim, kHeadDim / 2, kernels::RopeStyle::kHalf})
            .ok());
    ExpectClose(Download<float>(d_q, q.size()), q, kF32ElementwiseNmse);
    ExpectClose(Download<float>(d_k, k.size()), k, kF32ElementwiseNmse);
  }
}

#if ASYNCTLS_HAVE_CUDA
// A decode step's GEMM and attention captured into a CUDA graph on the backend's stream replay
// to exactly what eager execution produced; a scratch that would have to grow during a capture
// is FAILED_PRECONDITION, not an allocation.
TEST_F(CudaBackendTest, DecodeStepReplaysFromCudaGraph) {
  SCOPED_TRACE(Seed());
  constexpr int kHeads = 9, kKvHeads = 3, kHeadDim = 64, kHidden = 576, kBatch = 2;
  constexpr int kSeqLen = 300, kBlocksPerSeq = (kSeqLen + kKvBlockSize - 1) / kKvBlockSize;
  CudaBackendOptions options;
  options.max_gemm_x_elements = kBatch * kHidden;
  options.max_decode_batch = 4;
  options.max_seq_len = 4096;
  options.num_q_heads = kHeads;
  options.num_kv_heads = kKvHeads;
  options.head_dim = kHeadDim;
  auto made = MakeCudaBackend(options);
  ASSERT_TRUE(made.ok()) << made.status();
  Backend& be = **made;
  auto stream = static_cast<cudaStream_t>(CudaBackendStream(be));
  ASSERT_NE(stream, nullptr);
  EXPECT_NE(CudaBackendStream(*backend_), nullptr);

  auto upload = [&](const auto& host) {
    auto b = be.Allocate(host.size() * sizeof(host[0]));
    EXPECT_TRUE(b.ok());
    EXPECT_TRUE(be.CopyToDevice(b->data(), host.data(), b->bytes()).ok());
    return *std::move(b);
  };
  const std::vector<float> w = Normal(size_t{kHeads} * kHeadDim * kHidden, 0.05f);
  DType w_dtype;
  auto d_w = be.UploadWeight(w.data(), w.size(), DType::kBF16, &w_dtype);
  ASSERT_TRUE(d_w.ok()) << d_w.status();
  DeviceBuffer d_x = upload(Normal(kBatch * kHidden));
  std::vector<int32_t> table(kBatch * kBlocksPerSeq);
  std::iota(table.begin(), table.end(), 0);
  const size_t pool = table.size() * kKvHeads * kKvBlockSize * kHeadDim;
  std::vector<Bf16> cache(pool);
  for (auto& c : cache) c = kernels::FloatToBf16(Normal(1)[0]);
  DeviceBuffer d_kc = upload(cache), d_vc = upload(cache), d_table = upload(table),
               d_lens = upload(std::vector<int32_t>(kBatch, kSeqLen));
  auto d_q = be.Allocate(kBatch * kHeads * kHeadDim * sizeof(float));
  auto d_out = be.Allocate(kBatch * kHeads * kHeadDim * sizeof(float));
  ASSERT_TRUE(d_q.ok() && d_out.ok());

  const kernels::GemmParams gemm{d_x.as<float>(),   d_w->data(), nullptr,
                                 d_q->as<float>(),  w_dtype,     kBatch,
                                 kHeads * kHeadDim, kHidden,     0.f};
  kernels::PagedDecodeParams attn{};
  attn.q = d_q->data();
  attn.k_cache = d_kc.data();
  attn.v_cache = d_vc.data();
  attn.block_table = d_table.as<int32_t>();
  attn.seq_lens = d_lens.as<int32_t>();
  attn.out = d_out->data();
  attn.io_dtype = DType::kF32;
  attn.batch = kBatch;
  attn.num_q_heads = kHeads;
  attn.num_kv_heads = kKvHeads;
  attn.head_dim = kHeadDim;
  attn.max_blocks_per_seq = kBlocksPerSeq;
  attn.max_seq_len = kSeqLen;
  attn.scale = 0.125f;

  ASSERT_TRUE(be.Gemm(gemm).ok());
  ASSERT_TRUE(be.PagedDecodeAttention(attn).ok());
  std::vector<float> eager(kBatch * kHeads * kHeadDim), replayed(eager.size());
  ASSERT_TRUE(be.CopyToHost(eager.data(), d_out->data(), d_out->bytes()).ok());
  ASSERT_TRUE(be.Fill(d_q->data(), 0xff, d_q->bytes()).ok());
  ASSERT_TRUE(be.Fill(d_out->data(), 0xff, d_out->bytes()).ok());
  ASSERT_TRUE(be.Synchronize().ok());

  DeviceBuffer d_x2 = upload(Normal(2 * kBatch * kHidden));
  auto d_out2_or = be.Allocate(2 * kBatch * kHeads * kHeadDim * sizeof(float));
  ASSERT_TRUE(d_out2_or.ok());
  DeviceBuffer d_out2 = *std::move(d_out2_or);
  ASSERT_TRUE(be.Synchronize().ok());

  cudaGraph_t graph = nullptr;
  ASSERT_EQ(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal), cudaSuccess);
  const absl::Status gemm_status = be.Gemm(gemm);
  const absl::Status attn_status = be.PagedDecodeAttention(attn);
  // m * k beyond the bf16 scratch: would need an allocation inside the capture.
  kernels::GemmParams too_big = gemm;
  too_big.m = 2 * kBatch;
  too_big.x = d_x2.as<float>();
  too_big.out = d_out2.as<float>();
  const absl::Status grow_status = be.Gemm(too_big);
  ASSERT_EQ(cudaStreamEndCapture(stream, &graph), cudaSuccess);
  ASSERT_TRUE(gemm_status.ok()) << gemm_status;
  ASSERT_TRUE(attn_status.ok()) << attn_status;
  EXPECT_EQ(grow_status.code(), absl::StatusCode::kFailedPrecondition) << grow_status;
  cudaGraphExec_t exec = nullptr;
  ASSERT_EQ(cudaGraphInstantiate(&exec, graph, 0), cudaSuccess);
  ASSERT_EQ(cudaGraphLaunch(exec, stream), cudaSuccess);
  ASSERT_TRUE(be.CopyToHost(replayed.data(), d_out->data(), d_out->bytes()).ok());
  EXPECT_EQ(NonFinite(replayed), 0u);
  EXPECT_EQ(std::memcmp(replayed.data(), eager.data(), eager.size() * sizeof(float)), 0);
  // Outside the capture the scratch grows on demand (the graph's old scratch stays alive).
  const absl::Status grown = be.Gemm(too_big);
  EXPECT_TRUE(grown.ok()) << grown;
  ASSERT_EQ(cudaGraphLaunch(exec, stream), cudaSuccess);
  ASSERT_TRUE(be.CopyToHost(replayed.data(), d_out->data(), d_out->bytes()).ok());
  EXPECT_EQ(std::memcmp(replayed.data(), eager.data(), eager.size() * sizeof(float)), 0);
  cudaGraphExecDestroy(exec);
  cudaGraphDestroy(graph);
}
#endif  // ASYNCTLS_HAVE_CUDA

// A paged KV cache filled through KvAppend (strided rows of a fused qkv buffer, shuffled
// blocks), then decode and prefill attention against the oracle. The backend starts with no
// decode workspace reserved, so the first decode grows it, and a longer context grows it again.
TEST_F(CudaBackendTest, KvAppendAndAttentionMatchOracle) {
  SCOPED_TRACE(Seed());
  constexpr int kHeads = 9, kKvHeads = 3, kHeadDim = 64;
  constexpr int kQkvRow = (kHeads + 2 * kKvHeads) * kHeadDim;
  for (const std::vector<int32_t>& seq_lens :
       {std::vector<int32_t>{1, 77}, std::vector<int32_t>{1000, 5, 4097}}) {
    const int batch = static_cast<int>(seq_lens.size());
    int max_blocks = 0, total_blocks = 0, total_tokens = 0, max_len = 0;
    for (int32_t len : seq_lens) {
      const int blocks = (len + kKvBlockSize - 1) / kKvBlockSize;
      max_blocks = std::max(max_blocks, blocks);
      total_blocks += blocks;
      total_tokens += len;
      max_len = std::max(max_len, len);
    }
    const int num_blocks = total_blocks + 2;
    std::vector<int32_t> ids(num_blocks);
    std::iota(ids.begin(), ids.end(), 0);
    std::shuffle(ids.begin(), ids.end(), rng_);
    std::vector<int32_t> block_table(size_t(batch) * max_blocks, 0), slots;
    int next = 0;
    for (int b = 0; b < batch; ++b) {
      for (int j = 0; j * kKvBlockSize < seq_lens[b]; ++j) {
        block_table[size_t(b) * max_blocks + j] = ids[next++];
      }
      for (int t = 0; t < seq_lens[b]; ++t) {
        slots.push_back(block_table[size_t(b) * max_blocks + t / kKvBlockSize] * kKvBlockSize +
                        t % kKvBlockSize);
      }
    }
    // All tokens' K/V in one fused qkv buffer: [tokens, q | k | v].
    const std::vector<float> qkv = Normal(size_t(total_tokens) * kQkvRow);
    const size_t pool = size_t(num_blocks) * kKvHeads * kKvBlockSize * kHeadDim;
    // Unused slots hold the same NaN bytes as the poisoned device pools.
    std::vector<Bf16> k_cache(pool, Bf16{0xffff}), v_cache(pool, Bf16{0xffff});
    kernels::ref::KvAppend(
        {qkv.data() + kHeads * kHeadDim, qkv.data() + (kHeads + kKvHeads) * kHeadDim, slots.data(),
         k_cache.data(), v_cache.data(), total_tokens, kKvHeads, kHeadDim, kQkvRow, kQkvRow});
    DeviceBuffer d_qkv = Upload(qkv), d_slots = Upload(slots), d_kc = Poisoned<Bf16>(pool),
                 d_vc = Poisoned<Bf16>(pool);
    ASSERT_TRUE(backend_
                    ->KvAppend({d_qkv.as<float>() + kHeads * kHeadDim,
                                d_qkv.as<float>() + (kHeads + kKvHeads) * kHeadDim,
                                d_slots.as<int32_t>(), d_kc.data(), d_vc.data(), total_tokens,
                                kKvHeads, kHeadDim, kQkvRow, kQkvRow})
                    .ok());
    const std::vector<Bf16> got_k = Download<Bf16>(d_kc, pool);
    const std::vector<Bf16> got_v = Download<Bf16>(d_vc, pool);
    EXPECT_EQ(std::memcmp(got_k.data(), k_cache.data(), pool * sizeof(Bf16)), 0);
    EXPECT_EQ(std::memcmp(got_v.data(), v_cache.data(), pool * sizeof(Bf16)), 0);

    DeviceBuffer d_table = Upload(block_table), d_lens = Upload(seq_lens);

    // Decode: one query per sequence.
    const std::vector<float> q = Normal(size_t(batch) * kHeads * kHeadDim);
    std::vector<float> out(q.size()), lse(size_t(batch) * kHeads);
    kernels::PagedDecodeParams p{};
    p.q = q.data();
    p.k_cache = k_cache.data();
    p.v_cache = v_cache.data();
    p.block_table = block_table.data();
    p.seq_lens = seq_lens.data();
    p.out = out.data();
    p.maybe_lse = lse.data();
    p.io_dtype = DType::kF32;
    p.batch = batch;
    p.num_q_heads = kHeads;
    p.num_kv_heads = kKvHeads;
    p.head_dim = kHeadDim;
    p.max_blocks_per_seq = max_blocks;
    p.max_seq_len = max_len;
    p.scale = 1.f / std::sqrt(float{kHeadDim});
    kernels::ref::PagedDecodeAttention(p);
    DeviceBuffer d_q = Upload(q), d_out = Poisoned<float>(out.size()),
                 d_lse = Poisoned<float>(lse.size());
    kernels::PagedDecodeParams dp = p;
    dp.q = d_q.data();
    dp.k_cache = d_kc.data();
    dp.v_cache = d_vc.data();
    dp.block_table = d_table.as<int32_t>();
    dp.seq_lens = d_lens.as<int32_t>();
    dp.out = d_out.data();
    dp.maybe_lse = d_lse.as<float>();
    absl::Status s = backend_->PagedDecodeAttention(dp);
    ASSERT_TRUE(s.ok()) << s;
    const std::vector<float> got = Download<float>(d_out, out.size());
    ExpectClose(got, out, kAttentionNmse);
    EXPECT_LE(MaxAbs(got, out), kAttentionMaxAbs);
    ExpectClose(Download<float>(d_lse, lse.size()), lse, 1e-6);

    // Prefill: the last 17 (or fewer) positions of each sequence.
    std::vector<int32_t> cu(batch + 1, 0);
    int max_q = 0;
    for (int b = 0; b < batch; ++b) {
      const int q_len = std::min(17, seq_lens[b]);
      cu[b + 1] = cu[b] + q_len;
      max_q = std::max(max_q, q_len);
    }
    const std::vector<float> pq = Normal(size_t(cu[batch]) * kHeads * kHeadDim);
    std::vector<float> pout(pq.size());
    kernels::PagedPrefillParams pp{};
    pp.q = pq.data();
    pp.cu_q_lens = cu.data();
    pp.k_cache = k_cache.data();
    pp.v_cache = v_cache.data();
    pp.block_table = block_table.data();
    pp.seq_lens = seq_lens.data();
    pp.out = pout.data();
    pp.io_dtype = DType::kF32;
    pp.batch = batch;
    pp.num_tokens = cu[batch];
    pp.num_q_heads = kHeads;
    pp.num_kv_heads = kKvHeads;
    pp.head_dim = kHeadDim;
    pp.max_blocks_per_seq = max_blocks;
    pp.max_q_len = max_q;
    pp.scale = p.scale;
    kernels::ref::PagedPrefillAttention(pp);
    DeviceBuffer d_pq = Upload(pq), d_cu = Upload(cu), d_pout = Poisoned<float>(pout.size());
    kernels::PagedPrefillParams dpp = pp;
    dpp.q = d_pq.data();
    dpp.cu_q_lens = d_cu.as<int32_t>();
    dpp.k_cache = d_kc.data();
    dpp.v_cache = d_vc.data();
    dpp.block_table = d_table.as<int32_t>();
    dpp.seq_lens = d_lens.as<int32_t>();
    dpp.out = d_pout.data();
    s = backend_->PagedPrefillAttention(dpp);
    ASSERT_TRUE(s.ok()) << s;
    const std::vector<float> pgot = Download<float>(d_pout, pout.size());
    ExpectClose(pgot, pout, kAttentionNmse);
    EXPECT_LE(MaxAbs(pgot, pout), kAttentionMaxAbs);
  }
}

TEST_F(CudaBackendTest, UnsupportedAttentionShapeIsInvalidArgument) {
  kernels::PagedDecodeParams p{};
  p.num_q_heads = 9;
  p.num_kv_heads = 2;  // 9 heads do not group over 2
  p.head_dim = 64;
  EXPECT_EQ(backend_->PagedDecodeAttention(p).code(), absl::StatusCode::kInvalidArgument);
}

TEST_F(CudaBackendTest, ReservesDecodeWorkspaceFromOptions) {
  CudaBackendOptions options;
  options.max_decode_batch = 64;
  options.max_seq_len = 32768;
  options.num_q_heads = 32;
  options.num_kv_heads = 8;
  options.head_dim = 128;
  auto backend = MakeCudaBackend(options);
  ASSERT_TRUE(backend.ok()) << backend.status();
  EXPECT_EQ((*backend)->kind(), DeviceKind::kCuda);
}

}  // namespace
}  // namespace asynctls
