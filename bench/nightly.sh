#!/usr/bin/env bash
# Times the nightly alone, on fresh copies of one prepared database, with the time of each
# stage. For work on the nightly: `bench/run.sh full` takes half an hour per measurement.
#
#   bench/nightly.sh prepare   # once (~6 min): 5M calls over 30 days, the first run over 600k
#                              # events, vacuum analyze, then one day's 50k events queued
#   bench/nightly.sh [runs]    # the nightly on a fresh copy, `runs` times (default 3), each
#                              # followed by its I/O floor on the same copy (nightly-floor.sql)
#   bench/nightly.sh drop      # drops the prepared database
#
# CALLS, EVENTS and NIGHTLY change the sizes of `prepare` (defaults: the full bench's 1x);
# GEN_GROUPS=mixed prepares (and then times) the stress shape of call groups, LAYOUT=partitioned
# (with PARTITION_BY) a partitioned `calls` (bench/lib.sh), each in a database of its own.
# Each copy is made with `create database … strategy file_copy`, which checkpoints: every page
# the nightly changes gets a full-page image in the WAL, as it would in a real nightly.
# The last run's log (JSON, debug level): ${TMPDIR:-/tmp}/callrecon-nightly/run.log.
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh
layout=$([ "$LAYOUT" = partitioned ] && echo "_partitioned_$PARTITION_BY" || true)
tpl=callrecon_bench_nightly_$GEN_GROUPS$layout
copy=${tpl}_copy
work="${TMPDIR:-/tmp}/callrecon-nightly"
mkdir -p "$work"
bench_jobs "$work"

case "${1:-3}" in
  prepare)
    bench_binary
    calls="${CALLS:-5000000}" events="${EVENTS:-600000}" nightly="${NIGHTLY:-50000}"
    url="$SERVER/$tpl"
    PSQL "$SERVER/postgres" -c "drop database if exists $tpl" -c "create database $tpl"
    "$BIN" --database-url "$url" migrate >/dev/null
    "$BIN" --database-url "$url" gen calls --calls "$calls" --days 30 --groups "$GEN_GROUPS" \
      --layout "$LAYOUT" --partition-by "$PARTITION_BY" >&2
    PSQL "$url" -c "vacuum analyze calls, call_groups"
    "$BIN" --database-url "$url" gen events --calls "$calls" --days 30 --groups "$GEN_GROUPS" --master-share "$MASTER_SHARE" \
      --from 2026-10-01T00:00:00Z --to 2026-10-31T00:00:00Z --count "$events" >&2
    "$BIN" --database-url "$url" run --job "$work/job.toml" >&2
    PSQL "$url" -c "vacuum analyze"   # the day between the load and the nightly (see run.sh)
    "$BIN" --database-url "$url" gen events --calls "$calls" --days 30 --groups "$GEN_GROUPS" --master-share "$MASTER_SHARE" \
      --from 2026-10-30T00:00:00Z --to 2026-10-31T00:00:00Z --count "$nightly" --salt 1 >&2
    PSQL "$url" -c "vacuum analyze event_queue"
    echo "prepared $tpl; now: bench/nightly.sh [runs]" >&2
    ;;
  drop)
    PSQL "$SERVER/postgres" -c "drop database if exists $copy" -c "drop database if exists $tpl"
    ;;
  *[!0-9]*)
    echo "usage: bench/nightly.sh prepare|drop|[runs]" >&2; exit 2
    ;;
  *)
    runs="$1"
    bench_binary
    exists=$(PSQL "$SERVER/postgres" -tAc "select count(*) from pg_database where datname = '$tpl'")
    [ "$exists" = 1 ] || { echo "bench/nightly.sh: no prepared database; run bench/nightly.sh prepare" >&2; exit 1; }
    for i in $(seq "$runs"); do
      PSQL "$SERVER/postgres" -c "drop database if exists $copy" \
        -c "create database $copy template $tpl strategy file_copy"
      sync
      read -r secs rss < <(RUST_LOG=callrecon=debug python3 bench/measure.py "$BIN" --log-format json \
        --database-url "$SERVER/$copy" run --job "$work/job.toml" 2> "$work/run.log")
      floor=$(nightly_floor "$SERVER/$copy")
      echo "== nightly $i of $runs: $secs s, peak RSS $rss MiB; its I/O floor $floor s (bench/nightly-floor.sql) =="
      python3 bench/stages.py < "$work/run.log"
    done
    PSQL "$SERVER/postgres" -c "drop database $copy"
    ;;
esac
