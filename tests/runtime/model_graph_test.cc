// The bookkeeping of ModelLoadOptions::cuda_graphs on the CPU, through a backend that pretends to
// capture: a "capture" runs the ops once (so that step's logits are real), a "replay" runs
// nothing, and the backend counts the graphs alive. A tiny random model; no GPU, no checkpoint.
// Checks the shape of a growing sequence (one per table-width bucket, not one per KV block),
// that the padded block table changes no logit, that a failed capture is not retried every step,
// and that graphs are evicted least recently used first and freed with the model.
#include <gtest/gtest.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <memory>
#include <set>
#include <utility>
#include <vector>

#include "absl/container/flat_hash_set.h"
#include "asynctls/runtime/backend.h"
#include "asynctls/runtime/kv_cache.h"
#include "asynctls/runtime/model.h"

namespace asynctls {
namespace {

// The CPU backend with CaptureOps / LaunchCaptured / ReleaseCaptured faked as above.
class PretendGraphBackend final : public Backend {
 public:
  bool fail_captures = false;
  int capture_attempts = 0;
  // (max_blocks_per_seq, max_seq_len) of the dense decodes captured.
  std::set<std::pair<int, int>> captured_decodes;

  size_t live_graphs() const { return live_.size(); }

  bool CanCaptureOps() const override { return true; }
  absl::StatusOr<int> CaptureOps(const std::function<absl::Status()>& ops) override {
    ++capture_attempts;
    if (fail_captures) return absl::FailedPreconditionError("pretend capture failure");
    capturing_ = true;
    const absl::Status s = ops();
    capturing_ = false;
    if (!s.ok()) return s;
    live_.insert(next_id_);
    return next_id_++;
  }
  absl::Status LaunchCaptured(int id) override {
    return live_.contains(id) ? absl::OkStatus()
                              : absl::InvalidArgumentError("launch of a released graph");
  }
  absl::Status ReleaseCaptured(int id) override {
    return live_.erase(id) == 1 ? absl::OkStatus()
                                : absl::InvalidArgumentError("release of an unknown graph");
  }

  DeviceKind kind() const override { return cpu_->kind(); }
  std::string Describe() const override { return "pretend-graph " + cpu_->Describe(); }
  absl::StatusOr<DeviceBuffer> Allocate(size_t bytes) override { return cpu_->Allocate(bytes); }
  absl::Status CopyToDevice(void* dst, const void* src, size_t bytes) override {
    return cpu_->CopyToDevice(dst, src, bytes);
  }
  absl::Status CopyToHost(void* dst, const void* src, size_t bytes) override {
    return cpu_->CopyToHost(dst, src, bytes);
  }
  absl::Status Fill(void* dst, int byte_value, size_t bytes) override {
    return cpu_->Fill(dst, byte_value, bytes);
  }
  absl::Status Synchronize() override { return cpu_->Synchronize(); }
  int64_t FreeMemoryBytes() override { return cpu_->FreeMemoryBytes(); }
  absl::Status Embedding(const kernels::EmbeddingParams& p) override { return cpu_->Embedding(p); }
  absl::Status RmsNorm(const kernels::RmsNormParams& p) override { return cpu_->RmsNorm(p); }
  absl::Status Gemm(const kernels::GemmParams& p) override { return cpu_->Gemm(p); }
  absl::Status Rope(const kernels::RopeParams& p) override { return cpu_->Rope(p); }
  absl::Status SplitQkv(const kernels::SplitQkvParams& p) override { return cpu_->SplitQkv(p); }
  absl::Status SiluMul(const kernels::SiluMulParams& p) override { return cpu_->SiluMul(p); }
  absl::Status GreedyPick(const kernels::GreedyPickParams& p) override {
    return cpu_->GreedyPick(p);
  }
  absl::Status KvAppend(const kernels::KvAppendParams& p) override { return cpu_->KvAppend(p); }
  absl::Status CopyRows(const kernels::CopyRowsParams& p) override { return cpu_->CopyRows(p); }
  absl::Status PagedDecodeAttention(const kernels::PagedDecodeParams& p) override {
    if (capturing_) captured_decodes.insert({p.max_blocks_per_seq, p.max_seq_len});
    return cpu_->PagedDecodeAttention(p);
  }
  absl::Status PagedPrefillAttention(const kernels::PagedPrefillParams& p) override {
    return cpu_->PagedPrefillAttention(p);
  }
  absl::Status RandomFill(const kernels::RandomFillParams& p) override {
    return cpu_->RandomFill(p);
  }
  absl::Status TlsIndexUpdate(const kernels::TlsIndexUpdateParams& p) override {
    return cpu_->TlsIndexUpdate(p);
  }
  absl::Status TlsDecodeSelect(const kernels::TlsDecodeSelectParams& p) override {
    return cpu_->TlsDecodeSelect(p);
  }
  absl::Status TlsSparseAttention(const kernels::TlsSparseAttentionParams& p) override {
    return cpu_->TlsSparseAttention(p);
  }
  absl::StatusOr<DeviceBuffer> UploadWeight(const float* host, size_t count,
                                            kernels::DType preferred,
                                            kernels::DType* stored_dtype) override {
    return cpu_->UploadWeight(host, count, preferred, stored_dtype);
  }

