// ModelConfig: Validate, RoPE frequencies (plain, linear, llama3, GGUF freq factors), and the
// config.json and GGUF-metadata loaders.
#include "asynctls/runtime/model_config.h"

#include <cmath>
#include <string>

#include "absl/strings/match.h"
#include "asynctls/runtime/weights.h"
#include "gtest/gtest.h"
#include "runtime/weights_test_util.h"

namespace asynctls {
namespace {

using testing::FloatBytes;
using testing::GgufBuilder;

ModelConfig Good() {
  ModelConfig c;
  c.architecture = "llama";
  c.num_layers = 2;
  c.hidden_size = 64;
  c.num_q_heads = 4;
  c.num_kv_heads = 2;
  c.head_dim = 16;
  c.ffn_size = 128;
  c.vocab_size = 100;
  c.max_context = 256;
  c.rotary_dim = 16;
  return c;
}

void ExpectInvalid(const ModelConfig& c, absl::string_view field) {
  absl::Status s = c.Validate();
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << field;
  EXPECT_TRUE(absl::StrContains(s.message(), field)) << s;
}

TEST(ModelConfigTest, Validate) {
  EXPECT_TRUE(Good().Validate().ok());
  ModelConfig c = Good();
  c.architecture = "gpt2";
  ExpectInvalid(c, "architecture");
  c = Good();
  c.num_layers = 0;
  ExpectInvalid(c, "num_layers");
  c = Good();
  c.hidden_size = -1;
  ExpectInvalid(c, "hidden_size");
  c = Good();
  c.num_q_heads = 0;
  ExpectInvalid(c, "num_q_heads");
  c = Good();
  c.num_kv_heads = 3;
  ExpectInvalid(c, "num_kv_heads");
  c = Good();
  c.num_kv_heads = 8;
  ExpectInvalid(c, "num_kv_heads");
  c = Good();
  c.head_dim = 15;
  ExpectInvalid(c, "head_dim");
  c = Good();
  c.rotary_dim = 32;
  ExpectInvalid(c, "rotary_dim");
  c = Good();
  c.rotary_dim = 0;
  ExpectInvalid(c, "rotary_dim");
  c = Good();
  c.ffn_size = 0;
  ExpectInvalid(c, "ffn_size");
  c = Good();
  c.vocab_size = 0;
  ExpectInvalid(c, "vocab_size");
  c = Good();
  c.max_context = 0;
  ExpectInvalid(c, "max_context");
  c = Good();
  c.rms_eps = 0;
  ExpectInvalid(c, "rms_eps");
  c = Good();
  c.rope_theta = NAN;
  ExpectInvalid(c, "rope_theta");
  c = Good();
  c.rope_scaling.type = RopeScaling::Type::kLinear;
  c.rope_scaling.factor = 0;
  ExpectInvalid(c, "rope_scaling.factor");
  c = Good();
  c.rope_scaling.type = RopeScaling::Type::kLlama3;
  c.rope_scaling.factor = 8;
  c.rope_scaling.low_freq_factor = 4;
  c.rope_scaling.high_freq_factor = 1;
  ExpectInvalid(c, "rope_scaling");
  c = Good();
  c.rope_freq_factors = {1, 2};
  ExpectInvalid(c, "rope_freq_factors");
  c = Good();
  c.head_dim = c.rotary_dim = 1 << 28;
  ExpectInvalid(c, "sanity bound");
  c = Good();
  c.vocab_size = 1 << 30;
  ExpectInvalid(c, "vocab_size");
}

TEST(ModelConfigTest, RopeInvFreqPlainAndLinear) {
  ModelConfig c = Good();
  c.rope_theta = 10000.f;
  auto f = c.RopeInvFreq();
  ASSERT_EQ(f.size(), 8u);
  for (int i = 0; i < 8; ++i) EXPECT_FLOAT_EQ(f[i], std::pow(10000.f, -2.f * i / 16));
  c.rope_scaling.type = RopeScaling::Type::kLinear;
  c.rope_scaling.factor = 4;
  auto g = c.RopeInvFreq();
  for (int i = 0; i < 8; ++i) EXPECT_FLOAT_EQ(g[i], f[i] / 4);
  c.rope_scaling.type = RopeScaling::Type::kNone;
  c.rope_freq_factors = {1, 1, 1, 1, 2, 2, 8, 8};
  auto h = c.RopeInvFreq();
  for (int i = 0; i < 8; ++i) EXPECT_FLOAT_EQ(h[i], f[i] / c.rope_freq_factors[i]);
  c.rotary_dim = 8;  // partial rotary
  c.rope_freq_factors.clear();
  EXPECT_EQ(c.RopeInvFreq().size(), 4u);
}

TEST(ModelConfigTest, RopeInvFreqLlama3MatchesHuggingFace) {
  // Llama 3.1 8B; expected values from transformers' _compute_llama3_parameters (numpy).
  ModelConfig c = Good();
  c.head_dim = c.rotary_dim = 128;
  c.rope_theta = 500000.f;
  c.rope_scaling = {RopeScaling::Type::kLlama3, 8.f, 1.f, 4.f, 8192};
  ASSERT_TRUE(c.Validate().ok());
  auto f = c.RopeInvFreq();
  ASSERT_EQ(f.size(), 64u);
  const std::pair<int, double> expect[] = {{0, 1.0},
                                           {10, 0.128687382},
                                           {20, 0.0165604409},
                                           {25, 0.00594073068},
                                           {30, 0.00137189368},
                                           {35, 9.55621217e-05},
                                           {40, 3.42810235e-05},
                                           {50, 4.41153452e-06},
                                           {63, 3.06892588e-07}};
  for (auto [i, v] : expect) EXPECT_NEAR(f[i], v, 2e-6 * v) << i;
}

TEST(ModelConfigTest, FromHfJsonLlama3) {
  auto c = ModelConfigFromHfJson(R"({
    "architectures": ["LlamaForCausalLM"], "_name_or_path": "meta-llama/Llama-3.1-8B",
    "hidden_size": 4096, "intermediate_size": 14336, "num_attention_heads": 32,
    "num_key_value_heads": 8, "num_hidden_layers": 32, "vocab_size": 128256,
    "max_position_embeddings": 131072, "rms_norm_eps": 1e-05, "rope_theta": 500000.0,
    "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "tie_word_embeddings": false, "attention_bias": false, "mlp_bias": false})");
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->architecture, "llama");
  EXPECT_EQ(c->name, "meta-llama/Llama-3.1-8B");
  EXPECT_EQ(c->head_dim, 128);
  EXPECT_EQ(c->rotary_dim, 128);
  EXPECT_EQ(c->num_kv_heads, 8);
  EXPECT_EQ(c->vocab_size, 128256);
  EXPECT_EQ(c->max_context, 131072);
  EXPECT_FLOAT_EQ(c->rms_eps, 1e-5f);
  EXPECT_EQ(c->rope_style, kernels::RopeStyle::kHalf);
  EXPECT_EQ(c->rope_scaling.type, RopeScaling::Type::kLlama3);
  EXPECT_EQ(c->rope_scaling.original_max_position, 8192);
  EXPECT_FLOAT_EQ(c->rope_scaling.high_freq_factor, 4.f);
  EXPECT_FALSE(c->tied_embeddings);
  EXPECT_FALSE(c->attention_bias);
  EXPECT_FALSE(c->qk_norm);
}

TEST(ModelConfigTest, FromHfJsonDefaultsAndLinear) {
  auto c = ModelConfigFromHfJson(R"({"model_type": "qwen2", "hidden_size": 64,
    "intermediate_size": 128, "num_attention_heads": 4, "num_hidden_layers": 2,
    "vocab_size": 100, "max_position_embeddings": 512,
    "rope_scaling": {"type": "linear", "factor": 2.0}})");
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->architecture, "qwen2");
  EXPECT_EQ(c->num_kv_heads, 4);
  EXPECT_EQ(c->head_dim, 16);
  EXPECT_FLOAT_EQ(c->rope_theta, 10000.f);
  EXPECT_FLOAT_EQ(c->rms_eps, 1e-6f);
  EXPECT_EQ(c->rope_scaling.type, RopeScaling::Type::kLinear);
  EXPECT_FLOAT_EQ(c->rope_scaling.factor, 2.f);
  EXPECT_TRUE(c->attention_bias);
}

