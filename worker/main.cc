// asynctls-worker: one rank. Loads the model into an Engine, dials the coordinator, says Hello
// (proto/asynctls/v1/worker.proto) and runs the step plans that arrive on that one stream.
// Heartbeats every 500 ms, also while a step runs; a coordinator silent for 1.5 s or a broken
// stream frees every sequence's KV and reconnects with backoff. SIGTERM/SIGINT: clean exit.
#include <grpcpp/grpcpp.h>
#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <deque>
#include <mutex>
#include <optional>
#include <string>
#include <thread>

#include "absl/container/flat_hash_set.h"
#include "absl/strings/str_cat.h"
#include "asynctls/runtime/engine.h"
#include "asynctls/runtime/logging.h"
#include "asynctls/runtime/status.h"
#include "asynctls/runtime/weights.h"
#include "asynctls/v1/worker.grpc.pb.h"
#include "engine_flags.h"
#include "flags.h"
#include "model_fetch.h"
#include "server/step_codec.h"

namespace asynctls {
namespace {

using Clock = std::chrono::steady_clock;
constexpr auto kHeartbeatInterval = std::chrono::milliseconds(500);
constexpr auto kSilenceTimeout = std::chrono::milliseconds(1500);

constexpr char kUsage[] = R"(usage: asynctls-worker --coordinator HOST:PORT [flags]
  --coordinator HOST:PORT  the coordinator's address (required)
  --name NAME              replica name, unique per coordinator (default: <hostname>-<pid>)
  --model PATH             GGUF file or safetensors directory (default: SmolLM2-135M-Instruct,
                           fetched once into ~/.cache/asynctls)
  --device D               cpu, cuda, cuda:N or auto (default auto)
  --threads N              CPU threads (default: all cores)
  --kv-cache-mb MB         KV cache size (default: 1 GiB on the CPU, 40% of free GPU memory)
  --max-batch-tokens N     most tokens per step (default 512)
  --tls-channels FILE      serve attention.mode TLS (and the other --tls-* flags of asynctls
                           generate)
  --cuda-graphs on|off     decode steps replayed from CUDA graphs (default on)
  --weight-dtype T         bf16 (default) or f32: GEMM weights on a GPU
)";

// Set by the signal thread; the current session's context is cancelled so blocking calls end.
struct StopState {
  std::mutex mu;
  std::condition_variable cv;
  bool stop = false;
  grpc::ClientContext* session = nullptr;  // guarded by mu

  bool stopping() {
    std::lock_guard<std::mutex> lock(mu);
    return stop;
  }
  void Stop() {
    std::lock_guard<std::mutex> lock(mu);
    stop = true;
    if (session) session->TryCancel();
    cv.notify_all();
  }
  // Sleeps up to `d`; false when stopping.
  bool SleepFor(std::chrono::milliseconds d) {
    std::unique_lock<std::mutex> lock(mu);
    return !cv.wait_for(lock, d, [&] { return stop; });
  }
};

int64_t NowMs() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(Clock::now().time_since_epoch()).count();
}

class Worker {
 public:
  Worker(std::string address, std::string name, Engine* engine, StopState* stop)
      : address_(std::move(address)), name_(std::move(name)), engine_(engine), stop_(stop) {}

  // Connects, serves, reconnects (backoff 100 ms doubling to 2 s) until stopped.
  void Run() {
    auto backoff = std::chrono::milliseconds(100);
    while (!stop_->stopping()) {
      bool welcomed = false;
      const grpc::Status status = Session(&welcomed);
      FreeAll();
      if (stop_->stopping()) break;
      if (welcomed) backoff = std::chrono::milliseconds(100);
      ASYNCTLS_LOG_WARN("link to ", address_, " ended (", static_cast<int>(status.error_code()), " ",
                        status.error_message(), "); reconnecting in ", backoff.count(), " ms");
      if (!stop_->SleepFor(backoff)) break;
      backoff = std::min(backoff * 2, std::chrono::milliseconds(2000));
    }
  }

