// Device helpers shared by the TLS kernels: typed loads, block-wide scans and the deterministic
// top-k of one row (radix select on the score bits, ties by ascending id).
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <mutex>

#include "asynctls/kernels/tls_math.h"
#include "asynctls/kernels/tls_params.h"

namespace asynctls::kernels::cuda::tls_detail {

// Lets KERNEL launch with `bytes` of dynamic shared memory on the current device. The limit is a
// per-function, per-device attribute that persists, so it is raised once per device and size
// (launch paths run every decode step); it only grows, under a lock, so a smaller request never
// lowers it under a larger one.
template <auto KERNEL>
cudaError_t EnsureDynamicSmem(size_t bytes) {
  constexpr int kMaxDevices = 64;
  static std::atomic<size_t> raised[kMaxDevices] = {};
  static std::mutex mu;
  if (bytes == 0) return cudaSuccess;
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  if (device >= kMaxDevices) {
    return cudaFuncSetAttribute(KERNEL, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes));
  }
  if (raised[device].load(std::memory_order_acquire) >= bytes) return cudaSuccess;
  std::lock_guard<std::mutex> lock(mu);
  if (raised[device].load(std::memory_order_relaxed) >= bytes) return cudaSuccess;
  err = cudaFuncSetAttribute(KERNEL, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes));
  if (err == cudaSuccess) raised[device].store(bytes, std::memory_order_release);
  return err;
}

__device__ __forceinline__ float LoadIo(const void* base, DType dtype, int64_t i) {
  if (dtype == DType::kBF16) {
    return __bfloat162float(static_cast<const __nv_bfloat16*>(base)[i]);
  }
  return static_cast<const float*>(base)[i];
}

__device__ __forceinline__ void StoreIo(void* base, DType dtype, int64_t i, float v) {
  if (dtype == DType::kBF16) {
    static_cast<__nv_bfloat16*>(base)[i] = __float2bfloat16_rn(v);
  } else {
    static_cast<float*>(base)[i] = v;
  }
}

__device__ __forceinline__ float Bf16BitsToFloat(uint16_t bits) {
  return __uint_as_float(static_cast<uint32_t>(bits) << 16);
}

// static_cast<float>(code) of the INT4 code in nibble k of w (code = nibble - 8), exact, without
// an int-to-float conversion (I2F runs at a quarter of the FMA rate on sm_90): 2^23 + nibble is
// built from the bits and 2^23 + 8 subtracted, both exact.
__device__ __forceinline__ float Int4CodeToFloat(uint32_t w, int k) {
  return __fsub_rn(__uint_as_float(0x4B000000u | ((w >> (4 * k)) & 15u)), 8388616.f);
}

// The 8 codes of w, as Int4CodeToFloat(w, 0..7), with fewer integer ops: the even and the odd
// nibbles are masked once each, then one byte permute per code puts its nibble under 2^23's
// exponent (PRMT instead of a shift and a mask per code).
__device__ __forceinline__ void Int4WordToFloats(uint32_t w, float* out) {
  const uint32_t even = w & 0x0F0F0F0Fu, odd = (w >> 4) & 0x0F0F0F0Fu;
#pragma unroll
  for (int k = 0; k < 8; ++k) {
    const uint32_t bits = __byte_perm(k % 2 == 0 ? even : odd, 0x4B000000u, 0x7650u + k / 2);
    out[k] = __fsub_rn(__uint_as_float(bits), 8388616.f);
  }
}

// The MLA token kernels' IMMA accumulators start at kDotFloatBias minus the query's code offset,
// so a dot's int32 bits are those of the float 1.5 * 2^23 + dot (|dot| < 2^22: at most 128
// channels x 127 x 8), and one exact fma gives the scaled dot without an I2F (a quarter of the
// FMA rate on sm_90, and a scoreboard wait in the exp loop): LaneHeadPair::ScaledDots.
constexpr int kDotFloatBias = 0x4B400000;  // bits of 1.5 * 2^23

