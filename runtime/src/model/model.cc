#include "asynctls/runtime/model.h"

#include <algorithm>
#include <bit>
#include <cmath>
#include <functional>
#include <list>
#include <optional>
#include <string>
#include <utility>

#include "absl/container/flat_hash_map.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "asynctls/runtime/logging.h"
#include "asynctls/runtime/status.h"
#include "asynctls/runtime/weights.h"

namespace asynctls {

using kernels::DType;

namespace {

// A weight on the backend and the dtype it is stored in.
struct Weight {
  DeviceBuffer buf;
  DType dtype = DType::kF32;
  const void* data() const { return buf.data(); }
  const float* f32() const { return buf.as<const float>(); }
};

struct Layer {
  Weight attn_norm, ffn_norm, q_norm, k_norm;
  Weight wqkv, wo, w_gate_up, w_down;  // wqkv: q, k and v rows in one GEMM
  Weight bqkv;
};

absl::StatusOr<std::vector<float>> ReadChecked(const WeightFile& file, const std::string& name,
                                               std::vector<int64_t> expected_shape) {
  ASYNCTLS_ASSIGN_OR_RETURN(std::vector<float> data, file.ReadF32(name));
  int64_t expected = 1;
  for (int64_t d : expected_shape) expected *= d;
  if (static_cast<int64_t>(data.size()) != expected) {
    return absl::InvalidArgumentError(absl::StrCat("tensor ", name, " has ", data.size(),
                                                   " elements; the config implies [",
                                                   absl::StrJoin(expected_shape, ", "), "]"));
  }
  return data;
}

// A map of at most `capacity` entries that forgets its least recently used one to make room.
template <typename V>
class LruMap {
 public:
  explicit LruMap(size_t capacity) : capacity_(capacity) {}

  // The value of `key`, which becomes the most recently used; null when absent. Valid until the
  // entry is erased or forgotten.
  V* Find(const std::string& key) {
    auto it = index_.find(key);
    if (it == index_.end()) return nullptr;
    order_.splice(order_.begin(), order_, it->second);
    return &it->second->second;
  }
  // Adds `key` (absent) as the most recently used entry and returns the one forgotten to make
  // room, if any.
  std::optional<std::pair<std::string, V>> Insert(const std::string& key, V value) {
    std::optional<std::pair<std::string, V>> forgotten;
    if (order_.size() >= capacity_) {
      forgotten = std::move(order_.back());
      index_.erase(forgotten->first);
      order_.pop_back();
    }
    order_.emplace_front(key, std::move(value));
    index_[key] = order_.begin();
    return forgotten;
  }
  void Erase(const std::string& key) {
    auto it = index_.find(key);
    if (it == index_.end()) return;
    order_.erase(it->second);
    index_.erase(it);
  }
  // Removes every entry and returns them.
  std::list<std::pair<std::string, V>> TakeAll() {
    index_.clear();
    return std::exchange(order_, {});
  }
  size_t size() const { return order_.size(); }

 private:
  using Entries = std::list<std::pair<std::string, V>>;  // most recently used first
  size_t capacity_;
  Entries order_;
  absl::flat_hash_map<std::string, typename Entries::iterator> index_;
};

}  // namespace

struct Model::Impl {
  ModelConfig config;
  ModelLoadOptions options;
  Backend* backend = nullptr;
  Weight token_embd, output_norm, output;  // output empty when tied
  std::vector<Layer> layers;
  DeviceBuffer inv_freq;

  // Activations, sized for options.max_batch_tokens / max_batch_seqs.
  // qkv: the fused projection's rows [T, (H + 2 KV) * hd]; qkv_heads: its q, k and v as
  // SplitQkv leaves them, [T, H, hd] at 0, [T, KV, hd] at max_batch_tokens * H * hd and after
  // that (Q(), K(), V()).
  DeviceBuffer x, xn, qkv, qkv_heads, attn, gate_up, act, gathered, logits;
  DeviceBuffer picks;  // GreedyPick's tokens [S] then logprobs [S]
  // With bf16 layer weights the norms and SiLU write the GEMMs' inputs in bf16 themselves
  // (xn_bf16, act_bf16): the same bits as the GEMM's own conversion, one kernel fewer each.
  bool bf16_inputs = false;
  DeviceBuffer xn_bf16, act_bf16;
  // Per-step metadata.
  DeviceBuffer tokens, positions, slots, cu_q_lens, seq_lens, block_table, logit_rows;
  int32_t max_blocks_per_seq = 0;
  AttentionCaptureFn capture;
  // options.cuda_graphs (RunOpsInGraph): the backend's graph of each recently run decode
  // shape, and the recent shapes without one: run once so far (false) or whose capture failed
  // (true; not tried again while remembered). Both bounded, the oldest forgotten first.
  static constexpr size_t kMaxGraphs = 64;
  static constexpr size_t kMaxUncapturedShapes = 256;
  LruMap<int> graphs{kMaxGraphs};
  LruMap<bool> uncaptured_shapes{kMaxUncapturedShapes};
  DecodeGraphStats graph_stats;
  // Two-level sparse decode (EnableTls): channel sets [layers, kv heads, channels] and the
  // selection buffers of one step, sized for max_batch_seqs (S) and the policy's k_b. Block
  // sets M_t [layers (1 without the lag), S, kv heads, k_b] and counts; with the one-step lag
  // also M_{t-1} gathered from the KV cache's lag slots in batch order (same shape), the
  // lengths they were chosen at [S], and the row lists of that gather and of the scatter of M_t
  // back to the slots [4, layers * S].
  bool tls = false;
  kernels::TlsPolicy tls_policy;
  int32_t tls_channels = 0, tls_kept = 0;
  DeviceBuffer tls_channel_sets, tls_start_pos, tls_blocks, tls_num_blocks, tls_positions,
      tls_num_positions;
  DeviceBuffer tls_prev_blocks, tls_prev_num_blocks, tls_prev_lens, tls_copy_rows;
  bool tls_lag() const { return tls_prev_blocks.data() != nullptr; }
  std::vector<float> capture_q, capture_k, capture_v;

  ~Impl() {
    if (absl::Status s = DropGraphs(); !s.ok()) {
      ASYNCTLS_LOG_WARN("model: freeing the decode graphs: ", s.ToString());
    }
  }

  float* Q() const { return qkv_heads.as<float>(); }
  float* K() const {
    return Q() + int64_t{options.max_batch_tokens} * config.num_q_heads * config.head_dim;
  }
  float* V() const {
    return K() + int64_t{options.max_batch_tokens} * config.num_kv_heads * config.head_dim;
  }

