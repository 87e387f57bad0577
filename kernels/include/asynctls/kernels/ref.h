// Plain C++ reference ops: the oracle the CUDA kernels are compared to. Simple loops, float
// accumulation, no fusion, no SIMD, no threads. Host pointers; shapes as in the params headers.
#pragma once

#include "asynctls/kernels/dense_params.h"

namespace asynctls::kernels::ref {

void Embedding(const EmbeddingParams& p);
void RmsNorm(const RmsNormParams& p);
void Gemm(const GemmParams& p);
void Rope(const RopeParams& p);
void SplitQkv(const SplitQkvParams& p);
void SiluMul(const SiluMulParams& p);
void GreedyPick(const GreedyPickParams& p);
void KvAppend(const KvAppendParams& p);
void PagedDecodeAttention(const PagedDecodeParams& p);
void PagedPrefillAttention(const PagedPrefillParams& p);
void RandomFill(const RandomFillParams& p);
void CopyRows(const CopyRowsParams& p);

}  // namespace asynctls::kernels::ref
