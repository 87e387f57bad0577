// `asynctls bench`: a load generator against a running server (`asynctls serve` or
// `asynctls-coordinator`). Sends --num-requests Generate streams with prompts of random token
// ids and ignore_eos (so every output reaches its drawn length), arriving as a Poisson process
// of --request-rate (all at once by default) and/or capped at --max-concurrency in flight, and
// reports latency and throughput with the definitions of vLLM's `bench serve`:
//   TTFT  request sent -> first chunk carrying tokens
//   ITL   every gap between consecutive token chunks (all requests pooled)
//   TPOT  (E2E - TTFT) / (output_tokens - 1), per request with more than one output token
//   E2E   request sent -> end of the stream
//   throughput = completed requests (tokens) / benchmark duration (first send -> last end)
//   goodput    = completed requests meeting every given SLO / duration
// Uses the gRPC callback API: no thread per stream.
#include <grpcpp/grpcpp.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdio>
#include <fstream>
#include <limits>
#include <mutex>
#include <random>
#include <string>
#include <vector>

#include <unistd.h>

#include <nlohmann/json.hpp>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "asynctls/runtime/status.h"
#include "asynctls/v1/inference.grpc.pb.h"
#include "commands.h"
#include "flags.h"

namespace asynctls {
namespace {

namespace v1 = ::asynctls::v1;
using Clock = std::chrono::steady_clock;

double MsBetween(Clock::time_point a, Clock::time_point b) {
  return std::chrono::duration<double, std::milli>(b - a).count();
}

// A length distribution: fixed:N, uniform:A:B (inclusive) or normal:MEAN:STD (rounded, >= 1).
struct LengthDistribution {
  enum Kind { kFixed, kUniform, kNormal } kind = kFixed;
  double a = 0, b = 0;
  std::string text;

  static absl::StatusOr<LengthDistribution> Parse(const std::string& flag, const std::string& s) {
    LengthDistribution d;
    d.text = s;
    std::vector<std::string> parts = absl::StrSplit(s, ':');
    auto number = [&](const std::string& p, double* out) {
      return absl::SimpleAtod(p, out) && std::isfinite(*out);
    };
    const auto bad = [&](const std::string& why) {
      return absl::InvalidArgumentError(absl::StrCat("--", flag, " '", s, "': ", why,
                                                     " (fixed:N, uniform:A:B or normal:MEAN:STD)"));
    };
    if (parts[0] == "fixed" && parts.size() == 2) {
      d.kind = kFixed;
      if (!number(parts[1], &d.a) || d.a < 1) return bad("N must be a number >= 1");
    } else if (parts[0] == "uniform" && parts.size() == 3) {
      d.kind = kUniform;
      if (!number(parts[1], &d.a) || !number(parts[2], &d.b) || d.a < 1 || d.b < d.a)
        return bad("need 1 <= A <= B");
    } else if (parts[0] == "normal" && parts.size() == 3) {
      d.kind = kNormal;
      if (!number(parts[1], &d.a) || !number(parts[2], &d.b) || d.a < 1 || d.b < 0)
        return bad("need MEAN >= 1 and STD >= 0");
    } else if (parts.size() == 1 && number(parts[0], &d.a) && d.a >= 1) {
      d.kind = kFixed;  // a bare number means fixed:N
    } else {
      return bad("unknown distribution");
    }
    return d;
  }

  int32_t Draw(std::mt19937_64& rng) const {
    double v = a;
    if (kind == kUniform) {
      v = std::uniform_int_distribution<int64_t>(static_cast<int64_t>(a),
                                                 static_cast<int64_t>(b))(rng);
    } else if (kind == kNormal) {
      v = std::round(std::normal_distribution<double>(a, b)(rng));
    }
    return static_cast<int32_t>(std::clamp(v, 1.0, 1e9));
  }
};

// What one request measured.
struct RequestResult {
  int32_t prompt_len = 0;
  int32_t output_len = 0;  // requested (max_tokens)
  Clock::time_point start, end;
  bool got_token = false;
  Clock::time_point last_token;
  double ttft_ms = 0;
  std::vector<double> itl_ms;
  int32_t output_tokens = 0;  // received (usage.completion_tokens, else counted)
  bool success = false;
  std::string error;
};

// One Generate stream on the callback API; deletes itself when done.
class GenerateCall : public grpc::ClientReadReactor<v1::GenerateResponse> {
 public:
  GenerateCall(v1::Inference::Stub* stub, v1::GenerateRequest request, RequestResult* result,
               std::function<void()> on_done)
      : stub_(stub), request_(std::move(request)), result_(result), on_done_(std::move(on_done)) {}

