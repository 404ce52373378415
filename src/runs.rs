//! The `runs` table, every statement on it: one row per run, written outside the run's
//! transaction (so failed and dry runs are recorded too), except the mark of success, written
//! inside it; read by `report list`/`show`, pruning, the scheduler, the metrics and the desk.
//!
//! **Invariant:** a store: plain rows out (a run's summary as the JSON stored), no type of a
//! stage. The history of events joins `runs` for a run's kind and start in `ledger/history.rs`:
//! those statements are about events.

use anyhow::{Context, Result, bail};
use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::{PgConnection, PgPool};

use crate::decision::RunKind;
use crate::job::Job;

/// Another run of the same job holds the lock.
#[derive(Debug, thiserror::Error)]
#[error("job {job} is already running (since {since})")]
pub struct AlreadyRunning {
    pub job: String,
    pub since: String,
}

/// Takes the job's advisory lock in the run's transaction (or says who holds it), marks a run
/// of the job still recorded as running abandoned (we hold the lock: it was killed), and
/// records the new run with the snapshot of this moment (its `calls_snapshot`: see
/// [`baseline`]). Returns its id and start.
pub async fn start(
    pool: &PgPool,
    tx: &mut PgConnection,
    job: &Job,
    kind: RunKind,
    dry_run: bool,
    undoes: Option<i64>,
) -> Result<(i64, DateTime<Utc>)> {
    lock_job(pool, tx, job).await?;
    let abandoned = sqlx::query(
        "update runs set status = 'abandoned', finished_at = now(),
                error = 'the process ended before the run finished; nothing it did was kept'
         where job = $1 and status = 'running'",
    )
    .bind(&job.name);
    crate::db::execute(pool, abandoned).await?;
    let mut tx = crate::db::begin(pool).await?;
    let started = sqlx::query_as(
        "insert into runs (job, kind, dry_run, rules_fingerprint, job_file, undoes, calls_snapshot)
         values ($1, $2, $3, $4, $5, $6, pg_current_snapshot()::text)
         returning id, started_at",
    )
    .bind(&job.name)
    .bind(kind.as_str())
    .bind(dry_run)
    .bind(&job.rules_fingerprint)
    .bind(job.path.to_string_lossy().as_ref())
    .bind(undoes)
    .fetch_one(&mut *tx)
    .await
    .context("recording the run")?;
    tx.commit().await.context("recording the run")?;
    Ok(started)
}

/// Takes the job's advisory lock in the transaction `tx`, until it ends, or says who holds it:
/// runs, rematches, undos and analysts' decisions of one job exclude each other.
pub async fn lock_job(pool: &PgPool, tx: &mut PgConnection, job: &Job) -> Result<()> {
    let locked: bool = sqlx::query_scalar("select pg_try_advisory_xact_lock(hashtextextended($1, 0))")
        .bind(crate::db::job_lock_key(&job.name))
        .fetch_one(&mut *tx)
        .await?;
    if !locked {
        bail!(AlreadyRunning { job: job.name.clone(), since: lock_holder_since(pool, &job.name).await });
    }
    Ok(())
}

/// When the run holding the job's lock started: its transaction's start, from the lock itself
/// (its `runs` row may not be written yet), for the "already running" message.
async fn lock_holder_since(pool: &PgPool, job: &str) -> String {
    let Ok(mut tx) = crate::db::begin(pool).await else { return "a moment ago".to_owned() };
    let since: Result<Option<DateTime<Utc>>, _> = sqlx::query_scalar(
        "select min(a.xact_start) from pg_locks l join pg_stat_activity a on a.pid = l.pid
         where l.locktype = 'advisory' and l.granted and l.database = (select oid from pg_database where datname = current_database())
           and (l.classid::bigint << 32 | l.objid::bigint) = hashtextextended($1, 0)",
    )
    .bind(crate::db::job_lock_key(job))
    .fetch_one(&mut *tx)
    .await;
    match since {
        Ok(Some(t)) => t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        _ => "a moment ago".to_owned(),
    }
}

