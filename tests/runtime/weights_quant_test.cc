// Block dequantization: random blocks against the gguf Python package (quant_reference.txt,
// made by tests/data/weights/make_reference.py) and hand-built blocks encoded from the layout.
#include <cmath>
#include <cstring>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "asynctls/runtime/weights.h"
#include "gtest/gtest.h"

namespace asynctls {
namespace {

std::vector<uint8_t> FromHex(const std::string& hex) {
  std::vector<uint8_t> out(hex.size() / 2);
  for (size_t i = 0; i < out.size(); ++i) out[i] = std::stoi(hex.substr(2 * i, 2), nullptr, 16);
  return out;
}

TEST(DequantizeTest, MatchesGgufPythonOnRandomBlocks) {
  std::ifstream in(std::string(ASYNCTLS_SOURCE_DIR) + "/tests/data/weights/quant_reference.txt");
  ASSERT_TRUE(in.good());
  std::string line, type;
  std::vector<uint8_t> bytes;
  int64_t count = 0;
  int types = 0;
  while (std::getline(in, line)) {
    std::istringstream ls(line);
    std::string tag;
    ls >> tag;
    if (tag == "type") {
      size_t nbytes;
      ls >> type >> nbytes >> count;
    } else if (tag == "bytes") {
      std::string hex;
      ls >> hex;
      bytes = FromHex(hex);
    } else if (tag == "values") {
      SCOPED_TRACE(type);
      std::vector<float> got(count, NAN);
      ASSERT_TRUE(DequantizeGguf(type, bytes.data(), bytes.size(), count, got.data()).ok());
      for (int64_t i = 0; i < count; ++i) {
        float expect;
        ASSERT_TRUE(ls >> expect);
        // Same fp32 arithmetic on the same fp16 scales: bit-exact.
        ASSERT_EQ(got[i], expect) << "index " << i;
      }
      ++types;
    }
  }
  EXPECT_EQ(types, 8);
}

uint16_t Half(float x) {
  // Exact for the values used here (small powers of two and their sums).
  uint32_t bits;
  std::memcpy(&bits, &x, 4);
  if (x == 0.f) return 0;
  uint16_t sign = (bits >> 16) & 0x8000;
  int exp = static_cast<int>((bits >> 23) & 0xFF) - 127 + 15;
  return static_cast<uint16_t>(sign | (exp << 10) | ((bits >> 13) & 0x3FF));
}

TEST(DequantizeTest, Q4_KHandBuilt) {
  const float d = 0.5f, dmin = 0.25f;
  const uint8_t sc[8] = {1, 2, 63, 17, 5, 48, 33, 60};
  const uint8_t mn[8] = {0, 63, 7, 20, 31, 2, 50, 16};
  std::vector<uint8_t> b(144, 0);
  uint16_t hd = Half(d), hm = Half(dmin);
  std::memcpy(&b[0], &hd, 2);
  std::memcpy(&b[2], &hm, 2);
  uint8_t* s = &b[4];
  for (int j = 0; j < 4; ++j) {
    s[j] = static_cast<uint8_t>(sc[j] | ((sc[j + 4] >> 4) << 6));
    s[j + 4] = static_cast<uint8_t>(mn[j] | ((mn[j + 4] >> 4) << 6));
    s[j + 8] = static_cast<uint8_t>((sc[j + 4] & 0x0F) | ((mn[j + 4] & 0x0F) << 4));
  }
  // Value i is in sub-block i / 32; sub-blocks 2p and 2p+1 share qs[32p..32p+32), low nibbles
  // then high nibbles.
  auto nibble = [](int i) { return (i * 7 + i / 32) % 16; };
  uint8_t* qs = &b[16];
  for (int i = 0; i < 256; ++i) {
    const int sub = i / 32, l = i % 32;
    qs[32 * (sub / 2) + l] |= static_cast<uint8_t>(nibble(i) << (4 * (sub % 2)));
  }
  std::vector<float> y(256);
  ASSERT_TRUE(DequantizeGguf("Q4_K", b.data(), b.size(), 256, y.data()).ok());
  for (int i = 0; i < 256; ++i) {
    const int sub = i / 32;
    EXPECT_EQ(y[i], d * sc[sub] * nibble(i) - dmin * mn[sub]) << i;
  }
}

TEST(DequantizeTest, Q6_KHandBuilt) {
  const float d = 0.125f;
  std::vector<uint8_t> b(210, 0);
  int8_t scales[16];
  for (int k = 0; k < 16; ++k) scales[k] = static_cast<int8_t>(k * 9 - 70);
  std::memcpy(&b[192], scales, 16);
  uint16_t hd = Half(d);
  std::memcpy(&b[208], &hd, 2);
  auto q6 = [](int i) { return (i * 37 + 11) % 64; };
  // Value i: half h = i / 128; r = i % 128, group g = r / 32, l = r % 32. Low 4 bits in
  // ql[64h + l + 32 (g & 1)] (low nibble for g < 2, high for g >= 2), high 2 bits in
  // qh[32h + l] at bit 2g, scale scales[8h + l / 16 + 2g].
  for (int i = 0; i < 256; ++i) {
    const int h = i / 128, r = i % 128, g = r / 32, l = r % 32;
    const int q = q6(i);
    b[64 * h + l + 32 * (g & 1)] |= static_cast<uint8_t>((q & 0x0F) << (g >= 2 ? 4 : 0));
    b[128 + 32 * h + l] |= static_cast<uint8_t>((q >> 4) << (2 * g));
  }
  std::vector<float> y(256);
  ASSERT_TRUE(DequantizeGguf("Q6_K", b.data(), b.size(), 256, y.data()).ok());
  for (int i = 0; i < 256; ++i) {
    const int h = i / 128, r = i % 128, g = r / 32, l = r % 32;
    EXPECT_EQ(y[i], d * scales[8 * h + l / 16 + 2 * g] * (q6(i) - 32)) << i;
  }
}

TEST(DequantizeTest, SimpleBlocks) {
  // Q8_0: d = 0.25, q = -128..-97.
  std::vector<uint8_t> b(34);
  uint16_t hd = Half(0.25f);
  std::memcpy(&b[0], &hd, 2);
  for (int i = 0; i < 32; ++i) b[2 + i] = static_cast<uint8_t>(static_cast<int8_t>(-128 + i));
  std::vector<float> y(32);
  ASSERT_TRUE(DequantizeGguf("Q8_0", b.data(), b.size(), 32, y.data()).ok());
  for (int i = 0; i < 32; ++i) EXPECT_EQ(y[i], 0.25f * (-128 + i));
}

TEST(DequantizeTest, RejectsBadArguments) {
  std::vector<uint8_t> b(1000);
  std::vector<float> y(512);
  EXPECT_EQ(DequantizeGguf("Q4_K", b.data(), b.size(), 100, y.data()).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(DequantizeGguf("Q4_K", b.data(), 143, 256, y.data()).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(DequantizeGguf("Q5_K", b.data(), b.size(), 256, y.data()).code(),
            absl::StatusCode::kUnimplemented);
  EXPECT_EQ(DequantizeGguf("nonsense", b.data(), b.size(), 1, y.data()).code(),
            absl::StatusCode::kUnimplemented);
  EXPECT_EQ(DequantizeGguf("F32", b.data(), b.size(), -1, y.data()).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(DequantizeGguf("F32", b.data(), b.size(), 0, y.data()).ok());
}

}  // namespace
}  // namespace asynctls
