#!/usr/bin/env python3
"""The platform's writes to `calls` with and without callrecon's objects (bench/footprint.sh).

    bench/footprint.py URL REPS VARIANT... [--cases CASE,...]

Each measurement is one psql session: BEGIN; the variant's DDL (dropping or replacing callrecon's
triggers and indexes: DDL is transactional, so it costs nothing and is undone); the platform's
write, timed by psql's \\timing; ROLLBACK. The database is never changed. Variants and cases run
in a rotating order, REPS times each; prints one Markdown row per case: median (min-max) ms.

Needs the tables `footprint_rows` (100k new calls, each in a group carrying contributions) and
`footprint_updated` (ids of 100k existing calls), and $FOOTPRINT_DIR/{grouped,groupless}.csv.
"""
import os
import re
import statistics
import subprocess
import sys

OURS = os.environ.get("CALLRECON_SCHEMA", "callrecon")
DIR = os.environ.get("FOOTPRINT_DIR", "/tmp")
COLS = "id, session_id, call_group_id, started_at, ended_at, ani, dnis, agent_id, metadata"

TRIGGERS = "drop trigger callrecon_calls_inserted on calls; drop trigger callrecon_group_change on calls;"
# The trigger function of migration 0007 (main before issue 24), created in the transaction.
MAIN_FUNCTION = f"""
create function pg_temp.main_log_group_change() returns trigger language plpgsql as $$
begin
    if (tg_op = 'INSERT' and new.call_group_id is not null
            and exists (select 1 from {OURS}.contributing_groups where id = new.call_group_id))
       or (tg_op = 'UPDATE' and new.call_group_id is distinct from old.call_group_id
            and exists (select 1 from {OURS}.contributing_groups where id in (old.call_group_id, new.call_group_id))) then
        insert into {OURS}.call_group_changes (call_id, old_group_id)
        values (new.id, case when tg_op = 'UPDATE' then old.call_group_id end);
    end if;
    return null;
end $$;
"""
VARIANTS = {
    # callrecon's objects as installed (migration 0010): statement-level insert trigger, row-level
    # update trigger with WHEN, the three indexes.
    "installed": "",
    # no trigger at all, the indexes kept: what the trigger costs
    "no-trigger": TRIGGERS,
    # no trigger and none of the indexes callrecon creates: the platform's table alone
    "bare": TRIGGERS + "drop index calls_started_at_idx; drop index calls_call_group_id_idx; drop index calls_long_idx;",
    # main's row trigger (0007): a plpgsql call for every inserted row
    "main-trigger": TRIGGERS + MAIN_FUNCTION
    + "create trigger main_group_change after insert or update of call_group_id on calls"
    " for each row execute function pg_temp.main_log_group_change();",
    # main's function behind WHEN clauses: no call for a call without a group
    "row-when": TRIGGERS + MAIN_FUNCTION
    + "create trigger main_ins after insert on calls for each row when (new.call_group_id is not null)"
    " execute function pg_temp.main_log_group_change();"
    + "create trigger main_upd after update of call_group_id on calls for each row"
    " when (old.call_group_id is distinct from new.call_group_id) execute function pg_temp.main_log_group_change();",
    # the installed insert trigger's function with a `SET search_path` of its own (its first
    # version) instead of schema-qualified names
    "installed+set-search_path": f"alter function {OURS}.callrecon_log_inserted_calls() set search_path = {OURS}, pg_temp;",
    # each index callrecon creates, alone dropped (the triggers kept)
    "no-started_at_idx": "drop index calls_started_at_idx;",
    "no-call_group_id_idx": "drop index calls_call_group_id_idx;",
    "no-long_idx": "drop index calls_long_idx;",
}
# A statement that runs longer is stopped and shown as "> LIMIT_S s".
LIMIT_S = 120
CASES = {
    "insert 100k calls into contributing groups": f"insert into calls ({COLS}) select {COLS} from footprint_rows",
    "insert 100k calls without a group":
        f"insert into calls ({COLS}) select {COLS.replace('call_group_id', 'null')} from footprint_rows",
    "COPY 100k calls into contributing groups": f"\\copy calls ({COLS}) from '{DIR}/grouped.csv' csv",
    "COPY 100k calls without a group": f"\\copy calls ({COLS}) from '{DIR}/groupless.csv' csv",
    # The platform's OLTP shape: one INSERT statement per call (in a loop inside the server, so
    # the trigger's share is not hidden behind client round trips).
    "insert 10k calls into contributing groups, one statement each": f"""
do $$ declare r record; begin
  for r in select * from footprint_rows limit 10000 loop
    insert into calls ({COLS}) values (r.id, r.session_id, r.call_group_id, r.started_at, r.ended_at, r.ani, r.dnis, r.agent_id, r.metadata);
  end loop; end $$""",
    "update ended_at of 100k calls":
        "update calls c set ended_at = c.ended_at + interval '1 second' from footprint_updated u where c.id = u.id",
    "move 10k calls to another contributing group":
        "update calls c set call_group_id = f.call_group_id from (select u.id, r.call_group_id"
        " from (select id, row_number() over () n from footprint_updated limit 10000) u"
        " join (select call_group_id, row_number() over () n from footprint_rows) r using (n)) f where c.id = f.id",
}

