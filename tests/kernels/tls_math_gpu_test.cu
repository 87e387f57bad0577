// The device side of tls_math.h against its host side, bit for bit: the token softmax's exp on
// every point of its argument grid (one MUFU.EX2 and a rounding to bf16 on the GPU, a table on
// the CPU), and the exp arguments from random maxima, scales and scaled dots.
#include <gtest/gtest.h>

#include <cstdint>
#include <cstring>
#include <random>
#include <vector>

#include "asynctls/kernels/tls_math.h"
#include "kernels/tls_test_util.h"

namespace asynctls::kernels {
namespace {

using testing::DeviceBuffer;
using testing::Download;

#define ASSERT_CUDA(expr) ASSERT_EQ((expr), cudaSuccess) << cudaGetErrorString(expr)

constexpr int kGridPoints = 126 * 256 + 1;  // x = -j / 256, j = 0 .. 126 * 256

// out[j] = TlsTokenExp(-j / 256); pairs[j] = TlsTokenExpPair of x_j and x_{j + 1} (the last: x_0).
__global__ void TokenExpGridKernel(float* out, uint32_t* pairs) {
  const int j = blockIdx.x * blockDim.x + threadIdx.x;
  if (j >= kGridPoints) return;
  const float x = -j / kTlsExpGridSteps;
  out[j] = TlsTokenExp(x);
  const int k = j + 1 < kGridPoints ? j + 1 : 0;
  pairs[j] = TlsTokenExpPair(x, -k / kTlsExpGridSteps);
}

struct ArgCase {
  float max_y, query_scale, exp_scale, y;
};

__global__ void TokenExpArgKernel(const ArgCase* cases, int n, float* out) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const ArgCase c = cases[i];
  const float a = TlsMul(c.query_scale, c.exp_scale);
  out[i] = TlsTokenExpArg(c.y, TlsChunkExpShift(a, TlsChunkShift(c.max_y, a)));
}

uint32_t Bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

TEST(TlsMathGpuTest, TokenExpMatchesReference) {
  if (!testing::HasCudaDevice()) GTEST_SKIP() << "no CUDA device";
  DeviceBuffer exps(kGridPoints * sizeof(float)), pairs(kGridPoints * sizeof(uint32_t));
  TokenExpGridKernel<<<(kGridPoints + 255) / 256, 256>>>(exps.as<float>(), pairs.as<uint32_t>());
  ASSERT_CUDA(cudaDeviceSynchronize());
  const std::vector<float> got = Download<float>(exps, kGridPoints);
  const std::vector<uint32_t> got_pairs = Download<uint32_t>(pairs, kGridPoints);
  int differ = 0;
  for (int j = 0; j < kGridPoints; ++j) {
    const float want = TlsTokenExp(-j / kTlsExpGridSteps);
    const int k = j + 1 < kGridPoints ? j + 1 : 0;
    const uint32_t want_pair =
        (Bits(want) >> 16) | (Bits(TlsTokenExp(-k / kTlsExpGridSteps)) & 0xffff0000u);
    if (Bits(got[j]) != Bits(want) || got_pairs[j] != want_pair) {
      if (++differ <= 5) {
        ADD_FAILURE() << "x = " << -j / 256.0 << ": device " << got[j] << " / pair " << std::hex
                      << got_pairs[j] << ", reference " << want << " / " << want_pair;
      }
    }
  }
  EXPECT_EQ(differ, 0) << "of " << kGridPoints << " grid points";
}

TEST(TlsMathGpuTest, TokenExpArgumentsMatchReference) {
  if (!testing::HasCudaDevice()) GTEST_SKIP() << "no CUDA device";
  std::mt19937 rng(11);
  std::uniform_real_distribution<float> y_dist(-300.f, 300.f), scale_dist(1e-5f, 4.f);
  std::vector<ArgCase> cases;
  for (int i = 0; i < 100000; ++i) {
    const float max_y = y_dist(rng);
    std::uniform_real_distribution<float> below(max_y - 400.f, max_y);
    cases.push_back({max_y, scale_dist(rng), scale_dist(rng), below(rng)});
  }
  cases.push_back({NAN, 1.f, 1.f, NAN});        // a row without candidates
  cases.push_back({INFINITY, 1.f, 1.f, 3.f});   // an infinite max
  cases.push_back({-1e12f, 1.f, 1.f, -1e12f});  // far below the offset's exact range
  cases.push_back({3.f, 0.f, 1.f, -5.f});       // a zero query scale: every exp 1
  cases.push_back({5.f, 0.5f, 1.f, NAN});       // a slot without a candidate
  const int n = static_cast<int>(cases.size());
  DeviceBuffer d_cases(n * sizeof(ArgCase)), d_out(n * sizeof(float));
  ASSERT_CUDA(cudaMemcpy(d_cases.get(), cases.data(), n * sizeof(ArgCase), cudaMemcpyHostToDevice));
  TokenExpArgKernel<<<(n + 255) / 256, 256>>>(d_cases.as<ArgCase>(), n, d_out.as<float>());
  ASSERT_CUDA(cudaDeviceSynchronize());
  const std::vector<float> got = Download<float>(d_out, n);
  int differ = 0;
  for (int i = 0; i < n; ++i) {
    const ArgCase& c = cases[i];
    const float a = TlsMul(c.query_scale, c.exp_scale);
    const float want = TlsTokenExpArg(c.y, TlsChunkExpShift(a, TlsChunkShift(c.max_y, a)));
    if (Bits(got[i]) != Bits(want) && ++differ <= 5) {
      ADD_FAILURE() << "max " << c.max_y << " scales " << c.query_scale << " " << c.exp_scale
                    << " y " << c.y << ": device " << got[i] << ", reference " << want;
    }
  }
  EXPECT_EQ(differ, 0) << "of " << n;
}

}  // namespace
}  // namespace asynctls::kernels