/// A past run as an undo needs it: its job, kind, the job file it ran with, and whether it
/// committed changes (succeeded and not dry).
#[derive(Debug, sqlx::FromRow)]
pub struct Past {
    pub job: String,
    pub kind: String,
    pub job_file: Option<String>,
    pub committed: bool,
}

pub async fn past(pool: &PgPool, run_id: i64) -> Result<Option<Past>> {
    sqlx::query_as(
        "select job, kind, job_file, status = 'succeeded' and not dry_run as committed from runs where id = $1",
    )
    .bind(run_id)
    .fetch_optional(&mut *crate::db::begin(pool).await?)
    .await
    .context("reading runs")
}

/// When the job's run before `run_id` started (the report lists manual decisions since).
pub async fn previous_start(conn: &mut PgConnection, job: &str, run_id: i64) -> Result<Option<DateTime<Utc>>> {
    sqlx::query_scalar(
        "select max(started_at) from runs where job = $1 and id < $2 and status = 'succeeded' and not dry_run",
    )
    .bind(job)
    .bind(run_id)
    .fetch_one(&mut *conn)
    .await
    .context("reading runs")
}

/// The job's last committed run (not a rematch or an undo) before `run_id` that decided with the
/// same rules, and the snapshot it took before it read any call: that run left every pending
/// event's decision right for the call data that snapshot sees.
pub async fn baseline(conn: &mut PgConnection, job: &Job, run_id: i64) -> Result<Option<(i64, String)>> {
    sqlx::query_as(
        "select id, calls_snapshot from runs
         where job = $1 and id < $2 and kind = 'run' and status = 'succeeded' and not dry_run
           and rules_fingerprint = $3 and calls_snapshot is not null
         order by id desc limit 1",
    )
    .bind(&job.name)
    .bind(run_id)
    .bind(&job.rules_fingerprint)
    .fetch_optional(&mut *conn)
    .await
    .context("reading runs")
}

/// Marks the run succeeded in its own transaction, just before the commit: a run killed after
/// its commit is never taken for one that changed nothing, and whether a commit that reported
/// an error happened can be read back ([`committed`]).
pub async fn succeeded_in(tx: &mut PgConnection, run_id: i64, summary: &impl serde::Serialize) -> Result<()> {
    sqlx::query("update runs set status = 'succeeded', finished_at = now(), summary = $2 where id = $1")
        .bind(run_id)
        .bind(serde_json::to_value(summary)?)
        .execute(&mut *tx)
        .await?;
    Ok(())
}

/// Whether run `run_id` committed, read on another connection (`None`: it cannot be told).
pub async fn committed(pool: &PgPool, run_id: i64) -> Option<bool> {
    let status: Option<String> = sqlx::query_scalar("select status from runs where id = $1")
        .bind(run_id)
        .fetch_optional(&mut *crate::db::begin(pool).await.ok()?)
        .await
        .ok()?;
    Some(status.as_deref() == Some("succeeded"))
}

/// Records a committed (or dry) run's end: when, its summary, where its report is, and the
/// first problem after the commit, if any.
pub async fn finished(
    pool: &PgPool,
    run_id: i64,
    at: DateTime<Utc>,
    summary: &impl serde::Serialize,
    report_dir: &str,
    problem: Option<String>,
) -> Result<(), sqlx::Error> {
    let statement = sqlx::query(
        "update runs set status = 'succeeded', finished_at = $2, summary = $3, report_dir = $4, error = $5 where id = $1",
    )
    .bind(run_id)
    .bind(at)
    .bind(serde_json::to_value(summary).unwrap_or(Value::Null))
    .bind(report_dir)
    .bind(problem);
    crate::db::execute(pool, statement).await.map(drop)
}

