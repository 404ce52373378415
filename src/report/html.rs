//! `report.html`: one self-contained page an analyst opens in a browser, of bounded size
//! whatever the backlog: counts and charts over every event, tables capped.

use anyhow::Result;
use base64::Engine as _;
use chrono::{DateTime, Utc};
use serde_json::Value;
use sha2::{Digest as _, Sha256};

use super::types::Report;
use super::unmatched::AGE_BUCKETS;

const HTML: &str = include_str!("templates/report.html");

/// Rows of the rejected-records and rematch-changes tables the page shows.
pub const TABLE_ROWS: usize = 500;
/// Characters of a metadata or raw record shown in a cell (the CSV and JSON have all of it).
const CELL_CHARS: usize = 400;
/// Candidates named in a cell.
const CELL_CANDIDATES: usize = 10;

/// What each reason an event is unmatched for means, for the page's counts by reason.
const REASONS: &[(&str, &str)] = &[
    ("unknown_session", "its SessionId names no call yet; retried on every run until it expires"),
    ("unknown_group", "its MasterId names no call group yet; retried on every run until it expires"),
    ("missing_key", "its Metadata has the keys of no rule"),
    ("no_candidate", "no call or call group has its key values (in the time window)"),
    ("ambiguous", "several calls or groups are equally good candidates"),
    ("expired", "unmatched past the job's pending_for: no longer retried, but by a rematch"),
];

/// The Content-Security-Policy of HTML made from `templates`: nothing loaded from elsewhere, and
/// no script or style but the inline `<script>` and `<style>` elements of the templates, each
/// allowed by its sha256 (their text is static: no template expression inside, which a test
/// checks); `extra` adds directives (a `<meta>` policy cannot hold `frame-ancestors`).
pub fn content_security_policy<'t>(templates: impl IntoIterator<Item = &'t str>, extra: &str) -> String {
    let (mut scripts, mut styles) = (Vec::new(), Vec::new());
    for text in templates {
        for (tag, hashes) in [("script", &mut scripts), ("style", &mut styles)] {
            for body in inline_elements(text, tag) {
                let digest = Sha256::digest(body.as_bytes());
                hashes.push(format!("'sha256-{}'", base64::engine::general_purpose::STANDARD.encode(digest)));
            }
        }
    }
    let list = |h: Vec<String>| if h.is_empty() { "'none'".to_owned() } else { h.join(" ") };
    let mut policy = format!(
        "default-src 'none'; script-src {}; style-src {}; img-src data:; base-uri 'none'",
        list(scripts),
        list(styles)
    );
    if !extra.is_empty() {
        policy.push_str("; ");
        policy.push_str(extra);
    }
    policy
}

/// The text inside each `<tag>…</tag>` of `html` (elements written without attributes).
pub fn inline_elements<'h>(html: &'h str, tag: &str) -> Vec<&'h str> {
    let (open, close) = (format!("<{tag}>"), format!("</{tag}>"));
    let mut found = Vec::new();
    let mut rest = html;
    while let Some(at) = rest.find(&open) {
        let body = &rest[at + open.len()..];
        let Some(end) = body.find(&close) else { break };
        found.push(&body[..end]);
        rest = &body[end + close.len()..];
    }
    found
}

/// report.html's policy, in its `<meta>` and in the header of the review desk serving it.
pub fn csp() -> String {
    content_security_policy([HTML], "form-action 'none'")
}

