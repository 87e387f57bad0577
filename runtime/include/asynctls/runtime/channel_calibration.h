// Channel calibration of the TLS token index from a real model's activations: run a text through
// the model with an attention capture (Model::SetAttentionCapture), accumulate per layer
// max|q[i]| and max|k[i]| (after RoPE), and pick the d_c best channels per KV head. The result
// and its file format are in channel_sets.h. Not thread-safe.
#pragma once

#include <cstdint>
#include <vector>

#include "absl/status/statusor.h"
#include "asynctls/runtime/backend.h"
#include "asynctls/runtime/channel_sets.h"
#include "asynctls/runtime/model.h"

namespace asynctls {

class ChannelCalibrator {
 public:
  explicit ChannelCalibrator(const ModelConfig& config);

  // Folds one layer's rows into the running maxima (kernels::ref::TlsCalibStats).
  void Add(const AttentionCapture& capture);
  int64_t num_tokens() const { return num_tokens_; }  // rows seen by layer 0
  // The num_channels best channels of every layer and KV head (kernels::ref::TlsCalibSelect).
  // INVALID_ARGUMENT for a bad num_channels; FAILED_PRECONDITION before any Add.
  absl::StatusOr<ChannelSets> Select(int32_t num_channels) const;

 private:
  ModelConfig config_;
  int64_t num_tokens_ = 0;
  std::vector<float> q_absmax_;  // [layers, q heads, head_dim]
  std::vector<float> k_absmax_;  // [layers, kv heads, head_dim]
};

// Prefills `tokens` as one sequence on a fresh KV cache in chunks of at most `chunk_tokens`
// (<= the model's max_batch_tokens), calling `capture` for every layer of every chunk. The
// model's capture is reset afterwards. INVALID_ARGUMENT when the text exceeds max_context;
// errors of the forward pass as they come.
absl::Status PrefillWithCapture(Model& model, Backend& backend, const std::vector<int32_t>& tokens,
                                int32_t chunk_tokens, AttentionCaptureFn capture);

}  // namespace asynctls
