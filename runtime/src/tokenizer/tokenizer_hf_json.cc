// Tokenizer::FromHfJson: a Hugging Face tokenizer.json (BPE model, byte-level) -> BpeVocab,
// plus tokenizer_config.json / generation_config.json from the same folder when present.
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "asynctls/runtime/logging.h"
#include "asynctls/runtime/status.h"
#include "asynctls/runtime/tokenizer.h"
#include "tokenizer/bpe_tokenizer.h"

namespace asynctls {
namespace {

using json = nlohmann::json;
using tokenizer_internal::BpeVocab;
using tokenizer_internal::PreTokenizer;
using tokenizer_internal::SplitBehavior;

absl::StatusOr<json> ReadJson(const std::filesystem::path& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot open ", path.string()));
  std::stringstream buffer;
  buffer << in.rdbuf();
  json parsed = json::parse(buffer.str(), nullptr, /*allow_exceptions=*/false);
  if (parsed.is_discarded()) {
    return absl::InvalidArgumentError(absl::StrCat(path.string(), " is not valid JSON"));
  }
  return parsed;
}

// Quotes every character so that a literal Split pattern can be compiled as a regex.
std::string EscapeRegex(std::string_view literal) {
  std::string out;
  for (char c : literal) {
    if (std::string_view("\\^$.|?*+()[]{}-/").find(c) != std::string_view::npos) out += '\\';
    out += c;
  }
  return out;
}

absl::Status AddPreTokenizer(const json& spec, PreTokenizer* pre) {
  if (spec.is_null()) return absl::OkStatus();
  const std::string type = spec.value("type", "");
  if (type == "Sequence") {
    for (const json& step : spec.value("pretokenizers", json::array())) {
      ASYNCTLS_RETURN_IF_ERROR(AddPreTokenizer(step, pre));
    }
    return absl::OkStatus();
  }
  if (type == "ByteLevel") {
    if (spec.value("add_prefix_space", false)) {
      return absl::UnimplementedError("pre_tokenizer ByteLevel with add_prefix_space = true");
    }
    if (spec.value("use_regex", true)) {
      return pre->AddStep(tokenizer_internal::kGpt2Pattern, SplitBehavior::kIsolated);
    }
    return absl::OkStatus();
  }
  if (type == "Digits") {
    return pre->AddStep(spec.value("individual_digits", false) ? R"(\p{N})" : R"(\p{N}+)",
                        SplitBehavior::kIsolated);
  }
  if (type == "Split") {
    const json& pattern = spec.value("pattern", json::object());
    std::string regex;
    if (pattern.contains("Regex") && pattern["Regex"].is_string()) {
      regex = pattern["Regex"].get<std::string>();
    } else if (pattern.contains("String") && pattern["String"].is_string()) {
      regex = EscapeRegex(pattern["String"].get<std::string>());
    } else {
      return absl::InvalidArgumentError("pre_tokenizer Split has no pattern");
    }
    const std::string behavior_name = spec.value("behavior", "Isolated");
    SplitBehavior behavior;
    if (behavior_name == "Isolated") {
      behavior = SplitBehavior::kIsolated;
    } else if (behavior_name == "Removed") {
      behavior = SplitBehavior::kRemoved;
    } else if (behavior_name == "MergedWithPrevious") {
      behavior = SplitBehavior::kMergedWithPrevious;
    } else if (behavior_name == "MergedWithNext") {
      behavior = SplitBehavior::kMergedWithNext;
    } else {
      return absl::UnimplementedError(
          absl::StrCat("pre_tokenizer Split behavior \"", behavior_name, "\""));
    }
    return pre->AddStep(regex, behavior, spec.value("invert", false));
  }
  return absl::UnimplementedError(absl::StrCat("pre_tokenizer type \"", type, "\""));
}

absl::Status CheckNormalizer(const json& spec) {
  if (spec.is_null()) return absl::OkStatus();
  const std::string type = spec.value("type", "");
  if (type == "Sequence") {
    for (const json& step : spec.value("normalizers", json::array())) {
      ASYNCTLS_RETURN_IF_ERROR(CheckNormalizer(step));
    }
    return absl::OkStatus();
  }
  if (type == "NFC") {
    // Text that is already NFC (nearly all input) is unaffected; we do not carry Unicode
    // composition tables, and llama.cpp does not normalize either.
    ASYNCTLS_LOG_WARN("tokenizer.json: NFC normalizer is not applied (input assumed NFC)");
    return absl::OkStatus();
  }
  return absl::UnimplementedError(absl::StrCat("tokenizer.json normalizer \"", type, "\""));
}

// "eos_token": "<|im_end|>" or {"content": "<|im_end|>", ...}.
std::optional<std::string> TokenContent(const json& config, const char* key) {
  if (!config.contains(key)) return std::nullopt;
  const json& value = config[key];
  if (value.is_string()) return value.get<std::string>();
  if (value.is_object() && value.contains("content") && value["content"].is_string()) {
    return value["content"].get<std::string>();
  }
  return std::nullopt;
}

// The BOS id that a TemplateProcessing post-processor puts first, or -1.
int32_t TemplateBosId(const json& post, const std::unordered_map<std::string, int32_t>& ids) {
  if (!post.is_object()) return -1;
  const std::string type = post.value("type", "");
  if (type == "Sequence") {
    for (const json& step : post.value("processors", json::array())) {
      const int32_t id = TemplateBosId(step, ids);
      if (id >= 0) return id;
    }
    return -1;
  }
  if (type != "TemplateProcessing") return -1;
  const json& single = post.value("single", json::array());
  if (!single.is_array() || single.empty() || !single[0].contains("SpecialToken")) return -1;
  const std::string name = single[0]["SpecialToken"].value("id", "");
  auto it = ids.find(name);
  return it == ids.end() ? -1 : it->second;
}

absl::StatusOr<std::unique_ptr<Tokenizer>> FromHfJsonImpl(const std::string& tokenizer_json_path) {
  std::filesystem::path path(tokenizer_json_path);
  if (std::filesystem::is_directory(path)) path /= "tokenizer.json";
  ASYNCTLS_ASSIGN_OR_RETURN(const json root, ReadJson(path));
  const std::string where = path.string();

  const json& model = root.value("model", json::object());
  if (model.value("type", "BPE") != "BPE") {
    return absl::UnimplementedError(
        absl::StrCat(where, ": model type \"", model.value("type", ""), "\" is not BPE"));
  }
  if (model.value("byte_fallback", false) ||
      !model.value("continuing_subword_prefix", json()).is_null()) {
    return absl::UnimplementedError(
        absl::StrCat(where, ": byte_fallback / continuing_subword_prefix BPE is not supported"));
  }
  if (!model.contains("vocab") || !model["vocab"].is_object()) {
    return absl::InvalidArgumentError(absl::StrCat(where, ": model.vocab is missing"));
  }

  BpeVocab vocab;
  std::unordered_map<std::string, int32_t> ids;
  auto place = [&](const std::string& text, int64_t id, int32_t type) -> absl::Status {
    if (id < 0 || id >= (1 << 24)) {
      return absl::InvalidArgumentError(absl::StrCat(where, ": token id ", id, " out of range"));
    }
    if (static_cast<size_t>(id) >= vocab.tokens.size()) {
      vocab.tokens.resize(id + 1);
      vocab.token_types.resize(id + 1, tokenizer_internal::kTokenUnused);
    }
    vocab.tokens[id] = text;
    vocab.token_types[id] = type;
    ids[text] = static_cast<int32_t>(id);
    return absl::OkStatus();
  };
  for (const auto& [text, id] : model["vocab"].items()) {
    if (!id.is_number_integer()) {
      return absl::InvalidArgumentError(
          absl::StrCat(where, ": vocab entry \"", text, "\" has no integer id"));
    }
    ASYNCTLS_RETURN_IF_ERROR(place(text, id.get<int64_t>(), tokenizer_internal::kTokenNormal));
  }
  for (const json& added : root.value("added_tokens", json::array())) {
    if (!added.contains("id") || !added.contains("content") || !added["content"].is_string()) {
      return absl::InvalidArgumentError(absl::StrCat(where, ": malformed added_tokens entry"));
    }
    const int64_t id = added["id"].get<int64_t>();
    ASYNCTLS_RETURN_IF_ERROR(place(added["content"].get<std::string>(), id,
                                   added.value("special", false)
                                       ? tokenizer_internal::kTokenControl
                                       : tokenizer_internal::kTokenUserDefined));
    if (added.value("lstrip", false)) vocab.lstrip_ids.push_back(static_cast<int32_t>(id));
    if (added.value("rstrip", false)) vocab.rstrip_ids.push_back(static_cast<int32_t>(id));
  }

  for (const json& merge : model.value("merges", json::array())) {
    if (merge.is_string()) {  // "left right"
      ASYNCTLS_ASSIGN_OR_RETURN(auto pair,
                                tokenizer_internal::SplitMergeLine(merge.get<std::string>()));
      vocab.merges.push_back(std::move(pair));
    } else if (merge.is_array() && merge.size() == 2 && merge[0].is_string() &&
               merge[1].is_string()) {  // ["left", "right"] (tokenizers >= 0.20)
      vocab.merges.emplace_back(merge[0].get<std::string>(), merge[1].get<std::string>());
    } else {
      return absl::InvalidArgumentError(absl::StrCat(where, ": malformed merge ", merge.dump()));
    }
  }
  vocab.ignore_merges = model.value("ignore_merges", false);
  if (model.contains("unk_token") && model["unk_token"].is_string()) {
    auto it = ids.find(model["unk_token"].get<std::string>());
    if (it != ids.end()) vocab.unk_id = it->second;
  }

  ASYNCTLS_RETURN_IF_ERROR(CheckNormalizer(root.value("normalizer", json())));
  absl::Status pre_status =
      AddPreTokenizer(root.value("pre_tokenizer", json()), &vocab.pre_tokenizer);
  if (!pre_status.ok()) {
    return absl::Status(pre_status.code(), absl::StrCat(where, ": ", pre_status.message()));
  }
  vocab.bos_id = TemplateBosId(root.value("post_processor", json()), ids);
  vocab.add_bos = vocab.bos_id >= 0;

  // Special-token roles and the chat template live beside tokenizer.json.
  const std::filesystem::path config_path = path.parent_path() / "tokenizer_config.json";
  if (std::filesystem::exists(config_path)) {
    ASYNCTLS_ASSIGN_OR_RETURN(const json config, ReadJson(config_path));
    auto lookup = [&](const char* key) -> int32_t {
      std::optional<std::string> content = TokenContent(config, key);
      if (!content.has_value()) return -1;
      auto it = ids.find(*content);
      return it == ids.end() ? -1 : it->second;
    };
    if (int32_t id = lookup("bos_token"); id >= 0) vocab.bos_id = id;
    if (int32_t id = lookup("eos_token"); id >= 0) vocab.eos_id = id;
    if (int32_t id = lookup("unk_token"); id >= 0) vocab.unk_id = id;
    if (config.contains("add_bos_token") && config["add_bos_token"].is_boolean()) {
      vocab.add_bos = config["add_bos_token"].get<bool>() && vocab.bos_id >= 0;
    }
    const json& chat = config.value("chat_template", json());
    if (chat.is_string()) {
      vocab.chat_template = chat.get<std::string>();
    } else if (chat.is_array()) {  // [{"name": "default", "template": "..."}, ...]
      for (const json& entry : chat) {
        if (entry.value("name", "") == "default" && entry.contains("template")) {
          vocab.chat_template = entry["template"].get<std::string>();
        }
      }
    }
  }
  const std::filesystem::path generation_path = path.parent_path() / "generation_config.json";
  if (std::filesystem::exists(generation_path)) {
    ASYNCTLS_ASSIGN_OR_RETURN(const json generation, ReadJson(generation_path));
    const json& eos = generation.value("eos_token_id", json());
    for (const json& id : eos.is_array() ? eos : json::array({eos})) {
      if (id.is_number_integer()) vocab.extra_stop_ids.push_back(id.get<int32_t>());
    }
  }
  return tokenizer_internal::NewBpeTokenizer(std::move(vocab));
}

}  // namespace

absl::StatusOr<std::unique_ptr<Tokenizer>> Tokenizer::FromHfJson(
    const std::string& tokenizer_json_path) {
  try {
    return FromHfJsonImpl(tokenizer_json_path);
  } catch (const std::exception& e) {  // a field of an unexpected JSON type
    return absl::InvalidArgumentError(
        absl::StrCat(tokenizer_json_path, ": unexpected tokenizer.json content: ", e.what()));
  }
}

}  // namespace asynctls
