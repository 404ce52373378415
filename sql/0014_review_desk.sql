-- The review desk (`callrecon serve`, /review): analysts' sign-in sessions, and the index its
-- work queue pages through.

-- A signed-in analyst (an api_users row with the Analyst role). The session token lives only in
-- the analyst's cookie; this table keeps its sha256 digest. The CSRF token of its forms is
-- derived from the session token, so nothing else is stored.
create table review_sessions (
    token_sha256 bytea primary key,
    user_id      bigint not null references api_users (id),
    created_at   timestamptz not null default now(),
    expires_at   timestamptz not null
);
create index review_sessions_user_idx on review_sessions (user_id);
create index review_sessions_expires_idx on review_sessions (expires_at);

-- The work queue: pending events of every job, oldest first, a page at a time after the last
-- one shown (keyset pagination): one index range scan per page, whatever the backlog's size.
create index events_review_queue_idx on events (received_at, id) where state = 'pending';
-- The queue narrowed to a reason (null: stored pending by a run with a backlog, not decided yet),
-- in the same order; and the counts per reason, each an index-only range scan stopping at a cap.
create index events_review_reason_idx on events (reason, received_at, id) where state = 'pending';
