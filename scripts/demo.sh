#!/usr/bin/env bash
# The demo end to end: a PostgreSQL (found or started), the sample data, two runs, the report,
# and what to do next (the database, the binary, the next commands).
#
# Every run starts over: the demo's own database (callrecon_demo on the server scripts/pg.sh
# finds or starts) is dropped and the demo job's folders (jobs/demo/: inbox, archive, reports)
# are removed first. With DATABASE_URL set, that database is used as it is and nothing is
# dropped: a second demo there finds its samples loaded and runs the job again.
set -euo pipefail
cd "$(dirname "$0")/.."
given_url="${DATABASE_URL:-}"
. scripts/pg.sh
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/callrecon-target}"
cargo build --quiet
bin="$(cd "$CARGO_TARGET_DIR" && pwd)/debug/callrecon"

if [ -z "$given_url" ]; then
  export DATABASE_URL="$CALLRECON_PG/callrecon_demo"
  psql=$(command -v psql || ls /usr/lib/postgresql/*/bin/psql 2>/dev/null | sort -V | tail -n 1 || true)
  if [ -n "$psql" ]; then
    "$psql" -q "$CALLRECON_PG/postgres" -c 'drop database if exists callrecon_demo with (force)'
  else
    echo "demo.sh: no psql to empty the demo database with; drop callrecon_demo by hand to start over" >&2
  fi
  rm -rf jobs/demo
fi
"$bin" demo "$@"
