// Helpers for tests that run the real SmolLM2 model: where it is, and a greedy/prefill driver
// over an Engine through StepPlans (the path the coordinator uses).
#pragma once

#include <bit>
#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
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

// Runs `plan` on `a` and on `b` (both made with keep_logits) and returns a's sampled tokens; an
// error unless both ran it without dropping a sequence and sampled the same tokens from logits
// identical bit for bit.
inline absl::StatusOr<std::vector<SampledToken>> StepBoth(Engine& a, Engine& b,
                                                          const StepPlan& plan) {
  auto ra = a.Step(plan);
  if (!ra.ok()) return ra.status();
  auto rb = b.Step(plan);
  if (!rb.ok()) return rb.status();
  for (const StepResult* r : {&*ra, &*rb}) {
    if (!r->errors.empty()) return absl::InternalError(r->errors[0].message);
  }
  const std::vector<float>& la = a.sampled_logits();
  const std::vector<float>& lb = b.sampled_logits();
  if (la.size() != lb.size()) {
    return absl::InternalError(absl::StrCat(la.size(), " vs ", lb.size(), " sampled logits"));
  }
  size_t differ = 0, first = 0;
  for (size_t i = 0; i < la.size(); ++i) {
    if (std::bit_cast<uint32_t>(la[i]) == std::bit_cast<uint32_t>(lb[i])) continue;
    if (differ++ == 0) first = i;
  }
  if (differ > 0) {
    return absl::InternalError(absl::StrCat(differ, " of ", la.size(),
                                            " sampled logits differ in their bits, the first at ",
                                            first, ": ", la[first], " vs ", lb[first]));
  }
  if (ra->tokens.size() != rb->tokens.size()) {
    return absl::InternalError("the engines sampled different numbers of tokens");
  }
  for (size_t i = 0; i < ra->tokens.size(); ++i) {
    if (ra->tokens[i].seq_id != rb->tokens[i].seq_id ||
        ra->tokens[i].token != rb->tokens[i].token) {
      return absl::InternalError(absl::StrCat("sampled token ", i, " differs"));
    }
  }
  return ra->tokens;
}

}  // namespace asynctls::testing
