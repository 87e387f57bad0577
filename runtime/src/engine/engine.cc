#include "asynctls/runtime/engine.h"

#include <algorithm>
#include <bit>
#include <chrono>
#include <thread>
#include <tuple>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "asynctls/runtime/logging.h"
#include "asynctls/runtime/sampler.h"
#include "asynctls/runtime/status.h"
#include "asynctls/runtime/weights.h"
#include "backend/thread_pool.h"

namespace asynctls {

// One sequence's share of a forward pass: a run of prompt tokens or one decode token.
struct Engine::Item {
  uint64_t seq_id;
  const int32_t* tokens;
  int32_t num_tokens;
  int32_t start_pos;
  bool sample;
  bool prefill;  // prompt items precede decode items in a forward
  SamplingParams sampling;
  bool tls = false;  // two-level sparse decode: such items come last in a forward
  int32_t tls_block_budget = 0, tls_token_budget = 0;  // effective budgets (with tls)
  // One-step lag (ForwardBatch::TlsBudgets): the KV cache's lag slot (-1: none) and the length
  // its block sets were chosen at (0: select same-step this time).
  int32_t tls_lag_slot = -1, tls_prev_select_len = 0;
};

absl::StatusOr<TlsDecodeOptions> TlsDecodeOptionsFromFile(const std::string& channels_path,
                                                          int32_t block_budget,
                                                          int32_t token_budget,
                                                          kernels::TlsLag lag) {
  TlsDecodeOptions options;
  ASYNCTLS_ASSIGN_OR_RETURN(options.channels, LoadChannelSets(channels_path));
  options.policy.mode = kernels::TlsMode::kTwoLevel;
  options.policy.lag = lag;
  if (block_budget > 0) options.policy.block_budget = block_budget;
  if (token_budget > 0) options.policy.token_budget = token_budget;
  return options;
}

absl::StatusOr<std::unique_ptr<Backend>> MakeBackend(const std::string& device, int cpu_threads) {
  if (device == "cpu") return MakeCpuBackend(cpu_threads);
  if (device == "auto") {
    if (CudaAvailable()) return MakeCudaBackend(0);
    return MakeCpuBackend(cpu_threads);
  }
  if (device == "cuda") return MakeCudaBackend(0);
  if (absl::StartsWith(device, "cuda:")) {
    int ordinal = 0;
    if (!absl::SimpleAtoi(device.substr(5), &ordinal) || ordinal < 0)
      return absl::InvalidArgumentError(absl::StrCat("device: bad CUDA ordinal in '", device, "'"));
    return MakeCudaBackend(ordinal);
  }
  return absl::InvalidArgumentError(absl::StrCat("device: '", device, "' is not cpu, cuda, cuda:N or auto"));
}

static ModelLoadOptions LoadOptions(const EngineOptions& options) {
  ModelLoadOptions load;
  load.weight_dtype = options.weight_dtype;
  load.max_batch_tokens = options.max_batch_tokens;
  load.max_batch_seqs = options.max_batch_seqs;
  load.cuda_graphs = options.cuda_graphs;
  return load;
}

absl::StatusOr<std::unique_ptr<Engine>> Engine::Create(const WeightFile& weights,
                                                       const EngineOptions& options) {
  std::unique_ptr<Engine> engine(new Engine());
  engine->options_ = options;
  ASYNCTLS_ASSIGN_OR_RETURN(engine->backend_, MakeBackend(options.device, options.cpu_threads));
  ASYNCTLS_ASSIGN_OR_RETURN(engine->model_, Model::Load(weights, engine->backend_.get(), LoadOptions(options)));
  return Finish(std::move(engine));
}

absl::StatusOr<std::unique_ptr<Engine>> Engine::CreateRandom(const ModelConfig& config, uint64_t seed,
                                                             const EngineOptions& options) {
  std::unique_ptr<Engine> engine(new Engine());
  engine->options_ = options;
  ASYNCTLS_ASSIGN_OR_RETURN(engine->backend_, MakeBackend(options.device, options.cpu_threads));
  ASYNCTLS_ASSIGN_OR_RETURN(engine->model_,
                            Model::Random(config, seed, engine->backend_.get(), LoadOptions(options)));
  return Finish(std::move(engine));
}

// Sizes and creates the KV cache once the model is loaded.
absl::StatusOr<std::unique_ptr<Engine>> Engine::Finish(std::unique_ptr<Engine> engine) {
  const ModelConfig& c = engine->model_->config();
  engine->model_name_ = c.name.empty() ? c.architecture : c.name;
  engine->sampling_pool_ = std::make_unique<ThreadPool>(
      static_cast<int>(std::clamp(std::thread::hardware_concurrency(), 1u, 8u)));
  int64_t kv_bytes = engine->options_.kv_cache_bytes;
  if (kv_bytes <= 0) {
    kv_bytes = engine->backend_->kind() == DeviceKind::kCpu ? int64_t{1} << 30
                                                            : engine->backend_->FreeMemoryBytes() * 2 / 5;
  }
  int tls_channels = 0;
  bool int8_block_index = false;
  if (engine->options_.tls) {
    ASYNCTLS_RETURN_IF_ERROR(engine->model_->EnableTls(*engine->options_.tls));
    tls_channels = engine->options_.tls->channels.num_channels;
    int8_block_index = engine->options_.tls->int8_block_index;
  }
  const size_t per_block = KvCache::BytesPerBlock(c.num_layers, c.num_kv_heads, c.head_dim,
                                                  tls_channels, int8_block_index);
  const int num_blocks = static_cast<int>(std::max<int64_t>(1, kv_bytes / static_cast<int64_t>(per_block)));
  ASYNCTLS_ASSIGN_OR_RETURN(
      engine->cache_, KvCache::Create(engine->backend_.get(), c.num_layers, c.num_kv_heads,
                                      c.head_dim, num_blocks, tls_channels, int8_block_index));
  if (engine->options_.tls && engine->options_.tls->policy.mode == kernels::TlsMode::kTwoLevel &&
      engine->options_.tls->policy.lag == kernels::TlsLag::kOneStep) {
    ASYNCTLS_RETURN_IF_ERROR(engine->cache_->EnableTlsLag(
        engine->options_.tls->lag_sequences, engine->options_.tls->policy.block_budget));
  }
  ASYNCTLS_LOG_INFO("engine: ", engine->model_name_, " on ", engine->backend_->Describe(), ", ", c.num_layers,
                    " layers, KV cache ", num_blocks, " blocks (", num_blocks * kernels::kKvBlockSize, " tokens)");
  if (engine->options_.tls) {
    const kernels::TlsPolicy& pol = engine->options_.tls->policy;
    const int lag_slots = engine->cache_->tls_lag_slots();
    ASYNCTLS_LOG_INFO("engine: two-level sparse decode, k_b ", pol.block_budget, ", k_t ",
                      pol.token_budget, ", ", engine->options_.tls->channels.num_channels,
                      " channels, ", int8_block_index ? "int8" : "bf16", " block index, ",
                      lag_slots > 0 ? absl::StrCat("one-step lag (", lag_slots, " slots)")
                                    : std::string("same-step selection"));
  }
  return engine;
}

Engine::~Engine() = default;

ExecutorInfo Engine::Info() const {
  ExecutorInfo info;
  info.model_name = model_name_;
  info.device = backend_->Describe();
  info.vocab_size = model_->config().vocab_size;
  info.max_context = model_->config().max_context;
  info.kv_blocks_total = cache_->num_blocks();
  info.max_batch_tokens = options_.max_batch_tokens;
  info.tls = options_.tls.has_value();
  if (options_.tls) {
    info.tls_block_budget = options_.tls->policy.block_budget;
    info.tls_token_budget = options_.tls->policy.token_budget;
  }
  return info;
}

// `buffer` with room for `rows` rows of `row_bytes`: grown to the next power of two of rows
// (page-locked allocations are slow), at least a forward's largest batch.
absl::Status Engine::GrowHostRows(HostBuffer& buffer, size_t row_bytes, size_t rows) {
  if (buffer.bytes() >= row_bytes * rows) return absl::OkStatus();
  const size_t grown = std::max<size_t>(
      rows, std::min<size_t>(std::bit_ceil(rows), std::max(options_.max_batch_seqs, 1)));
  buffer = HostBuffer();
  ASYNCTLS_ASSIGN_OR_RETURN(buffer, backend_->AllocateHost(row_bytes * grown));
  return absl::OkStatus();
}

absl::Status Engine::RunForward(const std::vector<Item>& items, StepResult* result) {
  ForwardBatch batch;
  batch.cu_q_lens.push_back(0);
  int max_blocks = 1;
  for (const Item& it : items) max_blocks = std::max<int>(max_blocks, cache_->Blocks(it.seq_id).size());
  batch.max_blocks_per_seq = max_blocks;
  for (const Item& it : items) {
    for (int i = 0; i < it.num_tokens; ++i) {
      batch.tokens.push_back(it.tokens[i]);
      batch.positions.push_back(it.start_pos + i);
      batch.slots.push_back(cache_->SlotOf(it.seq_id, it.start_pos + i));
    }
    batch.cu_q_lens.push_back(static_cast<int32_t>(batch.tokens.size()));
    batch.seq_lens.push_back(it.start_pos + it.num_tokens);
    const auto& blocks = cache_->Blocks(it.seq_id);
    batch.block_table.insert(batch.block_table.end(), blocks.begin(), blocks.end());
    batch.block_table.resize(static_cast<size_t>(batch.num_seqs()) * max_blocks, 0);
    if (it.prefill) ++batch.num_prefill;
    if (it.tls) {
      batch.tls_decode.push_back(
          {it.tls_block_budget, it.tls_token_budget, it.tls_lag_slot, it.tls_prev_select_len});
    }
    if (it.sample) batch.logit_rows.push_back(batch.cu_q_lens.back() - 1);
  }
  using Ms = std::chrono::duration<double, std::milli>;
  const auto t_forward = std::chrono::steady_clock::now();
  const int vocab = model_->config().vocab_size;
  const size_t rows = batch.logit_rows.size();
  // On a GPU greedy rows are picked where the logits are (Backend::GreedyPick): the logits come
  // to the host only for rows that sample with a temperature, or to be kept.
  const bool device_greedy =
      options_.greedy_on_backend.value_or(backend_->kind() == DeviceKind::kCuda);
  bool need_logits = !device_greedy || options_.keep_logits;
  for (const Item& it : items) need_logits |= it.sample && it.sampling.temperature > 0.f;
  ForwardOutputs out;
  if (need_logits && rows > 0) {
    ASYNCTLS_RETURN_IF_ERROR(GrowHostRows(logits_, sizeof(float) * vocab, rows));
    out.logits = logits_.as<float>();
  }
  if (device_greedy && rows > 0) {
    ASYNCTLS_RETURN_IF_ERROR(GrowHostRows(picks_, 2 * sizeof(int32_t), rows));
    out.greedy = picks_.data();
  }
  if (absl::Status s = model_->Forward(batch, *cache_, out); !s.ok()) {
    // The slots may hold part of this step's block sets: the next steps select same-step.
    for (const Item& it : items) cache_->SetTlsSelectLen(it.seq_id, 0);
    return s;
  }
  const auto t_sample = std::chrono::steady_clock::now();
  result->forward_ms += Ms(t_sample - t_forward).count();
  std::vector<const Item*> sampled;  // in logits row order
  for (const Item& it : items) {
    cache_->SetSeqLen(it.seq_id, it.start_pos + it.num_tokens);
    if (it.tls_lag_slot >= 0) cache_->SetTlsSelectLen(it.seq_id, it.start_pos + it.num_tokens);
    if (it.sample) sampled.push_back(&it);
  }
  if (options_.keep_logits) {
    const float* logits = logits_.as<float>();
    sampled_logits_.insert(sampled_logits_.end(), logits,
                           logits + static_cast<int64_t>(sampled.size()) * vocab);
  }
  std::vector<Sample> samples(sampled.size());
  sampling_pool_->ParallelFor(static_cast<int64_t>(sampled.size()), [&](int64_t row) {
    const Item& it = *sampled[row];
    if (out.greedy != nullptr && it.sampling.temperature <= 0.f) {
      samples[row] = {picks_.as<int32_t>()[row], picks_.as<float>()[rows + row]};
    } else {
      samples[row] = SampleToken(logits_.as<float>() + row * vocab, vocab, it.sampling,
                                 it.start_pos + it.num_tokens);
    }
  });
  for (size_t row = 0; row < sampled.size(); ++row) {
    result->tokens.push_back({sampled[row]->seq_id, samples[row].token, samples[row].logprob});
  }
  result->sample_ms += Ms(std::chrono::steady_clock::now() - t_sample).count();
  return absl::OkStatus();
}

absl::StatusOr<StepResult> Engine::Step(const StepPlan& plan) {
  const auto t0 = std::chrono::steady_clock::now();
  StepResult result;
  result.step_id = plan.step_id;
  sampled_logits_.clear();
  for (uint64_t id : plan.releases) cache_->Release(id);

  const int max_context = model_->config().max_context;
  auto drop = [&](uint64_t seq_id, std::string message) {
    cache_->Release(seq_id);
    result.errors.push_back({seq_id, std::move(message)});
  };
  // Validate and reserve KV; collect the work as items (prefill chunks first).
  std::vector<Item> prefill_items, decode_items;
  for (const PrefillChunk& c : plan.prefills) {
    const int have = cache_->SeqLen(c.seq_id);
    if (c.tokens.empty() || c.start_pos != have || c.start_pos + static_cast<int>(c.tokens.size()) > max_context) {
      drop(c.seq_id, absl::StrCat("prefill chunk at ", c.start_pos, " of ", c.tokens.size(),
                                  " tokens does not continue the sequence (", have, " cached, context ", max_context, ")"));
      continue;
    }
    if (absl::Status s = cache_->Reserve(c.seq_id, c.start_pos + c.tokens.size()); !s.ok()) {
      drop(c.seq_id, std::string(s.message()));
      continue;
    }
    // Split chunks longer than the forward budget; only the last piece samples.
    const int budget = options_.max_batch_tokens;
    for (int off = 0; off < static_cast<int>(c.tokens.size()); off += budget) {
      const int n = std::min<int>(budget, c.tokens.size() - off);
      const bool last = off + n == static_cast<int>(c.tokens.size());
      prefill_items.push_back({c.seq_id, c.tokens.data() + off, n, c.start_pos + off, last && c.sample, true,
                               c.sampling});
    }
  }
  for (const DecodeItem& d : plan.decodes) {
    const int have = cache_->SeqLen(d.seq_id);
    if (!cache_->Contains(d.seq_id) || d.position != have || d.position + 1 > max_context) {
      drop(d.seq_id, absl::StrCat("decode at position ", d.position, " but ", have, " tokens cached (context ",
                                  max_context, ")"));
      continue;
    }
    if (absl::Status s = cache_->Reserve(d.seq_id, d.position + 1); !s.ok()) {
      drop(d.seq_id, std::string(s.message()));
      continue;
    }
    int32_t block_budget = 0, token_budget = 0;
    if (d.tls) {
      if (!options_.tls) {
        drop(d.seq_id, "two-level sparse attention is not enabled on this engine (no TLS channel sets)");
        continue;
      }
      const kernels::TlsPolicy& limit = options_.tls->policy;
      if (d.tls_block_budget < 0 || d.tls_token_budget < 0 || d.tls_block_budget > limit.block_budget ||
          d.tls_token_budget > limit.token_budget) {
        drop(d.seq_id, absl::StrCat("tls budgets k_b ", d.tls_block_budget, " / k_t ", d.tls_token_budget,
                                    " outside this engine's 0..", limit.block_budget, " / 0..", limit.token_budget));
        continue;
      }
      block_budget = d.tls_block_budget > 0 ? d.tls_block_budget : limit.block_budget;
      token_budget = d.tls_token_budget > 0 ? d.tls_token_budget : limit.token_budget;
    }
    Item item{d.seq_id, &d.token,   1,     d.position,   true,
              false,    d.sampling, d.tls, block_budget, token_budget};
    if (d.tls && cache_->tls_lag_slots() > 0) {
      // Lagged when the slot's block sets were chosen at the previous step (the sequence's
      // last TLS step was the token before this one); else this step seeds them.
      item.tls_lag_slot = cache_->TlsLagSlot(d.seq_id);
      if (item.tls_lag_slot < 0 && !lag_slots_exhausted_logged_) {
        lag_slots_exhausted_logged_ = true;  // once per engine: the fallback is not an error
        ASYNCTLS_LOG_WARN("engine: all ", cache_->tls_lag_slots(),
                          " TLS lag slots are taken; sequence ", d.seq_id,
                          " and others select same-step until slots free (raise "
                          "--tls-lag-slots / TlsDecodeOptions::lag_sequences)");
      }
      if (item.tls_lag_slot >= 0 && cache_->TlsSelectLen(d.seq_id) == d.position) {
        item.tls_prev_select_len = d.position;
      }
    }
    decode_items.push_back(item);
  }
  // Dense decode items first, then TLS ones grouped by budgets and lag: a forward runs its TLS
  // sequences as a tail, one selection + attention call per run.
  auto run_key = [](const Item& i) {
    return std::make_tuple(i.tls, i.tls_block_budget, i.tls_token_budget,
                           i.tls_prev_select_len > 0);
  };
  std::stable_sort(decode_items.begin(), decode_items.end(),
                   [&](const Item& a, const Item& b) { return run_key(a) < run_key(b); });
  // Pack into forwards of at most max_batch_tokens tokens and max_batch_seqs sequences; a
  // sequence appears at most once per forward (its chunks are consecutive in the cache).
  std::vector<Item> all = std::move(prefill_items);
  all.insert(all.end(), decode_items.begin(), decode_items.end());
  std::vector<Item> wave;
  int wave_tokens = 0;
  auto flush = [&]() -> absl::Status {
    if (wave.empty()) return absl::OkStatus();
    absl::Status s = RunForward(wave, &result);
    wave.clear();
    wave_tokens = 0;
    return s;
  };
  for (const Item& it : all) {
    const bool seq_in_wave = std::any_of(wave.begin(), wave.end(), [&](const Item& w) { return w.seq_id == it.seq_id; });
    if (seq_in_wave || wave_tokens + it.num_tokens > options_.max_batch_tokens ||
        static_cast<int>(wave.size()) == options_.max_batch_seqs) {
      ASYNCTLS_RETURN_IF_ERROR(flush());
    }
    wave.push_back(it);
    wave_tokens += it.num_tokens;
  }
  ASYNCTLS_RETURN_IF_ERROR(flush());
  result.kv_blocks_used = cache_->used_blocks();
  result.kv_blocks_total = cache_->num_blocks();
  result.step_ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
  return result;
}

}  // namespace asynctls
