// UTF-8 helpers shared by the tokenizer pieces (internal to asynctls_runtime_base).
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

namespace asynctls::tokenizer_internal {

// Appends the UTF-8 encoding of `cp` (must be <= 0x10FFFF and not a surrogate).
void AppendUtf8(uint32_t cp, std::string* out);

// Decodes the character starting at `text[*pos]` and advances `*pos` past it. The text must be
// valid UTF-8 (checked with IsValidUtf8 beforehand); on a malformed byte this returns that
// byte's value and advances by one so callers never loop forever.
uint32_t NextCodepoint(std::string_view text, size_t* pos);

// Length in bytes of the UTF-8 character whose lead byte is `lead` (1 for a stray byte).
size_t Utf8CharLength(unsigned char lead);

}  // namespace asynctls::tokenizer_internal
