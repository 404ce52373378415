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

use std::collections::BTreeMap;

// foldhash: these maps hash hundreds of thousands of ids per run; SipHash was 6% of a nightly's CPU.
use foldhash::{HashMap, HashMapExt as _, HashSet, HashSetExt as _};

use anyhow::{Context, Result};
use chrono::{DateTime, Utc};
use futures_util::TryStreamExt as _;
use serde_json::value::RawValue;
use serde_json::{Map, Value};
use sqlx::pool::PoolConnection;
use sqlx::{PgConnection, Postgres};

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Applied {
    pub calls_updated: u64,
    pub groups_updated: u64,
}

/// Recomputes the targets whose set of matched events may have changed, reading and writing on
/// the run's connection.
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
    lock(conn).await?;
    sqlx::query(NO_MEMOIZE).execute(&mut *conn).await?;
    let targets = Targets::take_changes(conn, calls, groups).await?;
    let mut plan = targets.resolve(conn).await?;
    let mut out = Outcome::default();
    let stale = HashSet::new();
    while let Some(batch) = plan.next(conn, &stale).await? {
        out.merge_and_write(conn, batch, &ThisRun::default()).await?;
    }
    sqlx::query("reset enable_memoize").execute(&mut *conn).await?;
    out.finish(conn, started).await
}

/// Apply's reads probe an index once per touched call or event id, and the ids are distinct:
/// PostgreSQL's Memoize node in front of those probes never hits, it only hashes and evicts
/// (the nightly's read of 12k groups' calls and events: 0.61 s with it, 0.55 s without, psql).
/// Scoped to the transaction.
const NO_MEMOIZE: &str = "set local enable_memoize = off";

/// Waits for any other run's apply to finish, then keeps others waiting until this run's
/// transaction ends (see `db::APPLY_LOCK_KEY`).
pub async fn lock(conn: &mut PgConnection) -> Result<()> {
    sqlx::query("select pg_advisory_xact_lock(hashtextextended($1, 0))")
        .bind(crate::db::APPLY_LOCK_KEY)
        .execute(&mut *conn)
        .await
        .context("waiting for another run's apply to finish")?;
    Ok(())
}

/// The touched targets before their groups are known.
pub struct Targets {
    direct: Vec<String>,
    groups: HashSet<String>,
    /// Calls the change log names.
    moved: HashSet<String>,
    hints: HashMap<String, Hint>,
}

/// Where a touched call was when matching read it: its call group, and its heap block (calls
/// without a group are read in block order). Only a hint: apply reads what the call belongs to
/// now, and looks up every touched call it did not find where the hint said ([`Plan`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hint {
    pub group: Option<String>,
    pub block: i64,
}

impl Targets {
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
        Ok(Targets { direct: direct.into_iter().collect(), groups: touched_groups, moved, hints: HashMap::new() })
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
    async fn resolve(self, conn: &mut PgConnection) -> Result<Plan> {
        let started = std::time::Instant::now();
        let Targets { direct, groups: mut touched_groups, hints, .. } = self;
        let (hinted, unhinted): (Vec<&String>, Vec<&String>) = direct.iter().partition(|c| hints.contains_key(*c));
        let placed = hinted.len();
        let (found_groups, mut groupless) = lookup(conn, unhinted.into_iter().cloned().collect()).await?;
        touched_groups.extend(found_groups);
        for call in hinted {
            let hint = &hints[call];
            match &hint.group {
                Some(g) => {
                    touched_groups.insert(g.clone());
                }
                None => groupless.push((hint.block, call.clone())),
            }
        }
        let groups: Vec<String> = touched_groups.into_iter().collect();
        tracing::debug!(
            elapsed_ms = started.elapsed().as_millis() as u64,
            groups = groups.len(),
            placed,
            "touched targets found"
        );
        let batch_groups = crate::run::size_from_env("CALLRECON_APPLY_BATCH_GROUPS", APPLY_BATCH_GROUPS);
        Ok(Plan {
            groups,
            groupless: in_heap_order(groupless),
            unread: direct.into_iter().collect(),
            read_groups: HashSet::new(),
            checked: false,
            batch_groups,
        })
    }
}

