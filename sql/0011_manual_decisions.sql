-- Manual decisions (`callrecon resolve`, `reopen`), the history of every decision, and undo.

-- A dismissed event: an analyst closed it out (a test call, a wrong feed); no longer pending,
-- never expires.
alter table events drop constraint events_state_check;
alter table events add constraint events_state_check
    check (state in ('pending', 'matched', 'expired', 'dismissed'));
-- Who made the event's decision by hand (null: the rules did), and the note they gave. A manual
-- decision is final for runs and rematches.
alter table events add column decided_by text;
alter table events add column note text;
create index events_dismissed_idx on events (job) where state = 'dismissed';

alter table runs drop constraint runs_kind_check;
alter table runs add constraint runs_kind_check check (kind in ('run', 'rematch', 'undo'));
-- For an undo: the run whose decisions it reverted.
alter table runs add column undoes bigint;

-- Every change of an event's decision, append-only: what it became, when, and by which run
-- (run, rematch or undo) or person. What it was before is the event's previous row (none: a new
-- event, undecided).
create table event_history (
    id          bigserial primary key,
    event_id    bigint not null,
    at          timestamptz not null default now(),
    run_id      bigint,
    person      text,
    state       text not null,
    target_kind text,
    target_id   text,
    rule        text,
    reason      text,
    note        text,
    check ((run_id is null) <> (person is null))
);
create index event_history_event_idx on event_history (event_id, id);
create index event_history_run_idx on event_history (run_id) where run_id is not null;
-- The decisions made by hand since a time (each report lists those since the previous run).
create index event_history_manual_idx on event_history (at) where person is not null;

-- The job file a run was started with, so `callrecon undo RUN` finds the job without being told.
alter table runs add column job_file text;
