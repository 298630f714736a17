# Sourced by scripts/test: a local AWS KMS for the tests (moto's server mode, pinned),
# installed into a virtual environment under target/ when missing, started on a free
# 127.0.0.1 port and stopped on exit. Exports ATLAS_TEST_KMS_ENDPOINT and dummy AWS
# credentials (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION=us-east-1).
#
# start_local_kms registers stop_local_kms with scripts/lib/common.sh's clean-up on exit.

source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

MOTO_VERSION="${MOTO_VERSION:-5.2.5}"
KMS_VENV="${KMS_VENV:-$PWD/target/kms-venv}"


install_moto() {
  if [ -x "$KMS_VENV/bin/moto_server" ] &&
    [ "$("$KMS_VENV/bin/python" -c 'import moto; print(moto.__version__)' 2>/dev/null)" = "$MOTO_VERSION" ]; then
    return 0
  fi
  need python3
  if ! python3 -c 'import venv, ensurepip' 2>/dev/null; then
    install_debian python3-venv
  fi
  echo "==> installing moto[server]==$MOTO_VERSION into $KMS_VENV (a local KMS for the tests)" >&2
  rm -rf "$KMS_VENV"
  python3 -m venv "$KMS_VENV"
  "$KMS_VENV/bin/pip" install -q --disable-pip-version-check "moto[server]==$MOTO_VERSION"
}

start_local_kms() {
  install_moto
  KMS_PORT=$(free_port)
  KMS_LOG=$(mktemp "${TMPDIR:-/tmp}/atlas-stripe-kms.XXXXXX.log")
  "$KMS_VENV/bin/moto_server" -H 127.0.0.1 -p "$KMS_PORT" >"$KMS_LOG" 2>&1 &
  KMS_PID=$!
  cleanup_call stop_local_kms
  for _ in $(seq 1 100); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$KMS_PORT") 2>/dev/null; then
      break
    fi
    if ! kill -0 "$KMS_PID" 2>/dev/null; then
      echo "moto_server exited:" >&2
      cat "$KMS_LOG" >&2
      return 1
    fi
    sleep 0.1
  done
  echo "==> local KMS (moto $MOTO_VERSION) on 127.0.0.1:$KMS_PORT" >&2
  export ATLAS_TEST_KMS_ENDPOINT="http://127.0.0.1:$KMS_PORT"
  # Dummy credentials: moto accepts any; the SDK's chain finds these first.
  export AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=atlas-stripe-test-secret-not-a-credential
  export AWS_REGION=us-east-1
  export AWS_EC2_METADATA_DISABLED=true
}

stop_local_kms() {
  if [ -n "${KMS_PID:-}" ]; then
    kill "$KMS_PID" 2>/dev/null || true
    wait "$KMS_PID" 2>/dev/null || true
    KMS_PID=
  fi
  [ -n "${KMS_LOG:-}" ] && rm -f "$KMS_LOG"
}
