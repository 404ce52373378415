-- The review desk's defences (issue 43).

-- Keys made once per installation, never shown: `login_csrf` is the HMAC key of the sign-in
-- form's CSRF token (its cookie holds a random nonce; the form's token is the nonce's HMAC), so
-- a cookie planted by someone else carries no token they could compute. 32 random bytes from
-- PostgreSQL's own generator (two version-4 UUIDs, hashed).
create table installation_keys (
    purpose    text primary key,
    key        bytea not null,
    created_at timestamptz not null default now()
);
insert into installation_keys (purpose, key)
values ('login_csrf', sha256(convert_to(gen_random_uuid()::text || gen_random_uuid()::text, 'UTF8')));

-- The one-time message a decision leaves for the event page it redirects to ("attached to call
-- c-7", or why it was refused): chosen by the server, never read from the URL.
alter table review_sessions add column flash jsonb, add column flash_at timestamptz;
