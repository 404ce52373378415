//! One reconciliation run: `ingest → match → apply → report`, all or nothing.
//!
//! Everything that changes the database happens in one transaction holding the job's advisory
//! lock; inbox files move to the archive only after it commits, and a dry run rolls it back. The
//! `runs` row ([`record`]) is written outside that transaction so failed and dry runs are
//! recorded too.
//!
//! Architecture invariant: this module conducts; it holds no SQL of its own. Each stage is a
//! call into its module, and what flows between them is plain data.

mod tally;

pub use record::AlreadyRunning;

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use chrono::{DateTime, Utc};
use sqlx::{PgConnection, PgPool};

use crate::apply::{self, Applied};
use crate::db::AbortOnDrop;
use crate::decision::RunKind;
use crate::ingest::{self, Ingested};
use crate::job::Job;
use crate::ledger::{self, Arrivals, DecisionRows, Fresh, Scope, ToDecide, Write};
use crate::matching;
use crate::progress;
use crate::report::{self, FileEntry, FileStatus, Report, Summary};
use crate::runs as record;
use crate::tuning::Tuning;
use tally::Tally;

/// What kind of run, and over which events.
#[derive(Debug, Clone, Copy)]
pub enum Mode {
    /// Ingest new events, then match every pending one.
    Run,
    /// Re-evaluate rule-based decisions of events with EventTime in `[since, until)`.
    Rematch { since: Option<DateTime<Utc>>, until: Option<DateTime<Utc>> },
    /// Revert the decisions run `run` made that are still as it left them.
    Undo { run: i64 },
}

impl Mode {
    fn kind(self) -> RunKind {
        match self {
            Mode::Run => RunKind::Run,
            Mode::Rematch { .. } => RunKind::Rematch,
            Mode::Undo { .. } => RunKind::Undo,
        }
    }
}

/// A finished run: its report, and where the report files are.
pub struct Finished {
    pub report: Report,
    pub dir: PathBuf,
    /// What went wrong after the run committed (the report could not be written, its end could
    /// not be recorded): logged, and printed by the command, which still exits 0.
    pub problems: Vec<String>,
    /// Time spent per stage: "ingest", "match", "apply", "report" (for the metrics).
    pub stages: Vec<(&'static str, std::time::Duration)>,
}

/// Runs the job once. On error nothing is changed and the run is recorded as failed.
pub async fn execute(pool: &PgPool, job: &Job, mode: Mode, dry_run: bool) -> Result<Finished> {
    let tuning = Tuning::from_env();
    let kind = mode.kind();
    // Files still being written are set apart (waited for, when worth it) before the run's
    // transaction begins, so no wait holds it open.
    let inbox = match mode {
        Mode::Run => ingest::settle::settle(job, Utc::now()).await.context("listing the inbox")?,
        Mode::Rematch { .. } | Mode::Undo { .. } => Default::default(),
    };
    let mut tx = crate::db::begin(pool).await.context("starting the run's transaction")?;
    let undoes = match mode {
        Mode::Undo { run } => Some(run),
        _ => None,
    };
    let (run_id, now) = record::start(pool, &mut tx, job, kind, dry_run, undoes).await?;
    tracing::info!(run_id, job = %job.name, kind = kind.as_str(), dry_run, "run started");
    let run = Run { pool, job, tuning, run_id, now };

    let result = async {
        let (mut report, mut files, stages) = run.stages(&mut tx, mode, dry_run, inbox).await?;
        if dry_run {
            tx.rollback().await?;
        } else {
            record::succeeded_in(&mut tx, run_id, &report.summary).await?;
            if let Err(e) = tx.commit().await {
                // The connection may have dropped during COMMIT: whether the commit happened is
                // in `runs`, which the transaction marked succeeded.
                match record::committed(pool, run_id).await {
                    Some(true) => tracing::warn!(error = %e, "the commit reported an error, but the run is committed"),
                    Some(false) => return Err(anyhow::Error::new(e).context("committing the run")),
                    None => {
                        return Err(anyhow::Error::new(e).context(
                            "committing the run (whether it was committed could not be checked: see `report list`)",
                        ));
                    }
                }
            }
            tracing::debug!("committed");
            ingest::archive(&mut files, job, now);
        }
        report.files = files.into_iter().map(|(_, f)| f).collect();
        anyhow::Ok((report, stages))
    }
    .await;

    let (report, stages) = match result {
        Ok(done) => done,
        Err(e) => {
            report::discard_partial(&job.report_dir.join(run_id.to_string()));
            let error = crate::db::error_line(&e);
            record::failed(pool, run_id, &error).await;
            notify(pool, job, run_id, report::webhook::failure_payload(run_id, &job.name, kind, dry_run, &error)).await;
            return Err(e);
        }
    };
    run.after_commit(report, dry_run, stages).await
}

/// A run under way: what every stage needs.
struct Run<'a> {
    /// For reads on other connections than the run's (matching's call groups, apply's reader)
    /// and for the `runs` row.
    pool: &'a PgPool,
    job: &'a Job,
    tuning: Tuning,
    run_id: i64,
    now: DateTime<Utc>,
}

