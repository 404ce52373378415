//! `callrecon explain` and the review desk's event page: reads one event and the call data around
//! it (through `calldata`), explains the decision rule by rule, and finds the near misses.
//!
//! [`examine`] gathers it all as data; [`explain_event`] prints it for a terminal, the review desk
//! renders the same data as HTML. Writes nothing.

use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;

use anyhow::{Context, Result};
use chrono::{DateTime, Utc};
use serde_json::{Map, Value};
use sqlx::PgPool;

use crate::calldata::{self, CallInfo, Candidates};
use crate::decision::{Decision, TargetKind};
use crate::job::{Job, Rule, Target};
use crate::matching::engine::{event_key, micros};
use crate::matching::explain::{self, RuleStep};
use crate::matching::rules::normalize;

/// How far around the event `explain` looks for calls sharing its keys (beyond the windows).
pub const LOOK_AROUND: chrono::Duration = chrono::Duration::days(7);

/// Near misses listed per rule and kind, the nearest in time first.
pub const NEAR_MISSES: usize = 10;

/// One stored event as `events` holds it.
#[derive(Debug, Clone)]
pub struct StoredEvent {
    pub id: i64,
    pub job: String,
    pub source: String,
    pub session_id: Option<String>,
    pub master_id: Option<String>,
    pub event_time: DateTime<Utc>,
    pub received_at: DateTime<Utc>,
    pub metadata: Map<String, Value>,
    pub state: String,
    pub target_id: Option<String>,
    pub rule: Option<String>,
    pub reason: Option<String>,
    pub candidates: Vec<String>,
    pub decided_run: Option<i64>,
    pub decided_by: Option<String>,
    pub note: Option<String>,
}

/// How a sessionless event nearly matched a target of a rule.
#[derive(Debug, Clone, PartialEq)]
pub enum Near {
    /// Shares some of the rule's keys but not all: the key paths equal, and those that differ
    /// with the target's normalised value.
    SomeKeys { equal: Vec<String>, differing: Vec<(String, Option<String>)> },
    /// Shares every key but the event falls outside the call's window, by this many seconds
    /// (negative: before the window opens).
    OutsideWindow { by_secs: i64 },
    /// One of the candidates an ambiguous tie was between.
    Tie,
}

/// A target that nearly matched under `rule`.
#[derive(Debug, Clone, PartialEq)]
pub struct NearMiss {
    pub rule: String,
    pub kind: TargetKind,
    pub id: String,
    pub near: Near,
}

/// What [`examine`] found: the event, its explanation and near misses, and the calls named.
pub struct Examined {
    pub event: StoredEvent,
    /// The stored decision, one line.
    pub stored: String,
    /// For a SessionId or MasterId event, what its attach depends on (rules do not apply).
    pub attach: Option<String>,
    /// The rule cascade, step by step (sessionless events).
    pub steps: Vec<RuleStep>,
    pub near: Vec<NearMiss>,
    /// Every call named in `steps` and `near`, as a person reads it.
    pub calls: HashMap<String, CallInfo>,
    pub look_around: chrono::Duration,
}

/// Reads event `event_id` of any job and explains it with `job`'s rules, looking for calls
/// sharing its keys within `look_around` of it (beyond the windows).
pub async fn examine(pool: &PgPool, job: &Job, event_id: i64, look_around: chrono::Duration) -> Result<Examined> {
    let event = read_event(pool, event_id).await?.with_context(|| {
        format!("no event {event_id}; event ids are in the report's unmatched list and in `report show`")
    })?;
    let stored = stored_line(&event);
    let mut conn = pool.acquire().await?;
    let mut out = Examined {
        event: event.clone(),
        stored,
        attach: None,
        steps: Vec::new(),
        near: Vec::new(),
        calls: HashMap::new(),
        look_around,
    };
    if let Some(attach) = attach_by_id(&mut conn, &event).await? {
        out.attach = Some(attach);
        return Ok(out);
    }

    let (call_fields, group_fields) = calldata::fields(job);
    let (before, after) = job.max_window();
    let time = event.event_time;
    let (calls, _) = calldata::load_calls(
        &mut conn,
        None,
        &call_fields,
        (time, time),
        (before + look_around, after + look_around),
        false,
        0,
    )
    .await
    .context("reading calls around the event")?;
    let filters = crate::matching::decide::group_filters(job, &[&event.metadata]);
    let groups = calldata::load_groups(&mut conn, &group_fields, filters.as_deref()).await?;
    let micros_time = time.timestamp_micros();
    // polars blocks its thread: off the async threads (and off a current-thread runtime).
    let (rules, metadata) = (job.rules.clone(), event.metadata.clone());
    (out.steps, out.near) = tokio::task::spawn_blocking(move || {
        let steps = explain::explain(&rules, micros_time, &metadata, &calls, &groups);
        let near = near_misses(&rules, micros_time, &metadata, &calls, &groups, &steps);
        (steps, near)
    })
    .await
    .context("explaining the event")?;
    let named = named_calls(job, &event, &out.steps, &out.near);
    let calls = calldata::call_details(&mut conn, &named).await?;
    out.calls = calls;
    Ok(out)
}

