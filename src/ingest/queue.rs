//! The `event_queue` table: drained in the run's transaction, so an event leaves the queue only
//! when it is stored (a crash loses and duplicates nothing).

use anyhow::{Context, Result};
use chrono::{DateTime, Utc};
use chrono_tz::Tz;
use serde_json::Value;
use sqlx::PgConnection;

use crate::event::NewEvent;
use crate::event::{self, Rejected};

/// Queued rows taken off the queue per statement.
const BATCH: i64 = 5_000;

/// One batch taken off the queue: its valid events in queue order, and the rows refused.
#[derive(Debug, Default)]
pub struct Drained {
    pub events: Vec<NewEvent>,
    pub rejected: Vec<Rejected>,
}

impl Drained {
    /// Rows taken off the queue; zero once it is drained.
    pub fn taken(&self) -> usize {
        self.events.len() + self.rejected.len()
    }
}

/// The last row on the queue when a drain starts: rows producers insert after it are left for
/// the next run.
pub async fn last_id(conn: &mut PgConnection) -> Result<Option<i64>> {
    sqlx::query_scalar("select max(id) from event_queue").fetch_one(&mut *conn).await.context("reading event_queue")
}

/// Queued rows taken off the queue and not parsed yet: id, received_at, payload (JSON text,
/// parsed with the rest on the parsing thread).
pub type Rows = Vec<(i64, DateTime<Utc>, String)>;

/// Takes the next batch of queued rows with ids in `(after, max_id]` off the queue, in queue
/// order; empty once the queue is drained. A drain passes the last id of its previous batch as
/// `after`: the rows it deleted stay in the queue's index until its transaction ends, and a scan
/// from the start of the queue would step over all of them again for every batch, and a drain
/// would grow with the square of the queue's length.
///
/// The rows are deleted in the run's transaction, which stores their events: a crash loses and
/// duplicates nothing. `SKIP LOCKED` keeps a second drainer from blocking on or double-taking
/// rows; a row it skips is that drainer's, or left for the next run.
pub async fn take(conn: &mut PgConnection, after: i64, max_id: i64) -> Result<Rows> {
    // The batch picked in id order from the index, and each row deleted by its id: without
    // statistics on the queue (a queue that grew since it was last analyzed) the planner would
    // read every row left for every batch, sort them, and scan the table for the delete.
    const BY_INDEX: &[&str] = &["enable_seqscan", "enable_bitmapscan", "enable_hashjoin", "enable_mergejoin"];
    crate::db::planner_off(conn, BY_INDEX).await.context("draining event_queue")?;
    let mut rows: Rows = sqlx::query_as(
        "delete from event_queue where id in (
             select id from event_queue where id > $1 and id <= $2 order by id limit $3 for update skip locked)
         returning id, received_at, payload::text",
    )
    .bind(after)
    .bind(max_id)
    .bind(BATCH)
    .fetch_all(&mut *conn)
    .await
    .context("draining event_queue")?;
    crate::db::planner_reset(conn, BY_INDEX).await.context("draining event_queue")?;
    rows.sort_by_key(|r| r.0);
    Ok(rows)
}

/// Parses taken rows' payloads: a bad one is rejected, the good ones beside it kept.
pub fn parse(rows: Rows, job: &str, tz: Tz) -> Drained {
    let mut out = Drained { events: Vec::with_capacity(rows.len()), rejected: Vec::new() };
    for (id, received_at, text) in rows {
        let source = format!("queue:{id}");
        // The column is jsonb: its text always parses.
        let parsed = serde_json::from_str::<Value>(&text).map_err(|e| format!("payload is not JSON: {e}"));
        match parsed.and_then(|payload| event::parse(&payload, tz)) {
            Ok(event) => {
                out.events.push(NewEvent { source, digest: super::dedupe::digest(job, &event), event, received_at })
            }
            Err(reason) => out.rejected.push(Rejected::new(source, reason, text)),
        }
    }
    out
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
