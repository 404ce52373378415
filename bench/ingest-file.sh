#!/usr/bin/env bash
# Issue 25's operator case, for two binaries side by side: a customer feed of N sessionless
# events that match nothing, dropped as one NDJSON file (~230 bytes a line), then a run with
# nothing new while they are pending, then `report show` of the first run. Wall time and peak
# RSS of each step.
#
#   bench/ingest-file.sh BEFORE_BINARY AFTER_BINARY [N]
#
# FORMAT=json drops the same events as one JSON array (an element a line) instead of NDJSON.
# BEFORE_BINARY `none` measures the after binary alone (a binary that holds the backlog in
# memory would need ~10 KB an event: 40 GB for a 1 GB file).
# Each binary gets its own database (callrecon_ingest_before / _after) and job folder; the same
# file is generated once. Prints a markdown table.
#
# REPEATS=P (NDJSON): an overlapping export instead. The job first ingests a file of the feed's
# first P% events (setup), then the whole feed arrives as another file: P% of it repeats events
# the job holds (each event once: a binary that knows it stores only the rest). The table adds
# the events stored. Files are dated an hour back, so `[sources] settle` has nothing to wait for.
#
# MATCHING=1: a feed whose events match, the bench's first run as a file. On the database
# `bench/first-run.sh prepare 1` builds (5M calls over 30 days), `callrecon gen events` (of the
# after binary) makes N events over those 30 days, taken out of the queue as one NDJSON file;
# each binary then ingests it on a fresh copy of that database with an empty queue (the bench
# job with an inbox): wall time, events per second end to end, peak RSS, events matched; then
# the first-run floor (bench/first-run-floor.sql) of the after binary's run, with the events per
# second it stands for: no build can go faster than its floor.
set -euo pipefail
before=$1; [ "$before" = none ] || before=$(realpath "$1")
after=$(realpath "$2")
n=${3:-1000000}
base=${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres}
work=$(mktemp -d /tmp/callrecon-ingest.XXXXXX)

if [ "${MATCHING:-0}" = 1 ]; then
    cd "$(dirname "$0")/.."
    . bench/lib.sh
    tpl=callrecon_bench_first_${GEN_GROUPS}_1x
    exists=$(PSQL "$SERVER/postgres" -tAc "select count(*) from pg_database where datname = '$tpl'")
    [ "$exists" = 1 ] || { echo "MATCHING=1 needs bench/first-run.sh prepare 1" >&2; exit 1; }
    scratch=callrecon_ingest_feed
    PSQL "$SERVER/postgres" -c "drop database if exists $scratch" -c "create database $scratch template $tpl strategy file_copy"
    PSQL "$SERVER/$scratch" -c "delete from event_queue"
    "$after" --database-url "$SERVER/$scratch" gen events --calls 5000000 --days 30 --groups "$GEN_GROUPS" \
      --master-share "$MASTER_SHARE" --from 2026-10-01T00:00:00Z --to 2026-10-31T00:00:00Z --count "$n" >&2
    feed="$work/feed.ndjson"
    PSQL "$SERVER/$scratch" -tA -v FETCH_COUNT=20000 -c "select payload::text from event_queue order by id" > "$feed"
    PSQL "$SERVER/postgres" -c "drop database $scratch"
    echo "feed: $(du -h "$feed" | cut -f1), $(wc -l < "$feed") events that match calls" >&2
    echo "| binary · step | wall (s) | events/s | peak RSS (MiB) | matched |"
    echo "| --- | --- | --- | --- | --- |"
    for side in before after; do
        [ "$side" = before ] && [ "$before" = none ] && continue
        bin=$before; [ "$side" = after ] && bin=$after
        db=callrecon_ingest_$side
        PSQL "$SERVER/postgres" -c "drop database if exists $db" -c "create database $db template $tpl strategy file_copy"
        PSQL "$SERVER/$db" -c "delete from event_queue"
        "$bin" --database-url "$SERVER/$db" migrate > /dev/null
        PSQL "$SERVER/$db" -c "vacuum analyze event_queue" -c "checkpoint"
        mkdir -p "$work/$side/inbox"
        sed -e '0,/^name = .*/s//name = "bench"/' -e 's|^inbox = .*|inbox = "inbox"|' -e 's|^archive = .*|archive = "archive"|' \
            -e 's|^dir = .*|dir = "reports"|' jobs/demo.toml > "$work/$side/job.toml"
        cp "$feed" "$work/$side/inbox/feed.ndjson"
        touch -d '1 hour ago' "$work/$side/inbox/feed.ndjson"
        read -r wall rss < <(python3 bench/measure.py "$bin" --database-url "$SERVER/$db" run --job "$work/$side/job.toml" 2> "$work/$side.err") \
          || { cat "$work/$side.err" >&2; exit 1; }
        matched=$(PSQL "$SERVER/$db" -tAc "select count(*) from events where state = 'matched'")
        echo "| $side ($bin) · first run (ingest the file) | $wall | $(python3 -c "print(round($n / $wall))") | $rss | $matched |"
        if [ "$side" = after ]; then
            floor=$(first_run_floor "$SERVER/$db")
            echo "| its floor (bench/first-run-floor.sql on the after run) | $floor | $(python3 -c "print(round($n / $floor))") | | |"
        fi
        PSQL "$SERVER/postgres" -c "drop database $db"
    done
    rm -rf "$work"
    exit 0
