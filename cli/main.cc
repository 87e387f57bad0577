// asynctls: the command-line entry.
//   asynctls generate (--prompt TEXT | --prompt-file F) [--model PATH] [--device cpu|cuda|auto]
//                     [--max-tokens N] [--temperature T] [--top-p P] [--top-k K] [--seed S]
//                     [--stop STR]... [--raw] [--threads N]
// Generated text goes to stdout as it streams; stats (prompt tokens, TTFT, tokens/s) to stderr.
#include <chrono>
#include <cstdio>
#include <fstream>
#include <future>
#include <iostream>
#include <sstream>
#include <string>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "asynctls/coordinator/coordinator.h"
#include "asynctls/runtime/engine.h"
#include "asynctls/runtime/status.h"
#include "asynctls/runtime/tokenizer.h"
#include "asynctls/runtime/weights.h"
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
             --threads N         CPU threads (default: all cores)
  fetch-model  download the default model into the cache (once) and print its path
)";

// Flags of one subcommand: --name value pairs and boolean switches.
class Flags {
 public:
  absl::Status Parse(int argc, char** argv, const std::vector<std::string>& switches) {
    for (int i = 0; i < argc; ++i) {
      std::string a = argv[i];
      if (a.rfind("--", 0) != 0) return absl::InvalidArgumentError(absl::StrCat("unexpected argument '", a, "'"));
      a = a.substr(2);
      if (auto eq = a.find('='); eq != std::string::npos) {
        values_.emplace_back(a.substr(0, eq), a.substr(eq + 1));
        continue;
      }
      if (std::find(switches.begin(), switches.end(), a) != switches.end()) {
        values_.emplace_back(a, "1");
        continue;
      }
      if (i + 1 >= argc) return absl::InvalidArgumentError(absl::StrCat("--", a, " needs a value"));
      values_.emplace_back(a, argv[++i]);
    }
    return absl::OkStatus();
  }
  bool Has(const std::string& name) const { return !All(name).empty(); }
  std::string Get(const std::string& name, std::string def = "") const {
    auto all = All(name);
    return all.empty() ? def : all.back();
  }
  std::vector<std::string> All(const std::string& name) const {
    std::vector<std::string> out;
    for (const auto& [k, v] : values_)
      if (k == name) out.push_back(v);
    return out;
  }
  template <typename T>
  absl::Status GetNumber(const std::string& name, T* out) const {
    if (!Has(name)) return absl::OkStatus();
    bool ok;
    if constexpr (std::is_floating_point_v<T>) {
      double d;
      ok = absl::SimpleAtod(Get(name), &d);
      *out = static_cast<T>(d);
    } else {
      ok = absl::SimpleAtoi(Get(name), out);
    }
    return ok ? absl::OkStatus()
              : absl::InvalidArgumentError(absl::StrCat("--", name, ": '", Get(name), "' is not a number"));
  }
  absl::Status CheckKnown(const std::vector<std::string>& known) const {
    for (const auto& [k, v] : values_)
      if (std::find(known.begin(), known.end(), k) == known.end())
        return absl::InvalidArgumentError(absl::StrCat("unknown flag --", k));
    return absl::OkStatus();
  }

 private:
  std::vector<std::pair<std::string, std::string>> values_;
};

absl::StatusOr<std::string> ReadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot open ", path));
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

