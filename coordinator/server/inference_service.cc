#include "server/inference_service.h"

#include <algorithm>
#include <cmath>
#include <deque>
#include <mutex>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "google/protobuf/unknown_field_set.h"
#include "grpcpp/ext/proto_server_reflection_plugin.h"
#include "grpcpp/health_check_service_interface.h"
#if ASYNCTLS_HAVE_METRICS
#include "server/metrics.h"
#endif

namespace asynctls {
namespace {

constexpr char kServiceName[] = "asynctls.v1.Inference";

std::string ByteBufferToString(const grpc::ByteBuffer& buffer) {
  std::vector<grpc::Slice> slices;
  std::string out;
  if (!buffer.Dump(&slices).ok()) return out;
  for (const auto& s : slices) out.append(reinterpret_cast<const char*>(s.begin()), s.size());
  return out;
}

grpc::ByteBuffer ToByteBuffer(const google::protobuf::Message& message) {
  const std::string bytes = message.SerializeAsString();
  grpc::Slice slice(bytes);
  return grpc::ByteBuffer(&slice, 1);
}

// The first string field of `set` among `names` (field number -> name) that is not valid UTF-8.
std::string FindBadUtf8(const google::protobuf::UnknownFieldSet& set,
                        const std::vector<std::pair<int, std::string>>& names) {
  for (int i = 0; i < set.field_count(); ++i) {
    const auto& f = set.field(i);
    if (f.type() != google::protobuf::UnknownField::TYPE_LENGTH_DELIMITED) continue;
    for (const auto& [number, name] : names)
      if (f.number() == number && !IsValidUtf8(f.length_delimited())) return name;
  }
  return "";
}

// Why `bytes` did not parse as a GenerateRequest: protobuf rejects proto3 strings that are not
// UTF-8 without saying which; find the field so the error can name it.
absl::Status DiagnoseUnparsable(const std::string& bytes) {
  google::protobuf::UnknownFieldSet top;
  if (!top.ParseFromString(bytes))
    return absl::InvalidArgumentError("request: not a valid asynctls.v1.GenerateRequest message");
  std::string field = FindBadUtf8(top, {{1, "request_id"}, {2, "model"}, {3, "prompt"}});
  int message_index = 0;
  for (int i = 0; field.empty() && i < top.field_count(); ++i) {
    const auto& f = top.field(i);
    if (f.type() != google::protobuf::UnknownField::TYPE_LENGTH_DELIMITED) continue;
    google::protobuf::UnknownFieldSet inner;
    if (!inner.ParseFromString(f.length_delimited())) continue;
    if (f.number() == 5) {  // ChatMessages { repeated ChatMessage messages = 1; }
      for (int j = 0; field.empty() && j < inner.field_count(); ++j) {
        google::protobuf::UnknownFieldSet msg;
        if (inner.field(j).type() != google::protobuf::UnknownField::TYPE_LENGTH_DELIMITED ||
            !msg.ParseFromString(inner.field(j).length_delimited()))
          continue;
        const std::string which = FindBadUtf8(msg, {{1, "role"}, {2, "content"}});
        if (!which.empty()) field = absl::StrCat("messages[", message_index, "].", which);
        ++message_index;
      }
    } else if (f.number() == 6) {  // SamplingParams.stop
      if (!FindBadUtf8(inner, {{6, "stop"}}).empty()) field = "sampling.stop";
    }
  }
  if (field.empty()) return absl::InvalidArgumentError("request: not a valid asynctls.v1.GenerateRequest message");
  return absl::InvalidArgumentError(absl::StrCat(field, ": is not valid UTF-8"));
}

v1::Final::FinishReason ToProto(FinishReason reason) {
  switch (reason) {
    case FinishReason::kStop: return v1::Final::FINISH_REASON_STOP;
    case FinishReason::kLength: return v1::Final::FINISH_REASON_LENGTH;
    case FinishReason::kCancelled: return v1::Final::FINISH_REASON_CANCELLED;
    default: return v1::Final::FINISH_REASON_UNSPECIFIED;
  }
}

}  // namespace

grpc::Status ToGrpcStatus(const absl::Status& status) {
  if (status.ok()) return grpc::Status::OK;
  return grpc::Status(static_cast<grpc::StatusCode>(static_cast<int>(status.code())),
                      std::string(status.message()));
}

absl::Status FromGrpcStatus(const grpc::Status& status) {
  if (status.ok()) return absl::OkStatus();
  return absl::Status(static_cast<absl::StatusCode>(static_cast<int>(status.error_code())),
                      status.error_message());
}

// One Generate stream. Events arrive on a replica's loop thread (the sink must not block);
// writes go out one at a time. Only this reactor calls Finish, exactly once, after its last
// write; the state the sink touches is shared so a late event after OnDone is dropped safely.
class InferenceService::GenerateReactor final : public grpc::ServerWriteReactor<grpc::ByteBuffer> {
 public:
  GenerateReactor(InferenceService* service, grpc::CallbackServerContext* context,
                  const grpc::ByteBuffer* request)
      : service_(service), shared_(std::make_shared<Shared>()) {
    shared_->reactor = this;
    service_->open_streams_.fetch_add(1);
    absl::StatusOr<GenerationRequest> prepared = Parse(*request);
    if (!prepared.ok()) {
      Reject(prepared.status());
      return;
    }
    shared_->request_id = prepared->request_id;
    std::shared_ptr<Shared> shared = shared_;
    Metrics* metrics = service_->metrics_;
    const absl::Status submitted = service_->router_->Submit(
        std::move(*prepared), [shared, metrics](const GenerationEvent& ev) { OnEvent(shared, metrics, ev); });
    if (!submitted.ok()) {
      Reject(submitted);
      return;
    }
    std::lock_guard<std::mutex> lock(shared_->mu);
    shared_->submitted = true;
  }

