// An in-process coordinator and gRPC server over one engine, for the service tests.
#pragma once

#include <chrono>
#include <memory>
#include <string>
#include <thread>

#include "absl/status/statusor.h"
#include "asynctls/coordinator/router.h"
#include "asynctls/runtime/engine.h"
#include "asynctls/runtime/tokenizer.h"
#include "asynctls/v1/inference.grpc.pb.h"
#include "grpcpp/grpcpp.h"
#include "server/inference_service.h"

namespace asynctls::testing {

struct InProcessServer {
  std::unique_ptr<Router> router;
  std::unique_ptr<InferenceService> service;
  RunningServer server;
  std::shared_ptr<grpc::Channel> channel;  // to the server, insecure

  // Serves `engine` as replica "local" on 127.0.0.1 (a free port).
  static absl::StatusOr<std::unique_ptr<InProcessServer>> Start(
      const Tokenizer* tokenizer, std::unique_ptr<Engine> engine,
      const CoordinatorOptions& options = {}) {
    auto s = std::make_unique<InProcessServer>();
    s->router = std::make_unique<Router>(tokenizer, options);
    if (absl::Status st = s->router->AddReplica("local", std::move(engine)); !st.ok()) return st;
    s->service = std::make_unique<InferenceService>(s->router.get(), tokenizer);
    ServerConfig config;
    config.address = "127.0.0.1:0";
    auto server = BuildInferenceServer(s->service.get(), config);
    if (!server.ok()) return server.status();
    s->server = std::move(*server);
    s->channel = grpc::CreateChannel("127.0.0.1:" + std::to_string(s->server.port),
                                     grpc::InsecureChannelCredentials());
    return s;
  }

  ~InProcessServer() {
    if (server.server)
      server.server->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(2));
    router.reset();  // finishes the replicas' requests before the service goes
  }
};

// KV blocks in use over every replica (GetStats); -1 when the call fails.
inline int KvBlocksUsed(v1::Inference::Stub& stub) {
  grpc::ClientContext context;
  v1::GetStatsResponse stats;
  if (!stub.GetStats(&context, v1::GetStatsRequest(), &stats).ok()) return -1;
  int used = 0;
  for (const auto& r : stats.replicas()) used += r.kv_blocks_used();
  return used;
}

// Whether the replicas' KV use falls to 0 blocks within `within` (requests release theirs
// asynchronously, at the coordinator's next step).
inline bool KvReturnsToIdle(v1::Inference::Stub& stub, std::chrono::milliseconds within) {
  const auto deadline = std::chrono::steady_clock::now() + within;
  while (std::chrono::steady_clock::now() < deadline) {
    if (KvBlocksUsed(stub) == 0) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  return KvBlocksUsed(stub) == 0;
}

}  // namespace asynctls::testing
