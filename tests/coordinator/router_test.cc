// The coordinator core end to end with the real SmolLM2 on the CPU backend: streaming, stop
// strings, cancellation freeing KV, concurrent requests, duplicate ids, losing a replica.
#include "asynctls/coordinator/router.h"

#include <gtest/gtest.h>

#include <chrono>
#include <condition_variable>
#include <mutex>
#include <thread>

#include "asynctls/runtime/engine.h"
#include "asynctls/runtime/tokenizer.h"
#include "asynctls/runtime/weights.h"
#include "runtime/model_test_util.h"

namespace asynctls {
namespace {

// Collects one request's events; Wait() blocks until the final one.
struct Collector {
  std::mutex mu;
  std::condition_variable cv;
  std::vector<GenerationEvent> events;
  std::string text;
  std::vector<int32_t> tokens;
  bool done = false;
  EventSink Sink() {
    return [this](const GenerationEvent& ev) {
      std::lock_guard<std::mutex> lock(mu);
      events.push_back(ev);
      text += ev.text_delta;
      tokens.insert(tokens.end(), ev.token_ids.begin(), ev.token_ids.end());
      if (ev.final()) done = true;
      cv.notify_all();
    };
  }
  GenerationEvent Wait() {
    std::unique_lock<std::mutex> lock(mu);
    EXPECT_TRUE(cv.wait_for(lock, std::chrono::seconds(300), [&] { return done; }));
    return events.back();
  }
};

class RouterTest : public ::testing::Test {
 protected:
  void SetUp() override {
    const std::string path = testing::SmolLm2Path();
    if (path.empty()) GTEST_SKIP() << "SmolLM2 GGUF not found (set ASYNCTLS_MODEL_PATH)";
    auto file = WeightFile::Open(path);
    ASSERT_TRUE(file.ok()) << file.status();
    weights_ = std::move(*file);
    auto tok = Tokenizer::FromGguf(*weights_);
    ASSERT_TRUE(tok.ok()) << tok.status();
    tokenizer_ = std::move(*tok);
    router_ = std::make_unique<Router>(tokenizer_.get(), CoordinatorOptions{});
    ASSERT_TRUE(router_->AddReplica("local", MakeEngine()).ok());
  }
  std::unique_ptr<StepExecutor> MakeEngine() {
    EngineOptions options;
    options.device = "cpu";
    options.kv_cache_bytes = int64_t{128} << 20;
    auto engine = Engine::Create(*weights_, options);
    EXPECT_TRUE(engine.ok()) << engine.status();
    return std::move(*engine);
  }
  GenerationRequest Request(const std::string& id, const std::string& prompt, int max_tokens) {
    GenerationRequest r;
    r.request_id = id;
    r.prompt_tokens = *tokenizer_->Encode(prompt);
    r.max_tokens = max_tokens;
    return r;
  }
  int KvBlocksUsed() {
    int used = 0;
    for (const auto& r : router_->Stats()) used += r.stats.kv_blocks_used;
    return used;
  }

