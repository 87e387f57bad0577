// Byte-level BPE tokenizer (GPT-2 / Llama-3 / Qwen2 / SmolLM pre-tokenizers) built from GGUF
// metadata or a Hugging Face tokenizer.json, plus the ChatML chat template. Thread-safe after
// construction (const methods only).
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"

namespace asynctls {

class WeightFile;

struct ChatMessage {
  std::string role;  // "system", "user", "assistant"
  std::string content;
};

class Tokenizer {
 public:
  virtual ~Tokenizer() = default;

  // From tokenizer.ggml.* metadata (model "gpt2"; pre "default"/"gpt2", "llama-bpe"/"llama3",
  // "qwen2", "smollm" and a few aliases). NOT_FOUND when the file has no tokenizer,
  // UNIMPLEMENTED for another model or pre-tokenizer, INVALID_ARGUMENT for bad metadata.
  static absl::StatusOr<std::unique_ptr<Tokenizer>> FromGguf(const WeightFile& file);
  // From a Hugging Face tokenizer.json (or the folder holding it) with a byte-level BPE model;
  // tokenizer_config.json / generation_config.json beside it supply bos/eos, add_bos_token,
  // the chat template and extra stop ids. An NFC normalizer is accepted but not applied.
  static absl::StatusOr<std::unique_ptr<Tokenizer>> FromHfJson(
      const std::string& tokenizer_json_path);

  // Special tokens written in the text (e.g. "<|im_start|>") become their ids when
  // `parse_special` is true; user-defined (non-special added) tokens always do. Never adds BOS:
  // callers prepend bos_id() when add_bos(). INVALID_ARGUMENT for text that is not valid UTF-8.
  virtual absl::StatusOr<std::vector<int32_t>> Encode(std::string_view text,
                                                      bool parse_special = true) const = 0;
  // Raw bytes of the tokens (may end inside a UTF-8 character; see Utf8CompletePrefix).
  // Special tokens decode to their text; ids outside the vocabulary to nothing.
  virtual std::string Decode(const std::vector<int32_t>& ids) const = 0;
  virtual std::string TokenBytes(int32_t id) const = 0;

  virtual int32_t vocab_size() const = 0;
  virtual int32_t bos_id() const = 0;  // -1 if none
  virtual int32_t eos_id() const = 0;
  // Ids that end generation (eos, <|im_end|>, <|endoftext|> ...).
  virtual const std::vector<int32_t>& stop_ids() const = 0;
  virtual bool add_bos() const = 0;

  // ChatML: "<|im_start|>{role}\n{content}<|im_end|>\n"..., then "<|im_start|>assistant\n".
  // Adds the model's default system prompt when the first message is not a system one and
  // the model defines one (SmolLM2 does).
  virtual std::string ApplyChatTemplate(const std::vector<ChatMessage>& messages) const = 0;
};

// Length of the longest prefix of `bytes` that does not end inside a UTF-8 character, so
// streamed text deltas never split one.
size_t Utf8CompletePrefix(std::string_view bytes);
bool IsValidUtf8(std::string_view text);

}  // namespace asynctls
