// Device building blocks shared by the paged decode and prefill attention kernels: cp.async
// page loads into swizzled shared-memory tiles, ldmatrix / mma.sync (bf16 m16n8k16) wrappers,
// the fp32/bf16 io traits and the per-warp online-softmax update. Private to kernels/cuda.
//
// Tile layout in shared memory: a tile of ROWS x D bf16 is stored row-major with 16-byte chunks
// XOR-swizzled by (row & 7), so the 8 row addresses of one ldmatrix phase hit 8 different
// 16-byte bank groups (D is 64 or 128, i.e. 8 or 16 chunks per row).
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>

#include "asynctls/kernels/dense_params.h"

namespace asynctls::kernels::cuda::attention_detail {

inline constexpr int kWarpSize = 32;
inline constexpr int kPage = kKvBlockSize;  // tokens per KV tile == tokens per cache block
static_assert(kPage == 64, "the tile code assumes 64-token cache blocks");
inline constexpr float kLog2e = 1.4426950408889634f;
inline constexpr float kLn2 = 0.6931471805599453f;

// ---- io dtype traits -----------------------------------------------------------------------

struct F32Io {
  using T = float;
  static constexpr DType kDType = DType::kF32;
  // Reads 8 consecutive elements as floats (16-byte aligned).
  __device__ __forceinline__ static void Load8(const T* src, float (&v)[8]) {
    const float4 a = __ldg(reinterpret_cast<const float4*>(src));
    const float4 b = __ldg(reinterpret_cast<const float4*>(src) + 1);
    v[0] = a.x, v[1] = a.y, v[2] = a.z, v[3] = a.w, v[4] = b.x, v[5] = b.y, v[6] = b.z, v[7] = b.w;
  }
  __device__ __forceinline__ static void Store(T* dst, float v) { *dst = v; }
  __device__ __forceinline__ static void Store2(T* dst, float v0, float v1) {
    *reinterpret_cast<float2*>(dst) = make_float2(v0, v1);
  }
};

struct Bf16Io {
  using T = __nv_bfloat16;
  static constexpr DType kDType = DType::kBF16;
  __device__ __forceinline__ static void Load8(const T* src, float (&v)[8]) {
    const uint4 raw = __ldg(reinterpret_cast<const uint4*>(src));
    const uint32_t w[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      v[2 * i] = __uint_as_float(w[i] << 16);
      v[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
    }
  }
  __device__ __forceinline__ static void Store(T* dst, float v) { *dst = __float2bfloat16_rn(v); }
  __device__ __forceinline__ static void Store2(T* dst, float v0, float v1) {
    *reinterpret_cast<__nv_bfloat162*>(dst) = __floats2bfloat162_rn(v0, v1);
  }
};

// ---- PTX wrappers --------------------------------------------------------------------------

__device__ __forceinline__ uint32_t SmemAddr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte global->shared copy; when !valid nothing is read and the destination is zeroed.
__device__ __forceinline__ void CpAsync16(uint32_t dst, const void* src, bool valid) {
  const int src_bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src),
               "r"(src_bytes)
               : "memory");
}
__device__ __forceinline__ void CpAsyncCommit() {
  asm volatile("cp.async.commit_group;\n" ::: "memory");
}
template <int N>
__device__ __forceinline__ void CpAsyncWait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

