//! The record of matches, `events`, and its history, `event_history`: below every stage.
//!
//! `scope.rs` reads the events a run decides; `store.rs` stores new events (pending, or with
//! their decision) and the decisions that changed; `history.rs` writes the decisions made by
//! hand or restored by an undo and reads the history back; `part.rs` is an event's group part.
//!
//! Architecture invariant: every statement that writes `events` or `event_history` is in this
//! folder, and `event_history` is only appended to. Other modules read `events` (apply, the
//! report, `explain`, `verify`), none writes it.

mod history;
mod part;
mod scope;
mod store;

use anyhow::{Context, Result};
use chrono::{DateTime, Utc};
use sqlx::PgConnection;

pub use history::{
    By, Decided, HistoryEntry, STORE_CHUNK, Stored, Undoable, changes_of_run, history, lock_events, read_events,
    write_decisions,
};
pub use part::group_part;
pub use scope::{InScope, Previous, Scope, ToDecide, Unchanged, pending_at_least};
pub use store::{Arrivals, DecisionRows, Fresh, Write};

/// How many of the job's events analysts dismissed.
pub async fn count_dismissed(conn: &mut PgConnection, job: &str) -> Result<u64> {
    let n: i64 = sqlx::query_scalar("select count(*) from events where job = $1 and state = 'dismissed'")
        .bind(job)
        .fetch_one(&mut *conn)
        .await
        .context("counting dismissed events")?;
    Ok(n as u64)
}

/// How many events of a rematch's scope hold a manual decision (kept as they are).
pub async fn count_manual_in(
    conn: &mut PgConnection,
    job: &str,
    since: Option<DateTime<Utc>>,
    until: Option<DateTime<Utc>>,
) -> Result<u64> {
    let n: i64 = sqlx::query_scalar(
        "select count(*) from events
         where job = $1 and session_id is null and decided_by is not null
           and ($2::timestamptz is null or event_time >= $2) and ($3::timestamptz is null or event_time < $3)",
    )
    .bind(job)
    .bind(since)
    .bind(until)
    .fetch_one(&mut *conn)
    .await
    .context("counting manual decisions")?;
    Ok(n as u64)
}
