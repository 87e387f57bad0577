// What the coordinator's scheduler asks a rank to do in one step, and what comes back. Plain
// values, so the same plan travels in-process or (serialized) over the coordinator<->worker
// stream. The scheduler decides; the engine executes.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace asynctls {

struct SamplingParams {
  float temperature = 0.f;  // 0: greedy
  int32_t top_k = 0;        // 0: all
  float top_p = 1.f;        // (0, 1]
  uint64_t seed = 0;        // with the position, fixes the random draw: replays are identical
};

// A slice of a sequence's prompt. Chunks of one sequence arrive in order; `start_pos` is
// the position of tokens[0]. When `sample` is set (the prompt's last chunk), the step
// returns the next token.
struct PrefillChunk {
  uint64_t seq_id = 0;
  std::vector<int32_t> tokens;
  int32_t start_pos = 0;
  bool sample = false;
  SamplingParams sampling;
};

// One generated token fed back at `position` (= tokens already in the cache).
struct DecodeItem {
  uint64_t seq_id = 0;
  int32_t token = 0;
  int32_t position = 0;
  SamplingParams sampling;
  bool tls = false;  // attend through the two-level sparse path (ExecutorInfo::tls)
  // With tls: k_b and k_t of this sequence, at most the engine's (ExecutorInfo); 0 = the engine's.
  int32_t tls_block_budget = 0, tls_token_budget = 0;
};

struct StepPlan {
  uint64_t step_id = 0;
  std::vector<uint64_t> releases;  // sequences whose KV is freed before the step runs
  std::vector<PrefillChunk> prefills;
  std::vector<DecodeItem> decodes;
  bool empty() const { return releases.empty() && prefills.empty() && decodes.empty(); }
};

struct SampledToken {
  uint64_t seq_id = 0;
  int32_t token = 0;
  float logprob = 0.f;
};

struct SequenceError {
  uint64_t seq_id = 0;
  std::string message;  // the sequence was dropped by the engine (its KV freed)
};

struct StepResult {
  uint64_t step_id = 0;
  std::vector<SampledToken> tokens;
  std::vector<SequenceError> errors;
  double step_ms = 0;
  // Parts of step_ms in the engine's process (not sent by workers): the model's forwards (their
  // launches, the GPU's work and the logits' copy to the host) and the host's sampling.
  double forward_ms = 0;
  double sample_ms = 0;
  int32_t kv_blocks_used = 0;
  int32_t kv_blocks_total = 0;
};

// What a rank (or a group of ranks) tells the scheduler about itself.
struct ExecutorInfo {
  std::string model_name;
  std::string device;          // "cpu (2 threads)", "cuda:0 NVIDIA H200"
  int32_t vocab_size = 0;
  int32_t max_context = 0;
  int32_t kv_blocks_total = 0; // 64-token blocks
  int32_t max_batch_tokens = 0;
  bool tls = false;  // decode items may ask for two-level sparse attention
  int32_t tls_block_budget = 0, tls_token_budget = 0;  // its default and largest budgets
};

// Executes plans: the in-process Engine, or a link to remote workers. Step() calls are
// serialized by the caller.
class StepExecutor {
 public:
  virtual ~StepExecutor() = default;
  virtual ExecutorInfo Info() const = 0;
  // A plan the executor cannot run at all (backend failure) is an error; per-sequence
  // problems come back in StepResult::errors.
  virtual absl::StatusOr<StepResult> Step(const StepPlan& plan) = 0;
};

}  // namespace asynctls
