// Benchmark of the CUDA paged attention kernels on Qwen3-8B's attention layout (32 query / 8 KV
// heads, head_dim 128, bf16):
//   decode  (q_len 1): batch 1..8 x context 16K..128K, GB/s of K+V bytes actually read;
//   prefill (causal, batch 1, q_len == context): 8K, 16K, 32K, TFLOP/s of the causal half.
// Timing: each sample is a CUDA graph of N launches (no host launch gaps in the figure), timed
// with CUDA events; the figure is the median over samples. Decode launches rotate over enough
// copies of the KV cache (own blocks, shuffled block tables) that each launch misses the 60 MB L2.
//
//   attention_bench [--mode decode|prefill|all] [--json FILE] [--samples N] [--quick]
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "asynctls/kernels/cuda_attention.h"
#include "graph_timing.cuh"
#include "kernels/test_util.h"

namespace {

using asynctls::kernels::DType;
using asynctls::kernels::kKvBlockSize;
using asynctls::kernels::PagedDecodeParams;
using asynctls::kernels::PagedPrefillParams;
using asynctls::kernels::testing::DeviceBuffer;
namespace cuda = asynctls::kernels::cuda;


constexpr int kNumQHeads = 32, kNumKvHeads = 8, kHeadDim = 128;

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

void Fill(DeviceBuffer& buf, uint64_t seed) {
  const size_t n = buf.bytes() / 2;
  FillRandomBf16<<<4096, 256>>>(buf.as<__nv_bfloat16>(), n, seed);
  BENCH_CHECK(cudaGetLastError());
}

// Median milliseconds per launch of `launch(i)` (i = launch index), graph-captured `per_sample`
// at a time.
template <typename Launch>
double TimeMs(Launch&& launch, int per_sample, int samples, cudaStream_t stream) {
  for (int i = 0; i < per_sample; ++i) BENCH_CHECK(launch(i, stream));  // warm-up, plan caches
  BENCH_CHECK(cudaStreamSynchronize(stream));
  return asynctls::bench::MedianGraphMs(launch, per_sample, samples, stream);
}

struct Result {
  std::string kind;
  int batch, context;
  double ms, gbps, tflops;
};

Result BenchDecode(int batch, int context, int samples, cudaStream_t stream) {
  const int pages = (context + kKvBlockSize - 1) / kKvBlockSize;
  const size_t kv_bytes = 2ull * batch * kNumKvHeads * size_t(context) * kHeadDim * 2;
  // Enough copies that consecutive launches never find their KV in L2 (>= 1 GB in rotation).
  const int copies = static_cast<int>(std::clamp<size_t>((1ull << 30) / kv_bytes + 1, 2, 16));
  const size_t blocks = size_t(copies) * batch * pages;
  const size_t pool_bytes = blocks * kNumKvHeads * kKvBlockSize * kHeadDim * 2;
  DeviceBuffer k(pool_bytes), v(pool_bytes);
  Fill(k, 1);
  Fill(v, 2);
  std::vector<int32_t> ids(blocks);
  std::iota(ids.begin(), ids.end(), 0);
  std::shuffle(ids.begin(), ids.end(), std::mt19937(7));
  std::vector<DeviceBuffer> tables(copies);
  for (int c = 0; c < copies; ++c) {
    std::vector<int32_t> t(ids.begin() + size_t(c) * batch * pages,
                           ids.begin() + size_t(c + 1) * batch * pages);
    BENCH_CHECK(tables[c].Upload(t));
  }
  DeviceBuffer lens, q(size_t(batch) * kNumQHeads * kHeadDim * 2),
      out(size_t(batch) * kNumQHeads * kHeadDim * 2), lse(size_t(batch) * kNumQHeads * 4), ws;
  BENCH_CHECK(lens.Upload(std::vector<int32_t>(batch, context)));
  Fill(q, 3);

  PagedDecodeParams p{};
  p.q = q.get();
  p.k_cache = k.get();
  p.v_cache = v.get();
  p.seq_lens = lens.as<int32_t>();
  p.out = out.get();
  p.maybe_lse = lse.as<float>();
  p.io_dtype = DType::kBF16;
  p.batch = batch;
  p.num_q_heads = kNumQHeads;
  p.num_kv_heads = kNumKvHeads;
  p.head_dim = kHeadDim;
  p.max_blocks_per_seq = pages;
  p.max_seq_len = context;
  p.scale = 1.f / std::sqrt(float(kHeadDim));
  BENCH_CHECK(ws.Resize(std::max<size_t>(cuda::PagedDecodeWorkspaceBytes(p), 16)));
  p.workspace = ws.get();

  const int per_sample = std::max(copies, 8);
  const double ms = TimeMs(
      [&](int i, cudaStream_t s) {
        PagedDecodeParams pi = p;
        pi.block_table = tables[i % copies].as<int32_t>();
        return cuda::PagedDecodeAttention(pi, s);
      },
      per_sample, samples, stream);
  return {"decode", batch, context, ms, kv_bytes / (ms * 1e6), 0.0};
}

Result BenchPrefill(int context, int samples, cudaStream_t stream) {
  const int pages = (context + kKvBlockSize - 1) / kKvBlockSize;
  const size_t pool_bytes = size_t(pages) * kNumKvHeads * kKvBlockSize * kHeadDim * 2;
  DeviceBuffer k(pool_bytes), v(pool_bytes);
  Fill(k, 4);
  Fill(v, 5);
  std::vector<int32_t> ids(pages);
  std::iota(ids.begin(), ids.end(), 0);
  std::shuffle(ids.begin(), ids.end(), std::mt19937(9));
  DeviceBuffer table, lens, cu, q(size_t(context) * kNumQHeads * kHeadDim * 2),
      out(size_t(context) * kNumQHeads * kHeadDim * 2);
  BENCH_CHECK(table.Upload(ids));
  BENCH_CHECK(lens.Upload(std::vector<int32_t>{context}));
  BENCH_CHECK(cu.Upload(std::vector<int32_t>{0, context}));
  Fill(q, 6);

  PagedPrefillParams p{};
  p.q = q.get();
  p.cu_q_lens = cu.as<int32_t>();
  p.k_cache = k.get();
  p.v_cache = v.get();
  p.block_table = table.as<int32_t>();
  p.seq_lens = lens.as<int32_t>();
  p.out = out.get();
  p.io_dtype = DType::kBF16;
  p.batch = 1;
  p.num_tokens = context;
  p.num_q_heads = kNumQHeads;
  p.num_kv_heads = kNumKvHeads;
  p.head_dim = kHeadDim;
  p.max_blocks_per_seq = pages;
  p.max_q_len = context;
  p.scale = 1.f / std::sqrt(float(kHeadDim));
  const double ms = TimeMs([&](int, cudaStream_t s) { return cuda::PagedPrefillAttention(p, s); },
                           2, samples, stream);
  // Causal: row i sees i + 1 keys; QK^T and PV are 2 * d FLOPs per (row, key) each.
  const double flops = 4.0 * kNumQHeads * kHeadDim * (double(context) * (context + 1) / 2);
  return {"prefill", 1, context, ms, 0.0, flops / (ms * 1e9)};
}

}  // namespace

