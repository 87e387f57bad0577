// asynctls: the command-line entry. Each command lives in its own file (commands.h).
#include <cstdio>
#include <string>

#include "commands.h"
#include "model_fetch.h"

namespace asynctls {
namespace {

constexpr char kUsage[] = R"(usage: asynctls <command> [flags]

commands:
  generate   generate text from a prompt in this process (the embedded default)
             --prompt TEXT | --prompt-file FILE   the prompt (chat-formatted unless --raw)
             --model PATH        GGUF file or safetensors directory (default: SmolLM2-135M-Instruct,
                                 fetched once into ~/.cache/asynctls)
             --device D          cpu, cuda, cuda:N or auto (default auto: the GPU when there is one)
             --max-tokens N      default 256
             --temperature T     default 0 (greedy)
             --top-p P --top-k K --seed S
             --stop STR          stop string (repeatable)
             --raw               send the prompt as is, without the chat template
             --ignore-eos        generate max-tokens tokens whatever the model ends with
             --threads N         CPU threads (default: all cores)
             --attention A       dense (default) or tls: two-level sparse attention for the
                                 generated tokens (locally needs --tls-channels)
             --tls-channels FILE channel sets from `asynctls calibrate`; enables TLS decode
             --tls-block-budget N --tls-token-budget N   k_b, k_t (default 128, 1024)
             --tls-lag L         one-step (default: the paper's, tokens chosen among the
                                 previous step's blocks) or same-step
             --tls-lag-slots N   sequences that keep one-step-lag state at once (default 256;
                                 later ones select same-step until slots free)
             --tls-block-index F bf16 (default) or int8: the block index's form (int8 halves
                                 its bytes)
             --cuda-graphs on|off  decode steps replayed from CUDA graphs (default on: on a
                                 GPU 8-10% faster at batch 1; the CPU runs op by op)
             --weight-dtype T    bf16 (default) or f32: GEMM weights on a GPU (f32 doubles
                                 the bytes a step reads; the CPU keeps f32)
  calibrate  write the TLS token index's channel sets (d_c per layer and KV head) as JSON
             --out FILE          where to write (format: runtime/.../channel_sets.h)
             --model PATH        as for generate
             --text FILE         calibration text (default tests/data/prompts/gpl-2.txt)
             --channels N        d_c (default 32)
             --device D          default cpu
             --max-tokens N      use only the first N tokens of the text
             --capture FILE      also write q/k/v for bench tls_accuracy_bench (see calibrate.cc)
  serve      serve the gRPC API (asynctls.v1.Inference + health + reflection); gRPC builds only
             --port N            default 50051
             --metrics-port N    Prometheus metrics on this port (default: off)
             --model PATH        as for generate   --device D --threads N
             --workers N         run N asynctls-worker processes instead of the in-process engine
             --worker-binary P   asynctls-worker to start (default: next to asynctls)
             --max-queue N --max-batch-tokens N --max-running N --host H
             --tls-channels FILE [--tls-block-budget N --tls-token-budget N --tls-lag L]   serve requests
                                 with attention.mode TLS (as for generate)
             --cuda-graphs on|off --weight-dtype T  as for generate (passed on to --workers)
  generate --server HOST:PORT    act as a client of a running server: --model NAME picks a model
                                 the server lists (default: its only one); --tls-block-budget N
                                 --tls-token-budget N with --attention tls ask for smaller
                                 budgets than the server's; engine flags (--device, --threads,
                                 --tls-channels, --cuda-graphs, --weight-dtype, ...) belong to serve
  bench      load-test a server (vLLM `bench serve` definitions); gRPC builds only
             --server HOST:PORT  the server (required)
             --num-requests N    default 100
             --request-rate R    Poisson arrivals per second (default inf: all at once)
             --max-concurrency C at most C requests in flight (default: no cap)
             --prompt-len DIST   fixed:N, uniform:A:B or normal:MEAN:STD (default fixed:128)
             --output-len DIST   as --prompt-len; outputs ignore EOS (default fixed:128)
             --seed S            prompts, lengths and arrivals (default 0)
             --slo-ttft-ms X --slo-tpot-ms Y --slo-e2e-ms Z   goodput SLOs
             --json FILE         also write the results as JSON
             --model NAME        default: the server's first model
  fetch-model  download the default model into the cache (once) and print its path
)";

absl::Status FetchModel(int, char**) {
  absl::StatusOr<std::string> path = DefaultModelPath();
  if (path.ok()) std::printf("%s\n", path->c_str());
  return path.status();
}

struct Command {
  const char* name;
  absl::Status (*run)(int argc, char** argv);
};

constexpr Command kCommands[] = {
    {"generate", RunGenerate},
#if ASYNCTLS_HAVE_GRPC
    {"serve", RunServe},
    {"bench", RunBench},
#endif
    {"calibrate", RunCalibrate},
    {"fetch-model", FetchModel},
};

}  // namespace
}  // namespace asynctls

int main(int argc, char** argv) {
  using asynctls::kUsage;
  if (argc < 2 || std::string(argv[1]) == "--help" || std::string(argv[1]) == "-h") {
    std::fputs(kUsage, argc < 2 ? stderr : stdout);
    return argc < 2 ? 2 : 0;
  }
  const std::string name = argv[1];
  for (const auto& command : asynctls::kCommands) {
    if (name != command.name) continue;
    const absl::Status status = command.run(argc - 2, argv + 2);
    if (!status.ok()) {
      std::fprintf(stderr, "asynctls %s: %s\n", name.c_str(), status.ToString().c_str());
      return 1;
    }
    return 0;
  }
  std::fprintf(stderr, "unknown command '%s'\n%s", name.c_str(), kUsage);
  return 2;
}
