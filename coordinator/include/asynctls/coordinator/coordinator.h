// The coordinator core: validates and tokenizes nothing itself (requests arrive as token ids),
// runs the scheduling loop on its own thread against a StepExecutor (the in-process Engine or
// remote workers), detokenizes, applies stop strings and streams events to each request's
// sink. Submit/Cancel/Stats are thread-safe. Sinks run on the loop thread and must not block.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "asynctls/coordinator/request.h"
#include "asynctls/coordinator/scheduler.h"
#include "asynctls/runtime/step_plan.h"
#include "asynctls/runtime/tokenizer.h"

namespace asynctls {

struct CoordinatorOptions {
  int32_t max_batch_tokens = 512;
  int32_t max_running = 64;
  int32_t max_queue = 256;
};

struct CoordinatorStats {
  int32_t waiting = 0;
  int32_t running = 0;
  int64_t steps = 0;
  int64_t generated_tokens = 0;
  int64_t finished_ok = 0, finished_error = 0, cancelled = 0;
  int32_t kv_blocks_used = 0, kv_blocks_total = 0;
};

class Coordinator {
 public:
  // `tokenizer` and `executor` must outlive the coordinator.
  Coordinator(const Tokenizer* tokenizer, StepExecutor* executor, CoordinatorOptions options);
  ~Coordinator();  // Shutdown(CANCELLED "server shutting down") if not shut down yet

  // Stops the loop (waiting for a step in flight) and ends every live request with `reason`
  // (e.g. UNAVAILABLE when the replica's worker is lost). Later Submits fail with UNAVAILABLE.
  void Shutdown(const absl::Status& reason);

  // Validates and queues the request (errors as in Scheduler::Enqueue plus sampling checks);
  // on success the sink receives its events until a final one.
  absl::Status Submit(GenerationRequest request, EventSink sink);
  // Ends a live request with CANCELLED (its KV is freed in the next step). False if unknown.
  bool Cancel(const std::string& request_id);
  CoordinatorStats Stats() const;
  const ExecutorInfo& executor_info() const { return info_; }

 private:
  using Clock = std::chrono::steady_clock;
  struct Live {
    EventSink sink;
    std::string text;      // detokenized output so far
    size_t sent = 0;       // bytes of `text` already streamed
    std::vector<int32_t> unsent_tokens;
    std::vector<std::string> stop_strings;
    int32_t prompt_tokens = 0, completion_tokens = 0;
    Clock::time_point submitted, scheduled, last_token;
    bool has_scheduled = false, has_token = false;
    GenerationTimings timings;
  };
  void Loop();
  void Apply(const SequenceUpdate& update);  // loop thread, mu_ held
  void Emit(Live& live, const std::string& id, FinishReason finish, absl::Status error);

  const Tokenizer* tokenizer_;
  StepExecutor* executor_;
  ExecutorInfo info_;
  mutable std::mutex mu_;
  std::condition_variable cv_;
  Scheduler scheduler_;  // guarded by mu_
  absl::flat_hash_map<std::string, std::unique_ptr<Live>> live_;  // guarded by mu_
  CoordinatorStats stats_;  // guarded by mu_
  uint64_t changes_ = 0;  // bumped by Submit/Cancel; guarded by mu_
  bool stop_ = false;
  std::thread loop_;
};

}  // namespace asynctls
