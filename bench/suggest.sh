#!/usr/bin/env bash
# Times `callrecon suggest` on the database `bench/nightly.sh prepare` built (5M calls over 30
# days, the first run's ~585k events): on a copy of it, ATTACHES (default 300) of the events the
# phone rule matched are marked attached by hand, and suggest runs with the bench job's phone rule
# degraded (`digits` for `phone`, a 3-minute window), so those attaches suggest changes back:
# the phone normaliser, the window, dropping the phone key. Every candidate is simulated over
# every event of the job, which is what is timed (the counts compare with the stored decisions of
# the full rules, so they are not the ones a real degraded job would see).
#
#   bench/suggest.sh [runs]    # default 1; prints each run's wall time, peak RSS, candidates
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh
tpl=callrecon_bench_nightly_$GEN_GROUPS
copy=${tpl}_suggest
work="${TMPDIR:-/tmp}/callrecon-suggest"
mkdir -p "$work"
bench_jobs "$work"
sed -e 's/normalize = "phone"/normalize = "digits"/' \
    -e 's/window = { before = "10m", after = "10m" }/window = { before = "3m", after = "3m" }/' \
    "$work/job.toml" > "$work/degraded.toml"
bench_binary
exists=$(PSQL "$SERVER/postgres" -tAc "select count(*) from pg_database where datname = '$tpl'")
[ "$exists" = 1 ] || { echo "bench/suggest.sh: no prepared database; run bench/nightly.sh prepare" >&2; exit 1; }
PSQL "$SERVER/postgres" -c "drop database if exists $copy" -c "create database $copy template $tpl strategy file_copy"
url="$SERVER/$copy"
PSQL "$url" -c "update events set decided_by = 'bench', rule = 'manual'
                where id in (select id from events where rule = 'phone-and-agent' order by id limit ${ATTACHES:-300})"
PSQL "$url" -c "vacuum analyze events"
for i in $(seq "${1:-1}"); do
  # measure.py prints `seconds peak-MiB`; the command's output and log go to the log file.
  echo "suggest: $(python3 bench/measure.py "$BIN" --database-url "$url" suggest --job "$work/degraded.toml" 2> "$work/suggest.log") (s, MiB)"
  grep -E '^s[0-9a-f]{8}  |^  support|candidates simulated|attaches read' "$work/suggest.log" || true
done
PSQL "$SERVER/postgres" -c "drop database if exists $copy"
