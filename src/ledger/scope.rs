//! The read of the events a run decides: which ones (`Scope`, `Unchanged`), and `InScope`, which
//! reads them by binary COPY in (EventTime, id) order with only the metadata keys matching and
//! apply look at, a page at a time. Each comes as a `ToDecide`: its `Subject` and the decision
//! stored before this run (`Previous`).

use std::borrow::Cow;

use anyhow::{Context, Result};
use chrono::{DateTime, Utc};
use serde_json::{Map, Value};
use sqlx::PgConnection;

use crate::decision::{Address, Reason, State, Subject, TargetKind};
use crate::event::NewEvent;
use crate::job::Job;

/// A stored event's decision before this run, to write only decisions that change.
#[derive(Debug, Clone)]
pub struct Previous {
    /// Target (kind, id) when matched.
    pub target: Option<(TargetKind, String)>,
    pub rule: Option<String>,
    pub state: State,
    pub reason: Option<Reason>,
    pub candidates: Vec<String>,
    /// The stored group part; `None` when it is known to be the one the job's group fields give
    /// for the stored target (stored with the same `group_fields_fingerprint`, or not matched to
    /// a call): then neither it nor the group fields' values were read.
    pub group_part: Option<Map<String, Value>>,
    /// Whether the event is in the run's staged backlog (`callrecon_backlog`), not in `events` yet:
    /// its decision is inserted with it.
    pub staged: bool,
}

impl Previous {
    /// What an event this run ingested has: no decision yet.
    fn none() -> Self {
        Previous {
            target: None,
            rule: None,
            state: State::Pending,
            reason: None,
            candidates: Vec::new(),
            group_part: Some(Map::new()),
            staged: false,
        }
    }
}

/// An event to decide: a stored one read back, or one this run ingested.
pub struct ToDecide<'e> {
    pub subject: Subject<'e>,
    pub received_at: DateTime<Utc>,
    pub previous: Previous,
}

impl<'e> ToDecide<'e> {
    /// An event this run ingested, not stored yet: `id` stands in until it is.
    pub fn fresh(id: i64, e: &'e NewEvent) -> Self {
        ToDecide {
            subject: Subject {
                id,
                address: e.event.address.clone(),
                time: e.event.event_time,
                metadata: Cow::Borrowed(&e.event.metadata),
            },
            received_at: e.received_at,
            previous: Previous::none(),
        }
    }
}

impl<'e> std::borrow::Borrow<Subject<'e>> for ToDecide<'e> {
    fn borrow(&self) -> &Subject<'e> {
        &self.subject
    }
}

/// Which stored events a run decides.
#[derive(Debug, Clone)]
pub enum Scope {
    /// Every pending event of the job but those this run decided already, and, when `unchanged`
    /// is given, those it describes.
    Pending { run_id: i64, unchanged: Option<Unchanged> },
    /// Every rule-decided or undecided event (SessionId and MasterId attaches and manual
    /// decisions are final) with EventTime in `[since, until)`.
    Rematch { since: Option<DateTime<Utc>>, until: Option<DateTime<Utc>> },
}

/// The pending events a run need not decide again: matching would decide each as before. Those
/// that are sessionless, last decided by a run (not by hand) no later than `since_run`, whose
/// decisions were right for the call data when it started, not expiring now (received after
/// `expire_before`), and unmatched either for a missing key (no rule found all its keys in the
/// metadata: call data plays no part) or for want of a candidate with EventTime outside every
/// window where call data changed since (`calldata::changed_since`). An ambiguous event is
/// always decided again: a deleted call can settle it.
#[derive(Debug, Clone)]
pub struct Unchanged {
    pub since_run: i64,
    pub expire_before: DateTime<Utc>,
    pub windows: Vec<(DateTime<Utc>, DateTime<Utc>)>,
}

impl Unchanged {
    /// The SQL condition that leaves these events out.
    fn filter(&self) -> String {
        let ranges: Vec<String> =
            self.windows.iter().map(|(lo, hi)| format!("[{},{}]", time_text(*lo), time_text(*hi))).collect();
        format!(
            " and not coalesce(session_id is null and master_id is null and decided_by is null and decided_run <= {}
                               and received_at > {}::timestamptz
                               and (reason = 'missing_key'
                                    or reason = 'no_candidate' and not {}::tstzmultirange @> event_time), false)",
            self.since_run,
            time_literal(self.expire_before),
            crate::pgcopy::Literal::new(&format!("{{{}}}", ranges.join(","))),
        )
    }
}

