// Coordinator and worker as separate processes on loopback: an in-process gRPC server with the
// WorkerRegistry over a Router, and the real `asynctls-worker` binary as a child process, with
// the real SmolLM2 on the CPU. Streams match the in-process engine token for token; 16 streams
// at once; cancelling frees the worker's KV; kill -9 of the worker ends its requests UNAVAILABLE
// within 2 s while health checks keep answering; a restarted worker serves again.
#include <grpcpp/generic/generic_stub.h>
#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <condition_variable>
#include <future>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "asynctls/coordinator/router.h"
#include "asynctls/runtime/engine.h"
#include "asynctls/runtime/tokenizer.h"
#include "asynctls/runtime/weights.h"
#include "runtime/model_test_util.h"
#include "server/worker_registry.h"

namespace asynctls {
namespace {

using Clock = std::chrono::steady_clock;

struct Collector {
  std::mutex mu;
  std::condition_variable cv;
  std::vector<int32_t> tokens;
  GenerationEvent last;
  int events = 0;
  bool done = false;
  Clock::time_point done_at;
  EventSink Sink() {
    return [this](const GenerationEvent& ev) {
      std::lock_guard<std::mutex> lock(mu);
      ++events;
      tokens.insert(tokens.end(), ev.token_ids.begin(), ev.token_ids.end());
      if (ev.final()) {
        last = ev;
        done = true;
        done_at = Clock::now();
      }
      cv.notify_all();
    };
  }
  bool WaitTokens(size_t n, std::chrono::seconds timeout = std::chrono::seconds(120)) {
    std::unique_lock<std::mutex> lock(mu);
    return cv.wait_for(lock, timeout, [&] { return done || tokens.size() >= n; }) && tokens.size() >= n;
  }
  GenerationEvent Wait(std::chrono::seconds timeout = std::chrono::seconds(300)) {
    std::unique_lock<std::mutex> lock(mu);
    EXPECT_TRUE(cv.wait_for(lock, timeout, [&] { return done; })) << "no final event";
    return last;
  }
};

class WorkerLinkTest : public ::testing::Test {
 protected:
  void SetUp() override {
    model_path_ = testing::SmolLm2Path();
    if (model_path_.empty()) GTEST_SKIP() << "SmolLM2 GGUF not found (set ASYNCTLS_MODEL_PATH)";
    auto file = WeightFile::Open(model_path_);
    ASSERT_TRUE(file.ok()) << file.status();
    weights_ = std::move(*file);
    auto tok = Tokenizer::FromGguf(*weights_);
    ASSERT_TRUE(tok.ok()) << tok.status();
    tokenizer_ = std::move(*tok);
    router_ = std::make_unique<Router>(tokenizer_.get(), CoordinatorOptions{});
    WorkerRegistryOptions options;
    options.expected_vocab_size = tokenizer_->vocab_size();
    registry_ = std::make_unique<WorkerRegistry>(router_.get(), options);
    grpc::EnableDefaultHealthCheckService(true);
    grpc::ServerBuilder builder;
    builder.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port_);
    builder.RegisterService(registry_.get());
    server_ = builder.BuildAndStart();
    ASSERT_TRUE(server_ != nullptr);
    ASSERT_GT(port_, 0);
    StartWorker();
  }

  void TearDown() override {
    StopWorker(SIGTERM);
    if (registry_) registry_->Shutdown();
    if (server_) server_->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(5));
    server_.reset();
    registry_.reset();
    router_.reset();
  }

