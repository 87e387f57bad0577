#include "asynctls/runtime/sampler.h"

#include <algorithm>
#include <bit>
#include <cmath>
#include <limits>
#include <vector>

namespace asynctls {
namespace {

uint64_t SplitMix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

// e^x for x <= 0 (0 below e^-87 and for NaN), relative error ~2e-7: 2^(x log2 e) as 2^n times
// a degree-6 polynomial of the fraction, in plain float arithmetic that the compiler vectorizes
// (libm's exp is a call per value: 150K of them per vocabulary row took ~1 ms) and whose bits
// do not depend on the machine's libm, so a seeded draw replays on any host of the same build.
inline float ExpNonPositive(float x) {
  constexpr float kLog2E = 1.44269504088896341f;
  constexpr float kRoundMagic = 12582912.f;  // 1.5 * 2^23: adding it rounds to an integer
  // No clamp and no branch: below -87 (and for NaN) the arithmetic makes garbage that the mask
  // at the end clears (a select there, or a clamp here, kept the loop from vectorizing: the
  // compiler may not hoist possibly trapping float operations out of a branch).
  const float t = x * kLog2E;
  const float shifted = t + kRoundMagic;
  const float n = shifted - kRoundMagic;
  const float f = t - n;  // [-0.5, 0.5]
  float p = 1.5403530e-4f;
  p = p * f + 1.3333558e-3f;
  p = p * f + 9.6181291e-3f;
  p = p * f + 5.5504109e-2f;
  p = p * f + 2.4022651e-1f;
  p = p * f + 6.9314718e-1f;
  p = p * f + 1.f;
  const float scale = std::bit_cast<float>((std::bit_cast<uint32_t>(shifted) << 23) + 0x3F800000u);
  const uint32_t keep = x > -87.f ? 0xffffffffu : 0u;  // NaN compares false: 0
  return std::bit_cast<float>(std::bit_cast<uint32_t>(p * scale) & keep);
}

// Weights w[i] = e^((logits[i] - max) * inv_t) and their sum (double, eight partial sums in a
// fixed order: the same total for the same row everywhere).
double Weights(const float* logits, int32_t n, float max_logit, float inv_t, float* w) {
  for (int32_t i = 0; i < n; ++i) w[i] = ExpNonPositive((logits[i] - max_logit) * inv_t);
  double part[8] = {};
  int32_t i = 0;
  for (; i + 8 <= n; i += 8) {
    for (int l = 0; l < 8; ++l) part[l] += w[i + l];
  }
  for (int l = 0; i < n; ++i, ++l) part[l] += w[i];
  return ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7]));
}

// Candidates in sampling order: higher logit first, then lower id (`logits` without NaN: a
// strict weak order).
struct ByLogit {
  const float* logits;
  bool operator()(int32_t a, int32_t b) const {
    return logits[a] > logits[b] || (logits[a] == logits[b] && a < b);
  }
};

// `logits`, or (when a logit is NaN, from a broken model) a copy with NaN as -inf in `clean`.
const float* WithoutNan(const float* logits, int32_t n, std::vector<float>& clean) {
  bool nan = false;
  for (int32_t i = 0; i < n; ++i) nan |= logits[i] != logits[i];
  if (!nan) return logits;
  clean.assign(logits, logits + n);
  for (float& x : clean) x = x == x ? x : -std::numeric_limits<float>::infinity();
  return clean.data();
}

// The first maximum (lowest id on ties; NaN never wins unless every logit is NaN): the max in
// eight lanes (a loop the compiler vectorizes), then the first index holding it.
int32_t FirstMax(const float* logits, int32_t n) {
  float lane[8];
  for (float& m : lane) m = -std::numeric_limits<float>::infinity();
  int32_t i = 0;
  for (; i + 8 <= n; i += 8) {
    for (int l = 0; l < 8; ++l) lane[l] = logits[i + l] > lane[l] ? logits[i + l] : lane[l];
  }
  float m = -std::numeric_limits<float>::infinity();
  for (; i < n; ++i) m = logits[i] > m ? logits[i] : m;
  for (const float x : lane) m = x > m ? x : m;
  for (i = 0; i < n; ++i) {
    if (logits[i] == m) return i;
  }
  return 0;
}

}  // namespace

