// GemmRunner: out[m, n] = beta * out + x[m, k] . w[n, k]^T (+ bias[n]) through cuBLASLt.
//
// Row-major to column-major: a row-major [r, c] matrix is a column-major [c, r] one, so we
// compute out^T (n x m, ld n) = W (n x k, stored as col-major k x n -> op T) . x^T (k x m,
// col-major, ld k -> op N). The bias of the BIAS epilogue is per row of D (col-major) = per n.
#include <cublasLt.h>

#include <cstdint>
#include <cstdio>
#include <map>
#include <string>
#include <tuple>

#include "asynctls/kernels/cuda_ops.h"
#include "gemm_epilogue.h"

namespace asynctls::kernels::cuda {
namespace {

constexpr size_t kWorkspaceBytes = size_t{32} << 20;

cudaError_t ToCudaError(cublasStatus_t s) {
  switch (s) {
    case CUBLAS_STATUS_SUCCESS:
      return cudaSuccess;
    case CUBLAS_STATUS_ALLOC_FAILED:
      return cudaErrorMemoryAllocation;
    case CUBLAS_STATUS_INVALID_VALUE:
      return cudaErrorInvalidValue;
    case CUBLAS_STATUS_NOT_SUPPORTED:
    case CUBLAS_STATUS_ARCH_MISMATCH:
      return cudaErrorNotSupported;
    case CUBLAS_STATUS_NOT_INITIALIZED:
      return cudaErrorInitializationError;
    case CUBLAS_STATUS_EXECUTION_FAILED:
      return cudaErrorLaunchFailure;
    default:
      return cudaErrorUnknown;
  }
}

// Largest power of two <= 256 that divides the address (what cuBLASLt's heuristic must assume).
uint32_t AlignmentOf(const void* p) {
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  uint32_t align = 256;
  while (align > 1 && a % align != 0) align /= 2;
  return align;
}

// One GEMM shape's cuBLASLt objects and the algorithm the heuristic picked for it.
struct Plan {
  cublasLtMatmulDesc_t desc = nullptr;
  cublasLtMatrixLayout_t a = nullptr, b = nullptr, c = nullptr;
  cublasLtMatmulAlgo_t algo{};
  bool bias_in_epilogue = false;
};

// (m, n, k, w dtype, has bias, alignments of w, x, out, bias)
using PlanKey =
    std::tuple<int32_t, int32_t, int32_t, int32_t, bool, uint32_t, uint32_t, uint32_t, uint32_t>;

}  // namespace

struct GemmRunner::State {
  cublasLtHandle_t handle = nullptr;
  void* workspace = nullptr;
  void* x_bf16 = nullptr;  // [max_x_elements] bf16 scratch for x in bf16 GEMMs
  int64_t max_x_elements = 0;
  std::map<PlanKey, Plan> plans;
  std::string last_error;

  cudaError_t Fail(const char* call, cublasStatus_t s) {
    last_error = std::string(call) + ": " + cublasLtGetStatusName(s);
    return ToCudaError(s);
  }
  cudaError_t Fail(const char* what, cudaError_t e) {
    last_error = std::string(what) + ": " + cudaGetErrorName(e);
    return e;
  }

