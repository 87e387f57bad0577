// SmolLM2-135M-Instruct on the CPU backend against llama.cpp (tests/data/reference, made by
// tools/make_logits_reference.py): same top-1, top-5 overlap >= 4/5, max-abs difference
// reported. Also greedy "Paris", batched decode == one-by-one decode, and chunked prefill.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <numeric>

#include "asynctls/runtime/tokenizer.h"
#include "model_test_util.h"

namespace asynctls {
namespace {

class SmolLm2Test : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    const std::string path = testing::SmolLm2Path();
    if (path.empty()) return;
    auto file = WeightFile::Open(path);
    ASSERT_TRUE(file.ok()) << file.status();
    weights_ = std::move(*file).release();
    EngineOptions options;
    options.device = "cpu";
    options.keep_logits = true;
    options.kv_cache_bytes = int64_t{256} << 20;
    auto engine = Engine::Create(*weights_, options);
    ASSERT_TRUE(engine.ok()) << engine.status();
    engine_ = std::move(*engine).release();
  }
  static void TearDownTestSuite() {
    delete engine_;
    delete weights_;
    engine_ = nullptr;
    weights_ = nullptr;
  }
  void SetUp() override {
    if (!engine_) GTEST_SKIP() << "SmolLM2 GGUF not found (set ASYNCTLS_MODEL_PATH)";
  }
  static WeightFile* weights_;
  static Engine* engine_;
};
WeightFile* SmolLm2Test::weights_ = nullptr;
Engine* SmolLm2Test::engine_ = nullptr;

std::vector<int32_t> Ids(const nlohmann::json& j) { return j.get<std::vector<int32_t>>(); }

TEST_F(SmolLm2Test, NextTokenLogitsMatchLlamaCpp) {
  const nlohmann::json ref = testing::LoadReference();
  const int vocab = engine_->config().vocab_size;
  uint64_t seq = 100;
  for (const auto& c : ref["cases"]) {
    SCOPED_TRACE(c["name"].get<std::string>());
    const std::vector<int32_t> prompt = Ids(c["token_ids"]);
    auto first = testing::Prefill(*engine_, seq, prompt);
    ASSERT_TRUE(first.ok()) << first.status();
    const std::vector<float>& logits = engine_->sampled_logits();
    ASSERT_EQ(logits.size(), static_cast<size_t>(vocab));
    std::vector<int32_t> order(vocab);
    std::iota(order.begin(), order.end(), 0);
    std::partial_sort(order.begin(), order.begin() + 5, order.end(),
                      [&](int a, int b) { return logits[a] > logits[b]; });
    const std::vector<int32_t> ref_top = Ids(c["top_ids"]);
    EXPECT_EQ(order[0], ref_top[0]) << "top-1 differs";
    int overlap = 0;
    for (int i = 0; i < 5; ++i)
      overlap += std::count(ref_top.begin(), ref_top.begin() + 5, order[i]) > 0;
    EXPECT_GE(overlap, 4) << "top-5 overlap";
    double max_abs = 0;
    const auto ids = Ids(c["probe_ids"]);
    const auto vals = c["probe_logits"].get<std::vector<double>>();
    for (size_t i = 0; i < ids.size(); ++i) max_abs = std::max(max_abs, std::abs(logits[ids[i]] - vals[i]));
    const auto top_vals = c["top_logits"].get<std::vector<double>>();
    for (size_t i = 0; i < ref_top.size(); ++i)
      max_abs = std::max(max_abs, std::abs(logits[ref_top[i]] - top_vals[i]));
    std::printf("[ logits   ] %-12s %5zu tokens: top-1 %d (ours %.3f, llama.cpp %.3f), top-5 overlap %d/5, "
                "max |diff| %.3f over %zu logits\n",
                c["name"].get<std::string>().c_str(), prompt.size(), order[0], logits[order[0]],
                top_vals[0], overlap, max_abs, ids.size() + ref_top.size());
    EXPECT_LT(max_abs, 1.5) << "logits drift too far from llama.cpp";
    StepPlan release;
    release.releases.push_back(seq++);
    ASSERT_TRUE(engine_->Step(release).ok());
  }
  EXPECT_EQ(engine_->kv_cache().used_blocks(), 0);
}

TEST_F(SmolLm2Test, GreedyContinuationNamesParis) {
  const nlohmann::json ref = testing::LoadReference();
  const std::vector<int32_t> prompt = Ids(ref["cases"][0]["token_ids"]);  // "The capital of France is"
  auto out = testing::Greedy(*engine_, prompt, 4);
  ASSERT_TRUE(out.ok()) << out.status();
  auto tokenizer = Tokenizer::FromGguf(*weights_);
  ASSERT_TRUE(tokenizer.ok());
  const std::string text = (*tokenizer)->Decode(*out);
  std::printf("[ greedy   ] The capital of France is%s\n", text.c_str());
  EXPECT_NE(text.find("Paris"), std::string::npos) << text;
}

