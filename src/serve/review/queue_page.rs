//! The queue page (`GET /review`) as a view model: a page of pending events with the counts of
//! the filtered queue, who else has an event open, and the message a decision left. Its rows can
//! be selected for a bulk decision (`bulk`).

use std::collections::BTreeMap;

use anyhow::Result;
use axum::extract::State;
use axum::http::{HeaderMap, Uri};
use axum::response::{IntoResponse, Response};
use chrono::Utc;
use minijinja::value::Serde;
use serde::Serialize;

use super::params::{BadParam, Params};
use super::queue::{self, At, Filters};
use super::session::{self, Analyst, Flash};
use super::{Desk, claims, failed, gate, runs, span, when};

#[derive(Serialize)]
struct QueueRow {
    id: i64,
    job: String,
    source: String,
    address: String,
    event_time: String,
    received_at: String,
    pending: String,
    expires_in: String,
    expiring: bool,
    reason: String,
    candidates: String,
    metadata: String,
    /// Another analyst who has the event open.
    claimed_by: Option<String>,
}

pub(super) async fn queue_page(State(desk): State<Desk>, headers: HeaderMap, uri: Uri) -> Response {
    let analyst = match gate(&desk, &headers, &uri).await {
        Ok(a) => a,
        Err(resp) => return resp,
    };
    let (filters, at) = match queue_request(&uri) {
        Ok(request) => request,
        Err(bad) => return bad.into_response(),
    };
    let flash = match session::take_flash(&desk.pool, &headers, 0).await {
        Ok(flash) => flash,
        Err(e) => return failed(&e),
    };
    match queue_view(&desk, &analyst, filters, at, flash).await {
        Ok(resp) => resp,
        Err(e) => failed(&e),
    }
}

/// The queue's filters and page, from its query string.
fn queue_request(uri: &Uri) -> Result<(Filters, At), BadParam> {
    const KEYS: [&str; 8] = ["job", "reason", "min_days", "expiring_hours", "source", "q", "after", "before"];
    let p = Params::parse(uri.query().unwrap_or_default().as_bytes(), &KEYS)?;
    let at = match (queue::Cursor::param(&p, "after")?, queue::Cursor::param(&p, "before")?) {
        (Some(c), _) => At::After(c),
        (None, Some(c)) => At::Before(c),
        _ => At::First,
    };
    Ok((Filters::parse(&p)?, at))
}

/// A count as the page shows it: `1000+` past the cap.
fn shown(n: i64) -> String {
    if n > queue::COUNT_CAP { format!("{}+", queue::COUNT_CAP) } else { n.to_string() }
}

async fn queue_view(
    desk: &Desk,
    analyst: &Analyst,
    filters: Filters,
    at: At,
    flash: Option<Flash>,
) -> Result<Response> {
    let jobs = desk.jobs().await?;
    let pending_for: queue::PendingFor = jobs.iter().map(|(n, j)| (n.clone(), j.pending_for)).collect();
    let started = std::time::Instant::now();
    let page = queue::page(&desk.pool, &filters, &pending_for, at, queue::PAGE).await?;
    let counts = if filters.reason.is_none() && matches!(at, At::First) && page.next.is_none() {
        // The page holds the whole filtered queue (a rare text, say): its rows are the counts,
        // without reading the backlog a second time.
        let mut counts = BTreeMap::new();
        for r in &page.rows {
            *counts.entry(r.reason.clone()).or_insert(0) += 1;
        }
        counts
    } else {
        queue::counts(&desk.pool, &filters, page.by_id, &pending_for).await?
    };
    let took_ms = started.elapsed().as_millis() as u64;
    let mut job_names: Vec<String> = runs::jobs(&desk.pool).await?;
    job_names.extend(jobs.keys().cloned());
    job_names.sort();
    job_names.dedup();
    let ids: Vec<i64> = page.rows.iter().map(|r| r.id).collect();
    let mut claimed = claims::others(&desk.pool, &ids, &analyst.name).await?;
    let rows: Vec<QueueRow> = page.rows.iter().map(|r| queue_row(r, &pending_for, claimed.remove(&r.id))).collect();
    let filter_query = filters.to_query();
    let link = |key: &str, c: queue::Cursor| {
        let mut s = url::form_urlencoded::Serializer::new(filter_query.clone());
        s.append_pair(key, &c.text());
        format!("/review?{}", s.finish())
    };
    // The heading counts what the filters show: the reason's tile, or every tile.
    let matching: i64 = match &filters.reason {
        Some(r) => counts.get(r).copied().unwrap_or(0),
        None => counts.values().sum(),
    };
    let capped = counts.values().any(|n| *n > queue::COUNT_CAP);
    let all: i64 = counts.values().map(|n| (*n).min(queue::COUNT_CAP)).sum();
    let all = if capped { format!("{all}+") } else { all.to_string() };
    let total = if filters.reason.is_some() { shown(matching) } else { all.clone() };
    let counts: BTreeMap<String, String> = counts.into_iter().map(|(r, n)| (r, shown(n))).collect();
    let (next, prev) = (page.next.map(|c| link("after", c)), page.prev.map(|c| link("before", c)));
    let tile_query = Filters { reason: None, ..filters.clone() }.to_query();
    let filtered = filters != Filters::default();
    let ctx = minijinja::context! {
        title => "Queue",
        analyst => analyst.name.as_str(),
        csrf => analyst.csrf.as_str(),
        rows => Serde(&rows),
        counts => Serde(&counts),
        total, all,
        filtered,
        jobs => Serde(&job_names),
        reasons => Serde(&queue::REASONS),
        f => minijinja::context! {
            job => filters.job, reason => filters.reason, min_days => filters.min_days,
            expiring_hours => filters.expiring_hours, source => filters.source, q => filters.search,
        },
        tile_query,
        filter_query,
        next,
        prev,
        took_ms,
        flash => flash.map(Serde),
    };
    Ok(desk.render("queue.html", ctx))
}

fn queue_row(r: &queue::Row, pending_for: &queue::PendingFor, claimed_by: Option<String>) -> QueueRow {
    let now = Utc::now();
    let expires = pending_for.get(&r.job).map(|p| r.received_at + *p);
    QueueRow {
        id: r.id,
        job: r.job.clone(),
        source: r.source.clone(),
        address: match (&r.session_id, &r.master_id) {
            (Some(s), _) => format!("SessionId {s}"),
            (_, Some(m)) => format!("MasterId {m}"),
            _ => String::new(),
        },
        event_time: when(r.event_time),
        received_at: when(r.received_at),
        pending: span(now - r.received_at),
        expires_in: expires.map_or("?".to_owned(), |e| span(e - now)),
        expiring: expires.is_some_and(|e| e - now < chrono::Duration::hours(24)),
        reason: r.reason.clone(),
        candidates: r.candidates.join(", "),
        metadata: r.metadata.clone(),
        claimed_by,
    }
}
