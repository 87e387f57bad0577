#!/usr/bin/env bash
# Starts an asynctls coordinator and workers on several machines over ssh, as deploy/local.sh
# does on one: the first line of the hosts file is the coordinator's host, every other line
# one worker. Each remote process's output streams back through its ssh session into a log
# per process under the local run folder. Waits until every worker has registered, then stays
# in the foreground; Ctrl-C or SIGTERM stops the workers, then the coordinator (SIGTERM through
# ssh, SIGKILL after --grace seconds), and exits when every ssh session has ended.
#
#   deploy/multinode.sh --hosts deploy/configs/hosts.example --port 50051 --model /models/m.gguf
#
# Assumptions (see deploy/README.md):
# - passwordless ssh (keys or an agent) from this machine to every host; `bash` on every host.
# - the binaries are at the same path on every host as found here (a shared or identically
#   laid out filesystem), or --copy-binaries scp's them into --remote-dir/bin (same CPU
#   architecture and shared libraries as here: Debian 12 with the runtime packages of
#   deploy/install-deps.sh).
# - --model is a path valid on every host (the file is not copied).
# - the workers reach the coordinator at its hosts-file address (addr= overrides it) on --port;
#   readiness is read through ssh on the coordinator host, so the metrics port may stay
#   firewalled from here.
#
# Hosts file: one host per line, `[user@]host [addr=ADDRESS] [device=D] [threads=N]`; blank
# lines and lines starting with # are skipped. addr= is the address workers dial (coordinator
# line only; default: the host name); device= and threads= override --device / --threads for
# one worker.
set -euo pipefail
export DEPLOY_NAME=multinode
source "$(dirname "$0")/common.sh"

usage() {
  cat <<'EOF'
usage: deploy/multinode.sh --hosts FILE [flags]
  --hosts FILE        first line the coordinator host, then one line per worker
  --port P            coordinator gRPC port (default 50051)
  --metrics-port M    coordinator Prometheus port (default P+1)
  --model PATH        model path on every host (default: ~/.cache/asynctls/SmolLM2-...gguf)
  --device D          workers' device (default auto)
  --threads T         workers' CPU threads (default: all cores of their host)
  --bin-dir DIR       where the binaries are here (build tree or folder; default ./build)
  --copy-binaries     scp the two binaries to every host's --remote-dir/bin and run those
  --remote-dir DIR    remote folder for pid files and copied binaries (default /tmp/asynctls-deploy)
  --run-dir DIR       local logs (default: runs/multinode-<date>-<pid>)
  --ssh-opt OPT       extra ssh/scp option, e.g. --ssh-opt -oBatchMode=yes (repeatable)
  --env FILE          source settings from an env file first (flags override it)
  --timeout S         seconds to wait for readiness (default 600)
  --grace S           seconds between SIGTERM and SIGKILL at shutdown (default 10)
  --coordinator-arg A / --worker-arg A   extra arguments (repeatable)
EOF
}

HOSTS_FILE="" PORT=50051 METRICS_PORT="" MODEL="" DEVICE=auto THREADS="" BIN_DIR=""
COPY_BINARIES=0 REMOTE_DIR=/tmp/asynctls-deploy RUN_DIR="" TIMEOUT=600 GRACE=10
SSH_OPTS=(-oBatchMode=yes -oConnectTimeout=10) COORDINATOR_ARGS=() WORKER_ARGS=()
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
  # shellcheck disable=SC1090
  if [ "${args[i]}" = --env ]; then source "${args[i + 1]:?--env needs a file}"; fi
done
while [ $# -gt 0 ]; do
  case $1 in
    --hosts) HOSTS_FILE=$2; shift ;;
    --port) PORT=$2; shift ;;
    --metrics-port) METRICS_PORT=$2; shift ;;
    --model) MODEL=$2; shift ;;
    --device) DEVICE=$2; shift ;;
    --threads) THREADS=$2; shift ;;
    --bin-dir) BIN_DIR=$2; shift ;;
    --copy-binaries) COPY_BINARIES=1 ;;
    --remote-dir) REMOTE_DIR=$2; shift ;;
    --run-dir) RUN_DIR=$2; shift ;;
    --ssh-opt) SSH_OPTS+=("$2"); shift ;;
    --env) shift ;;
    --timeout) TIMEOUT=$2; shift ;;
    --grace) GRACE=$2; shift ;;
    --coordinator-arg) COORDINATOR_ARGS+=("$2"); shift ;;
    --worker-arg) WORKER_ARGS+=("$2"); shift ;;
    -h | --help) usage; exit 0 ;;
    *) usage >&2; die "unknown argument '$1'" ;;
  esac
  shift
