//! The record of matches, `events`: every valid event, with its current decision.
//!
//! Architecture invariant: every statement that writes `events` is here (storing new events,
//! pending or with their decision; writing decisions that changed), and so is the read of the
//! events a run decides. Other modules read `events` (apply, the report, `explain`, `verify`),
//! none writes it.

use std::borrow::Cow;

use anyhow::{Context, Result};
use chrono::{DateTime, Utc};
use serde_json::{Map, Value};
use sqlx::PgConnection;

use crate::event::NewEvent;
use crate::job::Job;
use crate::matching::{Decision, Reason, Subject, TargetKind};

/// Events stored per statement.
pub const STORE_CHUNK: usize = 10_000;

/// An event's state in `events.state`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Not matched yet, retried by every run until it expires.
    Pending,
    Matched,
    /// Unmatched past the job's `pending_for`: retried only by a rematch.
    Expired,
    /// Closed out by an analyst (`callrecon resolve … --to dismiss`): final, never expires.
    Dismissed,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Pending => "pending",
            State::Matched => "matched",
            State::Expired => "expired",
            State::Dismissed => "dismissed",
        }
    }

    pub fn parse(s: &str) -> Option<State> {
        [State::Pending, State::Matched, State::Expired, State::Dismissed].into_iter().find(|x| x.as_str() == s)
    }
}

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
                session_id: e.event.session_id.clone(),
                master_id: e.event.master_id.clone(),
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
/// event has no such key). Reading and parsing whole metadata was most of this stage's time.
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
///   from it a page at a time. A query per page found them through the partial index of
///   unmatched events and sorted all of them again for each page (2 s a page at 1M pending).
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
                let sql = format!("copy ({} order by event_time, id) to stdout (format binary)", select(&filter));
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
                    reader: crate::pgcopy::RowReader::new(TO_DECIDE_FIELDS + keep.len()),
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

/// A time as a literal for COPY's SQL text.
fn time_literal(t: DateTime<Utc>) -> crate::pgcopy::Literal {
    crate::pgcopy::Literal::new(&time_text(t))
}

fn time_text(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
}

/// An event to decide from its fields in the binary form of [`InScope`]'s COPY.
fn decode_to_decide(f: &[Option<&[u8]>], keep: &[(String, bool)]) -> Result<ToDecide<'static>> {
    use crate::pgcopy::{datetime, int8, text};
    let id = int8(f[0].context("an event without an id")?)?;
    let opt = |i: usize| -> Result<Option<String>> { f[i].map(|b| text(b).map(str::to_owned)).transpose() };
    let req = |i: usize| -> Result<&str> { text(f[i].with_context(|| format!("event {id}: a null column"))?) };
    let time = |i: usize| -> Result<DateTime<Utc>> {
        datetime(f[i].with_context(|| format!("event {id}: a null time"))?).with_context(|| format!("event {id}"))
    };
    // Sized for the kept keys: grown one key at a time, the bench job's five left room for seven
    // (128 bytes more an event, a page of 300k held twice during a rematch).
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
            session_id: opt(1)?,
            master_id: opt(11)?,
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
        },
    })
}

/// The group part of an event matched to a target of `kind`: its values of the job's
/// `group_fields`, given to the call's group and its other calls. None for an event matched to
/// a group, which gets all of the event.
pub fn group_part(metadata: &Map<String, Value>, kind: TargetKind, group_fields: &[String]) -> Map<String, Value> {
    group_part_fields(kind, group_fields)
        .iter()
        .filter_map(|f| metadata.get(f).map(|v| (f.clone(), v.clone())))
        .collect()
}

/// The fields of [`group_part`] for a target of `kind`.
fn group_part_fields(kind: TargetKind, group_fields: &[String]) -> &[String] {
    if kind == TargetKind::Call { group_fields } else { &[] }
}

/// Whether [`group_part`] with `fields` would equal `stored`, without building it: a rematch
/// asks this of every event it confirms.
fn same_group_part(metadata: &Map<String, Value>, fields: &[String], stored: &Map<String, Value>) -> bool {
    let mut present = 0;
    for (i, f) in fields.iter().enumerate() {
        if fields[..i].contains(f) {
            continue;
        }
        if let Some(v) = metadata.get(f) {
            present += 1;
            if stored.get(f) != Some(v) {
                return false;
            }
        }
    }
    present == stored.len()
}

