//! The `event_queue` table: drained in the run's transaction, so an event leaves the queue only
//! when it is stored (a crash loses and duplicates nothing).

use anyhow::{Context, Result};
use chrono::{DateTime, Utc};
use chrono_tz::Tz;
use serde_json::Value;
use sqlx::PgConnection;

use super::{NewEvent, store_events};
use crate::event::{self, Rejected};

const BATCH: i64 = 5_000;

#[derive(Debug, Default)]
pub struct Drained {
    pub stored: usize,
    pub rejected: Vec<Rejected>,
}

/// Moves every queued row present when the drain starts into `events` (rejecting bad payloads).
///
/// Rows inserted by producers meanwhile are left for the next run; `SKIP LOCKED` keeps a second
/// drainer from blocking on or double-taking rows.
#[tracing::instrument(skip_all, fields(job))]
pub async fn drain(
    conn: &mut PgConnection,
    job: &str,
    run_id: i64,
    tz: Tz,
    progress: &indicatif::ProgressBar,
) -> Result<Drained> {
    let max_id: Option<i64> = sqlx::query_scalar("select max(id) from event_queue")
        .fetch_one(&mut *conn)
        .await
        .context("reading event_queue")?;
    let Some(max_id) = max_id else { return Ok(Drained::default()) };

    let mut out = Drained::default();
    loop {
        let mut rows: Vec<(i64, DateTime<Utc>, Value)> = sqlx::query_as(
            "delete from event_queue where id in (
                 select id from event_queue where id <= $1 order by id limit $2 for update skip locked)
             returning id, received_at, payload",
        )
        .bind(max_id)
        .bind(BATCH)
        .fetch_all(&mut *conn)
        .await
        .context("draining event_queue")?;
        if rows.is_empty() {
            break;
        }
        rows.sort_by_key(|r| r.0);
        let mut events = Vec::with_capacity(rows.len());
        for (id, received_at, payload) in rows {
            let source = format!("queue:{id}");
            match event::parse(&payload, tz) {
                Ok(event) => events.push(NewEvent { source, event, received_at }),
                Err(reason) => out.rejected.push(Rejected { source, reason, raw: payload.to_string() }),
            }
        }
        store_events(conn, job, run_id, &events).await?;
        out.stored += events.len();
        progress.inc(events.len() as u64);
        tracing::debug!(stored = out.stored, "queue batch stored");
    }
    Ok(out)
}

/// Puts events on the queue as producers do (`callrecon enqueue`): the payloads as given.
pub async fn enqueue(conn: &mut PgConnection, payloads: &[Value]) -> Result<u64> {
    let texts: Vec<String> = payloads.iter().map(Value::to_string).collect();
    let done = sqlx::query(
        "insert into event_queue (payload)
         select p::jsonb from unnest($1::text[]) with ordinality as u(p, ord) order by ord",
    )
    .bind(&texts)
    .execute(conn)
    .await
    .context("inserting into event_queue")?;
    Ok(done.rows_affected())
}
