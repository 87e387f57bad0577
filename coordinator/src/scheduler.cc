#include "asynctls/coordinator/scheduler.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "asynctls/kernels/types.h"

namespace asynctls {

const char* FinishReasonName(FinishReason reason) {
  switch (reason) {
    case FinishReason::kNone: return "none";
    case FinishReason::kStop: return "stop";
    case FinishReason::kLength: return "length";
    case FinishReason::kCancelled: return "cancelled";
    case FinishReason::kError: return "error";
  }
  return "?";
}

Scheduler::Scheduler(SchedulerOptions options) : options_(std::move(options)) {}

int32_t Scheduler::BlocksFor(const GenerationRequest& r) const {
  const int64_t tokens = std::min<int64_t>(int64_t{static_cast<int64_t>(r.prompt_tokens.size())} + r.max_tokens,
                                           options_.max_context);
  return static_cast<int32_t>((tokens + kernels::kKvBlockSize - 1) / kernels::kKvBlockSize);
}

absl::Status Scheduler::Enqueue(const GenerationRequest& r) {
  if (r.request_id.empty()) return absl::InvalidArgumentError("request_id: must not be empty");
  if (live_ids_.contains(r.request_id))
    return absl::AlreadyExistsError(absl::StrCat("request_id: '", r.request_id, "' is already running"));
  if (r.prompt_tokens.empty()) return absl::InvalidArgumentError("prompt: must not be empty");
  if (static_cast<int64_t>(r.prompt_tokens.size()) >= options_.max_context)
    return absl::InvalidArgumentError(absl::StrCat("prompt: ", r.prompt_tokens.size(),
                                                   " tokens leave no room in the model's context of ",
                                                   options_.max_context));
  if (r.max_tokens <= 0) return absl::InvalidArgumentError("max_tokens: must be positive");
  if (BlocksFor(r) > options_.kv_blocks_total)
    return absl::ResourceExhaustedError(absl::StrCat("request needs ", BlocksFor(r),
                                                     " KV blocks; the cache holds ", options_.kv_blocks_total));
  if (static_cast<int32_t>(waiting_.size()) >= options_.max_queue)
    return absl::ResourceExhaustedError(absl::StrCat("queue full: ", waiting_.size(), " requests waiting"));
  auto seq = std::make_unique<Seq>();
  seq->request = r;
  live_ids_[r.request_id] = 0;
  waiting_.push_back(std::move(seq));
  return absl::OkStatus();
}

bool Scheduler::IsScheduled(const std::string& request_id) const {
  auto it = live_ids_.find(request_id);
  return it != live_ids_.end() && it->second != 0;
}

void Scheduler::Remove(uint64_t seq_id) {
  auto it = std::find_if(running_.begin(), running_.end(), [&](const auto& s) { return s->seq_id == seq_id; });
  if (it == running_.end()) return;
  reserved_blocks_ -= (*it)->reserved_blocks;
  live_ids_.erase((*it)->request.request_id);
  pending_releases_.push_back(seq_id);
  running_.erase(it);
}

bool Scheduler::Finish(const std::string& request_id) {
  auto it = live_ids_.find(request_id);
  if (it == live_ids_.end()) return false;
  if (it->second != 0) {
    Remove(it->second);
    return true;
  }
  live_ids_.erase(it);
  waiting_.erase(std::find_if(waiting_.begin(), waiting_.end(),
                              [&](const auto& s) { return s->request.request_id == request_id; }));
  return true;
}

StepPlan Scheduler::NextPlan() {
  StepPlan plan;
  plan.step_id = next_step_id_++;
  plan.releases.swap(pending_releases_);
  int32_t budget = options_.max_batch_tokens;
  // 1. Decode every sequence whose prompt is done.
  for (auto& s : running_) {
    const int32_t prompt_len = static_cast<int32_t>(s->request.prompt_tokens.size());
    if (s->prefilled < prompt_len || s->generated.empty()) continue;
    plan.decodes.push_back({s->seq_id, s->generated.back(),
                            prompt_len + static_cast<int32_t>(s->generated.size()) - 1, s->request.sampling,
                            s->request.tls, s->request.tls_block_budget, s->request.tls_token_budget});
    --budget;
  }
  // 2. Admit waiting requests while KV and slots allow (FIFO: no overtaking).
  while (!waiting_.empty() && static_cast<int32_t>(running_.size()) < options_.max_running) {
    Seq& next = *waiting_.front();
    const int32_t blocks = BlocksFor(next.request);
    if (reserved_blocks_ + blocks > options_.kv_blocks_total) break;
    auto seq = std::move(waiting_.front());
    waiting_.pop_front();
    seq->seq_id = next_seq_id_++;
    seq->reserved_blocks = blocks;
    reserved_blocks_ += blocks;
    live_ids_[seq->request.request_id] = seq->seq_id;
    running_.push_back(std::move(seq));
  }
  // 3. Prompt chunks, oldest first, within the remaining token budget.
  for (auto& s : running_) {
    if (budget <= 0) break;
    const int32_t prompt_len = static_cast<int32_t>(s->request.prompt_tokens.size());
    if (s->prefilled >= prompt_len) continue;
    const int32_t n = std::min(budget, prompt_len - s->prefilled);
    PrefillChunk chunk;
    chunk.seq_id = s->seq_id;
    chunk.tokens.assign(s->request.prompt_tokens.begin() + s->prefilled,
                        s->request.prompt_tokens.begin() + s->prefilled + n);
    chunk.start_pos = s->prefilled;
    chunk.sample = s->prefilled + n == prompt_len;
    chunk.sampling = s->request.sampling;
    s->prefilled += n;
    budget -= n;
    plan.prefills.push_back(std::move(chunk));
  }
  return plan;
}

std::vector<SequenceUpdate> Scheduler::OnResult(const StepResult& result) {
  std::vector<SequenceUpdate> updates;
  auto find = [&](uint64_t id) -> Seq* {
    for (auto& s : running_)
      if (s->seq_id == id) return s.get();
    return nullptr;  // finished (cancelled) while the step ran
  };
  for (const SequenceError& e : result.errors) {
    Seq* s = find(e.seq_id);
    if (!s) continue;
    updates.push_back({s->request.request_id, {}, FinishReason::kError, e.message});
    Remove(e.seq_id);
  }
  for (const SampledToken& t : result.tokens) {
    Seq* s = find(t.seq_id);
    if (!s) continue;
    s->generated.push_back(t.token);
    SequenceUpdate u{s->request.request_id, {t.token}, FinishReason::kNone, {}};
    const auto& stops = options_.stop_token_ids;
    const int64_t total = static_cast<int64_t>(s->request.prompt_tokens.size()) + s->generated.size();
    if (!s->request.ignore_eos && std::find(stops.begin(), stops.end(), t.token) != stops.end()) {
      u.finish = FinishReason::kStop;
    } else if (static_cast<int32_t>(s->generated.size()) >= s->request.max_tokens || total >= options_.max_context) {
      u.finish = FinishReason::kLength;
    }
    if (u.finish != FinishReason::kNone) Remove(t.seq_id);
    updates.push_back(std::move(u));
  }
  return updates;
}

std::vector<SequenceUpdate> Scheduler::FailRunning(const std::string& error) {
  std::vector<SequenceUpdate> updates;
  while (!running_.empty()) {
    updates.push_back({running_.front()->request.request_id, {}, FinishReason::kError, error});
    Remove(running_.front()->seq_id);
  }
  return updates;
}

}  // namespace asynctls
