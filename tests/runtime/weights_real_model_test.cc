// The real SmolLM2-135M-Instruct Q4_1 GGUF (skipped when absent): metadata, config, and
// dequantized values against tests/data/weights/model_reference.txt (gguf Python package).
#include <cmath>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "asynctls/runtime/weights.h"
#include "gtest/gtest.h"
#include "runtime/weights_test_util.h"

namespace asynctls {
namespace {

class RealModelTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    if (!std::filesystem::exists(testing::ModelPath())) return;
    auto f = WeightFile::Open(testing::ModelPath());
    ASSERT_TRUE(f.ok()) << f.status();
    file_ = std::move(f).value().release();
  }
  static void TearDownTestSuite() {
    delete file_;
    file_ = nullptr;
  }
  void SetUp() override {
    if (file_ == nullptr) GTEST_SKIP() << "no model at " << testing::ModelPath();
  }
  static WeightFile* file_;
};
WeightFile* RealModelTest::file_ = nullptr;

TEST_F(RealModelTest, Metadata) {
  EXPECT_EQ(file_->format(), "gguf");
  EXPECT_EQ(file_->MetaString("general.architecture"), "llama");
  EXPECT_EQ(file_->MetaString("tokenizer.ggml.model"), "gpt2");
  EXPECT_EQ(file_->MetaString("tokenizer.ggml.pre"), "smollm");
  EXPECT_EQ(file_->MetaInt("llama.block_count"), 30);
  EXPECT_EQ(file_->MetaInt("tokenizer.ggml.bos_token_id"), 1);
  EXPECT_EQ(file_->MetaInt("tokenizer.ggml.add_bos_token"), 0);  // bool, false in this file
  EXPECT_NEAR(*file_->MetaFloat("llama.rope.freq_base"), 100000.0, 1e-3);
  auto tokens = file_->MetaStringArray("tokenizer.ggml.tokens");
  ASSERT_TRUE(tokens.has_value());
  EXPECT_EQ(tokens->size(), 49152u);
  auto types = file_->MetaIntArray("tokenizer.ggml.token_type");
  ASSERT_TRUE(types.has_value());
  EXPECT_EQ(types->size(), 49152u);
  auto merges = file_->MetaStringArray("tokenizer.ggml.merges");
  ASSERT_TRUE(merges.has_value());
  EXPECT_EQ(merges->size(), 48900u);
  EXPECT_FALSE(file_->MetaInt("general.architecture").has_value());
  EXPECT_FALSE(file_->MetaString("no.such.key").has_value());
  EXPECT_EQ(file_->tensors().size(), 272u);
}

TEST_F(RealModelTest, Config) {
  auto c = file_->ReadModelConfig();
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->architecture, "llama");
  EXPECT_EQ(c->num_layers, 30);
  EXPECT_EQ(c->hidden_size, 576);
  EXPECT_EQ(c->num_q_heads, 9);
  EXPECT_EQ(c->num_kv_heads, 3);
  EXPECT_EQ(c->head_dim, 64);
  EXPECT_EQ(c->rotary_dim, 64);
  EXPECT_EQ(c->ffn_size, 1536);
  EXPECT_EQ(c->vocab_size, 49152);
  EXPECT_EQ(c->max_context, 8192);
  EXPECT_FLOAT_EQ(c->rope_theta, 100000.f);
  EXPECT_FLOAT_EQ(c->rms_eps, 1e-5f);
  EXPECT_EQ(c->rope_scaling.type, RopeScaling::Type::kNone);
  EXPECT_TRUE(c->rope_freq_factors.empty());
  EXPECT_EQ(c->rope_style, kernels::RopeStyle::kInterleaved);
  EXPECT_TRUE(c->tied_embeddings);
  EXPECT_FALSE(c->qk_norm);
  EXPECT_FALSE(c->attention_bias);
}

TEST_F(RealModelTest, ShapesAreRowMajor) {
  for (const WeightTensorInfo& t : file_->tensors()) {
    if (t.name == "token_embd.weight") {
      EXPECT_EQ(t.shape, (std::vector<int64_t>{49152, 576}));
      EXPECT_EQ(t.source_type, "Q8_0");
    } else if (t.name == "blk.0.attn_k.weight") {
      EXPECT_EQ(t.shape, (std::vector<int64_t>{192, 576}));
      EXPECT_EQ(t.source_type, "Q4_1");
    } else if (t.name == "blk.0.ffn_down.weight") {
      EXPECT_EQ(t.shape, (std::vector<int64_t>{576, 1536}));
    } else if (t.name == "output_norm.weight") {
      EXPECT_EQ(t.shape, (std::vector<int64_t>{576}));
      EXPECT_EQ(t.source_type, "F32");
    }
  }
  EXPECT_TRUE(file_->HasTensor("blk.29.ffn_up.weight"));
  EXPECT_FALSE(file_->HasTensor("output.weight"));
  EXPECT_EQ(file_->ReadF32("output.weight").status().code(), absl::StatusCode::kNotFound);
}

// model_reference.txt: "tensor NAME TYPE ROWS COLS", "first64 v...", "rowsums r:s ...",
// "total s".
TEST_F(RealModelTest, DequantizedValuesMatchGgufPython) {
  std::ifstream in(std::string(ASYNCTLS_SOURCE_DIR) + "/tests/data/weights/model_reference.txt");
  ASSERT_TRUE(in.good());
  std::string line;
  std::vector<float> vals;
  int64_t cols = 0;
  int checked = 0;
  while (std::getline(in, line)) {
    std::istringstream ls(line);
    std::string tag;
    ls >> tag;
    if (tag == "tensor") {
      std::string name, type;
      int64_t rows;
      ls >> name >> type >> rows >> cols;
      SCOPED_TRACE(name);
      auto r = file_->ReadF32(name);
      ASSERT_TRUE(r.ok()) << r.status();
      vals = std::move(r).value();
      ASSERT_EQ(static_cast<int64_t>(vals.size()), rows * cols);
      ++checked;
    } else if (tag == "first64") {
      for (int i = 0; i < 64; ++i) {
        float expect;
        ls >> expect;
        ASSERT_EQ(vals[i], expect) << "index " << i;  // same fp16 math: bit-exact
      }
    } else if (tag == "rowsums") {
      std::string item;
      while (ls >> item) {
        int64_t row = std::stoll(item.substr(0, item.find(':')));
        double expect = std::stod(item.substr(item.find(':') + 1));
        double sum = 0;
        for (int64_t c = 0; c < cols; ++c) sum += vals[row * cols + c];
        EXPECT_NEAR(sum, expect, 1e-6 * (1 + std::fabs(expect))) << "row " << row;
      }
    } else if (tag == "total") {
      double expect, sum = 0;
      ls >> expect;
      for (float v : vals) sum += v;
      EXPECT_NEAR(sum, expect, 1e-7 * (1 + std::fabs(expect)));
    }
  }
  EXPECT_EQ(checked, 4);
}

}  // namespace
}  // namespace asynctls