/// The groups of `calls`, and those of them without a group with their heap blocks. One
/// primary-key probe per call (`lateral … offset 0`): for tens of thousands of ids the planner
/// otherwise scans the whole table (0.36 s instead of 0.09 s for 41k of 5M calls).
async fn lookup(conn: &mut PgConnection, calls: Vec<String>) -> Result<(HashSet<String>, Vec<(i64, String)>)> {
    if calls.is_empty() {
        return Ok(Default::default());
    }
    let found: Vec<(String, Option<String>, i64)> = sqlx::query_as(
        "select u.id, c.call_group_id, c.block from unnest($1::text[]) u(id)
         cross join lateral (select call_group_id, (ctid::text::point)[0]::bigint as block
                             from calls c where c.id = u.id offset 0) c",
    )
    .bind(&calls)
    .fetch_all(&mut *conn)
    .await
    .context("reading the groups of touched calls")?;
    let mut groups = HashSet::new();
    let mut groupless = Vec::new();
    for (call, group, block) in found {
        match group {
            Some(g) => {
                groups.insert(g);
            }
            None => groupless.push((block, call)),
        }
    }
    Ok((groups, groupless))
}

/// Calls without a group, read in the order of their heap blocks.
fn in_heap_order(mut calls: Vec<(i64, String)>) -> std::collections::VecDeque<String> {
    calls.sort_unstable();
    calls.into_iter().map(|(_, call)| call).collect()
}

/// The batches apply reads, in order: touched groups with every call in them, then calls without
/// a group. Groups and groupless calls are independent, so memory stays bounded however many
/// targets a run touches (a first run touches every matched call).
///
/// Every touched call must be read once where it is now. A call is not where the plan put it
/// when its hint was out of date or it changed group between the lookup and the read: once the
/// batches are done, those calls are looked up again and their groups (or they alone) read in
/// one more round.
struct Plan {
    groups: Vec<String>,
    groupless: std::collections::VecDeque<String>,
    /// Touched calls not read yet.
    unread: HashSet<String>,
    read_groups: HashSet<String>,
    /// Whether the calls left unread were looked up again.
    checked: bool,
    batch_groups: usize,
}