TEST(ModelConfigTest, FromHfJsonErrorsNameTheKey) {
  const std::string base = R"("architectures": ["Qwen3ForCausalLM"], "hidden_size": 64,
    "intermediate_size": 128, "num_attention_heads": 4, "num_hidden_layers": 2,
    "max_position_embeddings": 512)";
  auto err = [&](const std::string& extra) {
    return ModelConfigFromHfJson("{" + base + extra + "}").status();
  };
  EXPECT_TRUE(absl::StrContains(err("").message(), "vocab_size"));
  EXPECT_TRUE(absl::StrContains(err(R"(, "vocab_size": "many")").message(), "vocab_size"));
  EXPECT_TRUE(absl::StrContains(err(R"(, "vocab_size": 10, "num_key_value_heads": 3)").message(),
                                "num_kv_heads"));
  EXPECT_TRUE(absl::StrContains(
      err(R"(, "vocab_size": 10, "rope_scaling": {"rope_type": "yarn", "factor": 4})").message(),
      "rope_type"));
  EXPECT_TRUE(absl::StrContains(
      err(R"(, "vocab_size": 10, "rope_scaling": {"rope_type": "llama3", "factor": 4})").message(),
      "low_freq_factor"));
  EXPECT_TRUE(
      absl::StrContains(err(R"(, "vocab_size": 10, "mlp_bias": true)").message(), "mlp_bias"));
  EXPECT_TRUE(absl::StrContains(err(R"(, "vocab_size": 1e40)").message(), "vocab_size"));
  EXPECT_TRUE(absl::StrContains(err(R"(, "vocab_size": 10, "use_sliding_window": true)").message(),
                                "use_sliding_window"));
  EXPECT_FALSE(ModelConfigFromHfJson("{not json").ok());
  EXPECT_FALSE(ModelConfigFromHfJson("[]").ok());
  EXPECT_TRUE(absl::StrContains(
      ModelConfigFromHfJson(R"({"architectures": ["GPT2LMHeadModel"]})").status().message(),
      "architectures"));
  auto ok = ModelConfigFromHfJson("{" + base + R"(, "vocab_size": 10, "head_dim": 32})");
  ASSERT_TRUE(ok.ok()) << ok.status();
  EXPECT_EQ(ok->head_dim, 32);
  EXPECT_TRUE(ok->qk_norm);
  EXPECT_FALSE(ok->attention_bias);
}