done
[ -n "$HOSTS_FILE" ] && [ -f "$HOSTS_FILE" ] || die "--hosts FILE is required"
METRICS_PORT=${METRICS_PORT:-$((PORT + 1))}
MODEL=${MODEL:-'~/.cache/asynctls/SmolLM2-135M-Instruct.Q4_1.gguf'}
if [ -z "$BIN_DIR" ] && [ -d build ]; then BIN_DIR=build; fi
COORDINATOR_BIN=$(find_binary asynctls-coordinator coordinator/server)
WORKER_BIN=$(find_binary asynctls-worker worker)
RUN_DIR=${RUN_DIR:-runs/multinode-$(date +%Y%m%d-%H%M%S)-$$}
mkdir -p "$RUN_DIR"
RUN_DIR=$(cd "$RUN_DIR" && pwd)

# Parse the hosts file.
HOSTS=() ADDRS=() DEVICES=() THREADS_OF=()
while read -r host rest || [ -n "${host:-}" ]; do
  [ -z "${host:-}" ] || [ "${host:0:1}" = "#" ] && continue
  addr=${host#*@} device=$DEVICE threads=$THREADS
  for kv in $rest; do
    case $kv in
      addr=*) addr=${kv#addr=} ;;
      device=*) device=${kv#device=} ;;
      threads=*) threads=${kv#threads=} ;;
      *) die "$HOSTS_FILE: unknown setting '$kv' for $host" ;;
    esac
  done
  HOSTS+=("$host") ADDRS+=("$addr") DEVICES+=("$device") THREADS_OF+=("$threads")
