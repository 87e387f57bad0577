// The GGML tensor type ids a GGUF file may name, with their block geometry, so that a reader
// can size every tensor (and reject a file) even for types it cannot dequantize.
#pragma once

#include <cstdint>
#include <optional>

#include "absl/strings/string_view.h"

namespace asynctls::weights {

struct GgmlTypeTraits {
  uint32_t id;
  absl::string_view name;  // "Q4_K"
  int64_t block_size;      // values per block
  int64_t type_size;       // bytes per block
  bool dequantizable;      // DequantizeGguf supports it
};

// nullopt for an id that no GGML version defines (or a removed one: 4, 5, Q4_2/Q4_3).
std::optional<GgmlTypeTraits> GgmlTypeById(uint32_t id);
std::optional<GgmlTypeTraits> GgmlTypeByName(absl::string_view name);

// IEEE half / bfloat16 to float, bit-exact (subnormals, inf, NaN).
float HalfToFloat(uint16_t h);
float BFloat16ToFloat(uint16_t b);

}  // namespace asynctls::weights
