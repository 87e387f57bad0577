// ChatML rendering. Not a Jinja engine: the model's template is only read for its default
// system prompt (the literal "<|im_start|>system\n...<|im_end|>" that SmolLM2 and Qwen2.5
// templates emit when the conversation has no system message).
#pragma once

#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "asynctls/runtime/tokenizer.h"

namespace asynctls::tokenizer_internal {

class ChatMlTemplate {
 public:
  // Reads the default system prompt from a Jinja template ("" or a template without one gives
  // plain ChatML without a default system message).
  static ChatMlTemplate FromJinja(std::string_view jinja_source);

  // "<|im_start|>{role}\n{content}<|im_end|>\n" per message, the default system message first
  // when the first message is not a system one, then "<|im_start|>assistant\n" when
  // `add_generation_prompt`.
  std::string Render(const std::vector<ChatMessage>& messages, bool add_generation_prompt) const;

  const std::optional<std::string>& default_system_prompt() const { return default_system_prompt_; }

 private:
  std::optional<std::string> default_system_prompt_;
};

}  // namespace asynctls::tokenizer_internal