/// Ingested events on their way into the ledger. Up to a page of them wait in memory, to be
/// decided first and stored once, with their decision (storing them pending and updating them
/// in the same run wrote every new event twice). Once they fill a page the run has a backlog:
/// they, and every event ingested after them, are stored pending right away and decided from
/// the table in EventTime order (pages in arrival order would each span the whole backlog's
/// time range and hold the calls of all of it: 3 GiB for 1.2M events over 60 days).
pub struct Arrivals {
    job: String,
    run_id: i64,
    page: usize,
    waiting: Vec<NewEvent>,
    backlog: bool,
    /// Time spent storing a backlog.
    pub store_ms: u64,
}

impl Arrivals {
    pub fn new(job: &str, run_id: i64, page: usize) -> Self {
        Arrivals { job: job.to_owned(), run_id, page, waiting: Vec::new(), backlog: false, store_ms: 0 }
    }

    /// Takes ingested events (see [`Arrivals`]).
    pub async fn add(&mut self, conn: &mut PgConnection, events: Vec<NewEvent>) -> Result<()> {
        self.waiting.extend(events);
        if self.backlog || self.waiting.len() >= self.page {
            self.backlog = true;
            let t = std::time::Instant::now();
            store_pending(conn, &self.job, self.run_id, &self.waiting).await?;
            self.store_ms += t.elapsed().as_millis() as u64;
            self.waiting.clear();
        }
        Ok(())
    }

    /// The events waiting (less than a page), to be decided then stored with [`Fresh::store`].
    pub fn into_waiting(self) -> Vec<NewEvent> {
        self.waiting
    }
}

/// The columns of new events as `events` stores them, bound in this order by every statement
/// that inserts them: source, session id, EventTime, received at, metadata (JSON text), master id;
/// and the digest ([`crate::event::NewEvent::digest`]), bound last.
struct EventColumns<'e> {
    source: Vec<&'e str>,
    session: Vec<Option<&'e str>>,
    time: Vec<DateTime<Utc>>,
    received: Vec<DateTime<Utc>>,
    metadata: Vec<String>,
    master: Vec<Option<&'e str>>,
    /// Bound apart, after the statement's other parameters.
    digest: Vec<&'e [u8]>,
}

impl<'e> EventColumns<'e> {
    fn of(events: &'e [NewEvent]) -> Result<Self> {
        Ok(EventColumns {
            source: events.iter().map(|e| e.source.as_str()).collect(),
            session: events.iter().map(|e| e.event.session_id.as_deref()).collect(),
            time: events.iter().map(|e| e.event.event_time).collect(),
            received: events.iter().map(|e| e.received_at).collect(),
            metadata: events.iter().map(|e| serde_json::to_string(&e.event.metadata)).collect::<Result<_, _>>()?,
            master: events.iter().map(|e| e.event.master_id.as_deref()).collect(),
            digest: events.iter().map(|e| &e.digest[..]).collect(),
        })
    }

    /// Binds the six columns, in the order above.
    fn bind<'q>(
        &'q self,
        statement: sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>,
    ) -> sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments> {
        let statement = statement.bind(&self.source).bind(&self.session).bind(&self.time).bind(&self.received);
        statement.bind(&self.metadata).bind(&self.master)
    }
}

/// Stores events pending, undecided, in the given order (their ids follow it: arrival order
/// breaks merge ties). For a backlog: the run then decides them from the table in EventTime order.
async fn store_pending(conn: &mut PgConnection, job: &str, run_id: i64, events: &[NewEvent]) -> Result<()> {
    for chunk in events.chunks(STORE_CHUNK) {
        let columns = EventColumns::of(chunk)?;
        let statement = sqlx::query(
            "insert into events (job, source, session_id, event_time, received_at, metadata, master_id, ingested_run,
                                 digest)
             select $1, s, sid, t, r, m::jsonb, mid, $2, dg
             from unnest($3::text[], $4::text[], $5::timestamptz[], $6::timestamptz[], $7::text[], $8::text[],
                         $9::bytea[])
                  with ordinality as u(s, sid, t, r, m, mid, dg, ord)
             order by ord",
        )
        .bind(job)
        .bind(run_id);
        columns.bind(statement).bind(&columns.digest).execute(&mut *conn).await.context("storing events")?;
    }
    Ok(())
}

