// SmolLM2 on the CUDA backend: next-token top-1 equals llama.cpp's, and greedy output equals
// the CPU backend's for the first 32 tokens of each reference prompt, with dense and with
// two-level sparse decode. Skips without a GPU.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <vector>

#include "asynctls/runtime/status.h"
#include "asynctls/runtime/tokenizer.h"
#include "model_test_util.h"

namespace asynctls {
namespace {

std::vector<int32_t> Ids(const nlohmann::json& j) { return j.get<std::vector<int32_t>>(); }

absl::StatusOr<std::unique_ptr<Engine>> MakeEngine(const WeightFile& file,
                                                   const std::string& device, bool tls = false,
                                                   kernels::TlsLag lag = kernels::TlsLag::kOneStep,
                                                   bool int8_block_index = false,
                                                   bool cuda_graphs = false,
                                                   kernels::DType weights = kernels::DType::kF32) {
  EngineOptions options;
  options.device = device;
  options.weight_dtype = weights;
  options.keep_logits = true;
  options.kv_cache_bytes = int64_t{256} << 20;
  options.cuda_graphs = cuda_graphs;
  if (tls) {
    // A sparse budget for these prompts: 4 blocks of ~35, 96 tokens among their 256.
    auto tls_options = TlsDecodeOptionsFromFile(
        std::string(ASYNCTLS_SOURCE_DIR) + "/tests/data/channels/smollm2-gpl.json", 4, 96, lag);
    if (!tls_options.ok()) return tls_options.status();
    options.tls = *tls_options;
    options.tls->int8_block_index = int8_block_index;
  }
  return Engine::Create(file, options);
}

// The token `engine` samples right after `prompt` (the sequence is released again).
absl::StatusOr<SampledToken> FirstToken(Engine& engine, const std::vector<int32_t>& prompt) {
  auto first = testing::Prefill(engine, 50, prompt);
  StepPlan release;
  release.releases.push_back(50);
  if (auto r = engine.Step(release); !r.ok()) return r.status();
  return first;
}

// 32 greedy tokens after `prompt` from each engine, and how many of them lead identically.
struct GreedyPair {
  std::vector<int32_t> a, b;
  int same = 0;
};
absl::StatusOr<GreedyPair> GreedyOnBoth(Engine& a, Engine& b, const std::vector<int32_t>& prompt) {
  GreedyPair out;
  ASYNCTLS_ASSIGN_OR_RETURN(out.a, testing::Greedy(a, prompt, 32));
  ASYNCTLS_ASSIGN_OR_RETURN(out.b, testing::Greedy(b, prompt, 32));
  while (out.same < 32 && out.a[out.same] == out.b[out.same]) ++out.same;
  return out;
}

// The real SmolLM2 on the GPU (skipped without a GPU or the GGUF).
class SmolLm2GpuTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!CudaAvailable()) GTEST_SKIP() << "no CUDA device";
    const std::string path = testing::SmolLm2Path();
    if (path.empty()) GTEST_SKIP() << "SmolLM2 GGUF not found (set ASYNCTLS_MODEL_PATH)";
    auto file = WeightFile::Open(path);
    ASSERT_TRUE(file.ok()) << file.status();
    file_ = std::move(*file);
  }
  std::unique_ptr<WeightFile> file_;
};

