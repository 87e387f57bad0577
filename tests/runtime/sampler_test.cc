#include "asynctls/runtime/sampler.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <map>
#include <numeric>
#include <random>
#include <set>
#include <vector>

#include "asynctls/kernels/ref.h"

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

// A vocabulary-sized row like a model's: a long tail and a few strong candidates.
std::vector<float> ModelLikeLogits(int vocab, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> tail(0.f, 2.5f);
  std::vector<float> logits(vocab);
  for (float& x : logits) x = tail(rng);
  for (int i = 0; i < 20; ++i) logits[(i * 7919 + seed) % vocab] += 12.f - 0.5f * i;
  return logits;
}

TEST(SamplerTest, GreedyLogprobIsTheLogSoftmaxOfALargeVocabulary) {
  const std::vector<float> logits = ModelLikeLogits(151936, 1);
  const Sample s = SampleToken(logits.data(), 151936, SamplingParams{}, 0);
  const int best =
      static_cast<int>(std::max_element(logits.begin(), logits.end()) - logits.begin());
  EXPECT_EQ(s.token, best);
  double sum = 0;
  for (float x : logits) sum += std::exp(double{x} - logits[best]);
  EXPECT_NEAR(s.logprob, -std::log(sum), 1e-5);
}

// A GPU engine picks greedy rows with the backend's GreedyPick (the logits stay on the device):
// the same token as the host sampler's greedy pick, ties and NaN included, and the same logprob.
TEST(SamplerTest, GreedyPickOpAgreesWithTheSampler) {
  std::vector<float> logits;
  for (uint32_t seed : {3u, 4u, 5u}) {
    const std::vector<float> row = ModelLikeLogits(151936, seed);
    logits.insert(logits.end(), row.begin(), row.end());
  }
  const float nan = std::nanf("");
  logits[5] = nan;  // a NaN in row 0
  const int row1 = 151936, row2 = 2 * 151936;
  // Row 1: its max twice (the first wins); row 2: NaN at the front.
  const float top = *std::max_element(logits.begin() + row1, logits.begin() + row2);
  logits[row1 + 100] = top + 1.f;
  logits[row1 + 90000] = top + 1.f;
  logits[row2] = nan;
  std::vector<int32_t> token(3);
  std::vector<float> logprob(3);
  kernels::ref::GreedyPick({logits.data(), token.data(), logprob.data(), 3, 151936});
  for (int r = 0; r < 3; ++r) {
    const Sample s = SampleToken(logits.data() + int64_t{r} * 151936, 151936, SamplingParams{}, 0);
    EXPECT_EQ(token[r], s.token) << "row " << r;
    EXPECT_NEAR(logprob[r], s.logprob, 1e-5) << "row " << r;
  }
  EXPECT_EQ(token[1], 100);
}

// Top-p over a large vocabulary: every draw lies in the smallest prefix (by logit) whose
// probability reaches top_p, computed here by sorting everything; with top-k also within it.
TEST(SamplerTest, TopPDrawsStayInTheNucleusOfALargeVocabulary) {
  const int vocab = 151936;
  const std::vector<float> logits = ModelLikeLogits(vocab, 2);
  for (const auto [temperature, top_p] : {std::pair{0.7f, 0.5f}, std::pair{0.7f, 0.9f},
                                          std::pair{0.7f, 0.99f}, std::pair{1.5f, 0.9f}}) {
    std::vector<int> order(vocab);
    std::iota(order.begin(), order.end(), 0);
    std::sort(order.begin(), order.end(), [&](int a, int b) {
      return logits[a] > logits[b] || (logits[a] == logits[b] && a < b);
    });
    std::vector<double> p(vocab);
    double total = 0;
    for (int i = 0; i < vocab; ++i)
      total += p[i] = std::exp((logits[order[i]] - logits[order[0]]) / temperature);
    {
      std::set<int> nucleus;
      double mass = 0;
      for (int i = 0; i < vocab && mass < top_p * total * (1 - 1e-6); ++i) {
        nucleus.insert(order[i]);
        mass += p[i];
      }
      SamplingParams params;
      params.temperature = temperature;
      params.top_p = top_p;
      params.seed = 5;
      std::set<int> drawn;
      for (int pos = 0; pos < 100; ++pos) {
        const Sample s = SampleToken(logits.data(), vocab, params, pos);
        drawn.insert(s.token);
        ASSERT_LE(s.logprob, 0.f);
        if (pos % 10 == 0) {
          EXPECT_EQ(s.token, SampleToken(logits.data(), vocab, params, pos).token);  // replays
        }
      }
      // The boundary token may differ by rounding; all but at most one drawn token are inside.
      int outside = 0;
      for (int t : drawn) outside += nucleus.count(t) ? 0 : 1;
      EXPECT_LE(outside, 1) << "t " << temperature << " top_p " << top_p;
      params.top_k = 5;
      std::set<int> top5(order.begin(), order.begin() + 5);
      for (int pos = 0; pos < 50; ++pos) {
        EXPECT_TRUE(top5.count(SampleToken(logits.data(), vocab, params, pos).token));
      }
    }
  }
}

TEST(SamplerTest, NanLogitsAreNeverDrawnAndDoNotBreakTheSort) {
  std::vector<float> logits = {std::nanf(""), 1.f, std::nanf(""), 3.f, 2.f, std::nanf("")};
  EXPECT_EQ(SampleToken(logits.data(), 6, SamplingParams{}, 0).token, 3);
  SamplingParams p;
  p.temperature = 1.f;
  for (const int top_k : {0, 2}) {
    for (const float top_p : {1.f, 0.8f}) {
      p.top_k = top_k;
      p.top_p = top_p;
      for (int pos = 0; pos < 300; ++pos) {
        const int t = SampleToken(logits.data(), 6, p, pos).token;
        EXPECT_TRUE(t == 1 || t == 3 || t == 4) << t;
      }
    }
  }
  const float inf = std::numeric_limits<float>::infinity();
  std::vector<float> with_inf = {-inf, 0.5f, -inf};
  EXPECT_EQ(SampleToken(with_inf.data(), 3, p, 0).token, 1);
}

}  // namespace
}  // namespace asynctls
