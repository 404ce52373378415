//! One reconciliation run: `ingest → match → apply → report`, all or nothing.
//!
//! Everything that changes the database happens in one transaction holding the job's advisory
//! lock; inbox files move to the archive only after it commits, and a dry run rolls it back. The
//! `runs` row ([`record`]) is written outside that transaction so failed and dry runs are
//! recorded too.
//!
//! Architecture invariant: this module conducts; it holds no SQL of its own. Each stage is a
//! call into its module, and what flows between them is plain data.

mod finish;
pub mod record;
mod summary;

pub use record::AlreadyRunning;

use std::path::PathBuf;

use anyhow::{Context, Result};
use chrono::{DateTime, Utc};
use sqlx::{PgConnection, PgPool};

use crate::apply;
use crate::decide::{self, Decided};
use crate::decision::RunKind;
use crate::ingest::{self, Ingested};
use crate::job::Job;
use crate::ledger::{self, Arrivals, Scope};
use crate::report::{self, FileEntry, Report};
use crate::tuning::Tuning;

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
            finish::notify(
                pool,
                job,
                run_id,
                report::webhook::failure_payload(run_id, &job.name, kind, dry_run, &error),
            )
            .await;
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
        let expired_before = self.now - self.job.pending_for;
        let mut decide = decide::Stage::new(self.pool, self.job, &self.tuning, self.run_id, expired_before, rematch);
        let (ingested, fresh) = match mode {
            Mode::Run => {
                let mut arrivals = Arrivals::new(&self.job.name, self.run_id, self.tuning.page_events());
                let ingested = ingest::ingest(conn, self.job, self.run_id, self.now, inbox, &mut arrivals)
                    .await
                    .context("ingesting events")?;
                (ingested, decide.fresh(conn, arrivals).await.context("ingesting events")?)
            }
            Mode::Rematch { .. } | Mode::Undo { .. } => (Ingested::default(), None),
        };
        stages.push(("ingest", t.elapsed()));
        let t = std::time::Instant::now();
        let mut undo = None;
        match mode {
            Mode::Run => {
                let unchanged = self.unchanged(conn).await?;
                decide.stored(conn, Scope::Pending { run_id: self.run_id, unchanged }).await?
            }
            Mode::Rematch { since, until } => {
                decide.stored(conn, Scope::Rematch { since, until }).await?;
                decide.kept_manual(ledger::count_manual_in(conn, &self.job.name, since, until).await?);
            }
            Mode::Undo { run } => undo = Some(decide.undo(conn, run).await?),
        }
        let Decided { to_apply, matched, by_rule, diff } = decide.finish();
        stages.push(("match", t.elapsed()));
        let t = std::time::Instant::now();
        let applied = apply::run(conn, self.pool, &self.tuning, self.job, self.run_id, to_apply, fresh).await?;
        stages.push(("apply", t.elapsed()));
        let t = std::time::Instant::now();
        let Ingested { events, duplicates, rejected, files } = ingested;
        let mut report = self.report(conn, mode, dry_run, events, rejected, matched, by_rule, diff, applied).await?;
        summary::count_files(&mut report.summary, files.iter().map(|(_, f)| f));
        report.summary.duplicates = duplicates.values().sum();
        report.summary.duplicates_by_source = duplicates;
        report.undo = undo;
        tracing::debug!("report built");
        stages.push(("report", t.elapsed()));
        Ok((report, files, stages))
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
}

/// The time of each stage, in order.
pub(super) type Stages = Vec<(&'static str, std::time::Duration)>;