/// This run's new events, decided, until they are stored.
pub struct Fresh {
    pub rows: DecisionRows,
    pub events: Vec<NewEvent>,
}

impl Fresh {
    /// Each new event matched, with its position (its id will follow it), target kind and id:
    /// what [`Fresh::store`] stores.
    pub fn matched(&self) -> impl Iterator<Item = (usize, &NewEvent, TargetKind, &str)> {
        self.events.iter().enumerate().filter_map(|(i, e)| match (self.rows.kind[i], &self.rows.target[i]) {
            (Some(kind), Some(target)) => Some((i, e, kind, target.as_str())),
            _ => None,
        })
    }

    /// Stores the events with their decisions, in arrival order (their ids follow it: arrival
    /// order breaks merge ties).
    pub async fn store(&self, conn: &mut PgConnection, job: &Job, run_id: i64) -> Result<()> {
        self.rows.insert(conn, job, run_id, &self.events).await
    }
}

/// The group part of the event `e` matched to a call, taken from its stored metadata, the job's
/// group fields being parameter `$11` (as [`group_part`] takes it from the metadata in memory).
macro_rules! group_part_sql {
    () => {
        "(select coalesce(jsonb_object_agg(f, e.metadata -> f), '{}') from unnest($11::text[]) f
          where jsonb_typeof(e.metadata) = 'object' and e.metadata ? f)"
    };
}

/// Decisions as columns, written with one statement per batch.
#[derive(Default)]
pub struct DecisionRows {
    pub id: Vec<i64>,
    state: Vec<&'static str>,
    kind: Vec<Option<TargetKind>>,
    target: Vec<Option<String>>,
    rule: Vec<Option<String>>,
    /// `None`: taken from the stored metadata by the statement that stores the decision (a
    /// stored event read without its group fields).
    group_part: Vec<Option<String>>,
    reason: Vec<Option<&'static str>>,
    candidates: Vec<String>,
}

/// Whether [`DecisionRows::push`] keeps a decision that is the one already stored.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Write {
    /// A stored event: skip it (a rematch that confirms most decisions then writes few rows).
    IfChanged,
    /// A fresh event, stored with its decision whatever it is.
    Always,
}

impl DecisionRows {
    /// Adds the event's new decision (see [`Write`]), and says whether it did; `expired` for an
    /// unmatched event past its job's `pending_for`.
    pub fn push(
        &mut self,
        e: &ToDecide,
        decision: &Decision,
        expired: bool,
        group_fields: &[String],
        write: Write,
    ) -> bool {
        let (state, kind, target, rule, reason, candidates): (_, _, _, _, _, &[String]) = match decision {
            Decision::Matched { rule, kind, target } => {
                (State::Matched, Some(*kind), Some(target), Some(rule), None, &[])
            }
            Decision::Unmatched { reason, candidates } => {
                (if expired { State::Expired } else { State::Pending }, None, None, None, Some(*reason), candidates)
            }
        };
        let part_fields = match kind {
            Some(kind) => group_part_fields(kind, group_fields),
            None => &[],
        };
        let p = &e.previous;
        let unchanged = state == p.state
            && kind.zip(target).map(|(k, t)| (k, t.clone())) == p.target
            && rule == p.rule.as_ref()
            && reason == p.reason
            && candidates == p.candidates.as_slice()
            && match &p.group_part {
                Some(stored) => same_group_part(&e.subject.metadata, part_fields, stored),
                // The one the group fields give for the stored target's kind, from the same
                // metadata: the same for the same kind.
                None => kind == p.target.as_ref().map(|(k, _)| *k),
            };
        if unchanged && write == Write::IfChanged {
            return false;
        }
        let part = match (kind, &p.group_part) {
            (Some(kind), Some(_)) => {
                Some(Value::Object(group_part(&e.subject.metadata, kind, group_fields)).to_string())
            }
            // Read without the group fields: the statement storing it takes them.
            (Some(_), None) if !part_fields.is_empty() => None,
            _ => Some("{}".to_owned()),
        };
        self.id.push(e.subject.id);
        self.state.push(state.as_str());
        self.kind.push(kind);
        self.target.push(target.cloned());
        self.rule.push(rule.cloned());
        self.group_part.push(part);
        self.reason.push(reason.map(Reason::as_str));
        // A Postgres array literal, bound as a parameter; ids are quoted.
        let quoted: Vec<String> =
            candidates.iter().map(|c| format!("\"{}\"", c.replace('\\', "\\\\").replace('"', "\\\""))).collect();
        self.candidates.push(format!("{{{}}}", quoted.join(",")));
        true
    }

