// Hugging Face safetensors checkpoints: one file, or a directory with config.json and shards
// (listed by model.safetensors.index.json, or every *.safetensors in the folder). Tensor names
// are mapped to llama.cpp's canonical names (hf_names.h).
#pragma once

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "asynctls/runtime/weights.h"

namespace asynctls::weights {

// `path` is a .safetensors file (config.json looked up beside it) or a directory.
absl::StatusOr<std::unique_ptr<WeightFile>> OpenSafetensors(const std::string& path);

// One safetensors image held in memory, without config.json (fuzzing).
absl::StatusOr<std::unique_ptr<WeightFile>> OpenSafetensorsBytes(std::string bytes);

}  // namespace asynctls::weights
