# Sourced by scripts/*: the one way they install what they need, and the one way the
# benchmarks configure the service.

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

# free_port: a free TCP port on 127.0.0.1.
free_port() {
  local port
  for _ in $(seq 1 50); do
    port=$((20000 + RANDOM % 40000))
    if ! (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
      echo "$port"
      return 0
    fi
  done
  return 1
}
