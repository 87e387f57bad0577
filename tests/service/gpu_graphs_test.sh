#!/usr/bin/env bash
# gpu_graphs_test.sh BUILD_OR_BIN_DIR [OUT_DIR]
# The service on a GPU with decode steps replayed from CUDA graphs, against the same service op
# by op: `asynctls serve --device cuda` with the test channel sets (TLS requests served), once
# with --cuda-graphs off, once on. Against each server:
#   1. six greedy requests one at a time (long prompts; dense, TLS with the one-step lag, TLS at
#      smaller budgets): a batch of one runs the same ops either way, so the two servers' texts
#      must be identical;
#   2. 24 requests with up to 8 in flight (`asynctls bench`): batches that grow and shrink, so
#      graphs are captured and replayed for several shapes and swapped sequences; all complete;
#   3. a client killed mid-stream: the server counts it cancelled and serves the next request;
# then the server holds no KV block and exits 0 on SIGTERM. BUILD_OR_BIN_DIR: a build tree
# (cli/asynctls) or a folder holding asynctls (e.g. a bundle's bin/). OUT_DIR keeps the texts
# and logs (default: a temporary folder, removed).
# Exit 77 (CTest: skipped) without a GPU or the SmolLM2 model. DEVICE=cpu runs the same flow
# on the CPU (which runs op by op either way: a check of this script, not of graphs).
set -euo pipefail
dir=$(cd "${1:?build or bin dir}" && pwd)
src=$(cd "$(dirname "$0")/../.." && pwd)
# shellcheck source=SCRIPTDIR/test_common.sh
source "$src/tests/service/test_common.sh"
asynctls=$dir/cli/asynctls
[ -x "$asynctls" ] || asynctls=$dir/asynctls
[ -x "$asynctls" ] || { echo "FAIL: no asynctls in $dir or $dir/cli" >&2; exit 1; }
device=${DEVICE:-cuda}
if [ "$device" = cuda ] &&
  { ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L 2>/dev/null | grep -q '^GPU'; }; then
  echo "SKIP: no GPU"
  exit 77