// The halves of a bf16x2 word (TlsTokenExpPair, the MLA exp scratch) as floats.
__device__ __forceinline__ float Bf16PairLo(uint32_t w) { return __uint_as_float(w << 16); }
__device__ __forceinline__ float Bf16PairHi(uint32_t w) { return __uint_as_float(w & 0xffff0000u); }

// TlsExpToFixed(e) = floor(e * 2^23) for e in [0, 1] (at most 2^23): 1 + e rounded toward zero
// keeps e's whole 2^-23 units (the ulp of [1, 2)), so its bits minus those of 1 are the value.
// Callers sum up to 2^8 of them in 32 bits (a lane's terms, or a warp's through redux).
__device__ __forceinline__ uint32_t ExpFixed(float e) {
  return __float_as_uint(__fadd_rz(e, 1.f)) - 0x3F800000u;
}

// A candidate's alpha from its per-head exps e[hh * stride] and inv[hh] (tls_math.h order:
// kTlsAlphaHeadTile-head fma chains added in tile order). GROUP > 0: the group size at compile
// time (fully unrolled tiles); 0: `group` at run time.
template <int GROUP = 0>
__device__ __forceinline__ float AlphaFromExps(const float* e, int64_t stride, const float* inv,
                                               int group = GROUP) {
  float alpha = 0.f;
  for (int h0 = 0; h0 < group; h0 += kTlsAlphaHeadTile) {
    const int h1 = min(group, h0 + kTlsAlphaHeadTile);
    float part = 0.f;
#pragma unroll
    for (int i = 0; i < kTlsAlphaHeadTile; ++i) {
      if (GROUP > 0 || h0 + i < h1) part = TlsAlphaTerm(e[(h0 + i) * stride], inv[h0 + i], part);
    }
    alpha = h0 == 0 ? part : TlsAdd(alpha, part);
  }
  return alpha;
}

// Inverse of TlsOrderedBits for non-NaN keys.
__device__ __forceinline__ float FromOrderedBits(uint32_t k) {
  return __uint_as_float((k & 0x80000000u) ? (k & 0x7fffffffu) : ~k);
}

template <typename T>
__device__ __forceinline__ T WarpInclusiveSum(T v) {
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const T n = __shfl_up_sync(0xffffffffu, v, o);
    if ((threadIdx.x & 31) >= o) v += n;
  }
  return v;
}

// Block-wide exclusive scan of 0/1-ish ints; returns this thread's exclusive prefix and sets
// *total. `scratch` holds NT / 32 + 1 ints. Contains __syncthreads: call from every thread.
template <int NT>
__device__ __forceinline__ int BlockExclusiveScan(int v, int* scratch, int* total) {
  constexpr int kWarps = NT / 32;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int incl = WarpInclusiveSum(v);
  if (lane == 31) scratch[warp] = incl;
  __syncthreads();
  if (warp == 0) {
    int w = lane < kWarps ? scratch[lane] : 0;
    w = WarpInclusiveSum(w);
    if (lane < kWarps) scratch[lane] = w;  // inclusive per warp
    if (lane == kWarps - 1) scratch[kWarps] = w;
  }
  __syncthreads();
  const int before = warp == 0 ? 0 : scratch[warp - 1];
  *total = scratch[kWarps];
  __syncthreads();  // scratch reusable after return
  return before + incl - v;
}

template <int NT>
__device__ __forceinline__ int BlockSum(int v, int* scratch) {
  int total;
  BlockExclusiveScan<NT>(v, scratch, &total);
  return total;
}

