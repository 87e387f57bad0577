// The coordinator's front door: spreads requests over replicas (each a Coordinator core driving
// one StepExecutor: the in-process Engine or a remote worker group), keeps request ids unique
// across them, and takes replicas in and out as workers come and go. Thread-safe.
#pragma once

#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "asynctls/coordinator/coordinator.h"

namespace asynctls {

struct ReplicaStats {
  std::string name;
  ExecutorInfo info;
  CoordinatorStats stats;
};

class Router {
 public:
  // `tokenizer` must outlive the router.
  Router(const Tokenizer* tokenizer, CoordinatorOptions options);
  ~Router();  // shuts every replica down (live requests end CANCELLED)

  // Starts serving on `executor` under `name` (unique; ALREADY_EXISTS otherwise).
  absl::Status AddReplica(const std::string& name, std::unique_ptr<StepExecutor> executor);
  // Stops the replica: its live requests end with `reason` (UNAVAILABLE for a lost worker).
  // False if unknown.
  bool RemoveReplica(const std::string& name, const absl::Status& reason);

  // Picks the live replica with the fewest waiting + running requests. UNAVAILABLE when there
  // is none; ALREADY_EXISTS for a request id live anywhere; else as Coordinator::Submit.
  absl::Status Submit(GenerationRequest request, EventSink sink);
  bool Cancel(const std::string& request_id);

  std::vector<ReplicaStats> Stats() const;
  int num_replicas() const;
  // Info of any live replica (model name, vocab, context); nullopt-like empty name when none.
  ExecutorInfo AnyInfo() const;

 private:
  struct Replica {
    std::string name;
    std::unique_ptr<StepExecutor> executor;
    std::unique_ptr<Coordinator> core;
  };
  std::vector<std::shared_ptr<Replica>> Snapshot() const;

  const Tokenizer* tokenizer_;
  CoordinatorOptions options_;
  mutable std::mutex mu_;
  std::vector<std::shared_ptr<Replica>> replicas_;             // guarded by mu_
  absl::flat_hash_map<std::string, std::string> request_to_replica_;  // guarded by mu_
};

}  // namespace asynctls
