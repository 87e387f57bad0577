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
  ASYNCTLS_RETURN_IF_ERROR(flags.Parse(argc, argv, {"raw", "ignore-eos"}));
  ASYNCTLS_RETURN_IF_ERROR(flags.CheckKnown(WithEngineFlags(
      {"prompt", "prompt-file", "model", "device", "max-tokens", "temperature", "top-p", "top-k",
       "seed", "stop", "raw", "ignore-eos", "threads", "server", "attention"})));
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
  request.ignore_eos = flags.Has("ignore-eos");
  EngineOptions engine_options;
  engine_options.device = flags.Get("device", "auto");
  ASYNCTLS_RETURN_IF_ERROR(flags.GetNumber("threads", &engine_options.cpu_threads));
  // --attention tls: two-level sparse decode (locally it needs --tls-channels FILE).
  const std::string attention = flags.Get("attention", "dense");
  if (attention != "dense" && attention != "tls")
    return absl::InvalidArgumentError(absl::StrCat("--attention: '", attention, "' is not dense or tls"));
  request.tls = attention == "tls";
  if (flags.Has("server")) {
#if ASYNCTLS_HAVE_GRPC
    // A client of a running server: the server tokenizes (and applies the chat template); the
    // TLS budgets are the request's.
    int32_t block_budget = 0, token_budget = 0;
    ASYNCTLS_RETURN_IF_ERROR(ParseClientFlags(flags, request.tls, &block_budget, &token_budget));
    v1::GenerateRequest remote;
    remote.set_model(flags.Get("model"));  // a name the server lists (empty: its only model)
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
    s->set_ignore_eos(request.ignore_eos);
    if (request.tls) {
      v1::AttentionOptions* a = remote.mutable_attention();
      a->set_mode(v1::AttentionOptions::MODE_TLS);
      a->set_block_budget(block_budget);
      a->set_token_budget(token_budget);
    }
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
  ASYNCTLS_RETURN_IF_ERROR(ParseEngineFlags(flags, &engine_options));
  if (request.tls && !engine_options.tls)
    return absl::InvalidArgumentError(
        "--attention tls: give --tls-channels FILE (asynctls calibrate writes one)");
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
