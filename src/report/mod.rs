//! The reconciliation report: `report.json`, `unmatched.csv` and `report.html` in
//! `<report dir>/<run id>/`, and the run history.

pub mod history;
pub mod webhook;

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sqlx::PgConnection;

use crate::event::Rejected;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    pub run_id: String,
    pub job: String,
    /// `run` or `rematch`.
    pub kind: String,
    pub started_at: DateTime<Utc>,
    pub finished_at: DateTime<Utc>,
    pub dry_run: bool,
    pub summary: Summary,
    pub unmatched: Vec<Unmatched>,
    pub rejected: Vec<Rejected>,
    /// Inbox files this run picked and what became of them.
    pub files: Vec<FileEntry>,
    /// For a rematch: what changed against the previous decisions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub diff: Option<Diff>,
}

/// What a rematch changed.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Diff {
    /// Events re-evaluated.
    pub evaluated: u64,
    pub newly_matched: u64,
    pub moved: u64,
    pub newly_unmatched: u64,
    /// Same target, now by another rule.
    pub rule_changed: u64,
    pub unchanged: u64,
    /// Per rule: events it now decides that it did not (`gained`) and the reverse (`lost`).
    pub by_rule: BTreeMap<String, RuleDiff>,
    /// Every event whose target or rule changed.
    pub changes: Vec<Change>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct RuleDiff {
    pub gained: u64,
    pub lost: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Change {
    pub event_id: String,
    /// `newly_matched`, `moved`, `newly_unmatched` or `rule_changed`.
    pub change: String,
    pub from: Option<TargetRef>,
    pub to: Option<TargetRef>,
    pub rule_before: Option<String>,
    pub rule_after: Option<String>,
    /// For `newly_unmatched`: why.
    pub reason: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TargetRef {
    /// `call` or `call_group`.
    pub kind: String,
    pub id: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Summary {
    /// Valid events stored by this run.
    pub ingested: u64,
    /// Records this run refused.
    pub rejected: u64,
    /// Events matched in this run.
    pub matched: u64,
    /// Entries of `unmatched`: still pending, plus expired in this run.
    pub unmatched: u64,
    pub by_rule: BTreeMap<String, u64>,
    pub by_reason: BTreeMap<String, u64>,
    pub expired: u64,
    pub pending: u64,
    pub calls_updated: u64,
    pub groups_updated: u64,
    pub files_ingested: u64,
    pub files_duplicate: u64,
    pub files_failed: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Unmatched {
    pub event_id: String,
    pub source: String,
    pub session_id: Option<String>,
    pub event_time: DateTime<Utc>,
    pub received_at: DateTime<Utc>,
    /// `unknown_session`, `missing_key`, `no_candidate`, `ambiguous`, or `expired`.
    pub reason: String,
    /// For `expired`: the reason it never matched.
    pub last_reason: Option<String>,
    pub candidates: Vec<String>,
    pub metadata: Value,
    /// When it stops being retried (`received_at + pending_for`).
    pub expires_at: DateTime<Utc>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct FileEntry {
    pub file: String,
    pub sha256: String,
    /// `ingested`, `duplicate` or `failed`.
    pub status: String,
    pub events: u64,
    pub rejected: u64,
    pub archived_to: Option<String>,
    pub reason: Option<String>,
}

/// Every unmatched event of the job still pending, plus those expired by `run_id`.
pub async fn load_unmatched(
    conn: &mut PgConnection,
    job: &str,
    run_id: i64,
    pending_for: chrono::Duration,
) -> Result<Vec<Unmatched>> {
    type Row =
        (i64, String, Option<String>, DateTime<Utc>, DateTime<Utc>, String, Option<String>, Option<Vec<String>>, Value);
    let rows: Vec<Row> = sqlx::query_as(
        "select id, source, session_id, event_time, received_at, state, reason, candidates, metadata
         from events
         where job = $1 and (state = 'pending' or (state = 'expired' and decided_run = $2))
         order by received_at, id",
    )
    .bind(job)
    .bind(run_id)
    .fetch_all(conn)
    .await
    .context("reading unmatched events")?;
    Ok(rows
        .into_iter()
        .map(|(id, source, session_id, event_time, received_at, state, reason, candidates, metadata)| {
            let expired = state == "expired";
            Unmatched {
                event_id: id.to_string(),
                source,
                session_id,
                event_time,
                received_at,
                reason: if expired { "expired".into() } else { reason.clone().unwrap_or_default() },
                last_reason: if expired { reason } else { None },
                candidates: candidates.unwrap_or_default(),
                metadata,
                expires_at: received_at + pending_for,
            }
        })
        .collect())
}

/// Writes `report.json`, `unmatched.csv` and `report.html` into `dir`.
pub fn write_all(report: &Report, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let json = serde_json::to_vec_pretty(report)?;
    std::fs::write(dir.join("report.json"), json).context("writing report.json")?;
    let mut csv = Vec::new();
    write_unmatched_csv(report, &mut csv)?;
    std::fs::write(dir.join("unmatched.csv"), csv).context("writing unmatched.csv")?;
    std::fs::write(dir.join("report.html"), render_html(report)?).context("writing report.html")?;
    Ok(())
}

/// One row per unmatched event; Metadata as JSON in one column plus its top-level keys as
/// columns, in alphabetical order. Cells that a spreadsheet would run as a formula are prefixed with `'`.
pub fn write_unmatched_csv(report: &Report, out: impl std::io::Write) -> Result<()> {
    let mut keys: Vec<&str> = Vec::new();
    for u in &report.unmatched {
        if let Value::Object(m) = &u.metadata {
            for k in m.keys() {
                if !keys.contains(&k.as_str()) {
                    keys.push(k);
                }
            }
        }
    }
    keys.sort_unstable();
    let mut w = csv::Writer::from_writer(out);
    let fixed = [
        "event_id",
        "source",
        "session_id",
        "event_time",
        "received_at",
        "expires_at",
        "reason",
        "last_reason",
        "candidates",
        "metadata",
    ];
    w.write_record(fixed.iter().copied().chain(keys.iter().copied()).map(escape_cell))?;
    for u in &report.unmatched {
        let mut row = vec![
            u.event_id.clone(),
            u.source.clone(),
            u.session_id.clone().unwrap_or_default(),
            u.event_time.to_rfc3339(),
            u.received_at.to_rfc3339(),
            u.expires_at.to_rfc3339(),
            u.reason.clone(),
            u.last_reason.clone().unwrap_or_default(),
            u.candidates.join(" "),
            u.metadata.to_string(),
        ];
        for k in &keys {
            row.push(match u.metadata.get(*k) {
                None | Some(Value::Null) => String::new(),
                Some(Value::String(s)) => s.clone(),
                Some(v) => v.to_string(),
            });
        }
        w.write_record(row.iter().map(|c| escape_cell(c)))?;
    }
    w.flush()?;
    Ok(())
}

/// Guards a cell against spreadsheet formula injection (OWASP): a leading `= + - @`, tab or
/// carriage return gets a `'` in front.
pub fn escape_cell(s: &str) -> String {
    match s.chars().next() {
        Some('=' | '+' | '-' | '@' | '\t' | '\r') => format!("'{s}"),
        _ => s.to_owned(),
    }
}

const HTML: &str = include_str!("templates/report.html");

/// Buckets of the ageing chart: (label, lower bound in days).
const AGE_BUCKETS: &[(&str, f64)] =
    &[("< 1 day", 0.0), ("1–2 days", 1.0), ("2–3 days", 2.0), ("3–7 days", 3.0), ("≥ 7 days", 7.0)];

/// The self-contained HTML page (no network needed) for analysts.
pub fn render_html(report: &Report) -> Result<String> {
    let mut env = minijinja::Environment::new();
    env.add_template("report.html", HTML)?;
    let tmpl = env.get_template("report.html")?;
    let now = report.finished_at;
    let days = |from: DateTime<Utc>, to: DateTime<Utc>| (to - from).num_minutes() as f64 / 1440.0;
    let rows: Vec<Value> = report
        .unmatched
        .iter()
        .map(|u| {
            serde_json::json!({
                "u": u,
                "days_pending": format!("{:.1}", days(u.received_at, now)),
                "days_left": format!("{:.1}", days(now, u.expires_at).max(0.0)),
                "metadata": u.metadata.to_string(),
                "event_time": short_time(u.event_time),
                "received_at": short_time(u.received_at),
                "expires_at": short_time(u.expires_at),
            })
        })
        .collect();
    // Ageing: how long unmatched events have been pending, and how soon they expire.
    let bucket = |d: f64| AGE_BUCKETS.iter().rposition(|(_, lo)| d >= *lo).unwrap_or(0);
    let mut pending = vec![0u64; AGE_BUCKETS.len()];
    let mut expiring = vec![0u64; AGE_BUCKETS.len()];
    for u in report.unmatched.iter().filter(|u| u.reason != "expired") {
        pending[bucket(days(u.received_at, now))] += 1;
        expiring[bucket(days(now, u.expires_at).max(0.0))] += 1;
    }
    let max = pending.iter().chain(&expiring).copied().max().unwrap_or(0).max(1);
    let ageing: Vec<Value> = AGE_BUCKETS
        .iter()
        .enumerate()
        .map(|(i, (label, _))| {
            serde_json::json!({
                "label": label, "pending": pending[i], "expiring": expiring[i],
                "pending_w": pending[i] * 260 / max, "expiring_w": expiring[i] * 260 / max,
            })
        })
        .collect();
    let r = jinja(&serde_json::to_value(report)?);
    let rows = jinja(&Value::Array(rows));
    let ageing = jinja(&Value::Array(ageing));
    let started = short_time(report.started_at);
    let took = format!("{:.2} s", (report.finished_at - report.started_at).num_milliseconds() as f64 / 1000.0);
    Ok(tmpl.render(minijinja::context! { r, rows, ageing, started, took })?)
}

/// A JSON value for the template. Not through serde: with `arbitrary_precision` serde_json
/// hands its numbers to other serializers as a private struct holding the text.
fn jinja(value: &Value) -> minijinja::Value {
    match value {
        Value::Null => minijinja::Value::from(()),
        Value::Bool(b) => minijinja::Value::from(*b),
        Value::Number(n) => match (n.as_i64(), n.as_u64(), n.as_f64()) {
            (Some(i), _, _) => minijinja::Value::from(i),
            (_, Some(u), _) => minijinja::Value::from(u),
            (_, _, Some(f)) => minijinja::Value::from(f),
            _ => minijinja::Value::from(n.to_string()),
        },
        Value::String(s) => minijinja::Value::from(s.as_str()),
        Value::Array(items) => minijinja::Value::from(items.iter().map(jinja).collect::<Vec<_>>()),
        Value::Object(map) => {
            minijinja::Value::from(map.iter().map(|(k, v)| (k.clone(), jinja(v))).collect::<BTreeMap<_, _>>())
        }
    }
}

/// `2026-11-02 10:00:00 UTC`: what a person reads in a table.
fn short_time(t: DateTime<Utc>) -> String {
    t.format("%Y-%m-%d %H:%M:%S UTC").to_string()
}
