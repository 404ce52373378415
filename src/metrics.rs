//! Prometheus metrics of runs, and each run's summary as one structured log line.
//!
//! - [`RunMetrics`]: what the drivers (`callrecon run`, `rematch`, `schedule`) record from what
//!   [`run::execute`] returned, plus per-job state read from the database when scraped (the
//!   pending backlog, the last success and failure, how many runs in a row the backlog grew).
//! - [`QueueGauges`]: `event_queue`'s depth and oldest entry, shared with the intake API.
//! - [`Endpoint`]: `callrecon schedule --metrics-listen ADDR` (`/metrics`, `/healthz`);
//!   [`write_textfile`]: `callrecon run --metrics-file PATH`, for a textfile collector.
//! - [`log_summary`]: the run's summary as one `tracing` event with the same fields.
//!
//! A [`Registry`] is a value, not a global: each daemon, server and test keeps its own.
//!
//! **Architecture invariant:** metrics observe and never decide. They are recorded from what a
//! run returned, the scrape-time queries only read (`events`, `runs`, `event_queue`), and a
//! metrics failure (a query, the file) is logged and never fails a run or a request.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use anyhow::{Context, Result};
use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use chrono::Utc;
use prometheus_client::encoding::prometheus_text;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use serde_json::json;
use sqlx::PgPool;
use tokio::net::TcpListener;

use crate::run::Finished;
use crate::runs;

