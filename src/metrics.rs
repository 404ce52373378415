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
//!
//! `run_metrics.rs`: [`RunMetrics`]; `queue.rs`: [`QueueGauges`]; `export.rs`: the endpoint and
//! the textfile. Here: what they share, and [`log_summary`].

mod export;
mod queue;
mod run_metrics;

pub use export::{Endpoint, write_textfile};
pub use queue::QueueGauges;
pub use run_metrics::RunMetrics;

use std::sync::atomic::AtomicU64;
use std::time::Duration;

use anyhow::Result;
use prometheus_client::encoding::prometheus_text;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use serde_json::json;

use crate::run::Finished;

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
