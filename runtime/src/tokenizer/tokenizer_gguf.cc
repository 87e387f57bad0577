// Tokenizer::FromGguf: llama.cpp's tokenizer.ggml.* metadata -> BpeVocab.
#include "absl/strings/str_cat.h"
#include "asynctls/runtime/status.h"
#include "asynctls/runtime/tokenizer.h"
#include "asynctls/runtime/weights.h"
#include "tokenizer/bpe_tokenizer.h"

namespace asynctls {

using tokenizer_internal::BpeVocab;

absl::StatusOr<std::unique_ptr<Tokenizer>> Tokenizer::FromGguf(const WeightFile& file) {
  const std::optional<std::string> model = file.MetaString("tokenizer.ggml.model");
  if (!model.has_value()) {
    return absl::NotFoundError("weight file has no tokenizer (tokenizer.ggml.model missing)");
  }
  if (*model != "gpt2") {
    return absl::UnimplementedError(absl::StrCat(
        "tokenizer.ggml.model = \"", *model, "\": only byte-level BPE (\"gpt2\") is supported"));
  }
  BpeVocab vocab;
  std::optional<std::vector<std::string>> tokens = file.MetaStringArray("tokenizer.ggml.tokens");
  if (!tokens.has_value() || tokens->empty()) {
    return absl::InvalidArgumentError("tokenizer.ggml.tokens is missing or empty");
  }
  vocab.tokens = std::move(*tokens);

  if (std::optional<std::vector<int64_t>> types = file.MetaIntArray("tokenizer.ggml.token_type")) {
    if (types->size() != vocab.tokens.size()) {
      return absl::InvalidArgumentError(absl::StrCat("tokenizer.ggml.token_type has ",
                                                     types->size(), " entries for ",
                                                     vocab.tokens.size(), " tokens"));
    }
    vocab.token_types.assign(types->begin(), types->end());
  }

  std::optional<std::vector<std::string>> merges = file.MetaStringArray("tokenizer.ggml.merges");
  if (!merges.has_value()) return absl::InvalidArgumentError("tokenizer.ggml.merges is missing");
  vocab.merges.reserve(merges->size());
  for (const std::string& line : *merges) {
    auto merge = tokenizer_internal::SplitMergeLine(line);
    if (!merge.ok()) {
      return absl::InvalidArgumentError(
          absl::StrCat("tokenizer.ggml.merges: ", merge.status().message()));
    }
    vocab.merges.push_back(*std::move(merge));
  }

  const std::string pre = file.MetaString("tokenizer.ggml.pre").value_or("default");
  auto pre_tokenizer = tokenizer_internal::PreTokenizer::ForGgufPre(pre, &vocab.ignore_merges);
  if (!pre_tokenizer.ok()) return pre_tokenizer.status();
  vocab.pre_tokenizer = *std::move(pre_tokenizer);

  const int64_t n = static_cast<int64_t>(vocab.tokens.size());
  auto read_id = [&](const char* key, int32_t* id) -> absl::Status {
    std::optional<int64_t> value = file.MetaInt(key);
    if (!value.has_value()) return absl::OkStatus();
    if (*value < 0 || *value >= n) {
      return absl::InvalidArgumentError(
          absl::StrCat(key, " = ", *value, " is outside the vocabulary of ", n, " tokens"));
    }
    *id = static_cast<int32_t>(*value);
    return absl::OkStatus();
  };
  ASYNCTLS_RETURN_IF_ERROR(read_id("tokenizer.ggml.bos_token_id", &vocab.bos_id));
  ASYNCTLS_RETURN_IF_ERROR(read_id("tokenizer.ggml.eos_token_id", &vocab.eos_id));
  ASYNCTLS_RETURN_IF_ERROR(read_id("tokenizer.ggml.unknown_token_id", &vocab.unk_id));
  for (const char* key : {"tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"}) {
    int32_t id = -1;
    ASYNCTLS_RETURN_IF_ERROR(read_id(key, &id));
    if (id >= 0) vocab.extra_stop_ids.push_back(id);
  }
  // Absent means no BOS, as byte-level BPE models (GPT-2, Qwen2, SmolLM) are trained.
  vocab.add_bos =
      file.MetaInt("tokenizer.ggml.add_bos_token").value_or(0) != 0 && vocab.bos_id >= 0;
  vocab.chat_template = file.MetaString("tokenizer.chat_template").value_or("");
  return tokenizer_internal::NewBpeTokenizer(std::move(vocab));
}

}  // namespace asynctls
