//! Each event once: an event identical to one the job already holds is a duplicate, whatever
//! its source (the queue, so the intake API too, or any inbox file), and is not stored again.
//!
//! Identical means the same address (SessionId, MasterId or none), the same EventTime instant and
//! the same Metadata as the job holds it: jsonb, so key order aside, strings as the characters
//! they escape, numbers as `numeric` keeps them (`1.50` is not `1.5`). [`digest`] hashes the
//! event's canonical text, which is exactly what migration 0019's `callrecon_event_digest`
//! computes from a stored row; `events_digest_idx` (unique: the job is part of the digest) finds
//! the events held.

use std::collections::{BTreeMap, HashSet};

use anyhow::{Context, Result};
use chrono::{DateTime, TimeZone as _, Utc};
use sha2::Digest as _;
use sqlx::PgConnection;

use crate::decision::Address;
use crate::event::{Event, NewEvent};

/// The first 16 bytes of the SHA-256 of an event's canonical text.
pub type Digest = [u8; 16];

/// The digest of `job`'s event: the SHA-256 of the jsonb text of `[job, kind, id, EventTime,
/// Metadata]` (kind `"s"`, `"m"` or `""`; the instant in UTC to the microsecond, as stored), cut
/// to 16 bytes.
pub fn digest(job: &str, event: &Event) -> Digest {
    let (kind, id) = match &event.address {
        Address::Session(s) => ("s", Some(s)),
        Address::Master(m) => ("m", Some(m)),
        Address::Sessionless => ("", None),
    };
    let mut text = String::with_capacity(96);
    text.push('[');
    push_string(&mut text, job);
    text.push_str(", ");
    push_string(&mut text, kind);
    text.push_str(", ");
    match id {
        Some(id) => push_string(&mut text, id),
        None => text.push_str("null"),
    }
    text.push_str(", ");
    push_string(&mut text, &stored_instant(event.event_time).format("%Y-%m-%dT%H:%M:%S%.6f").to_string());
    text.push_str(", ");
    crate::jsonb::object_text(&event.metadata, &mut text);
    text.push(']');
    let hash = sha2::Sha256::digest(text.as_bytes());
    hash[..16].try_into().expect("a SHA-256 has 32 bytes")
}

fn push_string(out: &mut String, s: &str) {
    out.push_str(&serde_json::to_string(s).expect("a string serialises"));
}

/// The instant as `timestamptz` stores it once bound: whole microseconds since 2000-01-01,
/// the rest cut toward that epoch (as the driver encodes it).
fn stored_instant(t: DateTime<Utc>) -> DateTime<Utc> {
    let epoch = Utc.with_ymd_and_hms(2000, 1, 1, 0, 0, 0).unwrap();
    let micros = (t - epoch).num_microseconds().expect("EventTimes lie within 1900-2200");
    epoch + chrono::Duration::microseconds(micros)
}

/// Events recognised as duplicates during a run, and the digests it has seen.
#[derive(Default)]
pub struct Dedupe {
    seen: HashSet<Digest>,
    /// Duplicates per source: `queue`, or the file (`inbox/crm.ndjson`).
    pub by_source: BTreeMap<String, u64>,
}

impl Dedupe {
    /// The events of `events` that are new to the job, in their order: not seen earlier in this
    /// run, and not among the job's stored events (by `events_digest_idx`). The others are
    /// counted by source and dropped.
    pub async fn keep_new(&mut self, conn: &mut PgConnection, events: Vec<NewEvent>) -> Result<Vec<NewEvent>> {
        let mut fresh = Vec::with_capacity(events.len());
        for e in events {
            if self.seen.insert(e.digest) {
                fresh.push(e);
            } else {
                self.count(&e.source);
            }
        }
        if fresh.is_empty() {
            return Ok(fresh);
        }
        let held = held(conn, &fresh).await.context("looking up the events the job already holds")?;
        if held.is_empty() {
            return Ok(fresh);
        }
        let held: HashSet<&[u8]> = held.iter().map(Vec::as_slice).collect();
        let (kept, duplicates): (Vec<_>, Vec<_>) = fresh.into_iter().partition(|e| !held.contains(&e.digest[..]));
        for e in &duplicates {
            self.count(&e.source);
        }
        Ok(kept)
    }

    /// Duplicates counted so far.
    pub fn total(&self) -> u64 {
        self.by_source.values().sum()
    }

    fn count(&mut self, source: &str) {
        *self.by_source.entry(source_of(source).to_owned()).or_default() += 1;
    }
}

/// The digests of `events` the job holds (the job is part of each), searched in
/// `events_digest_idx`.
///
/// The planner is told not to scan the table: without statistics on `digest` (a new table, or
/// the events this run stored) it takes a batch's thousands of values to match most rows and
/// would read the whole table for every batch, which grows with the table. Scoped to the
/// transaction and reset afterwards (`db::planner_off`), as `db::with_index_probes` does.
async fn held(conn: &mut PgConnection, events: &[NewEvent]) -> sqlx::Result<Vec<Vec<u8>>> {
    let digests: Vec<&[u8]> = events.iter().map(|e| &e.digest[..]).collect();
    crate::db::planner_off(conn, &["enable_seqscan"]).await?;
    let held = sqlx::query_scalar("select digest from events where digest = any($1)")
        .bind(&digests)
        .fetch_all(&mut *conn)
        .await?;
    crate::db::planner_reset(conn, &["enable_seqscan"]).await?;
    Ok(held)
}

/// A record's source without its position: `queue:42` → `queue`, `inbox/a.ndjson:17` →
/// `inbox/a.ndjson`.
pub fn source_of(record: &str) -> &str {
    match record.rsplit_once(':') {
        Some((source, position)) if !position.is_empty() && position.bytes().all(|b| b.is_ascii_digit()) => source,
        _ => record,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn event(session: Option<&str>, master: Option<&str>, time: &str, metadata: serde_json::Value) -> Event {
        let serde_json::Value::Object(metadata) = metadata else { panic!("an object") };
        Event {
            address: Address::from_parts(session.map(str::to_owned), master.map(str::to_owned)),
            event_time: DateTime::parse_from_rfc3339(time).unwrap().with_timezone(&Utc),
            metadata,
        }
    }

    #[test]
    fn the_address_kind_time_instant_and_metadata_make_the_digest() {
        let t = "2018-10-15T09:00:00Z";
        let a = digest("nightly", &event(Some("x"), None, t, json!({"a": 1, "b": "2"})));
        assert_eq!(
            a,
            digest("nightly", &event(Some("x"), None, "2018-10-15T05:00:00-04:00", json!({"b": "2", "a": 1})))
        );
        assert_ne!(a, digest("nightly", &event(None, Some("x"), t, json!({"a": 1, "b": "2"}))));
        assert_ne!(a, digest("nightly", &event(None, None, t, json!({"a": 1, "b": "2"}))));
        assert_ne!(a, digest("weekly", &event(Some("x"), None, t, json!({"a": 1, "b": "2"}))));
        assert_ne!(
            a,
            digest("nightly", &event(Some("x"), None, "2018-10-15T09:00:00.001Z", json!({"a": 1, "b": "2"})))
        );
        assert_ne!(a, digest("nightly", &event(Some("x"), None, t, json!({"a": "1", "b": "2"}))));
    }

    #[test]
    fn sources_lose_their_positions() {
        assert_eq!(source_of("queue:42"), "queue");
        assert_eq!(source_of("inbox/a:b.ndjson:17"), "inbox/a:b.ndjson");
        assert_eq!(source_of("inbox/a.ndjson"), "inbox/a.ndjson");
    }
}
