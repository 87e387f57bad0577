// Plain C++ reference of the two-level sparse attention ops (params in tls_params.h): the oracle
// the CUDA kernels (cuda_tls.h) are compared to. Simple loops, float accumulation, no threads;
// host pointers; workspace fields are ignored. Selection scores follow tls_math.h, so the CUDA
// kernels match them bit for bit and selected sets compare exactly.
// Contract violations (bad shapes, a too small positions row) abort with a message.
#pragma once

#include "asynctls/kernels/tls_params.h"

namespace asynctls::kernels::ref {

void TlsCalibStats(const TlsCalibStatsParams& p);
void TlsCalibSelect(const TlsCalibSelectParams& p);
void TlsIndexUpdate(const TlsIndexUpdateParams& p);

void TlsBlockScore(const TlsBlockScoreParams& p);
void TlsBlockSelect(const TlsBlockSelectParams& p);
void TlsTokenScore(const TlsTokenScoreParams& p);
void TlsTokenSelect(const TlsTokenSelectParams& p);
void TlsBlockExpand(const TlsBlockExpandParams& p);
void TlsDecodeSelect(const TlsDecodeSelectParams& p);

void TlsSparseAttention(const TlsSparseAttentionParams& p);

}  // namespace asynctls::kernels::ref
