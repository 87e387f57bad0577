#!/usr/bin/env bash
# Starts an asynctls coordinator and N workers on this machine, each a separate process with
# its own log under a run folder, waits until every worker has registered, then stays in the
# foreground. Ctrl-C or SIGTERM stops the workers, then the coordinator (SIGTERM, SIGKILL
# after --grace seconds) and exits once every child is gone.
#
#   deploy/local.sh --workers 2 --port 50051 --metrics-port 9464 --model model.gguf --device cpu
#
# Readiness is read from the coordinator's Prometheus endpoint (asynctls_replicas), so the
# metrics port is always on (default: gRPC port + 1). A worker that dies is logged and not
# restarted (the coordinator keeps serving on the others); the coordinator dying ends the run.
# Settings can also come from an env file (deploy/configs/*.env.example) given with --env.
set -euo pipefail
export DEPLOY_NAME=local
source "$(dirname "$0")/common.sh"
pick_blas_kernels  # CPU workers' GEMMs (common.sh)

usage() {
  cat <<'EOF'
usage: deploy/local.sh [flags]
  --workers N         worker processes (default 1)
  --port P            coordinator gRPC port (default 50051)
  --metrics-port M    coordinator Prometheus port (default P+1)
  --host H            coordinator bind address (default 127.0.0.1)
  --model PATH        GGUF file or safetensors folder (default: SmolLM2-135M-Instruct, fetched
                      once into ~/.cache/asynctls by the binaries)
  --device D          workers' device: cpu, cuda, auto; cuda:each gives worker i cuda:i
                      (default auto)
  --threads T         CPU threads per worker (default: cores / workers)
  --bin-dir DIR       build tree or folder with asynctls-coordinator and asynctls-worker
                      (default: ./build if present, else PATH)
  --run-dir DIR       logs and pid files (default: runs/local-<date>-<pid>)
  --env FILE          source settings from an env file first (flags override it)
  --timeout S         seconds to wait for readiness (default 600)
  --grace S           seconds between SIGTERM and SIGKILL at shutdown (default 10)
  --coordinator-arg A extra argument for the coordinator (repeatable)
  --worker-arg A      extra argument for every worker (repeatable)
EOF
}

# Defaults (an --env file may set these; flags override).
WORKERS=1 PORT=50051 METRICS_PORT="" HOST=127.0.0.1 MODEL="" DEVICE=auto THREADS=""
BIN_DIR="" RUN_DIR="" TIMEOUT=600 GRACE=10
COORDINATOR_ARGS=() WORKER_ARGS=()
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
  if [ "${args[i]}" = --env ]; then
    # shellcheck disable=SC1090
    source "${args[i + 1]:?--env needs a file}"
  fi
done
while [ $# -gt 0 ]; do
  case $1 in
    --workers) WORKERS=$2; shift ;;
    --port) PORT=$2; shift ;;
    --metrics-port) METRICS_PORT=$2; shift ;;
    --host) HOST=$2; shift ;;
    --model) MODEL=$2; shift ;;
    --device) DEVICE=$2; shift ;;
    --threads) THREADS=$2; shift ;;
    --bin-dir) BIN_DIR=$2; shift ;;
    --run-dir) RUN_DIR=$2; shift ;;
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
[[ $WORKERS =~ ^[0-9]+$ ]] && [ "$WORKERS" -ge 1 ] || die "--workers must be >= 1"
[[ $PORT =~ ^[0-9]+$ ]] || die "--port must be a number"
METRICS_PORT=${METRICS_PORT:-$((PORT + 1))}
if [ -z "$BIN_DIR" ] && [ -d build ]; then BIN_DIR=build; fi
COORDINATOR_BIN=$(find_binary asynctls-coordinator coordinator/server)
WORKER_BIN=$(find_binary asynctls-worker worker)
if [ -z "$THREADS" ]; then
  THREADS=$(($(nproc) / WORKERS))
  [ "$THREADS" -ge 1 ] || THREADS=1
fi
if [ -z "$MODEL" ]; then
  MODEL=${ASYNCTLS_MODEL_PATH:-$HOME/.cache/asynctls/SmolLM2-135M-Instruct.Q4_1.gguf}
fi
[ -e "$MODEL" ] || die "model '$MODEL' not found (give --model, or run 'asynctls fetch-model')"
RUN_DIR=${RUN_DIR:-runs/local-$(date +%Y%m%d-%H%M%S)-$$}
mkdir -p "$RUN_DIR"
RUN_DIR=$(cd "$RUN_DIR" && pwd)

declare -A NAME_OF=()  # pid -> process name
COORDINATOR_PID=""
WORKER_PIDS=()
STOPPING=0