impl Plan {
    /// Reads the next batch, leaving out the events in `stale`; `None` when all are read.
    async fn next(&mut self, conn: &mut PgConnection, stale: &HashSet<i64>) -> Result<Option<Batch>> {
        loop {
            if !self.groups.is_empty() {
                let groups = self.groups.split_off(self.groups.len().saturating_sub(self.batch_groups));
                let batch = Batch::read(conn, &groups, &[], stale).await?;
                self.read_groups.extend(groups);
                return Ok(Some(self.mark_read(batch)));
            }
            if !self.groupless.is_empty() {
                let n = self.groupless.len().min(self.batch_groups * 5);
                let calls: Vec<String> = self.groupless.drain(..n).collect();
                let batch = Batch::read(conn, &[], &calls, stale).await?;
                return Ok(Some(self.mark_read(batch)));
            }
            if self.checked || self.unread.is_empty() {
                return Ok(None);
            }
            self.checked = true;
            let missing: Vec<String> = self.unread.drain().collect();
            let calls = missing.len();
            let (groups, groupless) = lookup(conn, missing).await?;
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

/// Touched groups recomputed per batch, each with all its calls (~5 on average in the
/// benchmark's touched case groups); five times as many calls without a group.
/// `CALLRECON_APPLY_BATCH_GROUPS` overrides it (tests use tiny batches). With the reader, the
/// run's connection writes a batch while the next ones are read and merged, so the first write
/// starts sooner with smaller batches: the nightly's 12k groups in batches of 5,000 rather than
/// 20,000 left its connection idle 0.2 s less. Up to five batches are in memory at once: read,
/// waiting, merged, waiting, written.
const APPLY_BATCH_GROUPS: usize = 5_000;

/// Reads the touched targets on a second connection while the run's connection stores this
/// run's events, so PostgreSQL does both at once: the nightly's two biggest steps. The run's
/// connection then merges and writes each batch while the reader reads the next.
///
/// The reader sees the database as committed when it starts: the caller holds the apply lock
/// (no other run's decisions can commit meanwhile) and none of this run's writes. What it
/// misses is exactly this run's decisions, given to [`Reader::merge`] as a [`ThisRun`]; the
/// stored events whose decision this run rewrote (`stale`) are left out of what it reads.
pub struct Reader {
    task: tokio::task::JoinHandle<Result<()>>,
    batches: tokio::sync::mpsc::Receiver<Batch>,
    started: std::time::Instant,
}

impl Reader {
    /// Starts reading; the caller must hold the apply lock ([`lock`]) and have taken the change
    /// log ([`Targets::take_changes`]).
    pub fn start(mut reader: PoolConnection<Postgres>, targets: Targets, stale: HashSet<i64>) -> Self {
        let started = std::time::Instant::now();
        // One batch waiting while the next is read: at most three batches in memory.
        let (send, receive) = tokio::sync::mpsc::channel(1);
        let task = tokio::spawn(async move {
            let mut tx =
                sqlx::Connection::begin(&mut *reader).await.context("starting the apply reader's transaction")?;
            sqlx::query("set transaction isolation level repeatable read, read only")
                .execute(&mut *tx)
                .await
                .context("starting the apply reader's transaction")?;
            sqlx::query(NO_MEMOIZE).execute(&mut *tx).await?;
            let mut plan = targets.resolve(&mut tx).await?;
            while let Some(batch) = plan.next(&mut tx, &stale).await? {
                if send.send(batch).await.is_err() {
                    break; // the run failed: it reports its own error
                }
            }
            tx.rollback().await?;
            anyhow::Ok(())
        });
        Reader { task, batches: receive, started }
    }

    /// Starts merging what the reader reads with this run's decisions, on another thread: the
    /// run's connection meanwhile stores this run's events, then writes each merged batch
    /// ([`Merging::write`]) while the next is merged. `more` completes `this_run` on that
    /// thread first (with the run's new events, from memory).
    pub fn merge(self, this_run: ThisRun, more: impl FnOnce(&mut ThisRun) + Send + 'static) -> Merging {
        let Reader { task, mut batches, started } = self;
        let (send, merged) = tokio::sync::mpsc::channel::<Merged>(1);
        let merger = tokio::spawn(async move {
            let mut this_run = this_run;
            let this_run = tokio::task::spawn_blocking(move || {
                more(&mut this_run);
                std::sync::Arc::new(this_run)
            })
            .await
            .context("adding this run's events")?;
            while let Some(batch) = batches.recv().await {
                let this_run = this_run.clone();
                let m = tokio::task::spawn_blocking(move || {
                    let m = batch.merge(&this_run);
                    drop(batch);
                    m
                })
                .await
                .context("merging a batch")?;
                if send.send(m).await.is_err() {
                    break; // the write failed: the run reports it
                }
            }
            // Freed off the run's path.
            std::thread::spawn(move || drop(this_run));
            anyhow::Ok(())
        });
        Merging { reader: task, merger, merged, started }
    }
}

/// Batches read and merged, waiting to be written ([`Reader::merge`]).
pub struct Merging {
    reader: tokio::task::JoinHandle<Result<()>>,
    merger: tokio::task::JoinHandle<Result<()>>,
    merged: tokio::sync::mpsc::Receiver<Merged>,
    started: std::time::Instant,
}

impl Merging {
    /// Writes the changes on the run's connection, batch by batch as they are merged.
    pub async fn write(self, conn: &mut PgConnection) -> Result<Applied> {
        let Merging { reader, merger, mut merged, started } = self;
        let mut out = Outcome::default();
        while let Some(m) = merged.recv().await {
            out.write(conn, m).await?;
        }
        merger.await.context("the apply merger")??;
        reader.await.context("the apply reader")?.context("reading touched targets on a second connection")?;
        out.finish(conn, started).await
    }
}

/// This run's decisions that a reader on another connection cannot see: the events now matched
/// (stored in this transaction), by target.
#[derive(Default)]
pub struct ThisRun {
    /// Per call: the event's metadata, and its group part when it has one.
    calls: HashMap<String, Vec<(Contribution, Option<Contribution>)>>,
    groups: HashMap<String, Vec<Contribution>>,
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
        kind: &str,
        target: String,
    ) {
        let id = NEW_EVENTS_ORDER + position as i64;
        let part = (!part.is_empty()).then(|| Contribution::of(time, id, part));
        self.add(kind, target, Contribution::of(time, id, metadata), part);
    }

    /// Adds an event matched to `target` (`kind` `call` or `call_group`), with its metadata and
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
        self.add(kind, target, Contribution::parse(time, id, metadata, None)?, part);
        Ok(())
    }

    /// Adds an event's contributions: an event matched to a call has a group part when the job's
    /// group fields are in it; one matched to a group has none.
    fn add(&mut self, kind: &str, target: String, metadata: Contribution, part: Option<Contribution>) {
        if kind == "call" {
            self.calls.entry(target).or_default().push((metadata, part));
        } else {
            self.groups.entry(target).or_default().push(metadata);
        }
    }
}

/// Where this run's new events come in the merge's tie order, above every stored event's id.
const NEW_EVENTS_ORDER: i64 = 1 << 62;

/// The SQL joining each row `c` of calls with the events matched to it (probed by index).
macro_rules! events_of_c {
    () => {
        "left join lateral (select event_time, id, metadata, group_part from events e
                            where e.target_id = c.id and e.target_kind = 'call' and e.state = 'matched'
                            offset 0) e on true"
    };
}