// Token scoring's query side (tls_math.h, integer token logits) of query head `hh` of row
// (b, g), by one warp: the head's NC channel-set entries become int8 codes (held as floats,
// codes[c]) with scale *qscale; returns the sum of the codes (every lane).
template <int NC>
__device__ __forceinline__ int QuantizeHeadWarp(const TlsTokenScoreParams& p, int b, int g,
                                                int hh, float* codes, float* qscale) {
  const int lane = threadIdx.x & 31;
  const int group = p.num_q_heads / p.num_kv_heads;
  constexpr int kPerLane = (NC + 31) / 32;
  float x[kPerLane];
  uint32_t bits = 0u;  // |q| >= 0 orders as its bits
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) {
    const int c = lane + 32 * i;
    x[i] = 0.f;
    if (c < NC) {
      const int ch = p.channels[int64_t{g} * NC + c];
      x[i] = LoadIo(p.q, p.io_dtype,
                    (int64_t{b} * p.num_q_heads + g * group + hh) * p.head_dim + ch);
      bits = max(bits, __float_as_uint(fabsf(x[i])));
    }
  }
  const float scale = TlsInt8Scale(__uint_as_float(__reduce_max_sync(0xffffffffu, bits)));
  int sum = 0;
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) {
    const int c = lane + 32 * i;
    if (c < NC) {
      const int code = TlsInt8Code(x[i], scale);
      codes[c] = static_cast<float>(code);
      sum += code;
    }
  }
  if (lane == 0) *qscale = scale;
  return __reduce_add_sync(0xffffffffu, sum);
}

// TlsInt4Dot (an exact integer sum: any order gives the same value) of one head's NC query
// codes (16-byte aligned shared memory) with a token's INT4 codes: the decoded `codes` when
// HOIST, else decoded from the packed `words` per use.
template <int NC, bool HOIST>
__device__ __forceinline__ float Int4HeadDot(const float* q, const float* codes,
                                             const uint32_t* words) {
  const float4* qh = reinterpret_cast<const float4*>(q);
  float acc = 0.f;
#pragma unroll
  for (int c4 = 0; c4 < NC / 4; ++c4) {
    const float4 qv = qh[c4];
    const float qc[4] = {qv.x, qv.y, qv.z, qv.w};
#pragma unroll
    for (int u = 0; u < 4; ++u) {
      const int c = 4 * c4 + u;
      acc =
          TlsFma(qc[u], HOIST ? codes[HOIST ? c : 0] : Int4CodeToFloat(words[c >> 3], c & 7), acc);
    }
  }
  return acc;
}

// ---- integer token logits on tensor cores -------------------------------------------------
// The token logit's integer sum (tls_math.h) of 16 heads x 8 candidates per mma.sync
// m16n8k32: A = the heads' int8 query codes (signed), B = the candidates' INT4 nibbles 0..15
// (unsigned; the -8 offset comes off afterwards as 8 * the head's code sum). B fragments come
// straight from the packed words: a word's low nibbles (w & 0x0f0f0f0f) hold its even channels,
// the high ones its odd channels, so k runs through each word's channels in the order
// 0 2 4 6 1 3 5 7, and A is built in that order. Exact int32 sums: bit for bit TlsInt4Dot.
__device__ __forceinline__ void MmaS8U8(int (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                        uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k32.row.col.s32.s8.u8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// ---- the same sums on warpgroup MMA (sm_90a IGMMA) ------------------------------------------
// mma.sync runs at about half the tensor cores' rate on sm_90; wgmma.mma_async takes 64 heads x
// N candidates per instruction at the full rate and reads B straight from shared memory. B:
// staged candidate rows of 128 bytes (one u8 code per k), 128-byte swizzled (16-byte chunk c of
// row r at c ^ (r % 8), rows from a 1,024-byte aligned base), k-major; k-slice j is bytes 32 j ..
// 32 j + 31 of each row. A: the heads' codes in registers, the mma.sync A layout per warp.

// Shared-memory matrix descriptor of such rows, as two words: the low one (start address >> 4,
// leading-byte offset 1) from GmmaRowsLo(rows), the high one (8-row groups 1,024 bytes apart,
// layout type 1: 128-byte swizzle) a constant. The loops keep only the low words: the next 32
// rows or k-slice is an add to it (shared addresses stay under 2^18, so the 14-bit start field
// never carries), and the asm below pairs it with kGmmaRowsHi, so that no 64-bit descriptor
// arithmetic is done per IGMMA (12 of 342 SASS instructions per chunk in the 128-head
// batch-8 token kernel's loop, cuobjdump).
inline constexpr uint32_t kGmmaRowsHi = (1024u >> 4) | 1u << 30;
__device__ __forceinline__ uint32_t GmmaRowsLo(const void* rows) {
  const uint32_t addr = static_cast<uint32_t>(__cvta_generic_to_shared(rows));
  return ((addr >> 4) & 0x3fffu) | 1u << 16;
}
// The low-word step of `bytes` further rows' start (a multiple of 16).
__host__ __device__ constexpr uint32_t GmmaRowsLoStep(int bytes) { return uint32_t(bytes) >> 4; }

// d (64 x 32 int32, the wgmma accumulator layout: d[4 n .. 4 n + 3] are 8-column tile n's
// mma.sync C fragment) += A (k-slice registers a) x B (the rows at low word b_lo).
__device__ __forceinline__ void GmmaS8U8N32(int (&d)[16], const uint32_t (&a)[4], uint32_t b_lo) {
  asm volatile(
      "{\n"
      ".reg .b64 b;\n"
      "mov.b64 b, {%20, %21};\n"
      "wgmma.mma_async.sync.aligned.m64n32k32.s32.s8.u8 "
      "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15}, {%16,%17,%18,%19}, b, 1;\n"
      "}\n"
      : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3]), "+r"(d[4]), "+r"(d[5]), "+r"(d[6]),
        "+r"(d[7]), "+r"(d[8]), "+r"(d[9]), "+r"(d[10]), "+r"(d[11]), "+r"(d[12]), "+r"(d[13]),
        "+r"(d[14]), "+r"(d[15])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b_lo), "r"(kGmmaRowsHi));
}