fi

format=${FORMAT:-ndjson}
feed="$work/feed.$format"
python3 - "$n" "$format" > "$feed" <<'PY'
import sys
n, json_array = int(sys.argv[1]), sys.argv[2] == "json"
out = sys.stdout
if json_array:
    out.write("[\n")
for g in range(1, n + 1):
    s = g % 86400
    line = ('{"EventTime": "2026-11-02T%02d:%02d:%02dZ", "Metadata": {"customerPhone": "555%07d", '
            '"agentId": "a%d", "crmCaseId": "C-%d", "disposition": "callback", "note": "customer asked for a callback"}}'
            % (s // 3600, s % 3600 // 60, s % 60, g % 10000000, g % 500, g))
    out.write((",\n" if g > 1 else "") + line if json_array else line + "\n")
if json_array:
    out.write("\n]\n")
PY
echo "feed: $(du -h "$feed" | cut -f1), $n events, $format" >&2
repeats=${REPEATS:-}
if [ -n "$repeats" ]; then
    [ "$format" = ndjson ] || { echo "REPEATS needs FORMAT=ndjson" >&2; exit 2; }
    head -n $((n * repeats / 100)) "$feed" > "$work/held.ndjson"
fi
drop() { # file, name in the inbox: copied, dated an hour back (settled)
    cp "$1" "$work/$side/inbox/$2"
    touch -d '1 hour ago' "$work/$side/inbox/$2"
}

url() { echo "${base%/*}/$1"; }
measure() { # label, then the command: prints "| label | wall | rss |"
    local label=$1; shift
    /usr/bin/time -f "%e %M" -o "$work/time" "$@" > /dev/null 2> "$work/err" || { cat "$work/err" >&2; exit 1; }
    read -r wall kib < "$work/time"
    echo "| $label | $wall | $((kib / 1024)) |"
}

echo "| binary · step | wall (s) | peak RSS (MiB) |"
echo "| --- | --- | --- |"
for side in before after; do
    [ "$side" = before ] && [ "$before" = none ] && continue
    bin=$before; [ "$side" = after ] && bin=$after
    db=callrecon_ingest_$side
    psql -q "$base" -c "drop database if exists $db" -c "create database $db"
    "$bin" --database-url "$(url $db)" migrate > /dev/null
    mkdir -p "$work/$side/inbox"
    cat > "$work/$side/job.toml" <<'TOML'
name = "feed"
pending_for = "72h"

[sources]
inbox = "inbox"
archive = "archive"

[[rules]]
name = "phone-and-agent"
target = "call"
keys = [ { event = "customerPhone", call = "ani", normalize = "phone" },
         { event = "agentId", call = "agent_id" } ]
window = { before = "10m", after = "10m" }

[report]
dir = "reports"
TOML
    if [ -n "$repeats" ]; then
        drop "$work/held.ndjson" week-1.ndjson
        measure "$side · setup: ingest the first $repeats%" "$bin" --database-url "$(url $db)" run --job "$work/$side/job.toml"
        drop "$feed" week-2.ndjson
        measure "$side · the whole feed again ($repeats% repeats)" "$bin" --database-url "$(url $db)" run --job "$work/$side/job.toml"
        echo "| $side · events stored | $(psql -tA "$(url $db)" -c 'select count(*) from callrecon.events') | |"
        continue
    fi
    drop "$feed" "feed.$format"
    measure "$side · first run (ingest the file)" "$bin" --database-url "$(url $db)" run --job "$work/$side/job.toml"
    measure "$side · next run (nothing new)" "$bin" --database-url "$(url $db)" run --job "$work/$side/job.toml"
    measure "$side · report show 2 --format text" "$bin" --database-url "$(url $db)" report show 2 --format text
    echo "| $side · report files of run 2 | $(du -sh "$work/$side/reports/2" | cut -f1) | |"
done
rm -rf "$work"