/// What apply reads for a batch of targets: touched groups with every call in them, and calls
/// without a group, with what they hold and the contributions of their matched events.
struct Batch {
    groups: Vec<String>,
    groupless: Vec<String>,
    current: HashMap<String, Row>,
    members: HashMap<String, Vec<String>>,
    by_call: HashMap<String, Vec<Contribution>>,
    by_group: HashMap<String, Vec<Contribution>>,
    group_rows: HashMap<String, Row>,
}

impl Batch {
    /// Reads `groups` with every call in them, and those of the `groupless` calls (given in heap
    /// order) that have no group, leaving out the events in `stale`.
    async fn read(
        conn: &mut PgConnection,
        groups: &[String],
        groupless: &[String],
        stale: &HashSet<i64>,
    ) -> Result<Self> {
        // The small input drives index probes (`lateral … offset 0`): left to itself the planner
        // walks every matched event or the whole call_group_id index (2.1 s instead of 0.34 s for
        // 4.4k groups at 2M calls).
        let step = std::time::Instant::now();
        let mut b = Batch {
            groups: groups.to_vec(),
            groupless: groupless.to_vec(),
            current: HashMap::new(),
            members: HashMap::new(),
            by_call: HashMap::new(),
            by_group: HashMap::new(),
            group_rows: HashMap::new(),
        };
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
                                     from calls c where c.id = u.id and c.call_group_id is null offset 0) c ",
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
                if !b.current.contains_key(&call) {
                    b.current.insert(call.clone(), Row::new(&tid, value)?);
                    if let Some(g) = &group {
                        b.members.entry(g.clone()).or_default().push(call.clone());
                    }
                }
                let (Some(time), Some(id), Some(metadata), Some(part)) = (time, id, metadata, part) else { continue };
                if stale.contains(&id) {
                    continue;
                }
                if let Some(g) = group
                    && part != "{}"
                {
                    b.by_group.entry(g).or_default().push(Contribution::parse(time, id, &part, Some(call.clone()))?);
                }
                b.by_call.entry(call).or_default().push(Contribution::parse(time, id, &metadata, None)?);
            }
        }
        // The groups themselves, and the events matched to them.
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
                b.group_rows.insert(id, Row::new(&tid, value)?);
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
                if !stale.contains(&id) {
                    b.by_group.entry(target).or_default().push(Contribution::parse(time, id, &metadata, None)?);
                }
            }
        }
        tracing::debug!(elapsed_ms = step.elapsed().as_millis() as u64, calls = b.current.len(), "contributions read");
        Ok(b)
    }

    /// Merges the batch's values, with this run's decisions it was read without.
    fn merge(&self, this_run: &ThisRun) -> Merged {
        let step = std::time::Instant::now();
        let Batch { groups, groupless, current, members, by_call, by_group, group_rows } = self;
        let none: &[Contribution] = &[];
        let new_of = |c: &str| this_run.calls.get(c).map_or(&[][..], Vec::as_slice);
        let mut m = Merged {
            group_changes: Vec::new(),
            call_changes: Vec::new(),
            contributing: Vec::new(),
            not_contributing: Vec::new(),
        };
        // Rows are only looked at: the caller frees the batch on another thread.
        let keep_if_changed = |changes: &mut Vec<Change>, rows: &HashMap<String, Row>, id: &str, value: String| {
            if let Some(row) = rows.get(id)
                && row.value != value
            {
                changes.push(Change { tid: row.tid, id: id.to_owned(), value });
            }
        };
        for g in groups {
            let calls = members.get(g).map_or(&[][..], Vec::as_slice);
            // The group's contributions, with the call whose event each group part is.
            let mut parts: Vec<Part> =
                by_group.get(g).map_or(none, Vec::as_slice).iter().map(Contribution::as_part).collect();
            parts.extend(this_run.groups.get(g).into_iter().flatten().map(|p| (p, None)));
            for c in calls {
                parts.extend(new_of(c).iter().filter_map(|(_, part)| part.as_ref()).map(|p| (p, Some(c.as_str()))));
            }
            for c in calls {
                let own = by_call.get(c).map_or(none, Vec::as_slice).iter().chain(new_of(c).iter().map(|(m, _)| m));
                keep_if_changed(&mut m.call_changes, current, c, call_value(c, own, &parts));
            }
            let value = group_value(&parts);
            if value == "{}" {
                m.not_contributing.push(g.clone())
            } else {
                m.contributing.push(g.clone())
            }
            keep_if_changed(&mut m.group_changes, group_rows, g, value);
        }
        for c in groupless {
            let own = by_call.get(c).map_or(none, Vec::as_slice).iter().chain(new_of(c).iter().map(|(m, _)| m));
            keep_if_changed(&mut m.call_changes, current, c, call_value(c, own, &[]));
        }
        tracing::debug!(
            elapsed_ms = step.elapsed().as_millis() as u64,
            calls = m.call_changes.len(),
            groups = m.group_changes.len(),
            "values merged"
        );
        m
    }
}