// bf16 GEMM weights (the CLI's default on a GPU), with CUDA graphs: every prompt's first token is
// still llama.cpp's top-1, and greedy decoding stays with the f32 engine's for most of its tokens
// (bf16 rounding may flip a near tie, after which the texts part; printed, not asserted).
TEST_F(SmolLm2GpuTest, Bf16WeightsKeepTop1AndMostlyFollowF32) {
  auto bf16 = MakeEngine(*file_, "cuda", false, kernels::TlsLag::kOneStep, false, true,
                         kernels::DType::kBF16);
  ASSERT_TRUE(bf16.ok()) << bf16.status();
  auto f32 = MakeEngine(*file_, "cuda");
  ASSERT_TRUE(f32.ok()) << f32.status();
  const nlohmann::json ref = testing::LoadReference();
  int agreeing = 0, total = 0;
  for (const auto& c : ref["cases"]) {
    const std::string name = c["name"].get<std::string>();
    SCOPED_TRACE(name);
    const std::vector<int32_t> prompt = Ids(c["token_ids"]);
    auto first = FirstToken(**bf16, prompt);
    ASSERT_TRUE(first.ok()) << first.status();
    EXPECT_EQ(first->token, Ids(c["top_ids"])[0]) << "bf16 top-1 differs from llama.cpp";
    EXPECT_TRUE(std::isfinite(first->logprob));
    auto both = GreedyOnBoth(**bf16, **f32, prompt);
    ASSERT_TRUE(both.ok()) << both.status();
    std::printf("[ bf16=f32 ] %-12s first %d/32 greedy tokens identical\n", name.c_str(),
                both->same);
    agreeing += both->same;
    total += 32;
  }
  EXPECT_GE(agreeing * 2, total) << "bf16 greedy decoding left f32's early in most prompts";
  EXPECT_EQ((*bf16)->kv_cache().used_blocks(), 0);
}

TEST_F(SmolLm2GpuTest, GreedyMatchesCpuAndTop1MatchesLlamaCpp) {
  auto gpu = MakeEngine(*file_, "cuda");
  ASSERT_TRUE(gpu.ok()) << gpu.status();
  auto cpu = MakeEngine(*file_, "cpu");
  ASSERT_TRUE(cpu.ok()) << cpu.status();
  auto tokenizer = Tokenizer::FromGguf(*file_);
  ASSERT_TRUE(tokenizer.ok());
  const nlohmann::json ref = testing::LoadReference();
  for (const auto& c : ref["cases"]) {
    const std::string name = c["name"].get<std::string>();
    SCOPED_TRACE(name);
    const std::vector<int32_t> prompt = Ids(c["token_ids"]);
    auto first = FirstToken(**gpu, prompt);
    ASSERT_TRUE(first.ok()) << first.status();
    EXPECT_EQ(first->token, Ids(c["top_ids"])[0]) << "GPU top-1 differs from llama.cpp";

    auto both = GreedyOnBoth(**gpu, **cpu, prompt);
    ASSERT_TRUE(both.ok()) << both.status();
    std::printf("[ cpu=gpu  ] %-12s first %d/32 greedy tokens identical; gpu: %s\n", name.c_str(),
                both->same, (*tokenizer)->Decode(both->a).substr(0, 60).c_str());
    EXPECT_EQ(both->a, both->b);
  }
  EXPECT_EQ((*gpu)->kv_cache().used_blocks(), 0);
}