// d += the four k-slices of 128-byte rows (ag[j]: slice j's A registers), waited for.
__device__ __forceinline__ void GmmaRowDots(int (&d)[16], const uint32_t (&ag)[4][4],
                                            uint32_t b_lo) {
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#pragma unroll
  for (int j = 0; j < 4; ++j) GmmaS8U8N32(d, ag[j], b_lo + GmmaRowsLoStep(32 * j));
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
  asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory");
}

// The same with A from shared memory too (a_lo: 64 rows of 128 bytes in B's layout, k-slice j
// at + 32 bytes as B's). One asm statement for the fence, the four wgmma, the commit and the
// wait: written as four statements (as above), ptxas serialized them in the L2-scratch kernels
// (C7520, "compiler-inserted WG.AR in divergent path": a wait after each wgmma).
__device__ __forceinline__ void GmmaRowDots(int (&d)[16], uint32_t a_lo, uint32_t b_lo) {
  asm volatile(
      "{\n"
      ".reg .b32 al<4>, bl<4>;\n"  // k-slices 1-3: + 32 bytes each (>> 4)
      ".reg .b64 a<4>, b<4>;\n"
      "add.u32 al1, %16, 2;\n add.u32 al2, %16, 4;\n add.u32 al3, %16, 6;\n"
      "add.u32 bl1, %17, 2;\n add.u32 bl2, %17, 4;\n add.u32 bl3, %17, 6;\n"
      "mov.b64 a0, {%16, %18};\n mov.b64 a1, {al1, %18};\n"
      "mov.b64 a2, {al2, %18};\n mov.b64 a3, {al3, %18};\n"
      "mov.b64 b0, {%17, %18};\n mov.b64 b1, {bl1, %18};\n"
      "mov.b64 b2, {bl2, %18};\n mov.b64 b3, {bl3, %18};\n"
      "wgmma.fence.sync.aligned;\n"
      "wgmma.mma_async.sync.aligned.m64n32k32.s32.s8.u8 "
      "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15}, a0, b0, 1;\n"
      "wgmma.mma_async.sync.aligned.m64n32k32.s32.s8.u8 "
      "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15}, a1, b1, 1;\n"
      "wgmma.mma_async.sync.aligned.m64n32k32.s32.s8.u8 "
      "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15}, a2, b2, 1;\n"
      "wgmma.mma_async.sync.aligned.m64n32k32.s32.s8.u8 "
      "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15}, a3, b3, 1;\n"
      "wgmma.commit_group.sync.aligned;\n"
      "wgmma.wait_group.sync.aligned 0;\n"
      "}\n"
      : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3]), "+r"(d[4]), "+r"(d[5]), "+r"(d[6]),
        "+r"(d[7]), "+r"(d[8]), "+r"(d[9]), "+r"(d[10]), "+r"(d[11]), "+r"(d[12]), "+r"(d[13]),
        "+r"(d[14]), "+r"(d[15])
      : "r"(a_lo), "r"(b_lo), "r"(kGmmaRowsHi)
      : "memory");
}

