-- The match and apply a DBA would write in pure SQL, on the same data as callrecon's rematch:
-- normalise phones with regexp_replace, hash join on (phone, agent) within the window, nearest
-- call by DISTINCT ON, then one UPDATE ... FROM with a jsonb merge aggregate.
-- Run inside a transaction that the harness rolls back, so it leaves the data as it found it.
\timing on
create temp table ev as
select id, event_time, metadata,
       regexp_replace(regexp_replace(metadata->>'customerPhone', '[^0-9]', '', 'g'), '^1([0-9]{10})$', '\1') as phone,
       metadata->>'agentId' as agent
from events
where job = 'bench' and session_id is null and metadata ? 'customerPhone' and metadata ? 'agentId';

create temp table m as
select distinct on (ev.id) ev.id as event_id, c.id as call_id
from ev
join calls c
  on regexp_replace(regexp_replace(c.ani, '[^0-9]', '', 'g'), '^1([0-9]{10})$', '\1') = ev.phone
 and c.agent_id = ev.agent
 and ev.event_time between c.started_at - interval '10 minutes'
                       and coalesce(c.ended_at, c.started_at) + interval '10 minutes'
order by ev.id,
         greatest(c.started_at - ev.event_time, ev.event_time - coalesce(c.ended_at, c.started_at), interval '0');

update calls c
set async_metadata = x.v
from (select m.call_id, callrecon_merge(ev.metadata order by ev.event_time, ev.id) as v
      from m join ev on ev.id = m.event_id
      group by m.call_id) x
where c.id = x.call_id;
