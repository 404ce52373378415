//! What `suggest` reads: the analysts' attaches with their targets, and the job's events in
//! scope with their stored decisions, a page at a time. Read only.

use std::collections::HashMap;

use anyhow::{Context, Result};
use chrono::{DateTime, Utc};
use serde_json::{Map, Value};
use sqlx::PgConnection;

use super::candidates::{self, Evidence, Positive};
use crate::decision::TargetKind;
use crate::job::Job;
use crate::pgcopy::{self, Literal};

/// The events looked at: sessionless events of the job with EventTime in `[since, until)`.
#[derive(Debug, Clone, Copy, Default)]
pub struct Scope {
    pub since: Option<DateTime<Utc>>,
    pub until: Option<DateTime<Utc>>,
}

/// The sessionless events in scope an analyst attached to a call or group, with the rows of
/// those targets (an attach whose target no longer exists is left out).
pub async fn positives(conn: &mut PgConnection, job: &Job, scope: Scope) -> Result<Evidence> {
    type Row = (i64, DateTime<Utc>, String, String, String);
    let rows: Vec<Row> = sqlx::query_as(
        "select id, event_time, metadata::text, target_kind, target_id from events
         where job = $1 and session_id is null and master_id is null and decided_by is not null
           and state = 'matched' and ($2::timestamptz is null or event_time >= $2)
           and ($3::timestamptz is null or event_time < $3)
         order by event_time, id",
    )
    .bind(&job.name)
    .bind(scope.since)
    .bind(scope.until)
    .fetch_all(&mut *conn)
    .await
    .context("reading the analysts' attaches")?;
    let ids = |kind: &str| -> Vec<&str> { rows.iter().filter(|r| r.3 == kind).map(|r| r.4.as_str()).collect() };
    let (call_ids, group_ids) = (ids("call"), ids("call_group"));
    let calls = crate::calldata::targets_by_id(conn, true, &call_ids, &candidates::fields(job, true)).await?;
    let groups = crate::calldata::targets_by_id(conn, false, &group_ids, &candidates::fields(job, false)).await?;
    let index = |c: &crate::calldata::Candidates| -> HashMap<String, usize> {
        (0..c.ids.len()).map(|i| (c.ids.str(i).to_owned(), i)).collect()
    };
    let (call_at, group_at) = (index(&calls), index(&groups));
    let mut positives = Vec::new();
    for (id, time, metadata, kind, target) in &rows {
        let (kind, at) = match TargetKind::parse(kind) {
            Some(TargetKind::Call) => (TargetKind::Call, call_at.get(target)),
            Some(TargetKind::CallGroup) => (TargetKind::CallGroup, group_at.get(target)),
            None => continue,
        };
        let Some(&target) = at else { continue };
        let metadata: Map<String, Value> =
            serde_json::from_str(metadata).with_context(|| format!("metadata of event {id}"))?;
        positives.push(Positive { time: time.timestamp_micros(), metadata, kind, target });
    }
    tracing::info!(attaches = rows.len(), positives = positives.len(), "analysts' attaches read");
    Ok(Evidence { positives, calls, groups })
}

/// An event's decision as stored.
#[derive(Debug, Clone, PartialEq)]
pub enum Stored {
    /// Pending or expired (not matched today), ambiguous or not.
    Open { ambiguous: bool },
    /// Matched by a rule.
    Rule { kind: TargetKind, target: String },
    /// Attached by an analyst.
    Attached { kind: TargetKind, target: String },
    /// Dismissed by an analyst.
    Dismissed,
    /// Left pending by an analyst's decision (final for rematches too): counted nowhere.
    Kept,
}

/// An event in scope as the simulation takes it.
pub struct Scoped {
    pub id: i64,
    pub time: DateTime<Utc>,
    pub stored: Stored,
    /// Only the top-level keys some simulated rule reads.
    pub metadata: Map<String, Value>,
}

/// The events in scope, in (EventTime, id) order, a page per COPY after the last one read.
pub struct Pages {
    select: String,
    keys: Vec<String>,
    after: Option<(DateTime<Utc>, i64)>,
    done: bool,
}

const FIELDS: usize = 7;

impl Pages {
    /// The events of `job` in `scope`, with the metadata keys of `keys`.
    pub fn new(job: &Job, scope: Scope, keys: Vec<String>) -> Pages {
        let extract: String = keys.iter().map(|k| format!(", (metadata -> {})::text", Literal::new(k))).collect();
        let mut filter = format!("job = {} and session_id is null and master_id is null", Literal::new(&job.name));
        if let Some(since) = scope.since {
            filter.push_str(&format!(" and event_time >= {}::timestamptz", time_literal(since)));
        }
        if let Some(until) = scope.until {
            filter.push_str(&format!(" and event_time < {}::timestamptz", time_literal(until)));
        }
        let select = format!(
            "select id, event_time, state, target_kind, target_id, decided_by, reason{extract} from events where {filter}"
        );
        Pages { select, keys, after: None, done: false }
    }

    /// The next `limit` events (fewer at the end, none after it).
    pub async fn next(&mut self, conn: &mut PgConnection, limit: usize) -> Result<Vec<Scoped>> {
        if self.done {
            return Ok(Vec::new());
        }
        let after = match self.after {
            None => String::new(),
            Some((t, id)) => {
                let t = time_literal(t);
                format!(" and event_time >= {t}::timestamptz and (event_time, id) > ({t}::timestamptz, {id})")
            }
        };
        let sql =
            format!("copy ({}{after} order by event_time, id limit {limit}) to stdout (format binary)", self.select);
        let mut page = Vec::with_capacity(limit.min(1 << 16));
        let keys = &self.keys;
        pgcopy::for_each_row(conn, &sql, FIELDS + keys.len(), |f| {
            page.push(decode(f, keys)?);
            Ok(())
        })
        .await
        .context("reading the events in scope")?;
        self.done = page.len() < limit;
        self.after = page.last().map(|e: &Scoped| (e.time, e.id));
        Ok(page)
    }
}

fn decode(f: &[Option<&[u8]>], keys: &[String]) -> Result<Scoped> {
    let id = pgcopy::int8(f[0].context("an event without an id")?)?;
    let text = |i: usize| -> Result<Option<&str>> { f[i].map(pgcopy::text).transpose() };
    let time = pgcopy::datetime(f[1].with_context(|| format!("event {id}: a null time"))?)?;
    let target = || -> Option<(TargetKind, String)> {
        let kind = text(3).ok().flatten().and_then(TargetKind::parse)?;
        Some((kind, text(4).ok().flatten()?.to_owned()))
    };
    let by_hand = f[5].is_some();
    let stored = match (text(2)?.unwrap_or_default(), by_hand, target()) {
        ("matched", false, Some((kind, target))) => Stored::Rule { kind, target },
        ("matched", true, Some((kind, target))) => Stored::Attached { kind, target },
        ("dismissed", ..) => Stored::Dismissed,
        (_, true, _) => Stored::Kept,
        _ => Stored::Open { ambiguous: text(6)? == Some("ambiguous") },
    };
    let mut metadata = Map::with_capacity(keys.len());
    for (i, key) in keys.iter().enumerate() {
        if let Some(b) = f[FIELDS + i] {
            let value = serde_json::from_str(pgcopy::text(b)?).with_context(|| format!("metadata of event {id}"))?;
            metadata.insert(key.clone(), value);
        }
    }
    Ok(Scoped { id, time, stored, metadata })
}

fn time_literal(t: DateTime<Utc>) -> Literal {
    Literal::new(&t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true))
}
