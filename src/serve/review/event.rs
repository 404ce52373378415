//! The event page (`GET /review/events/{id}`) as a view model: what `inspect::examine` found, the
//! event's history, its neighbours in the filtered queue and who else has it open, turned into
//! what `event.html` shows. The handler only gates and calls [`view`].
//!
//! The calls an analyst can attach the event to are ranked by how close they came: the rules'
//! candidates (in the window, or the calls of a tie) first, then near misses as
//! `inspect::near_misses` ranks them (every key before some keys, then the distance from the
//! window). [`SHOWN`] of them are listed per rule, the rest behind "show more". None is chosen
//! for the analyst: a tie is settled by a person, deliberately.

use std::collections::HashSet;

use anyhow::Result;
use axum::response::Response;
use chrono::Utc;
use minijinja::value::Serde;
use serde::Serialize;
use serde_json::Value;

use super::queue::{self, Filters};
use super::session::{Analyst, Flash};
use super::{Desk, LOOK_AROUND, claims, span, when};
use crate::inspect::{self, Examined, Near};
use crate::job::{Job, Target};
use crate::ledger::{self, HistoryEntry};
use crate::matching::{Decision, TargetKind};

/// Options listed per rule before "show more".
pub const SHOWN: usize = 5;

/// A call or group an analyst can attach the event to, and why it is listed.
#[derive(Serialize)]
struct Choice {
    to: String,
    kind: &'static str,
    id: String,
    why: String,
    /// `candidate` (in the window), `outside`, `partial` or `tie`.
    class: &'static str,
    /// Its digit on the keyboard (the first nine listed on the page).
    key: Option<usize>,
    start: String,
    end: String,
    ani: String,
    agent: String,
    group: String,
}

#[derive(Serialize)]
struct StepView {
    n: usize,
    rule: String,
    target: &'static str,
    keys: Vec<(String, String, bool)>,
    applicable: bool,
    sharing: usize,
    windowed: bool,
    decision: String,
    /// The closest [`SHOWN`], then the rest ("show more").
    options: Vec<Choice>,
    more: Vec<Choice>,
}

/// A row of the event's history.
#[derive(Serialize)]
struct HistoryRow {
    at: String,
    who: String,
    what: String,
    note: Option<String>,
}

/// The page of event `id` for `analyst`, who now has it open (a claim the others see).
pub(super) async fn view(
    desk: &Desk,
    analyst: &Analyst,
    id: i64,
    filters: Filters,
    flash: Option<Flash>,
) -> Result<Response> {
    let jobs = desk.jobs().await?;
    let Some(job_name) = inspect::job_of(&desk.pool, id).await? else {
        return Ok(super::not_found(desk, analyst, &format!("event {id}"), flash));
    };
    let job = jobs.get(&job_name);
    let examined = match job {
        Some(job) => Some(inspect::examine(&desk.pool, job, id, LOOK_AROUND).await?),
        None => None,
    };
    let mut conn = desk.pool.acquire().await?;
    let history = ledger::history(&mut conn, id).await?;
    // What the analyst sees decided: a decision made on this page is refused if it changed since.
    let seen = ledger::read_events(&mut conn, &[id], false).await?.pop().map(|s| s.decided.describe());
    drop(conn);
    let other = claims::claim(&desk.pool, id, &analyst.name).await?;
    let pending_for: queue::PendingFor = jobs.iter().map(|(n, j)| (n.clone(), j.pending_for)).collect();
    let (next, prev) = queue::neighbours(&desk.pool, &filters, &pending_for, id).await?;
    let filter_query = filters.to_query();
    let link = |other: i64| event_link(other, &filter_query);
    let common = minijinja::context! {
        title => format!("Event {id}"), analyst => analyst.name.as_str(), csrf => analyst.csrf.as_str(), id,
        history => Serde(&history_rows(&history)), next => next.map(link), prev => prev.map(link),
        filter_query, seen, claimed_by => other, flash => flash.map(Serde),
    };
    let (Some(x), Some(job)) = (examined, job) else {
        return Ok(desk.render("event.html", minijinja::context! { no_job => job_name, ..common }));
    };
    let ctx = minijinja::context! { ..examined_context(job, &x, &history), ..common };
    Ok(desk.render("event.html", ctx))
}

/// `/review/events/{id}`, keeping the queue's filters.
pub(super) fn event_link(id: i64, filter_query: &str) -> String {
    if filter_query.is_empty() { format!("/review/events/{id}") } else { format!("/review/events/{id}?{filter_query}") }
}

