#include "asynctls/coordinator/coordinator.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "asynctls/runtime/logging.h"

namespace asynctls {
namespace {

double Ms(std::chrono::steady_clock::duration d) {
  return std::chrono::duration<double, std::milli>(d).count();
}

SchedulerOptions MakeSchedulerOptions(const CoordinatorOptions& o, const ExecutorInfo& info,
                                      const Tokenizer* tokenizer) {
  SchedulerOptions s;
  s.max_batch_tokens = o.max_batch_tokens;
  s.max_running = o.max_running;
  s.max_queue = o.max_queue;
  s.kv_blocks_total = info.kv_blocks_total;
  s.max_context = info.max_context;
  s.stop_token_ids = tokenizer->stop_ids();
  return s;
}

}  // namespace

Coordinator::Coordinator(const Tokenizer* tokenizer, StepExecutor* executor, CoordinatorOptions options)
    : tokenizer_(tokenizer),
      executor_(executor),
      info_(executor->Info()),
      scheduler_(MakeSchedulerOptions(options, info_, tokenizer)) {
  stats_.kv_blocks_total = info_.kv_blocks_total;
  loop_ = std::thread([this] { Loop(); });
}

Coordinator::~Coordinator() { Shutdown(absl::CancelledError("server shutting down")); }

void Coordinator::Shutdown(const absl::Status& reason) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  if (loop_.joinable()) loop_.join();
  std::lock_guard<std::mutex> lock(mu_);
  const FinishReason finish =
      reason.code() == absl::StatusCode::kCancelled ? FinishReason::kCancelled : FinishReason::kError;
  for (auto& [id, live] : live_) {
    Emit(*live, id, finish, reason);
    (finish == FinishReason::kError ? stats_.finished_error : stats_.cancelled)++;
  }
  live_.clear();
}

absl::Status Coordinator::Submit(GenerationRequest request, EventSink sink) {
  const SamplingParams& sp = request.sampling;
  if (!(sp.temperature >= 0.f)) return absl::InvalidArgumentError("temperature: must be >= 0");
  if (!(sp.top_p > 0.f && sp.top_p <= 1.f)) return absl::InvalidArgumentError("top_p: must be in (0, 1]");
  if (sp.top_k < 0) return absl::InvalidArgumentError("top_k: must be >= 0");
  for (int32_t t : request.prompt_tokens)
    if (t < 0 || t >= info_.vocab_size)
      return absl::InvalidArgumentError(absl::StrCat("token_ids: ", t, " is outside the vocabulary of ", info_.vocab_size));
  for (const std::string& s : request.stop_strings)
    if (s.empty()) return absl::InvalidArgumentError("stop: empty stop string");
  auto live = std::make_unique<Live>();
  live->sink = std::move(sink);
  live->stop_strings = request.stop_strings;
  live->prompt_tokens = static_cast<int32_t>(request.prompt_tokens.size());
  live->submitted = Clock::now();
  const std::string id = request.request_id;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (stop_) return absl::UnavailableError("coordinator is shutting down");
    if (absl::Status s = scheduler_.Enqueue(request); !s.ok()) return s;
    live_[id] = std::move(live);
    ++changes_;
  }
  cv_.notify_all();
  return absl::OkStatus();
}

bool Coordinator::Cancel(const std::string& request_id) {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = live_.find(request_id);
  if (it == live_.end()) return false;
  scheduler_.Finish(request_id);
  ++stats_.cancelled;
  Emit(*it->second, request_id, FinishReason::kCancelled, absl::CancelledError("request cancelled"));
  live_.erase(it);
  ++changes_;
  cv_.notify_all();  // the release goes out with the next plan
  return true;
}

CoordinatorStats Coordinator::Stats() const {
  std::lock_guard<std::mutex> lock(mu_);
  CoordinatorStats s = stats_;
  s.waiting = scheduler_.num_waiting();
  s.running = scheduler_.num_running();
  return s;
}