 private:
  // One stream: returns its final status when it ends for any reason.
  grpc::Status Session(bool* welcomed) {
    auto channel = grpc::CreateChannel(address_, grpc::InsecureChannelCredentials());
    auto stub = v1::WorkerLink::NewStub(channel);
    grpc::ClientContext context;
    {
      std::lock_guard<std::mutex> lock(stop_->mu);
      if (stop_->stop) return grpc::Status(grpc::StatusCode::CANCELLED, "stopping");
      stop_->session = &context;
    }
    auto stream = stub->Connect(&context);

    std::mutex mu;  // guards the fields below and serializes writes
    std::condition_variable cv;
    std::deque<v1::WorkerStepPlan> plans;
    bool closed = false;
    auto last_rx = Clock::now();
    auto write = [&](const v1::WorkerMessage& m) {
      std::lock_guard<std::mutex> lock(mu);
      return !closed && stream->Write(m);
    };
    auto close = [&](const std::string& why) {
      {
        std::lock_guard<std::mutex> lock(mu);
        if (closed) return;
        closed = true;
        cv.notify_all();
      }
      if (!why.empty()) ASYNCTLS_LOG_WARN(why);
      context.TryCancel();
    };

    v1::WorkerMessage hello;
    ToProto(engine_->Info(), hello.mutable_hello());
    hello.mutable_hello()->set_worker_name(name_);
    hello.mutable_hello()->set_pid(getpid());
    bool hello_sent = write(hello);

    std::thread reader([&] {
      v1::CoordinatorMessage in;
      while (stream->Read(&in)) {
        std::lock_guard<std::mutex> lock(mu);
        last_rx = Clock::now();
        if (in.has_plan()) {
          plans.push_back(std::move(*in.mutable_plan()));
          cv.notify_all();
        } else if (in.has_welcome()) {
          *welcomed = true;
          ASYNCTLS_LOG_INFO("registered with ", address_, " as ", in.welcome().worker_name());
        }
      }
      close("");
    });
    std::thread heartbeat([&] {
      v1::WorkerMessage beat;
      std::unique_lock<std::mutex> lock(mu);
      while (!closed) {
        cv.wait_for(lock, kHeartbeatInterval, [&] { return closed; });
        if (closed) break;
        if (Clock::now() - last_rx > kSilenceTimeout) {
          lock.unlock();
          close(absl::StrCat("coordinator ", address_, " silent for ", kSilenceTimeout.count(), " ms"));
          lock.lock();
          break;
        }
        beat.mutable_heartbeat()->set_sent_ms(NowMs());
        if (!stream->Write(beat)) break;  // the reader sees the broken stream too
      }
    });

    if (!hello_sent) close("");
    // Plans run on this thread, one at a time, in arrival order.
    for (;;) {
      v1::WorkerStepPlan plan;
      {
        std::unique_lock<std::mutex> lock(mu);
        cv.wait(lock, [&] { return closed || !plans.empty(); });
        if (closed) break;
        plan = std::move(plans.front());
        plans.pop_front();
      }
      v1::WorkerMessage out;
      RunPlan(plan, out.mutable_result());
      if (!write(out)) {
        close("");
        break;
      }
    }
    close("");
    reader.join();
    heartbeat.join();
    {
      std::lock_guard<std::mutex> lock(stop_->mu);
      stop_->session = nullptr;
    }
    return stream->Finish();
  }

  void RunPlan(const v1::WorkerStepPlan& proto_plan, v1::WorkerStepResult* out) {
    const StepPlan plan = FromProto(proto_plan);
    for (uint64_t id : plan.releases) live_.erase(id);
    for (const PrefillChunk& c : plan.prefills) live_.insert(c.seq_id);
    const auto start = Clock::now();
    absl::StatusOr<StepResult> result = engine_->Step(plan);
    if (!result.ok()) {
      ASYNCTLS_LOG_ERROR("step ", plan.step_id, " failed: ", result.status().ToString());
      out->set_step_id(plan.step_id);
      out->set_step_error(result.status().ToString());
      out->set_step_ms(std::chrono::duration<double, std::milli>(Clock::now() - start).count());
      const ExecutorInfo info = engine_->Info();
      out->set_kv_blocks_total(info.kv_blocks_total);
      return;
    }
    for (const SequenceError& e : result->errors) live_.erase(e.seq_id);
    ToProto(*result, out);
  }

  // The coordinator that planned these sequences is gone: free their KV.
  void FreeAll() {
    if (live_.empty()) return;
    StepPlan plan;
    plan.releases.assign(live_.begin(), live_.end());
    live_.clear();
    absl::StatusOr<StepResult> r = engine_->Step(plan);
    if (!r.ok()) ASYNCTLS_LOG_ERROR("freeing the sequences of a lost link: ", r.status().ToString());
    else ASYNCTLS_LOG_INFO("freed ", plan.releases.size(), " sequences; ", r->kv_blocks_used, " KV blocks in use");
  }

