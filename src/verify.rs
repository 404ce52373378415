//! Verifying: every call's and call group's `async_metadata` recomputed from the record of
//! matches (`events`) with apply's merge, compared with what the rows hold; with `--repair`, the
//! rows that differ are written through apply's writer.
//!
//! The expected values come from [`apply::call_value`] and [`apply::group_value`], the functions
//! a run's apply writes, so verify cannot disagree with a run. Like apply, it compares the text
//! PostgreSQL prints for the stored jsonb with apply's printing of the merged value: equal
//! exactly when the values are jsonb-equal.
//!
//! Memory: the matched events' contributions are held (the record of matches, not the calls);
//! calls and groups are streamed with binary COPY and only the first differences are kept (with
//! `--repair`, the differences waiting to be written, a chunk at a time).

use std::borrow::Cow;

use anyhow::{Context, Result};
use foldhash::{HashMap, HashMapExt as _, HashSet};
use futures_util::TryStreamExt as _;
use sqlx::{PgConnection, PgPool};

use crate::apply::{self, Applied, Contribution, NewValue, Tid};
use crate::decision::TargetKind;
use crate::pgcopy;

/// Differences kept as examples, per table.
pub const EXAMPLES: usize = 10;
/// Differences written per statement with `--repair`.
const REPAIR_CHUNK: usize = 10_000;

/// What verify found (and wrote).
#[derive(Debug, Default, serde::Serialize)]
pub struct Verified {
    /// The job whose rows were checked; `None` for every row.
    pub job: Option<String>,
    pub calls_checked: u64,
    pub groups_checked: u64,
    pub calls_differing: u64,
    pub groups_differing: u64,
    /// The first differences of each table, in the order read.
    pub examples: Vec<Difference>,
    /// Rows written, with `--repair`.
    pub repaired: Option<Applied>,
    pub elapsed_ms: u64,
}

impl Verified {
    /// Whether some row differs from the record of matches.
    pub fn differs(&self) -> bool {
        self.calls_differing + self.groups_differing > 0
    }
}

/// A row whose stored value is not the one the record of matches gives.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Difference {
    /// `calls` or `call_groups`.
    pub table: &'static str,
    pub id: String,
    /// As PostgreSQL prints the stored jsonb.
    pub stored: String,
    pub expected: String,
}

impl Difference {
    /// The top-level keys that differ: missing from the row, not expected in it, or with another
    /// value. All of them when either value is not an object.
    pub fn keys(&self) -> Vec<String> {
        let parse = |t: &str| serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(t).ok();
        let (Some(stored), Some(expected)) = (parse(&self.stored), parse(&self.expected)) else {
            return Vec::new();
        };
        let keys: Vec<String> = stored
            .keys()
            .chain(expected.keys())
            .filter(|k| stored.get(*k) != expected.get(*k))
            .cloned()
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        keys
    }
}

/// Differences found but not written (`verify` without `--repair`): the exit status says so.
#[derive(Debug, thiserror::Error)]
#[error(
    "{calls} calls and {groups} call groups differ from the record of matches; `callrecon verify --repair` writes them"
)]
pub struct Unrepaired {
    pub calls: u64,
    pub groups: u64,
}

