//! Applying: `async_metadata` of calls and call groups recomputed from the record of matches.
//!
//! Architecture invariant: call data is written only here, inside the run's transaction, and
//! the written value is a function of the matched events alone: for every touched target it is
//! recomputed from scratch, so running twice writes nothing the second time and a call that lost
//! an event loses its fields.
//!
//! The merge is shallow (top-level keys), ordered by EventTime then arrival (`events.id`):
//! - a call: its own events, events matched to its group, and the `group_part` (the job's
//!   `group_fields`) of events matched to any call of its group;
//! - a call group: events matched to it, and the `group_part` of events matched to its calls.

use std::collections::{BTreeMap, HashMap, HashSet};

use anyhow::{Context, Result};
use chrono::{DateTime, Utc};
use futures_util::TryStreamExt as _;
use serde_json::value::RawValue;
use sqlx::PgConnection;

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Applied {
    pub calls_updated: u64,
    pub groups_updated: u64,
}

/// Recomputes the targets whose set of matched events may have changed.
///
/// `calls` and `groups` are the targets of events whose decision changed (old and new targets).
/// The groups of those calls, every call of a touched group, and calls that joined or left a
/// group carrying contributions since the last run (`call_group_changes`, filled by a trigger)
/// are recomputed too.
///
/// Calls and events are read by index for the touched targets only. The merged values are
/// computed here, and only those that differ from the stored ones are written back, per batch
/// of groups.
#[tracing::instrument(skip_all, fields(calls = calls.len(), groups = groups.len()))]
pub async fn apply(conn: &mut PgConnection, calls: &[String], groups: &[String]) -> Result<Applied> {
    let started = std::time::Instant::now();
    // One apply at a time across jobs (see `db::APPLY_LOCK_KEY`); released when the run's
    // transaction ends.
    sqlx::query("select pg_advisory_xact_lock(hashtextextended($1, 0))")
        .bind(crate::db::APPLY_LOCK_KEY)
        .execute(&mut *conn)
        .await
        .context("waiting for another run's apply to finish")?;
    let mut direct: HashSet<String> = calls.iter().cloned().collect();
    let mut touched_groups: HashSet<String> = groups.iter().cloned().collect();
    // Calls that joined or left a contributing group since the last run (logged by the
    // callrecon_group_change trigger, sql/0007); the group a call left loses its group fields.
    let changed: Vec<(String, Option<String>)> =
        sqlx::query_as("delete from call_group_changes returning call_id, old_group_id")
            .fetch_all(&mut *conn)
            .await
            .context("reading calls whose group changed")?;
    for (call, old_group) in changed {
        direct.insert(call);
        touched_groups.extend(old_group);
    }
    let direct: Vec<String> = direct.into_iter().collect();
    // Each call's heap block (from its ctid): calls without a group are read in that order.
    // One primary-key probe per call (`lateral … offset 0`): for tens of thousands of ids the
    // planner otherwise scans the whole table (0.36 s instead of 0.09 s for 41k of 5M calls).
    let groups_of_direct: Vec<(String, Option<String>, i64)> = sqlx::query_as(
        "select u.id, c.call_group_id, c.block from unnest($1::text[]) u(id)
         cross join lateral (select call_group_id, (ctid::text::point)[0]::bigint as block
                             from calls c where c.id = u.id offset 0) c",
    )
    .bind(&direct)
    .fetch_all(&mut *conn)
    .await
    .context("reading the groups of touched calls")?;
    let mut groupless: Vec<(i64, String)> = Vec::new();
    for (call, group, block) in groups_of_direct {
        match group {
            Some(g) => {
                touched_groups.insert(g);
            }
            None => groupless.push((block, call)),
        }
    }
    groupless.sort_unstable();
    let groupless: Vec<String> = groupless.into_iter().map(|(_, call)| call).collect();
    let touched_groups: Vec<String> = touched_groups.into_iter().collect();
    tracing::debug!(
        elapsed_ms = started.elapsed().as_millis() as u64,
        groups = touched_groups.len(),
        "touched targets found"
    );

    // Groups (with all their calls) and groupless calls are independent: recomputed in
    // batches, memory stays bounded however many targets a run touches (a first run touches
    // every matched call).
    let mut applied = Applied::default();
    let (mut contributing, mut not_contributing) = (Vec::new(), Vec::new());
    let batch_groups = crate::run::size_from_env("CALLRECON_APPLY_BATCH_GROUPS", APPLY_BATCH_GROUPS);
    for batch in touched_groups.chunks(batch_groups) {
        recompute(conn, batch, &[], &mut applied, &mut contributing, &mut not_contributing).await?;
    }
    for batch in groupless.chunks(batch_groups * 5) {
        recompute(conn, &[], batch, &mut applied, &mut contributing, &mut not_contributing).await?;
    }

    // Keep the set of contributing groups current for the trigger: a group whose merged value
    // is empty gives its calls nothing, so calls joining or leaving it change nothing.
    sqlx::query("delete from contributing_groups where id = any($1)")
        .bind(not_contributing)
        .execute(&mut *conn)
        .await
        .context("recording contributing groups")?;
    sqlx::query("insert into contributing_groups select unnest($1::text[]) on conflict do nothing")
        .bind(contributing)
        .execute(&mut *conn)
        .await
        .context("recording contributing groups")?;

    let Applied { calls_updated, groups_updated } = applied;
    tracing::info!(calls_updated, groups_updated, elapsed_ms = started.elapsed().as_millis() as u64, "applied");
    Ok(applied)
}

