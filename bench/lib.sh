# Shared by the bench scripts (sourced from the repository's root): the PostgreSQL server, the
# binary to measure, psql, and the bench job files.

. scripts/pg.sh
# The server's URL, without a database.
SERVER="${CALLRECON_PG:-${DATABASE_URL%/*}}"
# How the generator puts calls in call groups (`callrecon gen --groups`): `cases` (one customer's
# calls per group, the default) or `mixed` (unrelated customers per group: the stress shape).
GEN_GROUPS="${GEN_GROUPS:-cases}"
# Percentage of generated events addressed to a call group by MasterId (`callrecon gen events
# --master-share`); 0, the default, generates the events measured before MasterId existed.
MASTER_SHARE="${MASTER_SHARE:-0}"
# How `calls` is laid out (`callrecon gen calls --layout`): `plain` (one heap, the default) or
# `partitioned` (range-partitioned by started_at, a partition a month).
LAYOUT="${LAYOUT:-plain}"
# With LAYOUT=partitioned: `month` (the default) or `day` (`gen calls --partition-by`). The bench's
# 30 days ending 2026-10-31 fill one monthly partition; daily ones show what many populated
# partitions cost.
PARTITION_BY="${PARTITION_BY:-month}"

# Sets BIN: $CALLRECON_BIN, or a release build in its own target directory.
bench_binary() {
  if [ -n "${CALLRECON_BIN:-}" ]; then
    BIN="$CALLRECON_BIN"   # to check the harness itself with another build; not for results
  else
    export CARGO_TARGET_DIR="${CALLRECON_RELEASE_TARGET:-$HOME/.cache/callrecon-release}"
    cargo build --release --quiet
    BIN="$CARGO_TARGET_DIR/release/callrecon"
  fi
}

PSQL() { psql -X -q -v ON_ERROR_STOP=1 "$@"; }
# callrecon's tables are in their own schema (migration 0010): psql finds them and the
# platform's unqualified, as callrecon's own sessions do.
export PGOPTIONS="${PGOPTIONS:-} -c search_path=${CALLRECON_SCHEMA:-callrecon},${CALLRECON_PLATFORM_SCHEMA:-public}"

# Writes the bench job (the demo job, reading the queue only) to $1/job.toml, and the rule change
# support makes before a rematch (a wider window after the call) to $1/job-changed.toml.
bench_jobs() {
  sed -e '0,/^name = .*/s//name = "bench"/' -e '/^inbox = /d' -e '/^archive = /d' \
      -e 's|^dir = .*|dir = "reports"|' jobs/demo.toml > "$1/job.toml"
  sed -e 's/after = "10m"/after = "15m"/' "$1/job.toml" > "$1/job-changed.toml"
}

# Prints the I/O floor of the nightly that just ran on database URL $1, in seconds
# (bench/nightly-floor.sql; rolled back).
nightly_floor() {
  local run
  run=$(PSQL "$1" -tAc "select max(ingested_run) from events")
  PSQL "$1" -v run="$run" -f bench/nightly-floor.sql
}

# Prints the floor of the first run that just ran on database URL $1 over an empty ledger, in
# seconds (bench/first-run-floor.sql; rolled back). Its files go to a directory the server can
# write, removed after.
first_run_floor() {
  local run dir
  run=$(PSQL "$1" -tAc "select max(ingested_run) from events")
  dir=$(mktemp -d "${TMPDIR:-/tmp}/callrecon-floor.XXXXXX")
  chmod 777 "$dir"
  PSQL "$1" -v run="$run" -v dir="$dir" -f bench/first-run-floor.sql
  rm -rf "$dir"
}

# Prints what each index of `events` costs the first run that just ran on database URL $1: the
# run's events copied into the emptied table (rolled back) with every index, with none, and with
# each one left out, after a checkpoint each time; a markdown table in seconds.
events_index_costs() {
  local run dir idx t
  run=$(PSQL "$1" -tAc "select max(ingested_run) from events")
  dir=$(mktemp -d "${TMPDIR:-/tmp}/callrecon-indexes.XXXXXX")
  chmod 777 "$dir"
  PSQL "$1" -c "copy (select * from events where ingested_run = $run order by id) to '$dir/events.bin' (format binary)"
  copy_in() { # the statement run before the copy, inside its transaction
    PSQL "$1" -tA <<SQL
checkpoint;
begin;
truncate events, event_history;
${2:-}${2:+;}
select clock_timestamp() as t0 \gset
copy events from '$dir/events.bin' (format binary);
select round(extract(epoch from clock_timestamp() - :'t0'::timestamptz)::numeric, 2);
rollback;
SQL
  }
  echo "| indexes of events | COPY of the run's events (s) |"
  echo "| --- | --- |"
  echo "| all | $(copy_in "$1") |"
  local all
  all=$(PSQL "$1" -tAc "select string_agg(quote_ident(indexname), ', ') from pg_indexes where tablename = 'events' and indexname <> 'events_pkey'")
  echo "| none but the primary key | $(copy_in "$1" "drop index $all") |"
  for idx in $(PSQL "$1" -tAc "select indexname from pg_indexes where tablename = 'events' and indexname <> 'events_pkey' order by 1"); do
    echo "| all but $idx | $(copy_in "$1" "drop index $idx") |"
  done
  rm -rf "$dir"
}

# Makes database $2 a fresh copy of template $1 for binary $3. A binary older than the one that
# prepared the template forgets, on its copy, the migrations it does not know (what they added
# stays, unused by it), so that it runs on the same data. Ends with a checkpoint.
fresh_copy() {
  local tpl="$1" copy="$2" bin="$3" out v
  PSQL "$SERVER/postgres" -c "drop database if exists $copy" -c "create database $copy template $tpl strategy file_copy"
  until out=$("$bin" --database-url "$SERVER/$copy" migrate 2>&1 >/dev/null); do
    v=$(grep -oE 'migration [0-9]+ was previously applied but is missing' <<<"$out" | grep -oE '[0-9]+' | head -1)
    [ -n "$v" ] || { echo "$out" >&2; return 1; }
    PSQL "$SERVER/$copy" -c "delete from ${CALLRECON_SCHEMA:-callrecon}._sqlx_migrations where version = $v"
  done
  PSQL "$SERVER/$copy" -c "checkpoint"
  sync
}
