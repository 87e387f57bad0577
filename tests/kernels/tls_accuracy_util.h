// Accuracy of the TLS selection policies against exact attention (issue 4, item 5), shared by
// tests/kernels/tls_accuracy_test.cc (small sizes, CI) and bench/kernels/tls_accuracy_bench.cc.
//
// An AccuracyInput is one sequence's K/V (bf16, what the paged cache holds), the calibrated
// channel set C and decode queries at several lengths (query i sees positions [0, lens[i]); the
// optional q_prev[i] is the previous step's query, for the one-step-lag variant). The harness
// builds the paged cache and both indices with the reference ops, runs ref::TlsDecodeSelect for
// a policy and ref::TlsSparseAttention over the selection, and compares with exact attention
// (double precision over every position, same bf16 K/V and fp32 q). Metrics, per (query, KV head):
//   topk_recall  |S ∩ T_k| / min(k_t, len): T_k = the k_t positions of largest exact importance
//                a_g(j) = mean over the group's heads of softmax_h(j) (ties: lower position);
//                S includes the always-kept sink / recent tokens, as the operator returns it.
//   mass_recall  mean over the group's heads of sum_{j in S} softmax_h(j).
//   out_rel_err  mean over the group's heads of ||o_sparse - o_exact|| / ||o_exact||.
//   selected     |S|.
//   needle_recall  share of the planted needles (positions < len) in S, when there are any.
// Every metric is averaged over (query, KV head) pairs.
#pragma once

#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "asynctls/kernels/tls_params.h"
#include "asynctls/kernels/tls_ref.h"