/// Recomputes every call's and group's value (or, with `job`, those the job's matched events
/// reach) and compares them with the stored ones; with `repair`, writes those that differ, all
/// in one transaction holding the apply lock.
///
/// The reads run in one snapshot (repeatable read). With `repair`, it is taken once the apply
/// lock is held, so no run commits events or values between the read and the write.
#[tracing::instrument(skip_all, fields(job = job, repair))]
pub async fn verify(pool: &PgPool, job: Option<&str>, repair: bool) -> Result<Verified> {
    let started = std::time::Instant::now();
    let mut writer = match repair {
        true => {
            let mut tx = crate::db::begin(pool).await.context("starting the repair's transaction")?;
            apply::lock(&mut tx).await?;
            Some(tx)
        }
        false => None,
    };
    let mut reader = pool.acquire().await.context("starting verify's transaction")?;
    let mut reader = crate::db::begin_snapshot(&mut reader).await.context("starting verify's transaction")?;
    let record = Record::read(&mut reader, job).await?;
    let total = estimate_rows(&mut reader).await?;
    let progress = crate::progress::bar("verify", total, "rows");
    let mut out = Verified { job: job.map(str::to_owned), ..Verified::default() };
    let mut written = Applied::default();
    let writer_conn = writer.as_deref_mut();
    let mut check = Check { record: &record, progress: &progress, writer: writer_conn, examples: &mut out.examples };
    let (checked, differing, wrote) = check.table(&mut reader, Table::Groups).await?;
    (out.groups_checked, out.groups_differing, written.groups_updated) = (checked, differing, wrote);
    let (checked, differing, wrote) = check.table(&mut reader, Table::Calls).await?;
    (out.calls_checked, out.calls_differing, written.calls_updated) = (checked, differing, wrote);
    progress.finish_and_clear();
    // Freeing the record (millions of small allocations: ~2 s at 577k events) is left to another
    // thread; the command's process does not wait for it.
    std::thread::spawn(move || drop(record));
    reader.rollback().await?;
    if let Some(tx) = writer {
        tx.commit().await.context("committing the repair")?;
        out.repaired = Some(written);
    }
    out.elapsed_ms = started.elapsed().as_millis() as u64;
    tracing::info!(
        calls_checked = out.calls_checked,
        groups_checked = out.groups_checked,
        calls_differing = out.calls_differing,
        groups_differing = out.groups_differing,
        calls_written = written.calls_updated,
        groups_written = written.groups_updated,
        elapsed_ms = out.elapsed_ms,
        "verified"
    );
    Ok(out)
}

/// The planner's row counts of calls and call_groups, for the progress bar.
async fn estimate_rows(conn: &mut PgConnection) -> Result<u64> {
    let n: i64 = sqlx::query_scalar(
        "select coalesce(sum(greatest(reltuples, 0)), 0)::bigint from pg_class
         where oid in ('calls'::regclass, 'call_groups'::regclass)",
    )
    .fetch_one(&mut *conn)
    .await?;
    Ok(n.max(0) as u64)
}

/// The record of matches, as apply merges it: per call the events matched to it, per group the
/// events matched to it and the group parts of events matched to its calls.
struct Record {
    own: HashMap<String, Vec<Contribution>>,
    parts: HashMap<String, Vec<Contribution>>,
    /// [`apply::group_value`] of each group with parts; also the value of its calls that have no
    /// event of their own.
    group_values: HashMap<String, String>,
    /// With `--job`: the rows the job's matched events reach.
    scope: Option<Scope>,
}

/// The calls a job's matched events are matched to, and the groups they reach: those matched
/// to, and those of the calls matched to (with every call in them).
#[derive(Default)]
struct Scope {
    calls: HashSet<String>,
    groups: HashSet<String>,
}

