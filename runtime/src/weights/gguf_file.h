// GGUF (llama.cpp) parser, versions 2 and 3. Every length and count read from the file is
// checked against the bytes left before anything is allocated for it, so a lying or truncated
// file is an error, never a crash or a huge allocation.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"
#include "asynctls/runtime/weights.h"
#include "weights/ggml_types.h"
#include "weights/mapped_file.h"

namespace asynctls::weights {

enum class GgufValueType : uint32_t {
  kU8 = 0,
  kI8 = 1,
  kU16 = 2,
  kI16 = 3,
  kU32 = 4,
  kI32 = 5,
  kF32 = 6,
  kBool = 7,
  kString = 8,
  kArray = 9,
  kU64 = 10,
  kI64 = 11,
  kF64 = 12,
};

struct GgufValue {
  GgufValueType type = GgufValueType::kU8;
  // Scalars: integers and bool in `i` (`u64_overflow` when a uint64 exceeds INT64_MAX),
  // floats in `f`, strings in `s`.
  int64_t i = 0;
  bool u64_overflow = false;
  double f = 0;
  std::string s;
  // Arrays: element type and exactly one of the vectors below filled, by element kind.
  GgufValueType elem_type = GgufValueType::kU8;
  std::vector<int64_t> ints;   // integer and bool elements
  std::vector<double> floats;  // f32 / f64 elements
  std::vector<std::string> strings;
  std::vector<GgufValue> arrays;  // nested arrays
};

struct GgufTensor {
  std::string name;
  std::vector<int64_t> shape;  // row-major, outermost first (GGUF ne[] reversed)
  GgmlTypeTraits type;
  int64_t num_elements = 0;
  uint64_t offset = 0;  // from the start of the data section
  uint64_t num_bytes = 0;
};

struct GgufContents {
  uint32_t version = 0;
  std::vector<std::string> keys;  // file order
  absl::flat_hash_map<std::string, GgufValue> metadata;
  std::vector<GgufTensor> tensors;  // file order
  uint64_t alignment = 32;
  uint64_t data_offset = 0;  // absolute offset of the data section
};

// Parses the header, metadata and tensor infos of the `size` bytes at `data`, and checks that
// every tensor lies inside the file. DATA_LOSS for truncation, INVALID_ARGUMENT otherwise.
absl::StatusOr<GgufContents> ParseGguf(const uint8_t* data, size_t size);

// The WeightFile of a parsed GGUF image.
absl::StatusOr<std::unique_ptr<WeightFile>> OpenGgufRegion(std::unique_ptr<ByteRegion> region,
                                                           std::string display_name);

}  // namespace asynctls::weights