fi
require_model
has_serve "$asynctls" || { echo "SKIP: asynctls built without gRPC (no serve)"; exit 77; }
keep=${2:-}
work=${keep:-$(mktemp -d)}
mkdir -p "$work"
server_pid=""
cleanup() {
  if [ -n "$server_pid" ] && kill -0 "$server_pid" 2>/dev/null; then kill -KILL "$server_pid"; fi
  [ -n "$keep" ] || rm -rf "$work"
}
trap cleanup EXIT
fail() {
  echo "FAIL: $*" >&2
  for f in "$work"/*.log; do [ -f "$f" ] && { echo "---- $f"; tail -n 30 "$f"; } >&2; done
  exit 1
}
metrics() {  # the server's /metrics body
  python3 - "$metrics_port" <<'EOF'
import sys, urllib.request
with urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/metrics", timeout=10) as r:
    print(r.read().decode())
EOF
}
# metric TEXT NAME_AND_LABELS: its value summed over matching lines (0 if none).
metric() {
  printf '%s\n' "$1" | awk -v m="$2" 'index($0, m) == 1 { s += $NF } END { print s + 0 }'
}

{
  cat "$src/tests/data/prompts/apache-2.0.txt"
  printf '\n\nIn two sentences: what does this license let me do?'
} >"$work/prompt-apache.txt"
{
  head -c 12000 "$src/tests/data/prompts/gpl-2.txt"
  printf '\n\nSummarize the text above in three sentences.'
} >"$work/prompt-gpl.txt"
# The one-at-a-time requests: request NAME GRAPHS CLIENT_FLAGS... (greedy) -> NAME-GRAPHS.txt.
names=(apache-dense apache-tls gpl-dense gpl-tls gpl-tls-small short-tls)
one_at_a_time() {  # server graphs
  local server=$1 graphs=$2
  request() {
    local name=$1
    shift
    "$asynctls" generate --server "$server" "$@" >"$work/$name-$graphs.txt" \
      2>"$work/$name-$graphs.log" || fail "graphs $graphs: request $name"
    [ -s "$work/$name-$graphs.txt" ] || fail "graphs $graphs: request $name: no text"
  }
  request apache-dense --prompt-file "$work/prompt-apache.txt" --max-tokens 64
  request apache-tls --prompt-file "$work/prompt-apache.txt" --max-tokens 64 --attention tls
  request gpl-dense --prompt-file "$work/prompt-gpl.txt" --max-tokens 96
  request gpl-tls --prompt-file "$work/prompt-gpl.txt" --max-tokens 96 --attention tls
  request gpl-tls-small --prompt-file "$work/prompt-gpl.txt" --max-tokens 96 --attention tls \
    --tls-block-budget 16 --tls-token-budget 256
  request short-tls --prompt "The capital of France is" --raw --max-tokens 24 --attention tls
}

run_server() {  # graphs: on|off
  local graphs=$1
  read -r port metrics_port < <(free_ports 2)
  "$asynctls" serve --model "$model" --device "$device" --cuda-graphs "$graphs" \
    --tls-channels "$src/tests/data/channels/smollm2-gpl.json" --host 127.0.0.1 \
    --port "$port" --metrics-port "$metrics_port" >"$work/serve-$graphs.log" 2>&1 &
  server_pid=$!
  local i ready=0
  for ((i = 0; i < 600; i++)); do
    kill -0 "$server_pid" 2>/dev/null || fail "graphs $graphs: the server exited"
    if [ "$(metric "$(metrics 2>/dev/null || true)" "asynctls_replicas")" -ge 1 ]; then
      ready=1
      break
    fi
    sleep 0.2
  done
  [ "$ready" = 1 ] || fail "graphs $graphs: the server was not ready within 120 s"
  local server=127.0.0.1:$port

  # 1. One at a time.
  one_at_a_time "$server" "$graphs"

  # 2. Batches that grow and shrink.
  "$asynctls" bench --server "$server" --num-requests 24 --max-concurrency 8 \
    --prompt-len uniform:64:3000 --output-len uniform:8:96 --seed 3 \
    --json "$work/bench-$graphs.json" >"$work/bench-$graphs.log" 2>&1 ||
    fail "graphs $graphs: bench"
  python3 - "$work/bench-$graphs.json" <<'EOF' || fail "graphs $graphs: bench JSON"
import json, sys
r = json.load(open(sys.argv[1]))
assert r["completed"] == 24 and r["failed"] == 0, r
EOF

  # 3. A client killed mid-stream, then one more request.
  "$asynctls" generate --server "$server" --prompt-file "$work/prompt-gpl.txt" --max-tokens 4000 \
    --ignore-eos --attention tls >"$work/killed-$graphs.txt" 2>&1 &
  local client=$!
  sleep 1.5
  kill -KILL "$client" 2>/dev/null || true
  wait "$client" 2>/dev/null || true
  "$asynctls" generate --server "$server" --prompt "Hello" --max-tokens 8 --attention tls \
    >"$work/after-kill-$graphs.txt" 2>"$work/after-kill-$graphs.log" ||
    fail "graphs $graphs: the request after the killed client"

  local m used cancelled
  for ((i = 0; i < 50; i++)); do
    m=$(metrics) || fail "graphs $graphs: metrics"
    used=$(metric "$m" "asynctls_kv_blocks_used")
    cancelled=$(metric "$m" 'asynctls_requests_total{outcome="cancelled"}')
    [ "$used" = 0 ] && [ "$cancelled" -ge 1 ] && break
    sleep 0.2
  done
  [ "$used" = 0 ] || fail "graphs $graphs: $used KV blocks still used"
  [ "$cancelled" -ge 1 ] || fail "graphs $graphs: the killed client was not counted cancelled"
  printf '%s\n' "$m" | grep '^asynctls_requests_total' >"$work/outcomes-$graphs.txt"

  kill -TERM "$server_pid"
  local status=0
  wait "$server_pid" || status=$?
  server_pid=""
  [ "$status" = 0 ] || fail "graphs $graphs: the server exited $status on SIGTERM"
}

run_server off
run_server on
for name in "${names[@]}"; do
  cmp -s "$work/$name-off.txt" "$work/$name-on.txt" ||
    fail "request $name: graphed text differs (diff $work/$name-off.txt $work/$name-on.txt)"
done
grep -h "tokens/s\|TTFT" "$work"/apache-dense-*.log "$work"/gpl-tls-*.log 2>/dev/null | head -8 || true
echo "PASS: ${#names[@]} greedy texts identical with --cuda-graphs on and off; 24 bench" \
  "requests and a killed client served on both; no KV left, clean SIGTERM"
