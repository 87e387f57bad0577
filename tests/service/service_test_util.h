// An in-process coordinator and gRPC server over one engine, for the service tests.
#pragma once

#include <chrono>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "asynctls/coordinator/router.h"
#include "asynctls/runtime/engine.h"
#include "asynctls/runtime/tokenizer.h"
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

}  // namespace asynctls::testing
