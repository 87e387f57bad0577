// safetensors reader: tiny checkpoints written here by hand (header JSON + raw data), one file,
// a folder of shards, an index.json, Hugging Face names mapped to canonical names; and errors.
#include <cstring>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "asynctls/runtime/weights.h"
#include "gtest/gtest.h"
#include "runtime/weights_test_util.h"

namespace asynctls {
namespace {

using testing::TempDir;

struct StTensor {
  std::string name, dtype;
  std::vector<int64_t> shape;
  std::string bytes;
};

std::string F32Bytes(int64_t n, float start) {
  std::string s;
  for (int64_t i = 0; i < n; ++i) {
    float v = start + 0.5f * static_cast<float>(i);
    s.append(reinterpret_cast<const char*>(&v), 4);
  }
  return s;
}

// bf16/f16 of exactly representable values: (start + i) for small integers.
std::string Bf16Bytes(int64_t n, float start) {
  std::string s;
  for (int64_t i = 0; i < n; ++i) {
    float v = start + static_cast<float>(i);
    uint32_t bits;
    std::memcpy(&bits, &v, 4);
    uint16_t h = static_cast<uint16_t>(bits >> 16);
    s.append(reinterpret_cast<const char*>(&h), 2);
  }
  return s;
}

std::string F16Bytes(int64_t n) {  // 1, 2, 3, ... (n <= 1024)
  std::string s;
  for (int64_t i = 0; i < n; ++i) {
    int v = static_cast<int>(i) + 1;
    int e = 0;
    while ((v >> e) > 1) ++e;
    uint16_t h = static_cast<uint16_t>(((e + 15) << 10) | (((v << 10) >> e) & 0x3FF));
    s.append(reinterpret_cast<const char*>(&h), 2);
  }
  return s;
}

std::string Safetensors(const std::vector<StTensor>& tensors, std::string extra_header = "") {
  std::string header = "{\"__metadata__\":{\"format\":\"pt\"}";
  std::string data;
  for (const StTensor& t : tensors) {
    std::string shape;
    for (size_t i = 0; i < t.shape.size(); ++i) shape += absl::StrCat(i ? "," : "", t.shape[i]);
    absl::StrAppend(&header, ",\"", t.name, "\":{\"dtype\":\"", t.dtype, "\",\"shape\":[", shape,
                    "],\"data_offsets\":[", data.size(), ",", data.size() + t.bytes.size(), "]}");
    data += t.bytes;
  }
  header += extra_header + "}";
  while (header.size() % 8 != 0) header += ' ';
  uint64_t len = header.size();
  return std::string(reinterpret_cast<const char*>(&len), 8) + header + data;
}

// Qwen2-shaped, one layer: hidden 8, 2 q heads, 1 kv head, head_dim 4, ffn 16, vocab 10.
std::vector<StTensor> Qwen2Tensors(bool with_lm_head) {
  std::vector<StTensor> t = {
      {"model.embed_tokens.weight", "BF16", {10, 8}, Bf16Bytes(80, -40)},
      {"model.layers.0.input_layernorm.weight", "F32", {8}, F32Bytes(8, 1)},
      {"model.layers.0.self_attn.q_proj.weight", "F32", {8, 8}, F32Bytes(64, 0)},
      {"model.layers.0.self_attn.q_proj.bias", "F32", {8}, F32Bytes(8, 0)},
      {"model.layers.0.self_attn.k_proj.weight", "F16", {4, 8}, F16Bytes(32)},
      {"model.layers.0.self_attn.k_proj.bias", "F32", {4}, F32Bytes(4, 0)},
      {"model.layers.0.self_attn.v_proj.weight", "F32", {4, 8}, F32Bytes(32, 0)},
      {"model.layers.0.self_attn.v_proj.bias", "F32", {4}, F32Bytes(4, 0)},
      {"model.layers.0.self_attn.o_proj.weight", "F32", {8, 8}, F32Bytes(64, 0)},
      {"model.layers.0.post_attention_layernorm.weight", "F32", {8}, F32Bytes(8, 0)},
      {"model.layers.0.mlp.gate_proj.weight", "F32", {16, 8}, F32Bytes(128, 0)},
      {"model.layers.0.mlp.up_proj.weight", "F32", {16, 8}, F32Bytes(128, 0)},
      {"model.layers.0.mlp.down_proj.weight", "F32", {8, 16}, F32Bytes(128, 0)},
      {"model.norm.weight", "F32", {8}, F32Bytes(8, 0)},
      {"model.layers.0.self_attn.rotary_emb.inv_freq", "F32", {2}, F32Bytes(2, 0)},
  };
  if (with_lm_head) t.push_back({"lm_head.weight", "F32", {10, 8}, F32Bytes(80, 3)});
  return t;
}

std::string Qwen2Config(bool tied) {
  return absl::StrCat(R"({"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2",
    "hidden_size": 8, "intermediate_size": 16, "num_attention_heads": 2,
    "num_key_value_heads": 1, "num_hidden_layers": 1, "vocab_size": 10,
    "max_position_embeddings": 128, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
    "rope_scaling": null, "tie_word_embeddings": )",
                      tied ? "true" : "false", "}");
}

TEST(SafetensorsTest, DirectoryWithOneFileMapsNames) {
  TempDir dir;
  dir.Write("config.json", Qwen2Config(false));
  dir.Write("model.safetensors", Safetensors(Qwen2Tensors(true)));
  auto f = WeightFile::Open(dir.path());
  ASSERT_TRUE(f.ok()) << f.status();
  const WeightFile& w = **f;
  EXPECT_EQ(w.format(), "safetensors");
  for (const char* name :
       {"token_embd.weight", "blk.0.attn_norm.weight", "blk.0.attn_q.weight", "blk.0.attn_q.bias",
        "blk.0.attn_k.weight", "blk.0.attn_k.bias", "blk.0.attn_v.weight", "blk.0.attn_v.bias",
        "blk.0.attn_output.weight", "blk.0.ffn_norm.weight", "blk.0.ffn_gate.weight",
        "blk.0.ffn_up.weight", "blk.0.ffn_down.weight", "output_norm.weight", "output.weight"}) {
    EXPECT_TRUE(w.HasTensor(name)) << name;
  }
  EXPECT_EQ(w.tensors().size(), 15u);  // inv_freq dropped
  EXPECT_FALSE(w.HasTensor("model.layers.0.self_attn.rotary_emb.inv_freq"));
  EXPECT_FALSE(w.MetaString("general.architecture").has_value());

  auto emb = w.ReadF32("token_embd.weight");
  ASSERT_TRUE(emb.ok()) << emb.status();
  ASSERT_EQ(emb->size(), 80u);
  for (int i = 0; i < 80; ++i) EXPECT_EQ((*emb)[i], -40.f + i);
  auto k = w.ReadF32("blk.0.attn_k.weight");
  ASSERT_TRUE(k.ok());
  for (int i = 0; i < 32; ++i) EXPECT_EQ((*k)[i], 1.f + i);
  auto out = w.ReadF32("output.weight");
  ASSERT_TRUE(out.ok());
  for (int i = 0; i < 80; ++i) EXPECT_EQ((*out)[i], 3.f + 0.5f * i);
  for (const WeightTensorInfo& t : w.tensors()) {
    if (t.name == "blk.0.ffn_down.weight") EXPECT_EQ(t.shape, (std::vector<int64_t>{8, 16}));
    if (t.name == "blk.0.attn_k.weight") EXPECT_EQ(t.source_type, "F16");
  }

  auto c = w.ReadModelConfig();
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->architecture, "qwen2");
  EXPECT_EQ(c->num_layers, 1);
  EXPECT_EQ(c->hidden_size, 8);
  EXPECT_EQ(c->num_q_heads, 2);
  EXPECT_EQ(c->num_kv_heads, 1);
  EXPECT_EQ(c->head_dim, 4);
  EXPECT_EQ(c->rotary_dim, 4);
  EXPECT_EQ(c->ffn_size, 16);
  EXPECT_EQ(c->vocab_size, 10);
  EXPECT_EQ(c->max_context, 128);
  EXPECT_FLOAT_EQ(c->rope_theta, 1e6f);
  EXPECT_EQ(c->rope_style, kernels::RopeStyle::kHalf);
  EXPECT_TRUE(c->attention_bias);
  EXPECT_FALSE(c->qk_norm);
  EXPECT_FALSE(c->tied_embeddings);
}

