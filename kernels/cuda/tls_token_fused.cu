// Token scoring and token top-k of the two-level path without staging alpha
// (TlsTokenScoreSelect).
//
// The separate ops (tls_select.cu) take three scoring passes joined by global atomics, a memset
// and a top-k kernel with one CTA per row: four dependent launches of a few microseconds each for
// ~100 KB of token index per row, so the token branch was latency-bound. Here a thread cluster of
// up to 8 CTAs (MLA: 16) owns one (sequence, KV head) row, 1-4 candidates per thread.
// The softmax shifts are chunk-local (tls_math.h): a chunk is 32 candidate slots, a quad's four
// 8-candidate IMMA tiles (GQA: one warp's item), so its max is known inside the warp and every
// logit's exp follows it at once; no pass over the row's logits precedes the exps. Per (chunk,
// head) the shift and the exps' fixed-point sum wait in a chunk table until the row's largest
// shift (one cluster exchange) scales the sums and then the alpha weights.
//   GQA (TokenScoreSelectKernel, one launch): each warp's candidates go through integer tensor
//   cores (MmaS8U8, the group's heads as A rows) and the exps stay in shared memory; the
//   per-head max shifts and exact fixed-point sums, the radix histograms and the compaction
//   counts cross the cluster through distributed shared memory.
//   MLA (MlaScoreSelectKernel, one launch after the query quantization): 16-128 heads x 64-128
//   channels are too many exps to keep in registers, so integer tensor cores compute the logits
//   of each chunk (twice where they come from mma.sync: max phase, exp phase; once from IGMMA)
//   from the CTA's staged INT4 rows, and the exps go through an L2-resident scratch to the
//   alpha sums (as bf16 head pairs, ScratchPairs). Where a cluster's exps fit beside its staged
//   rows (16-32 heads, 64 heads on 8 list entries per CTA, and the halves, thirds and quarters
//   that 64- and 128-head rows split into at small batches), shared memory holds the scaled dots
//   from a chunk's max phase to its exp phase (computed once) and then the exps; 128-head rows
//   on 8 list entries per CTA and 32-head rows on 16 keep bf16 head pairs there instead
//   (MlaExps). A split row's last cluster to finish adds the others' partial alpha chains and
//   runs the top-k. Wherever no row clusters fit one wave, MlaTileSelectKernel takes a cluster
//   per (row, 16-head tile) instead (its exps in shared memory), likewise combined by the row's
//   last cluster.
// The arithmetic is the separate ops' (tls_math.h order), so scores and the selected set equal
// theirs and the CPU reference's bit for bit.
#include <cooperative_groups.h>
#include <cuda_bf16.h>

#include <algorithm>
#include <atomic>

#include "asynctls/kernels/cuda_tls.h"
#include "paged_attention_common.cuh"
#include "tls_common.cuh"

namespace asynctls::kernels::cuda {
namespace {

namespace cg = cooperative_groups;
using attention_detail::FenceMbarInit;
using attention_detail::MbarArriveExpectTx;
using attention_detail::MbarInit;
using attention_detail::SmemAddr;
using tls_detail::AlphaFromExps;
using tls_detail::Bf16PairHi;
using tls_detail::Bf16PairLo;
using tls_detail::BlockExclusiveScan;
using tls_detail::EnsureDynamicSmem;
using tls_detail::ExpFixed;
using tls_detail::FenceSharedForGmma;
using tls_detail::FromOrderedBits;
using tls_detail::GmmaRowDots;
using tls_detail::GmmaRowsLo;
using tls_detail::GmmaRowsLoStep;
using tls_detail::kDotFloatBias;
using tls_detail::LetNextGridLaunch;
using tls_detail::LoadIo;
using tls_detail::LoadQueryFragments;
using tls_detail::MmaS8U8;
using tls_detail::NumSms;
using tls_detail::QuantizeHeadWarp;
using tls_detail::QueryFragmentSlice;
using tls_detail::WaitForPreviousGrid;
using tls_detail::WarpInclusiveSum;

constexpr int kFusedThreads = 1024;              // threads per CTA (one CTA per SM at 64 registers)
constexpr int kFusedWarps = kFusedThreads / 32;  // <= 32: one warp scans per-warp counts
// Portable cluster size: rows of up to 8 * 1024 candidates. (512-thread CTAs in clusters of 16
// measured no faster at batch 1 and 1.5x slower at batch 8 on the H200.)
constexpr int kFusedMaxCluster = 8;
// The MLA one-launch kernel spreads a row over up to 16 CTAs (a non-portable cluster size, which
// Hopper allows): the cluster helpers below unroll over this many ranks.
constexpr int kClusterMaxRanks = 16;
constexpr int kFusedMaxGroup = 16;  // GQA kernel: the group's queries and statistics in smem

constexpr int kFusedMaxWork = 512;  // largest group * num_channels fused (see CanFuse)

// The cluster top-k's radix digits: 11, 11 and 10 bits (bits [21, 32), [10, 21), [0, 10)), three
// passes instead of four 8-bit ones: every pass costs a cluster barrier and a histogram of the
// row's candidates. The ranks' 2,048 bins are never summed whole: one warp sums the 32 group
// totals over the ranks, then the 64 bins of the group that holds the k-th key (fewer remote
// loads than the 256 bins of an 8-bit pass).
constexpr int kClusterSelectBins = 2048;
static_assert(kClusterSelectBins == 2 * kFusedThreads && kFusedWarps * 64 == kClusterSelectBins,
              "a thread zeroes two bins, a warp totals one 64-bin group");
__device__ __forceinline__ int ClusterSelectShift(int pass) {
  return pass == 0 ? 21 : pass == 1 ? 10 : 0;
}
__device__ __forceinline__ uint32_t ClusterSelectDigitMask(int pass) {
  return pass == 2 ? 1023u : 2047u;
}

// Phase marks of MlaScoreSelectKernel (builds with ASYNCTLS_TOKEN_TRACE only, for tls_bench
// --trace-token; TlsTokenTraceMark): thread 0 of each CTA stamps clock64 at each mark,
// globaltimer and the SM at the first and last (TlsTokenTraceRead). A mark that thread 0 reaches
// alone (staged, alpha, partials) is its own time, not the CTA's. ClusterSelect's marks also
// stamp the GQA and head-tile kernels' rows, which no kTraceStart marks as read.
#if defined(ASYNCTLS_TOKEN_TRACE)
__device__ unsigned long long g_token_trace[kTokenTraceCtas][kTokenTraceWords];
__device__ __forceinline__ void TraceMark(int mark) {
  if (threadIdx.x != 0) return;
  const int cta = blockIdx.x + gridDim.x * blockIdx.y;
  if (cta >= kTokenTraceCtas) return;
  unsigned long long* row = g_token_trace[cta];
  if (mark == kTraceStart) {
    unsigned long long ns;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(ns));
    uint32_t sm;
    asm volatile("mov.u32 %0, %%smid;" : "=r"(sm));
    row[0] = ns;
    row[2] = sm;
    for (int m = kTraceStart + 1; m < kTokenTraceMarks; ++m) row[4 + m] = 0ull;
  }
  if (mark == kTraceAlpha || mark == kTraceEnd) {  // (kTraceAlpha: a split row's early return)
    unsigned long long ns;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(ns));
    row[1] = ns;
  }
  row[4 + mark] = clock64();
}
#else
__device__ __forceinline__ void TraceMark(int) {}
#endif

// Cluster mailboxes. ClusterSelect's exchanges between the ranks (and ClusterStats' softmax
// statistics) go through them instead of release cluster barriers: on sm_90 a release at cluster
// scope (cluster.sync(), a remote arrive, a cluster fence) compiles to MEMBAR.ALL.GPU, which waits
// until every earlier memory operation of the warp, pushes to the peers included, is
// acknowledged GPU-wide (13% of the 16-head MLA token kernel's stall samples, ncu run 120). A
// mailbox is an mbarrier in each rank's shared memory that expects a known number of arrivals
// and bytes; the peers write its buffer with st.async / red.async, whose bytes complete on that
// mbarrier with release semantics, and the owner waits on its own mbarrier. Each mailbox serves
// one exchange per launch (no phases to track). A buffer that several exchanges share is refilled
// only by peers that already got this rank's next exchange, which it sends after its last read
// of the buffer.
constexpr int kMailTotals = 0;  // + pass
constexpr int kMailBins = 3;    // + pass
constexpr int kMailCounts = 6;
constexpr int kSelectMailboxes = 7;

// The address of this CTA's shared `addr` in rank `rank`'s shared memory.
__device__ __forceinline__ uint32_t PeerAddr(uint32_t addr, int rank) {
  uint32_t out;
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;\n" : "=r"(out) : "r"(addr), "r"(rank));
  return out;
}
// mbarrier `bar` for one phase of `arrivals` arrivals and `bytes` pushed bytes (this thread's
// arrival expects them; the others come through MailArrive). Pushes go to the other ranks only
// (st.async needs a cluster of two or more CTAs): each rank writes its own share locally, and
// the writer's MailArrive releases it to this CTA's waiters. After the inits, FenceMbarInit and
// a cluster barrier order them before any peer's push.
__device__ __forceinline__ void MailInit(uint64_t* bar, int arrivals, uint32_t bytes) {
  MbarInit(SmemAddr(bar), arrivals);
  MbarArriveExpectTx(SmemAddr(bar), bytes);
}
// One more arrival on this CTA's `bar` (releasing this thread's earlier writes to the CTA),
// expecting `bytes` more (the tx-count may already be below zero: peers' bytes can land first;
// the phase completes when both counts reach zero).
__device__ __forceinline__ void MailArrive(uint64_t* bar, uint32_t bytes) {
  MbarArriveExpectTx(SmemAddr(bar), bytes);
}
// Waits until this CTA's mailbox `bar` has all its arrivals and bytes (MbarWait's loop, but
// acquiring at cluster scope: the peers' complete-tx releases at cluster scope).
__device__ __forceinline__ void MailWait(uint64_t* bar) {
  asm volatile(
      "{\n"
      ".reg .pred done;\n"
      "MAIL_WAIT_LOOP:\n"
      "mbarrier.try_wait.parity.acquire.cluster.shared::cta.b64 done, [%0], 0;\n"
      "@!done bra MAIL_WAIT_LOOP;\n"
      "}\n" ::"r"(SmemAddr(bar))
      : "memory");
}
// Writes `v` at this CTA's `field` offset into rank `rank`'s shared memory (another rank),
// counted on rank `rank`'s mailbox at this CTA's `bar` offset.
__device__ __forceinline__ void MailPush(uint32_t* field, uint32_t v, uint64_t* bar, int rank) {
  asm volatile("st.async.shared::cluster.mbarrier::complete_tx::bytes.b32 [%0], %1, [%2];\n" ::"r"(
                   PeerAddr(SmemAddr(field), rank)),
               "r"(v), "r"(PeerAddr(SmemAddr(bar), rank))
               : "memory");
}
__device__ __forceinline__ void MailPush(int* field, int v, uint64_t* bar, int rank) {
  MailPush(reinterpret_cast<uint32_t*>(field), static_cast<uint32_t>(v), bar, rank);
}
__device__ __forceinline__ void MailPush(uint64_t* field, uint64_t v, uint64_t* bar, int rank) {
  asm volatile("st.async.shared::cluster.mbarrier::complete_tx::bytes.b64 [%0], %1, [%2];\n" ::"r"(
                   PeerAddr(SmemAddr(field), rank)),
               "l"(v), "r"(PeerAddr(SmemAddr(bar), rank))
               : "memory");
}
__device__ __forceinline__ void MailPush4(int* field, int4 v, uint64_t* bar, int rank) {
  asm volatile(
      "st.async.shared::cluster.mbarrier::complete_tx::bytes.v4.b32 [%0], {%1, %2, %3, %4}, "
      "[%5];\n" ::"r"(PeerAddr(SmemAddr(field), rank)),
      "r"(v.x), "r"(v.y), "r"(v.z), "r"(v.w), "r"(PeerAddr(SmemAddr(bar), rank))
      : "memory");
}
// This rank's 32-word `row` (written to its own shared memory before) to the same place in every
// other rank's, counted on their mailbox `bar`: by one warp, 8 16-byte pushes per peer. (A push
// per word, 32 per peer, made each exchange of a 16-CTA cluster ~0.3 us slower: H100, run 175.)
__device__ __forceinline__ void PushRowToPeers(int* row, uint64_t* bar, int rank, int size) {
  for (int i = threadIdx.x & 31; i < 8 * size; i += 32) {
    const int r = i / 8, q = i % 8;
    if (r != rank) MailPush4(row + 4 * q, *reinterpret_cast<const int4*>(row + 4 * q), bar, r);
  }
}
__device__ __forceinline__ void MailPush2(int* field, int v0, int v1, uint64_t* bar, int rank) {
  asm volatile(
      "st.async.shared::cluster.mbarrier::complete_tx::bytes.v2.b32 [%0], {%1, %2}, [%3];\n" ::"r"(
          PeerAddr(SmemAddr(field), rank)),
      "r"(v0), "r"(v1), "r"(PeerAddr(SmemAddr(bar), rank))
      : "memory");
}

// The max of `v` and rank `rank`'s copy of this CTA's shared `field`, counted on its mailbox `bar`.
__device__ __forceinline__ void MailMax(uint32_t* field, uint32_t v, uint64_t* bar, int rank) {
  asm volatile(
      "red.async.relaxed.cluster.shared::cluster.mbarrier::complete_tx::bytes.max.u32 [%0], %1, "
      "[%2];\n" ::"r"(PeerAddr(SmemAddr(field), rank)),
      "r"(v), "r"(PeerAddr(SmemAddr(bar), rank))
      : "memory");
}
// A cluster barrier in two halves: the arrive (with or without releasing this thread's earlier
// writes: the release costs a GPU-scope MEMBAR) and the wait (acquire). Every thread of the CTA
// takes part, each warp as one.
__device__ __forceinline__ void ClusterArrive(bool release) {
  if (release) {
    asm volatile("barrier.cluster.arrive.release.aligned;\n" ::: "memory");
  } else {
    asm volatile("barrier.cluster.arrive.relaxed.aligned;\n" ::: "memory");
  }
}
__device__ __forceinline__ void ClusterWait() {
  asm volatile("barrier.cluster.wait.aligned;\n" ::: "memory");
}

// Which of a row's clusters (`clusters` of them, each `size` CTAs) finished last, so that it
// combines the others' partial results (the MLA head tiles and halves). Each CTA, its partials
// stored, takes a ticket from the row's counter with an acq_rel atomic at GPU scope (after a CTA
// barrier, so it releases the whole CTA's stores), and the ranks swap tickets through a mailbox.
// The cluster holding the row's last ticket acquired every other CTA's release, and passes it on
// to its peers with its push (a cluster-scope release), and each CTA to its threads with a
// barrier. This replaces __threadfence and three cluster barriers (each a GPU-scope MEMBAR on
// sm_90). Init: by one thread before the kernel's first cluster barrier and a FenceMbarInit.
struct RowTickets {
  int ticket[kClusterMaxRanks];
  alignas(8) uint64_t mail;
  int last;

  __device__ __forceinline__ void Init(int size) {
    MailInit(&mail, 2, (size - 1) * sizeof(int));  // this rank's own arrival, the peers' bytes
  }
  // Every thread of the CTA calls it once its partials are stored; true in the last cluster.
  // The others may exit at once: every push to them has landed.
  __device__ __forceinline__ bool IsLastCluster(int* counter, int clusters, int rank, int size) {
    __syncthreads();
    if (threadIdx.x == 0) {
      int t;
      asm volatile("atom.acq_rel.gpu.global.add.u32 %0, [%1], 1;\n"
                   : "=r"(t)
                   : "l"(counter)
                   : "memory");
      ticket[rank] = t;
      for (int r = 0; r < size; ++r) {
        if (r != rank) MailPush(&ticket[rank], t, &mail, r);
      }
      MailArrive(&mail, 0);
      MailWait(&mail);
      bool found = false;
      for (int r = 0; r < size; ++r) found |= ticket[r] == clusters * size - 1;
      last = found ? 1 : 0;
    }
    __syncthreads();
    return last != 0;
  }
};

// Adds `v` to rank `rank`'s copy of this CTA's shared `field`, counted on its mailbox `bar`.
__device__ __forceinline__ void MailAdd(unsigned long long* field, unsigned long long v,
                                        uint64_t* bar, int rank) {
  asm volatile(
      "red.async.relaxed.cluster.shared::cluster.mbarrier::complete_tx::bytes.add.u64 [%0], %1, "
      "[%2];\n" ::"r"(PeerAddr(SmemAddr(field), rank)),
      "l"(v), "r"(PeerAddr(SmemAddr(bar), rank))
      : "memory");
}
__device__ __forceinline__ void MailAdd(int* field, int v, uint64_t* bar, int rank) {
  asm volatile(
      "red.async.relaxed.cluster.shared::cluster.mbarrier::complete_tx::bytes.add.u32 [%0], %1, "
      "[%2];\n" ::"r"(PeerAddr(SmemAddr(field), rank)),
      "r"(static_cast<uint32_t>(v)), "r"(PeerAddr(SmemAddr(bar), rank))
      : "memory");
}

// The cluster-wide softmax statistics of a fused token kernel's row (or head tile): per head
// the max scaled dot (ordered bits) and the fixed-point exp sum, and the valid candidates. Every
// rank adds its own share to every rank's copy (MailMax / MailAdd, its own copy by a local
// atomic: the peers' adds to the same word may come at any time) instead of the ranks reading
// each other's after a release cluster barrier.
template <int MAX_HEADS>
struct ClusterStats {
  uint32_t max[MAX_HEADS];
  unsigned long long exp_sum[MAX_HEADS];
  int valid;
  alignas(8) uint64_t max_mail;  // the peers' maxima
  alignas(8) uint64_t sum_mail;  // the peers' exp sums and valid counts

