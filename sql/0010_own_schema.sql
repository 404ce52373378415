-- callrecon's own objects move to a schema of their own (`--schema`, default `callrecon`), away
-- from the platform's tables (`--platform-schema`, default `public`), and the trigger on `calls`
-- is replaced by two that cost the platform's writes far less (README, "For the platform's DBA").
--
-- callrecon runs this with the session setting `callrecon.schema` (db.rs); the platform's schema
-- is where `calls` is. Without the setting (sqlx's test harness) the objects stay where they are.
-- The migrations table itself is moved by db.rs before the migrations run.

-- Replaced below: a plpgsql call for every inserted call, even one without a group.
drop trigger callrecon_group_change on calls;
drop function callrecon_log_group_change();

do $$
declare
    ours text := coalesce(nullif(current_setting('callrecon.schema', true), ''), current_schema());
    platform text := (select n.nspname from pg_class c join pg_namespace n on n.oid = c.relnamespace
                      where c.oid = 'calls'::regclass);
    t text;
begin
    if not exists (select 1 from pg_namespace where nspname = ours) then
        execute format('create schema %I', ours);
    end if;
    if ours <> platform then
        -- Indexes, constraints and the serial columns' sequences move with their tables.
        foreach t in array array['runs', 'inbox_files', 'events', 'contributing_groups', 'call_group_changes',
                                 'api_users', 'api_tokens', 'api_idempotency'] loop
            execute format('alter table %I.%I set schema %I', platform, t, ours);
        end loop;
        execute format('alter aggregate %I.callrecon_merge(jsonb) set schema %I', platform, ours);
    end if;
    perform set_config('callrecon.platform', platform, true);
    perform set_config('callrecon.ours', ours, true);
end $$;

-- The trigger functions name callrecon's tables with their schema: they find them whatever the
-- search path of the platform's session that fires them, without a `SET search_path` of their
-- own (which costs a single-row INSERT more than the rest of the trigger: bench/RESULTS.md).
-- Security definer: the platform's roles need no privilege on callrecon's schema.
do $do$
declare
    ours text := current_setting('callrecon.ours');
    calls text := format('%I.calls', current_setting('callrecon.platform'));
begin
    -- Calls inserted into a group carrying contributions: one set-based insert per statement (an
    -- INSERT of 100k calls, a COPY), over the statement's new rows (a transition table).
    execute format($f$
        create function %1$I.callrecon_log_inserted_calls() returns trigger
        language plpgsql security definer as $b$
        begin
            insert into %1$I.call_group_changes (call_id, old_group_id)
            select n.id, null from inserted_calls n
            where n.call_group_id is not null
              and exists (select 1 from %1$I.contributing_groups g where g.id = n.call_group_id);
            return null;
        end $b$$f$, ours);
    -- A call whose call_group_id changed, when its old or new group carries contributions. The
    -- trigger's WHEN clause keeps every other update (ended_at, metadata, callrecon's own
    -- async_metadata) from calling it.
    execute format($f$
        create function %1$I.callrecon_log_group_change() returns trigger
        language plpgsql security definer as $b$
        begin
            if exists (select 1 from %1$I.contributing_groups where id in (old.call_group_id, new.call_group_id)) then
                insert into %1$I.call_group_changes (call_id, old_group_id) values (new.id, old.call_group_id);
            end if;
            return null;
        end $b$$f$, ours);
    execute format('revoke all on function %1$I.callrecon_log_inserted_calls(), %1$I.callrecon_log_group_change()
                    from public', ours);
    execute format('create trigger callrecon_calls_inserted after insert on %s
                    referencing new table as inserted_calls
                    for each statement execute function %I.callrecon_log_inserted_calls()', calls, ours);
    execute format('create trigger callrecon_group_change after update of call_group_id on %s
                    for each row when (old.call_group_id is distinct from new.call_group_id)
                    execute function %I.callrecon_log_group_change()', calls, ours);
end $do$;
