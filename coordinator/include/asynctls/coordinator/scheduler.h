// Continuous batching with chunked prefill and admission by KV capacity. Pure bookkeeping:
// it turns requests into StepPlans and StepResults into per-request token events; it owns no
// threads and knows nothing of text. Not thread-safe (the coordinator loop owns it).
//
// Policy: every step decodes all running sequences that have a token to feed, then spends the
// rest of the token budget on prompt chunks, oldest first. A request is admitted only when
// the KV blocks for its prompt plus max_tokens are free, so a running sequence never runs
// out of cache (no preemption needed); requests beyond the queue bound are refused.
#pragma once

#include <cstdint>
#include <deque>
#include <memory>
#include <string>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "asynctls/coordinator/request.h"
#include "asynctls/runtime/step_plan.h"

namespace asynctls {

struct SchedulerOptions {
  int32_t max_batch_tokens = 512;  // tokens per step (decode tokens + prompt chunks)
  int32_t max_running = 64;        // sequences decoding or prefilling at once
  int32_t max_queue = 256;         // waiting requests beyond this are refused
  int32_t kv_blocks_total = 0;     // 64-token blocks on the executor
  int32_t max_context = 0;
  std::vector<int32_t> stop_token_ids;  // end generation (unless ignore_eos)
};

// What happened to one request in a step.
struct SequenceUpdate {
  std::string request_id;
  std::vector<int32_t> new_tokens;
  FinishReason finish = FinishReason::kNone;
  std::string error;  // with kError
};

class Scheduler {
 public:
  explicit Scheduler(SchedulerOptions options);

  // INVALID_ARGUMENT (bad request), ALREADY_EXISTS (live id), RESOURCE_EXHAUSTED (queue full
  // or a request that could never fit the KV cache).
  absl::Status Enqueue(const GenerationRequest& request);
  // Finishes a live request now (cancel, stop string, client gone): its KV is released in the
  // next plan. Returns false for an unknown id.
  bool Finish(const std::string& request_id);

  StepPlan NextPlan();
  std::vector<SequenceUpdate> OnResult(const StepResult& result);
  // The executor failed the whole step: every running request ends with `error`.
  std::vector<SequenceUpdate> FailRunning(const std::string& error);

  int32_t num_waiting() const { return static_cast<int32_t>(waiting_.size()); }
  int32_t num_running() const { return static_cast<int32_t>(running_.size()); }
  int32_t reserved_blocks() const { return reserved_blocks_; }
  bool has_work() const { return !waiting_.empty() || !running_.empty() || !pending_releases_.empty(); }
  bool IsScheduled(const std::string& request_id) const;  // admitted at least once

 private:
  struct Seq {
    GenerationRequest request;
    uint64_t seq_id = 0;
    int32_t prefilled = 0;           // prompt tokens sent
    std::vector<int32_t> generated;  // sampled tokens
    int32_t reserved_blocks = 0;
  };
  int32_t BlocksFor(const GenerationRequest& r) const;
  void Remove(uint64_t seq_id);

  SchedulerOptions options_;
  uint64_t next_seq_id_ = 1;
  uint64_t next_step_id_ = 1;
  std::deque<std::unique_ptr<Seq>> waiting_;
  std::vector<std::unique_ptr<Seq>> running_;  // admission order
  absl::flat_hash_map<std::string, uint64_t> live_ids_;  // request id -> seq id (0 = waiting)
  std::vector<uint64_t> pending_releases_;
  int32_t reserved_blocks_ = 0;
};

}  // namespace asynctls
