// The coordinator's side of the worker link (proto/asynctls/v1/worker.proto): the WorkerLink
// service on the gRPC callback API (no thread per stream). Each worker that connects and says
// Hello becomes a Router replica named after it, driven by a RemoteExecutor whose Step() sends
// the plan on that worker's stream and waits for the matching result. A worker is lost when its
// stream breaks or nothing arrives from it for `heartbeat_timeout_ms`: its in-flight step fails
// with UNAVAILABLE at once and its replica is removed (remaining requests end UNAVAILABLE
// "worker <name> lost: ..."), while other replicas keep serving. A worker that connects again
// under the same name is taken back (an older stream of that name is dropped first).
//
// Threading: gRPC reactions only record and hand over; one registry thread sends heartbeats,
// watches silence and does every Router::AddReplica/RemoveReplica call, holding no lock of its
// own meanwhile (sinks and replica shutdown may take the router's and coordinators' locks).
// Thread-safe.
#pragma once

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/container/flat_hash_set.h"
#include "asynctls/coordinator/router.h"
#include "asynctls/v1/worker.grpc.pb.h"

namespace asynctls {

struct WorkerRegistryOptions {
  int32_t heartbeat_interval_ms = 500;   // heartbeats sent to each worker
  int32_t heartbeat_timeout_ms = 1500;   // silence after which a worker is lost
  int32_t expected_vocab_size = 0;       // refuse workers whose model differs (0: any)
};

struct WorkerStatus {
  std::string name;
  ExecutorInfo info;
  int64_t pid = 0;
};

class WorkerRegistry final : public v1::WorkerLink::CallbackService {
 public:
  // `router` must outlive the registry. Starts the registry thread.
  WorkerRegistry(Router* router, WorkerRegistryOptions options = {});
  // Shutdown() if not done yet. The gRPC server using this service must be shut down first
  // (gRPC's rule: a service outlives its server).
  ~WorkerRegistry() override;

  // Drops every worker (streams end UNAVAILABLE, replicas removed) and stops the registry
  // thread; later connections are refused. Call before the gRPC server's Shutdown(), which
  // otherwise waits for the workers' open streams. Blocks until the replicas are gone.
  void Shutdown();

  // Workers currently serving as replicas.
  std::vector<WorkerStatus> Workers() const;

  // gRPC entry (callback API).
  grpc::ServerBidiReactor<v1::WorkerMessage, v1::CoordinatorMessage>* Connect(
      grpc::CallbackServerContext* context) override;

  class Link;  // one worker stream's shared state (worker_registry.cc)

 private:
  class Reactor;
  using Clock = std::chrono::steady_clock;
  struct Event {
    enum Kind { kHello, kLost } kind;
    std::shared_ptr<Link> link;
  };
  void Post(Event event);  // from reactions and links; never blocks on the router
  void Run();              // the registry thread
  void Accept(const std::shared_ptr<Link>& link);
  void Drop(const std::shared_ptr<Link>& link);

  Router* router_;
  const WorkerRegistryOptions options_;
  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::deque<Event> events_;                                        // guarded by mu_
  absl::flat_hash_set<std::shared_ptr<Link>> links_;                // open streams; mu_
  absl::flat_hash_map<std::string, std::shared_ptr<Link>> serving_;  // name -> replica; mu_
  bool stop_ = false;                                               // guarded by mu_
  std::thread thread_;
};

}  // namespace asynctls
