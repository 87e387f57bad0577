#include "server/metrics.h"

#include <civetweb.h>

#include <algorithm>
#include <charconv>
#include <cmath>
#include <cstring>
#include <mutex>
#include <utility>

#include "absl/strings/str_cat.h"

namespace asynctls {

const std::vector<double> kTimeToFirstTokenBuckets = {0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25,
                                                      0.5,   0.75, 1.0,   2.5,  5.0,   10.0, 30.0,
                                                      60.0};
const std::vector<double> kInterTokenBuckets = {0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025,
                                                0.05,  0.075,  0.1,   0.25, 0.5,   1.0,  2.5};
const std::vector<double> kQueueTimeBuckets = {0.001, 0.005, 0.01, 0.025, 0.05, 0.1,  0.25,
                                               0.5,   1.0,   2.5,  5.0,   10.0, 30.0, 60.0};
namespace {

const std::vector<double> kE2eBuckets = {0.1, 0.25, 0.5, 1.0, 2.5,   5.0,   10.0,
                                         20.0, 30.0, 60.0, 120.0, 300.0, 600.0};

constexpr const char* kOutcomes[5] = {"stop", "length", "cancelled", "error", "rejected"};
constexpr int kRejected = 4;

int OutcomeIndex(FinishReason finish) {
  switch (finish) {
    case FinishReason::kStop: return 0;
    case FinishReason::kLength: return 1;
    case FinishReason::kCancelled: return 2;
    default: return 3;
  }
}

// Shortest text that reads back as the same double; Prometheus spells infinities +Inf/-Inf.
std::string FormatValue(double v) {
  if (std::isnan(v)) return "NaN";
  if (std::isinf(v)) return v > 0 ? "+Inf" : "-Inf";
  char buf[64];
  auto [end, ec] = std::to_chars(buf, buf + sizeof(buf), v);
  return ec == std::errc() ? std::string(buf, end) : std::to_string(v);
}

// Label values escape backslash, double quote and newline (format 0.0.4).
std::string EscapeLabel(const std::string& value) {
  std::string out;
  out.reserve(value.size());
  for (char c : value) {
    if (c == '\\') out += "\\\\";
    else if (c == '"') out += "\\\"";
    else if (c == '\n') out += "\\n";
    else out += c;
  }
  return out;
}

void Header(std::string* out, const char* name, const char* type, const char* help) {
  absl::StrAppend(out, "# HELP ", name, " ", help, "\n# TYPE ", name, " ", type, "\n");
}

void RenderHistogram(std::string* out, const char* name, const char* help, const Histogram& h) {
  Header(out, name, "histogram", help);
  uint64_t cumulative = 0;
  for (size_t i = 0; i < h.upper_bounds().size(); ++i) {
    cumulative += h.counts()[i];
    absl::StrAppend(out, name, "_bucket{le=\"", FormatValue(h.upper_bounds()[i]), "\"} ",
                    cumulative, "\n");
  }
  absl::StrAppend(out, name, "_bucket{le=\"+Inf\"} ", h.count(), "\n");
  absl::StrAppend(out, name, "_sum ", FormatValue(h.sum()), "\n");
  absl::StrAppend(out, name, "_count ", h.count(), "\n");
}

}  // namespace

Histogram::Histogram(std::vector<double> upper_bounds)
    : bounds_(std::move(upper_bounds)), counts_(bounds_.size() + 1, 0) {}

void Histogram::Observe(double value) {
  if (std::isnan(value)) return;
  // Prometheus buckets are "le": the first bound >= value.
  const size_t i = std::lower_bound(bounds_.begin(), bounds_.end(), value) - bounds_.begin();
  ++counts_[i];
  ++count_;
  sum_ += value;
}

Metrics::Metrics()
    : ttft_(kTimeToFirstTokenBuckets),
      inter_token_(kInterTokenBuckets),
      queue_time_(kQueueTimeBuckets),
      e2e_(kE2eBuckets) {}

Metrics::~Metrics() { StopServing(); }

void Metrics::OnFinal(const GenerationEvent& event) {
  if (!event.final()) return;
  const GenerationTimings& t = event.timings;
  std::lock_guard<std::mutex> lock(mu_);
  ++outcomes_[OutcomeIndex(event.finish)];
  generated_tokens_ += static_cast<uint64_t>(std::max(event.completion_tokens, 0));
  prompt_tokens_ += static_cast<uint64_t>(std::max(event.prompt_tokens, 0));
  // A request cancelled or failed before it was scheduled or produced a token has no queue
  // time or TTFT worth recording.
  if (t.queue_ms > 0 || event.completion_tokens > 0) queue_time_.Observe(t.queue_ms / 1000.0);
  if (event.completion_tokens > 0) ttft_.Observe(t.ttft_ms / 1000.0);
  for (double gap : t.inter_token_ms) inter_token_.Observe(gap / 1000.0);
  if (t.total_ms > 0) e2e_.Observe(t.total_ms / 1000.0);
}

void Metrics::OnRejected(absl::StatusCode code) {
  std::lock_guard<std::mutex> lock(mu_);
  ++outcomes_[kRejected];
  for (auto& [c, n] : rejected_by_code_) {
    if (c == code) {
      ++n;
      return;
    }
  }
  rejected_by_code_.emplace_back(code, 1);
}

void Metrics::SetStatsSource(std::function<std::vector<ReplicaStats>()> source) {
  std::lock_guard<std::mutex> lock(mu_);
  stats_source_ = std::move(source);
}

void Metrics::SetRouter(const Router* router) {
  if (router == nullptr) return SetStatsSource(nullptr);
  SetStatsSource([router] { return router->Stats(); });
}

std::string Metrics::Render() const {
  std::function<std::vector<ReplicaStats>()> source;
  {
    std::lock_guard<std::mutex> lock(mu_);
    source = stats_source_;
  }
  // Sampled outside the lock: the router takes its own locks and must not wait on ours.
  std::vector<ReplicaStats> replicas;
  if (source) replicas = source();

  std::string out;
  out.reserve(8192);
  {
    std::lock_guard<std::mutex> lock(mu_);
    Header(&out, "asynctls_requests_total", "counter",
           "Requests by outcome: finish reason stop, length, cancelled or error; rejected = "
           "refused before queueing.");
    for (int i = 0; i < 5; ++i)
      absl::StrAppend(&out, "asynctls_requests_total{outcome=\"", kOutcomes[i], "\"} ",
                      outcomes_[i], "\n");
    Header(&out, "asynctls_rejected_total", "counter",
           "Requests refused before queueing, by gRPC status code.");
    std::vector<std::pair<std::string, uint64_t>> codes;
    for (const auto& [code, n] : rejected_by_code_)
      codes.emplace_back(absl::StatusCodeToString(code), n);
    std::sort(codes.begin(), codes.end());
    for (const auto& [code, n] : codes)
      absl::StrAppend(&out, "asynctls_rejected_total{code=\"", EscapeLabel(code), "\"} ", n,
                      "\n");
    Header(&out, "asynctls_generated_tokens_total", "counter",
           "Tokens generated by finished requests.");
    absl::StrAppend(&out, "asynctls_generated_tokens_total ", generated_tokens_, "\n");
    Header(&out, "asynctls_prompt_tokens_total", "counter", "Prompt tokens of finished requests.");
    absl::StrAppend(&out, "asynctls_prompt_tokens_total ", prompt_tokens_, "\n");
    RenderHistogram(&out, "asynctls_time_to_first_token_seconds",
                    "Time from submission to the first generated token.", ttft_);
    RenderHistogram(&out, "asynctls_inter_token_latency_seconds",
                    "Gap between consecutive generated tokens of a request.", inter_token_);
    RenderHistogram(&out, "asynctls_queue_time_seconds",
                    "Time from submission to first being scheduled.", queue_time_);
    RenderHistogram(&out, "asynctls_e2e_request_latency_seconds",
                    "Time from submission to the final event.", e2e_);
  }

  int64_t waiting = 0, running = 0;
  for (const ReplicaStats& r : replicas) {
    waiting += r.stats.waiting;
    running += r.stats.running;
  }
  Header(&out, "asynctls_queue_length", "gauge", "Requests waiting to be scheduled.");
  absl::StrAppend(&out, "asynctls_queue_length ", waiting, "\n");
  Header(&out, "asynctls_running_sequences", "gauge", "Sequences being prefilled or decoded.");
  absl::StrAppend(&out, "asynctls_running_sequences ", running, "\n");
  Header(&out, "asynctls_replicas", "gauge", "Live replicas (worker groups) behind the router.");
  absl::StrAppend(&out, "asynctls_replicas ", replicas.size(), "\n");
  Header(&out, "asynctls_kv_blocks_used", "gauge", "KV cache blocks in use, per worker.");
  for (const ReplicaStats& r : replicas)
    absl::StrAppend(&out, "asynctls_kv_blocks_used{worker=\"", EscapeLabel(r.name), "\"} ",
                    r.stats.kv_blocks_used, "\n");
  Header(&out, "asynctls_kv_blocks_total", "gauge", "KV cache blocks available, per worker.");
  for (const ReplicaStats& r : replicas) {
    const int32_t total = r.stats.kv_blocks_total > 0 ? r.stats.kv_blocks_total
                                                      : r.info.kv_blocks_total;
    absl::StrAppend(&out, "asynctls_kv_blocks_total{worker=\"", EscapeLabel(r.name), "\"} ",
                    total, "\n");
  }
  return out;
}

int Metrics::HandleRequest(mg_connection* conn, void* self) {
  const mg_request_info* info = mg_get_request_info(conn);
  const bool head = std::strcmp(info->request_method, "HEAD") == 0;
  if (!head && std::strcmp(info->request_method, "GET") != 0) {
    mg_send_http_error(conn, 405, "%s", "only GET\n");
    return 405;
  }
  const std::string body = static_cast<const Metrics*>(self)->Render();
  mg_send_http_ok(conn, kContentType, static_cast<long long>(body.size()));
  if (!head) mg_write(conn, body.data(), body.size());
  return 200;
}

absl::Status Metrics::Serve(int port, const std::string& bind_address) {
  if (server_ != nullptr) return absl::FailedPreconditionError("metrics: already serving");
  if (port < 0 || port > 65535)
    return absl::InvalidArgumentError(absl::StrCat("metrics port ", port, " out of range"));
  static std::once_flag init;
  std::call_once(init, [] { mg_init_library(0); });

  const std::string ports =
      bind_address.empty() ? std::to_string(port) : absl::StrCat(bind_address, ":", port);
  const char* options[] = {"listening_ports", ports.c_str(), "num_threads", "2",
                           // Scrapes are small; do not keep idle connections a thread each.
                           "enable_keep_alive", "no", nullptr};
  mg_callbacks callbacks;
  std::memset(&callbacks, 0, sizeof(callbacks));
  // Silence civetweb's own error printing; failures surface through the Status.
  callbacks.log_message = [](const mg_connection*, const char*) { return 1; };
  char error_text[256] = {0};
  mg_init_data init_data;
  std::memset(&init_data, 0, sizeof(init_data));
  init_data.callbacks = &callbacks;
  init_data.user_data = this;
  init_data.configuration_options = options;
  mg_error_data error;
  std::memset(&error, 0, sizeof(error));
  error.text = error_text;
  error.text_buffer_size = sizeof(error_text);
  server_ = mg_start2(&init_data, &error);
  if (server_ == nullptr)
    return absl::UnavailableError(
        absl::StrCat("metrics: cannot serve HTTP on ", ports, ": ", error_text));
  mg_set_request_handler(server_, "/metrics$", &Metrics::HandleRequest, this);
  mg_set_request_handler(server_, "/$", &Metrics::HandleRequest, this);

  mg_server_port bound[4];
  const int n = mg_get_server_ports(server_, 4, bound);
  port_ = n > 0 ? bound[0].port : port;
  return absl::OkStatus();
}

void Metrics::StopServing() {
  if (server_ == nullptr) return;
  mg_stop(server_);
  server_ = nullptr;
  port_ = 0;
}

}  // namespace asynctls
