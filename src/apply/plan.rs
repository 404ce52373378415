//! Which rows apply reads: the touched targets, their groups, and the batches they are read in.

use foldhash::{HashMap, HashMapExt as _, HashSet, HashSetExt as _};

use anyhow::{Context, Result};
use chrono::{DateTime, Utc};
use sqlx::PgConnection;

use super::types::Batch;
use crate::calldata::Hint;

/// The touched targets before their groups are known.
pub struct Touched {
    direct: Vec<String>,
    groups: HashSet<String>,
    /// Calls the change log names.
    moved: HashSet<String>,
    hints: HashMap<String, Hint>,
}

impl Touched {
    /// The targets of changed decisions, with the calls that joined or left a contributing group
    /// since the last run (logged by the callrecon_group_change trigger, sql/0007; the log is
    /// emptied here, in the run's transaction). The group a call left loses its group fields.
    pub async fn take_changes(conn: &mut PgConnection, calls: &[String], groups: &[String]) -> Result<Self> {
        let mut direct: HashSet<String> = calls.iter().cloned().collect();
        let mut touched_groups: HashSet<String> = groups.iter().cloned().collect();
        let changed: Vec<(String, Option<String>)> =
            sqlx::query_as("delete from call_group_changes returning call_id, old_group_id")
                .fetch_all(&mut *conn)
                .await
                .context("reading calls whose group changed")?;
        let mut moved = HashSet::new();
        for (call, old_group) in changed {
            direct.insert(call.clone());
            moved.insert(call);
            touched_groups.extend(old_group);
        }
        Ok(Touched { direct: direct.into_iter().collect(), groups: touched_groups, moved, hints: HashMap::new() })
    }

    /// Takes where matching saw the touched calls, so that only the others are looked up.
    /// Calls the change log names have moved: they are looked up whatever their hint says.
    pub fn with_hints(mut self, mut hints: HashMap<String, Hint>) -> Self {
        hints.retain(|c, _| !self.moved.contains(c));
        self.hints = hints;
        self
    }

    /// Plans the reads: the touched groups (with all their calls) and the calls without a group.
    /// Calls with a hint are placed by it; the others are looked up.
    pub(super) async fn resolve(self, conn: &mut PgConnection, sizes: Sizes) -> Result<Plan> {
        let started = std::time::Instant::now();
        let Touched { direct, groups: mut touched_groups, hints, .. } = self;
        let (hinted, unhinted): (Vec<&String>, Vec<&String>) = direct.iter().partition(|c| hints.contains_key(*c));
        let placed = hinted.len();
        let (found_groups, mut groupless) =
            lookup(conn, unhinted.into_iter().cloned().collect(), sizes.scan_from).await?;
        touched_groups.extend(found_groups);
        for call in hinted {
            let hint = &hints[call];
            match &hint.group {
                Some(g) => {
                    touched_groups.insert(g.clone());
                }
                None => groupless.push((hint.start, hint.block, call.clone())),
            }
        }
        let groups: Vec<String> = touched_groups.into_iter().collect();
        let passes = scanning_is_cheaper(conn, direct.len(), sizes.scan_from).await?;
        tracing::debug!(
            elapsed_ms = started.elapsed().as_millis() as u64,
            groups = groups.len(),
            placed,
            passes,
            "touched targets found"
        );
        Ok(Plan {
            groups,
            groupless: in_heap_order(groupless),
            unread: direct.into_iter().collect(),
            read_groups: HashSet::new(),
            checked: false,
            sizes,
            passes,
        })
    }
}

