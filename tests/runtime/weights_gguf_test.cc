// GGUF reader: a small file written here, read back, then corrupted in every way we can name
// (and truncated at every byte): each corruption must be an error naming the problem.
#include <cstring>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "asynctls/runtime/weights.h"
#include "gtest/gtest.h"
#include "runtime/weights_test_util.h"

namespace asynctls {
namespace {

using testing::FloatBytes;
using testing::GgufBuilder;
using testing::TempDir;

constexpr uint32_t kF32 = 0, kF16 = 1, kQ4_0 = 2, kQ4_1 = 3, kQ8_0 = 8, kBF16 = 30;

std::string Q8_0Block(uint16_t half_d, int8_t start) {
  std::string b = GgufBuilder::Pod(half_d);
  for (int i = 0; i < 32; ++i) b += static_cast<char>(static_cast<int8_t>(start + i));
  return b;
}

// 2 x 32 F32, 3-d F16 [2][1][4], BF16 [4], Q8_0 [2][32], Q4_1 [32], Q4_0 [32] and rich metadata.
GgufBuilder SmallModel(uint32_t version = 3, uint32_t alignment = 32) {
  GgufBuilder b(version, alignment);
  b.String("general.architecture", "llama")
      .String("general.name", "tiny")
      .U32("llama.block_count", 1)
      .I32("some.i32", -7)
      .U64("some.u64", 1234567890123ull)
      .U64("some.u64_huge", ~0ull)
      .F32("some.f32", 0.5f)
      .F64("some.f64", -2.25)
      .Bool("some.bool", true)
      .Raw("some.u8", GgufBuilder::kU8, GgufBuilder::Pod<uint8_t>(200))
      .Raw("some.i8", GgufBuilder::kI8, GgufBuilder::Pod<int8_t>(-100))
      .Raw("some.u16", GgufBuilder::kU16, GgufBuilder::Pod<uint16_t>(60000))
      .Raw("some.i16", GgufBuilder::kI16, GgufBuilder::Pod<int16_t>(-30000))
      .Raw("some.i64", GgufBuilder::kI64, GgufBuilder::Pod<int64_t>(-5))
      .StringArray("tokenizer.ggml.tokens", {"a", "", "hello world"})
      .I32Array("tokenizer.ggml.token_type", {1, 2, 3})
      .F32Array("tokenizer.ggml.scores", {0.f, -1.5f, 2.f});
  // Nested: array of 2 arrays of u16 [[1, 2], [3]].
  std::string nested =
      GgufBuilder::Pod<uint32_t>(GgufBuilder::kArray) + GgufBuilder::Pod<uint64_t>(2);
  nested += GgufBuilder::Pod<uint32_t>(GgufBuilder::kU16) + GgufBuilder::Pod<uint64_t>(2) +
            GgufBuilder::Pod<uint16_t>(1) + GgufBuilder::Pod<uint16_t>(2);
  nested += GgufBuilder::Pod<uint32_t>(GgufBuilder::kU16) + GgufBuilder::Pod<uint64_t>(1) +
            GgufBuilder::Pod<uint16_t>(3);
  b.Raw("some.nested", GgufBuilder::kArray, nested);

  std::vector<float> f32(64);
  for (int i = 0; i < 64; ++i) f32[i] = 0.25f * i - 3.f;
  b.Tensor("blk.0.f32", {32, 2}, kF32, FloatBytes(f32));
  // F16 1.0, -2.0, 0.5, 65504, smallest subnormal, -0, inf, 3.0
  std::string f16;
  for (uint16_t h : {0x3C00, 0xC000, 0x3800, 0x7BFF, 0x0001, 0x8000, 0x7C00, 0x4200}) {
    f16 += GgufBuilder::Pod<uint16_t>(h);
  }
  b.Tensor("blk.0.f16", {4, 1, 2}, kF16, f16);
  std::string bf16;
  for (uint16_t h : {0x3F80, 0xC000, 0x3F00, 0x4049}) bf16 += GgufBuilder::Pod<uint16_t>(h);
  b.Tensor("blk.0.bf16", {4}, kBF16, bf16);
  b.Tensor("token_embd.weight", {32, 2}, kQ8_0, Q8_0Block(0x3800, -16) + Q8_0Block(0x4000, 0));
  std::string q41 = GgufBuilder::Pod<uint16_t>(0x3C00) + GgufBuilder::Pod<uint16_t>(0xBC00);
  for (int i = 0; i < 16; ++i) q41 += static_cast<char>(i | ((15 - i) << 4));
  b.Tensor("blk.0.attn_q.weight", {32}, kQ4_1, q41);
  std::string q40 = GgufBuilder::Pod<uint16_t>(0x4000);
  for (int i = 0; i < 16; ++i) q40 += static_cast<char>(i | (8 << 4));
  b.Tensor("blk.0.q4_0", {32}, kQ4_0, q40);
  return b;
}

absl::StatusOr<std::unique_ptr<WeightFile>> Parse(const std::string& bytes) {
  return WeightFile::OpenGgufBytes(bytes);
}

void CheckSmallModel(const WeightFile& f) {
  EXPECT_EQ(f.format(), "gguf");
  EXPECT_EQ(f.MetaString("general.architecture"), "llama");
  EXPECT_EQ(f.MetaInt("llama.block_count"), 1);
  EXPECT_EQ(f.MetaInt("some.i32"), -7);
  EXPECT_EQ(f.MetaInt("some.u64"), 1234567890123ll);
  EXPECT_FALSE(f.MetaInt("some.u64_huge").has_value());
  EXPECT_EQ(f.MetaFloat("some.f32"), 0.5);
  EXPECT_EQ(f.MetaFloat("some.f64"), -2.25);
  EXPECT_EQ(f.MetaFloat("some.i32"), -7.0);
  EXPECT_EQ(f.MetaInt("some.bool"), 1);
  EXPECT_EQ(f.MetaInt("some.u8"), 200);
  EXPECT_EQ(f.MetaInt("some.i8"), -100);
  EXPECT_EQ(f.MetaInt("some.u16"), 60000);
  EXPECT_EQ(f.MetaInt("some.i16"), -30000);
  EXPECT_EQ(f.MetaInt("some.i64"), -5);
  EXPECT_FALSE(f.MetaInt("some.f32").has_value());
  EXPECT_FALSE(f.MetaString("some.i32").has_value());
  EXPECT_EQ(f.MetaStringArray("tokenizer.ggml.tokens"),
            (std::vector<std::string>{"a", "", "hello world"}));
  EXPECT_EQ(f.MetaIntArray("tokenizer.ggml.token_type"), (std::vector<int64_t>{1, 2, 3}));
  EXPECT_EQ(f.MetaFloatArray("tokenizer.ggml.scores"), (std::vector<float>{0.f, -1.5f, 2.f}));
  EXPECT_FALSE(f.MetaIntArray("tokenizer.ggml.tokens").has_value());
  EXPECT_FALSE(f.MetaIntArray("some.nested").has_value());
  EXPECT_FALSE(f.MetaStringArray("missing").has_value());

  ASSERT_EQ(f.tensors().size(), 6u);
  EXPECT_EQ(f.tensors()[0].name, "blk.0.f32");
  EXPECT_EQ(f.tensors()[0].shape, (std::vector<int64_t>{2, 32}));
  EXPECT_EQ(f.tensors()[1].shape, (std::vector<int64_t>{2, 1, 4}));
  EXPECT_EQ(f.tensors()[1].source_type, "F16");
  EXPECT_EQ(f.tensors()[3].source_type, "Q8_0");

  auto f32 = f.ReadF32("blk.0.f32");
  ASSERT_TRUE(f32.ok()) << f32.status();
  ASSERT_EQ(f32->size(), 64u);
  for (int i = 0; i < 64; ++i) EXPECT_EQ((*f32)[i], 0.25f * i - 3.f);

  auto f16 = f.ReadF32("blk.0.f16");
  ASSERT_TRUE(f16.ok());
  EXPECT_EQ(*f16, (std::vector<float>{1.f, -2.f, 0.5f, 65504.f, std::ldexp(1.f, -24), -0.f,
                                      INFINITY, 3.f}));
  EXPECT_TRUE(std::signbit((*f16)[5]));
  EXPECT_EQ(*f.ReadF32("blk.0.bf16"), (std::vector<float>{1.f, -2.f, 0.5f, 3.140625f}));

  auto q8 = f.ReadF32("token_embd.weight");
  ASSERT_TRUE(q8.ok());
  for (int i = 0; i < 32; ++i) {
    EXPECT_EQ((*q8)[i], 0.5f * (i - 16));
    EXPECT_EQ((*q8)[32 + i], 2.f * i);
  }
  auto q41 = f.ReadF32("blk.0.attn_q.weight");
  ASSERT_TRUE(q41.ok());
  for (int i = 0; i < 16; ++i) {
    EXPECT_EQ((*q41)[i], i - 1.f);
    EXPECT_EQ((*q41)[16 + i], (15 - i) - 1.f);
  }
  auto q40 = f.ReadF32("blk.0.q4_0");
  ASSERT_TRUE(q40.ok());
  for (int i = 0; i < 16; ++i) {
    EXPECT_EQ((*q40)[i], 2.f * (i - 8));
    EXPECT_EQ((*q40)[16 + i], 0.f);
  }
  EXPECT_EQ(f.ReadF32("nope").status().code(), absl::StatusCode::kNotFound);
}

TEST(GgufTest, ReadsVersion3) {
  auto f = Parse(SmallModel(3).Build());
  ASSERT_TRUE(f.ok()) << f.status();
  CheckSmallModel(**f);
}

TEST(GgufTest, ReadsVersion2) {
  auto f = Parse(SmallModel(2).Build());
  ASSERT_TRUE(f.ok()) << f.status();
  CheckSmallModel(**f);
}

TEST(GgufTest, HonorsGeneralAlignment) {
  GgufBuilder b = SmallModel(3, 64);
  std::string bytes = b.Build();
  EXPECT_EQ(b.layout().data_offset % 64, 0u);
  auto f = Parse(bytes);
  ASSERT_TRUE(f.ok()) << f.status();
  CheckSmallModel(**f);
  EXPECT_EQ((*f)->MetaInt("general.alignment"), 64);
}

TEST(GgufTest, OpensFromDiskMemoryMapped) {
  TempDir dir;
  std::string path = dir.Write("tiny.gguf", SmallModel().Build());
  auto f = WeightFile::Open(path);
  ASSERT_TRUE(f.ok()) << f.status();
  CheckSmallModel(**f);
  // Any name works when the magic is there; a .gguf that is not GGUF names the magic.
  path = dir.Write("model.bin", SmallModel().Build());
  EXPECT_TRUE(WeightFile::Open(path).ok());
  path = dir.Write("bad.gguf", "this is text, not a model");
  auto bad = WeightFile::Open(path);
  EXPECT_TRUE(absl::StrContains(bad.status().message(), "bad magic")) << bad.status();
  EXPECT_TRUE(absl::StrContains(bad.status().message(), "bad.gguf")) << bad.status();
  EXPECT_EQ(WeightFile::Open(dir.path() + "/missing.gguf").status().code(),
            absl::StatusCode::kNotFound);
  EXPECT_FALSE(WeightFile::Open(dir.Write("x.txt", "hello")).ok());
  EXPECT_FALSE(WeightFile::Open(dir.Write("empty.gguf", "")).ok());
}

TEST(GgufTest, EmptyModelWithoutData) {
  GgufBuilder b;
  b.String("general.architecture", "llama");
  auto f = Parse(b.Build());
  ASSERT_TRUE(f.ok()) << f.status();
  EXPECT_TRUE((*f)->tensors().empty());
}

// --- corruption ------------------------------------------------------------------------------

void ExpectError(const std::string& bytes, absl::string_view needle) {
  auto f = Parse(bytes);
  ASSERT_FALSE(f.ok()) << "expected an error containing \"" << needle << "\"";
  EXPECT_TRUE(absl::StrContains(f.status().message(), needle)) << f.status();
  EXPECT_TRUE(f.status().code() == absl::StatusCode::kInvalidArgument ||
              f.status().code() == absl::StatusCode::kDataLoss)
      << f.status();
}

template <typename T>
std::string Patch(std::string bytes, size_t pos, T v) {
  std::memcpy(bytes.data() + pos, &v, sizeof(v));
  return bytes;
}

TEST(GgufCorruptTest, HeaderFields) {
  GgufBuilder b = SmallModel();
  const std::string good = b.Build();
  ExpectError(Patch<uint32_t>(good, 0, 0x46554748), "bad magic");
  ExpectError(Patch<uint32_t>(good, 4, 1), "unsupported GGUF version 1");
  ExpectError(Patch<uint32_t>(good, 4, 4), "unsupported GGUF version 4");
  ExpectError(Patch<uint32_t>(good, 4, 0x03000000), "big-endian");
  ExpectError(Patch<uint64_t>(good, 8, ~0ull), "tensor count");
  ExpectError(Patch<uint64_t>(good, 8, 1ull << 40), "absurd");
  ExpectError(Patch<uint64_t>(good, 16, 1ull << 40), "metadata count");
  // One KV more than there is: the tensor infos are then read as a key.
  EXPECT_FALSE(Parse(Patch<uint64_t>(good, 16, 19)).ok());
  // First key's string length (at byte 24) past the end of the file.
  ExpectError(Patch<uint64_t>(good, 24, 1ull << 50), "past end of file");
  ExpectError(Patch<uint64_t>(good, 24, good.size()), "past end of file");
}

TEST(GgufCorruptTest, TensorInfoFields) {
  GgufBuilder b = SmallModel();
  const std::string good = b.Build();
  const auto& l = b.layout();
  ExpectError(Patch<uint32_t>(good, l.tensor_type[0], 99), "unknown type id 99");
  ExpectError(Patch<uint32_t>(good, l.tensor_type[0], 4), "unknown type id 4");
  ExpectError(Patch<uint32_t>(good, l.tensor_ndims[0], 5), "5 dimensions");
  ExpectError(Patch<uint64_t>(good, l.tensor_dims[0], ~0ull), "overflows");
  ExpectError(Patch<uint64_t>(good, l.tensor_dims[1], 1ull << 62), "overflows");  // 4 * 2^62
  ExpectError(Patch<uint64_t>(good, l.tensor_dims[0], 1ull << 40), "past EOF");
  {
    // F16 [4, 1, 2] -> [0, 2^62, 2^62]: no elements, but the shape's product overflows.
    std::string bad = Patch<uint64_t>(good, l.tensor_dims[1], 0);
    bad = Patch<uint64_t>(bad, l.tensor_dims[1] + 8, 1ull << 62);
    ExpectError(Patch<uint64_t>(bad, l.tensor_dims[1] + 16, 1ull << 62), "overflows");
  }
  ExpectError(Patch<uint64_t>(good, l.tensor_offset[1], 8), "misaligned offset 8");
  ExpectError(Patch<uint64_t>(good, l.tensor_offset[5], 1ull << 20), "past EOF");
  ExpectError(Patch<uint64_t>(good, l.tensor_offset[5], ~0ull << 5), "past EOF");
  // Q8_0 row of 33 values: not whole blocks.
  ExpectError(Patch<uint64_t>(good, l.tensor_dims[3], 33), "block size");
  // A Q6_K tensor of 32 values (a 256-value block type).
  ExpectError(Patch<uint32_t>(good, l.tensor_type[3], 14), "block size");
}

TEST(GgufCorruptTest, DuplicatesAndBadMetadata) {
  {
    GgufBuilder b;
    b.Tensor("w", {4}, kF32, FloatBytes({1, 2, 3, 4}))
        .Tensor("w", {4}, kF32, FloatBytes({1, 2, 3, 4}));
    ExpectError(b.Build(), "duplicate tensor name w");
  }
  {
    GgufBuilder b;
    b.U32("k", 1).U32("k", 2);
    ExpectError(b.Build(), "duplicate metadata key k");
  }
  {
    GgufBuilder b;
    b.Raw("k", 13, "");
    ExpectError(b.Build(), "unknown value type 13");
  }
  {
    GgufBuilder b;
    b.Raw("k", GgufBuilder::kArray, GgufBuilder::Pod<uint32_t>(77) + GgufBuilder::Pod<uint64_t>(0));
    ExpectError(b.Build(), "unknown array element type 77");
  }
  {
    GgufBuilder b;
    b.Raw("k", GgufBuilder::kArray,
          GgufBuilder::Pod<uint32_t>(GgufBuilder::kU64) + GgufBuilder::Pod<uint64_t>(1ull << 61));
    ExpectError(b.Build(), "array length");
  }
  {
    GgufBuilder b;
    b.Raw("k", GgufBuilder::kBool, GgufBuilder::Pod<uint8_t>(7));
    ExpectError(b.Build(), "bool");
  }
  {
    // Arrays nested 9 deep.
    std::string v;
    for (int i = 0; i < 9; ++i) {
      v += GgufBuilder::Pod<uint32_t>(GgufBuilder::kArray) + GgufBuilder::Pod<uint64_t>(1);
    }
    v += GgufBuilder::Pod<uint32_t>(GgufBuilder::kU8) + GgufBuilder::Pod<uint64_t>(0);
    GgufBuilder b;
    b.Raw("k", GgufBuilder::kArray, v);
    ExpectError(b.Build(), "nested");
  }
  for (uint32_t bad : {0u, 3u, 48u}) {
    GgufBuilder b;
    b.U32("general.alignment", bad);
    ExpectError(b.Build(), "general.alignment");
  }
  {
    GgufBuilder b;
    b.String("general.alignment", "32");
    ExpectError(b.Build(), "general.alignment");
  }
}

TEST(GgufCorruptTest, EveryTruncationIsAnError) {
  const std::string good = SmallModel().Build();
  ASSERT_TRUE(Parse(good).ok());
  for (size_t n = 0; n < good.size(); ++n) {
    auto f = Parse(good.substr(0, n));
    ASSERT_FALSE(f.ok()) << "prefix of " << n << " bytes parsed";
    EXPECT_FALSE(f.status().message().empty());
  }
}

// Flipping header bytes: anything may happen except a crash, a hang or a huge allocation
// (the ASan and fuzz builds watch for those); reads of what did parse must work too.
TEST(GgufCorruptTest, FlippedBytesNeverCrash) {
  GgufBuilder b = SmallModel();
  const std::string good = b.Build();
  int errors = 0;
  for (size_t pos = 0; pos < b.layout().data_offset; ++pos) {
    for (uint8_t x : {0x01, 0x80, 0xFF}) {
      std::string bad = good;
      bad[pos] = static_cast<char>(bad[pos] ^ x);
      auto f = Parse(bad);
      if (!f.ok()) {
        ++errors;
        continue;
      }
      for (const WeightTensorInfo& t : (*f)->tensors()) (void)(*f)->ReadF32(t.name);
      (void)(*f)->ReadModelConfig();
    }
  }
  EXPECT_GT(errors, 0);
}

}  // namespace
}  // namespace asynctls
