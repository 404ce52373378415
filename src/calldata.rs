//! Reading the platform's call data that a batch of events can match: only the columns the
//! rules compare with, only the calls whose time can fall in a window.

use std::collections::{HashMap, HashSet};

use anyhow::{Context, Result};
use chrono::{DateTime, Utc};
use futures_util::TryStreamExt as _;
use sqlx::pool::PoolConnection;
use sqlx::{PgConnection, Postgres, Row as _};

use crate::db::AbortOnDrop;
use crate::job::{Job, Normalizer, Target, TargetField};
use crate::pgcopy::{self, Texts};

/// Calls up to this long are found by the batch's `started_at` range; longer ones through the
/// partial index `calls_long_idx` (sql/0006), whose predicate this must match.
pub const LONG_CALL: chrono::Duration = chrono::Duration::hours(2);

/// The target fields the job's call rules and group rules compare with.
pub fn fields(job: &Job) -> (Vec<TargetField>, Vec<TargetField>) {
    let (mut calls, mut groups) = (Vec::new(), Vec::new());
    for rule in &job.rules {
        let list = match rule.target {
            Target::Call { .. } => &mut calls,
            Target::CallGroup => &mut groups,
        };
        for key in &rule.keys {
            if !list.contains(&key.field) {
                list.push(key.field.clone());
            }
        }
    }
    (calls, groups)
}

/// SQL text of a field. Column names come from the job loader's allow-list; metadata paths are
/// the job file's text, as [`pgcopy::Literal`]s (COPY, which reads calls, takes no bind
/// parameters).
fn field_sql(field: &TargetField) -> String {
    match field {
        TargetField::Column(c) => format!("{c}::text"),
        TargetField::Metadata(path) => {
            let parts: Vec<String> = path.iter().map(|p| pgcopy::Literal::new(p).to_string()).collect();
            format!("metadata #>> array[{}]::text[]", parts.join(", "))
        }
    }
}

/// Calls or call groups a batch may match, column-wise, as matching takes them. For groups
/// `start`/`end` are empty.
#[derive(Default)]
pub struct Candidates {
    /// Never null.
    pub ids: Texts,
    pub start: Vec<i64>,
    /// `coalesce(ended_at, started_at)`.
    pub end: Vec<i64>,
    /// Raw values of every field the rules compare with.
    pub fields: HashMap<TargetField, Texts>,
}

/// Which of `calls` and `groups` exist (an analyst attaching an event to one).
pub async fn existing(
    conn: &mut PgConnection,
    calls: &[&str],
    groups: &[&str],
) -> Result<(HashSet<String>, HashSet<String>)> {
    let calls: Vec<String> = sqlx::query_scalar("select id from calls where id = any($1)")
        .bind(calls)
        .fetch_all(&mut *conn)
        .await
        .context("looking up calls")?;
    let groups: Vec<String> = sqlx::query_scalar("select id from call_groups where id = any($1)")
        .bind(groups)
        .fetch_all(&mut *conn)
        .await
        .context("looking up call groups")?;
    Ok((calls.into_iter().collect(), groups.into_iter().collect()))
}

/// Where a call was when matching read it: its call group, its `started_at` (microseconds since
/// the Unix epoch) and its heap block. Calls without a group are read by id in the order of their
/// start and block, a chunk at a time restricted to the chunk's range of starts (on a
/// partitioned `calls`, only the partitions of that range are probed). Apply starts from it for
/// the calls a run matches; only a hint: apply reads what the call belongs to now, and looks up
/// every touched call it did not find where the hint said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hint {
    pub group: Option<String>,
    pub start: i64,
    pub block: i64,
}

/// Where each call read for matching is: its call group and heap block, in the order of the
/// calls' [`Candidates::ids`]. Apply starts from it for the calls this run matches ([`Hint`]).
#[derive(Default)]
pub struct Placement {
    pub group: Texts,
    /// `started_at`, as [`Candidates::start`] (a copy: 8 bytes a call).
    pub start: Vec<i64>,
    pub block: Vec<i64>,
}

