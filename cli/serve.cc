// `asynctls serve`: the embedded default. The coordinator's gRPC server plus, in the same
// process, an Engine replica for this machine; or, with --workers N, N asynctls-worker
// processes started here (and stopped on exit) that register with it.
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <filesystem>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "asynctls/runtime/status.h"
#include "commands.h"
#include "engine_flags.h"
#include "flags.h"
#include "model_fetch.h"
#include "server/serving.h"

namespace asynctls {
namespace {

// asynctls-worker next to this binary (installed layout) or in the build tree's worker/.
std::string FindWorkerBinary() {
  std::error_code ec;
  const std::filesystem::path self = std::filesystem::read_symlink("/proc/self/exe", ec);
  if (ec) return "";
  for (const auto& candidate : {self.parent_path() / "asynctls-worker",
                                self.parent_path().parent_path() / "worker" / "asynctls-worker"})
    if (std::filesystem::exists(candidate)) return candidate.string();
  return "";
}

pid_t Spawn(const std::vector<std::string>& args) {
  const pid_t pid = fork();
  if (pid != 0) return pid;  // parent (or -1)
  std::vector<char*> argv;
  for (const auto& a : args) argv.push_back(const_cast<char*>(a.c_str()));
  argv.push_back(nullptr);
  execv(argv[0], argv.data());
  std::perror("asynctls serve: exec asynctls-worker");
  _exit(127);
}

// SIGTERM, up to 10 s to exit, then SIGKILL.
void StopAll(std::vector<pid_t>& pids) {
  for (pid_t pid : pids) kill(pid, SIGTERM);
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
  for (pid_t pid : pids) {
    int status = 0;
    while (waitpid(pid, &status, WNOHANG) == 0) {
      if (std::chrono::steady_clock::now() > deadline) {
        kill(pid, SIGKILL);
        waitpid(pid, &status, 0);
        break;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
  }
  pids.clear();
}

}  // namespace

absl::Status RunServe(int argc, char** argv) {
  Flags flags;
  ASYNCTLS_RETURN_IF_ERROR(flags.Parse(argc, argv, {}));
  ASYNCTLS_RETURN_IF_ERROR(flags.CheckKnown(
      WithEngineFlags({"port", "metrics-port", "model", "device", "threads", "max-queue",
                       "max-batch-tokens", "max-running", "host", "workers", "worker-binary"})));
  ServingOptions options;
  options.host = flags.Get("host", "0.0.0.0");
  ASYNCTLS_RETURN_IF_ERROR(flags.GetNumber("port", &options.port));
  ASYNCTLS_RETURN_IF_ERROR(flags.GetNumber("metrics-port", &options.metrics_port));
  ASYNCTLS_RETURN_IF_ERROR(flags.GetNumber("max-queue", &options.coordinator.max_queue));
  ASYNCTLS_RETURN_IF_ERROR(flags.GetNumber("max-batch-tokens", &options.coordinator.max_batch_tokens));
  ASYNCTLS_RETURN_IF_ERROR(flags.GetNumber("max-running", &options.coordinator.max_running));
  ASYNCTLS_RETURN_IF_ERROR(flags.GetNumber("threads", &options.engine.cpu_threads));
  options.engine.device = flags.Get("device", "auto");
  ASYNCTLS_RETURN_IF_ERROR(ParseEngineFlags(flags, &options.engine));
  options.model_path = flags.Get("model");
  if (options.model_path.empty()) {
    ASYNCTLS_ASSIGN_OR_RETURN(options.model_path, DefaultModelPath());
  }
  int workers = 0;
  ASYNCTLS_RETURN_IF_ERROR(flags.GetNumber("workers", &workers));
  if (workers < 0) return absl::InvalidArgumentError("--workers: must be >= 0");
  options.local_engine = workers == 0;

  std::vector<pid_t> pids;
  if (workers > 0) {
    const std::string binary = flags.Get("worker-binary", FindWorkerBinary());
    if (binary.empty() || !std::filesystem::exists(binary))
      return absl::NotFoundError("--worker-binary: asynctls-worker not found next to asynctls; pass its path");
    options.on_ready = [&, binary](int port) -> absl::Status {
      if (port < 0) {
        StopAll(pids);
        return absl::OkStatus();
      }
      for (int i = 0; i < workers; ++i) {
        std::vector<std::string> args = {binary, "--coordinator", absl::StrCat("127.0.0.1:", port), "--name",
                                         absl::StrCat("worker-", i), "--model", options.model_path, "--device",
                                         options.engine.device};
        if (flags.Has("threads")) args.insert(args.end(), {"--threads", flags.Get("threads")});
        for (const std::string& f : EngineFlagNames()) {
          if (flags.Has(f)) args.insert(args.end(), {absl::StrCat("--", f), flags.Get(f)});
        }
        const pid_t pid = Spawn(args);
        if (pid < 0) return absl::InternalError("fork failed");
        pids.push_back(pid);
        std::fprintf(stderr, "asynctls serve: started worker-%d (pid %d)\n", i, static_cast<int>(pid));
      }
      return absl::OkStatus();
    };
  }
  const absl::Status status = ServeUntilSignalled(options);
  StopAll(pids);
  return status;
}

}  // namespace asynctls
