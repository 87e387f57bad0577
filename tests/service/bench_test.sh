#!/usr/bin/env bash
# bench_test.sh BUILD_DIR
# `asynctls bench` against a real server on the CPU (`asynctls serve` when the CLI has it,
# else asynctls-coordinator --local-engine): 8 short requests at a Poisson rate with a
# concurrency cap; checks the JSON fields and values, the table, and that the server's
# Prometheus endpoint counted the same requests and tokens.
# Exit 77 (CTest: skipped) without the SmolLM2 model.
set -euo pipefail
build=$(cd "${1:?build dir}" && pwd)
# shellcheck source=SCRIPTDIR/test_common.sh
source "$(dirname "$0")/test_common.sh"
require_model
use_workdir_and_server
read -r port metrics_port < <(free_ports 2)

asynctls=$build/cli/asynctls
if has_serve "$asynctls"; then
  "$asynctls" serve --model "$model" --device cpu --threads 1 --host 127.0.0.1 --port "$port" \
    --metrics-port "$metrics_port" >"$work/server.txt" 2>&1 &
else
  "$build/coordinator/server/asynctls-coordinator" --model "$model" --local-engine --device cpu \
    --threads 1 --host 127.0.0.1 --port "$port" --metrics-port "$metrics_port" \
    >"$work/server.txt" 2>&1 &
fi
server_pid=$!

"$asynctls" bench --server "127.0.0.1:$port" --num-requests 8 --request-rate 20 \
  --max-concurrency 4 --prompt-len uniform:4:16 --output-len fixed:6 --seed 7 \
  --slo-ttft-ms 600000 --slo-tpot-ms 0.001 --connect-timeout-s 120 \
  --json "$work/bench.json" >"$work/bench.txt" 2>&1 || fail "bench failed"
grep -q "Request throughput (req/s):" "$work/bench.txt" || fail "no table"
grep -q "^TTFT " "$work/bench.txt" || fail "no TTFT row"

python3 - "$work/bench.json" <<'EOF' || fail "bench JSON"
import json, sys
r = json.load(open(sys.argv[1]))
assert r["num_requests"] == 8 and r["completed"] == 8 and r["failed"] == 0, r
assert r["total_output_tokens"] == 8 * 6, r        # ignore_eos: every output reaches its length
assert 8 * 4 <= r["total_input_tokens"] <= 8 * 16, r
assert r["max_concurrency"] == 4 and r["request_rate"] == 20, r
assert r["duration_s"] > 0
for k in ("request_throughput", "output_throughput", "total_token_throughput"):
    assert r[k] > 0, k
assert abs(r["output_throughput"] - r["total_output_tokens"] / r["duration_s"]) < 1e-6 * r["output_throughput"]
for m in ("ttft", "tpot", "itl", "e2el"):
    for s in ("mean", "median", "std", "p50", "p90", "p99"):
        assert f"{s}_{m}_ms" in r, (s, m)
    assert r[f"p50_{m}_ms"] <= r[f"p90_{m}_ms"] <= r[f"p99_{m}_ms"], m
assert r["count_ttft"] == 8 and r["count_tpot"] == 8, r
assert r["count_itl"] >= 1, r                       # chunks may carry several tokens
assert 0 < r["mean_ttft_ms"] <= r["mean_e2el_ms"], r
# TPOT from its definition: (e2e - ttft) / (out - 1), so mean_e2e = mean_ttft + 5 * mean_tpot.
assert abs(r["mean_e2el_ms"] - r["mean_ttft_ms"] - 5 * r["mean_tpot_ms"]) < 1e-6 * r["mean_e2el_ms"], r
# A TPOT SLO of 1 microsecond nobody meets: goodput 0; without SLOs it would be null.
assert r["slo_tpot_ms"] == 0.001 and r["request_goodput"] == 0, r
print("bench JSON ok")
EOF

metrics=$(python3 - "$metrics_port" <<'EOF'
import sys, urllib.request
with urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/metrics", timeout=10) as r:
    assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4"), r.headers
    print(r.read().decode())
EOF
) || fail "metrics endpoint"
grep -q '^asynctls_requests_total{outcome="length"} 8$' <<<"$metrics" || fail "metrics: length 8"
grep -q '^asynctls_generated_tokens_total 48$' <<<"$metrics" || fail "metrics: 48 tokens"
grep -q '^asynctls_time_to_first_token_seconds_count 8$' <<<"$metrics" || fail "metrics: ttft"
echo "PASS: bench 8 requests, JSON and metrics agree"
