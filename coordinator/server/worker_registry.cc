#include "worker_registry.h"

#include <optional>
#include <utility>

#include "absl/strings/str_cat.h"
#include "asynctls/runtime/logging.h"
#include "step_codec.h"

namespace asynctls {
namespace {

using Clock = std::chrono::steady_clock;

int64_t NowMs() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(Clock::now().time_since_epoch()).count();
}

}  // namespace

// One worker stream. Shared by its reactor (until gRPC's OnDone), the registry and the
// RemoteExecutor the router owns. Writes go through an outbox because a reactor allows one
// write in flight; Finish is issued once, after the write in flight (if any) completes.
class WorkerRegistry::Link : public std::enable_shared_from_this<Link> {
 public:
  Link(WorkerRegistry* registry, grpc::CallbackServerContext* context, int32_t timeout_ms)
      : registry_(registry), context_(context), timeout_ms_(timeout_ms), last_rx_(Clock::now()) {}

  void Bind(grpc::ServerBidiReactor<v1::WorkerMessage, v1::CoordinatorMessage>* reactor) {
    reactor_ = reactor;
  }

  // Queues a message; false when the link is lost.
  bool Send(v1::CoordinatorMessage message) {
    v1::CoordinatorMessage* start = nullptr;
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (lost_ || finishing_) return false;
      outbox_.push_back(std::move(message));
      if (!writing_) {
        writing_ = true;
        start = &outbox_.front();  // deque: stays put while later messages are appended
      }
    }
    if (start) reactor_->StartWrite(start);
    return true;
  }

  void OnWriteDone(bool ok) {
    v1::CoordinatorMessage* next = nullptr;
    bool finish = false;
    {
      std::lock_guard<std::mutex> lock(mu_);
      outbox_.pop_front();
      if (!ok && !lost_) {
        // The reaction only records; Lose() below posts the event.
      }
      if (ok && !finishing_ && !outbox_.empty()) {
        next = &outbox_.front();
      } else {
        writing_ = false;
        outbox_.clear();
        finish = finishing_ && !finished_;
        if (finish) finished_ = true;
      }
    }
    if (next) reactor_->StartWrite(next);
    if (finish) reactor_->Finish(finish_status_);
    if (!ok) Lose("stream broken (write failed)");
  }

  // Marks the link lost: the step in flight fails, the stream is cancelled and finished, and the
  // registry removes the replica. Idempotent.
  void Lose(const std::string& why) { End(why, grpc::Status(grpc::StatusCode::UNAVAILABLE, why), true); }

  // Ends the stream with `status` (refusals, shutdown) without cancelling it first, so the
  // worker sees the status.
  void Refuse(const grpc::Status& status) { End(status.error_message(), status, false); }

  // A message arrived from the worker (any message is a sign of life).
  void Touch() {
    std::lock_guard<std::mutex> lock(mu_);
    last_rx_ = Clock::now();
  }

  bool Silent(Clock::time_point now) const {
    std::lock_guard<std::mutex> lock(mu_);
    return !lost_ && now - last_rx_ > std::chrono::milliseconds(timeout_ms_);
  }

  void OnResult(const v1::WorkerStepResult& result) {
    std::lock_guard<std::mutex> lock(mu_);
    if (!waiting_step_ || result.step_id() != *waiting_step_) {
      ASYNCTLS_LOG_WARN("worker ", name_, ": result for step ", result.step_id(), " nobody waits for");
      return;
    }
    result_ = result;
    cv_.notify_all();
  }

  // RemoteExecutor::Step: send the plan and wait for its result or the loss of the link.
  absl::StatusOr<StepResult> Step(const StepPlan& plan) {
    v1::CoordinatorMessage message;
    ToProto(plan, message.mutable_plan());
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (lost_) return absl::UnavailableError(reason_);
      waiting_step_ = plan.step_id;
      result_.reset();
    }
    Send(std::move(message));
    std::unique_lock<std::mutex> lock(mu_);
    // The registry thread enforces the heartbeat timeout; the bounded wait is a second guard.
    while (!result_ && !lost_) {
      cv_.wait_for(lock, std::chrono::milliseconds(100));
      if (!result_ && !lost_ && Clock::now() - last_rx_ > std::chrono::milliseconds(timeout_ms_)) {
        lock.unlock();
        Lose(absl::StrCat("worker ", name_, " lost: no message for ", timeout_ms_, " ms"));
        lock.lock();
      }
    }
    waiting_step_.reset();
    if (!result_) return absl::UnavailableError(reason_);
    v1::WorkerStepResult result = std::move(*result_);
    result_.reset();
    if (!result.step_error().empty())
      return absl::InternalError(absl::StrCat("worker ", name_, ": ", result.step_error()));
    return FromProto(result);
  }

  // After gRPC's OnDone: the reactor is gone; nothing may touch it.
  void Detach() {
    std::lock_guard<std::mutex> lock(mu_);
    reactor_ = nullptr;
    lost_ = true;
    cv_.notify_all();
  }

  bool lost() const {
    std::lock_guard<std::mutex> lock(mu_);
    return lost_;
  }

  // Set once by the reactor on the hello, before the registry sees the link.
  std::string name_;
  ExecutorInfo info_;
  int64_t pid_ = 0;

 private:
  void End(const std::string& why, const grpc::Status& status, bool cancel) {
    bool finish = false;
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (finishing_) {
        if (!lost_) {
          lost_ = true;
          reason_ = why;
          cv_.notify_all();
        }
        return;
      }
      finishing_ = true;
      lost_ = true;
      reason_ = why;
      finish_status_ = status;
      cv_.notify_all();
      if (!writing_ && reactor_ && !finished_) finish = finished_ = true;
    }
    if (cancel) context_->TryCancel();  // fails a pending read/write at once
    if (finish) reactor_->Finish(status);
    registry_->Post({Event::kLost, shared_from_this()});
  }

  WorkerRegistry* registry_;
  grpc::CallbackServerContext* context_;
  grpc::ServerBidiReactor<v1::WorkerMessage, v1::CoordinatorMessage>* reactor_ = nullptr;
  const int32_t timeout_ms_;
  mutable std::mutex mu_;
  std::condition_variable cv_;
  Clock::time_point last_rx_;                    // guarded by mu_
  std::deque<v1::CoordinatorMessage> outbox_;    // guarded by mu_
  bool writing_ = false;                         // a write is in flight; guarded by mu_
  bool lost_ = false, finishing_ = false, finished_ = false;  // guarded by mu_
  std::string reason_;                           // guarded by mu_
  grpc::Status finish_status_;                   // guarded by mu_
  std::optional<uint64_t> waiting_step_;         // guarded by mu_
  std::optional<v1::WorkerStepResult> result_;   // guarded by mu_
};

