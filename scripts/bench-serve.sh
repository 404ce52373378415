#!/usr/bin/env bash
# Load test of the intake API on loopback: starts `callrecon serve` against a fresh database
# (durable settings: whatever the server has; printed), creates an API user, and runs the load
# generator (examples/serve_load.rs) at 1, 16 and 64 concurrent clients. Writes
# bench/RESULTS-serve.md.
#
#   scripts/bench-serve.sh [--release] [--events N] [--clients 1,16,64] [--writers N]
#
# Uses the PostgreSQL of scripts/pg.sh; the database is $BENCH_DATABASE_URL or
# $CALLRECON_PG/callrecon_bench (dropped and created anew).
set -euo pipefail
cd "$(dirname "$0")/.."

profile=dev events=20000 clients=1,16,64 writers=2
while [ $# -gt 0 ]; do
  case "$1" in
    --release) profile=release ;;
    --events) events="$2"; shift ;;
    --clients) clients="$2"; shift ;;
    --writers) writers="$2"; shift ;;
    *) echo "bench-serve.sh: unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done

. scripts/pg.sh
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/callrecon-target}"
db="${BENCH_DATABASE_URL:-$CALLRECON_PG/callrecon_bench}"
work=$(mktemp -d)
server_pid=""
cleanup() {
  [ -n "$server_pid" ] && kill -TERM "$server_pid" 2>/dev/null && wait "$server_pid" 2>/dev/null
  rm -rf "$work"
}
trap cleanup EXIT

# Build, then copy the binaries at once: the target dir may be shared with other checkouts.
flags=(); [ "$profile" = release ] && flags=(--release)
cargo build "${flags[@]}" --bin callrecon --example serve_load --message-format=json-render-diagnostics \
  | python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable"):
        print(m["executable"])' \
  | while read -r exe; do cp "$exe" "$work/"; done
bin="$work/callrecon"

psql_url="${db%/*}/postgres"
dbname="${db##*/}"
psql "$psql_url" -qc "drop database if exists \"$dbname\"" >/dev/null
"$bin" --database-url "$db" migrate >/dev/null
settings=$(psql "$db" -Atc "select string_agg(name || '=' || setting, ', ' order by name) from pg_settings
  where name in ('fsync', 'synchronous_commit', 'wal_sync_method', 'full_page_writes')")
pg_version=$(psql "$db" -Atc "show server_version")

creds=$("$bin" --database-url "$db" users add bench --role AsyncMetaData)
client_id=$(sed -n 's/^client_id: *//p' <<<"$creds")
client_secret=$(sed -n 's/^client_secret: *//p' <<<"$creds")

mkfifo "$work/out"
"$bin" --database-url "$db" serve --listen 127.0.0.1:0 --writers "$writers" >"$work/out" 2>"$work/server.log" &
server_pid=$!
read -r line <"$work/out"
url="${line##* }"
echo "bench-serve.sh: server at $url ($profile build, $writers writers)" >&2

load_before=$(cut -d' ' -f1-3 /proc/loadavg)
table=$("$work/serve_load" --url "$url" --client-id "$client_id" --client-secret "$client_secret" \
  --database-url "$db" --clients "$clients" --events "$events")
echo "$table"

kill -TERM "$server_pid"; wait "$server_pid"; server_pid=""

commit=$(git rev-parse --short HEAD)$(git diff --quiet HEAD -- src Cargo.toml Cargo.lock examples || echo "+changes")
cpu=$(sed -n 's/^model name\s*: //p' /proc/cpuinfo | head -n 1)
mem=$(free -g | awk '/^Mem:/ {print $2 " GiB"}')
mkdir -p bench
cat >bench/RESULTS-serve.md <<EOF
# Intake API load test (\`scripts/bench-serve.sh\`)

- date: $(date -u +"%Y-%m-%d %H:%M UTC")
- commit: $commit
- machine: $(nproc) cores ($cpu), $mem; load generator, server and PostgreSQL on the same machine
- load average when the run started: $load_before (anything above 0 is other work sharing the 2 cores)
- build: $profile profile; \`callrecon serve --writers $writers\` (defaults otherwise)
- PostgreSQL $pg_version: $settings
- each event: one HTTP/1.1 POST (keep-alive) of a ~130-byte sessionless event with a bearer token;
  \`stored\` is the rows that appeared on \`event_queue\` (checked equal to the 200s)

$table
EOF
echo "bench-serve.sh: wrote bench/RESULTS-serve.md" >&2
