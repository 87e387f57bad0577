// Tokenizer against independent implementations: llama.cpp on SmolLM2's GGUF vocabulary and
// Hugging Face `tokenizers` on small Qwen2 / Llama 3 / GPT-2 style vocabularies. The reference
// ids come from tools/make_tokenizer_reference.py (tests/data/tokenizer/).
#include "asynctls/runtime/tokenizer.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "asynctls/runtime/weights.h"
#include "runtime/weights_test_util.h"

namespace asynctls {
namespace {

using json = nlohmann::json;

std::string DataDir() { return std::string(ASYNCTLS_SOURCE_DIR) + "/tests/data/tokenizer"; }

json ReadJson(const std::string& path) {
  std::ifstream in(path);
  EXPECT_TRUE(in.good()) << "cannot open " << path;
  std::stringstream buffer;
  buffer << in.rdbuf();
  return json::parse(buffer.str());
}

std::vector<ChatMessage> Messages(const json& messages) {
  std::vector<ChatMessage> out;
  for (const json& m : messages)
    out.push_back({m["role"].get<std::string>(), m["content"].get<std::string>()});
  return out;
}

// Every reference case: exact ids, and decoding them gives the text back.
void ExpectMatchesReference(const Tokenizer& tokenizer, const json& reference) {
  for (const json& c : reference["cases"]) {
    const std::string name = c["name"];
    const std::string text = c["text"];
    auto ids = tokenizer.Encode(text, /*parse_special=*/true);
    ASSERT_TRUE(ids.ok()) << name << ": " << ids.status();
    EXPECT_EQ(*ids, c["ids"].get<std::vector<int32_t>>()) << name;
    EXPECT_EQ(tokenizer.Decode(*ids), text) << name;
    if (c.contains("ids_no_special")) {
      auto plain = tokenizer.Encode(text, /*parse_special=*/false);
      ASSERT_TRUE(plain.ok()) << name << ": " << plain.status();
      EXPECT_EQ(*plain, c["ids_no_special"].get<std::vector<int32_t>>()) << name;
      EXPECT_EQ(tokenizer.Decode(*plain), text) << name;
    }
  }
  for (const json& chat : reference["chats"]) {
    const std::string rendered = tokenizer.ApplyChatTemplate(Messages(chat["messages"]));
    EXPECT_EQ(rendered, chat["rendered"].get<std::string>()) << chat["messages"].dump();
    auto ids = tokenizer.Encode(rendered);
    ASSERT_TRUE(ids.ok()) << ids.status();
    EXPECT_EQ(*ids, chat["ids"].get<std::vector<int32_t>>()) << chat["messages"].dump();
  }
}

// ~100 KB of mixed prose, code, numbers and Unicode with many repeated and some unique words.
std::string LargeText() {
  std::string text;
  int i = 0;
  while (text.size() < 100 * 1024) {
    text += "The quick brown fox jumps over the lazy dog, " + std::to_string(i * 7919) +
            " times; don't ask why. Ünïcödé café 日本語 😀\n    def f" + std::to_string(i) +
            "(x):\n        return x * " + std::to_string(i % 97) + "\n";
    ++i;
  }
  return text;
}

// --- UTF-8 helpers ----------------------------------------------------------------------------

TEST(Utf8Test, ValidAndInvalid) {
  EXPECT_TRUE(IsValidUtf8(""));
  EXPECT_TRUE(IsValidUtf8("plain ascii"));
  EXPECT_TRUE(IsValidUtf8("caf\xC3\xA9 \xE6\x97\xA5 \xF0\x9F\x98\x80"));
  EXPECT_TRUE(IsValidUtf8("\xED\x9F\xBF"));          // U+D7FF, just below the surrogates
  EXPECT_TRUE(IsValidUtf8("\xEE\x80\x80"));          // U+E000, just above
  EXPECT_TRUE(IsValidUtf8("\xF4\x8F\xBF\xBF"));      // U+10FFFF
  EXPECT_TRUE(IsValidUtf8(std::string("a\0b", 3)));  // NUL is a character

  EXPECT_FALSE(IsValidUtf8("\x80"));              // stray continuation
  EXPECT_FALSE(IsValidUtf8("\xC3"));              // truncated
  EXPECT_FALSE(IsValidUtf8("\xE6\x97"));          // truncated
  EXPECT_FALSE(IsValidUtf8("\xC0\xAF"));          // overlong '/'
  EXPECT_FALSE(IsValidUtf8("\xC1\xBF"));          // overlong
  EXPECT_FALSE(IsValidUtf8("\xE0\x80\xAF"));      // overlong 3-byte
  EXPECT_FALSE(IsValidUtf8("\xF0\x80\x80\xAF"));  // overlong 4-byte
  EXPECT_FALSE(IsValidUtf8("\xED\xA0\x80"));      // U+D800 surrogate
  EXPECT_FALSE(IsValidUtf8("\xED\xBF\xBF"));      // U+DFFF surrogate
  EXPECT_FALSE(IsValidUtf8("\xF4\x90\x80\x80"));  // U+110000
  EXPECT_FALSE(IsValidUtf8("\xF5\x80\x80\x80"));
  EXPECT_FALSE(IsValidUtf8("\xFF"));
  EXPECT_FALSE(IsValidUtf8("\xC3\x28"));  // lead followed by ASCII
  EXPECT_FALSE(IsValidUtf8("\xE6\x97\x28"));
}

TEST(Utf8Test, CompletePrefix) {
  EXPECT_EQ(Utf8CompletePrefix(""), 0u);
  EXPECT_EQ(Utf8CompletePrefix("abc"), 3u);
  const std::string emoji = "\xF0\x9F\x98\x80";
  for (size_t cut = 1; cut < emoji.size(); ++cut) {
    EXPECT_EQ(Utf8CompletePrefix("ab" + emoji.substr(0, cut)), 2u) << cut;
  }
  EXPECT_EQ(Utf8CompletePrefix("ab" + emoji), 6u);
  EXPECT_EQ(Utf8CompletePrefix("\xC3"), 0u);
  EXPECT_EQ(Utf8CompletePrefix("x\xE6\x97"), 1u);
  EXPECT_EQ(Utf8CompletePrefix("x\xE6\x97\xA5"), 4u);
  // Bytes that can never complete a character are not held back.
  EXPECT_EQ(Utf8CompletePrefix("x\x80"), 2u);
  EXPECT_EQ(Utf8CompletePrefix("x\xFF"), 2u);
  EXPECT_EQ(Utf8CompletePrefix("x\xED\xA0"), 3u);  // would be a surrogate
  EXPECT_EQ(Utf8CompletePrefix("x\xE0\x80"), 3u);  // would be overlong
  EXPECT_EQ(Utf8CompletePrefix("x\x80\x80\x80\x80"), 5u);
}

// --- tokenizer.json vocabularies trained with Hugging Face tokenizers ---------------------------

class HfStyleTest : public ::testing::TestWithParam<std::string> {};

TEST_P(HfStyleTest, MatchesHuggingFaceTokenizers) {
  const std::string dir = DataDir() + "/" + GetParam();
  auto tokenizer = Tokenizer::FromHfJson(dir + "/tokenizer.json");
  ASSERT_TRUE(tokenizer.ok()) << tokenizer.status();
  const json reference = ReadJson(dir + "/ids.json");
  EXPECT_EQ((*tokenizer)->vocab_size(), reference["vocab_size"].get<int32_t>());
  EXPECT_EQ((*tokenizer)->eos_id(), reference["eos_id"].get<int32_t>());
  EXPECT_EQ((*tokenizer)->bos_id(), -1);
  EXPECT_FALSE((*tokenizer)->add_bos());
  ExpectMatchesReference(**tokenizer, reference);
}

// The same vocabularies written as GGUF metadata and named by `tokenizer.ggml.pre`: checks the
// GGUF loader and the built-in pre-tokenizer table against the same reference ids.
TEST_P(HfStyleTest, GgufMetadataMatchesHuggingFaceTokenizers) {
  const std::string dir = DataDir() + "/" + GetParam();
  const json hf = ReadJson(dir + "/tokenizer.json");
  std::vector<std::string> tokens(hf["model"]["vocab"].size());
  std::vector<int32_t> types(tokens.size(), 1);
  for (const auto& [text, id] : hf["model"]["vocab"].items()) tokens[id.get<size_t>()] = text;
  for (const json& added : hf["added_tokens"]) {
    const size_t id = added["id"];
    if (id >= tokens.size()) {
      tokens.resize(id + 1);
      types.resize(id + 1, 5);
    }
    tokens[id] = added["content"];
    types[id] = added["special"].get<bool>() ? 3 : 4;
  }
  std::vector<std::string> merges;
  for (const json& m : hf["model"]["merges"]) {
    merges.push_back(m.is_string() ? m.get<std::string>()
                                   : m[0].get<std::string>() + " " + m[1].get<std::string>());
  }
  const std::string pre = GetParam() == "qwen2_style"    ? "qwen2"
                          : GetParam() == "llama3_style" ? "llama-bpe"
                                                         : "gpt2";
  const json reference = ReadJson(dir + "/ids.json");
  testing::GgufBuilder builder;
  builder.String("general.architecture", "llama")
      .String("tokenizer.ggml.model", "gpt2")
      .String("tokenizer.ggml.pre", pre)
      .StringArray("tokenizer.ggml.tokens", tokens)
      .I32Array("tokenizer.ggml.token_type", types)
      .StringArray("tokenizer.ggml.merges", merges)
      .U32("tokenizer.ggml.eos_token_id", reference["eos_id"].get<uint32_t>())
      .Bool("tokenizer.ggml.add_bos_token", false)
      .String("tokenizer.chat_template",
              ReadJson(dir + "/tokenizer_config.json")["chat_template"].get<std::string>());
  auto file = WeightFile::OpenGgufBytes(builder.Build());
  ASSERT_TRUE(file.ok()) << file.status();
  auto tokenizer = Tokenizer::FromGguf(**file);
  ASSERT_TRUE(tokenizer.ok()) << tokenizer.status();
  ExpectMatchesReference(**tokenizer, reference);
}

INSTANTIATE_TEST_SUITE_P(Styles, HfStyleTest,
                         ::testing::Values("qwen2_style", "llama3_style", "gpt2_style"));

// A hand-made vocabulary: the 256 byte tokens (ids 0..255 in byte order, GPT-2's byte-level
// spelling) followed by `extra` tokens, with the given merges.
std::unique_ptr<Tokenizer> HandMadeTokenizer(const std::string& pre,
                                             const std::vector<std::string>& extra,
                                             const std::vector<std::string>& merges) {
  std::vector<std::string> tokens;
  uint32_t next_free = 256;
  for (int b = 0; b < 256; ++b) {
    const bool printable = (b >= 0x21 && b <= 0x7E) || (b >= 0xA1 && b <= 0xAC) || b >= 0xAE;
    const uint32_t cp = printable ? b : next_free++;
    std::string text;
    if (cp < 0x80) {
      text.push_back(static_cast<char>(cp));
    } else {
      text.push_back(static_cast<char>(0xC0 | (cp >> 6)));
      text.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
    }
    tokens.push_back(text);
  }
  tokens.insert(tokens.end(), extra.begin(), extra.end());
  testing::GgufBuilder builder;
  builder.String("tokenizer.ggml.model", "gpt2")
      .String("tokenizer.ggml.pre", pre)
      .StringArray("tokenizer.ggml.tokens", tokens)
      .StringArray("tokenizer.ggml.merges", merges);
  auto file = WeightFile::OpenGgufBytes(builder.Build());
  EXPECT_TRUE(file.ok()) << file.status();
  if (!file.ok()) return nullptr;
  auto tokenizer = Tokenizer::FromGguf(**file);
  EXPECT_TRUE(tokenizer.ok()) << tokenizer.status();
  return tokenizer.ok() ? *std::move(tokenizer) : nullptr;
}

std::vector<int32_t> Ids(const Tokenizer& tokenizer, const std::string& text) {
  auto ids = tokenizer.Encode(text);
  EXPECT_TRUE(ids.ok()) << ids.status();
  return ids.ok() ? *ids : std::vector<int32_t>{};
}

TEST(TokenizerTest, MergeOrderFollowsRankThenPosition) {
  // 256 "ab", 257 "bc", 258 "aa"; "b c" outranks "a b".
  auto t = HandMadeTokenizer("gpt2", {"ab", "bc", "aa"}, {"b c", "a b", "a a"});
  ASSERT_NE(t, nullptr);
  EXPECT_EQ(Ids(*t, "abc"), (std::vector<int32_t>{'a', 257}));
  EXPECT_EQ(Ids(*t, "ab"), (std::vector<int32_t>{256}));
  EXPECT_EQ(Ids(*t, "aaa"), (std::vector<int32_t>{258, 'a'}));  // leftmost pair first
  EXPECT_EQ(Ids(*t, "aaaa"), (std::vector<int32_t>{258, 258}));
  EXPECT_EQ(t->Decode({258, 'a', 257}), "aaabc");
}

TEST(TokenizerTest, IgnoreMergesEmitsWholeWordTokens) {
  // "abc" is a token but no merge builds it: Llama 3 vocabularies use it whole anyway.
  const std::vector<std::string> extra = {"ab", "abc"};
  auto gpt2 = HandMadeTokenizer("gpt2", extra, {"a b"});
  auto llama3 = HandMadeTokenizer("llama-bpe", extra, {"a b"});
  ASSERT_NE(gpt2, nullptr);
  ASSERT_NE(llama3, nullptr);
  EXPECT_EQ(Ids(*gpt2, "abc"), (std::vector<int32_t>{256, 'c'}));
  EXPECT_EQ(Ids(*llama3, "abc"), (std::vector<int32_t>{257}));
}

TEST(TokenizerTest, DigitSplittingDependsOnPre) {
  // Merges that would join digits: only pre-tokenizers that keep digits together can use them.
  const std::vector<std::string> extra = {"12", "123", "1234"};
  const std::vector<std::string> merges = {"1 2", "12 3", "123 4"};
  auto gpt2 = HandMadeTokenizer("gpt2", extra, merges);
  auto smollm = HandMadeTokenizer("smollm", extra, merges);
  auto qwen2 = HandMadeTokenizer("qwen2", extra, merges);
  auto llama3 = HandMadeTokenizer("llama-bpe", extra, merges);
  ASSERT_TRUE(gpt2 && smollm && qwen2 && llama3);
  EXPECT_EQ(Ids(*gpt2, "1234"), (std::vector<int32_t>{258}));
  EXPECT_EQ(Ids(*smollm, "1234"), (std::vector<int32_t>{'1', '2', '3', '4'}));
  EXPECT_EQ(Ids(*qwen2, "1234"), (std::vector<int32_t>{'1', '2', '3', '4'}));
  EXPECT_EQ(Ids(*llama3, "1234"), (std::vector<int32_t>{257, '4'}));  // runs of three
  // SmolLM splits digits out of words too ("a1" stays together under GPT-2's " ?\p{L}+").
  EXPECT_EQ(Ids(*smollm, "x12y"), (std::vector<int32_t>{'x', '1', '2', 'y'}));
  EXPECT_EQ(Ids(*gpt2, "x12y"), (std::vector<int32_t>{'x', 256, 'y'}));
}

TEST(TokenizerTest, UserDefinedTokenMatchedWithoutSpecialParsing) {
  auto tokenizer = Tokenizer::FromHfJson(DataDir() + "/qwen2_style");  // a folder works too
  ASSERT_TRUE(tokenizer.ok()) << tokenizer.status();
  auto with = (*tokenizer)->Encode("a<tool_call>b<|im_end|>", /*parse_special=*/false);
  ASSERT_TRUE(with.ok());
  const int32_t im_end = (*tokenizer)->eos_id();
  const json vocab = ReadJson(DataDir() + "/qwen2_style/tokenizer.json");
  int32_t tool_call = -1;
  for (const json& added : vocab["added_tokens"]) {
    if (added["content"] == "<tool_call>") tool_call = added["id"];
  }
  ASSERT_GE(tool_call, 0);
  EXPECT_NE(std::find(with->begin(), with->end(), tool_call), with->end());
  EXPECT_EQ(std::find(with->begin(), with->end(), im_end), with->end());
  EXPECT_EQ((*tokenizer)->Decode(*with), "a<tool_call>b<|im_end|>");
}

TEST(TokenizerTest, RejectsInvalidUtf8) {
  auto tokenizer = Tokenizer::FromHfJson(DataDir() + "/gpt2_style/tokenizer.json");
  ASSERT_TRUE(tokenizer.ok()) << tokenizer.status();
  auto ids = (*tokenizer)->Encode("bad \xC0\xAF byte");
  EXPECT_EQ(ids.status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(TokenizerTest, LoaderErrors) {
  EXPECT_EQ(Tokenizer::FromHfJson(DataDir() + "/no_such_dir/tokenizer.json").status().code(),
            absl::StatusCode::kNotFound);

  testing::GgufBuilder no_tokenizer;
  no_tokenizer.String("general.architecture", "llama");
  auto file = WeightFile::OpenGgufBytes(no_tokenizer.Build());
  ASSERT_TRUE(file.ok()) << file.status();
  EXPECT_EQ(Tokenizer::FromGguf(**file).status().code(), absl::StatusCode::kNotFound);

  testing::GgufBuilder unknown_pre;
  unknown_pre.String("tokenizer.ggml.model", "gpt2")
      .String("tokenizer.ggml.pre", "no-such-pre")
      .StringArray("tokenizer.ggml.tokens", {"a", "b"})
      .StringArray("tokenizer.ggml.merges", {"a b"});
  file = WeightFile::OpenGgufBytes(unknown_pre.Build());
  ASSERT_TRUE(file.ok()) << file.status();
  auto status = Tokenizer::FromGguf(**file).status();
  EXPECT_EQ(status.code(), absl::StatusCode::kUnimplemented);
  EXPECT_NE(status.message().find("no-such-pre"), std::string::npos) << status;

  testing::GgufBuilder spm;
  spm.String("tokenizer.ggml.model", "llama").StringArray("tokenizer.ggml.tokens", {"a"});
  file = WeightFile::OpenGgufBytes(spm.Build());
  ASSERT_TRUE(file.ok()) << file.status();
  EXPECT_EQ(Tokenizer::FromGguf(**file).status().code(), absl::StatusCode::kUnimplemented);

  testing::GgufBuilder bad_eos;
  bad_eos.String("tokenizer.ggml.model", "gpt2")
      .StringArray("tokenizer.ggml.tokens", {"a", "b"})
      .StringArray("tokenizer.ggml.merges", {"a b"})
      .U32("tokenizer.ggml.eos_token_id", 7);
  file = WeightFile::OpenGgufBytes(bad_eos.Build());
  ASSERT_TRUE(file.ok()) << file.status();
  status = Tokenizer::FromGguf(**file).status();
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(status.message().find("eos_token_id"), std::string::npos) << status;
}

// --- SmolLM2's GGUF against llama.cpp ----------------------------------------------------------

class SmolLm2Test : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    if (!std::filesystem::exists(testing::ModelPath())) return;
    auto file = WeightFile::Open(testing::ModelPath());
    ASSERT_TRUE(file.ok()) << file.status();
    auto tokenizer = Tokenizer::FromGguf(**file);
    ASSERT_TRUE(tokenizer.ok()) << tokenizer.status();
    tokenizer_ = tokenizer->release();
  }
  static void TearDownTestSuite() {
    delete tokenizer_;
    tokenizer_ = nullptr;
  }
  void SetUp() override {
    if (tokenizer_ == nullptr) GTEST_SKIP() << "no model at " << testing::ModelPath();
  }
  static Tokenizer* tokenizer_;
};
Tokenizer* SmolLm2Test::tokenizer_ = nullptr;

TEST_F(SmolLm2Test, MatchesLlamaCpp) {
  const json reference = ReadJson(DataDir() + "/smollm2_ids.json");
  EXPECT_EQ(tokenizer_->vocab_size(), reference["vocab_size"].get<int32_t>());
  EXPECT_EQ(tokenizer_->bos_id(), reference["bos_id"].get<int32_t>());
  EXPECT_EQ(tokenizer_->eos_id(), reference["eos_id"].get<int32_t>());
  ExpectMatchesReference(*tokenizer_, reference);
}

TEST_F(SmolLm2Test, Metadata) {
  EXPECT_FALSE(tokenizer_->add_bos());
  // eos is <|im_end|> (2); <|endoftext|> (0) also ends generation.
  EXPECT_EQ(tokenizer_->stop_ids(), (std::vector<int32_t>{2, 0}));
  EXPECT_EQ(tokenizer_->TokenBytes(1), "<|im_start|>");
  EXPECT_EQ(tokenizer_->TokenBytes(216), " ");
  EXPECT_EQ(tokenizer_->TokenBytes(198), "\n");
  EXPECT_EQ(tokenizer_->TokenBytes(-1), "");
  EXPECT_EQ(tokenizer_->TokenBytes(tokenizer_->vocab_size()), "");
}

TEST_F(SmolLm2Test, DefaultSystemPrompt) {
  EXPECT_EQ(tokenizer_->ApplyChatTemplate({{"user", "Hi"}}),
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
            "Face<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n");
  EXPECT_EQ(tokenizer_->ApplyChatTemplate({{"system", "S"}, {"user", "Hi"}}),
            "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
            "<|im_start|>assistant\n");
}

TEST_F(SmolLm2Test, StreamedDecodeNeverSplitsACharacter) {
  const std::string text = "日本語 😀 café naïve 👨‍👩‍👧‍👦!";
  auto ids = tokenizer_->Encode(text);
  ASSERT_TRUE(ids.ok());
  std::string pending, streamed;
  for (int32_t id : *ids) {
    pending += tokenizer_->TokenBytes(id);
    const size_t complete = Utf8CompletePrefix(pending);
    const std::string delta = pending.substr(0, complete);
    EXPECT_TRUE(IsValidUtf8(delta));
    streamed += delta;
    pending.erase(0, complete);
  }
  EXPECT_TRUE(pending.empty());
  EXPECT_EQ(streamed, text);
}

TEST_F(SmolLm2Test, LargeTextIsFastAndRoundTrips) {
  const std::string text = LargeText();
  const auto start = std::chrono::steady_clock::now();
  auto ids = tokenizer_->Encode(text);
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  ASSERT_TRUE(ids.ok());
  EXPECT_EQ(tokenizer_->Decode(*ids), text);
  // Well under a second even in a debug build on a shared machine.
  EXPECT_LT(seconds, 0.5) << ids->size() << " tokens";
  std::printf("encoded %zu bytes into %zu tokens in %.1f ms\n", text.size(), ids->size(),
              seconds * 1e3);
}

TEST_F(SmolLm2Test, ConcurrentEncodeAgrees) {
  const std::string text = LargeText().substr(0, 20000);
  auto expected = tokenizer_->Encode(text);
  ASSERT_TRUE(expected.ok());
  std::vector<std::thread> threads;
  std::vector<std::vector<int32_t>> results(4);
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] { results[t] = *tokenizer_->Encode(text.substr(t * 7)); });
  }
  for (auto& thread : threads) thread.join();
  for (int t = 0; t < 4; ++t) {
    auto single = tokenizer_->Encode(text.substr(t * 7));
    EXPECT_EQ(results[t], *single) << t;
  }
}

}  // namespace
}  // namespace asynctls
