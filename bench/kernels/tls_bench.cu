// Speed of one two-level sparse attention (TLS) decode step per layer on the GPU, against our
// dense paged decode kernel, Quest-style (block-only) and token-only selection at the same
// token budget, with the bytes each method must move and the HBM floor (4.3 TB/s) they imply.
//
// Configurations (bf16, one layer, every sequence at the same context):
//   gqa_g4   32 q / 8 KV heads, d 128, d_c 32: the paper's layout (32 query heads, group 4) and
//            Qwen3-8B's at once (they are the same layout, so it is run once);
//   gqa_g8   32 q / 4 KV heads, d 128, d_c 32 (group 8);
//   mla_hN   N in {16, 32, 64, 128} query heads over one latent KV head of 576 dims (V = first
//            512), d_c 128.
// GQA: batch 1, 2, 4, 8 x context 32K, 64K, 128K; MLA: batch 1, 2, 4, 8 x 32K, 128K; k_b 128,
// k_t in {512, 1024, 2048}; one sink block, 64-token window.
//
// Methods (each one CUDA graph per sample; the figure is the median over samples):
//   tls      index append of the new token (block + token index) -> TlsDecodeSelect (two-level,
//            one-step lag: token select over M_{t-1}, block score + top-k_b for M_t) ->
//            TlsSparseAttention; plus each stage graphed alone (append, block_score,
//            block_select, token_score, token_select, token_branch = the token score + top-k
//            as the step runs them, attention).
//   dense    PagedDecodeAttention (GQA). MLA has no dense paged kernel of 576 dims: its dense
//            row is TlsSparseAttention over every position (its tensor-core MLA kernels).
//   quest    block index append -> TlsDecodeSelect(kBlockOnly, k_t / 64 blocks) -> attention.
//   token    index append -> TlsDecodeSelect(kTokenOnly, k_t over every token) -> attention.
// L2: the KV pool and its indices are one pool of 65536 blocks (16 GiB of K+V for GQA); every
// launch inside a sample uses another random block table over it (32 tables), so consecutive
// launches touch different index rows and K/V rows and the working set is far beyond 60 MB.
//
//   tls_bench [--json FILE] [--samples N] [--quick] [--only gqa|mla|CONFIG] [--k-t N,N,...]
//             [--batches N,...] [--contexts N,...] [--profile-steps N (no timing: N eager
//             steps of TLS, Quest-style and token-only per row for ncu --profile-from-start off)]
//             [--trace-token N (no timing table: N token branches, then the MLA token kernel's
//             phase stamps, in a build with -DASYNCTLS_TOKEN_TRACE=ON)]
//             [--timeline N (no timing table: when each part of the TLS step ends, medians of N
//             eager steps)] [--block-index bf16|int8|both (the block index's form, tls_params.h;
//             int8 for TLS, Quest-style and their stages; both: each config with bf16, then
//             again with int8 as config+i8, in one process)] [--without-block-branch (analysis:
//             the TLS step without its block branch, config-nb; wrong for the next step, it
//             measures what the branch beside the token branch and attention costs)]
#include <cuda_bf16.h>
#include <cuda_profiler_api.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <iterator>
#include <map>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "asynctls/kernels/cuda_attention.h"
#include "asynctls/kernels/cuda_tls.h"
#include "graph_timing.cuh"
#include "kernels/test_util.h"

namespace {

using asynctls::kernels::DType;
using asynctls::kernels::kKvBlockSize;
using asynctls::kernels::PagedDecodeParams;
using asynctls::kernels::TlsDecodeSelectParams;
using asynctls::kernels::TlsIndexUpdateParams;
using asynctls::kernels::TlsLag;
using asynctls::kernels::TlsMode;
using asynctls::kernels::TlsPolicy;
using asynctls::kernels::TlsSparseAttentionParams;
using asynctls::kernels::testing::DeviceBuffer;
namespace cuda = asynctls::kernels::cuda;


constexpr double kHbmBytesPerS = 4.3e12;
constexpr int kPoolBlocks = 65536;  // KV pool blocks (and index rows) shared by every row
constexpr int kTables = 32;         // random block tables rotated over inside one sample
constexpr int kBlockBudget = 128;

// A method's policy at token budget k_t (the rest TlsPolicy's defaults).
TlsPolicy MethodPolicy(TlsMode mode, int k_t) {
  TlsPolicy pol;
  pol.mode = mode;
  pol.token_budget = k_t;
  return pol;
}

struct Config {
  std::string name, note;
  int q_heads, kv_heads, head_dim, v_dim, channels;
  bool mla;
};

__global__ void FillRandomBf16(__nv_bfloat16* p, size_t n, uint64_t seed) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n;
       i += size_t(gridDim.x) * blockDim.x) {
    uint64_t x = (i + 1) * 0x9E3779B97F4A7C15ull ^ seed;
    x ^= x >> 31;
    x *= 0xBF58476D1CE4E5B9ull;
    x ^= x >> 29;
    const float u = static_cast<float>(x >> 40) * (1.f / 16777216.f);  // [0, 1)
    p[i] = __float2bfloat16_rn(4.f * u - 2.f);
  }
}

__global__ void IotaRows(int32_t* p, int rows, int n) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < int64_t{rows} * n;
       i += int64_t{gridDim.x} * blockDim.x) {
    p[i] = static_cast<int32_t>(i % n);
  }
}

// Holds the stream for `ns` nanoseconds so that every launch queued behind it is submitted
// before the GPU reaches it (a timeline of eager launches without host gaps).
__global__ void SpinKernel(long long ns) {
  const long long until = clock64() + ns * 2;  // ~2 cycles per ns (the H200 runs near 2 GHz)
  while (clock64() < until) {
  }
}

void Fill(DeviceBuffer& buf, uint64_t seed) {
  FillRandomBf16<<<4096, 256>>>(buf.as<__nv_bfloat16>(), buf.bytes() / 2, seed);
  BENCH_CHECK(cudaGetLastError());
}

// Median ms per step of `launch(i, stream)`; a sample is one graph of `per_sample` steps
// (chosen so a sample lasts about 2 ms, at most kTables steps, at least 2).
template <typename Launch>
double TimeMs(Launch&& launch, int samples, cudaStream_t stream) {
  cudaEvent_t start, stop;
  BENCH_CHECK(cudaEventCreate(&start));
  BENCH_CHECK(cudaEventCreate(&stop));
  for (int i = 0; i < 2; ++i) BENCH_CHECK(launch(i, stream));  // warm-up: module load, caches
  BENCH_CHECK(cudaStreamSynchronize(stream));
  BENCH_CHECK(cudaEventRecord(start, stream));
  for (int i = 0; i < 2; ++i) BENCH_CHECK(launch(i, stream));  // eager estimate
  BENCH_CHECK(cudaEventRecord(stop, stream));
  BENCH_CHECK(cudaEventSynchronize(stop));
  float eager = 0;
  BENCH_CHECK(cudaEventElapsedTime(&eager, start, stop));
  const int per_sample =
      std::clamp(static_cast<int>(2.0 / std::max(1e-3, double{eager} / 2)), 2, kTables);
  cudaEventDestroy(start);
  cudaEventDestroy(stop);
  return asynctls::bench::MedianGraphMs(launch, per_sample, samples, stream);
}