 protected:
  void Free(void*) override {}  // every buffer is the CPU backend's, freed by it

 private:
  std::unique_ptr<Backend> cpu_ = MakeCpuBackend(1);
  absl::flat_hash_set<int> live_;
  int next_id_ = 0;
  bool capturing_ = false;
};

constexpr int kHeadDim = 32;

ModelConfig TinyConfig() {
  ModelConfig c;
  c.architecture = "llama";
  c.name = "tiny";
  c.num_layers = 1;
  c.hidden_size = 64;
  c.num_q_heads = 2;
  c.num_kv_heads = 1;
  c.head_dim = kHeadDim;
  c.rotary_dim = kHeadDim;
  c.ffn_size = 64;
  c.vocab_size = 128;
  c.max_context = 8192;
  return c;
}

std::unique_ptr<Model> TinyModel(Backend& backend, bool cuda_graphs) {
  ModelLoadOptions options;
  options.max_batch_tokens = 16;
  options.max_batch_seqs = 4;
  options.cuda_graphs = cuda_graphs;
  auto model = Model::Random(TinyConfig(), 7, &backend, options);
  EXPECT_TRUE(model.ok()) << model.status();
  return model.ok() ? std::move(*model) : nullptr;
}

// Channel sets 0..15 of every head, and a same-step two-level policy of 4 blocks, 96 tokens.
TlsDecodeOptions TinyTls() {
  TlsDecodeOptions tls;
  tls.policy.lag = kernels::TlsLag::kSameStep;
  tls.policy.block_budget = 4;
  tls.policy.token_budget = 96;
  tls.channels.num_layers = 1;
  tls.channels.num_q_heads = 2;
  tls.channels.num_kv_heads = 1;
  tls.channels.head_dim = kHeadDim;
  tls.channels.num_channels = 16;
  for (int i = 0; i < 16; ++i) tls.channels.channels.push_back(i);
  return tls;
}

std::unique_ptr<KvCache> TinyCache(Backend& backend, int num_blocks, bool tls = false) {
  auto cache = KvCache::Create(&backend, 1, 1, kHeadDim, num_blocks, tls ? 16 : 0);
  EXPECT_TRUE(cache.ok()) << cache.status();
  return cache.ok() ? std::move(*cache) : nullptr;
}

// The one-token decode batch of sequence 1 at `position` in `cache`, as the engine builds it.
ForwardBatch DecodeBatch(KvCache& cache, int position, bool tls = false) {
  EXPECT_TRUE(cache.Reserve(1, position + 1).ok());
  ForwardBatch b;
  b.tokens = {position % 100};
  b.positions = {position};
  b.slots = {cache.SlotOf(1, position)};
  b.cu_q_lens = {0, 1};
  b.seq_lens = {position + 1};
  b.block_table = cache.Blocks(1);
  b.max_blocks_per_seq = static_cast<int32_t>(b.block_table.size());
  b.logit_rows = {0};
  if (tls) b.tls_decode.push_back({4, 96});
  return b;
}

bool SameBits(const std::vector<float>& a, const std::vector<float>& b) {
  if (a.size() != b.size()) return false;
  for (size_t i = 0; i < a.size(); ++i) {
    if (std::bit_cast<uint32_t>(a[i]) != std::bit_cast<uint32_t>(b[i])) return false;
  }
  return true;
}

// A sequence decoding from 100 to 4,200 tokens crosses 64 KV blocks but only 5 table widths (16,
// 32, 48, 64, 80 blocks): 5 shapes, each run once, captured, then replayed. The steps whose ops
// ran (the first of each shape and its capture) give the logits of a model without graphs, bit
// for bit: the padded table and the dense decode planned for the width read nothing more. Dense
// decode, then two-level sparse decode (whose index table is the padded block table).
TEST(ModelGraphTest, GrowingSequenceChangesShapeOncePerWidthBucket) {
  for (const bool tls : {false, true}) {
    SCOPED_TRACE(tls ? "tls" : "dense");
    PretendGraphBackend backend;
    std::unique_ptr<Model> graphed = TinyModel(backend, true);
    std::unique_ptr<Model> eager = TinyModel(backend, false);
    ASSERT_TRUE(graphed && eager);
    if (tls) {
      ASSERT_TRUE(graphed->EnableTls(TinyTls()).ok());
      ASSERT_TRUE(eager->EnableTls(TinyTls()).ok());
    }
    std::unique_ptr<KvCache> graphed_cache = TinyCache(backend, 70, tls);
    std::unique_ptr<KvCache> eager_cache = TinyCache(backend, 70, tls);
    ASSERT_TRUE(graphed_cache && eager_cache);
    std::vector<float> graphed_logits, eager_logits;
    auto decode = [&](Model& model, KvCache& cache, int position, std::vector<float>* logits) {
      return model.Forward(DecodeBatch(cache, position, tls), cache, logits);
    };
    int compared = 0;
    for (int position = 100; position < 4200; ++position) {
      const DecodeGraphStats before = graphed->graph_stats();
      ASSERT_TRUE(decode(*graphed, *graphed_cache, position, &graphed_logits).ok());
      const DecodeGraphStats after = graphed->graph_stats();
      if (after.replays > before.replays && after.captures == before.captures) continue;
      // The ops ran: the model without graphs runs the same step (and so keeps the same KV).
      ASSERT_TRUE(decode(*eager, *eager_cache, position, &eager_logits).ok());
      EXPECT_TRUE(SameBits(graphed_logits, eager_logits)) << "position " << position;
      ++compared;
    }
    const DecodeGraphStats stats = graphed->graph_stats();
    EXPECT_EQ(stats.captures, 5);
    EXPECT_EQ(stats.replays, 4100 - 5);  // all but each shape's first step
    EXPECT_EQ(stats.capture_failures, 0);
    EXPECT_EQ(stats.evictions, 0);
    EXPECT_EQ(stats.cached_graphs, 5);
    EXPECT_EQ(backend.live_graphs(), 5u);
    EXPECT_EQ(compared, 10);
    if (!tls) {  // the dense decode plans for the whole width
      const std::set<std::pair<int, int>> widths = {
          {16, 1024}, {32, 2048}, {48, 3072}, {64, 4096}, {80, 5120}};
      EXPECT_EQ(backend.captured_decodes, widths);
    }
    graphed.reset();
    EXPECT_EQ(backend.live_graphs(), 0u) << "the model frees its graphs";
  }
}

// ForwardOutputs::greedy: the backend's GreedyPick runs after the LM head (inside the graph when
// the step replays one), and a step that asks for picks only copies no logits. The picks equal
// the first maximum of the step's logits, replayed or not, and asking for them is part of the
// shape (a step without picks is captured apart).
TEST(ModelGraphTest, GreedyPicksComeWithOrWithoutTheLogits) {
  PretendGraphBackend backend;
  std::unique_ptr<Model> model = TinyModel(backend, true);
  std::unique_ptr<KvCache> cache = TinyCache(backend, 4);
  ASSERT_TRUE(model && cache);
  const int vocab = TinyConfig().vocab_size;
  for (int position = 100; position < 106; ++position) {
    std::vector<float> logits(vocab, -1.f);
    std::vector<int32_t> picks(2, -1);  // token, then the logprob's bits
    const bool with_logits = position % 2 == 0;
    ForwardOutputs out{with_logits ? logits.data() : nullptr, picks.data()};
    ASSERT_TRUE(model->Forward(DecodeBatch(*cache, position), *cache, out).ok());
    if (!with_logits) {
      EXPECT_EQ(logits, std::vector<float>(vocab, -1.f)) << "logits copied unasked";
      continue;
    }
    const int best =
        static_cast<int>(std::max_element(logits.begin(), logits.end()) - logits.begin());
    EXPECT_EQ(picks[0], best) << "position " << position;
    double sum = 0;
    for (float x : logits) sum += std::exp(double{x} - logits[best]);
    EXPECT_NEAR(std::bit_cast<float>(picks[1]), -std::log(sum), 1e-5);
  }
  const DecodeGraphStats stats = model->graph_stats();
  EXPECT_EQ(stats.captures, 1);  // one shape, with picks: its second step captured
  EXPECT_EQ(stats.replays, 5);
}

// A shape whose capture fails runs op by op and is not tried again at every step.
TEST(ModelGraphTest, FailedCaptureIsRememberedNotRetried) {
  PretendGraphBackend backend;
  backend.fail_captures = true;
  std::unique_ptr<Model> model = TinyModel(backend, true);
  std::unique_ptr<KvCache> cache = TinyCache(backend, 4);
  ASSERT_TRUE(model && cache);
  std::vector<float> logits;
  for (int position = 100; position < 150; ++position) {
    ASSERT_TRUE(model->Forward(DecodeBatch(*cache, position), *cache, &logits).ok());
  }
  const DecodeGraphStats stats = model->graph_stats();
  EXPECT_EQ(backend.capture_attempts, 1);
  EXPECT_EQ(stats.capture_failures, 1);
  EXPECT_EQ(stats.captures, 0);
  EXPECT_EQ(stats.replays, 0);
  EXPECT_EQ(stats.cached_graphs, 0);
}

// The KV cache is part of the shape (graphs bake in its pools): 65 caches make 65 shapes, and
// the 65th graph evicts the least recently used one, which is freed. Enabling TLS drops every
// graph (they read the TLS buffers it replaces).
TEST(ModelGraphTest, LeastRecentlyUsedGraphIsEvicted) {
  PretendGraphBackend backend;
  std::unique_ptr<Model> model = TinyModel(backend, true);
  ASSERT_TRUE(model);
  std::vector<std::unique_ptr<KvCache>> caches;
  for (int i = 0; i < 65; ++i) {
    caches.push_back(TinyCache(backend, 2));
    ASSERT_TRUE(caches.back());
  }
  std::vector<int> positions(caches.size(), 0);
  std::vector<float> logits;
  auto step = [&](int i) {
    KvCache& cache = *caches[i];
    return model->Forward(DecodeBatch(cache, positions[i]++), cache, &logits);
  };
  for (int i = 0; i < 64; ++i) {
    ASSERT_TRUE(step(i).ok());  // run op by op
    ASSERT_TRUE(step(i).ok());  // captured
  }
  EXPECT_EQ(model->graph_stats().captures, 64);
  EXPECT_EQ(model->graph_stats().evictions, 0);
  ASSERT_TRUE(step(0).ok());  // a replay: cache 0's graph is now the most recently used
  EXPECT_EQ(model->graph_stats().replays, 65);
  ASSERT_TRUE(step(64).ok());
  ASSERT_TRUE(step(64).ok());  // the 65th graph: cache 1's goes
  EXPECT_EQ(model->graph_stats().captures, 65);
  EXPECT_EQ(model->graph_stats().evictions, 1);
  EXPECT_EQ(model->graph_stats().cached_graphs, 64);
  EXPECT_EQ(backend.live_graphs(), 64u);
  ASSERT_TRUE(step(0).ok());  // still there
  EXPECT_EQ(model->graph_stats().replays, 67);
  ASSERT_TRUE(step(1).ok());  // forgotten: op by op again, then captured (evicting cache 2's)
  EXPECT_EQ(model->graph_stats().replays, 67);
  ASSERT_TRUE(step(1).ok());
  EXPECT_EQ(model->graph_stats().captures, 66);
  EXPECT_EQ(model->graph_stats().evictions, 2);
  EXPECT_EQ(backend.live_graphs(), 64u);
  ASSERT_TRUE(model->EnableTls(TinyTls()).ok());
  EXPECT_EQ(model->graph_stats().cached_graphs, 0);
  EXPECT_EQ(backend.live_graphs(), 0u);
}

}  // namespace
}  // namespace asynctls