impl Placement {
    /// Where the call at index `call` of [`Candidates::ids`] is; `None` when placements were not
    /// read.
    pub fn hint(&self, call: usize) -> Option<Hint> {
        (call < self.block.len()).then(|| Hint {
            group: self.group.get(call).map(str::to_owned),
            start: self.start[call],
            block: self.block[call],
        })
    }
}

/// Calls that a window can place an event of `[from, to]` in, given the job's widest window,
/// with where they are when `placed` (a rematch, which confirms most matches, leaves the group
/// and the heap block out: 2 of 7 columns, and apply finds the few calls it touches by id).
///
/// Read with binary `COPY … TO STDOUT` (several times faster than row-by-row fetching on
/// millions of rows) and decoded straight into columns. COPY takes no bind parameters: the
/// timestamps are our own values and metadata paths are quoted as literals. `expected`: how many
/// calls the caller guesses there are (the chunk before's), for the columns' first capacity.
///
/// With `second`, the later half of the range of starts is read on that connection and decoded
/// on a task of its own while `conn` reads the earlier half (with the long calls): one COPY
/// keeps one PostgreSQL backend and one decoding thread busy, and a rematch's chunks waited on
/// both (bench/RESULTS.md). Committed call data either way: the run writes none before apply.
pub async fn load_calls(
    conn: &mut PgConnection,
    second: Option<PoolConnection<Postgres>>,
    fields: &[TargetField],
    (from, to): (DateTime<Utc>, DateTime<Utc>),
    (before, after): (chrono::Duration, chrono::Duration),
    placed: bool,
    expected: usize,
) -> Result<(Candidates, Placement)> {
    let exprs: Vec<String> = fields.iter().map(field_sql).collect();
    let ts = |t: DateTime<Utc>| pgcopy::Literal::new(&t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true));
    // The group and the ctid cost a run's COPY little (55 → 59 ms for the nightly's 166k calls);
    // left out of a rematch's, they saved 14% of it at 5M calls (bench/RESULTS.md).
    let columns = format!(
        "id, started_at, coalesce(ended_at, started_at){}{}{}",
        if placed { ", call_group_id, ctid" } else { "" },
        if exprs.is_empty() { "" } else { ", " },
        exprs.join(", ")
    );
    let (lo, hi, end) = (from - after - LONG_CALL, to + before, from - after);
    // Calls starting in `[lo, hi)`, or `[lo, hi]` for the last part, and with the long calls
    // started before `lo` for the first.
    let sql = |lo: DateTime<Utc>, hi: DateTime<Utc>, first: bool, last: bool| {
        let (lo_sql, hi_sql, end) = (ts(lo), ts(hi), ts(end));
        let below = if last { "<=" } else { "<" };
        let long = if first {
            format!(
                " union all
                 select {columns} from calls
                 where started_at < {lo_sql} and ended_at - started_at > interval '2 hours' and ended_at >= {end}"
            )
        } else {
            String::new()
        };
        format!(
            "copy (select {columns} from calls
                   where started_at >= {lo_sql} and started_at {below} {hi_sql} and coalesce(ended_at, started_at) >= {end}
                   {long})
             to stdout (format binary)"
        )
    };
    let mut kinds = vec![pgcopy::Kind::Text, pgcopy::Kind::Timestamp, pgcopy::Kind::Timestamp];
    if placed {
        kinds.extend([pgcopy::Kind::Text, pgcopy::Kind::Block]);
    }
    kinds.extend(fields.iter().map(|_| pgcopy::Kind::Text));
    // A little over the guess: a chunk's calls vary by a few percent.
    let rows = expected + expected / 8;
    let columns = match second {
        None => pgcopy::read(conn, &sql(lo, hi, true, true), &kinds, rows).await.context("reading calls")?,
        Some(mut other) => {
            let mid = lo + (hi - lo) / 2;
            let (later, later_kinds) = (sql(mid, hi, false, true), kinds.clone());
            let mut later = AbortOnDrop(tokio::spawn(async move {
                let mut other = crate::db::begin_on(&mut other).await.context("reading calls")?;
                pgcopy::read(&mut other, &later, &later_kinds, rows / 2).await.context("reading calls")
            }));
            // Room for both halves in the earlier one's columns: the later one is appended to them.
            let mut columns =
                pgcopy::read(conn, &sql(lo, mid, true, false), &kinds, rows).await.context("reading calls")?;
            let later = (&mut later.0).await.context("reading calls")??;
            for (column, later) in columns.iter_mut().zip(later) {
                column.append(later);
            }
            columns
        }
    };
    calls_of(columns, fields, placed)
}