// The pool of one configuration: K (and V) blocks, the block and token indices of every block.
struct Pool {
  DeviceBuffer k, v, kmax, kmin, channels, codes, scales;
  DeviceBuffer block_scales;  // the int8 block index's scales (empty: bf16 rows)
  const void* v_ptr() const { return v.get() ? v.get() : k.get(); }
  float* block_scales_or_null() const {
    return block_scales.get() ? block_scales.as<float>() : nullptr;
  }
};

void BuildPool(const Config& c, bool int8_block_index, Pool& pool, cudaStream_t stream) {
  const size_t row = size_t(c.kv_heads) * kKvBlockSize * c.head_dim * 2;  // bytes per block
  BENCH_CHECK(pool.k.Resize(kPoolBlocks * row));
  Fill(pool.k, 11);
  if (!c.mla) {
    BENCH_CHECK(pool.v.Resize(kPoolBlocks * row));
    Fill(pool.v, 12);
  }
  const size_t idx_row = size_t(c.kv_heads) * c.head_dim * (int8_block_index ? 1 : 2);
  BENCH_CHECK(pool.kmax.Resize(kPoolBlocks * idx_row));
  BENCH_CHECK(pool.kmin.Resize(kPoolBlocks * idx_row));
  if (int8_block_index) BENCH_CHECK(pool.block_scales.Resize(size_t(kPoolBlocks) * c.kv_heads * 4));
  BENCH_CHECK(pool.codes.Resize(size_t(kPoolBlocks) * c.kv_heads * kKvBlockSize * c.channels / 2));
  BENCH_CHECK(pool.scales.Resize(size_t(kPoolBlocks) * c.kv_heads * kKvBlockSize * 4));
  // Channel set: every (head_dim / channels)-th channel, rounded down to a multiple of 4.
  std::vector<int32_t> ch(size_t(c.kv_heads) * c.channels);
  const int stride = std::max(1, c.head_dim / c.channels);
  for (int g = 0; g < c.kv_heads; ++g) {
    for (int i = 0; i < c.channels; ++i) ch[size_t(g) * c.channels + i] = i * stride;
  }
  BENCH_CHECK(pool.channels.Upload(ch));
  // Index build: the pool as kPoolBlocks / 1024 sequences of 1024 blocks, identity tables.
  constexpr int kSeqBlocks = 1024;
  const int nseq = kPoolBlocks / kSeqBlocks;
  std::vector<int32_t> table(kPoolBlocks);
  std::iota(table.begin(), table.end(), 0);
  DeviceBuffer t, start, lens;
  BENCH_CHECK(t.Upload(table));
  BENCH_CHECK(start.Upload(std::vector<int32_t>(nseq, 0)));
  BENCH_CHECK(lens.Upload(std::vector<int32_t>(nseq, kSeqBlocks * kKvBlockSize)));
  TlsIndexUpdateParams p{};
  p.k_cache = pool.k.get();
  p.block_table = t.as<int32_t>();
  p.index_table = t.as<int32_t>();
  p.start_pos = start.as<int32_t>();
  p.seq_lens = lens.as<int32_t>();
  p.block_kmax = pool.kmax.get();
  p.block_kmin = pool.kmin.get();
  p.maybe_block_scales = pool.block_scales_or_null();
  p.channels = pool.channels.as<int32_t>();
  p.maybe_token_codes = pool.codes.as<uint8_t>();
  p.maybe_token_scales = pool.scales.as<float>();
  p.batch = nseq;
  p.num_kv_heads = c.kv_heads;
  p.head_dim = c.head_dim;
  p.num_channels = c.channels;
  p.max_blocks_per_seq = kSeqBlocks;
  p.max_new_tokens = kSeqBlocks * kKvBlockSize;
  BENCH_CHECK(cudaDeviceSynchronize());
  BENCH_CHECK(cuda::TlsIndexUpdate(p, stream));
  BENCH_CHECK(cudaStreamSynchronize(stream));
}

// Bytes one step must move from HBM (inputs read + outputs written; scratch included).
struct Bytes {
  double tls = 0, quest = 0, token = 0, dense = 0;
};

Bytes StepBytes(const Config& c, int batch, int context, int k_t, bool int8_block_index) {
  const double bkv = double(batch) * c.kv_heads;
  const double blocks = double(context) / kKvBlockSize;
  const double row_kv = c.mla ? c.head_dim * 2.0 : (c.head_dim + c.v_dim) * 2.0;  // K + V row
  const double block_index =  // kmax + kmin (+ the int8 form's scale)
      bkv * blocks * (int8_block_index ? c.head_dim * 2 + 4 : c.head_dim * 2 * 2);
  const double block_scores = bkv * blocks * 4 * 2;                // written, read back
  const double tok_row = c.channels / 2.0 + 4;                     // codes + scale
  const double q_out = double(batch) * c.q_heads * (c.head_dim + c.v_dim) * 2;
  const double append = bkv * (c.head_dim * 2 * 3 + tok_row);      // K row, index row r/w
  const double always = 2 * kKvBlockSize;                          // sink block + recent block
  const double attn = bkv * (k_t + always) * (row_kv + 4) + q_out;  // rows + positions
  const double kept_tokens = double(kBlockBudget) * kKvBlockSize;
  // token stage: token index of the kept blocks; GQA's one-launch score + select moves nothing
  // else; the MLA kernels write each per-head exp and read it back (2 x 4 bytes per candidate
  // and head, mostly in L2; before session 6's kernels the stored path moved 4 x 4)
  const int group = c.q_heads / c.kv_heads;
  const bool one_launch = group * c.channels <= 512;  // TlsTokenScoreSelect's GQA kernel
  const double token_stage = bkv * kept_tokens * (tok_row + (one_launch ? 0 : 8.0 * group));
  Bytes b;
  b.tls = append + block_index + block_scores + token_stage + attn;
  b.quest = append + block_index + block_scores + attn;
  b.token = append + bkv * context * (tok_row + 8 * 2) + attn;
  b.dense = bkv * context * row_kv + q_out;
  return b;
}

struct Row {
  std::string config;
  bool int8_block_index;
  int batch, context, k_t;
  double tls, tls_serial, dense, quest, token;
  std::map<std::string, double> stages;
  Bytes bytes;
};