/// Records a failed run (best effort: the error itself is what the caller reports).
pub async fn failed(pool: &PgPool, run_id: i64, error: &str) {
    let statement = sqlx::query("update runs set status = 'failed', finished_at = now(), error = $2 where id = $1")
        .bind(run_id)
        .bind(error);
    let _ = crate::db::execute(pool, statement).await;
}

/// Notes something about a run on its `error` column, shown by `report list` (the scheduler
/// notes that it ran the last good version of a job file now refused). Best effort.
pub async fn note(pool: &PgPool, run_id: i64, note: &str) {
    let statement = sqlx::query("update runs set error = $2 where id = $1").bind(run_id).bind(note);
    let _ = crate::db::execute(pool, statement).await;
}

/// Records the outcome of the webhook notification.
pub async fn notification(pool: &PgPool, run_id: i64, outcome: &str) {
    let statement = sqlx::query("update runs set notification = $2 where id = $1").bind(run_id).bind(outcome);
    let recorded = crate::db::execute(pool, statement).await;
    if let Err(e) = recorded {
        tracing::error!(error = %e, run_id, "could not record the webhook outcome");
    }
}

/// A run as the lists of runs (`report list`, the desk's `/review/runs`) show it.
#[derive(Debug, sqlx::FromRow)]
pub struct Recent {
    pub id: i64,
    pub job: String,
    pub kind: String,
    pub dry_run: bool,
    pub started_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
    pub status: String,
    /// The run's `Summary` as stored (none before the run ended, or when it failed).
    pub summary: Option<Value>,
    pub error: Option<String>,
    /// The webhook's outcome (`delivered` or what went wrong).
    pub notification: Option<String>,
    pub report_dir: Option<String>,
    pub report_pruned_at: Option<DateTime<Utc>>,
}

impl Recent {
    /// Its report can be served: written and not pruned.
    pub fn has_report(&self) -> bool {
        self.report_dir.is_some() && self.report_pruned_at.is_none()
    }
}

/// The latest `limit` runs, of one job or all, newest first.
pub async fn recent(pool: &PgPool, job: Option<&str>, limit: i64) -> Result<Vec<Recent>> {
    sqlx::query_as(
        "select id, job, kind, dry_run, started_at, finished_at, status, summary, error, notification,
                report_dir, report_pruned_at
         from runs where $1::text is null or job = $1 order by id desc limit $2",
    )
    .bind(job)
    .bind(limit)
    .fetch_all(pool)
    .await
    .context("reading runs")
}

/// Where a run's report is, as `report show` and the desk need it.
#[derive(Debug, sqlx::FromRow)]
pub struct ReportOf {
    pub status: String,
    pub report_dir: Option<String>,
    pub error: Option<String>,
    pub report_pruned_at: Option<DateTime<Utc>>,
}

/// Run `id`'s report folder, status and error (`None`: no such run).
pub async fn report_of(pool: &PgPool, id: i64) -> Result<Option<ReportOf>> {
    sqlx::query_as("select status, report_dir, error, report_pruned_at from runs where id = $1")
        .bind(id)
        .fetch_optional(pool)
        .await
        .context("reading the run")
}

/// A report folder `[report] keep` may prune.
#[derive(Debug, sqlx::FromRow)]
pub struct Kept {
    pub id: i64,
    pub report_dir: String,
    pub started_at: DateTime<Utc>,
}

/// The job's report folders not pruned yet, of runs no longer running, newest first.
pub async fn kept_reports(pool: &PgPool, job: &str) -> Result<Vec<Kept>> {
    sqlx::query_as(
        "select id, report_dir, started_at from runs
         where job = $1 and report_dir is not null and report_pruned_at is null and status <> 'running'
         order by id desc",
    )
    .bind(job)
    .fetch_all(&mut *crate::db::begin(pool).await?)
    .await
    .context("reading the job's reports")
}

/// Marks the reports of runs `ids` pruned.
pub async fn mark_pruned(pool: &PgPool, ids: &[i64]) -> Result<()> {
    let statement = sqlx::query("update runs set report_pruned_at = now() where id = any($1)").bind(ids);
    crate::db::execute(pool, statement).await.context("recording pruned reports")?;
    Ok(())
}