namespace {

// The StepExecutor a worker's replica drives. Owned by the router; the link may outlive it.
class RemoteExecutor final : public StepExecutor {
 public:
  RemoteExecutor(std::shared_ptr<WorkerRegistry::Link> link, ExecutorInfo info)
      : link_(std::move(link)), info_(std::move(info)) {}
  ExecutorInfo Info() const override { return info_; }
  absl::StatusOr<StepResult> Step(const StepPlan& plan) override { return link_->Step(plan); }

 private:
  std::shared_ptr<WorkerRegistry::Link> link_;
  ExecutorInfo info_;
};

}  // namespace

class WorkerRegistry::Reactor final
    : public grpc::ServerBidiReactor<v1::WorkerMessage, v1::CoordinatorMessage> {
 public:
  Reactor(WorkerRegistry* registry, grpc::CallbackServerContext* context)
      : registry_(registry),
        link_(std::make_shared<Link>(registry, context, registry->options_.heartbeat_timeout_ms)) {
    link_->Bind(this);
    StartRead(&in_);
  }
  const std::shared_ptr<Link>& link() const { return link_; }

  void OnReadDone(bool ok) override {
    if (!ok) {
      link_->Lose(absl::StrCat("worker ", Name(), " lost: stream broken"));
      return;
    }
    link_->Touch();
    if (!hello_seen_) {
      if (!in_.has_hello() || in_.hello().worker_name().empty()) {
        link_->Refuse(grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                                   "hello: the first message must be a hello with a worker_name"));
        return;
      }
      const v1::WorkerHello& hello = in_.hello();
      const int32_t vocab = registry_->options_.expected_vocab_size;
      if (vocab > 0 && hello.vocab_size() != vocab) {
        link_->Refuse(grpc::Status(
            grpc::StatusCode::FAILED_PRECONDITION,
            absl::StrCat("hello.vocab_size: the worker's model has ", hello.vocab_size(),
                         " tokens, the coordinator's tokenizer ", vocab)));
        return;
      }
      hello_seen_ = true;
      link_->name_ = hello.worker_name();
      link_->info_ = InfoFromHello(hello);
      link_->pid_ = hello.pid();
      registry_->Post({Event::kHello, link_});
    } else if (in_.has_result()) {
      link_->OnResult(in_.result());
    } else if (in_.has_hello()) {
      link_->Lose(absl::StrCat("worker ", Name(), " lost: a second hello on one stream"));
      return;
    }
    StartRead(&in_);
  }
  void OnWriteDone(bool ok) override { link_->OnWriteDone(ok); }
  void OnCancel() override { link_->Lose(absl::StrCat("worker ", Name(), " lost: stream cancelled")); }
  void OnDone() override {
    link_->Detach();
    delete this;
  }

 private:
  std::string Name() const { return hello_seen_ ? link_->name_ : std::string("(before hello)"); }

  WorkerRegistry* registry_;
  std::shared_ptr<Link> link_;
  v1::WorkerMessage in_;
  bool hello_seen_ = false;  // reactions of one stream never run concurrently for reads
};

