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

/// Events stored per statement.
pub const STORE_CHUNK: usize = 10_000;

/// The columns of new events as `events` stores them, bound in this order by every statement
/// that inserts them: source, session id, EventTime, received at, metadata (JSON text).
pub struct EventColumns<'e> {
    source: Vec<&'e str>,
    session: Vec<Option<&'e str>>,
    time: Vec<DateTime<Utc>>,
    received: Vec<DateTime<Utc>>,
    metadata: Vec<String>,
}

impl<'e> EventColumns<'e> {
    pub fn of(events: &'e [NewEvent]) -> Result<Self> {
        Ok(EventColumns {
            source: events.iter().map(|e| e.source.as_str()).collect(),
            session: events.iter().map(|e| e.event.session_id.as_deref()).collect(),
            time: events.iter().map(|e| e.event.event_time).collect(),
            received: events.iter().map(|e| e.received_at).collect(),
            metadata: events.iter().map(|e| serde_json::to_string(&e.event.metadata)).collect::<Result<_, _>>()?,
        })
    }

    /// Binds the five columns, in the order above.
    pub fn bind<'q>(
        &'q self,
        statement: sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>,
    ) -> sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments> {
        statement.bind(&self.source).bind(&self.session).bind(&self.time).bind(&self.received).bind(&self.metadata)
    }
}

/// Stores events pending, undecided, in the given order (their ids follow it: arrival order
/// breaks merge ties). For a backlog: the run then decides them from the table in EventTime order.
pub async fn store_pending(conn: &mut PgConnection, job: &str, run_id: i64, events: &[NewEvent]) -> Result<()> {
    for chunk in events.chunks(STORE_CHUNK) {
        let columns = EventColumns::of(chunk)?;
        let statement = sqlx::query(
            "insert into events (job, source, session_id, event_time, received_at, metadata, ingested_run)
             select $1, s, sid, t, r, m::jsonb, $2
             from unnest($3::text[], $4::text[], $5::timestamptz[], $6::timestamptz[], $7::text[])
                  with ordinality as u(s, sid, t, r, m, ord)
             order by ord",
        )
        .bind(job)
        .bind(run_id);
        columns.bind(statement).execute(&mut *conn).await.context("storing events")?;
    }
    Ok(())
}
