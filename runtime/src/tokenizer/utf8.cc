#include "tokenizer/utf8.h"

#include "asynctls/runtime/tokenizer.h"

namespace asynctls {
namespace tokenizer_internal {

void AppendUtf8(uint32_t cp, std::string* out) {
  if (cp < 0x80) {
    out->push_back(static_cast<char>(cp));
  } else if (cp < 0x800) {
    out->push_back(static_cast<char>(0xC0 | (cp >> 6)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else if (cp < 0x10000) {
    out->push_back(static_cast<char>(0xE0 | (cp >> 12)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else {
    out->push_back(static_cast<char>(0xF0 | (cp >> 18)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 12) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  }
}

size_t Utf8CharLength(unsigned char lead) {
  if (lead < 0x80) return 1;
  if (lead >= 0xC2 && lead <= 0xDF) return 2;
  if (lead >= 0xE0 && lead <= 0xEF) return 3;
  if (lead >= 0xF0 && lead <= 0xF4) return 4;
  return 1;
}

uint32_t NextCodepoint(std::string_view text, size_t* pos) {
  const auto lead = static_cast<unsigned char>(text[*pos]);
  const size_t len = Utf8CharLength(lead);
  if (len == 1 || *pos + len > text.size()) {
    ++*pos;
    return lead;
  }
  uint32_t cp = lead & (0xFF >> (len + 1));
  for (size_t i = 1; i < len; ++i) {
    cp = (cp << 6) | (static_cast<unsigned char>(text[*pos + i]) & 0x3F);
  }
  *pos += len;
  return cp;
}

namespace {

// Allowed range of the byte after `lead` (the tighter ranges rule out overlong forms,
// surrogates and code points above U+10FFFF); later continuation bytes are 0x80..0xBF.
void SecondByteRange(unsigned char lead, unsigned char* lo, unsigned char* hi) {
  *lo = 0x80;
  *hi = 0xBF;
  if (lead == 0xE0) *lo = 0xA0;
  if (lead == 0xED) *hi = 0x9F;
  if (lead == 0xF0) *lo = 0x90;
  if (lead == 0xF4) *hi = 0x8F;
}

bool IsContinuation(unsigned char b) { return (b & 0xC0) == 0x80; }

}  // namespace
}  // namespace tokenizer_internal

using tokenizer_internal::IsContinuation;
using tokenizer_internal::SecondByteRange;
using tokenizer_internal::Utf8CharLength;

bool IsValidUtf8(std::string_view text) {
  size_t i = 0;
  while (i < text.size()) {
    const auto lead = static_cast<unsigned char>(text[i]);
    if (lead < 0x80) {
      ++i;
      continue;
    }
    const size_t len = Utf8CharLength(lead);
    if (len == 1 || i + len > text.size()) return false;
    unsigned char lo, hi;
    SecondByteRange(lead, &lo, &hi);
    const auto second = static_cast<unsigned char>(text[i + 1]);
    if (second < lo || second > hi) return false;
    for (size_t k = 2; k < len; ++k) {
      if (!IsContinuation(static_cast<unsigned char>(text[i + k]))) return false;
    }
    i += len;
  }
  return true;
}

size_t Utf8CompletePrefix(std::string_view bytes) {
  const size_t n = bytes.size();
  // Walk back over at most three continuation bytes to the lead byte of the last character.
  for (size_t back = 1; back <= 4 && back <= n; ++back) {
    const auto b = static_cast<unsigned char>(bytes[n - back]);
    if (IsContinuation(b)) continue;
    const size_t len = Utf8CharLength(b);
    if (len == 1 || back >= len) return n;  // ASCII, a stray byte, or a complete character
    // An unfinished character: hold it back only if the bytes seen so far can still become
    // valid UTF-8; an already broken sequence is passed through (it can never complete).
    if (back >= 2) {
      unsigned char lo, hi;
      SecondByteRange(b, &lo, &hi);
      const auto second = static_cast<unsigned char>(bytes[n - back + 1]);
      if (second < lo || second > hi) return n;
    }
    return n - back;
  }
  return n;
}

}  // namespace asynctls
