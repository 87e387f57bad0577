#include "grpc_client.h"

#include <chrono>

#include "grpcpp/grpcpp.h"

namespace asynctls {
namespace {

absl::Status FromGrpc(const grpc::Status& s) {
  if (s.ok()) return absl::OkStatus();
  return absl::Status(static_cast<absl::StatusCode>(static_cast<int>(s.error_code())), s.error_message());
}

void SetTimeout(grpc::ClientContext* context, double timeout_s) {
  if (timeout_s > 0)
    context->set_deadline(std::chrono::system_clock::now() +
                          std::chrono::microseconds(static_cast<int64_t>(timeout_s * 1e6)));
}

}  // namespace

InferenceClient::InferenceClient(const std::string& target)
    : channel_(grpc::CreateChannel(target, grpc::InsecureChannelCredentials())),
      stub_(v1::Inference::NewStub(channel_)) {}

bool InferenceClient::WaitForConnected(double timeout_s) {
  return channel_->WaitForConnected(std::chrono::system_clock::now() +
                                    std::chrono::microseconds(static_cast<int64_t>(timeout_s * 1e6)));
}

absl::StatusOr<StreamedGeneration> InferenceClient::Generate(const v1::GenerateRequest& request,
                                                             const std::function<void(const v1::Chunk&)>& on_chunk,
                                                             double timeout_s) {
  grpc::ClientContext context;
  SetTimeout(&context, timeout_s);
  StreamedGeneration out;
  auto reader = stub_->Generate(&context, request);
  v1::GenerateResponse response;
  while (reader->Read(&response)) {
    if (response.has_chunk()) {
      const v1::Chunk& chunk = response.chunk();
      out.token_ids.insert(out.token_ids.end(), chunk.token_ids().begin(), chunk.token_ids().end());
      out.text += chunk.text();
      if (on_chunk) on_chunk(chunk);
    } else if (response.has_final()) {
      out.final = response.final();
    }
  }
  const grpc::Status status = reader->Finish();
  if (!status.ok()) return FromGrpc(status);
  return out;
}

absl::StatusOr<v1::ListModelsResponse> InferenceClient::ListModels(double timeout_s) {
  grpc::ClientContext context;
  SetTimeout(&context, timeout_s);
  v1::ListModelsResponse response;
  const grpc::Status status = stub_->ListModels(&context, v1::ListModelsRequest(), &response);
  if (!status.ok()) return FromGrpc(status);
  return response;
}

}  // namespace asynctls