// Per (configuration, batch, context): random tables, per-table lag state, all methods.
class Bench {
 public:
  Bench(const Config& c, const Pool& pool, int batch, int context, int samples,
        cudaStream_t stream)
      : c_(c), pool_(pool), batch_(batch), context_(context), samples_(samples), s_(stream) {
    pages_ = context / kKvBlockSize;
    std::mt19937 rng(static_cast<uint32_t>(batch * 1000003 + context));
    std::vector<int32_t> ids(kPoolBlocks);
    std::iota(ids.begin(), ids.end(), 0);
    tables_.resize(kTables);
    const size_t need = size_t(batch) * pages_;
    for (auto& t : tables_) {
      for (size_t i = 0; i < need; ++i) {  // partial Fisher-Yates: a fresh sample per table
        std::uniform_int_distribution<size_t> d(i, ids.size() - 1);
        std::swap(ids[i], ids[d(rng)]);
      }
      BENCH_CHECK(t.Upload(std::vector<int32_t>(ids.begin(), ids.begin() + need)));
    }
    BENCH_CHECK(lens_.Upload(std::vector<int32_t>(batch, context)));
    BENCH_CHECK(prev_lens_.Upload(std::vector<int32_t>(batch, context - 1)));
    BENCH_CHECK(start_.Upload(std::vector<int32_t>(batch, context - 1)));
    BENCH_CHECK(q_.Resize(size_t(batch) * c.q_heads * c.head_dim * 2));
    Fill(q_, 21);
    BENCH_CHECK(out_.Resize(size_t(batch) * c.q_heads * c.v_dim * 2));
    BENCH_CHECK(lse_.Resize(size_t(batch) * c.q_heads * 4));
    const size_t rows = size_t(batch) * c.kv_heads;
    blocks_.resize(kTables);
    num_blocks_.resize(kTables);
    next_blocks_.resize(kTables);
    next_num_blocks_.resize(kTables);
    for (int i = 0; i < kTables; ++i) {
      BENCH_CHECK(blocks_[i].Resize(rows * kBlockBudget * 4));
      BENCH_CHECK(num_blocks_[i].Resize(rows * 4));
      BENCH_CHECK(next_blocks_[i].Resize(rows * kBlockBudget * 4));
      BENCH_CHECK(next_num_blocks_[i].Resize(rows * 4));
    }
    const int cands = kKvBlockSize * kBlockBudget;
    Ensure(scores_, rows * pages_ * 4);
    Ensure(query_sums_, cuda::TlsBlockScoreWorkspaceBytes(ScoreParams(0)));
    Ensure(alpha_, rows * cands * 4);
    Ensure(cand_, rows * cands * 4);
    // The block branch (M_t for the next step) is off the critical path: lowest priority, so the
    // token branch and attention (on the high-priority main stream) get the SMs first.
    int least = 0;
    BENCH_CHECK(cudaDeviceGetStreamPriorityRange(&least, nullptr));
    BENCH_CHECK(cudaStreamCreateWithPriority(&s2_, cudaStreamNonBlocking, least));
    BENCH_CHECK(cudaStreamCreateWithPriority(&s3_, cudaStreamNonBlocking, least));
    BENCH_CHECK(cudaEventCreateWithFlags(&append_done_, cudaEventDisableTiming));
    BENCH_CHECK(cudaEventCreateWithFlags(&fork_, cudaEventDisableTiming));
    BENCH_CHECK(cudaEventCreateWithFlags(&join_, cudaEventDisableTiming));
    BENCH_CHECK(cudaDeviceSynchronize());
  }
  ~Bench() {
    cudaStreamSynchronize(s2_);
    cudaStreamSynchronize(s3_);
    cudaEventDestroy(fork_);
    cudaEventDestroy(join_);
    cudaEventDestroy(append_done_);
    cudaStreamDestroy(s2_);
    cudaStreamDestroy(s3_);
  }
  Bench(const Bench&) = delete;
  Bench& operator=(const Bench&) = delete;

  int32_t* Table(int i) const { return tables_[i % kTables].as<int32_t>(); }

  // --without-block-branch: TlsStep leaves out the block branch (an analysis of its cost).
  void set_block_branch(bool on) { block_branch_ = on; }

  TlsIndexUpdateParams Append(int i, bool token_index) const {
    TlsIndexUpdateParams p{};
    p.k_cache = pool_.k.get();
    p.block_table = Table(i);
    p.index_table = Table(i);
    p.start_pos = start_.as<int32_t>();
    p.seq_lens = lens_.as<int32_t>();
    p.block_kmax = const_cast<void*>(pool_.kmax.get());
    p.block_kmin = const_cast<void*>(pool_.kmin.get());
    p.maybe_block_scales = pool_.block_scales_or_null();
    p.channels = pool_.channels.as<int32_t>();
    p.maybe_token_codes = token_index ? pool_.codes.as<uint8_t>() : nullptr;
    p.maybe_token_scales = token_index ? pool_.scales.as<float>() : nullptr;
    p.batch = batch_;
    p.num_kv_heads = c_.kv_heads;
    p.head_dim = c_.head_dim;
    p.num_channels = c_.channels;
    p.max_blocks_per_seq = pages_;
    p.max_new_tokens = 1;
    return p;
  }

  TlsDecodeSelectParams Select(int i, const TlsPolicy& pol) {
    TlsDecodeSelectParams p{};
    p.policy = pol;
    p.q = q_.get();
    p.seq_lens = lens_.as<int32_t>();
    p.index_table = Table(i);
    p.block_kmax = pool_.kmax.get();
    p.block_kmin = pool_.kmin.get();
    p.maybe_block_scales = pool_.block_scales_or_null();
    p.channels = pool_.channels.as<int32_t>();
    p.token_codes = pool_.codes.as<uint8_t>();
    p.token_scales = pool_.scales.as<float>();
    p.prev_blocks = blocks_[i % kTables].as<int32_t>();
    p.prev_num_blocks = num_blocks_[i % kTables].as<int32_t>();
    p.prev_select_lens = prev_lens_.as<int32_t>();
    p.blocks = blocks_[i % kTables].as<int32_t>();  // M_t replaces M_{t-1} after its use
    p.num_blocks = num_blocks_[i % kTables].as<int32_t>();
    p.io_dtype = DType::kBF16;
    p.batch = batch_;
    p.num_q_heads = c_.q_heads;
    p.num_kv_heads = c_.kv_heads;
    p.head_dim = c_.head_dim;
    p.num_channels = c_.channels;
    p.max_blocks_per_seq = pages_;
    p.max_kept_blocks = kBlockBudget;
    p.max_positions = asynctls::kernels::TlsMaxSelectedTokens(pol, pages_);
    p.scale = 1.f / std::sqrt(float(c_.head_dim));
    Ensure(positions_, size_t(batch_) * c_.kv_heads * p.max_positions * 4);
    Ensure(num_positions_, size_t(batch_) * c_.kv_heads * 4);
    p.positions = positions_.as<int32_t>();
    p.num_positions = num_positions_.as<int32_t>();
    Ensure(select_ws_, cuda::TlsDecodeSelectWorkspaceBytes(p));
    p.workspace = select_ws_.get();
    return p;
  }

