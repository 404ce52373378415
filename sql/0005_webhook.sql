-- What became of a run's webhook notification: 'delivered', or the error after the last attempt.
alter table runs add column notification text;
