-- When `[report] keep` removed the run's report folder; the run itself stays in the history.
alter table runs add column report_pruned_at timestamptz;
