-- Calls that carry contributions of their call group (group events, group_fields of siblings),
-- and the group they came from: a call that joins or leaves such a group later is found by
-- comparing this with calls.call_group_id, and recomputed.
create table applied_members (
    call_id       text primary key,
    call_group_id text not null
);
create index applied_members_group_idx on applied_members (call_group_id);