  // By one warp (`lane`), before its release arrive at the kernel's first cluster barrier; the
  // caller's InitSelectMail (same thread as lane 0, after this) fences the mbarrier inits.
  __device__ __forceinline__ void Init(int heads, int size, int lane) {
    for (int h = lane; h < heads; h += 32) {
      max[h] = 0u;
      exp_sum[h] = 0ull;
    }
    if (lane == 0) {
      valid = 0;
      MailInit(&max_mail, 1, (size - 1) * heads * sizeof(uint32_t));
      MailInit(&sum_mail, 1, (size - 1) * (heads * sizeof(unsigned long long) + sizeof(int)));
    }
  }
  // The cluster's max of head h from this CTA's `own`, by one thread per head, after the
  // first cluster barrier's wait.
  __device__ __forceinline__ uint32_t Max(int h, uint32_t own, int rank, int size) {
    atomicMax(&max[h], own);
    for (int r = 0; r < size; ++r) {
      if (r != rank) MailMax(&max[h], own, &max_mail, r);
    }
    MailWait(&max_mail);
    return max[h];
  }
  // The cluster's exp sum of head h (one thread per head), and its valid candidates (one
  // thread): both complete sum_mail.
  __device__ __forceinline__ unsigned long long ExpSum(int h, unsigned long long own, int rank,
                                                       int size) {
    atomicAdd(&exp_sum[h], own);
    for (int r = 0; r < size; ++r) {
      if (r != rank) MailAdd(&exp_sum[h], own, &sum_mail, r);
    }
    MailWait(&sum_mail);
    return exp_sum[h];
  }
  __device__ __forceinline__ int Valid(int own, int rank, int size) {
    atomicAdd(&valid, own);
    for (int r = 0; r < size; ++r) {
      if (r != rank) MailAdd(&valid, own, &sum_mail, r);
    }
    MailWait(&sum_mail);
    return valid;
  }
};

// Shared memory of ClusterSelect and the per-warp valid counts before it (every fused kernel).
template <int ITEMS>
struct ClusterSelectShared {
  int part_valid[kFusedWarps];                 // per-warp valid candidates
  int hist[2][kClusterSelectBins];             // radix pass p: this CTA's hist[p & 1]
  // Pushed by the peers into mailboxes (see "Cluster mailboxes" above): the current pass's
  // 64-bin group totals of rank r (warp w: group w), then its 64 bins of the group that holds
  // the k-th key (lane l's bins 64 g + 63 - 2 l and one below as the low / high 16 bits: a CTA
  // holds at most 8,192 candidates), and each rank's above / equal counts of the compaction.
  // One buffer serves every pass: a peer fills it for pass p + 1 only after this rank's own
  // exchange of pass p + 1, which follows its last read of pass p. After the last pass the
  // totals' rows hold the bin's keys when the passes end on a small bin (GatheredBin).
  alignas(16) int peer_group_sum[kClusterMaxRanks][kFusedWarps];
  alignas(16) uint32_t peer_bins[kClusterMaxRanks][32];
  alignas(8) int peer_counts[kClusterMaxRanks][2];
  // The mailboxes' mbarriers: every rank's group totals of pass p (kMailTotals + p), its bins
  // of pass p (kMailBins + p), its compaction counts and gathered bin keys (kMailCounts).
  alignas(8) uint64_t mail[kSelectMailboxes];
  int counts[1];  // this CTA's valid candidates
  int num_valid;  // cluster-wide valid candidates
  int scan[kFusedWarps + 1];
  // Per (item, warp) entry in candidate order: counts, then exclusive prefixes within the CTA.
  int entry_above[ITEMS][kFusedWarps];
  int entry_equal[ITEMS][kFusedWarps];
  uint32_t prefix;
  int remaining;
  int done;
  int bin;       // cluster-wide keys in the chosen digit's bin
  int gathered;  // this CTA's bin keys pushed so far (GatheredBin)
};

// The GQA kernel's: the group's queries and per-head statistics besides.
template <int ITEMS>
struct FusedShared : ClusterSelectShared<ITEMS> {
  float q[kFusedMaxGroup * kTlsMaxChannels];          // the group's query codes
  int qoffset[kFusedMaxGroup];                        // 8 * the sum of each head's codes
  float qscale[kFusedMaxGroup];                       // their scales (TlsInt8Scale)
  uint32_t max_bits[kFusedMaxGroup];  // this CTA's per-head max chunk shift (ordered bits)
  float c_max[kFusedMaxGroup];        // the row's per-head max chunk shift
  // Per chunk (item u of warp w: 32 slots) and head: its shift c (-inf: no candidate), and its
  // fixed-point exp sum (ExpFixed, at most 32 x 2^23), which alpha's weight later replaces
  // (float bits, TlsChunkWeight).
  float chunk_c[ITEMS][kFusedWarps][kFusedMaxGroup];
  uint32_t chunk_sum[ITEMS][kFusedWarps][kFusedMaxGroup];
  ClusterStats<kFusedMaxGroup> cluster;
};

// *at += v on a shared 64-bit word, as two 32-bit atomic adds (the low word's carry into the
// high one): sm_90 has no 64-bit shared atomic add, and atomicAdd's compare-and-swap loop retries
// under contention. The word is whole once every adder is past a barrier.
__device__ __forceinline__ void AddToSharedU64(unsigned long long* at, unsigned long long v) {
  unsigned int* word = reinterpret_cast<unsigned int*>(at);  // little-endian: low word first
  const unsigned int lo = static_cast<unsigned int>(v);
  unsigned int hi = static_cast<unsigned int>(v >> 32);
  if (lo != 0u) hi += (atomicAdd(word, lo) + lo < lo) ? 1u : 0u;  // wrapped: a carry
  if (hi != 0u) atomicAdd(word + 1, hi);
}

