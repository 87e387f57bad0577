// RandomFill on the GPU equals the CPU reference bit for bit (seeded weights are the same on
// every backend), for fp32 and bf16, odd counts, over a NaN-poisoned buffer.
#include <gtest/gtest.h>

#include <cstring>
#include <vector>

#include "asynctls/kernels/ref.h"
#if ASYNCTLS_HAVE_CUDA
#include "asynctls/kernels/cuda_ops.h"
#endif
#include "kernels/test_util.h"

namespace asynctls::kernels {
namespace {

TEST(RandomFillRefTest, RangeAndDeterminism) {
  std::vector<float> a(1001), b(1001);
  ref::RandomFill({a.data(), DType::kF32, 1001, 7, 0.5f, 2.f});
  ref::RandomFill({b.data(), DType::kF32, 1001, 7, 0.5f, 2.f});
  EXPECT_EQ(a, b);
  double mean = 0;
  for (float x : a) {
    EXPECT_GE(x, 1.5f);
    EXPECT_LE(x, 2.5f);
    mean += x / a.size();
  }
  EXPECT_NEAR(mean, 2.0, 0.05);
  ref::RandomFill({b.data(), DType::kF32, 1001, 8, 0.5f, 2.f});
  EXPECT_NE(a, b);
}

#if ASYNCTLS_HAVE_CUDA
TEST(RandomFillGpuTest, MatchesReferenceBitForBit) {
  if (!testing::HasCudaDevice()) GTEST_SKIP() << "no CUDA device";
  for (DType dtype : {DType::kF32, DType::kBF16}) {
    for (int64_t count : {int64_t{1}, int64_t{97}, int64_t{1} << 20 | 13}) {
      SCOPED_TRACE(::testing::Message() << "dtype " << int(dtype) << " count " << count);
      const size_t bytes = count * DTypeSize(dtype);
      testing::DeviceBuffer dev(bytes);
      ASSERT_EQ(dev.Poison(), cudaSuccess);
      ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
      ASSERT_EQ(cuda::RandomFill({dev.get(), dtype, count, 99, 0.02f, 0.f}, nullptr), cudaSuccess);
      ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
      std::vector<uint8_t> got(bytes), want(bytes);
      ASSERT_EQ(dev.Download(got.data(), bytes), cudaSuccess);
      ref::RandomFill({want.data(), dtype, count, 99, 0.02f, 0.f});
      EXPECT_EQ(std::memcmp(got.data(), want.data(), bytes), 0);
    }
  }
}
#endif

}  // namespace
}  // namespace asynctls::kernels
