#!/usr/bin/env bash
# Makes sure a PostgreSQL is reachable and exports CALLRECON_PG (the server's URL, without a
# database). Source it: `. scripts/pg.sh`; the demo then uses $CALLRECON_PG/callrecon and the
# tests $CALLRECON_PG/postgres (sqlx's test harness creates one database per test from there).
#
# 1. DATABASE_URL already set: used as it is.
# 2. A server on 127.0.0.1:5432 (trust auth, as on the developers' machines): used.
# 3. Otherwise a disposable local cluster is started from the system's PostgreSQL binaries
#    (installing Debian's `postgresql` package if they are absent) under
#    ${CALLRECON_PG_DIR:-/tmp/callrecon-pg}, listening on 127.0.0.1:${CALLRECON_PG_PORT:-54329}.
#    Stop it with `scripts/pg.sh stop`. CALLRECON_PG_DISPOSABLE=1 skips steps 1 and 2.

_callrecon_pg() {
  local dir="${CALLRECON_PG_DIR:-/tmp/callrecon-pg}" port="${CALLRECON_PG_PORT:-54329}"
  if [ "${1:-}" = stop ]; then
    local bin; bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
    [ -f "$dir/data/postmaster.pid" ] && _callrecon_as_pg "$bin/pg_ctl" -D "$dir/data" -m fast stop
    return 0
  fi
  if [ -z "${CALLRECON_PG_DISPOSABLE:-}" ] && [ -n "${DATABASE_URL:-}" ]; then
    echo "pg.sh: using DATABASE_URL=$DATABASE_URL" >&2
    return 0
  fi
  if [ -z "${CALLRECON_PG_DISPOSABLE:-}" ] && (exec 3<>/dev/tcp/127.0.0.1/5432) 2>/dev/null; then
    export CALLRECON_PG="postgres://postgres@127.0.0.1:5432"
    echo "pg.sh: PostgreSQL found on 127.0.0.1:5432" >&2
    return 0
  fi
  if ! (exec 3<>/dev/tcp/127.0.0.1/"$port") 2>/dev/null; then
    local bin; bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
    if [ -z "$bin" ]; then
      echo "pg.sh: no PostgreSQL binaries; installing Debian's postgresql package" >&2
      local sudo=""; [ "$(id -u)" -ne 0 ] && sudo=sudo
      $sudo apt-get update -qq >&2 && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq postgresql >&2 || return 1
      bin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)
    fi
    mkdir -p "$dir"
    [ "$(id -u)" -eq 0 ] && chown postgres: "$dir"
    if [ ! -f "$dir/data/PG_VERSION" ]; then
      _callrecon_as_pg "$bin/initdb" -D "$dir/data" -U postgres --auth=trust -E UTF8 >"$dir/initdb.log" 2>&1 \
        || { cat "$dir/initdb.log" >&2; return 1; }
    fi
    echo "pg.sh: starting a disposable PostgreSQL on 127.0.0.1:$port (data in $dir/data)" >&2
    _callrecon_as_pg "$bin/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w \
      -o "-p $port -k $dir -c listen_addresses=127.0.0.1 -c max_connections=200 -c fsync=off" start >&2 \
      || { cat "$dir/server.log" >&2; return 1; }
  fi
  export CALLRECON_PG="postgres://postgres@127.0.0.1:$port"
}

# initdb and the server refuse to run as root: run them as the postgres user then.
_callrecon_as_pg() {
  if [ "$(id -u)" -eq 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

_callrecon_pg "$@"
