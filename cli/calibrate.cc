// `asynctls calibrate`: runs the real model over a text and writes the TLS token index's channel
// sets (d_c channels per layer and KV head) as JSON; the format is documented in
// runtime/include/asynctls/runtime/channel_sets.h and read back by LoadChannelSets().
//
//   asynctls calibrate [--model PATH] [--text FILE] [--channels 32] --out FILE
//                      [--device D] [--threads N] [--max-tokens N] [--chunk N]
//                      [--capture FILE [--capture-queries N]]
//
// The text is tokenized raw (no chat template; BOS prepended when the tokenizer wants one) and
// prefilled as one sequence in chunks of --chunk tokens; q and k after RoPE of every layer feed
// the statistics s_i = mean_h(max|q_h[i]|) · max|k[i]| (PAPER §2).
//
// --capture FILE also writes the layers' attention inputs for the accuracy harness
// (bench/kernels/tls_accuracy_bench.cc --capture), little-endian binary "ATLSQKV1":
//   char    magic[8] = "ATLSQKV1"
//   int32   num_layers, num_tokens, num_q_heads, num_kv_heads, head_dim, num_queries, 0, 0
//   per layer, in order:
//     uint16 K[num_tokens, num_kv_heads, head_dim]   bf16 bits (what the KV cache stores)
//     uint16 V[num_tokens, num_kv_heads, head_dim]   bf16 bits
//     float  Q[num_queries, num_q_heads, head_dim]   fp32, positions num_tokens - num_queries ..
//                                                    num_tokens - 1 (a prefill row's q equals
//                                                    the decode query at that position)
#include <algorithm>
#include <cstdio>
#include <fstream>
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "asynctls/kernels/types.h"
#include "asynctls/runtime/channel_calibration.h"
#include "asynctls/runtime/engine.h"
#include "asynctls/runtime/status.h"
#include "asynctls/runtime/tokenizer.h"
#include "asynctls/runtime/weights.h"
#include "commands.h"
#include "flags.h"
#include "model_fetch.h"

namespace asynctls {
namespace {

constexpr char kDefaultText[] = "tests/data/prompts/gpl-2.txt";

// Keeps every layer's K/V (bf16) and the last num_queries rows of Q for the capture file.
class QkvRecorder {
 public:
  QkvRecorder(const ModelConfig& c, int num_tokens, int num_queries)
      : c_(c),
        num_tokens_(num_tokens),
        num_queries_(num_queries),
        k_(c.num_layers),
        v_(c.num_layers),
        q_(c.num_layers) {
    const size_t kv = static_cast<size_t>(num_tokens) * c.num_kv_heads * c.head_dim;
    for (int l = 0; l < c.num_layers; ++l) {
      k_[l].resize(kv);
      v_[l].resize(kv);
      q_[l].resize(static_cast<size_t>(num_queries) * c.num_q_heads * c.head_dim);
    }
  }

  void Add(const AttentionCapture& a) {
    const size_t kv_row = static_cast<size_t>(c_.num_kv_heads) * c_.head_dim;
    const size_t q_row = static_cast<size_t>(c_.num_q_heads) * c_.head_dim;
    for (int t = 0; t < a.num_tokens; ++t) {
      const int pos = a.positions[t];
      for (size_t i = 0; i < kv_row; ++i) {
        k_[a.layer][pos * kv_row + i] = kernels::FloatToBf16(a.k[t * kv_row + i]).bits;
        v_[a.layer][pos * kv_row + i] = kernels::FloatToBf16(a.v[t * kv_row + i]).bits;
      }
      const int qi = pos - (num_tokens_ - num_queries_);
      if (qi >= 0) std::copy_n(a.q + t * q_row, q_row, q_[a.layer].begin() + qi * q_row);
    }
  }

  absl::Status Write(const std::string& path) const {
    std::ofstream out(path, std::ios::binary | std::ios::trunc);
    if (!out) return absl::PermissionDeniedError(absl::StrCat("cannot write ", path));
    const int32_t header[8] = {c_.num_layers,
                               num_tokens_,
                               c_.num_q_heads,
                               c_.num_kv_heads,
                               c_.head_dim,
                               num_queries_,
                               0,
                               0};
    out.write("ATLSQKV1", 8);
    out.write(reinterpret_cast<const char*>(header), sizeof(header));
    for (int l = 0; l < c_.num_layers; ++l) {
      out.write(reinterpret_cast<const char*>(k_[l].data()), k_[l].size() * sizeof(uint16_t));
      out.write(reinterpret_cast<const char*>(v_[l].data()), v_[l].size() * sizeof(uint16_t));
      out.write(reinterpret_cast<const char*>(q_[l].data()), q_[l].size() * sizeof(float));
    }
    out.close();
    return out ? absl::OkStatus() : absl::DataLossError(absl::StrCat("writing ", path, " failed"));
  }