impl Run<'_> {
    /// The stages, on the run's connection inside its transaction.
    async fn stages(
        &self,
        conn: &mut PgConnection,
        mode: Mode,
        dry_run: bool,
        inbox: ingest::settle::Settled,
    ) -> Result<(Report, Vec<(PathBuf, FileEntry)>, Stages)> {
        let mut stages = Vec::new();
        let t = std::time::Instant::now();
        let rematch = matches!(mode, Mode::Rematch { .. });
        let mut tally = Tally::new(self.now - self.job.pending_for, rematch, self.tuning.page_events());
        let mut times = StageTimes::default();
        let (ingested, fresh) = match mode {
            Mode::Run => self.ingest(conn, inbox, &mut tally, &mut times).await.context("ingesting events")?,
            Mode::Rematch { .. } | Mode::Undo { .. } => (Ingested::default(), None),
        };
        stages.push(("ingest", t.elapsed()));
        let t = std::time::Instant::now();
        let mut undo = None;
        match mode {
            Mode::Run => {
                let unchanged = self.unchanged(conn).await?;
                self.decide_stored(conn, Scope::Pending { run_id: self.run_id, unchanged }, &mut tally, &mut times)
                    .await?
            }
            Mode::Rematch { since, until } => {
                self.decide_stored(conn, Scope::Rematch { since, until }, &mut tally, &mut times).await?;
                let kept = ledger::count_manual_in(conn, &self.job.name, since, until).await?;
                tally.kept_manual(kept);
            }
            Mode::Undo { run } => undo = Some(self.undo(conn, run, &mut tally).await?),
        }
        times.log();
        let (matched, by_rule) = (tally.matched, std::mem::take(&mut tally.by_rule));
        let (inputs, diff) = tally.into_parts();
        stages.push(("match", t.elapsed()));
        let t = std::time::Instant::now();
        let applied = self.apply(conn, inputs, fresh).await?;
        stages.push(("apply", t.elapsed()));
        let t = std::time::Instant::now();
        let Ingested { events, duplicates, rejected, files } = ingested;
        let mut report = self.report(conn, mode, dry_run, events, rejected, matched, by_rule, diff, applied).await?;
        count_files(&mut report.summary, files.iter().map(|(_, f)| f));
        report.summary.duplicates = duplicates.values().sum();
        report.summary.duplicates_by_source = duplicates;
        report.undo = undo;
        tracing::debug!("report built");
        stages.push(("report", t.elapsed()));
        Ok((report, files, stages))
    }

    /// Ingests new events; those that fit in a page are decided here and stored just before
    /// apply, with their decision (a backlog beyond a page is stored pending and decided from the
    /// table with the events left pending by earlier runs).
    async fn ingest(
        &self,
        conn: &mut PgConnection,
        inbox: ingest::settle::Settled,
        tally: &mut Tally,
        times: &mut StageTimes,
    ) -> Result<(Ingested, Option<Fresh>)> {
        let mut arrivals = Arrivals::new(&self.job.name, self.run_id, self.tuning.page_events());
        let ingested = ingest::ingest(conn, self.job, self.run_id, self.now, inbox, &mut arrivals).await?;
        times.store_ms += arrivals.store_ms;
        let events = arrivals.into_waiting();
        if events.is_empty() {
            return Ok((ingested, None));
        }
        // Until they are stored they have no id: their position stands in for it.
        let to_decide: Vec<ToDecide> = events.iter().enumerate().map(|(i, e)| ToDecide::fresh(i as i64, e)).collect();
        let t = std::time::Instant::now();
        let matching::Decisions { decisions, hints, .. } =
            matching::decide(conn, self.pool, self.job, self.tuning.chunk_events, &to_decide, true, Default::default())
                .await?;
        times.match_ms += t.elapsed().as_millis() as u64;
        times.events += to_decide.len();
        let mut rows = DecisionRows::default();
        for (e, decision) in to_decide.iter().zip(&decisions) {
            let expired = tally.book(e, decision);
            rows.push(e, decision, expired, &self.job.group_fields, Write::Always);
        }
        tally.keep_hints(hints);
        drop(to_decide);
        tracing::debug!(events = events.len(), "new events decided");
        Ok((ingested, Some(Fresh { rows, events })))
    }

    /// The pending events that need not be decided again, when there are enough of them for
    /// finding them to be worth it (`Tuning::retry_all_below`) and the job's last run decided
    /// with the same rules ([`record::baseline`]): retrying an event whose candidate calls cannot
    /// have changed since its decision was checked would decide it as before.
    async fn unchanged(&self, conn: &mut PgConnection) -> Result<Option<ledger::Unchanged>> {
        let job = self.job;
        if !ledger::pending_at_least(conn, &job.name, self.tuning.retry_all_below).await? {
            return Ok(None);
        }
        let Some((since_run, snapshot)) = record::baseline(conn, job, self.run_id).await? else {
            tracing::info!("every pending event is retried: no earlier run of the job decided with these rules");
            return Ok(None);
        };
        let t = std::time::Instant::now();
        let changed = crate::calldata::changed_since(conn, &snapshot, job).await?;
        let elapsed_ms = t.elapsed().as_millis() as u64;
        match &changed {
            crate::calldata::Changed::Anywhere => tracing::info!(
                since_run,
                elapsed_ms,
                "call data changed everywhere since run {since_run} started: only events missing a key are left as they are"
            ),
            crate::calldata::Changed::Within(windows) => tracing::info!(
                since_run,
                windows = windows.len(),
                elapsed_ms,
                "pending events retried only where calls changed since run {since_run} started"
            ),
        }
        let windows = changed.into_windows();
        Ok(Some(ledger::Unchanged { since_run, expire_before: self.now - job.pending_for, windows }))
    }

    /// Decides every stored event in scope (for a run, those pending from earlier runs and a
    /// backlog this run stored pending; events it decided as it ingested them are left out) and
    /// stores the decisions that changed.
    ///
    /// Events are read, decided and stored a page at a time in (EventTime, id) order, so memory
    /// does not grow with the number of events in scope; only the tally is kept across pages.
    async fn decide_stored(
        &self,
        conn: &mut PgConnection,
        scope: Scope,
        tally: &mut Tally,
        times: &mut StageTimes,
    ) -> Result<()> {
        let page = self.tuning.page_events();
        // Where matched calls are helps apply start: worth reading for pending events, which a
        // run decides for the first time or which find their call now; a rematch confirms most
        // of its matches, and apply finds the few calls it touches by id.
        let placed = matches!(scope, Scope::Pending { .. });
        let t = std::time::Instant::now();
        let mut in_scope = ledger::InScope::open(conn, self.job, scope).await?;
        // A rematch reads its first page on another connection while the run's connection
        // reads the calls for the page's first chunk, whose span the time index tells: every
        // event of a rematch's scope is sessionless (and `decide` checks the span).
        let (mut to_decide, mut calls_ahead) = match in_scope.next_span(conn, self.tuning.chunk_events).await? {
            Some(span) => {
                let first_page = async {
                    let mut other = crate::db::begin(self.pool).await.context("connecting to read the events")?;
                    in_scope.next(&mut other, page).await
                };
                let calls = matching::calls_ahead(conn, self.pool, self.job, span, placed);
                let (events, calls) = tokio::try_join!(first_page, calls)?;
                (events, Some(calls))
            }
            None => (in_scope.next(conn, page).await?, None),
        };
        // For a rematch, the first page's read and the first chunk's calls beside it: the time
        // before matching can start.
        times.read_ms += t.elapsed().as_millis() as u64;
        let mut in_scope = Some(in_scope);
        let mut groups_ahead = None;
        while !to_decide.is_empty() {
            times.events += to_decide.len();
            times.read += to_decide.len();
            let last = to_decide.len() < page;
            // A rematch's next page is read on another connection while this one is decided:
            // PostgreSQL extracts its keys while polars matches. Its events are not this page's,
            // the only ones the run writes before it reads them, so it reads what the run's
            // connection would. First it finds what the page's first chunk spans, and the calls
            // for that chunk are read while this page's last chunk is matched; after the page,
            // the call groups it can match, which its first chunk would otherwise wait for.
            let (chunk_events, mut next_page) = (self.tuning.chunk_events, None);
            let reading = match in_scope.take() {
                Some(mut scope) if !last && scope.reads_database() => {
                    let (pool, job) = (self.pool.clone(), self.job.clone());
                    let (span, spanned) = tokio::sync::oneshot::channel();
                    next_page = Some(spanned);
                    Some(AbortOnDrop(tokio::spawn(async move {
                        let next = async {
                            let mut other =
                                crate::db::begin(&pool).await.context("connecting to read the next events")?;
                            // Unheard when this page has no sessionless events: nothing to read
                            // ahead; unsent on an error, which the page's read then returns.
                            let _ = span.send(scope.next_span(&mut other, chunk_events).await?);
                            let events = scope.next(&mut other, page).await?;
                            let groups = matching::groups_for(&mut other, &job, &events).await?;
                            anyhow::Ok((events, Some(groups)))
                        };
                        let next = next.await;
                        (scope, next)
                    })))
                }
                other => {
                    in_scope = other;
                    None
                }
            };
            let t = std::time::Instant::now();
            let ahead = matching::Ahead { calls: calls_ahead.take(), groups: groups_ahead.take(), next_page };
            let matching::Decisions { decisions, hints, ahead } =
                matching::decide(conn, self.pool, self.job, chunk_events, &to_decide, placed, ahead).await?;
            calls_ahead = ahead;
            times.match_ms += t.elapsed().as_millis() as u64;

            let mut rows = DecisionRows::default();
            for (e, decision) in to_decide.iter().zip(&decisions) {
                let expired = tally.book(e, decision);
                if rows.push(e, decision, expired, &self.job.group_fields, Write::IfChanged) {
                    tally.recompute_target(decision);
                }
            }
            tally.keep_hints(hints);
            let t = std::time::Instant::now();
            rows.store(conn, self.run_id, self.job).await?;
            times.store_ms += t.elapsed().as_millis() as u64;
            times.stored += rows.id.len();
            tally.rewrote(&rows.id);
            if last {
                break;
            }
            let t = std::time::Instant::now();
            (to_decide, groups_ahead) = match reading {
                Some(mut task) => {
                    let (scope, next) = (&mut task.0).await.context("reading the next events")?;
                    in_scope = Some(scope);
                    next?
                }
                None => (in_scope.as_mut().expect("kept when not read ahead").next(conn, page).await?, None),
            };
            times.read_ms += t.elapsed().as_millis() as u64;
        }
        Ok(())
    }

    /// Reverts the decisions run `run` made that are still as it left them, each to what it
    /// was before; the others are listed as skipped, with who changed them since.
    async fn undo(&self, conn: &mut PgConnection, run: i64, tally: &mut Tally) -> Result<report::UndoReport> {
        let mut rows = Vec::new();
        let mut skipped = Vec::new();
        let mut skipped_total = 0;
        for change in ledger::changes_of_run(conn, run).await? {
            match change {
                ledger::Undoable::Revert { event_id, now, before } => {
                    tally.touch(&now.target, &before.target);
                    rows.push((event_id, *before));
                }
                ledger::Undoable::Skipped { event_id, by_run, by_person } => {
                    skipped_total += 1;
                    if skipped.len() < report::UNDO_SKIPPED_LISTED {
                        let by = match (by_run, by_person) {
                            (Some(r), _) => format!("run {r}"),
                            (None, Some(p)) => p,
                            (None, None) => "?".to_owned(),
                        };
                        skipped.push(report::UndoSkipped { event_id, changed_by: by });
                    }
                }
            }
        }
        let ids: Vec<i64> = rows.iter().map(|(id, _)| *id).collect();
        ledger::write_decisions(conn, &rows, ledger::By::Run(self.run_id), &self.job.group_fields).await?;
        tally.rewrote(&ids);
        tracing::info!(run, reverted = rows.len(), skipped = skipped_total, "decisions reverted");
        Ok(report::UndoReport { run, reverted: rows.len() as u64, skipped_total, skipped })
    }

    /// Stores this run's new events and applies (reading the touched targets on a second
    /// connection meanwhile when it can: [`apply::start`]).
    async fn apply(&self, conn: &mut PgConnection, inputs: apply::Inputs, fresh: Option<Fresh>) -> Result<Applied> {
        let pb = progress::spinner("apply", "targets");
        pb.set_message(format!(
            "recomputing {} calls, {} groups and their group members",
            inputs.calls.len(),
            inputs.groups.len()
        ));
        let fresh = fresh.map(Arc::new);
        let new_events = fresh.as_ref().map_or(0, |f| f.events.len());
        let (adding, group_fields) = (fresh.clone(), self.job.group_fields.clone());
        // Apply's reader cannot see the new events: they are merged from memory.
        let add_new = move |this_run: &mut apply::ThisRun| {
            for (position, e, kind, target) in adding.iter().flat_map(|f| f.matched()) {
                let part = ledger::group_part(&e.event.metadata, kind, &group_fields);
                this_run.push_new(position, e.event.event_time, &e.event.metadata, &part, kind, target.to_owned());
            }
        };
        let started = std::time::Instant::now();
        let applying = apply::start(conn, self.pool, &self.tuning, inputs, new_events, add_new).await?;
        if let Some(fresh) = fresh {
            let t = std::time::Instant::now();
            fresh.store(conn, self.job, self.run_id).await?;
            tracing::info!(
                events = fresh.events.len(),
                elapsed_ms = t.elapsed().as_millis() as u64,
                "new events stored"
            );
            // Hundreds of thousands of small allocations: freed off the run's path.
            std::thread::spawn(move || drop(fresh));
        }
        if matches!(applying, apply::Applying::Beside(_)) {
            // The mark of a run whose apply reads while its events are stored (tests look for it).
            tracing::debug!(elapsed_ms = started.elapsed().as_millis() as u64, "this run's events stored");
        }
        let applied = applying.finish(conn).await;
        pb.finish_and_clear();
        applied
    }

    /// The report: the unmatched events streamed from the database into the report's partial
    /// folder inside the transaction (the list is what this run commits, or, dry, would have;
    /// [`report::write_all`] completes it), with the summary.
    #[allow(clippy::too_many_arguments)]
    async fn report(
        &self,
        conn: &mut PgConnection,
        mode: Mode,
        dry_run: bool,
        ingested: u64,
        rejected: Vec<crate::event::Rejected>,
        matched: u64,
        by_rule: std::collections::BTreeMap<String, u64>,
        diff: Option<report::Diff>,
        applied: Applied,
    ) -> Result<Report> {
        let job = self.job;
        let partial = report::partial_dir(&job.report_dir.join(self.run_id.to_string()));
        let unmatched =
            report::unmatched::stream(conn, &job.name, self.run_id, job.pending_for, &partial, self.tuning.report)
                .await?;
        let dismissed = ledger::count_dismissed(conn, &job.name).await?;
        let since = record::previous_start(conn, &job.name, self.run_id).await?;
        let (manual_total, manual) = report::manual::since(conn, &job.name, since).await?;
        // Only when analysts decided something since the previous run: otherwise nothing new to
        // learn from, and the nightly does no more work.
        let suggested = match mode {
            Mode::Run if manual_total > 0 => self.suggested(conn).await,
            _ => None,
        };
        let summary = Summary {
            dismissed,
            manual: manual_total,
            ingested,
            rejected: rejected.len() as u64,
            matched,
            unmatched: unmatched.total,
            by_rule,
            by_reason: unmatched.by_reason.clone(),
            expired: unmatched.expired,
            pending: unmatched.total - unmatched.expired,
            calls_updated: applied.calls_updated,
            groups_updated: applied.groups_updated,
            // Counted once the files are known: see `count_files`.
            files_ingested: 0,
            files_duplicate: 0,
            files_failed: 0,
            files_later: 0,
            // Filled in with the files'.
            duplicates: 0,
            duplicates_by_source: Default::default(),
        };
        Ok(Report {
            run_id: self.run_id,
            job: job.name.clone(),
            kind: mode.kind(),
            started_at: self.now,
            finished_at: Utc::now(),
            dry_run,
            summary,
            unmatched,
            rejected,
            // Filled in once the files are archived.
            files: Vec::new(),
            diff,
            undo: None,
            manual,
            suggested,
        })
    }

    /// The report's line about rule changes without conflicts, from `suggest` run inside the
    /// run's transaction (so on its decisions), in a savepoint: a failure is logged and leaves
    /// the line out, never the run.
    async fn suggested(&self, conn: &mut PgConnection) -> Option<report::Suggested> {
        let t = std::time::Instant::now();
        let found = async {
            let mut savepoint = sqlx::Connection::begin(&mut *conn).await?;
            let found = crate::suggest::on(
                &mut savepoint,
                self.job,
                Default::default(),
                crate::suggest::MIN_SUPPORT,
                &self.tuning,
            )
            .await;
            savepoint.rollback().await?;
            found
        }
        .await;
        let elapsed_ms = t.elapsed().as_millis() as u64;
        match found {
            Ok(found) => {
                let free: Vec<_> = found.suggestions.iter().filter(|s| s.simulated.conflicts == 0).collect();
                tracing::info!(
                    suggestions = found.suggestions.len(),
                    conflict_free = free.len(),
                    elapsed_ms,
                    "rule changes suggested"
                );
                (!free.is_empty()).then(|| report::Suggested {
                    changes: free.len() as u64,
                    matched_more: free.iter().map(|s| s.simulated.matched_more).max().unwrap_or(0),
                    command: format!("callrecon suggest --job {}", self.job.path.display()),
                })
            }
            Err(e) => {
                tracing::warn!(error = %crate::db::error_line(&e), elapsed_ms, "rule changes could not be suggested; the run goes on");
                None
            }
        }
    }

    /// Writes the report of a committed (or dry) run, records its end, prunes old reports and
    /// notifies. What fails now is reported loudly and recorded where possible, but cannot
    /// make the run a failure.
    async fn after_commit(&self, mut report: Report, dry_run: bool, mut stages: Stages) -> Result<Finished> {
        let (pool, job, run_id) = (self.pool, self.job, self.run_id);
        report.finished_at = Utc::now();
        let dir = job.report_dir.join(report.run_id.to_string());
        let mut problems = Vec::new();
        let t = std::time::Instant::now();
        let written = match report::write_all(&report, &dir) {
            Ok(()) => true,
            Err(e) if dry_run => return Err(e).with_context(|| format!("writing the report to {}", dir.display())),
            Err(e) => {
                problems.push(format!(
                    "its report could not be written to {}: {}",
                    dir.display(),
                    crate::db::error_line(&e)
                ));
                false
            }
        };
        tracing::debug!("report written");
        if let Some(report_stage) = stages.last_mut() {
            report_stage.1 += t.elapsed();
        }
        let problem = problems.first().map(|p| format!("the run completed but {p}"));
        let dir_text = dir.to_string_lossy();
        if let Err(e) = record::finished(pool, run_id, report.finished_at, &report.summary, &dir_text, problem).await {
            problems.push(format!("its end could not be recorded in `runs`: {}", crate::db::describe(&e)));
        }
        if written {
            report::retention::prune(pool, job, run_id).await;
        }
        for problem in &problems {
            tracing::error!(run_id, problem = %problem, "the run committed, but {problem}");
        }
        notify(pool, job, run_id, report::webhook::payload(&report, &dir)).await;
        Ok(Finished { report, dir, problems, stages })
    }
}