/// Whether the job has at least `n` pending events.
pub async fn pending_at_least(conn: &mut PgConnection, job: &str, n: usize) -> Result<bool> {
    sqlx::query_scalar(
        "select count(*) >= $2 from (select from events where job = $1 and state = 'pending' limit $2) s",
    )
    .bind(job)
    .bind(n as i64)
    .fetch_one(&mut *conn)
    .await
    .context("counting pending events")
}

/// The top-level metadata keys matching and apply look at: the first segment of every rule
/// key, and the job's group fields, in a stable order, each with whether only the group part
/// needs it (then it is read only with the stored group part: see [`PART_KNOWN`]). Most of an
/// event's metadata is never looked at here.
fn kept_keys(job: &Job) -> Vec<(String, bool)> {
    let rule_keys: std::collections::BTreeSet<&String> =
        job.rules.iter().flat_map(|r| r.keys.iter().filter_map(|k| k.event.first())).collect();
    let keys: std::collections::BTreeSet<&String> = rule_keys.iter().copied().chain(&job.group_fields).collect();
    keys.into_iter().map(|k| (k.clone(), !rule_keys.contains(k))).collect()
}

/// The condition (on an `events` row, given the job's `group_fields_fingerprint` as `{fp}`)
/// under which the stored group part is the one the job's group fields give for the stored
/// target: none for a target other than a call, and for a call, taken with the same group
/// fields. Then neither the group part nor the fields' values are read (about 40% of the read's
/// time in PostgreSQL): a decision that keeps its call keeps its group part, and one that
/// changes has it taken from the metadata by the statement that stores it (`group_part_sql!`).
const PART_KNOWN: &str = "(target_kind is distinct from 'call' or group_fields_fingerprint = {fp})";

/// The columns every read of events to decide selects, in this order, before one column per
/// kept metadata key: that key's value as JSON text, extracted by PostgreSQL (null when the
/// event has no such key): whole metadata is never read or parsed here.
const TO_DECIDE: &str = "id, session_id, event_time, received_at, target_kind, target_id, rule, state, reason,
                         array_to_json(coalesce(candidates, '{}'))::text,
                         case when {known} then null else group_part::text end, master_id";
const TO_DECIDE_FIELDS: usize = 12;

/// The stored events in `scope`, in (EventTime, id) order, with only the metadata keys
/// matching and apply look at (extracted by PostgreSQL), handed out a page at a time. Both
/// ways read with binary COPY, decoded here (rows fetched through sqlx cost three times
/// PostgreSQL's own time).
///
/// - A rematch's scope (every rule-decided event of a period, in the order of the events' time
///   index): a COPY per page, the next `limit` after the last one read, so memory holds a page.
/// - The pending events of a run: one COPY of them all into an unnamed temporary file, decoded
///   from it a page at a time, so they are found and sorted once, not once a page.
pub struct InScope {
    keep: Vec<(String, bool)>,
    source: Source,
}

enum Source {
    Pages {
        select: String,
        /// The condition of `select`.
        filter: String,
        after: Option<(DateTime<Utc>, i64)>,
        done: bool,
    },
    File {
        file: std::io::BufReader<std::fs::File>,
        reader: crate::pgcopy::RowReader,
        decoded: std::collections::VecDeque<ToDecide<'static>>,
        done: bool,
    },
}