__device__ __forceinline__ void LdMatrixX4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
__device__ __forceinline__ void LdMatrixX2(uint32_t (&r)[2], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(addr));
}
__device__ __forceinline__ void LdMatrixX4Trans(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

// d += a (16x16, row) * b (16x8, col); bf16 inputs, fp32 accumulators.
__device__ __forceinline__ void MmaBf16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                        uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// mbarriers and the bulk copy engine (sm_90): a buffer's barrier completes its phase once its
// one expected arrival came and every byte it was told to expect has landed.
__device__ __forceinline__ void MbarInit(uint32_t bar, uint32_t arrivals) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(arrivals) : "memory");
}
// Makes initialized mbarriers visible to the copy engine (then a CTA barrier for the threads).
__device__ __forceinline__ void FenceMbarInit() {
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
}
__device__ __forceinline__ void MbarArriveExpectTx(uint32_t bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes)
               : "memory");
}
// Spins until the phase of the given parity (0 for the barrier's first use, then 1, 0, ...)
// has completed.
__device__ __forceinline__ void MbarWait(uint32_t bar, uint32_t parity) {
  asm volatile(
      "{\n"
      ".reg .pred done;\n"
      "MBAR_WAIT_LOOP:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra MBAR_WAIT_LOOP;\n"
      "}\n" ::"r"(bar),
      "r"(parity)
      : "memory");
}
// `bytes` (a multiple of 16; both addresses 16-byte aligned) from global memory into this CTA's
// shared memory by the copy engine, counted against mbarrier `bar`.
__device__ __forceinline__ void BulkCopyToShared(uint32_t dst, const void* src, uint32_t bytes,
                                                 uint32_t bar) {
  asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n" ::
          "r"(dst),
      "l"(src), "r"(bytes), "r"(bar)
      : "memory");
}

// Two floats -> bf16x2 (lo in the low half: the lower column index).
__device__ __forceinline__ uint32_t PackBf16(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}

// ---- swizzled tiles ------------------------------------------------------------------------

// Byte offset of 16-byte chunk `chunk` of row `row` in a tile with D bf16 per row.
template <int D>
__device__ __forceinline__ uint32_t TileOffset(int row, int chunk) {
  return static_cast<uint32_t>(row * (D * 2) + ((chunk ^ (row & 7)) << 4));
}

// Copies one 64-token page (kPage x D bf16, contiguous at `src`) into a swizzled tile with
// cp.async; rows >= valid_rows are zero-filled (never read: they may be unwritten or NaN).
template <int D, int THREADS>
__device__ __forceinline__ void LoadPageAsync(uint32_t tile, const __nv_bfloat16* src,
                                              int valid_rows, int tid) {
  constexpr int kChunksPerRow = D / 8;
  constexpr int kChunks = kPage * kChunksPerRow;
  static_assert(kChunks % THREADS == 0, "page chunks must divide among the threads");
#pragma unroll
  for (int i = 0; i < kChunks / THREADS; ++i) {
    const int idx = tid + i * THREADS;
    const int row = idx / kChunksPerRow, chunk = idx % kChunksPerRow;
    const bool valid = row < valid_rows;
    CpAsync16(tile + TileOffset<D>(row, chunk), valid ? src + idx * 8 : src, valid);
  }
}

// Writes ROWS query rows (each D elements of Io, at row_ptr(r)) into a swizzled bf16 tile,
// multiplied by `mul` (softmax scale * log2 e); rows >= valid_rows become zero.
template <int D, int ROWS, int THREADS, typename Io, typename RowPtr>
__device__ __forceinline__ void StoreQueryTile(uint8_t* tile, RowPtr row_ptr, int valid_rows,
                                               float mul, int tid) {
  constexpr int kChunksPerRow = D / 8;
  for (int idx = tid; idx < ROWS * kChunksPerRow; idx += THREADS) {
    const int row = idx / kChunksPerRow, chunk = idx % kChunksPerRow;
    uint4 packed = make_uint4(0, 0, 0, 0);
    if (row < valid_rows) {
      float v[8];
      Io::Load8(row_ptr(row) + chunk * 8, v);
      packed.x = PackBf16(v[0] * mul, v[1] * mul);
      packed.y = PackBf16(v[2] * mul, v[3] * mul);
      packed.z = PackBf16(v[4] * mul, v[5] * mul);
      packed.w = PackBf16(v[6] * mul, v[7] * mul);
    }
    *reinterpret_cast<uint4*>(tile + TileOffset<D>(row, chunk)) = packed;
  }
}