  TlsSparseAttentionParams Attention(int i, int max_positions) {
    TlsSparseAttentionParams p{};
    p.q = q_.get();
    p.k_cache = pool_.k.get();
    p.v_cache = pool_.v_ptr();
    p.block_table = Table(i);
    p.positions = positions_.as<int32_t>();
    p.num_positions = num_positions_.as<int32_t>();
    p.out = out_.get();
    p.maybe_lse = lse_.as<float>();
    p.io_dtype = DType::kBF16;
    p.batch = batch_;
    p.num_q_heads = c_.q_heads;
    p.num_kv_heads = c_.kv_heads;
    p.head_dim = c_.head_dim;
    p.v_head_dim = c_.v_dim;
    p.max_blocks_per_seq = pages_;
    p.max_positions = max_positions;
    p.scale = 1.f / std::sqrt(float(c_.head_dim));
    Ensure(attn_ws_, cuda::TlsSparseAttentionWorkspaceBytes(p));
    p.workspace = attn_ws_.get();
    return p;
  }

  // Whole step of a selection policy (Quest-style, token-only, TLS without the lag's overlap):
  // select, attend; the new token's index append beside them on a third stream. Nothing in the
  // step reads what the append writes (the new token's block is never a candidate at this
  // length), so each baseline gets its best schedule: serial, the append cost Quest-style's
  // steps 1-5 us (bench/results/tls-kernels-h200.md runs 142-143).
  cudaError_t Step(int i, const TlsPolicy& pol, cudaStream_t s) {
    cudaError_t err = cudaEventRecord(fork_, s);
    if (err == cudaSuccess) err = cudaStreamWaitEvent(s3_, fork_, 0);
    if (err == cudaSuccess) {
      err = cuda::TlsIndexUpdate(Append(i, pol.mode != TlsMode::kBlockOnly), s3_);
    }
    if (err == cudaSuccess) err = cudaEventRecord(append_done_, s3_);
    const TlsDecodeSelectParams sel = Select(i, pol);
    if (err == cudaSuccess) err = cuda::TlsDecodeSelect(sel, s);
    if (err == cudaSuccess) err = cuda::TlsSparseAttention(Attention(i, sel.max_positions), s);
    if (err == cudaSuccess) err = cudaStreamWaitEvent(s, append_done_, 0);
    return err;
  }

  // The two-level step with the one-step lag, as TlsDecodeSelect forks it: one graph, two
  // branches. (The runtime runs the index append on its main stream before the select,
  // CudaBackend::TlsIndexUpdate, and joins branch B at the next layer's first TLS call.)
  //   branch A (stream s):  token score over M_{t-1} -> token top-k_t -> sparse attention
  //   branch B (stream s2): index append of the new token -> block score -> block top-k_b (M_t)
  // Branch A does not read what branch B writes (M_{t-1} is a separate buffer; the new token is
  // in the recent window, never a candidate), so they overlap; the step ends when both do.
  // Branch A is captured first, so its token kernel's clusters take the SMs before branch B's
  // CTAs (B, on a low-priority stream, fills what is left; A is the step's critical path). The
  // append heads B on purpose: it holds the block score back until the token kernel has its SMs.
  // With the block score first, or the append on a third stream, the block score's CTAs took
  // SMs first and the 16-head MLA batch-8 128K step was 8-14 us slower (run 142).
  cudaError_t TlsStep(int i, int k_t, cudaStream_t s) {
    cudaError_t err = cudaEventRecord(fork_, s);
    if (err == cudaSuccess) err = cudaStreamWaitEvent(s2_, fork_, 0);
    if (err == cudaSuccess) err = TokenBranch(i, k_t, s);
    if (err == cudaSuccess && block_branch_) err = BlockBranch(i, s2_);
    if (err == cudaSuccess) err = cudaEventRecord(join_, s2_);
    if (err == cudaSuccess) {
      err = cuda::TlsSparseAttention(Attention(i, TokenSelectParams(k_t).max_positions), s);
    }
    if (err == cudaSuccess) err = cudaStreamWaitEvent(s, join_, 0);
    return err;
  }

  // Branch B: the new token's index append, then M_t (block score, block top-k_b).
  cudaError_t BlockBranch(int i, cudaStream_t s) {
    cudaError_t err = cuda::TlsIndexUpdate(Append(i, true), s);
    if (err == cudaSuccess) err = cuda::TlsBlockScore(ScoreParams(i), s);
    if (err != cudaSuccess) return err;
    asynctls::kernels::TlsBlockSelectParams sel = BlockSelectParams(i);
    sel.blocks = next_blocks_[i % kTables].as<int32_t>();
    sel.num_blocks = next_num_blocks_[i % kTables].as<int32_t>();
    return cuda::TlsBlockSelect(sel, s);
  }

  // Token score + token top-k_t over M_{t-1}: TlsTokenScoreSelect when the shape allows (as
  // TlsDecodeSelect does: GQA one launch, MLA one or two clusters per row or one per (row,
  // 16-head tile)), else the two ops.
  cudaError_t TokenBranch(int i, int k_t, cudaStream_t s) {
    const asynctls::kernels::TlsTokenScoreParams ts = TokenScoreParams(i);
    if (cuda::TlsTokenScoreSelectCanFuse(ts)) {
      return cuda::TlsTokenScoreSelect(ts, TokenSelectParams(k_t), s);
    }
    cudaError_t err = cuda::TlsTokenScore(ts, s);
    return err != cudaSuccess ? err : cuda::TlsTokenSelect(TokenSelectParams(k_t), s);
  }

  double Tls(int k_t) {
    return TimeMs([&](int i, cudaStream_t s) { return TlsStep(i, k_t, s); }, samples_, s_);
  }

  // M_{t-1} of every table (same-step two-level selection at length len - 1 is close enough:
  // any valid block list of k_b blocks costs the same).
  void InitLagState(int k_t) {
    TlsPolicy pol = MethodPolicy(TlsMode::kTwoLevel, k_t);
    pol.lag = TlsLag::kSameStep;
    for (int i = 0; i < kTables; ++i) BENCH_CHECK(cuda::TlsDecodeSelect(Select(i, pol), s_));
    BENCH_CHECK(cudaStreamSynchronize(s_));
  }

  double Dense() {
    if (!c_.mla) {
      PagedDecodeParams p{};
      p.q = q_.get();
      p.k_cache = pool_.k.get();
      p.v_cache = pool_.v_ptr();
      p.seq_lens = lens_.as<int32_t>();
      p.out = out_.get();
      p.maybe_lse = lse_.as<float>();
      p.io_dtype = DType::kBF16;
      p.batch = batch_;
      p.num_q_heads = c_.q_heads;
      p.num_kv_heads = c_.kv_heads;
      p.head_dim = c_.head_dim;
      p.max_blocks_per_seq = pages_;
      p.max_seq_len = context_;
      Ensure(attn_ws_, cuda::PagedDecodeWorkspaceBytes(p));
      p.workspace = attn_ws_.get();
      p.scale = 1.f / std::sqrt(float(c_.head_dim));
      return TimeMs(
          [&](int i, cudaStream_t s) {
            PagedDecodeParams pi = p;
            pi.block_table = Table(i);
            return cuda::PagedDecodeAttention(pi, s);
          },
          samples_, s_);
    }
    // MLA: every position through the sparse kernel.
    Ensure(positions_, size_t(batch_) * context_ * 4);
    IotaRows<<<1024, 256, 0, s_>>>(positions_.as<int32_t>(), batch_, context_);
    BENCH_CHECK(
        num_positions_.Upload(std::vector<int32_t>(size_t(batch_) * c_.kv_heads, context_), s_));
    BENCH_CHECK(cudaStreamSynchronize(s_));
    return TimeMs([&](int i, cudaStream_t s) {
      return cuda::TlsSparseAttention(Attention(i, context_), s);
    }, samples_, s_);
  }