impl Record {
    /// Reads every matched event (every job's: apply merges them all), with the current group
    /// of the call it is matched to when it has a group part (or is `job`'s).
    async fn read(conn: &mut PgConnection, job: Option<&str>) -> Result<Self> {
        let step = std::time::Instant::now();
        let of_job = job.map_or(String::new(), |j| format!(" or e.job = {}", pgcopy::Literal::new(j)));
        // One primary-key probe per event that needs its call's group.
        let sql = format!(
            "copy (select e.id, e.event_time, e.metadata::text, e.group_part::text, e.target_kind, e.target_id,
                          case when e.target_kind = 'call' and (e.group_part <> '{{}}'{of_job})
                               then (select c.call_group_id from calls c where c.id = e.target_id) end,
                          e.job
                   from events e where e.state = 'matched')
             to stdout (format binary)"
        );
        let mut record =
            Record { own: HashMap::new(), parts: HashMap::new(), group_values: HashMap::new(), scope: None };
        let mut scope = job.map(|_| Scope::default());
        let mut events = 0u64;
        pgcopy::for_each_row(conn, &sql, 8, |f| {
            let [Some(id), Some(time), Some(metadata), Some(part), Some(kind), Some(target), group, Some(of)] = f
            else {
                anyhow::bail!("a matched event with a null column");
            };
            let id = pgcopy::int8(id)?;
            let time = pgcopy::datetime(time).context("event time")?;
            let (metadata, part) = (pgcopy::text(metadata)?, pgcopy::text(part)?);
            let (target, group) = (pgcopy::text(target)?, group.map(pgcopy::text).transpose()?);
            let ours = scope.as_mut().filter(|_| Some(pgcopy::text(of).unwrap_or_default()) == job);
            events += 1;
            if TargetKind::parse(pgcopy::text(kind)?) == Some(TargetKind::Call) {
                if let Some(s) = ours {
                    s.calls.insert(target.to_owned());
                    s.groups.extend(group.map(str::to_owned));
                }
                if let Some(g) = group
                    && part != "{}"
                {
                    let p = Contribution::parse(time, id, part, Some(target.to_owned()))?;
                    record.parts.entry(g.to_owned()).or_default().push(p);
                }
                let c = Contribution::parse(time, id, metadata, None)?;
                record.own.entry(target.to_owned()).or_default().push(c);
            } else {
                if let Some(s) = ours {
                    s.groups.insert(target.to_owned());
                }
                let c = Contribution::parse(time, id, metadata, None)?;
                record.parts.entry(target.to_owned()).or_default().push(c);
            }
            Ok(())
        })
        .await
        .context("reading matched events")?;
        for (g, parts) in &record.parts {
            let parts: Vec<apply::Part> = parts.iter().map(Contribution::as_part).collect();
            record.group_values.insert(g.clone(), apply::group_value(&parts));
        }
        record.scope = scope;
        tracing::info!(
            events,
            calls = record.own.len(),
            groups = record.parts.len(),
            elapsed_ms = step.elapsed().as_millis() as u64,
            "record of matches read"
        );
        Ok(record)
    }

    /// The value the record of matches gives call `id` of group `group`.
    fn call(&self, id: &str, group: Option<&str>) -> Cow<'_, str> {
        let Some(own) = self.own.get(id) else {
            // A call without events owns no part of its group: its value is the group's.
            return Cow::Borrowed(group.and_then(|g| self.group_values.get(g)).map_or("{}", String::as_str));
        };
        let parts: Vec<apply::Part> =
            group.and_then(|g| self.parts.get(g)).into_iter().flatten().map(Contribution::as_part).collect();
        Cow::Owned(apply::call_value(id, own.iter(), &parts))
    }

    /// The value the record of matches gives group `id`.
    fn group(&self, id: &str) -> &str {
        self.group_values.get(id).map_or("{}", String::as_str)
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Table {
    Calls,
    Groups,
}

/// Compares the rows of a table, streamed, with the record of matches.
struct Check<'a> {
    record: &'a Record,
    progress: &'a indicatif::ProgressBar,
    /// With `--repair`: the connection holding the apply lock, which writes the differences.
    writer: Option<&'a mut PgConnection>,
    examples: &'a mut Vec<Difference>,
}

/// What a table's check found so far.
#[derive(Default)]
struct Found {
    checked: u64,
    differing: u64,
    written: u64,
    /// Rows read since the progress bar last moved.
    seen: u64,
    /// Differences kept as examples.
    examples: usize,
    /// With `--repair`: differences not written yet.
    pending: Vec<NewValue>,
}

impl Table {
    /// Its name, the COPY reading it and the number of fields that COPY gives.
    fn read(self) -> (&'static str, &'static str, usize) {
        match self {
            Table::Calls => (
                "calls",
                "copy (select id, ctid, async_metadata::text, call_group_id, started_at from calls)
                 to stdout (format binary)",
                5,
            ),
            Table::Groups => (
                "call_groups",
                "copy (select id, ctid, async_metadata::text from call_groups) to stdout (format binary)",
                3,
            ),
        }
    }
}

