#!/usr/bin/env bash
# A run with nothing new and a backlog of N pending unmatched events (issue 25), for two
# binaries side by side: wall time, peak RSS and the report's file sizes.
#
#   bench/report-backlog.sh BEFORE_BINARY AFTER_BINARY [N] [ROUNDS]
#
# Each binary gets its own database (callrecon_backlog_before / _after: a newer binary's
# migrations would stop an older one), filled with the same N events by SQL: sessionless,
# metadata like a CRM feed's, reason no_candidate, received in the last hours so none expires.
# Runs alternate between the binaries, ROUNDS times (default 2). Prints a markdown table.
set -euo pipefail
before=$(realpath "$1")
after=$(realpath "$2")
n=${3:-1000000}
rounds=${4:-2}
base=${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres}
here=$(cd "$(dirname "$0")" && pwd)
work=$(mktemp -d /tmp/callrecon-backlog.XXXXXX)

cat > "$work/job.toml" <<'EOF'
name = "backlog"
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

url() { echo "${base%/*}/$1"; }

for side in before after; do
    db=callrecon_backlog_$side
    psql -q "$base" -c "drop database if exists $db" -c "create database $db"
    bin=$before; [ "$side" = after ] && bin=$after
    "$bin" --database-url "$(url $db)" migrate > /dev/null
    psql -q "$(url $db)" <<EOF
insert into events (job, source, session_id, event_time, received_at, metadata, ingested_run, state, reason, decided_run)
select 'backlog', 'inbox/feed.ndjson:' || g, null,
       timestamptz '2026-11-02T00:00:00Z' + g * interval '1 second',
       now() - interval '12 hours' + g * interval '10 milliseconds',
       jsonb_build_object('customerPhone', '555' || lpad((g % 10000000)::text, 7, '0'), 'agentId', 'a' || (g % 500),
                          'crmCaseId', 'C-' || g, 'disposition', 'callback', 'note', 'customer asked for a callback'),
       0, 'pending', 'no_candidate', 0
from generate_series(1, $n) g;
analyze events;
EOF
done

echo "| binary | round | wall (s) | peak RSS (MiB) | report.json | unmatched.csv | report.html |"
echo "| --- | --- | --- | --- | --- | --- | --- |"
for round in $(seq 1 "$rounds"); do
    for side in before after; do
        bin=$before; [ "$side" = after ] && bin=$after
        read -r secs mib < <("$here/measure.py" "$bin" --database-url "$(url callrecon_backlog_$side)" \
            run --job "$work/job.toml" 2> "$work/$side-$round.log")
        dir=$(psql -qtA "$(url callrecon_backlog_$side)" -c "select report_dir from runs order by id desc limit 1")
        size() { du -b "$dir/$1" | cut -f1 | numfmt --to=iec-i --suffix=B; }
        echo "| $side | $round | $secs | $mib | $(size report.json) | $(size unmatched.csv) | $(size report.html) |"
        rm -rf "$dir"
    done
done

# `report show` of the last report of each, text format (the report is re-made for it).
for side in before after; do
    bin=$before; [ "$side" = after ] && bin=$after
    u=$(url callrecon_backlog_$side)
    "$bin" --database-url "$u" run --job "$work/job.toml" > /dev/null 2>&1
    run=$(psql -qtA "$u" -c "select max(id) from runs")
    read -r secs mib < <("$here/measure.py" sh -c "'$bin' --database-url '$u' report show $run > /dev/null" 2>/dev/null)
    echo "report show --format text, $side: $secs s, $mib MiB"
done
rm -rf "$work"