/// The page (no network needed) for analysts.
pub fn render_html(report: &Report) -> Result<String> {
    let mut env = minijinja::Environment::new();
    env.add_template("report.html", HTML)?;
    let tmpl = env.get_template("report.html")?;
    let now = report.finished_at;
    let days = |from: DateTime<Utc>, to: DateTime<Utc>| (to - from).num_minutes() as f64 / 1440.0;
    let shown = &report.unmatched;
    let rows: Vec<Value> = shown
        .events
        .iter()
        .map(|u| {
            let mut candidates = u.candidates.iter().take(CELL_CANDIDATES).cloned().collect::<Vec<_>>().join(", ");
            if u.candidates.len() > CELL_CANDIDATES {
                candidates.push_str(&format!(" … and {} more", u.candidates.len() - CELL_CANDIDATES));
            }
            serde_json::json!({
                "u": u,
                "candidates": candidates,
                "days_pending": format!("{:.1}", days(u.received_at, now)),
                "days_left": format!("{:.1}", days(now, u.expires_at).max(0.0)),
                "metadata": clip(&u.metadata.to_string()),
                "event_time": short_time(u.event_time),
                "received_at": short_time(u.received_at),
                "expires_at": short_time(u.expires_at),
            })
        })
        .collect();
    // Ageing, over every pending event: how long they have been pending, how soon they expire.
    let (pending, expiring) = (&shown.pending_by_age, &shown.expiring_by_age);
    let max = pending.iter().chain(expiring).copied().max().unwrap_or(0).max(1);
    let ageing: Vec<Value> = AGE_BUCKETS
        .iter()
        .enumerate()
        .map(|(i, (label, _))| {
            let (p, e) = (pending.get(i).copied().unwrap_or(0), expiring.get(i).copied().unwrap_or(0));
            serde_json::json!({
                "label": label, "pending": p, "expiring": e, "pending_w": p * 260 / max, "expiring_w": e * 260 / max,
            })
        })
        .collect();
    let rejected: Vec<Value> = report
        .rejected
        .iter()
        .take(TABLE_ROWS)
        .map(|x| serde_json::json!({ "source": x.source, "reason": x.reason, "raw": clip(&x.raw) }))
        .collect();
    let changes = report.diff.as_ref().map_or(&[][..], |d| &d.changes[..]);
    let changes = &changes[..changes.len().min(TABLE_ROWS)];
    // The page is given the report's small parts only, never a list of the backlog's size.
    let head = serde_json::json!({
        "run_id": report.run_id.to_string(), "job": report.job, "kind": report.kind, "dry_run": report.dry_run,
        "summary": report.summary, "files": report.files,
        "diff": report.diff.as_ref().map(|d| serde_json::json!({
            "evaluated": d.evaluated, "newly_matched": d.newly_matched, "moved": d.moved,
            "newly_unmatched": d.newly_unmatched, "rule_changed": d.rule_changed, "unchanged": d.unchanged,
            "by_rule": d.by_rule, "n_changes": d.changes.len(), "kept_manual": d.kept_manual,
        })),
        "undo": report.undo, "manual": report.manual,
    });
    let omitted: u64 = shown.omitted.values().sum();
    let started = short_time(report.started_at);
    let took = format!("{:.2} s", (report.finished_at - report.started_at).num_milliseconds() as f64 / 1000.0);
    Ok(tmpl.render(minijinja::context! {
        r => jinja(&serde_json::to_value(&head)?),
        rows => jinja(&serde_json::to_value(&rows)?),
        ageing => jinja(&serde_json::to_value(&ageing)?),
        rejected => jinja(&serde_json::to_value(&rejected)?),
        changes => jinja(&serde_json::to_value(changes)?),
        omitted_by_reason => jinja(&serde_json::to_value(&shown.omitted)?),
        omitted,
        per_end => shown.per_end,
        reason_help => REASONS.iter().copied().collect::<std::collections::BTreeMap<_, _>>(),
        table_rows => TABLE_ROWS,
        started,
        took,
        csp => csp(),
    })?)
}

/// A JSON value for the template. Not through `minijinja::value::Serde`: with serde_json's
/// `arbitrary_precision` numbers reach other serializers as a private struct holding the text.
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
        Value::Object(map) => minijinja::Value::from(
            map.iter().map(|(k, v)| (k.clone(), jinja(v))).collect::<std::collections::BTreeMap<_, _>>(),
        ),
    }
}

/// The first [`CELL_CHARS`] characters of `s`, with `…` when cut.
fn clip(s: &str) -> String {
    match s.char_indices().nth(CELL_CHARS) {
        None => s.to_owned(),
        Some((at, _)) => format!("{}…", &s[..at]),
    }
}

/// `2026-11-02 10:00:00 UTC`: what a person reads in a table.
fn short_time(t: DateTime<Utc>) -> String {
    t.format("%Y-%m-%d %H:%M:%S UTC").to_string()
}
