#!/usr/bin/env bash
# Benchmarks callrecon at production scale against the pure-SQL baseline, on one database.
#
#   bench/run.sh small    # CI-size check: 200k calls, 24k events (a few minutes)
#   bench/run.sh full     # 5M calls over 30 days, 600k events; then the 2x data point
#
# LAYOUT=partitioned lays `calls` out in monthly partitions (`callrecon gen calls --layout`;
# PARTITION_BY=day: daily ones, 30 populated partitions instead of one);
# FACTORS="1" runs the 1x point only. Beside callrecon's rematch it times bench/peer.py, the
# hand-written polars + connectorx script doing the rematch's read and match (bench/peer.sh
# installs it in a venv from PyPI), and checks that it matches the same events.
#
# Prints each time and appends a result table to bench/RESULTS.md (machine, date, commit).
set -euo pipefail
cd "$(dirname "$0")/.."
scale="${1:-small}"
case "$scale" in
  small) CALLS=200000;  EVENTS=24000;  NIGHTLY=2000;  FACTORS="${FACTORS:-1 2}" ;;
  full)  CALLS=5000000; EVENTS=600000; NIGHTLY=50000; FACTORS="${FACTORS:-1 2}" ;;
  *) echo "usage: bench/run.sh small|full" >&2; exit 2 ;;
esac

. bench/lib.sh
# The code measured: taken now, before the build and before this script appends to RESULTS.md.
commit="$(git rev-parse --short HEAD)$(git diff --quiet HEAD -- src sql Cargo.toml Cargo.lock || echo '+uncommitted changes')"
bench_binary
bench/peer.sh   # the peer's venv, installed before anything is timed

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
bench_jobs "$work"