// 64-bit sum over the warp's lanes.
__device__ __forceinline__ unsigned long long WarpSum64(unsigned long long v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Candidate position of slot j of a listed block (block < 0: none), or -1 where the block's
// candidates end (TlsBlockCandBegin / End: the open block and the recent window are not
// candidates).
__device__ __forceinline__ int32_t ListedPosition(const TlsGeometry& geo, int32_t block, int j) {
  if (block < 0) return -1;
  const int32_t cpos = block * kKvBlockSize + j % kKvBlockSize;
  return cpos >= TlsBlockCandBegin(geo, block) && cpos < TlsBlockCandEnd(geo, block) ? cpos : -1;
}

// Each rank owns `span` consecutive candidates of row bg (at most ITEMS * kFusedThreads): item u
// of thread t is candidate j = rank * span + u * kFusedThreads + t when u * kFusedThreads + t <
// span. Gives its position (-1: none) and its token-index row.
template <int ITEMS>
__device__ __forceinline__ void CandidatePositions(const TlsTokenScoreParams& p,
                                                   const TlsGeometry& geo, int bg, int rank,
                                                   int span, int32_t* pos, int64_t* tok) {
  const int b = bg / p.num_kv_heads, g = bg % p.num_kv_heads;
  const int num_listed =
      p.maybe_blocks ? p.maybe_num_blocks[bg] : max(0, geo.first_recent_block - p.sink_blocks);
#pragma unroll
  for (int u = 0; u < ITEMS; ++u) {
    const int local = u * kFusedThreads + static_cast<int>(threadIdx.x);
    const int j = rank * span + local;
    pos[u] = -1;
    tok[u] = 0;
    if (local < span && j < num_listed * kKvBlockSize) {
      const int i = j / kKvBlockSize;
      const int32_t block =
          p.maybe_blocks ? p.maybe_blocks[int64_t{bg} * p.max_kept_blocks + i] : p.sink_blocks + i;
      const int32_t cpos = ListedPosition(geo, block, j);
      if (cpos >= 0) {
        pos[u] = cpos;
        const int64_t row = p.index_table[int64_t{b} * p.max_blocks_per_seq + block];
        tok[u] = (row * p.num_kv_heads + g) * kKvBlockSize + cpos % kKvBlockSize;
      }
    }
  }
}

// A radix pass whose chosen bin holds at most this many keys of the row ends the passes: each
// rank pushes its keys of that bin to every rank with the compaction counts, and the ranks rank
// the few keys exactly there (GatheredBin). That saves the third pass, a cluster barrier and a
// distributed histogram, in most rows (random alphas of 8,192 candidates leave 1-11 keys in
// the bin after two 11-bit passes; a third pass ran in 20-80% of rows).
constexpr int kSelectGatherMax = 16;

// Rank r's pushed bin keys, TlsSelectKey(alpha, position) = (key << 32) | ~position, in its
// group-total row (the peers push them after this rank's last pass's exchanges, which follow its
// last read of the totals): kFusedWarps ints per rank, room for kSelectGatherMax keys.
template <int ITEMS>
__device__ __forceinline__ uint64_t* GatheredBin(ClusterSelectShared<ITEMS>& sh, int r) {
  static_assert(kFusedWarps * sizeof(int) >= kSelectGatherMax * sizeof(uint64_t),
                "a rank's bin keys fit its group-sum row");
  static_assert(kSelectGatherMax <= 32, "the ranking takes one gathered key per lane");
  return reinterpret_cast<uint64_t*>(sh.peer_group_sum[r]);
}

// The mailboxes of ClusterSelect in a cluster of `size` ranks, by one thread before the kernel's
// first cluster barrier (which orders the initialization before every peer's first push).
template <int ITEMS>
__device__ __forceinline__ void InitSelectMail(ClusterSelectShared<ITEMS>& sh, int size) {
  const int peers = size - 1;
  for (int pass = 0; pass < 3; ++pass) {
    // Its own totals and bins are written before a CTA or warp barrier (no arrival).
    MailInit(&sh.mail[kMailTotals + pass], 1, peers * kFusedWarps * sizeof(int));
    MailInit(&sh.mail[kMailBins + pass], 1, peers * 32 * sizeof(uint32_t));
  }
  // The peers' counts; then two arrivals: the peers' gathered bin keys (known once the passes
  // end) and this CTA's own counts.
  MailInit(&sh.mail[kMailCounts], 3, peers * 2 * sizeof(int));
  FenceMbarInit();
}

// One cluster radix pass's decision, by the 32 lanes of one warp of each rank (all ranks decide
// the same): the digit (descending) of the `remaining`-th largest key, found through the 32
// group totals summed over the ranks (their pass's mailbox), then the ranks' bins of the one
// group it falls in (each rank pushes those 64 to every rank: a second mailbox). Writes the
// extended prefix, the rank left inside that digit, whether the digit's keys are all kept (no
// later pass needed), and how many keys the digit holds, into sh.
template <int ITEMS>
__device__ __forceinline__ void FindClusterSelectDigit(ClusterSelectShared<ITEMS>& sh, int pass,
                                                       int rank, int size, uint32_t prefix,
                                                       int shift, int remaining) {
  const int lane = threadIdx.x & 31;
  const int* hist = sh.hist[pass & 1];
  MailWait(&sh.mail[kMailTotals + pass]);
  TraceMark(kTraceTotals0 + 4 * pass);
  int g_count = 0;  // lane l: group 31 - l
#pragma unroll
  for (int r = 0; r < kClusterMaxRanks; ++r) {
    g_count += r < size ? sh.peer_group_sum[r][31 - lane] : 0;
  }
  const int g_incl = WarpInclusiveSum(g_count);
  const unsigned hit =
      __ballot_sync(0xffffffffu, g_incl - g_count < remaining && remaining <= g_incl);
  const int g_lane = __ffs(hit) - 1;  // exactly one lane: remaining <= the total
  const int group = 31 - g_lane;
  const int group_above = __shfl_sync(0xffffffffu, g_incl - g_count, g_lane);
  const int hi = 64 * group + 63 - 2 * lane;  // lane l: digits hi and hi - 1
  // This rank's two bins of the group to every rank, then the ranks' sums.
  const uint32_t pair = static_cast<uint32_t>(hist[hi]) | static_cast<uint32_t>(hist[hi - 1]) << 16;
  sh.peer_bins[rank][lane] = pair;
  __syncwarp();  // this rank's own bins, written by this warp's lanes
  PushRowToPeers(reinterpret_cast<int*>(sh.peer_bins[rank]), &sh.mail[kMailBins + pass], rank,
                 size);
  MailWait(&sh.mail[kMailBins + pass]);
  TraceMark(kTraceBins0 + 4 * pass);
  int c0 = 0, c1 = 0;
#pragma unroll
  for (int r = 0; r < kClusterMaxRanks; ++r) {
    const uint32_t v = r < size ? sh.peer_bins[r][lane] : 0u;
    c0 += static_cast<int>(v & 0xffffu);
    c1 += static_cast<int>(v >> 16);
  }
  const int incl = WarpInclusiveSum(c0 + c1);
  const int above = group_above + incl - (c0 + c1);
  if (above < remaining && remaining <= above + c0 + c1) {
    const bool first = remaining <= above + c0;
    const int digit = first ? hi : hi - 1;
    const int left = first ? remaining - above : remaining - above - c0;
    sh.prefix = prefix | (static_cast<uint32_t>(digit) << shift);
    sh.remaining = left;
    sh.done = left == (first ? c0 : c1) ? 1 : 0;
    sh.bin = first ? c0 : c1;
  }
}

// The cluster's top-k of one row from each thread's ITEMS keys (pos < 0: no candidate) and the
// row's valid count, as BlockTopK with histograms summed over the ranks; writes the row's
// positions (sink, kept in position order, recent) and their count. Past its last cluster
// barrier (before the positions are written) no rank touches another's shared memory, so each
// CTA may exit when done; callers must not read a peer's shared memory after it.
// (`rank` of `size`: the cluster's ranks, or rank 0 of 1 where one CTA selects, GatherThenSelect.)
template <int ITEMS>
__device__ __forceinline__ void ClusterSelect(int rank, int size, ClusterSelectShared<ITEMS>& sh,
                                              const int32_t* pos, const uint32_t* key,
                                              int num_valid, const TlsTokenSelectParams& sel,
                                              const TlsGeometry& geo, int bg) {
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  // Cluster-wide radix select of the k-th key (as BlockTopK, histograms summed over the ranks).
  const int k = sel.k;
  const bool take_all = num_valid <= k;
  uint32_t threshold = 0, mask = 0;
  int need_equal = 0;
  bool gather = false;  // the passes ended on a small bin: its keys are gathered
  if (!take_all && k > 0) {
    uint32_t prefix = 0;
    int remaining = k;
    if (tid == 0) sh.gathered = 0;  // read after the pass's barriers
    for (int pass = 0; pass < 3; ++pass) {
      const int shift = ClusterSelectShift(pass);
      const uint32_t digit_mask = ClusterSelectDigitMask(pass);
      int* hist = sh.hist[pass & 1];
#pragma unroll
      for (int u = 0; u < ITEMS; ++u) {
        const uint32_t digit = pos[u] >= 0 && (key[u] & mask) == prefix
                                   ? (key[u] >> shift) & digit_mask
                                   : uint32_t{kClusterSelectBins};
        // One shared atomic per key: over 2,048 bins a warp's keys rarely share one, and
        // aggregating them with __match_any_sync first measured ~1 us slower per row (H200).
        if (digit != kClusterSelectBins) atomicAdd(&hist[digit], 1);
      }
      __syncthreads();  // this CTA's histogram is complete
      TraceMark(kTraceHist0 + 4 * pass);
      {  // warp w: this CTA's total of group w (bins 64 w .. 64 w + 63)
        const int c = hist[64 * warp + lane] + hist[64 * warp + 32 + lane];
        const int total = __reduce_add_sync(0xffffffffu, c);
        if (lane == 0) sh.peer_group_sum[rank][warp] = total;
      }
      __syncthreads();
      if (warp == 0) {  // the totals to every rank, then the decision
        PushRowToPeers(sh.peer_group_sum[rank], &sh.mail[kMailTotals + pass], rank, size);
        FindClusterSelectDigit(sh, pass, rank, size, prefix, shift, remaining);
      } else {  // the next pass's bins (only this CTA reads its histograms)
        int* next = sh.hist[(pass + 1) & 1];
        for (int i = tid - 32; i < kClusterSelectBins; i += kFusedThreads - 32) next[i] = 0;
      }
      __syncthreads();
      TraceMark(kTracePass0 + 4 * pass);
      prefix = sh.prefix;
      remaining = sh.remaining;
      mask |= digit_mask << shift;
      if (sh.done) break;
      if (pass < 2 && sh.bin <= kSelectGatherMax) {  // the compaction ranks the bin's keys
        gather = true;
        break;
      }
    }
    threshold = prefix;
    need_equal = remaining;
  }

  // The sparse attention after this kernel may launch now (it waits for the positions below).
  LetNextGridLaunch();
  // Ordered compaction. Items above the threshold are kept; of the items equal to it (the
  // chosen bin), the first need_equal in candidate order when the passes resolved every bit
  // (equal keys), else (gather) the need_equal best of the gathered bin by key, then
  // position. A kept item's slot = (items above the threshold before it) + (kept bin items
  // before it): prefixes over ranks, then (item, warp) entries, then lanes.
  bool above[ITEMS], equal[ITEMS];
  unsigned above_bits[ITEMS], equal_bits[ITEMS];
#pragma unroll
  for (int u = 0; u < ITEMS; ++u) {
    const bool valid = pos[u] >= 0 && k > 0;
    above[u] = valid && (take_all || (key[u] & mask) > threshold);
    equal[u] = valid && !take_all && (key[u] & mask) == threshold;
    above_bits[u] = __ballot_sync(0xffffffffu, above[u]);
    equal_bits[u] = __ballot_sync(0xffffffffu, equal[u]);
    if (lane == 0) {
      sh.entry_above[u][warp] = __popc(above_bits[u]);
      sh.entry_equal[u][warp] = __popc(equal_bits[u]);
    }
    if (gather && equal[u]) {  // to every rank (at most kSelectGatherMax in the row)
      const int i = atomicAdd(&sh.gathered, 1);
      const uint64_t item = uint64_t{key[u]} << 32 | (0xffffffffu - static_cast<uint32_t>(pos[u]));
      GatheredBin(sh, rank)[i] = item;
      for (int r = 0; r < size; ++r) {
        if (r != rank) MailPush(GatheredBin(sh, rank) + i, item, &sh.mail[kMailCounts], r);
      }
    }
  }
  __syncthreads();  // this CTA's gathered keys (sh.gathered of them)
  // The counts' mailbox's arrival for the peers' gathered keys: the bin's (sh.bin) but these.
  if (tid == 0) {
    MailArrive(&sh.mail[kMailCounts], gather ? (sh.bin - sh.gathered) * sizeof(uint64_t) : 0u);
  }
  if (warp == 0) {  // exclusive prefixes over the entries in (item, warp) order, CTA totals
    int above_carry = 0, equal_carry = 0;
    for (int u = 0; u < ITEMS; ++u) {
      const bool entry = lane < kFusedWarps;
      const int a = entry ? sh.entry_above[u][lane] : 0;
      const int e = entry ? sh.entry_equal[u][lane] : 0;
      const int ai = WarpInclusiveSum(a), ei = WarpInclusiveSum(e);
      if (entry) {
        sh.entry_above[u][lane] = above_carry + ai - a;
        sh.entry_equal[u][lane] = equal_carry + ei - e;
      }
      above_carry += __shfl_sync(0xffffffffu, ai, 31);
      equal_carry += __shfl_sync(0xffffffffu, ei, 31);
    }
    if (lane == rank) {  // this CTA's counts to every rank (its own locally)
      sh.peer_counts[rank][0] = above_carry;
      sh.peer_counts[rank][1] = equal_carry;
      MailArrive(&sh.mail[kMailCounts], 0);
    } else if (lane < size) {
      MailPush2(sh.peer_counts[rank], above_carry, equal_carry, &sh.mail[kMailCounts], lane);
    }
  }
  MailWait(&sh.mail[kMailCounts]);
  TraceMark(kTraceCounts);
  // Every warp: the ranks' counts (pushed above) summed over the ranks before this one and all.
  const int peer_above = lane < size ? sh.peer_counts[lane][0] : 0;
  const int peer_equal = lane < size ? sh.peer_counts[lane][1] : 0;
  const int rank_above_before = __reduce_add_sync(0xffffffffu, lane < rank ? peer_above : 0);
  const int rank_equal_before = __reduce_add_sync(0xffffffffu, lane < rank ? peer_equal : 0);
  const int kept = __reduce_add_sync(0xffffffffu, peer_above) +
                   min(static_cast<int>(__reduce_add_sync(0xffffffffu, peer_equal)), need_equal);
  // Gathered bin: lane i < bin_size holds the bin's i-th item (ranks in turn; TlsSelectKey's
  // form, larger = better) and whether it is kept (fewer than need_equal items above it).
  int bin_size = 0;
  uint64_t bin_item = 0;
  bool bin_kept = false;
  if (gather) {
    bin_size = __reduce_add_sync(0xffffffffu, peer_equal);
    int first = 0;
    for (int r = 0; r < size; ++r) {
      const int n = sh.peer_counts[r][1];
      if (lane >= first && lane < first + n) bin_item = GatheredBin(sh, r)[lane - first];
      first += n;
    }
    int ahead = 0;
    for (int i = 0; i < bin_size; ++i) {
      ahead += __shfl_sync(0xffffffffu, bin_item, i) > bin_item ? 1 : 0;
    }
    bin_kept = lane < bin_size && ahead < need_equal;
  }
  const unsigned bin_kept_bits = __ballot_sync(0xffffffffu, bin_kept);
  int32_t* row = sel.positions + int64_t{bg} * sel.max_positions;
  const unsigned lane_lt = (1u << lane) - 1u;
#pragma unroll
  for (int u = 0; u < ITEMS; ++u) {
    const int above_before =
        rank_above_before + sh.entry_above[u][warp] + __popc(above_bits[u] & lane_lt);
    if (!gather) {
      const int equal_before =
          rank_equal_before + sh.entry_equal[u][warp] + __popc(equal_bits[u] & lane_lt);
      if (above[u] || (equal[u] && equal_before < need_equal)) {
        row[geo.sink_end + above_before + min(equal_before, need_equal)] = pos[u];
      }
    } else {  // the kept bin items at lower positions; this one's own among them when kept
      int kept_before = 0;
      bool kept_here = above[u];
      for (unsigned m = bin_kept_bits; m != 0u; m &= m - 1u) {  // warp-uniform
        const uint64_t item = __shfl_sync(0xffffffffu, bin_item, __ffs(m) - 1);
        const int32_t at = static_cast<int32_t>(0xffffffffu - static_cast<uint32_t>(item));
        kept_before += at < pos[u] ? 1 : 0;
        kept_here = kept_here || (equal[u] && at == pos[u]);
      }
      if (kept_here) row[geo.sink_end + above_before + kept_before] = pos[u];
    }
  }
  if (rank == 0) {
    for (int i = tid; i < geo.sink_end; i += kFusedThreads) row[i] = i;
    const int recent_base = geo.sink_end + kept;
    for (int i = tid; i < geo.len - geo.recent_start; i += kFusedThreads) {
      row[recent_base + i] = geo.recent_start + i;
    }
    if (tid == 0) sel.num_positions[bg] = geo.sink_end + kept + (geo.len - geo.recent_start);
  }
  // No closing cluster barrier: past the last one no rank reads or writes another's shared
  // memory (the counts were pushed before it), so every CTA may exit as soon as it is done.
}

template <int ITEMS>
__device__ __forceinline__ void ClusterSelect(cg::cluster_group& cluster,
                                              ClusterSelectShared<ITEMS>& sh, const int32_t* pos,
                                              const uint32_t* key, int num_valid,
                                              const TlsTokenSelectParams& sel,
                                              const TlsGeometry& geo, int bg) {
  ClusterSelect<ITEMS>(static_cast<int>(cluster.block_rank()),
                       static_cast<int>(cluster.num_blocks()), sh, pos, key, num_valid, sel, geo,
                       bg);
}

// ---- The row's top-k on one CTA (ASYNCTLS_LOCAL_TOPK16, an experiment) ---------------------
// ClusterSelect waits on five cluster exchanges of ~0.5 us each (H100, run 175). Instead every
// rank pushes its candidates' items (TlsSelectKey's form: (key << 32) | ~position, 0 for none)
// into rank 0, whose staged rows are dead once it has finished its chunk loop (which each peer
// knows from the softmax maxima it waited for), and exits; rank 0 selects alone, as a cluster
// of one. Candidate order is kept: item j = rank * span + slot, read back by thread
// j % kFusedThreads as its item j / kFusedThreads. The token kernel alone is 3-6 us slower this
// way at 16-128 heads (H100, run 182: one SM's top-k is latency-bound), but the peers leave their
// SMs early, and at 16 heads the block branch beside the token kernel holds SMs that the
// attention waits for (run 129): the 16-head 128K batch-8 k_t 2048 step was 3.1 us shorter
// (run 182). Over all 36 16-head rows (run 183) that is the only gain: batch 8 at 128K, 3.1-3.4
// us, against 1.9-4.8 us lost in the 33 others (18 of them under 0.8x Quest-style). Hence an
// option, off: choosing it per step would need the token launch to know the block branch's size.
#if defined(ASYNCTLS_LOCAL_TOPK16)
constexpr bool kLocalTopK16 = true;
#else
constexpr bool kLocalTopK16 = false;
#endif
constexpr int kLocalItems = kFusedMaxCluster;  // a row's candidates: at most 8 per thread
constexpr int kLocalSlots = kLocalItems * kFusedThreads;

// Dynamic shared memory rank 0 needs from its staged rows on: the items, then the select's.
constexpr size_t kLocalTopKBytes =
    size_t(kLocalSlots) * sizeof(uint64_t) + sizeof(ClusterSelectShared<kLocalItems>);

// Whether a cluster of `size` CTAs on a row of GROUP heads selects on rank 0 (16 heads, under
// the option): staged rows of NC bytes per slot must hold size items of 8 bytes each.
template <int NC, int GROUP>
__device__ __forceinline__ bool UseLocalTopK(int size) {
  return kLocalTopK16 && GROUP == 16 && size > 1 && 8 * size <= NC;
}

// The candidates the gathered items cover: the cluster's slots, of which only the first
// kLocalSlots can hold a candidate (a row lists at most max_candidates / 64 entries).
__device__ __forceinline__ int LocalTopKSlots(int size, int span) {
  return min(size * span, kLocalSlots);
}

// Rank 0's mailbox for the items (one of ClusterSelect's, which the cluster does not use then):
// every peer's slots, 8 bytes each. By one thread before a FenceMbarInit and the kernel's first
// cluster barrier.
__device__ __forceinline__ void InitLocalTopKMail(uint64_t* mail, int size, int span) {
  const int n = LocalTopKSlots(size, span);
  MailInit(mail, 1, static_cast<uint32_t>(n - min(span, n)) * sizeof(uint64_t));
}

// Every rank: its items to rank 0's `items` (its staged rows' space); then rank 0 selects.
template <int ITEMS>
__device__ __forceinline__ void GatherThenSelect(int rank, int size, int span, uint64_t* items,
                                                 uint64_t* mail, const int32_t* pos,
                                                 const uint32_t* key, int num_valid,
                                                 const TlsTokenSelectParams& sel,
                                                 const TlsGeometry& geo, int bg) {
  const int n = LocalTopKSlots(size, span);
  const int tid = threadIdx.x;
#pragma unroll
  for (int u = 0; u < ITEMS; ++u) {
    const int slot = u * kFusedThreads + tid, j = rank * span + slot;
    if (slot >= span || j >= n) continue;
    const uint64_t item =
        pos[u] >= 0 ? uint64_t{key[u]} << 32 | (0xffffffffu - static_cast<uint32_t>(pos[u])) : 0u;
    if (rank == 0) {
      items[j] = item;
    } else {
      MailPush(items + j, item, mail, 0);
    }
  }
  if (rank != 0) return;
  __syncthreads();  // this CTA's own items
  MailWait(mail);   // the peers'
  int32_t local_pos[kLocalItems];
  uint32_t local_key[kLocalItems];
#pragma unroll
  for (int i = 0; i < kLocalItems; ++i) {
    const int j = i * kFusedThreads + tid;
    const uint64_t item = j < n ? items[j] : 0u;
    local_key[i] = static_cast<uint32_t>(item >> 32);
    local_pos[i] =
        item != 0u ? static_cast<int32_t>(0xffffffffu - static_cast<uint32_t>(item)) : -1;
  }
  // The select's shared memory after the items (this CTA's exps and chunk table, which it lies
  // over, were read by its alpha pass before).
  auto& lsh = *reinterpret_cast<ClusterSelectShared<kLocalItems>*>(items + (n + 1) / 2 * 2);
  for (int i = tid; i < kClusterSelectBins; i += kFusedThreads) lsh.hist[0][i] = 0;
  if (tid == 0) InitSelectMail(lsh, 1);
  __syncthreads();
  ClusterSelect<kLocalItems>(0, 1, lsh, local_pos, local_key, num_valid, sel, geo, bg);
}

// A warp's candidates of one item, staged for the tensor-core dots (GqaTileFragments): per lane
// (candidate) its INT4 words, each 32-channel slice's four in the order 0 2 1 3 (so that an IMMA
// lane's two B words of a slice, words x and x + 2, are adjacent: one 8-byte load), then the 32
// token scales. Words per warp:
template <int NC>
__host__ __device__ constexpr int GqaStageWords() {
  return 32 * (NC / 8) + 32;
}

// The IMMA B fragments of 8-candidate tile `tile` and slice `sl` from a warp's staged words (the
// MmaS8U8 layout: lane (r, t) takes candidate 8 tile + r, words 4 sl + t / 2 and + 2, nibble
// half t % 2; 16 channels: word t / 2, the upper k half zero).
template <int NC>
__device__ __forceinline__ void GqaTileFragments(const uint32_t* stage, int tile, int sl, int lane,
                                                 uint32_t& b0, uint32_t& b1) {
  const int r = lane >> 2, t = lane & 3, shift = 4 * (t & 1);
  const uint32_t* row = stage + (8 * tile + r) * (NC / 8);
  if constexpr (NC == 16) {
    b0 = (row[t >> 1] >> shift) & 0x0f0f0f0fu;
    b1 = 0u;
  } else {
    const uint2 w = *reinterpret_cast<const uint2*>(row + 4 * sl + 2 * (t >> 1));
    b0 = (w.x >> shift) & 0x0f0f0f0fu;
    b1 = (w.y >> shift) & 0x0f0f0f0fu;
  }
}

// Floats per (head, item) row of the GQA kernel's exps: 8 of padding spread a quad's float2
// stores to a tile's eight heads over the banks (2-way instead of 8-way conflicts).
constexpr int kLgRow = kFusedThreads + 8;

// MAXG: the group size rounded up to 4, 8 or 16 (the per-head arrays, lg's head stride).
// ITEMS: candidates per thread; item u of thread t is candidate (rank * ITEMS + u) *
// kFusedThreads + t, so candidate order is (rank, item, thread) order, which is position order.
template <int NC, int MAXG, int ITEMS>
__global__ void __launch_bounds__(kFusedThreads, 1)
    TokenScoreSelectKernel(TlsTokenScoreParams p, TlsTokenSelectParams sel) {
  __shared__ FusedShared<ITEMS> sh;
  // Item u's exp for head hh at lg[(hh * ITEMS + u) * kLgRow + tid]: shared memory instead of
  // registers, so up to 4 items x 8 heads per thread fit without spilling. Then each warp's
  // staging of its candidates for the dots (GqaStageWords).
  extern __shared__ __align__(16) float lg[];
  cg::cluster_group cluster = cg::this_cluster();
  const int rank = static_cast<int>(cluster.block_rank());
  const int size = static_cast<int>(cluster.num_blocks());
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int bg = blockIdx.y;
  const int b = bg / p.num_kv_heads, g = bg % p.num_kv_heads;
  const int group = p.num_q_heads / p.num_kv_heads;
  const int32_t select_len = p.maybe_select_lens ? p.maybe_select_lens[b] : p.seq_lens[b];
  const TlsGeometry geo = MakeTlsGeometry(p.seq_lens[b], select_len, p.sink_blocks, p.window);

  if (tid < kFusedMaxGroup) sh.max_bits[tid] = 0u;
  for (int i = tid; i < kClusterSelectBins; i += kFusedThreads) sh.hist[0][i] = 0;
  // Warp 0 zeroes the cluster-wide statistics and sets up the mailboxes; its release arrive at
  // the cluster barrier (once the candidates' loads are issued) orders that before any peer's
  // first push, which comes after the barrier's wait (after the scaled dots).
  if (warp == 0) {
    sh.cluster.Init(group, size, lane);
    if (lane == 0) InitSelectMail(sh, size);
  }

  int32_t pos[ITEMS];
  int64_t tok[ITEMS];
  CandidatePositions<ITEMS>(p, geo, bg, rank, ITEMS * kFusedThreads, pos, tok);
  ClusterArrive(warp == 0);
  // The query codes (a warp per head) after the candidates' two dependent loads (block list,
  // index table) are issued.
  if (warp < group) {
    const int sum = QuantizeHeadWarp<NC>(p, b, g, warp, sh.q + warp * NC, &sh.qscale[warp]);
    if (lane == 0) sh.qoffset[warp] = 8 * sum;
  }
  __syncthreads();

  // Per item the warp's 32 candidates, one 32-slot chunk (tls_math.h), go through integer
  // tensor cores: four 8-candidate tiles of an m16n8k32 IMMA per 32-channel slice (MmaS8U8; A =
  // the group's query codes, rows past the group zero), so a candidate's nibbles are split once
  // for all its heads (with dp4a the nibbles and the head's packed query were reloaded per head:
  // ~35 instructions per candidate and head at 8 heads, H200 run 169). Lane (r, t) gets heads r
  // and r + 8 of candidates 2 t, 2 t + 1 of each tile, so a quad holds the chunk's candidates of
  // its heads: their max, the chunk's shift and the exps follow in registers, and the exps go to
  // lg. A candidate that is none has scale NaN: its scaled dots are NaN, which the max skips, and
  // its exps 2^-126, which no fixed-point sum sees and alpha never reads.
  constexpr int kSlices = NC >= 32 ? NC / 32 : 1;
  constexpr int kRowHalves = MAXG > 8 ? 2 : 1;  // C rows r + 8 hold heads only in groups of 16
  uint32_t a[kSlices][4];
#pragma unroll
  for (int sl = 0; sl < kSlices; ++sl) QueryFragmentSlice<NC>(sh.q, sl, lane, a[sl], group);
  const int r = lane >> 2, t = lane & 3;
  const float exp_scale = p.scale * kTlsLog2E;
  int qoff[kRowHalves];
  float ascale[kRowHalves];
#pragma unroll
  for (int h = 0; h < kRowHalves; ++h) {
    const bool head = r + 8 * h < group;
    qoff[h] = head ? sh.qoffset[r + 8 * h] : 0;
    ascale[h] = head ? TlsMul(sh.qscale[r + 8 * h], exp_scale) : 0.f;
  }
  uint32_t* const stage =
      reinterpret_cast<uint32_t*>(lg + MAXG * ITEMS * kLgRow) + warp * GqaStageWords<NC>();
  const float* const stage_scales = reinterpret_cast<const float*>(stage + 32 * (NC / 8));
  int valid_warp = 0;
#pragma unroll
  for (int u = 0; u < ITEMS; ++u) {
    valid_warp += __popc(__ballot_sync(0xffffffffu, pos[u] >= 0));
    uint32_t words[NC / 8];
#pragma unroll
    for (int w = 0; w < NC / 8; ++w) words[w] = 0u;
    float tok_scale = __int_as_float(0x7fc00000);  // NaN: no candidate
    if (pos[u] >= 0) {
      if (NC == 16) {
        const uint2 v = __ldg(reinterpret_cast<const uint2*>(p.token_codes + tok[u] * (NC / 2)));
        words[0] = v.x;
        words[1] = v.y;
      } else {
        const uint4* src = reinterpret_cast<const uint4*>(p.token_codes + tok[u] * (NC / 2));
#pragma unroll
        for (int w = 0; w < NC / 32; ++w) {
          const uint4 v = __ldg(src + w);
          words[4 * w] = v.x;
          words[4 * w + 1] = v.y;
          words[4 * w + 2] = v.z;
          words[4 * w + 3] = v.w;
        }
      }
      tok_scale = __ldg(p.token_scales + tok[u]);
    }
    if (u > 0) __syncwarp();  // the previous item's fragment loads are done
    if constexpr (NC == 16) {
      *reinterpret_cast<uint2*>(stage + 2 * lane) = make_uint2(words[0], words[1]);
    } else {
#pragma unroll
      for (int w = 0; w < NC / 32; ++w) {
        *reinterpret_cast<uint4*>(stage + lane * (NC / 8) + 4 * w) =
            make_uint4(words[4 * w], words[4 * w + 2], words[4 * w + 1], words[4 * w + 3]);
      }
    }
    stage[32 * (NC / 8) + lane] = __float_as_uint(tok_scale);
    __syncwarp();
    // Max phase: the chunk's scaled dots y[tile][2 h + j] (head r + 8 h, candidate 2 t + j).
    float y[4][2 * kRowHalves];
    float m[kRowHalves];
#pragma unroll
    for (int h = 0; h < kRowHalves; ++h) m[h] = -INFINITY;
#pragma unroll
    for (int tile = 0; tile < 4; ++tile) {
      int d[4] = {0, 0, 0, 0};
#pragma unroll
      for (int sl = 0; sl < kSlices; ++sl) {
        uint32_t b0, b1;
        GqaTileFragments<NC>(stage, tile, sl, lane, b0, b1);
        MmaS8U8(d, a[sl], b0, b1);
      }
      const float2 ks = *reinterpret_cast<const float2*>(stage_scales + 8 * tile + 2 * t);
#pragma unroll
      for (int h = 0; h < kRowHalves; ++h) {
        y[tile][2 * h] = TlsTokenScaledDot(static_cast<float>(d[2 * h] - qoff[h]), ks.x);
        y[tile][2 * h + 1] = TlsTokenScaledDot(static_cast<float>(d[2 * h + 1] - qoff[h]), ks.y);
        m[h] = fmaxf(m[h], fmaxf(y[tile][2 * h], y[tile][2 * h + 1]));  // NaN skipped
      }
    }
    // The chunk's shifts, then its exps into lg and their fixed-point sums into the table.
#pragma unroll
    for (int h = 0; h < kRowHalves; ++h) {
      const int hh = r + 8 * h;
#pragma unroll
      for (int o = 1; o <= 2; o <<= 1) m[h] = fmaxf(m[h], __shfl_xor_sync(0xffffffffu, m[h], o));
      const float c = TlsChunkShift(m[h], ascale[h]);
      const TlsExpShift shift = TlsChunkExpShift(ascale[h], c);
      uint32_t fixed = 0u;
#pragma unroll
      for (int tile = 0; tile < 4; ++tile) {
        const uint32_t w = TlsTokenExpPair(TlsTokenExpArg(y[tile][2 * h], shift),
                                           TlsTokenExpArg(y[tile][2 * h + 1], shift));
        const float e0 = Bf16PairLo(w), e1 = Bf16PairHi(w);
        fixed += ExpFixed(e0) + ExpFixed(e1);
        if (hh < group) {
          *reinterpret_cast<float2*>(lg + (hh * ITEMS + u) * kLgRow + warp * 32 + 8 * tile +
                                     2 * t) = make_float2(e0, e1);
        }
      }
#pragma unroll
      for (int o = 1; o <= 2; o <<= 1) fixed += __shfl_xor_sync(0xffffffffu, fixed, o);
      if (t == 0 && hh < group) {
        sh.chunk_c[u][warp][hh] = c;
        sh.chunk_sum[u][warp][hh] = fixed;
        if (c > -INFINITY) atomicMax(&sh.max_bits[hh], TlsOrderedBits(c));
      }
    }
  }
  if (lane == 0) sh.part_valid[warp] = valid_warp;
  __syncthreads();  // this CTA's max shifts, chunk sums and valid counts
  ClusterWait();    // every rank's statistics and mailboxes are set up
  if (tid < group) {
    sh.c_max[tid] = FromOrderedBits(sh.cluster.Max(tid, sh.max_bits[tid], rank, size));
  }
  __syncthreads();
  // A warp per head: the chunks' sums shifted to the row's max shift, over the cluster; then
  // each chunk's alpha weight over its sum.
  constexpr int kChunks = ITEMS * kFusedWarps;
  if (warp < group) {
    const float c_max = sh.c_max[warp];
    unsigned long long s = 0ull;
    for (int i = lane; i < kChunks; i += 32) {
      s += TlsChunkScaledSum(sh.chunk_sum[i / kFusedWarps][i % kFusedWarps][warp],
                             sh.chunk_c[i / kFusedWarps][i % kFusedWarps][warp], c_max);
    }
    s = WarpSum64(s);
    float inv = 0.f;
    if (lane == 0) inv = TlsInvDenominator(sh.cluster.ExpSum(warp, s, rank, size), group);
    inv = __shfl_sync(0xffffffffu, inv, 0);
    for (int i = lane; i < kChunks; i += 32) {
      const float w =
          TlsChunkWeight(inv, sh.chunk_c[i / kFusedWarps][i % kFusedWarps][warp], c_max);
      sh.chunk_sum[i / kFusedWarps][i % kFusedWarps][warp] = __float_as_uint(w);
    }
  } else if (warp == kFusedWarps - 1) {
    const int v = __reduce_add_sync(0xffffffffu, lane < kFusedWarps ? sh.part_valid[lane] : 0);
    if (lane == 0) sh.num_valid = sh.cluster.Valid(v, rank, size);
  }
  __syncthreads();
  const int num_valid = sh.num_valid;
  uint32_t key[ITEMS];
#pragma unroll
  for (int u = 0; u < ITEMS; ++u) {
    const float* w = reinterpret_cast<const float*>(sh.chunk_sum[u][warp]);
    float alpha = 0.f;
#pragma unroll
    for (int hh = 0; hh < MAXG; ++hh) {
      if (hh < group) alpha = TlsAlphaTerm(lg[(hh * ITEMS + u) * kLgRow + tid], w[hh], alpha);
    }
    key[u] = pos[u] >= 0 ? TlsOrderedBits(alpha) : 0u;
  }

  ClusterSelect<ITEMS>(cluster, sh, pos, key, num_valid, sel, geo, bg);
}

// CTAs per row (up to kFusedMaxCluster; any count, clusters need not be powers of two) for
// `items` candidates per thread.
int FusedClusterSize(int max_candidates, int items) {
  return std::max(1, (max_candidates + items * kFusedThreads - 1) / (items * kFusedThreads));
}

template <int NC>
constexpr size_t FusedDynamicSmem(int max_group, int items) {
  return (size_t(max_group) * items * kLgRow + kFusedWarps * GqaStageWords<NC>()) * sizeof(float);
}

// One row per cluster of `size` CTAs; also lets the kernel use `smem` of dynamic shared memory.
// With `after_queries` the launch may overlap QuantizeQueryKernel before it on the stream
// (programmatic stream serialization; the kernel calls WaitForPreviousGrid). `attr` holds two.
template <auto KERNEL>
cudaError_t ClusterConfig(int size, int rows, size_t smem, cudaStream_t stream,
                          cudaLaunchAttribute* attr, cudaLaunchConfig_t* config,
                          bool after_queries = false) {
  cudaError_t err = EnsureDynamicSmem<KERNEL>(smem);
  if (err != cudaSuccess) return err;
  if (size > kFusedMaxCluster) {  // per device, so asked on every launch (a host-side call)
    err = cudaFuncSetAttribute(KERNEL, cudaFuncAttributeNonPortableClusterSizeAllowed, 1);
    if (err != cudaSuccess) return err;
  }
  *config = cudaLaunchConfig_t{};
  config->gridDim = dim3(size, rows);
  config->blockDim = dim3(kFusedThreads);
  config->dynamicSmemBytes = smem;
  config->stream = stream;
  attr->id = cudaLaunchAttributeClusterDimension;
  attr->val.clusterDim.x = size;
  attr->val.clusterDim.y = 1;
  attr->val.clusterDim.z = 1;
  attr[1].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[1].val.programmaticStreamSerializationAllowed = 1;
  config->attrs = attr;
  config->numAttrs = after_queries ? 2 : 1;
  return cudaSuccess;
}

// How many clusters of `size` CTAs of KERNEL the GPU runs at once. Not the SM count over the
// cluster size: a cluster must fit inside one GPC, and the H200's GPCs hold different SM counts
// (it runs 15 clusters of 8 CTAs, not 16). Asked once per (kernel, cluster size); every device
// is assumed the same kind.
template <auto KERNEL>
int MaxActiveClusters(int size, size_t smem) {
  static std::atomic<int> cache[kClusterMaxRanks + 1] = {};  // 0 = not asked yet
  int active = cache[size].load(std::memory_order_relaxed);
  if (active == 0) {
    cudaLaunchAttribute attr[2] = {};
    cudaLaunchConfig_t config;
    if (ClusterConfig<KERNEL>(size, 1, smem, nullptr, attr, &config) != cudaSuccess ||
        cudaOccupancyMaxActiveClusters(&active, KERNEL, &config) != cudaSuccess || active <= 0) {
      (void)cudaGetLastError();
      active = 1;
    }
    cache[size].store(active, std::memory_order_relaxed);
  }
  return active;
}

template <auto KERNEL, typename... Args>
cudaError_t LaunchClusters(int size, int rows, size_t smem, cudaStream_t stream, Args... args) {
  cudaLaunchAttribute attr[2] = {};
  cudaLaunchConfig_t config;
  const cudaError_t err = ClusterConfig<KERNEL>(size, rows, smem, stream, attr, &config);
  if (err != cudaSuccess) return err;
  return cudaLaunchKernelEx(&config, KERNEL, args...);
}

// LaunchClusters right after QuantizeTokenQueries, overlapping it (MLA token kernels: staging
// their candidates during the quantization measured 1.6-2.5 us off the TLS step on the H200).
template <auto KERNEL, typename... Args>
cudaError_t LaunchClustersAfterQueries(int size, int rows, size_t smem, cudaStream_t stream,
                                       Args... args) {
  cudaLaunchAttribute attr[2] = {};
  cudaLaunchConfig_t config;
  const cudaError_t err = ClusterConfig<KERNEL>(size, rows, smem, stream, attr, &config, true);
  if (err != cudaSuccess) return err;
  return cudaLaunchKernelEx(&config, KERNEL, args...);
}

template <int NC, int MAXG, int ITEMS>
int FusedActiveClusters(const TlsTokenScoreParams& p) {
  return MaxActiveClusters<TokenScoreSelectKernel<NC, MAXG, ITEMS>>(
      FusedClusterSize(p.max_candidates, ITEMS), FusedDynamicSmem<NC>(MAXG, ITEMS));
}

template <int NC, int MAXG, int ITEMS>
cudaError_t LaunchFused(const TlsTokenScoreParams& p, const TlsTokenSelectParams& sel,
                        cudaStream_t stream) {
  return LaunchClusters<TokenScoreSelectKernel<NC, MAXG, ITEMS>>(
      FusedClusterSize(p.max_candidates, ITEMS), p.batch * p.num_kv_heads,
      FusedDynamicSmem<NC>(MAXG, ITEMS), stream, p, sel);
}

// Candidates per thread: the fewest that keep every row's cluster resident at once (one wave),
// else the most (fewest waves). Up to 4 for channel sets of up to 32 and groups up to 8 (the
// GQA configurations), 2 for groups of 16 (shared memory), 1 for wider channel sets (MLA).
// Three matter: at 8,192 candidates they make clusters of 3 CTAs, of which the H200 holds
// more than 32 at once (rows of batch 4 x 8 KV heads) where it holds 30 of 4.
template <int NC, int MAXG>
cudaError_t LaunchForItems(const TlsTokenScoreParams& p, const TlsTokenSelectParams& sel,
                           cudaStream_t stream) {
  constexpr int kMaxItems = NC > 32 ? 1 : MAXG > 8 ? 2 : 4;
  constexpr int kTwo = std::min(2, kMaxItems), kThree = std::min(3, kMaxItems);
  constexpr int kFour = std::min(4, kMaxItems);
  const int rows = p.batch * p.num_kv_heads;
  if (kMaxItems == 1 || rows <= FusedActiveClusters<NC, MAXG, 1>(p)) {
    return LaunchFused<NC, MAXG, 1>(p, sel, stream);
  }
  if (kMaxItems == 2 || rows <= FusedActiveClusters<NC, MAXG, kTwo>(p)) {
    return LaunchFused<NC, MAXG, kTwo>(p, sel, stream);
  }
  if (rows <= FusedActiveClusters<NC, MAXG, kThree>(p)) {
    return LaunchFused<NC, MAXG, kThree>(p, sel, stream);
  }
  return LaunchFused<NC, MAXG, kFour>(p, sel, stream);
}

template <int NC>
cudaError_t LaunchForGroup(const TlsTokenScoreParams& p, const TlsTokenSelectParams& sel,
                           cudaStream_t stream) {
  const int group = p.num_q_heads / p.num_kv_heads;
  if (group <= 4) return LaunchForItems<NC, 4>(p, sel, stream);
  if (group <= 8) return LaunchForItems<NC, 8>(p, sel, stream);
  return LaunchForItems<NC, kFusedMaxGroup>(p, sel, stream);
}

// ---- MLA in one launch ----------------------------------------------------------------------
// A row's MLA logits (16-128 heads x 1,024 candidates per CTA) do not fit in shared memory, but
// integer tensor cores (MmaS8U8; warpgroup MMA for 64-head blocks, MlaUsesGmma) compute them so
// cheaply that two phases recompute them from the CTA's staged INT4 rows: (1) the per-head max,
// (2) the per-head exps, written as bf16 head pairs to the workspace's exp scratch (StoredExps,
// L2-resident; ScratchPairs), and their fixed-point sums; then (3) each candidate's thread reads
// its exps back and sums alpha over the heads (tls_math.h order), and ClusterSelect. Same
// arithmetic as the separate ops and the CPU reference, bit for bit. `blocks_per_cta` whole list
// entries per CTA (one or two candidates per thread), up to 16 CTAs per cluster: the compute
// scales with the candidates per SM, so a row takes as many SMs as still let every cluster run
// at once (MlaClusterSize). Where cluster sizes
// cap that (1-2 rows of 64 heads, 2-3 rows of 128), a row's heads split over two clusters; each
// leaves its part of the alpha chain in the exp scratch, and the row's last cluster to finish (a
// counter that QuantizeQueryKernel zeroes) adds them and selects.
constexpr int kMlaMaxGroup = 128;
constexpr int kMlaBlocksPerItem = kFusedThreads / kKvBlockSize;  // list entries per item
constexpr int kMlaMaxBlocks = 2 * kMlaBlocksPerItem;  // entries per CTA at two items per thread

struct MlaShared {
  uint32_t max_bits[kMlaMaxGroup];            // this CTA's per-head max chunk shift (ordered bits)
  unsigned long long exp_sum[kMlaMaxGroup];   // this CTA's per-head exp sums (at the row's c_max)
  float c_max[kMlaMaxGroup];                  // the row's per-head max chunk shift
  float inv[kMlaMaxGroup];                    // 1 / (G * softmax denominator)
  float qscale[kMlaMaxGroup];
  int qsum[kMlaMaxGroup];
  int32_t block[kMlaMaxBlocks];  // the CTA's list entries (-1: none)
  RowTickets tickets;            // SPLIT > 1: which of the row's clusters finished last
  ClusterStats<kMlaMaxGroup> cluster;
};

// One lane's share of an IMMA logit tile in the MLA token kernels: heads h0 = lane / 4 and
// h1 = h0 + 8 of a 16-head tile, slots 2 (lane % 4) and + 1 of each 8-candidate tile (d[u]:
// head h0, slot u; d[2 + u]: head h1). The quad's four lanes hold one head pair's slots, so a
// 32-slot chunk (tls_math.h's chunk-local shifts: four tiles) is the quad's: its max phase keeps
// the max of the scaled dots (dot * token scale, TlsTokenScaledDot), ChunkShifts turns them
// into the chunk's shifts, its exp phase sums the exps exactly in fixed point (ExpFixed), and
// CommitChunk leaves both in the CTA's chunk table.
struct LaneHeadPair {
  TlsExpShift s0, s1;                    // the heads' exp shifts in the current chunk
  float c0 = -INFINITY, c1 = -INFINITY;  // and the chunk's c (-inf: no candidate in it)
  float m0 = -INFINITY, m1 = -INFINITY;
  float cm0 = -INFINITY, cm1 = -INFINITY;  // the largest c of the warp's chunks so far
  uint32_t fixed0 = 0u, fixed1 = 0u;       // ExpFixed sums: 8 terms of at most 2^23 per lane

  // The tile's scaled dots y (TlsTokenScaledDot) of this lane's two heads and two candidates
  // from the biased IMMA dots d (kDotFloatBias): (B + dot) * ks - B * ks in one fma, which is
  // dot * ks rounded once, as TlsTokenScaledDot's, since B * ks is exact (TlsInt4Scale's 22
  // bits; a NaN scale gives NaN). Six instructions for four dots instead of eight.
  static __device__ __forceinline__ void ScaledDots(const int (&d)[4], float2 ks, float (&y)[4]) {
    const float bias = __int_as_float(kDotFloatBias);
    const float nb0 = __fmul_rn(-bias, ks.x), nb1 = __fmul_rn(-bias, ks.y);
    y[0] = __fmaf_rn(__int_as_float(d[0]), ks.x, nb0);
    y[1] = __fmaf_rn(__int_as_float(d[1]), ks.y, nb1);
    y[2] = __fmaf_rn(__int_as_float(d[2]), ks.x, nb0);
    y[3] = __fmaf_rn(__int_as_float(d[3]), ks.y, nb1);
  }
  __device__ __forceinline__ void AddMax(const float (&y)[4]) {
    m0 = fmaxf(m0, fmaxf(y[0], y[1]));
    m1 = fmaxf(m1, fmaxf(y[2], y[3]));
  }
  __device__ __forceinline__ void AddMax(const int (&d)[4], float2 ks) {
    float y[4];
    ScaledDots(d, ks, y);
    AddMax(y);
  }
  // The chunk's shifts from the quad's maxima (a0 / a1: the heads' TlsMul(query scale, softmax
  // scale * log2 e)); the maxima restart for the next chunk.
  __device__ __forceinline__ void ChunkShifts(float a0, float a1) {
#pragma unroll
    for (int o = 1; o <= 2; o <<= 1) {
      m0 = fmaxf(m0, __shfl_xor_sync(0xffffffffu, m0, o));
      m1 = fmaxf(m1, __shfl_xor_sync(0xffffffffu, m1, o));
    }
    c0 = TlsChunkShift(m0, a0);
    c1 = TlsChunkShift(m1, a1);
    s0 = TlsChunkExpShift(a0, c0);
    s1 = TlsChunkExpShift(a1, c1);
    m0 = m1 = -INFINITY;
  }
  // A slot's token scale is NaN when it holds no candidate: its y are NaN, its exps 2^-126
  // (TlsTokenExpArg), which no fixed-point sum sees and alpha never reads. The exps come as the
  // bf16 head pairs the scratch stores (w[u]: heads h0 and h1 of slot u, TlsTokenExpPair) and as
  // floats (e, LaneHeadPair's layout), whose sums need no unrounded copy.
  __device__ __forceinline__ void Exps(const float (&y)[4], float (&e)[4], uint32_t (&w)[2]) {
#pragma unroll
    for (int u = 0; u < 2; ++u) {
      w[u] = TlsTokenExpPair(TlsTokenExpArg(y[u], s0), TlsTokenExpArg(y[2 + u], s1));
      e[u] = Bf16PairLo(w[u]);
      e[2 + u] = Bf16PairHi(w[u]);
      fixed0 += ExpFixed(e[u]);
      fixed1 += ExpFixed(e[2 + u]);
    }
  }
  __device__ __forceinline__ void Exps(const int (&d)[4], float2 ks, float (&e)[4],
                                       uint32_t (&w)[2]) {
    float y[4];
    ScaledDots(d, ks, y);
    Exps(y, e, w);
  }
  // The chunk's shifts and the quad's sums into table entries i0 / i1 (chunk_c: c; chunk_sum:
  // the sum, at most 32 x 2^23); the shifts into the lane's running max (CommitMax).
  __device__ __forceinline__ void CommitChunk(float* chunk_c, uint32_t* chunk_sum, int i0, int i1,
                                              int t) {
#pragma unroll
    for (int o = 1; o <= 2; o <<= 1) {
      fixed0 += __shfl_xor_sync(0xffffffffu, fixed0, o);
      fixed1 += __shfl_xor_sync(0xffffffffu, fixed1, o);
    }
    if (t == 0) {
      chunk_c[i0] = c0;
      chunk_c[i1] = c1;
      chunk_sum[i0] = fixed0;
      chunk_sum[i1] = fixed1;
    }
    cm0 = fmaxf(cm0, c0);
    cm1 = fmaxf(cm1, c1);
    fixed0 = fixed1 = 0u;
  }
  // After the warp's last chunk: its heads' largest c into the CTA's per-head max (ordered
  // bits), once per warp and not once per chunk (12 fewer SASS instructions per chunk).
  __device__ __forceinline__ void CommitMax(uint32_t* max0, uint32_t* max1, int t) const {
    if (t != 0) return;
    if (cm0 > -INFINITY) atomicMax(max0, TlsOrderedBits(cm0));
    if (cm1 > -INFINITY) atomicMax(max1, TlsOrderedBits(cm1));
  }
};

// The chunk table of an MLA token kernel's CTA (tls_math.h's chunk-local shifts): per chunk k
// of the CTA's slots (32 k ..) and head h of its part, entry k * heads + h of c (floats), then
// of the fixed-point exp sums, which alpha's weights (TlsChunkWeight, float bits) replace once
// the row's shifts and sums are known. In the top-k's histograms (free until the top-k, which
// the kernels zero again before it) where they fit, else after the dynamic shared memory's
// exps.
constexpr size_t kChunkTableInHist = 2 * kClusterSelectBins * sizeof(int);
__host__ __device__ constexpr size_t MlaChunkTableBytes(int blocks, int heads) {
  const size_t bytes = size_t(blocks) * (kKvBlockSize / kTlsSoftmaxChunk) * heads * 8;
  return bytes <= kChunkTableInHist ? 0 : bytes;
}

// After a token kernel's chunk phases: each chunk's sum shifted to the row's max shift (c_max,
// per head) into the CTA's per-head sums (exp_sum), entries `n` of the table whose head (i %
// heads) is below `live` heads (a part's missing tiles wrote none).
__device__ __forceinline__ void AddChunkSums(const float* chunk_c, const uint32_t* chunk_sum, int n,
                                             int heads, int live, const float* c_max,
                                             unsigned long long* exp_sum) {
  // A thread's entries share one head (the stride is a multiple of `heads`): their sum in a
  // register, then one add, as 32-bit shared atomics (a 64-bit one compiles to a compare-and-swap
  // loop, on which the head's threads contended: one per entry before, run 176).
  const int stride = blockDim.x / heads * heads;
  const int h = threadIdx.x % heads;
  if (static_cast<int>(threadIdx.x) >= stride || h >= live) return;
  unsigned long long v = 0ull;
  for (int i = threadIdx.x; i < n; i += stride) {
    v += TlsChunkScaledSum(chunk_sum[i], chunk_c[i], c_max[h]);
  }
  if (v != 0ull) AddToSharedU64(&exp_sum[h], v);
}

// Then, once the heads' factors inv are known: each entry's alpha weight over its sum.
__device__ __forceinline__ void ChunkWeights(const float* chunk_c, uint32_t* chunk_sum, int n,
                                             int heads, int live, const float* c_max,
                                             const float* inv) {
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    const int h = i % heads;
    if (h < live) chunk_sum[i] = __float_as_uint(TlsChunkWeight(inv[h], chunk_c[i], c_max[h]));
  }
}

