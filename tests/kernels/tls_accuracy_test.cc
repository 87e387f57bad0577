// The accuracy harness (tls_accuracy_util.h) at small sizes: its metrics on cases with known
// answers, needles found by the channel-index methods, and the capture / channel file readers.
#include <gtest/gtest.h>
#include <unistd.h>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "kernels/tls_accuracy_util.h"

namespace asynctls::kernels::testing {
namespace {

TlsPolicy Policy(TlsMode mode, TlsLag lag, int k_b, int k_t) {
  TlsPolicy p;
  p.mode = mode;
  p.lag = lag;
  p.block_budget = k_b;
  p.token_budget = k_t;
  return p;
}

TEST(TlsAccuracy, DenseIsExact) {
  const AccuracyInput in = MakeGaussianInput(1000, 3, 4, 2, 64, 32, 1);
  const AccuracyHarness h(in);
  const AccuracyMetrics m = h.Evaluate(Policy(TlsMode::kDense, TlsLag::kSameStep, 0, 256));
  EXPECT_EQ(m.samples, 3 * 2);
  EXPECT_NEAR(m.mass_recall, 1.0, 1e-5);
  EXPECT_DOUBLE_EQ(m.topk_recall, 1.0);
  EXPECT_LT(m.out_rel_err, 1e-5);  // the operator's fp32 vs the harness's double
  EXPECT_NEAR(m.selected, (1000 + 963 + 926) / 3.0, 1e-9);
}

TEST(TlsAccuracy, FullBudgetKeepsEverything) {
  const AccuracyInput in = MakeGaussianInput(700, 2, 6, 2, 64, 16, 2);
  const AccuracyHarness h(in);
  for (TlsMode mode : {TlsMode::kTokenOnly, TlsMode::kBlockOnly, TlsMode::kTwoLevel}) {
    const AccuracyMetrics m = h.Evaluate(Policy(mode, TlsLag::kSameStep, 64, 1024));
    EXPECT_NEAR(m.mass_recall, 1.0, 1e-5) << static_cast<int>(mode);
    EXPECT_DOUBLE_EQ(m.topk_recall, 1.0);
    EXPECT_LT(m.out_rel_err, 1e-5);
  }
}

TEST(TlsAccuracy, ExactTopKScoresOne) {
  const AccuracyInput in = MakeGaussianInput(640, 2, 4, 2, 64, 32, 3);
  const AccuracyHarness h(in);
  const int k = 50;
  const int max_pos = k;
  std::vector<int32_t> positions(size_t(2) * 2 * max_pos), counts(4, k);
  for (int b = 0; b < 2; ++b)
    for (int g = 0; g < 2; ++g) {
      int n = 0;
      for (int j = 0; j < in.lens[b]; ++j)
        if (h.Rank(b, g, j) < k) positions[(size_t(b) * 2 + g) * max_pos + n++] = j;
      ASSERT_EQ(n, k);
    }
  std::vector<float> out(size_t(2) * 4 * 64, 0.f);
  const AccuracyMetrics m = h.Score(k, positions, counts, max_pos, out);
  EXPECT_DOUBLE_EQ(m.topk_recall, 1.0);
  EXPECT_DOUBLE_EQ(m.selected, k);
  EXPECT_GT(m.mass_recall, 0.0);
  EXPECT_LT(m.mass_recall, 1.0);
  EXPECT_NEAR(m.out_rel_err, 1.0, 1e-9);  // a zero output is 100% off
}

TEST(TlsAccuracy, BudgetsAndMethodsOnGaussian) {
  const AccuracyInput in = MakeGaussianInput(4096, 2, 8, 2, 64, 32, 4);
  const AccuracyHarness h(in);
  for (const AccuracyMethod& method : AccuracyMethods(false)) {
    double last_mass = 0;
    for (int k_t : {128, 512, 2048}) {
      const AccuracyMetrics m = h.Evaluate(Policy(method.mode, method.lag, 16, k_t));
      EXPECT_GT(m.mass_recall, last_mass - 1e-9) << method.name << " k_t " << k_t;
      EXPECT_GT(m.topk_recall, 0.0);
      EXPECT_LE(m.topk_recall, 1.0);
      EXPECT_LE(m.mass_recall, 1.0 + 1e-6);
      EXPECT_LE(m.selected, k_t + 64 + 128 + 1e-9);  // sink + budget + recent
      last_mass = m.mass_recall;
    }
  }
}

TEST(TlsAccuracy, NeedlesAreSelected) {
  const AccuracyInput in = MakeNeedleInput(16384, 2, 8, 2, 64, 32, 8, 12.f, 5);
  ASSERT_EQ(in.needles.size(), 8u);
  const AccuracyHarness h(in);
  AccuracyMetrics by_method[4];
  int i = 0;
  for (const AccuracyMethod& method : AccuracyMethods(false)) {
    by_method[i] = h.Evaluate(Policy(method.mode, method.lag, 32, 256));
    std::printf("%-10s needle %.3f mass %.3f topk %.3f err %.3f\n", method.name,
                by_method[i].needle_recall, by_method[i].mass_recall, by_method[i].topk_recall,
                by_method[i].out_rel_err);
    ++i;
  }
  // TLS can lose a needle whose block misses the top k_b: Quest-style bounds are loose on
  // random 64-dim keys (quest alone finds about half of them here).
  EXPECT_GE(by_method[0].needle_recall, 0.9);         // tls
  EXPECT_DOUBLE_EQ(by_method[1].needle_recall, 1.0);  // token-only
  EXPECT_GT(by_method[0].mass_recall, 0.5);
  EXPECT_GT(by_method[0].mass_recall, by_method[2].mass_recall);  // tls beats quest here
}

TEST(TlsAccuracy, LagVariantRuns) {
  AccuracyInput in = MakeGaussianInput(2048, 2, 4, 2, 64, 32, 6);
  in.q_prev = in.q;  // a repeated query: M_{t-1} differs from M_t only by the newest block
  const AccuracyHarness h(in);
  const AccuracyMetrics same = h.Evaluate(Policy(TlsMode::kTwoLevel, TlsLag::kSameStep, 8, 256));
  const AccuracyMetrics lag = h.Evaluate(Policy(TlsMode::kTwoLevel, TlsLag::kOneStep, 8, 256));
  EXPECT_NEAR(lag.mass_recall, same.mass_recall, 0.05);
  EXPECT_NEAR(lag.topk_recall, same.topk_recall, 0.05);
}

TEST(TlsAccuracy, CaptureFileRoundTrip) {
  const std::string path = (std::filesystem::temp_directory_path() /
                            ("tls_acc_capture_" + std::to_string(::getpid()) + ".bin"))
                               .string();
  const int L = 2, T = 130, H = 4, KV = 2, hd = 8, NQ = 5;
  std::vector<uint16_t> k(size_t(T) * KV * hd), v(k.size());
  std::vector<float> q(size_t(NQ) * H * hd);
  {
    std::ofstream out(path, std::ios::binary);
    const int32_t header[8] = {L, T, H, KV, hd, NQ, 0, 0};
    out.write("ATLSQKV1", 8);
    out.write(reinterpret_cast<const char*>(header), sizeof(header));
    for (int l = 0; l < L; ++l) {
      for (size_t i = 0; i < k.size(); ++i) {
        k[i] = FloatToBf16(float(l * 1000 + i)).bits;
        v[i] = FloatToBf16(-float(i)).bits;
      }
      for (size_t i = 0; i < q.size(); ++i) q[i] = float(l) + 0.5f * i;
      out.write(reinterpret_cast<const char*>(k.data()), k.size() * 2);
      out.write(reinterpret_cast<const char*>(v.data()), v.size() * 2);
      out.write(reinterpret_cast<const char*>(q.data()), q.size() * 4);
    }
  }
  QkvCaptureFile file;
  std::string error;
  ASSERT_TRUE(file.Open(path, &error)) << error;
  EXPECT_EQ(file.num_layers, L);
  EXPECT_EQ(file.num_queries, NQ);
  const AccuracyInput in = file.Layer(1, {T - 1, T - 3}, std::vector<int32_t>(KV * 8, 0), 8);
  EXPECT_EQ(in.lens, (std::vector<int32_t>{T, T - 2}));
  EXPECT_EQ(Bf16ToFloat(in.k[3]), RoundToBf16(1003.f));
  EXPECT_EQ(in.q[0], 1.f + 0.5f * (4 * H * hd));       // query row 4 = position T - 1
  EXPECT_EQ(in.q_prev[0], 1.f + 0.5f * (3 * H * hd));  // position T - 2
  EXPECT_EQ(in.q[H * hd], 1.f + 0.5f * (2 * H * hd));  // position T - 3
  std::filesystem::resize_file(path, 100);
  QkvCaptureFile truncated;
  EXPECT_FALSE(truncated.Open(path, &error));
  std::filesystem::remove(path);
}

TEST(TlsAccuracy, ParsesChannelSetsJson) {
  const std::string json = R"({
  "format": "asynctls-channels-v1", "model": "m", "source": "a 1, 2 text", "num_tokens": 12,
  "num_layers": 2, "num_q_heads": 2, "num_kv_heads": 1, "head_dim": 16, "num_channels": 8,
  "channels": [ [ [0, 1, 2, 3, 4, 5, 6, 7] ], [ [8, 9, 10, 11, 12, 13, 14, 15] ] ]
})";
  int layers = 0, kv = 0, dc = 0;
  std::string error;
  const std::vector<int32_t> c = ParseChannelSetsJson(json, &layers, &kv, &dc, &error);
  ASSERT_EQ(c.size(), 16u) << error;
  EXPECT_EQ(layers, 2);
  EXPECT_EQ(kv, 1);
  EXPECT_EQ(dc, 8);
  EXPECT_EQ(c[8], 8);
  EXPECT_TRUE(ParseChannelSetsJson("{}", &layers, &kv, &dc, &error).empty());
}

}  // namespace
}  // namespace asynctls::kernels::testing
