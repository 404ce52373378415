//! [`RunMetrics`]: what the drivers record of each run, and the jobs' state read when scraped.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};
use chrono::Utc;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use sqlx::PgPool;

use super::{Ended, GaugeF64, Histograms, Labels, REASONS, growing_runs, job, timed, unmatched_ratio};
use crate::{db, runs};

/// A stage or a nightly: tens of milliseconds (tests, a quiet night) to an hour.
fn stage_histogram() -> Histogram {
    Histogram::new([0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0])
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
        let m = RunMetrics::new();
        if accumulating {
            m.register_accumulating(registry);
        }
        m.register_last_run(registry);
        m.register_job_state(registry);
        m
    }

    fn new() -> RunMetrics {
        RunMetrics {
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
        }
    }

    /// The counters and histograms.
    fn register_accumulating(&self, r: &mut Registry) {
        r.register(
            "callrecon_runs",
            "Runs by job, kind (run, rematch) and status (succeeded, failed, skipped: another run held the job's lock)",
            self.runs.clone(),
        );
        r.register(
            "callrecon_run_stage_duration_seconds",
            "Time runs spent per stage (ingest, match, apply, report)",
            self.stage_seconds.clone(),
        );
        r.register("callrecon_events_ingested", "Valid events stored by runs", self.ingested.clone());
        r.register("callrecon_records_rejected", "Records runs refused (see the reports)", self.rejected.clone());
        r.register(
            "callrecon_events_duplicate",
            "Valid events runs did not store because the job already held them, by source (queue, inbox)",
            self.duplicates.clone(),
        );
        r.register(
            "callrecon_events_matched",
            "Events matched by runs, by rule (session_id: attached by SessionId)",
            self.matched.clone(),
        );
        r.register("callrecon_calls_written", "Calls whose async_metadata runs changed", self.calls_written.clone());
        r.register(
            "callrecon_call_groups_written",
            "Call groups whose async_metadata runs changed",
            self.groups_written.clone(),
        );
    }

    /// The gauges of the job's last successful run.
    fn register_last_run(&self, r: &mut Registry) {
        r.register(
            "callrecon_last_run_stage_duration_seconds",
            "Time the job's last successful run spent per stage",
            self.last_stage_seconds.clone(),
        );
        r.register(
            "callrecon_last_run_ingested_events",
            "Valid events the job's last successful run stored",
            self.last_ingested.clone(),
        );
        r.register(
            "callrecon_last_run_rejected_records",
            "Records the job's last successful run refused",
            self.last_rejected.clone(),
        );
        r.register(
            "callrecon_last_run_duplicate_events",
            "Valid events the job's last successful run did not store because the job already held them",
            self.last_duplicates.clone(),
        );
        r.register(
            "callrecon_last_run_inbox_files_left",
            "Inbox files the job's last successful run left for later: still being written ([sources] settle)",
            self.last_files_later.clone(),
        );
        r.register(
            "callrecon_last_run_matched_events",
            "Events the job's last successful run matched",
            self.last_matched.clone(),
        );
        r.register(
            "callrecon_last_run_unmatched_events",
            "Events left unmatched after the job's last successful run (pending, and expired by it), by reason",
            self.last_unmatched.clone(),
        );
        r.register(
            "callrecon_last_run_unmatched_ratio",
            "unmatched / (matched + unmatched) of the job's last successful run; 0 when both are 0",
            self.last_unmatched_ratio.clone(),
        );
    }

    /// The job's state read from the database when scraped.
    fn register_job_state(&self, r: &mut Registry) {
        r.register(
            "callrecon_last_success_timestamp_seconds",
            "When the job's last successful run (kind run, not dry) finished, from the runs table",
            self.last_success.clone(),
        );
        r.register(
            "callrecon_last_failure_timestamp_seconds",
            "When the job's last failed run (kind run, not dry) finished, from the runs table",
            self.last_failure.clone(),
        );
        r.register(
            "callrecon_pending_events",
            "Events of the job still pending (retried by every run until they expire), read when scraped",
            self.pending.clone(),
        );
        r.register(
            "callrecon_pending_oldest_age_seconds",
            "Age of the job's oldest pending event by its received_at; 0 when none is pending",
            self.pending_oldest_age.clone(),
        );
        r.register(
            "callrecon_pending_growing_runs",
            "Successful runs in a row, up to the last, after which the job had more pending events than after the one before",
            self.pending_growing.clone(),
        );
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
            let mut tx = db::begin(pool).await?;
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
