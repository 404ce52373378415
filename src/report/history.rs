//! Run history: `report list`, `report show`, and the summary a person reads after a run.

use std::fmt::Write as _;
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use chrono::{DateTime, Utc};
use sqlx::PgPool;

use super::{Report, Summary};
use crate::cli::ReportFormat;

/// The few lines printed after a run.
pub fn summary_text(report: &Report, dir: &std::path::Path) -> String {
    let s = &report.summary;
    let secs = (report.finished_at - report.started_at).num_milliseconds() as f64 / 1000.0;
    let mut out = String::new();
    let dry = if report.dry_run { " (dry run: nothing written)" } else { "" };
    let _ = writeln!(out, "callrecon: job {}, {} {} in {secs:.2}s{dry}", report.job, report.kind, report.run_id);
    let _ = writeln!(
        out,
        "  ingested  {:>6} events   ({} rejected records, {} files, {} duplicate, {} failed)",
        s.ingested, s.rejected, s.files_ingested, s.files_duplicate, s.files_failed
    );
    let _ = writeln!(out, "  matched   {:>6}          {}", s.matched, counts(&s.by_rule));
    let _ = writeln!(out, "  unmatched {:>6}          {}", s.unmatched, counts(&s.by_reason));
    if let Some(d) = &report.diff {
        let _ = writeln!(
            out,
            "  rematch   {:>6} events   {} newly matched · {} moved · {} newly unmatched · {} rule changed · {} unchanged",
            d.evaluated, d.newly_matched, d.moved, d.newly_unmatched, d.rule_changed, d.unchanged
        );
    }
    let _ = writeln!(out, "  applied   {:>6} calls, {} call groups changed", s.calls_updated, s.groups_updated);
    let _ = write!(out, "report: {}", dir.join("report.html").display());
    out
}

fn counts(m: &std::collections::BTreeMap<String, u64>) -> String {
    m.iter().map(|(k, v)| format!("{k} {v}")).collect::<Vec<_>>().join(" · ")
}

/// `callrecon report list`: a table of recent runs.
pub async fn list(pool: &PgPool, job: Option<&str>, limit: i64) -> Result<String> {
    type Row = (
        i64,
        String,
        String,
        bool,
        DateTime<Utc>,
        Option<DateTime<Utc>>,
        String,
        Option<sqlx::types::Json<Summary>>,
        Option<String>,
    );
    let rows: Vec<Row> = sqlx::query_as(
        "select id, job, kind, dry_run, started_at, finished_at, status, summary,
                concat_ws('; ', error, 'webhook: ' || nullif(notification, 'delivered'))
         from runs where $1::text is null or job = $1 order by id desc limit $2",
    )
    .bind(job)
    .bind(limit)
    .fetch_all(pool)
    .await
    .context("reading runs")?;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:>6}  {:<14} {:<8} {:<20} {:>8}  {:<4} {:>8} {:>8} {:>8} {:>9}  status",
        "run", "job", "kind", "started (UTC)", "duration", "dry", "ingested", "rejected", "matched", "unmatched"
    );
    for (id, job, kind, dry, started, finished, status, summary, error) in rows {
        let dur = finished.map_or("-".into(), |f| format!("{:.1}s", (f - started).num_milliseconds() as f64 / 1000.0));
        let s = summary.map(|s| s.0);
        let n = |f: fn(&Summary) -> u64| s.as_ref().map_or("-".into(), |s| f(s).to_string());
        let _ = write!(
            out,
            "{id:>6}  {job:<14} {kind:<8} {:<20} {dur:>8}  {:<4} {:>8} {:>8} {:>8} {:>9}  {status}",
            started.format("%Y-%m-%d %H:%M:%S"),
            if dry { "yes" } else { "" },
            n(|s| s.ingested),
            n(|s| s.rejected),
            n(|s| s.matched),
            n(|s| s.unmatched),
        );
        if let Some(e) = error.filter(|e| !e.is_empty()) {
            let _ = write!(out, ": {e}");
        }
        out.push('\n');
    }
    Ok(out)
}

/// `callrecon report show RUN`: the run's report in the chosen format.
pub async fn show(pool: &PgPool, run: i64, format: ReportFormat) -> Result<String> {
    let row: Option<(String, Option<String>, Option<String>)> =
        sqlx::query_as("select status, report_dir, error from runs where id = $1")
            .bind(run)
            .fetch_optional(pool)
            .await?;
    let Some((status, dir, error)) = row else { bail!("no run {run}; `callrecon report list` shows the runs") };
    let Some(dir) = dir.map(PathBuf::from) else {
        bail!("run {run} has no report ({status}{})", error.map(|e| format!(": {e}")).unwrap_or_default())
    };
    let read = |name: &str| {
        let path = dir.join(name);
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))
    };
    Ok(match format {
        ReportFormat::Json => read("report.json")?,
        ReportFormat::Csv => read("unmatched.csv")?,
        ReportFormat::Html => read("report.html")?,
        ReportFormat::Text => {
            let report: Report = serde_json::from_str(&read("report.json")?).context("parsing report.json")?;
            let mut out = summary_text(&report, &dir);
            out.push_str("\n\n");
            for u in &report.unmatched {
                let _ = writeln!(
                    out,
                    "  event {:>6}  {:<16} {}  {}{}",
                    u.event_id,
                    u.reason,
                    u.event_time.format("%Y-%m-%d %H:%M:%S"),
                    u.source,
                    if u.candidates.is_empty() {
                        String::new()
                    } else {
                        format!("  candidates: {}", u.candidates.join(", "))
                    }
                );
            }
            for r in &report.rejected {
                let _ = writeln!(out, "  rejected  {}: {}", r.source, r.reason);
            }
            out
        }
    })
}
