// The public asynctls.v1.Inference service on the gRPC callback API (no thread per stream)
// over a Router: validates and tokenizes requests, streams the Router's events as chunks and a
// final message, and cancels a request's sequence (freeing its KV within a step) when its
// client cancels, disconnects or runs past its deadline. Plus BuildInferenceServer, which puts
// it on a grpc::Server next to grpc.health.v1.Health, reflection and any extra services.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "asynctls/coordinator/router.h"
#include "asynctls/runtime/tokenizer.h"
#include "asynctls/v1/inference.grpc.pb.h"
#include "grpcpp/grpcpp.h"

namespace asynctls {

class Metrics;

// absl::Status <-> grpc::Status, code for code (the two enums share their numbers).
grpc::Status ToGrpcStatus(const absl::Status& status);
absl::Status FromGrpcStatus(const grpc::Status& status);

struct InferenceServiceOptions {
  int32_t default_max_tokens = 256;  // when GenerateRequest.sampling.max_tokens is unset
};

// Generate's request arrives as raw bytes (WithRawCallbackMethod) so that a prompt that is not
// valid UTF-8 gets INVALID_ARGUMENT naming the field instead of protobuf's anonymous parse
// failure; the other RPCs use the typed callback methods.
class InferenceService final
    : public v1::Inference::WithRawCallbackMethod_Generate<v1::Inference::CallbackService> {
 public:
  // `router` and `tokenizer` (and `metrics` when given) must outlive the service.
  InferenceService(Router* router, const Tokenizer* tokenizer, InferenceServiceOptions options = {},
                   Metrics* metrics = nullptr);
  ~InferenceService() override;

  // Validates `request` and turns it into the core's GenerationRequest (tokenized). Errors name
  // the field: INVALID_ARGUMENT (FAILED_PRECONDITION for attention.mode TLS on a server without
  // TLS channel sets).
  absl::StatusOr<GenerationRequest> Prepare(const v1::GenerateRequest& request);

  grpc::ServerWriteReactor<grpc::ByteBuffer>* Generate(grpc::CallbackServerContext* context,
                                                       const grpc::ByteBuffer* request) override;
  grpc::ServerUnaryReactor* Cancel(grpc::CallbackServerContext* context, const v1::CancelRequest* request,
                                   v1::CancelResponse* response) override;
  grpc::ServerUnaryReactor* ListModels(grpc::CallbackServerContext* context,
                                       const v1::ListModelsRequest* request,
                                       v1::ListModelsResponse* response) override;
  grpc::ServerUnaryReactor* GetStats(grpc::CallbackServerContext* context, const v1::GetStatsRequest* request,
                                     v1::GetStatsResponse* response) override;

  // Generate streams currently open.
  int open_streams() const { return open_streams_.load(); }

 private:
  class GenerateReactor;
  Router* router_;
  const Tokenizer* tokenizer_;
  InferenceServiceOptions options_;
  Metrics* metrics_;
  std::atomic<uint64_t> next_id_{0};
  std::atomic<int> open_streams_{0};
};

struct ServerConfig {
  std::string address = "0.0.0.0:50051";  // "host:port"; port 0 picks a free one
  // Registered next to Inference, health and reflection (e.g. the worker registry). Not owned;
  // each must outlive the server.
  std::vector<grpc::Service*> extra_services;
};

struct RunningServer {
  std::unique_ptr<grpc::Server> server;
  int port = 0;  // the bound port
};

// Starts a server with `service`, the standard grpc.health.v1.Health service (overall status
// and "asynctls.v1.Inference" SERVING), server reflection and config.extra_services.
// UNAVAILABLE when the address cannot be bound.
absl::StatusOr<RunningServer> BuildInferenceServer(InferenceService* service, const ServerConfig& config);

}  // namespace asynctls
