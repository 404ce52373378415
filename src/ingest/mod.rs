//! Ingestion: sources -> events for the run to decide and store, inside its transaction.
//!
//! Architecture invariant: every record goes through [`crate::event::parse`]; a bad record is
//! rejected with its position and never stops the good ones beside it.

pub mod inbox;
pub mod queue;

use anyhow::{Context, Result};
use chrono::{DateTime, Utc};
use sqlx::PgConnection;

use crate::event::Event;

/// A valid event about to be stored.
#[derive(Debug, Clone)]
pub struct NewEvent {
    pub source: String,
    pub event: Event,
    pub received_at: DateTime<Utc>,
}

/// Stores events pending, undecided, in the given order (their ids follow it: arrival order
/// breaks merge ties). For a backlog: the run then decides them from the table in EventTime order.
pub async fn store_pending(conn: &mut PgConnection, job: &str, run_id: i64, events: &[NewEvent]) -> Result<()> {
    for chunk in events.chunks(10_000) {
        let mut source = Vec::with_capacity(chunk.len());
        let mut session = Vec::with_capacity(chunk.len());
        let mut time = Vec::with_capacity(chunk.len());
        let mut received = Vec::with_capacity(chunk.len());
        let mut metadata = Vec::with_capacity(chunk.len());
        for e in chunk {
            source.push(e.source.as_str());
            session.push(e.event.session_id.as_deref());
            time.push(e.event.event_time);
            received.push(e.received_at);
            metadata.push(serde_json::to_string(&e.event.metadata)?);
        }
        sqlx::query(
            "insert into events (job, source, session_id, event_time, received_at, metadata, ingested_run)
             select $1, s, sid, t, r, m::jsonb, $2
             from unnest($3::text[], $4::text[], $5::timestamptz[], $6::timestamptz[], $7::text[])
                  with ordinality as u(s, sid, t, r, m, ord)
             order by ord",
        )
        .bind(job)
        .bind(run_id)
        .bind(&source)
        .bind(&session)
        .bind(&time)
        .bind(&received)
        .bind(&metadata)
        .execute(&mut *conn)
        .await
        .context("storing events")?;
    }
    Ok(())
}