  absl::StatusOr<Weight> Upload(const std::vector<float>& host, DType preferred) {
    Weight w;
    ASYNCTLS_ASSIGN_OR_RETURN(w.buf, backend->UploadWeight(host.data(), host.size(), preferred, &w.dtype));
    return w;
  }

  // Where weights come from: a name (canonical, plus the fused "blk.N.ffn_gate_up.weight",
  // "blk.N.attn_qkv.weight" and "blk.N.attn_qkv.bias"), its shape and the dtype to store it in.
  using WeightSource =
      std::function<absl::StatusOr<Weight>(const std::string&, std::vector<int64_t>, DType)>;

  WeightSource FileSource(const WeightFile& file) {
    return [this, &file](const std::string& name, std::vector<int64_t> shape,
                         DType dtype) -> absl::StatusOr<Weight> {
      // A fused tensor is its parts' rows one after another: gate then up (SiluMul reads gate
      // first), q then k then v.
      const ModelConfig& c = config;
      const int64_t hd = c.head_dim;
      const std::vector<std::pair<std::string, std::vector<std::pair<std::string, int64_t>>>>
          fused = {
              {"ffn_gate_up.weight",
               {{"ffn_gate.weight", c.ffn_size}, {"ffn_up.weight", c.ffn_size}}},
              {"attn_qkv.weight",
               {{"attn_q.weight", c.num_q_heads * hd},
                {"attn_k.weight", c.num_kv_heads * hd},
                {"attn_v.weight", c.num_kv_heads * hd}}},
              {"attn_qkv.bias",
               {{"attn_q.bias", c.num_q_heads * hd},
                {"attn_k.bias", c.num_kv_heads * hd},
                {"attn_v.bias", c.num_kv_heads * hd}}},
          };
      for (const auto& [suffix, parts] : fused) {
        if (name.size() <= suffix.size() || !absl::EndsWith(name, suffix)) continue;
        const std::string prefix = name.substr(0, name.size() - suffix.size());
        std::vector<float> rows;
        for (const auto& [part, part_rows] : parts) {
          std::vector<int64_t> part_shape = shape;
          part_shape[0] = part_rows;
          ASYNCTLS_ASSIGN_OR_RETURN(std::vector<float> host,
                                    ReadChecked(file, prefix + part, part_shape));
          rows.insert(rows.end(), host.begin(), host.end());
        }
        return Upload(rows, dtype);
      }
      ASYNCTLS_ASSIGN_OR_RETURN(std::vector<float> host, ReadChecked(file, name, shape));
      return Upload(host, dtype);
    };
  }

  // Seeded uniform weights generated on the backend: norms 1, biases 0, matrices scaled by
  // 1/sqrt(fan_in) so activations stay in range through every layer.
  WeightSource RandomSource(uint64_t seed) {
    return [this, seed](const std::string& name, std::vector<int64_t> shape, DType dtype) -> absl::StatusOr<Weight> {
      int64_t count = 1;
      for (int64_t d : shape) count *= d;
      Weight w;
      w.dtype = backend->kind() == DeviceKind::kCpu ? DType::kF32 : dtype;
      ASYNCTLS_ASSIGN_OR_RETURN(w.buf, backend->Allocate(count * kernels::DTypeSize(w.dtype)));
      const bool is_norm = name.find("norm.weight") != std::string::npos;
      const bool is_bias = name.find(".bias") != std::string::npos;
      float scale = shape.size() == 2 ? 1.f / std::sqrt(static_cast<float>(shape[1])) : 0.f;
      if (name == "token_embd.weight") scale = 0.05f;
      const uint64_t tensor_seed = seed * 1000003u + std::hash<std::string>{}(name);
      ASYNCTLS_RETURN_IF_ERROR(backend->RandomFill(
          {w.buf.data(), w.dtype, count, tensor_seed, is_norm || is_bias ? 0.f : scale, is_norm ? 1.f : 0.f}));
      return w;
    };
  }

  absl::Status LoadWeights(const WeightSource& load) {
    const ModelConfig& c = config;
    const int64_t hidden = c.hidden_size, hd = c.head_dim;
    const DType gemm = options.weight_dtype;
    // The embedding table doubles as the LM head when tied: keep it in the GEMM dtype then.
    ASYNCTLS_ASSIGN_OR_RETURN(token_embd, load("token_embd.weight", {c.vocab_size, hidden},
                                               c.tied_embeddings ? gemm : DType::kF32));
    ASYNCTLS_ASSIGN_OR_RETURN(output_norm, load("output_norm.weight", {hidden}, DType::kF32));
    if (!c.tied_embeddings) {
      ASYNCTLS_ASSIGN_OR_RETURN(output, load("output.weight", {c.vocab_size, hidden}, gemm));
    }
    layers.resize(c.num_layers);
    for (int i = 0; i < c.num_layers; ++i) {
      Layer& L = layers[i];
      const std::string p = absl::StrCat("blk.", i, ".");
      ASYNCTLS_ASSIGN_OR_RETURN(L.attn_norm, load(p + "attn_norm.weight", {hidden}, DType::kF32));
      ASYNCTLS_ASSIGN_OR_RETURN(L.ffn_norm, load(p + "ffn_norm.weight", {hidden}, DType::kF32));
      const int64_t qkv_rows = (c.num_q_heads + 2 * c.num_kv_heads) * hd;
      ASYNCTLS_ASSIGN_OR_RETURN(L.wqkv, load(p + "attn_qkv.weight", {qkv_rows, hidden}, gemm));
      ASYNCTLS_ASSIGN_OR_RETURN(L.wo, load(p + "attn_output.weight", {hidden, c.num_q_heads * hd}, gemm));
      ASYNCTLS_ASSIGN_OR_RETURN(L.w_gate_up, load(p + "ffn_gate_up.weight", {2 * int64_t{c.ffn_size}, hidden}, gemm));
      ASYNCTLS_ASSIGN_OR_RETURN(L.w_down, load(p + "ffn_down.weight", {hidden, c.ffn_size}, gemm));
      if (c.qk_norm) {
        ASYNCTLS_ASSIGN_OR_RETURN(L.q_norm, load(p + "attn_q_norm.weight", {hd}, DType::kF32));
        ASYNCTLS_ASSIGN_OR_RETURN(L.k_norm, load(p + "attn_k_norm.weight", {hd}, DType::kF32));
      }
      if (c.attention_bias) {
        ASYNCTLS_ASSIGN_OR_RETURN(L.bqkv, load(p + "attn_qkv.bias", {qkv_rows}, DType::kF32));
      }
    }
    return absl::OkStatus();
  }

