//! The run's report: the unmatched events streamed into its partial folder inside the run's
//! transaction, and the summary's counts.

use std::collections::BTreeMap;

use anyhow::Result;
use chrono::Utc;
use sqlx::PgConnection;

use super::{Mode, Run, record};
use crate::apply::Applied;
use crate::decide::Diff;
use crate::ledger;
use crate::report::{self, FileEntry, FileStatus, Report, Summary};

impl Run<'_> {
    /// The report: the unmatched events streamed from the database into the report's partial
    /// folder inside the transaction (the list is what this run commits, or, dry, would have;
    /// [`report::write_all`] completes it), with the summary.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn report(
        &self,
        conn: &mut PgConnection,
        mode: Mode,
        dry_run: bool,
        ingested: u64,
        rejected: Vec<crate::event::Rejected>,
        matched: u64,
        by_rule: BTreeMap<String, u64>,
        diff: Option<Diff>,
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
}

/// The summary's file counts.
pub(super) fn count_files<'f>(summary: &mut Summary, files: impl Iterator<Item = &'f FileEntry> + Clone) {
    let count = |s: FileStatus| files.clone().filter(|f| f.status == s).count() as u64;
    summary.files_ingested = count(FileStatus::Ingested);
    summary.files_duplicate = count(FileStatus::Duplicate);
    summary.files_failed = count(FileStatus::Failed);
    summary.files_later = count(FileStatus::Later);
}
