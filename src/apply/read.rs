//! Reading what apply merges: touched calls and groups with their matched events, on the run's
//! connection or on a second one ([`Reader`]) while the run stores its events.

use foldhash::{HashMap, HashMapExt as _, HashSet};

use anyhow::{Context, Result};
use chrono::{DateTime, Utc};
use futures_util::TryStreamExt as _;
use sqlx::pool::PoolConnection;
use sqlx::{PgConnection, Postgres};

use super::plan::{Sizes, Touched};
use super::this_run::ThisRun;
use super::types::{Applied, Batch, Contribution, Merged, NO_MEMOIZE, Row, Written};

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
    /// Starts reading; the caller must hold the apply lock ([`super::lock`]) and have taken the change
    /// log ([`Touched::take_changes`]).
    pub fn start(mut reader: PoolConnection<Postgres>, targets: Touched, stale: HashSet<i64>, sizes: Sizes) -> Self {
        let started = std::time::Instant::now();
        // One batch waiting while the next is read: at most three batches in memory.
        let (send, receive) = tokio::sync::mpsc::channel(1);
        let task = tokio::spawn(async move {
            let mut tx =
                crate::db::begin_snapshot(&mut reader).await.context("starting the apply reader's transaction")?;
            sqlx::query(NO_MEMOIZE).execute(&mut *tx).await?;
            let mut plan = targets.resolve(&mut tx, sizes).await?;
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
        let mut out = Written::default();
        while let Some(m) = merged.recv().await {
            out.write(conn, m).await?;
        }
        merger.await.context("the apply merger")??;
        reader.await.context("the apply reader")?.context("reading touched targets on a second connection")?;
        out.finish(conn, started).await
    }
}

/// The SQL joining each row `c` of calls with the events matched to it (probed by index).
macro_rules! events_of_c {
    () => {
        "left join lateral (select event_time, id, metadata, group_part from events e
                            where e.target_id = c.id and e.target_kind = 'call' and e.state = 'matched'
                            offset 0) e on true"
    };
}

/// A touched call (with its group, when it has one) and one event matched to it, if any.
#[derive(sqlx::FromRow)]
struct CallRow {
    group_id: Option<String>,
    call_id: String,
    tid: String,
    started_at: DateTime<Utc>,
    value: String,
    event_time: Option<DateTime<Utc>>,
    event_id: Option<i64>,
    metadata: Option<String>,
    part: Option<String>,
}

impl Batch {
    /// Reads `groups` with every call in them, and those of the `groupless` calls (given in the
    /// order of their starts, all within `span` when given) that have no group, leaving out the
    /// events in `stale`. A call that started outside `span` (it changed since it was placed)
    /// is not read: the plan looks it up again. With `passes`, `groups` (and no groupless call)
    /// are read in passes over the tables ([`Batch::read_in_passes`]).
    pub(super) async fn read(
        conn: &mut PgConnection,
        groups: &[String],
        groupless: &[String],
        span: Option<(DateTime<Utc>, DateTime<Utc>)>,
        stale: &HashSet<i64>,
        passes: bool,
    ) -> Result<Self> {
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
        if passes && groupless.is_empty() {
            b.read_in_passes(conn, stale).await?;
        } else {
            b.read_calls(conn, span, stale).await?;
            b.read_groups(conn, stale).await?;
        }
        tracing::debug!(elapsed_ms = step.elapsed().as_millis() as u64, calls = b.current.len(), "contributions read");
        Ok(b)
    }

