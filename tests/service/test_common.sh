# shellcheck shell=bash
# Shared by the service shell tests (tests/service/*_test.sh; sourced, not run).

# The SmolLM2 GGUF into $model, or exit 77 (CTest: skipped) without it.
require_model() {
  model=${ASYNCTLS_MODEL_PATH:-$HOME/.cache/asynctls/SmolLM2-135M-Instruct.Q4_1.gguf}
  if [ ! -f "$model" ]; then
    echo "SKIP: SmolLM2 GGUF not found (set ASYNCTLS_MODEL_PATH)"
    exit 77
  fi
}

# free_ports N: N TCP ports free on 127.0.0.1 now, on one line.
free_ports() {
  python3 - "$1" <<'EOF'
import socket, sys
socks = [socket.socket() for _ in range(int(sys.argv[1]))]
for s in socks: s.bind(("127.0.0.1", 0))
print(*[s.getsockname()[1] for s in socks])
EOF
}

# stop_process PID: SIGTERM, up to 10 s to exit, then SIGKILL.
stop_process() {
  kill -TERM "$1" 2>/dev/null || return 0
  local i
  for ((i = 0; i < 50; i++)); do
    kill -0 "$1" 2>/dev/null || return 0
    sleep 0.2
  done
  kill -KILL "$1" 2>/dev/null || true
}

# has_serve ASYNCTLS: whether that asynctls has `serve` (gRPC builds). Asked with a bad --port,
# which every serve refuses at once (`serve --help` is an error too: --help is not a flag).
has_serve() {
  ! timeout 10 "$1" serve --port x 2>&1 | grep -q "unknown command"
}

# For a test with one server: $work (a temporary folder, removed on exit, as the server
# $server_pid is stopped if set) and fail MESSAGE (prints it and the tail of each $work/*.txt,
# exits 1).
use_workdir_and_server() {
  work=$(mktemp -d)
  server_pid=""
  trap '[ -z "$server_pid" ] || stop_process "$server_pid"; rm -rf "$work"' EXIT
}
fail() {
  echo "FAIL: $*" >&2
  local f
  for f in "$work"/*.txt; do [ -f "$f" ] && { echo "---- $f"; tail -n 40 "$f"; } >&2; done
  exit 1
}