/// Touched groups recomputed per batch, each with all its calls (~7 on average in the
/// benchmark); five times as many calls without a group. `CALLRECON_APPLY_BATCH_GROUPS`
/// overrides it (tests use tiny batches).
const APPLY_BATCH_GROUPS: usize = 20_000;

/// The SQL joining each row `c` of calls with the events matched to it (probed by index).
macro_rules! events_of_c {
    () => {
        "left join lateral (select event_time, id, metadata, group_part from events e
                            where e.target_id = c.id and e.target_kind = 'call' and e.state = 'matched'
                            offset 0) e on true"
    };
}

/// Recomputes `groups` with every call in them, and `groupless` calls (given in heap order);
/// adds what it changed to `applied` and sorts the groups into contributing or not.
async fn recompute(
    conn: &mut PgConnection,
    groups: &[String],
    groupless: &[String],
    applied: &mut Applied,
    contributing: &mut Vec<String>,
    not_contributing: &mut Vec<String>,
) -> Result<()> {
    // The small input drives index probes (`lateral … offset 0`): left to itself the planner
    // walks every matched event or the whole call_group_id index (2.1 s instead of 0.34 s for
    // 4.4k groups at 2M calls).
    let step = std::time::Instant::now();
    let mut current: HashMap<String, Row> = HashMap::new();
    let mut by_group: HashMap<String, Vec<Contribution>> = HashMap::new();
    let mut members: HashMap<String, Vec<String>> = HashMap::new();
    let mut by_call: HashMap<String, Vec<Contribution>> = HashMap::new();
    // Every call of each touched group (where it is and what it holds), with the events matched
    // to it: their metadata is the call's own, their group part goes to the group and the
    // group's other calls. Then touched calls without a group, with their events.
    for (sql, ids) in [
        (
            concat!(
                "select g.id, c.id, c.tid, c.value, e.event_time, e.id, e.metadata::text, e.group_part::text
             from unnest($1::text[]) g(id)
             cross join lateral (select id, ctid::text as tid, async_metadata::text as value
                                 from calls c where c.call_group_id = g.id offset 0) c ",
                events_of_c!()
            ),
            groups,
        ),
        (
            concat!(
                "select null, c.id, c.tid, c.value, e.event_time, e.id, e.metadata::text, e.group_part::text
             from unnest($1::text[]) u(id)
             cross join lateral (select id, ctid::text as tid, async_metadata::text as value
                                 from calls c where c.id = u.id offset 0) c ",
                events_of_c!()
            ),
            groupless,
        ),
    ] {
        if ids.is_empty() {
            continue;
        }
        let mut rows = sqlx::query_as::<
            _,
            (
                Option<String>,
                String,
                String,
                String,
                Option<DateTime<Utc>>,
                Option<i64>,
                Option<String>,
                Option<String>,
            ),
        >(sql)
        .bind(ids)
        .fetch(&mut *conn);
        while let Some((group, call, tid, value, time, id, metadata, part)) =
            rows.try_next().await.context("reading touched calls and their events")?
        {
            if !current.contains_key(&call) {
                current.insert(call.clone(), Row::new(&tid, value)?);
                if let Some(g) = &group {
                    members.entry(g.clone()).or_default().push(call.clone());
                }
            }
            let (Some(time), Some(id), Some(metadata), Some(part)) = (time, id, metadata, part) else { continue };
            if let Some(g) = group
                && part != "{}"
            {
                by_group.entry(g).or_default().push(Contribution::parse(time, id, &part, Some(call.clone()))?);
            }
            by_call.entry(call).or_default().push(Contribution::parse(time, id, &metadata, None)?);
        }
    }
    // The groups themselves, and the events matched to them.
    let mut group_rows: HashMap<String, Row> = HashMap::new();
    if !groups.is_empty() {
        let rows: Vec<(String, String, String)> = sqlx::query_as(
            "select u.id, g.tid, g.value from unnest($1::text[]) u(id)
             cross join lateral (select ctid::text as tid, async_metadata::text as value
                                 from call_groups g where g.id = u.id offset 0) g",
        )
        .bind(groups)
        .fetch_all(&mut *conn)
        .await
        .context("reading touched call groups")?;
        for (id, tid, value) in rows {
            group_rows.insert(id, Row::new(&tid, value)?);
        }
        let rows: Vec<(String, DateTime<Utc>, i64, String)> = sqlx::query_as(
            "select u.id, e.event_time, e.id, e.metadata::text from unnest($1::text[]) u(id)
             cross join lateral (select event_time, id, metadata from events e
                                 where e.target_id = u.id and e.target_kind = 'call_group' and e.state = 'matched'
                                 offset 0) e",
        )
        .bind(groups)
        .fetch_all(&mut *conn)
        .await
        .context("reading events matched to touched call groups")?;
        for (target, time, id, metadata) in rows {
            by_group.entry(target).or_default().push(Contribution::parse(time, id, &metadata, None)?);
        }
    }
    tracing::debug!(elapsed_ms = step.elapsed().as_millis() as u64, calls = current.len(), "contributions read");

    // Merged values, kept only where they differ from what the row holds.
    let step = std::time::Instant::now();
    let none: &[Contribution] = &[];
    let mut group_changes: Vec<Change> = Vec::new();
    let mut call_changes: Vec<Change> = Vec::new();
    let keep_if_changed = |changes: &mut Vec<Change>, rows: &mut HashMap<String, Row>, id: &str, value: String| {
        if let Some(row) = rows.remove(id)
            && row.value != value
        {
            changes.push(Change { tid: row.tid, id: id.to_owned(), value });
        }
    };
    for g in groups {
        let parts = by_group.get(g).map_or(none, Vec::as_slice);
        for c in members.get(g).map_or(&[][..], Vec::as_slice) {
            let own = by_call.get(c).map_or(none, Vec::as_slice);
            let value = merge(own.iter().chain(parts.iter().filter(|x| x.owner.as_ref() != Some(c))));
            keep_if_changed(&mut call_changes, &mut current, c, value);
        }
        let value = merge(parts.iter());
        if value == "{}" {
            not_contributing.push(g.clone())
        } else {
            contributing.push(g.clone())
        }
        keep_if_changed(&mut group_changes, &mut group_rows, g, value);
    }
    for c in groupless {
        let value = merge(by_call.get(c).map_or(none, Vec::as_slice).iter());
        keep_if_changed(&mut call_changes, &mut current, c, value);
    }
    tracing::debug!(
        elapsed_ms = step.elapsed().as_millis() as u64,
        calls = call_changes.len(),
        groups = group_changes.len(),
        "values merged"
    );

    let step = std::time::Instant::now();
    applied.groups_updated +=
        write_values(conn, "call_groups", &mut group_changes).await.context("updating call_groups.async_metadata")?;
    applied.calls_updated +=
        write_values(conn, "calls", &mut call_changes).await.context("updating calls.async_metadata")?;
    tracing::debug!(elapsed_ms = step.elapsed().as_millis() as u64, "values written");
    // Freeing a batch's maps (hundreds of thousands of small allocations: 0.07-0.09 s per batch
    // in the 5M-call nightly) is left to another thread while the database works on the next.
    std::thread::spawn(move || drop((current, by_group, members, by_call, group_rows, call_changes, group_changes)));
    Ok(())
}

