#!/usr/bin/env bash
# client_budgets_test.sh BUILD_DIR
# `asynctls generate --server` against a real server on the CPU started with TLS channel sets
# (`asynctls serve --tls-channels`, budgets k_b 32 / k_t 128): a TLS request with smaller
# budgets (--tls-block-budget / --tls-token-budget travel with the request) is served; one over
# the server's token budget fails with INVALID_ARGUMENT naming the field, and leaves the server
# serving; an engine flag given to the client is refused before it connects; --model names a
# model the server lists (an unknown name is INVALID_ARGUMENT).
# Exit 77 (CTest: skipped) without the SmolLM2 model.
set -euo pipefail
build=$(cd "${1:?build dir}" && pwd)
src=$(cd "$(dirname "$0")/../.." && pwd)
# shellcheck source=SCRIPTDIR/test_common.sh
source "$src/tests/service/test_common.sh"
require_model
asynctls=$build/cli/asynctls
use_workdir_and_server
port=$(free_ports 1)

"$asynctls" serve --model "$model" --device cpu --threads 1 --host 127.0.0.1 --port "$port" \
  --tls-channels "$src/tests/data/channels/smollm2-gpl.json" --tls-block-budget 32 \
  --tls-token-budget 128 >"$work/server.txt" 2>&1 &
server_pid=$!
client() {  # args: generate flags after --server; output in $work/client.txt
  "$asynctls" generate --server "127.0.0.1:$port" --prompt "The capital of France is" --raw \
    --max-tokens 8 "$@" >"$work/client.txt" 2>&1
}

# Smaller budgets than the server's (the first call also waits for the server to come up).
ok=0
for ((i = 0; i < 300; i++)); do
  kill -0 "$server_pid" 2>/dev/null || fail "the server exited"
  if client --attention tls --tls-block-budget 4 --tls-token-budget 64; then
    ok=1
    break
  fi
  grep -q "UNAVAILABLE\|failed to connect\|Connection refused" "$work/client.txt" ||
    fail "TLS request with smaller budgets"
  sleep 0.5
done
[ "$ok" = 1 ] || fail "the server did not come up"
grep -q "finish: FINISH_REASON_LENGTH\|finish: FINISH_REASON_STOP" "$work/client.txt" ||
  fail "no final message"

# Over the server's budget: INVALID_ARGUMENT, naming the field.
if client --attention tls --tls-token-budget 4096; then fail "a token budget over the server's was served"; fi
grep -q "INVALID_ARGUMENT" "$work/client.txt" || fail "over budget: not INVALID_ARGUMENT"
grep -q "token_budget" "$work/client.txt" || fail "over budget: the message does not name token_budget"

# The server still serves (dense, then TLS at its own budgets).
client || fail "dense request after the rejected one"
client --attention tls || fail "TLS request at the server's budgets"

# Engine flags are the server's: the client refuses them.
if client --attention tls --cuda-graphs on; then fail "a client accepted --cuda-graphs"; fi
grep -q "configures the server's engine" "$work/client.txt" || fail "--cuda-graphs: message"
if client --tls-token-budget 64; then fail "budgets without --attention tls were accepted"; fi
grep -q "only with --attention tls" "$work/client.txt" || fail "budgets without tls: message"
if client --device cpu; then fail "a client accepted --device"; fi
grep -q "configures the server's engine" "$work/client.txt" || fail "--device: message"

# --model: a name the server lists; an unknown one is INVALID_ARGUMENT naming it.
if client --model no-such-model; then fail "an unknown model was served"; fi
grep -q "INVALID_ARGUMENT: model: unknown model 'no-such-model'" "$work/client.txt" ||
  fail "unknown model: message"
echo "PASS: client TLS budgets served, over-budget and unknown model rejected with INVALID_ARGUMENT, engine flags refused"
