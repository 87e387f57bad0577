// Calibrated channel sets C of the TLS token index (DESIGN §1, PAPER §2): for every layer and KV
// head, the d_c channels of the key on which the token index is kept. Written by
// `asynctls calibrate` (ChannelCalibrator) and read back by the runtime and the benchmarks.
//
// JSON file format ("asynctls-channels-v1"):
//   {
//     "format": "asynctls-channels-v1",
//     "model": "SmolLM2-135M-Instruct",          informational
//     "source": "tests/data/prompts/gpl-2.txt",  informational: the calibration text
//     "num_tokens": 4523,                        informational: tokens the statistics cover
//     "score": "mean_h max|q_h[i]| * max|k[i]|", informational
//     "num_layers": 30, "num_q_heads": 9, "num_kv_heads": 3, "head_dim": 64, "num_channels": 32,
//     "channels": [ [ [c_0, ..., c_31],   layer 0, KV head 0: ascending, distinct, in [0, head_dim)
//                     [...], [...] ],     layer 0, KV heads 1, 2
//                   ... ]                 layers 1 .. num_layers - 1
//   }
// Score of channel i for KV head g: s_i = (1/G) sum_{h in group g} max_t |q_h[t, i]| ·
// max_t |k_g[t, i]| over the calibration tokens (q and k after RoPE); C = the num_channels best
// (ties: lower channel first), stored ascending (kernels::TlsCalibSelectParams).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace asynctls {

struct ChannelSets {
  std::string model, source;
  int64_t num_tokens = 0;
  int32_t num_layers = 0, num_q_heads = 0, num_kv_heads = 0, head_dim = 0, num_channels = 0;
  std::vector<int32_t> channels;  // [num_layers, num_kv_heads, num_channels], ascending rows

  // The [num_kv_heads, num_channels] block of one layer (TlsIndexUpdateParams::channels).
  const int32_t* Layer(int layer) const {
    return channels.data() + static_cast<size_t>(layer) * num_kv_heads * num_channels;
  }
  // INVALID_ARGUMENT naming the first violation: sizes, range, order, distinctness, and
  // num_channels a multiple of 8 in [8, min(head_dim, kTlsMaxChannels)].
  absl::Status Validate() const;
};

std::string ChannelSetsToJson(const ChannelSets& sets);
absl::Status WriteChannelSets(const ChannelSets& sets, const std::string& path);
// NOT_FOUND when the file is missing; INVALID_ARGUMENT naming the key for a malformed file or
// one that fails Validate().
absl::StatusOr<ChannelSets> ChannelSetsFromJson(const std::string& json);
absl::StatusOr<ChannelSets> LoadChannelSets(const std::string& path);

}  // namespace asynctls
