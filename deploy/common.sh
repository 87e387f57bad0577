# shellcheck shell=bash
# Shared by deploy/local.sh and deploy/multinode.sh (sourced, not run).

log() { printf '[%s %s] %s\n' "$(date +%H:%M:%S)" "${DEPLOY_NAME:-deploy}" "$*" >&2; }
die() {
  log "error: $*"
  exit 2
}

# find_binary NAME SUBDIR: $BIN_DIR/NAME, $BIN_DIR/SUBDIR/NAME (a build tree), then PATH.
find_binary() {
  local name=$1 subdir=$2 dir
  for dir in "${BIN_DIR:-}" "${BIN_DIR:+$BIN_DIR/$subdir}"; do
    if [ -n "$dir" ] && [ -x "$dir/$name" ]; then
      printf '%s\n' "$(cd "$dir" && pwd)/$name"
      return 0
    fi
  done
  command -v "$name" 2>/dev/null && return 0
  die "$name not found (give --bin-dir: a build tree or a folder holding the binaries)"
}

# A bash script printing the body of GET /metrics from HOST PORT ($1 $2) over /dev/tcp (no
# curl needed); empty on failure. Self-contained, so it also runs remotely: ssh H bash -s H P.
# shellcheck disable=SC2016,SC2034
METRICS_GET='exec 3<>"/dev/tcp/$1/$2" 2>/dev/null || exit 1
printf "GET /metrics HTTP/1.0\r\nHost: %s\r\n\r\n" "$1" >&3
sed "1,/^\r\{0,1\}$/d" <&3'
# metrics_local HOST PORT
metrics_local() { bash -c "$METRICS_GET" _ "$1" "$2" 2>/dev/null || true; }

# replicas_from_metrics TEXT: the value of asynctls_replicas, or -1.
replicas_from_metrics() {
  local v
  v=$(printf '%s\n' "$1" | sed -n 's/^asynctls_replicas \([0-9][0-9]*\).*/\1/p' | head -n1)
  printf '%s\n' "${v:--1}"
}

# shell_quote ARGS...: the arguments as one string a remote shell reads back as the same words.
shell_quote() {
  local out="" a
  for a in "$@"; do out+=" $(printf '%q' "$a")"; done
  printf '%s\n' "${out# }"
}

# OpenBLAS picks its GEMM kernels from the CPU model and falls back to SSE3 ones on models it
# does not know (a virtualized Xeon with AVX-512: the CPU backend then warns). Unless the caller
# chose, export OPENBLAS_CORETYPE from the CPU's flags (quickstart prefill here: 19 -> 14 s).
pick_blas_kernels() {
  [ -z "${OPENBLAS_CORETYPE:-}" ] && [ -r /proc/cpuinfo ] || return 0
  local flags
  flags=" $(grep -m1 '^flags' /proc/cpuinfo | cut -d: -f2) "
  cpu_has() {
    local f
    for f; do [[ $flags == *" $f "* ]] || return 1; done
  }
  if cpu_has avx512f avx512dq avx512bw avx512vl; then
    export OPENBLAS_CORETYPE=SkylakeX
  elif cpu_has avx2 fma; then
    export OPENBLAS_CORETYPE=Haswell
  fi
  return 0
}
