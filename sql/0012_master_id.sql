-- Events addressed to a call group by id (`MasterId`, the platform's masterCall): the id as
-- sent, and the reason `unknown_group` for such an event whose group does not exist yet.
alter table events add column master_id text;

-- Extends whatever reasons the check allows now (other migrations may have added their own)
-- with `unknown_group`, so this migration composes with them in either order.
do $$
declare
    existing text[];
    name text;
begin
    select c.conname, array(select m[1] from regexp_matches(pg_get_constraintdef(c.oid), '''([a-z_]+)''', 'g') m)
      into name, existing
      from pg_constraint c
     where c.conrelid = 'events'::regclass and c.contype = 'c'
       and pg_get_constraintdef(c.oid) ~ '\mreason\M'
       and pg_get_constraintdef(c.oid) !~ '\mstate\M';
    if name is not null then
        if 'unknown_group' = any(existing) then
            return;
        end if;
        execute format('alter table events drop constraint %I', name);
    end if;
    existing := coalesce(existing, array['unknown_session', 'missing_key', 'no_candidate', 'ambiguous']);
    execute format('alter table events add constraint events_reason_check check (reason = any (%L::text[]))',
                   existing || 'unknown_group'::text);
end $$;
