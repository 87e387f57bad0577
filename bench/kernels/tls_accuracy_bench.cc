// Accuracy of the TLS selection policies against exact attention (issue 4, item 5): per input,
// method (TLS same-step, TLS one-step lag, token-only, Quest block-only) and budget k_t, the
// recall of the exact top-k_t tokens, the attention-mass recall and the output relative error
// (definitions in tests/kernels/tls_accuracy_util.h). Runs the CPU reference operators
// (ref::TlsIndexUpdate, TlsDecodeSelect, TlsSparseAttention) on:
//   gaussian  i.i.d. N(0, 1) q/k/v
//   needle    Gaussian plus planted keys aligned with the group's query direction
//   capture   q/k/v of a real model from `asynctls calibrate --capture` (every layer, KV head)
//
//   tls_accuracy_bench [--inputs gaussian,needle,capture] [--contexts 32768,131072]
//                      [--budgets 512,1024,2048] [--block-budget 128] [--heads 8,2,128]
//                      [--channels 32] [--queries 4] [--needles 16] [--needle-logit 10]
//                      [--capture FILE --channel-file JSON] [--capture-budgets 128,...,2048]
//                      [--capture-block-budgets 16,32] [--capture-queries 8] [--query-step 16]
//                      [--json FILE] [--seed 1] [--block-index bf16|int8]
// Prints one markdown table per input (and a per-layer table for the capture) and writes every
// row as JSON with --json.
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <map>
#include <sstream>
#include <string>
#include <vector>

#include "kernels/tls_accuracy_util.h"

namespace asynctls::kernels::testing {
namespace {

std::vector<int> ParseInts(const std::string& s) {
  std::vector<int> out;
  std::stringstream ss(s);
  for (std::string item; std::getline(ss, item, ',');) out.push_back(std::atoi(item.c_str()));
  return out;
}

struct Args {
  std::map<std::string, std::string> values;
  std::string Get(const std::string& k, const std::string& def) const {
    auto it = values.find(k);
    return it == values.end() ? def : it->second;
  }
};

struct Row {
  std::string input, method;
  int context = 0, layer = -1, k_b = 0, k_t = 0;
  AccuracyMetrics m;
};

std::string Json(const std::vector<Row>& rows, const std::string& meta) {
  std::ostringstream o;
  o << "{\n  " << meta << ",\n  \"rows\": [\n";
  for (size_t i = 0; i < rows.size(); ++i) {
    const Row& r = rows[i];
    char buf[512];
    std::snprintf(buf, sizeof(buf),
                  "    {\"input\": \"%s\", \"context\": %d, \"layer\": %d, \"method\": \"%s\", "
                  "\"k_b\": %d, \"k_t\": %d, \"topk_recall\": %.5f, \"mass_recall\": %.5f, "
                  "\"out_rel_err\": %.5f, \"needle_recall\": %.5f, \"selected\": %.1f, "
                  "\"samples\": %d}%s\n",
                  r.input.c_str(), r.context, r.layer, r.method.c_str(), r.k_b, r.k_t,
                  r.m.topk_recall, r.m.mass_recall, r.m.out_rel_err, r.m.needle_recall,
                  r.m.selected, r.m.samples, i + 1 < rows.size() ? "," : "");
    o << buf;
  }
  o << "  ]\n}\n";
  return o.str();
}

void PrintTable(const std::string& title, const std::vector<Row>& rows, bool needles) {
  std::printf("\n### %s\n\n", title.c_str());
  std::printf(
      "| context | k_b | k_t | method | top-k_t recall | mass recall | out rel err |%s |S| |\n",
      needles ? " needle recall |" : "");
  std::printf("|---:|---:|---:|---|---:|---:|---:|%s---:|\n", needles ? "---:|" : "");
  for (const Row& r : rows) {
    std::printf("| %d | %d | %d | %s | %.3f | %.3f | %.3f |", r.context, r.k_b, r.k_t,
                r.method.c_str(), r.m.topk_recall, r.m.mass_recall, r.m.out_rel_err);
    if (needles) std::printf(" %.3f |", r.m.needle_recall);
    std::printf(" %.0f |\n", r.m.selected);
  }
  std::fflush(stdout);
}

TlsPolicy MakeAccuracyPolicy(const AccuracyMethod& method, int k_b, int k_t) {
  TlsPolicy p;
  p.mode = method.mode;
  p.lag = method.lag;
  p.block_budget = k_b;
  p.token_budget = k_t;
  return p;
}

// --block-index int8: the block index's int8 form (tls_params.h); bf16 by default.
bool Int8BlockIndex(const Args& a) { return a.Get("block-index", "bf16") == "int8"; }

double Seconds(std::chrono::steady_clock::time_point since) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - since).count();
}