/// What apply changed so far, and which groups contribute.
#[derive(Default)]
struct Outcome {
    applied: Applied,
    contributing: Vec<String>,
    not_contributing: Vec<String>,
}

/// A batch's new values, where they differ from what the rows hold, and its groups sorted into
/// contributing or not.
struct Merged {
    group_changes: Vec<Change>,
    call_changes: Vec<Change>,
    contributing: Vec<String>,
    not_contributing: Vec<String>,
}

impl Outcome {
    /// Merges a batch with this run's decisions it was read without, and writes the values
    /// that changed.
    async fn merge_and_write(&mut self, conn: &mut PgConnection, batch: Batch, this_run: &ThisRun) -> Result<()> {
        let merged = batch.merge(this_run);
        // Freeing what was read (hundreds of thousands of small allocations: 0.07-0.09 s per
        // batch in the 5M-call nightly) is left to another thread while the database writes. It
        // is over before the next merge: frees from another thread contend with that merge's
        // allocations for malloc's locks (two to five times slower merges, measured).
        let freed = std::thread::spawn(move || drop(batch));
        self.write(conn, merged).await?;
        let _ = freed.join();
        Ok(())
    }

    /// Writes a batch's merged values.
    async fn write(&mut self, conn: &mut PgConnection, mut m: Merged) -> Result<()> {
        let step = std::time::Instant::now();
        self.applied.groups_updated += write_values(conn, "call_groups", &mut m.group_changes)
            .await
            .context("updating call_groups.async_metadata")?;
        self.applied.calls_updated +=
            write_values(conn, "calls", &mut m.call_changes).await.context("updating calls.async_metadata")?;
        tracing::debug!(elapsed_ms = step.elapsed().as_millis() as u64, "values written");
        self.contributing.append(&mut m.contributing);
        self.not_contributing.append(&mut m.not_contributing);
        Ok(())
    }

