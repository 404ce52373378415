#!/usr/bin/env bash
# Times the first run (a job's whole queue ingested into an empty ledger, matched and applied)
# for builds side by side, interleaved, on fresh copies of one prepared database, with its floor.
#
#   bench/first-run.sh prepare FACTOR          # once per size: FACTOR × (5M calls over 30 days,
#                                              # 600k events queued): the data bench/run.sh's
#                                              # first run sees
#   bench/first-run.sh ROUNDS FACTOR BIN [BIN...]
#   bench/first-run.sh drop FACTOR
#
# Each round runs every binary in turn on its own fresh copy (`create database … template …
# strategy file_copy`, which checkpoints; `migrate` untimed, an older binary forgetting the
# migrations it does not know as in bench/compare.sh), timing the run with its peak RSS and
# printing its timeline (bench/stages.py over its JSON debug log, kept as
# $work/first-rROUND-bBINARY.log). After the first binary of each round, the first run's floor
# (bench/first-run-floor.sql) on that copy; INDEXES=1: in the first round, what each index of
# `events` costs the COPY of the run's events (bench/lib.sh `events_index_costs`). Prints a markdown table: each binary's times, median,
# peak RSS, and the median's ratio to the floors' median.
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh
usage() { echo "usage: bench/first-run.sh prepare|drop FACTOR | ROUNDS FACTOR BIN [BIN...]" >&2; exit 2; }
[ $# -ge 2 ] || usage
factor="$2"
case "$factor" in *[!0-9]*|'') usage ;; esac
tpl=callrecon_bench_first_${GEN_GROUPS}_${factor}x
copy=${tpl}_copy
work="${TMPDIR:-/tmp}/callrecon-first-run"
mkdir -p "$work"
bench_jobs "$work"

fresh() { fresh_copy "$tpl" "$copy" "$1"; }

case "$1" in
  prepare)
    bench_binary
    calls=$((${CALLS:-5000000} * factor)) events=$((${EVENTS:-600000} * factor)) days=$((30 * factor))
    until=2026-10-31T00:00:00Z
    from=$(date -u -d "$until - $days days" +%Y-%m-%dT%H:%M:%SZ)
    url="$SERVER/$tpl"
    PSQL "$SERVER/postgres" -c "drop database if exists $tpl" -c "create database $tpl"
    "$BIN" --database-url "$url" migrate >/dev/null
    "$BIN" --database-url "$url" gen calls --calls "$calls" --days "$days" --groups "$GEN_GROUPS" >&2
    PSQL "$url" -c "vacuum analyze calls, call_groups"
    "$BIN" --database-url "$url" gen events --calls "$calls" --days "$days" --groups "$GEN_GROUPS" \
      --master-share "$MASTER_SHARE" --from "$from" --to "$until" --count "$events" >&2
    PSQL "$url" -c "vacuum analyze event_queue"
    echo "prepared $tpl; now: bench/first-run.sh ROUNDS $factor BIN [BIN...]" >&2
    ;;
  drop)
    PSQL "$SERVER/postgres" -c "drop database if exists $copy" -c "drop database if exists $tpl"
    ;;
  *[!0-9]*)
    usage
    ;;
  *)
    rounds="$1"; shift 2
    [ $# -ge 1 ] || usage
    exists=$(PSQL "$SERVER/postgres" -tAc "select count(*) from pg_database where datname = '$tpl'")
    [ "$exists" = 1 ] || { echo "bench/first-run.sh: no prepared database; run bench/first-run.sh prepare $factor" >&2; exit 1; }
    results="$work/results-${factor}x.txt"
    : > "$results"
    for round in $(seq "$rounds"); do
      for i in $(seq 0 $(($# - 1))); do
        bins=("$@")
        bin="${bins[$i]}"
        fresh "$bin"
        log="$work/first-r$round-b$i.log"
        load=$(cut -d' ' -f1 /proc/loadavg)
        read -r secs rss < <(RUST_LOG=callrecon=debug python3 bench/measure.py "$bin" --log-format json \
          --database-url "$SERVER/$copy" run --job "$work/job.toml" 2> "$log")
        echo "round $round  binary $i ($bin)  first run $secs s  rss $rss MiB  load $load" | tee -a "$results" >&2
        python3 bench/stages.py < "$log" | grep -vE 'contributions read' >&2 || true
        if [ "$i" = 0 ]; then
          floor=$(first_run_floor "$SERVER/$copy")
          echo "round $round  floor $floor s" | tee -a "$results" >&2
          if [ "${INDEXES:-0}" = 1 ] && [ "$round" = 1 ]; then
            events_index_costs "$SERVER/$copy" | tee "$work/indexes-${factor}x.md" >&2
          fi
        fi
      done
    done
    PSQL "$SERVER/postgres" -c "drop database if exists $copy"
    python3 - "$results" "$factor" "$@" <<'PY'
import re, statistics, sys
lines = open(sys.argv[1]).read().splitlines()
factor = sys.argv[2]
floors = [float(re.search(r"floor ([0-9.]+)", l).group(1)) for l in lines if " floor " in l]
floor = statistics.median(floors)
print(f"First run at {factor}x; its floor (bench/first-run-floor.sql) in each round: "
      f"{', '.join(f'{x:.2f}' for x in floors)} s, median **{floor:.2f} s**.")
print()
print("| binary | first run (each round) | median | median / floor | peak RSS (MiB) | load average at start |")
print("| --- | --- | --- | --- | --- | --- |")
for i, b in enumerate(sys.argv[3:]):
    rows = [l for l in lines if f" binary {i} (" in l]
    t = [float(re.search(r"first run ([0-9.]+)", l).group(1)) for l in rows]
    m = [re.search(r"rss ([0-9]+)", l).group(1) for l in rows]
    la = [re.search(r"load ([0-9.]+)", l).group(1) for l in rows]
    med = statistics.median(t)
    print(f"| `{b}` | {', '.join(f'{x:.2f}' for x in t)} | **{med:.2f} s** | **{med / floor:.1f}×** | "
          f"{', '.join(m)} | {', '.join(la)} |")
PY
    ;;
esac