void RunSynthetic(const Args& a, bool needle, std::vector<Row>* all) {
  const std::vector<int> heads = ParseInts(a.Get("heads", "8,2,128"));
  const int dc = std::atoi(a.Get("channels", "32").c_str());
  const int queries = std::atoi(a.Get("queries", "4").c_str());
  const int k_b = std::atoi(a.Get("block-budget", "128").c_str());
  const uint64_t seed = std::strtoull(a.Get("seed", "1").c_str(), nullptr, 10);
  std::vector<Row> rows;
  for (int context : ParseInts(a.Get("contexts", "32768,131072"))) {
    const auto t0 = std::chrono::steady_clock::now();
    const AccuracyInput in =
        needle ? MakeNeedleInput(context, queries, heads[0], heads[1], heads[2], dc,
                                 std::atoi(a.Get("needles", "16").c_str()),
                                 std::strtof(a.Get("needle-logit", "10").c_str(), nullptr), seed)
               : MakeGaussianInput(context, queries, heads[0], heads[1], heads[2], dc, seed);
    const AccuracyHarness h(in, Int8BlockIndex(a));
    std::fprintf(stderr, "[%s %d] input + exact attention %.1f s\n", needle ? "needle" : "gaussian",
                 context, Seconds(t0));
    for (int k_t : ParseInts(a.Get("budgets", "512,1024,2048"))) {
      for (const AccuracyMethod& method : AccuracyMethods(false)) {
        rows.push_back({needle ? "needle" : "gaussian", method.name, context, -1,
                        method.mode == TlsMode::kTwoLevel ? k_b : 0, k_t,
                        h.Evaluate(MakeAccuracyPolicy(method, k_b, k_t))});
      }
    }
  }
  char title[256];
  std::snprintf(title, sizeof(title),
                "%s: %d q heads, %d KV heads, head_dim %d, d_c %d, %d decode queries per context",
                needle ? "(b) planted needles" : "(a) Gaussian q/k/v", heads[0], heads[1], heads[2],
                dc, queries);
  PrintTable(title, rows, needle);
  all->insert(all->end(), rows.begin(), rows.end());
}

