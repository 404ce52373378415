//! Bulk decisions on the queue (`POST /review/bulk`): the events ticked on the queue, or every
//! event matching its filters, dismissed with one note or each attached to its single nearest
//! candidate (`event::single_nearest`) where it has exactly one.
//!
//! Two steps: the first post answers with a confirmation naming the count (and the events left
//! out, and why); the second, carrying each event's decision as the first step saw it, applies
//! them all or nothing through `resolve::resolve`, as `callrecon resolve --file` does, with the
//! analyst's name on every event's history. An event decided by someone in between refuses the
//! whole set.

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use super::params::{BadParam, MOST_VALUES, Params};
use super::queue::{self, At, Filters};
use super::session::{self, Analyst, Flash};
use super::{Desk, LOOK_AROUND, claims, decide, event, failed, form_lists, gate_form, redirect};
use crate::http::{BodyError, Posted};
use crate::inspect;
use crate::job::Job;
use crate::ledger::{self, State as EventState};
use crate::matching::TargetKind;
use crate::resolve::{Request, To};

const FIELDS: [&str; 6] = ["csrf", "filters", "action", "note", "all", "confirm"];
/// Repeated: the events, and (in the confirmation's form) each one's decision as it was seen.
const LISTS: [&str; 2] = ["id", "seen"];

/// One event of a bulk decision, as the confirmation lists it.
#[derive(Serialize)]
struct Planned {
    id: i64,
    /// `dismiss`, or the `call:ID` / `group:ID` it is attached to.
    to: String,
    seen: String,
}

/// What a bulk form asks for, checked: the decisions, and the events left out with why.
struct Plan {
    job: Job,
    attach: bool,
    note: Option<String>,
    planned: Vec<Planned>,
    left_out: Vec<String>,
}

