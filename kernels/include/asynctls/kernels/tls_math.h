// Arithmetic shared by the TLS CPU reference and the CUDA kernels (host + device inline). Every
// value that a selection depends on is computed here, or from these pieces in an order both
// sides follow, so that the GPU reproduces the CPU's scores bit for bit:
//   - products enter sums only through TlsFma (std::fma / __fmaf_rn, both correctly rounded);
//     no expression of the form a * b + c is left to the compiler's contraction choice;
//   - token logits are exact integer sums (int8 query codes x INT4 key codes) times scales;
//   - exp is TlsExp2, a polynomial of fmas (libm's and CUDA's expf differ in the last ulp);
//   - softmax denominators are sums of exp values truncated to multiples of 2^-23 in uint64,
//     which are exact and therefore independent of the summation order (atomics on the GPU);
//   - maxima and minima are exact in any order.
#pragma once

#include <cstdint>

#include "asynctls/kernels/types.h"

#if !defined(__CUDA_ARCH__)
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

// 2^x for x <= 0 (callers guarantee the sign: TlsTokenExpShift rounds its offset down); relative
// error below 1.02e-4 down to x = -125.5; 2^-125 below that and for -inf / NaN (terms that no
// fixed-point sum sees: its unit is 2^-23). Branch-free and without float-to-int conversions or
// a final product, because the token kernels spend most of their instructions here (one call per
// candidate and query head): x is clamped below at -125 (fmax maps NaN to -125), adding
// 1.5 * 2^23 rounds it to the nearest integer n (ties to even) in t's low mantissa bits, and
// n << 23 added to the bits of p = 2^r (in [2^-0.5, 2^0.5]) makes p * 2^n, exact and normal for
// n in [-125, 0].
ASYNCTLS_HD float TlsExp2(float x) {
  constexpr float kRoundMagic = 12582912.f;  // 1.5 * 2^23
#if defined(__CUDA_ARCH__)
  const float xc = fmaxf(x, -125.f);
#else
  const float xc = std::fmax(x, -125.f);
#endif
  const float t = TlsAdd(xc, kRoundMagic);
  const float r = TlsAdd(xc, -TlsAdd(t, -kRoundMagic));  // x = n + r, r in [-0.5, 0.5], exact
  // 2^r: degree-3 polynomial with p(0) = 1, relative minimax fit on [-0.5, 0.5] (error 1.02e-4
  // evaluated in fp32). The softmax it feeds only ranks tokens whose logits already carry the
  // INT4 index's quantization error, orders of magnitude larger; degree 5 (4.9e-7, until session
  // 15) cost two more fmas per candidate and head. bench/results/tls-accuracy.md (j).
  float p = 5.500970408e-02f;
  p = TlsFma(p, r, 2.422110438e-01f);
  p = TlsFma(p, r, 6.932827234e-01f);
  p = TlsFma(p, r, 1.0f);
  // t's bits are those of 1.5 * 2^23 plus n; shifted left by 23 only n << 23 remains (mod 2^32),
  // which added to p's bits lowers its biased exponent (126 or 127) by -n.
  return BitsToFloat(FloatToBits(p) + (FloatToBits(t) << 23));
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

// One head's term of alpha: its exp rounded to bf16. The MLA token kernels pass 16-128 heads'
// exps of every candidate through an L2 scratch between their exp pass and the alpha pass;
// stored as bf16 they move half the bytes, which took 8 us off the 128-head batch-8 token
// branch (H100, bench/results/tls-kernels-h200.md run 123). The rounding (relative 2^-9) is far
// below the INT4 index's error in the logits (bench/results/tls-accuracy.md (m)). The softmax
// denominators still sum the exps unrounded.
ASYNCTLS_HD float TlsAlphaTerm(float e, float inv, float acc) {
#if defined(__CUDA_ARCH__)
  // cvt.rn.bf16.f32 and back: RoundToBf16 for every exp (never NaN) in two instructions.
  return TlsFma(__bfloat162float(__float2bfloat16_rn(e)), inv, acc);
#else
  return TlsFma(RoundToBf16(e), inv, acc);
#endif
}

// ---- INT4 token index ----------------------------------------------------------------------

ASYNCTLS_HD float TlsInt4Scale(float absmax) { return TlsDiv(absmax, 7.f); }

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
// query scale q > 0 is monotone, so the head's max logit belongs to its max y, and the exp2
// argument (logit - max logit) * softmax scale * log2(e) is one fma per candidate and head,
// TlsTokenExpArg(y, shift) = fma(y, a, b) with a = q * scale * log2(e) and b = -(max y * a)
// (TlsTokenExpShift, once per head): the token kernels' innermost loop.
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

// The exp2 argument's factors for a head with max scaled dot `max_y` (exp_scale: the softmax
// scale times log2(e)). b is rounded down, so fma(y, a, b) <= 0 for every y <= max_y (a >= 0):
// TlsExp2 needs no upper clamp.
ASYNCTLS_HD TlsExpShift TlsTokenExpShift(float max_y, float query_scale, float exp_scale) {
  const float a = TlsMul(query_scale, exp_scale);
  return {a, TlsNegMulDown(max_y, a)};
}

ASYNCTLS_HD float TlsTokenExpArg(float y, TlsExpShift s) { return TlsFma(y, s.a, s.b); }

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