    /// Inserts `events` (this run's fresh ones, in the order they were pushed) with their
    /// decisions; ids are assigned in that order.
    async fn insert(&self, conn: &mut PgConnection, job: &Job, run_id: i64, events: &[NewEvent]) -> Result<()> {
        debug_assert_eq!(self.id.len(), events.len());
        debug_assert!(self.group_part.iter().all(Option::is_some), "fresh events have all their metadata");
        for start in (0..events.len()).step_by(STORE_CHUNK) {
            let range = start..(start + STORE_CHUNK).min(events.len());
            let columns = EventColumns::of(&events[range.clone()])?;
            // No history row: until a decision is replaced, its event's row is its record
            // ([`keep_first_decisions`]).
            let statement = sqlx::query(
                "insert into events (job, source, session_id, event_time, received_at, metadata, master_id,
                                     ingested_run, state, target_kind, target_id, rule, group_part, reason,
                                     candidates, decided_run, rules_fingerprint, group_fields_fingerprint, digest)
                 select $1, s, sid, t, r, m::jsonb, mid, $2, st, k, tg, ru, gp::jsonb, re,
                        case when re is null then null else c::text[] end, $2, $3, $17, dg
                 from unnest($4::text[], $5::text[], $6::timestamptz[], $7::timestamptz[], $8::text[], $9::text[],
                             $10::text[], $11::text[], $12::text[], $13::text[], $14::text[], $15::text[], $16::text[],
                             $18::bytea[])
                      with ordinality as u(s, sid, t, r, m, mid, st, k, tg, ru, gp, re, c, dg, ord)
                 order by ord",
            )
            .bind(&job.name)
            .bind(run_id)
            .bind(&job.rules_fingerprint);
            let statement = columns.bind(statement);
            let statement =
                self.bind_decisions(statement, range).bind(&job.group_fields_fingerprint).bind(&columns.digest);
            statement.execute(&mut *conn).await.context("storing events")?;
        }
        Ok(())
    }

    /// Binds the decision columns of `range`: state, kind, target, rule, group part, reason and
    /// candidates, the order both statements take them in.
    fn bind_decisions<'q>(
        &'q self,
        statement: sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>,
        range: std::ops::Range<usize>,
    ) -> sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments> {
        let kinds: Vec<Option<&'static str>> =
            self.kind[range.clone()].iter().map(|k| k.map(TargetKind::as_str)).collect();
        statement
            .bind(&self.state[range.clone()])
            .bind(kinds)
            .bind(&self.target[range.clone()])
            .bind(&self.rule[range.clone()])
            .bind(&self.group_part[range.clone()])
            .bind(&self.reason[range.clone()])
            .bind(&self.candidates[range])
    }

    /// Updates stored events with their new decisions.
    pub async fn store(&self, conn: &mut PgConnection, run_id: i64, job: &Job) -> Result<()> {
        for range in (0..self.id.len()).step_by(20_000).map(|s| s..(s + 20_000).min(self.id.len())) {
            keep_first_decisions(conn, &self.id[range.clone()]).await?;
            // One primary-key probe per decision, not a scan of every event per batch.
            // With each change in the events' history, in the same statement.
            let statement = sqlx::query(concat!(
                "with changed as (
                     update events e set state = u.state, target_kind = u.kind, target_id = u.target, rule = u.rule,
                            group_part = coalesce(u.part::jsonb, ",
                group_part_sql!(),
                "), reason = u.reason,
                            candidates = case when u.reason is null then null else u.cands::text[] end,
                            decided_run = $1, rules_fingerprint = $2, group_fields_fingerprint = $12,
                            decided_by = null, note = null
                     from unnest($3::bigint[], $4::text[], $5::text[], $6::text[], $7::text[], $8::text[], $9::text[], $10::text[])
                          as u(id, state, kind, target, rule, part, reason, cands)
                     where e.id = u.id
                     returning e.id, e.state, e.target_kind, e.target_id, e.rule, e.reason)
                 insert into event_history (event_id, run_id, state, target_kind, target_id, rule, reason)
                 select id, $1, state, target_kind, target_id, rule, reason from changed",
            ))
            .bind(run_id)
            .bind(&job.rules_fingerprint)
            .bind(&self.id[range.clone()]);
            let statement =
                self.bind_decisions(statement, range).bind(&job.group_fields).bind(&job.group_fields_fingerprint);
            crate::db::with_index_probes(conn, statement).await.context("storing match decisions")?;
        }
        Ok(())
    }
}