// Orders this thread's generic-proxy shared-memory stores (the staging) before later wgmma
// reads of them (async proxy); a CTA barrier after it makes that hold for every thread.
__device__ __forceinline__ void FenceSharedForGmma() {
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}

// A fragments of a 16-head tile for 32-channel slab `sl`: `codes` holds the tile's int8 query
// codes as floats, head stride NC (a0: row lane / 4, k 4 (lane % 4) ..; a1: row + 8; a2, a3:
// the same at k + 16). Rows from `rows` on (a GQA group of fewer than 16 heads) and channels past
// NC (16 channels: k 16 .. 31) are zero.
template <int NC>
__device__ __forceinline__ void QueryFragmentSlice(const float* codes, int sl, int lane,
                                                   uint32_t (&a)[4], int rows = 16) {
  const int r = lane >> 2, t = lane & 3;
#pragma unroll
  for (int reg = 0; reg < 4; ++reg) {
    const int k = 4 * t + 16 * (reg >> 1);  // k .. k + 3: word k / 8, nibble half (k % 8) / 4
    const int row = r + 8 * (reg & 1);
    const float* q = codes + row * NC + 32 * sl + 8 * (k >> 3) + ((k >> 2) & 1);
    uint32_t packed = 0u;
    if (row < rows && (NC >= 32 || k < NC)) {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        packed |= (static_cast<uint32_t>(static_cast<int>(q[2 * i])) & 0xffu) << (8 * i);
      }
    }
    a[reg] = packed;
  }
}

// The fragments of every slab, prepacked by QuantizeQueryKernel (groups of 16s): tile `tile` (16
// consecutive heads of the workspace) as [tile][slab][lane] uint4, one 16-byte load per slab.
template <int NC>
__device__ __forceinline__ void LoadQueryFragments(const uint32_t* frags, int64_t tile, int lane,
                                                   uint32_t (&a)[NC / 32][4]) {
  const uint4* src = reinterpret_cast<const uint4*>(frags) + tile * (NC / 32) * 32 + lane;
#pragma unroll
  for (int sl = 0; sl < NC / 32; ++sl) {
    const uint4 v = src[sl * 32];
    a[sl][0] = v.x;
    a[sl][1] = v.y;
    a[sl][2] = v.z;
    a[sl][3] = v.w;
  }
}

// Words per candidate when INT4 rows of NC channels are staged in shared memory for
// CodeFragments: 16-byte rows, and the 8 candidates x 2 words of one fragment load hit
// distinct banks.
template <int NC>
constexpr int TokenCodeStride() {
  return NC / 8 + 4;
}

// B fragments of slab `sl` for this lane (k 4 (lane % 4) .. and + 16) from the code words of
// candidate lane / 4 of the tile.
__device__ __forceinline__ void CodeFragments(const uint32_t* words, int sl, int lane,
                                              uint32_t* b0, uint32_t* b1) {
  const int t = lane & 3, shift = 4 * (t & 1);  // even t: low nibbles (even channels)
  const uint32_t* w = words + 4 * sl + (t >> 1);
  *b0 = (w[0] >> shift) & 0x0f0f0f0fu;
  *b1 = (w[2] >> shift) & 0x0f0f0f0fu;
}

