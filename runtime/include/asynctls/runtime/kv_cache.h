// The paged KV cache of one rank: per layer a K and a V pool of bf16 blocks
// [num_blocks, num_kv_heads, 64, head_dim] on the backend, a free list of blocks, and the
// block list of every live sequence. Not thread-safe (owned by one Engine).
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"
#include "asynctls/runtime/backend.h"

namespace asynctls {

class KvCache {
 public:
  // RESOURCE_EXHAUSTED when the pools do not fit on the backend.
  static absl::StatusOr<std::unique_ptr<KvCache>> Create(Backend* backend, int num_layers,
                                                         int num_kv_heads, int head_dim,
                                                         int num_blocks);

  // Grows sequence `seq_id` (created on first use) to hold `num_tokens` tokens, taking blocks
  // from the free list. RESOURCE_EXHAUSTED (and no change) when there are not enough free blocks.
  absl::Status Reserve(uint64_t seq_id, int num_tokens);
  // Returns the sequence's blocks to the free list; unknown ids are ignored.
  void Release(uint64_t seq_id);
  bool Contains(uint64_t seq_id) const { return seqs_.contains(seq_id); }
  int SeqLen(uint64_t seq_id) const;  // tokens written so far (0 for unknown)
  void SetSeqLen(uint64_t seq_id, int len);
  const std::vector<int32_t>& Blocks(uint64_t seq_id) const;
  int32_t SlotOf(uint64_t seq_id, int position) const;  // block * 64 + offset

  void* k_pool(int layer) const { return k_pools_[layer].data(); }
  void* v_pool(int layer) const { return v_pools_[layer].data(); }
  int num_blocks() const { return num_blocks_; }
  int free_blocks() const { return static_cast<int>(free_.size()); }
  int used_blocks() const { return num_blocks_ - free_blocks(); }
  int num_sequences() const { return static_cast<int>(seqs_.size()); }
  static size_t BytesPerBlock(int num_layers, int num_kv_heads, int head_dim);

 private:
  struct Seq {
    std::vector<int32_t> blocks;
    int len = 0;
  };
  KvCache() = default;

  int num_blocks_ = 0;
  std::vector<DeviceBuffer> k_pools_, v_pools_;
  std::vector<int32_t> free_;  // stack of free block ids
  absl::flat_hash_map<uint64_t, Seq> seqs_;
};

}  // namespace asynctls