  void OnWriteDone(bool ok) override {
    std::unique_lock<std::mutex> lock(shared_->mu);
    shared_->writing = false;
    if (!ok) shared_->broken = true;  // the client is gone
    Pump(shared_, lock);
  }

  void OnCancel() override {
    bool cancel_request;
    {
      std::lock_guard<std::mutex> lock(shared_->mu);
      shared_->broken = true;
      cancel_request = shared_->submitted && !shared_->have_final;
    }
    // Outside the lock: the replica emits the CANCELLED event (into our sink) synchronously.
    if (cancel_request) service_->router_->Cancel(shared_->request_id);
    std::unique_lock<std::mutex> lock(shared_->mu);
    Pump(shared_, lock);
  }

  void OnDone() override {
    service_->open_streams_.fetch_sub(1);
    delete this;
  }

 private:
  struct Shared {
    std::mutex mu;
    GenerateReactor* reactor = nullptr;  // valid while !finish_called
    std::string request_id;
    std::deque<grpc::ByteBuffer> queue;
    grpc::ByteBuffer current;  // the write in flight
    bool writing = false, finish_called = false, have_final = false;
    bool submitted = false, broken = false;
    grpc::Status final_status;
  };

  absl::StatusOr<GenerationRequest> Parse(const grpc::ByteBuffer& raw) {
    const std::string bytes = ByteBufferToString(raw);
    v1::GenerateRequest request;
    if (!request.ParseFromString(bytes)) return DiagnoseUnparsable(bytes);
    return service_->Prepare(request);
  }

  void Reject(const absl::Status& status) {
#if ASYNCTLS_HAVE_METRICS
    if (service_->metrics_) service_->metrics_->OnRejected(status.code());
#endif
    std::lock_guard<std::mutex> lock(shared_->mu);
    shared_->finish_called = true;
    Finish(ToGrpcStatus(status));
  }