// EngineOptions::cuda_graphs on the CPU backend, which captures nothing: decode steps run op by
// op exactly as without the option (same logits, bit for bit) and no graph is ever tried.
TEST_F(SmolLm2Test, CudaGraphsOptionRunsOpByOpOnTheCpu) {
  EngineOptions options;
  options.device = "cpu";
  options.keep_logits = true;
  options.kv_cache_bytes = int64_t{64} << 20;
  options.cuda_graphs = true;
  auto graphed = Engine::Create(*weights_, options);
  ASSERT_TRUE(graphed.ok()) << graphed.status();
  const std::vector<int32_t> prompt = Ids(testing::LoadReference()["cases"][0]["token_ids"]);
  const uint64_t seq = 60;
  auto sampled = testing::StepBoth(*engine_, **graphed, testing::PrefillPlan({seq}, prompt));
  ASSERT_TRUE(sampled.ok()) << sampled.status();
  for (int step = 0; step < 6; ++step) {
    StepPlan plan;
    plan.decodes.push_back(
        {seq, sampled->at(0).token, static_cast<int32_t>(prompt.size()) + step, {}, false});
    sampled = testing::StepBoth(*engine_, **graphed, plan);
    ASSERT_TRUE(sampled.ok()) << "step " << step << ": " << sampled.status();
  }
  StepPlan release;
  release.releases.push_back(seq);
  ASSERT_TRUE(engine_->Step(release).ok());
  ASSERT_TRUE((*graphed)->Step(release).ok());
  const DecodeGraphStats stats = (*graphed)->graph_stats();
  EXPECT_EQ(stats.captures, 0);
  EXPECT_EQ(stats.replays, 0);
  EXPECT_EQ(stats.capture_failures, 0);
  EXPECT_EQ(stats.evictions, 0);
  EXPECT_EQ(stats.cached_graphs, 0);
}

// Several sequences of different lengths decoded in one batched step give the same tokens and
// nearly the same logits as each decoded alone.
TEST_F(SmolLm2Test, BatchedDecodeMatchesSingleSequences) {
  const nlohmann::json ref = testing::LoadReference();
  std::vector<std::vector<int32_t>> prompts;
  for (int i = 0; i < 3; ++i) prompts.push_back(Ids(ref["cases"][i]["token_ids"]));
  const int steps = 6;
  // One at a time.
  std::vector<std::vector<int32_t>> alone;
  for (const auto& p : prompts) {
    auto out = testing::Greedy(*engine_, p, steps, 7);
    ASSERT_TRUE(out.ok()) << out.status();
    alone.push_back(*out);
  }
  // Together: one step prefills all three, then each step decodes all three.
  StepPlan plan;
  for (size_t i = 0; i < prompts.size(); ++i) {
    PrefillChunk c;
    c.seq_id = 10 + i;
    c.tokens = prompts[i];
    c.sample = true;
    plan.prefills.push_back(c);
  }
  auto r = engine_->Step(plan);
  ASSERT_TRUE(r.ok()) << r.status();
  std::vector<std::vector<int32_t>> together(prompts.size());
  for (const auto& t : r->tokens) together[t.seq_id - 10].push_back(t.token);
  for (int s = 1; s < steps; ++s) {
    StepPlan d;
    for (size_t i = 0; i < prompts.size(); ++i)
      d.decodes.push_back({10 + i, together[i].back(), static_cast<int32_t>(prompts[i].size() + s - 1), {}});
    auto rr = engine_->Step(d);
    ASSERT_TRUE(rr.ok()) << rr.status();
    ASSERT_EQ(rr->tokens.size(), prompts.size());
    for (const auto& t : rr->tokens) together[t.seq_id - 10].push_back(t.token);
  }
  for (size_t i = 0; i < prompts.size(); ++i) EXPECT_EQ(together[i], alone[i]) << "sequence " << i;
  StepPlan release;
  for (size_t i = 0; i < prompts.size(); ++i) release.releases.push_back(10 + i);
  ASSERT_TRUE(engine_->Step(release).ok());
  EXPECT_EQ(engine_->kv_cache().used_blocks(), 0);
}