/// What the page shows of an examined event.
fn examined_context(job: &Job, x: &Examined, history: &[HistoryEntry]) -> minijinja::Value {
    let e = &x.event;
    let now = Utc::now();
    // A decision made by hand: by whom and when (the latest change the person made).
    let decided_at = e.decided_by.as_ref().and_then(|by| {
        history.iter().rev().find(|h| h.run_id.is_none() && h.decided.person.as_ref() == Some(by)).map(|h| when(h.at))
    });
    minijinja::context! {
        ev => minijinja::context! {
            job => e.job.clone(), source => e.source.clone(), session_id => e.session_id.clone(),
            master_id => e.master_id.clone(), event_time => when(e.event_time),
            received_at => when(e.received_at), state => e.state.clone(),
            pending => span(now - e.received_at),
            expires_in => (e.state == "pending").then(|| span(e.received_at + job.pending_for - now)),
            decided_by => e.decided_by.clone(), decided_at, note => e.note.clone(),
            run => e.decided_run.filter(|_| e.decided_by.is_none()),
        },
        stored => x.stored.clone(),
        attach => x.attach.clone(),
        metadata => Serde(&metadata(job, x)),
        steps => Serde(&steps(job, x)),
        result => result_line(x),
        look_around_h => x.look_around.num_hours(),
        explain_text => crate::matching::explain::render(&x.steps),
        can_reopen => e.decided_by.is_some(),
    }
}

/// The event's metadata, the top-level keys the rules read marked.
fn metadata(job: &Job, x: &Examined) -> Vec<Value> {
    let key_fields: HashSet<&str> =
        job.rules.iter().flat_map(|r| r.keys.iter().filter_map(|k| k.event.first().map(String::as_str))).collect();
    x.event
        .metadata
        .iter()
        .map(|(k, v)| {
            let text = serde_json::to_string_pretty(v).unwrap_or_default();
            serde_json::json!({"key": serde_json::to_string(k).unwrap_or_default(), "value": text, "rule_key": key_fields.contains(k.as_str())})
        })
        .collect()
}

fn history_rows(history: &[HistoryEntry]) -> Vec<HistoryRow> {
    history
        .iter()
        .map(|h| HistoryRow {
            at: when(h.at),
            who: match (&h.run_id, &h.decided.person) {
                (Some(run), _) => format!("{} {run}", h.run_kind.as_deref().unwrap_or("run")),
                (None, Some(p)) => p.clone(),
                (None, None) => "?".to_owned(),
            },
            what: h.decided.describe(),
            note: h.decided.note.clone(),
        })
        .collect()
}

/// Each rule of the cascade as the page shows it, with the options ranked and numbered.
fn steps(job: &Job, x: &Examined) -> Vec<StepView> {
    let mut steps: Vec<StepView> = job
        .rules
        .iter()
        .zip(&x.steps)
        .enumerate()
        .map(|(i, (rule, s))| {
            let kind =
                if matches!(rule.target, Target::Call { .. }) { TargetKind::Call } else { TargetKind::CallGroup };
            let applicable = s.keys.iter().all(|k| k.1.is_some());
            let mut options = options(x, kind, &rule.name, s);
            let more = options.split_off(options.len().min(SHOWN));
            StepView {
                n: i + 1,
                rule: rule.name.clone(),
                target: if kind == TargetKind::Call { "call" } else { "call group" },
                keys: s
                    .keys
                    .iter()
                    .map(|(p, v)| {
                        (p.clone(), v.as_deref().map_or("(missing)".to_owned(), |v| format!("{v:?}")), v.is_some())
                    })
                    .collect(),
                applicable,
                sharing: s.sharing.len(),
                windowed: s.windowed,
                decision: decision_text(s.decision.as_ref(), applicable),
                options,
                more,
            }
        })
        .collect();
    let shown = steps.iter_mut().flat_map(|s| s.options.iter_mut());
    for (n, choice) in shown.take(9).enumerate() {
        choice.key = Some(n + 1);
    }
    steps
}

