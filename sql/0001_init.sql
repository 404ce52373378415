-- The platform's call data (contract tables). Created here when absent so that a fresh database
-- works end to end; on a platform database they already exist and are left as they are.
create table if not exists call_groups (
    id             text primary key,
    metadata       jsonb not null default '{}',
    async_metadata jsonb not null default '{}'
);

create table if not exists calls (
    id             text primary key,
    session_id     text unique,
    call_group_id  text references call_groups(id),
    started_at     timestamptz not null,
    ended_at       timestamptz,
    ani            text,
    dnis           text,
    agent_id       text,
    metadata       jsonb not null default '{}',
    async_metadata jsonb not null default '{}'
) with (fillfactor = 80);  -- room for HOT updates of async_metadata

-- Matching reads calls by a started_at range; apply walks calls of a group.
create index if not exists calls_started_at_idx on calls (started_at);
create index if not exists calls_call_group_id_idx on calls (call_group_id);

create table if not exists event_queue (
    id          bigserial primary key,
    received_at timestamptz not null default now(),
    payload     jsonb not null
);

-- Shallow merge of jsonb objects, later rows win: callrecon_merge(m order by event_time, id).
create or replace aggregate callrecon_merge(jsonb) (
    sfunc = jsonb_concat,
    stype = jsonb,
    initcond = '{}'
);

-- One row per run or rematch, written outside the run's transaction so that failed and dry runs
-- are recorded too.
create table runs (
    id          bigserial primary key,
    job         text not null,
    kind        text not null check (kind in ('run', 'rematch')),
    dry_run     boolean not null,
    started_at  timestamptz not null default now(),
    finished_at timestamptz,
    status      text not null default 'running'
                check (status in ('running', 'succeeded', 'failed', 'abandoned')),
    error       text,
    summary     jsonb,
    report_dir  text
);
create index runs_job_idx on runs (job, id);

-- Inbox files already ingested, by content, so the same content dropped again is skipped.
create table inbox_files (
    sha256      text primary key,
    job         text not null,
    name        text not null,
    run_id      bigint not null,
    events      integer not null,
    rejected    integer not null,
    ingested_at timestamptz not null default now()
);

-- Every valid event, with its current decision: the record of matches that apply derives
-- async_metadata from.
create table events (
    id             bigserial primary key,
    job            text not null,
    source         text not null,
    session_id     text,
    event_time     timestamptz not null,
    received_at    timestamptz not null,
    metadata       jsonb not null,
    ingested_run   bigint not null,
    state          text not null default 'pending'
                   check (state in ('pending', 'matched', 'expired')),
    target_kind    text check (target_kind in ('call', 'call_group')),
    target_id      text,
    rule           text,
    -- the job's group_fields taken from metadata when matched to a call
    group_part     jsonb not null default '{}',
    reason         text check (reason in ('unknown_session', 'missing_key', 'no_candidate', 'ambiguous')),
    candidates     text[],
    decided_run    bigint,
    rules_fingerprint text,
    check ((state = 'matched') = (target_id is not null))
);
create index events_job_state_idx on events (job, state);
create index events_job_time_idx on events (job, event_time);
create index events_call_target_idx on events (target_id) where target_kind = 'call';
create index events_group_target_idx on events (target_id) where target_kind = 'call_group';
