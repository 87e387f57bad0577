// The Inference service end to end over real gRPC on loopback: an in-process server (Router +
// a real SmolLM2 CPU engine) and real clients. Streaming equals the engine, concurrency, every
// validation error (code + field, another stream unaffected), deadlines and cancellation
// freeing the KV, health and reflection.
#include <gtest/gtest.h>

#include <chrono>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "asynctls/coordinator/router.h"
#include "asynctls/runtime/engine.h"
#include "asynctls/runtime/tokenizer.h"
#include "asynctls/runtime/weights.h"
#include "asynctls/v1/inference.grpc.pb.h"
#include "grpcpp/generic/generic_stub.h"
#include "grpcpp/grpcpp.h"
#include "runtime/model_test_util.h"
#include "server/inference_service.h"
#include "service/service_test_util.h"

namespace asynctls {
namespace {

struct StreamResult {
  grpc::Status status;
  std::vector<int32_t> tokens;
  std::string text;
  int chunks = 0;
  bool has_final = false, has_error = false;
  v1::Final final;
  v1::Error error;
};

// Everything is shared by the suite: one model load, one server.
struct World {
  std::unique_ptr<WeightFile> weights;
  std::unique_ptr<Tokenizer> tokenizer;
  std::unique_ptr<testing::InProcessServer> serving;  // before the tokenizer goes
  std::string model_name;
};
World* world = nullptr;

class InferenceServiceTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    const std::string path = testing::SmolLm2Path();
    if (path.empty()) return;
    world = new World;
    world->weights = std::move(*WeightFile::Open(path));
    world->tokenizer = std::move(*Tokenizer::FromGguf(*world->weights));
    CoordinatorOptions options;
    options.max_queue = 64;
    EngineOptions engine_options;
    engine_options.device = "cpu";
    engine_options.kv_cache_bytes = int64_t{256} << 20;
    auto engine = Engine::Create(*world->weights, engine_options);
    ASSERT_TRUE(engine.ok()) << engine.status();
    world->model_name = (*engine)->Info().model_name;
    auto serving = testing::InProcessServer::Start(world->tokenizer.get(), std::move(*engine), options);
    ASSERT_TRUE(serving.ok()) << serving.status();
    world->serving = std::move(*serving);
  }
  static void TearDownTestSuite() {
    delete world;
    world = nullptr;
  }
  void SetUp() override {
    if (!world) GTEST_SKIP() << "SmolLM2 GGUF not found (set ASYNCTLS_MODEL_PATH)";
    stub_ = v1::Inference::NewStub(world->serving->channel);
  }

  static v1::GenerateRequest Request(const std::string& id, const std::string& prompt, int max_tokens) {
    v1::GenerateRequest r;
    r.set_request_id(id);
    r.set_prompt(prompt);
    r.mutable_sampling()->set_max_tokens(max_tokens);
    r.mutable_sampling()->set_ignore_eos(true);
    return r;
  }

  StreamResult Run(const v1::GenerateRequest& request, grpc::ClientContext* context = nullptr,
                   int cancel_after_chunks = -1) {
    grpc::ClientContext local;
    if (!context) context = &local;
    StreamResult out;
    auto reader = stub_->Generate(context, request);
    v1::GenerateResponse response;
    while (reader->Read(&response)) {
      if (response.has_chunk()) {
        ++out.chunks;
        out.tokens.insert(out.tokens.end(), response.chunk().token_ids().begin(),
                          response.chunk().token_ids().end());
        out.text += response.chunk().text();
        if (out.chunks == cancel_after_chunks) context->TryCancel();
      } else if (response.has_final()) {
        out.has_final = true;
        out.final = response.final();
      } else if (response.has_error()) {
        out.has_error = true;
        out.error = response.error();
      }
    }
    out.status = reader->Finish();
    return out;
  }