// Two-level sparse decode on the GPU and the CPU: the selections are computed bit for bit alike
// from the same q, so greedy outputs agree as the dense ones do. With the bf16 block index and
// its int8 form.
TEST_F(SmolLm2GpuTest, TlsGreedyMatchesCpu) {
  for (const auto [lag, int8] :
       {std::pair{kernels::TlsLag::kSameStep, false}, std::pair{kernels::TlsLag::kOneStep, false},
        std::pair{kernels::TlsLag::kOneStep, true}}) {
    const char* lag_name =
        lag == kernels::TlsLag::kOneStep ? (int8 ? "lag, int8 idx" : "one-step lag") : "same step";
    SCOPED_TRACE(lag_name);
    auto gpu = MakeEngine(*file_, "cuda", /*tls=*/true, lag, int8);
    ASSERT_TRUE(gpu.ok()) << gpu.status();
    auto cpu = MakeEngine(*file_, "cpu", /*tls=*/true, lag, int8);
    ASSERT_TRUE(cpu.ok()) << cpu.status();
    const nlohmann::json ref = testing::LoadReference();
    for (const auto& c : ref["cases"]) {
      const std::string name = c["name"].get<std::string>();
      SCOPED_TRACE(name);
      const std::vector<int32_t> prompt = Ids(c["token_ids"]);
      auto on_gpu = testing::Greedy(**gpu, prompt, 24, 1, /*tls=*/true);
      ASSERT_TRUE(on_gpu.ok()) << on_gpu.status();
      auto on_cpu = testing::Greedy(**cpu, prompt, 24, 1, /*tls=*/true);
      ASSERT_TRUE(on_cpu.ok()) << on_cpu.status();
      auto dense = testing::Greedy(**gpu, prompt, 24, 2);
      ASSERT_TRUE(dense.ok()) << dense.status();
      int same = 0, same_dense = 0;
      while (same < 24 && (*on_gpu)[same] == (*on_cpu)[same]) ++same;
      while (same_dense < 24 && (*on_gpu)[same_dense] == (*dense)[same_dense]) ++same_dense;
      std::printf(
          "[ tls      ] %-12s %-12s %5zu tokens: gpu tls = cpu tls for the first %d/24, = gpu "
          "dense for %d/24\n",
          lag_name, name.c_str(), prompt.size(), same, same_dense);
      EXPECT_EQ(*on_gpu, *on_cpu);
    }
    EXPECT_EQ((*gpu)->kv_cache().used_blocks(), 0);
  }
}