/// Before events' decisions are replaced: the first decision of each that has no history yet,
/// as its history's first row (when, by which run: the run's start).
///
/// A run's first decision of an event is recorded only in the event's row, not in
/// `event_history`: a nightly writes one history row per *replaced* decision, and a new event's
/// first decision replaces none (writing one for each of a nightly's 50k new events cost more
/// than the 5% of the nightly the history may take). So an event without history rows has had
/// one decision, its current one, made by its `decided_run` (none: undecided); the first time
/// it is replaced, it is copied here first. [`history`] and [`changes_of_run`] read it there.
async fn keep_first_decisions(conn: &mut PgConnection, ids: &[i64]) -> Result<()> {
    sqlx::query(
        "insert into event_history (event_id, at, run_id, state, target_kind, target_id, rule, reason)
         select e.id, coalesce(r.started_at, now()), e.decided_run, e.state, e.target_kind, e.target_id, e.rule,
                e.reason
         from events e left join runs r on r.id = e.decided_run
         where e.id = any($1) and e.decided_run is not null and e.decided_by is null
           and not exists (select 1 from event_history h where h.event_id = e.id)
         order by e.id",
    )
    .bind(ids)
    .execute(&mut *conn)
    .await
    .context("keeping the events' first decisions in their history")?;
    Ok(())
}

/// A decision as the history records it (and an undo restores it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decided {
    pub state: State,
    pub target: Option<(TargetKind, String)>,
    pub rule: Option<String>,
    pub reason: Option<String>,
    /// Who made it by hand (none: the rules did), and their note.
    pub person: Option<String>,
    pub note: Option<String>,
}

impl Decided {
    /// A decision from the columns `events` and `event_history` store it in.
    fn from_columns(
        state: &str,
        kind: Option<String>,
        target: Option<String>,
        rule: Option<String>,
        reason: Option<String>,
        person: Option<String>,
        note: Option<String>,
    ) -> Result<Self> {
        Ok(Decided {
            state: State::parse(state).with_context(|| format!("unknown state {state:?}"))?,
            target: kind.as_deref().and_then(TargetKind::parse).zip(target),
            rule,
            reason,
            person,
            note,
        })
    }

    /// A new event's, before any decision, and a reopened event's.
    pub fn undecided() -> Self {
        Decided { state: State::Pending, target: None, rule: None, reason: None, person: None, note: None }
    }

    /// One line a person reads: `matched call c1 by rule phone`, `pending (no_candidate)`.
    pub fn describe(&self) -> String {
        let by = match (&self.person, &self.note) {
            (Some(p), Some(n)) => format!(" by {p} ({n})"),
            (Some(p), None) => format!(" by {p}"),
            _ => String::new(),
        };
        match (&self.target, self.state) {
            (Some((kind, id)), _) => {
                let how = if self.person.is_some() {
                    String::new()
                } else {
                    format!(" by rule {}", self.rule.as_deref().unwrap_or("?"))
                };
                format!("matched {} {id}{how}{by}", kind.as_str())
            }
            (None, State::Dismissed) => format!("dismissed{by}"),
            (None, state) => match &self.reason {
                Some(r) => format!("{} ({r}){by}", state.as_str()),
                None => format!("{} (undecided){by}", state.as_str()),
            },
        }
    }
}

