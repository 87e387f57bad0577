// A whole decode step of a Qwen3-8B-shaped model (36 layers, hidden 4096, 32/8 heads, d 128,
// FFN 12288, vocab 151936) with seeded random bf16 weights generated on the GPU, dense
// attention over a staged KV cache, next to the step's byte floor (weights + KV read once).
//
//   decode_step_bench [--device cuda] [--context 32768] [--batches 1,8] [--steps 20] [--json F]
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <string>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_split.h"
#include "asynctls/runtime/engine.h"

namespace asynctls {
namespace {

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
  c.max_context = 131072;
  c.rms_eps = 1e-6f;
  c.rope_theta = 1000000.f;
  c.rotary_dim = 128;
  c.rope_style = kernels::RopeStyle::kHalf;
  c.qk_norm = true;
  c.tied_embeddings = false;
  return c;
}

// Bytes one decode step must read: every GEMM weight once (bf16), the LM head, the norms,
// and each sequence's K and V (bf16) in every layer.
double StepBytes(const ModelConfig& c, int batch, int context) {
  const double hd = c.head_dim, h = c.hidden_size;
  const double per_layer = h * (c.num_q_heads * hd) + 2 * h * (c.num_kv_heads * hd) + (c.num_q_heads * hd) * h +
                           3 * h * c.ffn_size;
  const double weights = 2.0 * (c.num_layers * per_layer + double(c.vocab_size) * h);
  const double kv = 2.0 * 2.0 * c.num_layers * c.num_kv_heads * hd * double(context) * batch;
  return weights + kv;
}

int Main(int argc, char** argv) {
  std::string device = "cuda", json_path;
  int context = 32768, steps = 20;
  std::vector<int> batches = {1, 8};
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string f = argv[i], v = argv[i + 1];
    if (f == "--device") device = v;
    else if (f == "--context") context = std::atoi(v.c_str());
    else if (f == "--steps") steps = std::atoi(v.c_str());
    else if (f == "--json") json_path = v;
    else if (f == "--batches") {
      batches.clear();
      for (auto s : absl::StrSplit(v, ',')) batches.push_back(std::atoi(std::string(s).c_str()));
    }
  }
  const ModelConfig config = Qwen3_8B();
  const int max_batch = *std::max_element(batches.begin(), batches.end());
  EngineOptions options;
  options.device = device;
  options.weight_dtype = kernels::DType::kBF16;
  options.max_batch_seqs = std::max(max_batch, 8);
  options.max_batch_tokens = 512;
  const int blocks_per_seq = (context + 1 + kernels::kKvBlockSize - 1) / kernels::kKvBlockSize;
  options.kv_cache_bytes = int64_t{blocks_per_seq + 1} * max_batch *
                           KvCache::BytesPerBlock(config.num_layers, config.num_kv_heads, config.head_dim);
  auto t0 = std::chrono::steady_clock::now();
  auto engine_or = Engine::CreateRandom(config, 1234, options);
  if (!engine_or.ok()) {
    std::fprintf(stderr, "engine: %s\n", engine_or.status().ToString().c_str());
    return 1;
  }
  Engine& engine = **engine_or;
  KvCache& cache = engine.mutable_kv_cache();
  const double load_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  // Stage every sequence's KV directly (random bf16), as if `context` tokens were prefilled.
  const int64_t pool_elems = int64_t{cache.num_blocks()} * config.num_kv_heads * kernels::kKvBlockSize * config.head_dim;
  for (int l = 0; l < config.num_layers; ++l) {
    for (void* pool : {cache.k_pool(l), cache.v_pool(l)}) {
      auto s = engine.backend().RandomFill({pool, kernels::DType::kBF16, pool_elems, uint64_t(l) * 2 + (pool == cache.k_pool(l)), 1.f, 0.f});
      if (!s.ok()) {
        std::fprintf(stderr, "fill: %s\n", s.ToString().c_str());
        return 1;
      }
    }
  }
  std::printf("# %s on %s, load %.1f s, context %d, bf16 weights, dense attention\n", config.name.c_str(),
              engine.Info().device.c_str(), load_s, context);
  std::printf("%6s %8s %10s %10s %12s %10s %8s\n", "batch", "context", "step_ms", "tok/s", "floor_ms", "GB/s", "x_floor");
  std::string json = "[";
  for (int batch : batches) {
    std::vector<uint64_t> ids;
    for (int b = 0; b < batch; ++b) {
      const uint64_t id = 1000 + b;
      if (!cache.Reserve(id, context + steps + 4).ok()) {
        std::fprintf(stderr, "KV cache too small for batch %d\n", batch);
        return 1;
      }
      cache.SetSeqLen(id, context);
      ids.push_back(id);
    }
    std::vector<double> times;
    int pos = context;
    for (int s = 0; s < steps + 3; ++s, ++pos) {
      StepPlan plan;
      for (uint64_t id : ids) plan.decodes.push_back({id, 42, pos, {}});
      auto r = engine.Step(plan);
      if (!r.ok() || !r->errors.empty()) {
        std::fprintf(stderr, "step failed: %s\n", r.ok() ? r->errors[0].message.c_str() : r.status().ToString().c_str());
        return 1;
      }
      if (s >= 3) times.push_back(r->step_ms);  // the first steps warm up cuBLASLt plans
    }
    std::sort(times.begin(), times.end());
    const double ms = times[times.size() / 2];
    const double bytes = StepBytes(config, batch, context);
    const double floor_ms = bytes / 4.3e12 * 1e3;
    std::printf("%6d %8d %10.3f %10.1f %12.3f %10.0f %8.2f\n", batch, context, ms, batch * 1000.0 / ms, floor_ms,
                bytes / (ms * 1e-3) / 1e9, ms / floor_ms);
    char row[256];
    std::snprintf(row, sizeof(row), "%s{\"batch\":%d,\"context\":%d,\"step_ms\":%.4f,\"floor_ms\":%.4f,\"bytes\":%.0f}",
                  json.size() > 1 ? "," : "", batch, context, ms, floor_ms, bytes);
    json += row;
    StepPlan release;
    release.releases = ids;
    (void)engine.Step(release);
  }
  json += "]\n";
  if (!json_path.empty()) std::ofstream(json_path) << json;
  return 0;
}

}  // namespace
}  // namespace asynctls

int main(int argc, char** argv) { return asynctls::Main(argc, argv); }