/// `POST /review/bulk`: a confirmation (first post) or the decisions made (`confirm=yes`).
pub(super) async fn bulk(
    State(desk): State<Desk>,
    headers: HeaderMap,
    uri: Uri,
    body: Result<Posted, BodyError>,
) -> Response {
    let f = match form_lists(body, &FIELDS, &LISTS) {
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
    let confirmed = f.get("confirm") == Some("yes");
    let outcome = match plan(&desk, &filters, &f, confirmed).await {
        Ok(plan) if !confirmed => return confirmation(&desk, &analyst, &filters, &plan),
        Ok(plan) => apply(&desk, &analyst, plan).await,
        Err(text) => Err(text),
    };
    let flash = match outcome {
        Ok(text) => Flash { event: 0, kind: "msg".to_owned(), text, undo: None },
        Err(text) => Flash { event: 0, kind: "error".to_owned(), text, undo: None },
    };
    if let Err(e) = session::set_flash(&desk.pool, &headers, &flash).await {
        return failed(&e);
    }
    let query = filters.to_query();
    redirect(&if query.is_empty() { "/review".to_owned() } else { format!("/review?{query}") })
}

/// The events of the form: those ticked, or (`all`) every one matching the filters.
async fn selected(desk: &Desk, filters: &Filters, f: &Params, confirmed: bool) -> Result<Vec<i64>, String> {
    if f.get("all").is_some() && !confirmed {
        let jobs = desk.jobs().await.map_err(|e| crate::db::error_line(&e))?;
        let pending_for: queue::PendingFor = jobs.iter().map(|(n, j)| (n.clone(), j.pending_for)).collect();
        let page = queue::page(&desk.pool, filters, &pending_for, At::First, MOST_VALUES)
            .await
            .map_err(|e| crate::db::error_line(&e))?;
        if page.next.is_some() {
            return Err(format!(
                "more than {MOST_VALUES} events match these filters: narrow them (a bulk decision takes at most {MOST_VALUES})"
            ));
        }
        return Ok(page.rows.iter().map(|r| r.id).collect());
    }
    let ids: Result<Vec<i64>, String> =
        f.list("id").iter().map(|id| id.trim().parse().map_err(|_| format!("{id:?} is not an event id"))).collect();
    let ids = ids?;
    if ids.is_empty() {
        return Err("select the events first: tick them on the queue, or select all matching the filters".to_owned());
    }
    Ok(ids)
}

async fn plan(desk: &Desk, filters: &Filters, f: &Params, confirmed: bool) -> Result<Plan, String> {
    let attach = match f.get("action") {
        Some("dismiss") => false,
        Some("attach") => true,
        _ => return Err("choose what to do with the selected events: dismiss, or attach to the nearest".to_owned()),
    };
    let note = f.get("note").map(str::to_owned);
    if !attach && note.is_none() {
        return Err("dismissing needs a note saying why: nothing was changed".to_owned());
    }
    let ids = selected(desk, filters, f, confirmed).await?;
    let seen = f.list("seen");
    if confirmed && seen.len() != ids.len() {
        return Err("the confirmation's form is incomplete: select the events again".to_owned());
    }
    let stored = {
        let mut conn = desk.pool.acquire().await.map_err(|e| e.to_string())?;
        ledger::read_events(&mut conn, &ids, false).await.map_err(|e| crate::db::error_line(&e))?
    };
    if stored.is_empty() {
        return Err("none of the selected events exists".to_owned());
    }
    let mut jobs: Vec<&str> = stored.iter().map(|s| s.job.as_str()).collect();
    jobs.sort_unstable();
    jobs.dedup();
    let [name] = jobs[..] else {
        return Err(format!("the selected events belong to jobs {}: filter by one job first", jobs.join(", ")));
    };
    let job = decide::job_of(desk, stored[0].id).await?;
    debug_assert_eq!(job.name, name);
    let mut plan = Plan { job, attach, note, planned: Vec::new(), left_out: Vec::new() };
    let was: std::collections::HashMap<i64, &String> = ids.iter().copied().zip(seen).collect();
    for s in &stored {
        let now = s.decided.describe();
        if !confirmed && s.decided.state != EventState::Pending {
            plan.left_out.push(format!("event {}: no longer pending (now {now})", s.id));
            continue;
        }
        let seen = if confirmed { was.get(&s.id).map_or(now.clone(), |s| (*s).clone()) } else { now };
        let to = if attach { nearest(desk, &plan.job, s.id).await? } else { Some("dismiss".to_owned()) };
        match to {
            Some(to) => plan.planned.push(Planned { id: s.id, to, seen }),
            None => plan.left_out.push(format!("event {}: no single nearest candidate (none, or a tie)", s.id)),
        }
    }
    for id in ids.iter().filter(|id| !stored.iter().any(|s| s.id == **id)) {
        plan.left_out.push(format!("event {id}: no such event"));
    }
    if plan.planned.is_empty() {
        return Err(format!("nothing to do: {}", plan.left_out.join("; ")));
    }
    Ok(plan)
}

/// `call:ID` / `group:ID` of event `id`'s single nearest candidate, if it has one.
async fn nearest(desk: &Desk, job: &Job, id: i64) -> Result<Option<String>, String> {
    let x = inspect::examine(&desk.pool, job, id, LOOK_AROUND).await.map_err(|e| crate::db::error_line(&e))?;
    Ok(event::single_nearest(job, &x).map(|(kind, id)| match kind {
        TargetKind::Call => format!("call:{id}"),
        TargetKind::CallGroup => format!("group:{id}"),
    }))
}

/// The confirmation page: what would be done to how many events, and which are left out.
fn confirmation(desk: &Desk, analyst: &Analyst, filters: &Filters, plan: &Plan) -> Response {
    let ctx = minijinja::context! {
        title => "Confirm", analyst => analyst.name.as_str(), csrf => analyst.csrf.as_str(),
        job => plan.job.name.as_str(), attach => plan.attach, note => plan.note.as_deref(),
        planned => minijinja::value::Serde(&plan.planned), n => plan.planned.len(), left_out => plan.left_out.clone(),
        filter_query => filters.to_query(),
    };
    let mut resp = desk.render("bulk.html", ctx);
    *resp.status_mut() = StatusCode::OK;
    resp
}

/// Makes the plan's decisions, all or nothing; what the queue then says.
async fn apply(desk: &Desk, analyst: &Analyst, plan: Plan) -> Result<String, String> {
    let requests: Vec<Request> = plan
        .planned
        .iter()
        .map(|p| {
            let to = if plan.attach {
                p.to.parse::<To>().map_err(|e| format!("event {}: {e}", p.id))
            } else {
                Ok(To::Dismiss)
            };
            to.map(|to| Request {
                line: None,
                event_id: p.id,
                to,
                note: plan.note.clone(),
                reported_reason: None,
                seen: Some(p.seen.clone()),
            })
        })
        .collect::<Result<_, _>>()?;
    let done = decide::resolved(desk, analyst, &plan.job, &requests).await?;
    let ids: Vec<i64> = done.iter().map(|r| r.event_id).collect();
    if let Err(e) = claims::release(&desk.pool, &ids, &analyst.name).await {
        tracing::warn!(error = crate::db::error_line(&e), "review desk: claims not released");
    }
    tracing::info!(user = %analyst.name, events = done.len(), attach = plan.attach, "review desk: bulk decision");
    let what = if plan.attach { "attached each to its nearest candidate" } else { "dismissed" };
    Ok(format!("{} event{} {what}, by {}", done.len(), if done.len() == 1 { "" } else { "s" }, analyst.name))
}