done <"$HOSTS_FILE"
[ ${#HOSTS[@]} -ge 2 ] || die "$HOSTS_FILE: need a coordinator line and at least one worker line"
NUM_WORKERS=$((${#HOSTS[@]} - 1))
COORDINATOR_HOST=${HOSTS[0]}
COORDINATOR_ADDR=${ADDRS[0]}

remote() { ssh "${SSH_OPTS[@]}" "$1" "$2"; }

# Prepare every host (once per distinct host): the remote folder and, if asked, the binaries.
declare -A PREPARED=()
for host in "${HOSTS[@]}"; do
  [ -n "${PREPARED[$host]:-}" ] && continue
  PREPARED[$host]=1
  remote "$host" "mkdir -p $(printf '%q' "$REMOTE_DIR")/bin" </dev/null ||
    die "ssh $host failed (passwordless ssh needed)"
  if [ "$COPY_BINARIES" = 1 ]; then
    scp -q "${SSH_OPTS[@]}" "$COORDINATOR_BIN" "$WORKER_BIN" "$host:$REMOTE_DIR/bin/" ||
      die "scp to $host failed"
  fi
done
if [ "$COPY_BINARIES" = 1 ]; then
  COORDINATOR_BIN=$REMOTE_DIR/bin/asynctls-coordinator
  WORKER_BIN=$REMOTE_DIR/bin/asynctls-worker
fi

declare -A NAME_OF=() HOST_OF=()  # local ssh pid -> process name / host
SSH_PIDS=() WORKER_SSH_PIDS=() COORDINATOR_SSH_PID=""
STOPPING=0

# launch NAME HOST CMD...: runs CMD on HOST through ssh, its pid recorded remotely in
# REMOTE_DIR/NAME.pid, its output in RUN_DIR/NAME.log; sets LAST_PID to the local ssh pid.
launch() {
  local name=$1 host=$2
  shift 2
  local rd cmd
  rd=$(printf '%q' "$REMOTE_DIR")
  # `~/` in a path must reach the remote shell unquoted to expand there.
  cmd=$(shell_quote "$@" | sed "s|\\\\~/|~/|g")
  printf '%s: %s\n' "$host" "$cmd" >"$RUN_DIR/$name.log"
  ssh "${SSH_OPTS[@]}" "$host" "cd $rd && echo \$\$ > $name.pid && exec $cmd" \
    >>"$RUN_DIR/$name.log" 2>&1 </dev/null &
  LAST_PID=$!
  NAME_OF[$LAST_PID]=$name
  HOST_OF[$LAST_PID]=$host
  SSH_PIDS+=("$LAST_PID")
  log "started $name on $host (log $RUN_DIR/$name.log)"
}

# signal_remote SIG PIDS...: sends SIG to the remote processes behind these ssh sessions.
signal_remote() {
  local sig=$1 pid
  shift
  for pid in "$@"; do
    kill -0 "$pid" 2>/dev/null || continue
    remote "${HOST_OF[$pid]}" \
      "kill -$sig \$(cat $(printf '%q' "$REMOTE_DIR/${NAME_OF[$pid]}.pid") 2>/dev/null) 2>/dev/null" \
      </dev/null >/dev/null 2>&1 || true
  done
}
# stop_sessions PIDS...: SIGTERM remotely, wait for the ssh sessions to end (they end with the
# remote process), SIGKILL after GRACE seconds, and drop the ssh clients as a last resort.
stop_sessions() {
  local pid alive deadline=$((SECONDS + GRACE)) killed=0
  signal_remote TERM "$@"
  while :; do
    alive=()
    for pid in "$@"; do kill -0 "$pid" 2>/dev/null && alive+=("$pid"); done
    [ ${#alive[@]} -eq 0 ] && return 0
    if [ $SECONDS -ge $deadline ]; then
      if [ $killed = 0 ]; then
        log "SIGKILL for what ignored SIGTERM for ${GRACE}s: ${alive[*]/#/pid }"
        signal_remote KILL "${alive[@]}"
        killed=1
        deadline=$((SECONDS + 5))
      else
        kill -TERM "${alive[@]}" 2>/dev/null || true  # the local ssh clients
        return 0
      fi
    fi
    sleep 0.2
  done
}
shutdown() {
  [ "$STOPPING" = 1 ] && return
  STOPPING=1
  trap '' INT TERM
  log "stopping (logs in $RUN_DIR)"
  [ ${#WORKER_SSH_PIDS[@]} -gt 0 ] && stop_sessions "${WORKER_SSH_PIDS[@]}"
  [ -n "$COORDINATOR_SSH_PID" ] && stop_sessions "$COORDINATOR_SSH_PID"
  wait 2>/dev/null || true
  log "all processes stopped"
}
on_signal() {
  log "received $1"
  shutdown
  exit 0
}
trap 'on_signal SIGINT' INT
trap 'on_signal SIGTERM' TERM
trap 'shutdown' EXIT

# The coordinator's metrics as seen on its own host.
coordinator_metrics() {
  ssh "${SSH_OPTS[@]}" "$COORDINATOR_HOST" "bash -s 127.0.0.1 $METRICS_PORT" \
    <<<"$METRICS_GET" 2>/dev/null || true
}

launch coordinator "$COORDINATOR_HOST" "$COORDINATOR_BIN" --model "$MODEL" --host 0.0.0.0 \
  --port "$PORT" --metrics-port "$METRICS_PORT" "${COORDINATOR_ARGS[@]}"
COORDINATOR_SSH_PID=$LAST_PID
deadline=$((SECONDS + TIMEOUT))
until [ -n "$(coordinator_metrics)" ]; do
  kill -0 "$COORDINATOR_SSH_PID" 2>/dev/null || die "the coordinator exited (see $RUN_DIR/coordinator.log)"
  [ $SECONDS -lt $deadline ] || die "the coordinator did not come up in ${TIMEOUT}s"
  sleep 0.5
done

for ((w = 1; w <= NUM_WORKERS; w++)); do
  name=worker-$((w - 1))
  extra=()
  [ -n "${THREADS_OF[w]}" ] && extra=(--threads "${THREADS_OF[w]}")
  launch "$name" "${HOSTS[w]}" "$WORKER_BIN" --coordinator "$COORDINATOR_ADDR:$PORT" \
    --name "${ADDRS[w]}-$name" --model "$MODEL" --device "${DEVICES[w]}" "${extra[@]}" \
    "${WORKER_ARGS[@]}"
  WORKER_SSH_PIDS+=("$LAST_PID")
done

while :; do
  replicas=$(replicas_from_metrics "$(coordinator_metrics)")
  [ "$replicas" -ge "$NUM_WORKERS" ] && break
  for pid in "${SSH_PIDS[@]}"; do
    kill -0 "$pid" 2>/dev/null || die "${NAME_OF[$pid]} exited (see $RUN_DIR/${NAME_OF[$pid]}.log)"
  done
  [ $SECONDS -lt $deadline ] || die "only $replicas of $NUM_WORKERS workers registered in ${TIMEOUT}s"
  sleep 1
done
echo "$COORDINATOR_ADDR:$PORT" >"$RUN_DIR/endpoint"
log "ready: grpc $COORDINATOR_ADDR:$PORT, metrics on $COORDINATOR_HOST:$METRICS_PORT, $NUM_WORKERS worker(s)"
echo "READY $COORDINATOR_ADDR:$PORT"

while :; do
  set +e
  wait -n -p done_pid
  set -e
  [ -n "${done_pid:-}" ] || { sleep 1; continue; }
  [ "$done_pid" = "$COORDINATOR_SSH_PID" ] && die "the coordinator exited (see $RUN_DIR/coordinator.log)"
  log "${NAME_OF[$done_pid]:-pid $done_pid} exited (see its log); serving on the others"
  done_pid=""
done