// Greedy picks made by the backend (EngineOptions::greedy_on_backend, a GPU's default), in a
// batch that also samples with a temperature, with and without keeping the logits, and in
// all-greedy steps that copy no logits: the same tokens as the host sampler, greedy logprobs to
// float rounding, temperature rows untouched.
TEST_F(SmolLm2Test, BackendGreedyPicksMatchTheHostSamplerInMixedBatches) {
  EngineOptions options;
  options.device = "cpu";
  options.kv_cache_bytes = int64_t{64} << 20;
  options.greedy_on_backend = true;
  for (const bool keep_logits : {false, true}) {
    SCOPED_TRACE(keep_logits ? "keep_logits" : "no logits kept");
    options.keep_logits = keep_logits;
    auto picks = Engine::Create(*weights_, options);
    ASSERT_TRUE(picks.ok()) << picks.status();
    const nlohmann::json ref = testing::LoadReference();
    SamplingParams hot;
    hot.temperature = 0.8f;
    hot.seed = 7;
    const std::vector<SamplingParams> sampling = {{}, hot, {}};
    auto run = [&](Engine& engine) {
      std::vector<std::vector<SampledToken>> out(3);
      std::vector<int32_t> lens(3);
      StepPlan plan;
      for (int i = 0; i < 3; ++i) {
        PrefillChunk c;
        c.seq_id = 20 + i;
        c.tokens = Ids(ref["cases"][i]["token_ids"]);
        c.sample = true;
        c.sampling = sampling[i];
        lens[i] = static_cast<int32_t>(c.tokens.size());
        plan.prefills.push_back(c);
      }
      for (int s = 0; s < 5; ++s) {
        auto r = engine.Step(plan);
        EXPECT_TRUE(r.ok() && r->errors.empty() && r->tokens.size() == 3u);
        if (!r.ok() || r->tokens.size() != 3u) return out;
        for (const SampledToken& t : r->tokens) out[t.seq_id - 20].push_back(t);
        plan = StepPlan();
        for (int i = 0; i < 3; ++i) {
          plan.decodes.push_back({20u + i, out[i].back().token, lens[i] + s, sampling[i]});
        }
      }
      StepPlan release;
      release.releases = {20, 21, 22};
      EXPECT_TRUE(engine.Step(release).ok());
      return out;
    };
    const auto host = run(*engine_);
    const auto backend = run(**picks);
    for (int i = 0; i < 3; ++i) {
      ASSERT_EQ(backend[i].size(), host[i].size());
      for (size_t t = 0; t < host[i].size(); ++t) {
        EXPECT_EQ(backend[i][t].token, host[i][t].token) << "sequence " << i << " token " << t;
        EXPECT_NEAR(backend[i][t].logprob, host[i][t].logprob, 1e-4) << "sequence " << i;
      }
    }
    // Every row greedy (and no logits kept): no logits come to the host at all.
    const std::vector<int32_t> prompt = Ids(ref["cases"][0]["token_ids"]);
    auto a = testing::Greedy(**picks, prompt, 8, 30);
    auto b = testing::Greedy(*engine_, prompt, 8, 30);
    ASSERT_TRUE(a.ok() && b.ok());
    EXPECT_EQ(*a, *b);
    EXPECT_EQ((*picks)->kv_cache().used_blocks(), 0);
  }
}

// A prompt fed in uneven chunks (as the scheduler does) ends in the same next token.
TEST_F(SmolLm2Test, ChunkedPrefillMatchesWholePrefill) {
  const nlohmann::json ref = testing::LoadReference();
  const std::vector<int32_t> prompt = Ids(ref["cases"][3]["token_ids"]);  // 2,235 tokens
  auto whole = testing::Prefill(*engine_, 20, prompt);
  ASSERT_TRUE(whole.ok()) << whole.status();
  const std::vector<float> whole_logits = engine_->sampled_logits();
  int pos = 0;
  SampledToken last;
  for (int chunk : {1, 100, 1000, 63, 5000}) {
    StepPlan plan;
    PrefillChunk c;
    c.seq_id = 21;
    c.start_pos = pos;
    const int n = std::min<int>(chunk, prompt.size() - pos);
    c.tokens.assign(prompt.begin() + pos, prompt.begin() + pos + n);
    pos += n;
    c.sample = pos == static_cast<int>(prompt.size());
    plan.prefills.push_back(c);
    auto r = engine_->Step(plan);
    ASSERT_TRUE(r.ok()) << r.status();
    ASSERT_TRUE(r->errors.empty()) << r->errors[0].message;
    if (c.sample) last = r->tokens.at(0);
    if (c.sample) break;
  }
  EXPECT_EQ(last.token, whole->token);
  double max_abs = 0;
  for (size_t i = 0; i < whole_logits.size(); ++i)
    max_abs = std::max<double>(max_abs, std::abs(whole_logits[i] - engine_->sampled_logits()[i]));
  // Different chunking changes fp32 summation order (BLAS blocking by m); a last-bit change
  // in K or V can flip a bf16 rounding in the cache, and 30 layers amplify that: ~0.06 seen.
  EXPECT_LT(max_abs, 0.25);
  StepPlan release;
  release.releases = {20, 21};
  ASSERT_TRUE(engine_->Step(release).ok());
}

// Plans that do not continue a sequence are per-sequence errors that free its KV.
TEST_F(SmolLm2Test, BadPlansDropTheSequenceAndFreeItsKv) {
  StepPlan plan;
  plan.decodes.push_back({999, 5, 3, {}});  // unknown sequence
  PrefillChunk bad;
  bad.seq_id = 30;
  bad.start_pos = 7;  // nothing cached yet
  bad.tokens = {1, 2, 3};
  plan.prefills.push_back(bad);
  PrefillChunk huge;
  huge.seq_id = 31;
  huge.tokens.assign(engine_->config().max_context + 1, 5);
  plan.prefills.push_back(huge);
  auto r = engine_->Step(plan);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->errors.size(), 3u);
  EXPECT_TRUE(r->tokens.empty());
  EXPECT_EQ(engine_->kv_cache().used_blocks(), 0);
}

}  // namespace
}  // namespace asynctls
