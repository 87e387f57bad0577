// WeightFile::Open: picks the reader from what `path` is.
#include <sys/stat.h>

#include <cstring>

#include "absl/status/status.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "asynctls/runtime/weights.h"
#include "weights/gguf_file.h"
#include "weights/mapped_file.h"
#include "weights/safetensors_file.h"

namespace asynctls {

absl::StatusOr<std::unique_ptr<WeightFile>> WeightFile::Open(const std::string& path) {
  struct stat st;
  if (::stat(path.c_str(), &st) != 0) {
    return absl::NotFoundError(absl::StrCat("weight file ", path, " does not exist"));
  }
  if (S_ISDIR(st.st_mode)) return weights::OpenSafetensors(path);
  auto mapped = weights::MappedFile::Open(path);
  if (!mapped.ok()) return mapped.status();
  const bool gguf_magic = (*mapped)->size() >= 4 && std::memcmp((*mapped)->data(), "GGUF", 4) == 0;
  if (gguf_magic || absl::EndsWith(path, ".gguf")) {
    return weights::OpenGgufRegion(std::move(mapped).value(), path);
  }
  if (absl::EndsWith(path, ".safetensors")) return weights::OpenSafetensors(path);
  return absl::InvalidArgumentError(
      absl::StrCat(path, ": neither GGUF (no magic) nor .safetensors nor a directory"));
}

absl::StatusOr<std::unique_ptr<WeightFile>> WeightFile::OpenGgufBytes(std::string bytes) {
  return weights::OpenGgufRegion(std::make_unique<weights::OwnedBytes>(std::move(bytes)),
                                 "<memory>");
}

}  // namespace asynctls
