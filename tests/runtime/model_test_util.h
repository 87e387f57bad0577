// Helpers for tests that run the real SmolLM2 model: where it is, and a greedy/prefill driver
// over an Engine through StepPlans (the path the coordinator uses).
#pragma once

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <memory>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "asynctls/runtime/engine.h"
#include "asynctls/runtime/weights.h"

namespace asynctls::testing {

// $ASYNCTLS_MODEL_PATH, else the CLI's cache location; empty when absent.
inline std::string SmolLm2Path() {
  if (const char* p = std::getenv("ASYNCTLS_MODEL_PATH"); p && *p && std::filesystem::exists(p)) return p;
  std::string cache;
  if (const char* d = std::getenv("ASYNCTLS_CACHE_DIR"); d && *d) {
    cache = d;
  } else if (const char* h = std::getenv("HOME")) {
    cache = std::string(h) + "/.cache/asynctls";
  }
  const std::string p = cache + "/SmolLM2-135M-Instruct.Q4_1.gguf";
  return std::filesystem::exists(p) ? p : "";
}

inline nlohmann::json LoadReference() {
  std::ifstream in(std::string(ASYNCTLS_SOURCE_DIR) + "/tests/data/reference/smollm2_logits.json");
  return nlohmann::json::parse(in);
}

// A plan that prefills `prompt` whole as each of `seq_ids`, sampling the next token.
inline StepPlan PrefillPlan(const std::vector<uint64_t>& seq_ids, const std::vector<int32_t>& prompt) {
  StepPlan plan;
  for (uint64_t id : seq_ids) {
    PrefillChunk chunk;
    chunk.seq_id = id;
    chunk.tokens = prompt;
    chunk.sample = true;
    plan.prefills.push_back(chunk);
  }
  return plan;
}

// Prefills `prompt` as sequence `seq_id` and returns the sampled first token.
inline absl::StatusOr<SampledToken> Prefill(Engine& engine, uint64_t seq_id, const std::vector<int32_t>& prompt) {
  auto result = engine.Step(PrefillPlan({seq_id}, prompt));
  if (!result.ok()) return result.status();
  if (!result->errors.empty()) return absl::InternalError(result->errors[0].message);
  return result->tokens.at(0);
}

// Greedy generation of `n` tokens after `prompt`, one step at a time (two-level sparse decode
// with `tls`); releases the sequence.
inline absl::StatusOr<std::vector<int32_t>> Greedy(Engine& engine, const std::vector<int32_t>& prompt, int n,
                                                   uint64_t seq_id = 1, bool tls = false) {
  std::vector<int32_t> out;
  auto first = Prefill(engine, seq_id, prompt);
  if (!first.ok()) return first.status();
  out.push_back(first->token);
  while (static_cast<int>(out.size()) < n) {
    StepPlan plan;
    plan.decodes.push_back({seq_id, out.back(), static_cast<int32_t>(prompt.size() + out.size() - 1), {}, tls});
    auto result = engine.Step(plan);
    if (!result.ok()) return result.status();
    if (!result->errors.empty()) return absl::InternalError(result->errors[0].message);
    out.push_back(result->tokens.at(0).token);
  }
  StepPlan release;
  release.releases.push_back(seq_id);
  if (auto r = engine.Step(release); !r.ok()) return r.status();
  return out;
}

}  // namespace asynctls::testing