// The exps in the L2 scratch as bf16 head pairs: pair P = 8 m + r of 16-head tile m holds
// heads 16 m + r and 16 m + r + 8 (an IMMA lane's two heads), one bf16x2 word per candidate
// slot, [pair][slot]. A cluster's kHeads heads from head0 own the scratch rows of those heads
// (floats, [head][slot]); their pairs fill the upper half of those rows (ScratchPairs), so the
// lower half stays free for the alpha partials that a row's clusters leave each other. Half the
// bytes of the floats (the exps are bf16 values, TlsTokenExp): 8 us off the 128-head batch-8
// token branch (H100, bench/results/tls-kernels-h200.md run 123). A tile's lane stores its two
// slots in one 8-byte store, and the alpha pass loads one word per pair.
__device__ __forceinline__ uint32_t* ScratchPairs(float* exps, int64_t head0, int heads,
                                                  int max_candidates) {
  return reinterpret_cast<uint32_t*>(exps + (head0 + heads / 2) * max_candidates);
}

// A tile's exp words (LaneHeadPair::Exps) to the scratch at `at` when `store`: this lane's
// words of its pair row (slots 2 t, 2 t + 1) in one 8-byte store. Callers pass tile slot <
// store_end (slots past it lie past the row's scratch; the others store, 2^-126 when no
// candidate: alpha reads candidates only). Slots, store_end and the row stride (max_candidates,
// even: TlsTokenScoreSelectCanFuse) are even, so a pair of slots is stored whole or not at all.
__device__ __forceinline__ void StoreTilePairs(uint32_t* at, bool store, const uint32_t (&w)[2]) {
  if (store) __stcg(reinterpret_cast<uint2*>(at), make_uint2(w[0], w[1]));
}