TEST(SafetensorsTest, SingleFileAndMissingConfig) {
  TempDir dir;
  std::string p = dir.Write("m.safetensors", Safetensors(Qwen2Tensors(false)));
  auto f = WeightFile::Open(p);
  ASSERT_TRUE(f.ok()) << f.status();
  EXPECT_FALSE((*f)->HasTensor("output.weight"));
  EXPECT_EQ((*f)->ReadModelConfig().status().code(), absl::StatusCode::kNotFound);
  dir.Write("config.json", Qwen2Config(true));
  f = WeightFile::Open(p);
  ASSERT_TRUE(f.ok());
  auto c = (*f)->ReadModelConfig();
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_TRUE(c->tied_embeddings);
  // Untied config without lm_head.weight is inconsistent.
  dir.Write("config.json", Qwen2Config(false));
  f = WeightFile::Open(p);
  EXPECT_TRUE(absl::StrContains((*f)->ReadModelConfig().status().message(), "lm_head"));
}

TEST(SafetensorsTest, ShardedWithIndex) {
  TempDir dir;
  auto all = Qwen2Tensors(true);
  std::vector<StTensor> a(all.begin(), all.begin() + 7), b(all.begin() + 7, all.end());
  dir.Write("config.json", Qwen2Config(false));
  dir.Write("model-00001-of-00002.safetensors", Safetensors(a));
  dir.Write("model-00002-of-00002.safetensors", Safetensors(b));
  dir.Write("stray.safetensors", "not listed in the index, never opened");
  std::string index = R"({"metadata": {"total_size": 1}, "weight_map": {)";
  for (size_t i = 0; i < all.size(); ++i) {
    absl::StrAppend(&index, i ? "," : "", "\"", all[i].name, "\": \"model-0000", i < 7 ? 1 : 2,
                    "-of-00002.safetensors\"");
  }
  index += "}}";
  dir.Write("model.safetensors.index.json", index);
  auto f = WeightFile::Open(dir.path());
  ASSERT_TRUE(f.ok()) << f.status();
  EXPECT_EQ((*f)->tensors().size(), 15u);
  auto v = (*f)->ReadF32("blk.0.ffn_up.weight");
  ASSERT_TRUE(v.ok());
  EXPECT_EQ((*v)[3], 1.5f);
  EXPECT_TRUE((*f)->ReadModelConfig().ok());

  // An index that puts a tensor in the wrong shard, or points outside the folder.
  std::string wrong = index;
  wrong.replace(wrong.find("00001-of"), 5, "00002");
  dir.Write("model.safetensors.index.json", wrong);
  EXPECT_TRUE(absl::StrContains(WeightFile::Open(dir.path()).status().message(), "not in shard"));
  dir.Write("model.safetensors.index.json", R"({"weight_map": {"x": "../etc/passwd"}})");
  EXPECT_TRUE(absl::StrContains(WeightFile::Open(dir.path()).status().message(), "plain file"));
}