  absl::Status AllocateActivations() {
    const ModelConfig& c = config;
    const int64_t T = options.max_batch_tokens, S = options.max_batch_seqs;
    const int64_t f = sizeof(float), i32 = sizeof(int32_t);
    max_blocks_per_seq = (c.max_context + kernels::kKvBlockSize - 1) / kernels::kKvBlockSize;
    bf16_inputs = !layers.empty();
    for (const Layer& L : layers) {
      for (const Weight* w : {&L.wqkv, &L.w_gate_up, &L.w_down}) {
        bf16_inputs = bf16_inputs && w->dtype == DType::kBF16;
      }
    }
    const int64_t bf16 = bf16_inputs ? int64_t{sizeof(kernels::Bf16)} : 0;
    struct Alloc {
      DeviceBuffer* buf;
      int64_t bytes;
    };
    const Alloc allocs[] = {
        {&x, T * c.hidden_size * f},
        {&xn, T * c.hidden_size * f},
        {&qkv, T * (c.num_q_heads + 2 * c.num_kv_heads) * c.head_dim * f},
        {&qkv_heads, T * (c.num_q_heads + 2 * c.num_kv_heads) * c.head_dim * f},
        {&attn, T * c.num_q_heads * c.head_dim * f},
        {&gate_up, T * 2 * c.ffn_size * f},
        {&act, T * c.ffn_size * f},
        {&gathered, S * c.hidden_size * f},
        {&logits, S * c.vocab_size * f},
        {&picks, 2 * S * i32},
        {&xn_bf16, T * c.hidden_size * bf16},
        {&act_bf16, T * c.ffn_size * bf16},
        {&tokens, T * i32},
        {&positions, T * i32},
        {&slots, T * i32},
        {&cu_q_lens, (S + 1) * i32},
        {&seq_lens, S * i32},
        {&block_table, S * max_blocks_per_seq * i32},
        {&logit_rows, S * i32},
    };
    for (const Alloc& a : allocs) {
      ASYNCTLS_ASSIGN_OR_RETURN(*a.buf, backend->Allocate(a.bytes));
    }
    const std::vector<float> freq = c.RopeInvFreq();
    ASYNCTLS_ASSIGN_OR_RETURN(inv_freq, backend->Allocate(freq.size() * sizeof(float)));
    return backend->CopyToDevice(inv_freq.data(), freq.data(), freq.size() * sizeof(float));
  }

  absl::Status CheckBatch(const ForwardBatch& b) const {
    const int num_tokens = static_cast<int>(b.tokens.size());
    if (num_tokens == 0) return absl::InvalidArgumentError("forward: empty batch");
    if (num_tokens > options.max_batch_tokens)
      return absl::InvalidArgumentError(absl::StrCat("forward: ", num_tokens, " tokens > max_batch_tokens ",
                                                     options.max_batch_tokens));
    if (b.num_seqs() > options.max_batch_seqs || static_cast<int>(b.logit_rows.size()) > options.max_batch_seqs)
      return absl::InvalidArgumentError(absl::StrCat("forward: ", b.num_seqs(), " sequences > max_batch_seqs ",
                                                     options.max_batch_seqs));
    if (b.positions.size() != b.tokens.size() || b.slots.size() != b.tokens.size() ||
        b.cu_q_lens.size() != b.seq_lens.size() + 1 || b.cu_q_lens.back() != num_tokens ||
        b.max_blocks_per_seq > max_blocks_per_seq ||
        b.block_table.size() != static_cast<size_t>(b.num_seqs()) * b.max_blocks_per_seq)
      return absl::InvalidArgumentError("forward: inconsistent batch layout");
    for (int32_t t : b.tokens)
      if (t < 0 || t >= config.vocab_size)
        return absl::InvalidArgumentError(absl::StrCat("forward: token id ", t, " outside the vocabulary"));
    for (int32_t s = 0; s < b.num_seqs(); ++s)
      if (s >= b.num_prefill && b.cu_q_lens[s + 1] - b.cu_q_lens[s] != 1)
        return absl::InvalidArgumentError("forward: decode sequences take exactly one token");
    return absl::OkStatus();
  }

  absl::Status Capture(int layer, const ForwardBatch& b) {
    const ModelConfig& c = config;
    const size_t T = b.tokens.size();
    capture_q.resize(T * c.num_q_heads * c.head_dim);
    capture_k.resize(T * c.num_kv_heads * c.head_dim);
    capture_v.resize(capture_k.size());
    ASYNCTLS_RETURN_IF_ERROR(
        backend->CopyToHost(capture_q.data(), Q(), capture_q.size() * sizeof(float)));
    ASYNCTLS_RETURN_IF_ERROR(
        backend->CopyToHost(capture_k.data(), K(), capture_k.size() * sizeof(float)));
    ASYNCTLS_RETURN_IF_ERROR(
        backend->CopyToHost(capture_v.data(), V(), capture_v.size() * sizeof(float)));
    capture({layer, static_cast<int32_t>(T), b.positions.data(), capture_q.data(), capture_k.data(),
             capture_v.data()});
    return absl::OkStatus();
  }

