#include "asynctls/runtime/channel_calibration.h"

#include <algorithm>
#include <memory>

#include "absl/strings/str_cat.h"
#include "asynctls/kernels/tls_ref.h"
#include "asynctls/runtime/kv_cache.h"
#include "asynctls/runtime/status.h"

namespace asynctls {

ChannelCalibrator::ChannelCalibrator(const ModelConfig& config)
    : config_(config),
      q_absmax_(static_cast<size_t>(config.num_layers) * config.num_q_heads * config.head_dim, 0.f),
      k_absmax_(static_cast<size_t>(config.num_layers) * config.num_kv_heads * config.head_dim,
                0.f) {}

void ChannelCalibrator::Add(const AttentionCapture& c) {
  const int hd = config_.head_dim;
  kernels::TlsCalibStatsParams p{};
  p.q = c.q;
  p.k = c.k;
  p.q_absmax = q_absmax_.data() + static_cast<size_t>(c.layer) * config_.num_q_heads * hd;
  p.k_absmax = k_absmax_.data() + static_cast<size_t>(c.layer) * config_.num_kv_heads * hd;
  p.io_dtype = kernels::DType::kF32;
  p.num_tokens = c.num_tokens;
  p.num_q_heads = config_.num_q_heads;
  p.num_kv_heads = config_.num_kv_heads;
  p.head_dim = hd;
  kernels::ref::TlsCalibStats(p);
  if (c.layer == 0) num_tokens_ += c.num_tokens;
}

absl::StatusOr<ChannelSets> ChannelCalibrator::Select(int32_t num_channels) const {
  if (num_tokens_ == 0) return absl::FailedPreconditionError("calibration saw no tokens");
  ChannelSets s;
  s.model = config_.name;
  s.num_tokens = num_tokens_;
  s.num_layers = config_.num_layers;
  s.num_q_heads = config_.num_q_heads;
  s.num_kv_heads = config_.num_kv_heads;
  s.head_dim = config_.head_dim;
  s.num_channels = num_channels;
  if (num_channels < 8 || num_channels % 8 != 0 || num_channels > s.head_dim ||
      num_channels > kernels::kTlsMaxChannels) {
    return absl::InvalidArgumentError(
        absl::StrCat("num_channels ", num_channels, " must be a multiple of 8 in [8, min(head_dim ",
                     s.head_dim, ", ", kernels::kTlsMaxChannels, ")]"));
  }
  s.channels.assign(static_cast<size_t>(s.num_layers) * s.num_kv_heads * num_channels, 0);
  const int hd = config_.head_dim;
  for (int l = 0; l < s.num_layers; ++l) {
    kernels::TlsCalibSelectParams p{};
    p.q_absmax = q_absmax_.data() + static_cast<size_t>(l) * s.num_q_heads * hd;
    p.k_absmax = k_absmax_.data() + static_cast<size_t>(l) * s.num_kv_heads * hd;
    p.channels = s.channels.data() + static_cast<size_t>(l) * s.num_kv_heads * num_channels;
    p.num_q_heads = s.num_q_heads;
    p.num_kv_heads = s.num_kv_heads;
    p.head_dim = hd;
    p.num_channels = num_channels;
    kernels::ref::TlsCalibSelect(p);
  }
  ASYNCTLS_RETURN_IF_ERROR(s.Validate());
  return s;
}

absl::Status PrefillWithCapture(Model& model, Backend& backend, const std::vector<int32_t>& tokens,
                                int32_t chunk_tokens, AttentionCaptureFn capture) {
  const ModelConfig& c = model.config();
  const int n = static_cast<int>(tokens.size());
  if (n == 0) return absl::InvalidArgumentError("calibration text has no tokens");
  if (n > c.max_context) {
    return absl::InvalidArgumentError(
        absl::StrCat("calibration text has ", n, " tokens > max_context ", c.max_context));
  }
  if (chunk_tokens <= 0) return absl::InvalidArgumentError("chunk_tokens must be positive");
  const int blocks = (n + kernels::kKvBlockSize - 1) / kernels::kKvBlockSize;
  ASYNCTLS_ASSIGN_OR_RETURN(
      std::unique_ptr<KvCache> cache,
      KvCache::Create(&backend, c.num_layers, c.num_kv_heads, c.head_dim, blocks));
  constexpr uint64_t kSeq = 1;
  ASYNCTLS_RETURN_IF_ERROR(cache->Reserve(kSeq, n));
  model.SetAttentionCapture(std::move(capture));
  absl::Status status;
  std::vector<float> logits;
  for (int start = 0; start < n && status.ok(); start += chunk_tokens) {
    const int len = std::min(chunk_tokens, n - start);
    ForwardBatch b;
    b.tokens.assign(tokens.begin() + start, tokens.begin() + start + len);
    for (int i = 0; i < len; ++i) {
      b.positions.push_back(start + i);
      b.slots.push_back(cache->SlotOf(kSeq, start + i));
    }
    b.cu_q_lens = {0, len};
    b.seq_lens = {start + len};
    b.max_blocks_per_seq = blocks;
    b.block_table = cache->Blocks(kSeq);
    b.block_table.resize(blocks, 0);
    b.num_prefill = 1;
    status = model.Forward(b, *cache, &logits);
    if (status.ok()) cache->SetSeqLen(kSeq, start + len);
  }
  model.SetAttentionCapture(nullptr);
  return status;
}

}  // namespace asynctls
