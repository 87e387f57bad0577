// The shape and hyper-parameters of a decoder-only transformer (Llama / SmolLM2, Qwen2, Qwen3),
// read from GGUF metadata or a Hugging Face config.json.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "asynctls/kernels/dense_params.h"

namespace asynctls {

struct RopeScaling {
  enum class Type { kNone, kLinear, kLlama3 };
  Type type = Type::kNone;
  float factor = 1.f;
  float low_freq_factor = 1.f;          // llama3
  float high_freq_factor = 4.f;         // llama3
  int32_t original_max_position = 8192;  // llama3
};

struct ModelConfig {
  std::string architecture;  // "llama", "qwen2" or "qwen3"
  std::string name;
  int32_t num_layers = 0;
  int32_t hidden_size = 0;
  int32_t num_q_heads = 0;
  int32_t num_kv_heads = 0;
  int32_t head_dim = 0;
  int32_t ffn_size = 0;
  int32_t vocab_size = 0;
  int32_t max_context = 0;
  float rms_eps = 1e-6f;
  float rope_theta = 10000.f;
  int32_t rotary_dim = 0;  // = head_dim unless the model rotates part of it
  RopeScaling rope_scaling;
  // Per-pair frequency divisors [rotary_dim / 2] (GGUF rope_freqs.weight, how llama.cpp stores
  // Llama 3 scaling); empty when absent. Applied after rope_scaling.
  std::vector<float> rope_freq_factors;
  kernels::RopeStyle rope_style = kernels::RopeStyle::kHalf;
  bool qk_norm = false;          // Qwen3: RMSNorm on each q and k head before RoPE
  bool attention_bias = false;   // Qwen2: bias on q/k/v projections
  bool tied_embeddings = false;  // LM head reads token_embd.weight

  // INVALID_ARGUMENT naming the field when a value is missing or inconsistent.
  absl::Status Validate() const;
  // RoPE inverse frequencies [rotary_dim / 2] after scaling.
  std::vector<float> RopeInvFreq() const;
};

// Parses a Hugging Face config.json (LlamaForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM).
// INVALID_ARGUMENT naming the key when the text is not JSON or a field is missing/wrong.
// The result is validated. attention_bias / qk_norm / tied come from the config alone here;
// WeightFile::ReadModelConfig also checks them against the tensors present.
absl::StatusOr<ModelConfig> ModelConfigFromHfJson(const std::string& json_text);

}  // namespace asynctls