  absl::Status EnableTls(const TlsDecodeOptions& o) {
    const ModelConfig& c = config;
    const ChannelSets& cs = o.channels;
    ASYNCTLS_RETURN_IF_ERROR(cs.Validate());
    if (cs.num_layers != c.num_layers || cs.num_kv_heads != c.num_kv_heads ||
        cs.num_q_heads != c.num_q_heads || cs.head_dim != c.head_dim) {
      return absl::InvalidArgumentError(absl::StrCat(
          "tls: channel sets are for ", cs.num_layers, " layers x ", cs.num_q_heads, "/",
          cs.num_kv_heads, " heads x ", cs.head_dim, " dims; the model has ", c.num_layers, " x ",
          c.num_q_heads, "/", c.num_kv_heads, " x ", c.head_dim));
    }
    const kernels::TlsPolicy& pol = o.policy;
    const bool lag =
        pol.mode == kernels::TlsMode::kTwoLevel && pol.lag == kernels::TlsLag::kOneStep;
    if (lag && o.lag_sequences <= 0) {
      return absl::InvalidArgumentError(
          "tls: lag_sequences must be positive with the one-step lag");
    }
    if (pol.block_budget <= 0 || pol.token_budget <= 0 || pol.sink_blocks < 0 || pol.window < 0) {
      return absl::InvalidArgumentError(
          "tls: policy.block_budget and token_budget must be positive, sink_blocks and window "
          "non-negative");
    }
    const int64_t S = options.max_batch_seqs, KV = c.num_kv_heads;
    const int64_t layers = lag ? c.num_layers : 1;
    // The graphs captured so far read the TLS buffers about to be replaced.
    ASYNCTLS_RETURN_IF_ERROR(DropGraphs());
    tls_policy = pol;
    tls_channels = cs.num_channels;
    // Buffers for the largest budgets (a batch's runs use at most these).
    tls_kept = std::max(1, kernels::TlsKeptBlocks(pol));
    const int64_t max_kept = tls_kept;
    const int64_t max_positions = kernels::TlsMaxSelectedTokens(pol, max_blocks_per_seq);
    const int64_t i32 = sizeof(int32_t);
    ASYNCTLS_ASSIGN_OR_RETURN(tls_channel_sets, backend->Allocate(cs.channels.size() * i32));
    ASYNCTLS_RETURN_IF_ERROR(Upload32(tls_channel_sets, cs.channels));
    ASYNCTLS_ASSIGN_OR_RETURN(tls_start_pos, backend->Allocate(S * i32));
    ASYNCTLS_ASSIGN_OR_RETURN(tls_blocks, backend->Allocate(layers * S * KV * max_kept * i32));
    ASYNCTLS_ASSIGN_OR_RETURN(tls_num_blocks, backend->Allocate(layers * S * KV * i32));
    if (lag) {
      ASYNCTLS_ASSIGN_OR_RETURN(tls_prev_blocks,
                                backend->Allocate(layers * S * KV * max_kept * i32));
      ASYNCTLS_ASSIGN_OR_RETURN(tls_prev_num_blocks, backend->Allocate(layers * S * KV * i32));
      ASYNCTLS_ASSIGN_OR_RETURN(tls_prev_lens, backend->Allocate(S * i32));
      ASYNCTLS_ASSIGN_OR_RETURN(tls_copy_rows, backend->Allocate(4 * layers * S * i32));
    }
    ASYNCTLS_ASSIGN_OR_RETURN(tls_positions, backend->Allocate(S * KV * max_positions * i32));
    ASYNCTLS_ASSIGN_OR_RETURN(tls_num_positions, backend->Allocate(S * KV * i32));
    tls = true;
    return absl::OkStatus();
  }

  absl::Status Upload32(DeviceBuffer& dst, const std::vector<int32_t>& src) {
    return backend->CopyToDevice(dst.data(), src.data(), src.size() * sizeof(int32_t));
  }

  // The batch's lag slots and lengths against the cache and the enabled policy.
  absl::Status CheckTlsLag(const ForwardBatch& b, const KvCache& cache) const {
    const int first_tls = b.num_seqs() - b.num_tls_decode();
    for (int t = 0; t < b.num_tls_decode(); ++t) {
      const ForwardBatch::TlsBudgets& tb = b.tls_decode[t];
      if (tb.lag_slot < 0 && tb.prev_select_len == 0) continue;
      if (!tls_lag()) {
        return absl::InvalidArgumentError(
            "forward: tls lag slots need an enabled policy with the one-step lag");
      }
      if (cache.tls_lag_max_blocks() != tls_kept || cache.num_layers() != config.num_layers) {
        return absl::InvalidArgumentError(
            absl::StrCat("forward: the KV cache keeps lag block sets of ",
                         cache.tls_lag_max_blocks(), " blocks over ", cache.num_layers(),
                         " layers; the model needs ", tls_kept, " over ", config.num_layers));
      }
      const int len = b.seq_lens[first_tls + t];
      const bool lag_ok =
          tb.prev_select_len == 0 || (tb.prev_select_len > 0 && tb.prev_select_len <= len &&
                                      len - tb.prev_select_len <= kernels::kTlsMaxLagTokens);
      if (tb.lag_slot < 0 || tb.lag_slot >= cache.tls_lag_slots() || !lag_ok) {
        return absl::InvalidArgumentError(
            absl::StrCat("forward: tls lag slot ", tb.lag_slot, " (of ", cache.tls_lag_slots(),
                         ") with block sets chosen at length ", tb.prev_select_len,
                         " for a sequence of ", len, " tokens"));
      }
    }
    return absl::OkStatus();
  }

  // One-step lag: before the layers, M_{t-1} of the lagged TLS sequences from their cache slots
  // into batch order (tls_prev_*); after them, every slotted sequence's M_t back to its slot.
  // Rows of [slots, layers] in the cache, [layers, S] here; one CopyRows per array.
  // UploadTlsLagLists uploads a direction's row lists (and, before the layers, the lengths the
  // block sets were chosen at) and gives their count; CopyTlsLagRows copies the rows (device
  // ops only: a forward's uploads all come before its ops, which a CUDA graph can then replay).
  absl::StatusOr<int> UploadTlsLagLists(const ForwardBatch& b, bool to_slots) {
    if (!tls_lag()) return 0;
    const int L = config.num_layers, S = options.max_batch_seqs;
    std::vector<int32_t> slot_rows, batch_rows, prev_lens;
    for (int t = 0; t < b.num_tls_decode(); ++t) {
      const ForwardBatch::TlsBudgets& tb = b.tls_decode[t];
      if (!to_slots) prev_lens.push_back(tb.prev_select_len);
      if (tb.lag_slot < 0 || (!to_slots && tb.prev_select_len == 0)) continue;
      for (int li = 0; li < L; ++li) {
        slot_rows.push_back(tb.lag_slot * L + li);
        batch_rows.push_back(li * S + t);
      }
    }
    if (slot_rows.empty()) return 0;
    const int n = static_cast<int>(slot_rows.size());
    if (!to_slots) {
      ASYNCTLS_RETURN_IF_ERROR(backend->CopyToDevice(tls_prev_lens.data(), prev_lens.data(),
                                                     prev_lens.size() * sizeof(int32_t)));
    }
    // Source rows then destination rows; the gather's lists in the first half of the buffer,
    // the scatter's in the second.
    const std::vector<int32_t>& from = to_slots ? batch_rows : slot_rows;
    const std::vector<int32_t>& to = to_slots ? slot_rows : batch_rows;
    std::vector<int32_t> lists = from;
    lists.insert(lists.end(), to.begin(), to.end());
    ASYNCTLS_RETURN_IF_ERROR(
        backend->CopyToDevice(TlsLagRows(to_slots), lists.data(), lists.size() * sizeof(int32_t)));
    return n;
  }