TEST(SafetensorsTest, FolderOfShardsWithoutIndex) {
  TempDir dir;
  auto all = Qwen2Tensors(true);
  dir.Write("config.json", Qwen2Config(false));
  dir.Write("a.safetensors", Safetensors({all.begin(), all.begin() + 5}));
  dir.Write("b.safetensors", Safetensors({all.begin() + 5, all.end()}));
  auto f = WeightFile::Open(dir.path());
  ASSERT_TRUE(f.ok()) << f.status();
  EXPECT_EQ((*f)->tensors().size(), 15u);
  // The same tensor in two shards.
  dir.Write("c.safetensors", Safetensors({all[0]}));
  EXPECT_TRUE(absl::StrContains(WeightFile::Open(dir.path()).status().message(), "duplicate"));
}

TEST(SafetensorsTest, Qwen3AndLlamaNames) {
  TempDir dir;
  std::vector<StTensor> t = {
      {"model.embed_tokens.weight", "F32", {6, 8}, F32Bytes(48, 0)},
      {"model.norm.weight", "F32", {8}, F32Bytes(8, 0)},
  };
  for (int l = 0; l < 2; ++l) {
    std::string p = absl::StrCat("model.layers.", l, ".");
    for (auto [n, rows, cols] :
         std::vector<std::tuple<const char*, int, int>>{{"input_layernorm.weight", 8, 0},
                                                        {"self_attn.q_proj.weight", 8, 8},
                                                        {"self_attn.k_proj.weight", 4, 8},
                                                        {"self_attn.v_proj.weight", 4, 8},
                                                        {"self_attn.o_proj.weight", 8, 8},
                                                        {"self_attn.q_norm.weight", 4, 0},
                                                        {"self_attn.k_norm.weight", 4, 0},
                                                        {"post_attention_layernorm.weight", 8, 0},
                                                        {"mlp.gate_proj.weight", 12, 8},
                                                        {"mlp.up_proj.weight", 12, 8},
                                                        {"mlp.down_proj.weight", 8, 12}}) {
      std::vector<int64_t> shape =
          cols ? std::vector<int64_t>{rows, cols} : std::vector<int64_t>{rows};
      t.push_back({p + n, "F32", shape, F32Bytes(cols ? rows * cols : rows, 0)});
    }
  }
  dir.Write("config.json", R"({"architectures": ["Qwen3ForCausalLM"], "hidden_size": 8,
    "intermediate_size": 12, "num_attention_heads": 2, "num_key_value_heads": 1,
    "head_dim": 4, "num_hidden_layers": 2, "vocab_size": 6, "max_position_embeddings": 64,
    "rms_norm_eps": 1e-06, "rope_theta": 1000000, "tie_word_embeddings": true,
    "attention_bias": false})");
  dir.Write("model.safetensors", Safetensors(t));
  auto f = WeightFile::Open(dir.path());
  ASSERT_TRUE(f.ok()) << f.status();
  EXPECT_TRUE((*f)->HasTensor("blk.1.attn_q_norm.weight"));
  EXPECT_TRUE((*f)->HasTensor("blk.1.attn_k_norm.weight"));
  auto c = (*f)->ReadModelConfig();
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->architecture, "qwen3");
  EXPECT_TRUE(c->qk_norm);
  EXPECT_FALSE(c->attention_bias);
  EXPECT_TRUE(c->tied_embeddings);
  EXPECT_EQ(c->num_layers, 2);
}