/// A touched row as read in this transaction: where it is, and the value it holds.
struct Row {
    tid: Tid,
    /// `async_metadata` as PostgreSQL prints jsonb, comparable with [`merge`]'s output.
    value: String,
}

impl Row {
    fn new(tid: &str, value: String) -> Result<Self> {
        Ok(Row { tid: Tid::parse(tid)?, value })
    }
}

/// A row's physical address, `ctid`: (block, offset).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Tid(u32, u16);

impl Tid {
    /// Parses PostgreSQL's text form, `(12,3)`.
    fn parse(text: &str) -> Result<Self> {
        let inner = text.strip_prefix('(').and_then(|t| t.strip_suffix(')'));
        let (block, offset) = inner.and_then(|t| t.split_once(',')).with_context(|| format!("bad ctid {text:?}"))?;
        Ok(Tid(block.parse()?, offset.parse()?))
    }
}

/// A new value for a row.
struct Change {
    tid: Tid,
    id: String,
    value: String,
}

/// One event's part in a merge: its top-level keys with their JSON text, parsed once.
struct Contribution {
    /// EventTime (µs) then arrival (`events.id`): the merge order.
    order: (i64, i64),
    fields: Vec<(String, Box<RawValue>)>,
    /// For a group part, the call whose event it is (that call has the full event already).
    owner: Option<String>,
}

