// The byte-level BPE tokenizer behind Tokenizer::FromGguf and Tokenizer::FromHfJson. Both
// loaders only translate their file into a BpeVocab; everything else lives here.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "asynctls/runtime/tokenizer.h"
#include "tokenizer/pre_tokenizer.h"

namespace asynctls::tokenizer_internal {

// Token types, numbered as GGUF's `tokenizer.ggml.token_type` (llama.cpp's llama_token_type).
enum TokenType : int32_t {
  kTokenNormal = 1,
  kTokenUnknown = 2,
  kTokenControl = 3,      // special: matched in text only when parse_special
  kTokenUserDefined = 4,  // added token: always matched in text, stored as raw text
  kTokenUnused = 5,
  kTokenByte = 6,  // "<0xAB>"
};

struct BpeVocab {
  // Token text as stored: byte-level encoded (GPT-2's byte -> code point map) for normal
  // tokens, raw UTF-8 for control and user-defined tokens.
  std::vector<std::string> tokens;
  std::vector<int32_t> token_types;  // one TokenType per token; empty means all normal
  // Merge rules, best (rank 0) first; each side is byte-level encoded token text.
  std::vector<std::pair<std::string, std::string>> merges;
  PreTokenizer pre_tokenizer;
  bool ignore_merges = false;  // a word that is itself a token is emitted whole (Llama 3)
  // Ids of control / user-defined tokens that swallow whitespace before / after them.
  std::vector<int32_t> lstrip_ids, rstrip_ids;
  int32_t bos_id = -1;
  int32_t eos_id = -1;
  int32_t unk_id = -1;
  bool add_bos = false;
  std::vector<int32_t> extra_stop_ids;  // e.g. GGUF eot / eom ids
  std::string chat_template;            // Jinja source ("" when the file has none)
};

// Splits a GGUF / HF merge line "left right" at its separating space.
absl::StatusOr<std::pair<std::string, std::string>> SplitMergeLine(const std::string& line);

// INVALID_ARGUMENT for inconsistent input (token_types of the wrong size, a bos/eos id out of
// range, no byte tokens). Merges naming unknown tokens are skipped with a warning.
absl::StatusOr<std::unique_ptr<Tokenizer>> NewBpeTokenizer(BpeVocab vocab);

// GPT-2's reversible byte <-> printable code point map.
uint32_t ByteToCodepoint(uint8_t byte);
std::string ByteLevelEncode(std::string_view bytes);

}  // namespace asynctls::tokenizer_internal
