#!/usr/bin/env python3
"""The peer callrecon's rematch is measured against: what a data engineer would write in an
afternoon for the same read and match, with polars and connectorx (bench/peer.sh installs them).

    peer.py URL JOB_FILE SINCE UNTIL

Re-evaluates the job's first call rule (the bench job's `phone-and-agent`) for the sessionless
events of the job with EventTime in [SINCE, UNTIL), as `callrecon rematch` does for that rule:

- the calls' key columns (id, the rule's columns, started_at, ended_at) read with connectorx on
  two connections at once, the period split in two `started_at` ranges;
- meanwhile, on a third connection, the events' key fields extracted in PostgreSQL
  (`metadata #>> path`), not the whole metadata;
- a lazy polars equi-join on the normalised keys, the window filter, and nearest-wins (a tie at
  the smallest distance stays ambiguous; `ambiguous = "report"`: any second candidate).

It stores no decision, applies nothing, and does no group rule, no SessionId or MasterId
attach, no report: what it leaves out is callrecon's job. Calls longer than two hours (none in
the bench's data) are left out of its read, as callrecon reads them through `calls_long_idx`.

`PEER_READ_ONLY=1` stops after the read step (the read floor bench/run.sh reports), so that
what the read alone costs the machine can be measured from outside.

Prints one JSON object: the counts (matched, ambiguous, no_candidate, missing_key, calls read,
events) and the seconds of each step and in total.
"""
import json
import os
import re
import sys
import time
import tomllib
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone

import connectorx as cx
import polars as pl

LONG_CALL = timedelta(hours=2)


def duration(text):
    """A job file's duration ("10m", "90s", "2h", "1h30m") as a timedelta."""
    units = {"ms": "milliseconds", "s": "seconds", "m": "minutes", "h": "hours", "d": "days"}
    parts = re.findall(r"(\d+)\s*(ms|s|m|h|d)", text)
    if not parts or "".join(n + u for n, u in parts) != re.sub(r"\s", "", text):
        sys.exit(f"peer.py: cannot read duration {text!r}")
    return timedelta(**{units[u]: int(n) for n, u in parts})


def normalise(expr, how):
    """The contract's normalisers, as polars expressions; an empty result is no key."""
    if how == "phone":
        digits = expr.str.replace_all(r"[^0-9]", "")
        expr = pl.when((digits.str.len_bytes() == 11) & digits.str.starts_with("1")).then(digits.str.slice(1)).otherwise(digits)
    elif how == "digits":
        expr = expr.str.replace_all(r"[^0-9]", "")
    elif how == "lower":
        expr = expr.str.to_lowercase()
    elif how == "trim":
        expr = expr.str.strip_chars()
    elif how is not None:
        sys.exit(f"peer.py: unknown normaliser {how!r}")
    return pl.when(expr != "").then(expr)


def sql_text(s):
    return "'" + s.replace("'", "''") + "'"


def ident(s):
    return '"' + s.replace('"', '""') + '"'


# Where callrecon's tables and the platform's are (bench/lib.sh's search path for psql).
EVENTS = f"{ident(os.environ.get('CALLRECON_SCHEMA', 'callrecon'))}.events"
CALLS = f"{ident(os.environ.get('CALLRECON_PLATFORM_SCHEMA', 'public'))}.calls"