impl InScope {
    /// Starts reading `scope` (for the pending events: reads them all into a temporary file,
    /// deleted when this is dropped).
    pub async fn open(conn: &mut PgConnection, job: &Job, scope: Scope) -> Result<InScope> {
        use crate::pgcopy::Literal;
        use futures_util::TryStreamExt as _;
        use std::io::{Seek, Write};
        let keep = kept_keys(job);
        // COPY takes no bind parameters: names and times go in as literals, numbers as numbers.
        let known = PART_KNOWN.replace("{fp}", &Literal::new(&job.group_fields_fingerprint).to_string());
        let extract: String = keep
            .iter()
            .map(|(k, part_only)| match part_only {
                false => format!(", (metadata -> {})::text", Literal::new(k)),
                true => format!(", case when {known} then null else (metadata -> {})::text end", Literal::new(k)),
            })
            .collect();
        let columns = TO_DECIDE.replace("{known}", &known);
        let condition = |filter: &str| format!("job = {} and {filter}", Literal::new(&job.name));
        let select = |filter: &str| format!("select {columns}{extract} from events where {}", condition(filter));
        let source = match scope {
            Scope::Rematch { since, until } => {
                let mut f = "session_id is null and master_id is null and decided_by is null".to_owned();
                if let Some(since) = since {
                    f.push_str(&format!(" and event_time >= {}::timestamptz", time_literal(since)));
                }
                if let Some(until) = until {
                    f.push_str(&format!(" and event_time < {}::timestamptz", time_literal(until)));
                }
                Source::Pages { select: select(&f), filter: condition(&f), after: None, done: false }
            }
            Scope::Pending { run_id, unchanged } => {
                let mut filter = format!("state = 'pending' and decided_run is distinct from {run_id}");
                if let Some(unchanged) = &unchanged {
                    filter.push_str(&unchanged.filter());
                }
                // A column more: whether the event is staged (in `callrecon_backlog`).
                let mut select = format!("select {columns}{extract}, false from events where {}", condition(&filter));
                if staged_backlog(conn).await? {
                    // Staged events have no decision yet, and every kept key is read (their group
                    // part is built from them); their decisions are stored by id.
                    let all: String =
                        keep.iter().map(|(k, _)| format!(", (metadata -> {})::text", Literal::new(k))).collect();
                    select.push_str(&format!(
                        " union all
                         select id, session_id, event_time, received_at, null, null, null, 'pending', null, '[]', '{{}}',
                                master_id{all}, true
                         from pg_temp.callrecon_backlog"
                    ));
                    sqlx::query("create index on pg_temp.callrecon_backlog (id)")
                        .execute(&mut *conn)
                        .await
                        .context("indexing the staged backlog")?;
                }
                let sql = format!("copy ({select} order by event_time, id) to stdout (format binary)");
                let mut file = tempfile::tempfile().context("creating a temporary file for the events to match")?;
                {
                    let mut out = std::io::BufWriter::with_capacity(1 << 16, &mut file);
                    let mut stream = conn.copy_out_raw(&sql).await.context("reading events to match")?;
                    while let Some(chunk) = stream.try_next().await.context("reading events to match")? {
                        out.write_all(&chunk).context("writing the events to match to a temporary file")?;
                    }
                    out.flush().context("writing the events to match to a temporary file")?;
                }
                file.rewind()?;
                Source::File {
                    file: std::io::BufReader::with_capacity(1 << 16, file),
                    reader: crate::pgcopy::RowReader::new(TO_DECIDE_FIELDS + keep.len() + 1),
                    decoded: Default::default(),
                    done: false,
                }
            }
        };
        Ok(InScope { keep, source })
    }

    /// Whether [`InScope::next`] reads from the database (a rematch's pages, a COPY each), not
    /// from the temporary file: then it can read on another connection than the run's.
    pub fn reads_database(&self) -> bool {
        matches!(self.source, Source::Pages { .. })
    }

    /// The EventTimes of the first and the `n`th of the next events (of the last when fewer),
    /// without reading them: from the time index, for a rematch's pages; `None` when there are
    /// no more, and for pending events (their COPY into the file has read them all).
    pub async fn next_span(&self, conn: &mut PgConnection, n: usize) -> Result<Option<(DateTime<Utc>, DateTime<Utc>)>> {
        let Source::Pages { filter, after, done: false, .. } = &self.source else {
            return Ok(None);
        };
        let sql = format!(
            "select min(event_time), max(event_time)
             from (select event_time from events where {filter}{} order by event_time, id limit {n}) s",
            after_sql(*after)
        );
        let (first, last): (Option<DateTime<Utc>>, Option<DateTime<Utc>>) =
            sqlx::query_as(sqlx::AssertSqlSafe(sql)).fetch_one(conn).await.context("reading the next events' times")?;
        Ok(first.zip(last))
    }