  static void OnEvent(const std::shared_ptr<Shared>& shared, Metrics* metrics, const GenerationEvent& ev) {
#if ASYNCTLS_HAVE_METRICS
    if (ev.final() && metrics) metrics->OnFinal(ev);
#endif
    std::unique_lock<std::mutex> lock(shared->mu);
    if (shared->finish_called || shared->have_final) return;
    if (!ev.token_ids.empty() || !ev.text_delta.empty()) {
      v1::GenerateResponse response;
      v1::Chunk* chunk = response.mutable_chunk();
      chunk->mutable_token_ids()->Add(ev.token_ids.begin(), ev.token_ids.end());
      chunk->set_text(ev.text_delta);
      shared->queue.push_back(ToByteBuffer(response));
    }
    if (ev.final()) {
      v1::GenerateResponse response;
      if (ev.finish == FinishReason::kStop || ev.finish == FinishReason::kLength) {
        v1::Final* final = response.mutable_final();
        final->set_finish_reason(ToProto(ev.finish));
        final->mutable_usage()->set_prompt_tokens(ev.prompt_tokens);
        final->mutable_usage()->set_completion_tokens(ev.completion_tokens);
        v1::Timings* t = final->mutable_timings();
        t->set_queue_ms(ev.timings.queue_ms);
        t->set_ttft_ms(ev.timings.ttft_ms);
        t->set_e2e_ms(ev.timings.total_ms);
        double sum = 0;
        for (double gap : ev.timings.inter_token_ms) {
          t->add_inter_token_ms(gap);
          sum += gap;
        }
        if (!ev.timings.inter_token_ms.empty()) t->set_mean_itl_ms(sum / ev.timings.inter_token_ms.size());
        shared->final_status = grpc::Status::OK;
      } else {
        absl::Status error = ev.error;
        if (error.ok())
          error = ev.finish == FinishReason::kCancelled ? absl::CancelledError("request cancelled")
                                                        : absl::InternalError("request failed");
        response.mutable_error()->set_code(static_cast<int>(error.code()));
        response.mutable_error()->set_message(std::string(error.message()));
        shared->final_status = ToGrpcStatus(error);
      }
      shared->queue.push_back(ToByteBuffer(response));
      shared->have_final = true;
    }
    Pump(shared, lock);
  }

  // Starts the next write, or finishes the call once the final message is out (or at once
  // when the client is gone). Called with the lock held; releases it before calling gRPC.
  static void Pump(const std::shared_ptr<Shared>& shared, std::unique_lock<std::mutex>& lock) {
    if (shared->finish_called || shared->writing) return;
    GenerateReactor* reactor = shared->reactor;
    if (shared->broken) {
      shared->finish_called = true;
      lock.unlock();
      reactor->Finish(grpc::Status(grpc::StatusCode::CANCELLED, "the client cancelled or went away"));
      return;
    }
    if (!shared->queue.empty()) {
      shared->current = std::move(shared->queue.front());
      shared->queue.pop_front();
      shared->writing = true;
      lock.unlock();
      reactor->StartWrite(&shared->current);
      return;
    }
    if (shared->have_final) {
      shared->finish_called = true;
      const grpc::Status status = shared->final_status;
      lock.unlock();
      reactor->Finish(status);
    }
  }