void Coordinator::Emit(Live& live, const std::string& id, FinishReason finish, absl::Status error) {
  GenerationEvent ev;
  ev.token_ids = std::move(live.unsent_tokens);
  live.unsent_tokens.clear();
  // Stream what is complete; on finish flush everything left.
  size_t end = live.text.size();
  if (finish == FinishReason::kNone) {
    end = live.sent + Utf8CompletePrefix(std::string_view(live.text).substr(live.sent));
    // Hold back a tail that could still grow into a stop string.
    for (const std::string& stop : live.stop_strings) {
      for (size_t k = std::min(stop.size() - 1, end - live.sent); k > 0; --k) {
        if (live.text.compare(end - k, k, stop, 0, k) == 0) {
          end -= k;
          break;
        }
      }
    }
  }
  ev.text_delta = live.text.substr(live.sent, end - live.sent);
  live.sent = end;
  ev.finish = finish;
  ev.error = std::move(error);
  ev.prompt_tokens = live.prompt_tokens;
  ev.completion_tokens = live.completion_tokens;
  if (finish != FinishReason::kNone) {
    live.timings.total_ms = Ms(Clock::now() - live.submitted);
    ev.timings = live.timings;
  }
  if (ev.final() || !ev.token_ids.empty() || !ev.text_delta.empty()) live.sink(ev);
}

void Coordinator::Apply(const SequenceUpdate& u) {
  auto it = live_.find(u.request_id);
  if (it == live_.end()) return;
  Live& live = *it->second;
  const auto now = Clock::now();
  FinishReason finish = u.finish;
  absl::Status error;
  for (int32_t t : u.new_tokens) {
    ++stats_.generated_tokens;
    ++live.completion_tokens;
    if (!live.has_token) {
      live.timings.ttft_ms = Ms(now - live.submitted);
      live.has_token = true;
    } else {
      live.timings.inter_token_ms.push_back(Ms(now - live.last_token));
    }
    live.last_token = now;
    live.unsent_tokens.push_back(t);
    // Stop tokens end the stream without adding their text.
    const auto& stops = tokenizer_->stop_ids();
    if (u.finish == FinishReason::kStop && std::find(stops.begin(), stops.end(), t) != stops.end()) continue;
    live.text += tokenizer_->TokenBytes(t);
  }
  // Stop strings: cut the text at the first match and finish.
  const size_t search_from = live.sent;
  size_t cut = std::string::npos;
  for (const std::string& stop : live.stop_strings) {
    const size_t from = search_from >= stop.size() ? search_from - stop.size() + 1 : 0;
    const size_t pos = live.text.find(stop, from);
    if (pos != std::string::npos) cut = std::min(cut, pos);
  }
  if (cut != std::string::npos) {
    live.text.resize(std::max(cut, live.sent));
    if (finish == FinishReason::kNone) scheduler_.Finish(u.request_id);
    finish = FinishReason::kStop;
  }
  if (finish == FinishReason::kError) error = absl::UnavailableError(u.error);
  if (finish != FinishReason::kNone) {
    (finish == FinishReason::kError ? stats_.finished_error : stats_.finished_ok)++;
  }
  Emit(live, u.request_id, finish, std::move(error));
  if (finish != FinishReason::kNone) live_.erase(it);
}

void Coordinator::Loop() {
  std::unique_lock<std::mutex> lock(mu_);
  for (;;) {
    cv_.wait(lock, [&] { return stop_ || scheduler_.has_work(); });
    if (stop_) return;
    StepPlan plan = scheduler_.NextPlan();
    const auto now = Clock::now();
    for (auto& [id, live] : live_) {
      if (!live->has_scheduled && scheduler_.IsScheduled(id)) {
        live->has_scheduled = true;
        live->timings.queue_ms = Ms(now - live->submitted);
      }
    }
    if (plan.empty()) {
      // Nothing can run until a request arrives or leaves; do not spin.
      const uint64_t seen = changes_;
      cv_.wait(lock, [&] { return stop_ || changes_ != seen; });
      continue;
    }
    lock.unlock();
    absl::StatusOr<StepResult> result = executor_->Step(plan);
    lock.lock();
    ++stats_.steps;
    std::vector<SequenceUpdate> updates;
    if (result.ok()) {
      stats_.kv_blocks_used = result->kv_blocks_used;
      updates = scheduler_.OnResult(*result);
    } else {
      ASYNCTLS_LOG_ERROR("step ", plan.step_id, " failed: ", result.status().ToString());
      updates = scheduler_.FailRunning(std::string(result.status().message()));
    }
    for (const SequenceUpdate& u : updates) Apply(u);
  }
}

}  // namespace asynctls
