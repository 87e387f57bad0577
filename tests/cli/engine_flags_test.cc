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

TEST(EngineFlagsTest, CudaGraphsOnOffAndOffByDefault) {
  EngineOptions options;
  ASSERT_TRUE(Parse({}, &options).ok());
  EXPECT_FALSE(options.cuda_graphs);
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

}  // namespace
}  // namespace asynctls
