#!/usr/bin/env bash
# The main job: install what is missing, build, fetch SmolLM2-135M-Instruct once, start the
# service with its embedded default (`asynctls serve`: coordinator + an in-process engine on
# the GPU when there is one, else the CPU), send it a long-context request over gRPC (the
# Apache-2.0 license, ~2,300 tokens, plus a question), stream the answer, and stop the service.
# Extra args go to the client (`asynctls generate --server`, e.g. --max-tokens 64).
set -euo pipefail
cd "$(dirname "$0")/.."
bash deploy/install-deps.sh
bash deploy/build.sh >/dev/null
source deploy/common.sh
DEPLOY_NAME=quickstart
pick_blas_kernels  # the CPU backend's GEMMs (no effect on the GPU path)
bin=./build/cli/asynctls
model=$("$bin" fetch-model)
port=${ASYNCTLS_PORT:-50051}
metrics_port=${ASYNCTLS_METRICS_PORT:-9464}
run_dir=$(mktemp -d)
trap 'kill "$server_pid" 2>/dev/null; wait "$server_pid" 2>/dev/null; rm -rf "$run_dir"' EXIT
"$bin" serve --model "$model" --device "${ASYNCTLS_DEVICE:-auto}" --host 127.0.0.1 --port "$port" --metrics-port "$metrics_port" \
  >"$run_dir/serve.log" 2>&1 &
server_pid=$!
log "asynctls serve (pid $server_pid) on 127.0.0.1:$port, metrics on :$metrics_port; log $run_dir/serve.log"
for _ in $(seq 600); do
  kill -0 "$server_pid" 2>/dev/null || { cat "$run_dir/serve.log" >&2; die "the server exited"; }
  [ "$(replicas_from_metrics "$(metrics_local 127.0.0.1 "$metrics_port")")" -ge 1 ] && break
  sleep 0.2
done
grep -m1 "engine:" "$run_dir/serve.log" >&2 || true
{
  cat tests/data/prompts/apache-2.0.txt
  printf '\n\nIn two sentences: what does this license let me do, and what must I keep when I redistribute the work?'
} >"$run_dir/prompt.txt"
"$bin" generate --server "127.0.0.1:$port" --prompt-file "$run_dir/prompt.txt" --max-tokens 128 "$@"
