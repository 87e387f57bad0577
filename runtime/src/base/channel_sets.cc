#include "asynctls/runtime/channel_sets.h"

#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "asynctls/kernels/tls_params.h"

namespace asynctls {

absl::Status ChannelSets::Validate() const {
  if (num_layers <= 0 || num_q_heads <= 0 || num_kv_heads <= 0 || head_dim <= 0 ||
      num_q_heads % num_kv_heads != 0) {
    return absl::InvalidArgumentError(absl::StrCat("channel sets: bad shape layers ", num_layers,
                                                   ", q heads ", num_q_heads, ", kv heads ",
                                                   num_kv_heads, ", head_dim ", head_dim));
  }
  if (num_channels < 8 || num_channels % 8 != 0 || num_channels > head_dim ||
      num_channels > kernels::kTlsMaxChannels) {
    return absl::InvalidArgumentError(absl::StrCat("channel sets: num_channels ", num_channels,
                                                   " must be a multiple of 8 in [8, min(head_dim, ",
                                                   kernels::kTlsMaxChannels, ")]"));
  }
  const size_t rows = static_cast<size_t>(num_layers) * num_kv_heads;
  if (channels.size() != rows * num_channels) {
    return absl::InvalidArgumentError(absl::StrCat("channel sets: ", channels.size(),
                                                   " channels, expected ", rows * num_channels));
  }
  for (size_t r = 0; r < rows; ++r) {
    const int32_t* row = channels.data() + r * num_channels;
    for (int i = 0; i < num_channels; ++i) {
      if (row[i] < 0 || row[i] >= head_dim || (i > 0 && row[i] <= row[i - 1])) {
        return absl::InvalidArgumentError(
            absl::StrCat("channel sets: layer ", r / num_kv_heads, " kv head ", r % num_kv_heads,
                         ": channels must be ascending, distinct and in [0, ", head_dim, ")"));
      }
    }
  }
  return absl::OkStatus();
}

std::string ChannelSetsToJson(const ChannelSets& s) {
  // Hand-formatted: one line per (layer, KV head), so diffs between calibrations stay readable.
  nlohmann::json meta = {{"model", s.model}, {"source", s.source}};
  std::ostringstream out;
  out << "{\n  \"format\": \"asynctls-channels-v1\",\n"
      << "  \"model\": " << meta["model"].dump() << ",\n"
      << "  \"source\": " << meta["source"].dump() << ",\n"
      << "  \"num_tokens\": " << s.num_tokens << ",\n"
      << "  \"score\": \"mean_h max|q_h[i]| * max|k[i]|\",\n"
      << "  \"num_layers\": " << s.num_layers << ", \"num_q_heads\": " << s.num_q_heads
      << ", \"num_kv_heads\": " << s.num_kv_heads << ", \"head_dim\": " << s.head_dim
      << ", \"num_channels\": " << s.num_channels << ",\n  \"channels\": [\n";
  for (int l = 0; l < s.num_layers; ++l) {
    out << "    [\n";
    for (int g = 0; g < s.num_kv_heads; ++g) {
      const int32_t* row = s.Layer(l) + static_cast<size_t>(g) * s.num_channels;
      out << "      [";
      for (int i = 0; i < s.num_channels; ++i) out << (i ? ", " : "") << row[i];
      out << "]" << (g + 1 < s.num_kv_heads ? ",\n" : "\n");
    }
    out << "    ]" << (l + 1 < s.num_layers ? ",\n" : "\n");
  }
  out << "  ]\n}\n";
  return out.str();
}

absl::Status WriteChannelSets(const ChannelSets& sets, const std::string& path) {
  if (absl::Status st = sets.Validate(); !st.ok()) return st;
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  if (!out) return absl::PermissionDeniedError(absl::StrCat("cannot write ", path));
  out << ChannelSetsToJson(sets);
  out.close();
  if (!out) return absl::DataLossError(absl::StrCat("writing ", path, " failed"));
  return absl::OkStatus();
}

absl::StatusOr<ChannelSets> ChannelSetsFromJson(const std::string& text) {
  const nlohmann::json j = nlohmann::json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded() || !j.is_object()) {
    return absl::InvalidArgumentError("channel sets: not a JSON object");
  }
  if (!j.contains("format") || !j["format"].is_string() ||
      j["format"].get<std::string>() != "asynctls-channels-v1") {
    return absl::InvalidArgumentError("channel sets: key 'format' must be asynctls-channels-v1");
  }
  ChannelSets s;
  s.model = j.contains("model") && j["model"].is_string() ? j["model"].get<std::string>() : "";
  s.source = j.contains("source") && j["source"].is_string() ? j["source"].get<std::string>() : "";
  if (j.contains("num_tokens") && j["num_tokens"].is_number_integer()) {
    s.num_tokens = j["num_tokens"].get<int64_t>();
  }
  struct Field {
    const char* key;
    int32_t* dst;
  };
  const Field fields[] = {{"num_layers", &s.num_layers},
                          {"num_q_heads", &s.num_q_heads},
                          {"num_kv_heads", &s.num_kv_heads},
                          {"head_dim", &s.head_dim},
                          {"num_channels", &s.num_channels}};
  for (const Field& f : fields) {
    if (!j.contains(f.key) || !j[f.key].is_number_integer()) {
      return absl::InvalidArgumentError(
          absl::StrCat("channel sets: key '", f.key, "' missing or not an integer"));
    }
    *f.dst = j[f.key].get<int32_t>();
  }
  const auto& layers = j.contains("channels") ? j["channels"] : nlohmann::json();
  if (!layers.is_array() || static_cast<int>(layers.size()) != s.num_layers) {
    return absl::InvalidArgumentError("channel sets: key 'channels' must hold num_layers lists");
  }
  for (const auto& layer : layers) {
    if (!layer.is_array() || static_cast<int>(layer.size()) != s.num_kv_heads) {
      return absl::InvalidArgumentError(
          "channel sets: key 'channels': each layer must hold num_kv_heads lists");
    }
    for (const auto& row : layer) {
      if (!row.is_array() || static_cast<int>(row.size()) != s.num_channels) {
        return absl::InvalidArgumentError(
            "channel sets: key 'channels': each KV head must hold num_channels integers");
      }
      for (const auto& c : row) {
        if (!c.is_number_integer()) {
          return absl::InvalidArgumentError("channel sets: key 'channels': non-integer entry");
        }
        s.channels.push_back(c.get<int32_t>());
      }
    }
  }
  if (absl::Status st = s.Validate(); !st.ok()) return st;
  return s;
}

absl::StatusOr<ChannelSets> LoadChannelSets(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat("channel sets file not found: ", path));
  std::ostringstream text;
  text << in.rdbuf();
  return ChannelSetsFromJson(text.str());
}

}  // namespace asynctls
