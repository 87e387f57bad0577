// `asynctls generate`: one request through the in-process coordinator and engine.
#include <chrono>
#include <cstdio>
#include <future>
#include <string>
#include <vector>

#include "asynctls/coordinator/coordinator.h"
#include "asynctls/runtime/engine.h"
#include "asynctls/runtime/status.h"
#include "asynctls/runtime/tokenizer.h"
#include "asynctls/runtime/weights.h"
#include "commands.h"
#include "engine_flags.h"
#include "flags.h"
#include "model_fetch.h"
#if ASYNCTLS_HAVE_GRPC
#include "grpc_client.h"
#endif

namespace asynctls {

absl::Status RunGenerate(int argc, char** argv) {
  Flags flags;
  ASYNCTLS_RETURN_IF_ERROR(flags.Parse(argc, argv, {"raw"}));
  ASYNCTLS_RETURN_IF_ERROR(flags.CheckKnown(WithEngineFlags(
      {"prompt", "prompt-file", "model", "device", "max-tokens", "temperature", "top-p", "top-k",
       "seed", "stop", "raw", "threads", "server", "attention"})));
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
  // --attention tls: two-level sparse decode (locally it needs --tls-channels FILE).
  const std::string attention = flags.Get("attention", "dense");
  if (attention != "dense" && attention != "tls")
    return absl::InvalidArgumentError(absl::StrCat("--attention: '", attention, "' is not dense or tls"));
  request.tls = attention == "tls";
  ASYNCTLS_RETURN_IF_ERROR(ParseEngineFlags(flags, &engine_options));
  if (request.tls && !flags.Has("server") && !engine_options.tls)
    return absl::InvalidArgumentError("--attention tls: give --tls-channels FILE (asynctls calibrate writes one)");

  if (flags.Has("server")) {
#if ASYNCTLS_HAVE_GRPC
    // A client of a running server: the server tokenizes (and applies the chat template).
    v1::GenerateRequest remote;
    if (flags.Has("raw")) {
      remote.set_prompt(prompt);
    } else {
      v1::ChatMessage* m = remote.mutable_messages()->add_messages();
      m->set_role("user");
      m->set_content(prompt);
    }
    v1::SamplingParams* s = remote.mutable_sampling();
    s->set_max_tokens(request.max_tokens);
    s->set_temperature(request.sampling.temperature);
    if (flags.Has("top-p")) s->set_top_p(request.sampling.top_p);
    s->set_top_k(request.sampling.top_k);
    s->set_seed(request.sampling.seed);
    for (const auto& stop : request.stop_strings) s->add_stop(stop);
    if (request.tls) remote.mutable_attention()->set_mode(v1::AttentionOptions::MODE_TLS);
    InferenceClient client(flags.Get("server"));
    ASYNCTLS_ASSIGN_OR_RETURN(StreamedGeneration out, client.Generate(remote, [](const v1::Chunk& chunk) {
      std::fwrite(chunk.text().data(), 1, chunk.text().size(), stdout);
      std::fflush(stdout);
    }));
    std::fputc('\n', stdout);
    std::fflush(stdout);
    const v1::Timings& t = out.final.timings();
    std::fprintf(stderr, "[%s] prompt %d tokens | TTFT %.1f ms | %d tokens generated, mean ITL %.1f ms | finish: %s\n",
                 flags.Get("server").c_str(), out.final.usage().prompt_tokens(), t.ttft_ms(),
                 out.final.usage().completion_tokens(), t.mean_itl_ms(),
                 v1::Final::FinishReason_Name(out.final.finish_reason()).c_str());
    return absl::OkStatus();
#else
    return absl::UnimplementedError("--server: this build has no gRPC client (ASYNCTLS_GRPC=OFF)");
#endif
  }
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
  std::fflush(stdout);
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

}  // namespace asynctls