  double Method(const TlsPolicy& pol) {
    return TimeMs([&](int i, cudaStream_t s) { return Step(i, pol, s); }, samples_, s_);
  }

  // --profile-steps: `steps` eager two-level steps, then as many Quest-style and token-only
  // steps, between cudaProfilerStart / Stop (for `ncu --profile-from-start off`: only these
  // kernels are profiled, not the set-up or the timing graphs).
  void Profile(int k_t, int steps) {
    InitLagState(k_t);
    const TlsPolicy quest = MethodPolicy(TlsMode::kBlockOnly, k_t);
    const TlsPolicy token = MethodPolicy(TlsMode::kTokenOnly, k_t);
    BENCH_CHECK(cudaProfilerStart());
    for (int i = 0; i < steps; ++i) BENCH_CHECK(TlsStep(i, k_t, s_));
    for (int i = 0; i < steps; ++i) BENCH_CHECK(Step(i, quest, s_));
    for (int i = 0; i < steps; ++i) BENCH_CHECK(Step(i, token, s_));
    BENCH_CHECK(cudaStreamSynchronize(s_));
    BENCH_CHECK(cudaProfilerStop());
  }

  // When each part of the TLS step ends (us after it starts, medians over `steps` eager steps,
  // each queued whole behind a spin kernel): the token branch and the attention on the main
  // stream, the append, block score and block top-k on the second.
  void Timeline(int k_t, int steps) {
    InitLagState(k_t);
    constexpr int kMarks = 6;  // start, token branch, attention, append, block score, top-k
    std::vector<cudaEvent_t> ev(kMarks);
    for (auto& e : ev) BENCH_CHECK(cudaEventCreate(&e));
    std::vector<std::vector<float>> at(kMarks);
    for (int i = 0; i < steps + 2; ++i) {  // the first two warm up
      SpinKernel<<<1, 1, 0, s_>>>(200000);
      BENCH_CHECK(cudaEventRecord(ev[0], s_));
      BENCH_CHECK(cudaStreamWaitEvent(s2_, ev[0], 0));
      BENCH_CHECK(TokenBranch(i, k_t, s_));
      BENCH_CHECK(cudaEventRecord(ev[1], s_));
      BENCH_CHECK(cuda::TlsIndexUpdate(Append(i, true), s2_));
      BENCH_CHECK(cudaEventRecord(ev[3], s2_));
      BENCH_CHECK(cuda::TlsBlockScore(ScoreParams(i), s2_));
      BENCH_CHECK(cudaEventRecord(ev[4], s2_));
      asynctls::kernels::TlsBlockSelectParams sel = BlockSelectParams(i);
      sel.blocks = next_blocks_[i % kTables].as<int32_t>();
      sel.num_blocks = next_num_blocks_[i % kTables].as<int32_t>();
      BENCH_CHECK(cuda::TlsBlockSelect(sel, s2_));
      BENCH_CHECK(cudaEventRecord(ev[5], s2_));
      BENCH_CHECK(cuda::TlsSparseAttention(Attention(i, TokenSelectParams(k_t).max_positions), s_));
      BENCH_CHECK(cudaEventRecord(ev[2], s_));
      BENCH_CHECK(cudaStreamWaitEvent(s_, ev[5], 0));
      BENCH_CHECK(cudaStreamSynchronize(s_));
      for (int m = 1; m < kMarks && i >= 2; ++m) {
        float ms = 0.f;
        BENCH_CHECK(cudaEventElapsedTime(&ms, ev[0], ev[m]));
        at[m].push_back(ms * 1000.f);
      }
    }
    auto median = [](std::vector<float> v) {
      std::sort(v.begin(), v.end());
      return v[v.size() / 2];
    };
    std::printf(
        "timeline %-8s %d %6d %5d | us: tbranch %.1f attn %.1f | append %.1f bscore %.1f "
        "bselect %.1f\n",
        c_.name.c_str(), batch_, context_, k_t, median(at[1]), median(at[2]), median(at[3]),
        median(at[4]), median(at[5]));
    for (auto& e : ev) cudaEventDestroy(e);
  }

  // --trace-token: `steps` eager token branches (each alone), then the last one's MLA token
  // kernel phase stamps (a build with ASYNCTLS_TOKEN_TRACE): per phase the mean, min and max
  // over the CTAs in us (each CTA's clock64 deltas at its own globaltimer rate), and when the
  // CTAs started and ended after the first one started.
  void TraceToken(int k_t, int steps) {
    InitLagState(k_t);
    std::vector<unsigned long long> t(size_t{cuda::kTokenTraceCtas} * cuda::kTokenTraceWords);
    for (int i = 0; i < steps - 1; ++i) BENCH_CHECK(TokenBranch(i, k_t, s_));
    BENCH_CHECK(cudaStreamSynchronize(s_));
    if (cuda::TlsTokenTraceRead(t.data()) != cudaSuccess) {  // clears the earlier steps' stamps
      std::printf("trace %s: no stamps (build with -DASYNCTLS_TOKEN_TRACE=ON)\n", c_.name.c_str());
      return;
    }
    BENCH_CHECK(TokenBranch(steps - 1, k_t, s_));
    BENCH_CHECK(cudaStreamSynchronize(s_));
    BENCH_CHECK(cuda::TlsTokenTraceRead(t.data()));
    // One name per TlsTokenTraceMark, in its order (*: thread 0's own time).
    static constexpr const char* kPhase[] = {
        "",      "list",    "staged*", "prevgrid", "queries",   "loop",  "cmax",
        "sums",  "weights", "alpha*",  "ticket",   "partials*", "hist0", "tot0",
        "bins0", "pass0",   "hist1",   "tot1",     "bins1",     "pass1", "hist2",
        "tot2",  "bins2",   "pass2",   "counts",   "write"};
    static_assert(std::size(kPhase) == cuda::kTokenTraceMarks, "a name per trace mark");
    struct Cta {
      const unsigned long long* row;  // kTokenTraceWords stamps
      double us_per_clock;            // its globaltimer span over its clock64 span
    };
    unsigned long long first = ~0ull, last = 0;
    std::vector<Cta> ctas;
    for (int c = 0; c < cuda::kTokenTraceCtas; ++c) {
      const unsigned long long* row = &t[static_cast<size_t>(c) * cuda::kTokenTraceWords];
      const unsigned long long* clock = row + 4;
      if (row[0] == 0 || clock[cuda::kTraceStart] == 0 || row[1] <= row[0]) continue;
      int end = cuda::kTokenTraceMarks - 1;
      while (clock[end] == 0) --end;
      ctas.push_back({row, double(row[1] - row[0]) * 1e-3 / double(clock[end] - clock[0])});
      first = std::min(first, row[0]);
      last = std::max(last, row[1]);
    }
    if (ctas.empty()) {
      std::printf("trace %s: no CTA stamped (not the MLA one-launch kernel)\n", c_.name.c_str());
      return;
    }
    std::printf(
        "trace %-8s %d %6d %5d | %zu CTAs, %.1f us first start to last end | us mean/min/max:",
        c_.name.c_str(), batch_, context_, k_t, ctas.size(), (last - first) * 1e-3);
    auto stats = [&](auto value) {  // value(cta) in us, < 0: none
      double sum = 0, lo = 1e30, hi = -1e30;
      int n = 0;
      for (const Cta& cta : ctas) {
        const double v = value(cta);
        if (v < 0) continue;
        sum += v, lo = std::min(lo, v), hi = std::max(hi, v), ++n;
      }
      if (n == 0) return std::string(" -");
      char buf[64];
      std::snprintf(buf, sizeof(buf), " %.2f/%.2f/%.2f", sum / n, lo, hi);
      return std::string(buf);
    };
    std::printf(" start%s", stats([&](const Cta& c) { return (c.row[0] - first) * 1e-3; }).c_str());
    for (int m = cuda::kTraceStart + 1; m < cuda::kTokenTraceMarks; ++m) {
      // From the last mark this CTA reached before m.
      std::printf(" %s%s", kPhase[m],
                  stats([&](const Cta& c) {
                    const unsigned long long* clock = c.row + 4;
                    int prev = m - 1;
                    while (prev > cuda::kTraceStart && clock[prev] == 0) --prev;
                    return clock[m] == 0 ? -1.0 : double(clock[m] - clock[prev]) * c.us_per_clock;
                  }).c_str());
    }
    std::printf(" end%s\n", stats([&](const Cta& c) { return (c.row[1] - first) * 1e-3; }).c_str());
  }

