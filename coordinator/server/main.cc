// asynctls-coordinator: the gRPC front door. Serves asynctls.v1.Inference (plus health and
// reflection) over whatever replicas it has: asynctls-worker processes that connect to it
// (WorkerLink), and an in-process engine with --local-engine.
#include <cstdio>
#include <cstdlib>
#include <string>

#include "asynctls/runtime/status.h"
#include "server/serving.h"

namespace asynctls {
namespace {

constexpr char kUsage[] = R"(usage: asynctls-coordinator --model PATH [flags]
  --model PATH            GGUF file or safetensors folder (its tokenizer; required)
  --host H                address to bind (default 0.0.0.0)
  --port N                gRPC port (default 50051; 0 picks a free one)
  --metrics-port N        serve Prometheus metrics on this port (default: off)
  --max-queue N           requests waiting beyond this get RESOURCE_EXHAUSTED (default 256)
  --max-batch-tokens N    tokens per scheduler step (default 512)
  --max-running N         sequences decoded together (default 64)
  --local-engine          also serve an in-process engine replica ("local")
  --device D              the local engine's device: cpu, cuda, cuda:N, auto (default auto)
  --threads N             the local engine's CPU threads (default: all cores)
)";

bool ParseInt(const char* text, int* out) {
  char* end = nullptr;
  const long v = std::strtol(text, &end, 10);
  if (end == text || *end != '\0') return false;
  *out = static_cast<int>(v);
  return true;
}

absl::Status Main(int argc, char** argv) {
  ServingOptions options;
  for (int i = 1; i < argc; ++i) {
    std::string flag = argv[i];
    std::string value;
    if (auto eq = flag.find('='); eq != std::string::npos) {
      value = flag.substr(eq + 1);
      flag = flag.substr(0, eq);
    } else if (flag == "--local-engine") {
      options.local_engine = true;
      continue;
    } else if (flag == "--help" || flag == "-h") {
      std::fputs(kUsage, stdout);
      return absl::OkStatus();
    } else if (i + 1 < argc) {
      value = argv[++i];
    } else {
      return absl::InvalidArgumentError(flag + " needs a value");
    }
    int n = 0;
    const bool numeric = ParseInt(value.c_str(), &n);
    auto need_number = [&]() -> absl::Status {
      return numeric ? absl::OkStatus() : absl::InvalidArgumentError(flag + ": '" + value + "' is not a number");
    };
    if (flag == "--model") {
      options.model_path = value;
    } else if (flag == "--host") {
      options.host = value;
    } else if (flag == "--device") {
      options.engine.device = value;
    } else if (flag == "--port") {
      ASYNCTLS_RETURN_IF_ERROR(need_number());
      options.port = n;
    } else if (flag == "--metrics-port") {
      ASYNCTLS_RETURN_IF_ERROR(need_number());
      options.metrics_port = n;
    } else if (flag == "--max-queue") {
      ASYNCTLS_RETURN_IF_ERROR(need_number());
      options.coordinator.max_queue = n;
    } else if (flag == "--max-batch-tokens") {
      ASYNCTLS_RETURN_IF_ERROR(need_number());
      options.coordinator.max_batch_tokens = n;
    } else if (flag == "--max-running") {
      ASYNCTLS_RETURN_IF_ERROR(need_number());
      options.coordinator.max_running = n;
    } else if (flag == "--threads") {
      ASYNCTLS_RETURN_IF_ERROR(need_number());
      options.engine.cpu_threads = n;
    } else {
      return absl::InvalidArgumentError("unknown flag " + flag + "\n" + kUsage);
    }
  }
  return ServeUntilSignalled(options);
}

}  // namespace
}  // namespace asynctls

int main(int argc, char** argv) {
  const absl::Status status = asynctls::Main(argc, argv);
  if (!status.ok()) {
    std::fprintf(stderr, "asynctls-coordinator: %s\n", status.ToString().c_str());
    return 1;
  }
  return 0;
}
