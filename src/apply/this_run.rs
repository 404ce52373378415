//! This run's own decisions, which apply's reader on another connection cannot see: the events
//! matched in this transaction, read back (`ThisRun::read`) or added from memory before they are
//! stored (`ThisRun::push_new`).

use foldhash::HashMap;

use anyhow::{Context, Result};
use chrono::{DateTime, Utc};
use futures_util::TryStreamExt as _;
use serde_json::{Map, Value};
use sqlx::PgConnection;

use super::types::Contribution;
use crate::decision::TargetKind;

/// This run's decisions that a reader on another connection cannot see: the events now matched
/// (stored in this transaction), by target.
#[derive(Default)]
pub struct ThisRun {
    /// Per call: the event's metadata, and its group part when it has one.
    pub(super) calls: HashMap<String, Vec<(Contribution, Option<Contribution>)>>,
    pub(super) groups: HashMap<String, Vec<Contribution>>,
}

impl ThisRun {
    /// Reads the matched ones among `ids`, stored events this run re-decided.
    pub async fn read(conn: &mut PgConnection, ids: &[i64]) -> Result<Self> {
        let mut this_run = ThisRun::default();
        if ids.is_empty() {
            return Ok(this_run);
        }
        let mut rows = sqlx::query_as::<_, (i64, DateTime<Utc>, String, String, String, String)>(
            "select e.id, e.event_time, e.metadata::text, e.group_part::text, e.target_kind, e.target_id
             from unnest($1::bigint[]) u(id)
             cross join lateral (select * from events e where e.id = u.id and e.state = 'matched' offset 0) e",
        )
        .bind(ids)
        .fetch(&mut *conn);
        while let Some((id, time, metadata, part, kind, target)) =
            rows.try_next().await.context("reading this run's matched events")?
        {
            this_run.push(id, time, &metadata, &part, &kind, target)?;
        }
        Ok(this_run)
    }

    /// Adds a new event matched to `target` from memory, before it is stored: its metadata, and
    /// the group part it is stored with (for an event matched to a call; empty for none).
    /// `position` is its place in this run's arrival order, which its id will follow.
    ///
    /// Merge ties go by id, and the event has none yet. It needs none: its id will be larger than
    /// that of every event the reader sees. Those were stored by transactions that committed
    /// before this run took the apply lock (every run holds it until it ends, and takes it before
    /// it commits events), so they drew their ids before this run's events draw theirs.
    pub fn push_new(
        &mut self,
        position: usize,
        time: DateTime<Utc>,
        metadata: &Map<String, Value>,
        part: &Map<String, Value>,
        kind: TargetKind,
        target: String,
    ) {
        let id = NEW_EVENTS_ORDER + position as i64;
        let part = (!part.is_empty()).then(|| Contribution::of(time, id, part));
        self.add(kind, target, Contribution::of(time, id, metadata), part);
    }

    /// Adds an event matched to `target` (`kind` as stored: `call` or `call_group`), with its metadata and
    /// group part as PostgreSQL prints jsonb.
    fn push(
        &mut self,
        id: i64,
        time: DateTime<Utc>,
        metadata: &str,
        part: &str,
        kind: &str,
        target: String,
    ) -> Result<()> {
        let part = if part == "{}" { None } else { Some(Contribution::parse(time, id, part, None)?) };
        let kind = TargetKind::parse(kind).with_context(|| format!("event {id} has target kind {kind:?}"))?;
        self.add(kind, target, Contribution::parse(time, id, metadata, None)?, part);
        Ok(())
    }

    /// Adds an event's contributions: an event matched to a call has a group part when the job's
    /// group fields are in it; one matched to a group has none.
    fn add(&mut self, kind: TargetKind, target: String, metadata: Contribution, part: Option<Contribution>) {
        if kind == TargetKind::Call {
            self.calls.entry(target).or_default().push((metadata, part));
        } else {
            self.groups.entry(target).or_default().push(metadata);
        }
    }
}

/// Where this run's new events come in the merge's tie order, above every stored event's id.
const NEW_EVENTS_ORDER: i64 = 1 << 62;
