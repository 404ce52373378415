-- The snapshot a run took as it started, before it read any call (`pg_current_snapshot()`, as
-- text): a change to `calls` or `call_groups` the run cannot have seen was made by a transaction
-- at least as new as the oldest one running then (the snapshot's xmin). The next run of the job, when its rules are the same, retries a pending
-- sessionless event only where calls changed since (README, "Choices where the contract is
-- silent").
alter table runs add column calls_snapshot text;