  // Stages of the two-level step, each graphed alone (scratch of our own, same shapes).
  void Stages(int k_t, bool with_fixed, std::map<std::string, double>* out) {
    if (with_fixed) {
      (*out)["append"] = TimeMs(
          [&](int i, cudaStream_t s) { return cuda::TlsIndexUpdate(Append(i, true), s); },
          samples_, s_);
      (*out)["block_score"] = TimeMs([&](int i, cudaStream_t s) {
        return cuda::TlsBlockScore(ScoreParams(i), s);
      }, samples_, s_);
      (*out)["block_select"] = TimeMs([&](int i, cudaStream_t s) {
        return cuda::TlsBlockSelect(BlockSelectParams(i), s);
      }, samples_, s_);
    }
    (*out)["token_score"] = TimeMs([&](int i, cudaStream_t s) {
      return cuda::TlsTokenScore(TokenScoreParams(i), s);
    }, samples_, s_);
    const asynctls::kernels::TlsTokenSelectParams sel = TokenSelectParams(k_t);
    const int max_positions = sel.max_positions;
    (*out)["token_select"] = TimeMs(
        [&](int, cudaStream_t s) { return cuda::TlsTokenSelect(sel, s); }, samples_, s_);
    // The token branch as the step runs it (one fused launch where the shape allows).
    (*out)["token_branch"] =
        TimeMs([&](int i, cudaStream_t s) { return TokenBranch(i, k_t, s); }, samples_, s_);
    (*out)["attention"] = TimeMs([&](int i, cudaStream_t s) {
      return cuda::TlsSparseAttention(Attention(i, max_positions), s);
    }, samples_, s_);
    // The same attention over Quest-style's positions (whole blocks) at this budget: the two
    // steps' attention differs only in which rows it gathers (tokens scattered over k_b blocks,
    // or k_t / 64 whole blocks).
    const TlsDecodeSelectParams quest_sel = Select(0, MethodPolicy(TlsMode::kBlockOnly, k_t));
    BENCH_CHECK(cuda::TlsDecodeSelect(quest_sel, s_));
    BENCH_CHECK(cudaStreamSynchronize(s_));
    (*out)["attention_quest"] = TimeMs([&](int i, cudaStream_t s) {
      return cuda::TlsSparseAttention(Attention(i, quest_sel.max_positions), s);
    }, samples_, s_);
  }

 private:
  static void Ensure(DeviceBuffer& b, size_t bytes) {
    bytes = std::max<size_t>(bytes, 256);
    if (b.bytes() < bytes) BENCH_CHECK(b.Resize(bytes));
  }

  // Token scores over M_{t-1} of table i (chosen at length len - 1).
  asynctls::kernels::TlsTokenScoreParams TokenScoreParams(int i) {
    asynctls::kernels::TlsTokenScoreParams ts{};
    ts.q = q_.get();
    ts.channels = pool_.channels.as<int32_t>();
    ts.token_codes = pool_.codes.as<uint8_t>();
    ts.token_scales = pool_.scales.as<float>();
    ts.index_table = Table(i);
    ts.seq_lens = lens_.as<int32_t>();
    ts.maybe_select_lens = prev_lens_.as<int32_t>();
    ts.maybe_blocks = blocks_[i % kTables].as<int32_t>();
    ts.maybe_num_blocks = num_blocks_[i % kTables].as<int32_t>();
    ts.alpha = alpha_.as<float>();
    ts.cand_positions = cand_.as<int32_t>();
    ts.io_dtype = DType::kBF16;
    ts.batch = batch_;
    ts.num_q_heads = c_.q_heads;
    ts.num_kv_heads = c_.kv_heads;
    ts.head_dim = c_.head_dim;
    ts.num_channels = c_.channels;
    ts.max_blocks_per_seq = pages_;
    ts.max_kept_blocks = kBlockBudget;
    ts.max_candidates = kKvBlockSize * kBlockBudget;
    ts.sink_blocks = 1;
    ts.window = 64;
    ts.scale = 1.f / std::sqrt(float(c_.head_dim));
    Ensure(stats_, cuda::TlsTokenScoreWorkspaceBytes(ts));
    ts.workspace = stats_.get();
    return ts;
  }

  asynctls::kernels::TlsTokenSelectParams TokenSelectParams(int k_t) {
    const int max_positions =
        asynctls::kernels::TlsMaxSelectedTokens(MethodPolicy(TlsMode::kTwoLevel, k_t), pages_);
    Ensure(positions_, size_t(batch_) * c_.kv_heads * max_positions * 4);
    Ensure(num_positions_, size_t(batch_) * c_.kv_heads * 4);
    return {alpha_.as<float>(),       cand_.as<int32_t>(),      lens_.as<int32_t>(),
            prev_lens_.as<int32_t>(), positions_.as<int32_t>(), num_positions_.as<int32_t>(),
            batch_,                   c_.kv_heads,              kKvBlockSize * kBlockBudget,
            max_positions,            k_t,                      1,
            64};
  }

