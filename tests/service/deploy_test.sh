#!/usr/bin/env bash
# deploy_test.sh local|multinode BUILD_DIR
# Starts deploy/local.sh (coordinator + 1 worker on the CPU) or deploy/multinode.sh (the same
# through tests/service/fake_ssh, an ssh stand-in that runs commands on this machine, with
# --copy-binaries), waits for READY, runs 2 short requests through `asynctls bench`, sends the
# script SIGTERM and checks that it exits 0 and that every process it started is gone.
# Exit 77 (CTest: skipped) without the SmolLM2 model.
set -euo pipefail
mode=${1:?local or multinode}
build=$(cd "${2:?build dir}" && pwd)
src=$(cd "$(dirname "$0")/../.." && pwd)
# shellcheck source=SCRIPTDIR/test_common.sh
source "$src/tests/service/test_common.sh"
require_model
work=$(mktemp -d)
script_pid=""
cleanup() {
  if [ -n "$script_pid" ] && kill -0 "$script_pid" 2>/dev/null; then kill -KILL "$script_pid"; fi
  # Anything the script left behind (only on failure): by the pids it recorded.
  for f in "$work"/run/*.pid "$work"/remote/*.pid; do
    [ -f "$f" ] && kill -KILL "$(cat "$f")" 2>/dev/null || true
  done
  rm -rf "$work"
}
trap cleanup EXIT
fail() {
  echo "FAIL: $*" >&2
  for f in "$work"/out.txt "$work"/run/*.log; do
    [ -f "$f" ] && { echo "---- $f"; tail -n 30 "$f"; } >&2
  done
  exit 1
}
read -r port metrics_port < <(free_ports 2)

case $mode in
  local)
    "$src/deploy/local.sh" --workers 1 --port "$port" --metrics-port "$metrics_port" \
      --model "$model" --device cpu --threads 1 --bin-dir "$build" --run-dir "$work/run" \
      --timeout 300 --grace 10 --worker-arg --kv-cache-mb --worker-arg 64 \
      --worker-arg --cuda-graphs --worker-arg on >"$work/out.txt" 2>&1 &
    ;;
  multinode)
    printf '# coordinator\n127.0.0.1 addr=127.0.0.1\n\nlocalhost threads=1 device=cpu\n' \
      >"$work/hosts"
    PATH="$src/tests/service/fake_ssh:$PATH" FAKE_SSH_LOG="$work/ssh.log" \
      "$src/deploy/multinode.sh" --hosts "$work/hosts" --port "$port" \
      --metrics-port "$metrics_port" --model "$model" --bin-dir "$build" --copy-binaries \
      --remote-dir "$work/remote" --run-dir "$work/run" --timeout 300 --grace 10 \
      --worker-arg --kv-cache-mb --worker-arg 64 >"$work/out.txt" 2>&1 &
    ;;
  *) fail "unknown mode $mode" ;;
esac
script_pid=$!

for ((i = 0; i < 600; i++)); do
  grep -q '^READY ' "$work/out.txt" && break
  kill -0 "$script_pid" 2>/dev/null || fail "the deploy script exited before READY"
  sleep 0.5
done
grep -q '^READY ' "$work/out.txt" || fail "no READY within 300 s"
endpoint=$(sed -n 's/^READY //p' "$work/out.txt")
[ "$endpoint" = "127.0.0.1:$port" ] || fail "endpoint '$endpoint'"

# The processes the script started (pid files: local run dir / the "remote" dir).
pid_dir=$work/run
[ "$mode" = multinode ] && pid_dir=$work/remote
pids=()
for f in "$pid_dir"/coordinator.pid "$pid_dir"/worker-0.pid; do
  [ -f "$f" ] || fail "missing $f"
  pids+=("$(cat "$f")")
done
for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null || fail "process $p not running"; done
if [ "$mode" = multinode ]; then
  [ -x "$work/remote/bin/asynctls-worker" ] || fail "--copy-binaries did not copy"
  grep -q localhost "$work/ssh.log" || fail "the worker host was not reached through ssh"
fi

# Serve two short requests.
"$build/cli/asynctls" bench --server "$endpoint" --num-requests 2 --prompt-len fixed:8 \
  --output-len fixed:4 --json "$work/bench.json" >"$work/bench.txt" 2>&1 ||
  { cat "$work/bench.txt" >&2; fail "bench failed"; }
python3 - "$work/bench.json" <<'EOF' || fail "bench results"
import json, sys
r = json.load(open(sys.argv[1]))
assert r["completed"] == 2 and r["failed"] == 0, r
assert r["total_output_tokens"] == 8, r
EOF

kill -TERM "$script_pid"
status=0
for ((i = 0; i < 120; i++)); do
  kill -0 "$script_pid" 2>/dev/null || break
  sleep 0.25
done
kill -0 "$script_pid" 2>/dev/null && fail "the deploy script did not exit within 30 s of SIGTERM"
wait "$script_pid" || status=$?
[ "$status" = 0 ] || fail "the deploy script exited with $status"
for p in "${pids[@]}"; do
  kill -0 "$p" 2>/dev/null && fail "process $p survived the shutdown"
done
grep -q "all processes stopped" "$work/out.txt" || fail "no clean shutdown message"
script_pid=""
echo "PASS: deploy/$mode.sh started, served and stopped every process"
