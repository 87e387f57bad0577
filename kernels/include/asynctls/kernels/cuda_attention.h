// CUDA dense attention over the paged bf16 KV cache (params in dense_params.h). Enqueue on
// `stream`; no allocation, no synchronization (graph-capturable).
#pragma once

#include <cstddef>

#include <cuda_runtime_api.h>

#include "asynctls/kernels/dense_params.h"

namespace asynctls::kernels::cuda {

// Supported head dims / dtypes (the dispatch table's keys).
bool PagedAttentionCanImplement(int head_dim, DType io_dtype, int group_size);

// Bytes of split-K scratch PagedDecodeAttention needs for these shapes (max_seq_len, batch,
// heads); pass a buffer at least this large in params.workspace.
size_t PagedDecodeWorkspaceBytes(const PagedDecodeParams& p);
cudaError_t PagedDecodeAttention(const PagedDecodeParams& p, cudaStream_t stream);
cudaError_t PagedPrefillAttention(const PagedPrefillParams& p, cudaStream_t stream);

}  // namespace asynctls::kernels::cuda