/// Label pairs; every value is bounded (job names, rule names, reasons, stages, routes).
pub type Labels = Vec<(&'static str, String)>;
pub type GaugeF64 = Gauge<f64, AtomicU64>;
pub type Histograms = Family<Labels, Histogram, fn() -> Histogram>;

/// The stages of a run, as `run::Finished::stages` names them.
pub const STAGES: [&str; 4] = ["ingest", "match", "apply", "report"];
/// Reasons an event is unmatched (the report's `by_reason`); each is exported, 0 when absent.
pub const REASONS: [&str; 5] = ["unknown_session", "missing_key", "no_candidate", "ambiguous", "expired"];
/// How long a scrape-time query may take.
const QUERY_TIMEOUT: Duration = Duration::from_secs(10);

/// A stage or a nightly: tens of milliseconds (tests, a quiet night) to an hour.
fn stage_histogram() -> Histogram {
    Histogram::new([0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0])
}

fn job(job: &str) -> Labels {
    vec![("job_name", job.to_owned())]
}

/// The Prometheus text format (0.0.4) of a registry, and its content type.
pub fn encode(registry: &Registry) -> String {
    let mut text = String::new();
    prometheus_text::encode(&mut text, registry).expect("writing to a String cannot fail");
    text
}

pub const CONTENT_TYPE: &str = prometheus_text::CONTENT_TYPE;

/// `callrecon_build_info{version}`: 1, so that a dashboard knows what is deployed.
pub fn register_build_info(registry: &mut Registry) {
    let info: Family<Labels, Gauge> = Family::default();
    info.get_or_create(&vec![("version", env!("CARGO_PKG_VERSION").to_owned())]).set(1);
    registry.register("callrecon_build_info", "callrecon's version; always 1", info);
}

/// `event_queue`: how many events wait on it and how long the oldest has waited.
#[derive(Clone, Default)]
pub struct QueueGauges {
    events: Gauge,
    oldest_age: GaugeF64,
}

impl QueueGauges {
    pub fn register(registry: &mut Registry) -> QueueGauges {
        let q = QueueGauges::default();
        registry.register(
            "callrecon_event_queue_events",
            "Events waiting on event_queue for the next run (read when scraped)",
            q.events.clone(),
        );
        registry.register(
            "callrecon_event_queue_oldest_age_seconds",
            "Age of the oldest event on event_queue by its received_at; 0 when the queue is empty",
            q.oldest_age.clone(),
        );
        q
    }

    /// Reads the queue (one statement, index-free: `count(*)` and `min(received_at)`).
    pub async fn refresh(&self, pool: &PgPool) -> Result<()> {
        let (n, age): (i64, Option<f64>) = timed(async {
            sqlx::query_as("select count(*), extract(epoch from now() - min(received_at))::float8 from event_queue")
                .fetch_one(&mut *crate::db::begin(pool).await?)
                .await
        })
        .await
        .context("reading event_queue's depth")?;
        self.events.set(n);
        self.oldest_age.set(age.unwrap_or(0.0).max(0.0));
        Ok(())
    }
}

async fn timed<T>(query: impl Future<Output = Result<T, sqlx::Error>>) -> Result<T> {
    Ok(tokio::time::timeout(QUERY_TIMEOUT, query)
        .await
        .map_err(|_| anyhow::anyhow!("no answer within {QUERY_TIMEOUT:?}"))??)
}

/// What one run ended as, for the metrics and the log line.
pub enum Ended<'a> {
    Succeeded(&'a Finished),
    Failed(&'a anyhow::Error),
    /// Another run of the job held its lock: nothing ran.
    Skipped,
}

impl<'a> Ended<'a> {
    /// What `run::execute` returned, as metrics see it.
    pub fn of(result: &'a Result<Finished>) -> Ended<'a> {
        match result {
            Ok(done) => Ended::Succeeded(done),
            Err(e) if e.downcast_ref::<crate::run::AlreadyRunning>().is_some() => Ended::Skipped,
            Err(e) => Ended::Failed(e),
        }
    }
}

/// Runs' metrics. Counters and histograms accumulate in a long-running process; the `last_run`
/// gauges and the per-job state are what a textfile (one process per run) can carry too.
#[derive(Clone)]
pub struct RunMetrics {
    runs: Family<Labels, Counter>,
    stage_seconds: Histograms,
    ingested: Family<Labels, Counter>,
    rejected: Family<Labels, Counter>,
    duplicates: Family<Labels, Counter>,
    matched: Family<Labels, Counter>,
    calls_written: Family<Labels, Counter>,
    groups_written: Family<Labels, Counter>,
    last_stage_seconds: Family<Labels, GaugeF64>,
    last_ingested: Family<Labels, Gauge>,
    last_rejected: Family<Labels, Gauge>,
    last_duplicates: Family<Labels, Gauge>,
    last_files_later: Family<Labels, Gauge>,
    last_matched: Family<Labels, Gauge>,
    last_unmatched: Family<Labels, Gauge>,
    last_unmatched_ratio: Family<Labels, GaugeF64>,
    last_success: Family<Labels, GaugeF64>,
    last_failure: Family<Labels, GaugeF64>,
    pending: Family<Labels, Gauge>,
    pending_oldest_age: Family<Labels, GaugeF64>,
    pending_growing: Family<Labels, Gauge>,
    /// The reason labels set for each job by its last run (others are removed at the next).
    reasons_shown: Arc<Mutex<BTreeMap<String, Vec<String>>>>,
}

impl RunMetrics {
    /// Registers the runs' metrics; `accumulating`: also the counters and histograms, which only
    /// a long-running process can keep (a textfile is rewritten by every run).
    pub fn register(registry: &mut Registry, accumulating: bool) -> RunMetrics {
        let m = RunMetrics {
            runs: Family::default(),
            stage_seconds: Family::new_with_constructor(stage_histogram),
            ingested: Family::default(),
            rejected: Family::default(),
            duplicates: Family::default(),
            matched: Family::default(),
            calls_written: Family::default(),
            groups_written: Family::default(),
            last_stage_seconds: Family::default(),
            last_ingested: Family::default(),
            last_rejected: Family::default(),
            last_duplicates: Family::default(),
            last_files_later: Family::default(),
            last_matched: Family::default(),
            last_unmatched: Family::default(),
            last_unmatched_ratio: Family::default(),
            last_success: Family::default(),
            last_failure: Family::default(),
            pending: Family::default(),
            pending_oldest_age: Family::default(),
            pending_growing: Family::default(),
            reasons_shown: Arc::default(),
        };
        let r = registry;
        if accumulating {
            r.register(
                "callrecon_runs",
                "Runs by job, kind (run, rematch) and status (succeeded, failed, skipped: another run held the job's lock)",
                m.runs.clone(),
            );
            r.register(
                "callrecon_run_stage_duration_seconds",
                "Time runs spent per stage (ingest, match, apply, report)",
                m.stage_seconds.clone(),
            );
            r.register("callrecon_events_ingested", "Valid events stored by runs", m.ingested.clone());
            r.register("callrecon_records_rejected", "Records runs refused (see the reports)", m.rejected.clone());
            r.register(
                "callrecon_events_duplicate",
                "Valid events runs did not store because the job already held them, by source (queue, inbox)",
                m.duplicates.clone(),
            );
            r.register(
                "callrecon_events_matched",
                "Events matched by runs, by rule (session_id: attached by SessionId)",
                m.matched.clone(),
            );
            r.register("callrecon_calls_written", "Calls whose async_metadata runs changed", m.calls_written.clone());
            r.register(
                "callrecon_call_groups_written",
                "Call groups whose async_metadata runs changed",
                m.groups_written.clone(),
            );
        }
        r.register(
            "callrecon_last_run_stage_duration_seconds",
            "Time the job's last successful run spent per stage",
            m.last_stage_seconds.clone(),
        );
        r.register(
            "callrecon_last_run_ingested_events",
            "Valid events the job's last successful run stored",
            m.last_ingested.clone(),
        );
        r.register(
            "callrecon_last_run_rejected_records",
            "Records the job's last successful run refused",
            m.last_rejected.clone(),
        );
        r.register(
            "callrecon_last_run_duplicate_events",
            "Valid events the job's last successful run did not store because the job already held them",
            m.last_duplicates.clone(),
        );
        r.register(
            "callrecon_last_run_inbox_files_left",
            "Inbox files the job's last successful run left for later: still being written ([sources] settle)",
            m.last_files_later.clone(),
        );
        r.register(
            "callrecon_last_run_matched_events",
            "Events the job's last successful run matched",
            m.last_matched.clone(),
        );
        r.register(
            "callrecon_last_run_unmatched_events",
            "Events left unmatched after the job's last successful run (pending, and expired by it), by reason",
            m.last_unmatched.clone(),
        );
        r.register(
            "callrecon_last_run_unmatched_ratio",
            "unmatched / (matched + unmatched) of the job's last successful run; 0 when both are 0",
            m.last_unmatched_ratio.clone(),
        );
        r.register(
            "callrecon_last_success_timestamp_seconds",
            "When the job's last successful run (kind run, not dry) finished, from the runs table",
            m.last_success.clone(),
        );
        r.register(
            "callrecon_last_failure_timestamp_seconds",
            "When the job's last failed run (kind run, not dry) finished, from the runs table",
            m.last_failure.clone(),
        );
        r.register(
            "callrecon_pending_events",
            "Events of the job still pending (retried by every run until they expire), read when scraped",
            m.pending.clone(),
        );
        r.register(
            "callrecon_pending_oldest_age_seconds",
            "Age of the job's oldest pending event by its received_at; 0 when none is pending",
            m.pending_oldest_age.clone(),
        );
        r.register(
            "callrecon_pending_growing_runs",
            "Successful runs in a row, up to the last, after which the job had more pending events than after the one before",
            m.pending_growing.clone(),
        );
        m
    }

    /// Records one run of `job` (`kind`: run or rematch). Dry runs are not recorded: they change
    /// nothing. Rematches count in `runs_total` and the stage times only: the per-run values and
    /// the alerts on them describe the job's regular runs.
    pub fn record(&self, job_name: &str, kind: &str, ended: &Ended<'_>) {
        let now = Utc::now().timestamp_millis() as f64 / 1e3;
        let status = match ended {
            Ended::Succeeded(_) => "succeeded",
            Ended::Failed(_) => "failed",
            Ended::Skipped => "skipped",
        };
        let mut labels = job(job_name);
        labels.push(("kind", kind.to_owned()));
        self.runs.get_or_create(&[labels.clone(), vec![("status", status.to_owned())]].concat()).inc();
        let done = match ended {
            Ended::Succeeded(done) => done,
            Ended::Failed(_) => {
                if kind == "run" {
                    max_set(&self.last_failure, &job(job_name), now);
                }
                return;
            }
            Ended::Skipped => return,
        };
        for (stage, took) in &done.stages {
            let stage_labels = [labels.clone(), vec![("stage", (*stage).to_owned())]].concat();
            self.stage_seconds.get_or_create(&stage_labels).observe(took.as_secs_f64());
        }
        if kind != "run" {
            return;
        }
        let j = job(job_name);
        let s = &done.report.summary;
        max_set(&self.last_success, &j, now);
        for (stage, took) in &done.stages {
            let stage_labels = [j.clone(), vec![("stage", (*stage).to_owned())]].concat();
            self.last_stage_seconds.get_or_create(&stage_labels).set(took.as_secs_f64());
        }
        self.ingested.get_or_create(&j).inc_by(s.ingested);
        self.rejected.get_or_create(&j).inc_by(s.rejected);
        for (source, n) in &s.duplicates_by_source {
            let kind = if source == "queue" { "queue" } else { "inbox" };
            self.duplicates.get_or_create(&[j.clone(), vec![("source", kind.to_owned())]].concat()).inc_by(*n);
        }
        for (rule, n) in &s.by_rule {
            self.matched.get_or_create(&[j.clone(), vec![("rule", rule.clone())]].concat()).inc_by(*n);
        }
        self.calls_written.get_or_create(&j).inc_by(s.calls_updated);
        self.groups_written.get_or_create(&j).inc_by(s.groups_updated);
        self.last_ingested.get_or_create(&j).set(s.ingested as i64);
        self.last_rejected.get_or_create(&j).set(s.rejected as i64);
        self.last_duplicates.get_or_create(&j).set(s.duplicates as i64);
        self.last_files_later.get_or_create(&j).set(s.files_later as i64);
        self.last_matched.get_or_create(&j).set(s.matched as i64);
        self.last_unmatched_ratio.get_or_create(&j).set(unmatched_ratio(s.matched, s.unmatched));
        let reason_labels = |reason: &str| [j.clone(), vec![("reason", reason.to_owned())]].concat();
        let mut shown = self.reasons_shown.lock().expect("not poisoned");
        for old in shown.remove(job_name).unwrap_or_default() {
            self.last_unmatched.remove(&reason_labels(&old));
        }
        let mut reasons: Vec<String> = REASONS.iter().map(|r| (*r).to_owned()).collect();
        reasons.extend(s.by_reason.keys().filter(|r| !REASONS.contains(&r.as_str())).cloned());
        for reason in &reasons {
            let n = s.by_reason.get(reason).copied().unwrap_or(0);
            self.last_unmatched.get_or_create(&reason_labels(reason)).set(n as i64);
        }
        shown.insert(job_name.to_owned(), reasons);
    }

    /// Reads the jobs' state from the database: pending backlog, last success and failure (the
    /// later of the database's and this process's), and how many runs in a row the backlog grew.
    pub async fn refresh(&self, pool: &PgPool, jobs: &[String]) -> Result<()> {
        type Row = (String, i64, Option<f64>);
        let (rows, trends): (Vec<Row>, Vec<runs::Trend>) = timed(async {
            let mut tx = crate::db::begin(pool).await?;
            let rows = sqlx::query_as(
                "select j,
                        (select count(*) from events where job = j and state = 'pending'),
                        (select extract(epoch from now() - min(received_at))::float8
                         from events where job = j and state = 'pending')
                 from unnest($1::text[]) with ordinality as t(j, n) order by n",
            )
            .bind(jobs)
            .fetch_all(&mut *tx)
            .await?;
            Ok((rows, runs::trends(&mut tx, jobs).await?))
        })
        .await
        .context("reading the jobs' backlog and last runs")?;
        for ((name, pending, oldest), trend) in rows.into_iter().zip(trends) {
            let j = job(&name);
            self.pending.get_or_create(&j).set(pending);
            self.pending_oldest_age.get_or_create(&j).set(oldest.unwrap_or(0.0).max(0.0));
            if let Some(t) = trend.last_success {
                max_set(&self.last_success, &j, t);
            }
            if let Some(t) = trend.last_failure {
                max_set(&self.last_failure, &j, t);
            }
            self.pending_growing.get_or_create(&j).set(growing_runs(&trend.pending));
        }
        Ok(())
    }
}

/// Sets a timestamp gauge unless it already holds a later one.
fn max_set(family: &Family<Labels, GaugeF64>, labels: &Labels, t: f64) {
    let g = family.get_or_create(labels);
    if g.get() < t {
        g.set(t);
    }
}

/// `unmatched / (matched + unmatched)`, 0 for a run that had nothing to decide.
pub fn unmatched_ratio(matched: u64, unmatched: u64) -> f64 {
    if matched + unmatched == 0 { 0.0 } else { unmatched as f64 / (matched + unmatched) as f64 }
}

/// How many runs in a row, newest first, ended with more pending events than the run before.
pub fn growing_runs(pending_newest_first: &[i64]) -> i64 {
    pending_newest_first.windows(2).take_while(|w| w[0] > w[1]).count() as i64
}

/// The run's summary as one structured log line (`--log-format json`: one JSON object), with
/// the fields of the metrics: counts, per-stage seconds, the unmatched ratio; `matched_by_rule`
/// and `unmatched_by_reason` are JSON objects in a string (log fields are flat).
pub fn log_summary(job: &str, kind: &str, dry_run: bool, ended: &Ended<'_>, took: Duration) {
    let duration_seconds = took.as_secs_f64();
    match ended {
        Ended::Succeeded(done) => {
            let s = &done.report.summary;
            let stage = |name: &str| done.stages.iter().find(|(n, _)| *n == name).map_or(0.0, |(_, d)| d.as_secs_f64());
            tracing::info!(
                target: "callrecon::run_summary",
                job,
                kind,
                dry_run,
                status = "succeeded",
                run_id = %done.report.run_id,
                duration_seconds,
                ingest_seconds = stage("ingest"),
                match_seconds = stage("match"),
                apply_seconds = stage("apply"),
                report_seconds = stage("report"),
                ingested = s.ingested,
                rejected = s.rejected,
                matched = s.matched,
                unmatched = s.unmatched,
                unmatched_ratio = unmatched_ratio(s.matched, s.unmatched),
                pending = s.pending,
                expired = s.expired,
                calls_written = s.calls_updated,
                call_groups_written = s.groups_updated,
                files_ingested = s.files_ingested,
                files_duplicate = s.files_duplicate,
                files_failed = s.files_failed,
                files_later = s.files_later,
                duplicates = s.duplicates,
                duplicates_by_source = %json!(s.duplicates_by_source),
                matched_by_rule = %json!(s.by_rule),
                unmatched_by_reason = %json!(s.by_reason),
                problems = done.problems.len(),
                report = %done.dir.join("report.html").display(),
                "run summary"
            );
        }
        Ended::Failed(e) => tracing::error!(
            target: "callrecon::run_summary",
            job,
            kind,
            dry_run,
            status = "failed",
            duration_seconds,
            error = %crate::db::error_line(e),
            "run summary"
        ),
        Ended::Skipped => tracing::warn!(
            target: "callrecon::run_summary",
            job,
            kind,
            dry_run,
            status = "skipped",
            duration_seconds,
            "run summary"
        ),
    }
}

/// `callrecon run --metrics-file PATH`: the run's gauges and the job's state, in the Prometheus
/// text format, written to a temporary file beside PATH and renamed over it (a collector never
/// reads half a file). The database state is left out when the database cannot be read.
pub async fn write_textfile(path: &Path, job_name: &str, ended: &Ended<'_>, pool: Option<&PgPool>) -> Result<()> {
    let mut registry = Registry::default();
    register_build_info(&mut registry);
    let runs = RunMetrics::register(&mut registry, false);
    runs.record(job_name, "run", ended);
    if let Some(pool) = pool {
        let queue = QueueGauges::register(&mut registry);
        let read = async {
            runs.refresh(pool, &[job_name.to_owned()]).await?;
            queue.refresh(pool).await
        };
        if let Err(e) = read.await {
            tracing::warn!(error = %crate::db::error_line(&e), "the metrics file leaves out the job's backlog");
        }
    }
    let name = path.file_name().with_context(|| format!("--metrics-file {}: not a file name", path.display()))?;
    let tmp = path.with_file_name(format!(".{}.{}.tmp", name.to_string_lossy(), std::process::id()));
    std::fs::write(&tmp, encode(&registry)).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| {
        let _ = std::fs::remove_file(&tmp);
        format!("renaming {} to {}", tmp.display(), path.display())
    })?;
    Ok(())
}

/// `callrecon schedule --metrics-listen ADDR`: `/metrics` and `/healthz`, answering from the
/// moment the scheduler starts (before the database is reached).
#[derive(Clone)]
pub struct Endpoint {
    registry: Arc<Registry>,
    pub runs: RunMetrics,
    queue: QueueGauges,
    /// Set once the scheduler has its pool.
    pub pool: Arc<OnceLock<PgPool>>,
    jobs: Arc<Vec<String>>,
}

impl Endpoint {
    pub fn new(jobs: Vec<String>) -> Endpoint {
        let mut registry = Registry::default();
        register_build_info(&mut registry);
        let runs = RunMetrics::register(&mut registry, true);
        let queue = QueueGauges::register(&mut registry);
        Endpoint { registry: Arc::new(registry), runs, queue, pool: Arc::default(), jobs: Arc::new(jobs) }
    }

    /// Binds `addr` (port 0: a free port) and serves (every wait on a client bounded, as
    /// `serve`'s) until `stop` completes; returns the address and the serving task, which ends
    /// within a few seconds of `stop`.
    pub async fn listen(
        self,
        addr: SocketAddr,
        stop: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
        crate::http::raise_open_file_limit();
        let listener =
            TcpListener::bind(addr).await.with_context(|| format!("--metrics-listen: cannot listen on {addr}"))?;
        let bound = listener.local_addr()?;
        let app = Router::new().route("/metrics", get(scrape)).route("/healthz", get(healthz)).with_state(self);
        let task = tokio::spawn(async move {
            if let Err(e) = crate::http::serve(listener, app, crate::http::Limits::METRICS, stop).await {
                tracing::error!(error = %e, "the metrics endpoint stopped");
            }
        });
        Ok((bound, task))
    }
}

async fn scrape(State(e): State<Endpoint>) -> Response {
    if let Some(pool) = e.pool.get() {
        let read = async {
            e.runs.refresh(pool, &e.jobs).await?;
            e.queue.refresh(pool).await
        };
        if let Err(err) = read.await {
            // The values read last are served; /healthz says the database is not answering.
            tracing::warn!(error = %crate::db::error_line(&err), "metrics: the database could not be read");
        }
    }
    ([(header::CONTENT_TYPE, CONTENT_TYPE)], encode(&e.registry)).into_response()
}

/// 200 while the database answers; 503 while it does not (or is not reached yet). The
/// scheduler itself keeps retrying: a readiness signal, not a reason to restart it.
async fn healthz(State(e): State<Endpoint>) -> Response {
    let unavailable = |message: String| {
        (StatusCode::SERVICE_UNAVAILABLE, axum::Json(json!({"status": "unavailable", "message": message})))
            .into_response()
    };
    let Some(pool) = e.pool.get() else { return unavailable("connecting to the database".to_owned()) };
    let ping = async { sqlx::query_scalar::<_, i32>("select 1").fetch_one(&mut *crate::db::begin(pool).await?).await };
    match tokio::time::timeout(Duration::from_secs(2), ping).await {
        Ok(Ok(_)) => axum::Json(json!({"status": "ok", "jobs": e.jobs.as_slice()})).into_response(),
        Ok(Err(err)) => unavailable(format!("database: {err}")),
        Err(_) => unavailable("database: no answer within 2s".to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn growing_runs_counts_the_newest_increases_in_a_row() {
        assert_eq!(growing_runs(&[]), 0);
        assert_eq!(growing_runs(&[5]), 0);
        assert_eq!(growing_runs(&[9, 7, 5, 3]), 3);
        assert_eq!(growing_runs(&[9, 7, 7, 3]), 1);
        assert_eq!(growing_runs(&[3, 7, 5, 1]), 0);
    }

    #[test]
    fn unmatched_ratio_of_an_idle_run_is_zero() {
        assert_eq!(unmatched_ratio(0, 0), 0.0);
        assert_eq!(unmatched_ratio(3, 1), 0.25);
    }
}
