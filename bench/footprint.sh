#!/usr/bin/env bash
# What callrecon's objects on `calls` cost the platform's writes, and what its indexes buy it
# (issue 24). On a database of 5M calls shaped like `callrecon gen calls` (30 days, a third of
# them in ~375k call groups, every group carrying contributions: the worst case for the trigger):
#
#   bench/footprint.sh [REPS]     # default 5 repetitions
#
# Every measurement is a rolled-back transaction (bench/footprint.py): the variant's DDL (drop or
# replace callrecon's triggers and indexes), then the platform's write or callrecon's read, timed
# by psql. Variants alternate in a rotating order. Appends a section to bench/RESULTS.md.
#
# Only `callrecon migrate` is run (the binary: $CALLRECON_BIN, or the release build); the rest is
# SQL. FOOTPRINT_DB (default callrecon_footprint) is dropped and re-created unless FOOTPRINT_KEEP=1
# and it exists.
set -euo pipefail
cd "$(dirname "$0")/.."
reps="${1:-5}"
. bench/lib.sh
commit="$(git rev-parse --short HEAD)$(git diff --quiet HEAD -- src sql bench/footprint.py || echo '+uncommitted changes')"
db="${FOOTPRINT_DB:-callrecon_footprint}"
url="$SERVER/$db"
export FOOTPRINT_DIR; FOOTPRINT_DIR=$(mktemp -d)
chmod 755 "$FOOTPRINT_DIR"
trap 'rm -rf "$FOOTPRINT_DIR"' EXIT

if [ "${FOOTPRINT_KEEP:-}" != 1 ] || ! PSQL "$SERVER/postgres" -tAc "select 1 from pg_database where datname = '$db'" | grep -q 1; then
  bench_binary
  PSQL "$SERVER/postgres" -c "drop database if exists $db" -c "create database $db"
  "$BIN" --database-url "$url" migrate >/dev/null
  echo "footprint: generating 5M calls" >&2
  PSQL "$url" <<'SQL'
set search_path = public;
set session_replication_role = replica;  -- the load itself without FK checks and triggers
insert into call_groups (id, metadata)
select 'g'||c, jsonb_build_object('caseNumber', 'C-'||c, 'queue', 'q'||(c % 12))
from generate_series(0, 1249999) c where abs(hashint8(c * 64 + 63)) % 10 < 3;
insert into calls (id, session_id, call_group_id, started_at, ended_at, ani, dnis, agent_id, metadata)
select 'c'||i, 's'||i, case when abs(hashint8(cu * 64 + 63)) % 10 < 3 then 'g'||cu end, st,
       case when abs(hashint8(i * 64 + 7)) % 50 <> 0 then st + make_interval(secs => 60 + abs(hashint8(i * 64 + 1)) % 1140) end,
       '+1'||(201 + cu % 780)||(200 + (cu / 780) % 800)||lpad((cu % 10000)::text, 4, '0'),
       '+18005550'||(100 + i % 9), 'agent-'||lpad((abs(hashint8(i * 64 + 3)) % 2000)::text, 4, '0'),
       jsonb_build_object('ivr', 'path-'||(i % 17))
from (select i, abs(hashint8(i * 64 + 2)) % 1250000 as cu,
             timestamptz '2026-10-01 00:00:00+00' + make_interval(secs => i * 0.5184) as st
      from generate_series(0, 4999999) i) x;
reset session_replication_role;
-- Every group carries contributions: every insert into a group is one the trigger must log.
insert into callrecon.contributing_groups select id from call_groups;
-- The platform's new calls (the last day, each in a group) and the calls it updates.
create table footprint_rows as
select 'n'||i as id, 'ns'||i as session_id, g.id as call_group_id,
       timestamptz '2026-10-30 00:00+00' + make_interval(secs => i * 0.864) as started_at,
       timestamptz '2026-10-30 00:00+00' + make_interval(secs => i * 0.864 + 300) as ended_at,
       '+12015550'||lpad((i % 10000)::text, 4, '0') as ani, '+18005550101' as dnis,
       'agent-'||lpad((i % 2000)::text, 4, '0') as agent_id, jsonb_build_object('ivr', 'path-'||(i % 17)) as metadata
from generate_series(1, 100000) i
join (select id, row_number() over (order by id) as rn from call_groups) g
  on g.rn = 1 + (i * 7919) % (select count(*) from call_groups);
create table footprint_updated as select 'c'||i as id from generate_series(4900000, 4999999) i;
vacuum analyze;
SQL
fi
PSQL "$url" -c "\\copy (select id, session_id, call_group_id, started_at, ended_at, ani, dnis, agent_id, metadata from footprint_rows) to '$FOOTPRINT_DIR/grouped.csv' csv" \
  -c "\\copy (select id, session_id, null, started_at, ended_at, ani, dnis, agent_id, metadata from footprint_rows) to '$FOOTPRINT_DIR/groupless.csv' csv"
PSQL "$url" -c checkpoint

echo "footprint: the platform's writes, $reps repetitions" >&2
writes=$(python3 bench/footprint.py "$url" "$reps" bare no-trigger installed main-trigger row-when)
echo "footprint: the insert trigger's function with a SET search_path of its own" >&2
setpath=$(python3 bench/footprint.py "$url" "$reps" no-trigger installed installed+set-search_path --cases "one statement each")
echo "footprint: each index's write cost" >&2
indexes=$(python3 bench/footprint.py "$url" "$reps" installed no-started_at_idx no-call_group_id_idx no-long_idx \
  --cases "insert 100k calls into contributing,COPY 100k calls into contributing,update ended_at")
echo "footprint: what each index buys callrecon's reads" >&2
reads=$(python3 bench/footprint.py "$url" "$(( reps < 3 ? reps : 3 ))" installed no-started_at_idx no-call_group_id_idx no-long_idx \
  --cases "nightly: matching,rematch: matching,nightly: apply")

{
  echo
  echo "## $(date -u +%Y-%m-%d) · footprint on the platform's writes (bench/footprint.sh, $reps repetitions) · commit $commit"
  echo
  echo "Machine: $(nproc) cores, $(free -g | awk '/Mem:/ {print $2}') GiB, $(PSQL "$SERVER/postgres" -tAc 'show server_version' | cut -d' ' -f1) PostgreSQL; load average at the end $(cut -d' ' -f1-3 /proc/loadavg)."
  echo "5M calls, 375k call groups, all carrying contributions. Median (min–max) of rolled-back transactions,"
  echo "variants in rotating order. bare: no trigger and none of callrecon's indexes; no-trigger: indexes kept;"
  echo "installed: migration 0010 (statement-level insert trigger, update trigger with WHEN); main-trigger: 0007's"
  echo "row trigger; row-when: 0007's function behind WHEN clauses."
  echo
  echo "$writes"
  echo
  echo "The insert trigger's function with a \`SET search_path\` of its own (its first version) instead of"
  echo "schema-qualified names: the setting is saved and restored at every call."
  echo
  echo "$setpath"
  echo
  echo "Each index callrecon creates on calls, dropped alone (the rest installed): its write cost."
  echo
  echo "$indexes"
  echo
  echo "And what it buys callrecon's reads (the same reads with the index dropped)."
  echo
  echo "$reads"
} | tee -a bench/RESULTS.md
