//! The decisions analysts made by hand since a job's previous run, for its report.

use anyhow::{Context, Result};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sqlx::PgConnection;

use crate::decision::TargetKind;

/// Manual decisions a report lists (it counts them all): the newest.
pub const LISTED: usize = 1_000;

/// One decision made by hand (a resolve, a dismissal, a reopen).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ManualDecision {
    pub event_id: i64,
    pub at: DateTime<Utc>,
    pub by: String,
    /// `matched`, `dismissed`, or `pending` (reopened).
    pub state: String,
    /// `call:ID` or `group:ID` for an attach.
    pub to: Option<String>,
    pub note: Option<String>,
}

/// How many decisions were made by hand on the job's events after `since` (all of them without
/// it), and the newest [`LISTED`] of them, oldest first.
pub async fn since(
    conn: &mut PgConnection,
    job: &str,
    since: Option<DateTime<Utc>>,
) -> Result<(u64, Vec<ManualDecision>)> {
    type Row = (i64, DateTime<Utc>, String, String, Option<String>, Option<String>, Option<String>, i64);
    let rows: Vec<Row> = sqlx::query_as(
        "select h.event_id, h.at, h.person, h.state, h.target_kind, h.target_id, h.note, count(*) over ()
         from event_history h join events e on e.id = h.event_id
         where h.person is not null and e.job = $1 and ($2::timestamptz is null or h.at > $2)
         order by h.id desc limit $3",
    )
    .bind(job)
    .bind(since)
    .bind(LISTED as i64)
    .fetch_all(&mut *conn)
    .await
    .context("reading manual decisions")?;
    let total = rows.first().map_or(0, |r| r.7 as u64);
    let mut list: Vec<ManualDecision> = rows
        .into_iter()
        .map(|(event_id, at, by, state, kind, target, note, _)| ManualDecision {
            event_id,
            at,
            by,
            state,
            to: kind.zip(target).map(|(k, t)| {
                format!("{}:{t}", if TargetKind::parse(&k) == Some(TargetKind::Call) { "call" } else { "group" })
            }),
            note,
        })
        .collect();
    list.reverse();
    Ok((total, list))
}