/// The groups of `calls`, and those of them without a group with their starts and heap blocks.
///
/// A few: one primary-key probe per call (`lateral … offset 0`): for tens of thousands of ids the
/// planner otherwise scans the whole table (0.36 s instead of 0.09 s for 41k of 5M calls). On a
/// partitioned `calls` each probe looks in every partition. Many (a first run's, a backfill's,
/// at least [`SCAN_SHARE`] of the table): one pass over `calls` checking each id against a hash
/// of the list, whose cost grows with the table where the probes' grows faster (each probe reads
/// index and heap pages that the others evicted).
async fn lookup(
    conn: &mut PgConnection,
    calls: Vec<String>,
    scan_from: usize,
) -> Result<(HashSet<String>, Vec<Groupless>)> {
    if calls.is_empty() {
        return Ok(Default::default());
    }
    let found: Vec<(String, Option<String>, DateTime<Utc>, i64)> =
        if scanning_is_cheaper(conn, calls.len(), scan_from).await? {
            tracing::debug!(calls = calls.len(), "touched calls looked up in one pass over calls");
            const ONE_PASS: &[&str] = &["enable_indexscan", "enable_bitmapscan"];
            crate::db::planner_off(conn, ONE_PASS).await?;
            let found = sqlx::query_as(
                "select c.id, c.call_group_id, c.started_at, (c.ctid::text::point)[0]::bigint as block
             from calls c where c.id = any($1::text[])",
            )
            .bind(&calls)
            .fetch_all(&mut *conn)
            .await
            .context("reading the groups of touched calls")?;
            crate::db::planner_reset(conn, ONE_PASS).await?;
            found
        } else {
            sqlx::query_as(
                "select u.id, c.call_group_id, c.started_at, c.block from unnest($1::text[]) u(id)
             cross join lateral (select call_group_id, started_at, (ctid::text::point)[0]::bigint as block
                                 from calls c where c.id = u.id offset 0) c",
            )
            .bind(&calls)
            .fetch_all(&mut *conn)
            .await
            .context("reading the groups of touched calls")?
        };
    let mut groups = HashSet::new();
    let mut groupless = Vec::new();
    for (call, group, start, block) in found {
        match group {
            Some(g) => {
                groups.insert(g);
            }
            None => groupless.push((start.timestamp_micros(), block, call)),
        }
    }
    Ok((groups, groupless))
}

/// The share of `calls` from which touched calls are looked up in one pass over the table
/// rather than one probe each: 1/20. A probe reads index and heap pages of a table that does not
/// fit in shared buffers (10–20 µs a call), the pass well under 1 µs a row.
const SCAN_SHARE: f64 = 1.0 / 20.0;

/// Whether `n` calls are at least `scan_from` ([`crate::tuning::APPLY_SCAN_FROM`]; below it, a
/// pass costs the whole table however few are looked up) and at least [`SCAN_SHARE`] of `calls`
/// by the planner's count (`reltuples` of the table and its partitions; a table never analyzed
/// counts as unknown: probes).
async fn scanning_is_cheaper(conn: &mut PgConnection, n: usize, scan_from: usize) -> Result<bool> {
    if n < scan_from {
        return Ok(false);
    }
    let rows: f64 = sqlx::query_scalar(
        "select coalesce(sum(greatest(c.reltuples, 0)), 0)::float8 from pg_class c
         where c.oid = 'calls'::regclass
            or c.oid in (select inhrelid from pg_inherits where inhparent = 'calls'::regclass)",
    )
    .fetch_one(&mut *conn)
    .await
    .context("reading the planner's count of calls")?;
    Ok(rows > 0.0 && n as f64 >= rows * SCAN_SHARE)
}

/// How apply plans its reads.
#[derive(Debug, Clone, Copy)]
pub struct Sizes {
    /// Touched groups read per batch (groupless calls: five times as many).
    pub batch_groups: usize,
    /// From how many calls to look up on, a pass over `calls` may replace the probes.
    pub scan_from: usize,
    /// Touched groups read per batch when the touched calls are read in passes.
    pub pass_groups: usize,
}

impl Sizes {
    /// The sizes a run's tuning sets.
    pub fn of(tuning: &crate::tuning::Tuning) -> Self {
        Sizes {
            batch_groups: tuning.apply_batch_groups,
            scan_from: tuning.apply_scan_from,
            pass_groups: tuning.apply_pass_groups,
        }
    }
}