// One radix pass's decision, by the 32 lanes of one warp: the digit (descending) of the
// `remaining`-th largest key in hist[256]. Writes the extended prefix, the rank left inside that
// digit, and whether the digit's keys are all kept (no later pass needed).
__device__ __forceinline__ void FindRadixDigit(const int* hist, uint32_t prefix, int shift,
                                               int remaining, uint32_t* out_prefix,
                                               int* out_remaining, int* out_done) {
  const int lane = threadIdx.x & 31;
  // Lane l covers digits 255 - 8l down to 248 - 8l; find where `remaining` falls.
  int local = 0;
  for (int i = 0; i < 8; ++i) local += hist[255 - 8 * lane - i];
  const int incl = WarpInclusiveSum(local);
  const int above = incl - local;
  if (above < remaining && remaining <= incl) {
    int acc = above;
    for (int i = 0; i < 8; ++i) {
      const int digit = 255 - 8 * lane - i;
      if (remaining <= acc + hist[digit]) {
        *out_prefix = prefix | (static_cast<uint32_t>(digit) << shift);
        *out_remaining = remaining - acc;
        *out_done = remaining - acc == hist[digit] ? 1 : 0;
        break;
      }
      acc += hist[digit];
    }
  }
}

// One radix pass's decision, by the 32 lanes of one warp, every lane getting the result (each
// warp of a block may decide for itself: no barrier to share it): the digit (descending) of the
// `remaining`-th largest key in hist[256]. Returns the digit; sets the rank left inside it and
// whether the digit's keys are all kept (no later pass needed).
__device__ __forceinline__ uint32_t WarpRadixDigit(const int* hist, int remaining,
                                                   int* out_remaining, bool* out_done) {
  const int lane = threadIdx.x & 31;
  // Lane l covers digits 255 - 8l down to 248 - 8l; find where `remaining` falls.
  int counts[8], local = 0;
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    counts[i] = hist[255 - 8 * lane - i];
    local += counts[i];
  }
  const int incl = WarpInclusiveSum(local);
  int acc = incl - local, digit = -1, left = 0, whole = 0;
  const bool mine = acc < remaining && remaining <= incl;
  if (mine) {
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      if (digit < 0 && remaining <= acc + counts[i]) {
        digit = 255 - 8 * lane - i;
        left = remaining - acc;
        whole = left == counts[i];
      }
      acc += counts[i];
    }
  }
  const int src = __ffs(__ballot_sync(0xffffffffu, mine)) - 1;  // one lane: remaining <= total
  *out_remaining = __shfl_sync(0xffffffffu, left, src);
  *out_done = __shfl_sync(0xffffffffu, whole, src) != 0;
  return static_cast<uint32_t>(__shfl_sync(0xffffffffu, digit, src));
}

// The end of one radix pass, called by every thread once `hist` is complete: warp 0 finds the
// digit, the block reads it back (through the three shared slots), extends prefix / mask and
// the rank left. Returns whether the selection is settled (no later pass needed).
__device__ __forceinline__ bool RadixPassDecide(const int* hist, int shift, uint32_t* prefix,
                                                int* remaining, uint32_t* mask, uint32_t* sh_prefix,
                                                int* sh_remaining, int* sh_done) {
  if (threadIdx.x < 32) {
    FindRadixDigit(hist, *prefix, shift, *remaining, sh_prefix, sh_remaining, sh_done);
  }
  __syncthreads();
  *prefix = *sh_prefix;
  *remaining = *sh_remaining;
  const bool done = *sh_done != 0;
  *mask |= 255u << shift;
  __syncthreads();  // the slots are reusable
  return done;
}

struct TopKShared {
  int hist[256];
  int scan[33];
  uint32_t prefix;
  int remaining;
  int done;  // the threshold's bin is taken whole: no further radix pass needed
  int warp_equal[32];
  int warp_take[32];
};