// A fragments (m16 x k16, row-major) of rows [row0, row0 + 16) of a swizzled tile, for all
// D/16 k-steps.
template <int D>
__device__ __forceinline__ void LoadRowFragments(uint32_t (&a)[D / 16][4], uint32_t tile, int row0,
                                                 int lane) {
  // Matrices: 0 = rows 0-7 / k 0-7, 1 = rows 8-15 / k 0-7, 2 = rows 0-7 / k 8-15, 3 = rows 8-15
  // / k 8-15: exactly a0..a3 of mma.m16n8k16.
  const int row = row0 + ((lane >> 3) & 1) * 8 + (lane & 7);
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
    LdMatrixX4(a[kk], tile + TileOffset<D>(row, 2 * kk + (lane >> 4)));
  }
}

// s[j] += Q (16 x D, A fragments) * K^T for key rows [key0 + 8j, key0 + 8j + 8), j < NT
// (NT even): the scores of 16 query rows against 8*NT keys.
template <int D, int NT>
__device__ __forceinline__ void ScoreTile(float (&s)[NT][4], const uint32_t (&qa)[D / 16][4],
                                          uint32_t k_tile, int key0, int lane) {
  // Matrices: 0 = keys 0-7 / k 0-7, 1 = keys 0-7 / k 8-15, 2 = keys 8-15 / k 0-7, 3 = keys 8-15
  // / k 8-15: b0, b1 of two consecutive 8-key n-tiles.
  const int key_in_pair = ((lane >> 4) & 1) * 8 + (lane & 7);
  const int chunk_lo = (lane >> 3) & 1;
#pragma unroll
  for (int jp = 0; jp < NT / 2; ++jp) {
    const int key = key0 + jp * 16 + key_in_pair;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      uint32_t kb[4];
      LdMatrixX4(kb, k_tile + TileOffset<D>(key, 2 * kk + chunk_lo));
      MmaBf16(s[2 * jp], qa[kk], kb[0], kb[1]);
      MmaBf16(s[2 * jp + 1], qa[kk], kb[2], kb[3]);
    }
  }
}

// o += P (16 x 8*NT probabilities, C-fragment layout in s) * V rows [key0, key0 + 8*NT).
template <int D, int NT>
__device__ __forceinline__ void AccumulateValues(float (&o)[D / 8][4], const float (&s)[NT][4],
                                                 uint32_t v_tile, int key0, int lane) {
  // Matrices (transposed loads): 0 = keys 0-7 / dims 0-7, 1 = keys 8-15 / dims 0-7, 2 = keys
  // 0-7 / dims 8-15, 3 = keys 8-15 / dims 8-15: b0, b1 of two consecutive 8-dim n-tiles.
  const int key_in_step = ((lane >> 3) & 1) * 8 + (lane & 7);
  const int chunk_hi = lane >> 4;
#pragma unroll
  for (int ks = 0; ks < NT / 2; ++ks) {
    const uint32_t pa[4] = {
        PackBf16(s[2 * ks][0], s[2 * ks][1]), PackBf16(s[2 * ks][2], s[2 * ks][3]),
        PackBf16(s[2 * ks + 1][0], s[2 * ks + 1][1]), PackBf16(s[2 * ks + 1][2], s[2 * ks + 1][3])};
    const int key = key0 + ks * 16 + key_in_step;
#pragma unroll
    for (int jj = 0; jj < D / 16; ++jj) {
      uint32_t vb[4];
      LdMatrixX4Trans(vb, v_tile + TileOffset<D>(key, 2 * jj + chunk_hi));
      MmaBf16(o[2 * jj], pa, vb[0], vb[1]);
      MmaBf16(o[2 * jj + 1], pa, vb[2], vb[3]);
    }
  }
}