  int32_t* TlsLagRows(bool to_slots) const {
    return tls_copy_rows.as<int32_t>() +
           (to_slots ? 2 * config.num_layers * options.max_batch_seqs : 0);
  }

  absl::Status CopyTlsLagRows(KvCache& cache, bool to_slots, int n) {
    if (n == 0) return absl::OkStatus();
    const int KV = config.num_kv_heads;
    const int32_t* rows = TlsLagRows(to_slots);
    int32_t* blocks = to_slots ? cache.tls_lag_blocks() : tls_prev_blocks.as<int32_t>();
    int32_t* counts = to_slots ? cache.tls_lag_num_blocks() : tls_prev_num_blocks.as<int32_t>();
    const int32_t* from_blocks = to_slots ? tls_blocks.as<int32_t>() : cache.tls_lag_blocks();
    const int32_t* from_counts =
        to_slots ? tls_num_blocks.as<int32_t>() : cache.tls_lag_num_blocks();
    ASYNCTLS_RETURN_IF_ERROR(
        backend->CopyRows({from_blocks, blocks, rows, rows + n, n, KV * tls_kept}));
    return backend->CopyRows({from_counts, counts, rows, rows + n, n, KV});
  }

  // Two-level sparse attention of `count` decode sequences from the `first_tls`-th TLS sequence
  // with `policy` (budgets at most the enabled policy's, so the buffers fit): select positions,
  // then attend over them. With the one-step lag the block sets go to layer `layer`'s rows of
  // tls_blocks (kept for the scatter to the cache's slots), and policy.lag == kOneStep reads
  // M_{t-1} from tls_prev_blocks. The block table on the device has rows of `table_width`.
  absl::Status TlsDecodeAttention(const ForwardBatch& b, KvCache& cache, int layer,
                                  const kernels::TlsPolicy& policy, int first_tls, int count,
                                  int table_width, float scale) {
    const ModelConfig& c = config;
    const int H = c.num_q_heads, KV = c.num_kv_heads, hd = c.head_dim;
    const int first_seq = b.num_seqs() - b.num_tls_decode() + first_tls;
    const int first_row = b.cu_q_lens[first_seq];  // q rows are packed in sequence order
    const int max_positions = kernels::TlsMaxSelectedTokens(policy, table_width);
    const float* q_rows = Q() + int64_t{first_row} * H * hd;
    const int32_t* table = block_table.as<int32_t>() + int64_t{first_seq} * table_width;
    const int32_t* lens = seq_lens.as<int32_t>() + first_seq;
    kernels::TlsDecodeSelectParams sp{};
    sp.policy = policy;
    sp.q = q_rows;
    sp.seq_lens = lens;
    sp.index_table = table;
    sp.block_kmax = cache.tls_kmax(layer);
    sp.block_kmin = cache.tls_kmin(layer);
    sp.maybe_block_scales = cache.tls_block_scales(layer);
    sp.channels = tls_channel_sets.as<int32_t>() + int64_t{layer} * KV * tls_channels;
    sp.token_codes = cache.tls_codes(layer);
    sp.token_scales = cache.tls_scales(layer);
    // Row (layer, first_tls) of the [layers, S, KV, k_b] block sets.
    const int64_t row = (tls_lag() ? int64_t{layer} * options.max_batch_seqs : 0) + first_tls;
    sp.blocks = tls_blocks.as<int32_t>() + row * KV * tls_kept;
    sp.num_blocks = tls_num_blocks.as<int32_t>() + row * KV;
    if (policy.lag == kernels::TlsLag::kOneStep) {
      sp.prev_blocks = tls_prev_blocks.as<int32_t>() + row * KV * tls_kept;
      sp.prev_num_blocks = tls_prev_num_blocks.as<int32_t>() + row * KV;
      sp.prev_select_lens = tls_prev_lens.as<int32_t>() + first_tls;
    }
    sp.positions = tls_positions.as<int32_t>();
    sp.num_positions = tls_num_positions.as<int32_t>();
    sp.io_dtype = DType::kF32;
    sp.batch = count;
    sp.num_q_heads = H;
    sp.num_kv_heads = KV;
    sp.head_dim = hd;
    sp.num_channels = tls_channels;
    sp.max_blocks_per_seq = table_width;
    // With the lag one row stride for every run (the lag slots'), else the run's own.
    sp.max_kept_blocks = tls_lag() ? tls_kept : std::max(1, kernels::TlsKeptBlocks(policy));
    sp.max_positions = max_positions;
    sp.scale = scale;
    ASYNCTLS_RETURN_IF_ERROR(backend->TlsDecodeSelect(sp));
    kernels::TlsSparseAttentionParams ap{};
    ap.q = q_rows;
    ap.k_cache = cache.k_pool(layer);
    ap.v_cache = cache.v_pool(layer);
    ap.block_table = table;
    ap.positions = tls_positions.as<int32_t>();
    ap.num_positions = tls_num_positions.as<int32_t>();
    ap.out = attn.as<float>() + int64_t{first_row} * H * hd;
    ap.io_dtype = DType::kF32;
    ap.batch = count;
    ap.num_q_heads = H;
    ap.num_kv_heads = KV;
    ap.head_dim = hd;
    ap.v_head_dim = hd;
    ap.max_blocks_per_seq = table_width;
    ap.max_positions = max_positions;
    ap.scale = scale;
    return backend->TlsSparseAttention(ap);
  }