// Deterministic top-k of one row of n items. `item(j, &score, &id)` returns whether item j is
// valid; valid items must come in ascending id order. `emit(rank, id)` is called for each
// kept item with its rank in ascending id order (0..kept-1). Returns the number kept,
// min(k, #valid). All threads of the block must call it.
template <int NT, typename Item, typename Emit>
__device__ int BlockTopK(int n, int k, Item item, Emit emit, TopKShared& sh) {
  const int tid = threadIdx.x;
  if (k <= 0) return 0;
  int valid_local = 0;
  for (int j = tid; j < n; j += NT) {
    float s;
    int32_t id;
    valid_local += item(j, &s, &id) ? 1 : 0;
  }
  const int num_valid = BlockSum<NT>(valid_local, sh.scan);
  const bool take_all = num_valid <= k;
  // Keys are compared on the bits of `mask` only: all 32 after four radix passes, fewer when a
  // pass finds the bin of the k-th key taken whole (then every key in it is kept and the set is
  // the same as with the full comparison).
  uint32_t threshold = 0, mask = 0;
  int need_equal = 0;
  if (!take_all) {
    uint32_t prefix = 0;
    int remaining = k;
    for (int shift = 24; shift >= 0; shift -= 8) {
      for (int i = tid; i < 256; i += NT) sh.hist[i] = 0;
      __syncthreads();
      // A warp whose counted keys all share one digit (scores of a row often share their top
      // bytes) adds once; otherwise one shared atomic per key (__match_any_sync to group
      // them costs a loop over the distinct digits).
      for (int base = 0; base < n; base += NT) {
        const int j = base + tid;
        float s = 0.f;
        int32_t id = 0;
        uint32_t digit = 256u;  // none
        if (j < n && item(j, &s, &id)) {
          const uint32_t key = TlsOrderedBits(s);
          if ((key & mask) == prefix) digit = (key >> shift) & 255u;
        }
        const unsigned counted = __ballot_sync(0xffffffffu, digit != 256u);
        if (counted == 0u) continue;  // after the first pass most items miss the prefix
        const uint32_t first = __shfl_sync(0xffffffffu, digit, __ffs(counted) - 1);
        if (__all_sync(0xffffffffu, digit == 256u || digit == first)) {
          if ((tid & 31) == __ffs(counted) - 1) atomicAdd(&sh.hist[first], __popc(counted));
        } else if (digit != 256u) {
          atomicAdd(&sh.hist[digit], 1);
        }
      }
      __syncthreads();
      if (RadixPassDecide(sh.hist, shift, &prefix, &remaining, &mask, &sh.prefix, &sh.remaining,
                          &sh.done)) {
        break;
      }
    }
    threshold = prefix;
    need_equal = remaining;
  }
  // Ordered compaction. Warp w owns the contiguous items [w * span, (w + 1) * span) and reads
  // them 32 at a time (coalesced); two passes: count per warp (keys above the threshold and
  // equal keys), then emit with ballot ranks. Equal keys are taken in ascending item order, so
  // the first need_equal of them (block-wide) are kept, as before. Two block-wide barriers in
  // all instead of three per NT items.
  constexpr int kWarps = NT / 32;
  const int lane = tid & 31, warp = tid >> 5;
  const unsigned lane_lt = (1u << lane) - 1u;
  const int span = ((n + kWarps - 1) / kWarps + 31) / 32 * 32;
  const int lo = warp * span, hi = min(n, lo + span);
  int above = 0, equal_count = 0;
  for (int base = lo; base < hi; base += 32) {
    const int j = base + lane;
    float s = 0.f;
    int32_t id = 0;
    const bool valid = j < hi && item(j, &s, &id);
    bool take = valid, equal = false;
    if (valid && !take_all) {
      const uint32_t key = TlsOrderedBits(s) & mask;
      take = key > threshold;
      equal = key == threshold;
    }
    above += __popc(__ballot_sync(0xffffffffu, take));
    equal_count += __popc(__ballot_sync(0xffffffffu, equal));
  }
  if (lane == 0) sh.warp_equal[warp] = equal_count;
  __syncthreads();
  int equal_before = 0;
  for (int w = 0; w < warp; ++w) equal_before += sh.warp_equal[w];
  const int equal_take = max(0, min(equal_count, need_equal - equal_before));
  if (lane == 0) sh.warp_take[warp] = above + equal_take;
  __syncthreads();
  int rank = 0, kept = 0;
  for (int w = 0; w < kWarps; ++w) {
    if (w < warp) rank += sh.warp_take[w];
    kept += sh.warp_take[w];
  }
  int equal_seen = 0;
  for (int base = lo; base < hi; base += 32) {
    const int j = base + lane;
    float s = 0.f;
    int32_t id = 0;
    const bool valid = j < hi && item(j, &s, &id);
    bool take = valid, equal = false;
    if (valid && !take_all) {
      const uint32_t key = TlsOrderedBits(s) & mask;
      take = key > threshold;
      equal = key == threshold;
    }
    const unsigned equal_bits = __ballot_sync(0xffffffffu, equal);
    if (equal && equal_seen + __popc(equal_bits & lane_lt) < equal_take) take = true;
    equal_seen += __popc(equal_bits);
    const unsigned take_bits = __ballot_sync(0xffffffffu, take);
    if (take) emit(rank + __popc(take_bits & lane_lt), id);
    rank += __popc(take_bits);
  }
  __syncthreads();  // sh reusable after return
  return kept;
}