/// Sends the job's webhook, if any, and records the outcome on the run. Never fails: a lost
/// notification is logged and recorded, the run stands.
async fn notify(pool: &PgPool, job: &Job, run_id: i64, body: serde_json::Value) {
    let Some(url) = &job.webhook else { return };
    let outcome = report::webhook::notify(url, &body).await;
    if let Err(error) = &outcome {
        tracing::error!(%error, run_id, "webhook notification failed; the run's outcome stands");
    }
    record::notification(pool, run_id, outcome.as_ref().err().map_or("delivered", String::as_str)).await;
}

/// The time of each stage, in order.
type Stages = Vec<(&'static str, std::time::Duration)>;

/// Time spent per stage across pages, logged once at the end of matching.
#[derive(Default, Clone, Copy)]
struct StageTimes {
    /// Events decided (this run's new ones and those read back).
    events: usize,
    /// Events read back from the table.
    read: usize,
    read_ms: u64,
    match_ms: u64,
    store_ms: u64,
    stored: usize,
}

impl StageTimes {
    fn log(self) {
        let StageTimes { events, read, read_ms, match_ms, store_ms, stored } = self;
        tracing::info!(events = read, elapsed_ms = read_ms, "stored events to match read");
        tracing::info!(events, elapsed_ms = match_ms, "matched");
        tracing::info!(stored, elapsed_ms = store_ms, "decisions stored");
    }
}

/// The summary's file counts.
fn count_files<'f>(summary: &mut Summary, files: impl Iterator<Item = &'f FileEntry> + Clone) {
    let count = |s: FileStatus| files.clone().filter(|f| f.status == s).count() as u64;
    summary.files_ingested = count(FileStatus::Ingested);
    summary.files_duplicate = count(FileStatus::Duplicate);
    summary.files_failed = count(FileStatus::Failed);
    summary.files_later = count(FileStatus::Later);
}
