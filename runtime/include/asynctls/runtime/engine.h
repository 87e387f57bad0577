// The per-rank Engine: owns a backend, the model weights and the paged KV cache, and executes
// one StepPlan at a time (prefill chunks + decode tokens + releases), returning sampled
// tokens. It decides nothing: admission and batching are the scheduler's. Not thread-safe;
// Step() calls are serialized by the caller.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>

#include "absl/status/statusor.h"
#include "asynctls/runtime/backend.h"
#include "asynctls/runtime/kv_cache.h"
#include "asynctls/runtime/model.h"
#include "asynctls/runtime/step_plan.h"

namespace asynctls {

class ThreadPool;
class WeightFile;

struct EngineOptions {
  std::string device = "auto";  // "cpu", "cuda", "cuda:N" or "auto" (cuda when present)
  int32_t cpu_threads = 0;      // 0: all cores
  kernels::DType weight_dtype = kernels::DType::kF32;  // GEMM weights on CUDA
  int32_t max_batch_tokens = 512;
  int32_t max_batch_seqs = 64;
  int64_t kv_cache_bytes = 0;   // 0: 1 GiB on the CPU, 40% of free memory on a GPU
  bool keep_logits = false;     // keep each sampled row's logits (tests, perplexity)
  // Greedy rows picked by the backend's GreedyPick where the logits are, instead of the host
  // sampler (the same token; the logprob to float rounding): unset = on a GPU only, where it
  // spares the logits' copy.
  std::optional<bool> greedy_on_backend;
  // Decode steps replay CUDA graphs (ModelLoadOptions; the CPU runs op by op either way).
  bool cuda_graphs = true;
  // Two-level sparse decode: the KV cache keeps a TLS index and DecodeItem::tls is honoured.
  std::optional<TlsDecodeOptions> tls;
};

class Engine final : public StepExecutor {
 public:
  static absl::StatusOr<std::unique_ptr<Engine>> Create(const WeightFile& weights,
                                                        const EngineOptions& options);
  // An engine over seeded random weights of `config`'s real sizes (performance runs).
  static absl::StatusOr<std::unique_ptr<Engine>> CreateRandom(const ModelConfig& config, uint64_t seed,
                                                              const EngineOptions& options);
  ~Engine() override;

  ExecutorInfo Info() const override;
  absl::StatusOr<StepResult> Step(const StepPlan& plan) override;

  const ModelConfig& config() const { return model_->config(); }
  // With keep_logits: the logits of the last Step's sampled tokens, [tokens, vocab], in the
  // order of StepResult::tokens.
  const std::vector<float>& sampled_logits() const { return sampled_logits_; }
  DecodeGraphStats graph_stats() const { return model_->graph_stats(); }  // cuda_graphs
  const KvCache& kv_cache() const { return *cache_; }
  KvCache& mutable_kv_cache() { return *cache_; }  // benchmarks that stage KV directly
  Backend& backend() { return *backend_; }

 private:
  Engine() = default;
  struct Item;
  static absl::StatusOr<std::unique_ptr<Engine>> Finish(std::unique_ptr<Engine> engine);
  absl::Status RunForward(const std::vector<Item>& items, StepResult* result);
  absl::Status GrowHostRows(HostBuffer& buffer, size_t row_bytes, size_t rows);

  EngineOptions options_;
  std::unique_ptr<Backend> backend_;
  std::unique_ptr<Model> model_;
  std::unique_ptr<KvCache> cache_;
  std::string model_name_;
  HostBuffer logits_;  // the sampled rows' logits (page-locked on CUDA)
  HostBuffer picks_;   // their greedy picks on a GPU (ForwardOutputs::greedy)
  std::vector<float> sampled_logits_;
  // Samples a step's rows side by side (a vocabulary row is ~0.2-0.4 ms of CPU work, on the
  // critical path of every step).
  std::unique_ptr<ThreadPool> sampling_pool_;
  bool lag_slots_exhausted_logged_ = false;
};

// Two-level sparse decode options from a channel-sets file (`asynctls calibrate`) and budgets
// (the paper's k_b 128, k_t 1024 when <= 0) and the selection's lag (the paper's one-step lag
// by default). Errors name the file.
absl::StatusOr<TlsDecodeOptions> TlsDecodeOptionsFromFile(
    const std::string& channels_path, int32_t block_budget = 0, int32_t token_budget = 0,
    kernels::TlsLag lag = kernels::TlsLag::kOneStep);

// Makes the backend named by `device` ("cpu", "cuda", "cuda:N", "auto").
absl::StatusOr<std::unique_ptr<Backend>> MakeBackend(const std::string& device, int cpu_threads);

}  // namespace asynctls