impl Contribution {
    fn parse(time: DateTime<Utc>, id: i64, metadata: &str, owner: Option<String>) -> Result<Self> {
        // Values stay JSON text (`RawValue`), so numbers and strings are written back exactly
        // as stored.
        let fields: Vec<(String, Box<RawValue>)> = serde_json::from_str::<BTreeMap<String, Box<RawValue>>>(metadata)
            .with_context(|| format!("metadata of event {id} is not a JSON object"))?
            .into_iter()
            .collect();
        Ok(Contribution { order: (time.timestamp_micros(), id), fields, owner })
    }
}

/// The shallow merge of `parts` in merge order (later wins), as JSON text in the form
/// PostgreSQL prints jsonb (keys by length, then bytes; `", "` and `": "`), so it compares
/// equal to the stored value's text exactly when it needs no write. Values are the events'
/// jsonb text, already in that form.
fn merge<'a>(parts: impl Iterator<Item = &'a Contribution>) -> String {
    let mut parts: Vec<&Contribution> = parts.collect();
    parts.sort_by_key(|p| p.order);
    let mut merged: HashMap<&str, &RawValue> = HashMap::new();
    for p in parts {
        for (k, v) in &p.fields {
            merged.insert(k, v);
        }
    }
    let mut merged: Vec<(&str, &RawValue)> = merged.into_iter().collect();
    merged.sort_unstable_by(|(a, _), (b, _)| (a.len(), a.as_bytes()).cmp(&(b.len(), b.as_bytes())));
    let mut out = String::from("{");
    for (i, (k, v)) in merged.into_iter().enumerate() {
        if i > 0 {
            out.push_str(", ");
        }
        out.push_str(&serde_json::to_string(k).expect("a string serialises"));
        out.push_str(": ");
        out.push_str(v.get());
    }
    out.push('}');
    out
}