    /// Records which groups contribute, for the trigger: a group whose merged value is empty
    /// gives its calls nothing, so calls joining or leaving it change nothing.
    async fn finish(self, conn: &mut PgConnection, started: std::time::Instant) -> Result<Applied> {
        sqlx::query("delete from contributing_groups where id = any($1)")
            .bind(self.not_contributing)
            .execute(&mut *conn)
            .await
            .context("recording contributing groups")?;
        sqlx::query("insert into contributing_groups select unnest($1::text[]) on conflict do nothing")
            .bind(self.contributing)
            .execute(&mut *conn)
            .await
            .context("recording contributing groups")?;
        let Applied { calls_updated, groups_updated } = self.applied;
        tracing::info!(calls_updated, groups_updated, elapsed_ms = started.elapsed().as_millis() as u64, "applied");
        Ok(self.applied)
    }
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
pub(crate) struct Tid(pub(crate) u32, pub(crate) u16);

impl Tid {
    /// Parses PostgreSQL's text form, `(12,3)`.
    fn parse(text: &str) -> Result<Self> {
        let inner = text.strip_prefix('(').and_then(|t| t.strip_suffix(')'));
        let (block, offset) = inner.and_then(|t| t.split_once(',')).with_context(|| format!("bad ctid {text:?}"))?;
        Ok(Tid(block.parse()?, offset.parse()?))
    }
}

/// A new value for a row.
pub(crate) struct Change {
    pub(crate) tid: Tid,
    pub(crate) id: String,
    pub(crate) value: String,
}

/// One event's part in a merge: its top-level keys with their JSON text, parsed once.
pub(crate) struct Contribution {
    /// EventTime (µs) then arrival (`events.id`): the merge order.
    order: (i64, i64),
    fields: Vec<(String, Box<RawValue>)>,
    /// For a group part, the call whose event it is (that call has the full event already).
    owner: Option<String>,
}

impl Contribution {
    pub(crate) fn parse(time: DateTime<Utc>, id: i64, metadata: &str, owner: Option<String>) -> Result<Self> {
        // Values stay JSON text (`RawValue`), so numbers and strings are written back exactly
        // as stored.
        let fields: Vec<(String, Box<RawValue>)> = serde_json::from_str::<BTreeMap<String, Box<RawValue>>>(metadata)
            .with_context(|| format!("metadata of event {id} is not a JSON object"))?
            .into_iter()
            .collect();
        Ok(Contribution { order: (time.timestamp_micros(), id), fields, owner })
    }

    /// This contribution as a part of its group's merge, with the call whose event it is.
    pub(crate) fn as_part(&self) -> Part<'_> {
        (self, self.owner.as_deref())
    }

    /// An event's part from its JSON values in memory, printed as [`jsonb_text`] does.
    fn of(time: DateTime<Utc>, id: i64, metadata: &Map<String, Value>) -> Self {
        let fields = metadata
            .iter()
            .map(|(k, v)| {
                let raw = RawValue::from_string(jsonb_text(v)).expect("jsonb_text prints JSON");
                (k.clone(), raw)
            })
            .collect();
        Contribution { order: (time.timestamp_micros(), id), fields, owner: None }
    }
}

/// `value` as PostgreSQL prints it once stored as jsonb: `", "` and `": "` between items, object
/// keys by length then bytes, numbers as `numeric` prints them (never with an exponent). So a
/// new event's contribution compares with stored values without reading the event back.
/// Strings are escaped as serde_json escapes them, which is also PostgreSQL's escaping.
pub fn jsonb_text(value: &Value) -> String {
    let mut out = String::new();
    print_jsonb(value, &mut out);
    out
}

fn print_jsonb(value: &Value, out: &mut String) {
    match value {
        Value::Null | Value::Bool(_) | Value::String(_) => {
            out.push_str(&serde_json::to_string(value).expect("a JSON value serialises"))
        }
        Value::Number(n) => out.push_str(&plain_number(&n.to_string())),
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                print_jsonb(item, out);
            }
            out.push(']');
        }
        Value::Object(map) => print_object(map.iter().map(|(k, v)| (k.as_str(), v)).collect(), out, print_jsonb),
    }
}

