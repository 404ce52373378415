//! Which pending events a run retries: all of them, unless there are many and the job's last
//! run decided with the same rules, when those whose candidate calls cannot have changed since
//! are left as they are ([`crate::ledger::Unchanged`]).

use anyhow::Result;
use chrono::{DateTime, Utc};
use sqlx::PgConnection;

use crate::calldata::{self, Changed};
use crate::job::Job;
use crate::ledger::{self, Unchanged};
use crate::tuning::Tuning;

/// The pending events of `job` that run `run_id` need not decide again, when there are enough
/// of them for finding them to be worth it (`Tuning::retry_all_below`) and the job's last run
/// decided with the same rules ([`crate::runs::baseline`]): retrying an event whose candidate
/// calls cannot have changed since its decision was checked would decide it as before.
pub(super) async fn unchanged(
    conn: &mut PgConnection,
    job: &Job,
    tuning: &Tuning,
    run_id: i64,
    expire_before: DateTime<Utc>,
) -> Result<Option<Unchanged>> {
    if !ledger::pending_at_least(conn, &job.name, tuning.retry_all_below).await? {
        return Ok(None);
    }
    let Some((since_run, snapshot)) = crate::runs::baseline(conn, job, run_id).await? else {
        tracing::info!("every pending event is retried: no earlier run of the job decided with these rules");
        return Ok(None);
    };
    let t = std::time::Instant::now();
    let changed = calldata::changed_since(conn, &snapshot, job).await?;
    let elapsed_ms = t.elapsed().as_millis() as u64;
    match &changed {
        Changed::Anywhere => tracing::info!(
            since_run,
            elapsed_ms,
            "call data changed everywhere since run {since_run} started: only events missing a key are left as they are"
        ),
        Changed::Within(windows) => tracing::info!(
            since_run,
            windows = windows.len(),
            elapsed_ms,
            "pending events retried only where calls changed since run {since_run} started"
        ),
    }
    Ok(Some(Unchanged { since_run, expire_before, windows: changed.into_windows() }))
}