/// The rule recorded for a manual attach.
pub const MANUAL_RULE: &str = "manual";

/// A stored event as a manual decision needs it: its job and current decision.
pub struct Stored {
    pub id: i64,
    pub job: String,
    pub decided: Decided,
}

/// Reads events by id and locks them until the transaction ends (a run, an undo or another
/// analyst changing one of them meanwhile waits, then sees the change).
pub async fn lock_events(conn: &mut PgConnection, ids: &[i64]) -> Result<Vec<Stored>> {
    read_events(conn, ids, true).await
}

/// Reads events by id, locking them (`for update`) or not.
pub async fn read_events(conn: &mut PgConnection, ids: &[i64], lock: bool) -> Result<Vec<Stored>> {
    type Row = (
        i64,
        String,
        String,
        Option<String>,
        Option<String>,
        Option<String>,
        Option<String>,
        Option<String>,
        Option<String>,
    );
    let sql = if lock {
        "select id, job, state, target_kind, target_id, rule, reason, decided_by, note
         from events where id = any($1) order by id for update"
    } else {
        "select id, job, state, target_kind, target_id, rule, reason, decided_by, note
         from events where id = any($1) order by id"
    };
    let rows: Vec<Row> = sqlx::query_as(sql).bind(ids).fetch_all(&mut *conn).await.context("reading the events")?;
    rows.into_iter()
        .map(|(id, job, state, kind, target, rule, reason, person, note)| {
            let decided = Decided::from_columns(&state, kind, target, rule, reason, person, note)
                .with_context(|| format!("event {id}"))?;
            Ok(Stored { id, job, decided })
        })
        .collect()
}

/// Who changes decisions: a run (run, rematch or undo) or a person.
#[derive(Debug, Clone, Copy)]
pub enum By<'a> {
    Run(i64),
    Person(&'a str),
}

/// Writes decisions made by hand or restored by an undo, with their history rows, in one
/// statement. The group part of an event attached to a call is taken from its metadata (the
/// job's `group_fields`), as a run stores it.
pub async fn write_decisions(
    conn: &mut PgConnection,
    rows: &[(i64, Decided)],
    by: By<'_>,
    group_fields: &[String],
) -> Result<u64> {
    let mut written = 0;
    for chunk in rows.chunks(STORE_CHUNK) {
        let ids: Vec<i64> = chunk.iter().map(|(id, _)| *id).collect();
        let col = |f: fn(&Decided) -> Option<String>| chunk.iter().map(|(_, d)| f(d)).collect::<Vec<_>>();
        let states: Vec<&str> = chunk.iter().map(|(_, d)| d.state.as_str()).collect();
        let (run_id, person) = match by {
            By::Run(id) => (Some(id), None),
            By::Person(p) => (None, Some(p)),
        };
        keep_first_decisions(conn, &ids).await?;
        let done = sqlx::query(concat!(
            "with changed as (
                 update events e set state = u.state, target_kind = u.kind, target_id = u.target, rule = u.rule,
                        reason = u.reason, candidates = null, decided_by = u.person, note = u.note,
                        decided_run = coalesce($9, e.decided_run),
                        group_part = case when u.kind = 'call' then ",
            group_part_sql!(),
            " else '{}' end, group_fields_fingerprint = $12
                 from unnest($1::bigint[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[], $8::text[])
                      as u(id, state, kind, target, rule, reason, person, note)
                 where e.id = u.id
                 returning e.id, e.state, e.target_kind, e.target_id, e.rule, e.reason, e.note)
             insert into event_history (event_id, run_id, person, state, target_kind, target_id, rule, reason, note)
             select id, $9, $10, state, target_kind, target_id, rule, reason, note from changed",
        ))
        .bind(&ids)
        .bind(&states)
        .bind(col(|d| d.target.as_ref().map(|(k, _)| k.as_str().to_owned())))
        .bind(col(|d| d.target.as_ref().map(|(_, t)| t.clone())))
        .bind(col(|d| d.rule.clone()))
        .bind(col(|d| d.reason.clone()))
        .bind(col(|d| d.person.clone()))
        .bind(col(|d| d.note.clone()))
        .bind(run_id)
        .bind(person)
        .bind(group_fields)
        .bind(crate::job::group_fields_fingerprint(group_fields))
        .execute(&mut *conn)
        .await
        .context("storing decisions")?;
        written += done.rows_affected();
    }
    Ok(written)
}