 private:
  const ModelConfig& c_;
  int num_tokens_, num_queries_;
  std::vector<std::vector<uint16_t>> k_, v_;
  std::vector<std::vector<float>> q_;
};

}  // namespace

absl::Status RunCalibrate(int argc, char** argv) {
  Flags flags;
  ASYNCTLS_RETURN_IF_ERROR(flags.Parse(argc, argv, {}));
  ASYNCTLS_RETURN_IF_ERROR(
      flags.CheckKnown({"model", "text", "channels", "out", "device", "threads", "max-tokens",
                        "chunk", "capture", "capture-queries"}));
  if (!flags.Has("out")) return absl::InvalidArgumentError("--out FILE is required");
  int32_t num_channels = 32, max_tokens = 0, chunk = 512, capture_queries = 256, threads = 0;
  ASYNCTLS_RETURN_IF_ERROR(flags.GetNumber("channels", &num_channels));
  ASYNCTLS_RETURN_IF_ERROR(flags.GetNumber("max-tokens", &max_tokens));
  ASYNCTLS_RETURN_IF_ERROR(flags.GetNumber("chunk", &chunk));
  ASYNCTLS_RETURN_IF_ERROR(flags.GetNumber("capture-queries", &capture_queries));
  ASYNCTLS_RETURN_IF_ERROR(flags.GetNumber("threads", &threads));
  const std::string text_path = flags.Get("text", kDefaultText);
  absl::StatusOr<std::string> text = ReadFile(text_path);
  if (!text.ok()) {
    return absl::NotFoundError(absl::StrCat(text.status().message(),
                                            " (pass --text FILE; the default is relative to the "
                                            "repository root)"));
  }

  std::string model_path = flags.Get("model");
  if (model_path.empty()) {
    ASYNCTLS_ASSIGN_OR_RETURN(model_path, DefaultModelPath());
  }
  ASYNCTLS_ASSIGN_OR_RETURN(std::unique_ptr<WeightFile> weights, WeightFile::Open(model_path));
  ASYNCTLS_ASSIGN_OR_RETURN(std::unique_ptr<Tokenizer> tokenizer, Tokenizer::FromGguf(*weights));
  ASYNCTLS_ASSIGN_OR_RETURN(std::vector<int32_t> tokens, tokenizer->Encode(*text));
  if (tokenizer->add_bos() && tokenizer->bos_id() >= 0)
    tokens.insert(tokens.begin(), tokenizer->bos_id());
  if (max_tokens > 0 && static_cast<int32_t>(tokens.size()) > max_tokens) tokens.resize(max_tokens);

  ASYNCTLS_ASSIGN_OR_RETURN(std::unique_ptr<Backend> backend,
                            MakeBackend(flags.Get("device", "cpu"), threads));
  ModelLoadOptions load;
  load.max_batch_tokens = chunk;
  load.max_batch_seqs = 1;
  ASYNCTLS_ASSIGN_OR_RETURN(std::unique_ptr<Model> model,
                            Model::Load(*weights, backend.get(), load));
  const ModelConfig& config = model->config();
  const int n = static_cast<int>(tokens.size());
  if (num_channels > config.head_dim) {
    return absl::InvalidArgumentError(
        absl::StrCat("--channels ", num_channels, " > head_dim ", config.head_dim));
  }

  ChannelCalibrator calibrator(config);
  std::unique_ptr<QkvRecorder> recorder;
  if (flags.Has("capture")) {
    if (capture_queries <= 0 || capture_queries > n) {
      return absl::InvalidArgumentError(
          absl::StrCat("--capture-queries must be in [1, ", n, "] (the text's tokens)"));
    }
    recorder = std::make_unique<QkvRecorder>(config, n, capture_queries);
  }
  std::fprintf(stderr, "[calibrate] %s on %s: %d tokens of %s, d_c = %d\n", config.name.c_str(),
               backend->Describe().c_str(), n, text_path.c_str(), num_channels);
  ASYNCTLS_RETURN_IF_ERROR(
      PrefillWithCapture(*model, *backend, tokens, chunk, [&](const AttentionCapture& a) {
        calibrator.Add(a);
        if (recorder) recorder->Add(a);
      }));
  ASYNCTLS_ASSIGN_OR_RETURN(ChannelSets sets, calibrator.Select(num_channels));
  sets.source = text_path;
  ASYNCTLS_RETURN_IF_ERROR(WriteChannelSets(sets, flags.Get("out")));
  std::fprintf(stderr, "[calibrate] wrote %d layers x %d KV heads x %d channels to %s\n",
               sets.num_layers, sets.num_kv_heads, sets.num_channels, flags.Get("out").c_str());
  if (recorder) {
    ASYNCTLS_RETURN_IF_ERROR(recorder->Write(flags.Get("capture")));
    std::fprintf(stderr, "[calibrate] wrote q/k/v of %d tokens (%d queries) to %s\n", n,
                 capture_queries, flags.Get("capture").c_str());
  }
  return absl::OkStatus();
}

}  // namespace asynctls
