#include "tokenizer/bpe_tokenizer.h"

#include <algorithm>
#include <array>
#include <mutex>
#include <shared_mutex>

#include "absl/container/flat_hash_map.h"
#include "absl/strings/str_cat.h"
#include "asynctls/runtime/logging.h"
#include "asynctls/runtime/status.h"
#include "tokenizer/chat_template.h"
#include "tokenizer/utf8.h"

namespace asynctls::tokenizer_internal {
namespace {

// GPT-2 keeps the printable bytes '!'..'~', '¡'..'¬', '®'..'ÿ' as their own code point and moves
// the other 68 bytes, in byte order, to U+0100 onwards, so that no token text holds a control
// character or a space.
struct ByteLevelTables {
  std::array<uint32_t, 256> byte_to_cp{};
  absl::flat_hash_map<uint32_t, uint8_t> cp_to_byte;
  ByteLevelTables() {
    uint32_t next_free = 256;
    for (int b = 0; b < 256; ++b) {
      const bool printable = (b >= 0x21 && b <= 0x7E) || (b >= 0xA1 && b <= 0xAC) || b >= 0xAE;
      byte_to_cp[b] = printable ? static_cast<uint32_t>(b) : next_free++;
      cp_to_byte[byte_to_cp[b]] = static_cast<uint8_t>(b);
    }
  }
};

const ByteLevelTables& Tables() {
  static const auto* tables = new ByteLevelTables();
  return *tables;
}

bool IsAsciiSpace(char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r'; }

// "<0x0A>" -> 0x0A; -1 when `text` is not of that form.
int ParseByteToken(std::string_view text) {
  if (text.size() != 6 || text.substr(0, 3) != "<0x" || text[5] != '>') return -1;
  int value = 0;
  for (char c : text.substr(3, 2)) {
    value <<= 4;
    if (c >= '0' && c <= '9')
      value |= c - '0';
    else if (c >= 'A' && c <= 'F')
      value |= c - 'A' + 10;
    else if (c >= 'a' && c <= 'f')
      value |= c - 'a' + 10;
    else
      return -1;
  }
  return value;
}

class BpeTokenizer final : public Tokenizer {
 public:
  static absl::StatusOr<std::unique_ptr<BpeTokenizer>> Create(BpeVocab vocab);

  absl::StatusOr<std::vector<int32_t>> Encode(std::string_view text,
                                              bool parse_special) const override;
  std::string Decode(const std::vector<int32_t>& ids) const override;
  std::string TokenBytes(int32_t id) const override;
  int32_t vocab_size() const override { return static_cast<int32_t>(vocab_.tokens.size()); }
  int32_t bos_id() const override { return vocab_.bos_id; }
  int32_t eos_id() const override { return vocab_.eos_id; }
  const std::vector<int32_t>& stop_ids() const override { return stop_ids_; }
  bool add_bos() const override { return vocab_.add_bos; }
  std::string ApplyChatTemplate(const std::vector<ChatMessage>& messages) const override {
    return chat_template_.Render(messages, /*add_generation_prompt=*/true);
  }

 private:
  struct Merge {
    int32_t rank;
    int32_t result;
  };
  struct SpecialToken {
    std::string_view text;  // into vocab_.tokens
    int32_t id;
    bool control;  // only matched when parse_special
    bool lstrip, rstrip;
  };

  explicit BpeTokenizer(BpeVocab vocab) : vocab_(std::move(vocab)) {}
  absl::Status Init();
  int32_t TypeOf(int32_t id) const {
    return vocab_.token_types.empty() ? kTokenNormal : vocab_.token_types[id];
  }
  static uint64_t PairKey(int32_t left, int32_t right) {
    return (static_cast<uint64_t>(static_cast<uint32_t>(left)) << 32) |
           static_cast<uint32_t>(right);
  }
  // Longest special token allowed here that starts at `pos`, or nullptr.
  const SpecialToken* MatchSpecial(std::string_view text, size_t pos, bool parse_special) const;
  void EncodeFragment(std::string_view fragment, std::vector<int32_t>* out) const;
  void EncodeWord(std::string_view word, std::vector<int32_t>* out) const;
  void MergeWord(std::string_view word, std::vector<int32_t>* out) const;

  BpeVocab vocab_;
  absl::flat_hash_map<std::string, int32_t> text_to_id_;
  absl::flat_hash_map<uint64_t, Merge> merges_;
  std::array<int32_t, 256> byte_ids_{};   // token of each single byte (-1 if missing)
  std::vector<std::string> token_bytes_;  // decoded bytes of every token
  std::vector<SpecialToken> specials_;    // longest first
  std::array<bool, 256> special_first_byte_{};
  std::vector<int32_t> stop_ids_;
  ChatMlTemplate chat_template_;

  // Words seen before -> their ids. Bounded: once full, new words are not remembered.
  static constexpr size_t kMaxCachedWords = 1 << 16;
  mutable std::shared_mutex cache_mutex_;
  mutable absl::flat_hash_map<std::string, std::vector<int32_t>> cache_;
};

absl::StatusOr<std::unique_ptr<BpeTokenizer>> BpeTokenizer::Create(BpeVocab vocab) {
  std::unique_ptr<BpeTokenizer> tokenizer(new BpeTokenizer(std::move(vocab)));
  ASYNCTLS_RETURN_IF_ERROR(tokenizer->Init());
  return tokenizer;
}

absl::Status BpeTokenizer::Init() {
  const int32_t n = static_cast<int32_t>(vocab_.tokens.size());
  if (n == 0) return absl::InvalidArgumentError("tokenizer has no tokens");
  if (!vocab_.token_types.empty() && vocab_.token_types.size() != vocab_.tokens.size()) {
    return absl::InvalidArgumentError(absl::StrCat("tokenizer has ", n, " tokens but ",
                                                   vocab_.token_types.size(), " token types"));
  }
  for (auto [name, id] : {std::pair<const char*, int32_t>{"bos", vocab_.bos_id},
                          {"eos", vocab_.eos_id},
                          {"unknown", vocab_.unk_id}}) {
    if (id < -1 || id >= n) {
      return absl::InvalidArgumentError(
          absl::StrCat("tokenizer ", name, " token id ", id, " is outside the vocabulary of ", n));
    }
  }

  const ByteLevelTables& tables = Tables();
  token_bytes_.resize(n);
  for (int32_t id = 0; id < n; ++id) {
    const std::string& text = vocab_.tokens[id];
    const int32_t type = TypeOf(id);
    text_to_id_.emplace(text, id);
    if (type == kTokenControl || type == kTokenUserDefined) {
      token_bytes_[id] = text;
      if (!text.empty()) {
        const bool lstrip = std::find(vocab_.lstrip_ids.begin(), vocab_.lstrip_ids.end(), id) !=
                            vocab_.lstrip_ids.end();
        const bool rstrip = std::find(vocab_.rstrip_ids.begin(), vocab_.rstrip_ids.end(), id) !=
                            vocab_.rstrip_ids.end();
        specials_.push_back({text, id, type == kTokenControl, lstrip, rstrip});
      }
      continue;
    }
    if (type == kTokenByte) {
      const int value = ParseByteToken(text);
      if (value >= 0) {
        token_bytes_[id] = std::string(1, static_cast<char>(value));
        continue;
      }
    }
    std::string& bytes = token_bytes_[id];
    for (size_t pos = 0; pos < text.size();) {
      const size_t start = pos;
      const uint32_t cp = NextCodepoint(text, &pos);
      auto it = tables.cp_to_byte.find(cp);
      if (it != tables.cp_to_byte.end()) {
        bytes.push_back(static_cast<char>(it->second));
      } else {  // not byte-level encoded: keep as written
        bytes.append(text, start, pos - start);
      }
    }
  }
  std::stable_sort(
      specials_.begin(), specials_.end(),
      [](const SpecialToken& a, const SpecialToken& b) { return a.text.size() > b.text.size(); });
  for (const SpecialToken& special : specials_) {
    special_first_byte_[static_cast<unsigned char>(special.text[0])] = true;
  }

  int missing_bytes = 0;
  for (int b = 0; b < 256; ++b) {
    std::string text;
    AppendUtf8(tables.byte_to_cp[b], &text);
    auto it = text_to_id_.find(text);
    byte_ids_[b] = it == text_to_id_.end() ? -1 : it->second;
    if (byte_ids_[b] < 0) ++missing_bytes;
  }
  if (missing_bytes == 256) {
    return absl::InvalidArgumentError(
        "tokenizer vocabulary has no byte-level tokens: not a byte-level BPE vocabulary");
  }

  int skipped = 0;
  merges_.reserve(vocab_.merges.size());
  for (size_t rank = 0; rank < vocab_.merges.size(); ++rank) {
    const auto& [left, right] = vocab_.merges[rank];
    auto l = text_to_id_.find(left);
    auto r = text_to_id_.find(right);
    auto m = text_to_id_.find(left + right);
    if (l == text_to_id_.end() || r == text_to_id_.end() || m == text_to_id_.end()) {
      ++skipped;
      continue;
    }
    // The first (best ranked) rule for a pair wins, as a rank lookup would.
    merges_.emplace(PairKey(l->second, r->second), Merge{static_cast<int32_t>(rank), m->second});
  }
  if (skipped > 0) {
    ASYNCTLS_LOG_WARN("tokenizer: skipped ", skipped,
                      " merges naming tokens not in the vocabulary");
  }
  vocab_.merges.clear();
  vocab_.merges.shrink_to_fit();

  auto add_stop = [&](int32_t id) {
    if (id >= 0 && id < n && std::find(stop_ids_.begin(), stop_ids_.end(), id) == stop_ids_.end())
      stop_ids_.push_back(id);
  };
  add_stop(vocab_.eos_id);
  for (int32_t id : vocab_.extra_stop_ids) add_stop(id);
  for (const char* text : {"<|im_end|>", "<|endoftext|>"}) {
    auto it = text_to_id_.find(text);
    if (it != text_to_id_.end() && TypeOf(it->second) != kTokenNormal) add_stop(it->second);
  }
  chat_template_ = ChatMlTemplate::FromJinja(vocab_.chat_template);
  return absl::OkStatus();
}

const BpeTokenizer::SpecialToken* BpeTokenizer::MatchSpecial(std::string_view text, size_t pos,
                                                             bool parse_special) const {
  if (!special_first_byte_[static_cast<unsigned char>(text[pos])]) return nullptr;
  const std::string_view rest = text.substr(pos);
  for (const SpecialToken& special : specials_) {
    if (special.control && !parse_special) continue;
    if (rest.size() >= special.text.size() &&
        rest.compare(0, special.text.size(), special.text) == 0) {
      return &special;
    }
  }
  return nullptr;
}

absl::StatusOr<std::vector<int32_t>> BpeTokenizer::Encode(std::string_view text,
                                                          bool parse_special) const {
  if (!IsValidUtf8(text)) {
    return absl::InvalidArgumentError("text to tokenize is not valid UTF-8");
  }
  std::vector<int32_t> ids;
  ids.reserve(text.size() / 3 + 1);
  size_t fragment_start = 0;
  size_t pos = 0;
  while (pos < text.size()) {
    const SpecialToken* special =
        specials_.empty() ? nullptr : MatchSpecial(text, pos, parse_special);
    if (special == nullptr) {
      ++pos;
      continue;
    }
    size_t fragment_end = pos;
    if (special->lstrip) {
      while (fragment_end > fragment_start && IsAsciiSpace(text[fragment_end - 1])) --fragment_end;
    }
    EncodeFragment(text.substr(fragment_start, fragment_end - fragment_start), &ids);
    ids.push_back(special->id);
    pos += special->text.size();
    if (special->rstrip) {
      while (pos < text.size() && IsAsciiSpace(text[pos])) ++pos;
    }
    fragment_start = pos;
  }
  EncodeFragment(text.substr(fragment_start), &ids);
  return ids;
}

void BpeTokenizer::EncodeFragment(std::string_view fragment, std::vector<int32_t>* out) const {
  if (fragment.empty()) return;
  std::vector<std::string_view> words;
  if (vocab_.pre_tokenizer.empty()) {
    words.push_back(fragment);
  } else {
    vocab_.pre_tokenizer.Split(fragment, &words);
  }
  for (std::string_view word : words) EncodeWord(word, out);
}

void BpeTokenizer::EncodeWord(std::string_view word, std::vector<int32_t>* out) const {
  if (word.empty()) return;
  {
    std::shared_lock lock(cache_mutex_);
    auto it = cache_.find(absl::string_view(word.data(), word.size()));
    if (it != cache_.end()) {
      out->insert(out->end(), it->second.begin(), it->second.end());
      return;
    }
  }
  std::vector<int32_t> ids;
  MergeWord(word, &ids);
  out->insert(out->end(), ids.begin(), ids.end());
  std::unique_lock lock(cache_mutex_);
  if (cache_.size() < kMaxCachedWords) cache_.emplace(std::string(word), std::move(ids));
}

void BpeTokenizer::MergeWord(std::string_view word, std::vector<int32_t>* out) const {
  if (vocab_.ignore_merges) {
    auto it = text_to_id_.find(ByteLevelEncode(word));
    if (it != text_to_id_.end()) {
      out->push_back(it->second);
      return;
    }
  }
  // One symbol per byte in a doubly linked list; a min-heap of candidate merges ordered by
  // (rank, position). A popped candidate is stale when either side has changed since.
  struct Symbol {
    int32_t id;
    int32_t prev, next;
  };
  struct Candidate {
    int32_t rank;
    int32_t left;  // symbol index
    int32_t left_id, right_id, result;
    bool operator>(const Candidate& o) const {
      return rank != o.rank ? rank > o.rank : left > o.left;
    }
  };
  const int32_t n = static_cast<int32_t>(word.size());
  std::vector<Symbol> symbols(n);
  for (int32_t i = 0; i < n; ++i) {
    symbols[i] = {byte_ids_[static_cast<unsigned char>(word[i])], i - 1, i + 1 < n ? i + 1 : -1};
  }
  std::vector<Candidate> heap;
  auto consider = [&](int32_t left) {
    if (left < 0) return;
    const int32_t right = symbols[left].next;
    if (right < 0 || symbols[left].id < 0 || symbols[right].id < 0) return;
    auto it = merges_.find(PairKey(symbols[left].id, symbols[right].id));
    if (it == merges_.end()) return;
    heap.push_back({it->second.rank, left, symbols[left].id, symbols[right].id, it->second.result});
    std::push_heap(heap.begin(), heap.end(), std::greater<>());
  };
  for (int32_t i = 0; i + 1 < n; ++i) consider(i);
  while (!heap.empty()) {
    std::pop_heap(heap.begin(), heap.end(), std::greater<>());
    const Candidate c = heap.back();
    heap.pop_back();
    Symbol& left = symbols[c.left];
    if (left.id != c.left_id || left.next < 0) continue;
    Symbol& right = symbols[left.next];
    if (right.id != c.right_id) continue;
    left.id = c.result;
    right.id = -2;  // removed
    left.next = right.next;
    if (right.next >= 0) symbols[right.next].prev = c.left;
    consider(left.prev);
    consider(c.left);
  }
  for (int32_t i = 0; i >= 0 && i < n; i = symbols[i].next) {
    const int32_t id = symbols[i].id;
    if (id >= 0) {
      out->push_back(id);
    } else if (vocab_.unk_id >= 0) {  // a byte the vocabulary cannot spell
      out->push_back(vocab_.unk_id);
    }
  }
}

std::string BpeTokenizer::Decode(const std::vector<int32_t>& ids) const {
  std::string out;
  for (int32_t id : ids) {
    if (id >= 0 && id < vocab_size()) out += token_bytes_[id];
  }
  return out;
}

std::string BpeTokenizer::TokenBytes(int32_t id) const {
  if (id < 0 || id >= vocab_size()) return std::string();
  return token_bytes_[id];
}

}  // namespace

uint32_t ByteToCodepoint(uint8_t byte) { return Tables().byte_to_cp[byte]; }

std::string ByteLevelEncode(std::string_view bytes) {
  std::string out;
  out.reserve(bytes.size() * 2);
  for (char c : bytes) AppendUtf8(ByteToCodepoint(static_cast<uint8_t>(c)), &out);
  return out;
}

absl::StatusOr<std::pair<std::string, std::string>> SplitMergeLine(const std::string& line) {
  // Token texts are byte-level encoded and hold no space, so the first space (after the first
  // character, in case a token ever is one) separates the two sides.
  const size_t space = line.find(' ', 1);
  if (space == std::string::npos || line.find(' ', space + 1) != std::string::npos) {
    return absl::InvalidArgumentError(absl::StrCat("malformed merge rule \"", line, "\""));
  }
  return std::make_pair(line.substr(0, space), line.substr(space + 1));
}

absl::StatusOr<std::unique_ptr<Tokenizer>> NewBpeTokenizer(BpeVocab vocab) {
  ASYNCTLS_ASSIGN_OR_RETURN(auto tokenizer, BpeTokenizer::Create(std::move(vocab)));
  return std::unique_ptr<Tokenizer>(std::move(tokenizer));
}

}  // namespace asynctls::tokenizer_internal