/// The calls [`load_calls`] read, from its columns: id, start, end, (with `placed`) group and
/// ctid block, then `fields`.
fn calls_of(columns: Vec<pgcopy::Column>, fields: &[TargetField], placed: bool) -> Result<(Candidates, Placement)> {
    let mut columns = columns.into_iter();
    let mut next = || columns.next().expect("one column per kind");
    let ids = next().into_text();
    anyhow::ensure!(!ids.has_nulls(), "a call without an id");
    let start: Vec<i64> = next().into_micros().into_iter().map(|t| t.expect("not null")).collect();
    let end = next().into_micros().into_iter().map(|t| t.expect("not null")).collect();
    let placement = if placed {
        let group = next().into_text();
        let block = next().into_blocks().into_iter().map(|b| b.expect("ctid is not null")).collect();
        Placement { group, start: start.clone(), block }
    } else {
        Placement::default()
    };
    let fields = fields.iter().cloned().zip(columns.map(pgcopy::Column::into_text)).collect();
    Ok((Candidates { ids, start, end, fields }, placement))
}

/// Restricts the call groups read to those whose value of `field`, normalised, is one of
/// `values`: the key values of the batch's events for one group rule.
pub struct GroupFilter {
    pub field: TargetField,
    pub normalize: Option<Normalizer>,
    pub values: Vec<String>,
}

/// Call groups with the fields the group rules compare with; all of them, or those passing any
/// of `filters`.
pub async fn load_groups(
    conn: &mut PgConnection,
    fields: &[TargetField],
    filters: Option<&[GroupFilter]>,
) -> Result<Candidates> {
    let exprs: Vec<String> = fields.iter().map(field_sql).collect();
    // Each filter's values are bound as `$n`, in filter order.
    let mut conditions = Vec::new();
    for (n, f) in filters.unwrap_or_default().iter().enumerate() {
        let expr = field_sql(&f.field);
        let norm = match f.normalize {
            None => expr,
            Some(Normalizer::Digits) => format!("regexp_replace({expr}, '[^0-9]', '', 'g')"),
            Some(Normalizer::Phone) => {
                format!("regexp_replace(regexp_replace({expr}, '[^0-9]', '', 'g'), '^1([0-9]{{10}})$', '\\1')")
            }
            Some(Normalizer::Lower | Normalizer::Trim) => unreachable!("group_filters does not filter on these"),
        };
        conditions.push(format!("{norm} = any(${}::text[])", n + 1));
    }
    let filter_sql = match filters {
        None => String::new(),
        Some(_) if conditions.is_empty() => " where false".to_owned(),
        Some(_) => format!(" where {}", conditions.join(" or ")),
    };
    let sql = format!(
        "select id{}{} from call_groups{filter_sql}",
        if exprs.is_empty() { "" } else { ", " },
        exprs.join(", ")
    );
    // Not cached on the connection: a cached statement is planned generically from its sixth
    // execution on, and `= any($n)` over a parameter then compares every group with each key
    // value in turn (a 4x rematch in pages of 60k events: 0.3 s a page, then 12-14 s from the
    // sixth page on). Prepared afresh, it is planned for the batch's values: hashed.
    let mut q = sqlx::query(sqlx::AssertSqlSafe(sql)).persistent(false);
    for f in filters.unwrap_or_default() {
        q = q.bind(&f.values);
    }
    let mut t = Candidates::default();
    let mut cols: Vec<Texts> = vec![Texts::default(); fields.len()];
    let mut rows = q.fetch(&mut *conn);
    while let Some(row) = rows.try_next().await.context("reading call_groups")? {
        t.ids.push(Some(row.try_get(0)?));
        for (i, col) in cols.iter_mut().enumerate() {
            col.push(row.try_get(1 + i)?);
        }
    }
    t.fields = fields.iter().cloned().zip(cols).collect();
    Ok(t)
}