// --- malformed files --------------------------------------------------------------------------

absl::Status OpenBytes(const std::string& bytes) {
  TempDir dir;
  return WeightFile::Open(dir.Write("x.safetensors", bytes)).status();
}

void ExpectError(const std::string& bytes, absl::string_view needle) {
  absl::Status s = OpenBytes(bytes);
  ASSERT_FALSE(s.ok()) << "expected error with " << needle;
  EXPECT_TRUE(absl::StrContains(s.message(), needle)) << s;
}

std::string WithHeader(const std::string& header, const std::string& data) {
  uint64_t len = header.size();
  return std::string(reinterpret_cast<const char*>(&len), 8) + header + data;
}

TEST(SafetensorsCorruptTest, NamedErrors) {
  ExpectError("abc", "truncated");
  ExpectError(WithHeader("", "") + std::string(8, '\0'), "not valid JSON");
  std::string huge_len(8, '\0');
  huge_len[6] = 1;  // 2^48
  ExpectError(huge_len + "{}", "exceeds 100 MB");
  std::string long_len(8, '\0');
  long_len[0] = 100;
  ExpectError(long_len + "{}", "past end of file");
  ExpectError(WithHeader("[1,2]", ""), "not a JSON object");
  ExpectError(WithHeader(R"({"a":{"dtype":"Q9","shape":[1],"data_offsets":[0,4]}})", "xxxx"),
              "unknown dtype");
  ExpectError(WithHeader(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,4]}})", "xxxxxxxx"),
              "do not hold");
  ExpectError(WithHeader(R"({"a":{"dtype":"F32","shape":[-1],"data_offsets":[0,4]}})", "xxxx"),
              "non-negative");
  ExpectError(WithHeader(R"({"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}})", "xxxx"),
              "past EOF");
  ExpectError(WithHeader(R"({"a":{"dtype":"F32","shape":[4611686018427387904,4],)"
                         R"("data_offsets":[0,16]}})",
                         "xxxx"),
              "overflows");
  ExpectError(WithHeader(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                         R"("b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})",
                         std::string(12, 'x')),
              "overlapping");
  ExpectError(WithHeader(R"({"a":{"dtype":"F32","shape":[1]}})", "xxxx"), "data_offsets");
  ExpectError(WithHeader(R"({"a":5})", ""), "not an object");
  // Two HF names that map to one canonical name.
  ExpectError(WithHeader(R"({"lm_head.weight":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},)"
                         R"("output.weight":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})",
                         std::string(8, 'x')),
              "duplicate");
  // Unsupported dtypes parse, but do not read as fp32.
  TempDir dir;
  auto f = WeightFile::Open(dir.Write(
      "i.safetensors",
      WithHeader(R"({"ids":{"dtype":"I64","shape":[1],"data_offsets":[0,8]}})", "xxxxxxxx")));
  ASSERT_TRUE(f.ok()) << f.status();
  EXPECT_EQ((*f)->ReadF32("ids").status().code(), absl::StatusCode::kUnimplemented);
}

TEST(SafetensorsCorruptTest, EveryTruncationIsAnError) {
  const std::string good = Safetensors(Qwen2Tensors(true));
  ASSERT_TRUE(OpenBytes(good).ok());
  TempDir dir;
  for (size_t n = 0; n < good.size(); n += (n < 1200 ? 1 : 5)) {
    auto f = WeightFile::Open(dir.Write("t.safetensors", good.substr(0, n)));
    ASSERT_FALSE(f.ok()) << n;
  }
}

TEST(SafetensorsCorruptTest, DirectoryNeedsConfig) {
  TempDir dir;
  dir.Write("model.safetensors", Safetensors(Qwen2Tensors(true)));
  auto s = WeightFile::Open(dir.path()).status();
  EXPECT_EQ(s.code(), absl::StatusCode::kNotFound);
  EXPECT_TRUE(absl::StrContains(s.message(), "config.json")) << s;
}

}  // namespace
}  // namespace asynctls