/// What an event with a SessionId or MasterId is attached to, as a sentence (`None`: the event
/// has neither, and the rules decide it).
async fn attach_by_id(conn: &mut sqlx::PgConnection, event: &StoredEvent) -> Result<Option<String>> {
    if let Some(session) = &event.session_id {
        let sessions = HashSet::from([session.as_str()]);
        let call = calldata::calls_by_session(conn, &sessions).await?.remove(session).map(|c| c.id);
        return Ok(Some(match call {
            Some(c) => {
                format!("SessionId {session:?} belongs to call {c}: attached (rules apply to sessionless events only)")
            }
            None => format!(
                "SessionId {session:?}: no call has this session_id yet -> unknown_session; retried on later runs"
            ),
        }));
    }
    let Some(group) = &event.master_id else { return Ok(None) };
    let ids = HashSet::from([group.as_str()]);
    let exists = calldata::existing_groups(conn, &ids).await?.contains(group);
    Ok(Some(if exists {
        format!(
            "MasterId {group:?} is call group {group}: attached to the group and so to every call in it (rules \
             apply to sessionless events only)"
        )
    } else {
        format!("MasterId {group:?}: no call group has this id yet -> unknown_group; retried on later runs")
    }))
}

/// The calls an explanation names: near misses, those in a call rule's window, the event's
/// target and candidates; sorted, each once.
fn named_calls<'e>(job: &Job, event: &'e StoredEvent, steps: &'e [RuleStep], near: &'e [NearMiss]) -> Vec<&'e str> {
    let mut named: Vec<&str> = near.iter().filter(|n| n.kind == TargetKind::Call).map(|n| n.id.as_str()).collect();
    for (rule, step) in job.rules.iter().zip(steps) {
        if matches!(rule.target, Target::Call { .. }) {
            named.extend(step.in_window.iter().map(|(id, _)| id.as_str()));
        }
    }
    named.extend(event.target_id.as_deref());
    named.extend(event.candidates.iter().map(String::as_str));
    named.sort_unstable();
    named.dedup();
    named
}

/// `callrecon explain`: [`examine`] as text for support staff.
pub async fn explain_event(pool: &PgPool, job: &Job, event_id: i64) -> Result<String> {
    let x = examine(pool, job, event_id, LOOK_AROUND).await?;
    let e = &x.event;
    let mut out = String::new();
    let _ =
        writeln!(out, "event {event_id} from {} (job {}), EventTime {}", e.source, e.job, e.event_time.to_rfc3339());
    let _ = writeln!(out, "metadata: {}", Value::Object(e.metadata.clone()));
    let _ = writeln!(
        out,
        "stored decision: {}{}\n",
        x.stored,
        e.decided_run.map(|r| format!(" (run {r})")).unwrap_or_default()
    );
    if e.job != job.name {
        let _ =
            writeln!(out, "note: the event belongs to job {}; explained here with the rules of {}\n", e.job, job.name);
    }
    if let Some(attach) = &x.attach {
        let _ = writeln!(out, "{attach}");
        return Ok(out);
    }
    let _ = writeln!(out, "calls sharing keys are counted within {} days of the event\n", x.look_around.num_days());
    out.push_str(&explain::render(&x.steps));
    Ok(out)
}

/// The job of event `event_id`, if there is such an event.
pub async fn job_of(pool: &PgPool, event_id: i64) -> Result<Option<String>> {
    sqlx::query_scalar("select job from events where id = $1")
        .bind(event_id)
        .fetch_optional(pool)
        .await
        .context("reading the event")
}