  cudaError_t MakePlan(const PlanKey& key, const GemmParams& p, bool bias_ok, Plan* out);
};

// Returns from the enclosing function with the cuBLASLt error recorded in `state`.
#define ASYNCTLS_LT_TRY(state, call)                                 \
  do {                                                               \
    const cublasStatus_t _s = (call);                                \
    if (_s != CUBLAS_STATUS_SUCCESS) return (state).Fail(#call, _s); \
  } while (0)

cudaError_t GemmRunner::State::MakePlan(const PlanKey& key, const GemmParams& p, bool bias_ok,
                                        Plan* plan) {
  const cudaDataType_t w_type = p.w_dtype == DType::kBF16 ? CUDA_R_16BF : CUDA_R_32F;
  const cublasOperation_t trans_a = CUBLAS_OP_T, trans_b = CUBLAS_OP_N;
  ASYNCTLS_LT_TRY(*this, cublasLtMatmulDescCreate(&plan->desc, CUBLAS_COMPUTE_32F, CUDA_R_32F));
  ASYNCTLS_LT_TRY(*this, cublasLtMatmulDescSetAttribute(plan->desc, CUBLASLT_MATMUL_DESC_TRANSA,
                                                        &trans_a, sizeof(trans_a)));
  ASYNCTLS_LT_TRY(*this, cublasLtMatmulDescSetAttribute(plan->desc, CUBLASLT_MATMUL_DESC_TRANSB,
                                                        &trans_b, sizeof(trans_b)));
  if (bias_ok) {
    const cublasLtEpilogue_t epilogue = CUBLASLT_EPILOGUE_BIAS;
    const cudaDataType_t bias_type = CUDA_R_32F;
    ASYNCTLS_LT_TRY(*this, cublasLtMatmulDescSetAttribute(plan->desc, CUBLASLT_MATMUL_DESC_EPILOGUE,
                                                          &epilogue, sizeof(epilogue)));
    ASYNCTLS_LT_TRY(*this,
                    cublasLtMatmulDescSetAttribute(plan->desc, CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE,
                                                   &bias_type, sizeof(bias_type)));
  }
  ASYNCTLS_LT_TRY(*this, cublasLtMatrixLayoutCreate(&plan->a, w_type, p.k, p.n, p.k));
  ASYNCTLS_LT_TRY(*this, cublasLtMatrixLayoutCreate(&plan->b, w_type, p.k, p.m, p.k));
  ASYNCTLS_LT_TRY(*this, cublasLtMatrixLayoutCreate(&plan->c, CUDA_R_32F, p.n, p.m, p.n));

  cublasLtMatmulPreference_t pref = nullptr;
  ASYNCTLS_LT_TRY(*this, cublasLtMatmulPreferenceCreate(&pref));
  const uint64_t ws = kWorkspaceBytes;
  const uint32_t align_a = std::get<5>(key), align_b = std::get<6>(key), align_c = std::get<7>(key);
  cublasStatus_t s = cublasLtMatmulPreferenceSetAttribute(
      pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof(ws));
  if (s == CUBLAS_STATUS_SUCCESS) {
    s = cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES,
                                             &align_a, sizeof(align_a));
  }
  if (s == CUBLAS_STATUS_SUCCESS) {
    s = cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
                                             &align_b, sizeof(align_b));
  }
  for (auto attr :
       {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES}) {
    if (s == CUBLAS_STATUS_SUCCESS) {
      s = cublasLtMatmulPreferenceSetAttribute(pref, attr, &align_c, sizeof(align_c));
    }
  }
  cublasLtMatmulHeuristicResult_t result{};
  int returned = 0;
  if (s == CUBLAS_STATUS_SUCCESS) {
    s = cublasLtMatmulAlgoGetHeuristic(handle, plan->desc, plan->a, plan->b, plan->c, plan->c, pref,
                                       1, &result, &returned);
  }
  cublasLtMatmulPreferenceDestroy(pref);
  if (s != CUBLAS_STATUS_SUCCESS && s != CUBLAS_STATUS_NOT_SUPPORTED) {
    return Fail("cublasLtMatmulAlgoGetHeuristic", s);
  }
  if (returned == 0) {
    return Fail("cublasLtMatmulAlgoGetHeuristic (no algorithm)", CUBLAS_STATUS_NOT_SUPPORTED);
  }
  plan->algo = result.algo;
  plan->bias_in_epilogue = bias_ok;
  return cudaSuccess;
}

void DestroyPlan(Plan& plan) {
  if (plan.c) cublasLtMatrixLayoutDestroy(plan.c);
  if (plan.b) cublasLtMatrixLayoutDestroy(plan.b);
  if (plan.a) cublasLtMatrixLayoutDestroy(plan.a);
  if (plan.desc) cublasLtMatmulDescDestroy(plan.desc);
  plan = Plan{};
}

cudaError_t GemmRunner::Create(int64_t max_x_elements, GemmRunner** out) {
  if (out == nullptr || max_x_elements < 0) return cudaErrorInvalidValue;
  *out = nullptr;
  GemmRunner* runner = new GemmRunner();
  runner->state_ = new State();
  State& st = *runner->state_;
  st.max_x_elements = max_x_elements;
  cudaError_t e = ToCudaError(cublasLtCreate(&st.handle));
  if (e == cudaSuccess) e = cudaMalloc(&st.workspace, kWorkspaceBytes);
  if (e == cudaSuccess && max_x_elements > 0) {
    e = cudaMalloc(&st.x_bf16, static_cast<size_t>(max_x_elements) * 2);
  }
  if (e != cudaSuccess) {
    cudaGetLastError();  // an OOM is not sticky; don't leave it for the next launch check
    delete runner;
    return e;
  }
  *out = runner;
  return cudaSuccess;
}

