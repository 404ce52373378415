-- Each event once (issue 41): an event identical to one the job already holds (same address,
-- same EventTime instant, same Metadata as jsonb keeps it) is a duplicate, whatever its source.
-- `digest` is the first 16 bytes of the SHA-256 of the event's canonical text, computed in Rust
-- for new events (`ingest::dedupe::digest`) and here, by the same definition, for the events
-- stored before this migration; a test checks the two agree.
--
-- The canonical text is the jsonb text of [job, kind, id, EventTime, Metadata]: the job's name,
-- kind 's' (SessionId), 'm' (MasterId) or '' (sessionless), the id or null, the instant in UTC to
-- the microsecond, and Metadata as PostgreSQL prints jsonb (keys by length then bytes, numbers as
-- numeric keeps them). The job is part of it, so the index on the digest alone is unique per job
-- and a lookup by digest can only be an index search, whatever the table's statistics say.
create function callrecon_event_digest(job text, session_id text, master_id text, event_time timestamptz,
                                       metadata jsonb)
returns bytea language sql immutable parallel safe as $$
    select substring(sha256(convert_to(jsonb_build_array(
        job,
        case when session_id is not null then 's' when master_id is not null then 'm' else '' end,
        coalesce(session_id, master_id),
        to_char(event_time at time zone 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US'),
        metadata)::text, 'UTF8')) from 1 for 16)
$$;

alter table events add column digest bytea;

-- Events stored before: each gets its digest, except the later copies of an event stored more
-- than once (duplicates were stored until now): they keep a null digest and stay as they are
-- (their decisions and history too); the first copy stands for them.
with digests as (
    select id, callrecon_event_digest(job, session_id, master_id, event_time, metadata) as digest
    from events
), firsts as (
    select distinct on (digest) id, digest from digests order by digest, id
)
update events set digest = firsts.digest from firsts where events.id = firsts.id;

create unique index events_digest_idx on events (digest) where digest is not null;
