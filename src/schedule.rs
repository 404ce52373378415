//! `callrecon schedule`: the cron daemon. Each job fires at its `schedule` in its `timezone`
//! and does one [`run::execute`] per fire time; the per-job advisory lock that `run` takes keeps
//! runs of a job from overlapping, whoever started them.
//!
//! [`next_fire`] (`fire_time.rs`) is a pure function from a cron schedule, a time zone and an
//! instant to the next fire time, with all the DST rules; `scheduled.rs` keeps each job's file,
//! re-read while the daemon runs; `signals.rs` counts the stop signals. Here: [`daemon`], one
//! task per job that sleeps to its next fire time (or a catch-up, or a retry) and runs it.

mod fire_time;
mod scheduled;
mod signals;

pub use fire_time::{fire_times, next_fire};

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;
use chrono::{DateTime, Utc};
use sqlx::PgPool;
use sqlx::postgres::PgConnectOptions;
use tokio::sync::watch;

use crate::db;
use crate::job::JobError;
use crate::metrics::{self, RunMetrics};
use crate::run::{self, AlreadyRunning, Finished, Mode};
use crate::runs;
use scheduled::Scheduled;
use signals::{signalled, watch_signals};

/// How often a waiting job re-reads its file, so that a schedule change takes effect before the
/// next fire time of the old schedule.
const RELOAD_EVERY: Duration = Duration::from_secs(30);
/// Retrying after the database could not be reached: first delay, and the longest.
const RETRY_FIRST: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(300);

/// `callrecon schedule`: runs each job at its fire times until SIGTERM or SIGINT.
///
/// The job files are checked first (an error is a [`JobError`]); the database is then connected
/// to with retries, so a scheduler started before its database waits for it.
pub async fn daemon(database_url: &str, paths: &[PathBuf], metrics_listen: Option<SocketAddr>) -> Result<()> {
    let mut jobs: Vec<Scheduled> = Vec::new();
    for path in paths {
        let s = Scheduled::load(path)?;
        if let Some(other) = jobs.iter().find(|o| o.job.name == s.job.name) {
            return Err(JobError(format!(
                "{} and {} are both job {:?}; each scheduled job needs a name of its own",
                other.path.display(),
                path.display(),
                s.job.name
            ))
            .into());
        }
        jobs.push(s);
    }
    let options: PgConnectOptions = db::connect_options(database_url)?;
    // The metrics endpoint serves until the scheduler has stopped.
    let (stop_metrics, metrics_stopped) = tokio::sync::oneshot::channel::<()>();
    let (endpoint, metrics_task) = match metrics_listen {
        Some(addr) => {
            let endpoint = metrics::Endpoint::new(jobs.iter().map(|s| s.job.name.clone()).collect());
            let (bound, task) = endpoint.clone().listen(addr, async { metrics_stopped.await.unwrap_or(()) }).await?;
            println!("callrecon schedule: metrics on http://{bound}/metrics");
            std::io::Write::flush(&mut std::io::stdout())?;
            tracing::info!(addr = %bound, "serving /metrics and /healthz");
            (Some(endpoint), Some(task))
        }
        None => (None, None),
    };
    let stop = watch_signals()?;
    let stopped = |stop_metrics: tokio::sync::oneshot::Sender<()>, task: Option<tokio::task::JoinHandle<()>>| async move {
        let _ = stop_metrics.send(());
        if let Some(task) = task {
            let _ = task.await;
        }
    };

    let Some(pool) = connect(database_url, options, jobs.len(), stop.clone()).await else {
        stopped(stop_metrics, metrics_task).await;
        tracing::info!("stopped before the database was reached");
        return Ok(());
    };
    if let Some(endpoint) = &endpoint {
        let _ = endpoint.pool.set(pool.clone());
    }
    let run_metrics = endpoint.map(|e| e.runs);
    tracing::info!(jobs = jobs.len(), "scheduler started");
    let mut tasks = tokio::task::JoinSet::new();
    for s in jobs {
        tasks.spawn(job_loop(pool.clone(), s, stop.clone(), run_metrics.clone()));
    }
    let mut panicked = false;
    while let Some(done) = tasks.join_next().await {
        if let Err(e) = done {
            tracing::error!(error = %e, "a job's scheduling task failed");
            panicked = true;
        }
    }
    // After a second signal a rolled-back run's connection may still be busy: do not wait for it.
    if *stop.borrow() < 2 {
        pool.close().await;
    }
    stopped(stop_metrics, metrics_task).await;
    anyhow::ensure!(!panicked, "a job's scheduling task failed; see the log above");
    tracing::info!("scheduler stopped");
    Ok(())
}

