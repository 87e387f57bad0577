#include "asynctls/runtime/kv_cache.h"

#include <gtest/gtest.h>

namespace asynctls {
namespace {

TEST(KvCacheTest, ReserveReleaseAndExhaustion) {
  auto backend = MakeCpuBackend(1);
  auto cache = KvCache::Create(backend.get(), 2, 1, 64, 4);
  ASSERT_TRUE(cache.ok());
  KvCache& c = **cache;
  EXPECT_EQ(c.free_blocks(), 4);
  ASSERT_TRUE(c.Reserve(1, 65).ok());  // two blocks
  EXPECT_EQ(c.Blocks(1).size(), 2u);
  c.SetSeqLen(1, 65);
  EXPECT_EQ(c.SlotOf(1, 64), c.Blocks(1)[1] * 64);
  ASSERT_TRUE(c.Reserve(2, 64).ok());
  absl::Status s = c.Reserve(3, 129);  // needs 3, 1 free
  EXPECT_EQ(s.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_FALSE(c.Contains(3));  // nothing half-done
  EXPECT_EQ(c.free_blocks(), 1);
  c.Release(1);
  c.Release(42);  // unknown: ignored
  EXPECT_EQ(c.free_blocks(), 3);
  EXPECT_EQ(c.num_sequences(), 1);
}

}  // namespace
}  // namespace asynctls