/// The targets of one rule an analyst may choose, closest first: the rule's candidates (a tie
/// marked), then its near misses in `inspect`'s order.
fn options(x: &Examined, kind: TargetKind, rule: &str, s: &crate::matching::explain::RuleStep) -> Vec<Choice> {
    let tied: HashSet<&str> =
        x.near.iter().filter(|n| n.rule == rule && matches!(n.near, Near::Tie)).map(|n| n.id.as_str()).collect();
    let mut options: Vec<Choice> = s
        .in_window
        .iter()
        .map(|(id, d)| {
            let mut why = if s.windowed {
                format!("in the window, {} away", span_secs(*d as i64))
            } else {
                "shares every key".to_owned()
            };
            let class = if tied.contains(id.as_str()) {
                why.push_str("; tied");
                "tie"
            } else {
                "candidate"
            };
            choice(x, kind, id, why, class)
        })
        .collect();
    for n in x.near.iter().filter(|n| n.rule == rule) {
        let listed = options.iter().any(|o| o.id == n.id && o.kind == kind_name(n.kind));
        if !listed {
            let (why, class) = why_near(&n.near);
            options.push(choice(x, n.kind, &n.id, why, class));
        }
    }
    options
}

fn why_near(near: &Near) -> (String, &'static str) {
    match near {
        Near::OutsideWindow { by_secs } if *by_secs < 0 => {
            (format!("every key; {} before the window opens", span_secs(-by_secs)), "outside")
        }
        Near::OutsideWindow { by_secs } => {
            (format!("every key; {} after the window closes", span_secs(*by_secs)), "outside")
        }
        Near::SomeKeys { equal, differing } => {
            let other: Vec<String> =
                differing.iter().map(|(k, v)| format!("{k} {}", v.as_deref().unwrap_or("(none)"))).collect();
            (format!("same {}; other {}", equal.join(", "), other.join(", ")), "partial")
        }
        Near::Tie => ("one of the tie".to_owned(), "tie"),
    }
}

fn choice(x: &Examined, kind: TargetKind, id: &str, why: String, class: &'static str) -> Choice {
    let call = x.calls.get(id).filter(|_| kind == TargetKind::Call);
    let text = |f: fn(&crate::calldata::CallInfo) -> Option<String>| call.and_then(f).unwrap_or_default();
    Choice {
        to: format!("{}:{id}", kind_name(kind)),
        kind: kind_name(kind),
        id: id.to_owned(),
        why,
        class,
        key: None,
        start: text(|c| Some(when(c.started_at))),
        end: text(|c| Some(c.ended_at.map(when).unwrap_or_else(|| "(running)".to_owned()))),
        ani: text(|c| c.ani.clone()),
        agent: text(|c| c.agent_id.clone()),
        group: text(|c| c.call_group_id.clone()),
    }
}

fn decision_text(decision: Option<&Decision>, applicable: bool) -> String {
    match decision {
        Some(Decision::Matched { target, .. }) => format!("matched {target}"),
        Some(Decision::Unmatched { candidates, .. }) => {
            format!("ambiguous between {}; the cascade stops here", candidates.join(", "))
        }
        None if !applicable => "not applicable: a key is missing from the event's Metadata; next rule".to_owned(),
        None => "no candidate; next rule".to_owned(),
    }
}

/// The cascade's outcome when no rule decided.
fn result_line(x: &Examined) -> Option<&'static str> {
    match x.steps.last().and_then(|s| s.decision.as_ref()) {
        Some(_) => None,
        None if x.attach.is_some() => None,
        None => {
            let any = x.steps.iter().any(|s| s.keys.iter().all(|k| k.1.is_some()));
            Some(if any { "unmatched (no_candidate)" } else { "unmatched (missing_key)" })
        }
    }
}

fn kind_name(kind: TargetKind) -> &'static str {
    if kind == TargetKind::Call { "call" } else { "group" }
}

fn span_secs(s: i64) -> String {
    if s < 120 { format!("{s} s") } else { span(chrono::Duration::seconds(s)) }
}

/// The one target sharing every key of a rule with the event, in the window or (within the
/// page's look-around) outside it, when there is exactly one: what a bulk attach takes. `None`
/// for a tie, for none, and for a SessionId or MasterId event.
pub(super) fn single_nearest(job: &Job, x: &Examined) -> Option<(TargetKind, String)> {
    if x.attach.is_some() {
        return None;
    }
    let mut all: Vec<(TargetKind, &str)> = Vec::new();
    for (rule, step) in job.rules.iter().zip(&x.steps) {
        let kind = if matches!(rule.target, Target::Call { .. }) { TargetKind::Call } else { TargetKind::CallGroup };
        all.extend(step.in_window.iter().map(|(id, _)| (kind, id.as_str())));
    }
    all.extend(x.near.iter().filter(|n| matches!(n.near, Near::OutsideWindow { .. })).map(|n| (n.kind, n.id.as_str())));
    all.sort_unstable_by_key(|(kind, id)| (kind_name(*kind), *id));
    all.dedup();
    match all[..] {
        [(kind, id)] => Some((kind, id.to_owned())),
        _ => None,
    }
}
