#include "tokenizer/chat_template.h"

#include "absl/strings/str_cat.h"
#include "absl/strings/str_replace.h"

namespace asynctls::tokenizer_internal {
namespace {

constexpr char kImStart[] = "<|im_start|>";
constexpr char kImEnd[] = "<|im_end|>";

// The text between "<|im_start|>system" + newline and "<|im_end|>" when it is a string literal
// of the template (not an expression such as `' + messages[0]['content'] + '`).
std::optional<std::string> LiteralSystemPrompt(std::string_view jinja, size_t* from) {
  constexpr std::string_view kSystem = "<|im_start|>system";
  const size_t at = jinja.find(kSystem, *from);
  if (at == std::string_view::npos) {
    *from = jinja.size();
    return std::nullopt;
  }
  *from = at + kSystem.size();
  size_t body = at + kSystem.size();
  if (jinja.substr(body, 1) == "\n") {
    body += 1;
  } else if (jinja.substr(body, 2) == "\\n") {  // newline escaped inside the Jinja literal
    body += 2;
  } else {
    return std::nullopt;
  }
  const size_t end = jinja.find(kImEnd, body);
  if (end == std::string_view::npos) return std::nullopt;
  const std::string_view text = jinja.substr(body, end - body);
  if (text.empty()) return std::nullopt;
  for (std::string_view code : {"{{", "{%", "'", "\"", "+"}) {
    if (text.find(code) != std::string_view::npos) return std::nullopt;
  }
  return absl::StrReplaceAll(absl::string_view(text.data(), text.size()), {{"\\n", "\n"}});
}

}  // namespace

ChatMlTemplate ChatMlTemplate::FromJinja(std::string_view jinja_source) {
  ChatMlTemplate result;
  size_t from = 0;
  while (from < jinja_source.size()) {
    std::optional<std::string> prompt = LiteralSystemPrompt(jinja_source, &from);
    if (prompt.has_value()) {
      result.default_system_prompt_ = std::move(prompt);
      break;
    }
  }
  return result;
}

std::string ChatMlTemplate::Render(const std::vector<ChatMessage>& messages,
                                   bool add_generation_prompt) const {
  std::string out;
  if (!messages.empty() && messages.front().role != "system" &&
      default_system_prompt_.has_value()) {
    absl::StrAppend(&out, kImStart, "system\n", *default_system_prompt_, kImEnd, "\n");
  }
  for (const ChatMessage& message : messages) {
    absl::StrAppend(&out, kImStart, message.role, "\n", message.content, kImEnd, "\n");
  }
  if (add_generation_prompt) absl::StrAppend(&out, kImStart, "assistant\n");
  return out;
}

}  // namespace asynctls::tokenizer_internal
