// `--tls-channels FILE [--tls-block-budget N] [--tls-token-budget N] [--tls-lag L]`: two-level
// sparse decode for an engine (asynctls serve, generate and asynctls-worker). FILE is `asynctls
// calibrate`'s output; budgets default to the paper's k_b 128, k_t 1024; L is `one-step` (the
// paper's: tokens chosen among the previous step's blocks, block selection beside them; the
// default) or `same-step`; `--tls-lag-slots N`: sequences that keep lag state at once (256);
// `--tls-block-index bf16|int8`: the block index's form (int8: half the bytes). And
// `--cuda-graphs on|off`: decode steps replayed from CUDA graphs (on by default: on a GPU, 8-10%
// off a batch-1 step, bench/results/tls-decode-step-h200.md run 12; the CPU runs op by op).
// `--weight-dtype f32|bf16`: the GEMM weights' form on a GPU (bf16 by default: half the bytes
// each decode step reads; f32 for results that match the CPU's bit for bit where the kernels
// allow; the CPU keeps f32 either way).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "asynctls/runtime/engine.h"
#include "asynctls/runtime/status.h"
#include "flags.h"

namespace asynctls {

// The flags ParseTlsFlags reads (every command that builds an engine accepts them).
inline const std::vector<std::string>& TlsFlagNames() {
  static const std::vector<std::string> names = {"tls-channels",     "tls-block-budget",
                                                 "tls-token-budget", "tls-lag",
                                                 "tls-lag-slots",    "tls-block-index"};
  return names;
}

// The flags ParseEngineFlags reads: the TLS flags and --cuda-graphs (`asynctls serve` passes
// them on to the workers it starts).
inline const std::vector<std::string>& EngineFlagNames() {
  static const std::vector<std::string> names = [] {
    std::vector<std::string> n = TlsFlagNames();
    n.push_back("cuda-graphs");
    n.push_back("weight-dtype");
    return n;
  }();
  return names;
}

// `known` and the engine flags.
inline std::vector<std::string> WithEngineFlags(std::vector<std::string> known) {
  known.insert(known.end(), EngineFlagNames().begin(), EngineFlagNames().end());
  return known;
}

inline absl::Status ParseTlsFlags(const Flags& flags, EngineOptions* options) {
  if (!flags.Has("tls-channels")) {
    for (const std::string& f : TlsFlagNames()) {
      if (flags.Has(f)) {
        return absl::InvalidArgumentError(absl::StrCat("--", f, " needs --tls-channels FILE"));
      }
    }
    return absl::OkStatus();
  }
  int32_t block_budget = 0, token_budget = 0;
  ASYNCTLS_RETURN_IF_ERROR(flags.GetNumber("tls-block-budget", &block_budget));
  ASYNCTLS_RETURN_IF_ERROR(flags.GetNumber("tls-token-budget", &token_budget));
  if (block_budget < 0 || token_budget < 0) {
    return absl::InvalidArgumentError("--tls-block-budget / --tls-token-budget: must be positive");
  }
  kernels::TlsLag lag = kernels::TlsLag::kOneStep;
  if (flags.Has("tls-lag")) {
    const std::string l = flags.Get("tls-lag");
    if (l == "same-step") {
      lag = kernels::TlsLag::kSameStep;
    } else if (l != "one-step") {
      return absl::InvalidArgumentError(
          absl::StrCat("--tls-lag: '", l, "' is not one-step or same-step"));
    }
  }
  ASYNCTLS_ASSIGN_OR_RETURN(
      TlsDecodeOptions tls,
      TlsDecodeOptionsFromFile(flags.Get("tls-channels"), block_budget, token_budget, lag));
  ASYNCTLS_RETURN_IF_ERROR(flags.GetNumber("tls-lag-slots", &tls.lag_sequences));
  if (tls.lag_sequences <= 0)
    return absl::InvalidArgumentError("--tls-lag-slots: must be positive");
  if (flags.Has("tls-block-index")) {
    const std::string form = flags.Get("tls-block-index");
    if (form != "bf16" && form != "int8") {
      return absl::InvalidArgumentError(
          absl::StrCat("--tls-block-index: '", form, "' is not bf16 or int8"));
    }
    tls.int8_block_index = form == "int8";
  }
  options->tls = std::move(tls);
  return absl::OkStatus();
}

// The TLS flags, then --cuda-graphs on|off and --weight-dtype f32|bf16.
inline absl::Status ParseEngineFlags(const Flags& flags, EngineOptions* options) {
  ASYNCTLS_RETURN_IF_ERROR(ParseTlsFlags(flags, options));
  const std::string dtype = flags.Has("weight-dtype") ? flags.Get("weight-dtype") : "bf16";
  if (dtype != "f32" && dtype != "bf16") {
    return absl::InvalidArgumentError(
        absl::StrCat("--weight-dtype: '", dtype, "' is not f32 or bf16"));
  }
  options->weight_dtype = dtype == "bf16" ? kernels::DType::kBF16 : kernels::DType::kF32;
  if (flags.Has("cuda-graphs")) {
    const std::string v = flags.Get("cuda-graphs");
    if (v != "on" && v != "off") {
      return absl::InvalidArgumentError(absl::StrCat("--cuda-graphs: '", v, "' is not on or off"));
    }
    options->cuda_graphs = v == "on";
  }
  return absl::OkStatus();
}

// `generate --server` (a client): --tls-block-budget / --tls-token-budget are the request's
// budgets (0 or absent: the server's; the server rejects more than its own), only with
// --attention tls. The flags that configure an engine (--device, --threads, the other engine
// flags) are errors: a client starts no engine, and ignoring them would hide the mistake.
inline absl::Status ParseClientFlags(const Flags& flags, bool tls, int32_t* block_budget,
                                     int32_t* token_budget) {
  std::vector<std::string> engine = {"device", "threads"};
  engine.insert(engine.end(), EngineFlagNames().begin(), EngineFlagNames().end());
  for (const std::string& f : engine) {
    if (f != "tls-block-budget" && f != "tls-token-budget" && flags.Has(f)) {
      return absl::InvalidArgumentError(absl::StrCat(
          "--", f,
          " configures the server's engine: give it to `asynctls serve`, not to a client"));
    }
  }
  if (!tls && (flags.Has("tls-block-budget") || flags.Has("tls-token-budget"))) {
    return absl::InvalidArgumentError(
        "--tls-block-budget / --tls-token-budget: only with --attention tls");
  }
  *block_budget = 0;
  *token_budget = 0;
  ASYNCTLS_RETURN_IF_ERROR(flags.GetNumber("tls-block-budget", block_budget));
  ASYNCTLS_RETURN_IF_ERROR(flags.GetNumber("tls-token-budget", token_budget));
  if (*block_budget < 0 || *token_budget < 0) {
    return absl::InvalidArgumentError("--tls-block-budget / --tls-token-budget: must be >= 0");
  }
  return absl::OkStatus();
}

}  // namespace asynctls
