#!/usr/bin/env bash
# Load test of the intake API on loopback: starts `callrecon serve` against a fresh database
# (durable settings: whatever the server has; printed), creates an API user, and runs the load
# generator (examples/serve_load.rs) at 1, 16 and 64 concurrent clients. Writes
# bench/RESULTS-serve.md.
#
#   scripts/bench-serve.sh [--release] [--events N] [--clients 1,16,64] [--writers N]
#   scripts/bench-serve.sh --token-flood 32 [--release] [--events N] [--compare OLD_BINARY]
#
# --token-flood T measures a genuine client's POST /token while T tasks flood it with wrong
# secrets (examples/serve_load.rs says which floods), N genuine requests each (default 150), and
# replaces the section "/token under a flood of wrong secrets, PROFILE build" of
# bench/RESULTS-serve.md;
# --compare runs the same against OLD_BINARY first (the previous version, side by side).
#
# Uses the PostgreSQL of scripts/pg.sh; the database is $BENCH_DATABASE_URL or
# $CALLRECON_PG/callrecon_bench (dropped and created anew).
set -euo pipefail
cd "$(dirname "$0")/.."

profile=dev events="" clients=1,16,64 writers=2 flood="" compare=""
while [ $# -gt 0 ]; do
  case "$1" in
    --release) profile=release ;;
    --token-flood) flood="$2"; shift ;;
    --compare) compare="$2"; shift ;;
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
start_server() { # $1: the binary
  "$1" --database-url "$db" serve --listen 127.0.0.1:0 --writers "$writers" >"$work/out" 2>"$work/server.log" &
  server_pid=$!
  read -r line <"$work/out"
  url="${line##* }"
  echo "bench-serve.sh: $1 serving at $url ($profile build, $writers writers)" >&2
}
stop_server() {
  kill -TERM "$server_pid"; wait "$server_pid"; server_pid=""
}
commit=$(git rev-parse --short HEAD)$(git diff --quiet HEAD -- src Cargo.toml Cargo.lock examples || echo "+changes")
cpu=$(sed -n 's/^model name\s*: //p' /proc/cpuinfo | head -n 1)
mem=$(free -g | awk '/^Mem:/ {print $2 " GiB"}')

if [ -n "$flood" ]; then
  events="${events:-150}"
  load_before=$(cut -d' ' -f1-3 /proc/loadavg)
  tables=""
  for b in $compare "$bin"; do
    start_server "$b"
    table=$("$work/serve_load" --url "$url" --client-id "$client_id" --client-secret "$client_secret" \
      --database-url "$db" --token-flood "$flood" --events "$events")
    stop_server
    name=$([ "$b" = "$bin" ] && echo "this commit ($commit)" || echo "the previous binary ($(basename "$b"))")
    tables+=$'\n'"### $name"$'\n\n'"$table"$'\n'
    echo "$table"
  done
  section="## /token under a flood of wrong secrets, $profile build (\`scripts/bench-serve.sh --token-flood $flood\`)

- date: $(date -u +"%Y-%m-%d %H:%M UTC")
- commit: $commit
- machine: $(nproc) cores ($cpu), $mem; load generator, server and PostgreSQL on the same machine
- load average when the run started: $load_before
- build: $profile profile; \`callrecon serve\` with its defaults
- a genuine client (127.0.0.1, which has had a token from there before) asks for a token $events times
  in a row while $flood tasks send wrong secrets as fast as they are answered; \`genuine not 200\`
  counts its requests that were refused
$tables"
  python3 - "$section" "$profile" <<'PY'
import re, sys
path = "bench/RESULTS-serve.md"
text = open(path).read()
section = sys.argv[1].rstrip() + "\n"
pattern = re.compile(r"^## /token under a flood of wrong secrets, " + sys.argv[2] + r" build.*?(?=^## |\Z)", re.S | re.M)
text = pattern.sub(lambda m: section + "\n", text) if pattern.search(text) else text.rstrip() + "\n\n" + section
open(path, "w").write(text)
PY
  echo "bench-serve.sh: wrote the flood section of bench/RESULTS-serve.md" >&2
  exit 0
fi
events="${events:-20000}"
start_server "$bin"

load_before=$(cut -d' ' -f1-3 /proc/loadavg)
table=$("$work/serve_load" --url "$url" --client-id "$client_id" --client-secret "$client_secret" \
  --database-url "$db" --clients "$clients" --events "$events")
echo "$table"

stop_server

mkdir -p bench
flood_section=$(python3 -c 'import re,sys; t=open("bench/RESULTS-serve.md").read() if __import__("os").path.exists("bench/RESULTS-serve.md") else ""; print("\n\n".join(m.group(0).rstrip() for m in re.finditer(r"^## /token under a flood of wrong secrets.*?(?=^## |\Z)", t, re.S | re.M)))')
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
# The flood sections are kept (they are written by --token-flood).
if [ -n "$flood_section" ]; then printf '\n%s\n' "$flood_section" >>bench/RESULTS-serve.md; fi