/// The calls (`calls` true) or call groups of `ids` that exist, with `fields`, as matching takes
/// them: what `suggest` compares each analyst's attach with.
pub async fn targets_by_id(
    conn: &mut PgConnection,
    calls: bool,
    ids: &[&str],
    fields: &[TargetField],
) -> Result<Candidates> {
    let exprs: String = fields.iter().map(|f| format!(", {}", field_sql(f))).collect();
    let sql = if calls {
        format!("select id, started_at, coalesce(ended_at, started_at){exprs} from calls where id = any($1)")
    } else {
        format!("select id, null::timestamptz, null::timestamptz{exprs} from call_groups where id = any($1)")
    };
    let rows =
        sqlx::query(sqlx::AssertSqlSafe(sql)).bind(ids).fetch_all(&mut *conn).await.context("reading targets by id")?;
    let mut t = Candidates::default();
    let mut cols: Vec<Texts> = vec![Texts::default(); fields.len()];
    for row in rows {
        t.ids.push(Some(row.try_get(0)?));
        if calls {
            t.start.push(row.try_get::<DateTime<Utc>, _>(1)?.timestamp_micros());
            t.end.push(row.try_get::<DateTime<Utc>, _>(2)?.timestamp_micros());
        }
        for (i, col) in cols.iter_mut().enumerate() {
            col.push(row.try_get(3 + i)?);
        }
    }
    t.fields = fields.iter().cloned().zip(cols).collect();
    Ok(t)
}

/// A call found by its `session_id`: its id and where it is.
pub struct SessionCall {
    pub id: String,
    pub hint: Hint,
}

/// `session_id -> call` for the given session ids that have a call. Where a session id has
/// several calls (a partitioned `calls` has no unique index on it), the one that started last.
pub async fn calls_by_session(
    conn: &mut PgConnection,
    sessions: &HashSet<&str>,
) -> Result<HashMap<String, SessionCall>> {
    let list: Vec<&str> = sessions.iter().copied().collect();
    // session id, call id, group, start, heap block.
    type Found = (String, String, Option<String>, DateTime<Utc>, i64);
    let rows: Vec<Found> = sqlx::query_as(
        "select session_id, id, call_group_id, started_at, (ctid::text::point)[0]::bigint from calls
         where session_id = any($1)
         order by started_at, id",
    )
    .bind(&list)
    .fetch_all(conn)
    .await
    .context("reading calls by session_id")?;
    Ok(rows
        .into_iter()
        .map(|(session, id, group, start, block)| {
            (session, SessionCall { id, hint: Hint { group, start: start.timestamp_micros(), block } })
        })
        .collect())
}

/// Which of the given call group ids exist (MasterId attaches).
pub async fn existing_groups(conn: &mut PgConnection, ids: &HashSet<&str>) -> Result<HashSet<String>> {
    let list: Vec<&str> = ids.iter().copied().collect();
    let rows: Vec<String> = sqlx::query_scalar("select id from call_groups where id = any($1)")
        .bind(&list)
        .fetch_all(conn)
        .await
        .context("reading call groups by id")?;
    Ok(rows.into_iter().collect())
}

/// A call as a person reads it beside an event (the review desk's candidates and near misses).
#[derive(Debug, Clone, serde::Serialize, sqlx::FromRow)]
pub struct CallInfo {
    pub id: String,
    pub started_at: DateTime<Utc>,
    pub ended_at: Option<DateTime<Utc>>,
    pub ani: Option<String>,
    pub agent_id: Option<String>,
    pub call_group_id: Option<String>,
}

