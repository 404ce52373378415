//! `callrecon schedule`: the cron daemon. Each job fires at its `schedule` in its `timezone`
//! and does one [`run::execute`] per fire time; the per-job advisory lock that `run` takes keeps
//! runs of a job from overlapping, whoever started them.
//!
//! Two halves: [`next_fire`], a pure function from a cron schedule, a time zone and an instant to
//! the next fire time (all the DST rules live there), and [`daemon`], the loop around it.
//!
//! # Fire times across DST changes
//! A schedule names wall-clock times in the job's time zone. Schedules that name their hours
//! (`0 30 2 * * *`) fire **once for each matching wall-clock time**:
//! - a time that occurs twice (fall-back) fires at its first occurrence only;
//! - a time that does not exist (spring-forward) fires at the moment the clock jumps (03:00 local
//!   on a New York spring-forward night), once however many skipped times the schedule had.
//!
//! Schedules that fire every hour (hour field `*`, e.g. `0 */15 * * * *`) **follow the clock**:
//! they fire at every instant whose local time matches, so they keep their real interval through
//! both changes (skipped local times do not exist, repeated ones fire twice). This is the rule of
//! Vixie cron, which operators know.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use chrono::{DateTime, Offset, TimeDelta, TimeZone, Timelike, Utc};
use chrono_tz::Tz;
use cron::TimeUnitSpec;
use sqlx::PgPool;
use sqlx::postgres::PgConnectOptions;
use tokio::sync::watch;

use crate::db;
use crate::job::{self, Job, JobError};
use crate::metrics::{self, RunMetrics};
use crate::run::{self, AlreadyRunning, Mode};
use crate::runs;

/// The largest jump of a clock at a DST (or time-zone) change that [`next_fire`] allows for.
/// Every zone in use today moves by one hour or less; some have moved by two.
const MAX_CLOCK_JUMP: TimeDelta = TimeDelta::hours(3);

/// The first fire time of `schedule` in `tz` strictly after `after`, by the DST rules of the
/// module documentation; `None` when the schedule never fires again.
pub fn next_fire(schedule: &cron::Schedule, tz: Tz, after: DateTime<Utc>) -> Option<DateTime<Utc>> {
    let follows_clock = schedule.hours().count() == 24;
    let local = after.with_timezone(&tz).naive_local();
    // Candidates are walked in wall-clock order. The first occurrence of a wall time is a
    // non-decreasing function of it, so the first one after `after` ends the walk; the second
    // occurrences (fall-back, clock-following schedules only) lie up to one clock jump behind
    // `local` when a fall-back is just ahead, so the walk then starts that much earlier.
    let offset = |t: DateTime<Utc>| tz.offset_from_utc_datetime(&t.naive_utc()).fix().local_minus_utc();
    let fall_back_ahead = follows_clock && offset(after + MAX_CLOCK_JUMP) < offset(after);
    let start = if fall_back_ahead { local - MAX_CLOCK_JUMP } else { local };

    let mut best: Option<DateTime<Utc>> = None;
    // The cron crate walks wall-clock times; UTC stands for "no time zone" here.
    for wall in schedule.after(&start.and_utc()).map(|w| w.naive_utc()) {
        let (first, second) = match tz.from_local_datetime(&wall) {
            chrono::LocalResult::Single(t) => (Some(t), None),
            chrono::LocalResult::Ambiguous(earlier, later) => (Some(earlier), follows_clock.then_some(later)),
            chrono::LocalResult::None if follows_clock => (None, None),
            chrono::LocalResult::None => (end_of_gap(tz, wall), None),
        };
        if let Some(t) = second.map(|t| t.with_timezone(&Utc)).filter(|t| *t > after) {
            best = Some(best.map_or(t, |b| b.min(t)));
        }
        if let Some(t) = first.map(|t| t.with_timezone(&Utc)).filter(|t| *t > after) {
            return Some(best.map_or(t, |b| b.min(t)));
        }
    }
    best
}

/// The fire times after `after`, in order.
pub fn fire_times(schedule: &cron::Schedule, tz: Tz, after: DateTime<Utc>) -> impl Iterator<Item = DateTime<Utc>> {
    std::iter::successors(next_fire(schedule, tz, after), move |t| next_fire(schedule, tz, *t))
}

