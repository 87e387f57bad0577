// Timing shared by the CUDA kernel benchmarks: exit on any CUDA error, and the median time of
// a run of launches captured in one CUDA graph (replays hide launch gaps, as a graphed
// decode step would).
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <vector>

#define BENCH_CHECK(expr)                                                                        \
  do {                                                                                           \
    const cudaError_t _e = (expr);                                                               \
    if (_e != cudaSuccess) {                                                                     \
      std::fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #expr, cudaGetErrorString(_e)); \
      std::exit(1);                                                                              \
    }                                                                                            \
  } while (0)

namespace asynctls::bench {

// Captures `launch(i, stream)` for i in [0, per_sample) into one graph, replays it twice to
// warm up, then `samples` times under events; returns the median milliseconds per launch.
template <typename Launch>
double MedianGraphMs(Launch&& launch, int per_sample, int samples, cudaStream_t stream) {
  cudaGraph_t graph;
  cudaGraphExec_t exec;
  BENCH_CHECK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
  for (int i = 0; i < per_sample; ++i) BENCH_CHECK(launch(i, stream));
  BENCH_CHECK(cudaStreamEndCapture(stream, &graph));
  // Kernel nodes keep the priority of the stream they were captured from (a step's critical
  // branch on a high-priority stream goes first when branches compete for SMs).
  BENCH_CHECK(cudaGraphInstantiate(&exec, graph, cudaGraphInstantiateFlagUseNodePriority));
  BENCH_CHECK(cudaGraphLaunch(exec, stream));
  BENCH_CHECK(cudaGraphLaunch(exec, stream));
  cudaEvent_t start, stop;
  BENCH_CHECK(cudaEventCreate(&start));
  BENCH_CHECK(cudaEventCreate(&stop));
  std::vector<double> ms;
  for (int s = 0; s < samples; ++s) {
    BENCH_CHECK(cudaEventRecord(start, stream));
    BENCH_CHECK(cudaGraphLaunch(exec, stream));
    BENCH_CHECK(cudaEventRecord(stop, stream));
    BENCH_CHECK(cudaEventSynchronize(stop));
    float t = 0;
    BENCH_CHECK(cudaEventElapsedTime(&t, start, stop));
    ms.push_back(double{t} / per_sample);
  }
  cudaEventDestroy(start);
  cudaEventDestroy(stop);
  cudaGraphExecDestroy(exec);
  cudaGraphDestroy(graph);
  std::sort(ms.begin(), ms.end());
  return ms[ms.size() / 2];
}

}  // namespace asynctls::bench
