#include "server/serving.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <csignal>
#include <cstdio>
#include <filesystem>
#include <thread>

#include "absl/strings/str_cat.h"
#include "asynctls/coordinator/router.h"
#include "asynctls/runtime/status.h"
#include "server/inference_service.h"
#if ASYNCTLS_HAVE_METRICS
#include "server/metrics.h"
#endif
#if ASYNCTLS_HAVE_WORKER_LINK
#include "server/worker_registry.h"
#endif

namespace asynctls {
namespace {

std::atomic<bool> g_stop{false};

void OnSignal(int) { g_stop.store(true); }

}  // namespace

void RequestServingStop() { g_stop.store(true); }

absl::StatusOr<std::unique_ptr<Tokenizer>> LoadTokenizer(const WeightFile& weights, const std::string& path) {
  if (std::filesystem::is_directory(path)) return Tokenizer::FromHfJson(path);
  return Tokenizer::FromGguf(weights);
}

absl::Status ServeUntilSignalled(const ServingOptions& options) {
  if (options.model_path.empty()) return absl::InvalidArgumentError("--model: a model path is required");
  ASYNCTLS_ASSIGN_OR_RETURN(std::unique_ptr<WeightFile> weights, WeightFile::Open(options.model_path));
  ASYNCTLS_ASSIGN_OR_RETURN(std::unique_ptr<Tokenizer> tokenizer, LoadTokenizer(*weights, options.model_path));

  Router router(tokenizer.get(), options.coordinator);
  if (options.local_engine) {
    EngineOptions engine_options = options.engine;
    engine_options.max_batch_tokens = std::max(engine_options.max_batch_tokens, options.coordinator.max_batch_tokens);
    ASYNCTLS_ASSIGN_OR_RETURN(std::unique_ptr<Engine> engine, Engine::Create(*weights, engine_options));
    const ExecutorInfo info = engine->Info();
    ASYNCTLS_RETURN_IF_ERROR(router.AddReplica("local", std::move(engine)));
    std::fprintf(stderr, "asynctls: serving %s on %s in process\n", info.model_name.c_str(), info.device.c_str());
  }

  Metrics* metrics_ptr = nullptr;
#if ASYNCTLS_HAVE_METRICS
  Metrics metrics;
  metrics.SetRouter(&router);
  if (options.metrics_port >= 0) {
    ASYNCTLS_RETURN_IF_ERROR(metrics.Serve(options.metrics_port));
    std::fprintf(stderr, "asynctls: metrics on http://%s:%d/metrics\n", options.host.c_str(), metrics.port());
  }
  metrics_ptr = &metrics;
#else
  // TODO(metrics): the Prometheus exporter (server/metrics.h) is not in this build.
  if (options.metrics_port >= 0) std::fprintf(stderr, "asynctls: built without metrics; --metrics-port ignored\n");
#endif

  InferenceService service(&router, tokenizer.get(), InferenceServiceOptions{}, metrics_ptr);
  ServerConfig config;
  config.address = absl::StrCat(options.host, ":", options.port);
#if ASYNCTLS_HAVE_WORKER_LINK
  // asynctls-worker processes connect here and become replicas; a worker serving a model with
  // another vocabulary than this tokenizer's is refused.
  WorkerRegistryOptions registry_options;
  registry_options.expected_vocab_size = tokenizer->vocab_size();
  WorkerRegistry registry(&router, registry_options);
  config.extra_services.push_back(&registry);
#endif
  absl::StatusOr<RunningServer> started = BuildInferenceServer(&service, config);
#if ASYNCTLS_HAVE_WORKER_LINK
  if (!started.ok()) registry.Shutdown();
#endif
  if (!started.ok()) return started.status();
  RunningServer running = std::move(*started);
  std::fprintf(stderr, "asynctls: listening on %s:%d\n", options.host.c_str(), running.port);
  std::fflush(stderr);

  g_stop.store(false);
  std::signal(SIGINT, OnSignal);
  std::signal(SIGTERM, OnSignal);
  absl::Status status;
  if (options.on_ready) status = options.on_ready(running.port);
  while (status.ok() && !g_stop.load()) std::this_thread::sleep_for(std::chrono::milliseconds(100));
  std::fprintf(stderr, "asynctls: shutting down\n");
  if (options.on_ready) options.on_ready(-1).IgnoreError();
  // Workers first (their streams would hold the server's Shutdown), then the local replica:
  // live streams end CANCELLED; then the server drains.
#if ASYNCTLS_HAVE_WORKER_LINK
  registry.Shutdown();
#endif
  for (const auto& r : router.Stats()) router.RemoveReplica(r.name, absl::CancelledError("server shutting down"));
  running.server->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(2));
#if ASYNCTLS_HAVE_METRICS
  metrics.StopServing();
#endif
  std::signal(SIGINT, SIG_DFL);
  std::signal(SIGTERM, SIG_DFL);
  return status;
}

}  // namespace asynctls