/// Creates and migrates the database (retrying with backoff while it cannot be reached), then
/// opens the scheduler's pool: two connections per job (a run's transaction and its `runs`
/// row) so that jobs running together never wait for each other's connections.
async fn connect(url: &str, options: PgConnectOptions, jobs: usize, mut stop: watch::Receiver<u32>) -> Option<PgPool> {
    let mut delay = RETRY_FIRST;
    loop {
        match db::connect(url).await {
            Ok(pool) => {
                pool.close().await;
                break;
            }
            Err(e) => {
                tracing::error!(
                    error = %crate::db::error_line(&e),
                    retry_in = ?delay,
                    "cannot connect to or migrate the database; retrying"
                );
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = signalled(&mut stop, 1) => return None,
                }
                delay = (delay * 2).min(RETRY_MAX);
            }
        }
    }
    Some(
        db::pool_options()
            .max_connections(3 * jobs as u32 + 2)
            .acquire_timeout(Duration::from_secs(10))
            .connect_lazy_with(options),
    )
}

/// Why a job runs now.
#[derive(Debug, Clone, Copy)]
enum Trigger {
    /// Its fire time came.
    Scheduled(DateTime<Utc>),
    /// Its last successful run is older than this fire time, missed while no scheduler ran.
    CatchUp(DateTime<Utc>),
    /// The database could not be reached at the last attempt.
    Retry,
}

/// What happened to one attempt.
enum Attempt {
    Done,
    /// The database could not be reached: try again after a delay.
    Unreachable,
    /// A second signal came: the run was rolled back; stop.
    RolledBack,
}

/// Where a job's loop stands between attempts.
struct Progress {
    /// Every fire time up to here has been run or skipped.
    handled_until: DateTime<Utc>,
    /// Whether the fire time missed while no scheduler ran has been looked for, and which it is.
    catch_up_checked: bool,
    catch_up: Option<DateTime<Utc>>,
    /// When to try again after the database could not be reached, and the delay waited.
    retry: Option<(DateTime<Utc>, Duration)>,
    /// The due time last logged.
    announced: Option<DateTime<Utc>>,
}

/// One job: sleep until its next fire time, re-read its file, run, repeat.
async fn job_loop(pool: PgPool, mut s: Scheduled, mut stop: watch::Receiver<u32>, metrics: Option<RunMetrics>) {
    let name = s.job.name.clone();
    let mut p =
        Progress { handled_until: Utc::now(), catch_up_checked: false, catch_up: None, retry: None, announced: None };
    loop {
        if *stop.borrow() > 0 {
            break;
        }
        s.reload();
        if !p.catch_up_checked && !p.check_missed(&pool, &s, &mut stop).await {
            continue;
        }
        let now = Utc::now();
        let Some((due, trigger)) = p.next_due(&s, now) else {
            tracing::warn!(job = %name, schedule = %s.cron(), "the schedule never fires again; job idle");
            signalled(&mut stop, 1).await;
            break;
        };
        if due > now {
            p.announce(&s, due, trigger);
            let wait = (due - now).to_std().unwrap_or_default().min(RELOAD_EVERY);
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = signalled(&mut stop, 1) => {}
            }
            continue;
        }

        let before = p.handled_until;
        let outcome = fire(&pool, &s, trigger, &mut stop, metrics.as_ref()).await;
        p.catch_up = None;
        let end = Utc::now();
        log_skipped(&s, trigger, before, end);
        p.handled_until = end;
        match outcome {
            Attempt::Done => p.retry = None,
            Attempt::Unreachable => p.retry = Some(retry_after(p.retry)),
            Attempt::RolledBack => break,
        }
    }
    tracing::info!(job = %name, "job stopped");
}