/// A call without a group: its `started_at` (microseconds), heap block and id.
type Groupless = (i64, i64, String);

/// Calls without a group, read in the order of their starts (on a partitioned `calls`, a
/// partition's after another's) and heap blocks.
fn in_heap_order(mut calls: Vec<Groupless>) -> std::collections::VecDeque<Groupless> {
    calls.sort_unstable();
    calls.into()
}

/// The batches apply reads, in order: touched groups with every call in them, then calls without
/// a group. Groups and groupless calls are independent, so memory stays bounded however many
/// targets a run touches (a first run touches every matched call).
///
/// A few touched calls (a nightly's) are read by index, a batch of groups at a time. Many (at
/// least a twentieth of `calls`: a first run, a backfill, a big feed) have their groups read in
/// passes: a batch of [`Sizes::pass_groups`] groups has its calls read in one pass over `calls`
/// and their events in one over `events`, and is written back in heap order, so each page of
/// `calls` is visited about once per batch instead of once per touched call on it. Calls without
/// a group are read by index either way: sorted by start, a chunk's probes read neighbouring
/// pages, which are still in the buffers when the chunk is written.
///
/// Every touched call must be read once where it is now. A call is not where the plan put it
/// when its hint was out of date or it changed group between the lookup and the read: once the
/// batches are done, those calls are looked up again and their groups (or they alone) read in
/// one more round.
pub(super) struct Plan {
    groups: Vec<String>,
    groupless: std::collections::VecDeque<Groupless>,
    /// Touched calls not read yet.
    unread: HashSet<String>,
    read_groups: HashSet<String>,
    /// Whether the calls left unread were looked up again.
    checked: bool,
    sizes: Sizes,
    /// Whether groups are read in passes ([`Batch::read`]).
    passes: bool,
}

impl Plan {
    /// Reads the next batch, leaving out the events in `stale`; `None` when all are read.
    pub(super) async fn next(&mut self, conn: &mut PgConnection, stale: &HashSet<i64>) -> Result<Option<Batch>> {
        loop {
            if !self.groups.is_empty() {
                let size = if self.passes { self.sizes.pass_groups } else { self.sizes.batch_groups };
                let groups = self.groups.split_off(self.groups.len().saturating_sub(size));
                let batch = Batch::read(conn, &groups, &[], None, stale, self.passes).await?;
                self.read_groups.extend(groups);
                return Ok(Some(self.mark_read(batch)));
            }
            if !self.groupless.is_empty() {
                let n = self.groupless.len().min(self.sizes.batch_groups * 5);
                let chunk: Vec<Groupless> = self.groupless.drain(..n).collect();
                // Sorted by start: the chunk's range of starts, which prunes a partitioned `calls`.
                let at = |micros: i64| DateTime::from_timestamp_micros(micros).context("a call's started_at");
                let span = (at(chunk[0].0)?, at(chunk[chunk.len() - 1].0)?);
                let calls: Vec<String> = chunk.into_iter().map(|(_, _, call)| call).collect();
                let batch = Batch::read(conn, &[], &calls, Some(span), stale, false).await?;
                return Ok(Some(self.mark_read(batch)));
            }
            if self.checked || self.unread.is_empty() {
                return Ok(None);
            }
            self.checked = true;
            let missing: Vec<String> = self.unread.drain().collect();
            let calls = missing.len();
            let (groups, groupless) = lookup(conn, missing, self.sizes.scan_from).await?;
            self.groups = groups.into_iter().filter(|g| !self.read_groups.contains(g)).collect();
            tracing::debug!(calls, groups = self.groups.len(), "touched calls found elsewhere than planned");
            self.groupless = in_heap_order(groupless);
        }
    }

    fn mark_read(&mut self, batch: Batch) -> Batch {
        for call in batch.current.keys() {
            self.unread.remove(call);
        }
        batch
    }
}
