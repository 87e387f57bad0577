// Block dequantization of GGUF tensor data to fp32 (llama.cpp block layouts, little-endian).
// Plain loops: this runs once at load, and it is the reference other code is checked against.
#include <cstring>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "asynctls/runtime/weights.h"
#include "weights/ggml_types.h"

namespace asynctls {
namespace {

using weights::BFloat16ToFloat;
using weights::HalfToFloat;

inline uint16_t LoadU16(const uint8_t* p) { return static_cast<uint16_t>(p[0] | (p[1] << 8)); }
inline float LoadHalf(const uint8_t* p) { return HalfToFloat(LoadU16(p)); }

// block_q4_0 { half d; uint8 qs[16]; }: x[j] = (lo(qs[j]) - 8) d, x[j+16] = (hi(qs[j]) - 8) d.
void DequantQ4_0(const uint8_t* b, float* y) {
  const float d = LoadHalf(b);
  const uint8_t* qs = b + 2;
  for (int j = 0; j < 16; ++j) {
    y[j] = static_cast<float>((qs[j] & 0x0F) - 8) * d;
    y[j + 16] = static_cast<float>((qs[j] >> 4) - 8) * d;
  }
}

// block_q4_1 { half d; half m; uint8 qs[16]; }: x = q d + m.
void DequantQ4_1(const uint8_t* b, float* y) {
  const float d = LoadHalf(b);
  const float m = LoadHalf(b + 2);
  const uint8_t* qs = b + 4;
  for (int j = 0; j < 16; ++j) {
    y[j] = static_cast<float>(qs[j] & 0x0F) * d + m;
    y[j + 16] = static_cast<float>(qs[j] >> 4) * d + m;
  }
}

// block_q8_0 { half d; int8 qs[32]; }: x = q d.
void DequantQ8_0(const uint8_t* b, float* y) {
  const float d = LoadHalf(b);
  for (int j = 0; j < 32; ++j) y[j] = static_cast<float>(static_cast<int8_t>(b[2 + j])) * d;
}

// The 12 scale bytes of Q4_K/Q5_K pack 8 (scale, min) pairs of 6 bits each.
inline void ScaleMinK4(int j, const uint8_t* q, uint8_t* sc, uint8_t* m) {
  if (j < 4) {
    *sc = q[j] & 63;
    *m = q[j + 4] & 63;
  } else {
    *sc = static_cast<uint8_t>((q[j + 4] & 0x0F) | ((q[j - 4] >> 6) << 4));
    *m = static_cast<uint8_t>((q[j + 4] >> 4) | ((q[j] >> 6) << 4));
  }
}

// block_q4_K { half d; half dmin; uint8 scales[12]; uint8 qs[128]; }, 256 values in 8
// sub-blocks of 32: x = d sc_i q - dmin m_i. Each 32 bytes of qs hold two sub-blocks (low
// nibbles first, then high nibbles).
void DequantQ4_K(const uint8_t* b, float* y) {
  const float d = LoadHalf(b);
  const float dmin = LoadHalf(b + 2);
  const uint8_t* scales = b + 4;
  const uint8_t* q = b + 16;
  for (int is = 0; is < 8; is += 2) {
    uint8_t sc, m;
    ScaleMinK4(is, scales, &sc, &m);
    const float d1 = d * sc, m1 = dmin * m;
    ScaleMinK4(is + 1, scales, &sc, &m);
    const float d2 = d * sc, m2 = dmin * m;
    for (int l = 0; l < 32; ++l) y[l] = d1 * static_cast<float>(q[l] & 0x0F) - m1;
    for (int l = 0; l < 32; ++l) y[32 + l] = d2 * static_cast<float>(q[l] >> 4) - m2;
    y += 64;
    q += 32;
  }
}

// block_q6_K { uint8 ql[128]; uint8 qh[64]; int8 scales[16]; half d; }, 256 values as two
// halves of 128: a 6-bit q = 4 low bits from ql, 2 high bits from qh, minus 32; 16 sub-blocks
// of 16 values each with an int8 scale.
void DequantQ6_K(const uint8_t* b, float* y) {
  const uint8_t* ql = b;
  const uint8_t* qh = b + 128;
  const int8_t* sc = reinterpret_cast<const int8_t*>(b + 192);
  const float d = LoadHalf(b + 208);
  for (int half = 0; half < 2; ++half) {
    for (int l = 0; l < 32; ++l) {
      const int is = l / 16;
      const int q1 = ((ql[l] & 0x0F) | (((qh[l] >> 0) & 3) << 4)) - 32;
      const int q2 = ((ql[l + 32] & 0x0F) | (((qh[l] >> 2) & 3) << 4)) - 32;
      const int q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
      const int q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
      y[l] = d * static_cast<float>(sc[is + 0]) * static_cast<float>(q1);
      y[l + 32] = d * static_cast<float>(sc[is + 2]) * static_cast<float>(q2);
      y[l + 64] = d * static_cast<float>(sc[is + 4]) * static_cast<float>(q3);
      y[l + 96] = d * static_cast<float>(sc[is + 6]) * static_cast<float>(q4);
    }
    y += 128;
    ql += 64;
    qh += 32;
    sc += 8;
  }
}

}  // namespace

absl::Status DequantizeGguf(absl::string_view type, const void* src, size_t src_bytes,
                            int64_t count, float* dst) {
  auto traits = weights::GgmlTypeByName(type);
  if (!traits.has_value() || !traits->dequantizable) {
    return absl::UnimplementedError(absl::StrCat("cannot dequantize GGUF type ", type));
  }
  if (count < 0 || count % traits->block_size != 0) {
    return absl::InvalidArgumentError(absl::StrCat(type, ": ", count,
                                                   " values is not a whole number of ",
                                                   traits->block_size, "-value blocks"));
  }
  const int64_t blocks = count / traits->block_size;
  if (static_cast<uint64_t>(blocks) > src_bytes / static_cast<uint64_t>(traits->type_size)) {
    return absl::InvalidArgumentError(absl::StrCat(type, ": ", count, " values need ",
                                                   blocks * traits->type_size, " bytes, have ",
                                                   src_bytes));
  }
  const uint8_t* p = static_cast<const uint8_t*>(src);
  const int64_t bs = traits->block_size;
  const int64_t ts = traits->type_size;
  switch (traits->id) {
    case 0:
      if (count > 0) std::memcpy(dst, p, static_cast<size_t>(count) * sizeof(float));
      break;
    case 1:
      for (int64_t i = 0; i < count; ++i) dst[i] = HalfToFloat(LoadU16(p + 2 * i));
      break;
    case 30:
      for (int64_t i = 0; i < count; ++i) dst[i] = BFloat16ToFloat(LoadU16(p + 2 * i));
      break;
    case 2:
      for (int64_t i = 0; i < blocks; ++i) DequantQ4_0(p + i * ts, dst + i * bs);
      break;
    case 3:
      for (int64_t i = 0; i < blocks; ++i) DequantQ4_1(p + i * ts, dst + i * bs);
      break;
    case 8:
      for (int64_t i = 0; i < blocks; ++i) DequantQ8_0(p + i * ts, dst + i * bs);
      break;
    case 12:
      for (int64_t i = 0; i < blocks; ++i) DequantQ4_K(p + i * ts, dst + i * bs);
      break;
    case 14:
      for (int64_t i = 0; i < blocks; ++i) DequantQ6_K(p + i * ts, dst + i * bs);
      break;
    default:
      return absl::UnimplementedError(absl::StrCat("cannot dequantize GGUF type ", type));
  }
  return absl::OkStatus();
}

}  // namespace asynctls