  void Start() {
    result_->start = Clock::now();
    stub_->async()->Generate(&context_, &request_, this);
    StartRead(&response_);
    StartCall();
  }

  void OnReadDone(bool ok) override {
    if (!ok) return;  // the stream ended; OnDone follows
    const auto now = Clock::now();
    if (response_.has_chunk() && response_.chunk().token_ids_size() > 0) {
      if (!result_->got_token) {
        result_->got_token = true;
        result_->ttft_ms = MsBetween(result_->start, now);
      } else {
        result_->itl_ms.push_back(MsBetween(result_->last_token, now));
      }
      result_->last_token = now;
      counted_tokens_ += response_.chunk().token_ids_size();
    } else if (response_.has_final()) {
      final_tokens_ = response_.final().usage().completion_tokens();
    } else if (response_.has_error()) {
      result_->error = response_.error().message();
    }
    StartRead(&response_);
  }

  void OnDone(const grpc::Status& status) override {
    result_->end = Clock::now();
    result_->output_tokens = final_tokens_ >= 0 ? final_tokens_ : counted_tokens_;
    result_->success = status.ok() && result_->got_token;
    if (!status.ok()) {
      result_->error = absl::StrCat("status ", static_cast<int>(status.error_code()), ": ",
                                    status.error_message());
    } else if (!result_->got_token && result_->error.empty()) {
      result_->error = "stream ended without tokens";
    }
    std::function<void()> on_done = std::move(on_done_);
    delete this;
    on_done();
  }

 private:
  v1::Inference::Stub* stub_;
  grpc::ClientContext context_;
  v1::GenerateRequest request_;
  v1::GenerateResponse response_;
  RequestResult* result_;
  std::function<void()> on_done_;
  int32_t counted_tokens_ = 0;
  int32_t final_tokens_ = -1;
};

// Percentile with linear interpolation between closest ranks (numpy's default, as vLLM).
double Percentile(std::vector<double> v, double p) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  const double rank = p / 100.0 * static_cast<double>(v.size() - 1);
  const size_t lo = static_cast<size_t>(std::floor(rank));
  const size_t hi = std::min(lo + 1, v.size() - 1);
  return v[lo] + (v[hi] - v[lo]) * (rank - static_cast<double>(lo));
}

struct Summary {
  double mean = 0, stddev = 0, p50 = 0, p90 = 0, p99 = 0;
  size_t n = 0;
};

Summary Summarize(const std::vector<double>& v) {
  Summary s;
  s.n = v.size();
  if (v.empty()) return s;
  double sum = 0;
  for (double x : v) sum += x;
  s.mean = sum / static_cast<double>(v.size());
  double sq = 0;
  for (double x : v) sq += (x - s.mean) * (x - s.mean);
  s.stddev = std::sqrt(sq / static_cast<double>(v.size()));  // population std, as numpy
  s.p50 = Percentile(v, 50);
  s.p90 = Percentile(v, 90);
  s.p99 = Percentile(v, 99);
  return s;
}

}  // namespace

