-- Calls that joined or left a call group carrying contributions (group events, group_fields of
-- its calls' events), logged by the database as the platform writes calls, so each run
-- recomputes exactly those calls instead of comparing every call with what it last applied.
-- The trigger writes only to callrecon's own table; calls rows are never changed by it.
create table contributing_groups (id text primary key);
create table call_group_changes (call_id text not null, old_group_id text);

insert into contributing_groups
select distinct target_id from events where state = 'matched' and target_kind = 'call_group'
union
select distinct c.call_group_id from events e join calls c on c.id = e.target_id
where e.state = 'matched' and e.target_kind = 'call' and e.group_part <> '{}' and c.call_group_id is not null;

insert into call_group_changes
select m.call_id, m.call_group_id from applied_members m join calls c on c.id = m.call_id
where c.call_group_id is distinct from m.call_group_id
union
select c.id, null from calls c join contributing_groups g on g.id = c.call_group_id
where not exists (select 1 from applied_members m where m.call_id = c.id);

drop table applied_members;

create function callrecon_log_group_change() returns trigger language plpgsql as $$
begin
    if (tg_op = 'INSERT' and new.call_group_id is not null
            and exists (select 1 from contributing_groups where id = new.call_group_id))
       or (tg_op = 'UPDATE' and new.call_group_id is distinct from old.call_group_id
            and exists (select 1 from contributing_groups where id in (old.call_group_id, new.call_group_id))) then
        insert into call_group_changes (call_id, old_group_id)
        values (new.id, case when tg_op = 'UPDATE' then old.call_group_id end);
    end if;
    return null;
end $$;

create trigger callrecon_group_change after insert or update of call_group_id on calls
for each row execute function callrecon_log_group_change();
