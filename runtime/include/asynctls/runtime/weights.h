// Weight files: GGUF (llama.cpp) and Hugging Face safetensors + config.json, memory-mapped.
// Tensors are exposed under llama.cpp's canonical names whatever the source format:
//   token_embd.weight, output_norm.weight, output.weight (absent when tied),
//   blk.N.{attn_norm, attn_q, attn_k, attn_v, attn_output, attn_q_norm, attn_k_norm,
//          ffn_norm, ffn_gate, ffn_up, ffn_down}.weight, blk.N.attn_{q,k,v}.bias
// Shapes are row-major, outermost first: a projection weight is [out_features, in_features].
// A malformed or truncated file is an INVALID_ARGUMENT / DATA_LOSS error naming the problem.
// Thread-safe after Open (reads only).
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "asynctls/runtime/model_config.h"

namespace asynctls {

struct WeightTensorInfo {
  std::string name;             // canonical name (see file comment)
  std::vector<int64_t> shape;   // row-major, outermost first
  std::string source_type;      // "F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q6_K"
};

class WeightFile {
 public:
  virtual ~WeightFile() = default;

  // Opens a .gguf file, a .safetensors file, or a directory holding config.json and one or
  // more *.safetensors files (sharded via model.safetensors.index.json or all in the folder).
  static absl::StatusOr<std::unique_ptr<WeightFile>> Open(const std::string& path);
  // Parses a GGUF image held in memory (the bytes are moved in). For tests and fuzzing.
  static absl::StatusOr<std::unique_ptr<WeightFile>> OpenGgufBytes(std::string bytes);

  virtual std::string format() const = 0;  // "gguf" or "safetensors"
  virtual absl::StatusOr<ModelConfig> ReadModelConfig() const = 0;
  virtual const std::vector<WeightTensorInfo>& tensors() const = 0;
  virtual bool HasTensor(const std::string& name) const = 0;
  // Dequantizes the whole tensor to fp32, row-major. NOT_FOUND for an unknown name.
  virtual absl::StatusOr<std::vector<float>> ReadF32(const std::string& name) const = 0;

  // GGUF metadata (empty / nullopt for safetensors or a missing key).
  virtual std::optional<std::string> MetaString(const std::string& key) const = 0;
  virtual std::optional<int64_t> MetaInt(const std::string& key) const = 0;
  virtual std::optional<double> MetaFloat(const std::string& key) const = 0;
  virtual std::optional<std::vector<std::string>> MetaStringArray(const std::string& key) const = 0;
  virtual std::optional<std::vector<int64_t>> MetaIntArray(const std::string& key) const = 0;
  // Float arrays (e.g. tokenizer.ggml.scores); integer arrays are converted.
  virtual std::optional<std::vector<float>> MetaFloatArray(const std::string& key) const = 0;
  // MetaInt accepts every integer type and bool (0/1); uint64 values above INT64_MAX are
  // nullopt. MetaFloat accepts float32/float64 and integers. Arrays of arrays are not exposed.
};

// Dequantizes `count` consecutive values of a GGUF tensor type ("F32", "F16", "BF16", "Q8_0",
// "Q4_0", "Q4_1", "Q4_K", "Q6_K") from `src` (`src_bytes` long, llama.cpp block layouts) into
// `dst`. INVALID_ARGUMENT when count is not a whole number of blocks or src is too short,
// UNIMPLEMENTED for another type name.
absl::Status DequantizeGguf(absl::string_view type, const void* src, size_t src_bytes,
                            int64_t count, float* dst);

}  // namespace asynctls