// AlphaFromExps over bf16 pairs (e: the candidate's word of pair 0; stride: words per pair).
template <int GROUP>
__device__ __forceinline__ float AlphaFromBf16Pairs(const uint32_t* e, int64_t stride,
                                                    const float* inv) {
  static_assert(GROUP % 16 == 0 && kTlsAlphaHeadTile == 16, "whole 16-head tiles");
  float alpha = 0.f;
#pragma unroll
  for (int m = 0; m < GROUP / 16; ++m) {
    uint32_t v[8];
#pragma unroll
    for (int i = 0; i < 8; ++i) v[i] = e[(8 * m + i) * stride];
    // The chain of TlsAlphaTerm over heads 16 m .. 16 m + 15 (the exps are bf16 already).
    float part = 0.f;
#pragma unroll
    for (int i = 0; i < 8; ++i) part = TlsAlphaTerm(Bf16PairLo(v[i]), inv[16 * m + i], part);
#pragma unroll
    for (int i = 0; i < 8; ++i) part = TlsAlphaTerm(Bf16PairHi(v[i]), inv[16 * m + 8 + i], part);
    alpha = m == 0 ? part : TlsAdd(alpha, part);
  }
  return alpha;
}

// Staged candidate rows, unpacked to one byte per channel (code + 8) in the order the IMMA B
// fragments read them: word t * NC / 16 + 2 * sl + half of a row is lane t's b0 (half 0) / b1
// of channel slice sl, so a lane loads all its fragments of a candidate with NC / 64 16-byte
// loads and no shifts (the INT4 nibbles are unpacked once at staging, not once per 16-head tile
// and pass). Rows are NC bytes without padding; their 16-byte chunks are swizzled (MlaChunkWord)
// so that both a staging store (one chunk of 8 consecutive rows per quarter warp) and a
// fragment load (2 rows x 4 t) fall on distinct banks.
template <int NC>
__host__ __device__ constexpr int MlaRowWords() {
  return NC / 4;
}

// Word offset of 16-byte chunk c of staged row `row` (NC 128: chunk c at c ^ (row % 8); NC 64,
// whose 4-chunk rows pair up on the 32 banks: c ^ (row / 2 % 4)).
template <int NC>
__device__ __forceinline__ int MlaChunkWord(int row, int c) {
  const int swizzle = NC == 128 ? (row & 7) : ((row >> 1) & 3);
  return row * MlaRowWords<NC>() + 4 * (c ^ swizzle);
}

// Where MlaScoreSelectKernel keeps its exps from a chunk's exp phase to the alpha pass.
enum class MlaExps {
  kScratch,     // bf16 head pairs in the L2-resident scratch (ScratchPairs)
  kSmemFloats,  // floats in shared memory, which hold a chunk's scaled dots from its max
                // phase to its exp phase (mma.sync logits computed once)
  kSmemPairs,   // bf16 head pairs in shared memory (ScratchPairs' layout): half the bytes of
                // the floats (mma.sync logits computed twice, as with the scratch)
};

// Shared-memory rows of 32-bit words that `heads` heads' exps take: one per head as floats, one
// per head pair as bf16 pairs.
constexpr int MlaSmemExpRows(MlaExps exps, int heads) {
  return exps == MlaExps::kSmemFloats ? heads : exps == MlaExps::kSmemPairs ? heads / 2 : 0;
}

// Row stride (words) of those rows for `slots` candidate slots: 8 words of padding put a quad's
// stores to eight rows on different banks (a warp's 8-byte stores to its 8 pair rows: two
// wavefronts, the least for 256 bytes).
__host__ __device__ constexpr int MlaSmemExpStride(int slots) { return slots + 8; }

// Heads of each part of a row split over SPLIT clusters in whole 16-head tiles (of 3 parts the
// last takes fewer).
constexpr int MlaPartHeads(int group, int split) { return 16 * ((group / 16 + split - 1) / split); }

// Whether a row's SPLIT parts are equal and every warp takes a 16-head tile of its part.
constexpr bool MlaEvenParts(int group, int split) {
  return (group / 16) % split == 0 && kFusedWarps % (MlaPartHeads(group, split) / 16) == 0;
}

// Whether MlaScoreSelectKernel<NC, GROUP, SPLIT, *, EXPS> takes its logits from warpgroup MMA:
// parts of 64 or 128 heads at 128 channels that compute them twice. The four warps of warpgroup
// w / 4 hold consecutive 16-head tiles of one 64-head block, all of one slot. (H100: 0.6-0.9 us
// off the token branch at batch 8, 0.2-0.3 at 128 heads batch 4; the float exps' single pass at
// 64 heads batch 4 was 0.5 us slower on it: bench/results/tls-kernels-h200.md run 161.)
constexpr bool MlaUsesGmma(int nc, int group, int split, MlaExps exps) {
  return nc == 128 && MlaPartHeads(group, split) % 64 == 0 && MlaEvenParts(group, split) &&
         exps != MlaExps::kSmemFloats;
}

// IGMMA's 128-byte swizzle follows shared-memory address bits, so those kernels start their
// staged rows on the next 1,024-byte boundary of their dynamic shared memory, which has this
// much more room (an __align__(1024) extern array would pad every kernel of this file).
constexpr int kGmmaAlign = 1024;

// Dynamic shared memory of MlaScoreSelectKernel for CTAs of `blocks` list entries of `heads`
// heads: the staged rows and their token scales, `exp_rows` rows of exps (MlaSmemExpRows), the
// chunk table where the histograms cannot hold it (MlaChunkTableBytes), and `query_rows` rows
// of IGMMA A operand (MlaGmmaQueryRows).
template <int NC>
constexpr size_t MlaDynamicSmem(int blocks, int heads, int exp_rows, bool gmma,
                                int query_rows = 0) {
  const int slots = blocks * kKvBlockSize;
  return size_t(slots) * (sizeof(uint32_t) * MlaRowWords<NC>() + sizeof(float)) +
         size_t(exp_rows) * MlaSmemExpStride(slots) * sizeof(uint32_t) +
         MlaChunkTableBytes(blocks, heads) + size_t(query_rows) * NC + (gmma ? kGmmaAlign : 0);
}

// The most list entries one CTA stages at `items` candidates per thread (two items: as many as
// fit next to the kernel's ~26 KB of static shared memory, 24 at NC 128).
template <int NC>
constexpr int MlaMaxBlocks(int items, int heads, int exp_rows, bool gmma, int query_rows = 0) {
  constexpr size_t kDynamicLimit = 200 * 1024;
  int blocks = items * kMlaBlocksPerItem;
  while (MlaDynamicSmem<NC>(blocks, heads, exp_rows, gmma, query_rows) > kDynamicLimit) --blocks;
  return blocks;
}

// Rows of the IGMMA kernels' A operand (the part's query codes, one 128-byte row per head in the
// staged rows' byte order and swizzle) in shared memory, where they fit without fewer list
// entries per CTA (the L2-scratch kernels; 0: A stays in registers, GmmaQueryFragments). From
// shared memory A costs no shuffles and 16 registers less in a kernel at its 64-register limit.
template <int NC>
constexpr int MlaGmmaQueryRows(int group, int split, int items, MlaExps exps) {
  if (!MlaUsesGmma(NC, group, split, exps)) return 0;
  const int heads = MlaPartHeads(group, split), exp_rows = MlaSmemExpRows(exps, heads);
  return MlaMaxBlocks<NC>(items, heads, exp_rows, true, heads) ==
                 MlaMaxBlocks<NC>(items, heads, exp_rows, true)
             ? heads
             : 0;
}

// The dynamic shared memory MlaScoreSelectKernel<NC, GROUP, SPLIT, ITEMS, EXPS> launches with: its
// most list entries per CTA, with IGMMA's A rows where they fit beside them.
template <int NC, int GROUP, int SPLIT, int ITEMS, MlaExps EXPS>
constexpr size_t MlaRowSmem() {
  const int heads = MlaPartHeads(GROUP, SPLIT), exp_rows = MlaSmemExpRows(EXPS, heads);
  const bool gmma = MlaUsesGmma(NC, GROUP, SPLIT, EXPS);
  return MlaDynamicSmem<NC>(MlaMaxBlocks<NC>(ITEMS, heads, exp_rows, gmma), heads, exp_rows, gmma,
                            MlaGmmaQueryRows<NC>(GROUP, SPLIT, ITEMS, EXPS));
}

// This warp's 16-head tile `tile` of A rows from its mma.sync fragments a[sl] (LoadQueryFragments):
// a[sl][reg] holds row r + 8 (reg % 2)'s mma.sync k indices 32 sl + 16 (reg / 2) + 4 t .. + 3,
// which a staged row keeps at bytes 32 t + 8 sl + 4 (reg / 2) .. + 3 (see GmmaQueryFragments),
// swizzled as the staged rows (MlaChunkWord<128>).
__device__ __forceinline__ void StoreGmmaQueryRows(const uint32_t (&a)[4][4], int tile, int lane,
                                                   uint32_t* rows) {
  const int r = lane >> 2, t = lane & 3;
#pragma unroll
  for (int sl = 0; sl < 4; ++sl) {
#pragma unroll
    for (int reg = 0; reg < 4; ++reg) {
      const int row = 16 * tile + r + 8 * (reg & 1), word = 8 * t + 2 * sl + (reg >> 1);
      rows[MlaChunkWord<128>(row, word >> 2) + (word & 3)] = a[sl][reg];
    }
  }
}

// The alpha chain of HEADS heads (tls_math.h order) from one candidate's exps at `e`, rows
// `stride` words apart, wherever EXPS keeps them.
template <MlaExps EXPS, int HEADS>
__device__ __forceinline__ float AlphaChain(const uint32_t* e, int64_t stride, const float* inv) {
  if constexpr (EXPS == MlaExps::kSmemFloats) {
    return AlphaFromExps<HEADS>(reinterpret_cast<const float*>(e), stride, inv);
  } else {
    return AlphaFromBf16Pairs<HEADS>(e, stride, inv);
  }
}

// One candidate row's INT4 words (channel c in word c / 8, nibble c % 8) to the staged layout.
template <int NC>
__device__ __forceinline__ void StageUnpackedCodes(const uint4 (&w4)[NC / 32], uint32_t* codes,
                                                   int row) {
  constexpr int kPerLane = NC / 16;  // words per t
  auto w = [&](int i) {
    const uint4& v = w4[i / 4];
    return i % 4 == 0 ? v.x : i % 4 == 1 ? v.y : i % 4 == 2 ? v.z : v.w;
  };
#pragma unroll
  for (int t = 0; t < 4; ++t) {
    uint32_t v[kPerLane];
#pragma unroll
    for (int sl = 0; sl < NC / 32; ++sl) {
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        v[2 * sl + half] = (w(4 * sl + 2 * half + (t >> 1)) >> (4 * (t & 1))) & 0x0f0f0f0fu;
      }
    }
#pragma unroll
    for (int q = 0; q < kPerLane / 4; ++q) {
      *reinterpret_cast<uint4*>(codes + MlaChunkWord<NC>(row, t * (kPerLane / 4) + q)) =
          make_uint4(v[4 * q], v[4 * q + 1], v[4 * q + 2], v[4 * q + 3]);
    }
  }
}