/// Prints an object's entries as PostgreSQL prints a jsonb object: keys by length then bytes,
/// `", "` between entries and `": "` after each key. Keys are unique.
fn print_object<V>(mut entries: Vec<(&str, V)>, out: &mut String, print_value: impl Fn(V, &mut String)) {
    entries.sort_unstable_by(|(a, _), (b, _)| (a.len(), a.as_bytes()).cmp(&(b.len(), b.as_bytes())));
    out.push('{');
    for (i, (k, v)) in entries.into_iter().enumerate() {
        if i > 0 {
            out.push_str(", ");
        }
        out.push_str(&serde_json::to_string(k).expect("a string serialises"));
        out.push_str(": ");
        print_value(v, out);
    }
    out.push('}');
}

/// A JSON number's text as PostgreSQL's `numeric` prints it: an exponent (serde_json prints
/// `1e21` and `1.5e-7`) is written out, with as many decimals as the text implies, and zero has
/// no sign.
fn plain_number(text: &str) -> String {
    let (negative, unsigned) = match text.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, text),
    };
    let (mantissa, exponent) = match unsigned.split_once(['e', 'E']) {
        Some((m, e)) => (m, e.parse::<i64>().expect("a JSON exponent is an integer")),
        None => (unsigned, 0),
    };
    let (int, frac) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    let digits = format!("{int}{frac}");
    // The value is 0.digits × 10^point; `numeric` keeps `frac.len() - exponent` decimals.
    let point = int.len() as i64 + exponent;
    let decimals = (frac.len() as i64 - exponent).max(0) as usize;
    let whole = if point <= 0 {
        String::new()
    } else if point as usize >= digits.len() {
        format!("{digits}{}", "0".repeat(point as usize - digits.len()))
    } else {
        digits[..point as usize].to_owned()
    };
    let fraction = if point < 0 {
        format!("{}{digits}", "0".repeat(point.unsigned_abs() as usize))
    } else {
        digits.get(point as usize..).unwrap_or("").to_owned()
    };
    debug_assert_eq!(fraction.len(), decimals, "{text}");
    let whole = whole.trim_start_matches('0');
    let mut out = String::new();
    if negative && digits.bytes().any(|d| d != b'0') {
        out.push('-');
    }
    out.push_str(if whole.is_empty() { "0" } else { whole });
    if decimals > 0 {
        out.push('.');
        out.push_str(&fraction);
    }
    out
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
    let mut out = String::new();
    print_object(merged.into_iter().collect(), &mut out, |v: &RawValue, out| out.push_str(v.get()));
    out
}

/// A group's part in a merge, with the call whose event it is (`None` for an event matched to
/// the group itself).
pub(crate) type Part<'a> = (&'a Contribution, Option<&'a str>);

/// The value of call `call`: its own events (`own`) and the parts of its group (`group`, empty
/// for a call without a group) that are not its own: a call has its events' full metadata already.
/// `verify` computes the same values with this function.
pub(crate) fn call_value<'a>(call: &str, own: impl Iterator<Item = &'a Contribution>, group: &[Part<'a>]) -> String {
    let theirs = group.iter().filter(|(_, owner)| *owner != Some(call)).map(|(p, _)| *p);
    merge(own.chain(theirs))
}

/// The value of a call group: every one of its parts. It is also the value of each call of the
/// group that has no matched event of its own (such a call owns no part).
pub(crate) fn group_value(parts: &[Part<'_>]) -> String {
    merge(parts.iter().map(|(p, _)| *p))
}

/// Writes the changes, in heap order, into `table.async_metadata`; returns the rows written.
///
/// Each row is found by its ctid (one heap access instead of a primary-key probe and then the
/// heap), checked against its id. A row a concurrent transaction updated since it was read has
/// moved and is not found there: its chunk is then written again by id, skipping rows already
/// right.
pub(crate) async fn write_values(conn: &mut PgConnection, table: &str, changes: &mut [Change]) -> Result<u64> {
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
