// Hugging Face (Llama / Qwen2 / Qwen3) tensor names to llama.cpp's canonical GGUF names.
#pragma once

#include <optional>
#include <string>

#include "absl/strings/string_view.h"

namespace asynctls::weights {

// "model.layers.3.self_attn.q_proj.weight" -> "blk.3.attn_q.weight", "lm_head.weight" ->
// "output.weight", ... nullopt for a name with no canonical counterpart (kept as is by the
// caller) and for buffers that are not weights (rotary_emb.inv_freq), which return "".
std::optional<std::string> CanonicalNameFromHf(absl::string_view hf_name);

}  // namespace asynctls::weights