    /// Every call of each touched group (where it is and what it holds), with the events matched
    /// to it: their metadata is the call's own, their group part goes to the group and the
    /// group's other calls. Then touched calls without a group, with their events.
    ///
    /// The small input drives index probes (`lateral … offset 0`): left to itself the planner
    /// walks every matched event or the whole call_group_id index.
    async fn read_calls(
        &mut self,
        conn: &mut PgConnection,
        span: Option<(DateTime<Utc>, DateTime<Utc>)>,
        stale: &HashSet<i64>,
    ) -> Result<()> {
        macro_rules! columns {
            () => {
                "c.id as call_id, c.tid, c.started_at, c.value, e.event_time, e.id as event_id,
                 e.metadata::text as metadata, e.group_part::text as part"
            };
        }
        let in_groups = concat!(
            "select g.id as group_id, ",
            columns!(),
            " from unnest($1::text[]) g(id)
             cross join lateral (select id, ctid::text as tid, started_at, async_metadata::text as value
                                 from calls c where c.call_group_id = g.id offset 0) c ",
            events_of_c!()
        );
        let groupless = concat!(
            "select null as group_id, ",
            columns!(),
            " from unnest($1::text[]) u(id)
             cross join lateral (select id, ctid::text as tid, started_at, async_metadata::text as value
                                 from calls c where c.id = u.id and c.call_group_id is null
                                   and c.started_at between $2 and $3 offset 0) c ",
            events_of_c!()
        );
        let ids = (self.groups.clone(), self.groupless.clone());
        for (sql, ids, spanned) in [(in_groups, &ids.0, false), (groupless, &ids.1, true)] {
            if ids.is_empty() {
                continue;
            }
            let query = sqlx::query_as::<_, CallRow>(sql).bind(ids);
            let query = if spanned {
                let (lo, hi) = span.context("groupless calls are read with the span of their starts")?;
                query.bind(lo).bind(hi)
            } else {
                query
            };
            let mut rows = query.fetch(&mut *conn);
            while let Some(row) = rows.try_next().await.context("reading touched calls and their events")? {
                self.add_call_row(row, stale)?;
            }
        }
        Ok(())
    }

    /// Adds a call (the first time it is seen) and its event's contributions.
    fn add_call_row(&mut self, row: CallRow, stale: &HashSet<i64>) -> Result<()> {
        let CallRow { group_id: group, call_id: call, tid, started_at, value, event_time, event_id, metadata, part } =
            row;
        self.add_call(group.as_ref(), &call, &tid, started_at, value)?;
        let (Some(time), Some(id), Some(metadata), Some(part)) = (event_time, event_id, metadata, part) else {
            return Ok(());
        };
        if stale.contains(&id) {
            return Ok(());
        }
        add_call_event(&mut self.by_call, &mut self.by_group, group.as_deref(), call, (time, id), &metadata, &part)
    }

    /// Adds a call where it is and what it holds, the first time it is seen.
    fn add_call(
        &mut self,
        group: Option<&String>,
        call: &str,
        tid: &str,
        started_at: DateTime<Utc>,
        value: String,
    ) -> Result<()> {
        if !self.current.contains_key(call) {
            self.current.insert(call.to_owned(), Row::new(tid, Some(started_at), value)?);
            if let Some(g) = group {
                self.members.entry(g.clone()).or_default().push(call.to_owned());
            }
        }
        Ok(())
    }