/// The calls of `ids` that exist, by primary key.
pub async fn call_details(conn: &mut PgConnection, ids: &[&str]) -> Result<HashMap<String, CallInfo>> {
    let rows: Vec<CallInfo> =
        sqlx::query_as("select id, started_at, ended_at, ani, agent_id, call_group_id from calls where id = any($1)")
            .bind(ids)
            .fetch_all(conn)
            .await
            .context("reading calls by id")?;
    Ok(rows.into_iter().map(|c| (c.id.clone(), c)).collect())
}

/// Where matching can decide differently now than it did for the call data a snapshot saw
/// ([`changed_since`]).
#[derive(Debug, PartialEq)]
pub enum Changed {
    /// Anywhere: a call group changed and the job has group rules, or too much time passed to
    /// tell (below).
    Anywhere,
    /// For events whose time is in one of these windows (sorted, apart; none: nowhere).
    Within(Vec<(DateTime<Utc>, DateTime<Utc>)>),
}

impl Changed {
    /// The windows of event times where matching can decide differently: `Anywhere` is every
    /// time an EventTime can have.
    pub fn into_windows(self) -> Vec<(DateTime<Utc>, DateTime<Utc>)> {
        match self {
            Changed::Within(windows) => windows,
            Changed::Anywhere => {
                let year = |y: i32| {
                    chrono::NaiveDate::from_ymd_opt(y, 1, 1)
                        .expect("a valid date")
                        .and_time(Default::default())
                        .and_utc()
                };
                let (first, end) = crate::event::EVENT_TIME_RANGE;
                vec![(year(first), year(end))]
            }
        }
    }
}

/// At most this many windows are handed on: more are merged across their smallest gaps (more
/// events retried, never fewer).
pub const CHANGED_WINDOWS: usize = 256;

/// Where the calls and call groups changed since `snapshot` (a `pg_snapshot` as text, taken by
/// a run as it started): every row written, inserted or updated, by the platform or by a run's
/// own apply, by a transaction at least as new as the oldest one running when the snapshot was
/// taken (its `xmin`). That includes transactions that committed just before it, so more rows
/// count than changed, never fewer: which of those the snapshot saw cannot be told exactly for
/// rows written under a savepoint (`pg_visible_in_snapshot` knows top-level transactions only).
/// Deleted rows do not count: a deletion can take a candidate away from an event, never give it
/// one. A call of `[start, end]` can be a candidate of events from `start - before` to
/// `end + after` (the job's widest window); these are the windows. A changed call group counts
/// everywhere when the job has group rules.
///
/// Reads every call's `xmin` (a sequential scan, as no index holds it), which is worth it only
/// against reading a large backlog of pending events again (`Tuning::retry_all_below`).
pub async fn changed_since(conn: &mut PgConnection, snapshot: &str, job: &Job) -> Result<Changed> {
    let (before, after) = job.max_window();
    let group_rules = job.rules.iter().any(|r| r.target == Target::CallGroup);
    // Row xids are 32-bit: `age()` orders them only within 2^31 transactions of now.
    let (next, oldest): (i64, i64) = sqlx::query_as(
        "select pg_snapshot_xmax(pg_current_snapshot())::text::bigint, pg_snapshot_xmin($1::pg_snapshot)::text::bigint",
    )
    .bind(snapshot)
    .fetch_one(&mut *conn)
    .await
    .context("reading the current transaction id")?;
    if next - oldest >= 1 << 30 {
        return Ok(Changed::Anywhere);
    }
    let changed = "age(xmin) <= age($1::xid)";
    let oldest32 = (oldest & 0xffff_ffff).to_string();
    if group_rules {
        let changed: bool =
            sqlx::query_scalar(sqlx::AssertSqlSafe(format!("select exists (select from call_groups where {changed})")))
                .bind(&oldest32)
                .fetch_one(&mut *conn)
                .await
                .context("reading which call groups changed")?;
        if changed {
            return Ok(Changed::Anywhere);
        }
    }
    // The changed calls' windows, an hour of starts at a time (a hash aggregate: sorting every
    // changed call took 5 s at 5M), merged where they overlap.
    let mut windows: Vec<(DateTime<Utc>, DateTime<Utc>)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "select greatest(min(started_at) - $2 * interval '1 microsecond', timestamptz '1899-12-31 00:00:00+00'),
                least(max(greatest(started_at, coalesce(ended_at, started_at))) + $3 * interval '1 microsecond',
                      timestamptz '2201-01-02 00:00:00+00')
         from calls where started_at is not null and {changed}
         group by date_bin('1 hour', started_at, timestamptz '2000-01-01 00:00:00+00')"
    )))
    .bind(&oldest32)
    .bind(before.num_microseconds().unwrap_or(i64::MAX))
    .bind(after.num_microseconds().unwrap_or(i64::MAX))
    .fetch_all(&mut *conn)
    .await
    .context("reading which calls changed")?;
    windows.sort_unstable();
    Ok(Changed::Within(coarsen(merge(windows), CHANGED_WINDOWS)))
}