// Decode steps replayed from CUDA graphs (EngineOptions::cuda_graphs) sample from the logits of
// steps run op by op, bit for bit, at every step: dense, and with the one-step lag's two-level
// decode (real selection: prompts far past the 4 blocks + 96 tokens budgets; its block branch
// forked and joined inside the graph) beside a dense sequence. Sequences of different lengths
// just below 1,024 tokens decode 160 steps: the longest crosses 64-token blocks at 1,024, 1,088
// and 1,152 tokens, and the graphed table width goes from 16 blocks to 32 at the first of them,
// so graphs replay on both sides of a width bucket and nothing else changes the shape. The
// graphed dense decode plans for 32 blocks, the eager one for the longest sequence; at these
// lengths and batches both give each split one page (the split count follows the length only
// up to that), so both sum in the same order.
TEST_F(SmolLm2GpuTest, CudaGraphDecodeMatchesEager) {
  const std::vector<int32_t> text = Ids(testing::LoadReference()["cases"][3]["token_ids"]);
  ASSERT_GE(text.size(), 2200u);  // long_apache
  struct Seq {
    uint64_t id;
    std::vector<int32_t> prompt;
    int32_t token = 0;     // the last sampled token: the next one decoded
    int32_t position = 0;  // its position
  };
  // Each sampled token becomes its sequence's next one to decode.
  auto take = [](std::vector<Seq>& seqs, const std::vector<SampledToken>& sampled) {
    for (const SampledToken& t : sampled) {
      for (Seq& s : seqs) {
        if (s.id == t.seq_id) s.token = t.token;
      }
    }
  };
  constexpr int kSteps = 160;
  constexpr int kLongest = 1000;  // its step 24 reserves the 17th block: 32 blocks wide
  for (const bool tls : {false, true}) {
    SCOPED_TRACE(tls ? "one dense + two tls (one-step lag) sequences" : "two dense sequences");
    auto eager = MakeEngine(*file_, "cuda", tls);
    ASSERT_TRUE(eager.ok()) << eager.status();
    auto graphed = MakeEngine(*file_, "cuda", tls, kernels::TlsLag::kOneStep, false, true);
    ASSERT_TRUE(graphed.ok()) << graphed.status();
    // Prefills `joining` (sampling each one's first token), then decodes every sequence.
    std::vector<Seq> seqs;
    auto join = [&](std::vector<Seq> joining, StepPlan plan) {
      for (Seq& s : joining) {
        s.position = static_cast<int32_t>(s.prompt.size());
        plan.prefills.push_back({s.id, s.prompt, 0, /*sample=*/true, {}});
        seqs.push_back(std::move(s));
      }
      auto sampled = testing::StepBoth(**eager, **graphed, plan);
      if (sampled.ok()) take(seqs, *sampled);
      return sampled;
    };
    // One decode step of every sequence (sequence 1 dense, the others TLS with `tls`).
    auto decode = [&]() {
      StepPlan plan;
      for (Seq& s : seqs) plan.decodes.push_back({s.id, s.token, s.position++, {}, tls && s.id != 1});
      auto sampled = testing::StepBoth(**eager, **graphed, plan);
      if (sampled.ok()) take(seqs, *sampled);
      return sampled;
    };
    std::vector<Seq> first = {{1, {text.begin(), text.begin() + kLongest}},
                              {2, {text.begin() + 1000, text.begin() + 1900}}};
    if (tls) first.push_back({3, {text.begin() + 1250, text.begin() + 2200}});
    auto prefilled = join(std::move(first), {});
    ASSERT_TRUE(prefilled.ok()) << prefilled.status();
    ASSERT_EQ(prefilled->size(), seqs.size());
    DecodeGraphStats narrow;  // after the last step 16 blocks wide
    for (int step = 0; step < kSteps; ++step) {
      auto sampled = decode();
      ASSERT_TRUE(sampled.ok()) << "step " << step << ": " << sampled.status();
      ASSERT_EQ(sampled->size(), seqs.size());
      if (kLongest + step + 1 == 16 * kernels::kKvBlockSize) narrow = (*graphed)->graph_stats();
    }
    const DecodeGraphStats all = (*graphed)->graph_stats();
    std::printf("[ graphs   ] %s: %lld captures, %lld replays (%lld at 16 blocks)\n",
                tls ? "tls  " : "dense", static_cast<long long>(all.captures),
                static_cast<long long>(all.replays), static_cast<long long>(narrow.replays));
    EXPECT_EQ(narrow.captures, 1);
    EXPECT_GT(narrow.replays, 15);
    EXPECT_EQ(all.captures, 2);  // one per width: the later block boundaries change nothing
    EXPECT_GT(all.replays - narrow.replays, kSteps - 40);
    EXPECT_EQ(all.capture_failures, 0);
    EXPECT_EQ(all.evictions, 0);
    EXPECT_EQ(all.cached_graphs, 2);

    // As a server's batch changes: sequence 2 leaves and sequence 4, of another length and
    // (TLS) with no lag state yet, joins in a prefill step. The batch then has as many
    // sequences and as wide a table as before, so its decode steps replay the graph captured
    // for the earlier sequences, with the new one's tables and positions uploaded into it.
    StepPlan swap;
    swap.releases.push_back(2);
    std::erase_if(seqs, [](const Seq& s) { return s.id == 2; });
    auto joined = join({{4, {text.begin() + 300, text.begin() + 1150}}}, swap);
    ASSERT_TRUE(joined.ok()) << joined.status();
    ASSERT_EQ(joined->size(), 1u);
    for (int step = 0; step < 24; ++step) {
      auto sampled = decode();
      ASSERT_TRUE(sampled.ok()) << "after the swap, step " << step << ": " << sampled.status();
    }
    const DecodeGraphStats swapped = (*graphed)->graph_stats();
    EXPECT_EQ(swapped.captures, 2);  // the same shape: no new graph
    // With TLS the joined sequence's first step selects same-step (no previous selection): a
    // shape of its own (the key's per-sequence lag flag), run op by op once.
    EXPECT_GE(swapped.replays - all.replays, tls ? 23 : 24);
    EXPECT_EQ(swapped.capture_failures, 0);
    StepPlan release;
    for (const Seq& s : seqs) release.releases.push_back(s.id);
    ASSERT_TRUE((*eager)->Step(release).ok());
    ASSERT_TRUE((*graphed)->Step(release).ok());
    EXPECT_EQ((*graphed)->kv_cache().used_blocks(), 0);
  }
}

}  // namespace
}  // namespace asynctls