/// Writes the changes, in heap order, into `table.async_metadata`; returns the rows written.
///
/// Each row is found by its ctid (one heap access instead of a primary-key probe and then the
/// heap), checked against its id. A row a concurrent transaction updated since it was read has
/// moved and is not found there: its chunk is then written again by id, skipping rows already
/// right.
async fn write_values(conn: &mut PgConnection, table: &str, changes: &mut [Change]) -> Result<u64> {
    changes.sort_unstable_by_key(|c| c.tid);
    let mut written = 0;
    for chunk in changes.chunks(WRITE_CHUNK) {
        let ids: Vec<&str> = chunk.iter().map(|c| c.id.as_str()).collect();
        let tids: Vec<String> = chunk.iter().map(|c| format!("({},{})", c.tid.0, c.tid.1)).collect();
        let values: Vec<&str> = chunk.iter().map(|c| c.value.as_str()).collect();
        // `table` is one of our two constants.
        let by_tid = format!(
            "update {table} t set async_metadata = u.v::jsonb
             from unnest($1::text[], $2::text[], $3::text[]) u(id, tid, v)
             where t.ctid = u.tid::tid and t.id = u.id"
        );
        let statement = sqlx::query(sqlx::AssertSqlSafe(by_tid)).bind(&ids).bind(&tids).bind(&values);
        let mut done = crate::db::with_index_probes(conn, statement).await?;
        if done < chunk.len() as u64 {
            tracing::debug!(table, moved = chunk.len() as u64 - done, "rows moved since read; writing by id");
            let by_id = format!(
                "update {table} t set async_metadata = u.v::jsonb
                 from unnest($1::text[], $2::text[]) u(id, v)
                 where t.id = u.id and t.async_metadata is distinct from u.v::jsonb"
            );
            let statement = sqlx::query(sqlx::AssertSqlSafe(by_id)).bind(&ids).bind(&values);
            done += crate::db::with_index_probes(conn, statement).await?;
        }
        written += done;
    }
    Ok(written)
}

/// Rows written per statement.
const WRITE_CHUNK: usize = 10_000;

#[cfg(test)]
mod tests {
    use super::*;

    fn part(time: i64, id: i64, metadata: &str) -> Contribution {
        Contribution::parse(DateTime::from_timestamp_micros(time).unwrap(), id, metadata, None).unwrap()
    }

    #[test]
    fn later_event_time_wins_then_arrival_order() {
        let parts =
            [part(20, 1, r#"{"a": "late"}"#), part(10, 2, r#"{"a": "early", "b": 1}"#), part(20, 3, r#"{"b": 2}"#)];
        let merged: serde_json::Value = serde_json::from_str(&merge(parts.iter())).unwrap();
        assert_eq!(merged, serde_json::json!({"a": "late", "b": 2}));
        assert_eq!(merge([].iter()), "{}");
    }

    #[test]
    fn values_are_written_back_exactly_as_stored() {
        let text =
            r#"{"big": 123456789012345678901234567890, "f": 1.50, "s": "a\"b\\c\nd", "k\"ey": [1, {"x": null}]}"#;
        let merged = merge([part(1, 1, text)].iter());
        assert!(merged.contains("123456789012345678901234567890"), "{merged}");
        assert!(merged.contains("1.50"), "{merged}");
        let a: serde_json::Value = serde_json::from_str(&merged).unwrap();
        let b: serde_json::Value = serde_json::from_str(text).unwrap();
        assert_eq!(a, b);
    }

    #[test]
    fn metadata_that_is_not_an_object_names_the_event() {
        let e = Contribution::parse(DateTime::from_timestamp_micros(0).unwrap(), 42, "[1]", None).err().unwrap();
        assert!(format!("{e:#}").contains("event 42"), "{e:#}");
    }
}