  int KvBlocksUsed() {
    const int used = testing::KvBlocksUsed(*stub_);
    EXPECT_GE(used, 0) << "GetStats failed";
    return used;
  }
  bool KvReturnsToIdle(std::chrono::milliseconds within) {
    return testing::KvReturnsToIdle(*stub_, within);
  }

  // Sends `bad` while another stream runs; checks the code and that the message names `field`,
  // and that the other stream completes with the output it has alone.
  void ExpectRejected(const v1::GenerateRequest& bad, grpc::StatusCode code, const std::string& field) {
    static const StreamResult alone = Run(Request("", "Water boils at", 12));
    ASSERT_TRUE(alone.status.ok()) << alone.status.error_message();
    StreamResult other;
    std::thread t([&] { other = Run(Request("", "Water boils at", 12)); });
    const StreamResult rejected = Run(bad);
    t.join();
    EXPECT_EQ(rejected.status.error_code(), code) << rejected.status.error_message();
    EXPECT_NE(rejected.status.error_message().find(field), std::string::npos)
        << "'" << rejected.status.error_message() << "' does not name " << field;
    EXPECT_EQ(rejected.chunks, 0);
    EXPECT_TRUE(other.status.ok()) << other.status.error_message();
    EXPECT_EQ(other.tokens, alone.tokens);
  }

  std::unique_ptr<v1::Inference::Stub> stub_;
};

TEST_F(InferenceServiceTest, StreamedGreedyTokensEqualTheEngineAlone) {
  const StreamResult r = Run(Request("greedy", "The capital of France is", 8));
  ASSERT_TRUE(r.status.ok()) << r.status.error_message();
  ASSERT_TRUE(r.has_final);
  EXPECT_EQ(r.final.finish_reason(), v1::Final::FINISH_REASON_LENGTH);
  EXPECT_EQ(r.final.usage().completion_tokens(), 8);
  EXPECT_EQ(r.final.timings().inter_token_ms_size(), 7);
  EXPECT_GT(r.final.timings().ttft_ms(), 0);
  EXPECT_GE(r.final.timings().e2e_ms(), r.final.timings().ttft_ms());
  EXPECT_NE(r.text.find("Paris"), std::string::npos) << r.text;
  EXPECT_EQ(r.text, world->tokenizer->Decode(r.tokens));

  std::vector<int32_t> prompt = *world->tokenizer->Encode("The capital of France is");
  if (world->tokenizer->add_bos() && world->tokenizer->bos_id() >= 0)
    prompt.insert(prompt.begin(), world->tokenizer->bos_id());
  EXPECT_EQ(r.final.usage().prompt_tokens(), static_cast<int>(prompt.size()));
  EngineOptions options;
  options.device = "cpu";
  options.kv_cache_bytes = int64_t{64} << 20;
  auto engine = Engine::Create(*world->weights, options);
  ASSERT_TRUE(engine.ok());
  auto direct = testing::Greedy(**engine, prompt, 8);
  ASSERT_TRUE(direct.ok()) << direct.status();
  EXPECT_EQ(r.tokens, *direct);

  // The same through token_ids and the model's name.
  v1::GenerateRequest by_ids = Request("greedy-ids", "", 8);
  by_ids.set_model(world->model_name);
  by_ids.mutable_token_ids()->mutable_ids()->Add(prompt.begin(), prompt.end());
  const StreamResult r2 = Run(by_ids);
  ASSERT_TRUE(r2.status.ok()) << r2.status.error_message();
  EXPECT_EQ(r2.tokens, *direct);
}

TEST_F(InferenceServiceTest, ChatMessagesUseTheChatTemplate) {
  v1::GenerateRequest r;
  r.set_request_id("chat");
  auto* m = r.mutable_messages()->add_messages();
  m->set_role("user");
  m->set_content("What is the capital of France?");
  r.mutable_sampling()->set_max_tokens(16);
  const StreamResult out = Run(r);
  ASSERT_TRUE(out.status.ok()) << out.status.error_message();
  const std::string templ = world->tokenizer->ApplyChatTemplate({{"user", "What is the capital of France?"}});
  const int expected_prompt = static_cast<int>(world->tokenizer->Encode(templ)->size()) +
                              (world->tokenizer->add_bos() && world->tokenizer->bos_id() >= 0 ? 1 : 0);
  EXPECT_EQ(out.final.usage().prompt_tokens(), expected_prompt);
  EXPECT_NE(out.text.find("Paris"), std::string::npos) << out.text;
}

