-- A call that changes group and start time in one UPDATE. On a `calls` range-partitioned by
-- `started_at`, such an update can move the row to another partition, and PostgreSQL then runs
-- it as a DELETE and an INSERT: AFTER UPDATE row triggers do not fire (so
-- callrecon_group_change misses it), nor does the statement-level INSERT trigger on `calls`.
-- BEFORE UPDATE row triggers still fire, on the partition the row leaves. This one logs such a
-- call when its old or new group carries contributions. Created whatever the layout (a platform
-- may partition `calls` after installing callrecon); on a plain table it logs a call
-- callrecon_group_change logs too, which apply recomputes once. Its WHEN clause keeps every
-- other update from calling it.
do $do$
declare
    ours text := (select n.nspname from pg_class c join pg_namespace n on n.oid = c.relnamespace
                  where c.oid = 'call_group_changes'::regclass);
    calls text := (select format('%I.%I', n.nspname, c.relname) from pg_class c
                   join pg_namespace n on n.oid = c.relnamespace where c.oid = 'calls'::regclass);
begin
    execute format($f$
        create function %1$I.callrecon_log_moved_call() returns trigger
        language plpgsql security definer as $b$
        begin
            if exists (select 1 from %1$I.contributing_groups where id in (old.call_group_id, new.call_group_id)) then
                insert into %1$I.call_group_changes (call_id, old_group_id) values (new.id, old.call_group_id);
            end if;
            return new;
        end $b$$f$, ours);
    execute format('revoke all on function %I.callrecon_log_moved_call() from public', ours);
    execute format('create trigger callrecon_call_moved before update of call_group_id, started_at on %s
                    for each row when (old.call_group_id is distinct from new.call_group_id
                                       and old.started_at is distinct from new.started_at)
                    execute function %I.callrecon_log_moved_call()', calls, ours);
end $do$;