# What the indexes buy callrecon: the reads they serve, at the bench's scale (calls of 30 days
# up to 2026-10-31; the bench job's widest window is 10 minutes either side).
def calls_read(frm, to):
    lo, hi, end = f"'{frm}'::timestamptz - interval '2 hours 10 minutes'", f"'{to}'::timestamptz + interval '10 minutes'", \
        f"'{frm}'::timestamptz - interval '10 minutes'"
    cols = "id, started_at, coalesce(ended_at, started_at), call_group_id, ctid, ani, agent_id"
    return (f"copy (select {cols} from calls where started_at >= {lo} and started_at <= {hi}"
            f" and coalesce(ended_at, started_at) >= {end} union all select {cols} from calls"
            f" where started_at < {lo} and ended_at - started_at > interval '2 hours' and ended_at >= {end})"
            " to '/dev/null' (format binary)")


READS = {
    # matching's read of the nightly's calls (src/calldata.rs, one day of events)
    "nightly: matching reads one day's calls": calls_read("2026-10-30 00:00+00", "2026-10-31 00:00+00"),
    # a 30-day rematch reads its calls batch by batch (about 100k events, 5 days, a batch)
    "rematch: matching reads 30 days' calls in 6 batches": ";\n".join(
        calls_read(f"2026-10-{d:02d} 00:00+00", f"2026-10-{d + 5:02d} 00:00+00") if d + 5 <= 31 else
        calls_read(f"2026-10-{d:02d} 00:00+00", "2026-10-31 00:00+00") for d in range(1, 31, 5)),
    # apply reads every call of the groups it touches (the nightly: about 12k groups)
    "nightly: apply reads the calls of 12k touched groups":
        "copy (select c.id, c.ctid, c.async_metadata from (select id from call_groups"
        " where abs(hashtext(id)) % 31 = 0) g join calls c on c.call_group_id = g.id) to '/dev/null' (format binary)",
}
CASES.update(READS)


def measure(url, variant, case):
    script = (f"begin;\nset local statement_timeout = '{LIMIT_S}s';\n{VARIANTS[variant]}\n\\timing on\n"
              f"{CASES[case]};\n\\timing off\nrollback;\n")
    out = subprocess.run(["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", url], input=script,
                         capture_output=True, text=True)
    if "statement timeout" in out.stderr:
        return float("inf")
    if out.returncode != 0:
        sys.exit(f"footprint.py: {variant} / {case}: {out.stderr.strip()}")
    # Every statement of the case (a rematch's batches), not the variant's DDL.
    return sum(float(t) for t in re.findall(r"Time: ([0-9.]+) ms", out.stdout))


def main():
    args = sys.argv[1:]
    cases = [c for c in CASES if c not in READS]
    if "--cases" in args:
        i = args.index("--cases")
        wanted = args[i + 1].split(",")
        cases = [c for c in CASES if any(w in c for w in wanted)]
        del args[i:i + 2]
    url, reps, variants = args[0], int(args[1]), args[2:]
    results = {(v, c): [] for v in variants for c in cases}
    for rep in range(reps):
        for c in cases:
            # Rotate the variants' order every repetition: none always goes first.
            order = variants[rep % len(variants):] + variants[:rep % len(variants)]
            for v in order:
                ms = measure(url, v, c)
                results[(v, c)].append(ms)
                print(f"  rep {rep + 1} {c} / {v}: {ms:.0f} ms", file=sys.stderr)
            # The rolled-back rows are dead tuples in the heap and index entries in the last
            # day's range: gone before the next round, so that rounds start alike.
            if c not in READS:
                subprocess.run(["psql", "-X", "-q", "-c", "vacuum calls", url], check=True)
    print("| measured | " + " | ".join(variants) + " |")
    print("| --- |" + " --- |" * len(variants))
    for c in cases:
        cells = []
        for v in variants:
            t = results[(v, c)]
            if max(t) == float("inf"):
                cells.append(f"> {LIMIT_S} s")
            else:
                cells.append(f"{statistics.median(t) / 1000:.2f} s ({min(t) / 1000:.2f}–{max(t) / 1000:.2f})")
        print(f"| {c} | " + " | ".join(cells) + " |")


main()
