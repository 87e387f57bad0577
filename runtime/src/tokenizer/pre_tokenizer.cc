#include "tokenizer/pre_tokenizer.h"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

#include <array>

#include "absl/strings/str_cat.h"
#include "asynctls/runtime/status.h"
#include "tokenizer/utf8.h"

namespace asynctls::tokenizer_internal {

struct PreTokenizer::Step {
  pcre2_code* code = nullptr;
  SplitBehavior behavior = SplitBehavior::kIsolated;
  bool invert = false;
  ~Step() { pcre2_code_free(code); }
};

namespace {

struct PreFamily {
  std::string_view pre;
  std::vector<std::string_view> patterns;
  bool ignore_merges;
};

// GGUF pre-tokenizer names grouped by the regexes they use. SmolLM / StarCoder first cut every
// digit out on its own (`\p{N}`), then run the GPT-2 regex on each piece.
const std::vector<PreFamily>& PreFamilies() {
  static const auto* families = new std::vector<PreFamily>{
      {"default", {kGpt2Pattern}, false},
      {"gpt2", {kGpt2Pattern}, false},
      {"gpt-2", {kGpt2Pattern}, false},
      {"phi-2", {kGpt2Pattern}, false},
      {"mpt", {kGpt2Pattern}, false},
      {"olmo", {kGpt2Pattern}, false},
      {"llama-bpe", {kLlama3Pattern}, true},
      {"llama3", {kLlama3Pattern}, true},
      {"llama-v3", {kLlama3Pattern}, true},
      {"falcon3", {kLlama3Pattern}, true},
      {"smaug-bpe", {kLlama3Pattern}, false},
      {"dbrx", {kLlama3Pattern}, false},
      {"qwen2", {kQwen2Pattern}, false},
      {"deepseek-r1-qwen", {kQwen2Pattern}, false},
      {"stablelm2", {kQwen2Pattern}, false},
      {"smollm", {R"(\p{N})", kGpt2Pattern}, false},
      {"starcoder", {R"(\p{N})", kGpt2Pattern}, false},
      {"refact", {R"(\p{N})", kGpt2Pattern}, false},
      {"command-r", {R"(\p{N})", kGpt2Pattern}, false},
  };
  return *families;
}

}  // namespace

absl::StatusOr<PreTokenizer> PreTokenizer::ForGgufPre(std::string_view pre, bool* ignore_merges) {
  if (pre.empty()) pre = "default";
  for (const PreFamily& family : PreFamilies()) {
    if (family.pre != pre) continue;
    PreTokenizer result;
    for (std::string_view pattern : family.patterns) {
      ASYNCTLS_RETURN_IF_ERROR(result.AddStep(pattern, SplitBehavior::kIsolated));
    }
    *ignore_merges = family.ignore_merges;
    return result;
  }
  return absl::UnimplementedError(absl::StrCat("tokenizer.ggml.pre = \"", std::string(pre),
                                               "\" is not a pre-tokenizer this runtime knows"));
}

absl::Status PreTokenizer::AddStep(std::string_view pattern, SplitBehavior behavior, bool invert) {
  int error_code = 0;
  PCRE2_SIZE error_offset = 0;
  pcre2_code* code = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(pattern.data()), pattern.size(),
                                   PCRE2_UTF | PCRE2_UCP, &error_code, &error_offset, nullptr);
  if (code == nullptr) {
    std::array<PCRE2_UCHAR, 256> message{};
    pcre2_get_error_message(error_code, message.data(), message.size());
    return absl::InvalidArgumentError(absl::StrCat("pre-tokenizer regex /", std::string(pattern),
                                                   "/ at offset ", error_offset, ": ",
                                                   reinterpret_cast<const char*>(message.data())));
  }
  // JIT is an optimisation only: the interpreter gives the same matches when it is unavailable.
  pcre2_jit_compile(code, PCRE2_JIT_COMPLETE);
  auto step = std::make_shared<Step>();
  step->code = code;
  step->behavior = behavior;
  step->invert = invert;
  steps_.push_back(std::move(step));
  return absl::OkStatus();
}

namespace {

struct MatchDataDeleter {
  void operator()(pcre2_match_data* data) const { pcre2_match_data_free(data); }
};

// Cuts `text` into alternating spans, each flagged as a regex match or not.
void FindSpans(const pcre2_code* code, pcre2_match_data* data, std::string_view text,
               std::vector<std::pair<std::string_view, bool>>* spans) {
  const auto* subject = reinterpret_cast<PCRE2_SPTR>(text.data());
  size_t start = 0;
  size_t last_end = 0;
  while (start < text.size()) {
    const int rc =
        pcre2_match(code, subject, text.size(), start, PCRE2_NO_UTF_CHECK, data, nullptr);
    if (rc < 0) break;  // PCRE2_ERROR_NOMATCH, or a resource limit: keep the rest unmatched
    const PCRE2_SIZE* ovector = pcre2_get_ovector_pointer(data);
    const size_t begin = ovector[0];
    const size_t end = ovector[1];
    if (end == begin) {  // an empty match splits nothing; step over one character
      size_t next = begin;
      NextCodepoint(text, &next);
      start = next;
      continue;
    }
    if (begin > last_end) spans->push_back({text.substr(last_end, begin - last_end), false});
    spans->push_back({text.substr(begin, end - begin), true});
    last_end = end;
    start = end;
  }
  if (last_end < text.size()) spans->push_back({text.substr(last_end), false});
}

// Joins two adjacent views of the same buffer.
std::string_view Join(std::string_view a, std::string_view b) {
  return std::string_view(a.data(), a.size() + b.size());
}

}  // namespace

void PreTokenizer::Split(std::string_view text, std::vector<std::string_view>* pieces) const {
  if (text.empty()) return;
  std::vector<std::string_view> current{text};
  std::vector<std::string_view> next;
  std::vector<std::pair<std::string_view, bool>> spans;
  for (const auto& step : steps_) {
    std::unique_ptr<pcre2_match_data, MatchDataDeleter> data(
        pcre2_match_data_create_from_pattern(step->code, nullptr));
    next.clear();
    for (std::string_view piece : current) {
      spans.clear();
      FindSpans(step->code, data.get(), piece, &spans);
      bool pending_merge_next = false;
      for (auto [span, matched] : spans) {
        const bool is_delimiter = matched != step->invert;
        switch (step->behavior) {
          case SplitBehavior::kIsolated:
            next.push_back(span);
            break;
          case SplitBehavior::kRemoved:
            if (!is_delimiter) next.push_back(span);
            break;
          case SplitBehavior::kMergedWithPrevious:
            if (is_delimiter && !next.empty() && pending_merge_next) {
              next.back() = Join(next.back(), span);
            } else {
              next.push_back(span);
            }
            pending_merge_next = !is_delimiter;
            break;
          case SplitBehavior::kMergedWithNext:
            if (pending_merge_next && !is_delimiter) {
              next.back() = Join(next.back(), span);
            } else {
              next.push_back(span);
            }
            pending_merge_next = is_delimiter;
            break;
        }
      }
    }
    current.swap(next);
  }
  pieces->insert(pieces->end(), current.begin(), current.end());
}

}  // namespace asynctls::tokenizer_internal
