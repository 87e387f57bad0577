// A whole decode step of a Qwen3-8B-shaped model (36 layers, hidden 4096, 32/8 heads, d 128,
// FFN 12288, vocab 151936) with seeded random bf16 weights generated on the GPU over a staged
// KV cache, next to the step's byte floor (weights + the attention's bytes read once). Dense
// attention, or two-level sparse attention through the engine's TLS path (the TLS index built
// over the staged keys; channel sets = channels 0..31, any set costs the same on random data),
// with the paper's one-step lag (--lag one-step, the default: the block branch on a second
// stream beside the token branch, the attention and the FFN) or same-step selection.
// --lag both compares the two in one process (processes of the same binary differ by up to 30%
// on the H200): twice the sequences, steps alternating between a set that holds the engine's
// lag slots (exactly one per sequence of a set) and a set that finds none and so selects
// same-step (one --batches value). --cuda-graphs both likewise: two engines of the same weights
// in one process (twice the memory), one running its decode steps op by op, one replaying a
// CUDA graph per batch shape (EngineOptions::cuda_graphs), their steps alternating.
//
//   decode_step_bench [--device cuda] [--context 32768] [--batches 1,8] [--steps 20] [--json F]
//                     [--attention dense|tls|both] [--k-b 128] [--k-t 1024]
//                     [--lag one-step|same-step|both] [--cuda-graphs 0|1|both]
//                     [--tls-block-index bf16|int8] [--shape qwen3-8b|tiny] [--profile 0|1]
// --profile 1: each row's first timed step runs between cudaProfilerStart / Stop, so that
// `ncu --profile-from-start off --metrics gpu__time_duration.sum --csv` lists one step's kernels
// (with --cuda-graphs 0) and not the weights' generation.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <memory>
#include <string>
#include <vector>

#if ASYNCTLS_HAVE_CUDA
#include <cuda_profiler_api.h>
#endif

#include "absl/strings/numbers.h"
#include "absl/strings/str_split.h"
#include "asynctls/runtime/engine.h"
#include "asynctls/runtime/status.h"

