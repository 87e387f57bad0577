#include "asynctls/runtime/kv_cache.h"

#include <array>
#include <atomic>

#include "absl/strings/str_cat.h"
#include "asynctls/runtime/status.h"

namespace asynctls {

namespace {

// Bytes of one block's TLS index parts in one layer: kmax, kmin (bf16, or int8 codes), token
// codes, token scales and the int8 form's row scales (0 for bf16).
std::array<size_t, 5> TlsPartBytes(int num_kv_heads, int head_dim, int tls_channels,
                                   bool int8_block_index) {
  const size_t rows = size_t(num_kv_heads);
  const size_t tokens = rows * kernels::kKvBlockSize;
  const size_t bound = rows * head_dim * (int8_block_index ? 1 : sizeof(kernels::Bf16));
  return {bound, bound, tokens * size_t(tls_channels) / 2, tokens * sizeof(float),
          int8_block_index ? rows * sizeof(float) : 0};
}

}  // namespace

size_t KvCache::BytesPerBlock(int num_layers, int num_kv_heads, int head_dim, int tls_channels,
                              bool int8_block_index) {
  size_t bytes = size_t{2} * num_kv_heads * kernels::kKvBlockSize * head_dim * sizeof(kernels::Bf16);
  if (tls_channels > 0) {
    for (size_t part : TlsPartBytes(num_kv_heads, head_dim, tls_channels, int8_block_index)) {
      bytes += part;
    }
  }
  return bytes * num_layers;
}

absl::StatusOr<std::unique_ptr<KvCache>> KvCache::Create(Backend* backend, int num_layers,
                                                         int num_kv_heads, int head_dim,
                                                         int num_blocks, int tls_channels,
                                                         bool int8_block_index) {
  if (num_blocks <= 0) return absl::InvalidArgumentError("kv cache: num_blocks must be positive");
  if (tls_channels < 0 || tls_channels % 8 != 0 || tls_channels > head_dim ||
      tls_channels > kernels::kTlsMaxChannels) {
    return absl::InvalidArgumentError(absl::StrCat(
        "kv cache: tls_channels ", tls_channels, " must be a multiple of 8 in [0, min(head_dim ",
        head_dim, ", ", kernels::kTlsMaxChannels, ")]"));
  }
  static std::atomic<uint64_t> next_id{1};
  std::unique_ptr<KvCache> cache(new KvCache());
  cache->backend_ = backend;
  cache->id_ = next_id.fetch_add(1, std::memory_order_relaxed);
  cache->num_blocks_ = num_blocks;
  cache->num_kv_heads_ = num_kv_heads;
  cache->tls_channels_ = tls_channels;
  const size_t pool_bytes =
      size_t{static_cast<size_t>(num_blocks)} * num_kv_heads * kernels::kKvBlockSize * head_dim * sizeof(kernels::Bf16);
  for (int l = 0; l < num_layers; ++l) {
    ASYNCTLS_ASSIGN_OR_RETURN(DeviceBuffer k, backend->Allocate(pool_bytes));
    ASYNCTLS_ASSIGN_OR_RETURN(DeviceBuffer v, backend->Allocate(pool_bytes));
    // Zeroed so that a read past a sequence's end (a bug) is finite, not garbage.
    ASYNCTLS_RETURN_IF_ERROR(backend->Fill(k.data(), 0, pool_bytes));
    ASYNCTLS_RETURN_IF_ERROR(backend->Fill(v.data(), 0, pool_bytes));
    cache->k_pools_.push_back(std::move(k));
    cache->v_pools_.push_back(std::move(v));
    if (tls_channels == 0) continue;
    for (size_t part : TlsPartBytes(num_kv_heads, head_dim, tls_channels, int8_block_index)) {
      const size_t bytes = part * static_cast<size_t>(num_blocks);
      if (bytes == 0) {  // no row scales for bf16 rows
        cache->tls_pools_.emplace_back();
        continue;
      }
      ASYNCTLS_ASSIGN_OR_RETURN(DeviceBuffer buf, backend->Allocate(bytes));
      ASYNCTLS_RETURN_IF_ERROR(backend->Fill(buf.data(), 0, bytes));
      cache->tls_pools_.push_back(std::move(buf));
    }
  }
  cache->free_.reserve(num_blocks);
  for (int b = num_blocks - 1; b >= 0; --b) cache->free_.push_back(b);
  return cache;
}

absl::Status KvCache::Reserve(uint64_t seq_id, int num_tokens) {
  Seq& seq = seqs_[seq_id];
  const int needed = (num_tokens + kernels::kKvBlockSize - 1) / kernels::kKvBlockSize;
  const int missing = needed - static_cast<int>(seq.blocks.size());
  if (missing <= 0) return absl::OkStatus();
  if (missing > free_blocks()) {
    if (seq.blocks.empty()) seqs_.erase(seq_id);
    return absl::ResourceExhaustedError(absl::StrCat("kv cache: sequence ", seq_id, " needs ", missing,
                                                     " more blocks, ", free_blocks(), " free"));
  }
  for (int i = 0; i < missing; ++i) {
    seq.blocks.push_back(free_.back());
    free_.pop_back();
  }
  return absl::OkStatus();
}

void KvCache::Release(uint64_t seq_id) {
  auto it = seqs_.find(seq_id);
  if (it == seqs_.end()) return;
  for (int32_t b : it->second.blocks) free_.push_back(b);
  if (it->second.lag_slot >= 0) free_lag_slots_.push_back(it->second.lag_slot);
  seqs_.erase(it);
}

absl::Status KvCache::EnableTlsLag(int max_seqs, int max_kept_blocks) {
  if (max_seqs <= 0 || max_kept_blocks <= 0) {
    return absl::InvalidArgumentError(absl::StrCat("kv cache: tls lag slots ", max_seqs,
                                                   " and blocks ", max_kept_blocks,
                                                   " must be positive"));
  }
  if (tls_lag_slots_ > 0) return absl::FailedPreconditionError("kv cache: tls lag already enabled");
  const size_t rows = size_t(max_seqs) * num_layers() * num_kv_heads_;
  ASYNCTLS_ASSIGN_OR_RETURN(tls_lag_blocks_,
                            backend_->Allocate(rows * max_kept_blocks * sizeof(int32_t)));
  ASYNCTLS_ASSIGN_OR_RETURN(tls_lag_num_blocks_, backend_->Allocate(rows * sizeof(int32_t)));
  tls_lag_slots_ = max_seqs;
  tls_lag_max_blocks_ = max_kept_blocks;
  for (int s = max_seqs - 1; s >= 0; --s) free_lag_slots_.push_back(s);
  return absl::OkStatus();
}

int32_t KvCache::TlsLagSlot(uint64_t seq_id) {
  auto it = seqs_.find(seq_id);
  if (it == seqs_.end()) return -1;
  Seq& seq = it->second;
  if (seq.lag_slot < 0 && !free_lag_slots_.empty()) {
    seq.lag_slot = free_lag_slots_.back();
    free_lag_slots_.pop_back();
    seq.select_len = 0;
  }
  return seq.lag_slot;
}

int KvCache::TlsSelectLen(uint64_t seq_id) const {
  auto it = seqs_.find(seq_id);
  return it == seqs_.end() || it->second.lag_slot < 0 ? 0 : it->second.select_len;
}

void KvCache::SetTlsSelectLen(uint64_t seq_id, int len) {
  auto it = seqs_.find(seq_id);
  if (it != seqs_.end() && it->second.lag_slot >= 0) it->second.select_len = len;
}

int KvCache::SeqLen(uint64_t seq_id) const {
  auto it = seqs_.find(seq_id);
  return it == seqs_.end() ? 0 : it->second.len;
}

void KvCache::SetSeqLen(uint64_t seq_id, int len) {
  Seq& seq = seqs_.at(seq_id);
  ASYNCTLS_CHECK(len <= static_cast<int>(seq.blocks.size()) * kernels::kKvBlockSize, "seq ", seq_id);
  seq.len = len;
}

const std::vector<int32_t>& KvCache::Blocks(uint64_t seq_id) const { return seqs_.at(seq_id).blocks; }

int32_t KvCache::SlotOf(uint64_t seq_id, int position) const {
  const Seq& seq = seqs_.at(seq_id);
  return seq.blocks[position / kernels::kKvBlockSize] * kernels::kKvBlockSize + position % kernels::kKvBlockSize;
}

}  // namespace asynctls