  asynctls::kernels::TlsBlockScoreParams ScoreParams(int i) {
    return {q_.get(),
            pool_.kmax.get(),
            pool_.kmin.get(),
            Table(i),
            lens_.as<int32_t>(),
            scores_.as<float>(),
            DType::kBF16,
            batch_,
            c_.q_heads,
            c_.kv_heads,
            c_.head_dim,
            pages_,
            pool_.block_scales_or_null(),
            query_sums_.as<float>()};
  }
  asynctls::kernels::TlsBlockSelectParams BlockSelectParams(int i) {
    // Scores of the previous stage are in scores_ (any table's scores cost the same).
    return {scores_.as<float>(), lens_.as<int32_t>(), blocks_[i % kTables].as<int32_t>(),
            num_blocks_[i % kTables].as<int32_t>(), batch_, c_.kv_heads, pages_, kBlockBudget,
            kBlockBudget, 1};
  }

  const Config& c_;
  const Pool& pool_;
  int batch_, context_, samples_, pages_;
  cudaStream_t s_, s2_ = nullptr, s3_ = nullptr;  // s3_: Step's index append
  cudaEvent_t fork_ = nullptr, join_ = nullptr, append_done_ = nullptr;
  bool block_branch_ = true;
  std::vector<DeviceBuffer> tables_, blocks_, num_blocks_, next_blocks_, next_num_blocks_;
  DeviceBuffer lens_, prev_lens_, start_, q_, out_, lse_, positions_, num_positions_, select_ws_,
      attn_ws_, scores_, query_sums_, alpha_, cand_, stats_;
};

}  // namespace