int RunCapture(const Args& a, std::vector<Row>* all) {
  QkvCaptureFile file;
  std::string error;
  if (!file.Open(a.Get("capture", ""), &error)) {
    std::fprintf(stderr, "--capture: %s\n", error.c_str());
    return 1;
  }
  std::ifstream cin(a.Get("channel-file", ""));
  std::stringstream text;
  text << cin.rdbuf();
  int layers = 0, kv = 0, dc = 0;
  const std::vector<int32_t> channels = ParseChannelSetsJson(text.str(), &layers, &kv, &dc, &error);
  if (channels.empty() || layers != file.num_layers || kv != file.num_kv_heads) {
    std::fprintf(stderr, "--channel-file: %s\n",
                 channels.empty() ? error.c_str() : "does not match the capture's shape");
    return 1;
  }
  const int nq = std::atoi(a.Get("capture-queries", "8").c_str());
  const int step = std::atoi(a.Get("query-step", "16").c_str());
  std::vector<int32_t> positions;
  for (int i = 0; i < nq; ++i) positions.push_back(file.num_tokens - 1 - i * step);
  if (positions.back() - 1 < file.num_tokens - file.num_queries) {
    std::fprintf(stderr,
                 "queries reach before the captured ones: lower --capture-queries/--query-step\n");
    return 1;
  }
  const std::vector<int> budgets = ParseInts(a.Get("capture-budgets", "128,256,512,1024,2048"));
  const std::vector<int> block_budgets = ParseInts(a.Get("capture-block-budgets", "16,32"));
  const std::vector<AccuracyMethod> methods = AccuracyMethods(true);
  std::map<std::string, Row> total;  // key: k_b/k_t/method
  std::vector<std::string> order;
  std::vector<Row> per_layer;
  const auto t0 = std::chrono::steady_clock::now();
  for (int l = 0; l < file.num_layers; ++l) {
    const std::vector<int32_t> layer_channels(channels.begin() + size_t(l) * kv * dc,
                                              channels.begin() + size_t(l + 1) * kv * dc);
    const AccuracyInput in = file.Layer(l, positions, layer_channels, dc);
    const AccuracyHarness h(in, Int8BlockIndex(a));
    for (int k_t : budgets) {
      for (const AccuracyMethod& method : methods) {
        const bool two_level = method.mode == TlsMode::kTwoLevel;
        for (int k_b : two_level ? block_budgets : std::vector<int>{0}) {
          Row r{"capture",
                method.name,
                file.num_tokens,
                l,
                k_b,
                k_t,
                h.Evaluate(MakeAccuracyPolicy(method, k_b, k_t))};
          per_layer.push_back(r);
          const std::string key =
              std::to_string(k_t) + "/" + method.name + "/" + std::to_string(k_b);
          if (!total.count(key)) {
            order.push_back(key);
            r.layer = -1;
            r.m = AccuracyMetrics{};
            total[key] = r;
          }
          total[key].m.Merge(per_layer.back().m);
        }
      }
    }
  }
  std::fprintf(stderr, "[capture] %d layers in %.1f s\n", file.num_layers, Seconds(t0));
  std::vector<Row> rows;
  for (const std::string& key : order) rows.push_back(total[key]);
  char title[320];
  std::snprintf(title, sizeof(title),
                "(c) captured q/k/v: %d tokens, %d layers x %d KV heads, %d q heads, head_dim %d, "
                "d_c %d, queries at positions %d..%d step %d (mean over layers, heads, queries)",
                file.num_tokens, file.num_layers, file.num_kv_heads, file.num_q_heads,
                file.head_dim, dc, positions.back(), positions.front(), step);
  PrintTable(title, rows, false);

  // Per layer: mass recall at one (k_b, k_t) so layers where a method breaks down show.
  const int show_kt = budgets.size() > 2 ? budgets[2] : budgets.front();
  const int show_kb = block_budgets.front();
  std::printf("\n### (c) per layer: mass recall / top-k_t recall at k_t = %d, k_b = %d\n\n",
              show_kt, show_kb);
  std::printf("| layer |");
  for (const AccuracyMethod& m : methods) std::printf(" %s |", m.name);
  std::printf("\n|---:|");
  for (size_t i = 0; i < methods.size(); ++i) std::printf("---|");
  std::printf("\n");
  for (int l = 0; l < file.num_layers; ++l) {
    std::printf("| %d |", l);
    for (const AccuracyMethod& m : methods) {
      for (const Row& r : per_layer) {
        if (r.layer == l && r.k_t == show_kt && r.method == m.name &&
            (r.k_b == show_kb || r.k_b == 0)) {
          std::printf(" %.3f / %.3f |", r.m.mass_recall, r.m.topk_recall);
        }
      }
    }
    std::printf("\n");
  }
  all->insert(all->end(), rows.begin(), rows.end());
  all->insert(all->end(), per_layer.begin(), per_layer.end());
  return 0;
}

int Main(int argc, char** argv) {
  Args a;
  for (int i = 1; i < argc; ++i) {
    std::string k = argv[i];
    if (k.rfind("--", 0) != 0 || i + 1 >= argc) {
      std::fprintf(stderr, "usage: see the header of bench/kernels/tls_accuracy_bench.cc\n");
      return 2;
    }
    a.values[k.substr(2)] = argv[++i];
  }
  if (const std::string b = a.Get("block-index", "bf16"); b != "bf16" && b != "int8") {
    std::fprintf(stderr, "--block-index: bf16 or int8, not '%s'\n", b.c_str());
    return 2;
  }
  std::vector<Row> rows;
  const std::string inputs =
      a.Get("inputs", a.values.count("capture") ? "gaussian,needle,capture" : "gaussian,needle");
  for (const std::string& input :
       {std::string("gaussian"), std::string("needle"), std::string("capture")}) {
    if (("," + inputs + ",").find("," + input + ",") == std::string::npos) continue;
    if (input == "capture") {
      if (int rc = RunCapture(a, &rows); rc != 0) return rc;
    } else {
      RunSynthetic(a, input == "needle", &rows);
    }
  }
  if (a.values.count("json")) {
    std::ostringstream meta;
    meta << "\"tool\": \"tls_accuracy_bench\", \"args\": \"";
    for (int i = 1; i < argc; ++i) meta << (i > 1 ? " " : "") << argv[i];
    meta << "\"";
    std::ofstream(a.Get("json", "")) << Json(rows, meta.str());
  }
  return 0;
}

}  // namespace
}  // namespace asynctls::kernels::testing

int main(int argc, char** argv) { return asynctls::kernels::testing::Main(argc, argv); }
