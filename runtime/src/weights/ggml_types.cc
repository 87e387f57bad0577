#include "weights/ggml_types.h"

#include <cstring>

namespace asynctls::weights {
namespace {

constexpr int64_t kQK = 256;  // super-block size of the k-quants

// Ids follow ggml.h's enum ggml_type. Sizes are those of llama.cpp's block structs.
constexpr GgmlTypeTraits kTypes[] = {
    {0, "F32", 1, 4, true},
    {1, "F16", 1, 2, true},
    {2, "Q4_0", 32, 2 + 16, true},
    {3, "Q4_1", 32, 2 + 2 + 16, true},
    {6, "Q5_0", 32, 2 + 4 + 16, false},
    {7, "Q5_1", 32, 2 + 2 + 4 + 16, false},
    {8, "Q8_0", 32, 2 + 32, true},
    {9, "Q8_1", 32, 2 + 2 + 32, false},
    {10, "Q2_K", kQK, kQK / 16 + kQK / 4 + 2 + 2, false},
    {11, "Q3_K", kQK, kQK / 8 + kQK / 4 + 12 + 2, false},
    {12, "Q4_K", kQK, 2 + 2 + 12 + kQK / 2, true},
    {13, "Q5_K", kQK, 2 + 2 + 12 + kQK / 8 + kQK / 2, false},
    {14, "Q6_K", kQK, kQK / 2 + kQK / 4 + kQK / 16 + 2, true},
    {15, "Q8_K", kQK, 4 + kQK + kQK / 16 * 2, false},
    {16, "IQ2_XXS", kQK, 2 + kQK / 8 * 2, false},
    {17, "IQ2_XS", kQK, 2 + kQK / 8 * 2 + kQK / 32, false},
    {18, "IQ3_XXS", kQK, 2 + 3 * (kQK / 8), false},
    {19, "IQ1_S", kQK, 2 + kQK / 8 + kQK / 16, false},
    {20, "IQ4_NL", 32, 2 + 16, false},
    {21, "IQ3_S", kQK, 2 + 13 * (kQK / 32) + kQK / 64, false},
    {22, "IQ2_S", kQK, 2 + kQK / 4 + kQK / 16, false},
    {23, "IQ4_XS", kQK, 2 + 2 + kQK / 64 + kQK / 2, false},
    {24, "I8", 1, 1, false},
    {25, "I16", 1, 2, false},
    {26, "I32", 1, 4, false},
    {27, "I64", 1, 8, false},
    {28, "F64", 1, 8, false},
    {29, "IQ1_M", kQK, kQK / 8 + kQK / 16 + kQK / 32, false},
    {30, "BF16", 1, 2, true},
    {34, "TQ1_0", kQK, 2 + (kQK - 4 * kQK / 64) / 5 + kQK / 64, false},
    {35, "TQ2_0", kQK, 2 + kQK / 4, false},
    {39, "MXFP4", 32, 1 + 16, false},
    {40, "NVFP4", 64, 4 + 32, false},
    {41, "Q1_0", 128, 2 + 16, false},
};

}  // namespace

std::optional<GgmlTypeTraits> GgmlTypeById(uint32_t id) {
  for (const auto& t : kTypes) {
    if (t.id == id) return t;
  }
  return std::nullopt;
}

std::optional<GgmlTypeTraits> GgmlTypeByName(absl::string_view name) {
  for (const auto& t : kTypes) {
    if (t.name == name) return t;
  }
  return std::nullopt;
}

float HalfToFloat(uint16_t h) {
  uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1Fu;
  uint32_t mant = h & 0x3FFu;
  uint32_t bits;
  if (exp == 0x1F) {
    bits = sign | 0x7F800000u | (mant << 13);  // inf / NaN (payload kept)
  } else if (exp != 0) {
    bits = sign | ((exp + 112) << 23) | (mant << 13);
  } else if (mant == 0) {
    bits = sign;
  } else {
    // Subnormal half: renormalize into a normal float.
    int e = -1;
    do {
      ++e;
      mant <<= 1;
    } while ((mant & 0x400u) == 0);
    bits = sign | static_cast<uint32_t>(112 - e) << 23 | ((mant & 0x3FFu) << 13);
  }
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

float BFloat16ToFloat(uint16_t b) {
  uint32_t bits = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

}  // namespace asynctls::weights
