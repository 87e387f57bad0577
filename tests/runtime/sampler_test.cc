#include "asynctls/runtime/sampler.h"

#include <gtest/gtest.h>

#include <map>
#include <vector>

namespace asynctls {
namespace {

TEST(SamplerTest, GreedyTakesTheFirstMaximum) {
  std::vector<float> logits = {0.f, 3.f, 1.f, 3.f};
  Sample s = SampleToken(logits.data(), 4, SamplingParams{}, 0);
  EXPECT_EQ(s.token, 1);
  EXPECT_LT(s.logprob, 0.f);
}

TEST(SamplerTest, SameSeedAndPositionReplays) {
  std::vector<float> logits(100);
  for (int i = 0; i < 100; ++i) logits[i] = 0.05f * i;
  SamplingParams p;
  p.temperature = 1.f;
  p.seed = 42;
  for (int pos = 0; pos < 20; ++pos)
    EXPECT_EQ(SampleToken(logits.data(), 100, p, pos).token, SampleToken(logits.data(), 100, p, pos).token);
}

TEST(SamplerTest, TopKAndTopPRestrictTheCandidates) {
  std::vector<float> logits = {5.f, 4.f, 3.f, 0.f, 0.f, 0.f};
  SamplingParams p;
  p.temperature = 1.f;
  p.top_k = 2;
  for (int pos = 0; pos < 200; ++pos) EXPECT_LT(SampleToken(logits.data(), 6, p, pos).token, 2);
  p.top_k = 0;
  p.top_p = 0.5f;  // token 0 alone holds > 50% of the mass
  for (int pos = 0; pos < 200; ++pos) EXPECT_EQ(SampleToken(logits.data(), 6, p, pos).token, 0);
}

TEST(SamplerTest, TemperatureSamplingFollowsTheDistribution) {
  std::vector<float> logits = {std::log(0.7f), std::log(0.2f), std::log(0.1f)};
  SamplingParams p;
  p.temperature = 1.f;
  p.seed = 7;
  std::map<int, int> counts;
  const int n = 20000;
  for (int pos = 0; pos < n; ++pos) counts[SampleToken(logits.data(), 3, p, pos).token]++;
  EXPECT_NEAR(counts[0] / double(n), 0.7, 0.02);
  EXPECT_NEAR(counts[1] / double(n), 0.2, 0.02);
  EXPECT_NEAR(counts[2] / double(n), 0.1, 0.02);
}

}  // namespace
}  // namespace asynctls