    /// The next `limit` events (fewer at the end, none after it).
    pub async fn next(&mut self, conn: &mut PgConnection, limit: usize) -> Result<Vec<ToDecide<'static>>> {
        let keep = &self.keep;
        match &mut self.source {
            Source::Pages { select, after, done, .. } => {
                if *done {
                    return Ok(Vec::new());
                }
                let sql = format!(
                    "copy ({select}{} order by event_time, id limit {limit}) to stdout (format binary)",
                    after_sql(*after)
                );
                // Its whole size at once: grown by doubling, a page is copied into ever larger
                // buffers, each in fresh pages the kernel zeroes first.
                let mut page = Vec::with_capacity(limit);
                crate::pgcopy::for_each_row(conn, &sql, TO_DECIDE_FIELDS + keep.len(), |f| {
                    page.push(decode_to_decide(f, keep)?);
                    Ok(())
                })
                .await
                .context("reading events to match")?;
                *done = page.len() < limit;
                *after = page.last().map(|e| (e.subject.time, e.subject.id));
                Ok(page)
            }
            Source::File { file, reader, decoded, done } => {
                use std::io::BufRead;
                while decoded.len() < limit && !*done {
                    let chunk = file.fill_buf().context("reading the events to match back")?;
                    if chunk.is_empty() {
                        *done = true;
                        std::mem::replace(reader, crate::pgcopy::RowReader::new(0)).finish()?;
                        break;
                    }
                    let n = chunk.len();
                    reader.feed(chunk, |f| {
                        decoded.push_back(decode_to_decide(f, keep)?);
                        Ok(())
                    })?;
                    file.consume(n);
                }
                let n = limit.min(decoded.len());
                let page = decoded.drain(..n).collect();
                // What is left is less than a chunk's rows: without this the queue would keep a
                // page's capacity beside the page handed out (459 against 318 MiB at 1M).
                decoded.shrink_to_fit();
                Ok(page)
            }
        }
    }
}

/// The condition that leaves out a rematch's events up to the last one read, `after`.
fn after_sql(after: Option<(DateTime<Utc>, i64)>) -> String {
    match after {
        None => String::new(),
        Some((t, id)) => {
            let t = time_literal(t);
            format!(" and event_time >= {t}::timestamptz and (event_time, id) > ({t}::timestamptz, {id})")
        }
    }
}

/// Whether this run staged a backlog (`callrecon_backlog` exists on its connection).
async fn staged_backlog(conn: &mut PgConnection) -> Result<bool> {
    sqlx::query_scalar("select to_regclass('pg_temp.callrecon_backlog') is not null")
        .fetch_one(&mut *conn)
        .await
        .context("looking for a staged backlog")
}

/// A time as a literal for COPY's SQL text.
fn time_literal(t: DateTime<Utc>) -> crate::pgcopy::Literal {
    crate::pgcopy::Literal::new(&time_text(t))
}

fn time_text(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
}

/// An event to decide from its fields in the binary form of [`InScope`]'s COPY (for pending
/// events, one field more: whether it is staged).
fn decode_to_decide(f: &[Option<&[u8]>], keep: &[(String, bool)]) -> Result<ToDecide<'static>> {
    use crate::pgcopy::{datetime, int8, text};
    let id = int8(f[0].context("an event without an id")?)?;
    let opt = |i: usize| -> Result<Option<String>> { f[i].map(|b| text(b).map(str::to_owned)).transpose() };
    let req = |i: usize| -> Result<&str> { text(f[i].with_context(|| format!("event {id}: a null column"))?) };
    let time = |i: usize| -> Result<DateTime<Utc>> {
        datetime(f[i].with_context(|| format!("event {id}: a null time"))?).with_context(|| format!("event {id}"))
    };
    // Sized for the kept keys: a map grown one key at a time keeps room for more (bytes per
    // event, over a page held twice during a rematch).
    let mut metadata = Map::with_capacity(keep.len());
    for (i, (key, _)) in keep.iter().enumerate() {
        if let Some(b) = f[TO_DECIDE_FIELDS + i] {
            let value = serde_json::from_str(text(b)?).with_context(|| format!("metadata of event {id}"))?;
            metadata.insert(key.clone(), value);
        }
    }
    let state = req(7)?;
    let kind = opt(4)?;
    let reason = opt(8)?;
    Ok(ToDecide {
        subject: Subject {
            id,
            address: Address::from_parts(opt(1)?, opt(11)?),
            time: time(2)?,
            metadata: Cow::Owned(metadata),
        },
        received_at: time(3)?,
        previous: Previous {
            target: kind.as_deref().and_then(TargetKind::parse).zip(opt(5)?),
            rule: opt(6)?,
            state: State::parse(state).with_context(|| format!("event {id} has state {state:?}"))?,
            reason: reason.as_deref().and_then(Reason::parse),
            candidates: serde_json::from_str(req(9)?).with_context(|| format!("candidates of event {id}"))?,
            group_part: opt(10)?
                .map(|p| serde_json::from_str(&p).with_context(|| format!("group part of event {id}")))
                .transpose()?,
            staged: f.get(TO_DECIDE_FIELDS + keep.len()).copied().flatten() == Some(&[1][..]),
        },
    })
}