WorkerRegistry::WorkerRegistry(Router* router, WorkerRegistryOptions options)
    : router_(router), options_(options), thread_([this] { Run(); }) {}

WorkerRegistry::~WorkerRegistry() { Shutdown(); }

grpc::ServerBidiReactor<v1::WorkerMessage, v1::CoordinatorMessage>* WorkerRegistry::Connect(
    grpc::CallbackServerContext* context) {
  auto* reactor = new Reactor(this, context);
  bool refuse = false;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (stop_) refuse = true;
    else links_.insert(reactor->link());
  }
  if (refuse) reactor->link()->Refuse(grpc::Status(grpc::StatusCode::UNAVAILABLE, "coordinator shutting down"));
  return reactor;
}

void WorkerRegistry::Post(Event event) {
  std::lock_guard<std::mutex> lock(mu_);
  events_.push_back(std::move(event));
  cv_.notify_all();
}

void WorkerRegistry::Run() {
  const auto tick = std::chrono::milliseconds(50);
  auto next_heartbeat = Clock::now();
  std::unique_lock<std::mutex> lock(mu_);
  while (!stop_) {
    cv_.wait_for(lock, tick, [&] { return stop_ || !events_.empty(); });
    if (stop_) break;
    std::deque<Event> events;
    events.swap(events_);
    std::vector<std::shared_ptr<Link>> links(links_.begin(), links_.end());
    lock.unlock();
    // Router calls happen here, with no registry lock held.
    for (Event& e : events) {
      if (e.kind == Event::kHello) Accept(e.link);
      else Drop(e.link);
    }
    const auto now = Clock::now();
    for (const auto& link : links) {
      if (link->Silent(now)) {
        link->Lose(absl::StrCat("worker ", link->name_.empty() ? "(before hello)" : link->name_,
                                " lost: no message for ", options_.heartbeat_timeout_ms, " ms"));
      }
    }
    if (now >= next_heartbeat) {
      next_heartbeat = now + std::chrono::milliseconds(options_.heartbeat_interval_ms);
      v1::CoordinatorMessage beat;
      beat.mutable_heartbeat()->set_sent_ms(NowMs());
      for (const auto& link : links) link->Send(beat);
    }
    lock.lock();
  }
}