inline size_t AlignUp(size_t x, size_t a) { return (x + a - 1) / a * a; }

// SMs of the current device (132 when it cannot be asked).
inline int NumSms() {
  int device = 0, sms = 132;
  if (cudaGetDevice(&device) == cudaSuccess) {
    cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  }
  return sms > 0 ? sms : 132;
}

// ---- stored token logits / exps (tls_select.cu's scratch, also tls_token_fused.cu's) --------
// Shapes whose token scoring stores per-head logits (channel sets of 64+, groups of 16, 32, 64
// or 128, rows up to 16,384 candidates: MLA).
bool UseStoredLogits(const TlsTokenScoreParams& p);
// [row, head, candidate] floats in p.workspace; the fused MLA kernels keep bf16 head pairs in
// the upper half of each cluster's rows (tls_token_fused.cu, ScratchPairs).
float* StoredExps(const TlsTokenScoreParams& p);
// Token scoring's query side in p.workspace (TlsTokenScoreWorkspaceBytes), per (row, head):
// the int8 codes on the row's channel set as floats [row, head, channel], scales, code sums, and
// for groups of 16s the IMMA A fragments of each 16-head tile.
struct TokenQueries {
  const float* codes;
  const float* scales;
  const int* sums;
  const uint32_t* frags;  // LoadQueryFragments layout; written when the group is a multiple of 16
  int* row_done;          // per row, zeroed: tickets of the row's CTAs (RowTickets)
};
cudaError_t QuantizeTokenQueries(const TlsTokenScoreParams& p, cudaStream_t stream);
TokenQueries TokenQueriesIn(const TlsTokenScoreParams& p);
// Programmatic dependent launch (sm_90) between the kernels of a decode step. A kernel launched
// by LaunchAfterPrevious may start while the kernel before it on the stream still runs, once
// every CTA of that one has called LetNextGridLaunch (or exited); it must call
// WaitForPreviousGrid before it reads anything the previous grid writes. That returns once the
// previous grid has finished and its writes are visible (at once after a normal launch).
// Kernels call LetNextGridLaunch only after their own WaitForPreviousGrid (if any), so the grid
// two launches back has finished by the time a dependent starts: only the previous grid's
// outputs need the wait (the sparse attention reads its query before it). QuantizeQueryKernel
// lets the MLA token kernels stage their candidates meanwhile; the token top-k lets the sparse
// attention launch during its compaction.
__device__ __forceinline__ void WaitForPreviousGrid() {
  asm volatile("griddepcontrol.wait;" ::: "memory");
}
__device__ __forceinline__ void LetNextGridLaunch() {
  asm volatile("griddepcontrol.launch_dependents;");
}

template <auto KERNEL, typename... Args>
cudaError_t LaunchAfterPrevious(dim3 grid, int threads, size_t smem, cudaStream_t stream,
                                Args... args) {
  cudaLaunchAttribute attr{};
  attr.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr.val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t config{};
  config.gridDim = grid;
  config.blockDim = dim3(threads);
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  config.attrs = &attr;
  config.numAttrs = 1;
  return cudaLaunchKernelEx(&config, KERNEL, args...);
}

}  // namespace asynctls::kernels::cuda::tls_detail
