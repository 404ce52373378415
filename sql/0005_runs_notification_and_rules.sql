-- What became of a run's webhook notification: 'delivered', or the error after the last attempt.
alter table runs add column notification text;

-- The rules a run decided with. A decision row is written only when it changes, so an event's
-- own rules_fingerprint is that of the run that last changed it; the runs that confirmed it
-- since (a rematch over its period) are recorded here.
alter table runs add column rules_fingerprint text;