/// When to try again after the database could not be reached, the delay doubled each time.
fn retry_after(retry: Option<(DateTime<Utc>, Duration)>) -> (DateTime<Utc>, Duration) {
    let delay = retry.map_or(RETRY_FIRST, |(_, d)| (d * 2).min(RETRY_MAX));
    (Utc::now() + delay, delay)
}

impl Progress {
    /// Looks for the fire time missed while no scheduler ran. `false`: the database could not
    /// tell, and the retry delay has been waited (fire times passing meanwhile are run, once,
    /// when the database is back).
    async fn check_missed(&mut self, pool: &PgPool, s: &Scheduled, stop: &mut watch::Receiver<u32>) -> bool {
        match missed_fire(pool, s, self.handled_until).await {
            Ok(missed) => {
                self.catch_up_checked = true;
                self.catch_up = missed;
                self.retry = None;
                true
            }
            Err(e) => {
                let (at, delay) = retry_after(self.retry);
                tracing::error!(
                    job = %s.job.name,
                    error = %crate::db::error_line(&e),
                    retry_in = ?delay,
                    "cannot read the job's last run; retrying"
                );
                self.retry = Some((at, delay));
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = signalled(stop, 1) => {}
                }
                false
            }
        }
    }

    /// What comes next and when: a catch-up at once, a retry before the next fire time, or the
    /// next fire time (`None`: the schedule never fires again).
    fn next_due(&self, s: &Scheduled, now: DateTime<Utc>) -> Option<(DateTime<Utc>, Trigger)> {
        match (self.catch_up, self.retry, s.next_fire(self.handled_until)) {
            (Some(missed), _, _) => Some((now, Trigger::CatchUp(missed))),
            (None, Some((at, _)), next) if next.is_none_or(|n| at < n) => Some((at, Trigger::Retry)),
            (None, _, Some(n)) => Some((n, Trigger::Scheduled(n))),
            (None, _, None) => None,
        }
    }

    /// Logs the next run (or retry) once per due time.
    fn announce(&mut self, s: &Scheduled, due: DateTime<Utc>, trigger: Trigger) {
        if self.announced == Some(due) {
            return;
        }
        self.announced = Some(due);
        let name = &s.job.name;
        let local = due.with_timezone(&s.job.timezone);
        match trigger {
            Trigger::Retry => tracing::info!(job = %name, at = %local.format("%Y-%m-%d %H:%M:%S %Z"), "retrying"),
            _ => tracing::info!(
                job = %name,
                next_run = %local.format("%Y-%m-%d %H:%M:%S %Z"),
                utc = %due.format("%Y-%m-%dT%H:%M:%SZ"),
                "next run"
            ),
        }
    }
}

/// Fire times that came while an attempt ran (from `before` to `end`) found the job running:
/// skipped, not queued, and logged.
fn log_skipped(s: &Scheduled, trigger: Trigger, before: DateTime<Utc>, end: DateTime<Utc>) {
    let served = matches!(trigger, Trigger::Scheduled(_)) as usize;
    let skipped: Vec<DateTime<Utc>> =
        fire_times(s.cron(), s.job.timezone, before).take_while(|t| *t <= end).skip(served).take(10_000).collect();
    if let (Some(first), Some(last)) = (skipped.first(), skipped.last()) {
        tracing::warn!(
            job = %s.job.name,
            skipped = skipped.len(),
            first = %first.with_timezone(&s.job.timezone).format("%Y-%m-%d %H:%M:%S %Z"),
            last = %last.with_timezone(&s.job.timezone).format("%Y-%m-%d %H:%M:%S %Z"),
            "fire times passed during this attempt: skipped, not queued"
        );
    }
}

/// The fire time the job missed while no scheduler ran: the first one after its last successful
/// run (or, when none succeeded, its first run), if that is already past. A job that never ran
/// missed nothing.
async fn missed_fire(pool: &PgPool, s: &Scheduled, now: DateTime<Utc>) -> Result<Option<DateTime<Utc>>> {
    let starts = runs::starts(pool, &s.job.name).await?;
    Ok(starts.last_succeeded.or(starts.first).and_then(|since| s.next_fire(since)).filter(|t| *t <= now))
}