/// The instant a spring-forward gap holding `wall` ends: the first existing whole minute after
/// it (time-zone changes happen on whole minutes).
fn end_of_gap(tz: Tz, wall: chrono::NaiveDateTime) -> Option<DateTime<Tz>> {
    let mut minute = wall.with_second(0)?.with_nanosecond(0)?;
    // A gap is at most a day (Samoa skipped 30 December 2011).
    for _ in 0..=(2 * 24 * 60) {
        minute += TimeDelta::minutes(1);
        if let Some(t) = tz.from_local_datetime(&minute).earliest() {
            return Some(t);
        }
    }
    None
}

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

/// Counts SIGTERM/SIGINT: 1 = take no new runs, let running ones finish; 2 = roll them back.
fn watch_signals() -> Result<watch::Receiver<u32>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let (tx, rx) = watch::channel(0u32);
    tokio::spawn(async move {
        loop {
            let name = tokio::select! {
                _ = term.recv() => "SIGTERM",
                _ = int.recv() => "SIGINT",
            };
            let n = *tx.borrow() + 1;
            if n == 1 {
                tracing::info!(
                    signal = name,
                    "stopping: no new runs; running ones finish (send the signal again to roll them back)"
                );
            } else {
                tracing::warn!(signal = name, "stopping now: running runs are rolled back");
            }
            tx.send_replace(n);
        }
    });
    Ok(rx)
}

/// Resolves once `n` signals have come (never, should the signal watcher be gone).
async fn signalled(stop: &mut watch::Receiver<u32>, n: u32) {
    if stop.wait_for(|count| *count >= n).await.is_err() {
        std::future::pending::<()>().await;
    }
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

/// A job as the scheduler keeps it: the last good version of its file, and the file's error
/// while the file on disk is refused.
struct Scheduled {
    path: PathBuf,
    job: Job,
    /// The text `job` was read from, and the last read of the file (good or not).
    good_text: String,
    last_read: Result<String, String>,
    loaded_at: DateTime<Utc>,
    refused: Option<String>,
}

impl Scheduled {
    fn load(path: &Path) -> Result<Scheduled, JobError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| JobError(format!("{}: cannot read job file: {e}", path.display())))?;
        let job = job::parse(path, &text)?;
        if job.schedule.is_none() {
            return Err(JobError(format!(
                "{}: job {} has no `schedule`; add one, e.g. schedule = \"0 0 2 * * *\" \
                 (sec min hour day month weekday)",
                path.display(),
                job.name
            )));
        }
        Ok(Scheduled {
            path: path.to_path_buf(),
            job,
            good_text: text.clone(),
            last_read: Ok(text),
            loaded_at: Utc::now(),
            refused: None,
        })
    }

    fn cron(&self) -> &cron::Schedule {
        &self.job.schedule.as_ref().expect("scheduled jobs have a schedule").cron
    }

    fn next_fire(&self, after: DateTime<Utc>) -> Option<DateTime<Utc>> {
        next_fire(self.cron(), self.job.timezone, after)
    }

    /// Re-reads the job file. A changed file that is good replaces the job; one that is refused
    /// leaves the last good version in use and is logged as an error.
    fn reload(&mut self) {
        let read = std::fs::read_to_string(&self.path).map_err(|e| e.to_string());
        if read == self.last_read {
            return;
        }
        self.last_read = read.clone();
        let checked = match read {
            Ok(text) if text == self.good_text => {
                if self.refused.take().is_some() {
                    tracing::info!(
                        job = %self.job.name,
                        file = %self.path.display(),
                        "job file fixed: back to its good version"
                    );
                }
                return;
            }
            Ok(text) => job::parse(&self.path, &text).and_then(|job| self.check_edit(job)).map(|job| (job, text)),
            Err(e) => Err(JobError(format!("{}: cannot read job file: {e}", self.path.display()))),
        };
        match checked {
            Ok((job, text)) => {
                let source = |j: &Job| j.schedule.as_ref().map(|s| s.source.clone());
                let changed = source(&self.job) != source(&job) || self.job.timezone != job.timezone;
                tracing::info!(
                    job = %job.name,
                    file = %self.path.display(),
                    schedule = %job.schedule.as_ref().map_or("", |s| s.source.as_str()),
                    timezone = %job.timezone,
                    schedule_changed = changed,
                    "job file changed: using the new version"
                );
                self.job = job;
                self.good_text = text;
                self.loaded_at = Utc::now();
                self.refused = None;
            }
            Err(e) => {
                tracing::error!(
                    job = %self.job.name,
                    error = %e,
                    good_version_read = %self.loaded_at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                    "job file refused: the last good version stays in use until the file is fixed"
                );
                self.refused = Some(e.0);
            }
        }
    }

    /// What a scheduler cannot take from an edit without a restart.
    fn check_edit(&self, job: Job) -> Result<Job, JobError> {
        if job.name != self.job.name {
            return Err(JobError(format!(
                "{}: the job's name changed from {:?} to {:?}; renaming a job needs a restart of the scheduler",
                self.path.display(),
                self.job.name,
                job.name
            )));
        }
        if job.schedule.is_none() {
            return Err(JobError(format!(
                "{}: `schedule` was removed; a scheduled job needs one",
                self.path.display()
            )));
        }
        Ok(job)
    }
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