  absl::Status Forward(const ForwardBatch& b, KvCache& cache, const ForwardOutputs& out) {
    ASYNCTLS_RETURN_IF_ERROR(CheckBatch(b));
    const ModelConfig& c = config;
    const int T = static_cast<int>(b.tokens.size());
    const int hd = c.head_dim, H = c.num_q_heads, KV = c.num_kv_heads;
    const int num_logits = static_cast<int>(b.logit_rows.size());
    // A decode-only forward of a CUDA-graph model replays its shape's graph (RunOpsInGraph). Its
    // block table is padded to a bucketed width, which every op then takes as its
    // max_blocks_per_seq, so that the graph serves the shape's later steps too.
    const bool graphed =
        options.cuda_graphs && backend->CanCaptureOps() && b.num_prefill == 0 && !capture;
    const int table_width = graphed ? GraphTableWidth(b.max_blocks_per_seq) : b.max_blocks_per_seq;
    ASYNCTLS_RETURN_IF_ERROR(Upload32(tokens, b.tokens));
    ASYNCTLS_RETURN_IF_ERROR(Upload32(positions, b.positions));
    ASYNCTLS_RETURN_IF_ERROR(Upload32(slots, b.slots));
    ASYNCTLS_RETURN_IF_ERROR(Upload32(cu_q_lens, b.cu_q_lens));
    ASYNCTLS_RETURN_IF_ERROR(Upload32(seq_lens, b.seq_lens));
    ASYNCTLS_RETURN_IF_ERROR(UploadBlockTable(b, table_width));
    ASYNCTLS_RETURN_IF_ERROR(Upload32(logit_rows, b.logit_rows));

    const int num_prefill_tokens = b.cu_q_lens[b.num_prefill];
    const int num_decode = b.num_seqs() - b.num_prefill;
    const bool tls_index = tls && cache.has_tls_index();
    if (tls_index && cache.tls_channels() != tls_channels) {
      return absl::InvalidArgumentError(absl::StrCat("forward: the KV cache keeps a TLS index of ",
                                                     cache.tls_channels(), " channels, the model's sets have ",
                                                     tls_channels));
    }
    const int num_tls_decode = b.num_tls_decode();
    if (num_tls_decode > num_decode || (num_tls_decode > 0 && !tls_index)) {
      return absl::InvalidArgumentError(absl::StrCat(
          "forward: ", num_tls_decode, " TLS sequences need as many decode sequences (", num_decode,
          "), Model::EnableTls and a KV cache with a TLS index"));
    }
    const int num_dense_decode = num_decode - num_tls_decode;
    for (const ForwardBatch::TlsBudgets& t : b.tls_decode) {
      if (t.block_budget <= 0 || t.token_budget <= 0 || t.block_budget > tls_policy.block_budget ||
          t.token_budget > tls_policy.token_budget) {
        return absl::InvalidArgumentError(absl::StrCat("forward: tls budgets k_b ", t.block_budget, " / k_t ",
                                                       t.token_budget, " outside 1..", tls_policy.block_budget,
                                                       " / 1..", tls_policy.token_budget));
      }
    }
    ASYNCTLS_RETURN_IF_ERROR(CheckTlsLag(b, cache));
    int max_q_len_all = 1;
    if (tls_index) {
      std::vector<int32_t> start(b.num_seqs());
      for (int s = 0; s < b.num_seqs(); ++s) {
        const int q_len = b.cu_q_lens[s + 1] - b.cu_q_lens[s];
        start[s] = b.seq_lens[s] - q_len;
        max_q_len_all = std::max(max_q_len_all, q_len);
      }
      ASYNCTLS_RETURN_IF_ERROR(Upload32(tls_start_pos, start));
    }
    ASYNCTLS_ASSIGN_OR_RETURN(const int lag_in, UploadTlsLagLists(b, /*to_slots=*/false));
    ASYNCTLS_ASSIGN_OR_RETURN(const int lag_out, UploadTlsLagLists(b, /*to_slots=*/true));
    int max_q_len = 0, max_decode_len = 0;
    for (int s = 0; s < b.num_seqs(); ++s) {
      if (s < b.num_prefill) max_q_len = std::max(max_q_len, b.cu_q_lens[s + 1] - b.cu_q_lens[s]);
      else max_decode_len = std::max(max_decode_len, b.seq_lens[s]);
    }
    const float scale = 1.f / std::sqrt(static_cast<float>(hd));
    // A graphed dense decode plans for the table's width, not this step's longest sequence.
    if (graphed) max_decode_len = table_width * kernels::kKvBlockSize;

    // Every op below only reads what the uploads above wrote (a graph can replay them).
    auto run_ops = [&]() -> absl::Status {
      ASYNCTLS_RETURN_IF_ERROR(CopyTlsLagRows(cache, /*to_slots=*/false, lag_in));
      ASYNCTLS_RETURN_IF_ERROR(
          backend->Embedding({token_embd.data(), tokens.as<int32_t>(), x.as<float>(),
                              token_embd.dtype, T, c.hidden_size, c.vocab_size}));
      auto gemm = [&](const float* in, const Weight& w, const Weight* bias, float* out, int m,
                      int n, int k, float beta, const kernels::Bf16* in_bf16 = nullptr) {
        return backend->Gemm({in, w.data(), bias && bias->data() ? bias->f32() : nullptr, out,
                              w.dtype, m, n, k, beta, in_bf16});
      };
      // The layers' GEMM inputs in bf16 where the norms and SiLU write them so (bf16_inputs).
      kernels::Bf16* const xn_b = bf16_inputs ? xn_bf16.as<kernels::Bf16>() : nullptr;
      kernels::Bf16* const act_b = bf16_inputs ? act_bf16.as<kernels::Bf16>() : nullptr;
      for (int li = 0; li < c.num_layers; ++li) {
        const Layer& L = layers[li];
        ASYNCTLS_RETURN_IF_ERROR(backend->RmsNorm(
            {x.as<float>(), L.attn_norm.f32(), xn.as<float>(), T, c.hidden_size, c.rms_eps, xn_b}));
        // q, k and v in one GEMM (one weight stream).
        const int qkv_width = (H + 2 * KV) * hd;
        ASYNCTLS_RETURN_IF_ERROR(gemm(xn.as<float>(), L.wqkv, &L.bqkv, qkv.as<float>(), T,
                                      qkv_width, c.hidden_size, 0.f, xn_b));
        // Then q, k, v apart, q / k normalized (Qwen3) and rotated: one op.
        ASYNCTLS_RETURN_IF_ERROR(backend->SplitQkv(
            {qkv.as<float>(), Q(), K(), V(), c.qk_norm ? L.q_norm.f32() : nullptr,
             c.qk_norm ? L.k_norm.f32() : nullptr, c.rms_eps, positions.as<int32_t>(),
             inv_freq.as<float>(), T, H, KV, hd, c.rotary_dim, c.rope_style}));
        if (capture) ASYNCTLS_RETURN_IF_ERROR(Capture(li, b));
        ASYNCTLS_RETURN_IF_ERROR(
            backend->KvAppend({K(), V(), slots.as<int32_t>(), cache.k_pool(li), cache.v_pool(li), T,
                               KV, hd, KV * hd, KV * hd}));
        if (tls_index) {
          kernels::TlsIndexUpdateParams ip{};
          ip.k_cache = cache.k_pool(li);
          ip.block_table = block_table.as<int32_t>();
          ip.index_table = block_table.as<int32_t>();  // index row = KV block
          ip.start_pos = tls_start_pos.as<int32_t>();
          ip.seq_lens = seq_lens.as<int32_t>();
          ip.block_kmax = cache.tls_kmax(li);
          ip.block_kmin = cache.tls_kmin(li);
          ip.maybe_block_scales = cache.tls_block_scales(li);
          ip.channels = tls_channel_sets.as<int32_t>() + int64_t{li} * KV * tls_channels;
          ip.maybe_token_codes = cache.tls_codes(li);
          ip.maybe_token_scales = cache.tls_scales(li);
          ip.batch = b.num_seqs();
          ip.num_kv_heads = KV;
          ip.head_dim = hd;
          ip.num_channels = tls_channels;
          ip.max_blocks_per_seq = table_width;
          ip.max_new_tokens = max_q_len_all;
          ASYNCTLS_RETURN_IF_ERROR(backend->TlsIndexUpdate(ip));
        }
        if (b.num_prefill > 0) {
          kernels::PagedPrefillParams pp{};
          pp.q = Q();
          pp.cu_q_lens = cu_q_lens.as<int32_t>();
          pp.k_cache = cache.k_pool(li);
          pp.v_cache = cache.v_pool(li);
          pp.block_table = block_table.as<int32_t>();
          pp.seq_lens = seq_lens.as<int32_t>();
          pp.out = attn.data();
          pp.io_dtype = DType::kF32;
          pp.batch = b.num_prefill;
          pp.num_tokens = num_prefill_tokens;
          pp.num_q_heads = H;
          pp.num_kv_heads = KV;
          pp.head_dim = hd;
          pp.max_blocks_per_seq = table_width;
          pp.max_q_len = max_q_len;
          pp.scale = scale;
          ASYNCTLS_RETURN_IF_ERROR(backend->PagedPrefillAttention(pp));
        }
        // TLS sequences in runs of equal budgets and lag, one selection + attention call per run.
        for (int t = 0; t < num_tls_decode;) {
          const ForwardBatch::TlsBudgets& first = b.tls_decode[t];
          int run = 1;
          const bool lagged = first.prev_select_len > 0;
          while (t + run < num_tls_decode &&
                 b.tls_decode[t + run].block_budget == first.block_budget &&
                 b.tls_decode[t + run].token_budget == first.token_budget &&
                 (b.tls_decode[t + run].prev_select_len > 0) == lagged) {
            ++run;
          }
          kernels::TlsPolicy policy = tls_policy;
          policy.block_budget = first.block_budget;
          policy.token_budget = first.token_budget;
          policy.lag = lagged ? kernels::TlsLag::kOneStep : kernels::TlsLag::kSameStep;
          ASYNCTLS_RETURN_IF_ERROR(
              TlsDecodeAttention(b, cache, li, policy, t, run, table_width, scale));
          t += run;
        }
        if (num_dense_decode > 0) {
          kernels::PagedDecodeParams dp{};
          dp.q = Q() + int64_t{num_prefill_tokens} * H * hd;
          dp.k_cache = cache.k_pool(li);
          dp.v_cache = cache.v_pool(li);
          dp.block_table = block_table.as<int32_t>() + int64_t{b.num_prefill} * table_width;
          dp.seq_lens = seq_lens.as<int32_t>() + b.num_prefill;
          dp.out = attn.as<float>() + int64_t{num_prefill_tokens} * H * hd;
          dp.io_dtype = DType::kF32;
          dp.batch = num_dense_decode;
          dp.num_q_heads = H;
          dp.num_kv_heads = KV;
          dp.head_dim = hd;
          dp.max_blocks_per_seq = table_width;
          dp.max_seq_len = max_decode_len;
          dp.scale = scale;
          ASYNCTLS_RETURN_IF_ERROR(backend->PagedDecodeAttention(dp));
        }
        ASYNCTLS_RETURN_IF_ERROR(
            gemm(attn.as<float>(), L.wo, nullptr, x.as<float>(), T, c.hidden_size, H * hd, 1.f));
        ASYNCTLS_RETURN_IF_ERROR(backend->RmsNorm(
            {x.as<float>(), L.ffn_norm.f32(), xn.as<float>(), T, c.hidden_size, c.rms_eps, xn_b}));
        ASYNCTLS_RETURN_IF_ERROR(gemm(xn.as<float>(), L.w_gate_up, nullptr, gate_up.as<float>(), T,
                                      2 * c.ffn_size, c.hidden_size, 0.f, xn_b));
        ASYNCTLS_RETURN_IF_ERROR(
            backend->SiluMul({gate_up.as<float>(), act.as<float>(), T, c.ffn_size, act_b}));
        ASYNCTLS_RETURN_IF_ERROR(gemm(act.as<float>(), L.w_down, nullptr, x.as<float>(), T,
                                      c.hidden_size, c.ffn_size, 1.f, act_b));
      }
      ASYNCTLS_RETURN_IF_ERROR(CopyTlsLagRows(cache, /*to_slots=*/true, lag_out));
      if (num_logits == 0) return absl::OkStatus();
      // Only the rows that sample need the final norm and the LM head.
      ASYNCTLS_RETURN_IF_ERROR(
          backend->Embedding({x.data(), logit_rows.as<int32_t>(), gathered.as<float>(), DType::kF32,
                              num_logits, c.hidden_size, T}));
      ASYNCTLS_RETURN_IF_ERROR(
          backend->RmsNorm({gathered.as<float>(), output_norm.f32(), gathered.as<float>(),
                            num_logits, c.hidden_size, c.rms_eps}));
      const Weight& head = c.tied_embeddings ? token_embd : output;
      ASYNCTLS_RETURN_IF_ERROR(gemm(gathered.as<float>(), head, nullptr, logits.as<float>(),
                                    num_logits, c.vocab_size, c.hidden_size, 0.f));
      if (out.greedy == nullptr) return absl::OkStatus();
      return backend->GreedyPick({logits.as<float>(), picks.as<int32_t>(),
                                  picks.as<float>() + num_logits, num_logits, c.vocab_size});
    };
    if (graphed) {
      // The shape: everything the ops' parameters take from the host (the dense decode's
      // max_seq_len and the TLS row widths follow from table_width), and the KV cache whose
      // pools the graph reads.
      std::string key = absl::StrCat(cache.id(), "/", tls_index ? 1 : 0, "/", T, "/",
                                     num_dense_decode, "/", table_width, "/", num_logits, "/",
                                     lag_in, "/", lag_out, "/", out.greedy != nullptr ? 1 : 0);
      for (const ForwardBatch::TlsBudgets& t : b.tls_decode) {
        absl::StrAppend(&key, "/", t.block_budget, ":", t.token_budget, ":",
                        t.prev_select_len > 0 ? 1 : 0);
      }
      ASYNCTLS_RETURN_IF_ERROR(RunOpsInGraph(key, run_ops));
    } else {
      ASYNCTLS_RETURN_IF_ERROR(run_ops());
    }
    if (num_logits == 0) return absl::OkStatus();
    if (out.greedy != nullptr) {
      ASYNCTLS_RETURN_IF_ERROR(
          backend->CopyToHost(out.greedy, picks.data(), 2 * sizeof(int32_t) * num_logits));
    }
    if (out.logits == nullptr) return absl::OkStatus();
    return backend->CopyToHost(out.logits, logits.data(),
                               sizeof(float) * num_logits * c.vocab_size);
  }

