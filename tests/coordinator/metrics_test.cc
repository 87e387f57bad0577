// Metrics: the Prometheus text format (0.0.4), histogram bucket placement, gauges sampled from a
// stats source at scrape time, and an HTTP GET against the HTTP endpoint.
#include "server/metrics.h"

#include <arpa/inet.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <map>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

namespace asynctls {
namespace {

// Every sample line "name{labels} value" of an exposition, keyed by "name{labels}".
std::map<std::string, std::string> Samples(const std::string& text) {
  std::map<std::string, std::string> out;
  std::istringstream in(text);
  std::string line;
  while (std::getline(in, line)) {
    if (line.empty() || line[0] == '#') continue;
    const size_t space = line.rfind(' ');
    out[line.substr(0, space)] = line.substr(space + 1);
  }
  return out;
}

GenerationEvent Final(FinishReason finish, int32_t tokens, double queue_ms, double ttft_ms,
                      std::vector<double> gaps_ms) {
  GenerationEvent ev;
  ev.finish = finish;
  ev.prompt_tokens = 5;
  ev.completion_tokens = tokens;
  ev.timings.queue_ms = queue_ms;
  ev.timings.ttft_ms = ttft_ms;
  ev.timings.total_ms = ttft_ms + 10;
  ev.timings.inter_token_ms = std::move(gaps_ms);
  return ev;
}

TEST(HistogramTest, BucketsAreUpperInclusive) {
  Histogram h({0.1, 0.5, 1.0});
  h.Observe(0.05);
  h.Observe(0.1);   // le="0.1" includes its bound
  h.Observe(0.2);
  h.Observe(1.0);
  h.Observe(7.0);   // above every bound: +Inf only
  EXPECT_EQ(h.counts(), (std::vector<uint64_t>{2, 1, 1, 1}));
  EXPECT_EQ(h.count(), 5u);
  EXPECT_DOUBLE_EQ(h.sum(), 0.05 + 0.1 + 0.2 + 1.0 + 7.0);
}

TEST(MetricsTest, FormatAndCounters) {
  Metrics m;
  m.OnFinal(Final(FinishReason::kStop, 3, 2.0, 40.0, {3.0, 30.0}));
  m.OnFinal(Final(FinishReason::kLength, 4, 0.5, 120.0, {1.0, 1.0, 2000.0}));
  m.OnFinal(Final(FinishReason::kCancelled, 0, 0.0, 0.0, {}));
  GenerationEvent not_final;  // ignored
  not_final.token_ids = {1};
  m.OnFinal(not_final);
  m.OnRejected(absl::StatusCode::kResourceExhausted);
  m.OnRejected(absl::StatusCode::kInvalidArgument);
  m.OnRejected(absl::StatusCode::kInvalidArgument);

  const std::string text = m.Render();
  auto s = Samples(text);
  EXPECT_EQ(s["asynctls_requests_total{outcome=\"stop\"}"], "1");
  EXPECT_EQ(s["asynctls_requests_total{outcome=\"length\"}"], "1");
  EXPECT_EQ(s["asynctls_requests_total{outcome=\"cancelled\"}"], "1");
  EXPECT_EQ(s["asynctls_requests_total{outcome=\"error\"}"], "0");
  EXPECT_EQ(s["asynctls_requests_total{outcome=\"rejected\"}"], "3");
  EXPECT_EQ(s["asynctls_rejected_total{code=\"INVALID_ARGUMENT\"}"], "2");
  EXPECT_EQ(s["asynctls_rejected_total{code=\"RESOURCE_EXHAUSTED\"}"], "1");
  EXPECT_EQ(s["asynctls_generated_tokens_total"], "7");

  // TTFT: 0.04 s and 0.12 s (the cancelled request produced no token: not observed).
  EXPECT_EQ(s["asynctls_time_to_first_token_seconds_bucket{le=\"0.025\"}"], "0");
  EXPECT_EQ(s["asynctls_time_to_first_token_seconds_bucket{le=\"0.05\"}"], "1");
  EXPECT_EQ(s["asynctls_time_to_first_token_seconds_bucket{le=\"0.1\"}"], "1");
  EXPECT_EQ(s["asynctls_time_to_first_token_seconds_bucket{le=\"0.25\"}"], "2");
  EXPECT_EQ(s["asynctls_time_to_first_token_seconds_bucket{le=\"+Inf\"}"], "2");
  EXPECT_EQ(s["asynctls_time_to_first_token_seconds_count"], "2");
  EXPECT_DOUBLE_EQ(std::stod(s["asynctls_time_to_first_token_seconds_sum"]), 0.04 + 0.12);
  // Inter-token: 1, 1, 3, 30 ms and one 2 s gap.
  EXPECT_EQ(s["asynctls_inter_token_latency_seconds_bucket{le=\"0.001\"}"], "2");
  EXPECT_EQ(s["asynctls_inter_token_latency_seconds_bucket{le=\"0.005\"}"], "3");
  EXPECT_EQ(s["asynctls_inter_token_latency_seconds_bucket{le=\"0.05\"}"], "4");
  EXPECT_EQ(s["asynctls_inter_token_latency_seconds_bucket{le=\"2.5\"}"], "5");
  EXPECT_EQ(s["asynctls_inter_token_latency_seconds_count"], "5");
  EXPECT_EQ(s["asynctls_queue_time_seconds_count"], "2");
  EXPECT_EQ(s["asynctls_queue_time_seconds_bucket{le=\"0.001\"}"], "1");
  // No stats source: zero gauges, no per-worker series.
  EXPECT_EQ(s["asynctls_queue_length"], "0");
  EXPECT_EQ(s["asynctls_running_sequences"], "0");

  // Every metric family is announced with HELP and TYPE before its samples.
  for (const char* family :
       {"asynctls_requests_total counter", "asynctls_time_to_first_token_seconds histogram",
        "asynctls_inter_token_latency_seconds histogram", "asynctls_queue_time_seconds histogram",
        "asynctls_queue_length gauge", "asynctls_running_sequences gauge",
        "asynctls_generated_tokens_total counter", "asynctls_kv_blocks_used gauge",
        "asynctls_kv_blocks_total gauge"}) {
    EXPECT_NE(text.find(std::string("# TYPE ") + family + "\n"), std::string::npos) << family;
  }
  // Cumulative buckets never decrease, and +Inf equals _count.
  std::istringstream in(text);
  std::string line, family;
  uint64_t last = 0;
  while (std::getline(in, line)) {
    const size_t b = line.find("_bucket{le=");
    if (b == std::string::npos) continue;
    const uint64_t v = std::stoull(line.substr(line.rfind(' ') + 1));
    if (line.substr(0, b) != family) {
      family = line.substr(0, b);
      last = 0;
    }
    EXPECT_GE(v, last) << line;
    last = v;
  }
  EXPECT_EQ(text.back(), '\n');
}

TEST(MetricsTest, ReplicaGaugesSampledAtScrape) {
  Metrics m;
  std::atomic<int> calls{0};
  m.SetStatsSource([&] {
    ++calls;
    ReplicaStats a, b;
    a.name = "worker-0";
    a.stats.waiting = 2;
    a.stats.running = 3;
    a.stats.kv_blocks_used = 10;
    a.stats.kv_blocks_total = 100;
    b.name = "host \"b\"";  // label value escaped
    b.stats.running = 1;
    b.stats.kv_blocks_used = 0;
    b.info.kv_blocks_total = 64;  // falls back to the executor info
    return std::vector<ReplicaStats>{a, b};
  });
  auto s = Samples(m.Render());
  EXPECT_EQ(calls.load(), 1);
  EXPECT_EQ(s["asynctls_queue_length"], "2");
  EXPECT_EQ(s["asynctls_running_sequences"], "4");
  EXPECT_EQ(s["asynctls_replicas"], "2");
  EXPECT_EQ(s["asynctls_kv_blocks_used{worker=\"worker-0\"}"], "10");
  EXPECT_EQ(s["asynctls_kv_blocks_total{worker=\"worker-0\"}"], "100");
  EXPECT_EQ(s["asynctls_kv_blocks_used{worker=\"host \\\"b\\\"\"}"], "0");
  EXPECT_EQ(s["asynctls_kv_blocks_total{worker=\"host \\\"b\\\"\"}"], "64");
  m.SetStatsSource(nullptr);
  EXPECT_EQ(Samples(m.Render()).count("asynctls_kv_blocks_used{worker=\"worker-0\"}"), 0u);
}

// One HTTP/1.1 request on a fresh connection; the raw response (headers and body).
std::string HttpRequest(int port, const std::string& request) {
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  EXPECT_GE(fd, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(static_cast<uint16_t>(port));
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) {
    close(fd);
    ADD_FAILURE() << "connect to port " << port << " failed";
    return "";
  }
  EXPECT_EQ(send(fd, request.data(), request.size(), 0), static_cast<ssize_t>(request.size()));
  std::string out;
  char buf[4096];
  ssize_t n;
  while ((n = recv(fd, buf, sizeof(buf), 0)) > 0) out.append(buf, static_cast<size_t>(n));
  close(fd);
  return out;
}

std::string Get(int port, const std::string& path) {
  return HttpRequest(port, "GET " + path + " HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
}

TEST(MetricsTest, ServesTextOverHttp) {
  Metrics m;
  m.OnFinal(Final(FinishReason::kStop, 3, 1.0, 20.0, {5.0, 5.0}));
  ASSERT_TRUE(m.Serve(0, "127.0.0.1").ok());  // any free port
  ASSERT_GT(m.port(), 0);
  EXPECT_EQ(m.Serve(0).code(), absl::StatusCode::kFailedPrecondition);

  const std::string response = Get(m.port(), "/metrics");
  ASSERT_EQ(response.rfind("HTTP/1.1 200", 0), 0u) << response;
  const size_t split = response.find("\r\n\r\n");
  ASSERT_NE(split, std::string::npos);
  std::string headers = response.substr(0, split);
  for (char& c : headers) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  EXPECT_NE(headers.find("content-type: text/plain; version=0.0.4"), std::string::npos)
      << headers;
  const std::string body = response.substr(split + 4);
  EXPECT_EQ(body, m.Render());
  EXPECT_EQ(Samples(body)["asynctls_requests_total{outcome=\"stop\"}"], "1");

  EXPECT_EQ(Get(m.port(), "/nothing-here").rfind("HTTP/1.1 404", 0), 0u);
  EXPECT_EQ(HttpRequest(m.port(), "POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n"
                                  "Connection: close\r\n\r\n")
                .rfind("HTTP/1.1 405", 0),
            0u);

  // Scrapes from several threads while requests finish.
  std::vector<std::thread> threads;
  std::atomic<int> ok{0};
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&] {
      for (int i = 0; i < 10; ++i) {
        m.OnFinal(Final(FinishReason::kLength, 1, 1.0, 1.0, {}));
        if (Get(m.port(), "/metrics").rfind("HTTP/1.1 200", 0) == 0) ++ok;
      }
    });
  }
  for (auto& t : threads) t.join();
  EXPECT_EQ(ok.load(), 40);
  EXPECT_EQ(Samples(m.Render())["asynctls_requests_total{outcome=\"length\"}"], "40");

  const int port = m.port();
  m.StopServing();
  EXPECT_EQ(m.port(), 0);
  // The port is free again: a second server can bind it.
  Metrics other;
  ASSERT_TRUE(other.Serve(port, "127.0.0.1").ok());
  EXPECT_EQ(other.port(), port);
  // A port in use is an error, not a crash.
  Metrics third;
  EXPECT_EQ(third.Serve(port, "127.0.0.1").code(), absl::StatusCode::kUnavailable);
}

}  // namespace
}  // namespace asynctls