  std::unique_ptr<WeightFile> weights_;
  std::unique_ptr<Tokenizer> tokenizer_;
  std::unique_ptr<Router> router_;
};

TEST_F(RouterTest, StreamsTheSameTokensAsTheEngineAlone) {
  Collector c;
  GenerationRequest r = Request("a", "The capital of France is", 8);
  r.ignore_eos = true;
  ASSERT_TRUE(router_->Submit(r, c.Sink()).ok());
  const GenerationEvent last = c.Wait();
  EXPECT_EQ(last.finish, FinishReason::kLength);
  EXPECT_EQ(last.completion_tokens, 8);
  EXPECT_EQ(last.prompt_tokens, static_cast<int>(r.prompt_tokens.size()));
  EXPECT_GT(last.timings.ttft_ms, 0);
  EXPECT_EQ(last.timings.inter_token_ms.size(), 7u);
  EXPECT_NE(c.text.find("Paris"), std::string::npos) << c.text;
  EXPECT_EQ(c.text, tokenizer_->Decode(c.tokens));
  // The engine driven directly, step by step, gives the same tokens.
  EngineOptions options;
  options.device = "cpu";
  options.kv_cache_bytes = int64_t{64} << 20;
  auto engine = Engine::Create(*weights_, options);
  ASSERT_TRUE(engine.ok());
  auto direct = testing::Greedy(**engine, r.prompt_tokens, 8);
  ASSERT_TRUE(direct.ok());
  EXPECT_EQ(c.tokens, *direct);
}

TEST_F(RouterTest, StopStringCutsTheTextAndFinishes) {
  Collector c;
  GenerationRequest r = Request("s", "The capital of France is", 32);
  r.stop_strings = {"."};
  ASSERT_TRUE(router_->Submit(r, c.Sink()).ok());
  const GenerationEvent last = c.Wait();
  EXPECT_EQ(last.finish, FinishReason::kStop);
  EXPECT_EQ(c.text, " Paris");
}

TEST_F(RouterTest, CancelMidStreamFreesTheKv) {
  Collector c;
  std::mutex m;
  std::condition_variable cv;
  int seen = 0;
  GenerationRequest r = Request("c", "Tell me a very long story about a dragon.", 400);
  r.ignore_eos = true;
  EventSink inner = c.Sink();
  ASSERT_TRUE(router_->Submit(r, [&](const GenerationEvent& ev) {
                       inner(ev);
                       std::lock_guard<std::mutex> lock(m);
                       ++seen;
                       cv.notify_all();
                     }).ok());
  {
    std::unique_lock<std::mutex> lock(m);
    ASSERT_TRUE(cv.wait_for(lock, std::chrono::seconds(120), [&] { return seen >= 3; }));
  }
  EXPECT_GT(KvBlocksUsed(), 0);
  EXPECT_TRUE(router_->Cancel("c"));
  const GenerationEvent last = c.Wait();
  EXPECT_EQ(last.finish, FinishReason::kCancelled);
  EXPECT_EQ(last.error.code(), absl::StatusCode::kCancelled);
  EXPECT_FALSE(router_->Cancel("c"));
  // The release goes out with the next step.
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(5);
  while (KvBlocksUsed() != 0 && std::chrono::steady_clock::now() < deadline)
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  EXPECT_EQ(KvBlocksUsed(), 0);
}

TEST_F(RouterTest, ConcurrentRequestsAllCompleteWithTheirOwnOutput) {
  const std::vector<std::string> prompts = {"The capital of France is", "def fibonacci(n):",
                                            "Water boils at", "The capital of France is"};
  std::vector<Collector> cs(prompts.size());
  for (size_t i = 0; i < prompts.size(); ++i) {
    GenerationRequest r = Request("r" + std::to_string(i), prompts[i], 12);
    r.ignore_eos = true;
    ASSERT_TRUE(router_->Submit(r, cs[i].Sink()).ok());
  }
  for (auto& c : cs) EXPECT_EQ(c.Wait().finish, FinishReason::kLength);
  EXPECT_EQ(cs[0].tokens, cs[3].tokens);  // same prompt, batched with others: same greedy output
  EXPECT_NE(cs[0].tokens, cs[1].tokens);
}

TEST_F(RouterTest, DuplicateIdsAndBadParametersAreRefused) {
  Collector c;
  GenerationRequest r = Request("dup", "Hello", 50);
  r.ignore_eos = true;
  ASSERT_TRUE(router_->Submit(r, c.Sink()).ok());
  Collector c2;
  EXPECT_EQ(router_->Submit(r, c2.Sink()).code(), absl::StatusCode::kAlreadyExists);
  GenerationRequest bad = Request("bad", "Hello", 5);
  bad.sampling.top_p = 0.f;
  absl::Status s = router_->Submit(bad, c2.Sink());
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("top_p"), std::string::npos);
  bad.sampling.top_p = 1.f;
  bad.sampling.temperature = -1.f;
  EXPECT_EQ(router_->Submit(bad, c2.Sink()).code(), absl::StatusCode::kInvalidArgument);
  bad.sampling.temperature = 0.f;
  bad.prompt_tokens = {1, 2, 999999};
  EXPECT_EQ(router_->Submit(bad, c2.Sink()).code(), absl::StatusCode::kInvalidArgument);
  router_->Cancel("dup");
  c.Wait();
}

TEST_F(RouterTest, LosingAReplicaFailsItsRequestsWithUnavailable) {
  Collector c;
  GenerationRequest r = Request("lost", "Hello", 300);
  r.ignore_eos = true;
  ASSERT_TRUE(router_->Submit(r, c.Sink()).ok());
  ASSERT_TRUE(router_->RemoveReplica("local", absl::UnavailableError("worker lost")));
  const GenerationEvent last = c.Wait();
  EXPECT_EQ(last.finish, FinishReason::kError);
  EXPECT_EQ(last.error.code(), absl::StatusCode::kUnavailable);
  Collector c2;
  EXPECT_EQ(router_->Submit(Request("after", "Hello", 3), c2.Sink()).code(), absl::StatusCode::kUnavailable);
  // A replica that comes back serves again.
  ASSERT_TRUE(router_->AddReplica("local", MakeEngine()).ok());
  ASSERT_TRUE(router_->Submit(Request("again", "Hello", 3), c2.Sink()).ok());
  EXPECT_NE(c2.Wait().finish, FinishReason::kError);
}

}  // namespace
}  // namespace asynctls
