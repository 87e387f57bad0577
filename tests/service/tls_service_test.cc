// attention.mode = MODE_TLS end to end over gRPC: an in-process server whose engine keeps a TLS
// index (CPU, real SmolLM2, channel sets calibrated on the GPL text, k_b 4 / k_t 96), a dense and
// a TLS request for the same long prompt, the request errors that name the field, and a
// cancelled TLS stream that frees its KV.
#include <gtest/gtest.h>

#include <chrono>
#include <fstream>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include "asynctls/coordinator/router.h"
#include "asynctls/runtime/engine.h"
#include "asynctls/runtime/tokenizer.h"
#include "asynctls/runtime/weights.h"
#include "asynctls/v1/inference.grpc.pb.h"
#include "grpcpp/grpcpp.h"
#include "runtime/model_test_util.h"
#include "server/inference_service.h"
#include "service/service_test_util.h"

namespace asynctls {
namespace {

struct TlsWorld {
  std::unique_ptr<WeightFile> weights;
  std::unique_ptr<Tokenizer> tokenizer;
  std::unique_ptr<testing::InProcessServer> serving;  // before the tokenizer goes
};
TlsWorld* world = nullptr;

class TlsServiceTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    const std::string path = testing::SmolLm2Path();
    if (path.empty()) return;
    world = new TlsWorld;
    world->weights = std::move(*WeightFile::Open(path));
    world->tokenizer = std::move(*Tokenizer::FromGguf(*world->weights));
    EngineOptions options;
    options.device = "cpu";
    options.kv_cache_bytes = int64_t{128} << 20;
    auto tls = TlsDecodeOptionsFromFile(
        std::string(ASYNCTLS_SOURCE_DIR) + "/tests/data/channels/smollm2-gpl.json", 4, 96);
    ASSERT_TRUE(tls.ok()) << tls.status();
    options.tls = *tls;
    auto engine = Engine::Create(*world->weights, options);
    ASSERT_TRUE(engine.ok()) << engine.status();
    auto serving = testing::InProcessServer::Start(world->tokenizer.get(), std::move(*engine));
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

  // The first ~600 tokens of the Apache license as a raw prompt, greedy, `max_tokens` tokens.
  static v1::GenerateRequest Request(const std::string& id, int max_tokens, bool tls) {
    std::ifstream in(std::string(ASYNCTLS_SOURCE_DIR) + "/tests/data/prompts/apache-2.0.txt");
    std::stringstream text;
    text << in.rdbuf();
    v1::GenerateRequest r;
    r.set_request_id(id);
    r.set_prompt(text.str().substr(0, 2800));
    r.mutable_sampling()->set_max_tokens(max_tokens);
    r.mutable_sampling()->set_ignore_eos(true);
    if (tls) r.mutable_attention()->set_mode(v1::AttentionOptions::MODE_TLS);
    return r;
  }

  // Token ids of a stream, and its final status.
  grpc::Status Run(const v1::GenerateRequest& request, std::vector<int32_t>* tokens) {
    grpc::ClientContext context;
    auto reader = stub_->Generate(&context, request);
    v1::GenerateResponse response;
    while (reader->Read(&response)) {
      if (response.has_chunk()) {
        tokens->insert(tokens->end(), response.chunk().token_ids().begin(),
                       response.chunk().token_ids().end());
      }
    }
    return reader->Finish();
  }

  std::unique_ptr<v1::Inference::Stub> stub_;
};

TEST_F(TlsServiceTest, TlsRequestStreamsAndTracksDense) {
  std::vector<int32_t> dense, tls;
  const grpc::Status d = Run(Request("dense", 12, false), &dense);
  ASSERT_TRUE(d.ok()) << d.error_message();
  const grpc::Status t = Run(Request("tls", 12, true), &tls);
  ASSERT_TRUE(t.ok()) << t.error_message();
  ASSERT_EQ(tls.size(), 12u);
  int same = 0;
  while (same < 12 && tls[same] == dense[same]) ++same;
  std::printf("[ tls grpc ] first %d/12 streamed tokens equal the dense request's\n", same);
  EXPECT_GE(same, 4);  // the first tokens see (almost) the same attention
}

TEST_F(TlsServiceTest, BudgetAboveTheServersIsInvalid) {
  v1::GenerateRequest r = Request("budget", 4, true);
  r.mutable_attention()->set_token_budget(512);
  std::vector<int32_t> tokens;
  const grpc::Status s = Run(r, &tokens);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_NE(s.error_message().find("attention.token_budget"), std::string::npos)
      << s.error_message();
  EXPECT_NE(s.error_message().find("96"), std::string::npos) << s.error_message();
  // The server's own budgets and smaller ones are accepted.
  for (auto [kb, kt] : {std::pair{4, 96}, std::pair{2, 48}}) {
    r.set_request_id("budget-ok-" + std::to_string(kt));
    r.mutable_attention()->set_token_budget(kt);
    r.mutable_attention()->set_block_budget(kb);
    tokens.clear();
    EXPECT_TRUE(Run(r, &tokens).ok());
    EXPECT_EQ(tokens.size(), 4u);
  }
}

// A TLS request cancelled mid-stream (its one-step-lag steps under way) ends CANCELLED and
// frees its KV and with it its lag slot (KvCache::Release); the next TLS request streams.
TEST_F(TlsServiceTest, CancelledTlsStreamFreesItsKv) {
  {
    grpc::ClientContext context;
    auto reader = stub_->Generate(&context, Request("cancel-tls", 400, true));
    v1::GenerateResponse response;
    int chunks = 0;
    while (reader->Read(&response)) {
      if (response.has_chunk() && ++chunks == 4) context.TryCancel();
    }
    EXPECT_GE(chunks, 4);
    EXPECT_EQ(reader->Finish().error_code(), grpc::StatusCode::CANCELLED);
  }
  EXPECT_TRUE(testing::KvReturnsToIdle(*stub_, std::chrono::seconds(5)))
      << testing::KvBlocksUsed(*stub_) << " blocks still used";
  std::vector<int32_t> tokens;
  EXPECT_TRUE(Run(Request("after-cancel", 4, true), &tokens).ok());
  EXPECT_EQ(tokens.size(), 4u);
}

}  // namespace
}  // namespace asynctls