/// One job: sleep until its next fire time, re-read its file, run, repeat.
async fn job_loop(pool: PgPool, mut s: Scheduled, mut stop: watch::Receiver<u32>, metrics: Option<RunMetrics>) {
    let name = s.job.name.clone();
    // Every fire time up to here has been run or skipped.
    let mut handled_until = Utc::now();
    let mut catch_up_checked = false;
    let mut catch_up: Option<DateTime<Utc>> = None;
    let mut retry: Option<(DateTime<Utc>, Duration)> = None;
    let mut announced = None;
    loop {
        if *stop.borrow() > 0 {
            break;
        }
        s.reload();
        if !catch_up_checked {
            match missed_fire(&pool, &s, handled_until).await {
                Ok(missed) => {
                    catch_up_checked = true;
                    catch_up = missed;
                }
                Err(e) => {
                    // Fire times passing meanwhile are run (once) when the database is back.
                    let delay = retry.map_or(RETRY_FIRST, |(_, d)| (d * 2).min(RETRY_MAX));
                    tracing::error!(
                        job = %name,
                        error = %crate::db::error_line(&e),
                        retry_in = ?delay,
                        "cannot read the job's last run; retrying"
                    );
                    retry = Some((Utc::now() + delay, delay));
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = signalled(&mut stop, 1) => {}
                    }
                    continue;
                }
            }
            retry = None;
        }
        let now = Utc::now();
        let next = s.next_fire(handled_until);
        let (due, trigger) = match (catch_up, retry, next) {
            (Some(missed), _, _) => (now, Trigger::CatchUp(missed)),
            (None, Some((at, _)), next) if next.is_none_or(|n| at < n) => (at, Trigger::Retry),
            (None, _, Some(n)) => (n, Trigger::Scheduled(n)),
            (None, _, None) => {
                tracing::warn!(job = %name, schedule = %s.cron(), "the schedule never fires again; job idle");
                signalled(&mut stop, 1).await;
                break;
            }
        };
        if due > now {
            if announced != Some(due) {
                announced = Some(due);
                let local = due.with_timezone(&s.job.timezone);
                match trigger {
                    Trigger::Retry => {
                        tracing::info!(job = %name, at = %local.format("%Y-%m-%d %H:%M:%S %Z"), "retrying")
                    }
                    _ => tracing::info!(
                        job = %name,
                        next_run = %local.format("%Y-%m-%d %H:%M:%S %Z"),
                        utc = %due.format("%Y-%m-%dT%H:%M:%SZ"),
                        "next run"
                    ),
                }
            }
            let wait = (due - now).to_std().unwrap_or_default().min(RELOAD_EVERY);
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = signalled(&mut stop, 1) => {}
            }
            continue;
        }

        let before = handled_until;
        let outcome = fire(&pool, &s, trigger, &mut stop, metrics.as_ref()).await;
        catch_up = None;
        let end = Utc::now();
        // Fire times that came while this attempt ran found the job running: skipped, not queued.
        let served = matches!(trigger, Trigger::Scheduled(_)) as usize;
        let skipped: Vec<DateTime<Utc>> =
            fire_times(s.cron(), s.job.timezone, before).take_while(|t| *t <= end).skip(served).take(10_000).collect();
        if let (Some(first), Some(last)) = (skipped.first(), skipped.last()) {
            tracing::warn!(
                job = %name,
                skipped = skipped.len(),
                first = %first.with_timezone(&s.job.timezone).format("%Y-%m-%d %H:%M:%S %Z"),
                last = %last.with_timezone(&s.job.timezone).format("%Y-%m-%d %H:%M:%S %Z"),
                "fire times passed during this attempt: skipped, not queued"
            );
        }
        handled_until = end;
        match outcome {
            Attempt::Done => retry = None,
            Attempt::Unreachable => {
                let delay = retry.map_or(RETRY_FIRST, |(_, d)| (d * 2).min(RETRY_MAX));
                retry = Some((Utc::now() + delay, delay));
            }
            Attempt::RolledBack => break,
        }
    }
    tracing::info!(job = %name, "job stopped");
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
            // Another scheduler (a second replica) or a manual run may have served this fire time.
            let other = runs::started_since(pool, name, at).await.unwrap_or(None);
            if let Some(runs::Status { id, status }) = other {
                if status == "running" {
                    tracing::warn!(job = %name, run_id = id, "fire time skipped: the job is already running elsewhere");
                } else {
                    tracing::info!(job = %name, run_id = id, status, "fire time already served by another process");
                }
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

#[cfg(test)]
mod tests {
    use std::str::FromStr;

    use chrono::Datelike as _;
    use chrono_tz::America::New_York;
    use chrono_tz::Australia::Lord_Howe;
    use chrono_tz::Europe::London;

    use super::*;

    fn t(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    /// The next `expected.len()` fire times of `schedule` in `tz` after `after`, as local times
    /// with their offsets (`2026-03-08T03:00:00-04:00`).
    fn check(schedule: &str, tz: Tz, after: &str, expected: &[&str]) {
        let cron = cron::Schedule::from_str(schedule).unwrap();
        let got: Vec<String> = fire_times(&cron, tz, t(after))
            .take(expected.len())
            .map(|f| f.with_timezone(&tz).to_rfc3339_opts(chrono::SecondsFormat::Secs, false))
            .collect();
        assert_eq!(got, expected, "{schedule} in {tz} after {after}");
    }

    // New York, 2026: spring-forward on 8 March (02:00 EST -> 03:00 EDT, at 07:00Z), fall-back on
    // 1 November (02:00 EDT -> 01:00 EST, at 06:00Z).

    #[test]
    fn skipped_time_fires_once_when_the_clock_jumps() {
        check(
            "0 30 2 * * *",
            New_York,
            "2026-03-07T08:00:00Z",
            &["2026-03-08T03:00:00-04:00", "2026-03-09T02:30:00-04:00"],
        );
        // Two skipped times (02:00, 02:30): still one fire, at the jump.
        check(
            "0 0,30 2 * * *",
            New_York,
            "2026-03-07T08:00:00Z",
            &["2026-03-08T03:00:00-04:00", "2026-03-09T02:00:00-04:00"],
        );
        check("0 0 2 * * *", New_York, "2026-03-08T06:59:59Z", &["2026-03-08T03:00:00-04:00"]);
        // London jumps from 01:00 GMT to 02:00 BST.
        check(
            "0 30 1 * * *",
            London,
            "2026-03-28T12:00:00Z",
            &["2026-03-29T02:00:00+01:00", "2026-03-30T01:30:00+01:00"],
        );
    }

    #[test]
    fn repeated_time_fires_once_at_its_first_occurrence() {
        check(
            "0 30 1 * * *",
            New_York,
            "2026-10-31T12:00:00Z",
            &["2026-11-01T01:30:00-04:00", "2026-11-02T01:30:00-05:00"],
        );
        // Started during the repeated hour, after the first 01:30: not again that night.
        check("0 30 1 * * *", New_York, "2026-11-01T06:10:00Z", &["2026-11-02T01:30:00-05:00"]);
        check(
            "0 0 2 * * *",
            New_York,
            "2026-10-31T12:00:00Z",
            &["2026-11-01T02:00:00-05:00", "2026-11-02T02:00:00-05:00"],
        );
        // Lord Howe Island moves by half an hour: 02:00 +11 -> 01:30 +10:30 on 5 April 2026.
        check(
            "0 45 1 * * *",
            Lord_Howe,
            "2026-04-04T00:00:00Z",
            &["2026-04-05T01:45:00+11:00", "2026-04-06T01:45:00+10:30"],
        );
    }

    #[test]
    fn hourly_schedules_follow_the_clock() {
        check(
            "0 0 * * * *",
            New_York,
            "2026-03-08T05:30:00Z",
            &["2026-03-08T01:00:00-05:00", "2026-03-08T03:00:00-04:00", "2026-03-08T04:00:00-04:00"],
        );
        check(
            "0 0 * * * *",
            New_York,
            "2026-11-01T04:30:00Z",
            &["2026-11-01T01:00:00-04:00", "2026-11-01T01:00:00-05:00", "2026-11-01T02:00:00-05:00"],
        );
        // From inside the first pass of the repeated hour, the second pass is next.
        check(
            "0 */20 * * * *",
            New_York,
            "2026-11-01T05:45:00Z",
            &["2026-11-01T01:00:00-05:00", "2026-11-01T01:20:00-05:00", "2026-11-01T01:40:00-05:00"],
        );
        check(
            "*/2 * * * * *",
            New_York,
            "2026-11-01T05:59:57Z",
            &["2026-11-01T01:59:58-04:00", "2026-11-01T01:00:00-05:00", "2026-11-01T01:00:02-05:00"],
        );
        check(
            "*/2 * * * * *",
            New_York,
            "2026-03-08T06:59:57Z",
            &["2026-03-08T01:59:58-05:00", "2026-03-08T03:00:00-04:00"],
        );
    }

    #[test]
    fn strictly_after_the_given_instant() {
        check("*/2 * * * * *", Tz::UTC, "2026-05-01T10:00:00Z", &["2026-05-01T10:00:02+00:00"]);
        check("*/2 * * * * *", Tz::UTC, "2026-05-01T10:00:00.5Z", &["2026-05-01T10:00:02+00:00"]);
        check("*/2 * * * * *", Tz::UTC, "2026-05-01T10:00:01.5Z", &["2026-05-01T10:00:02+00:00"]);
        check("0 0 2 * * *", Tz::UTC, "2026-05-01T02:00:00Z", &["2026-05-02T02:00:00+00:00"]);
    }

    #[test]
    fn a_daily_job_fires_once_on_every_day_of_a_year_with_both_changes() {
        for (schedule, tz) in [
            ("0 30 2 * * *", New_York),
            ("0 30 1 * * *", New_York),
            ("0 30 1 * * *", London),
            ("0 45 1 * * *", Lord_Howe),
        ] {
            let cron = cron::Schedule::from_str(schedule).unwrap();
            // The year 2026 as the job's time zone counts it, from its first midnight to the next year's.
            let midnight = |year| tz.with_ymd_and_hms(year, 1, 1, 0, 0, 0).single().unwrap().with_timezone(&Utc);
            let fires: Vec<_> = fire_times(&cron, tz, midnight(2026) - TimeDelta::seconds(1))
                .take_while(|f| *f < midnight(2027))
                .map(|f| f.with_timezone(&tz).date_naive())
                .collect();
            let every_day: Vec<_> = chrono::NaiveDate::from_ymd_opt(2026, 1, 1)
                .unwrap()
                .iter_days()
                .take_while(|d| d.year() == 2026)
                .collect();
            assert_eq!(every_day.len(), 365);
            assert_eq!(fires, every_day, "{schedule} in {tz}: not one fire on each day of 2026");
        }
    }

    #[test]
    fn sub_hourly_schedule_keeps_its_real_interval_through_both_changes() {
        let cron = cron::Schedule::from_str("0 */15 * * * *").unwrap();
        for (from, to) in
            [("2026-03-08T04:00:00Z", "2026-03-08T10:00:00Z"), ("2026-11-01T03:00:00Z", "2026-11-01T09:00:00Z")]
        {
            let fires: Vec<_> = fire_times(&cron, New_York, t(from)).take_while(|f| *f <= t(to)).collect();
            assert_eq!(fires.len(), 24, "{from}: {fires:?}");
            assert!(fires.windows(2).all(|w| w[1] - w[0] == TimeDelta::minutes(15)), "{from}: {fires:?}");
        }
    }
}
