// The coordinator <-> worker codec keeps every field of a plan and of the worker's hello,
// including the two-level sparse attention flag and budgets.
#include "server/step_codec.h"

#include <gtest/gtest.h>

namespace asynctls {
namespace {

TEST(StepCodecTest, PlanRoundTripKeepsDecodeItemsAndTheirTlsFlag) {
  StepPlan plan;
  plan.step_id = 7;
  plan.releases = {3};
  PrefillChunk c;
  c.seq_id = 4;
  c.tokens = {1, 2, 3};
  c.start_pos = 5;
  c.sample = true;
  c.sampling.temperature = 0.5f;
  plan.prefills.push_back(c);
  plan.decodes.push_back({8, 42, 100, {}, /*tls=*/true, 16, 512});
  plan.decodes.push_back({9, 43, 200, {}, /*tls=*/false});
  v1::WorkerStepPlan proto;
  ToProto(plan, &proto);
  const StepPlan back = FromProto(proto);
  EXPECT_EQ(back.step_id, 7u);
  EXPECT_EQ(back.releases, plan.releases);
  ASSERT_EQ(back.prefills.size(), 1u);
  EXPECT_EQ(back.prefills[0].tokens, c.tokens);
  EXPECT_EQ(back.prefills[0].start_pos, 5);
  EXPECT_FLOAT_EQ(back.prefills[0].sampling.temperature, 0.5f);
  ASSERT_EQ(back.decodes.size(), 2u);
  EXPECT_EQ(back.decodes[0].seq_id, 8u);
  EXPECT_EQ(back.decodes[0].position, 100);
  EXPECT_TRUE(back.decodes[0].tls);
  EXPECT_EQ(back.decodes[0].tls_block_budget, 16);
  EXPECT_EQ(back.decodes[0].tls_token_budget, 512);
  EXPECT_FALSE(back.decodes[1].tls);
}

TEST(StepCodecTest, HelloCarriesTlsCapability) {
  ExecutorInfo info;
  info.model_name = "m";
  info.kv_blocks_total = 10;
  info.tls = true;
  info.tls_block_budget = 128;
  info.tls_token_budget = 1024;
  v1::WorkerHello hello;
  ToProto(info, &hello);
  const ExecutorInfo back = InfoFromHello(hello);
  EXPECT_EQ(back.model_name, "m");
  EXPECT_EQ(back.kv_blocks_total, 10);
  EXPECT_TRUE(back.tls);
  EXPECT_EQ(back.tls_block_budget, 128);
  EXPECT_EQ(back.tls_token_budget, 1024);
}

}  // namespace
}  // namespace asynctls
