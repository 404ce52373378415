//! After the commit: the report put in place, the run's end recorded, old reports pruned, the
//! webhook sent. What fails now is a problem of a successful run, never a failure.

use anyhow::{Context, Result};
use chrono::Utc;
use sqlx::PgPool;

use super::{Finished, Run, Stages, record};
use crate::job::Job;
use crate::report::{self, Report};

impl Run<'_> {
    /// Writes the report of a committed (or dry) run, records its end, prunes old reports and
    /// notifies. What fails now is reported loudly and recorded where possible, but cannot
    /// make the run a failure.
    pub(super) async fn after_commit(&self, mut report: Report, dry_run: bool, mut stages: Stages) -> Result<Finished> {
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
pub(super) async fn notify(pool: &PgPool, job: &Job, run_id: i64, body: serde_json::Value) {
    let Some(url) = &job.webhook else { return };
    let outcome = report::webhook::notify(url, &body).await;
    if let Err(error) = &outcome {
        tracing::error!(%error, run_id, "webhook notification failed; the run's outcome stands");
    }
    record::notification(pool, run_id, outcome.as_ref().err().map_or("delivered", String::as_str)).await;
}
