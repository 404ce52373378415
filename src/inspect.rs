//! `callrecon explain`: reads one event and the call data around it (through `calldata`), and
//! explains the decision.

use std::fmt::Write as _;

use anyhow::{Context, Result, bail};
use chrono::{DateTime, Utc};
use serde_json::{Map, Value};
use sqlx::PgPool;

use crate::calldata;
use crate::job::Job;
use crate::matching::explain;

/// How far around the event calls sharing its keys are looked for (beyond the windows).
const LOOK_AROUND: chrono::Duration = chrono::Duration::days(7);

pub async fn explain_event(pool: &PgPool, job: &Job, event_id: i64) -> Result<String> {
    type Row = (
        String,
        String,
        Option<String>,
        Option<String>,
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
        "select job, source, session_id, master_id, event_time, metadata, state, target_id, rule, reason, candidates,
                decided_run, decided_by, note
         from events where id = $1",
    )
    .bind(event_id)
    .fetch_optional(pool)
    .await?;
    let Some((ev_job, source, session, master, time, metadata, state, target, rule, reason, candidates, run, by, note)) =
        row
    else {
        bail!("no event {event_id}; event ids are in the report's unmatched list and in `report show`")
    };
    let mut out = String::new();
    let _ = writeln!(out, "event {event_id} from {source} (job {ev_job}), EventTime {}", time.to_rfc3339());
    let _ = writeln!(out, "metadata: {}", Value::Object(metadata.0.clone()));
    let note = note.map(|n| format!(": {n}")).unwrap_or_default();
    let stored = match (state.as_str(), target, rule, by) {
        ("matched", Some(t), _, Some(by)) => format!("matched {t} by hand, by {by}{note} (runs and rematches keep it)"),
        ("dismissed", _, _, Some(by)) => format!("dismissed by {by}{note} (runs and rematches keep it)"),
        ("matched", Some(t), Some(r), None) => format!("matched {t} by {r}"),
        _ => format!(
            "{state} ({}){}",
            reason.unwrap_or_default(),
            candidates.filter(|c| !c.is_empty()).map(|c| format!(", candidates {}", c.join(", "))).unwrap_or_default()
        ),
    };
    let _ = writeln!(out, "stored decision: {stored}{}\n", run.map(|r| format!(" (run {r})")).unwrap_or_default());
    if ev_job != job.name {
        let _ =
            writeln!(out, "note: the event belongs to job {ev_job}; explained here with the rules of {}\n", job.name);
    }

    let mut conn = pool.acquire().await?;
    if let Some(session) = session {
        let sessions = std::collections::HashSet::from([session.as_str()]);
        let call = calldata::calls_by_session(&mut conn, &sessions).await?.remove(&session).map(|c| c.id);
        let _ = match call {
            Some(c) => writeln!(
                out,
                "SessionId {session:?} belongs to call {c}: attached (rules apply to sessionless events only)"
            ),
            None => writeln!(
                out,
                "SessionId {session:?}: no call has this session_id yet -> unknown_session; retried on later runs"
            ),
        };
        return Ok(out);
    }
    if let Some(group) = master {
        let ids = std::collections::HashSet::from([group.as_str()]);
        let exists = calldata::existing_groups(&mut conn, &ids).await?.contains(&group);
        let _ = if exists {
            writeln!(
                out,
                "MasterId {group:?} is call group {group}: attached to the group and so to every call in it (rules \
                 apply to sessionless events only)"
            )
        } else {
            writeln!(out, "MasterId {group:?}: no call group has this id yet -> unknown_group; retried on later runs")
        };
        return Ok(out);
    }

    let (call_fields, group_fields) = calldata::fields(job);
    let (before, after) = job.max_window();
    let (calls, _) =
        calldata::load_calls(&mut conn, &call_fields, time, time, (before + LOOK_AROUND, after + LOOK_AROUND))
            .await
            .context("reading calls around the event")?;
    let filters = crate::matching::decide::group_filters(job, &[&metadata.0]);
    let groups = calldata::load_groups(&mut conn, &group_fields, filters.as_deref()).await?;
    let steps = explain::explain(&job.rules, time.timestamp_micros(), &metadata.0, &calls, &groups);
    let _ = writeln!(out, "calls sharing keys are counted within 7 days of the event\n");
    out.push_str(&explain::render(&steps));
    Ok(out)
}