  // Starts `asynctls-worker` named "w0" and waits until it serves as a replica.
  void StartWorker() {
    const std::string address = "127.0.0.1:" + std::to_string(port_);
    std::vector<std::string> args = {ASYNCTLS_WORKER_BIN, "--coordinator", address, "--name", "w0",
                                     "--model", model_path_, "--device", "cpu", "--threads", "1",
                                     "--kv-cache-mb", "128"};
    worker_pid_ = fork();
    ASSERT_GE(worker_pid_, 0);
    if (worker_pid_ == 0) {
      std::vector<char*> argv;
      for (auto& a : args) argv.push_back(a.data());
      argv.push_back(nullptr);
      execv(argv[0], argv.data());
      _exit(127);
    }
    const auto deadline = Clock::now() + std::chrono::seconds(120);
    // The registry adds the router's replica before it lists the worker: wait for both.
    while ((router_->num_replicas() == 0 || registry_->Workers().empty()) &&
           Clock::now() < deadline) {
      int status = 0;
      ASSERT_EQ(waitpid(worker_pid_, &status, WNOHANG), 0) << "worker exited early, status " << status;
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    ASSERT_EQ(router_->num_replicas(), 1) << "worker did not register";
    ASSERT_EQ(registry_->Workers().size(), 1u) << "worker registered but is not listed";
  }

  // Signals the worker and reaps it; returns its wait status.
  int StopWorker(int sig) {
    if (worker_pid_ <= 0) return 0;
    kill(worker_pid_, sig);
    int status = 0;
    waitpid(worker_pid_, &status, 0);
    worker_pid_ = -1;
    return status;
  }

  GenerationRequest Request(const std::string& id, const std::string& prompt, int max_tokens) {
    GenerationRequest r;
    r.request_id = id;
    r.prompt_tokens = *tokenizer_->Encode(prompt);
    r.max_tokens = max_tokens;
    r.ignore_eos = true;
    return r;
  }

  // Greedy tokens from an Engine in this process (what `asynctls generate` runs).
  std::vector<int32_t> InProcess(const std::vector<int32_t>& prompt, int n) {
    EngineOptions options;
    options.device = "cpu";
    options.cpu_threads = 1;
    options.kv_cache_bytes = int64_t{64} << 20;
    auto engine = Engine::Create(*weights_, options);
    EXPECT_TRUE(engine.ok()) << engine.status();
    auto tokens = testing::Greedy(**engine, prompt, n);
    EXPECT_TRUE(tokens.ok()) << tokens.status();
    return tokens.ok() ? *tokens : std::vector<int32_t>{};
  }

  int KvBlocksUsed() const {
    int used = 0;
    for (const auto& r : router_->Stats()) used += r.stats.kv_blocks_used;
    return used;
  }

  // grpc.health.v1.Health/Check for the whole server, through a generic stub (no generated
  // health stubs here): an empty request; the response is field 1 (status), SERVING = 1.
  bool HealthServing() {
    auto channel = grpc::CreateChannel("127.0.0.1:" + std::to_string(port_), grpc::InsecureChannelCredentials());
    grpc::GenericStub stub(channel);
    grpc::ClientContext context;
    context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(2));
    grpc::Slice empty("");
    grpc::ByteBuffer request(&empty, 1), response;
    std::promise<grpc::Status> done;
    stub.UnaryCall(&context, "/grpc.health.v1.Health/Check", grpc::StubOptions(), &request, &response,
                   [&](grpc::Status s) { done.set_value(s); });
    const grpc::Status status = done.get_future().get();
    if (!status.ok()) return false;
    std::vector<grpc::Slice> slices;
    if (!response.Dump(&slices).ok()) return false;
    std::string bytes;
    for (const auto& s : slices) bytes.append(reinterpret_cast<const char*>(s.begin()), s.size());
    return bytes == std::string("\x08\x01", 2);
  }

  std::string model_path_;
  std::unique_ptr<WeightFile> weights_;
  std::unique_ptr<Tokenizer> tokenizer_;
  std::unique_ptr<Router> router_;
  std::unique_ptr<WorkerRegistry> registry_;
  std::unique_ptr<grpc::Server> server_;
  int port_ = 0;
  pid_t worker_pid_ = -1;
};

TEST_F(WorkerLinkTest, GreedyStreamEqualsTheInProcessEngine) {
  const auto workers = registry_->Workers();
  ASSERT_EQ(workers.size(), 1u);
  EXPECT_EQ(workers[0].name, "w0");
  EXPECT_EQ(workers[0].pid, worker_pid_);
  EXPECT_EQ(workers[0].info.vocab_size, tokenizer_->vocab_size());
  EXPECT_GT(workers[0].info.kv_blocks_total, 0);

  Collector c;
  GenerationRequest r = Request("a", tokenizer_->ApplyChatTemplate({{"user", "What is the capital of France?"}}), 24);
  ASSERT_TRUE(router_->Submit(r, c.Sink()).ok());
  const GenerationEvent last = c.Wait();
  EXPECT_EQ(last.finish, FinishReason::kLength) << last.error;
  EXPECT_GT(c.events, 2);  // streamed, not one final blob
  EXPECT_EQ(c.tokens, InProcess(r.prompt_tokens, 24));
}

TEST_F(WorkerLinkTest, SixteenConcurrentStreamsComplete) {
  const std::vector<std::string> prompts = {"The capital of France is", "def fibonacci(n):",
                                            "Water boils at", "Once upon a time"};
  std::vector<std::vector<int32_t>> expected;
  for (const auto& p : prompts) expected.push_back(InProcess(*tokenizer_->Encode(p), 12));
  std::vector<Collector> cs(16);
  for (size_t i = 0; i < cs.size(); ++i) {
    ASSERT_TRUE(router_->Submit(Request("r" + std::to_string(i), prompts[i % prompts.size()], 12), cs[i].Sink()).ok());
  }
  for (size_t i = 0; i < cs.size(); ++i) {
    const GenerationEvent last = cs[i].Wait();
    EXPECT_EQ(last.finish, FinishReason::kLength) << i << ": " << last.error;
    EXPECT_EQ(cs[i].tokens, expected[i % prompts.size()]) << "stream " << i;
  }
}

