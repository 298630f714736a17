# Sourced by scripts/test and the benchmarks: starts a throwaway PostgreSQL cluster from the
# initdb/pg_ctl on the PATH (or Debian's /usr/lib/postgresql/*/bin), as `nobody` when run
# as root (initdb refuses root), installing Debian's postgresql package when missing.
# Sets PGPORT, PGTMP, ATLAS_TEST_POSTGRES_URL, ATLAS_TEST_POSTGRES_DATA_DIR; stops and
# removes the cluster on exit (scripts/lib/common.sh's clean-up, after the script's own
# processes have stopped). Extra server settings: PG_EXTRA_OPTS.

source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

find_initdb() {
  command -v initdb 2>/dev/null && return 0
  ls /usr/lib/postgresql/*/bin/initdb 2>/dev/null | sort -V | tail -n 1
}


start_throwaway_postgres() {
  local initdb
  initdb=$(find_initdb || true)
  if [ -z "$initdb" ]; then
    install_debian postgresql
    initdb=$(find_initdb)
  fi
  PGBIN=$(dirname "$initdb")
  export ATLAS_TEST_PGBIN="$PGBIN"
  PGTMP=$(mktemp -d "${TMPDIR:-/tmp}/atlas-stripe-pg.XXXXXX")
  cleanup_call stop_throwaway_postgres
  AS_PG=()
  if [ "$(id -u)" = 0 ]; then
    chown nobody "$PGTMP"
    AS_PG=(setpriv --reuid=nobody --regid="$(id -g nobody)" --clear-groups --)
  fi
  "${AS_PG[@]}" "$PGBIN/initdb" -D "$PGTMP/data" -U postgres --auth=trust -E UTF8 --no-sync >"$PGTMP/initdb.log"
  # The free port can be taken by another process before the server binds it (seen once
  # on a loaded machine): a start that fails shows the server's log and tries another port.
  local attempt
  for attempt in 1 2 3; do
    PGPORT=$(free_port)
    echo "==> starting a throwaway PostgreSQL on 127.0.0.1:$PGPORT ($PGBIN)" >&2
    if "${AS_PG[@]}" "$PGBIN/pg_ctl" -D "$PGTMP/data" -l "$PGTMP/server.log" -w -t 60 \
      -o "-p $PGPORT -k $PGTMP -h 127.0.0.1 -c max_connections=400 ${PG_EXTRA_OPTS:-}" \
      start >/dev/null; then
      break
    fi
    echo "==> PostgreSQL did not start (attempt $attempt); its log:" >&2
    tail -n 20 "$PGTMP/server.log" >&2 || true
    [ "$attempt" -lt 3 ] || return 1
  done
  export PGPORT PGTMP
  export ATLAS_TEST_POSTGRES_URL="postgres://postgres@127.0.0.1:$PGPORT/postgres"
  export ATLAS_TEST_POSTGRES_DATA_DIR="$PGTMP/data"
}

# stop_throwaway_postgres: stops the cluster and removes its directory; does nothing when
# there is none (it runs on exit too).
stop_throwaway_postgres() {
  [ -n "${PGTMP:-}" ] || return 0
  "${AS_PG[@]}" "$PGBIN/pg_ctl" -D "$PGTMP/data" -m immediate stop >/dev/null 2>&1 || true
  rm -rf "$PGTMP"
  PGTMP=
}