namespace asynctls {
namespace {

double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

ModelConfig Qwen3_8B() {
  ModelConfig c;
  c.architecture = "qwen3";
  c.name = "qwen3-8b-shaped (random weights)";
  c.num_layers = 36;
  c.hidden_size = 4096;
  c.num_q_heads = 32;
  c.num_kv_heads = 8;
  c.head_dim = 128;
  c.ffn_size = 12288;
  c.vocab_size = 151936;
  c.max_context = 131072 + 1024;  // 128K of staged context plus the measured steps
  c.rms_eps = 1e-6f;
  c.rope_theta = 1000000.f;
  c.rotary_dim = 128;
  c.rope_style = kernels::RopeStyle::kHalf;
  c.qk_norm = true;
  c.tied_embeddings = false;
  return c;
}

// --shape tiny: the same layout at toy sizes, so the bench runs in seconds on a CPU (a check
// that it works, not a measurement).
ModelConfig Tiny() {
  ModelConfig c = Qwen3_8B();
  c.name = "tiny qwen3-shaped (random weights)";
  c.num_layers = 2;
  c.hidden_size = 256;
  c.num_q_heads = 4;
  c.num_kv_heads = 2;
  c.head_dim = 64;
  c.rotary_dim = 64;
  c.ffn_size = 512;
  c.vocab_size = 1024;
  return c;
}

constexpr int kTlsChannels = 32;

// Bytes one decode step must read: every GEMM weight once (bf16), the LM head, the norms, and
// per sequence and layer the attention's bytes: dense, all of K and V (bf16); TLS, the block
// index (max + min of every block), the token index of the k_b kept blocks, and K + V of the
// k_t chosen tokens plus the sink block and the window.
double StepBytes(const ModelConfig& c, int batch, int context, const kernels::TlsPolicy* tls,
                 bool int8_block_index) {
  const double hd = c.head_dim, h = c.hidden_size, kv_heads = c.num_kv_heads;
  const double per_layer = h * (c.num_q_heads * hd) + 2 * h * (c.num_kv_heads * hd) + (c.num_q_heads * hd) * h +
                           3 * h * c.ffn_size;
  const double weights = 2.0 * (c.num_layers * per_layer + double(c.vocab_size) * h);
  double attn = 2.0 * 2.0 * kv_heads * hd * double(context);
  if (tls) {
    const double blocks = double(context) / kernels::kKvBlockSize;
    const double block_index =  // kmax + kmin (int8: codes and a scale)
        blocks * kv_heads * (int8_block_index ? hd * 2 + 4 : hd * 2 * 2);
    const double token_index = double(tls->block_budget) * kernels::kKvBlockSize * kv_heads * (kTlsChannels / 2 + 4);
    const double rows = double(tls->token_budget) + 2 * kernels::kKvBlockSize;
    attn = block_index + token_index + rows * kv_heads * hd * 2 * 2;
  }
  return weights + attn * c.num_layers * batch;
}

// Builds every layer's TLS index over `context` staged tokens of each sequence in `ids`.
absl::Status BuildTlsIndex(Engine& engine, const ModelConfig& c, const std::vector<uint64_t>& ids, int context) {
  KvCache& cache = engine.mutable_kv_cache();
  Backend& backend = engine.backend();
  const int batch = static_cast<int>(ids.size());
  int max_blocks = 0;
  for (uint64_t id : ids) max_blocks = std::max<int>(max_blocks, cache.Blocks(id).size());
  std::vector<int32_t> table(size_t(batch) * max_blocks, 0), start(batch, 0), lens(batch, context);
  for (int b = 0; b < batch; ++b) {
    const auto& blocks = cache.Blocks(ids[b]);
    std::copy(blocks.begin(), blocks.end(), table.begin() + size_t(b) * max_blocks);
  }
  std::vector<int32_t> channels(size_t(c.num_kv_heads) * kTlsChannels);
  for (size_t i = 0; i < channels.size(); ++i) channels[i] = static_cast<int32_t>(i % kTlsChannels);
  auto upload = [&](const std::vector<int32_t>& v) -> absl::StatusOr<DeviceBuffer> {
    ASYNCTLS_ASSIGN_OR_RETURN(DeviceBuffer buf, backend.Allocate(v.size() * sizeof(int32_t)));
    ASYNCTLS_RETURN_IF_ERROR(backend.CopyToDevice(buf.data(), v.data(), v.size() * sizeof(int32_t)));
    return buf;
  };
  ASYNCTLS_ASSIGN_OR_RETURN(DeviceBuffer d_table, upload(table));
  ASYNCTLS_ASSIGN_OR_RETURN(DeviceBuffer d_start, upload(start));
  ASYNCTLS_ASSIGN_OR_RETURN(DeviceBuffer d_lens, upload(lens));
  ASYNCTLS_ASSIGN_OR_RETURN(DeviceBuffer d_channels, upload(channels));
  for (int l = 0; l < c.num_layers; ++l) {
    kernels::TlsIndexUpdateParams p{};
    p.k_cache = cache.k_pool(l);
    p.block_table = d_table.as<int32_t>();
    p.index_table = d_table.as<int32_t>();
    p.start_pos = d_start.as<int32_t>();
    p.seq_lens = d_lens.as<int32_t>();
    p.block_kmax = cache.tls_kmax(l);
    p.block_kmin = cache.tls_kmin(l);
    p.channels = d_channels.as<int32_t>();
    p.maybe_token_codes = cache.tls_codes(l);
    p.maybe_token_scales = cache.tls_scales(l);
    p.maybe_block_scales = cache.tls_block_scales(l);  // null: the bf16 form
    p.batch = batch;
    p.num_kv_heads = c.num_kv_heads;
    p.head_dim = c.head_dim;
    p.num_channels = kTlsChannels;
    p.max_blocks_per_seq = max_blocks;
    p.max_new_tokens = context;
    ASYNCTLS_RETURN_IF_ERROR(backend.TlsIndexUpdate(p));
  }
  return backend.Synchronize();
}

// Channel sets 0..kTlsChannels-1 for every layer and KV head.
ChannelSets FirstChannels(const ModelConfig& c) {
  ChannelSets sets;
  sets.model = c.name;
  sets.num_layers = c.num_layers;
  sets.num_q_heads = c.num_q_heads;
  sets.num_kv_heads = c.num_kv_heads;
  sets.head_dim = c.head_dim;
  sets.num_channels = kTlsChannels;
  for (int i = 0; i < c.num_layers * c.num_kv_heads; ++i)
    for (int ch = 0; ch < kTlsChannels; ++ch) sets.channels.push_back(ch);
  return sets;
}

// One engine of the run with its KV cache staged: every pool filled with random bf16 as if
// `context` tokens had been prefilled (the same values for every engine of a run).
absl::StatusOr<std::unique_ptr<Engine>> StagedEngine(const ModelConfig& config,
                                                     const EngineOptions& options) {
  ASYNCTLS_ASSIGN_OR_RETURN(std::unique_ptr<Engine> engine,
                            Engine::CreateRandom(config, 1234, options));
  KvCache& cache = engine->mutable_kv_cache();
  const int64_t pool_elems =
      int64_t{cache.num_blocks()} * config.num_kv_heads * kernels::kKvBlockSize * config.head_dim;
  for (int l = 0; l < config.num_layers; ++l) {
    for (void* pool : {cache.k_pool(l), cache.v_pool(l)}) {
      const uint64_t seed = uint64_t(l) * 2 + (pool == cache.k_pool(l));
      ASYNCTLS_RETURN_IF_ERROR(
          engine->backend().RandomFill({pool, kernels::DType::kBF16, pool_elems, seed, 1.f, 0.f}));
    }
  }
  return engine;
}

int Main(int argc, char** argv) {
  std::string device = "cuda", json_path, attention = "dense", lag = "one-step";
  std::string cuda_graphs = "0", block_index = "bf16", shape = "qwen3-8b";
  int context = 32768, steps = 20, k_b = 128, k_t = 1024;
  bool profile = false;
  std::vector<int> batches = {1, 8};
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string f = argv[i], v = argv[i + 1];
    if (f == "--device") device = v;
    else if (f == "--context") context = std::atoi(v.c_str());
    else if (f == "--steps") steps = std::atoi(v.c_str());
    else if (f == "--json") json_path = v;
    else if (f == "--attention") attention = v;
    else if (f == "--k-b") k_b = std::atoi(v.c_str());
    else if (f == "--k-t") k_t = std::atoi(v.c_str());
    else if (f == "--lag") lag = v;
    else if (f == "--cuda-graphs")
      cuda_graphs = v;
    else if (f == "--tls-block-index")
      block_index = v;
    else if (f == "--shape")
      shape = v;
    else if (f == "--profile")
      profile = v == "1";
    else if (f == "--batches") {
      batches.clear();
      for (auto s : absl::StrSplit(v, ',')) batches.push_back(std::atoi(std::string(s).c_str()));
    }
  }
  if (shape != "qwen3-8b" && shape != "tiny") {
    std::fprintf(stderr, "--shape: qwen3-8b or tiny\n");
    return 2;
  }
  const ModelConfig config = shape == "tiny" ? Tiny() : Qwen3_8B();
  const int max_batch = *std::max_element(batches.begin(), batches.end());
  EngineOptions options;
  options.device = device;
  options.weight_dtype = kernels::DType::kBF16;
  options.max_batch_seqs = std::max(max_batch, 8);
  options.max_batch_tokens = 512;
  const int blocks_per_seq = (context + 1 + kernels::kKvBlockSize - 1) / kernels::kKvBlockSize;
  if (attention != "dense" && attention != "tls" && attention != "both") {
    std::fprintf(stderr, "--attention: dense, tls or both\n");
    return 2;
  }
  if (lag != "one-step" && lag != "same-step" && lag != "both") {
    std::fprintf(stderr, "--lag: one-step, same-step or both\n");
    return 2;
  }
  if (cuda_graphs != "0" && cuda_graphs != "1" && cuda_graphs != "both") {
    std::fprintf(stderr, "--cuda-graphs: 0, 1 or both\n");
    return 2;
  }
  if (block_index != "bf16" && block_index != "int8") {
    std::fprintf(stderr, "--tls-block-index: bf16 or int8\n");
    return 2;
  }
  const bool int8_block_index = block_index == "int8";
  const bool lag_ab = lag == "both";  // lag and same-step sets, alternating steps
  if (lag_ab && batches.size() != 1) {
    std::fprintf(stderr, "--lag both: one --batches value (the slots fit one batch)\n");
    return 2;
  }
  const int sets = lag_ab ? 2 : 1;
  const bool with_tls = attention != "dense";
  if (with_tls) {
    TlsDecodeOptions tls;
    tls.channels = FirstChannels(config);
    tls.policy.lag = lag == "same-step" ? kernels::TlsLag::kSameStep : kernels::TlsLag::kOneStep;
    if (lag_ab) tls.lag_sequences = max_batch;
    tls.policy.block_budget = k_b;
    tls.policy.token_budget = k_t;
    tls.int8_block_index = int8_block_index;
    options.tls = tls;
  }
  options.kv_cache_bytes =
      int64_t{blocks_per_seq + 1} * max_batch * sets *
      KvCache::BytesPerBlock(config.num_layers, config.num_kv_heads, config.head_dim,
                             with_tls ? kTlsChannels : 0, with_tls && int8_block_index);
  // The engines of the run: op-by-op steps, graph-replayed steps, or both side by side.
  std::vector<bool> graph_modes;
  if (cuda_graphs != "1") graph_modes.push_back(false);
  if (cuda_graphs != "0") graph_modes.push_back(true);
  auto t0 = std::chrono::steady_clock::now();
  std::vector<std::unique_ptr<Engine>> engines;
  for (bool graphs : graph_modes) {
    options.cuda_graphs = graphs;
    auto engine = StagedEngine(config, options);
    if (!engine.ok()) {
      std::fprintf(stderr, "engine: %s\n", engine.status().ToString().c_str());
      return 1;
    }
    engines.push_back(std::move(*engine));
  }
  const double load_s =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::printf(
      "# %s on %s, load %.1f s, context %d, bf16 weights, attention %s (TLS: %s, k_b %d, "
      "k_t %d, %s block index), cuda graphs %s\n",
      config.name.c_str(), engines[0]->Info().device.c_str(), load_s, context, attention.c_str(),
      lag.c_str(), k_b, k_t, block_index.c_str(), cuda_graphs.c_str());
  // fwd_ms / smp_ms: the step's forward (launches, GPU work, logits to the host) and host
  // sampling, medians like step_ms.
  std::printf("%6s %6s %6s %8s %10s %10s %12s %10s %8s %8s %8s\n", "attn", "graph", "batch",
              "context", "step_ms", "tok/s", "floor_ms", "GB/s", "x_floor", "fwd_ms", "smp_ms");
  std::string json = "[";
  std::vector<bool> modes;
  if (attention != "tls") modes.push_back(false);
  if (with_tls) modes.push_back(true);
  for (bool tls_mode : modes)
  for (int batch : batches) {
    // Set k's sequences are ids 1000 (k + 1) + b; with --lag both set 0 steps first and so takes
    // every lag slot, set 1 selects same-step. Every engine holds every set.
    const int num_sets = tls_mode ? sets : 1;
    std::vector<std::vector<uint64_t>> ids(num_sets);
    std::vector<uint64_t> all;
    for (int k = 0; k < num_sets; ++k) {
      for (int b = 0; b < batch; ++b) {
        ids[k].push_back(1000 * (k + 1) + b);
        all.push_back(ids[k].back());
      }
    }
    for (const std::unique_ptr<Engine>& engine : engines) {
      KvCache& cache = engine->mutable_kv_cache();
      for (uint64_t id : all) {
        if (!cache.Reserve(id, context + steps + 4).ok()) {
          std::fprintf(stderr, "KV cache too small for batch %d\n", batch);
          return 1;
        }
        cache.SetSeqLen(id, context);
      }
      if (tls_mode) {
        if (absl::Status st = BuildTlsIndex(*engine, config, all, context); !st.ok()) {
          std::fprintf(stderr, "tls index: %s\n", st.ToString().c_str());
          return 1;
        }
      }
    }
    // times[e][k]: engine e, set k.
    std::vector<std::vector<std::vector<double>>> times(engines.size(),
                                                        std::vector<std::vector<double>>(num_sets));
    auto forward_times = times, sample_times = times;
    for (int s = 0; s < steps + 3; ++s) {
      for (int k = 0; k < num_sets; ++k) {
        for (size_t e = 0; e < engines.size(); ++e) {
          StepPlan plan;
          for (uint64_t id : ids[k]) plan.decodes.push_back({id, 42, context + s, {}, tls_mode});
          [[maybe_unused]] const bool profiled = profile && s == 3;
#if ASYNCTLS_HAVE_CUDA
          if (profiled) cudaProfilerStart();
#endif
          auto r = engines[e]->Step(plan);  // returns once the logits are on the host
#if ASYNCTLS_HAVE_CUDA
          if (profiled) cudaProfilerStop();
#endif
          if (!r.ok() || !r->errors.empty()) {
            std::fprintf(stderr, "step failed: %s\n",
                         r.ok() ? r->errors[0].message.c_str() : r.status().ToString().c_str());
            return 1;
          }
          // The first steps warm up cuBLASLt plans (and capture the graphs).
          if (s >= 3) {
            times[e][k].push_back(r->step_ms);
            forward_times[e][k].push_back(r->forward_ms);
            sample_times[e][k].push_back(r->sample_ms);
          }
        }
      }
    }
    const double bytes = StepBytes(config, batch, context,
                                   tls_mode ? &options.tls->policy : nullptr, int8_block_index);
    const double floor_ms = bytes / 4.3e12 * 1e3;
    for (size_t e = 0; e < engines.size(); ++e) {
      for (int k = 0; k < num_sets; ++k) {
        const double ms = Median(times[e][k]);
        const char* label = !tls_mode ? "dense" : !lag_ab ? "tls" : k == 0 ? "lag" : "same";
        const int graphs = graph_modes[e] ? 1 : 0;
        std::printf("%6s %6d %6d %8d %10.3f %10.1f %12.3f %10.0f %8.2f %8.3f %8.3f\n", label,
                    graphs, batch, context, ms, batch * 1000.0 / ms, floor_ms,
                    bytes / (ms * 1e-3) / 1e9, ms / floor_ms, Median(forward_times[e][k]),
                    Median(sample_times[e][k]));
        char row[360];
        std::snprintf(row, sizeof(row),
                      "%s{\"attention\":\"%s\",\"cuda_graphs\":%d,\"batch\":%d,\"context\":%d,"
                      "\"step_ms\":%.4f,\"floor_ms\":%.4f,\"bytes\":%.0f}",
                      json.size() > 1 ? "," : "", label, graphs, batch, context, ms, floor_ms,
                      bytes);
        json += row;
      }
    }
    // The logits' copy to the host alone (the device idle), into page-locked memory as the
    // engine's when a row samples with a temperature (greedy rows copy no logits).
    Backend& backend = engines[0]->backend();
    auto logits = backend.Allocate(sizeof(float) * batch * config.vocab_size);
    auto host = logits.ok() ? backend.AllocateHost(logits->bytes())
                            : absl::StatusOr<HostBuffer>(logits.status());
    if (host.ok()) {
      std::vector<double> copy_ms;
      for (int rep = 0; rep < 10; ++rep) {
        const auto c0 = std::chrono::steady_clock::now();
        if (!backend.CopyToHost(host->data(), logits->data(), logits->bytes()).ok()) break;
        copy_ms.push_back(
            std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - c0)
                .count());
      }
      if (!copy_ms.empty()) {
        std::printf("# logits to page-locked host memory at batch %d (%.1f MB): %.3f ms\n", batch,
                    logits->bytes() / 1e6, Median(copy_ms));
      }
    }
    StepPlan release;
    release.releases = all;
    for (const std::unique_ptr<Engine>& engine : engines) (void)engine->Step(release);
  }
  for (size_t e = 0; e < engines.size(); ++e) {
    if (!graph_modes[e]) continue;  // a step whose capture failed ran op by op: say so
    const DecodeGraphStats g = engines[e]->graph_stats();
    std::printf("# cuda graphs: %lld captured, %lld replays, %lld capture failures, %lld evicted\n",
                static_cast<long long>(g.captures), static_cast<long long>(g.replays),
                static_cast<long long>(g.capture_failures), static_cast<long long>(g.evictions));
  }
  json += "]\n";
  if (!json_path.empty()) std::ofstream(json_path) << json;
  return 0;
}

}  // namespace
}  // namespace asynctls

int main(int argc, char** argv) { return asynctls::Main(argc, argv); }