now() { date +%s.%N; }
secs() { python3 -c "print(f'{$2 - $1:.2f}')"; }
rows=()
for factor in $FACTORS; do
  calls=$((CALLS * factor)); events=$((EVENTS * factor)); days=$((30 * factor))
  db="callrecon_bench_${scale}_${LAYOUT}_${factor}"
  url="$SERVER/$db"
  PSQL "$SERVER/postgres" -c "drop database if exists $db" -c "create database $db"
  echo "== ${factor}x: $calls calls over $days days, $events events ==" >&2
  "$BIN" --database-url "$url" migrate >/dev/null
  t0=$(now); "$BIN" --database-url "$url" gen calls --calls "$calls" --days "$days" --groups "$GEN_GROUPS" --layout "$LAYOUT" --partition-by "$PARTITION_BY" >&2; t1=$(now)
  PSQL "$url" -c "vacuum analyze calls, call_groups"
  gen_secs=$(secs "$t0" "$t1")
  until=2026-10-31T00:00:00Z
  from=$(date -u -d "$until - $days days" +%Y-%m-%dT%H:%M:%SZ)
  last_day=$(date -u -d "$until - 1 day" +%Y-%m-%dT%H:%M:%SZ)
  "$BIN" --database-url "$url" gen events --calls "$calls" --days "$days" --groups "$GEN_GROUPS" --master-share "$MASTER_SHARE" --from "$from" --to "$until" --count "$events" >&2
  read -r load_secs load_rss < <(python3 bench/measure.py "$BIN" --database-url "$url" run --job "$work/job.toml")
  # What the first run had to write and read, as plain SQL on the same data (rolled back).
  load_floor=$(first_run_floor "$url")
  load_ratio=$(python3 -c "print(f'{$load_secs / $load_floor:.1f}')")
  # The nightly comes a day after the load: autovacuum has long been through the 1.2M rows the
  # load updated. Without this, the nightly's first reads of those pages set their hint bits and
  # dirty them (2.4 s more at 5M calls), a cost no real nightly pays.
  PSQL "$url" -c "vacuum analyze"
  "$BIN" --database-url "$url" gen events --calls "$calls" --days "$days" --groups "$GEN_GROUPS" --master-share "$MASTER_SHARE" --from "$last_day" --to "$until" --count "$NIGHTLY" --salt 1 >&2
  read -r nightly_secs nightly_rss < <(python3 bench/measure.py "$BIN" --database-url "$url" run --job "$work/job.toml")
  # What the nightly had to read and write, as plain SQL on the same data (rolled back).
  nightly_floor=$(nightly_floor "$url")
  nightly_ratio=$(python3 -c "print(f'{$nightly_secs / $nightly_floor:.1f}')")
  PSQL "$url" -c "vacuum analyze events, calls"
  read -r rematch_secs rematch_rss < <(python3 bench/measure.py "$BIN" --database-url "$url" rematch --job "$work/job-changed.toml" --since "$from" --until "$until")
  sessionless=$(PSQL "$url" -tAc "select count(*) from events where session_id is null and master_id is null")

  # The peer script: the same read and match for the phone-and-agent rule, nothing stored.
  read -r peer_secs peer_rss < <(python3 bench/measure.py bench/peer.sh "$url" "$work/job-changed.toml" "$from" "$until" 2> "$work/peer.json")
  peer_ratio=$(python3 -c "print(f'{$peer_secs / $rematch_secs:.2f}')")
  # Its decisions against callrecon's for that rule, on the same events.
  ours=$(PSQL "$url" -tAc "select count(*) filter (where state = 'matched' and rule = 'phone-and-agent') || ' matched, ' ||
                                  count(*) filter (where reason = 'ambiguous') || ' ambiguous'
                           from events where job = 'bench' and session_id is null and master_id is null and decided_by is null
                             and event_time >= '$from' and event_time < '$until'")
  peer_out=$(tail -n 1 "$work/peer.json")
  theirs=$(python3 -c "import json, sys; d = json.loads(sys.argv[1]); print(f\"{d['matched']} matched, {d['ambiguous']} ambiguous\")" "$peer_out")
  # Its own time from connecting to the last match, without Python's start and imports.
  peer_inner=$(python3 -c "import json, sys; print(json.loads(sys.argv[1])['seconds']['total'])" "$peer_out")
  # The rematch's read floor as issue 23 puts it: the calls' key columns on two connections and
  # the events' key fields beside them, which is the peer's own read step.
  peer_read=$(python3 -c "import json, sys; print(json.loads(sys.argv[1])['seconds']['read'])" "$peer_out")
  read_ratio=$(python3 -c "print(f'{$rematch_secs / $peer_read:.2f}')")
  agree=$([ "$ours" = "$theirs" ] && echo "same: $ours" || echo "differ: callrecon $ours, peer $theirs")
  echo "${factor}x: peer script ${peer_secs}s ($peer_out); $agree" >&2

  # The pure-SQL baseline on the same data, rolled back afterwards.
  t0=$(now); { echo "begin;"; cat bench/baseline.sql; echo "rollback;"; } | PSQL "$url" >&2; t1=$(now)
  baseline_secs=$(secs "$t0" "$t1")

  # I/O floors: the call columns matching needs, out in binary; and the update of as many rows
  # as the baseline writes (rolled back).
  t0=$(now)
  PSQL "$url" -c "copy (select id, session_id, call_group_id, ani, agent_id, started_at, ended_at from calls) to stdout (format binary)" > /dev/null
  t1=$(now); copy_secs=$(secs "$t0" "$t1")
  t0=$(now)
  PSQL "$url" -c "begin" -c "update calls c set async_metadata = c.async_metadata || '{\"bench\": 1}' from (select distinct target_id from events where target_kind = 'call' and session_id is null) e where c.id = e.target_id" -c "rollback"
  t1=$(now); update_secs=$(secs "$t0" "$t1")
  ratio=$(python3 -c "print(f'{$baseline_secs / $rematch_secs:.1f}')")
  floor=$(python3 -c "print(f'{$rematch_secs / ($copy_secs + $update_secs):.1f}')")
  echo "${factor}x: first run ${load_secs}s (floor ${load_floor}s), nightly ${nightly_secs}s (floor ${nightly_floor}s), rematch ${rematch_secs}s (baseline ${baseline_secs}s, ${ratio}x), floor $copy_secs+$update_secs s" >&2
  rows+=("| ${factor}x | $calls | $sessionless | $gen_secs | $load_secs | $load_floor | $load_ratio× | $nightly_secs | $nightly_floor | $nightly_ratio× | $rematch_secs | $peer_secs (in-script $peer_inner; $peer_rss MiB) | **$peer_ratio×** | $agree | $baseline_secs | **$ratio×** | $copy_secs + $update_secs | $floor× | $peer_read | $read_ratio× | $(( nightly_rss > rematch_rss ? nightly_rss : rematch_rss )) (load $load_rss) |")
  PSQL "$SERVER/postgres" -c "drop database $db"
done

{
  echo
  echo "## $(date -u +%Y-%m-%d) · $scale · $LAYOUT calls$([ "$LAYOUT" = partitioned ] && echo " (a partition a $PARTITION_BY)") · commit $commit"
  echo
  echo "Machine: $(nproc) cores, $(free -g | awk '/Mem:/ {print $2}') GiB, $(PSQL "$SERVER/postgres" -tAc 'show server_version' | cut -d' ' -f1) PostgreSQL. Layout of calls: $LAYOUT. Call groups: $GEN_GROUPS, MasterId events: $MASTER_SHARE%. Times in seconds, RSS in MiB."
  echo
  echo "| data | calls | sessionless events | generate | first run (ingest + match all) | first-run floor | first run / floor | nightly ($NIGHTLY events) | nightly I/O floor | nightly / floor | rematch 30 days | peer script (polars + connectorx) | peer / rematch | peer's phone-and-agent decisions vs callrecon's | pure-SQL baseline | baseline / rematch | I/O floor (COPY out + UPDATE) | rematch / floor | read floor (the peer's read step) | rematch / read floor | peak RSS |"
  echo "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"
  printf '%s\n' "${rows[@]}"
} | tee -a bench/RESULTS.md
