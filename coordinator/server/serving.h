// Running the coordinator as a process: load the tokenizer, start the Router (optionally with
// an in-process Engine replica), the gRPC server and the metrics endpoint, then serve until
// SIGINT/SIGTERM. Shared by `asynctls-coordinator` and `asynctls serve`.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "asynctls/coordinator/coordinator.h"
#include "asynctls/runtime/engine.h"
#include "asynctls/runtime/tokenizer.h"
#include "asynctls/runtime/weights.h"

namespace asynctls {

struct ServingOptions {
  std::string host = "0.0.0.0";
  int port = 50051;          // 0: any free port
  int metrics_port = -1;     // < 0: no metrics endpoint; 0: any free port
  std::string model_path;    // GGUF file or safetensors folder: the tokenizer (and local engine)
  CoordinatorOptions coordinator;
  bool local_engine = false;  // serve an in-process Engine replica named "local"
  EngineOptions engine;
  // Called once the server listens (with the bound gRPC port), e.g. to start worker processes;
  // an error stops serving. Called again with -1 on shutdown, before the server stops.
  std::function<absl::Status(int port)> on_ready;
};

// The tokenizer of a GGUF file or of a safetensors folder (its tokenizer.json).
absl::StatusOr<std::unique_ptr<Tokenizer>> LoadTokenizer(const WeightFile& weights, const std::string& path);

// Blocks until SIGINT or SIGTERM (or an on_ready error), then shuts down cleanly: live requests
// end CANCELLED, the server drains for up to 2 s.
absl::Status ServeUntilSignalled(const ServingOptions& options);

// Asks a running ServeUntilSignalled to return (as a signal would). Async-signal-safe.
void RequestServingStop();

}  // namespace asynctls
