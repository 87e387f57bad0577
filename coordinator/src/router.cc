#include "asynctls/coordinator/router.h"

#include <algorithm>

#include "absl/strings/str_cat.h"

namespace asynctls {

Router::Router(const Tokenizer* tokenizer, CoordinatorOptions options)
    : tokenizer_(tokenizer), options_(options) {}

Router::~Router() {
  std::vector<std::shared_ptr<Replica>> replicas;
  {
    std::lock_guard<std::mutex> lock(mu_);
    replicas.swap(replicas_);
  }
  for (auto& r : replicas) r->core->Shutdown(absl::CancelledError("server shutting down"));
}

absl::Status Router::AddReplica(const std::string& name, std::unique_ptr<StepExecutor> executor) {
  auto replica = std::make_shared<Replica>();
  replica->name = name;
  replica->executor = std::move(executor);
  std::lock_guard<std::mutex> lock(mu_);
  for (const auto& r : replicas_)
    if (r->name == name) return absl::AlreadyExistsError(absl::StrCat("replica '", name, "' is already serving"));
  replica->core = std::make_unique<Coordinator>(tokenizer_, replica->executor.get(), options_);
  replicas_.push_back(std::move(replica));
  return absl::OkStatus();
}

bool Router::RemoveReplica(const std::string& name, const absl::Status& reason) {
  std::shared_ptr<Replica> victim;
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = std::find_if(replicas_.begin(), replicas_.end(), [&](const auto& r) { return r->name == name; });
    if (it == replicas_.end()) return false;
    victim = *it;
    replicas_.erase(it);
  }
  // Outside the lock: sinks run and erase their request ids through the router.
  victim->core->Shutdown(reason);
  return true;
}

absl::Status Router::Submit(GenerationRequest request, EventSink sink) {
  // Lock order: a replica's sinks take mu_ while that replica holds its own lock, so nothing
  // here calls into a replica while holding mu_.
  std::shared_ptr<Replica> target;
  const std::string id = request.request_id;
  int best_load = 0;
  for (const auto& r : Snapshot()) {
    if (request.tls && !r->core->executor_info().tls) continue;  // replicas without a TLS index
    const CoordinatorStats s = r->core->Stats();
    const int load = s.waiting + s.running;
    if (!target || load < best_load) {
      target = r;
      best_load = load;
    }
  }
  if (!target && request.tls)
    return absl::FailedPreconditionError("attention.mode: no replica serves MODE_TLS (none has TLS channel sets)");
  if (!target) return absl::UnavailableError("no worker is serving; try again when one registers");
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (request_to_replica_.contains(id))
      return absl::AlreadyExistsError(absl::StrCat("request_id: '", id, "' is already running"));
    request_to_replica_[id] = target->name;
  }
  // The id leaves the map with the request's final event.
  EventSink wrapped = [this, id, sink = std::move(sink)](const GenerationEvent& ev) {
    if (ev.final()) {
      std::lock_guard<std::mutex> lock(mu_);
      request_to_replica_.erase(id);
    }
    sink(ev);
  };
  absl::Status s = target->core->Submit(std::move(request), std::move(wrapped));
  if (!s.ok()) {
    std::lock_guard<std::mutex> lock(mu_);
    request_to_replica_.erase(id);
  }
  return s;
}

bool Router::Cancel(const std::string& request_id) {
  std::shared_ptr<Replica> target;
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = request_to_replica_.find(request_id);
    if (it == request_to_replica_.end()) return false;
    for (const auto& r : replicas_)
      if (r->name == it->second) target = r;
  }
  return target && target->core->Cancel(request_id);
}

std::vector<std::shared_ptr<Router::Replica>> Router::Snapshot() const {
  std::lock_guard<std::mutex> lock(mu_);
  return replicas_;
}

std::vector<ReplicaStats> Router::Stats() const {
  std::vector<ReplicaStats> out;
  for (const auto& r : Snapshot()) out.push_back({r->name, r->core->executor_info(), r->core->Stats()});
  return out;
}

int Router::num_replicas() const {
  std::lock_guard<std::mutex> lock(mu_);
  return static_cast<int>(replicas_.size());
}

ExecutorInfo Router::AnyInfo() const {
  std::lock_guard<std::mutex> lock(mu_);
  return replicas_.empty() ? ExecutorInfo{} : replicas_.front()->core->executor_info();
}

}  // namespace asynctls