  // The block-table width of a graphed forward: the batch's widest sequence rounded up to a
  // multiple of max(16, 2^floor(log2 widest) / 8) blocks, within the model's context. A shape
  // then lasts until its widest sequence passes the bucket (a sequence growing from 100 to 4,200
  // tokens meets 5 widths, not 65), at most 12.5% of padding past 128 blocks; a power-of-two
  // bucket would double what a long dense decode plans for.
  int GraphTableWidth(int widest) const {
    const int pow2_floor = static_cast<int>(std::bit_floor(static_cast<unsigned>(widest)));
    const int step = std::max(16, pow2_floor / 8);
    return std::min((widest + step - 1) / step * step, max_blocks_per_seq);
  }

  // The batch's block table on the device, its rows padded to `width` with block 0 (as the
  // engine pads shorter rows): every op bounds its reads by the sequence's length, so the
  // padding is never read.
  absl::Status UploadBlockTable(const ForwardBatch& b, int width) {
    if (width == b.max_blocks_per_seq) return Upload32(block_table, b.block_table);
    std::vector<int32_t> padded(static_cast<size_t>(b.num_seqs()) * width, 0);
    for (int s = 0; s < b.num_seqs(); ++s) {
      std::copy_n(b.block_table.begin() + int64_t{s} * b.max_blocks_per_seq, b.max_blocks_per_seq,
                  padded.begin() + int64_t{s} * width);
    }
    return Upload32(block_table, padded);
  }

