#include "asynctls/runtime/sampler.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

namespace asynctls {
namespace {

uint64_t SplitMix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

}  // namespace

Sample SampleToken(const float* logits, int32_t vocab_size, const SamplingParams& params,
                   int32_t position) {
  // Greedy: the first maximum (lowest id on ties), log-softmax for the logprob.
  if (params.temperature <= 0.f) {
    int32_t best = 0;
    for (int32_t i = 1; i < vocab_size; ++i)
      if (logits[i] > logits[best]) best = i;
    double sum = 0;
    for (int32_t i = 0; i < vocab_size; ++i) sum += std::exp(static_cast<double>(logits[i] - logits[best]));
    return {best, static_cast<float>(-std::log(sum))};
  }
  std::vector<int32_t> ids(vocab_size);
  std::iota(ids.begin(), ids.end(), 0);
  auto by_logit = [&](int32_t a, int32_t b) { return logits[a] > logits[b] || (logits[a] == logits[b] && a < b); };
  int32_t keep = vocab_size;
  if (params.top_k > 0 && params.top_k < vocab_size) {
    keep = params.top_k;
    std::partial_sort(ids.begin(), ids.begin() + keep, ids.end(), by_logit);
  } else {
    std::sort(ids.begin(), ids.end(), by_logit);
  }
  const double inv_t = 1.0 / params.temperature;
  const double max_logit = logits[ids[0]];
  std::vector<double> probs(keep);
  double total = 0;
  for (int32_t i = 0; i < keep; ++i) {
    probs[i] = std::exp((logits[ids[i]] - max_logit) * inv_t);
    total += probs[i];
  }
  // top-p: the smallest prefix (by probability) whose mass reaches top_p.
  if (params.top_p < 1.f) {
    double mass = 0;
    int32_t cut = keep;
    for (int32_t i = 0; i < keep; ++i) {
      mass += probs[i] / total;
      if (mass >= params.top_p) {
        cut = i + 1;
        break;
      }
    }
    keep = cut;
    total = std::accumulate(probs.begin(), probs.begin() + keep, 0.0);
  }
  const uint64_t bits = SplitMix64(params.seed ^ SplitMix64(static_cast<uint64_t>(position) + 1));
  const double u = static_cast<double>(bits >> 11) * (1.0 / 9007199254740992.0) * total;
  double acc = 0;
  int32_t chosen = keep - 1;
  for (int32_t i = 0; i < keep; ++i) {
    acc += probs[i];
    if (u < acc) {
      chosen = i;
      break;
    }
  }
  return {ids[chosen], static_cast<float>(std::log(probs[chosen] / total))};
}

}  // namespace asynctls