TEST_F(InferenceServiceTest, SixteenConcurrentStreamsAllCompleteWithCorrectOutputs) {
  const std::vector<std::string> prompts = {"The capital of France is", "def fibonacci(n):", "Water boils at",
                                            "The largest planet is"};
  std::vector<StreamResult> alone;
  for (const auto& p : prompts) alone.push_back(Run(Request("", p, 10)));
  std::vector<StreamResult> results(16);
  std::vector<std::thread> threads;
  for (int i = 0; i < 16; ++i)
    threads.emplace_back([&, i] { results[i] = Run(Request("c" + std::to_string(i), prompts[i % 4], 10)); });
  for (auto& t : threads) t.join();
  for (int i = 0; i < 16; ++i) {
    ASSERT_TRUE(results[i].status.ok()) << i << ": " << results[i].status.error_message();
    EXPECT_TRUE(results[i].has_final);
    EXPECT_EQ(results[i].tokens, alone[i % 4].tokens) << "stream " << i;
    EXPECT_EQ(results[i].text, alone[i % 4].text) << "stream " << i;
  }
  EXPECT_TRUE(KvReturnsToIdle(std::chrono::seconds(2)));
}

TEST_F(InferenceServiceTest, EmptyPromptIsInvalid) {
  ExpectRejected(Request("e1", "", 4), grpc::StatusCode::INVALID_ARGUMENT, "prompt");
}

TEST_F(InferenceServiceTest, NoInputIsInvalid) {
  v1::GenerateRequest r;
  r.mutable_sampling()->set_max_tokens(4);
  ExpectRejected(r, grpc::StatusCode::INVALID_ARGUMENT, "prompt");
}

TEST_F(InferenceServiceTest, PromptLongerThanTheContextIsInvalid) {
  std::string prompt;
  for (int i = 0; i < 9000; ++i) prompt += " hello";
  ExpectRejected(Request("e2", prompt, 4), grpc::StatusCode::INVALID_ARGUMENT, "prompt");
}

TEST_F(InferenceServiceTest, NonPositiveMaxTokensIsInvalid) {
  ExpectRejected(Request("e3", "Hello", 0), grpc::StatusCode::INVALID_ARGUMENT, "max_tokens");
  ExpectRejected(Request("e3", "Hello", -5), grpc::StatusCode::INVALID_ARGUMENT, "max_tokens");
}

TEST_F(InferenceServiceTest, NegativeTemperatureIsInvalid) {
  v1::GenerateRequest r = Request("e4", "Hello", 4);
  r.mutable_sampling()->set_temperature(-0.5f);
  ExpectRejected(r, grpc::StatusCode::INVALID_ARGUMENT, "temperature");
}

TEST_F(InferenceServiceTest, TopPOutsideZeroOneIsInvalid) {
  for (float top_p : {0.f, -0.1f, 1.5f}) {
    v1::GenerateRequest r = Request("e5", "Hello", 4);
    r.mutable_sampling()->set_top_p(top_p);
    ExpectRejected(r, grpc::StatusCode::INVALID_ARGUMENT, "top_p");
  }
}

TEST_F(InferenceServiceTest, UnknownModelIsInvalid) {
  v1::GenerateRequest r = Request("e6", "Hello", 4);
  r.set_model("no-such-model");
  ExpectRejected(r, grpc::StatusCode::INVALID_ARGUMENT, "model");
}