// Online-softmax step for the two rows a thread holds (g and g + 8 of the warp's 16): scores in
// s are log2-scaled and already masked (-inf); they become probabilities relative to the new
// running max, and o and the thread's partial row sums l are rescaled. m is quad-uniform.
template <int D, int NT>
__device__ __forceinline__ void OnlineSoftmax(float (&s)[NT][4], float (&o)[D / 8][4],
                                              float (&m)[2], float (&l)[2]) {
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float mx = -INFINITY;
#pragma unroll
    for (int j = 0; j < NT; ++j) mx = fmaxf(mx, fmaxf(s[j][2 * r], s[j][2 * r + 1]));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
    const float m_new = fmaxf(m[r], mx);
    // A row with every score masked so far keeps m = -inf; subtract 0 instead (no inf - inf).
    const float base = m_new == -INFINITY ? 0.f : m_new;
    const float alpha = exp2f(m[r] - base);
    m[r] = m_new;
    float sum = 0.f;
#pragma unroll
    for (int j = 0; j < NT; ++j) {
      s[j][2 * r] = exp2f(s[j][2 * r] - base);
      s[j][2 * r + 1] = exp2f(s[j][2 * r + 1] - base);
      sum += s[j][2 * r] + s[j][2 * r + 1];
    }
    l[r] = l[r] * alpha + sum;
#pragma unroll
    for (int n = 0; n < D / 8; ++n) {
      o[n][2 * r] *= alpha;
      o[n][2 * r + 1] *= alpha;
    }
  }
}

__device__ __forceinline__ float QuadSum(float v) {
  v += __shfl_xor_sync(0xffffffffu, v, 1);
  v += __shfl_xor_sync(0xffffffffu, v, 2);
  return v;
}

// ---- per-device kernel setup ----------------------------------------------------------------

struct KernelResidency {
  int sms = 0;       // multiprocessors of the current device
  int resident = 0;  // CTAs of this kernel that fit on one multiprocessor
};

// Raises the kernel's dynamic shared-memory limit and measures its residency, once per device
// (cached: later calls, graph captures included, only ask which device is current).
template <auto KERNEL, int THREADS, int SMEM_BYTES>
cudaError_t PrepareKernel(KernelResidency* out) {
  constexpr int kMaxDevices = 64;
  static std::atomic<int> cache[kMaxDevices];  // (sms << 8) | resident; 0 = not measured yet
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  if (device < kMaxDevices) {
    const int packed = cache[device].load(std::memory_order_relaxed);
    if (packed != 0) {
      out->sms = packed >> 8;
      out->resident = packed & 0xff;
      return cudaSuccess;
    }
  }
  err = cudaFuncSetAttribute(KERNEL, cudaFuncAttributeMaxDynamicSharedMemorySize, SMEM_BYTES);
  if (err == cudaSuccess) {
    err =
        cudaOccupancyMaxActiveBlocksPerMultiprocessor(&out->resident, KERNEL, THREADS, SMEM_BYTES);
  }
  if (err == cudaSuccess) {
    err = cudaDeviceGetAttribute(&out->sms, cudaDevAttrMultiProcessorCount, device);
  }
  if (err != cudaSuccess) return err;
  if (out->resident < 1) return cudaErrorInvalidConfiguration;
  if (device < kMaxDevices) {
    cache[device].store((out->sms << 8) | (out->resident & 0xff), std::memory_order_relaxed);
  }
  return cudaSuccess;
}

// ---- dispatch ------------------------------------------------------------------------------

// The dispatch table: (head_dim, io dtype) -> instantiation. Everything that takes a runtime
// shape into a template goes through here (CanImplement included).
template <typename Fn>
cudaError_t DispatchHeadDimIo(int head_dim, DType io, Fn&& fn) {
  if (io == DType::kBF16) {
    if (head_dim == 128) return fn.template operator()<128, Bf16Io>();
    if (head_dim == 64) return fn.template operator()<64, Bf16Io>();
  } else if (io == DType::kF32) {
    if (head_dim == 128) return fn.template operator()<128, F32Io>();
    if (head_dim == 64) return fn.template operator()<64, F32Io>();
  }
  return cudaErrorNotSupported;
}

}  // namespace asynctls::kernels::cuda::attention_detail
