// CUDA entries of the two-level sparse attention ops (params in tls_params.h; device pointers,
// same semantics as tls_ref.h). Each entry enqueues on `stream`, never allocates or
// synchronizes (graph-capturable), and returns the launch's cudaError_t; cudaErrorInvalidValue
// when the shape is not supported (see the CanImplement functions). Selections and selection
// scores equal the CPU reference bit for bit; attention outputs agree to fp32 rounding.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>

#include "asynctls/kernels/tls_params.h"

namespace asynctls::kernels::cuda {

// ---- support checks -----------------------------------------------------------------------
// Index and selection ops: any head_dim that is a multiple of 8 up to 576, num_channels a
// multiple of 8 up to 128, group * num_channels <= 16384. Attention: (head_dim, v_head_dim) in
// {(64, 64), (128, 128), (576, 512)}, any group size. Both forms of the block index.
bool TlsSelectCanImplement(int head_dim, int num_channels, int group_size);
bool TlsSparseAttentionCanImplement(int head_dim, int v_head_dim, int group_size, DType io_dtype);

// ---- calibration and indices --------------------------------------------------------------
cudaError_t TlsCalibStats(const TlsCalibStatsParams& p, cudaStream_t stream);
cudaError_t TlsCalibSelect(const TlsCalibSelectParams& p, cudaStream_t stream);
cudaError_t TlsIndexUpdate(const TlsIndexUpdateParams& p, cudaStream_t stream);

// ---- selection ----------------------------------------------------------------------------
// Bytes of TlsBlockScoreParams::maybe_query_sums (optional: with it, large MLA groups sum their
// query once per row instead of in every block-score CTA).
size_t TlsBlockScoreWorkspaceBytes(const TlsBlockScoreParams& p);
cudaError_t TlsBlockScore(const TlsBlockScoreParams& p, cudaStream_t stream);
cudaError_t TlsBlockSelect(const TlsBlockSelectParams& p, cudaStream_t stream);
size_t TlsTokenScoreWorkspaceBytes(const TlsTokenScoreParams& p);
cudaError_t TlsTokenScore(const TlsTokenScoreParams& p, cudaStream_t stream);
cudaError_t TlsTokenSelect(const TlsTokenSelectParams& p, cudaStream_t stream);
cudaError_t TlsBlockExpand(const TlsBlockExpandParams& p, cudaStream_t stream);
// TlsTokenScore then TlsTokenSelect, same positions, without writing alpha or candidate ids:
// rows of up to 8192 candidates (CanFuse). Groups of up to 16 heads with group * num_channels
// <= 512 (GQA) take one launch, a thread cluster per row, and no workspace. Groups of 16, 32,
// 64 or 128 heads on 64+ channels (MLA) need score.workspace (TlsTokenScoreWorkspaceBytes):
// the int8 query codes and an exp scratch; a cluster per row (two at 128 heads where cluster
// sizes cap a few rows' SMs, half the heads each) scores on integer tensor cores and selects when
// the row clusters fit one wave, except at 128 heads where a cluster per (row, 16-head tile)
// fits one too (one row); then, or when no row clusters fit, the head tiles score; where a row
// spans clusters, its last cluster to finish selects. The two-level decode
// step uses it whenever it can.
bool TlsTokenScoreSelectCanFuse(const TlsTokenScoreParams& score);
cudaError_t TlsTokenScoreSelect(const TlsTokenScoreParams& score,
                                const TlsTokenSelectParams& select, cudaStream_t stream);
// Phase trace of the MLA one-launch token kernel (MlaScoreSelectKernel), for tls_bench
// --trace-token: in builds with ASYNCTLS_TOKEN_TRACE each launch's CTAs (up to kTokenTraceCtas,
// by linear block index) stamp kTokenTraceWords words: globaltimer ns at the start and at the
// end (kTraceEnd, or kTraceAlpha for a split row's clusters that do not select), the SM, then
// (from word 4) clock64 at each mark below (0: not reached). Copies the stamps to `out`
// (kTokenTraceCtas * kTokenTraceWords) and clears them (synchronous); cudaErrorNotSupported in
// other builds.
enum TlsTokenTraceMark : int {
  kTraceStart,
  kTraceList,
  kTraceStaged,
  kTracePrevGrid,
  kTraceQueries,
  kTraceLoop,
  kTraceCmax,
  kTraceSums,
  kTraceWeights,
  kTraceAlpha,
  kTraceTicket,
  kTracePartials,
  // the cluster top-k's radix passes (4 marks per pass: kTraceHist0 + 4 * pass ...)
  kTraceHist0,
  kTraceTotals0,
  kTraceBins0,
  kTracePass0,
  kTraceHist1,
  kTraceTotals1,
  kTraceBins1,
  kTracePass1,
  kTraceHist2,
  kTraceTotals2,
  kTraceBins2,
  kTracePass2,
  kTraceCounts,
  kTraceEnd,
  kTokenTraceMarks
};
inline constexpr int kTokenTraceCtas = 1024;
inline constexpr int kTokenTraceWords = 4 + kTokenTraceMarks;
cudaError_t TlsTokenTraceRead(unsigned long long* out);
// Runs the policy's ops in order on `stream` (workspace holds block scores, token scores and
// the softmax statistics, each in its own region).
size_t TlsDecodeSelectWorkspaceBytes(const TlsDecodeSelectParams& p);
cudaError_t TlsDecodeSelect(const TlsDecodeSelectParams& p, cudaStream_t stream);
// The same; with the one-step lag and a `block_stream`, the block branch (M_t for the next
// step) runs there beside the token branch, forked from `stream` by recording `fork`, and reads
// the query from `block_q` (p.q or a copy that stays unchanged until the branch ends). `join` is
// recorded on block_stream when the branch ends; the caller makes `stream` wait for it before
// anything reads M_t, changes the branch's inputs or reuses the workspace (the paper's overlap:
// until then the branch runs beside the attention and the FFN). Events and stream are the
// caller's (no timing needed); graph-capturable once joined.
cudaError_t TlsDecodeSelect(const TlsDecodeSelectParams& p, cudaStream_t stream,
                            cudaStream_t block_stream, const void* block_q, cudaEvent_t fork,
                            cudaEvent_t join);

// ---- attention ----------------------------------------------------------------------------
// Split-K over the positions: partial (max, sum, output) per split in the workspace, merged by
// a second kernel. The split count depends only on the params and the device's SM count.
size_t TlsSparseAttentionWorkspaceBytes(const TlsSparseAttentionParams& p);
cudaError_t TlsSparseAttention(const TlsSparseAttentionParams& p, cudaStream_t stream);

}  // namespace asynctls::kernels::cuda