TEST_F(InferenceServiceTest, InvalidUtf8IsInvalid) {
  ExpectRejected(Request("e7", std::string("caf\xc3(\xff", 6), 4), grpc::StatusCode::INVALID_ARGUMENT, "prompt");
  v1::GenerateRequest chat;
  chat.set_request_id("e7b");
  auto* m = chat.mutable_messages()->add_messages();
  m->set_role("user");
  m->set_content(std::string("\xe2\x82", 2));
  ExpectRejected(chat, grpc::StatusCode::INVALID_ARGUMENT, "messages[0].content");
}

// This server's engine has no TLS channel sets (model_tls_test covers the TLS engine path).
TEST_F(InferenceServiceTest, TlsAttentionWithoutChannelSetsIsFailedPrecondition) {
  v1::GenerateRequest r = Request("e8", "Hello", 4);
  r.mutable_attention()->set_mode(v1::AttentionOptions::MODE_TLS);
  ExpectRejected(r, grpc::StatusCode::FAILED_PRECONDITION, "attention.mode");
}

TEST_F(InferenceServiceTest, DuplicateLiveRequestIdIsRejected) {
  grpc::ClientContext first_context;
  auto first = stub_->Generate(&first_context, Request("dup", "Tell me a long story.", 400));
  v1::GenerateResponse response;
  ASSERT_TRUE(first->Read(&response));  // live now
  ExpectRejected(Request("dup", "Hello", 4), grpc::StatusCode::ALREADY_EXISTS, "request_id");
  first_context.TryCancel();
  while (first->Read(&response)) {
  }
  EXPECT_EQ(first->Finish().error_code(), grpc::StatusCode::CANCELLED);
  EXPECT_TRUE(KvReturnsToIdle(std::chrono::seconds(2)));
}

TEST_F(InferenceServiceTest, ClientDeadlineEndsTheStreamAndFreesTheKv) {
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() + std::chrono::milliseconds(800));
  const StreamResult r = Run(Request("deadline", "Tell me a long story.", 2000), &context);
  EXPECT_EQ(r.status.error_code(), grpc::StatusCode::DEADLINE_EXCEEDED) << r.status.error_message();
  EXPECT_TRUE(KvReturnsToIdle(std::chrono::seconds(2))) << KvBlocksUsed() << " blocks still used";
  grpc::ClientContext cancel_context;
  v1::CancelRequest cancel;
  cancel.set_request_id("deadline");
  v1::CancelResponse cancelled;
  EXPECT_EQ(stub_->Cancel(&cancel_context, cancel, &cancelled).error_code(), grpc::StatusCode::NOT_FOUND);
}

TEST_F(InferenceServiceTest, ClientCancelMidStreamFreesTheKv) {
  EXPECT_TRUE(KvReturnsToIdle(std::chrono::seconds(2)));
  grpc::ClientContext context;
  const StreamResult r = Run(Request("cancel", "Tell me a long story.", 2000), &context, /*cancel_after_chunks=*/3);
  EXPECT_EQ(r.status.error_code(), grpc::StatusCode::CANCELLED);
  EXPECT_GE(r.chunks, 3);
  EXPECT_TRUE(KvReturnsToIdle(std::chrono::seconds(2))) << KvBlocksUsed() << " blocks still used";
}

TEST_F(InferenceServiceTest, CancelRpcEndsTheStreamAndFreesTheKv) {
  grpc::ClientContext context;
  auto reader = stub_->Generate(&context, Request("to-cancel", "Tell me a long story.", 2000));
  v1::GenerateResponse response;
  ASSERT_TRUE(reader->Read(&response));
  EXPECT_GT(KvBlocksUsed(), 0);
  grpc::ClientContext cancel_context;
  v1::CancelRequest cancel;
  cancel.set_request_id("to-cancel");
  v1::CancelResponse cancelled;
  ASSERT_TRUE(stub_->Cancel(&cancel_context, cancel, &cancelled).ok());
  bool saw_error = false;
  while (reader->Read(&response))
    if (response.has_error()) {
      saw_error = true;
      EXPECT_EQ(response.error().code(), static_cast<int>(grpc::StatusCode::CANCELLED));
    }
  EXPECT_TRUE(saw_error);
  EXPECT_EQ(reader->Finish().error_code(), grpc::StatusCode::CANCELLED);
  EXPECT_TRUE(KvReturnsToIdle(std::chrono::seconds(2)));
}

