// libFuzzer target for the safetensors header parser: any byte string must give a WeightFile
// or an error, and every tensor of a parsed file must be readable.
#include <cstddef>
#include <cstdint>
#include <string>

#include "asynctls/runtime/weights.h"
#include "weights/safetensors_file.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  auto file = asynctls::weights::OpenSafetensorsBytes(
      std::string(reinterpret_cast<const char*>(data), size));
  if (!file.ok()) return 0;
  for (const auto& t : (*file)->tensors()) {
    int64_t n = 1;
    for (int64_t d : t.shape) n *= d;  // the reader rejects shapes whose product overflows
    if (n <= (int64_t{1} << 22)) (void)(*file)->ReadF32(t.name);
  }
  return 0;
}
