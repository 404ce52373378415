-- Users of the intake API (`callrecon serve`), managed with `callrecon users`. Secrets and tokens
-- are stored hashed only: secrets as argon2id PHC strings, tokens (32 random bytes) as sha256.
create table api_users (
    id          bigserial primary key,
    name        text not null,
    client_id   text not null unique,
    secret_hash text not null,
    roles       text[] not null default '{}',
    created_at  timestamptz not null default now(),
    revoked_at  timestamptz
);
-- A name is taken by at most one active user; a revoked user's name can be given again.
create unique index api_users_active_name_idx on api_users (name) where revoked_at is null;

create table api_tokens (
    token_sha256 bytea primary key,
    user_id      bigint not null references api_users (id),
    issued_at    timestamptz not null default now(),
    expires_at   timestamptz not null
);
create index api_tokens_user_idx on api_tokens (user_id);
create index api_tokens_expires_idx on api_tokens (expires_at);

-- `Idempotency-Key`s of stored events, written in the transaction that stores the event: a key
-- is here exactly when its event is on (or went through) event_queue. queue_id is no foreign key:
-- runs drain event_queue.
create table api_idempotency (
    user_id     bigint not null references api_users (id),
    key         text not null,
    body_sha256 bytea not null,
    queue_id    bigint not null,
    created_at  timestamptz not null default now(),
    primary key (user_id, key)
);
create index api_idempotency_created_idx on api_idempotency (created_at);