/// Sorted `windows` with the overlapping ones merged.
fn merge(windows: Vec<(DateTime<Utc>, DateTime<Utc>)>) -> Vec<(DateTime<Utc>, DateTime<Utc>)> {
    let mut out: Vec<(DateTime<Utc>, DateTime<Utc>)> = Vec::with_capacity(windows.len());
    for (lo, hi) in windows {
        match out.last_mut() {
            Some(last) if lo <= last.1 => last.1 = last.1.max(hi),
            _ => out.push((lo, hi)),
        }
    }
    out
}

/// `windows` (sorted, apart) as at most `max`, by merging across the smallest gaps.
fn coarsen(windows: Vec<(DateTime<Utc>, DateTime<Utc>)>, max: usize) -> Vec<(DateTime<Utc>, DateTime<Utc>)> {
    if windows.len() <= max || max == 0 {
        return windows;
    }
    // Keep the `max - 1` widest gaps; merge across every other.
    let mut gaps: Vec<(chrono::Duration, usize)> =
        windows.windows(2).enumerate().map(|(i, w)| (w[1].0 - w[0].1, i)).collect();
    gaps.sort_unstable_by(|a, b| b.cmp(a));
    let mut kept: Vec<usize> = gaps[..max - 1].iter().map(|g| g.1).collect();
    kept.sort_unstable();
    let mut out = Vec::with_capacity(max);
    let mut start = 0;
    for gap in kept.into_iter().chain(std::iter::once(windows.len() - 1)) {
        out.push((windows[start].0, windows[gap].1));
        start = gap + 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_joins_overlapping_windows_only() {
        let t = |h: i64| DateTime::<Utc>::from_timestamp(h * 3600, 0).unwrap();
        let w = vec![(t(0), t(2)), (t(1), t(3)), (t(2), t(2)), (t(3), t(4)), (t(5), t(6)), (t(6), t(10)), (t(7), t(8))];
        assert_eq!(merge(w), vec![(t(0), t(4)), (t(5), t(10))]);
        assert_eq!(merge(vec![(t(0), t(1)), (t(2), t(3))]), vec![(t(0), t(1)), (t(2), t(3))]);
    }

    #[test]
    fn coarsen_merges_across_the_smallest_gaps() {
        let t = |h: i64| DateTime::<Utc>::from_timestamp(h * 3600, 0).unwrap();
        let w = vec![(t(0), t(1)), (t(2), t(3)), (t(10), t(11)), (t(11) + chrono::Duration::minutes(30), t(12))];
        assert_eq!(coarsen(w.clone(), 4), w);
        assert_eq!(coarsen(w.clone(), 3), vec![(t(0), t(1)), (t(2), t(3)), (t(10), t(12))]);
        assert_eq!(coarsen(w.clone(), 2), vec![(t(0), t(3)), (t(10), t(12))]);
        assert_eq!(coarsen(w, 1), vec![(t(0), t(12))]);
    }
}
