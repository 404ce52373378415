-- The fingerprint of the job's group_fields (`Job::group_fields_fingerprint`) an event's
-- group_part was taken with, written with every decision. A run that decides a stored event
-- with the same group_fields reads neither its group_part nor its group fields' values: when its
-- target stays, its group part stays, and when the target changes, the statement that stores the
-- decision takes the group part from the metadata. Null for events decided before this column:
-- those read both, as before.
alter table events add column group_fields_fingerprint text;
