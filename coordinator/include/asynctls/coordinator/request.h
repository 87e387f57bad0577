// A generation request as the coordinator core sees it (no gRPC types), and the events it
// streams back.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "asynctls/runtime/step_plan.h"

namespace asynctls {

struct GenerationRequest {
  std::string request_id;              // unique among live requests
  std::vector<int32_t> prompt_tokens;  // non-empty
  SamplingParams sampling;
  int32_t max_tokens = 256;            // > 0
  std::vector<std::string> stop_strings;
  bool ignore_eos = false;
  bool tls = false;  // decode through two-level sparse attention (the replica must offer it)
  int32_t tls_block_budget = 0, tls_token_budget = 0;  // 0: the replica's
};

enum class FinishReason { kNone, kStop, kLength, kCancelled, kError };
const char* FinishReasonName(FinishReason reason);

struct GenerationTimings {
  double queue_ms = 0;       // submit -> first scheduled
  double ttft_ms = 0;        // submit -> first token
  double total_ms = 0;       // submit -> finish
  std::vector<double> inter_token_ms;  // gaps between consecutive tokens
};

struct GenerationEvent {
  // Tokens and the text they complete (never splitting a UTF-8 character); may be empty text.
  std::vector<int32_t> token_ids;
  std::string text_delta;
  // Set on the last event of a request.
  FinishReason finish = FinishReason::kNone;
  absl::Status error;        // with kError / kCancelled
  int32_t prompt_tokens = 0;
  int32_t completion_tokens = 0;
  GenerationTimings timings;
  bool final() const { return finish != FinishReason::kNone; }
};

// Receives a request's events in order, on the coordinator's loop thread: must not block.
using EventSink = std::function<void(const GenerationEvent&)>;

}  // namespace asynctls
