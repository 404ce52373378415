-- The nightly's I/O floor: what any implementation has to read and write for the nightly that
-- just ran, timed as plain SQL on the same database, and rolled back. Run it right after the
-- nightly, with the nightly's run id: `psql -v run=<id> -f bench/nightly-floor.sql`. It prints
-- the floor's seconds.
--
-- The floor is: the candidate calls of the nightly's events read out in binary (the columns a
-- match needs, over the events' time range plus the window), the nightly's events inserted
-- with their decisions, and every call and call group the nightly changed written with its new
-- value, by primary key. What it leaves out: reading the touched groups' calls and their older
-- events to recompute the values, matching, and the commit's WAL flush. A checkpoint first,
-- so every page it writes gets a full-page image in the WAL, as the nightly's pages did.
\set ON_ERROR_STOP on
\set QUIET on

-- What the nightly wrote (not timed): its events, and the rows its transaction updated.
create temp table floor_events as
  select job, source, session_id, event_time, received_at, metadata, ingested_run, state, target_kind,
         target_id, rule, group_part, reason, candidates, decided_run, rules_fingerprint
  from events where ingested_run = :run;
select xmin as nightly_xid from events where ingested_run = :run limit 1 \gset
create temp table floor_calls as select id, async_metadata from calls where xmin = :'nightly_xid'::xid;
create temp table floor_groups as select id, async_metadata from call_groups where xmin = :'nightly_xid'::xid;
analyze floor_events, floor_calls, floor_groups;
select min(event_time) - interval '2 hours' as lo, max(event_time) + interval '15 minutes' as hi
  from floor_events \gset
checkpoint;

select clock_timestamp() as started \gset
begin;
\o /dev/null
copy (select id, session_id, call_group_id, ani, agent_id, started_at, ended_at from calls
      where started_at between :'lo' and :'hi') to stdout (format binary);
\o
insert into events (job, source, session_id, event_time, received_at, metadata, ingested_run, state,
                    target_kind, target_id, rule, group_part, reason, candidates, decided_run,
                    rules_fingerprint)
  select * from floor_events order by event_time;
-- Primary-key probes, as a DBA would make sure of for a few tens of thousands of rows.
set local enable_hashjoin = off;
set local enable_mergejoin = off;
update calls c set async_metadata = f.async_metadata from floor_calls f where c.id = f.id;
update call_groups g set async_metadata = f.async_metadata from floor_groups f where g.id = f.id;
rollback;
\t on
\a
select round(extract(epoch from clock_timestamp() - :'started'::timestamptz)::numeric, 2);
