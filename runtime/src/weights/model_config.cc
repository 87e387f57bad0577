// ModelConfig: validation, RoPE frequencies, and the GGUF / config.json loaders.
#include "asynctls/runtime/model_config.h"

#include <cmath>
#include <limits>
#include <nlohmann/json.hpp>
#include <optional>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "asynctls/runtime/status.h"
#include "weights/config_loaders.h"

namespace asynctls {
namespace {

absl::Status Invalid(absl::string_view field, absl::string_view why) {
  return absl::InvalidArgumentError(absl::StrCat("ModelConfig.", field, ": ", why));
}

// Upper bounds far above any real model, so that a lying file cannot make us allocate
// per-layer or per-head tables of absurd size.
constexpr int32_t kMaxLayers = 4096;
constexpr int32_t kMaxHidden = 1 << 18;
constexpr int32_t kMaxHeads = 4096;
constexpr int32_t kMaxHeadDim = 4096;
constexpr int32_t kMaxFfn = 1 << 21;
constexpr int32_t kMaxVocab = 1 << 24;

absl::Status Bounded(absl::string_view field, int32_t v, int32_t max) {
  if (v > max) return Invalid(field, absl::StrCat(v, " exceeds the sanity bound ", max));
  return absl::OkStatus();
}

}  // namespace

absl::Status ModelConfig::Validate() const {
  ASYNCTLS_RETURN_IF_ERROR(Bounded("num_layers", num_layers, kMaxLayers));
  ASYNCTLS_RETURN_IF_ERROR(Bounded("hidden_size", hidden_size, kMaxHidden));
  ASYNCTLS_RETURN_IF_ERROR(Bounded("num_q_heads", num_q_heads, kMaxHeads));
  ASYNCTLS_RETURN_IF_ERROR(Bounded("head_dim", head_dim, kMaxHeadDim));
  ASYNCTLS_RETURN_IF_ERROR(Bounded("ffn_size", ffn_size, kMaxFfn));
  ASYNCTLS_RETURN_IF_ERROR(Bounded("vocab_size", vocab_size, kMaxVocab));
  if (architecture != "llama" && architecture != "qwen2" && architecture != "qwen3") {
    return Invalid("architecture",
                   absl::StrCat("unsupported \"", architecture, "\" (llama, qwen2, qwen3)"));
  }
  if (num_layers <= 0) return Invalid("num_layers", absl::StrCat(num_layers, " must be > 0"));
  if (hidden_size <= 0) return Invalid("hidden_size", absl::StrCat(hidden_size, " must be > 0"));
  if (num_q_heads <= 0) return Invalid("num_q_heads", absl::StrCat(num_q_heads, " must be > 0"));
  if (num_kv_heads <= 0 || num_kv_heads > num_q_heads || num_q_heads % num_kv_heads != 0) {
    return Invalid("num_kv_heads", absl::StrCat(num_kv_heads, " must be > 0 and divide ",
                                                "num_q_heads = ", num_q_heads));
  }
  if (head_dim <= 0 || head_dim % 2 != 0) {
    return Invalid("head_dim", absl::StrCat(head_dim, " must be positive and even"));
  }
  if (rotary_dim <= 0 || rotary_dim % 2 != 0 || rotary_dim > head_dim) {
    return Invalid(
        "rotary_dim",
        absl::StrCat(rotary_dim, " must be positive, even and <= ", "head_dim = ", head_dim));
  }
  if (ffn_size <= 0) return Invalid("ffn_size", absl::StrCat(ffn_size, " must be > 0"));
  if (vocab_size <= 0) return Invalid("vocab_size", absl::StrCat(vocab_size, " must be > 0"));
  if (max_context <= 0) return Invalid("max_context", absl::StrCat(max_context, " must be > 0"));
  if (!(rms_eps > 0.f) || !std::isfinite(rms_eps)) {
    return Invalid("rms_eps", absl::StrCat(rms_eps, " must be finite and > 0"));
  }
  if (!(rope_theta > 0.f) || !std::isfinite(rope_theta)) {
    return Invalid("rope_theta", absl::StrCat(rope_theta, " must be finite and > 0"));
  }
  const RopeScaling& rs = rope_scaling;
  if (rs.type != RopeScaling::Type::kNone && (!(rs.factor > 0.f) || !std::isfinite(rs.factor))) {
    return Invalid("rope_scaling.factor", absl::StrCat(rs.factor, " must be finite and > 0"));
  }
  if (rs.type == RopeScaling::Type::kLlama3) {
    if (!(rs.low_freq_factor > 0.f) || !(rs.high_freq_factor > rs.low_freq_factor)) {
      return Invalid("rope_scaling",
                     absl::StrCat("llama3 needs 0 < low_freq_factor (", rs.low_freq_factor,
                                  ") < high_freq_factor (", rs.high_freq_factor, ")"));
    }
    if (rs.original_max_position <= 0) {
      return Invalid("rope_scaling.original_max_position",
                     absl::StrCat(rs.original_max_position, " must be > 0"));
    }
  }
  if (!rope_freq_factors.empty()) {
    if (rope_freq_factors.size() != static_cast<size_t>(rotary_dim / 2)) {
      return Invalid("rope_freq_factors",
                     absl::StrCat("has ", rope_freq_factors.size(),
                                  " entries, rotary_dim / 2 = ", rotary_dim / 2));
    }
    for (float f : rope_freq_factors) {
      if (!(f > 0.f) || !std::isfinite(f)) {
        return Invalid("rope_freq_factors", absl::StrCat("entry ", f, " must be finite and > 0"));
      }
    }
  }
  return absl::OkStatus();
}

std::vector<float> ModelConfig::RopeInvFreq() const {
  const int32_t n = rotary_dim / 2;
  std::vector<float> out(n > 0 ? n : 0);
  const RopeScaling& rs = rope_scaling;
  for (int32_t i = 0; i < n; ++i) {
    double inv = std::pow(static_cast<double>(rope_theta), -2.0 * i / rotary_dim);
    switch (rs.type) {
      case RopeScaling::Type::kNone:
        break;
      case RopeScaling::Type::kLinear:
        inv /= rs.factor;
        break;
      case RopeScaling::Type::kLlama3: {
        // Hugging Face's _compute_llama3_parameters: long wavelengths are divided by the
        // factor, short ones kept, and the band between interpolated smoothly.
        const double old_ctx = rs.original_max_position;
        const double low_wavelen = old_ctx / rs.low_freq_factor;
        const double high_wavelen = old_ctx / rs.high_freq_factor;
        const double wavelen = 2.0 * M_PI / inv;
        if (wavelen > low_wavelen) {
          inv /= rs.factor;
        } else if (wavelen >= high_wavelen) {
          const double smooth =
              (old_ctx / wavelen - rs.low_freq_factor) / (rs.high_freq_factor - rs.low_freq_factor);
          inv = (1.0 - smooth) * inv / rs.factor + smooth * inv;
        }
        break;
      }
    }
    if (static_cast<size_t>(i) < rope_freq_factors.size()) inv /= rope_freq_factors[i];
    out[i] = static_cast<float>(inv);
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
// Hugging Face config.json

namespace {

using nlohmann::json;

absl::Status HfError(absl::string_view key, absl::string_view why) {
  return absl::InvalidArgumentError(absl::StrCat("config.json \"", key, "\": ", why));
}

const json* Member(const json& j, const char* key) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) return nullptr;
  return &*it;
}

absl::StatusOr<std::optional<int64_t>> OptInt(const json& j, const char* key) {
  const json* v = Member(j, key);
  if (v == nullptr) return std::optional<int64_t>();
  if (v->is_number_unsigned()) {
    uint64_t u = v->get<uint64_t>();
    if (u > static_cast<uint64_t>(std::numeric_limits<int32_t>::max())) {
      return HfError(key, absl::StrCat(u, " is out of range"));
    }
    return std::optional<int64_t>(static_cast<int64_t>(u));
  }
  if (v->is_number_integer()) {
    int64_t x = v->get<int64_t>();
    if (x < std::numeric_limits<int32_t>::min() || x > std::numeric_limits<int32_t>::max()) {
      return HfError(key, absl::StrCat(x, " is out of range"));
    }
    return std::optional<int64_t>(x);
  }
  return HfError(key, "is not an integer");
}

absl::StatusOr<int32_t> ReqInt(const json& j, const char* key) {
  ASYNCTLS_ASSIGN_OR_RETURN(auto v, OptInt(j, key));
  if (!v.has_value()) return HfError(key, "is missing");
  return static_cast<int32_t>(*v);
}

absl::StatusOr<std::optional<double>> OptNumber(const json& j, const char* key) {
  const json* v = Member(j, key);
  if (v == nullptr) return std::optional<double>();
  if (!v->is_number()) return HfError(key, "is not a number");
  return std::optional<double>(v->get<double>());
}

absl::StatusOr<std::optional<bool>> OptBool(const json& j, const char* key) {
  const json* v = Member(j, key);
  if (v == nullptr) return std::optional<bool>();
  if (!v->is_boolean()) return HfError(key, "is not a boolean");
  return std::optional<bool>(v->get<bool>());
}

absl::StatusOr<std::string> ArchitectureFromHf(const json& j) {
  if (const json* archs = Member(j, "architectures"); archs != nullptr) {
    if (!archs->is_array()) return HfError("architectures", "is not an array");
    for (const json& a : *archs) {
      if (!a.is_string()) continue;
      const std::string s = a.get<std::string>();
      if (s == "LlamaForCausalLM") return std::string("llama");
      if (s == "Qwen2ForCausalLM") return std::string("qwen2");
      if (s == "Qwen3ForCausalLM") return std::string("qwen3");
    }
    return HfError("architectures", absl::StrCat(archs->dump(), " has none of LlamaForCausalLM, ",
                                                 "Qwen2ForCausalLM, Qwen3ForCausalLM"));
  }
  if (const json* mt = Member(j, "model_type"); mt != nullptr && mt->is_string()) {
    const std::string s = mt->get<std::string>();
    if (s == "llama" || s == "qwen2" || s == "qwen3") return s;
    return HfError("model_type", absl::StrCat("unsupported \"", s, "\""));
  }
  return HfError("architectures", "is missing (and no model_type)");
}

absl::Status RopeScalingFromHf(const json& j, RopeScaling* out) {
  const json* rs = Member(j, "rope_scaling");
  if (rs == nullptr) return absl::OkStatus();
  if (!rs->is_object()) return HfError("rope_scaling", "is not an object");
  const json* type = Member(*rs, "rope_type");
  if (type == nullptr) type = Member(*rs, "type");
  if (type == nullptr || !type->is_string()) {
    return HfError("rope_scaling.rope_type", "is missing or not a string");
  }
  const std::string t = type->get<std::string>();
  if (t == "default") return absl::OkStatus();
  if (t != "linear" && t != "llama3") {
    return HfError("rope_scaling.rope_type", absl::StrCat("unsupported \"", t, "\""));
  }
  ASYNCTLS_ASSIGN_OR_RETURN(auto factor, OptNumber(*rs, "factor"));
  if (!factor.has_value()) return HfError("rope_scaling.factor", "is missing");
  out->factor = static_cast<float>(*factor);
  if (t == "linear") {
    out->type = RopeScaling::Type::kLinear;
    return absl::OkStatus();
  }
  out->type = RopeScaling::Type::kLlama3;
  ASYNCTLS_ASSIGN_OR_RETURN(auto low, OptNumber(*rs, "low_freq_factor"));
  ASYNCTLS_ASSIGN_OR_RETURN(auto high, OptNumber(*rs, "high_freq_factor"));
  ASYNCTLS_ASSIGN_OR_RETURN(auto orig, OptInt(*rs, "original_max_position_embeddings"));
  if (!low.has_value()) return HfError("rope_scaling.low_freq_factor", "is missing");
  if (!high.has_value()) return HfError("rope_scaling.high_freq_factor", "is missing");
  if (!orig.has_value()) {
    return HfError("rope_scaling.original_max_position_embeddings", "is missing");
  }
  out->low_freq_factor = static_cast<float>(*low);
  out->high_freq_factor = static_cast<float>(*high);
  out->original_max_position = static_cast<int32_t>(*orig);
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<ModelConfig> ModelConfigFromHfJson(const std::string& json_text) {
  json j = json::parse(json_text, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) return absl::InvalidArgumentError("config.json is not valid JSON");
  if (!j.is_object()) return absl::InvalidArgumentError("config.json is not a JSON object");
  ModelConfig c;
  ASYNCTLS_ASSIGN_OR_RETURN(c.architecture, ArchitectureFromHf(j));
  if (const json* n = Member(j, "_name_or_path"); n != nullptr && n->is_string()) {
    c.name = n->get<std::string>();
  }
  ASYNCTLS_ASSIGN_OR_RETURN(c.num_layers, ReqInt(j, "num_hidden_layers"));
  ASYNCTLS_ASSIGN_OR_RETURN(c.hidden_size, ReqInt(j, "hidden_size"));
  ASYNCTLS_ASSIGN_OR_RETURN(c.num_q_heads, ReqInt(j, "num_attention_heads"));
  ASYNCTLS_ASSIGN_OR_RETURN(auto kv, OptInt(j, "num_key_value_heads"));
  c.num_kv_heads = static_cast<int32_t>(kv.value_or(c.num_q_heads));
  ASYNCTLS_ASSIGN_OR_RETURN(auto head_dim, OptInt(j, "head_dim"));
  if (head_dim.has_value()) {
    c.head_dim = static_cast<int32_t>(*head_dim);
  } else if (c.num_q_heads > 0) {
    c.head_dim = c.hidden_size / c.num_q_heads;
  }
  ASYNCTLS_ASSIGN_OR_RETURN(c.ffn_size, ReqInt(j, "intermediate_size"));
  ASYNCTLS_ASSIGN_OR_RETURN(c.vocab_size, ReqInt(j, "vocab_size"));
  ASYNCTLS_ASSIGN_OR_RETURN(c.max_context, ReqInt(j, "max_position_embeddings"));
  ASYNCTLS_ASSIGN_OR_RETURN(auto eps, OptNumber(j, "rms_norm_eps"));
  c.rms_eps = static_cast<float>(eps.value_or(1e-6));
  ASYNCTLS_ASSIGN_OR_RETURN(auto theta, OptNumber(j, "rope_theta"));
  c.rope_theta = static_cast<float>(theta.value_or(10000.0));
  ASYNCTLS_ASSIGN_OR_RETURN(auto partial, OptNumber(j, "partial_rotary_factor"));
  c.rotary_dim = static_cast<int32_t>(std::lround(c.head_dim * partial.value_or(1.0)));
  ASYNCTLS_RETURN_IF_ERROR(RopeScalingFromHf(j, &c.rope_scaling));
  c.rope_style = kernels::RopeStyle::kHalf;
  ASYNCTLS_ASSIGN_OR_RETURN(auto tied, OptBool(j, "tie_word_embeddings"));
  c.tied_embeddings = tied.value_or(false);
  ASYNCTLS_ASSIGN_OR_RETURN(auto bias, OptBool(j, "attention_bias"));
  c.attention_bias = c.architecture == "qwen2" ? true : bias.value_or(false);
  c.qk_norm = c.architecture == "qwen3";
  ASYNCTLS_ASSIGN_OR_RETURN(auto sliding, OptBool(j, "use_sliding_window"));
  if (sliding.value_or(false)) return HfError("use_sliding_window", "true is not supported");
  ASYNCTLS_ASSIGN_OR_RETURN(auto mlp_bias, OptBool(j, "mlp_bias"));
  if (mlp_bias.value_or(false)) return HfError("mlp_bias", "true is not supported");
  ASYNCTLS_RETURN_IF_ERROR(c.Validate());
  return c;
}

// ---------------------------------------------------------------------------------------------
// GGUF metadata

namespace weights {
namespace {

absl::Status GgufError(absl::string_view key, absl::string_view why) {
  return absl::InvalidArgumentError(absl::StrCat("GGUF metadata ", key, ": ", why));
}

absl::StatusOr<int32_t> ToInt32(const std::string& key, int64_t v) {
  if (v < 0 || v > std::numeric_limits<int32_t>::max()) {
    return GgufError(key, absl::StrCat(v, " is out of range"));
  }
  return static_cast<int32_t>(v);
}

// An integer key that may also be a per-layer array whose entries are all equal.
absl::StatusOr<std::optional<int32_t>> UniformInt(const WeightFile& f, const std::string& key) {
  if (auto v = f.MetaInt(key); v.has_value()) {
    ASYNCTLS_ASSIGN_OR_RETURN(int32_t x, ToInt32(key, *v));
    return std::optional<int32_t>(x);
  }
  if (auto arr = f.MetaIntArray(key); arr.has_value() && !arr->empty()) {
    for (int64_t x : *arr) {
      if (x != (*arr)[0]) return GgufError(key, "differs between layers (not supported)");
    }
    ASYNCTLS_ASSIGN_OR_RETURN(int32_t x, ToInt32(key, (*arr)[0]));
    return std::optional<int32_t>(x);
  }
  if (f.MetaString(key).has_value() || f.MetaFloat(key).has_value()) {
    return GgufError(key, "is not an integer");
  }
  return std::optional<int32_t>();
}

absl::StatusOr<int32_t> RequiredInt(const WeightFile& f, const std::string& key) {
  ASYNCTLS_ASSIGN_OR_RETURN(auto v, UniformInt(f, key));
  if (!v.has_value()) return GgufError(key, "is missing");
  return *v;
}

// token_embd.weight must be [vocab_size, hidden_size]: the LM head and the embedding lookup
// are sized from the config.
absl::Status CheckEmbeddingShape(const ModelConfig& c, const WeightFile& f) {
  for (const WeightTensorInfo& t : f.tensors()) {
    if (t.name != "token_embd.weight") continue;
    if (t.shape != std::vector<int64_t>{c.vocab_size, c.hidden_size}) {
      std::string shape;
      for (int64_t d : t.shape) absl::StrAppend(&shape, shape.empty() ? "" : ", ", d);
      return absl::InvalidArgumentError(
          absl::StrCat("token_embd.weight has shape [", shape, "], the config says [vocab_size ",
                       c.vocab_size, ", hidden_size ", c.hidden_size, "]"));
    }
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<ModelConfig> ModelConfigFromGguf(const WeightFile& f) {
  ModelConfig c;
  auto arch = f.MetaString("general.architecture");
  if (!arch.has_value()) return GgufError("general.architecture", "is missing");
  c.architecture = *arch;
  if (c.architecture != "llama" && c.architecture != "qwen2" && c.architecture != "qwen3") {
    return GgufError("general.architecture",
                     absl::StrCat("unsupported \"", c.architecture, "\" (llama, qwen2, qwen3)"));
  }
  c.name = f.MetaString("general.name").value_or("");
  const std::string a = c.architecture + ".";
  ASYNCTLS_ASSIGN_OR_RETURN(c.num_layers, RequiredInt(f, a + "block_count"));
  ASYNCTLS_ASSIGN_OR_RETURN(c.hidden_size, RequiredInt(f, a + "embedding_length"));
  ASYNCTLS_ASSIGN_OR_RETURN(c.num_q_heads, RequiredInt(f, a + "attention.head_count"));
  ASYNCTLS_ASSIGN_OR_RETURN(auto kv, UniformInt(f, a + "attention.head_count_kv"));
  c.num_kv_heads = kv.value_or(c.num_q_heads);
  ASYNCTLS_ASSIGN_OR_RETURN(auto key_len, UniformInt(f, a + "attention.key_length"));
  c.head_dim =
      key_len.has_value() ? *key_len : (c.num_q_heads > 0 ? c.hidden_size / c.num_q_heads : 0);
  ASYNCTLS_ASSIGN_OR_RETURN(auto value_len, UniformInt(f, a + "attention.value_length"));
  if (value_len.has_value() && *value_len != c.head_dim) {
    return GgufError(a + "attention.value_length",
                     absl::StrCat(*value_len, " differs from the key length ", c.head_dim));
  }
  ASYNCTLS_ASSIGN_OR_RETURN(c.ffn_size, RequiredInt(f, a + "feed_forward_length"));
  ASYNCTLS_ASSIGN_OR_RETURN(c.max_context, RequiredInt(f, a + "context_length"));
  auto eps = f.MetaFloat(a + "attention.layer_norm_rms_epsilon");
  if (!eps.has_value()) return GgufError(a + "attention.layer_norm_rms_epsilon", "is missing");
  c.rms_eps = static_cast<float>(*eps);
  c.rope_theta = static_cast<float>(f.MetaFloat(a + "rope.freq_base").value_or(10000.0));
  ASYNCTLS_ASSIGN_OR_RETURN(auto rot, UniformInt(f, a + "rope.dimension_count"));
  c.rotary_dim = rot.value_or(c.head_dim);

  // Vocabulary: the tokenizer's token list, else {arch}.vocab_size, else token_embd rows.
  if (auto tokens = f.MetaStringArray("tokenizer.ggml.tokens"); tokens.has_value()) {
    ASYNCTLS_ASSIGN_OR_RETURN(
        c.vocab_size, ToInt32("tokenizer.ggml.tokens", static_cast<int64_t>(tokens->size())));
  } else if (auto vs = f.MetaInt(a + "vocab_size"); vs.has_value()) {
    ASYNCTLS_ASSIGN_OR_RETURN(c.vocab_size, ToInt32(a + "vocab_size", *vs));
  } else {
    for (const WeightTensorInfo& t : f.tensors()) {
      if (t.name == "token_embd.weight" && !t.shape.empty()) {
        ASYNCTLS_ASSIGN_OR_RETURN(c.vocab_size, ToInt32("token_embd.weight rows", t.shape[0]));
      }
    }
  }

  const std::string scaling_key = a + "rope.scaling.type";
  if (auto type = f.MetaString(scaling_key); type.has_value() && *type != "none") {
    if (*type != "linear") {
      return GgufError(scaling_key, absl::StrCat("unsupported \"", *type, "\""));
    }
    c.rope_scaling.type = RopeScaling::Type::kLinear;
    auto factor = f.MetaFloat(a + "rope.scaling.factor");
    if (!factor.has_value()) return GgufError(a + "rope.scaling.factor", "is missing");
    c.rope_scaling.factor = static_cast<float>(*factor);
  } else if (!type.has_value()) {
    // Older converters wrote only rope.scale_linear.
    if (auto scale = f.MetaFloat(a + "rope.scale_linear"); scale.has_value() && *scale != 1.0) {
      c.rope_scaling.type = RopeScaling::Type::kLinear;
      c.rope_scaling.factor = static_cast<float>(*scale);
    }
  }
  if (f.HasTensor("rope_freqs.weight")) {
    ASYNCTLS_ASSIGN_OR_RETURN(c.rope_freq_factors, f.ReadF32("rope_freqs.weight"));
  }

  c.rope_style =
      c.architecture == "llama" ? kernels::RopeStyle::kInterleaved : kernels::RopeStyle::kHalf;
  c.tied_embeddings = !f.HasTensor("output.weight");
  c.qk_norm = f.HasTensor("blk.0.attn_q_norm.weight");
  c.attention_bias = f.HasTensor("blk.0.attn_q.bias");
  ASYNCTLS_RETURN_IF_ERROR(c.Validate());
  ASYNCTLS_RETURN_IF_ERROR(CheckEmbeddingShape(c, f));
  return c;
}

absl::StatusOr<ModelConfig> ReconcileHfConfigWithTensors(ModelConfig c, const WeightFile& f) {
  const bool has_bias = f.HasTensor("blk.0.attn_q.bias");
  if (c.attention_bias && !has_bias) {
    return absl::InvalidArgumentError(absl::StrCat(
        c.architecture, " config expects attention biases but blk.0.attn_q.bias is missing"));
  }
  c.attention_bias = has_bias;
  const bool has_qk_norm = f.HasTensor("blk.0.attn_q_norm.weight");
  if (c.qk_norm && !has_qk_norm) {
    return absl::InvalidArgumentError(absl::StrCat(
        c.architecture, " config expects q/k norms but blk.0.attn_q_norm.weight is missing"));
  }
  c.qk_norm = has_qk_norm;
  if (!c.tied_embeddings && !f.HasTensor("output.weight")) {
    return absl::InvalidArgumentError(
        "config.json \"tie_word_embeddings\" is false but lm_head.weight is missing");
  }
  ASYNCTLS_RETURN_IF_ERROR(c.Validate());
  ASYNCTLS_RETURN_IF_ERROR(CheckEmbeddingShape(c, f));
  return c;
}

}  // namespace weights
}  // namespace asynctls
