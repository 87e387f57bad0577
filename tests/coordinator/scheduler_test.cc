#include "asynctls/coordinator/scheduler.h"

#include <gtest/gtest.h>

namespace asynctls {
namespace {

SchedulerOptions Options() {
  SchedulerOptions o;
  o.max_batch_tokens = 8;
  o.max_running = 4;
  o.max_queue = 2;
  o.kv_blocks_total = 4;
  o.max_context = 1024;
  o.stop_token_ids = {2};
  return o;
}

GenerationRequest Request(std::string id, int prompt_len, int max_tokens = 4) {
  GenerationRequest r;
  r.request_id = std::move(id);
  for (int i = 0; i < prompt_len; ++i) r.prompt_tokens.push_back(10 + i);
  r.max_tokens = max_tokens;
  return r;
}

StepResult Sampled(const StepPlan& plan, int32_t token) {
  StepResult r;
  r.step_id = plan.step_id;
  for (const auto& c : plan.prefills)
    if (c.sample) r.tokens.push_back({c.seq_id, token, 0.f});
  for (const auto& d : plan.decodes) r.tokens.push_back({d.seq_id, token, 0.f});
  return r;
}

TEST(SchedulerTest, RejectsBadRequestsNamingTheField) {
  Scheduler s(Options());
  EXPECT_EQ(s.Enqueue(Request("", 3)).code(), absl::StatusCode::kInvalidArgument);
  absl::Status empty = s.Enqueue(Request("a", 0));
  EXPECT_EQ(empty.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(empty.message().find("prompt"), std::string::npos);
  EXPECT_EQ(s.Enqueue(Request("a", 3, 0)).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(s.Enqueue(Request("a", 2000)).code(), absl::StatusCode::kInvalidArgument);  // > context
  EXPECT_EQ(s.Enqueue(Request("big", 300, 10)).code(), absl::StatusCode::kResourceExhausted);  // > cache
  ASSERT_TRUE(s.Enqueue(Request("a", 3)).ok());
  EXPECT_EQ(s.Enqueue(Request("a", 3)).code(), absl::StatusCode::kAlreadyExists);
  ASSERT_TRUE(s.Enqueue(Request("b", 3)).ok());
  EXPECT_EQ(s.Enqueue(Request("c", 3)).code(), absl::StatusCode::kResourceExhausted);  // queue bound
}

TEST(SchedulerTest, ChunksPromptsWithinTheTokenBudgetThenDecodes) {
  Scheduler s(Options());
  ASSERT_TRUE(s.Enqueue(Request("a", 13, 3)).ok());
  StepPlan p1 = s.NextPlan();
  ASSERT_EQ(p1.prefills.size(), 1u);
  EXPECT_EQ(p1.prefills[0].tokens.size(), 8u);
  EXPECT_EQ(p1.prefills[0].start_pos, 0);
  EXPECT_FALSE(p1.prefills[0].sample);
  EXPECT_TRUE(s.OnResult(Sampled(p1, 7)).empty());
  StepPlan p2 = s.NextPlan();
  ASSERT_EQ(p2.prefills.size(), 1u);
  EXPECT_EQ(p2.prefills[0].start_pos, 8);
  EXPECT_EQ(p2.prefills[0].tokens.size(), 5u);
  EXPECT_TRUE(p2.prefills[0].sample);
  auto u2 = s.OnResult(Sampled(p2, 7));
  ASSERT_EQ(u2.size(), 1u);
  EXPECT_EQ(u2[0].new_tokens, std::vector<int32_t>{7});
  StepPlan p3 = s.NextPlan();
  ASSERT_EQ(p3.decodes.size(), 1u);
  EXPECT_EQ(p3.decodes[0].token, 7);
  EXPECT_EQ(p3.decodes[0].position, 13);
  s.OnResult(Sampled(p3, 8));
  StepPlan p4 = s.NextPlan();
  auto u4 = s.OnResult(Sampled(p4, 9));  // third token: max_tokens reached
  ASSERT_EQ(u4.size(), 1u);
  EXPECT_EQ(u4[0].finish, FinishReason::kLength);
  StepPlan p5 = s.NextPlan();
  EXPECT_EQ(p5.releases.size(), 1u);
  EXPECT_FALSE(s.has_work());
}

TEST(SchedulerTest, StopTokenFinishes) {
  Scheduler s(Options());
  ASSERT_TRUE(s.Enqueue(Request("a", 3, 10)).ok());
  StepPlan p = s.NextPlan();
  auto u = s.OnResult(Sampled(p, 2));
  ASSERT_EQ(u.size(), 1u);
  EXPECT_EQ(u[0].finish, FinishReason::kStop);
}

TEST(SchedulerTest, AdmitsByKvCapacityAndDecodesAlongsidePrefill) {
  SchedulerOptions o = Options();
  o.max_queue = 8;
  Scheduler s(o);
  // Each needs 2 blocks (prompt 60 + 10 tokens); the cache has 4: two run, the third waits.
  ASSERT_TRUE(s.Enqueue(Request("a", 60, 10)).ok());
  ASSERT_TRUE(s.Enqueue(Request("b", 60, 10)).ok());
  ASSERT_TRUE(s.Enqueue(Request("c", 60, 10)).ok());
  s.NextPlan();
  EXPECT_EQ(s.num_running(), 2);
  EXPECT_EQ(s.num_waiting(), 1);
  EXPECT_EQ(s.reserved_blocks(), 4);
  EXPECT_TRUE(s.Finish("a"));
  StepPlan p = s.NextPlan();
  EXPECT_EQ(p.releases.size(), 1u);
  EXPECT_EQ(s.num_running(), 2);  // c admitted once a's blocks came back
  EXPECT_EQ(s.num_waiting(), 0);
  EXPECT_TRUE(s.Finish("c"));
  EXPECT_FALSE(s.Finish("c"));
}

TEST(SchedulerTest, FailRunningEndsEveryRunningRequest) {
  Scheduler s(Options());
  ASSERT_TRUE(s.Enqueue(Request("a", 3)).ok());
  ASSERT_TRUE(s.Enqueue(Request("b", 3)).ok());
  s.NextPlan();
  auto u = s.FailRunning("worker lost");
  EXPECT_EQ(u.size(), 2u);
  for (const auto& x : u) EXPECT_EQ(x.finish, FinishReason::kError);
  EXPECT_EQ(s.num_running(), 0);
  EXPECT_EQ(s.reserved_blocks(), 0);
}

}  // namespace
}  // namespace asynctls
