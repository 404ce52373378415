//! The run history of `/review/runs`: the latest runs with their counts, a chart of matched /
//! unmatched / expired per run (inline SVG, so a bad night stands out without JavaScript), and
//! where each run's report is.

use std::path::PathBuf;

use anyhow::{Context, Result};
use chrono::{DateTime, Utc};

use crate::{report::Summary, runs as store};

/// The jobs that have run and the job file of each one's latest run, from the store.
pub use store::{job_files, jobs};

/// Runs listed and charted.
pub const RUNS: i64 = 60;

/// A run as the page lists it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RunRow {
    pub id: i64,
    pub job: String,
    pub kind: String,
    pub dry_run: bool,
    pub started_at: DateTime<Utc>,
    pub seconds: Option<f64>,
    pub status: String,
    pub error: Option<String>,
    pub ingested: Option<u64>,
    pub matched: Option<u64>,
    /// Unmatched and still pending after the run.
    pub pending: Option<u64>,
    /// Expired in this run.
    pub expired: Option<u64>,
    pub dismissed: Option<u64>,
    /// The report can be served (written and not pruned).
    pub has_report: bool,
}

/// The latest [`RUNS`] runs, of one job or all, newest first.
pub async fn latest(pool: &sqlx::PgPool, job: Option<&str>) -> Result<Vec<RunRow>> {
    store::recent(pool, job, RUNS).await?.into_iter().map(row).collect()
}

fn row(run: store::Recent) -> Result<RunRow> {
    let has_report = run.has_report();
    let s: Option<Summary> = run.summary.map(serde_json::from_value).transpose().context("reading runs")?;
    Ok(RunRow {
        id: run.id,
        job: run.job,
        kind: run.kind,
        dry_run: run.dry_run,
        started_at: run.started_at,
        seconds: run.finished_at.map(|f| (f - run.started_at).num_milliseconds() as f64 / 1000.0),
        status: run.status,
        error: run.error,
        ingested: s.as_ref().map(|s| s.ingested),
        matched: s.as_ref().map(|s| s.matched),
        pending: s.as_ref().map(|s| s.unmatched.saturating_sub(s.expired)),
        expired: s.as_ref().map(|s| s.expired),
        dismissed: s.as_ref().map(|s| s.dismissed),
        has_report,
    })
}

/// The `report.html` of run `id`, if it was written and not pruned.
pub async fn report_file(pool: &sqlx::PgPool, id: i64) -> Result<Option<PathBuf>> {
    let run = store::report_of(pool, id).await?;
    Ok(run
        .filter(|r| r.report_pruned_at.is_none())
        .and_then(|r| r.report_dir)
        .map(|d| PathBuf::from(d).join("report.html")))
}

/// The chart of `/review/runs` (drawn by `runs.html`): stacked bars, oldest run on the left:
/// matched, unmatched (pending), expired. Dry and failed runs (no counts) leave a gap. Each bar
/// links to its run's row.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Chart {
    pub width: usize,
    pub height: usize,
    /// A bar's width.
    pub bar: String,
    /// The largest run's events (the chart's full height).
    pub max: u64,
    pub bars: Vec<Bar>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Bar {
    pub id: i64,
    pub job: String,
    pub kind: String,
    pub matched: u64,
    pub pending: u64,
    pub expired: u64,
    pub x: String,
    pub rects: Vec<Rect>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Rect {
    pub class: &'static str,
    pub y: String,
    pub height: String,
}

/// The chart of `runs` (newest first, as listed).
pub fn chart(runs: &[RunRow]) -> Chart {
    const W: usize = 900;
    const H: usize = 180;
    let runs: Vec<&RunRow> = runs.iter().rev().collect();
    let total = |r: &RunRow| r.matched.unwrap_or(0) + r.pending.unwrap_or(0) + r.expired.unwrap_or(0);
    let max = runs.iter().map(|r| total(r)).max().unwrap_or(0).max(1);
    let slot = W as f64 / runs.len().max(1) as f64;
    let bar = (slot * 0.8).max(1.0);
    let bars = runs
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let mut y = H as f64;
            let mut rects = Vec::new();
            for (n, class) in [(r.matched, "matched"), (r.pending, "unmatched"), (r.expired, "expired")] {
                let h = n.unwrap_or(0) as f64 * H as f64 / max as f64;
                if h > 0.0 {
                    y -= h;
                    rects.push(Rect { class, y: format!("{y:.1}"), height: format!("{h:.1}") });
                }
            }
            Bar {
                id: r.id,
                job: r.job.clone(),
                kind: r.kind.clone(),
                matched: r.matched.unwrap_or(0),
                pending: r.pending.unwrap_or(0),
                expired: r.expired.unwrap_or(0),
                x: format!("{:.1}", i as f64 * slot + (slot - bar) / 2.0),
                rects,
            }
        })
        .collect();
    Chart { width: W, height: H, bar: format!("{bar:.1}"), max, bars }
}

/// How long a run took, as measured: milliseconds under a second (`40 ms`), else seconds to a
/// tenth (`2.5 s`).
pub fn took(seconds: f64) -> String {
    if seconds < 1.0 { format!("{} ms", (seconds * 1000.0).round() as i64) } else { format!("{seconds:.1} s") }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 42: a run of 40 ms said "took 0.0 s".
    #[test]
    fn durations_under_a_second_are_shown_in_milliseconds() {
        assert_eq!(took(0.04), "40 ms");
        assert_eq!(took(0.9996), "1000 ms");
        assert_eq!(took(2.46), "2.5 s");
    }

    fn run(id: i64, matched: u64, pending: u64, expired: u64) -> RunRow {
        RunRow {
            id,
            job: "j".into(),
            kind: "run".into(),
            dry_run: false,
            started_at: Utc::now(),
            seconds: Some(1.0),
            status: "succeeded".into(),
            error: None,
            ingested: Some(matched + pending),
            matched: Some(matched),
            pending: Some(pending),
            expired: Some(expired),
            dismissed: Some(0),
            has_report: true,
        }
    }

    #[test]
    fn the_chart_has_a_bar_per_run_oldest_first() {
        let c = chart(&[run(3, 10, 90, 0), run(2, 100, 0, 5)]);
        assert_eq!(c.bars.iter().map(|b| b.id).collect::<Vec<_>>(), [2, 3]);
        let classes = |b: &Bar| b.rects.iter().map(|r| r.class).collect::<Vec<_>>();
        assert_eq!(classes(&c.bars[0]), ["matched", "expired"]);
        assert_eq!(classes(&c.bars[1]), ["matched", "unmatched"]);
        assert_eq!(c.max, 105);
        assert!(chart(&[]).bars.is_empty());
    }
}
