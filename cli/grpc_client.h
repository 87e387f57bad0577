// A small blocking client of asynctls.v1.Inference: one streamed Generate with a callback per
// chunk, plus ListModels. Used by `asynctls generate --server` (and reusable by tools).
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "asynctls/v1/inference.grpc.pb.h"

namespace asynctls {

struct StreamedGeneration {
  std::vector<int32_t> token_ids;
  std::string text;
  v1::Final final;  // set when the stream ended normally
};

class InferenceClient {
 public:
  // `target` is "host:port". Connects lazily; UNAVAILABLE errors come from the calls.
  explicit InferenceClient(const std::string& target);

  // Streams one request; `on_chunk` (optional) sees each chunk as it arrives. The server's
  // status comes back as an absl::Status with the same code and message. `timeout_s` <= 0:
  // no deadline.
  absl::StatusOr<StreamedGeneration> Generate(const v1::GenerateRequest& request,
                                              const std::function<void(const v1::Chunk&)>& on_chunk = {},
                                              double timeout_s = 0);
  absl::StatusOr<v1::ListModelsResponse> ListModels(double timeout_s = 10);
  // Waits up to `timeout_s` for the channel to connect.
  bool WaitForConnected(double timeout_s);

 private:
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<v1::Inference::Stub> stub_;
};

}  // namespace asynctls
