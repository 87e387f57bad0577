// Channel calibration (issue 4, item 1): the channel-set file format and its loader, and a
// calibration of the real SmolLM2 over ~1K tokens of text through the attention capture.
#include "asynctls/runtime/channel_calibration.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <set>
#include <sstream>
#include <string>

#include "asynctls/runtime/channel_sets.h"
#include "asynctls/runtime/engine.h"
#include "asynctls/runtime/tokenizer.h"
#include "asynctls/runtime/weights.h"
#include "runtime/model_test_util.h"

namespace asynctls {
namespace {

ChannelSets SmallSets() {
  ChannelSets s;
  s.model = "m \"quoted\"";
  s.source = "text.txt";
  s.num_tokens = 5;
  s.num_layers = 2;
  s.num_q_heads = 4;
  s.num_kv_heads = 2;
  s.head_dim = 16;
  s.num_channels = 8;
  for (int r = 0; r < 4; ++r)
    for (int i = 0; i < 8; ++i) s.channels.push_back(2 * i + (r % 2));
  return s;
}

TEST(ChannelSets, JsonRoundTrip) {
  const ChannelSets s = SmallSets();
  ASSERT_TRUE(s.Validate().ok());
  const absl::StatusOr<ChannelSets> back = ChannelSetsFromJson(ChannelSetsToJson(s));
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_EQ(back->model, s.model);
  EXPECT_EQ(back->source, s.source);
  EXPECT_EQ(back->num_tokens, 5);
  EXPECT_EQ(back->num_layers, 2);
  EXPECT_EQ(back->num_kv_heads, 2);
  EXPECT_EQ(back->channels, s.channels);
  EXPECT_EQ(back->Layer(1)[8], 1);
}

TEST(ChannelSets, RejectsBadFiles) {
  ChannelSets s = SmallSets();
  s.channels[3] = s.channels[2];  // not distinct
  EXPECT_EQ(s.Validate().code(), absl::StatusCode::kInvalidArgument);
  s = SmallSets();
  s.channels[0] = 16;  // out of range (and out of order)
  EXPECT_EQ(s.Validate().code(), absl::StatusCode::kInvalidArgument);
  s = SmallSets();
  s.num_channels = 12;  // not a multiple of 8
  EXPECT_EQ(s.Validate().code(), absl::StatusCode::kInvalidArgument);

  std::string json = ChannelSetsToJson(SmallSets());
  const std::string key = "\"num_kv_heads\": 2";
  json.replace(json.find(key), key.size(), "\"num_kv_heads\": 3");
  const auto wrong_shape = ChannelSetsFromJson(json);
  EXPECT_EQ(wrong_shape.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(ChannelSetsFromJson("{\"format\": 1}").status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(ChannelSetsFromJson("not json").status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(LoadChannelSets("/nonexistent/channels.json").status().code(),
            absl::StatusCode::kNotFound);
}

// The real model over the first 1024 tokens of the GPL text: 30 layers x 3 KV heads x 32
// distinct channels in [0, 64), written and loaded back through the file.
TEST(ChannelCalibration, SmolLm2OverOneThousandTokens) {
  const std::string path = testing::SmolLm2Path();
  if (path.empty()) GTEST_SKIP() << "SmolLM2 not found (set ASYNCTLS_MODEL_PATH)";
  auto weights = WeightFile::Open(path);
  ASSERT_TRUE(weights.ok()) << weights.status();
  auto tokenizer = Tokenizer::FromGguf(**weights);
  ASSERT_TRUE(tokenizer.ok()) << tokenizer.status();
  std::ifstream in(std::string(ASYNCTLS_SOURCE_DIR) + "/tests/data/prompts/gpl-2.txt");
  std::stringstream text;
  text << in.rdbuf();
  auto tokens = (*tokenizer)->Encode(text.str());
  ASSERT_TRUE(tokens.ok()) << tokens.status();
  ASSERT_GE(tokens->size(), 1024u);
  tokens->resize(1024);

  std::unique_ptr<Backend> backend = MakeCpuBackend();
  ModelLoadOptions options;
  options.max_batch_seqs = 1;
  auto model = Model::Load(**weights, backend.get(), options);
  ASSERT_TRUE(model.ok()) << model.status();
  const ModelConfig& c = (*model)->config();
  ChannelCalibrator calibrator(c);
  int calls = 0;
  const absl::Status run =
      PrefillWithCapture(**model, *backend, *tokens, 512, [&](const AttentionCapture& a) {
        ++calls;
        ASSERT_EQ(a.num_tokens, 512);
        ASSERT_EQ(a.positions[0] % 512, 0);
        calibrator.Add(a);
      });
  ASSERT_TRUE(run.ok()) << run;
  EXPECT_EQ(calls, 2 * c.num_layers);
  EXPECT_EQ(calibrator.num_tokens(), 1024);
  EXPECT_EQ(calibrator.Select(12).status().code(), absl::StatusCode::kInvalidArgument);
  auto sets = calibrator.Select(32);
  ASSERT_TRUE(sets.ok()) << sets.status();

  const std::string file = (std::filesystem::temp_directory_path() /
                            ("channels_" + std::to_string(::getpid()) + ".json"))
                               .string();
  ASSERT_TRUE(WriteChannelSets(*sets, file).ok());
  auto loaded = LoadChannelSets(file);
  std::filesystem::remove(file);
  ASSERT_TRUE(loaded.ok()) << loaded.status();
  EXPECT_EQ(loaded->num_layers, 30);
  EXPECT_EQ(loaded->num_kv_heads, 3);
  EXPECT_EQ(loaded->num_channels, 32);
  EXPECT_EQ(loaded->num_tokens, 1024);
  ASSERT_EQ(loaded->channels.size(), 30u * 3 * 32);
  int differing_rows = 0;
  for (int l = 0; l < 30; ++l) {
    for (int g = 0; g < 3; ++g) {
      const int32_t* row = loaded->Layer(l) + g * 32;
      const std::set<int32_t> distinct(row, row + 32);
      EXPECT_EQ(distinct.size(), 32u);
      EXPECT_GE(*distinct.begin(), 0);
      EXPECT_LT(*distinct.rbegin(), 64);
      differing_rows += std::set<int32_t>(loaded->Layer(0), loaded->Layer(0) + 32) != distinct;
    }
  }
  EXPECT_GT(differing_rows, 0);  // statistics, not a constant answer
}

}  // namespace
}  // namespace asynctls
