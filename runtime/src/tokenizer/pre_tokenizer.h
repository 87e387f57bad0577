// Regex pre-tokenizer for byte-level BPE: a sequence of PCRE2 split steps (UTF mode, Unicode
// properties) applied one after the other, each to every piece the previous step produced, the
// way Hugging Face's `Sequence[Split, ..., ByteLevel]` and llama.cpp's regex lists work.
// Immutable after construction; Split is thread-safe.
#pragma once

#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"

namespace asynctls::tokenizer_internal {

// What happens to the text a step's regex matches (Hugging Face `SplitDelimiterBehavior`).
enum class SplitBehavior {
  kIsolated,            // matches and the text between them are separate pieces
  kRemoved,             // matches are dropped
  kMergedWithPrevious,  // a match is glued to the piece before it
  kMergedWithNext,      // a match is glued to the piece after it
};

// The GPT-2 regex, as Hugging Face's ByteLevel pre-tokenizer uses it.
inline constexpr std::string_view kGpt2Pattern =
    R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";
// Llama 3 (tokenizer.ggml.pre "llama-bpe"): numbers in runs of at most three digits.
inline constexpr std::string_view kLlama3Pattern =
    R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)";
// Qwen2: like Llama 3 but every digit alone.
inline constexpr std::string_view kQwen2Pattern =
    R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)";

class PreTokenizer {
 public:
  // The pre-tokenizer of a GGUF `tokenizer.ggml.pre` value ("" means the GPT-2 default).
  // Sets `*ignore_merges` for vocabularies whose whole-word tokens bypass the merges (Llama 3).
  // UNIMPLEMENTED for a value this runtime does not know.
  static absl::StatusOr<PreTokenizer> ForGgufPre(std::string_view pre, bool* ignore_merges);

  // Appends a step. INVALID_ARGUMENT when PCRE2 rejects the pattern (the message has its
  // offset and reason).
  absl::Status AddStep(std::string_view pattern, SplitBehavior behavior, bool invert = false);
  bool empty() const { return steps_.empty(); }

  // Splits valid UTF-8 `text` into pieces (views into `text`), appended to `*pieces`.
  void Split(std::string_view text, std::vector<std::string_view>* pieces) const;

 private:
  struct Step;
  std::vector<std::shared_ptr<const Step>> steps_;
};

}  // namespace asynctls::tokenizer_internal