# Stops every child still running: workers first (so none is left dialling a coordinator that
# is gone), then the coordinator; each gets SIGTERM, then SIGKILL after GRACE seconds.
stop_pids() {
  local pid alive deadline=$((SECONDS + GRACE))
  for pid in "$@"; do kill -TERM "$pid" 2>/dev/null || true; done
  while :; do
    alive=()
    for pid in "$@"; do kill -0 "$pid" 2>/dev/null && alive+=("$pid"); done
    [ ${#alive[@]} -eq 0 ] && return 0
    if [ $SECONDS -ge $deadline ]; then
      for pid in "${alive[@]}"; do
        log "${NAME_OF[$pid]} (pid $pid) ignored SIGTERM for ${GRACE}s: SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
      done
      deadline=$((SECONDS + 5))
    fi
    sleep 0.1
  done
}
shutdown() {
  [ "$STOPPING" = 1 ] && return
  STOPPING=1
  trap '' INT TERM
  log "stopping (logs in $RUN_DIR)"
  stop_pids "${WORKER_PIDS[@]}"
  [ -n "$COORDINATOR_PID" ] && stop_pids "$COORDINATOR_PID"
  wait 2>/dev/null || true
  rm -f "$RUN_DIR"/*.pid
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

# start NAME LOG CMD...: runs CMD in the background with its output in LOG.
start() {
  local name=$1 logfile=$2
  shift 2
  printf '%s\n' "$(shell_quote "$@")" >"$logfile"
  "$@" >>"$logfile" 2>&1 </dev/null &
  local pid=$!
  NAME_OF[$pid]=$name
  echo "$pid" >"$RUN_DIR/$name.pid"
  log "started $name (pid $pid, log $logfile)"
  LAST_PID=$pid
}

start coordinator "$RUN_DIR/coordinator.log" "$COORDINATOR_BIN" --model "$MODEL" --host "$HOST" \
  --port "$PORT" --metrics-port "$METRICS_PORT" "${COORDINATOR_ARGS[@]}"
COORDINATOR_PID=$LAST_PID

# The coordinator is up when its metrics endpoint answers.
deadline=$((SECONDS + TIMEOUT))
until [ -n "$(metrics_local "$HOST" "$METRICS_PORT")" ]; do
  kill -0 "$COORDINATOR_PID" 2>/dev/null || die "the coordinator exited (see $RUN_DIR/coordinator.log)"
  [ $SECONDS -lt $deadline ] || die "the coordinator did not come up in ${TIMEOUT}s"
  sleep 0.2
done
dial_host=$HOST
[ "$dial_host" = 0.0.0.0 ] && dial_host=127.0.0.1

for ((w = 0; w < WORKERS; w++)); do
  device=$DEVICE
  [ "$DEVICE" = cuda:each ] && device=cuda:$w
  start "worker-$w" "$RUN_DIR/worker-$w.log" "$WORKER_BIN" --coordinator "$dial_host:$PORT" \
    --name "worker-$w" --model "$MODEL" --device "$device" --threads "$THREADS" \
    "${WORKER_ARGS[@]}"
  WORKER_PIDS+=("$LAST_PID")
done

# Ready when every worker is a replica of the coordinator.
while :; do
  replicas=$(replicas_from_metrics "$(metrics_local "$HOST" "$METRICS_PORT")")
  [ "$replicas" -ge "$WORKERS" ] && break
  kill -0 "$COORDINATOR_PID" 2>/dev/null || die "the coordinator exited (see $RUN_DIR/coordinator.log)"
  for pid in "${WORKER_PIDS[@]}"; do
    kill -0 "$pid" 2>/dev/null || die "${NAME_OF[$pid]} exited (see $RUN_DIR/${NAME_OF[$pid]}.log)"
  done
  [ $SECONDS -lt $deadline ] || die "only $replicas of $WORKERS workers registered in ${TIMEOUT}s"
  sleep 0.5
done
echo "$dial_host:$PORT" >"$RUN_DIR/endpoint"
log "ready: grpc $dial_host:$PORT, metrics http://$dial_host:$METRICS_PORT/metrics, $WORKERS worker(s)"
echo "READY $dial_host:$PORT"

# Serve until a signal; report children that die on their own.
while :; do
  set +e
  wait -n -p done_pid
  set -e
  [ -n "${done_pid:-}" ] || { sleep 1; continue; }
  if [ "$done_pid" = "$COORDINATOR_PID" ]; then
    die "the coordinator exited (see $RUN_DIR/coordinator.log)"
  fi
  log "${NAME_OF[$done_pid]:-pid $done_pid} exited (see $RUN_DIR/${NAME_OF[$done_pid]:-}.log);" \
    "serving on the others"
  rm -f "$RUN_DIR/${NAME_OF[$done_pid]:-none}.pid"
  done_pid=""
done