absl::Status Generate(int argc, char** argv) {
  Flags flags;
  ASYNCTLS_RETURN_IF_ERROR(flags.Parse(argc, argv, {"raw"}));
  ASYNCTLS_RETURN_IF_ERROR(flags.CheckKnown({"prompt", "prompt-file", "model", "device", "max-tokens", "temperature",
                                             "top-p", "top-k", "seed", "stop", "raw", "threads"}));
  if (flags.Has("prompt") == flags.Has("prompt-file"))
    return absl::InvalidArgumentError("give exactly one of --prompt or --prompt-file");
  std::string prompt = flags.Get("prompt");
  if (flags.Has("prompt-file")) {
    ASYNCTLS_ASSIGN_OR_RETURN(prompt, ReadFile(flags.Get("prompt-file")));
  }
  GenerationRequest request;
  request.request_id = "cli";
  request.max_tokens = 256;
  ASYNCTLS_RETURN_IF_ERROR(flags.GetNumber("max-tokens", &request.max_tokens));
  ASYNCTLS_RETURN_IF_ERROR(flags.GetNumber("temperature", &request.sampling.temperature));
  ASYNCTLS_RETURN_IF_ERROR(flags.GetNumber("top-p", &request.sampling.top_p));
  ASYNCTLS_RETURN_IF_ERROR(flags.GetNumber("top-k", &request.sampling.top_k));
  ASYNCTLS_RETURN_IF_ERROR(flags.GetNumber("seed", &request.sampling.seed));
  request.stop_strings = flags.All("stop");
  EngineOptions engine_options;
  engine_options.device = flags.Get("device", "auto");
  ASYNCTLS_RETURN_IF_ERROR(flags.GetNumber("threads", &engine_options.cpu_threads));

  std::string model_path = flags.Get("model");
  if (model_path.empty()) {
    ASYNCTLS_ASSIGN_OR_RETURN(model_path, DefaultModelPath());
  }
  ASYNCTLS_ASSIGN_OR_RETURN(std::unique_ptr<WeightFile> weights, WeightFile::Open(model_path));
  ASYNCTLS_ASSIGN_OR_RETURN(std::unique_ptr<Tokenizer> tokenizer, Tokenizer::FromGguf(*weights));
  if (!flags.Has("raw")) prompt = tokenizer->ApplyChatTemplate({{"user", prompt}});
  ASYNCTLS_ASSIGN_OR_RETURN(request.prompt_tokens, tokenizer->Encode(prompt));
  if (tokenizer->add_bos() && tokenizer->bos_id() >= 0)
    request.prompt_tokens.insert(request.prompt_tokens.begin(), tokenizer->bos_id());

  const auto load_start = std::chrono::steady_clock::now();
  ASYNCTLS_ASSIGN_OR_RETURN(std::unique_ptr<Engine> engine, Engine::Create(*weights, engine_options));
  const double load_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - load_start).count();
  Coordinator coordinator(tokenizer.get(), engine.get(), CoordinatorOptions{});

  std::promise<GenerationEvent> done;
  ASYNCTLS_RETURN_IF_ERROR(coordinator.Submit(request, [&](const GenerationEvent& ev) {
    std::fwrite(ev.text_delta.data(), 1, ev.text_delta.size(), stdout);
    std::fflush(stdout);
    if (ev.final()) done.set_value(ev);
  }));
  GenerationEvent last = done.get_future().get();
  std::fputc('\n', stdout);
  if (last.finish == FinishReason::kError || last.finish == FinishReason::kCancelled) return last.error;
  const auto& t = last.timings;
  double decode_ms = 0;
  for (double g : t.inter_token_ms) decode_ms += g;
  const double decode_tps = decode_ms > 0 ? t.inter_token_ms.size() * 1000.0 / decode_ms : 0;
  std::fprintf(stderr,
               "[%s on %s] load %.1f s | prompt %d tokens | TTFT %.1f ms (%.0f prompt tokens/s) | "
               "%d tokens generated, %.1f tokens/s decode | finish: %s\n",
               engine->Info().model_name.c_str(), engine->Info().device.c_str(), load_s, last.prompt_tokens,
               t.ttft_ms, last.prompt_tokens * 1000.0 / std::max(t.ttft_ms, 1e-3), last.completion_tokens,
               decode_tps, FinishReasonName(last.finish));
  return absl::OkStatus();
}

}  // namespace
}  // namespace asynctls

int main(int argc, char** argv) {
  if (argc < 2 || std::string(argv[1]) == "--help" || std::string(argv[1]) == "-h") {
    std::fputs(asynctls::kUsage, argc < 2 ? stderr : stdout);
    return argc < 2 ? 2 : 0;
  }
  const std::string command = argv[1];
  absl::Status status;
  if (command == "generate") {
    status = asynctls::Generate(argc - 2, argv + 2);
  } else if (command == "fetch-model") {
    absl::StatusOr<std::string> path = asynctls::DefaultModelPath();
    status = path.status();
    if (path.ok()) std::printf("%s\n", path->c_str());
  } else {
    std::fprintf(stderr, "unknown command '%s'\n%s", command.c_str(), asynctls::kUsage);
    return 2;
  }
  if (!status.ok()) {
    std::fprintf(stderr, "asynctls %s: %s\n", command.c_str(), status.ToString().c_str());
    return 1;
  }
  return 0;
}