GemmRunner::~GemmRunner() {
  if (state_ == nullptr) return;
  for (auto& [key, plan] : state_->plans) DestroyPlan(plan);
  if (state_->x_bf16) cudaFree(state_->x_bf16);
  if (state_->workspace) cudaFree(state_->workspace);
  if (state_->handle) cublasLtDestroy(state_->handle);
  delete state_;
}

const char* GemmRunner::last_error_detail() const {
  return state_ ? state_->last_error.c_str() : "";
}

cudaError_t GemmRunner::Run(const GemmParams& p, cudaStream_t stream) {
  State& st = *state_;
  if (p.m < 0 || p.n <= 0 || p.k <= 0 || (p.w_dtype != DType::kF32 && p.w_dtype != DType::kBF16)) {
    return st.Fail("GemmRunner::Run (bad shape or dtype)", cudaErrorInvalidValue);
  }
  if (p.m == 0) return cudaSuccess;

  const void* x_operand = p.x;
  if (p.maybe_x_bf16 != nullptr) {
    if (p.w_dtype != DType::kBF16) {
      return st.Fail("GemmRunner::Run (bf16 x needs bf16 weights)", cudaErrorInvalidValue);
    }
    x_operand = p.maybe_x_bf16;
  } else if (p.w_dtype == DType::kBF16) {
    if (int64_t{p.m} * p.k > st.max_x_elements) {
      return st.Fail("GemmRunner::Run (m * k exceeds the bf16 scratch)", cudaErrorInvalidValue);
    }
    const cudaError_t e = ConvertF32ToBf16(p.x, st.x_bf16, int64_t{p.m} * p.k, stream);
    if (e != cudaSuccess) return st.Fail("ConvertF32ToBf16", e);
    x_operand = st.x_bf16;
  }

  const bool has_bias = p.maybe_bias != nullptr;
  const uint32_t bias_align = has_bias ? AlignmentOf(p.maybe_bias) : 0;
  const PlanKey key{p.m,
                    p.n,
                    p.k,
                    static_cast<int32_t>(p.w_dtype),
                    has_bias,
                    AlignmentOf(p.w),
                    AlignmentOf(x_operand),
                    AlignmentOf(p.out),
                    bias_align};
  auto it = st.plans.find(key);
  if (it == st.plans.end()) {
    Plan plan;
    // The epilogue reads the bias with vector loads; an odd-aligned bias takes the add kernel.
    const bool bias_ok = has_bias && bias_align >= 16;
    cudaError_t e = st.MakePlan(key, p, bias_ok, &plan);
    if (e != cudaSuccess && bias_ok) {
      DestroyPlan(plan);
      e = st.MakePlan(key, p, /*bias_ok=*/false, &plan);
    }
    if (e != cudaSuccess) {
      DestroyPlan(plan);
      return e;
    }
    it = st.plans.emplace(key, plan).first;
  }
  Plan& plan = it->second;
  if (plan.bias_in_epilogue) {
    ASYNCTLS_LT_TRY(st, cublasLtMatmulDescSetAttribute(plan.desc, CUBLASLT_MATMUL_DESC_BIAS_POINTER,
                                                       &p.maybe_bias, sizeof(p.maybe_bias)));
  }
  const float alpha = 1.f, beta = p.beta;
  ASYNCTLS_LT_TRY(
      st, cublasLtMatmul(st.handle, plan.desc, &alpha, p.w, plan.a, x_operand, plan.b, &beta, p.out,
                         plan.c, p.out, plan.c, &plan.algo, st.workspace, kWorkspaceBytes, stream));
  if (has_bias && !plan.bias_in_epilogue) {
    const cudaError_t e = detail::AddBiasRows(p.maybe_bias, p.out, p.m, p.n, stream);
    if (e != cudaSuccess) return st.Fail("AddBiasRows", e);
  }
  return cudaSuccess;
}

}  // namespace asynctls::kernels::cuda