// The IGMMA A registers of a 16-head tile (ag[j]: k-slice j, bytes 32 j .. 32 j + 31 of a row
// staged by StageUnpackedCodes<128>) from its mma.sync fragments a[sl] (LoadQueryFragments). A
// staged row's byte 32 t + 8 sl + 4 half + i holds mma.sync k index 32 sl + 16 half + 4 t + i
// (lane t's b0 / b1 of slice sl), so lane (r, t)'s register reg of slice j is register
// 2 (t % 2) + reg % 2 of slice t / 2 + 2 (reg / 2) in lane (r, j). Once per kernel: 64 shuffles
// (the kernels without A rows in shared memory, MlaGmmaQueryRows 0).
__device__ __forceinline__ void GmmaQueryFragments(const uint32_t (&a)[4][4], int lane,
                                                   uint32_t (&ag)[4][4]) {
  const int t = lane & 3;
#pragma unroll
  for (int j = 0; j < 4; ++j) {
#pragma unroll
    for (int reg = 0; reg < 4; ++reg) {
      uint32_t v = 0u;
#pragma unroll
      for (int tt = 0; tt < 4; ++tt) {  // what lane t = tt of each quad takes
        const uint32_t w = __shfl_sync(
            0xffffffffu, a[(tt >> 1) + 2 * (reg >> 1)][2 * (tt & 1) + (reg & 1)], (lane & ~3) | j);
        if (t == tt) v = w;
      }
      ag[j][reg] = v;
    }
  }
}

// 8-candidate tiles per IGMMA (N = 32): list entries hold 8 tiles, so a CTA's tiles split into
// whole groups.
constexpr int kGmmaTiles = 4;

// GROUP: the row's heads; SPLIT: clusters per row (1, or 2 / 3 / 4 taking a half / third /
// quarter of the heads each, in whole 16-head tiles); ITEMS: candidates per thread (slot u *
// kFusedThreads + tid); EXPS: where the exps wait for the alpha pass. In shared memory (where a
// cluster's exps fit beside the staged rows) they save the L2 scratch's stores, the wait for them
// at the cluster barrier and the alpha pass's L2 loads; a split row's partial alpha chains still go
// through the scratch.
template <int NC, int GROUP, int SPLIT, int ITEMS, MlaExps EXPS>
__global__ void __launch_bounds__(kFusedThreads, 1)
    MlaScoreSelectKernel(TlsTokenScoreParams p, TlsTokenSelectParams sel,
                         tls_detail::TokenQueries queries, float* exps, int blocks_per_cta) {
  // Each part takes kMTiles 16-head tiles (kHeads heads); of 3 parts the last takes fewer.
  TraceMark(kTraceStart);
  constexpr int kGroupTiles = GROUP / 16;
  constexpr int kHeads = MlaPartHeads(GROUP, SPLIT);
  constexpr int kMTiles = kHeads / 16;
  static_assert(GROUP % 16 == 0 && (SPLIT - 1) * kMTiles < kGroupTiles, "16-head tiles per part");
  // (The scratch's pair rows, ScratchPairs, assume kHeads heads in every part.)
  static_assert(GROUP % SPLIT == 0 || EXPS == MlaExps::kSmemFloats, "uneven parts in smem");
  constexpr int kSlots = kFusedWarps / kMTiles;  // warps per 16-head tile (32 / 3: 2 idle)
  constexpr bool kEvenParts = MlaEvenParts(GROUP, SPLIT);
  constexpr bool kGmma = MlaUsesGmma(NC, GROUP, SPLIT, EXPS);
  constexpr int kQueryRows = MlaGmmaQueryRows<NC>(GROUP, SPLIT, ITEMS, EXPS);
  constexpr int kExpRows = MlaSmemExpRows(EXPS, kHeads);
  constexpr bool kTableInHist =
      MlaChunkTableBytes(MlaMaxBlocks<NC>(ITEMS, kHeads, kExpRows, kGmma, kQueryRows), kHeads) == 0;
  // Whether rank 0 has room for GatherThenSelect from its staged rows on.
  constexpr bool kLocalFits =
      (kGmma ? kGmmaAlign : 0) + size_t(kQueryRows) * NC + kLocalTopKBytes <=
      MlaRowSmem<NC, GROUP, SPLIT, ITEMS, EXPS>();
  __shared__ ClusterSelectShared<ITEMS> sh;
  __shared__ MlaShared ms;
  extern __shared__ __align__(16) uint32_t mla_smem[];
  const int span = blocks_per_cta * kKvBlockSize;  // this CTA's candidate slots
  uint32_t* codes_s = mla_smem;                    // [slot] rows
  uint32_t* query_s = nullptr;                     // kQueryRows A rows, before the staged ones
  if constexpr (kGmma) {  // (in 16-byte units, so that the staging's stores stay 16 bytes wide)
    query_s = reinterpret_cast<uint32_t*>(reinterpret_cast<uint4*>(mla_smem) +
                                          (kGmmaAlign - SmemAddr(mla_smem) % kGmmaAlign) %
                                              kGmmaAlign / 16);
    codes_s = query_s + kQueryRows * MlaRowWords<NC>();
  }
  float* scale_s = reinterpret_cast<float*>(codes_s + span * MlaRowWords<NC>());  // [slot]
  // kSmemFloats: [head][MlaSmemExpStride(span)] floats; kSmemPairs: [pair][...] bf16 pairs.
  float* exps_s = scale_s + span;
  const int exps_s_stride = MlaSmemExpStride(span);
  uint32_t* table_s = reinterpret_cast<uint32_t*>(exps_s + kExpRows * exps_s_stride);
  cg::cluster_group cluster = cg::this_cluster();
  const int rank = static_cast<int>(cluster.block_rank());
  const int size = static_cast<int>(cluster.num_blocks());
  // The IGMMA kernels take the warp index through a shuffle, which the compiler knows is
  // warp-uniform: the loop's descriptors then stay in uniform registers (12-18 fewer SASS
  // instructions per chunk, cuobjdump; the mma.sync kernels gain nothing from it).
  const int tid = threadIdx.x, lane = tid & 31;
  const int warp = kGmma ? __shfl_sync(0xffffffffu, tid >> 5, 0) : tid >> 5;
  const int bg = blockIdx.y / SPLIT, part = blockIdx.y % SPLIT;
  const bool local_topk = kLocalFits && UseLocalTopK<NC, GROUP>(size);
  const int part_tiles = kEvenParts ? kMTiles : min(kMTiles, kGroupTiles - part * kMTiles);
  const int b = bg / p.num_kv_heads, g = bg % p.num_kv_heads;
  const int32_t select_len = p.maybe_select_lens ? p.maybe_select_lens[b] : p.seq_lens[b];
  const TlsGeometry geo = MakeTlsGeometry(p.seq_lens[b], select_len, p.sink_blocks, p.window);
  const int num_listed =
      p.maybe_blocks ? p.maybe_num_blocks[bg] : max(0, geo.first_recent_block - p.sink_blocks);

  const int tiles = span / 8;  // 8-candidate tiles
  if (tid < kMlaMaxBlocks) {
    const int i = rank * blocks_per_cta + tid;
    // Loaded whatever the row's count (the list has room for max_kept_blocks entries), so the
    // load does not wait for num_listed's: one dependent global round trip fewer before staging.
    const int32_t entry = !p.maybe_blocks ? p.sink_blocks + i
                          : i < p.max_kept_blocks
                              ? p.maybe_blocks[int64_t{bg} * p.max_kept_blocks + i]
                              : -1;
    ms.block[tid] = tid >= blocks_per_cta || i >= num_listed ? -1 : entry;
  }
  const int64_t head0 = int64_t{bg} * GROUP + part * kHeads;  // this cluster's first head
  if (tid < kHeads) {
    ms.max_bits[tid] = 0u;
    ms.exp_sum[tid] = 0ull;
  }
  // Warp 0 zeroes the cluster-wide values and sets up the mailboxes; its release arrive at the
  // cluster barrier (during the staging below) orders that before any peer's first push, which
  // comes after the barrier's wait (after the chunk loop).
  if (warp == 0) {
    ms.cluster.Init(kHeads, size, lane);
    if (lane == 0) {
      if (SPLIT > 1) ms.tickets.Init(size);  // fenced by InitSelectMail's FenceMbarInit
      if (!local_topk) {
        InitSelectMail(sh, size);
      } else {
        if (rank == 0) InitLocalTopKMail(&sh.mail[kMailTotals], size, span);
        FenceMbarInit();
      }
    }
  }
  if constexpr (!kTableInHist) {
    for (int i = tid; i < kClusterSelectBins; i += kFusedThreads) sh.hist[0][i] = 0;
  }
  __syncthreads();  // the list entries
  TraceMark(kTraceList);
  // Positions from the entries in shared memory (CandidatePositions' candidates, without
  // loading the list again behind its count).
  int32_t pos[ITEMS];
  int valid_warp = 0;
#pragma unroll
  for (int u = 0; u < ITEMS; ++u) {
    const int slot = u * kFusedThreads + tid;
    pos[u] = slot < span ? ListedPosition(geo, ms.block[slot / kKvBlockSize], slot) : -1;
    valid_warp += __popc(__ballot_sync(0xffffffffu, pos[u] >= 0));
  }
  if (lane == 0) sh.part_valid[warp] = valid_warp;
  // Stage this CTA's candidate rows (thread = candidate; every item's loads in flight before the
  // first is unpacked). A slot that is no candidate gets scale NaN: its logits are NaN, which the
  // max skips and TlsTokenExpArg maps to -126 (an exp below the fixed-point sums' unit; alpha
  // skips it).
  {
    uint4 words[ITEMS][NC / 32];
    float scale[ITEMS];
#pragma unroll
    for (int u = 0; u < ITEMS; ++u) {
      const int slot = u * kFusedThreads + tid;
      const int32_t block = slot < span ? ms.block[slot / kKvBlockSize] : -1;
      scale[u] = __int_as_float(0x7fc00000);
#pragma unroll
      for (int w = 0; w < NC / 32; ++w) words[u][w] = make_uint4(0u, 0u, 0u, 0u);
      if (block >= 0) {
        const int64_t row = p.index_table[int64_t{b} * p.max_blocks_per_seq + block];
        const int64_t tok = (row * p.num_kv_heads + g) * kKvBlockSize + slot % kKvBlockSize;
        const uint4* src = reinterpret_cast<const uint4*>(p.token_codes + tok * (NC / 2));
#pragma unroll
        for (int w = 0; w < NC / 32; ++w) words[u][w] = __ldg(src + w);
        if (pos[u] >= 0) scale[u] = __ldg(p.token_scales + tok);
      }
    }
    // Warp 0's release MEMBAR waits for its row loads, which it needs next anyway.
    ClusterArrive(warp == 0);
#pragma unroll
    for (int u = 0; u < ITEMS; ++u) {
      const int slot = u * kFusedThreads + tid;
      if (slot < span) {
        StageUnpackedCodes<NC>(words[u], codes_s, slot);
        scale_s[slot] = scale[u];
      }
    }
  }
  if constexpr (kGmma) FenceSharedForGmma();  // the staged rows, before IGMMA reads them
  TraceMark(kTraceStaged);
  WaitForPreviousGrid();  // the staging above overlapped QuantizeQueryKernel
  TraceMark(kTracePrevGrid);
  // The scales are read back only after the cluster barrier below; copied here, their global
  // load is off that critical path (read after it: +0.8 us at 128 heads batch 8, run 34).
  if (tid < 16 * part_tiles) {
    ms.qscale[tid] = queries.scales[head0 + tid];
    ms.qsum[tid] = queries.sums[head0 + tid];
  }

  // This warp's 16-head tile and its two heads per lane (C rows lane / 4 and + 8).
  const int mt = warp % kMTiles, slot = warp / kMTiles;
  const int r = lane >> 2, t = lane & 3;
  const int h0 = 16 * mt + r, h1 = h0 + 8;
  // Warps past kSlots per tile, and those of a part's missing tiles, idle in the passes.
  const int warp_tiles = kEvenParts || (slot < kSlots && mt < part_tiles) ? tiles : 0;
  uint32_t a[NC / 32][4];
  uint32_t ag[kGmma && kQueryRows == 0 ? 4 : 1][4];
  if constexpr (kQueryRows > 0) {  // one warp per tile writes its A rows
    if (slot == 0) {
      LoadQueryFragments<NC>(queries.frags, head0 / 16 + mt, lane, a);
      StoreGmmaQueryRows(a, mt, lane, query_s);
      FenceSharedForGmma();
    }
  } else {
    if (kEvenParts || warp_tiles > 0) {
      LoadQueryFragments<NC>(queries.frags, head0 / 16 + mt, lane, a);
    }
    if constexpr (kGmma) GmmaQueryFragments(a, lane, ag);
  }
  __syncthreads();
  TraceMark(kTraceQueries);
  LaneHeadPair lhp;
  const int off0 = 8 * ms.qsum[h0], off1 = 8 * ms.qsum[h1];
  // Integer dots of tile `tile` (candidates 8 tile ..; this lane's 16-byte fragment chunks q
  // of their rows at frag0[q] + the tile's offset: swizzled by row, so one pointer per chunk),
  // LaneHeadPair's layout. The accumulators start at kDotFloatBias minus the query's code
  // offset, so the IMMA yields sum_c qcode[c] * code[c] plus the bias (ScaledDots).
  constexpr int kFragChunks = NC / 64;  // 16-byte fragment chunks per lane and candidate
  const uint32_t* frag0[kFragChunks];
#pragma unroll
  for (int q = 0; q < kFragChunks; ++q) {
    frag0[q] = codes_s + MlaChunkWord<NC>(r, t * kFragChunks + q);
  }
  auto tile_dots = [&](int tile, int(&d)[4]) {
    d[0] = d[1] = kDotFloatBias - off0;
    d[2] = d[3] = kDotFloatBias - off1;
#pragma unroll
    for (int q = 0; q < kFragChunks; ++q) {
      const uint4 f = *reinterpret_cast<const uint4*>(frag0[q] + 8 * tile * MlaRowWords<NC>());
      MmaS8U8(d, a[2 * q], f.x, f.y);
      MmaS8U8(d, a[2 * q + 1], f.z, f.w);
    }
  };
  auto tile_scales = [&](int tile) {
    return *reinterpret_cast<const float2*>(scale_s + 8 * tile + 2 * t);
  };

  // One pass over 32-slot chunks (tls_math.h's chunk-local shifts: no max pass before the
  // exps). A warp takes chunks slot, slot + kSlots, ... of its 16-head tile; per chunk a max
  // phase over its four tiles, the chunk's shifts, then an exp phase: the exps go where EXPS
  // keeps them, their sums and the shifts into the chunk table.
  const int chunks = span / kTlsSoftmaxChunk;
  const int warp_chunks = warp_tiles / 4;
  const int table_n = chunks * kHeads;
  float* const chunk_c =
      kTableInHist ? reinterpret_cast<float*>(&sh.hist[0][0]) : reinterpret_cast<float*>(table_s);
  uint32_t* const chunk_sum = reinterpret_cast<uint32_t*>(chunk_c + table_n);
  const float exp_scale = p.scale * kTlsLog2E;
  const float a0 = TlsMul(ms.qscale[h0], exp_scale), a1 = TlsMul(ms.qscale[h1], exp_scale);
  auto commit_chunk = [&](int q) {
    lhp.CommitChunk(chunk_c, chunk_sum, q * kHeads + 16 * mt + r, q * kHeads + 16 * mt + r + 8, t);
  };
  // This cluster's slice of the scratch: the heads' rows [head][slot], floats (cta_exps: this
  // CTA's slots); kScratch's pairs fill the upper half of the rows, the alpha partials of SPLIT
  // > 1 go into the lower half.
  float* const cta_exps = exps + head0 * p.max_candidates + rank * span;
  // The exps' rows (the alpha pass reads them): pair (or head) rows of `exp_stride` words from
  // `exp_rows`.
  uint32_t* const exp_rows = EXPS == MlaExps::kScratch
                                 ? ScratchPairs(exps, head0, kHeads, p.max_candidates) + rank * span
                                 : reinterpret_cast<uint32_t*>(exps_s);
  const int64_t exp_stride = EXPS == MlaExps::kScratch ? p.max_candidates : exps_s_stride;
  const int store_end = p.max_candidates - rank * span - 2 * t;
  // This lane's pairs of slots of tile `tile` in the exps' rows (heads h0 / h1 for kSmemFloats,
  // whose rows hold the max phase's scaled dots before the exps: the logits computed once;
  // pair 8 mt + r else).
  float* const smem_at0 = exps_s + h0 * exps_s_stride + 2 * t;
  float* const smem_at1 = exps_s + h1 * exps_s_stride + 2 * t;
  uint32_t* const pair_at = exp_rows + (8 * mt + r) * exp_stride + 2 * t;
  auto store_pairs = [&](int tile, const uint32_t(&w)[2]) {
    if constexpr (EXPS == MlaExps::kScratch) {
      StoreTilePairs(pair_at + 8 * tile, 8 * tile < store_end, w);
    } else {  // inside the CTA's rows: every slot stores
      *reinterpret_cast<uint2*>(pair_at + 8 * tile) = make_uint2(w[0], w[1]);
    }
  };
  if constexpr (kGmma) {  // one IGMMA per chunk: its 16 dots serve both phases
    // The descriptors' low words: the warpgroup's A rows (64 heads: tiles mt - mt % 4 ..) and
    // chunk 0's B rows, which the chunks step through.
    const uint32_t a_lo =
        kQueryRows > 0 ? GmmaRowsLo(query_s + 16 * (mt & ~3) * MlaRowWords<NC>()) : 0u;
    const uint32_t b_lo0 = GmmaRowsLo(codes_s);
    constexpr uint32_t kChunkStep = GmmaRowsLoStep(8 * kGmmaTiles * NC);
    for (int q = slot; q < tiles / kGmmaTiles; q += kSlots) {
      int d[4 * kGmmaTiles];
#pragma unroll
      for (int n = 0; n < kGmmaTiles; ++n) {
        d[4 * n] = d[4 * n + 1] = kDotFloatBias - off0;
        d[4 * n + 2] = d[4 * n + 3] = kDotFloatBias - off1;
      }
      const uint32_t b_lo = b_lo0 + kChunkStep * q;
      if constexpr (kQueryRows > 0) {
        GmmaRowDots(d, a_lo, b_lo);
      } else {
        GmmaRowDots(d, ag, b_lo);
      }
      float y[kGmmaTiles][4];
#pragma unroll
      for (int n = 0; n < kGmmaTiles; ++n) {
        const int dn[4] = {d[4 * n], d[4 * n + 1], d[4 * n + 2], d[4 * n + 3]};
        LaneHeadPair::ScaledDots(dn, tile_scales(kGmmaTiles * q + n), y[n]);
        lhp.AddMax(y[n]);
      }
      lhp.ChunkShifts(a0, a1);
#pragma unroll
      for (int n = 0; n < kGmmaTiles; ++n) {
        float e[4];
        uint32_t w[2];
        lhp.Exps(y[n], e, w);
        store_pairs(kGmmaTiles * q + n, w);
      }
      commit_chunk(q);
    }
  } else {
    // Tiles in flight per phase: one where the exp phase takes its dots from mma.sync again
    // (two spilled 32-56 bytes in the 16-64-head scratch kernels, ptxas), two where it reads
    // kSmemFloats' scaled dots back.
    constexpr int kTileUnroll = EXPS == MlaExps::kSmemFloats ? 2 : 1;
    for (int q = slot; q < warp_chunks; q += kSlots) {
      // Max phase: the chunk's four tiles (kSmemFloats keeps their scaled dots).
#pragma unroll kTileUnroll
      for (int n = 0; n < 4; ++n) {
        const int tile = 4 * q + n;
        int d[4];
        tile_dots(tile, d);
        float y[4];
        LaneHeadPair::ScaledDots(d, tile_scales(tile), y);
        lhp.AddMax(y);
        if constexpr (EXPS == MlaExps::kSmemFloats) {
          *reinterpret_cast<float2*>(smem_at0 + 8 * tile) = make_float2(y[0], y[1]);
          *reinterpret_cast<float2*>(smem_at1 + 8 * tile) = make_float2(y[2], y[3]);
        }
      }
      lhp.ChunkShifts(a0, a1);
      // Exp phase: the scaled dots again (kSmemFloats: read back, this lane's own).
#pragma unroll kTileUnroll
      for (int n = 0; n < 4; ++n) {
        const int tile = 4 * q + n;
        float e[4];
        uint32_t w[2];
        if constexpr (EXPS == MlaExps::kSmemFloats) {
          const float2 y0 = *reinterpret_cast<const float2*>(smem_at0 + 8 * tile);
          const float2 y1 = *reinterpret_cast<const float2*>(smem_at1 + 8 * tile);
          const float y[4] = {y0.x, y0.y, y1.x, y1.y};
          lhp.Exps(y, e, w);
          *reinterpret_cast<float2*>(smem_at0 + 8 * tile) = make_float2(e[0], e[1]);
          *reinterpret_cast<float2*>(smem_at1 + 8 * tile) = make_float2(e[2], e[3]);
        } else {
          int d[4];
          tile_dots(tile, d);
          lhp.Exps(d, tile_scales(tile), e, w);
          store_pairs(tile, w);
        }
      }
      commit_chunk(q);
    }
  }
  lhp.CommitMax(&ms.max_bits[h0], &ms.max_bits[h1], t);
  __syncthreads();     // this CTA's chunk table and max shifts
  TraceMark(kTraceLoop);
  ClusterWait();       // every rank's cluster-wide values and mailboxes are set up
  if (tid < kHeads) {
    ms.c_max[tid] = FromOrderedBits(ms.cluster.Max(tid, ms.max_bits[tid], rank, size));
  }
  if (warp == kFusedWarps - 1) {
    const int v = __reduce_add_sync(0xffffffffu, lane < kFusedWarps ? sh.part_valid[lane] : 0);
    if (lane == 0) sh.counts[0] = v;
  }
  __syncthreads();
  TraceMark(kTraceCmax);
  const int live_heads = 16 * part_tiles;
  AddChunkSums(chunk_c, chunk_sum, table_n, kHeads, live_heads, ms.c_max, ms.exp_sum);
  __syncthreads();  // this CTA's sums, to every rank's cluster-wide ones
  if (tid < kHeads) {
    ms.inv[tid] = TlsInvDenominator(ms.cluster.ExpSum(tid, ms.exp_sum[tid], rank, size), GROUP);
  }
  if (tid == kFusedThreads - 1) sh.num_valid = ms.cluster.Valid(sh.counts[0], rank, size);
  __syncthreads();
  TraceMark(kTraceSums);
  ChunkWeights(chunk_c, chunk_sum, table_n, kHeads, live_heads, ms.c_max, ms.inv);
  __syncthreads();
  TraceMark(kTraceWeights);

  // The alpha pass: each candidate's thread reads its exps back (written by this CTA before the
  // barriers above; plain loads, not the read-only path) and sums the heads (tls_math.h order)
  // with its chunk's weights. A split row's parts leave partial chains in the scratch: part 0
  // its heads' (the chain's first kMTiles partials, added) in head 0's row, the others each
  // 16-head partial in row k.
  constexpr int kTileRows = EXPS == MlaExps::kSmemFloats ? 16 : 8;  // exp rows per 16 heads
  float alpha[ITEMS];
#pragma unroll
  for (int u = 0; u < ITEMS; ++u) {
    const int cand = u * kFusedThreads + tid;
    const uint32_t* e = exp_rows + cand;
    const float* weight =
        reinterpret_cast<const float*>(chunk_sum) + cand / kTlsSoftmaxChunk * kHeads;
    float* partial = cta_exps + cand;
    alpha[u] = 0.f;
    if (pos[u] < 0) continue;
    if constexpr (SPLIT == 1) {
      alpha[u] = AlphaChain<EXPS, GROUP>(e, exp_stride, weight);
    } else if (part == 0) {
      *partial = AlphaChain<EXPS, kHeads>(e, exp_stride, weight);
    } else {
#pragma unroll
      for (int k = 0; k < kMTiles; ++k) {
        if (k >= part_tiles) break;
        partial[int64_t{k} * p.max_candidates] =
            AlphaChain<EXPS, 16>(e + k * kTileRows * exp_stride, exp_stride, weight + 16 * k);
      }
    }
  }
  TraceMark(kTraceAlpha);
  if constexpr (kTableInHist) {  // the top-k's first histogram, after every weight is read
    __syncthreads();
    for (int i = tid; i < kClusterSelectBins; i += kFusedThreads) sh.hist[0][i] = 0;
    __syncthreads();
  }
  if constexpr (SPLIT > 1) {  // the row's last cluster to get here adds the partials, selects
    if (!ms.tickets.IsLastCluster(queries.row_done + bg, SPLIT, rank, size)) return;
    TraceMark(kTraceTicket);
#pragma unroll
    for (int u = 0; u < ITEMS; ++u) {
      if (pos[u] < 0) continue;
      // Slot u of this CTA in the row's scratch: part 0's partial sum in head 0's row, part q's
      // tile partials in the rows of heads q kHeads + k (L2 loads: any cluster wrote them).
      const float* row =
          exps + int64_t{bg} * GROUP * p.max_candidates + rank * span + u * kFusedThreads + tid;
      alpha[u] = __ldcg(row);
#pragma unroll
      for (int q = 1; q < SPLIT; ++q) {
#pragma unroll
        for (int k = 0; k < kMTiles; ++k) {
          if (q * kMTiles + k >= kGroupTiles) break;
          alpha[u] = TlsAdd(alpha[u], __ldcg(row + int64_t{q * kHeads + k} * p.max_candidates));
        }
      }
    }
    TraceMark(kTracePartials);
  }
  uint32_t key[ITEMS];
#pragma unroll
  for (int u = 0; u < ITEMS; ++u) key[u] = pos[u] >= 0 ? TlsOrderedBits(alpha[u]) : 0u;
  if (local_topk) {
    GatherThenSelect<ITEMS>(rank, size, span, reinterpret_cast<uint64_t*>(codes_s),
                            &sh.mail[kMailTotals], pos, key, sh.num_valid, sel, geo, bg);
  } else {
    ClusterSelect<ITEMS>(cluster, sh, pos, key, sh.num_valid, sel, geo, bg);
  }
  TraceMark(kTraceEnd);
}