async fn read_event(pool: &PgPool, event_id: i64) -> Result<Option<StoredEvent>> {
    type Row = (
        String,
        String,
        Option<String>,
        Option<String>,
        DateTime<Utc>,
        DateTime<Utc>,
        sqlx::types::Json<Map<String, Value>>,
        String,
        Option<String>,
        Option<String>,
        Option<String>,
        Option<Vec<String>>,
        Option<i64>,
        Option<String>,
        Option<String>,
    );
    let row: Option<Row> = sqlx::query_as(
        "select job, source, session_id, master_id, event_time, received_at, metadata, state, target_id, rule, reason,
                candidates, decided_run, decided_by, note
         from events where id = $1",
    )
    .bind(event_id)
    .fetch_optional(pool)
    .await
    .context("reading the event")?;
    Ok(row.map(
        |(
            job,
            source,
            session_id,
            master_id,
            event_time,
            received_at,
            metadata,
            state,
            target_id,
            rule,
            reason,
            c,
            r,
            by,
            note,
        )| {
            StoredEvent {
                id: event_id,
                job,
                source,
                session_id,
                master_id,
                event_time,
                received_at,
                metadata: metadata.0,
                state,
                target_id,
                rule,
                reason,
                candidates: c.unwrap_or_default(),
                decided_run: r,
                decided_by: by,
                note,
            }
        },
    ))
}

/// The stored decision as one line.
fn stored_line(e: &StoredEvent) -> String {
    let note = e.note.as_ref().map(|n| format!(": {n}")).unwrap_or_default();
    match (e.state.as_str(), &e.target_id, &e.rule, &e.decided_by) {
        ("matched", Some(t), _, Some(by)) => format!("matched {t} by hand, by {by}{note} (runs and rematches keep it)"),
        ("dismissed", _, _, Some(by)) => format!("dismissed by {by}{note} (runs and rematches keep it)"),
        ("matched", Some(t), Some(r), None) => format!("matched {t} by {r}"),
        (state, ..) => format!(
            "{state} ({}){}",
            e.reason.clone().unwrap_or_default(),
            if e.candidates.is_empty() { String::new() } else { format!(", candidates {}", e.candidates.join(", ")) }
        ),
    }
}

/// The targets none of the explanation's anchors shows, per rule: calls sharing every key outside
/// the window (by how much), those sharing some of its keys but not all, and the candidates of an
/// ambiguous tie. Ranked by how close they came: every key before some (so a target sharing the
/// rule's full key set is never outranked by one that does not), then fewer keys differing, then
/// the distance of the event from the target's window. At most [`NEAR_MISSES`] of each kind per
/// rule.
pub fn near_misses(
    rules: &[Rule],
    time: i64,
    metadata: &Map<String, Value>,
    calls: &Candidates,
    groups: &Candidates,
    steps: &[RuleStep],
) -> Vec<NearMiss> {
    let mut out = Vec::new();
    for (rule, step) in rules.iter().zip(steps) {
        let (targets, kind) = match rule.target {
            Target::Call { .. } => (calls, TargetKind::Call),
            Target::CallGroup => (groups, TargetKind::CallGroup),
        };
        let values: Vec<Option<String>> = rule.keys.iter().map(|k| event_key(metadata, k)).collect();
        // Distance in time of the event from a target's window (0 for groups, and inside it).
        let distance = |row: usize| match rule.target {
            Target::Call { before, after } => {
                let (opens, closes) = (targets.start[row] - micros(before), targets.end[row] + micros(after));
                (opens - time).max(time - closes).max(0)
            }
            Target::CallGroup => 0,
        };
        let mut some = Vec::new();
        let mut outside = Vec::new();
        for row in 0..targets.ids.len() {
            let (equal, differing) = compare_keys(rule, &values, targets, row);
            if equal.is_empty() {
                continue;
            }
            if !differing.is_empty() {
                some.push(((differing.len(), distance(row)), row, Near::SomeKeys { equal, differing }));
            } else if let Target::Call { before, after } = rule.target {
                let (s, e) = (targets.start[row], targets.end[row]);
                let opens = s - micros(before);
                let closes = e + micros(after);
                if time < opens {
                    outside.push((
                        (0, distance(row)),
                        row,
                        Near::OutsideWindow { by_secs: (time - opens) / 1_000_000 },
                    ));
                } else if time > closes {
                    outside.push((
                        (0, distance(row)),
                        row,
                        Near::OutsideWindow { by_secs: (time - closes) / 1_000_000 },
                    ));
                }
            }
        }
        for mut list in [outside, some] {
            list.sort_by(|a, b| (a.0, targets.ids.str(a.1)).cmp(&(b.0, targets.ids.str(b.1))));
            out.extend(list.into_iter().take(NEAR_MISSES).map(|(_, row, near)| NearMiss {
                rule: rule.name.clone(),
                kind,
                id: targets.ids.str(row).to_owned(),
                near,
            }));
        }
        if let Some(Decision::Unmatched { candidates, .. }) = &step.decision {
            out.extend(candidates.iter().map(|id| NearMiss {
                rule: rule.name.clone(),
                kind,
                id: id.clone(),
                near: Near::Tie,
            }));
        }
    }
    out
}

