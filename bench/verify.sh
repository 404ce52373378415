#!/usr/bin/env bash
# Times `callrecon verify` beside a binary COPY of what it compares (id and async_metadata of
# every call and call group), on the database `bench/nightly.sh prepare` builds (5M calls, the
# first run over 600k events applied). Target: verify within 3x the COPY.
#
#   bench/verify.sh [runs]     # default 3; VERIFY_DB=name for another prepared database
#
# Prints, per run, both times, their ratio and verify's peak RSS (bench/measure.py); then the
# data's size. Nothing is written: verify runs without --repair (and must find no difference).
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh
runs="${1:-3}"
db="${VERIFY_DB:-callrecon_bench_nightly_$GEN_GROUPS}"
url="$SERVER/$db"
exists=$(PSQL "$SERVER/postgres" -tAc "select count(*) from pg_database where datname = '$db'")
[ "$exists" = 1 ] || { echo "bench/verify.sh: no database $db; run bench/nightly.sh prepare" >&2; exit 1; }
bench_binary

PSQL "$url" -tAc "select 'data: ' || (select count(*) from calls) || ' calls, '
                  || (select count(*) from call_groups) || ' call groups, '
                  || (select count(*) from events where state = 'matched') || ' matched events; calls '
                  || pg_size_pretty(pg_table_size('calls')) || ', events ' || pg_size_pretty(pg_table_size('events'))"
copy_out() {
  PSQL "$url" -c "\\copy (select id, async_metadata from calls) to /dev/null with (format binary)" \
              -c "\\copy (select id, async_metadata from call_groups) to /dev/null with (format binary)"
}
log="${TMPDIR:-/tmp}/callrecon-verify.log"   # verify's output and log, the last run's
copy_out   # both read the tables from a warm cache
for i in $(seq "$runs"); do
  read -r copy_secs copy_rss < <(python3 bench/measure.py bash -c "$(declare -f PSQL copy_out); url='$url'; copy_out")
  read -r verify_secs verify_rss < <(python3 bench/measure.py "$BIN" --database-url "$url" verify 2>"$log")
  ratio=$(python3 -c "print(f'{$verify_secs / $copy_secs:.2f}')")
  echo "== run $i of $runs: verify $verify_secs s (peak RSS $verify_rss MiB), COPY $copy_secs s: ratio $ratio (target <= 3) =="
done
