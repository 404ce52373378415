-- Unmatched events by job: those pending (a run's matching, the report) and those a run expired
-- (its report). Matched events, nearly all of them, have no entry: storing a nightly's 50k
-- events no longer updates this index, and a report no longer walks every event ever expired
-- to find its own run's.
create index events_unmatched_idx on events (job, state, decided_run) where state in ('pending', 'expired');
drop index events_job_state_idx;