Sample SampleToken(const float* logits, int32_t vocab_size, const SamplingParams& params,
                   int32_t position) {
  const int32_t best = FirstMax(logits, vocab_size);
  const float max_logit = logits[best];
  thread_local std::vector<float> w;
  w.resize(static_cast<size_t>(vocab_size));
  if (params.temperature <= 0.f) {  // greedy; the logprob from the log-softmax
    const double total = Weights(logits, vocab_size, max_logit, 1.f, w.data());
    return {best, static_cast<float>(-std::log(total))};
  }
  const float inv_t = static_cast<float>(1.0 / params.temperature);
  thread_local std::vector<float> clean;
  const ByLogit by_logit{WithoutNan(logits, vocab_size, clean)};
  // The candidates: every token (drawn in id order), or ids[0, keep) in sampling order: the
  // top_k best, then top-p's smallest prefix whose mass reaches top_p. Linear passes and sorts
  // of the few tokens that can be in that prefix, never of the whole vocabulary (std::sort of
  // 150K ids took ~19 ms per row).
  thread_local std::vector<int32_t> ids;
  bool every_token = true;
  int32_t keep = vocab_size;
  double total = 0;
  if (params.top_k > 0 && params.top_k < vocab_size) {  // weights of the top_k only
    keep = params.top_k;
    ids.resize(static_cast<size_t>(vocab_size));
    for (int32_t i = 0; i < vocab_size; ++i) ids[i] = i;
    std::partial_sort(ids.begin(), ids.begin() + keep, ids.end(), by_logit);
    every_token = false;
    for (int32_t i = 0; i < keep; ++i) {
      const int32_t id = ids[i];
      w[id] = ExpNonPositive((logits[id] - max_logit) * inv_t);
      total += w[id];
    }
  } else {
    total = Weights(logits, vocab_size, max_logit, inv_t, w.data());
  }
  if (params.top_p < 1.f) {
    const double target = static_cast<double>(params.top_p) * total;
    if (every_token) {
      // The tokens of weight >= tau are a prefix of sampling order (the weight does not fall as
      // the logit rises; the best token weighs 1): lower tau until their mass reaches target.
      for (int step = 1;; ++step) {
        const float tau = step < 16 ? std::ldexp(1.f, -8 * step) : 0.f;
        ids.clear();
        double mass = 0;
        for (int32_t i = 0; i < vocab_size; ++i) {
          if (w[i] >= tau) {
            ids.push_back(i);
            mass += w[i];
          }
        }
        if (mass >= target || tau == 0.f) break;
      }
      std::sort(ids.begin(), ids.end(), by_logit);
      keep = static_cast<int32_t>(ids.size());
      every_token = false;
    }
    double mass = 0;
    int32_t i = 0;
    for (; i < keep && mass < target; ++i) mass += w[ids[i]];
    keep = std::max(i, 1);
    total = 0;
    for (i = 0; i < keep; ++i) total += w[ids[i]];
  }
  auto candidate = [&](int32_t i) { return every_token ? i : ids[i]; };
  // The draw: u in [0, total), then the first candidate whose cumulative weight passes it.
  const uint64_t bits = SplitMix64(params.seed ^ SplitMix64(static_cast<uint64_t>(position) + 1));
  const double u = static_cast<double>(bits >> 11) * (1.0 / 9007199254740992.0) * total;
  double acc = 0;
  int32_t chosen = -1;
  for (int32_t i = 0; i < keep; ++i) {
    acc += w[candidate(i)];
    if (u < acc) {
      chosen = candidate(i);
      break;
    }
  }
  if (chosen < 0) {  // rounding left u at the very top: the last candidate with weight
    chosen = best;
    for (int32_t i = keep - 1; i >= 0; --i) {
      if (w[candidate(i)] > 0) {
        chosen = candidate(i);
        break;
      }
    }
  }
  return {chosen, static_cast<float>(std::log(w[chosen] / total))};
}

}  // namespace asynctls
