// Picks the next token from one row of logits: greedy, or temperature + top-k + top-p with a
// random draw fixed by (seed, position), so a replay yields the same tokens. Thread-safe.
#pragma once

#include <cstdint>

#include "asynctls/runtime/step_plan.h"

namespace asynctls {

struct Sample {
  int32_t token = 0;
  float logprob = 0.f;  // log-probability of the token under the (tempered) distribution
};

Sample SampleToken(const float* logits, int32_t vocab_size, const SamplingParams& params,
                   int32_t position);

}  // namespace asynctls
