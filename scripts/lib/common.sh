# Sourced by scripts/*: the one way they install what they need, clean up after themselves,
# and configure the service for a benchmark.

# Sourced once: a second `source` would forget what is registered for clean-up.
[ -n "${ATLAS_COMMON_SH:-}" ] && return 0
ATLAS_COMMON_SH=1

# install_debian PACKAGE…: installs Debian packages (as root, with apt-get), or names them
# and fails.
install_debian() {
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "==> installing $* (Debian packages)" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
  else
    echo "$(basename "$0") needs: $* (apt-get install $*)" >&2
    exit 1
  fi
}

# need COMMAND [PACKAGE]: installs PACKAGE (default: COMMAND) when COMMAND is missing.
need() {
  command -v "$1" >/dev/null 2>&1 || install_debian "${2:-$1}"
}

# bench_secrets: fresh throwaway secrets for a benchmark run of the service built at $BIN,
# exported as the service reads them; master key `bench1` is active.
bench_secrets() {
  export ATLAS_STRIPE__CRYPTO__MASTER_KEYS="$("$BIN" keys generate --id bench1)"
  export ATLAS_STRIPE__CRYPTO__ACTIVE_KEY_ID=bench1
  export ATLAS_STRIPE__CRYPTO__FINGERPRINT_KEY="$(head -c 32 /dev/urandom | base64)"
  export ATLAS_STRIPE__AUTH__TENANT_TOKEN_SECRET="$(head -c 48 /dev/urandom | base64)"
  export ATLAS_STRIPE__DEV__GENERATE_SECRETS=false
  export ATLAS_STRIPE__LOG__FILTER="${ATLAS_STRIPE__LOG__FILTER:-warn}"
}

# wait_http URL: waits up to 10 s for URL to answer 2xx.
wait_http() {
  for _ in $(seq 1 100); do
    curl -fs -o /dev/null "$1" && return 0
    sleep 0.1
  done
  echo "$1 did not answer" >&2
  return 1
}

# free_port: a free TCP port on 127.0.0.1, below the kernel's ephemeral range: a port in
# that range can be the local end of some outgoing connection (a test's client, a pool's
# connection) and fail to bind although nobody listens on it (seen on a loaded machine).
free_port() {
  local port low=32768
  read -r low _ </proc/sys/net/ipv4/ip_local_port_range 2>/dev/null || true
  [ "$low" -gt 11000 ] || low=32768
  for _ in $(seq 1 50); do
    port=$((10000 + RANDOM % (low - 10000)))
    if ! (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
      echo "$port"
      return 0
    fi
  done
  return 1
}

# The one EXIT trap of every script (set when this file is sourced). On exit, however the
# script ends: every background job and every process given to `cleanup_pid` gets SIGTERM
# and is waited for, its exit status ignored (a server killed here ends with 143, and under
# `set -e` a failing `wait` in a trap would end the trap before the rest ran); then the
# functions given to `cleanup_call` run, the latest first (stopping a PostgreSQL cluster,
# say); then the paths given to `cleanup_dir` are removed. The script's exit status stays.
CLEANUP_PIDS=()
CLEANUP_CALLS=()
CLEANUP_DIRS=()

# cleanup_pid PID…: stops PID on exit (background jobs are stopped without this; it is for
# processes started otherwise).
cleanup_pid() { CLEANUP_PIDS+=("$@"); }

# cleanup_call FUNCTION: runs FUNCTION on exit, once however often it is given.
cleanup_call() {
  local f
  for f in "${CLEANUP_CALLS[@]}"; do [ "$f" = "$1" ] && return 0; done
  CLEANUP_CALLS+=("$1")
}

# cleanup_dir PATH…: removes PATH (a directory or a file) on exit.
cleanup_dir() { CLEANUP_DIRS+=("$@"); }

run_cleanup() {
  local status=$? pid i
  set +e
  trap - EXIT INT TERM
  for pid in $(jobs -p) "${CLEANUP_PIDS[@]}"; do kill "$pid" 2>/dev/null; done
  for pid in $(jobs -p) "${CLEANUP_PIDS[@]}"; do wait "$pid" 2>/dev/null; done
  for ((i = ${#CLEANUP_CALLS[@]} - 1; i >= 0; i--)); do "${CLEANUP_CALLS[i]}"; done
  [ "${#CLEANUP_DIRS[@]}" -eq 0 ] || rm -rf "${CLEANUP_DIRS[@]}"
  exit "$status"
}
trap run_cleanup EXIT
# Stopped by a signal: exit with the usual status, through the EXIT trap above.
trap 'exit 130' INT
trap 'exit 143' TERM
