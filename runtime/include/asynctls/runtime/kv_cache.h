// The paged KV cache of one rank: per layer a K and a V pool of bf16 blocks
// [num_blocks, num_kv_heads, 64, head_dim] on the backend, a free list of blocks, and the
// block list of every live sequence. With a TLS index (tls_channels > 0) every layer also keeps
// the two-level sparse attention indices of every block, on the same block ids (index row = KV
// block; layouts in kernels/tls_params.h): block max/min bf16 [num_blocks, num_kv_heads,
// head_dim] (or, with int8_block_index, int8 codes of that shape + fp32 scales [num_blocks,
// num_kv_heads]: half the bytes) and the INT4 token index codes [num_blocks, num_kv_heads, 64,
// tls_channels / 2] + fp32 scales [num_blocks, num_kv_heads, 64]. Not thread-safe (owned by one
// Engine).
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
                                                         int num_blocks, int tls_channels = 0,
                                                         bool int8_block_index = false);

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
  // TLS index of a layer (null without one).
  bool has_tls_index() const { return tls_channels_ > 0; }
  int tls_channels() const { return tls_channels_; }
  void* tls_kmax(int layer) const { return TlsPart(layer, 0); }
  void* tls_kmin(int layer) const { return TlsPart(layer, 1); }
  uint8_t* tls_codes(int layer) const { return static_cast<uint8_t*>(TlsPart(layer, 2)); }
  float* tls_scales(int layer) const { return static_cast<float*>(TlsPart(layer, 3)); }
  // The int8 block index's row scales (null with bf16 rows or no index).
  float* tls_block_scales(int layer) const { return static_cast<float*>(TlsPart(layer, 4)); }
  bool tls_int8_block_index() const {
    return !tls_pools_.empty() && tls_block_scales(0) != nullptr;
  }
  // ---- One-step-lag state of two-level sparse decode (EnableTlsLag) ----
  // Per live sequence, the block set M its last two-level selection chose, per layer and KV
  // head: its next decode step selects tokens among those blocks (S_t from M_{t-1}, DESIGN §1).
  // Held in `max_seqs` slots of int32 [max_seqs, num_layers, num_kv_heads, max_kept_blocks]
  // block ids + [max_seqs, num_layers, num_kv_heads] counts; Release frees a sequence's slot.
  absl::Status EnableTlsLag(int max_seqs, int max_kept_blocks);
  // The slot of `seq_id`'s lag state, taken from the free slots on first use; -1 when lag state
  // is off, the sequence is unknown, or every slot is taken (the sequence then selects without
  // the lag).
  int32_t TlsLagSlot(uint64_t seq_id);
  // Length at which the block set in the sequence's slot was chosen (0: none yet).
  int TlsSelectLen(uint64_t seq_id) const;
  void SetTlsSelectLen(uint64_t seq_id, int len);
  int32_t* tls_lag_blocks() const { return tls_lag_blocks_.as<int32_t>(); }
  int32_t* tls_lag_num_blocks() const { return tls_lag_num_blocks_.as<int32_t>(); }
  int tls_lag_max_blocks() const { return tls_lag_max_blocks_; }
  int tls_lag_slots() const { return tls_lag_slots_; }
  int tls_lag_free_slots() const { return static_cast<int>(free_lag_slots_.size()); }
  int num_layers() const { return static_cast<int>(k_pools_.size()); }

  // Distinct for every cache made in this process (unlike its address, never reused): a CUDA
  // graph that baked in one cache's pools is keyed by it.
  uint64_t id() const { return id_; }
  int num_blocks() const { return num_blocks_; }
  int free_blocks() const { return static_cast<int>(free_.size()); }
  int used_blocks() const { return num_blocks_ - free_blocks(); }
  int num_sequences() const { return static_cast<int>(seqs_.size()); }
  // Device bytes of one block over all layers (K, V and, with tls_channels > 0, its indices).
  static size_t BytesPerBlock(int num_layers, int num_kv_heads, int head_dim, int tls_channels = 0,
                              bool int8_block_index = false);

 private:
  struct Seq {
    std::vector<int32_t> blocks;
    int len = 0;
    int32_t lag_slot = -1;  // TLS lag state slot, -1: none
    int select_len = 0;     // length at which the slot's block set was chosen
  };
  KvCache() = default;
  void* TlsPart(int layer, int part) const {
    return tls_channels_ > 0 ? tls_pools_[kTlsParts * layer + part].data() : nullptr;
  }
  static constexpr int kTlsParts = 5;  // kmax, kmin, token codes, token scales, block scales

  Backend* backend_ = nullptr;
  uint64_t id_ = 0;
  int num_blocks_ = 0;
  int num_kv_heads_ = 0;
  int tls_channels_ = 0;
  int tls_lag_slots_ = 0, tls_lag_max_blocks_ = 0;
  DeviceBuffer tls_lag_blocks_, tls_lag_num_blocks_;
  std::vector<int32_t> free_lag_slots_;
  std::vector<DeviceBuffer> k_pools_, v_pools_;
  std::vector<DeviceBuffer> tls_pools_;  // per layer: the kTlsParts (block scales empty for bf16)
  std::vector<int32_t> free_;  // stack of free block ids
  absl::flat_hash_map<uint64_t, Seq> seqs_;
};

}  // namespace asynctls