// ---- MLA by head tiles ----------------------------------------------------------------------
// One cluster per (row, 16-head tile) instead of per row: a row's 16-128 heads spread over
// G / 16 clusters, so one row of 128 heads runs on 64 SMs (8 clusters of 8 CTAs) where a
// cluster per row got 16. The per-head max and exp sums stay inside the cluster; each cluster
// leaves its tile's partial alpha chain (tls_math.h: 16-head chains added in tile order) in the
// exp scratch row of the tile's first head, and the row's last cluster to finish (a counter
// that QuantizeQueryKernel zeroes; no waiting on other clusters) adds the partials in tile
// order and runs the top-k. A cluster of `size` CTAs holds ITEMS candidates per thread (the
// candidate order of ClusterSelect); the INT4 rows are read per 8-candidate tile from L1/L2,
// with no staging (one 16-head tile uses each row once per pass). The tile's exps stay in
// shared memory as bf16 pairs (H100, 128 heads batch 1: 0.6-0.8 us off the token branch
// against the L2 scratch, run 153).
template <int NC, int ITEMS>
__global__ void __launch_bounds__(kFusedThreads, 1)
    MlaTileSelectKernel(TlsTokenScoreParams p, TlsTokenSelectParams sel,
                        tls_detail::TokenQueries queries, float* exps) {
  constexpr int kSpan = ITEMS * kFusedThreads;  // candidate slots per CTA
  constexpr int kHeads = kTlsAlphaHeadTile;
  __shared__ ClusterSelectShared<ITEMS> sh;
  __shared__ uint32_t max_bits[kHeads];
  __shared__ unsigned long long exp_sum[kHeads];
  __shared__ ClusterStats<kHeads> stats;
  __shared__ float qscale[kHeads], inv[kHeads], c_max[kHeads];
  __shared__ RowTickets tickets;
  extern __shared__ __align__(16) int64_t tile_smem[];
  int64_t* tok_s = tile_smem;                                 // [slot] token row (-1: none)
  float* scale_s = reinterpret_cast<float*>(tok_s + kSpan);  // [slot] token scale (NaN: none)
  int32_t* pos_s = reinterpret_cast<int32_t*>(scale_s + kSpan);  // [slot] position (-1: none)
  // [pair][slot]: the tile's exps as bf16 head pairs (ScratchPairs' layout, kept in the CTA).
  uint32_t* pairs_s = reinterpret_cast<uint32_t*>(pos_s + kSpan);
  constexpr int kPairStride = MlaSmemExpStride(kSpan);
  cg::cluster_group cluster = cg::this_cluster();
  const int rank = static_cast<int>(cluster.block_rank());
  const int size = static_cast<int>(cluster.num_blocks());
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int group = p.num_q_heads / p.num_kv_heads, tiles = group / kHeads;
  const int bg = blockIdx.y / tiles, head_tile = blockIdx.y % tiles;
  const int b = bg / p.num_kv_heads;
  const int32_t select_len = p.maybe_select_lens ? p.maybe_select_lens[b] : p.seq_lens[b];
  const TlsGeometry geo = MakeTlsGeometry(p.seq_lens[b], select_len, p.sink_blocks, p.window);
  const int64_t head0 = int64_t{bg} * group + head_tile * kHeads;

  if (tid < kHeads) {
    max_bits[tid] = 0u;
    exp_sum[tid] = 0ull;
  }
  if (warp == 0) {  // as in TokenScoreSelectKernel: ordered by warp 0's release arrive below
    stats.Init(kHeads, size, lane);
    if (lane == 0) {
      tickets.Init(size);  // fenced by InitSelectMail's FenceMbarInit
      InitSelectMail(sh, size);
    }
  }
  int valid_warp = 0;
  {  // positions, rows and scales to shared memory: registers are short in the passes
    int32_t pos[ITEMS];
    int64_t tok[ITEMS];
    CandidatePositions<ITEMS>(p, geo, bg, rank, kSpan, pos, tok);
#pragma unroll
    for (int u = 0; u < ITEMS; ++u) {
      const int slot = u * kFusedThreads + tid;
      pos_s[slot] = pos[u];
      tok_s[slot] = pos[u] >= 0 ? tok[u] : -1;
      scale_s[slot] = pos[u] >= 0 ? __ldg(p.token_scales + tok[u]) : __int_as_float(0x7fc00000);
      valid_warp += __popc(__ballot_sync(0xffffffffu, pos[u] >= 0));
    }
  }
  if (lane == 0) sh.part_valid[warp] = valid_warp;
  ClusterArrive(warp == 0);
  const int r = lane >> 2, t = lane & 3;
  WaitForPreviousGrid();  // the staging above overlapped QuantizeQueryKernel
  uint32_t a[NC / 32][4];
  LoadQueryFragments<NC>(queries.frags, head0 / kHeads, lane, a);
  LaneHeadPair lhp;
  if (tid < kHeads) qscale[tid] = queries.scales[head0 + tid];  // see MlaScoreSelectKernel
  const int off0 = 8 * queries.sums[head0 + r], off1 = 8 * queries.sums[head0 + r + 8];
  __syncthreads();

  // Integer dots of candidate tile `ct` (slots 8 ct ..), LaneHeadPair's layout. Lane (r, t)
  // reads candidate 8 ct + r's row: the words of its nibble half (t % 2) and word parity
  // (t / 2), unpacked to the B fragments' bytes.
  auto tile_dots = [&](int ct, int (&d)[4]) {
    d[0] = d[1] = kDotFloatBias - off0;
    d[2] = d[3] = kDotFloatBias - off1;
    const int64_t row = tok_s[8 * ct + r];
    const uint4* src =
        reinterpret_cast<const uint4*>(p.token_codes + max(row, int64_t{0}) * (NC / 2));
    const int shift = 4 * (t & 1);
#pragma unroll
    for (int sl = 0; sl < NC / 32; ++sl) {
      const uint4 w = row >= 0 ? __ldg(src + sl) : make_uint4(0u, 0u, 0u, 0u);
      const uint32_t b0 = ((t >> 1) ? w.y : w.x) >> shift & 0x0f0f0f0fu;
      const uint32_t b1 = ((t >> 1) ? w.w : w.z) >> shift & 0x0f0f0f0fu;
      MmaS8U8(d, a[sl], b0, b1);
    }
  };
  auto tile_scales = [&](int ct) {
    return *reinterpret_cast<const float2*>(scale_s + 8 * ct + 2 * t);
  };

  // One pass over 32-slot chunks (as MlaScoreSelectKernel's; warp w takes chunks w, w + 32,
  // ...): the max phase, the chunk's shifts, the exp phase (bf16 pairs into pairs_s), the chunk
  // table in the top-k's histograms (zeroed again before the top-k).
  constexpr int kChunks = kSpan / kTlsSoftmaxChunk;
  static_assert(2 * kChunks * kHeads * sizeof(uint32_t) <= kChunkTableInHist, "table in hist");
  float* const chunk_c = reinterpret_cast<float*>(&sh.hist[0][0]);
  uint32_t* const chunk_sum = reinterpret_cast<uint32_t*>(chunk_c + kChunks * kHeads);
  const float exp_scale = p.scale * kTlsLog2E;
  const float a0 = TlsMul(qscale[r], exp_scale), a1 = TlsMul(qscale[r + 8], exp_scale);
  uint32_t* const at = pairs_s + r * kPairStride + 2 * t;
  for (int q = warp; q < kChunks; q += kFusedWarps) {
#pragma unroll 2
    for (int n = 0; n < 4; ++n) {
      int d[4];
      tile_dots(4 * q + n, d);
      lhp.AddMax(d, tile_scales(4 * q + n));
    }
    lhp.ChunkShifts(a0, a1);
#pragma unroll 2
    for (int n = 0; n < 4; ++n) {
      const int ct = 4 * q + n;
      int d[4];
      tile_dots(ct, d);
      float e[4];
      uint32_t w[2];
      lhp.Exps(d, tile_scales(ct), e, w);
      *reinterpret_cast<uint2*>(at + 8 * ct) = make_uint2(w[0], w[1]);
    }
    lhp.CommitChunk(chunk_c, chunk_sum, q * kHeads + r, q * kHeads + r + 8, t);
  }
  lhp.CommitMax(&max_bits[r], &max_bits[r + 8], t);
  __syncthreads();  // this CTA's chunk table and max shifts
  ClusterWait();    // every rank's statistics and mailboxes are set up
  if (tid < kHeads) c_max[tid] = FromOrderedBits(stats.Max(tid, max_bits[tid], rank, size));
  if (warp == kFusedWarps - 1) {
    const int v = __reduce_add_sync(0xffffffffu, sh.part_valid[lane]);
    if (lane == 0) sh.counts[0] = v;
  }
  __syncthreads();
  AddChunkSums(chunk_c, chunk_sum, kChunks * kHeads, kHeads, kHeads, c_max, exp_sum);
  __syncthreads();  // this CTA's sums
  if (tid < kHeads)
    inv[tid] = TlsInvDenominator(stats.ExpSum(tid, exp_sum[tid], rank, size), group);
  if (tid == kFusedThreads - 1) sh.num_valid = stats.Valid(sh.counts[0], rank, size);
  __syncthreads();
  ChunkWeights(chunk_c, chunk_sum, kChunks * kHeads, kHeads, kHeads, c_max, inv);
  __syncthreads();

  // (3) The tile's partial alpha chain per candidate, into the scratch row of head 0 of the
  // tile.
  float* const cta_exps = exps + head0 * p.max_candidates + rank * kSpan;
#pragma unroll
  for (int u = 0; u < ITEMS; ++u) {
    const int cand = u * kFusedThreads + tid;
    if (pos_s[cand] >= 0) {
      const float* weight =
          reinterpret_cast<const float*>(chunk_sum) + cand / kTlsSoftmaxChunk * kHeads;
      cta_exps[cand] = AlphaFromBf16Pairs<kHeads>(pairs_s + cand, kPairStride, weight);
    }
  }
  __syncthreads();  // every weight is read: the top-k's first histogram
  for (int i = tid; i < kClusterSelectBins; i += kFusedThreads) sh.hist[0][i] = 0;
  __syncthreads();
  // The row's last cluster to get here selects; the others leave.
  if (tiles > 1 && !tickets.IsLastCluster(queries.row_done + bg, tiles, rank, size)) return;
  int32_t pos[ITEMS];
  uint32_t key[ITEMS];
#pragma unroll
  for (int u = 0; u < ITEMS; ++u) {
    pos[u] = pos_s[u * kFusedThreads + tid];
    float alpha = 0.f;
    if (pos[u] >= 0) {  // the partials in tile order (L2 loads: other clusters wrote them)
      const float* part = exps + int64_t{bg} * group * p.max_candidates + rank * kSpan +
                          u * kFusedThreads + tid;
      alpha = __ldcg(part);
      for (int k = 1; k < tiles; ++k) {
        alpha = TlsAdd(alpha, __ldcg(part + int64_t{k} * kHeads * p.max_candidates));
      }
    }
    key[u] = pos[u] >= 0 ? TlsOrderedBits(alpha) : 0u;
  }
  ClusterSelect<ITEMS>(cluster, sh, pos, key, sh.num_valid, sel, geo, bg);
}