impl Check<'_> {
    /// Checks every row of `table` (in `--job`'s scope); returns the rows checked, differing and
    /// written.
    async fn table(&mut self, conn: &mut PgConnection, table: Table) -> Result<(u64, u64, u64)> {
        let step = std::time::Instant::now();
        let (name, sql, fields) = table.read();
        let mut found = Found::default();
        let mut rows = pgcopy::RowReader::new(fields);
        let mut stream = conn.copy_out_raw(sql).await.with_context(|| format!("reading {name}"))?;
        while let Some(chunk) = stream.try_next().await.with_context(|| format!("reading {name}"))? {
            rows.feed(&chunk, |f| self.row(table, f, &mut found))?;
            if found.seen >= 10_000 {
                self.progress.inc(found.seen);
                found.seen = 0;
            }
            if found.pending.len() >= REPAIR_CHUNK
                && let Some(w) = self.writer.as_deref_mut()
            {
                found.written += write(w, name, &mut found.pending).await?;
            }
        }
        drop(stream);
        rows.finish()?;
        self.progress.inc(found.seen);
        if let Some(w) = self.writer.as_deref_mut() {
            found.written += write(w, name, &mut found.pending).await?;
        }
        let Found { checked, differing, written, .. } = found;
        let elapsed_ms = step.elapsed().as_millis() as u64;
        tracing::info!(table = name, checked, differing, written, elapsed_ms, "checked");
        Ok((checked, differing, written))
    }

    /// Compares one row (`f`: the fields [`Table::read`] gives) with the record of matches.
    fn row(&mut self, table: Table, f: &[Option<&[u8]>], found: &mut Found) -> Result<()> {
        let (name, _, _) = table.read();
        found.seen += 1;
        let (Some(id), Some(tid), Some(stored)) = (f[0], f[1], f[2]) else {
            anyhow::bail!("a row of {name} with a null id, ctid or async_metadata");
        };
        let id = pgcopy::text(id)?;
        let record = self.record;
        let expected = match table {
            Table::Calls => {
                let group = f[3].map(pgcopy::text).transpose()?;
                if let Some(s) = &record.scope
                    && !s.calls.contains(id)
                    && !group.is_some_and(|g| s.groups.contains(g))
                {
                    return Ok(());
                }
                record.call(id, group)
            }
            Table::Groups => {
                if record.scope.as_ref().is_some_and(|s| !s.groups.contains(id)) {
                    return Ok(());
                }
                Cow::Borrowed(record.group(id))
            }
        };
        found.checked += 1;
        if stored == expected.as_bytes() {
            return Ok(());
        }
        found.differing += 1;
        let stored = pgcopy::text(stored)?;
        tracing::debug!(table = name, id, stored, expected = &*expected, "differs");
        if found.examples < EXAMPLES {
            found.examples += 1;
            let (stored, expected) = (stored.to_owned(), expected.clone().into_owned());
            self.examples.push(Difference { table: name, id: id.to_owned(), stored, expected });
        }
        if self.writer.is_some() {
            let (block, offset) = pgcopy::tid(tid)?;
            // A call's started_at: the partition of its ctid on a partitioned `calls`.
            let start = match f.get(4).copied().flatten() {
                Some(t) => Some(pgcopy::datetime(t).context("a call's started_at")?),
                None => None,
            };
            let value = expected.into_owned();
            found.pending.push(NewValue { tid: Tid(block, offset), start, id: id.to_owned(), value });
        }
        Ok(())
    }
}

/// Writes the differences through apply's writer and forgets them.
async fn write(conn: &mut PgConnection, table: &str, pending: &mut Vec<NewValue>) -> Result<u64> {
    let n =
        apply::write_values(conn, table, pending).await.with_context(|| format!("repairing {table}.async_metadata"))?;
    pending.clear();
    Ok(n)
}

/// The printed summary: counts, then the examples with the keys that differ.
pub fn text(v: &Verified) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    let scope = v.job.as_ref().map_or("every call and group".to_owned(), |j| format!("rows job {j}'s events reach"));
    let _ = writeln!(s, "callrecon: verify of {scope} in {:.2}s", v.elapsed_ms as f64 / 1000.0);
    let _ = writeln!(s, "  checked  {:>9} calls, {} call groups", v.calls_checked, v.groups_checked);
    let _ = writeln!(s, "  differ   {:>9} calls, {} call groups", v.calls_differing, v.groups_differing);
    for d in &v.examples {
        let table = if d.table == "calls" { "call" } else { "call group" };
        let keys = d.keys();
        let keys = if keys.is_empty() { String::new() } else { format!(" (keys {})", keys.join(", ")) };
        let _ = writeln!(s, "  {table} {}{keys}\n    stored   {}\n    expected {}", d.id, d.stored, d.expected);
    }
    let shown = v.examples.len() as u64;
    if v.calls_differing + v.groups_differing > shown {
        let _ = writeln!(
            s,
            "  ({} more not shown; RUST_LOG=callrecon=debug lists every one)",
            v.calls_differing + v.groups_differing - shown
        );
    }
    match &v.repaired {
        Some(a) => {
            let _ = writeln!(s, "repaired: wrote {} calls, {} call groups", a.calls_updated, a.groups_updated);
        }
        None if v.differs() => {
            let _ = writeln!(s, "nothing written: `callrecon verify --repair` writes the expected values");
        }
        None => {}
    }
    s
}
