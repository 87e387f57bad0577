// The engine flags every engine-building command shares (cli/engine_flags.h): --cuda-graphs and
// the TLS flags' checks.
#include "engine_flags.h"

#include <gtest/gtest.h>

#include <string>
#include <vector>

namespace asynctls {
namespace {

absl::Status Parse(std::vector<std::string> args, EngineOptions* options) {
  std::vector<char*> argv;
  for (std::string& a : args) argv.push_back(a.data());
  Flags flags;
  absl::Status status = flags.Parse(static_cast<int>(argv.size()), argv.data(), {});
  if (status.ok()) status = flags.CheckKnown(WithEngineFlags({}));
  if (status.ok()) status = ParseEngineFlags(flags, options);
  return status;
}

TEST(EngineFlagsTest, WeightDtypeBf16ByDefaultOrF32) {
  EngineOptions options;
  ASSERT_TRUE(Parse({}, &options).ok());
  EXPECT_EQ(options.weight_dtype, kernels::DType::kBF16);
  ASSERT_TRUE(Parse({"--weight-dtype", "f32"}, &options).ok());
  EXPECT_EQ(options.weight_dtype, kernels::DType::kF32);
  const absl::Status bad = Parse({"--weight-dtype", "fp8"}, &options);
  EXPECT_EQ(bad.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(bad.message(), "--weight-dtype: 'fp8' is not f32 or bf16");
}

TEST(EngineFlagsTest, CudaGraphsOnOffAndOnByDefault) {
  EngineOptions options;
  ASSERT_TRUE(Parse({}, &options).ok());
  EXPECT_TRUE(options.cuda_graphs);
  ASSERT_TRUE(Parse({"--cuda-graphs", "on"}, &options).ok());
  EXPECT_TRUE(options.cuda_graphs);
  ASSERT_TRUE(Parse({"--cuda-graphs", "off"}, &options).ok());
  EXPECT_FALSE(options.cuda_graphs);
}

TEST(EngineFlagsTest, BadValuesSayWhichFlagAndValue) {
  EngineOptions options;
  const absl::Status graphs = Parse({"--cuda-graphs", "yes"}, &options);
  EXPECT_EQ(graphs.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(graphs.message(), "--cuda-graphs: 'yes' is not on or off");
  const absl::Status tls = Parse({"--tls-block-index", "int8"}, &options);
  EXPECT_EQ(tls.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(tls.message(), "--tls-block-index needs --tls-channels FILE");
  EXPECT_FALSE(Parse({"--cuda-graph", "on"}, &options).ok());  // unknown flag
}

// `generate --server`: the budgets travel with the request; engine flags are refused.
absl::Status ParseClient(std::vector<std::string> args, bool tls, int32_t* block_budget,
                         int32_t* token_budget) {
  std::vector<char*> argv;
  for (std::string& a : args) argv.push_back(a.data());
  Flags flags;
  absl::Status status = flags.Parse(static_cast<int>(argv.size()), argv.data(), {});
  if (status.ok()) status = flags.CheckKnown(WithEngineFlags({"device", "threads"}));
  if (status.ok()) status = ParseClientFlags(flags, tls, block_budget, token_budget);
  return status;
}

TEST(EngineFlagsTest, ClientBudgetsAreTheRequestsAndEngineFlagsAreRefused) {
  int32_t block = -1, token = -1;
  ASSERT_TRUE(ParseClient({}, true, &block, &token).ok());
  EXPECT_EQ(block, 0);  // 0: the server's
  EXPECT_EQ(token, 0);
  ASSERT_TRUE(
      ParseClient({"--tls-block-budget", "16", "--tls-token-budget", "256"}, true, &block, &token)
          .ok());
  EXPECT_EQ(block, 16);
  EXPECT_EQ(token, 256);
  // No --tls-channels needed: the server has the channel sets.
  const absl::Status dense = ParseClient({"--tls-token-budget", "256"}, false, &block, &token);
  EXPECT_EQ(dense.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(dense.message(), "--tls-block-budget / --tls-token-budget: only with --attention tls");
  const absl::Status negative = ParseClient({"--tls-block-budget", "-1"}, true, &block, &token);
  EXPECT_EQ(negative.code(), absl::StatusCode::kInvalidArgument);
  for (const char* flag : {"--cuda-graphs", "--weight-dtype", "--tls-channels", "--tls-lag",
                           "--tls-block-index", "--device", "--threads"}) {
    const absl::Status engine = ParseClient({flag, "x"}, true, &block, &token);
    EXPECT_EQ(engine.code(), absl::StatusCode::kInvalidArgument) << flag;
    EXPECT_EQ(engine.message(), std::string(flag) +
                                    " configures the server's engine: give it to `asynctls "
                                    "serve`, not to a client");
  }
}

}  // namespace
}  // namespace asynctls
