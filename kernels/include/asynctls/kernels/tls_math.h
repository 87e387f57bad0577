// Arithmetic shared by the TLS CPU reference and the CUDA kernels (host + device inline). Every
// value that a selection depends on is computed here, or from these pieces in an order both
// sides follow, so that the GPU reproduces the CPU's scores bit for bit:
//   - products enter sums only through TlsFma (std::fma / __fmaf_rn, both correctly rounded);
//     no expression of the form a * b + c is left to the compiler's contraction choice;
//   - token logits are exact integer sums (int8 query codes x INT4 key codes) times scales;
//   - exp is TlsTokenExp: its argument on a grid of 2^-8, its result 2^x rounded to bf16, which
//     the GPU's ex2.approx and a 256-entry table on the CPU both give exactly;
//   - softmax denominators are sums of exp values truncated to multiples of 2^-23 in uint64,
//     which are exact and therefore independent of the summation order (atomics on the GPU);
//   - maxima and minima are exact in any order.
#pragma once

#include <cstdint>

#include "asynctls/kernels/types.h"

#if !defined(__CUDA_ARCH__)
#include <array>
#include <cmath>
#endif
#if defined(__CUDACC__)
#include <cuda_bf16.h>
#endif

#if defined(__CUDA_ARCH__)
#define ASYNCTLS_TLS_UNROLL _Pragma("unroll")
#else
#define ASYNCTLS_TLS_UNROLL
#endif