TEST_F(WorkerLinkTest, CancelMidStreamReturnsTheWorkersKvToIdle) {
  // Idle value: what the worker reports after a finished request released its KV.
  {
    Collector warm;
    ASSERT_TRUE(router_->Submit(Request("warm", "Hello", 2), warm.Sink()).ok());
    warm.Wait();
  }
  const auto settle = Clock::now() + std::chrono::seconds(5);
  while (KvBlocksUsed() != 0 && Clock::now() < settle) std::this_thread::sleep_for(std::chrono::milliseconds(10));
  const int idle = KvBlocksUsed();
  EXPECT_EQ(idle, 0);

  Collector c;
  ASSERT_TRUE(router_->Submit(Request("c", "Tell me a very long story about a dragon.", 400), c.Sink()).ok());
  ASSERT_TRUE(c.WaitTokens(4));
  EXPECT_GT(KvBlocksUsed(), idle);
  EXPECT_TRUE(router_->Cancel("c"));
  EXPECT_EQ(c.Wait().finish, FinishReason::kCancelled);
  const auto deadline = Clock::now() + std::chrono::seconds(5);
  while (KvBlocksUsed() != idle && Clock::now() < deadline) std::this_thread::sleep_for(std::chrono::milliseconds(10));
  EXPECT_EQ(KvBlocksUsed(), idle);
}

TEST_F(WorkerLinkTest, KilledWorkerEndsItsRequestsUnavailableWithinTwoSeconds) {
  std::vector<Collector> cs(3);
  for (size_t i = 0; i < cs.size(); ++i)
    ASSERT_TRUE(router_->Submit(Request("k" + std::to_string(i), "Tell me a long story.", 400), cs[i].Sink()).ok());
  ASSERT_TRUE(cs[0].WaitTokens(3));
  const auto killed_at = Clock::now();
  StopWorker(SIGKILL);
  for (size_t i = 0; i < cs.size(); ++i) {
    const GenerationEvent last = cs[i].Wait(std::chrono::seconds(10));
    EXPECT_EQ(last.finish, FinishReason::kError) << i;
    EXPECT_EQ(last.error.code(), absl::StatusCode::kUnavailable) << i << ": " << last.error;
    EXPECT_NE(std::string(last.error.message()).find("w0"), std::string::npos) << last.error;
    const double ms = std::chrono::duration<double, std::milli>(cs[i].done_at - killed_at).count();
    EXPECT_LT(ms, 2000) << "request " << i << " ended " << ms << " ms after the kill";
  }
  const auto deadline = Clock::now() + std::chrono::seconds(2);
  while (router_->num_replicas() != 0 && Clock::now() < deadline) std::this_thread::sleep_for(std::chrono::milliseconds(10));
  EXPECT_EQ(router_->num_replicas(), 0);
  EXPECT_TRUE(HealthServing());
  Collector after;
  EXPECT_EQ(router_->Submit(Request("after", "Hello", 3), after.Sink()).code(), absl::StatusCode::kUnavailable);
}

TEST_F(WorkerLinkTest, RestartedWorkerServesAgain) {
  StopWorker(SIGKILL);
  const auto deadline = Clock::now() + std::chrono::seconds(2);
  while (router_->num_replicas() != 0 && Clock::now() < deadline) std::this_thread::sleep_for(std::chrono::milliseconds(10));
  ASSERT_EQ(router_->num_replicas(), 0);
  StartWorker();  // same name
  Collector c;
  GenerationRequest r = Request("again", "The capital of France is", 8);
  ASSERT_TRUE(router_->Submit(r, c.Sink()).ok());
  EXPECT_EQ(c.Wait().finish, FinishReason::kLength);
  EXPECT_EQ(c.tokens, InProcess(r.prompt_tokens, 8));
  // SIGTERM: the worker exits cleanly and its replica goes away.
  EXPECT_EQ(StopWorker(SIGTERM), 0);
  const auto gone = Clock::now() + std::chrono::seconds(2);
  while (router_->num_replicas() != 0 && Clock::now() < gone) std::this_thread::sleep_for(std::chrono::milliseconds(10));
  EXPECT_EQ(router_->num_replicas(), 0);
}

}  // namespace
}  // namespace asynctls