/// Whether run `id` is recorded as running (`None`: no such run).
pub async fn running(pool: &PgPool, id: i64) -> Result<Option<bool>> {
    Ok(sqlx::query_scalar("select status = 'running' from runs where id = $1")
        .bind(id)
        .fetch_optional(&mut *crate::db::begin(pool).await?)
        .await?)
}

/// The start of the job's last successful scheduled-kind run (`kind = 'run'`, not dry) and of
/// its first, for the fire time a scheduler missed.
#[derive(Debug, sqlx::FromRow)]
pub struct Starts {
    pub last_succeeded: Option<DateTime<Utc>>,
    pub first: Option<DateTime<Utc>>,
}

pub async fn starts(pool: &PgPool, job: &str) -> Result<Starts> {
    Ok(sqlx::query_as(
        "select max(started_at) filter (where status = 'succeeded') as last_succeeded, min(started_at) as first
         from runs where job = $1 and kind = 'run' and not dry_run",
    )
    .bind(job)
    .fetch_one(&mut *crate::db::begin(pool).await?)
    .await?)
}

/// A run and its status.
#[derive(Debug, sqlx::FromRow)]
pub struct Status {
    pub id: i64,
    pub status: String,
}

/// The job's latest run (`kind = 'run'`, not dry) started at or after `at`: a fire time served
/// by another scheduler or a manual run.
pub async fn started_since(pool: &PgPool, job: &str, at: DateTime<Utc>) -> Result<Option<Status>, sqlx::Error> {
    sqlx::query_as(
        "select id, status from runs
         where job = $1 and kind = 'run' and not dry_run and started_at >= $2
         order by id desc limit 1",
    )
    .bind(job)
    .bind(at)
    .fetch_optional(&mut *crate::db::begin(pool).await?)
    .await
}

/// A job's runs as its metrics see them (`kind = 'run'`, not dry).
#[derive(Debug, sqlx::FromRow)]
pub struct Trend {
    pub job: String,
    /// The last successful and failed run's end, in seconds since the epoch.
    pub last_success: Option<f64>,
    pub last_failure: Option<f64>,
    /// The pending events after each of the last 30 successful runs, newest first.
    pub pending: Vec<i64>,
}

/// [`Trend`] of each of `jobs`, in their order.
pub async fn trends(conn: &mut PgConnection, jobs: &[String]) -> Result<Vec<Trend>, sqlx::Error> {
    sqlx::query_as(
        "select j as job,
                (select extract(epoch from max(finished_at))::float8 from runs
                 where job = j and kind = 'run' and not dry_run and status = 'succeeded') as last_success,
                (select extract(epoch from max(finished_at))::float8 from runs
                 where job = j and kind = 'run' and not dry_run and status = 'failed') as last_failure,
                array(select coalesce((summary->>'pending')::bigint, 0) from runs
                      where job = j and kind = 'run' and not dry_run and status = 'succeeded'
                      order by id desc limit 30) as pending
         from unnest($1::text[]) with ordinality as t(j, n) order by n",
    )
    .bind(jobs)
    .fetch_all(&mut *conn)
    .await
}

/// The jobs that have run (for the desk's job filter).
pub async fn jobs(pool: &PgPool) -> Result<Vec<String>> {
    sqlx::query_scalar("select distinct job from runs order by 1").fetch_all(pool).await.context("reading jobs")
}

/// A job and the job file its latest run that recorded one ran with.
#[derive(Debug, sqlx::FromRow)]
pub struct JobFile {
    pub job: String,
    pub job_file: String,
}

/// The job file of each job's latest run that recorded one.
pub async fn job_files(pool: &PgPool) -> Result<Vec<JobFile>> {
    sqlx::query_as("select distinct on (job) job, job_file from runs where job_file is not null order by job, id desc")
        .fetch_all(pool)
        .await
        .context("reading the job files of runs")
}