namespace asynctls::kernels {

ASYNCTLS_HD float TlsFma(float a, float b, float c) {
#if defined(__CUDA_ARCH__)
  return __fmaf_rn(a, b, c);
#else
  return std::fma(a, b, c);
#endif
}

// Correctly rounded division, sum and product, also under --use_fast_math.
ASYNCTLS_HD float TlsDiv(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}

ASYNCTLS_HD float TlsAdd(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}

ASYNCTLS_HD float TlsMul(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}

ASYNCTLS_HD float TlsRint(float x) {
#if defined(__CUDA_ARCH__)
  return rintf(x);
#else
  return std::nearbyint(x);  // round half to even in the default rounding mode
#endif
}

inline constexpr float kTlsLog2E = 1.4426950408889634f;
// Fixed point of the softmax denominators: exp values (in [0, 1]) are summed as floor(e * 2^23).
// 2^-23 units make a term's fixed value the mantissa of 1 + e rounded toward zero, two GPU
// instructions per exp (the token kernels' busiest loop); a denominator (>= 1: its max term is
// 1) loses under n * 2^-23 to the truncation: 0.1% at 8,192 candidates, 1.6% at 131,072. (Was
// 2^-40 until session 12; the accuracy harness moved by at most 0.00008 in any recall:
// bench/results/tls-accuracy.md (i).)
inline constexpr float kTlsExpFixedScale = 8388608.f;              // 2^23
inline constexpr float kTlsExpFixedInv = 1.1920928955078125e-07f;  // 2^-23

ASYNCTLS_HD uint64_t TlsExpToFixed(float e) {
  return static_cast<uint64_t>(TlsMul(e, kTlsExpFixedScale));  // exact product; truncation
}

// Softmax weight factor of one head: 1 / (G * sum_j e_j).
ASYNCTLS_HD float TlsInvDenominator(uint64_t fixed_sum, int group) {
  const float z = TlsMul(static_cast<float>(fixed_sum), kTlsExpFixedInv);
  return TlsDiv(1.f, TlsMul(static_cast<float>(group), z));
}

// Monotone map of a float to uint32 (a < b => key(a) < key(b); -0 < +0; NaN sorts lowest).
ASYNCTLS_HD uint32_t TlsOrderedBits(float f) {
  if (f != f) return 0u;
  const uint32_t u = FloatToBits(f);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// Total order of top-k: higher score first, then lower id. Larger key = better.
ASYNCTLS_HD uint64_t TlsSelectKey(float score, int32_t id) {
  return (static_cast<uint64_t>(TlsOrderedBits(score)) << 32) |
         static_cast<uint64_t>(0xffffffffu - static_cast<uint32_t>(id));
}

// ---- Block scores ----------------------------------------------------------------------------
// A block's score sum_d qpos[d] * kmax[d] + qneg[d] * kmin[d] (qpos / qneg: the group's query
// heads summed in head order) is cut into kTlsBlockScoreSlices slices of head_dim / 8
// consecutive dims. Each slice is an ordered TlsFma chain from 0 (kmax term, then kmin term, per
// dim); the slice sums are added as the fixed tree TlsSumBlockSlices, which is what a warp's
// xor butterfly over 8 lanes computes (float addition commutes bit for bit). Eight short chains
// instead of one 2 * head_dim long chain let the GPU spend 8 lanes per block. With the int8
// index the chains take the codes (as floats) and the tree's sum is multiplied by the row's
// scale once: TlsMul(TlsSumBlockSlices(slices), scale).
inline constexpr int kTlsBlockScoreSlices = 8;

ASYNCTLS_HD float TlsSumBlockSlices(const float* s) {
  return TlsAdd(TlsAdd(TlsAdd(s[0], s[1]), TlsAdd(s[2], s[3])),
                TlsAdd(TlsAdd(s[4], s[5]), TlsAdd(s[6], s[7])));
}

// ---- int8 block index (tls_params.h) ------------------------------------------------------
// One scale per row: absmax / 127, raised by an ulp where 127 * scale falls short of absmax, so
// every code fits [-127, 127] with the outward rounding below. (The comparisons take the sign of
// an fma, which is the exact product's: the bound holds in real arithmetic.)
ASYNCTLS_HD float TlsBlockIndexScale(float absmax) {
  float s = TlsDiv(absmax, 127.f);
  if (TlsFma(127.f, s, -absmax) < 0.f) {
#if defined(__CUDA_ARCH__)
    s = nextafterf(s, __int_as_float(0x7f800000));
#else
    s = std::nextafter(s, HUGE_VALF);
#endif
  }
  return s;
}

// kmax's code: the smallest c with c * scale >= x, in [-127, 127]; 0 for scale 0; 127 for a NaN
// key (the widest bound: no block is dropped on a NaN). It is ceil(x / scale), or one more where
// the quotient rounded down past an integer. Monotone in x at a fixed scale, as the scale is in
// the absmax, which lets the GPU merge an append's codes into a row whose scale it keeps.
ASYNCTLS_HD int TlsBlockMaxCode(float x, float scale) {
  if (x != x) return 127;
  if (!(scale > 0.f)) return 0;
#if defined(__CUDA_ARCH__)
  float c = ceilf(TlsDiv(x, scale));
#else
  float c = std::ceil(TlsDiv(x, scale));
#endif
  if (TlsFma(c, scale, -x) < 0.f) c += 1.f;
  c = c > 127.f ? 127.f : (c < -127.f ? -127.f : c);
  return static_cast<int>(c);
}

// kmin's code: the largest c with c * scale <= x (the mirror image).
ASYNCTLS_HD int TlsBlockMinCode(float x, float scale) { return -TlsBlockMaxCode(-x, scale); }

// A block's per-dim max / min over its keys for the int8 rows: a NaN key propagates (and codes
// to the widest bound), whatever the order. The row's absmax skips NaNs (TlsBlockIndexAbs).
ASYNCTLS_HD float TlsBlockIndexMax(float a, float b) { return a < b || b != b ? b : a; }
ASYNCTLS_HD float TlsBlockIndexMin(float a, float b) { return b < a || b != b ? b : a; }
// |x| for the row's absmax, 0 for a NaN.
ASYNCTLS_HD float TlsBlockIndexAbs(float x) { return x != x ? 0.f : (x < 0.f ? -x : x); }

// ---- Token scores over the group's heads -------------------------------------------------
// alpha = sum over the group's heads h of bf16(e_h) * inv_h (e_h: the candidate's exp for head
// h, rounded to bf16; inv_h: TlsInvDenominator), summed as kTlsAlphaHeadTile-head partials:
// each an ordered chain of TlsAlphaTerm from 0 over its heads, the partials added with TlsAdd in
// tile order (the first taken as is, so groups of up to 16 heads are a single chain). GPU
// kernels may then spread a group's heads over CTAs or clusters tile by tile and still match the
// CPU bit for bit.
inline constexpr int kTlsAlphaHeadTile = 16;

// One head's term of alpha. The exps are bf16 values already (TlsTokenExp), which the MLA token
// kernels exploit: they pass 16-128 heads' exps of every candidate through an L2 scratch (or
// shared memory) between their exp pass and the alpha pass as bf16 head pairs, half the bytes of
// floats (8 us off the 128-head batch-8 token branch, H100, bench/results/tls-kernels-h200.md
// run 123), without rounding them again. (One byte per exp instead, 3 mantissa bits for alpha
// alone, was measured and removed in session 46: the L2 scratch's stores became partial-sector
// writes, +5.5 us at 128 heads batch 8; run 183 there, the code at a25aec9.)
ASYNCTLS_HD float TlsAlphaTerm(float e, float inv, float acc) { return TlsFma(e, inv, acc); }

// ---- INT4 token index ----------------------------------------------------------------------

// absmax / 7 rounded to 22 significant bits (the last two mantissa bits, ties away from 0), so
// that 1.5 * 2^23 times a scale is a float too: the MLA token kernels then turn a biased dot into
// its scaled dot with one exact fma (LaneHeadPair::ScaledDots). (That product overflows for
// scales past 2^104, keys past 2^107: there the GPU's scaled dots read -inf or NaN, the CPU's
// finite values; real keys are far below.)
ASYNCTLS_HD float TlsInt4Scale(float absmax) {
  return BitsToFloat((FloatToBits(TlsDiv(absmax, 7.f)) + 2u) & ~3u);
}

// Symmetric code of x with `scale`: rint(x / scale) clamped to [-max_code, max_code] (0 when
// scale is 0).
ASYNCTLS_HD int TlsSymmetricCode(float x, float scale, float max_code) {
  if (scale == 0.f) return 0;
  float c = TlsRint(TlsDiv(x, scale));
  c = c > max_code ? max_code : (c < -max_code ? -max_code : c);
  return static_cast<int>(c);
}

// Code in [-7, 7] of x with `scale` (the stored scale). Nibble = code + 8.
ASYNCTLS_HD int TlsInt4Code(float x, float scale) { return TlsSymmetricCode(x, scale, 7.f); }

// ---- Integer token logits --------------------------------------------------------------------
// Token scoring quantizes each query head's channel-set entries to int8 codes with a per-head
// scale max|q_c| / 127 (same rounding as the INT4 keys). A token's logit for that head is
// (sum_c qcode[c] * code[c]) * token scale * query scale, where the sum is an exact integer
// (|sum| <= 128 * 127 * 7 < 2^24): fp32 fmas in any order, dp4a or integer tensor cores all
// produce the same value, so the GPU kernels may split and reorder the channel sums freely.
// (Measured accuracy-neutral: bench/results/tls-accuracy.md.)
//
// The per-head softmax is computed from y = sum * token scale (TlsTokenScaledDot) alone: the
// query scale q > 0 is monotone, so a chunk's max logit belongs to its max y, and the exp2
// argument (logit - shift) * softmax scale * log2(e) is one fma per candidate and head,
// TlsTokenExpArg(y, shift) from a = q * scale * log2(e) and an offset b (TlsChunkExpShift, once
// per chunk and head, below): the token kernels' innermost loop.
ASYNCTLS_HD float TlsInt8Scale(float absmax) { return TlsDiv(absmax, 127.f); }

ASYNCTLS_HD int TlsInt8Code(float x, float scale) { return TlsSymmetricCode(x, scale, 127.f); }

ASYNCTLS_HD float TlsTokenScaledDot(float dot, float token_scale) {
  return TlsMul(dot, token_scale);
}

struct TlsExpShift {
  float a, b;
};

// -(y * a) rounded toward -inf (y * a is exact in double: two 24-bit mantissas).
ASYNCTLS_HD float TlsNegMulDown(float y, float a) {
#if defined(__CUDA_ARCH__)
  return __fmul_rd(-y, a);
#else
  const double exact = -static_cast<double>(y) * static_cast<double>(a);
  const float f = static_cast<float>(exact);
  return static_cast<double>(f) > exact ? std::nextafter(f, -INFINITY) : f;
#endif
}

// The exp arguments lie on a grid of 2^-8 in [-126, 0], so that the exp needs no polynomial
// (TlsTokenExp). An fma lands on that grid by itself when its result lies in [2^15, 2^16), whose
// ulp is 2^-8: the offset b carries kTlsExpGridBias = 1.5 * 2^15, which the argument subtracts
// again (exactly, by Sterbenz, for results down to half the bias, far under the clamp at -126).
inline constexpr float kTlsExpGridBias = 49152.f;
inline constexpr float kTlsExpGridSteps = 256.f;  // grid points per unit

// The exp argument of scaled dot y: y * a - c rounded to the grid, clamped below at -126 (a NaN
// y, a slot without a candidate, also maps to -126, whose exp no fixed-point sum sees).
ASYNCTLS_HD float TlsTokenExpArg(float y, TlsExpShift s) {
  const float x = TlsAdd(TlsFma(y, s.a, s.b), -kTlsExpGridBias);
#if defined(__CUDA_ARCH__)
  return fmaxf(x, -126.f);
#else
  return std::fmax(x, -126.f);
#endif
}

// ---- Chunk-local softmax shifts ----------------------------------------------------------
// A head's softmax over a row's candidates is shifted chunk by chunk, so that the token kernels
// compute every logit once (no max pass before the exps): a chunk is kTlsSoftmaxChunk
// consecutive candidate slots (slot j in chunk j / 32: one IGMMA group, one warp's slots), and
// each (chunk, head) gets the integer shift c = ceil(max y * a) of its own candidates
// (TlsChunkShift). Its exps are TlsTokenExp(TlsTokenExpArg(y, TlsChunkExpShift(a, c))) <= 1, its
// fixed-point sum (TlsExpToFixed terms) enters the head's denominator shifted right by
// c_max - c (TlsChunkScaledSum; c_max: the row's largest c), and alpha weighs its exps by
// inv * 2^(c - c_max) (TlsChunkWeight): integer shifts and powers of two, exact and order-free.
inline constexpr int kTlsSoftmaxChunk = 32;

// c for a chunk whose max scaled dot is max_y: max_y * a rounded up, then to the next integer,
// at least -2^23. Integers of magnitude up to 2^23 keep TlsChunkExpShift's offset bias - c
// exact; a larger c (a logit of 2^23 in log2 units) is outside the spec. A chunk without a
// candidate (max -inf) gets c = -inf: no argument of it is finite, its sum shifts out and its
// weight is 0 (TlsChunkScaledSum, TlsChunkWeight); a NaN max gets +inf.
ASYNCTLS_HD float TlsChunkShift(float max_y, float a) {
#if defined(__CUDA_ARCH__)
  // Selects, not branches: once per chunk and head in the token kernels' loops.
  const float up = -TlsNegMulDown(max_y, a);
  const float c = fmaxf(ceilf(up), -8388608.f);
  return max_y == -INFINITY ? -INFINITY : (up != up ? INFINITY : c);
#else
  if (max_y == -INFINITY) return -INFINITY;
  const float up = -TlsNegMulDown(max_y, a);
  if (up != up) return INFINITY;
  return std::fmax(std::ceil(up), -8388608.f);
#endif
}

ASYNCTLS_HD TlsExpShift TlsChunkExpShift(float a, float c) {
  return {a, TlsAdd(kTlsExpGridBias, -c)};
}

// A chunk's fixed-point exp sum in the head's denominator: sum * 2^(c - c_max), truncated.
ASYNCTLS_HD uint64_t TlsChunkScaledSum(uint64_t sum, float c, float c_max) {
  const float d = TlsAdd(c_max, -c);  // >= 0, an integer
  return d < 64.f ? sum >> static_cast<int>(d) : 0u;
}

// alpha's weight of a chunk's exps: inv * 2^(c - c_max) (0 below 2^-126 of inv's scale).
ASYNCTLS_HD float TlsChunkWeight(float inv, float c, float c_max) {
  const float d = TlsAdd(c_max, -c);
  if (!(d < 126.f)) return 0.f;
  return TlsMul(inv, BitsToFloat(static_cast<uint32_t>(127 - static_cast<int>(d)) << 23));
}

#if defined(__CUDACC__)
// MUFU.EX2: 2^x, relative error about 2^-22 (results below 2^-126 flush to 0).
__device__ __forceinline__ float Ex2Approx(float x) {
  float r;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(x));
  return r;
}
#endif

#if !defined(__CUDA_ARCH__)
// 2^(-k / 256) rounded to bf16, k in [0, 256): each lies at least 2^-15.4 (relative) from a
// rounding boundary of bf16 (checked with 200-bit arithmetic), so double exp2 and a float step
// between round it the same as exact arithmetic, on any libm.
inline const std::array<float, 256>& TlsExpGridMantissas() {
  static const std::array<float, 256> table = [] {
    std::array<float, 256> t{};
    for (int k = 0; k < 256; ++k) {
      t[k] = RoundToBf16(static_cast<float>(std::exp2(-k / 256.0)));
    }
    return t;
  }();
  return table;
}
#endif

// The token softmax's exp: 2^x rounded to bf16 (nearest even), for x on the grid in [-126, 0]
// (TlsTokenExpArg). On the GPU one MUFU.EX2 (ex2.approx.ftz.f32) and the rounding: the
// approximation's error (about 2^-22) is far below the 2^-15.4 that separates every 2^(-k / 256)
// from a bf16 rounding boundary, and the 2^-n scaling is exact in the normal range, so the
// result is the exact one rounded (every grid point checked on an H100 by
// tests/kernels/tls_math_gpu_test.cu). On the CPU a table of the 256 fractional steps, scaled by
// 2^-n. In [2^-126, 1], so TlsExpToFixed's sums take it as is, and alpha takes it without
// rounding again (TlsAlphaTerm). The polynomial exp before it (TlsExp2, until session 37) took
// 8 instructions per candidate and head in the token kernels' exp loop; this takes 2.5 there
// (MUFU, half a packing conversion, one unpacking).
ASYNCTLS_HD float TlsTokenExp(float x) {
#if defined(__CUDA_ARCH__)
  return __bfloat162float(__float2bfloat16_rn(Ex2Approx(x)));
#else
  const int j = static_cast<int>(-x * kTlsExpGridSteps);  // exact: x is on the grid
  // 2^-(j >> 8) by the exponent bits: the table's values lie in [0.5, 1], and j >> 8 reaches 126
  // only with j & 255 = 0 (x = -126), so the result stays normal.
  return BitsToFloat(FloatToBits(TlsExpGridMantissas()[j & 255]) -
                     (static_cast<uint32_t>(j >> 8) << 23));
#endif
}

// sum_c qcode[c] * code[c] of one head (qcode: int8 codes held as floats; exact). `words` holds
// the row's num_channels / 8 little-endian 32-bit words (channel c in word c / 8, bits
// 4 * (c % 8)), i.e. the byte layout of the file comment read as uint32.
ASYNCTLS_HD float TlsInt4Dot(const float* qcode, const uint32_t* words, int num_channels) {
  float acc = 0.f;
  ASYNCTLS_TLS_UNROLL
  for (int c = 0; c < num_channels; ++c) {
    const int code = static_cast<int>((words[c >> 3] >> (4 * (c & 7))) & 15u) - 8;
    acc = TlsFma(qcode[c], static_cast<float>(code), acc);
  }
  return acc;
}

#if defined(__CUDACC__)
// TlsTokenExp of two arguments as one bf16x2 word (x0 in the low half): two MUFU.EX2 and one
// packing conversion (round to nearest even, as TlsTokenExp's). ex2.approx.ftz.bf16x2 would
// take bf16 arguments and round its results toward zero (H100: 2,670 of the 17,149 bf16
// arguments in [-126, 0] differ from the exact 2^x rounded to nearest).
__device__ __forceinline__ uint32_t TlsTokenExpPair(float x0, float x1) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(Ex2Approx(x0), Ex2Approx(x1));
  return *reinterpret_cast<const uint32_t*>(&v);
}
#endif