  InferenceService* service_;
  std::shared_ptr<Shared> shared_;
};

InferenceService::InferenceService(Router* router, const Tokenizer* tokenizer, InferenceServiceOptions options,
                                   Metrics* metrics)
    : router_(router), tokenizer_(tokenizer), options_(options), metrics_(metrics) {}

InferenceService::~InferenceService() = default;

absl::StatusOr<GenerationRequest> InferenceService::Prepare(const v1::GenerateRequest& request) {
  GenerationRequest out;
  const std::vector<ReplicaStats> replicas = router_->Stats();
  int32_t max_context = 0;
  if (!request.model().empty()) {
    std::vector<std::string> served;
    bool found = false;
    for (const auto& r : replicas) {
      served.push_back(r.info.model_name);
      if (r.info.model_name == request.model()) {
        found = true;
        max_context = r.info.max_context;
      }
    }
    if (!found)
      return absl::InvalidArgumentError(absl::StrCat("model: unknown model '", request.model(), "' (served: ",
                                                     served.empty() ? "none" : absl::StrJoin(served, ", "), ")"));
  } else if (!replicas.empty()) {
    max_context = replicas.front().info.max_context;
  }

  // Attention options.
  const v1::AttentionOptions& attention = request.attention();
  if (attention.mode() != v1::AttentionOptions::MODE_DENSE && attention.mode() != v1::AttentionOptions::MODE_TLS)
    return absl::InvalidArgumentError(absl::StrCat("attention.mode: unknown mode ", attention.mode()));
  if (attention.token_budget() < 0) return absl::InvalidArgumentError("attention.token_budget: must be >= 0");
  if (attention.block_budget() < 0) return absl::InvalidArgumentError("attention.block_budget: must be >= 0");
  if (attention.mode() == v1::AttentionOptions::MODE_TLS) {
    const ReplicaStats* tls = nullptr;
    for (const auto& r : replicas)
      if (r.info.tls && (request.model().empty() || r.info.model_name == request.model())) tls = &r;
    if (tls == nullptr)
      return absl::FailedPreconditionError(
          "attention.mode: MODE_TLS needs a server started with TLS channel sets (asynctls serve --tls-channels)");
    if (attention.token_budget() > tls->info.tls_token_budget)
      return absl::InvalidArgumentError(absl::StrCat("attention.token_budget: ", attention.token_budget(),
                                                     " exceeds this server's largest, ", tls->info.tls_token_budget));
    if (attention.block_budget() > tls->info.tls_block_budget)
      return absl::InvalidArgumentError(absl::StrCat("attention.block_budget: ", attention.block_budget(),
                                                     " exceeds this server's largest, ", tls->info.tls_block_budget));
    out.tls = true;
    out.tls_block_budget = attention.block_budget();
    out.tls_token_budget = attention.token_budget();
  }

  // Sampling.
  const v1::SamplingParams& s = request.sampling();
  if (!(s.temperature() >= 0.f) || std::isinf(s.temperature()))
    return absl::InvalidArgumentError("sampling.temperature: must be a finite value >= 0");
  out.sampling.temperature = s.temperature();
  if (s.has_top_p()) {
    if (!(s.top_p() > 0.f && s.top_p() <= 1.f))
      return absl::InvalidArgumentError(absl::StrCat("sampling.top_p: ", s.top_p(), " is outside (0, 1]"));
    out.sampling.top_p = s.top_p();
  }
  if (s.top_k() < 0) return absl::InvalidArgumentError("sampling.top_k: must be >= 0");
  out.sampling.top_k = s.top_k();
  out.sampling.seed = s.seed();
  out.max_tokens = options_.default_max_tokens;
  if (s.has_max_tokens()) {
    if (s.max_tokens() <= 0)
      return absl::InvalidArgumentError(absl::StrCat("sampling.max_tokens: ", s.max_tokens(), " must be positive"));
    out.max_tokens = s.max_tokens();
  }
  for (const std::string& stop : s.stop()) {
    if (stop.empty()) return absl::InvalidArgumentError("sampling.stop: stop strings must not be empty");
    if (!IsValidUtf8(stop)) return absl::InvalidArgumentError("sampling.stop: is not valid UTF-8");
    out.stop_strings.push_back(stop);
  }
  out.ignore_eos = s.ignore_eos();

  // Input.
  auto encode = [&](const std::string& text, const char* field) -> absl::Status {
    absl::StatusOr<std::vector<int32_t>> ids = tokenizer_->Encode(text);
    if (!ids.ok()) return absl::InvalidArgumentError(absl::StrCat(field, ": ", ids.status().message()));
    out.prompt_tokens = std::move(*ids);
    if (tokenizer_->add_bos() && tokenizer_->bos_id() >= 0)
      out.prompt_tokens.insert(out.prompt_tokens.begin(), tokenizer_->bos_id());
    return absl::OkStatus();
  };
  const char* input_field = "prompt";
  switch (request.input_case()) {
    case v1::GenerateRequest::kPrompt: {
      if (request.prompt().empty()) return absl::InvalidArgumentError("prompt: must not be empty");
      if (!IsValidUtf8(request.prompt())) return absl::InvalidArgumentError("prompt: is not valid UTF-8");
      if (absl::Status st = encode(request.prompt(), "prompt"); !st.ok()) return st;
      break;
    }
    case v1::GenerateRequest::kTokenIds: {
      input_field = "token_ids";
      if (request.token_ids().ids().empty()) return absl::InvalidArgumentError("token_ids: must not be empty");
      out.prompt_tokens.assign(request.token_ids().ids().begin(), request.token_ids().ids().end());
      break;
    }
    case v1::GenerateRequest::kMessages: {
      input_field = "messages";
      const auto& messages = request.messages().messages();
      if (messages.empty()) return absl::InvalidArgumentError("messages: must not be empty");
      std::vector<ChatMessage> chat;
      for (int i = 0; i < messages.size(); ++i) {
        const auto& m = messages[i];
        if (m.role() != "system" && m.role() != "user" && m.role() != "assistant")
          return absl::InvalidArgumentError(absl::StrCat("messages[", i, "].role: '", m.role(),
                                                         "' is not one of system, user, assistant"));
        if (!IsValidUtf8(m.content()))
          return absl::InvalidArgumentError(absl::StrCat("messages[", i, "].content: is not valid UTF-8"));
        chat.push_back({m.role(), m.content()});
      }
      if (absl::Status st = encode(tokenizer_->ApplyChatTemplate(chat), "messages"); !st.ok()) return st;
      break;
    }
    default:
      return absl::InvalidArgumentError("prompt: one of prompt, token_ids or messages is required");
  }
  if (max_context > 0 && static_cast<int64_t>(out.prompt_tokens.size()) >= max_context)
    return absl::InvalidArgumentError(absl::StrCat(input_field, ": ", out.prompt_tokens.size(),
                                                   " tokens do not fit the model's context of ", max_context,
                                                   " (with room for one generated token)"));
  out.request_id = request.request_id().empty() ? absl::StrCat("_anon-", next_id_.fetch_add(1))
                                                : request.request_id();
  return out;
}

grpc::ServerWriteReactor<grpc::ByteBuffer>* InferenceService::Generate(grpc::CallbackServerContext* context,
                                                                       const grpc::ByteBuffer* request) {
  return new GenerateReactor(this, context, request);
}

grpc::ServerUnaryReactor* InferenceService::Cancel(grpc::CallbackServerContext* context,
                                                   const v1::CancelRequest* request, v1::CancelResponse*) {
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  if (request->request_id().empty()) {
    reactor->Finish(grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, "request_id: must not be empty"));
  } else if (!router_->Cancel(request->request_id())) {
    reactor->Finish(grpc::Status(grpc::StatusCode::NOT_FOUND,
                                 absl::StrCat("request_id: no live request '", request->request_id(), "'")));
  } else {
    reactor->Finish(grpc::Status::OK);
  }
  return reactor;
}

