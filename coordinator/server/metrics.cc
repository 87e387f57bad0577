#include "server/metrics.h"

#include <httplib.h>
#include <sys/socket.h>

#include <algorithm>
#include <charconv>
#include <chrono>
#include <cmath>
#include <cstring>
#include <mutex>
#include <thread>
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

// cpp-httplib runs handlers on its own std::thread pool (default stacks: a library with a
// fixed small thread stack, as civetweb's Debian build has, cannot start threads in a process
// that also maps cuBLASLt's and OpenBLAS's large static TLS).
struct Metrics::HttpServer {
  httplib::Server server;
  std::thread listener;
};

absl::Status Metrics::Serve(int port, const std::string& bind_address) {
  if (server_ != nullptr) return absl::FailedPreconditionError("metrics: already serving");
  if (port < 0 || port > 65535)
    return absl::InvalidArgumentError(absl::StrCat("metrics port ", port, " out of range"));
  auto http = std::make_unique<HttpServer>();
  httplib::Server& srv = http->server;
  // Scrapes are small; one request per connection keeps no idle thread busy.
  srv.set_keep_alive_max_count(1);
  // SO_REUSEADDR only: the library's default adds SO_REUSEPORT, which would let a second
  // server share a port silently instead of reporting it busy.
  srv.set_socket_options([](auto sock) {
    int yes = 1;
    setsockopt(sock, SOL_SOCKET, SO_REUSEADDR, reinterpret_cast<const char*>(&yes), sizeof(yes));
  });
  auto serve = [this](const httplib::Request&, httplib::Response& res) {
    res.set_content(Render(), kContentType);
  };
  auto refuse = [](const httplib::Request&, httplib::Response& res) {
    res.status = 405;
    res.set_header("Allow", "GET, HEAD");
    res.set_content("only GET\n", "text/plain");
  };
  for (const char* path : {"/metrics", "/"}) {
    srv.Get(path, serve);
    srv.Post(path, refuse);
    srv.Put(path, refuse);
    srv.Delete(path, refuse);
    srv.Patch(path, refuse);
  }
  const std::string host = bind_address.empty() ? "0.0.0.0" : bind_address;
  int bound = port;
  if (port == 0) {
    bound = srv.bind_to_any_port(host);
    if (bound <= 0) return absl::UnavailableError(absl::StrCat("metrics: cannot bind ", host, ":0"));
  } else if (!srv.bind_to_port(host, port)) {
    return absl::UnavailableError(absl::StrCat("metrics: cannot serve HTTP on ", host, ":", port,
                                               " (in use or not allowed)"));
  }
  http->listener = std::thread([&srv] { srv.listen_after_bind(); });
  // stop() is a no-op until the loop runs: wait for it so a quick StopServing cannot hang.
  for (int i = 0; i < 5000 && !srv.is_running(); ++i) std::this_thread::sleep_for(std::chrono::milliseconds(1));
  server_ = std::move(http);
  port_ = bound;
  return absl::OkStatus();
}

void Metrics::StopServing() {
  if (server_ == nullptr) return;
  server_->server.stop();
  if (server_->listener.joinable()) server_->listener.join();
  server_.reset();
  port_ = 0;
}

}  // namespace asynctls