TEST_F(InferenceServiceTest, ListModelsAndStats) {
  grpc::ClientContext c1;
  v1::ListModelsResponse models;
  ASSERT_TRUE(stub_->ListModels(&c1, v1::ListModelsRequest(), &models).ok());
  ASSERT_EQ(models.models_size(), 1);
  EXPECT_EQ(models.models(0).name(), world->model_name);
  EXPECT_EQ(models.models(0).vocab_size(), 49152);
  grpc::ClientContext c2;
  v1::GetStatsResponse stats;
  ASSERT_TRUE(stub_->GetStats(&c2, v1::GetStatsRequest(), &stats).ok());
  ASSERT_EQ(stats.replicas_size(), 1);
  EXPECT_EQ(stats.replicas(0).name(), "local");
  EXPECT_GT(stats.replicas(0).kv_blocks_total(), 0);
}

// One raw call through the generic stub (no generated stubs for health/reflection here).
grpc::Status RawCall(const std::string& method, const std::string& request, bool streaming, std::string* reply) {
  grpc::GenericStub stub(world->serving->channel);
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
  grpc::CompletionQueue cq;
  grpc::Slice slice(request);
  grpc::ByteBuffer in(&slice, 1), out;
  grpc::Status status;
  void* tag;
  bool ok;
  auto wait = [&] { return cq.Next(&tag, &ok) && ok; };
  if (!streaming) {
    auto call = stub.PrepareUnaryCall(&context, method, in, &cq);
    call->StartCall();
    call->Finish(&out, &status, reinterpret_cast<void*>(1));
    cq.Next(&tag, &ok);
  } else {
    auto call = stub.PrepareCall(&context, method, &cq);
    call->StartCall(reinterpret_cast<void*>(1));
    wait();
    call->Write(in, reinterpret_cast<void*>(2));
    wait();
    call->WritesDone(reinterpret_cast<void*>(3));
    wait();
    call->Read(&out, reinterpret_cast<void*>(4));
    wait();
    call->Finish(&status, reinterpret_cast<void*>(5));
    cq.Next(&tag, &ok);
  }
  std::vector<grpc::Slice> slices;
  reply->clear();
  if (out.Valid() && out.Dump(&slices).ok())
    for (const auto& s : slices) reply->append(reinterpret_cast<const char*>(s.begin()), s.size());
  cq.Shutdown();
  while (cq.Next(&tag, &ok)) {
  }
  return status;
}

TEST_F(InferenceServiceTest, HealthCheckIsServing) {
  // HealthCheckRequest{service = 1}; HealthCheckResponse{status = 1} with SERVING = 1.
  for (const std::string service : {"", "asynctls.v1.Inference"}) {
    std::string request;
    if (!service.empty()) request = std::string("\x0a", 1) + static_cast<char>(service.size()) + service;
    std::string reply;
    const grpc::Status status = RawCall("/grpc.health.v1.Health/Check", request, false, &reply);
    ASSERT_TRUE(status.ok()) << status.error_message();
    EXPECT_EQ(reply, std::string("\x08\x01", 2)) << "service '" << service << "'";
  }
}

TEST_F(InferenceServiceTest, ReflectionListsTheService) {
  // ServerReflectionRequest{list_services = 7: ""}.
  std::string reply;
  const grpc::Status status = RawCall("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
                                      std::string("\x3a\x00", 2), true, &reply);
  ASSERT_TRUE(status.ok()) << status.error_message();
  EXPECT_NE(reply.find("asynctls.v1.Inference"), std::string::npos);
  EXPECT_NE(reply.find("grpc.health.v1.Health"), std::string::npos);
}

}  // namespace
}  // namespace asynctls
