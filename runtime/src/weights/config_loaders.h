// ModelConfig builders behind WeightFile::ReadModelConfig.
#pragma once

#include "absl/status/statusor.h"
#include "asynctls/runtime/model_config.h"
#include "asynctls/runtime/weights.h"

namespace asynctls::weights {

// From GGUF metadata ({arch}.* keys) and the tensors present. Validated.
absl::StatusOr<ModelConfig> ModelConfigFromGguf(const WeightFile& file);

// Cross-checks a config.json-derived config with the tensors of a safetensors checkpoint
// (bias, q/k norm and output.weight presence). Validated.
absl::StatusOr<ModelConfig> ReconcileHfConfigWithTensors(ModelConfig config,
                                                         const WeightFile& file);

}  // namespace asynctls::weights
