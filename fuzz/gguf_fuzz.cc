// libFuzzer target for the GGUF reader: any byte string must parse to a WeightFile or to an
// error, and everything a parsed file offers (metadata, tensors, config) must be readable.
#include <cstddef>
#include <cstdint>
#include <string>

#include "asynctls/runtime/weights.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  auto file =
      asynctls::WeightFile::OpenGgufBytes(std::string(reinterpret_cast<const char*>(data), size));
  if (!file.ok()) return 0;
  const asynctls::WeightFile& f = **file;
  for (const auto& t : f.tensors()) {
    int64_t n = 1;
    for (int64_t d : t.shape) n *= d;  // validated not to overflow
    if (n <= (int64_t{1} << 22)) (void)f.ReadF32(t.name);
  }
  for (const char* key :
       {"general.architecture", "general.alignment", "llama.block_count", "tokenizer.ggml.tokens",
        "tokenizer.ggml.scores", "tokenizer.ggml.token_type"}) {
    (void)f.MetaString(key);
    (void)f.MetaInt(key);
    (void)f.MetaFloat(key);
    (void)f.MetaStringArray(key);
    (void)f.MetaIntArray(key);
    (void)f.MetaFloatArray(key);
  }
  auto config = f.ReadModelConfig();
  if (config.ok()) (void)config->RopeInvFreq();
  return 0;
}