  const std::string address_;
  const std::string name_;
  Engine* engine_;
  StopState* stop_;
  absl::flat_hash_set<uint64_t> live_;  // sequences with KV on this worker
};

absl::Status Main(int argc, char** argv, StopState* stop) {
  Flags flags;
  ASYNCTLS_RETURN_IF_ERROR(flags.Parse(argc, argv, {}));
  ASYNCTLS_RETURN_IF_ERROR(flags.CheckKnown(WithEngineFlags(
      {"coordinator", "name", "model", "device", "threads", "kv-cache-mb", "max-batch-tokens"})));
  if (!flags.Has("coordinator")) return absl::InvalidArgumentError("--coordinator HOST:PORT is required");
  std::string name = flags.Get("name");
  if (name.empty()) {
    char host[256] = {};
    gethostname(host, sizeof(host) - 1);
    name = absl::StrCat(host, "-", getpid());
  }
  SetLogPrefix(absl::StrCat("worker ", name));

  EngineOptions options;
  options.device = flags.Get("device", "auto");
  ASYNCTLS_RETURN_IF_ERROR(flags.GetNumber("threads", &options.cpu_threads));
  ASYNCTLS_RETURN_IF_ERROR(flags.GetNumber("max-batch-tokens", &options.max_batch_tokens));
  int64_t kv_mb = 0;
  ASYNCTLS_RETURN_IF_ERROR(flags.GetNumber("kv-cache-mb", &kv_mb));
  if (kv_mb < 0) return absl::InvalidArgumentError("--kv-cache-mb must be >= 0");
  options.kv_cache_bytes = kv_mb << 20;
  ASYNCTLS_RETURN_IF_ERROR(ParseEngineFlags(flags, &options));

  std::string model_path = flags.Get("model");
  if (model_path.empty()) {
    ASYNCTLS_ASSIGN_OR_RETURN(model_path, DefaultModelPath());
  }
  ASYNCTLS_ASSIGN_OR_RETURN(std::unique_ptr<WeightFile> weights, WeightFile::Open(model_path));
  ASYNCTLS_ASSIGN_OR_RETURN(std::unique_ptr<Engine> engine, Engine::Create(*weights, options));
  const ExecutorInfo info = engine->Info();
  ASYNCTLS_LOG_INFO("loaded ", info.model_name, " on ", info.device, " (", info.kv_blocks_total,
                    " KV blocks); coordinator ", flags.Get("coordinator"));
  Worker worker(flags.Get("coordinator"), name, engine.get(), stop);
  worker.Run();
  ASYNCTLS_LOG_INFO("stopped");
  return absl::OkStatus();
}

}  // namespace
}  // namespace asynctls

namespace {
int g_signal_pipe[2] = {-1, -1};
}  // namespace

int main(int argc, char** argv) {
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--help" || a == "-h") {
      std::fputs(asynctls::kUsage, stdout);
      return 0;
    }
  }
  // Threads started before main (OpenBLAS's pool) would take a blocked-elsewhere signal, so the
  // handler only writes to a pipe; a thread reads it and stops the worker as ordinary code.
  if (pipe(g_signal_pipe) != 0) return 1;
  struct sigaction action = {};
  action.sa_handler = [](int sig) {
    const char byte = static_cast<char>(sig);
    [[maybe_unused]] ssize_t n = write(g_signal_pipe[1], &byte, 1);
  };
  sigemptyset(&action.sa_mask);
  sigaction(SIGTERM, &action, nullptr);
  sigaction(SIGINT, &action, nullptr);
  asynctls::StopState stop;
  std::thread signal_thread([&] {
    char sig = 0;
    while (read(g_signal_pipe[0], &sig, 1) < 0 && errno == EINTR) {
    }
    if (sig != 0) ASYNCTLS_LOG_INFO("signal ", static_cast<int>(sig), ": stopping");
    stop.Stop();
  });
  const absl::Status status = asynctls::Main(argc - 1, argv + 1, &stop);
  // Wake the signal thread if no signal came.
  const char zero = 0;
  [[maybe_unused]] ssize_t n = write(g_signal_pipe[1], &zero, 1);
  signal_thread.join();
  if (!status.ok()) {
    std::fprintf(stderr, "asynctls-worker: %s\n%s", status.ToString().c_str(),
                 status.code() == absl::StatusCode::kInvalidArgument ? asynctls::kUsage : "");
    return status.code() == absl::StatusCode::kInvalidArgument ? 2 : 1;
  }
  return 0;
}