    /// A big apply's batch of groups ([`Plan`](super::plan::Plan) in passes): their calls read in
    /// one pass over `calls`, the groups in one over `call_groups`, and the events matched to
    /// either in one over `events`, each checking ids against a hash of the batch's. Probing each
    /// group and call by index, as a small batch does, visits a page of `calls` once for every
    /// touched call on it; a pass visits it once.
    async fn read_in_passes(&mut self, conn: &mut PgConnection, stale: &HashSet<i64>) -> Result<()> {
        const PASSES: &[&str] = &["enable_indexscan", "enable_bitmapscan"];
        crate::db::planner_off(conn, PASSES).await?;
        let groups = std::mem::take(&mut self.groups);
        let mut calls = sqlx::query_as::<_, (String, String, String, DateTime<Utc>, String)>(
            "select c.call_group_id, c.id, c.ctid::text, c.started_at, c.async_metadata::text
             from calls c where c.call_group_id = any($1::text[])",
        )
        .bind(&groups)
        .fetch(&mut *conn);
        while let Some((group, call, tid, started_at, value)) =
            calls.try_next().await.context("reading touched groups' calls")?
        {
            self.add_call(Some(&group), &call, &tid, started_at, value)?;
        }
        drop(calls);
        self.groups = groups;
        self.read_group_rows(
            conn,
            "select g.id, g.ctid::text, g.async_metadata::text from call_groups g where g.id = any($1::text[])",
        )
        .await?;
        let group_of: HashMap<&str, &str> =
            (self.members.iter()).flat_map(|(g, calls)| calls.iter().map(move |c| (c.as_str(), g.as_str()))).collect();
        let call_ids: Vec<&str> = self.current.keys().map(String::as_str).collect();
        let mut events = sqlx::query_as::<_, (bool, String, DateTime<Utc>, i64, String, Option<String>)>(
            "select e.target_kind = 'call', e.target_id, e.event_time, e.id, e.metadata::text, e.group_part::text
             from events e
             where e.state = 'matched'
               and (e.target_kind = 'call' and e.target_id = any($1::text[])
                    or e.target_kind = 'call_group' and e.target_id = any($2::text[]))",
        )
        .bind(&call_ids)
        .bind(&self.groups)
        .fetch(&mut *conn);
        while let Some((to_call, target, time, id, metadata, part)) =
            events.try_next().await.context("reading events matched to touched groups and their calls")?
        {
            if stale.contains(&id) {
                continue;
            }
            if !to_call {
                self.by_group.entry(target).or_default().push(Contribution::parse(time, id, &metadata, None)?);
            } else if let Some(part) = part {
                let group = group_of.get(target.as_str()).copied();
                add_call_event(&mut self.by_call, &mut self.by_group, group, target, (time, id), &metadata, &part)?;
            }
        }
        drop(events);
        crate::db::planner_reset(conn, PASSES).await?;
        tracing::debug!(groups = self.groups.len(), calls = self.current.len(), "a batch of groups read in passes");
        Ok(())
    }

    /// The touched groups' rows (id, ctid, value), read by `sql` with the groups as `$1`: by
    /// index ([`Batch::read_groups`]) or in one pass ([`Batch::read_in_passes`]).
    async fn read_group_rows(&mut self, conn: &mut PgConnection, sql: &'static str) -> Result<()> {
        let rows: Vec<(String, String, String)> = sqlx::query_as(sql)
            .bind(&self.groups)
            .fetch_all(&mut *conn)
            .await
            .context("reading touched call groups")?;
        for (id, tid, value) in rows {
            self.group_rows.insert(id, Row::new(&tid, None, value)?);
        }
        Ok(())
    }

    /// The touched groups themselves, and the events matched to them.
    async fn read_groups(&mut self, conn: &mut PgConnection, stale: &HashSet<i64>) -> Result<()> {
        if self.groups.is_empty() {
            return Ok(());
        }
        self.read_group_rows(
            conn,
            "select u.id, g.tid, g.value from unnest($1::text[]) u(id)
             cross join lateral (select ctid::text as tid, async_metadata::text as value
                                 from call_groups g where g.id = u.id offset 0) g",
        )
        .await?;
        let rows: Vec<(String, DateTime<Utc>, i64, String)> = sqlx::query_as(
            "select u.id, e.event_time, e.id, e.metadata::text from unnest($1::text[]) u(id)
             cross join lateral (select event_time, id, metadata from events e
                                 where e.target_id = u.id and e.target_kind = 'call_group' and e.state = 'matched'
                                 offset 0) e",
        )
        .bind(&self.groups)
        .fetch_all(&mut *conn)
        .await
        .context("reading events matched to touched call groups")?;
        for (target, time, id, metadata) in rows {
            if !stale.contains(&id) {
                self.by_group.entry(target).or_default().push(Contribution::parse(time, id, &metadata, None)?);
            }
        }
        Ok(())
    }
}

/// An event matched to `call` (of `group`, when it has one): its metadata is the call's, its
/// group part (`part`) the group's and the group's other calls'.
fn add_call_event(
    by_call: &mut HashMap<String, Vec<Contribution>>,
    by_group: &mut HashMap<String, Vec<Contribution>>,
    group: Option<&str>,
    call: String,
    (time, id): (DateTime<Utc>, i64),
    metadata: &str,
    part: &str,
) -> Result<()> {
    if let Some(g) = group
        && part != "{}"
    {
        by_group.entry(g.to_owned()).or_default().push(Contribution::parse(time, id, part, Some(call.clone()))?);
    }
    by_call.entry(call).or_default().push(Contribution::parse(time, id, metadata, None)?);
    Ok(())
}
