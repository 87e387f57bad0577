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

// The TLS index's parts per layer: bf16 block rows and no row scales, or the int8 form's codes
// (half the bytes) and one scale per block and KV head.
TEST(KvCacheTest, Int8BlockIndexHalvesTheBlockRows) {
  auto backend = MakeCpuBackend(1);
  const int layers = 2, heads = 2, dim = 64, blocks = 4, channels = 32;
  auto bf16 = KvCache::Create(backend.get(), layers, heads, dim, blocks, channels);
  auto int8 = KvCache::Create(backend.get(), layers, heads, dim, blocks, channels, true);
  ASSERT_TRUE(bf16.ok() && int8.ok());
  EXPECT_FALSE((*bf16)->tls_int8_block_index());
  EXPECT_TRUE((*int8)->tls_int8_block_index());
  for (int l = 0; l < layers; ++l) {
    EXPECT_EQ((*bf16)->tls_block_scales(l), nullptr);
    EXPECT_NE((*int8)->tls_block_scales(l), nullptr);
    EXPECT_NE((*int8)->tls_kmax(l), nullptr);
    EXPECT_NE((*int8)->tls_codes(l), nullptr);
  }
  // Per block and layer: the bf16 rows take 2 x heads x dim x 2 bytes, the int8 form half of
  // that plus a 4-byte scale per KV head.
  const size_t saved = KvCache::BytesPerBlock(layers, heads, dim, channels) -
                       KvCache::BytesPerBlock(layers, heads, dim, channels, true);
  EXPECT_EQ(saved, size_t(layers) * (2 * heads * dim - heads * 4));
  // Without a TLS index the flag changes nothing.
  auto none = KvCache::Create(backend.get(), layers, heads, dim, blocks, 0, true);
  ASSERT_TRUE(none.ok());
  EXPECT_FALSE((*none)->tls_int8_block_index());
  EXPECT_EQ((*none)->tls_block_scales(0), nullptr);
}

// Lag slots: one per live sequence while they last, freed with the sequence; the select length
// starts at 0 for every new holder.
TEST(KvCacheTest, TlsLagSlotsFollowSequences) {
  auto backend = MakeCpuBackend(1);
  auto cache = KvCache::Create(backend.get(), 3, 2, 64, 8, 32);
  ASSERT_TRUE(cache.ok());
  KvCache& c = **cache;
  ASSERT_TRUE(c.Reserve(1, 10).ok());
  EXPECT_EQ(c.TlsLagSlot(1), -1);  // lag state off
  EXPECT_EQ(c.EnableTlsLag(0, 4).code(), absl::StatusCode::kInvalidArgument);
  ASSERT_TRUE(c.EnableTlsLag(2, 4).ok());
  EXPECT_EQ(c.EnableTlsLag(2, 4).code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(c.tls_lag_slots(), 2);
  EXPECT_EQ(c.tls_lag_max_blocks(), 4);
  ASSERT_NE(c.tls_lag_blocks(), nullptr);
  ASSERT_NE(c.tls_lag_num_blocks(), nullptr);
  ASSERT_TRUE(c.Reserve(2, 10).ok());
  ASSERT_TRUE(c.Reserve(3, 10).ok());
  const int32_t s1 = c.TlsLagSlot(1), s2 = c.TlsLagSlot(2);
  EXPECT_GE(s1, 0);
  EXPECT_GE(s2, 0);
  EXPECT_NE(s1, s2);
  EXPECT_EQ(c.TlsLagSlot(1), s1);   // stable
  EXPECT_EQ(c.TlsLagSlot(3), -1);   // all taken
  EXPECT_EQ(c.TlsLagSlot(99), -1);  // unknown sequence
  EXPECT_EQ(c.tls_lag_free_slots(), 0);
  EXPECT_EQ(c.TlsSelectLen(1), 0);
  c.SetTlsSelectLen(1, 10);
  EXPECT_EQ(c.TlsSelectLen(1), 10);
  c.SetTlsSelectLen(3, 10);  // no slot: ignored
  EXPECT_EQ(c.TlsSelectLen(3), 0);
  c.Release(1);
  EXPECT_EQ(c.tls_lag_free_slots(), 1);
  EXPECT_EQ(c.TlsLagSlot(3), s1);  // the freed slot, with no block sets yet
  EXPECT_EQ(c.TlsSelectLen(3), 0);
  c.Release(2);
  c.Release(3);
  EXPECT_EQ(c.tls_lag_free_slots(), 2);
}

}  // namespace
}  // namespace asynctls