/// One change in an event's history.
#[derive(Debug, Clone)]
pub struct HistoryEntry {
    pub at: DateTime<Utc>,
    pub run_id: Option<i64>,
    /// The run's kind (`run`, `rematch`, `undo`) when a run made it.
    pub run_kind: Option<String>,
    pub decided: Decided,
}

/// Every change of event `id`'s decision, oldest first.
pub async fn history(conn: &mut PgConnection, id: i64) -> Result<Vec<HistoryEntry>> {
    type Row = (
        DateTime<Utc>,
        Option<i64>,
        Option<String>,
        Option<String>,
        String,
        Option<String>,
        Option<String>,
        Option<String>,
        Option<String>,
        Option<String>,
    );
    // No history rows: the event's one decision so far is in its row ([`keep_first_decisions`]).
    let rows: Vec<Row> = sqlx::query_as(
        "select at, run_id, kind, person, state, target_kind, target_id, rule, reason, note from (
             select h.id seq, h.at, h.run_id, r.kind, h.person, h.state, h.target_kind, h.target_id, h.rule,
                    h.reason, h.note
             from event_history h left join runs r on r.id = h.run_id
             where h.event_id = $1
             union all
             select 0, coalesce(r.started_at, e.received_at), e.decided_run, r.kind, null, e.state, e.target_kind,
                    e.target_id, e.rule, e.reason, null
             from events e left join runs r on r.id = e.decided_run
             where e.id = $1 and e.decided_run is not null
               and not exists (select 1 from event_history h where h.event_id = e.id)
         ) x order by seq",
    )
    .bind(id)
    .fetch_all(&mut *conn)
    .await
    .context("reading the event's history")?;
    rows.into_iter()
        .map(|(at, run_id, run_kind, person, state, kind, target, rule, reason, note)| {
            let decided = Decided::from_columns(&state, kind, target, rule, reason, person, note)
                .with_context(|| format!("history of event {id}"))?;
            Ok(HistoryEntry { at, run_id, run_kind, decided })
        })
        .collect()
}

/// What an undo of run `run` finds for one event the run changed.
pub enum Undoable {
    /// The event's decision is still the one the run gave it: this is what it was before.
    Revert { event_id: i64, now: Box<Decided>, before: Box<Decided> },
    /// Changed since, by a later run or a person.
    Skipped { event_id: i64, by_run: Option<i64>, by_person: Option<String> },
}

