//! The desk's decisions: `POST /review/events/{id}` (attach, dismiss, reopen one event), all
//! through `resolve::resolve` as `callrecon resolve` makes them, under the analyst's name.
//!
//! A decision made moves the analyst on: to the next event of the queue they filtered (or the
//! queue, when none is left), with a confirmation offering to undo it in one click (a reopen).
//! A decision is refused when the event changed since its page was loaded (the form's `seen`),
//! and the refusal says what changed.

use axum::extract::{Path, State};
use axum::http::{HeaderMap, Uri};
use axum::response::{IntoResponse, Response};

use super::params::{BadParam, Params};
use super::queue::{self, Filters};
use super::session::{self, Analyst, Flash, Undo};
use super::{Desk, claims, event, failed, form, gate_form, redirect};
use crate::http::{BodyError, Posted};
use crate::inspect;
use crate::job::Job;
use crate::resolve::{self, Refused, Request, Resolved, To};

/// The form of an event page's decisions.
const FIELDS: [&str; 7] = ["csrf", "filters", "action", "to", "typed", "note", "seen"];

/// `POST /review/events/{id}`: `action` = attach (to the chosen `to`, or the call/group id
/// typed in `typed`), dismiss (with a `note`) or reopen; through `resolve`, as the analyst.
pub(super) async fn decide(
    State(desk): State<Desk>,
    headers: HeaderMap,
    uri: Uri,
    Path(id): Path<i64>,
    body: Result<Posted, BodyError>,
) -> Response {
    let f = match form(body, &FIELDS) {
        Ok(f) => f,
        Err(bad) => return bad.into_response(),
    };
    let analyst = match gate_form(&desk, &headers, &uri, &f).await {
        Ok(a) => a,
        Err(resp) => return resp,
    };
    let filters = match Filters::from_query(f.raw("filters")) {
        Ok(filters) => filters,
        Err(bad) => return BadParam::new("filters", bad.to_string()).into_response(),
    };
    let (flash, to) = match decision(&desk, &analyst, id, &f).await {
        Ok(done) => moved_on(&desk, &analyst, &filters, done).await,
        Err(text) => (Flash { event: id, kind: "error".to_owned(), text, undo: None }, Some(id)),
    };
    if let Err(e) = session::set_flash(&desk.pool, &headers, &flash).await {
        return failed(&e);
    }
    let query = filters.to_query();
    match to {
        Some(id) => redirect(&event::event_link(id, &query)),
        None if query.is_empty() => redirect("/review"),
        None => redirect(&format!("/review?{query}")),
    }
}

/// Where the desk goes after a decision, and what it says there: the next event of the queue
/// (or the queue: `None`) with an undo, after an attach or a dismissal; the event itself after a
/// reopen.
async fn moved_on(desk: &Desk, analyst: &Analyst, filters: &Filters, done: Resolved) -> (Flash, Option<i64>) {
    let id = done.event_id;
    let text = format!("event {id}: {} -> {}", done.before.describe(), done.after.describe());
    if done.after.person.is_none() {
        return (Flash { event: id, kind: "msg".to_owned(), text, undo: None }, Some(id));
    }
    if let Err(e) = claims::release(&desk.pool, &[id], &analyst.name).await {
        tracing::warn!(error = crate::db::error_line(&e), event = id, "review desk: claim not released");
    }
    let next = match next_of(desk, filters, id).await {
        Ok(next) => next,
        Err(e) => {
            tracing::warn!(error = crate::db::error_line(&e), event = id, "review desk: next event not found");
            Some(id)
        }
    };
    let undo = Some(Undo { event: id, seen: done.after.describe() });
    (Flash { event: next.unwrap_or(0), kind: "msg".to_owned(), text, undo }, next)
}

async fn next_of(desk: &Desk, filters: &Filters, id: i64) -> anyhow::Result<Option<i64>> {
    let jobs = desk.jobs().await?;
    let pending_for: queue::PendingFor = jobs.iter().map(|(n, j)| (n.clone(), j.pending_for)).collect();
    Ok(queue::neighbours(&desk.pool, filters, &pending_for, id).await?.0)
}

/// What an analyst's form decided, or why nothing was changed.
async fn decision(desk: &Desk, analyst: &Analyst, id: i64, f: &Params) -> Result<Resolved, String> {
    let to = match f.get("action") {
        Some("attach") => match f.get("typed").or_else(|| f.get("to")).map(|t| t.parse::<To>()) {
            Some(Ok(to @ To::Attach(..))) => to,
            Some(Ok(_) | Err(_)) => return Err("type the target as call:ID or group:ID".to_owned()),
            None => return Err("choose a call or group to attach the event to, or type one".to_owned()),
        },
        Some("dismiss") => To::Dismiss,
        Some("reopen") => To::Reopen,
        _ => return Err("unknown action".to_owned()),
    };
    let job = job_of(desk, id).await?;
    let request = Request {
        line: None,
        event_id: id,
        to,
        note: f.get("note").map(str::to_owned),
        reported_reason: None,
        seen: f.get("seen").map(str::to_owned),
    };
    resolved(desk, analyst, &job, &[request]).await?.pop().ok_or_else(|| "nothing changed".to_owned())
}

/// The job file of event `id`'s job.
pub(super) async fn job_of(desk: &Desk, id: i64) -> Result<Job, String> {
    let unexpected = |e: anyhow::Error| format!("nothing was changed: {}", crate::db::error_line(&e));
    let jobs = desk.jobs().await.map_err(unexpected)?;
    match inspect::job_of(&desk.pool, id).await.map_err(unexpected)? {
        Some(name) => match jobs.get(&name) {
            Some(job) => Ok(job.clone()),
            None => Err(format!("no job file is known for job {name}: start serve with --job FILE")),
        },
        None => Err("no such event".to_owned()),
    }
}

/// `resolve::resolve` as the analyst; a refusal or failure as the words the page shows.
pub(super) async fn resolved(
    desk: &Desk,
    analyst: &Analyst,
    job: &Job,
    requests: &[Request],
) -> Result<Vec<Resolved>, String> {
    resolve::resolve(&desk.pool, job, requests, &analyst.name, false).await.map_err(|e| {
        match e.downcast_ref::<Refused>() {
            Some(refused) => refused.problems.join("; "),
            // A run of the job holding its lock, the database: said on the page, and logged.
            None => {
                tracing::warn!(user = %analyst.name, error = crate::db::error_line(&e), "review desk: decision failed");
                format!("nothing was changed: {}", crate::db::error_line(&e))
            }
        }
    })
}