void WorkerRegistry::Accept(const std::shared_ptr<Link>& link) {
  if (link->lost()) return;  // its kLost event follows
  std::shared_ptr<Link> previous;
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = serving_.find(link->name_);
    if (it != serving_.end()) previous = it->second;
    serving_.erase(link->name_);
  }
  if (previous) {
    ASYNCTLS_LOG_WARN("worker ", link->name_, " connected again: dropping its previous stream");
    previous->Lose(absl::StrCat("worker ", link->name_, " lost: replaced by a new connection"));
    router_->RemoveReplica(link->name_, absl::UnavailableError(absl::StrCat(
                                            "worker ", link->name_, " lost: replaced by a new connection")));
  }
  absl::Status added = router_->AddReplica(link->name_, std::make_unique<RemoteExecutor>(link, link->info_));
  if (!added.ok()) {
    ASYNCTLS_LOG_ERROR("worker ", link->name_, " refused: ", added.ToString());
    link->Refuse(grpc::Status(grpc::StatusCode::ALREADY_EXISTS, std::string(added.message())));
    return;
  }
  {
    std::lock_guard<std::mutex> lock(mu_);
    serving_[link->name_] = link;
  }
  ASYNCTLS_LOG_INFO("worker ", link->name_, " (pid ", link->pid_, ", ", link->info_.device, ", ",
                    link->info_.kv_blocks_total, " KV blocks) serving");
  v1::CoordinatorMessage welcome;
  welcome.mutable_welcome()->set_worker_name(link->name_);
  welcome.mutable_welcome()->set_heartbeat_interval_ms(options_.heartbeat_interval_ms);
  welcome.mutable_welcome()->set_heartbeat_timeout_ms(options_.heartbeat_timeout_ms);
  link->Send(std::move(welcome));
  // A loss between the check above and AddReplica left a kLost event queued: Drop handles it.
}

void WorkerRegistry::Drop(const std::shared_ptr<Link>& link) {
  bool was_serving = false;
  {
    std::lock_guard<std::mutex> lock(mu_);
    links_.erase(link);
    auto it = serving_.find(link->name_);
    if (it != serving_.end() && it->second == link) {
      serving_.erase(it);
      was_serving = true;
    }
  }
  if (!was_serving) return;
  const std::string reason = absl::StrCat("worker ", link->name_, " lost");
  ASYNCTLS_LOG_WARN(reason, ": removing its replica");
  // Step() already failed with the link's own reason; the rest of its requests end here.
  router_->RemoveReplica(link->name_, absl::UnavailableError(reason));
}

void WorkerRegistry::Shutdown() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (stop_ && !thread_.joinable()) return;
    stop_ = true;
    cv_.notify_all();
  }
  if (thread_.joinable()) thread_.join();
  std::vector<std::shared_ptr<Link>> links;
  std::vector<std::string> names;
  {
    std::lock_guard<std::mutex> lock(mu_);
    links.assign(links_.begin(), links_.end());
    for (const auto& [name, link] : serving_) names.push_back(name);
    serving_.clear();
    links_.clear();
    events_.clear();
  }
  for (const auto& link : links) link->Refuse(grpc::Status(grpc::StatusCode::UNAVAILABLE, "coordinator shutting down"));
  for (const auto& name : names) router_->RemoveReplica(name, absl::UnavailableError("coordinator shutting down"));
}

std::vector<WorkerStatus> WorkerRegistry::Workers() const {
  std::lock_guard<std::mutex> lock(mu_);
  std::vector<WorkerStatus> out;
  for (const auto& [name, link] : serving_) out.push_back({name, link->info_, link->pid_});
  return out;
}

}  // namespace asynctls
