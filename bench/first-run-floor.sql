-- The first run's floor: what any implementation has to write and read for the first run that
-- just ran over a job's empty ledger, timed as plain SQL on the same database, and rolled back.
-- Run it right after that run, with its run id and a directory the server can write:
-- `psql -v run=<id> -v dir=<directory> -f bench/first-run-floor.sql`. It prints the floor's
-- seconds.
--
-- The floor is: the run's events copied into the empty `events` table once, with their final
-- columns (decisions included), the calls' key columns matching needs copied out in binary (over
-- the events' time range plus the window), and every call and call group the run changed
-- written with its new value: the new values copied into a temporary table and one UPDATE … FROM
-- each. What it leaves out: reading the queue, matching, reading the touched groups' calls to
-- recompute the values, and the commit's WAL flush. A checkpoint first, so every page it writes
-- gets a full-page image in the WAL, as the run's pages did.
\set ON_ERROR_STOP on
\set QUIET on

-- What the run wrote (not timed), in files the server reads back.
select xmin as run_xid from events where ingested_run = :run limit 1 \gset
select min(event_time) - interval '2 hours' as lo, max(event_time) + interval '15 minutes' as hi
  from events where ingested_run = :run \gset
select :'dir' || '/events.bin' as events_file, :'dir' || '/calls.bin' as calls_file,
       :'dir' || '/groups.bin' as groups_file \gset
copy (select * from events where ingested_run = :run order by id) to :'events_file' (format binary);
copy (select id, async_metadata from calls where xmin = :'run_xid'::xid) to :'calls_file' (format binary);
copy (select id, async_metadata from call_groups where xmin = :'run_xid'::xid) to :'groups_file' (format binary);
checkpoint;

select clock_timestamp() as started \gset
begin;
-- The ledger as the first run found it: empty, with every index.
truncate events, event_history;
copy events from :'events_file' (format binary);
\o /dev/null
copy (select id, session_id, call_group_id, ani, agent_id, started_at, ended_at from calls
      where started_at between :'lo' and :'hi') to stdout (format binary);
\o
create temp table floor_calls as select id, async_metadata from calls limit 0;
create temp table floor_groups as select id, async_metadata from call_groups limit 0;
copy floor_calls from :'calls_file' (format binary);
copy floor_groups from :'groups_file' (format binary);
analyze floor_calls, floor_groups;
update calls c set async_metadata = f.async_metadata from floor_calls f where c.id = f.id;
update call_groups g set async_metadata = f.async_metadata from floor_groups f where g.id = f.id;
rollback;
\t on
\a
select round(extract(epoch from clock_timestamp() - :'started'::timestamptz)::numeric, 2);
