// The transformer forward pass (Llama / SmolLM2, Qwen2, Qwen3) written once against Backend.
// One call runs a batch of sequences: prompt chunks (q_len > 1) first, then decode tokens
// (q_len 1), over the paged KV cache. Not thread-safe.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <vector>

#include "absl/status/statusor.h"
#include "asynctls/kernels/tls_params.h"
#include "asynctls/runtime/backend.h"
#include "asynctls/runtime/channel_sets.h"
#include "asynctls/runtime/kv_cache.h"
#include "asynctls/runtime/model_config.h"

namespace asynctls {

class WeightFile;

struct ModelLoadOptions {
  // Dtype of GEMM weights on the backend (CUDA: kF32 for exactness, kBF16 for speed; the
  // CPU backend always keeps fp32).
  kernels::DType weight_dtype = kernels::DType::kF32;
  int32_t max_batch_tokens = 512;  // largest number of tokens in one Forward
  int32_t max_batch_seqs = 64;
  // Decode-only forwards replay a CUDA graph per batch shape (the backend's CaptureOps; none on
  // the CPU, which runs exactly as without): the launch gaps between the step's ~600 kernels go.
  // A shape is the batch's layout and budgets, the KV cache, and its block-table width rounded
  // up to a bucket (multiples of 16 blocks, of an eighth of the width past 128 blocks), so that
  // growing sequences change shape rarely. At most 64 graphs are kept, the least recently used
  // freed first.
  bool cuda_graphs = false;
};

// What ModelLoadOptions::cuda_graphs did (all 0 without it, and on backends that capture nothing).
struct DecodeGraphStats {
  int64_t captures = 0;          // graphs captured
  int64_t replays = 0;           // forwards run by launching a graph (the capturing one too)
  int64_t capture_failures = 0;  // captures refused: those shapes run op by op
  int64_t evictions = 0;         // graphs freed to make room for a newer shape's
  int32_t cached_graphs = 0;     // graphs held now
};

// One Forward's inputs (host memory). Sequences [0, num_prefill) are prompt chunks, the rest
// decode tokens; q rows are packed in sequence order.
struct ForwardBatch {
  std::vector<int32_t> tokens;       // [num_tokens]
  std::vector<int32_t> positions;    // [num_tokens]
  std::vector<int32_t> slots;        // [num_tokens] cache slot of each token
  std::vector<int32_t> cu_q_lens;    // [num_seqs + 1]
  std::vector<int32_t> seq_lens;     // [num_seqs] cache length after this step
  std::vector<int32_t> block_table;  // [num_seqs, max_blocks_per_seq]
  int32_t max_blocks_per_seq = 0;
  int32_t num_prefill = 0;           // sequences with prompt chunks (first in order)
  std::vector<int32_t> logit_rows;   // token rows whose logits are returned, in order
  // The last tls_decode.size() decode sequences attend through the two-level sparse path
  // (Model::EnableTls) with these budgets, one per sequence in order, each at most the enabled
  // policy's; the others densely. Equal budgets should be adjacent (a run is one selection call).
  struct TlsBudgets {
    int32_t block_budget = 0, token_budget = 0;
    // One-step lag (enabled policy with TlsLag::kOneStep): the sequence's lag state slot in the
    // KV cache (KvCache::TlsLagSlot; -1: none, select same-step and keep nothing) and the
    // length at which the block set in that slot was chosen. prev_select_len > 0 selects the
    // tokens among those blocks (S_t from M_{t-1}; at most kTlsMaxLagTokens behind seq_len);
    // 0 selects same-step (a sequence's first TLS step). The step's new block set M_t goes to
    // the slot either way.
    int32_t lag_slot = -1, prev_select_len = 0;
  };
  std::vector<TlsBudgets> tls_decode;
  int32_t num_tls_decode() const { return static_cast<int32_t>(tls_decode.size()); }
  int32_t num_seqs() const { return static_cast<int32_t>(seq_lens.size()); }
};

// Where a Forward puts its logit rows' results (host memory, logit_rows entries each; null: not
// wanted). `greedy` asks for each row's greedy pick computed where the logits are (the backend's
// GreedyPick: the first largest logit and its log-softmax), as [logit_rows] int32 tokens then
// [logit_rows] float logprobs: a greedy step then copies no logits.
struct ForwardOutputs {
  float* logits = nullptr;  // [logit_rows, vocab]
  void* greedy = nullptr;   // [2 * logit_rows] 32-bit words
};

// Two-level sparse attention for decode tokens (DESIGN §1): once enabled, every Forward keeps
// the KV cache's TLS index up to date (prefill chunks and decode tokens; the cache must have
// one with channels.num_channels channels), and the batch's TLS decode sequences select their
// positions with `policy` and attend over them only. Prefill attention stays dense.
//
// With policy.lag == kOneStep (the paper's pipeline) each sequence's step t selects its tokens
// among the blocks M_{t-1} its previous step chose, and chooses M_t for the next step; the
// block sets live in the KV cache's lag slots (KvCache::EnableTlsLag, ForwardBatch::TlsBudgets).
// A sequence's first TLS step, or one without a slot, selects same-step.
struct TlsDecodeOptions {
  kernels::TlsPolicy policy;
  ChannelSets channels;  // calibrated channel sets of this model (asynctls calibrate)
  // kOneStep: sequences that keep lag state at once (the engine's KV cache slots, each
  // num_layers x num_kv_heads x block_budget int32); later ones select same-step until one frees.
  int32_t lag_sequences = 256;
  // The block index's int8 form (kernels/tls_params.h): half its bytes, accuracy-neutral in
  // bench/results/tls-accuracy.md (k).
  bool int8_block_index = false;
};

// One layer's attention inputs of one Forward, after RoPE, as host copies valid during the
// callback only (channel calibration, accuracy captures).
struct AttentionCapture {
  int32_t layer = 0;
  int32_t num_tokens = 0;              // rows of the batch, in batch order
  const int32_t* positions = nullptr;  // [num_tokens]
  const float* q = nullptr;            // [num_tokens, num_q_heads, head_dim]
  const float* k = nullptr;            // [num_tokens, num_kv_heads, head_dim]
  const float* v = nullptr;            // [num_tokens, num_kv_heads, head_dim]
};
using AttentionCaptureFn = std::function<void(const AttentionCapture&)>;

class Model {
 public:
  // Reads and uploads the weights. INVALID_ARGUMENT for a missing tensor or a shape that
  // does not match the config (naming it).
  static absl::StatusOr<std::unique_ptr<Model>> Load(const WeightFile& file, Backend* backend,
                                                     const ModelLoadOptions& options);
  // Seeded random weights at the config's real sizes, generated on the backend (performance
  // runs at shapes whose checkpoints are too large to ship).
  static absl::StatusOr<std::unique_ptr<Model>> Random(const ModelConfig& config, uint64_t seed,
                                                       Backend* backend,
                                                       const ModelLoadOptions& options);
  ~Model();

  const ModelConfig& config() const;
  // Runs the batch, writing K/V into `cache`, and copies logits of batch.logit_rows to
  // `logits` ([logit_rows, vocab], host). INVALID_ARGUMENT if the batch exceeds the options.
  absl::Status Forward(const ForwardBatch& batch, KvCache& cache, std::vector<float>* logits);
  // The same into `out` (Backend::AllocateHost's memory takes the copies fastest).
  absl::Status Forward(const ForwardBatch& batch, KvCache& cache, const ForwardOutputs& out);
  // Calls `fn` in every later Forward once per layer, after RoPE, with host copies of that
  // layer's q/k/v (a blocking device-to-host copy per layer). Null (the default) turns it off
  // and costs nothing.
  void SetAttentionCapture(AttentionCaptureFn fn);
  // INVALID_ARGUMENT when the channel sets do not fit the model or the policy is not supported
  // (naming the field).
  absl::Status EnableTls(const TlsDecodeOptions& options);
  DecodeGraphStats graph_stats() const;

 private:
  struct Impl;
  explicit Model(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace asynctls
