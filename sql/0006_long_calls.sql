-- Calls longer than two hours, by start: matching reads a batch's calls by a started_at range
-- with a two-hour margin, plus these, so a long call matches events at any point of it.
create index if not exists calls_long_idx on calls (started_at) where ended_at - started_at > interval '2 hours';