int main(int argc, char** argv) {
  std::string json_path, only;
  int samples = 15;
  int profile_steps = 0;
  int timeline_steps = 0;
  int trace_steps = 0;
  std::vector<bool> block_forms = {false};  // int8 block index?
  bool block_branch = true;                 // --without-block-branch: false
  bool quick = false;
  std::vector<int> k_t_list, batch_list, context_list;
  // "N,N,..." into `out`; false on anything but positive integers.
  auto parse_list = [](const char* at, std::vector<int>* out) {
    while (*at != '\0') {
      char* end = nullptr;
      out->push_back(static_cast<int>(std::strtol(at, &end, 10)));
      if (out->back() <= 0 || (*end != ',' && *end != '\0')) return false;
      at = *end == ',' ? end + 1 : end;
    }
    return !out->empty();
  };
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--json" && i + 1 < argc) {
      json_path = argv[++i];
    } else if (a == "--samples" && i + 1 < argc) {
      samples = std::max(3, std::atoi(argv[++i]));
    } else if (a == "--profile-steps" && i + 1 < argc) {
      profile_steps = std::max(1, std::atoi(argv[++i]));
    } else if (a == "--timeline" && i + 1 < argc) {
      timeline_steps = std::max(1, std::atoi(argv[++i]));
    } else if (a == "--trace-token" && i + 1 < argc) {
      trace_steps = std::max(1, std::atoi(argv[++i]));
    } else if (a == "--quick") {
      quick = true;
    } else if (a == "--without-block-branch") {
      block_branch = false;
    } else if ((a == "--k-t" || a == "--batches" || a == "--contexts") && i + 1 < argc) {
      std::vector<int>* out = a == "--k-t" ? &k_t_list : a == "--batches" ? &batch_list : &context_list;
      if (!parse_list(argv[++i], out)) {
        std::fprintf(stderr, "%s: positive integers separated by commas\n", a.c_str());
        return 2;
      }
    } else if (a == "--only" && i + 1 < argc) {
      only = argv[++i];
    } else if (a == "--block-index" && i + 1 < argc &&
               (std::string(argv[i + 1]) == "bf16" || std::string(argv[i + 1]) == "int8" ||
                std::string(argv[i + 1]) == "both")) {
      const std::string form = argv[++i];
      block_forms = form == "both"   ? std::vector<bool>{false, true}
                    : form == "int8" ? std::vector<bool>{true}
                                     : std::vector<bool>{false};
    } else {
      std::fprintf(stderr,
                   "usage: %s [--json FILE] [--samples N] [--quick] [--only gqa|mla|CONFIG] "
                   "[--k-t N,N,...] [--batches N,...] [--contexts N,...] [--profile-steps N] "
                   "[--timeline N] [--trace-token N] [--block-index bf16|int8|both] "
                   "[--without-block-branch]\n",
                   argv[0]);
      return 2;
    }
  }
  int device = 0;
  cudaDeviceProp prop;
  BENCH_CHECK(cudaGetDevice(&device));
  BENCH_CHECK(cudaGetDeviceProperties(&prop, device));
  std::printf(
      "device: %s, %d SMs, L2 %d MB; bf16, %s block index, k_b %d, sink 1 block, "
      "window 64, HBM floor at %.1f TB/s\n",
      prop.name, prop.multiProcessorCount, prop.l2CacheSize >> 20,
      block_forms.size() > 1 ? "bf16 and int8 (+i8)"
      : block_forms[0]       ? "int8"
                             : "bf16",
      kBlockBudget, kHbmBytesPerS / 1e12);
  std::printf("note: the paper's GQA layout (32 q heads, G = 4, d 128) is Qwen3-8B's (32/8/128): "
              "row gqa_g4 is both; gqa_g8 (32/4/128) is the G = 8 variant.\n");
  cudaStream_t stream;
  int greatest_priority = 0;
  BENCH_CHECK(cudaDeviceGetStreamPriorityRange(nullptr, &greatest_priority));
  BENCH_CHECK(cudaStreamCreateWithPriority(&stream, cudaStreamNonBlocking, greatest_priority));

  std::vector<Config> configs = {{"gqa_g4", "paper G=4 = Qwen3-8B", 32, 8, 128, 128, 32, false},
                                 {"gqa_g8", "G=8", 32, 4, 128, 128, 32, false}};
  for (int h : {16, 32, 64, 128}) {
    configs.push_back({"mla_h" + std::to_string(h), "MLA 576/512", h, 1, 576, 512, 128, true});
  }
  // --only: a family (gqa, mla) or one config's name.
  configs.erase(std::remove_if(configs.begin(), configs.end(),
                               [&](const Config& c) {
                                 return !only.empty() && only != c.name &&
                                        only != (c.mla ? "mla" : "gqa");
                               }),
                configs.end());
  if (configs.empty()) {
    std::fprintf(stderr, "--only %s: no such config (gqa, mla, gqa_g4, gqa_g8, mla_h16..128)\n",
                 only.c_str());
    return 2;
  }
  const std::vector<int> k_ts = !k_t_list.empty() ? k_t_list
                                : quick           ? std::vector<int>{1024}
                                                  : std::vector<int>{512, 1024, 2048};
  std::vector<Row> rows;
  std::printf("\n%-11s %5s %7s %5s | %8s %8s %8s %8s %8s | %6s %6s | %8s %6s | %s\n", "config",
              "batch", "context", "k_t", "tls ms", "serial", "dense ms", "quest ms", "token ms",
              "xdense", "/quest", "tls MB", "xfloor",
              "stages ms: append bscore bselect tscore tselect tbranch attn qattn");
  for (const Config& c : configs)
    for (const bool int8_block_index : block_forms) {
      const std::string name =
          c.name + (int8_block_index ? "+i8" : "") + (block_branch ? "" : "-nb");
      Pool pool;
      BuildPool(c, int8_block_index, pool, stream);
      const std::vector<int> batches = !batch_list.empty() ? batch_list
                                       : quick             ? std::vector<int>{1, 8}
                                                           : std::vector<int>{1, 2, 4, 8};
      const std::vector<int> contexts = !context_list.empty() ? context_list
                                        : c.mla || quick      ? std::vector<int>{32768, 131072}
                                                         : std::vector<int>{32768, 65536, 131072};
      for (int b : batches) {
        for (int l : contexts) {
          Bench bench(c, pool, b, l, samples, stream);
          bench.set_block_branch(block_branch);
          if (profile_steps > 0) {
            for (const int k_t : k_ts) bench.Profile(k_t, profile_steps);
            continue;
          }
          if (timeline_steps > 0) {
            for (const int k_t : k_ts) bench.Timeline(k_t, timeline_steps);
            continue;
          }
          if (trace_steps > 0) {
            for (const int k_t : k_ts) bench.TraceToken(k_t, trace_steps);
            continue;
          }
          const double dense = bench.Dense();
          std::map<std::string, double> fixed;
          for (size_t ki = 0; ki < k_ts.size(); ++ki) {
            const int k_t = k_ts[ki];
            bench.InitLagState(k_t);
            Row r{c.name, int8_block_index,
                  b,      l,
                  k_t,    0,
                  0,      dense,
                  0,      0,
                  {},     StepBytes(c, b, l, k_t, int8_block_index)};
            r.tls = bench.Tls(k_t);
            r.tls_serial = bench.Method(MethodPolicy(TlsMode::kTwoLevel, k_t));
            r.quest = bench.Method(MethodPolicy(TlsMode::kBlockOnly, k_t));
            r.token = bench.Method(MethodPolicy(TlsMode::kTokenOnly, k_t));
            bench.InitLagState(k_t);
            bench.Stages(k_t, ki == 0, &r.stages);
            if (ki == 0) {
              fixed = r.stages;
            } else {
              for (const char* s : {"append", "block_score", "block_select"})
                r.stages[s] = fixed[s];
            }
            const double floor_ms = r.bytes.tls / kHbmBytesPerS * 1e3;
            std::printf(
                "%-11s %5d %7d %5d | %8.4f %8.4f %8.4f %8.4f %8.4f | %6.2f %6.2f | %8.2f %6.2f | "
                "%.4f %.4f %.4f %.4f %.4f %.4f %.4f %.4f\n",
                name.c_str(), b, l, k_t, r.tls, r.tls_serial, r.dense, r.quest, r.token,
                r.dense / r.tls, r.quest / r.tls, r.bytes.tls / 1e6, r.tls / floor_ms,
                r.stages["append"], r.stages["block_score"], r.stages["block_select"],
                r.stages["token_score"], r.stages["token_select"], r.stages["token_branch"],
                r.stages["attention"], r.stages["attention_quest"]);
            std::fflush(stdout);
            rows.push_back(r);
          }
        }
      }
    }
  BENCH_CHECK(cudaStreamDestroy(stream));
  std::printf(
      "\ntls = one graph, block branch (append, block score, top-k_b) on a second stream "
      "overlapping the token branch (token score, top-k_t, attention); serial = "
      "TlsDecodeSelect + TlsSparseAttention on one stream, the append beside them "
      "(as Quest-style and token-only).\n");
  std::printf("xdense = dense ms / tls ms; /quest = quest ms / tls ms (>= 0.8 is the target); "
              "xfloor = tls ms / (tls bytes at %.1f TB/s).\n", kHbmBytesPerS / 1e12);
  std::printf("MLA dense = TlsSparseAttention over every position (no 576-dim dense kernel).\n");

  if (!json_path.empty()) {
    FILE* f = std::fopen(json_path.c_str(), "w");
    if (!f) {
      std::perror(json_path.c_str());
      return 1;
    }
    std::fprintf(f,
                 "{\"device\": \"%s\", \"hbm_bytes_per_s\": %.3e, \"block_budget\": %d, "
                 "\"tls_block_branch\": %s, \"results\": [\n",
                 prop.name, kHbmBytesPerS, kBlockBudget, block_branch ? "true" : "false");
    for (size_t i = 0; i < rows.size(); ++i) {
      const Row& r = rows[i];
      const Config* c = nullptr;
      for (const Config& x : configs) {
        if (x.name == r.config) c = &x;
      }
      std::fprintf(
          f,
          "  {\"config\": \"%s\", \"block_index\": \"%s\", \"note\": \"%s\", "
          "\"q_heads\": %d, \"kv_heads\": %d, "
          "\"head_dim\": %d, \"mla\": %s, \"batch\": %d, \"context\": %d, \"k_t\": %d, "
          "\"tls_ms\": %.6f, \"tls_serial_ms\": %.6f, \"dense_ms\": %.6f, \"dense_impl\": \"%s\", "
          "\"quest_ms\": %.6f, \"token_only_ms\": %.6f, \"stages_ms\": {",
          r.config.c_str(), r.int8_block_index ? "int8" : "bf16", c->note.c_str(), c->q_heads,
          c->kv_heads, c->head_dim, c->mla ? "true" : "false", r.batch, r.context, r.k_t, r.tls,
          r.tls_serial, r.dense, c->mla ? "tls_sparse_attention_all_positions" : "paged_decode",
          r.quest, r.token);
      size_t n = 0;
      for (const auto& [k, v] : r.stages) {
        std::fprintf(f, "\"%s\": %.6f%s", k.c_str(), v, ++n < r.stages.size() ? ", " : "");
      }
      std::fprintf(f,
                   "}, \"bytes\": {\"tls\": %.0f, \"quest\": %.0f, \"token_only\": %.0f, "
                   "\"dense\": %.0f}, \"floor_ms\": {\"tls\": %.6f, \"quest\": %.6f, "
                   "\"token_only\": %.6f, \"dense\": %.6f}}%s\n",
                   r.bytes.tls, r.bytes.quest, r.bytes.token, r.bytes.dense,
                   r.bytes.tls / kHbmBytesPerS * 1e3, r.bytes.quest / kHbmBytesPerS * 1e3,
                   r.bytes.token / kHbmBytesPerS * 1e3, r.bytes.dense / kHbmBytesPerS * 1e3,
                   i + 1 < rows.size() ? "," : "");
    }
    std::fprintf(f, "]}\n");
    std::fclose(f);
  }
  return 0;
}
