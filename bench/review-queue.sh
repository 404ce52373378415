#!/usr/bin/env bash
# The review desk's queue page (issue 20) with a backlog of 200 and of 200,000 pending events:
# a page must cost the same whatever the backlog (keyset pages over a partial index).
#
#   bench/review-queue.sh [BINARY] [ROUNDS]
#
# For each size, a database of its own filled by SQL with that many pending events of one job
# (sessionless, CRM-like metadata, five reasons, received over the last two days); an analyst
# signs in with curl, then each page is fetched ROUNDS times (default 20) and the median wall
# time printed: the first page, a page three quarters deep (its keyset cursor), a reason filter,
# an event id search and a metadata text search (this one reads pending events until it has a
# page: it grows with the backlog). BINARY defaults to the debug build of $CARGO_TARGET_DIR.
set -euo pipefail
bin=$(realpath "${1:-${CARGO_TARGET_DIR:-target}/debug/callrecon}")
rounds=${2:-20}
base=${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres}
work=$(mktemp -d /tmp/callrecon-review.XXXXXX)
trap 'kill "${server:-0}" 2>/dev/null || true' EXIT

cat > "$work/job.toml" <<'EOF'
name = "queue"
pending_for = "72h"

[sources]
queue = true

[[rules]]
name = "phone-and-agent"
target = "call"
keys = [ { event = "customerPhone", call = "ani", normalize = "phone" },
         { event = "agentId", call = "agent_id" } ]
window = { before = "10m", after = "10m" }

[report]
dir = "reports"
EOF

median() { sort -n | awk '{a[NR]=$1} END {m=(NR%2)?a[(NR+1)/2]:(a[NR/2]+a[NR/2+1])/2; printf "%.1f", m*1000}'; }

echo "| backlog | first page | page 3/4 deep | reason filter | id search | metadata search (rare text) |"
echo "| --- | --- | --- | --- | --- | --- |"
for n in 200 200000; do
  db=callrecon_review_$n
  url="${base%/*}/$db"
  psql -X -q "$base" -c "drop database if exists $db" -c "create database $db"
  "$bin" --database-url "$url" migrate > /dev/null
  export PGOPTIONS="-c search_path=callrecon,public"
  psql -X -q -v ON_ERROR_STOP=1 "$url" <<SQL
insert into runs (job, kind, dry_run, status, job_file) values ('queue', 'run', false, 'succeeded', '$work/job.toml');
insert into events (job, source, event_time, received_at, metadata, ingested_run, state, reason)
select 'queue', 'queue:' || g, now() - interval '3 days' + g * interval '1 second' * (172800.0 / $n),
       now() - interval '2 days' + g * interval '1 second' * (172800.0 / $n),
       jsonb_build_object('customerPhone', '555' || lpad((g * 7919 % 10000000)::text, 7, '0'),
                          'agentId', 'a' || (g % 500), 'crmCaseId', 'C-' || g, 'notes', repeat('x', 120)),
       1, 'pending', (array['no_candidate', 'missing_key', 'ambiguous', 'unknown_session', 'no_candidate'])[g % 5 + 1]
from generate_series(1, $n) g;
vacuum analyze events;
SQL
  deep=$(psql -X -tA "$url" -c "select (extract(epoch from received_at) * 1000000)::bigint || '.' || id from events order by received_at, id offset $((n * 3 / 4)) limit 1")
  some_id=$(psql -X -tA "$url" -c "select id from events order by id offset $((n / 2)) limit 1")
  unset PGOPTIONS
  secret=$("$bin" --database-url "$url" users add ana --role Analyst | awk '/client_secret/ {print $2}')
  "$bin" --database-url "$url" serve --listen 127.0.0.1:0 --job "$work/job.toml" > "$work/serve.out" 2> "$work/serve.err" &
  server=$!
  for _ in $(seq 100); do grep -q listening "$work/serve.out" && break; sleep 0.1; done
  addr=$(grep -o 'http://[0-9.:]*' "$work/serve.out")
  jar="$work/cookies.$n"
  csrf=$(curl -s -c "$jar" "$addr/review/login" | grep -o 'name="csrf" value="[^"]*"' | head -1 | sed 's/.*value="//; s/"$//')
  curl -s -b "$jar" -c "$jar" -o /dev/null -d "name=ana" --data-urlencode "secret=$secret" -d "csrf=$csrf" "$addr/review/login"
  time_page() {
    for _ in $(seq "$rounds"); do curl -s -b "$jar" -o /dev/null -w '%{time_total}\n' "$addr$1"; done | median
  }
  first=$(time_page "/review")
  deep_t=$(time_page "/review?after=$deep")
  reason=$(time_page "/review?reason=ambiguous")
  id=$(time_page "/review?q=$some_id")
  text=$(time_page "/review?q=C-$((n / 2))x")
  echo "| $n | $first ms | $deep_t ms | $reason ms | $id ms | $text ms |"
  kill "$server"; wait "$server" 2>/dev/null || true
  [ -n "${KEEP:-}" ] || psql -X -q "$base" -c "drop database $db"
done