// ---- Geometry of the always-kept set (see tls_params.h) -------------------------------------

struct TlsGeometry {
  int32_t len;
  int32_t sink_end;            // sink positions [0, sink_end)
  int32_t recent_start;        // recent positions [recent_start, len); candidates < recent_start
  int32_t first_recent_block;  // blocks >= this are never candidates
};

ASYNCTLS_HD TlsGeometry MakeTlsGeometry(int32_t len, int32_t select_len, int32_t sink_blocks,
                                        int32_t window) {
  TlsGeometry g;
  g.len = len;
  g.sink_end = sink_blocks * kKvBlockSize < len ? sink_blocks * kKvBlockSize : len;
  g.first_recent_block = (select_len - 1) / kKvBlockSize;
  int32_t start = g.first_recent_block * kKvBlockSize;
  if (len - window < start) start = len - window;
  if (start < g.sink_end) start = g.sink_end;
  if (start > len) start = len;
  g.recent_start = start;
  return g;
}

// Blocks [sink_blocks, TlsEligibleEnd(len)) take part in block selection at length len.
ASYNCTLS_HD int32_t TlsEligibleEnd(int32_t len) { return (len - 1) / kKvBlockSize; }

// First position of candidate block `block` (inclusive) and its end (exclusive).
ASYNCTLS_HD int32_t TlsBlockCandBegin(const TlsGeometry& g, int32_t block) {
  const int32_t p = block * kKvBlockSize;
  return p > g.sink_end ? p : g.sink_end;
}
ASYNCTLS_HD int32_t TlsBlockCandEnd(const TlsGeometry& g, int32_t block) {
  const int32_t p = (block + 1) * kKvBlockSize;
  return p < g.recent_start ? p : g.recent_start;
}

}  // namespace asynctls::kernels
