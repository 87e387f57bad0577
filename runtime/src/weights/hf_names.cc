#include "weights/hf_names.h"

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/strip.h"

namespace asynctls::weights {
namespace {

struct Rename {
  absl::string_view hf;
  absl::string_view canonical;
};

constexpr Rename kGlobal[] = {
    {"model.embed_tokens.weight", "token_embd.weight"},
    {"model.norm.weight", "output_norm.weight"},
    {"lm_head.weight", "output.weight"},
};

// After "model.layers.N.".
constexpr Rename kPerLayer[] = {
    {"input_layernorm.weight", "attn_norm.weight"},
    {"self_attn.q_proj.weight", "attn_q.weight"},
    {"self_attn.k_proj.weight", "attn_k.weight"},
    {"self_attn.v_proj.weight", "attn_v.weight"},
    {"self_attn.q_proj.bias", "attn_q.bias"},
    {"self_attn.k_proj.bias", "attn_k.bias"},
    {"self_attn.v_proj.bias", "attn_v.bias"},
    {"self_attn.o_proj.weight", "attn_output.weight"},
    {"self_attn.o_proj.bias", "attn_output.bias"},
    {"self_attn.q_norm.weight", "attn_q_norm.weight"},
    {"self_attn.k_norm.weight", "attn_k_norm.weight"},
    {"post_attention_layernorm.weight", "ffn_norm.weight"},
    {"mlp.gate_proj.weight", "ffn_gate.weight"},
    {"mlp.up_proj.weight", "ffn_up.weight"},
    {"mlp.down_proj.weight", "ffn_down.weight"},
};

}  // namespace

std::optional<std::string> CanonicalNameFromHf(absl::string_view name) {
  for (const Rename& r : kGlobal) {
    if (name == r.hf) return std::string(r.canonical);
  }
  absl::string_view rest = name;
  if (!absl::ConsumePrefix(&rest, "model.layers.")) return std::nullopt;
  const size_t dot = rest.find('.');
  if (dot == absl::string_view::npos || dot == 0 || dot > 6) return std::nullopt;
  uint32_t layer;
  const absl::string_view digits = rest.substr(0, dot);
  for (char c : digits) {
    if (c < '0' || c > '9') return std::nullopt;
  }
  if (!absl::SimpleAtoi(digits, &layer)) return std::nullopt;
  rest.remove_prefix(dot + 1);
  for (const Rename& r : kPerLayer) {
    if (rest == r.hf) return absl::StrCat("blk.", layer, ".", r.canonical);
  }
  if (absl::EndsWith(rest, "rotary_emb.inv_freq")) return std::string();
  return std::nullopt;
}

}  // namespace asynctls::weights