grpc::ServerUnaryReactor* InferenceService::ListModels(grpc::CallbackServerContext* context,
                                                       const v1::ListModelsRequest*,
                                                       v1::ListModelsResponse* response) {
  std::vector<std::string> seen;
  for (const auto& r : router_->Stats()) {
    if (std::find(seen.begin(), seen.end(), r.info.model_name) != seen.end()) continue;
    seen.push_back(r.info.model_name);
    v1::ModelInfo* m = response->add_models();
    m->set_name(r.info.model_name);
    m->set_vocab_size(r.info.vocab_size);
    m->set_max_context(r.info.max_context);
  }
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  reactor->Finish(grpc::Status::OK);
  return reactor;
}

grpc::ServerUnaryReactor* InferenceService::GetStats(grpc::CallbackServerContext* context,
                                                     const v1::GetStatsRequest*, v1::GetStatsResponse* response) {
  for (const auto& r : router_->Stats()) {
    v1::ReplicaStats* out = response->add_replicas();
    out->set_name(r.name);
    out->set_model(r.info.model_name);
    out->set_device(r.info.device);
    out->set_waiting(r.stats.waiting);
    out->set_running(r.stats.running);
    out->set_steps(r.stats.steps);
    out->set_generated_tokens(r.stats.generated_tokens);
    out->set_finished_ok(r.stats.finished_ok);
    out->set_finished_error(r.stats.finished_error);
    out->set_cancelled(r.stats.cancelled);
    out->set_kv_blocks_used(r.stats.kv_blocks_used);
    out->set_kv_blocks_total(r.stats.kv_blocks_total);
  }
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  reactor->Finish(grpc::Status::OK);
  return reactor;
}

absl::StatusOr<RunningServer> BuildInferenceServer(InferenceService* service, const ServerConfig& config) {
  grpc::EnableDefaultHealthCheckService(true);
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  grpc::ServerBuilder builder;
  RunningServer running;
  builder.AddListeningPort(config.address, grpc::InsecureServerCredentials(), &running.port);
  builder.RegisterService(service);
  for (grpc::Service* extra : config.extra_services) builder.RegisterService(extra);
  running.server = builder.BuildAndStart();
  if (!running.server || running.port == 0)
    return absl::UnavailableError(absl::StrCat("cannot serve on ", config.address));
  if (auto* health = running.server->GetHealthCheckService()) {
    health->SetServingStatus(true);
    health->SetServingStatus(kServiceName, true);
  }
  return running;
}

}  // namespace asynctls