int main(int argc, char** argv) {
  std::string mode = "all", json_path;
  int samples = 25;
  bool quick = false;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--mode" && i + 1 < argc) {
      mode = argv[++i];
    } else if (a == "--json" && i + 1 < argc) {
      json_path = argv[++i];
    } else if (a == "--samples" && i + 1 < argc) {
      samples = std::max(3, std::atoi(argv[++i]));
    } else if (a == "--quick") {
      quick = true;
    } else {
      std::fprintf(stderr,
                   "usage: %s [--mode decode|prefill|all] [--json FILE] [--samples N] [--quick]\n",
                   argv[0]);
      return 2;
    }
  }
  int device = 0;
  cudaDeviceProp prop;
  BENCH_CHECK(cudaGetDevice(&device));
  BENCH_CHECK(cudaGetDeviceProperties(&prop, device));
  std::printf("device: %s, %d SMs, L2 %d MB; layout %d q / %d kv heads, d %d, bf16\n", prop.name,
              prop.multiProcessorCount, prop.l2CacheSize >> 20, kNumQHeads, kNumKvHeads, kHeadDim);
  cudaStream_t stream;
  BENCH_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));

  std::vector<Result> results;
  if (mode == "decode" || mode == "all") {
    std::printf("\n%-8s %6s %8s %10s %10s\n", "decode", "batch", "context", "ms", "GB/s");
    const std::vector<int> batches = quick ? std::vector<int>{1, 8} : std::vector<int>{1, 2, 4, 8};
    const std::vector<int> contexts =
        quick ? std::vector<int>{16384, 131072} : std::vector<int>{16384, 32768, 65536, 131072};
    for (int b : batches) {
      for (int l : contexts) {
        results.push_back(BenchDecode(b, l, samples, stream));
        const Result& r = results.back();
        std::printf("%-8s %6d %8d %10.4f %10.1f\n", "", r.batch, r.context, r.ms, r.gbps);
        std::fflush(stdout);
      }
    }
  }
  if (mode == "prefill" || mode == "all") {
    std::printf("\n%-8s %6s %8s %10s %10s\n", "prefill", "batch", "context", "ms", "TFLOP/s");
    const std::vector<int> contexts =
        quick ? std::vector<int>{8192} : std::vector<int>{8192, 16384, 32768};
    for (int l : contexts) {
      results.push_back(BenchPrefill(l, std::max(5, samples / 3), stream));
      const Result& r = results.back();
      std::printf("%-8s %6d %8d %10.4f %10.1f\n", "", r.batch, r.context, r.ms, r.tflops);
      std::fflush(stdout);
    }
  }
  BENCH_CHECK(cudaStreamDestroy(stream));

  if (!json_path.empty()) {
    FILE* f = std::fopen(json_path.c_str(), "w");
    if (!f) {
      std::perror(json_path.c_str());
      return 1;
    }
    std::fprintf(f, "{\"device\": \"%s\", \"results\": [\n", prop.name);
    for (size_t i = 0; i < results.size(); ++i) {
      const Result& r = results[i];
      std::fprintf(f,
                   "  {\"impl\": \"asynctls\", \"kind\": \"%s\", \"batch\": %d, \"context\": %d, "
                   "\"ms\": %.6f, \"gbps\": %.2f, \"tflops\": %.2f}%s\n",
                   r.kind.c_str(), r.batch, r.context, r.ms, r.gbps, r.tflops,
                   i + 1 < results.size() ? "," : "");
    }
    std::fprintf(f, "]}\n");
    std::fclose(f);
  }
  return 0;
}