// --- from GGUF metadata ------------------------------------------------------------------------

GgufBuilder GgufModel(const std::string& arch) {
  GgufBuilder b;
  b.String("general.architecture", arch)
      .U32(arch + ".block_count", 2)
      .U32(arch + ".embedding_length", 64)
      .U32(arch + ".attention.head_count", 4)
      .U32(arch + ".attention.head_count_kv", 2)
      .U32(arch + ".feed_forward_length", 128)
      .U32(arch + ".context_length", 4096)
      .F32(arch + ".rope.freq_base", 1e6f)
      .F32(arch + ".attention.layer_norm_rms_epsilon", 1e-6f);
  return b;
}

absl::StatusOr<ModelConfig> GgufConfig(GgufBuilder& b) {
  auto f = WeightFile::OpenGgufBytes(b.Build());
  if (!f.ok()) return f.status();
  return (*f)->ReadModelConfig();
}

TEST(ModelConfigTest, FromGgufQwen2) {
  GgufBuilder b = GgufModel("qwen2");
  b.StringArray("tokenizer.ggml.tokens", {"a", "b", "c"})
      .Tensor("blk.0.attn_q.bias", {64}, 0, FloatBytes(std::vector<float>(64)))
      .Tensor("output.weight", {64, 3}, 0, FloatBytes(std::vector<float>(192)));
  auto c = GgufConfig(b);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->architecture, "qwen2");
  EXPECT_EQ(c->num_layers, 2);
  EXPECT_EQ(c->head_dim, 16);
  EXPECT_EQ(c->rotary_dim, 16);
  EXPECT_EQ(c->vocab_size, 3);
  EXPECT_EQ(c->max_context, 4096);
  EXPECT_FLOAT_EQ(c->rope_theta, 1e6f);
  EXPECT_EQ(c->rope_style, kernels::RopeStyle::kHalf);
  EXPECT_TRUE(c->attention_bias);
  EXPECT_FALSE(c->qk_norm);
  EXPECT_FALSE(c->tied_embeddings);
}