absl::Status RunBench(int argc, char** argv) {
  Flags flags;
  ASYNCTLS_RETURN_IF_ERROR(flags.Parse(argc, argv, {}));
  ASYNCTLS_RETURN_IF_ERROR(flags.CheckKnown(
      {"server", "num-requests", "request-rate", "max-concurrency", "prompt-len", "output-len",
       "seed", "slo-ttft-ms", "slo-tpot-ms", "slo-e2e-ms", "json", "model", "connect-timeout-s"}));
  const std::string server = flags.Get("server");
  if (server.empty()) return absl::InvalidArgumentError("--server HOST:PORT is required");
  int32_t num_requests = 100, max_concurrency = 0;
  double request_rate = std::numeric_limits<double>::infinity();
  uint64_t seed = 0;
  double slo_ttft_ms = 0, slo_tpot_ms = 0, slo_e2e_ms = 0, connect_timeout_s = 10;
  ASYNCTLS_RETURN_IF_ERROR(flags.GetNumber("num-requests", &num_requests));
  ASYNCTLS_RETURN_IF_ERROR(flags.GetNumber("max-concurrency", &max_concurrency));
  if (flags.Get("request-rate") != "inf")
    ASYNCTLS_RETURN_IF_ERROR(flags.GetNumber("request-rate", &request_rate));
  ASYNCTLS_RETURN_IF_ERROR(flags.GetNumber("seed", &seed));
  ASYNCTLS_RETURN_IF_ERROR(flags.GetNumber("slo-ttft-ms", &slo_ttft_ms));
  ASYNCTLS_RETURN_IF_ERROR(flags.GetNumber("slo-tpot-ms", &slo_tpot_ms));
  ASYNCTLS_RETURN_IF_ERROR(flags.GetNumber("slo-e2e-ms", &slo_e2e_ms));
  ASYNCTLS_RETURN_IF_ERROR(flags.GetNumber("connect-timeout-s", &connect_timeout_s));
  if (num_requests <= 0) return absl::InvalidArgumentError("--num-requests must be > 0");
  if (max_concurrency < 0) return absl::InvalidArgumentError("--max-concurrency must be >= 0");
  if (!(request_rate > 0)) return absl::InvalidArgumentError("--request-rate must be > 0 or inf");
  if (slo_ttft_ms < 0 || slo_tpot_ms < 0 || slo_e2e_ms < 0)
    return absl::InvalidArgumentError("SLOs must be >= 0 ms");
  ASYNCTLS_ASSIGN_OR_RETURN(LengthDistribution prompt_dist,
                            LengthDistribution::Parse("prompt-len", flags.Get("prompt-len", "fixed:128")));
  ASYNCTLS_ASSIGN_OR_RETURN(LengthDistribution output_dist,
                            LengthDistribution::Parse("output-len", flags.Get("output-len", "fixed:128")));

  std::shared_ptr<grpc::Channel> channel =
      grpc::CreateChannel(server, grpc::InsecureChannelCredentials());
  if (!channel->WaitForConnected(std::chrono::system_clock::now() +
                                 std::chrono::milliseconds(static_cast<int64_t>(connect_timeout_s * 1000))))
    return absl::UnavailableError(absl::StrCat("cannot connect to ", server));
  std::unique_ptr<v1::Inference::Stub> stub = v1::Inference::NewStub(channel);

  // The model (its vocabulary and context) from ListModels.
  v1::ListModelsResponse models;
  {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(30));
    const grpc::Status s = stub->ListModels(&ctx, v1::ListModelsRequest(), &models);
    if (!s.ok()) return absl::UnavailableError(absl::StrCat("ListModels: ", s.error_message()));
  }
  const v1::ModelInfo* model = nullptr;
  for (const auto& m : models.models())
    if (!flags.Has("model") || m.name() == flags.Get("model")) model = &m;
  if (model == nullptr)
    return absl::NotFoundError(flags.Has("model") ? absl::StrCat("model '", flags.Get("model"), "' not served")
                                                  : std::string("the server lists no model"));
  const int32_t vocab = model->vocab_size(), max_context = model->max_context();
  if (vocab < 1024) return absl::FailedPreconditionError("vocabulary too small for random prompts");

  // Requests: lengths, prompts of ordinary token ids (away from the special tokens most
  // vocabularies keep at the very start and end) and Poisson arrival offsets.
  std::mt19937_64 rng(seed);
  std::uniform_int_distribution<int32_t> token(256, vocab - 257);
  std::exponential_distribution<double> gap(std::isinf(request_rate) ? 1.0 : request_rate);
  std::vector<RequestResult> results(static_cast<size_t>(num_requests));
  std::vector<v1::GenerateRequest> requests(results.size());
  std::vector<double> arrival_s(results.size(), 0);
  int clamped = 0;
  double t = 0;
  const std::string id_prefix = absl::StrCat("bench-", getpid(), "-");
  for (size_t i = 0; i < results.size(); ++i) {
    int32_t prompt_len = prompt_dist.Draw(rng), output_len = output_dist.Draw(rng);
    if (max_context > 0) {
      output_len = std::min(output_len, max_context - 1);
      if (prompt_len + output_len > max_context) {
        prompt_len = max_context - output_len;
        ++clamped;
      }
    }
    results[i].prompt_len = prompt_len;
    results[i].output_len = output_len;
    v1::GenerateRequest& r = requests[i];
    r.set_request_id(absl::StrCat(id_prefix, i));
    r.set_model(model->name());
    for (int32_t k = 0; k < prompt_len; ++k) r.mutable_token_ids()->add_ids(token(rng));
    r.mutable_sampling()->set_max_tokens(output_len);
    r.mutable_sampling()->set_ignore_eos(true);
    if (!std::isinf(request_rate)) t += gap(rng);
    arrival_s[i] = t;
  }
  if (clamped > 0)
    std::fprintf(stderr, "bench: %d prompts shortened to fit the context of %d tokens\n", clamped,
                 max_context);

  std::mutex mu;
  std::condition_variable cv;
  int in_flight = 0, finished = 0;
  Clock::time_point last_end;
  const Clock::time_point bench_start = Clock::now();
  for (size_t i = 0; i < results.size(); ++i) {
    std::this_thread::sleep_until(bench_start + std::chrono::duration_cast<Clock::duration>(
                                                    std::chrono::duration<double>(arrival_s[i])));
    {
      std::unique_lock<std::mutex> lock(mu);
      cv.wait(lock, [&] { return max_concurrency == 0 || in_flight < max_concurrency; });
      ++in_flight;
    }
    auto* call = new GenerateCall(stub.get(), std::move(requests[i]), &results[i], [&] {
      std::lock_guard<std::mutex> lock(mu);
      --in_flight;
      ++finished;
      last_end = Clock::now();
      cv.notify_all();
    });
    call->Start();
  }
  {
    std::unique_lock<std::mutex> lock(mu);
    cv.wait(lock, [&] { return finished == num_requests; });
  }
  const double duration_s = std::max(MsBetween(bench_start, last_end) / 1000.0, 1e-9);

  // Aggregate over the completed requests.
  std::vector<double> ttft, tpot, itl, e2e;
  int64_t total_input = 0, total_output = 0;
  int completed = 0, good = 0;
  std::vector<std::string> errors;
  for (const RequestResult& r : results) {
    if (!r.success) {
      if (errors.size() < 5) errors.push_back(r.error);
      continue;
    }
    ++completed;
    total_input += r.prompt_len;
    total_output += r.output_tokens;
    const double e2e_ms = MsBetween(r.start, r.end);
    ttft.push_back(r.ttft_ms);
    e2e.push_back(e2e_ms);
    itl.insert(itl.end(), r.itl_ms.begin(), r.itl_ms.end());
    double tpot_ms = 0;
    if (r.output_tokens > 1) {
      tpot_ms = (e2e_ms - r.ttft_ms) / (r.output_tokens - 1);
      tpot.push_back(tpot_ms);
    }
    const bool meets = (slo_ttft_ms == 0 || r.ttft_ms <= slo_ttft_ms) &&
                       (slo_tpot_ms == 0 || tpot_ms <= slo_tpot_ms) &&
                       (slo_e2e_ms == 0 || e2e_ms <= slo_e2e_ms);
    if (meets) ++good;
  }
  const bool has_slo = slo_ttft_ms > 0 || slo_tpot_ms > 0 || slo_e2e_ms > 0;
  const double request_tput = completed / duration_s;
  const double output_tput = static_cast<double>(total_output) / duration_s;
  const double total_tput = static_cast<double>(total_input + total_output) / duration_s;
  const double goodput = good / duration_s;

  nlohmann::json j;
  j["server"] = server;
  j["model"] = model->name();
  j["num_requests"] = num_requests;
  j["request_rate"] = std::isinf(request_rate) ? nlohmann::json("inf") : nlohmann::json(request_rate);
  j["max_concurrency"] = max_concurrency == 0 ? nlohmann::json(nullptr) : nlohmann::json(max_concurrency);
  j["prompt_len"] = prompt_dist.text;
  j["output_len"] = output_dist.text;
  j["seed"] = seed;
  j["duration_s"] = duration_s;
  j["completed"] = completed;
  j["failed"] = num_requests - completed;
  j["errors"] = errors;
  j["total_input_tokens"] = total_input;
  j["total_output_tokens"] = total_output;
  j["request_throughput"] = request_tput;
  j["output_throughput"] = output_tput;
  j["total_token_throughput"] = total_tput;
  j["slo_ttft_ms"] = slo_ttft_ms > 0 ? nlohmann::json(slo_ttft_ms) : nlohmann::json(nullptr);
  j["slo_tpot_ms"] = slo_tpot_ms > 0 ? nlohmann::json(slo_tpot_ms) : nlohmann::json(nullptr);
  j["slo_e2e_ms"] = slo_e2e_ms > 0 ? nlohmann::json(slo_e2e_ms) : nlohmann::json(nullptr);
  j["request_goodput"] = has_slo ? nlohmann::json(goodput) : nlohmann::json(nullptr);
  struct Row {
    const char* key;
    const char* label;
    Summary s;
  };
  const Row rows[] = {{"ttft", "TTFT", Summarize(ttft)},
                      {"tpot", "TPOT", Summarize(tpot)},
                      {"itl", "ITL", Summarize(itl)},
                      {"e2el", "E2E latency", Summarize(e2e)}};
  for (const Row& row : rows) {
    const std::string k = row.key;
    j["mean_" + k + "_ms"] = row.s.mean;
    j["std_" + k + "_ms"] = row.s.stddev;
    j["median_" + k + "_ms"] = row.s.p50;
    j["p50_" + k + "_ms"] = row.s.p50;
    j["p90_" + k + "_ms"] = row.s.p90;
    j["p99_" + k + "_ms"] = row.s.p99;
    j["count_" + k] = row.s.n;
  }

  std::printf("==================== asynctls bench ====================\n");
  std::printf("%-34s %s (%s)\n", "Server (model):", server.c_str(), model->name().c_str());
  std::printf("%-34s %d of %d (%d failed)\n", "Completed requests:", completed, num_requests,
              num_requests - completed);
  std::printf("%-34s %.3f\n", "Benchmark duration (s):", duration_s);
  std::printf("%-34s %lld\n", "Total input tokens:", static_cast<long long>(total_input));
  std::printf("%-34s %lld\n", "Total generated tokens:", static_cast<long long>(total_output));
  std::printf("%-34s %.3f\n", "Request throughput (req/s):", request_tput);
  std::printf("%-34s %.2f\n", "Output token throughput (tok/s):", output_tput);
  std::printf("%-34s %.2f\n", "Total token throughput (tok/s):", total_tput);
  if (has_slo) std::printf("%-34s %.3f\n", "Request goodput (req/s):", goodput);
  std::printf("--------------------------------------------------------\n");
  std::printf("%-14s %9s %9s %9s %9s %9s\n", "(ms)", "mean", "p50", "p90", "p99", "std");
  for (const Row& row : rows)
    std::printf("%-14s %9.2f %9.2f %9.2f %9.2f %9.2f\n", row.label, row.s.mean, row.s.p50,
                row.s.p90, row.s.p99, row.s.stddev);
  std::printf("========================================================\n");
  for (const std::string& e : errors) std::fprintf(stderr, "bench: request failed: %s\n", e.c_str());

  if (flags.Has("json")) {
    std::ofstream out(flags.Get("json"));
    out << j.dump(2) << "\n";
    if (!out) return absl::InternalError(absl::StrCat("cannot write ", flags.Get("json")));
  }
  if (completed == 0) return absl::UnavailableError("no request completed");
  return absl::OkStatus();
}

}  // namespace asynctls
