//! `[report] keep`: after a successful run, the job's report folders beyond what it keeps are
//! removed. The runs stay in `runs` (so `report list` and the history do), marked
//! `report_pruned_at`, and `report show` of such a run says it was pruned.

use std::path::Path;

use anyhow::Result;
use chrono::Utc;
use sqlx::PgPool;

use crate::{
    job::{Job, Keep},
    runs,
};

/// Removes the job's report folders that `job.keep` no longer keeps (never that of `run_id`,
/// the run just finished), and partial folders left by runs that ended without a report.
/// Never fails the run: a folder that cannot be removed is logged and tried again next time.
pub async fn prune(pool: &PgPool, job: &Job, run_id: i64) {
    if let Err(e) = prune_inner(pool, job, run_id).await {
        tracing::warn!(error = %crate::db::error_line(&e), job = %job.name, "could not prune old reports; they are kept until the next run");
    }
}

async fn prune_inner(pool: &PgPool, job: &Job, run_id: i64) -> Result<()> {
    remove_stale_partials(pool, &job.report_dir).await?;
    if job.keep == Keep::All {
        return Ok(());
    }
    // Newest first: a count keeps the first ones, an age those started since the cut-off.
    let reports = runs::kept_reports(pool, &job.name).await?;
    let now = Utc::now();
    let mut pruned = Vec::new();
    for (i, runs::Kept { id, report_dir: dir, started_at }) in reports.into_iter().enumerate() {
        let drop = match job.keep {
            Keep::All => false,
            Keep::Count(n) => i >= n as usize,
            Keep::Age(age) => started_at < now - age,
        };
        if !drop || id == run_id {
            continue;
        }
        let dir = Path::new(&dir);
        // Only a folder named after its run, as the run wrote it.
        if dir.file_name().and_then(|n| n.to_str()) != Some(&id.to_string()) {
            tracing::warn!(run = id, dir = %dir.display(), "not pruning a report folder not named after its run");
            continue;
        }
        match std::fs::remove_dir_all(dir) {
            Ok(()) => pruned.push(id),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => pruned.push(id),
            Err(e) => tracing::warn!(run = id, dir = %dir.display(), error = %e, "could not remove an old report"),
        }
    }
    if !pruned.is_empty() {
        runs::mark_pruned(pool, &pruned).await?;
        tracing::info!(reports = pruned.len(), job = %job.name, "pruned old reports");
    }
    Ok(())
}

/// `.<run id>.partial` folders of runs no longer running: what a killed process left.
async fn remove_stale_partials(pool: &PgPool, report_dir: &Path) -> Result<()> {
    let Ok(entries) = std::fs::read_dir(report_dir) else { return Ok(()) };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(id) = name.strip_prefix('.').and_then(|n| n.strip_suffix(".partial")) else { continue };
        let Ok(id) = id.parse::<i64>() else { continue };
        let running = runs::running(pool, id).await?;
        if running != Some(true)
            && let Err(e) = std::fs::remove_dir_all(entry.path())
        {
            tracing::warn!(dir = %entry.path().display(), error = %e, "could not remove a partial report");
        }
    }
    Ok(())
}