// Harness invariants (bad inputs are the caller's bug): abort with the condition.
#define ASYNCTLS_ACC_CHECK(cond)                                                    \
  do {                                                                              \
    if (!(cond)) {                                                                  \
      std::fprintf(stderr, "%s:%d: check failed: %s\n", __FILE__, __LINE__, #cond); \
      std::abort();                                                                 \
    }                                                                               \
  } while (0)

namespace asynctls::kernels::testing {

struct AccuracyInput {
  int num_q_heads = 0, num_kv_heads = 0, head_dim = 0, num_channels = 0;
  int num_tokens = 0;             // cached tokens (>= every lens[i])
  std::vector<Bf16> k, v;         // [num_tokens, num_kv_heads, head_dim]
  std::vector<int32_t> channels;  // [num_kv_heads, num_channels], ascending
  std::vector<int32_t> lens;      // [num_queries]
  std::vector<float> q;           // [num_queries, num_q_heads, head_dim]
  std::vector<float> q_prev;      // [num_queries, num_q_heads, head_dim] or empty (no lag)
  std::vector<int32_t> needles;   // planted positions, or empty

  int num_queries() const { return static_cast<int>(lens.size()); }
  int group() const { return num_q_heads / num_kv_heads; }
};

struct AccuracyMetrics {
  double topk_recall = 0, mass_recall = 0, out_rel_err = 0, selected = 0;
  double needle_recall = -1;  // -1: no needles
  int samples = 0;            // (query, KV head) pairs averaged

  void Merge(const AccuracyMetrics& o) {  // sample-weighted mean
    const double w = samples + o.samples;
    if (w == 0) return;
    auto mix = [&](double a, double b) { return (a * samples + b * o.samples) / w; };
    topk_recall = mix(topk_recall, o.topk_recall);
    mass_recall = mix(mass_recall, o.mass_recall);
    out_rel_err = mix(out_rel_err, o.out_rel_err);
    selected = mix(selected, o.selected);
    if (o.needle_recall >= 0) {
      needle_recall = needle_recall >= 0 ? mix(needle_recall, o.needle_recall) : o.needle_recall;
    }
    samples += o.samples;
  }
};

struct AccuracyMethod {
  const char* name;
  TlsMode mode;
  TlsLag lag;
};

// The methods compared at equal k_t (the lag variant needs AccuracyInput::q_prev).
inline std::vector<AccuracyMethod> AccuracyMethods(bool with_lag) {
  std::vector<AccuracyMethod> m = {{"tls", TlsMode::kTwoLevel, TlsLag::kSameStep}};
  if (with_lag) m.push_back({"tls-lag", TlsMode::kTwoLevel, TlsLag::kOneStep});
  m.push_back({"token-only", TlsMode::kTokenOnly, TlsLag::kSameStep});
  m.push_back({"quest", TlsMode::kBlockOnly, TlsLag::kSameStep});
  return m;
}

// The paged cache, both indices and the exact attention of an input: built once, then
// Evaluate() per policy.
class AccuracyHarness {
 public:
  // int8_block_index: the block index in its int8 form (tls_params.h) instead of bf16.
  explicit AccuracyHarness(const AccuracyInput& in, bool int8_block_index = false)
      : in_(in), int8_block_index_(int8_block_index) {
    ASYNCTLS_ACC_CHECK(in.num_kv_heads > 0 && in.num_q_heads % in.num_kv_heads == 0);
    ASYNCTLS_ACC_CHECK(in.k.size() == size_t(in.num_tokens) * in.num_kv_heads * in.head_dim);
    ASYNCTLS_ACC_CHECK(in.q.size() == size_t(in.num_queries()) * in.num_q_heads * in.head_dim);
    for (int32_t len : in.lens) ASYNCTLS_ACC_CHECK(len >= 2 && len <= in.num_tokens);
    BuildCache();
    BuildIndex();
    ComputeExact();
  }

  const AccuracyInput& input() const { return in_; }

  // Selection for `policy` over every query, then sparse attention and the metrics.
  AccuracyMetrics Evaluate(const TlsPolicy& policy) const {
    const int B = in_.num_queries(), KV = in_.num_kv_heads, H = in_.num_q_heads;
    const int hd = in_.head_dim;
    const int max_kept = std::max(1, TlsKeptBlocks(policy));
    const int max_pos = TlsMaxSelectedTokens(policy, max_blocks_);
    std::vector<int32_t> blocks(size_t(B) * KV * max_kept), num_blocks(size_t(B) * KV);
    std::vector<int32_t> positions(size_t(B) * KV * max_pos), num_positions(size_t(B) * KV);
    std::vector<int32_t> prev_blocks, prev_num_blocks, prev_lens;
    if (policy.mode == TlsMode::kTwoLevel && policy.lag == TlsLag::kOneStep) {
      ASYNCTLS_ACC_CHECK(!in_.q_prev.empty());
      // M_{t-1}: the same-step block selection of the previous query at length len - 1.
      TlsPolicy prev = policy;
      prev.lag = TlsLag::kSameStep;
      prev_lens.resize(B);
      for (int b = 0; b < B; ++b) prev_lens[b] = in_.lens[b] - 1;
      prev_blocks.resize(blocks.size());
      prev_num_blocks.resize(num_blocks.size());
      std::vector<int32_t> scratch(positions.size()), scratch_n(num_positions.size());
      TlsDecodeSelectParams p =
          SelectParams(prev, in_.q_prev.data(), prev_lens.data(), max_kept, max_pos);
      p.blocks = prev_blocks.data();
      p.num_blocks = prev_num_blocks.data();
      p.positions = scratch.data();
      p.num_positions = scratch_n.data();
      ref::TlsDecodeSelect(p);
    }
    TlsDecodeSelectParams p = SelectParams(policy, in_.q.data(), in_.lens.data(), max_kept, max_pos);
    p.prev_blocks = prev_blocks.empty() ? nullptr : prev_blocks.data();
    p.prev_num_blocks = prev_blocks.empty() ? nullptr : prev_num_blocks.data();
    p.prev_select_lens = prev_blocks.empty() ? nullptr : prev_lens.data();
    p.blocks = blocks.data();
    p.num_blocks = num_blocks.data();
    p.positions = positions.data();
    p.num_positions = num_positions.data();
    ref::TlsDecodeSelect(p);

    std::vector<float> out(size_t(B) * H * hd);
    TlsSparseAttentionParams a{};
    a.q = in_.q.data();
    a.k_cache = k_pool_.data();
    a.v_cache = v_pool_.data();
    a.block_table = table_.data();
    a.positions = positions.data();
    a.num_positions = num_positions.data();
    a.out = out.data();
    a.io_dtype = DType::kF32;
    a.batch = B;
    a.num_q_heads = H;
    a.num_kv_heads = KV;
    a.head_dim = hd;
    a.v_head_dim = hd;
    a.max_blocks_per_seq = max_blocks_;
    a.max_positions = max_pos;
    a.scale = Scale();
    ref::TlsSparseAttention(a);
    return Score(policy.token_budget, positions, num_positions, max_pos, out);
  }

  // Metrics of explicit position lists ([queries, kv heads, max_pos]) and outputs.
  AccuracyMetrics Score(int k_t, const std::vector<int32_t>& positions,
                        const std::vector<int32_t>& num_positions, int max_pos,
                        const std::vector<float>& out) const {
    const int B = in_.num_queries(), KV = in_.num_kv_heads, G = in_.group();
    const int hd = in_.head_dim;
    AccuracyMetrics m;
    double needle_sum = 0;
    int needle_rows = 0;
    for (int b = 0; b < B; ++b) {
      const int len = in_.lens[b];
      const int k = std::min(k_t, len);
      for (int g = 0; g < KV; ++g) {
        const size_t row = size_t(b) * KV + g;
        const int n = num_positions[row];
        const int32_t* pos = positions.data() + row * max_pos;
        const int32_t* rank = rank_[row].data();
        int hits = 0;
        for (int i = 0; i < n; ++i) hits += rank[pos[i]] < k;
        m.topk_recall += double(hits) / k;
        m.selected += n;
        for (int j = 0; j < G; ++j) {
          const int h = g * G + j;
          const float* p = probs_[size_t(b) * in_.num_q_heads + h].data();
          double mass = 0;
          for (int i = 0; i < n; ++i) mass += p[pos[i]];
          m.mass_recall += mass / G;
          const float* os = out.data() + (size_t(b) * in_.num_q_heads + h) * hd;
          const double* oe = exact_out_.data() + (size_t(b) * in_.num_q_heads + h) * hd;
          double num = 0, den = 0;
          for (int d = 0; d < hd; ++d) {
            num += (os[d] - oe[d]) * (os[d] - oe[d]);
            den += oe[d] * oe[d];
          }
          m.out_rel_err += std::sqrt(num / std::max(den, 1e-300)) / G;
        }
        int planted = 0, found = 0;
        for (int32_t needle : in_.needles) {
          if (needle >= len) continue;
          ++planted;
          found += std::binary_search(pos, pos + n, needle);
        }
        if (planted > 0) {
          needle_sum += double(found) / planted;
          ++needle_rows;
        }
        ++m.samples;
      }
    }
    m.topk_recall /= m.samples;
    m.mass_recall /= m.samples;
    m.out_rel_err /= m.samples;
    m.selected /= m.samples;
    if (needle_rows > 0) m.needle_recall = needle_sum / needle_rows;
    return m;
  }

  // Exact importance rank of position j for (query b, KV head g): 0 = most important.
  int32_t Rank(int b, int g, int j) const { return rank_[size_t(b) * in_.num_kv_heads + g][j]; }
  double Prob(int b, int h, int j) const { return probs_[size_t(b) * in_.num_q_heads + h][j]; }

 private:
  float Scale() const { return 1.f / std::sqrt(static_cast<float>(in_.head_dim)); }

  void BuildCache() {
    const int KV = in_.num_kv_heads, hd = in_.head_dim;
    max_blocks_ = (in_.num_tokens + kKvBlockSize - 1) / kKvBlockSize;
    const size_t pool = size_t(max_blocks_) * KV * kKvBlockSize * hd;
    k_pool_.assign(pool, Bf16{0});
    v_pool_.assign(pool, Bf16{0});
    for (int t = 0; t < in_.num_tokens; ++t) {
      for (int g = 0; g < KV; ++g) {
        const size_t dst =
            ((size_t(t / kKvBlockSize) * KV + g) * kKvBlockSize + t % kKvBlockSize) * hd;
        const size_t src = (size_t(t) * KV + g) * hd;
        std::copy_n(in_.k.begin() + src, hd, k_pool_.begin() + dst);
        std::copy_n(in_.v.begin() + src, hd, v_pool_.begin() + dst);
      }
    }
    // Every query is a sequence of its own over the same blocks (identity table).
    table_.resize(size_t(in_.num_queries()) * max_blocks_);
    for (int b = 0; b < in_.num_queries(); ++b) {
      std::iota(table_.begin() + size_t(b) * max_blocks_,
                table_.begin() + size_t(b + 1) * max_blocks_, 0);
    }
  }

  // Both indices over all num_tokens; a shorter query reads the same rows: its open block's
  // min/max are never read (not eligible) and token rows are per token.
  void BuildIndex() {
    const int KV = in_.num_kv_heads, hd = in_.head_dim, dc = in_.num_channels;
    const size_t rows = size_t(max_blocks_) * KV;
    kmax_.assign(rows * hd, Bf16{0});
    kmin_.assign(rows * hd, Bf16{0});
    kmax8_.assign(int8_block_index_ ? rows * hd : 0, 0);
    kmin8_.assign(kmax8_.size(), 0);
    block_scales_.assign(int8_block_index_ ? rows : 0, 0.f);
    codes_.assign(rows * kKvBlockSize * (dc / 2), 0);
    scales_.assign(rows * kKvBlockSize, 0.f);
    const int32_t start = 0, len = in_.num_tokens;
    TlsIndexUpdateParams u{};
    u.k_cache = k_pool_.data();
    u.block_table = table_.data();
    u.index_table = table_.data();
    u.start_pos = &start;
    u.seq_lens = &len;
    u.block_kmax = int8_block_index_ ? static_cast<void*>(kmax8_.data()) : kmax_.data();
    u.block_kmin = int8_block_index_ ? static_cast<void*>(kmin8_.data()) : kmin_.data();
    u.maybe_block_scales = int8_block_index_ ? block_scales_.data() : nullptr;
    u.channels = in_.channels.data();
    u.maybe_token_codes = codes_.data();
    u.maybe_token_scales = scales_.data();
    u.batch = 1;
    u.num_kv_heads = KV;
    u.head_dim = hd;
    u.num_channels = dc;
    u.max_blocks_per_seq = max_blocks_;
    u.max_new_tokens = len;
    ref::TlsIndexUpdate(u);
  }

  void ComputeExact() {
    const int B = in_.num_queries(), KV = in_.num_kv_heads, H = in_.num_q_heads, G = in_.group();
    const int hd = in_.head_dim;
    const double scale = Scale();
    probs_.assign(size_t(B) * H, {});
    exact_out_.assign(size_t(B) * H * hd, 0.0);
    rank_.assign(size_t(B) * KV, {});
    std::vector<float> kf(size_t(in_.num_tokens) * KV * hd), vf(kf.size());
    for (size_t i = 0; i < kf.size(); ++i) {
      kf[i] = Bf16ToFloat(in_.k[i]);
      vf[i] = Bf16ToFloat(in_.v[i]);
    }
    std::vector<double> logits;
    for (int b = 0; b < B; ++b) {
      const int len = in_.lens[b];
      for (int h = 0; h < H; ++h) {
        const int g = h / G;
        const float* q = in_.q.data() + (size_t(b) * H + h) * hd;
        logits.assign(len, 0.0);
        double mx = -1e300;
        for (int t = 0; t < len; ++t) {
          const float* kt = kf.data() + (size_t(t) * KV + g) * hd;
          double s = 0;
          for (int d = 0; d < hd; ++d) s += double(q[d]) * kt[d];
          logits[t] = s * scale;
          mx = std::max(mx, logits[t]);
        }
        double sum = 0;
        for (int t = 0; t < len; ++t) sum += (logits[t] = std::exp(logits[t] - mx));
        std::vector<float>& p = probs_[size_t(b) * H + h];
        p.resize(len);
        double* o = exact_out_.data() + (size_t(b) * H + h) * hd;
        for (int t = 0; t < len; ++t) {
          const double w = logits[t] / sum;
          p[t] = static_cast<float>(w);
          const float* vt = vf.data() + (size_t(t) * KV + g) * hd;
          for (int d = 0; d < hd; ++d) o[d] += w * vt[d];
        }
      }
      for (int g = 0; g < KV; ++g) {
        std::vector<double> importance(len, 0.0);
        for (int j = 0; j < G; ++j) {
          const std::vector<float>& p = probs_[size_t(b) * H + g * G + j];
          for (int t = 0; t < len; ++t) importance[t] += double(p[t]) / G;
        }
        std::vector<int32_t> order(len);
        std::iota(order.begin(), order.end(), 0);
        std::stable_sort(order.begin(), order.end(),
                         [&](int32_t x, int32_t y) { return importance[x] > importance[y]; });
        std::vector<int32_t>& rank = rank_[size_t(b) * KV + g];
        rank.resize(len);
        for (int r = 0; r < len; ++r) rank[order[r]] = r;
      }
    }
  }

  TlsDecodeSelectParams SelectParams(const TlsPolicy& policy, const float* q, const int32_t* lens,
                                     int max_kept, int max_pos) const {
    TlsDecodeSelectParams p{};
    p.policy = policy;
    p.q = q;
    p.seq_lens = lens;
    p.index_table = table_.data();
    p.block_kmax = int8_block_index_ ? static_cast<const void*>(kmax8_.data()) : kmax_.data();
    p.block_kmin = int8_block_index_ ? static_cast<const void*>(kmin8_.data()) : kmin_.data();
    p.maybe_block_scales = int8_block_index_ ? block_scales_.data() : nullptr;
    p.channels = in_.channels.data();
    p.token_codes = codes_.data();
    p.token_scales = scales_.data();
    p.io_dtype = DType::kF32;
    p.batch = in_.num_queries();
    p.num_q_heads = in_.num_q_heads;
    p.num_kv_heads = in_.num_kv_heads;
    p.head_dim = in_.head_dim;
    p.num_channels = in_.num_channels;
    p.max_blocks_per_seq = max_blocks_;
    p.max_kept_blocks = max_kept;
    p.max_positions = max_pos;
    p.scale = Scale();
    return p;
  }

  const AccuracyInput& in_;
  const bool int8_block_index_;
  int max_blocks_ = 0;
  std::vector<Bf16> k_pool_, v_pool_, kmax_, kmin_;
  std::vector<int8_t> kmax8_, kmin8_;  // the int8 form's codes and scales
  std::vector<float> block_scales_;
  std::vector<int32_t> table_;
  std::vector<uint8_t> codes_;
  std::vector<float> scales_;
  std::vector<std::vector<float>> probs_;   // [query, q head][len]
  std::vector<double> exact_out_;           // [query, q head, head_dim]
  std::vector<std::vector<int32_t>> rank_;  // [query, kv head][len]
};

// ---- Inputs ----------------------------------------------------------------------------------

// C from statistics (ref::TlsCalibStats / TlsCalibSelect): keys [0, num_tokens) and `queries`
// ([n, num_q_heads, head_dim]).
inline std::vector<int32_t> CalibrateChannels(const AccuracyInput& in,
                                              const std::vector<float>& queries) {
  const int H = in.num_q_heads, KV = in.num_kv_heads, hd = in.head_dim;
  std::vector<float> qa(size_t(H) * hd, 0.f), ka(size_t(KV) * hd, 0.f);
  std::vector<float> kf(in.k.size());
  for (size_t i = 0; i < kf.size(); ++i) kf[i] = Bf16ToFloat(in.k[i]);
  ref::TlsCalibStats(
      {nullptr, kf.data(), qa.data(), ka.data(), DType::kF32, in.num_tokens, 0, KV, hd});
  ref::TlsCalibStats({queries.data(), nullptr, qa.data(), ka.data(), DType::kF32,
                      static_cast<int32_t>(queries.size() / (size_t(H) * hd)), H, 0, hd});
  std::vector<int32_t> channels(size_t(KV) * in.num_channels);
  ref::TlsCalibSelect({qa.data(), ka.data(), channels.data(), nullptr, H, KV, hd, in.num_channels});
  return channels;
}

// Query lengths: num_tokens, num_tokens - 1 - step, ... (decode steps near the end).
inline std::vector<int32_t> TailLengths(int num_tokens, int num_queries, int step) {
  std::vector<int32_t> lens;
  for (int i = 0; i < num_queries; ++i) lens.push_back(num_tokens - i * step);
  return lens;
}

// (a) i.i.d. N(0, 1) keys, values and queries; C calibrated on keys and 64 extra random queries.
inline AccuracyInput MakeGaussianInput(int num_tokens, int num_queries, int num_q_heads,
                                       int num_kv_heads, int head_dim, int num_channels,
                                       uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> n01(0.f, 1.f);
  AccuracyInput in;
  in.num_q_heads = num_q_heads;
  in.num_kv_heads = num_kv_heads;
  in.head_dim = head_dim;
  in.num_channels = num_channels;
  in.num_tokens = num_tokens;
  const size_t kv = size_t(num_tokens) * num_kv_heads * head_dim;
  in.k.resize(kv);
  in.v.resize(kv);
  for (size_t i = 0; i < kv; ++i) {
    in.k[i] = FloatToBf16(n01(rng));
    in.v[i] = FloatToBf16(n01(rng));
  }
  in.lens = TailLengths(num_tokens, num_queries, 37);
  in.q.resize(size_t(num_queries) * num_q_heads * head_dim);
  for (float& x : in.q) x = n01(rng);
  std::vector<float> calib(size_t(64) * num_q_heads * head_dim);
  for (float& x : calib) x = n01(rng);
  in.channels = CalibrateChannels(in, calib);
  return in;
}

// (b) Gaussian keys/values with `num_needles` planted keys per KV head at random positions
// outside the sink and the last two blocks. Queries of one KV group share a direction u_g
// (q_h = u_g + e_h, all N(0, 1)); a needle's key is u_g / |u_g| * (needle_logit * sqrt(d) /
// |u_g|) plus N(0, 0.1) noise, so its exact logit is about needle_logit for every head of the
// group (random keys: N(0, 2)). C is calibrated on the keys and 64 queries of the same law.
inline AccuracyInput MakeNeedleInput(int num_tokens, int num_queries, int num_q_heads,
                                     int num_kv_heads, int head_dim, int num_channels,
                                     int num_needles, float needle_logit, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> n01(0.f, 1.f);
  AccuracyInput in = MakeGaussianInput(num_tokens, num_queries, num_q_heads, num_kv_heads, head_dim,
                                       num_channels, seed + 1);
  const int G = in.group();
  std::vector<float> u(size_t(num_kv_heads) * head_dim);
  for (float& x : u) x = n01(rng);
  auto make_queries = [&](int n) {
    std::vector<float> q(size_t(n) * num_q_heads * head_dim);
    for (int b = 0; b < n; ++b)
      for (int h = 0; h < num_q_heads; ++h)
        for (int d = 0; d < head_dim; ++d)
          q[(size_t(b) * num_q_heads + h) * head_dim + d] =
              u[size_t(h / G) * head_dim + d] + n01(rng);
    return q;
  };
  in.q = make_queries(num_queries);
  const int lo = kKvBlockSize, hi = num_tokens - 2 * kKvBlockSize - (num_queries - 1) * 37;
  std::uniform_int_distribution<int> where(lo, std::max(lo, hi - 1));
  while (static_cast<int>(in.needles.size()) < num_needles) {
    const int p = where(rng);
    if (std::find(in.needles.begin(), in.needles.end(), p) == in.needles.end())
      in.needles.push_back(p);
  }
  std::sort(in.needles.begin(), in.needles.end());
  std::normal_distribution<float> noise(0.f, 0.1f);
  for (int g = 0; g < num_kv_heads; ++g) {
    const float* ug = u.data() + size_t(g) * head_dim;
    double norm2 = 0;
    for (int d = 0; d < head_dim; ++d) norm2 += double(ug[d]) * ug[d];
    const float c = needle_logit * std::sqrt(float(head_dim)) / static_cast<float>(norm2);
    for (int32_t p : in.needles)
      for (int d = 0; d < head_dim; ++d)
        in.k[(size_t(p) * num_kv_heads + g) * head_dim + d] = FloatToBf16(c * ug[d] + noise(rng));
  }
  in.channels = CalibrateChannels(in, make_queries(64));
  return in;
}

// ---- Captured model activations ---------------------------------------------------------------

// The "ATLSQKV1" file of `asynctls calibrate --capture` (format in cli/calibrate.cc).
class QkvCaptureFile {
 public:
  int num_layers = 0, num_tokens = 0, num_q_heads = 0, num_kv_heads = 0, head_dim = 0,
      num_queries = 0;

  // False (with `error` set) when the file is missing, truncated or not a capture file.
  bool Open(const std::string& path, std::string* error) {
    in_.open(path, std::ios::binary);
    if (!in_) return Fail(error, "cannot open " + path);
    char magic[8];
    int32_t h[8];
    if (!in_.read(magic, 8) || std::memcmp(magic, "ATLSQKV1", 8) != 0)
      return Fail(error, path + ": not ATLSQKV1");
    if (!in_.read(reinterpret_cast<char*>(h), sizeof(h)))
      return Fail(error, path + ": short header");
    num_layers = h[0], num_tokens = h[1], num_q_heads = h[2], num_kv_heads = h[3], head_dim = h[4];
    num_queries = h[5];
    if (num_layers <= 0 || num_tokens <= 0 || num_kv_heads <= 0 ||
        num_q_heads % num_kv_heads != 0 || head_dim <= 0 || num_queries <= 0 ||
        num_queries > num_tokens)
      return Fail(error, path + ": bad header");
    in_.seekg(0, std::ios::end);
    if (static_cast<int64_t>(in_.tellg()) != 40 + int64_t(num_layers) * LayerBytes())
      return Fail(error, path + ": size does not match the header");
    return true;
  }

  // Layer `layer` as an AccuracyInput with decode queries at the given positions (each in
  // [num_tokens - num_queries + 1, num_tokens): the lag variant needs the previous query).
  AccuracyInput Layer(int layer, const std::vector<int32_t>& query_positions,
                      const std::vector<int32_t>& layer_channels, int num_channels) {
    AccuracyInput in;
    in.num_q_heads = num_q_heads;
    in.num_kv_heads = num_kv_heads;
    in.head_dim = head_dim;
    in.num_channels = num_channels;
    in.num_tokens = num_tokens;
    const size_t kv = size_t(num_tokens) * num_kv_heads * head_dim;
    const size_t qrow = size_t(num_q_heads) * head_dim;
    in.k.resize(kv);
    in.v.resize(kv);
    std::vector<float> q(size_t(num_queries) * qrow);
    in_.seekg(40 + int64_t(layer) * LayerBytes());
    in_.read(reinterpret_cast<char*>(in.k.data()), kv * 2);
    in_.read(reinterpret_cast<char*>(in.v.data()), kv * 2);
    in_.read(reinterpret_cast<char*>(q.data()), q.size() * 4);
    const int first = num_tokens - num_queries;
    for (int32_t p : query_positions) {
      in.lens.push_back(p + 1);
      in.q.insert(in.q.end(), q.begin() + (p - first) * qrow, q.begin() + (p - first + 1) * qrow);
      in.q_prev.insert(in.q_prev.end(), q.begin() + (p - 1 - first) * qrow,
                       q.begin() + (p - first) * qrow);
    }
    in.channels = layer_channels;
    return in;
  }

 private:
  int64_t LayerBytes() const {
    return 2 * int64_t(num_tokens) * num_kv_heads * head_dim * 2 +
           int64_t(num_queries) * num_q_heads * head_dim * 4;
  }
  bool Fail(std::string* error, const std::string& what) {
    if (error) *error = what;
    return false;
  }
  std::ifstream in_;
};

// The channel sets of an "asynctls-channels-v1" JSON file (runtime/.../channel_sets.h), read
// without a JSON library (the kernels-only build has none): the header integers by key and
// every integer after "channels" in order. Empty (with `error`) on a mismatch.
inline std::vector<int32_t> ParseChannelSetsJson(const std::string& text, int* num_layers,
                                                 int* num_kv_heads, int* num_channels,
                                                 std::string* error) {
  auto int_after = [&](const std::string& key, int* out) {
    const size_t at = text.find("\"" + key + "\"");
    if (at == std::string::npos) return false;
    const size_t colon = text.find(':', at);
    if (colon == std::string::npos) return false;
    *out = std::atoi(text.c_str() + colon + 1);
    return true;
  };
  std::vector<int32_t> out;
  if (text.find("asynctls-channels-v1") == std::string::npos ||
      !int_after("num_layers", num_layers) || !int_after("num_kv_heads", num_kv_heads) ||
      !int_after("num_channels", num_channels)) {
    if (error) *error = "not an asynctls-channels-v1 file";
    return out;
  }
  size_t at = text.find("\"channels\"");
  at = at == std::string::npos ? at : text.find('[', at);
  if (at == std::string::npos) {
    if (error) *error = "no \"channels\" array";
    return out;
  }
  for (size_t i = at; i < text.size();) {
    if (std::isdigit(static_cast<unsigned char>(text[i])) || text[i] == '-') {
      char* end = nullptr;
      out.push_back(static_cast<int32_t>(std::strtol(text.c_str() + i, &end, 10)));
      i = end - text.c_str();
    } else {
      ++i;
    }
  }
  if (out.size() != size_t(*num_layers) * *num_kv_heads * *num_channels) {
    if (error) *error = "channel count does not match num_layers * num_kv_heads * num_channels";
    out.clear();
  }
  return out;
}

}  // namespace asynctls::kernels::testing