/// The key paths of `rule` on which target `row` has the event's value (`values`), and those on
/// which it does not, with its normalised value.
fn compare_keys(
    rule: &Rule,
    values: &[Option<String>],
    targets: &Candidates,
    row: usize,
) -> (Vec<String>, Vec<(String, Option<String>)>) {
    let mut equal = Vec::new();
    let mut differing = Vec::new();
    for (k, v) in rule.keys.iter().zip(values) {
        let raw = targets.fields.get(&k.field).and_then(|c| c.get(row));
        let theirs = raw.and_then(|r| normalize(k.normalize, r));
        if v.is_some() && theirs == *v {
            equal.push(k.event.join("."));
        } else {
            differing.push((k.event.join("."), theirs));
        }
    }
    (equal, differing)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::TargetField;

    /// A call rule on phone and agent, ±10 minutes; times in minutes.
    fn rules() -> Vec<Rule> {
        let text = r#"name = "t"
[sources]
queue = true
[[rules]]
name = "phone-and-agent"
target = "call"
keys = [ { event = "phone", call = "ani", normalize = "phone" }, { event = "agent", call = "agent_id" } ]
window = { before = "10m", after = "10m" }
[report]
dir = "r"
"#;
        crate::job::parse(std::path::Path::new("t.toml"), text).unwrap().rules
    }

    fn calls(rows: &[(&str, i64, i64, &str, &str)]) -> Candidates {
        let m = 60_000_000;
        Candidates {
            ids: rows.iter().map(|r| Some(r.0)).collect(),
            start: rows.iter().map(|r| r.1 * m).collect(),
            end: rows.iter().map(|r| r.2 * m).collect(),
            fields: [
                (TargetField::Column("ani"), rows.iter().map(|r| Some(r.3)).collect()),
                (TargetField::Column("agent_id"), rows.iter().map(|r| Some(r.4)).collect()),
            ]
            .into_iter()
            .collect(),
        }
    }

    #[test]
    fn near_misses_are_partial_keys_outside_windows_and_ties() {
        let rules = rules();
        let calls = calls(&[
            ("in", 0, 10, "5551230000", "a1"),
            ("in-too", 2, 8, "5551230000", "a1"),
            ("other-agent", 0, 10, "+1 555 123 0000", "a2"),
            ("late", -60, -40, "5551230000", "a1"),
            ("early", 45, 50, "5551230000", "a1"),
            ("stranger", 0, 10, "5559999999", "a9"),
            ("far-other-agent", 600, 610, "5551230000", "a3"),
            ("a-day-late", -1400, -1390, "5551230000", "a1"),
        ]);
        let metadata: Map<String, Value> = serde_json::from_str(r#"{"phone": "555-123-0000", "agent": "a1"}"#).unwrap();
        let time = 5 * 60_000_000;
        let groups = Candidates::default();
        let steps = explain::explain(&rules, time, &metadata, &calls, &groups);
        let near = near_misses(&rules, time, &metadata, &calls, &groups, &steps);
        let got: Vec<(&str, &Near)> = near.iter().map(|n| (n.id.as_str(), &n.near)).collect();
        let some = |agent: &str| Near::SomeKeys {
            equal: vec!["phone".to_owned()],
            differing: vec![("agent".to_owned(), Some(agent.to_owned()))],
        };
        assert_eq!(
            got,
            [
                // The nearest first: 30 min before `early`'s window opens (45 - 10), 35 min after
                // `late`'s closed (-40 + 10).
                ("early", &Near::OutsideWindow { by_secs: -30 * 60 }),
                ("late", &Near::OutsideWindow { by_secs: 35 * 60 }),
                // Issue 42: a day away but sharing every key, it still ranks above a call
                // sharing only some keys in the window.
                ("a-day-late", &Near::OutsideWindow { by_secs: 1385 * 60 }),
                ("other-agent", &some("a2")),
                ("far-other-agent", &some("a3")),
                // Both in the window, both 0 away: a tie.
                ("in", &Near::Tie),
                ("in-too", &Near::Tie),
            ]
        );
        assert_eq!(steps[0].in_window, [("in".to_owned(), 0.0), ("in-too".to_owned(), 0.0)]);
    }
}