  // Runs `ops` through the backend's graph of shape `key`: the shape's first forward runs them
  // (every workspace takes its size), the second captures them, later ones replay the graph.
  // A shape whose capture fails runs them directly and is not tried again while remembered.
  absl::Status RunOpsInGraph(const std::string& key, const std::function<absl::Status()>& ops) {
    if (const int* id = graphs.Find(key)) {
      ++graph_stats.replays;
      return backend->LaunchCaptured(*id);
    }
    bool* capture_failed = uncaptured_shapes.Find(key);
    if (capture_failed == nullptr) {
      uncaptured_shapes.Insert(key, false);
      return ops();
    }
    if (*capture_failed) return ops();
    absl::StatusOr<int> id = backend->CaptureOps(ops);
    if (!id.ok()) {
      *capture_failed = true;
      ++graph_stats.capture_failures;
      ASYNCTLS_LOG_WARN("model: decode shape ", key,
                        " runs without a CUDA graph: ", id.status().ToString());
      return ops();
    }
    ++graph_stats.captures;
    uncaptured_shapes.Erase(key);
    if (auto evicted = graphs.Insert(key, *id)) {
      ++graph_stats.evictions;
      ASYNCTLS_RETURN_IF_ERROR(backend->ReleaseCaptured(evicted->second));
    }
    ++graph_stats.replays;
    return backend->LaunchCaptured(*id);
  }

  // Frees every graph and forgets every shape.
  absl::Status DropGraphs() {
    uncaptured_shapes.TakeAll();
    absl::Status status;
    for (const auto& [key, id] : graphs.TakeAll()) status.Update(backend->ReleaseCaptured(id));
    return status;
  }
};

Model::Model(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Model::~Model() = default;
const ModelConfig& Model::config() const { return impl_->config; }

absl::StatusOr<std::unique_ptr<Model>> Model::Load(const WeightFile& file, Backend* backend,
                                                   const ModelLoadOptions& options) {
  auto impl = std::make_unique<Impl>();
  ASYNCTLS_ASSIGN_OR_RETURN(impl->config, file.ReadModelConfig());
  ASYNCTLS_RETURN_IF_ERROR(impl->config.Validate());
  impl->options = options;
  impl->backend = backend;
  ASYNCTLS_RETURN_IF_ERROR(impl->LoadWeights(impl->FileSource(file)));
  ASYNCTLS_RETURN_IF_ERROR(impl->AllocateActivations());
  return std::unique_ptr<Model>(new Model(std::move(impl)));
}

absl::StatusOr<std::unique_ptr<Model>> Model::Random(const ModelConfig& config, uint64_t seed,
                                                     Backend* backend, const ModelLoadOptions& options) {
  auto impl = std::make_unique<Impl>();
  impl->config = config;
  ASYNCTLS_RETURN_IF_ERROR(impl->config.Validate());
  impl->options = options;
  impl->backend = backend;
  ASYNCTLS_RETURN_IF_ERROR(impl->LoadWeights(impl->RandomSource(seed)));
  ASYNCTLS_RETURN_IF_ERROR(impl->AllocateActivations());
  return std::unique_ptr<Model>(new Model(std::move(impl)));
}

absl::Status Model::Forward(const ForwardBatch& batch, KvCache& cache, std::vector<float>* logits) {
  ASYNCTLS_RETURN_IF_ERROR(impl_->CheckBatch(batch));  // before sizing by its logit rows
  logits->resize(batch.logit_rows.size() * static_cast<size_t>(impl_->config.vocab_size));
  return impl_->Forward(batch, cache, ForwardOutputs{logits->data()});
}

absl::Status Model::Forward(const ForwardBatch& batch, KvCache& cache, const ForwardOutputs& out) {
  return impl_->Forward(batch, cache, out);
}

void Model::SetAttentionCapture(AttentionCaptureFn fn) { impl_->capture = std::move(fn); }

absl::Status Model::EnableTls(const TlsDecodeOptions& options) { return impl_->EnableTls(options); }

DecodeGraphStats Model::graph_stats() const {
  DecodeGraphStats stats = impl_->graph_stats;
  stats.cached_graphs = static_cast<int32_t>(impl_->graphs.size());
  return stats;
}

}  // namespace asynctls