/// The decisions run `run` made, each with what it replaced, or who changed it since.
pub async fn changes_of_run(conn: &mut PgConnection, run: i64) -> Result<Vec<Undoable>> {
    use sqlx::Row as _;
    let rows = sqlx::query(
        "select h.event_id, latest.id = h.id, latest.run_id, latest.person,
                h.state, h.target_kind, h.target_id, h.rule, h.reason, h.note,
                prev.state, prev.target_kind, prev.target_id, prev.rule, prev.reason, prev.person, prev.note
         from event_history h
         cross join lateral (select id, run_id, person from event_history l
                             where l.event_id = h.event_id order by l.id desc limit 1) latest
         left join lateral (select * from event_history p
                            where p.event_id = h.event_id and p.id < h.id order by p.id desc limit 1) prev on true
         where h.run_id = $1
         union all
         -- Decisions the run made that were never replaced: in the events' rows only
         -- (`keep_first_decisions`), each the event's first (before it: undecided).
         select e.id, true, null, null, e.state, e.target_kind, e.target_id, e.rule, e.reason, e.note,
                null, null, null, null, null, null, null
         from events e
         where e.decided_run = $1 and e.decided_by is null
           and not exists (select 1 from event_history h where h.event_id = e.id)
         order by 1",
    )
    .bind(run)
    .fetch_all(&mut *conn)
    .await
    .context("reading the run's decisions")?;
    let text = |r: &sqlx::postgres::PgRow, i: usize| -> Result<Option<String>> { Ok(r.try_get(i)?) };
    rows.iter()
        .map(|r| {
            let event_id: i64 = r.try_get(0)?;
            if !r.try_get::<bool, _>(1)? {
                return Ok(Undoable::Skipped { event_id, by_run: r.try_get(2)?, by_person: text(r, 3)? });
            }
            let state: String = r.try_get(4)?;
            let now =
                Decided::from_columns(&state, text(r, 5)?, text(r, 6)?, text(r, 7)?, text(r, 8)?, None, text(r, 9)?)
                    .with_context(|| format!("history of event {event_id}"))?;
            let before = match text(r, 10)? {
                None => Decided::undecided(),
                Some(state) => {
                    let mut before = Decided::from_columns(
                        &state,
                        text(r, 11)?,
                        text(r, 12)?,
                        text(r, 13)?,
                        text(r, 14)?,
                        text(r, 15)?,
                        text(r, 16)?,
                    )
                    .with_context(|| format!("history of event {event_id}"))?;
                    // Only a manual decision is restored as someone's: a person who reopened
                    // an event left it to the rules.
                    if before.state != State::Dismissed && before.rule.as_deref() != Some(MANUAL_RULE) {
                        (before.person, before.note) = (None, None);
                    }
                    before
                }
            };
            Ok(Undoable::Revert { event_id, now: Box::new(now), before: Box::new(before) })
        })
        .collect()
}

/// How many of the job's events analysts dismissed.
pub async fn count_dismissed(conn: &mut PgConnection, job: &str) -> Result<u64> {
    let n: i64 = sqlx::query_scalar("select count(*) from events where job = $1 and state = 'dismissed'")
        .bind(job)
        .fetch_one(&mut *conn)
        .await
        .context("counting dismissed events")?;
    Ok(n as u64)
}

/// How many events of a rematch's scope hold a manual decision (kept as they are).
pub async fn count_manual_in(
    conn: &mut PgConnection,
    job: &str,
    since: Option<DateTime<Utc>>,
    until: Option<DateTime<Utc>>,
) -> Result<u64> {
    let n: i64 = sqlx::query_scalar(
        "select count(*) from events
         where job = $1 and session_id is null and decided_by is not null
           and ($2::timestamptz is null or event_time >= $2) and ($3::timestamptz is null or event_time < $3)",
    )
    .bind(job)
    .bind(since)
    .bind(until)
    .fetch_one(&mut *conn)
    .await
    .context("counting manual decisions")?;
    Ok(n as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `same_group_part` answers what building the group part and comparing it would.
    #[test]
    fn same_group_part_is_group_part_compared() {
        let map = |text: &str| -> Map<String, Value> { serde_json::from_str(text).unwrap() };
        let metadata = map(r#"{"tier": "gold", "acct": 7, "other": true}"#);
        let stored = [
            "{}",
            r#"{"tier": "gold"}"#,
            r#"{"acct": 7, "tier": "gold"}"#,
            r#"{"tier": "gold", "acct": 7}"#,
            r#"{"tier": "gold", "acct": 8}"#,
            r#"{"tier": "gold", "acct": 7, "gone": 1}"#,
        ];
        let fields: [&[&str]; 5] = [&[], &["tier"], &["tier", "acct"], &["tier", "acct", "tier"], &["missing", "tier"]];
        for f in fields {
            let f: Vec<String> = f.iter().map(|s| s.to_string()).collect();
            for s in stored {
                let s = map(s);
                let built = group_part(&metadata, TargetKind::Call, &f);
                assert_eq!(same_group_part(&metadata, &f, &s), built == s, "fields {f:?}, stored {s:?}");
            }
        }
    }
}