TEST(ModelConfigTest, FromGgufQwen3KeyLengthAndVocabSize) {
  GgufBuilder b = GgufModel("qwen3");
  b.U32("qwen3.attention.key_length", 32)
      .U32("qwen3.attention.value_length", 32)
      .U32("qwen3.vocab_size", 77)
      .Tensor("blk.0.attn_q_norm.weight", {32}, 0, FloatBytes(std::vector<float>(32)));
  auto c = GgufConfig(b);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->head_dim, 32);
  EXPECT_EQ(c->rotary_dim, 32);
  EXPECT_EQ(c->vocab_size, 77);
  EXPECT_TRUE(c->qk_norm);
  EXPECT_TRUE(c->tied_embeddings);
  EXPECT_EQ(c->rope_style, kernels::RopeStyle::kHalf);
}

TEST(ModelConfigTest, FromGgufLlamaScalingAndFreqFactors) {
  const std::vector<float> factors = {1, 1, 2, 2, 4, 4, 8, 8};
  // Per-layer head_count_kv (all equal), no freq_base (default), vocab from token_embd rows.
  GgufBuilder g;
  g.String("general.architecture", "llama")
      .U32("llama.block_count", 2)
      .U32("llama.embedding_length", 64)
      .U32("llama.attention.head_count", 4)
      .I32Array("llama.attention.head_count_kv", {2, 2})
      .U32("llama.feed_forward_length", 128)
      .U32("llama.context_length", 4096)
      .F32("llama.attention.layer_norm_rms_epsilon", 1e-5f)
      .String("llama.rope.scaling.type", "linear")
      .F32("llama.rope.scaling.factor", 2.f)
      .Tensor("rope_freqs.weight", {8}, 0, FloatBytes(factors))
      .Tensor("token_embd.weight", {64, 50}, 0, FloatBytes(std::vector<float>(3200)));
  auto c = GgufConfig(g);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->num_kv_heads, 2);
  EXPECT_EQ(c->vocab_size, 50);  // from token_embd rows
  EXPECT_FLOAT_EQ(c->rope_theta, 10000.f);
  EXPECT_EQ(c->rope_style, kernels::RopeStyle::kInterleaved);
  EXPECT_EQ(c->rope_scaling.type, RopeScaling::Type::kLinear);
  EXPECT_EQ(c->rope_freq_factors, factors);
  auto inv = c->RopeInvFreq();
  for (int i = 0; i < 8; ++i) {
    EXPECT_FLOAT_EQ(inv[i], std::pow(10000.f, -2.f * i / 16) / 2.f / factors[i]);
  }
}

TEST(ModelConfigTest, FromGgufErrorsNameTheKey) {
  GgufBuilder none;
  none.U32("x", 1);
  EXPECT_TRUE(absl::StrContains(GgufConfig(none).status().message(), "general.architecture"));
  GgufBuilder gpt;
  gpt.String("general.architecture", "gpt2");
  EXPECT_TRUE(absl::StrContains(GgufConfig(gpt).status().message(), "gpt2"));
  GgufBuilder partial;
  partial.String("general.architecture", "llama").U32("llama.block_count", 2);
  EXPECT_TRUE(absl::StrContains(GgufConfig(partial).status().message(), "llama.embedding_length"));
  GgufBuilder yarn = GgufModel("qwen2");
  yarn.String("qwen2.rope.scaling.type", "yarn").U32("qwen2.vocab_size", 5);
  EXPECT_TRUE(absl::StrContains(GgufConfig(yarn).status().message(), "yarn"));
  GgufBuilder uneven;
  uneven.String("general.architecture", "llama").I32Array("llama.block_count", {1, 2});
  EXPECT_TRUE(absl::StrContains(GgufConfig(uneven).status().message(), "differs between layers"));
  GgufBuilder mismatch = GgufModel("qwen2");
  mismatch.StringArray("tokenizer.ggml.tokens", {"a", "b", "c"})
      .Tensor("token_embd.weight", {64, 5}, 0, FloatBytes(std::vector<float>(320)));
  EXPECT_TRUE(absl::StrContains(GgufConfig(mismatch).status().message(), "token_embd.weight"));
  GgufBuilder novocab = GgufModel("qwen2");
  EXPECT_TRUE(absl::StrContains(GgufConfig(novocab).status().message(), "vocab_size"));
}

}  // namespace
}  // namespace asynctls