def main():
    url, job_file, since, until = sys.argv[1:5]
    with open(job_file, "rb") as f:
        job = tomllib.load(f)
    rule = next(r for r in job["rules"] if r.get("target") == "call")
    keys = rule["keys"]
    before, after = duration(rule["window"]["before"]), duration(rule["window"]["after"])
    nearest = rule.get("ambiguous", "nearest") == "nearest"
    since_t = datetime.fromisoformat(since.replace("Z", "+00:00"))
    until_t = datetime.fromisoformat(until.replace("Z", "+00:00"))
    columns = [k["call"] for k in keys]
    # Column names from the job file go into SQL text: only plain identifiers.
    for c in columns:
        if not re.fullmatch(r"[a-z_]+", c):
            sys.exit(f"peer.py: call column {c!r}")

    timings = {}
    started = time.monotonic()

    # Calls whose window can hold an event of the period, on two connections: two started_at
    # ranges of equal length.
    lo, hi = since_t - after - LONG_CALL, until_t + before
    mid = lo + (hi - lo) / 2
    ts = lambda t: sql_text(t.isoformat())
    select = f"select id, {', '.join(columns)}, started_at, coalesce(ended_at, started_at) as ended from {CALLS}"
    queries = [
        f"{select} where started_at >= {ts(lo)} and started_at < {ts(mid)}",
        f"{select} where started_at >= {ts(mid)} and started_at <= {ts(hi)}",
    ]
    # The events' key fields, extracted in PostgreSQL: callrecon's rematch scope (sessionless,
    # not addressed to a group, not decided by hand) for the job.
    fields = ", ".join(
        f"metadata #>> {sql_text('{' + k['event'].replace('.', ',') + '}')} as k{i}" for i, k in enumerate(keys)
    )
    events_sql = (
        f"select id, event_time, {fields} from {EVENTS}"
        f" where job = {sql_text(job['name'])} and session_id is null and master_id is null and decided_by is null"
        f" and event_time >= {ts(since_t)} and event_time < {ts(until_t)}"
    )

    # Both reads at once (connectorx releases the GIL): the events on a third connection while
    # the calls come in on two.
    def timed(what, *args):
        step = time.monotonic()
        df = cx.read_sql(url, *args, return_type="polars")
        timings[what] = time.monotonic() - step
        return df

    step = time.monotonic()
    with ThreadPoolExecutor(2) as pool:
        reading_calls = pool.submit(timed, "read_calls", queries)
        reading_events = pool.submit(timed, "read_events", events_sql)
        calls, events = reading_calls.result(), reading_events.result()
    timings["read"] = time.monotonic() - step
    if os.environ.get("PEER_READ_ONLY") == "1":
        # The read step alone (its CPU, measured from outside, is the read floor's).
        print(json.dumps({"calls_read": calls.height, "events": events.height,
                          "seconds": {k: round(v, 2) for k, v in timings.items()}}))
        return

    step = time.monotonic()
    keyed = events.lazy().with_columns(
        [normalise(pl.col(f"k{i}"), k.get("normalize")).alias(f"k{i}") for i, k in enumerate(keys)]
    )
    key_names = [f"k{i}" for i in range(len(keys))]
    with_keys = keyed.drop_nulls(key_names)
    targets = calls.lazy().with_columns(
        [normalise(pl.col(k["call"]), k.get("normalize")).alias(f"k{i}") for i, k in enumerate(keys)]
    ).select([pl.col("id").alias("call_id"), "started_at", "ended", *key_names]).drop_nulls(key_names)
    t = pl.col("event_time")
    pairs = (
        with_keys.join(targets, on=key_names, how="inner")
        .filter((t >= pl.col("started_at") - before) & (t <= pl.col("ended") + after))
        .with_columns(
            dist=pl.max_horizontal(pl.col("started_at") - t, t - pl.col("ended"), pl.duration(seconds=0))
        )
    )
    per_event = pairs.group_by("id").agg(
        n=pl.len(),
        at_min=(pl.col("dist") == pl.col("dist").min()).sum(),
        call=pl.col("call_id").sort_by(["dist", "call_id"]).first(),
    )
    decided = per_event.with_columns(
        matched=(pl.col("n") == 1) | (pl.col("at_min") == 1) if nearest else pl.col("n") == 1
    )
    decided, n_with_keys = pl.collect_all([decided, with_keys.select(pl.len())])
    timings["match"] = time.monotonic() - step
    timings["total"] = time.monotonic() - started

    matched = decided.filter(pl.col("matched")).height
    out = {
        "calls_read": calls.height,
        "events": events.height,
        "matched": matched,
        "ambiguous": decided.height - matched,
        "no_candidate": n_with_keys.item() - decided.height,
        "missing_key": events.height - n_with_keys.item(),
        "seconds": {k: round(v, 2) for k, v in timings.items()},
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