constexpr size_t MlaTileSmem(int items) {  // tok_s, scale_s, pos_s, pairs_s
  return size_t(items) * kFusedThreads * (sizeof(int64_t) + sizeof(float) + sizeof(int32_t)) +
         size_t(kTlsAlphaHeadTile / 2) * MlaSmemExpStride(items * kFusedThreads) * sizeof(uint32_t);
}

int MlaTileClusters(const TlsTokenScoreParams& p) {
  return p.batch * p.num_kv_heads * (p.num_q_heads / p.num_kv_heads) / kTlsAlphaHeadTile;
}

template <int NC, int ITEMS>
cudaError_t LaunchMlaTiles(const TlsTokenScoreParams& p, const TlsTokenSelectParams& sel,
                           cudaStream_t stream) {
  const cudaError_t err = tls_detail::QuantizeTokenQueries(p, stream);
  if (err != cudaSuccess) return err;
  return LaunchClustersAfterQueries<MlaTileSelectKernel<NC, ITEMS>>(
      FusedClusterSize(p.max_candidates, ITEMS), MlaTileClusters(p), MlaTileSmem(ITEMS), stream, p,
      sel, tls_detail::TokenQueriesIn(p), tls_detail::StoredExps(p));
}

// Whether every (row, head tile) cluster at one candidate per thread is resident at once (not
// the SM count: 2 rows of 128 heads make 16 clusters of 8 CTAs; the H200 runs 15 at once, the
// H100 fewer than 16 too, bench/results/tls-kernels-h200.md run 115).
template <int NC>
bool MlaTilesFitOneWave(const TlsTokenScoreParams& p) {
  return MlaTileClusters(p) <= MaxActiveClusters<MlaTileSelectKernel<NC, 1>>(
                                   FusedClusterSize(p.max_candidates, 1), MlaTileSmem(1));
}

// One candidate per thread when the clusters fit one wave, else two (clusters of half the size;
// waves beyond the first are correct, only slower).
template <int NC>
cudaError_t LaunchMlaTilesForItems(const TlsTokenScoreParams& p, const TlsTokenSelectParams& sel,
                                   cudaStream_t stream) {
  return MlaTilesFitOneWave<NC>(p) ? LaunchMlaTiles<NC, 1>(p, sel, stream)
                                   : LaunchMlaTiles<NC, 2>(p, sel, stream);
}

// CTAs per cluster for `clusters` clusters of a one-launch MLA kernel over rows of up to
// `max_candidates`, each CTA holding whole list entries (at least kMlaMinBlocks, so cluster
// barriers stay a small share, at most `max_blocks`) and every cluster resident at once: the
// most (up to kClusterMaxRanks), or with `fewest` the fewest; and the list entries each CTA
// holds; size 0 when none is. The fewest: a row's cluster costs about the same time on fewer
// SMs (its phases are latency-bound), and the lagged step's block branch, beside it on the other
// stream, needs SMs the cluster leaves free (H100, 16-64 heads, 8 rows of 8,192 candidates: 8
// CTAs of 16 entries instead of 9 of 15 took 1.5-3.6 us off the batch-8 128K step, the token
// kernel alone 0-0.6 us slower; bench/results/tls-kernels-h200.md runs 104-105).
constexpr int kMlaMinBlocks = 4;

// Whether `ctas` CTAs (one per SM) take half the GPU or more: from there the MLA row clusters
// run on the fewest CTAs, leaving the block branch beside them the rest.
bool FillsHalfTheGpu(int64_t ctas) { return 2 * ctas >= NumSms(); }

struct MlaSplit {
  int size = 0, blocks_per_cta = 0;
};

template <auto KERNEL>
MlaSplit MlaClusterSize(int clusters, int max_candidates, int max_blocks, size_t smem,
                        bool fewest = false) {
  const int blocks = (max_candidates + kKvBlockSize - 1) / kKvBlockSize;
  const int most = std::clamp(blocks / kMlaMinBlocks, 1, kClusterMaxRanks);
  const int least = std::max(1, (blocks + max_blocks - 1) / max_blocks);
  for (int i = 0; i <= most - least; ++i) {
    const int size = fewest ? least + i : most - i;
    const int per = (blocks + size - 1) / size;
    if ((blocks + per - 1) / per < size) continue;  // a CTA would be empty
    if (clusters <= MaxActiveClusters<KERNEL>(size, smem)) return {size, per};
  }
  return {};
}

// MlaScoreSelectKernel<NC, GROUP, SPLIT, ITEMS, EXPS>'s clusters for `rows` rows (Plan: the
// most CTAs, which LaunchMlaScoreSelect weighs), and its launch.
template <int NC, int GROUP, int SPLIT, int ITEMS, MlaExps EXPS = MlaExps::kScratch>
struct MlaRows {
  static constexpr auto kKernel = MlaScoreSelectKernel<NC, GROUP, SPLIT, ITEMS, EXPS>;
  static constexpr int kHeads = MlaPartHeads(GROUP, SPLIT);
  static constexpr int kExpRows = MlaSmemExpRows(EXPS, kHeads);
  static constexpr bool kGmma = MlaUsesGmma(NC, GROUP, SPLIT, EXPS);
  static constexpr int kMaxBlocks = MlaMaxBlocks<NC>(ITEMS, kHeads, kExpRows, kGmma);
  static constexpr size_t kSmem = MlaRowSmem<NC, GROUP, SPLIT, ITEMS, EXPS>();

  static MlaSplit Plan(int rows, int max_candidates) {
    return MlaClusterSize<kKernel>(SPLIT * rows, max_candidates, kMaxBlocks, kSmem);
  }
  static cudaError_t Launch(const TlsTokenScoreParams& p, const TlsTokenSelectParams& sel,
                            MlaSplit split, cudaStream_t stream) {
    const cudaError_t err = tls_detail::QuantizeTokenQueries(p, stream);
    if (err != cudaSuccess) return err;
    // The fewest CTAs where the plan's most would take half the GPU or more (the rows leave the
    // block branch too few SMs); fewer rows keep the most (batch 1: 16 CTAs of 8 list entries
    // 0.2-5.8 us faster than 8 of 16 at 16-64 heads, run 112; the fewest from a quarter of the
    // GPU made batch 4 0.7-9.7 us slower, run 116).
    if (ITEMS == 1 && FillsHalfTheGpu(int64_t{SPLIT} * p.batch * p.num_kv_heads * split.size)) {
      const MlaSplit fewest = MlaClusterSize<kKernel>(SPLIT * p.batch * p.num_kv_heads,
                                                      p.max_candidates, kMaxBlocks, kSmem, true);
      if (fewest.size != 0) split = fewest;
    }
    return LaunchClustersAfterQueries<kKernel>(split.size, SPLIT * p.batch * p.num_kv_heads, kSmem,
                                               stream, p, sel, tls_detail::TokenQueriesIn(p),
                                               tls_detail::StoredExps(p), split.blocks_per_cta);
  }
};

// The one-launch MLA kernel (MlaScoreSelectKernel: a cluster per row, or per half of a row's
// heads), or a cluster per (row, 16-head tile) (MlaTileSelectKernel: fills the GPU from one row).
// A row's cluster computes every logit twice on its own SMs. For up to 32 heads that wins at
// every batch (H100, batch 1: 16 CTAs of 8 list entries, 16-64 heads 2-9 us faster than 1-4
// head-tile clusters, run 112; at 64 heads the halves below now beat both, the tiles by 0.5-1.1
// us, run 149). At 128 heads one row now runs in quarters of 32 heads (below, run 154); before
// them the head tiles won only while they fit one wave at one candidate per thread (one row: 26
// vs 28-31 us for the token kernel on the H100, run 114);
// in a second wave or at two candidates per thread they lose to the row clusters (batch 2: 43 us
// in two waves against 30 on halves; batch 4: 59 us at two candidates against 35 on whole rows).
// A row's heads go to two clusters (half each; two candidates per thread) when that cuts the
// logits per CTA by more than ~15% and the whole rows' clusters take under half the GPU: 2 rows
// of 128 heads on the H100, 30 us on halves against 33 on whole rows (run 114); 1-2 rows of 64
// heads, 16 CTAs of 32 heads each, 1.0-1.1 us off the token branch (run 148). From half the
// GPU the whole rows run on the fewest CTAs (MlaRows::Launch): 8 rows of 8,192 candidates take
// 8 clusters of 8 (64 SMs, 16 list entries x 128 heads per CTA) where the halves took 16 of 6
// (96 SMs, 22 x 64). The token kernel alone is then ~1.9 us slower, but the block branch beside
// it gets the SMs, and the batch-8 step was 0.8-2.9 us faster at k_t 2048 (H100, run 118).
template <int NC, int GROUP>
cudaError_t LaunchMlaScoreSelect(const TlsTokenScoreParams& p, const TlsTokenSelectParams& sel,
                                 cudaStream_t stream) {
  using Whole = MlaRows<NC, GROUP, 1, 1>;
  const int rows = p.batch * p.num_kv_heads;
  const MlaSplit whole = Whole::Plan(rows, p.max_candidates);
  if constexpr (GROUP >= 64) {  // 32 heads measured slower split (overheads win)
    using Halves = MlaRows<NC, GROUP, 2, 2>;
    const MlaSplit halves = Halves::Plan(rows, p.max_candidates);
    // Quarters (32 or 16 heads), their exps in shared memory, while they take under half the
    // GPU and hold no more list entries per CTA than the halves (batch 1: 64 SMs where the
    // halves take 32; H100, 128 heads: 2.3-2.5 us off the token branch against the head tiles,
    // run 154; 64 heads: 0.3-0.6 us off the step against the halves, run 157).
    using Quarters = MlaRows<NC, GROUP, 4, 1, MlaExps::kSmemFloats>;
    const MlaSplit quarters = Quarters::Plan(rows, p.max_candidates);
    if (quarters.size != 0 && !FillsHalfTheGpu(int64_t{4} * rows * quarters.size) &&
        (halves.size == 0 || quarters.blocks_per_cta <= halves.blocks_per_cta)) {
      return Quarters::Launch(p, sel, quarters, stream);
    }
    // 128 heads where the quarters do not fit one wave (batch 2): thirds of 48, 48 and 32 heads
    // (their exps in shared memory) when all their clusters fit at the halves' list entries per
    // CTA: 6 clusters of 16 CTAs, 96 SMs where the halves take 64 (H100: 0.7-1.6 us off the
    // token branch, 1.1-1.4 us off the step, run 160).
    if constexpr (GROUP == 128) {
      using Thirds = MlaRows<NC, GROUP, 3, 1, MlaExps::kSmemFloats>;
      const MlaSplit thirds = Thirds::Plan(rows, p.max_candidates);
      if (thirds.size != 0 && halves.size != 0 && thirds.blocks_per_cta <= halves.blocks_per_cta) {
        return Thirds::Launch(p, sel, thirds, stream);
      }
    }
    if (GROUP >= 128 && MlaTilesFitOneWave<NC>(p)) return LaunchMlaTiles<NC, 1>(p, sel, stream);
    // (64 heads: the halves at batch 1-2; from batch 4 the rule below keeps the whole rows.)
    // Not where the whole rows' most CTAs take half the GPU or more: Whole::Launch then runs
    // them on the fewest, which leaves the block branch beside more SMs than the halves do.
    const bool whole_fills_half = whole.size != 0 && FillsHalfTheGpu(int64_t{rows} * whole.size);
    if (halves.size != 0 && !whole_fills_half &&
        (whole.size == 0 || 10 * halves.blocks_per_cta <= 17 * whole.blocks_per_cta)) {
      // The halves' exps in shared memory where that takes as many CTAs (H100, 64 heads batch
      // 1-2: 1.6 us off the token branch, run 153; one candidate per thread, 0.3-0.5 us more,
      // run 154; 128 heads batch 2: 16 CTAs of 8 list entries, whose 64 heads' floats fit, 2.8
      // us off the token branch, run 157).
      using SmemExps = MlaRows<NC, GROUP, 2, 1, MlaExps::kSmemFloats>;
      const MlaSplit split = SmemExps::Plan(rows, p.max_candidates);
      if (split.size == halves.size) return SmemExps::Launch(p, sel, split, stream);
      return Halves::Launch(p, sel, halves, stream);
    }
  }
  if (whole.size == 0) return LaunchMlaTilesForItems<NC>(p, sel, stream);
  // The exps in shared memory where they fit (fewer list entries): floats up to 64 heads, bf16
  // pairs at 128; from 64 heads (8 entries per CTA) only under half the GPU, where the CTAs stay
  // as many (H100, batch 4: 2.7 us off the token branch at 64 heads, run 155; 1.6 us at 128,
  // run 157; from half the GPU the L2 scratch's rows on the fewest CTAs).
  using SmemExps =
      MlaRows<NC, GROUP, 1, 1, GROUP <= 64 ? MlaExps::kSmemFloats : MlaExps::kSmemPairs>;
  const MlaSplit split = SmemExps::Plan(rows, p.max_candidates);
  if (split.size != 0 && (GROUP <= 32 || !FillsHalfTheGpu(int64_t{rows} * split.size))) {
    return SmemExps::Launch(p, sel, split, stream);
  }
  if constexpr (GROUP == 32) {
    // 32 heads where the floats need more CTAs than one wave holds (batch 8: 11 per row, 7
    // clusters of them at once): bf16 pairs on 16 list entries per CTA, half the floats' bytes,
    // so that the alpha pass reads shared memory, not the L2 scratch (run 181).
    using SmemPairs = MlaRows<NC, GROUP, 1, 1, MlaExps::kSmemPairs>;
    const MlaSplit pairs = SmemPairs::Plan(rows, p.max_candidates);
    if (pairs.size != 0) return SmemPairs::Launch(p, sel, pairs, stream);
  }
  return Whole::Launch(p, sel, whole, stream);
}

template <int NC>
cudaError_t LaunchMlaForGroup(const TlsTokenScoreParams& p, const TlsTokenSelectParams& sel,
                              cudaStream_t stream) {
  switch (p.num_q_heads / p.num_kv_heads) {  // UseStoredLogits: 16, 32, 64 or 128
    case 16:
      return LaunchMlaScoreSelect<NC, 16>(p, sel, stream);
    case 32:
      return LaunchMlaScoreSelect<NC, 32>(p, sel, stream);
    case 64:
      return LaunchMlaScoreSelect<NC, 64>(p, sel, stream);
    default:
      return LaunchMlaScoreSelect<NC, 128>(p, sel, stream);
  }
}

}  // namespace

namespace {

// GQA: the group's logits fit one launch (a thread cluster per row, no workspace). group *
// num_channels bounds the per-thread logit work: MLA's 16+ heads x 128 channels on one KV head
// take the MLA kernels instead.
bool FusesInOneLaunch(const TlsTokenScoreParams& p) {
  const int group = p.num_q_heads / p.num_kv_heads;
  return group <= kFusedMaxGroup && group * p.num_channels <= kFusedMaxWork;
}

}  // namespace

bool TlsTokenScoreSelectCanFuse(const TlsTokenScoreParams& p) {
  if (p.num_kv_heads <= 0 || p.num_q_heads % p.num_kv_heads != 0) return false;
  const int group = p.num_q_heads / p.num_kv_heads;
  return group >= 1 && p.max_candidates <= kFusedMaxCluster * kFusedThreads &&
         TlsSelectCanImplement(p.head_dim, p.num_channels, group) &&
         (FusesInOneLaunch(p) ||
          (tls_detail::UseStoredLogits(p) && p.max_candidates % 2 == 0));  // exps in pairs
}

cudaError_t TlsTokenScoreSelect(const TlsTokenScoreParams& p, const TlsTokenSelectParams& sel,
                                cudaStream_t stream) {
  if (p.batch <= 0) return cudaSuccess;
  if (!TlsTokenScoreSelectCanFuse(p) || sel.k < 0 || sel.batch != p.batch ||
      sel.num_kv_heads != p.num_kv_heads) {
    return cudaErrorInvalidValue;
  }
  if (!FusesInOneLaunch(p)) {  // MLA (UseStoredLogits): 64 or 128 channels
    return p.num_channels == 64 ? LaunchMlaForGroup<64>(p, sel, stream)
                                : LaunchMlaForGroup<128>(p, sel, stream);
  }
  switch (p.num_channels) {
    case 16:
      return LaunchForGroup<16>(p, sel, stream);
    case 32:
      return LaunchForGroup<32>(p, sel, stream);
    case 64:
      return LaunchForGroup<64>(p, sel, stream);
    case 128:
      return LaunchForGroup<128>(p, sel, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

cudaError_t TlsTokenTraceRead(unsigned long long* out) {
#if defined(ASYNCTLS_TOKEN_TRACE)
  cudaError_t err = cudaMemcpyFromSymbol(out, g_token_trace, sizeof(g_token_trace));
  void* at = nullptr;
  if (err == cudaSuccess) err = cudaGetSymbolAddress(&at, g_token_trace);
  return err == cudaSuccess ? cudaMemset(at, 0, sizeof(g_token_trace)) : err;
#else
  (void)out;
  return cudaErrorNotSupported;
#endif
}

}  // namespace asynctls::kernels::cuda
