// The coordinator's Prometheus metrics: counters, gauges and fixed-bucket histograms rendered
// in the text exposition format 0.0.4, and an HTTP endpoint (cpp-httplib) that serves them on
// GET /metrics. The gRPC service feeds request outcomes (OnFinal / OnRejected); gauges that
// describe the replicas (queue, running sequences, KV blocks per worker) are read from the
// Router at scrape time through a callback. No gRPC types here.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "asynctls/coordinator/request.h"
#include "asynctls/coordinator/router.h"


namespace asynctls {

// A histogram with fixed upper bounds (seconds); `+Inf` is implicit. Not thread-safe by itself
// (Metrics guards it).
class Histogram {
 public:
  explicit Histogram(std::vector<double> upper_bounds);  // strictly increasing, finite
  void Observe(double value);
  const std::vector<double>& upper_bounds() const { return bounds_; }
  // counts()[i]: observations <= upper_bounds()[i] and > the previous bound (not cumulative);
  // the last entry counts those above every bound.
  const std::vector<uint64_t>& counts() const { return counts_; }
  uint64_t count() const { return count_; }
  double sum() const { return sum_; }

 private:
  std::vector<double> bounds_;
  std::vector<uint64_t> counts_;  // bounds_.size() + 1
  uint64_t count_ = 0;
  double sum_ = 0;
};

// Fixed bucket bounds, in seconds.
extern const std::vector<double> kTimeToFirstTokenBuckets;
extern const std::vector<double> kInterTokenBuckets;
extern const std::vector<double> kQueueTimeBuckets;

// The metrics of one coordinator. Thread-safe: every method may be called from any thread
// (OnFinal from the coordinator's loop thread: it takes one short lock and never blocks on I/O).
class Metrics {
 public:
  Metrics();
  ~Metrics();  // stops the HTTP server if it runs
  Metrics(const Metrics&) = delete;
  Metrics& operator=(const Metrics&) = delete;

  // A request's last event: counts it by outcome (stop, length, cancelled, error) and its
  // generated tokens, and observes its queue time, time to first token and inter-token gaps.
  void OnFinal(const GenerationEvent& event);
  // A request refused before it was queued (queue full, invalid argument, no replica...):
  // counted as outcome="rejected" and in asynctls_rejected_total{code=...}.
  void OnRejected(absl::StatusCode code);

  // Called at every scrape (outside the metrics lock) for the per-replica gauges. Replaces any
  // previous source; an empty function means no replica gauges.
  void SetStatsSource(std::function<std::vector<ReplicaStats>()> source);
  // Convenience: sample `router` (which must outlive this object or be replaced first).
  void SetRouter(const Router* router);

  // The full exposition text (format 0.0.4).
  std::string Render() const;

  // Serves GET /metrics (and GET / with the same text) on `port` (0: any free port) on every
  // interface, or on `bind_address` when given ("127.0.0.1"). Returns FAILED_PRECONDITION when
  // already serving, UNAVAILABLE when the port cannot be bound. Does not block.
  absl::Status Serve(int port, const std::string& bind_address = "");
  int port() const { return port_; }  // the bound port after Serve, else 0
  // Stops serving (waits for requests in flight). Idempotent.
  void StopServing();

  static constexpr char kContentType[] = "text/plain; version=0.0.4; charset=utf-8";

 private:
  struct HttpServer;  // cpp-httplib server and its listening thread

  mutable std::mutex mu_;
  // asynctls_requests_total by outcome: stop, length, cancelled, error, rejected.
  uint64_t outcomes_[5] = {0, 0, 0, 0, 0};
  std::vector<std::pair<absl::StatusCode, uint64_t>> rejected_by_code_;  // guarded by mu_
  uint64_t generated_tokens_ = 0;
  uint64_t prompt_tokens_ = 0;
  Histogram ttft_;
  Histogram inter_token_;
  Histogram queue_time_;
  Histogram e2e_;
  std::function<std::vector<ReplicaStats>()> stats_source_;  // guarded by mu_

  std::unique_ptr<HttpServer> server_;  // started by Serve
  int port_ = 0;
};

}  // namespace asynctls
