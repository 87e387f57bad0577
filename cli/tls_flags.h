// `--tls-channels FILE [--tls-block-budget N] [--tls-token-budget N]`: two-level sparse decode
// for an engine (asynctls serve and asynctls-worker). FILE is `asynctls calibrate`'s output;
// budgets default to the paper's k_b 128, k_t 1024.
#pragma once

#include <cstdint>

#include "absl/status/status.h"
#include "asynctls/runtime/engine.h"
#include "asynctls/runtime/status.h"
#include "flags.h"

namespace asynctls {

inline absl::Status ParseTlsFlags(const Flags& flags, EngineOptions* options) {
  if (!flags.Has("tls-channels")) {
    if (flags.Has("tls-block-budget") || flags.Has("tls-token-budget")) {
      return absl::InvalidArgumentError(
          "--tls-block-budget / --tls-token-budget need --tls-channels FILE");
    }
    return absl::OkStatus();
  }
  int32_t block_budget = 0, token_budget = 0;
  ASYNCTLS_RETURN_IF_ERROR(flags.GetNumber("tls-block-budget", &block_budget));
  ASYNCTLS_RETURN_IF_ERROR(flags.GetNumber("tls-token-budget", &token_budget));
  if (block_budget < 0 || token_budget < 0) {
    return absl::InvalidArgumentError("--tls-block-budget / --tls-token-budget: must be positive");
  }
  ASYNCTLS_ASSIGN_OR_RETURN(
      TlsDecodeOptions tls,
      TlsDecodeOptionsFromFile(flags.Get("tls-channels"), block_budget, token_budget));
  options->tls = std::move(tls);
  return absl::OkStatus();
}

}  // namespace asynctls