/// One attempt to run the job: logs and classifies what happened.
async fn fire(
    pool: &PgPool,
    s: &Scheduled,
    trigger: Trigger,
    stop: &mut watch::Receiver<u32>,
    metrics: Option<&RunMetrics>,
) -> Attempt {
    let name = &s.job.name;
    if let Some(e) = &s.refused {
        tracing::error!(
            job = %name,
            error = %e,
            since = %s.loaded_at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            "job file refused: running its last good version"
        );
    }
    match trigger {
        Trigger::Scheduled(at) => {
            if served_elsewhere(pool, name, at).await {
                return Attempt::Done;
            }
        }
        Trigger::CatchUp(missed) => tracing::info!(
            job = %name,
            missed = %missed.with_timezone(&s.job.timezone).format("%Y-%m-%d %H:%M:%S %Z"),
            "catching up: the last successful run is older than this fire time"
        ),
        Trigger::Retry => {}
    }

    // Dropping the run drops its transaction: nothing it did is kept.
    let started = std::time::Instant::now();
    let result = tokio::select! {
        r = run::execute(pool, &s.job, Mode::Run, false) => r,
        _ = signalled(stop, 2) => {
            tracing::warn!(job = %name, "run rolled back: stopped twice");
            return Attempt::RolledBack;
        }
    };
    let ended = metrics::Ended::of(&result);
    metrics::log_summary(name, "run", false, &ended, started.elapsed());
    if let Some(m) = metrics {
        m.record(name, "run", &ended);
    }
    outcome(pool, s, result).await
}

/// Whether another scheduler (a second replica) or a manual run has served fire time `at`.
async fn served_elsewhere(pool: &PgPool, name: &str, at: DateTime<Utc>) -> bool {
    let Some(runs::Status { id, status }) = runs::started_since(pool, name, at).await.unwrap_or(None) else {
        return false;
    };
    if status == "running" {
        tracing::warn!(job = %name, run_id = id, "fire time skipped: the job is already running elsewhere");
    } else {
        tracing::info!(job = %name, run_id = id, status, "fire time already served by another process");
    }
    true
}

/// What a finished attempt was: logs a failure and notes a run of a refused file's last good
/// version on the run.
async fn outcome(pool: &PgPool, s: &Scheduled, result: Result<Finished>) -> Attempt {
    let name = &s.job.name;
    match result {
        Ok(done) => {
            if let Some(e) = &s.refused {
                // Shown by `report list` beside the run.
                let note = format!(
                    "ran the version of {} read at {}: the file on disk is refused: {e}",
                    s.path.display(),
                    s.loaded_at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
                );
                runs::note(pool, done.report.run_id, &note).await;
            }
            Attempt::Done
        }
        Err(e) if e.downcast_ref::<AlreadyRunning>().is_some() => {
            tracing::warn!(job = %name, error = %crate::db::error_line(&e), "fire time skipped: the job is already running");
            Attempt::Done
        }
        Err(e) if database_unreachable(&e) => {
            tracing::error!(job = %name, error = %crate::db::error_line(&e), "run failed: the database cannot be reached");
            Attempt::Unreachable
        }
        Err(e) => {
            tracing::error!(job = %name, error = %crate::db::error_line(&e), "run failed; recorded in `report list`");
            Attempt::Done
        }
    }
}

/// Whether an error says the database could not be reached (rather than that the run failed).
fn database_unreachable(e: &anyhow::Error) -> bool {
    e.chain().any(|c| match c.downcast_ref::<sqlx::Error>() {
        Some(sqlx::Error::Io(_) | sqlx::Error::Tls(_) | sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed) => true,
        Some(sqlx::Error::Database(d)) => d.code().is_some_and(|c| {
            // connection_exception, operator_intervention (shutdown, cannot connect now),
            // too_many_connections, and "database is not accepting connections".
            c.starts_with("08") || c.starts_with("57P") || c == "53300" || c == "55000"
        }),
        _ => false,
    })
}
