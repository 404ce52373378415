//! The match stage for a page of events: their candidates read through `calldata`, then
//! SessionId and MasterId attaches and the rule cascade in polars.

use std::borrow::Borrow;
use std::collections::{HashMap, HashSet};

use anyhow::{Context, Result};
use chrono::{DateTime, Utc};
use serde_json::{Map, Value};
use sqlx::{PgConnection, PgPool};

use super::engine::{self, EventIn};
use crate::calldata::{self, GroupFilter, Hint};
use crate::decision::{Address, Decision, Subject, TargetKind};
use crate::job::Job;
use crate::job::{Normalizer, Target};
use crate::progress;

/// A span of event times: a chunk's first and last sessionless event.
pub type Span = (DateTime<Utc>, DateTime<Utc>);

/// The calls a page's first chunk can match, read while the page before it was matched.
pub struct CallsAhead {
    span: Span,
    calls: (calldata::Candidates, calldata::Placement),
}

/// What a page is decided with besides its events: the calls read ahead for its first chunk,
/// its call groups when whoever read the page read them too ([`groups_for`]), and the span of
/// the next page's first chunk, sent by whoever reads that page (then its calls are read while
/// this page's last chunk is matched).
#[derive(Default)]
pub struct Ahead {
    pub calls: Option<CallsAhead>,
    pub groups: Option<calldata::Candidates>,
    pub next_page: Option<tokio::sync::oneshot::Receiver<Option<Span>>>,
}

/// What `decide` hands back: a decision per event, in their order; where each matched call was
/// when read (for sessionless events, only in a [`Pass::Run`]); the calls read for the next page.
pub struct Decisions {
    pub decisions: Vec<Decision>,
    pub hints: foldhash::HashMap<String, Hint>,
    pub ahead: Option<CallsAhead>,
}

/// Which events are decided, which sets how their calls are read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pass {
    /// A run's events, decided for the first time or retried: where each matched call was is
    /// kept for apply, which recomputes most of them.
    Run,
    /// A rematch's: it confirms most matches (apply finds the few calls it touches by id), and
    /// its chunks read several times more calls, decoded on two connections when there are.
    Rematch,
}

/// What matching reads with: the pool second connections come from, the job, the size of a
/// chunk of sessionless events, and the pass.
#[derive(Clone, Copy)]
pub struct Reads<'a> {
    pub pool: &'a PgPool,
    pub job: &'a Job,
    pub chunk_events: usize,
    pub pass: Pass,
}

impl Reads<'_> {
    /// Whether matched calls' places are read, for apply ([`calldata::load_calls`]).
    fn placed(&self) -> bool {
        self.pass == Pass::Run
    }

    /// The pool to take a second connection for reading calls from ([`calldata::load_calls`]):
    /// a rematch's, on a multi-threaded runtime, where the two halves are decoded at once.
    fn split(&self) -> Option<&PgPool> {
        (multi_threaded() && self.pass == Pass::Rematch).then_some(self.pool)
    }
}

fn multi_threaded() -> bool {
    tokio::runtime::Handle::current().runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread
}

/// A page's events by how they are decided: indices of those with a SessionId, with a MasterId,
/// and the sessionless ones in (EventTime, id) order, cut in chunks.
struct Kinds {
    with_session: Vec<usize>,
    with_master: Vec<usize>,
    sessionless: Vec<usize>,
}

/// Decisions for `events`: SessionId and MasterId attaches, then the rule cascade over the
/// others (sessionless) in time-ordered chunks of `reads.chunk_events`.
pub async fn decide<'e, E: Borrow<Subject<'e>>>(
    conn: &mut PgConnection,
    reads: Reads<'_>,
    events: &[E],
    ahead: Ahead,
) -> Result<Decisions> {
    let events: Vec<&Subject> = events.iter().map(Borrow::borrow).collect();
    let events = events.as_slice();
    let kinds = Kinds {
        with_session: (0..events.len()).filter(|&i| events[i].address.session_id().is_some()).collect(),
        with_master: (0..events.len()).filter(|&i| events[i].address.master_id().is_some()).collect(),
        sessionless: sessionless(events),
    };
    let chunks: Vec<&[usize]> = kinds.sessionless.chunks(reads.chunk_events).collect();
    let Ahead { calls: calls_ahead, groups: groups_ahead, next_page } = ahead;
    // The call groups, unless read with the page, are read on a second connection while the
    // run's connection reads the calls: committed call data either way (the run writes none
    // before apply).
    let groups = page_groups(reads, events, &kinds.sessionless, groups_ahead);
    let first = chunks.first().map(|c| span(events, c));
    let calls = first_reads(conn, reads, events, &kinds, first, calls_ahead);
    let (groups, (by_session, existing_groups, calls)) = tokio::try_join!(groups, calls)?;

    let mut decisions: Vec<Option<Decision>> = vec![None; events.len()];
    let mut hints = foldhash::HashMap::default();
    let attached = super::attach::attach_by_group(
        kinds.with_master.iter().filter_map(|&i| events[i].address.master_id()),
        &existing_groups,
    );
    for (&i, o) in kinds.with_master.iter().zip(attached) {
        decisions[i] = Some(o);
    }
    attach_sessions(events, &kinds.with_session, &by_session, &mut decisions, &mut hints);
    let mut chunked = Chunked { reads, events, groups: &groups, decisions, hints };
    let ahead = if chunks.is_empty() { None } else { chunked.match_chunks(conn, &chunks, calls, next_page).await? };
    Ok(Decisions {
        decisions: chunked.decisions.into_iter().map(|o| o.expect("every event decided")).collect(),
        hints: chunked.hints,
        ahead,
    })
}

/// The call groups the page's sessionless events can match: those read with the page, or read
/// now on another connection.
async fn page_groups(
    reads: Reads<'_>,
    events: &[&Subject<'_>],
    sessionless: &[usize],
    read: Option<calldata::Candidates>,
) -> Result<calldata::Candidates> {
    if let Some(groups) = read {
        return Ok(groups);
    }
    let (_, group_fields) = calldata::fields(reads.job);
    if sessionless.is_empty() || group_fields.is_empty() {
        return Ok(Default::default());
    }
    let metas: Vec<&Map<String, Value>> = sessionless.iter().map(|&i| &*events[i].metadata).collect();
    let mut other = crate::db::begin(reads.pool).await.context("connecting to read call groups")?;
    read_groups(&mut other, reads.job, &group_fields, &metas).await
}

/// What the run's connection reads before matching starts: the calls of the events' SessionIds,
/// the call groups of their MasterIds, and the calls the first chunk (spanning `first`) can
/// match, unless read ahead for that span.
async fn first_reads(
    conn: &mut PgConnection,
    reads: Reads<'_>,
    events: &[&Subject<'_>],
    kinds: &Kinds,
    first: Option<Span>,
    ahead: Option<CallsAhead>,
) -> Result<(HashMap<String, calldata::SessionCall>, HashSet<String>, ChunkCalls)> {
    let sessions: HashSet<&str> = kinds.with_session.iter().filter_map(|&i| events[i].address.session_id()).collect();
    let by_session =
        if sessions.is_empty() { Default::default() } else { calldata::calls_by_session(conn, &sessions).await? };
    let masters: HashSet<&str> = kinds.with_master.iter().filter_map(|&i| events[i].address.master_id()).collect();
    let existing =
        if masters.is_empty() { Default::default() } else { calldata::existing_groups(conn, &masters).await? };
    let calls = match ahead {
        // Read for the same span of event times: the calls this chunk would read now (the run
        // writes no call data before apply).
        Some(read) if Some(read.span) == first => read.calls,
        read => {
            if let Some(read) = read {
                tracing::debug!(ahead = ?read.span, first = ?first, "calls read ahead for another span: read again");
            }
            calls_for(conn, reads, first, 0).await?
        }
    };
    Ok((by_session, existing, calls))
}

/// Attaches the events with a SessionId (`with_session`) to the calls of those sessions, keeping
/// where each matched call was.
fn attach_sessions(
    events: &[&Subject<'_>],
    with_session: &[usize],
    calls: &HashMap<String, calldata::SessionCall>,
    decisions: &mut [Option<Decision>],
    hints: &mut foldhash::HashMap<String, Hint>,
) {
    if with_session.is_empty() {
        return;
    }
    let ids: HashMap<String, String> = calls.iter().map(|(s, c)| (s.clone(), c.id.clone())).collect();
    let attached =
        super::attach::attach_by_session(with_session.iter().filter_map(|&i| events[i].address.session_id()), &ids);
    for (&i, o) in with_session.iter().zip(attached) {
        if let (Decision::Matched { .. }, Some(call)) = (&o, events[i].address.session_id().and_then(|s| calls.get(s)))
        {
            hints.insert(call.id.clone(), call.hint.clone());
        }
        decisions[i] = Some(o);
    }
}

/// The calls of one chunk, and where each was read.
type ChunkCalls = (calldata::Candidates, calldata::Placement);

/// A page's sessionless events being matched chunk by chunk, and what they decided.
struct Chunked<'a, 'e> {
    reads: Reads<'a>,
    events: &'a [&'a Subject<'e>],
    groups: &'a calldata::Candidates,
    decisions: Vec<Option<Decision>>,
    hints: foldhash::HashMap<String, Hint>,
}

impl Chunked<'_, '_> {
    /// Matches the chunks in time order, reading each next chunk's calls while polars matches
    /// this one; after the last chunk, those of the next page's first chunk once its span is
    /// known (`next_page`), handed back to be used for it.
    async fn match_chunks(
        &mut self,
        conn: &mut PgConnection,
        chunks: &[&[usize]],
        mut calls: ChunkCalls,
        mut next_page: Option<tokio::sync::oneshot::Receiver<Option<Span>>>,
    ) -> Result<Option<CallsAhead>> {
        let total = chunks.iter().map(|c| c.len() as u64).sum();
        let pb = progress::bar("match", total, "events");
        let mut read_ahead = None;
        for (k, chunk) in chunks.iter().enumerate() {
            tracing::debug!(
                events = chunk.len(),
                calls = calls.0.ids.len(),
                groups = self.groups.ids.len(),
                "matching chunk"
            );
            pb.set_message(format!("matching against {} calls", calls.0.ids.len()));
            let next_span = chunks.get(k + 1).map(|c| span(self.events, c));
            let next_page = if next_span.is_none() { next_page.take() } else { None };
            let (span, next_calls) = self.match_chunk(conn, chunk, &calls, next_span, next_page).await?;
            pb.inc(chunk.len() as u64);
            match (next_span, span) {
                (None, Some(span)) => read_ahead = Some(CallsAhead { span, calls: next_calls }),
                _ => calls = next_calls,
            }
        }
        pb.finish_and_clear();
        Ok(read_ahead)
    }

    /// Matches one chunk against `calls` and meanwhile reads the calls of the next chunk
    /// (spanning `next_span`) or of the next page's first chunk (its span told by `next_page`):
    /// on a multi-threaded runtime, PostgreSQL formats and sends rows while polars joins.
    async fn match_chunk(
        &mut self,
        conn: &mut PgConnection,
        chunk: &[usize],
        calls: &ChunkCalls,
        next_span: Option<Span>,
        next_page: Option<tokio::sync::oneshot::Receiver<Option<Span>>>,
    ) -> Result<(Option<Span>, ChunkCalls)> {
        let (reads, events, groups, rules) = (self.reads, self.events, self.groups, &self.reads.job.rules);
        let input: Vec<EventIn> = chunk
            .iter()
            .map(|&i| EventIn {
                id: events[i].id,
                time: events[i].time.timestamp_micros(),
                metadata: &events[i].metadata,
            })
            .collect();
        let reads_next = next_span.is_some() || next_page.is_some();
        let expected = calls.0.ids.len();
        let next_calls = async {
            let span = match next_page {
                Some(page) => page.await.ok().flatten(),
                None => next_span,
            };
            let calls = calls_for(&mut *conn, reads, span, expected).await?;
            anyhow::Ok((span, calls))
        };
        // CPU-bound, and polars may block on its own runtime: run it off the async worker.
        let (decided, next_calls) = if multi_threaded() && reads_next {
            let handle = tokio::runtime::Handle::current();
            tokio::task::block_in_place(|| {
                std::thread::scope(|s| {
                    let matching = s.spawn(|| engine::match_events_at(rules, &input, &calls.0, groups));
                    let next_calls = handle.block_on(next_calls);
                    (matching.join(), next_calls)
                })
            })
        } else {
            let decided =
                std::thread::scope(|s| s.spawn(|| engine::match_events_at(rules, &input, &calls.0, groups)).join());
            (decided, next_calls.await)
        };
        let decided = decided
            .map_err(|_| anyhow::anyhow!("the matching thread panicked"))?
            .context("matching sessionless events")?;
        for (&i, (o, at)) in chunk.iter().zip(decided) {
            if let (Decision::Matched { kind: TargetKind::Call, target, .. }, Some(hint)) =
                (&o, at.and_then(|at| calls.1.hint(at as usize)))
            {
                self.hints.insert(target.clone(), hint);
            }
            self.decisions[i] = Some(o);
        }
        next_calls
    }
}

/// The call groups the sessionless events of a page can match, read where the page is read
/// (a rematch's next page, while this one is matched), for [`Ahead::groups`].
pub async fn groups_for<'e, E: Borrow<Subject<'e>>>(
    conn: &mut PgConnection,
    job: &Job,
    events: &[E],
) -> Result<calldata::Candidates> {
    // The filters take the key values as a set: no need for the time order `decide` sorts in.
    let metas: Vec<&Map<String, Value>> =
        events.iter().map(Borrow::borrow).filter(|e| is_sessionless(e)).map(|e| &*e.metadata).collect();
    let (_, group_fields) = calldata::fields(job);
    if metas.is_empty() || group_fields.is_empty() {
        return Ok(Default::default());
    }
    read_groups(conn, job, &group_fields, &metas).await
}

/// The call groups events with the metadata `metas` can match: only those passing the group
/// rules' filters on their key values when the rules allow one ([`group_filters`]).
async fn read_groups(
    conn: &mut PgConnection,
    job: &Job,
    group_fields: &[crate::job::TargetField],
    metas: &[&Map<String, Value>],
) -> Result<calldata::Candidates> {
    let filters = group_filters(job, metas);
    calldata::load_groups(conn, group_fields, filters.as_deref()).await
}

/// Whether the rules decide `event`: it has neither SessionId nor MasterId.
fn is_sessionless(event: &Subject) -> bool {
    event.address == Address::Sessionless
}

/// The indices of `events` the rules decide (neither SessionId nor MasterId), in (EventTime,
/// id) order: the order their chunks are matched in.
fn sessionless(events: &[&Subject]) -> Vec<usize> {
    let mut sessionless: Vec<usize> = (0..events.len()).filter(|&i| is_sessionless(events[i])).collect();
    sessionless.sort_by_key(|&i| (events[i].time, events[i].id));
    sessionless
}

/// The span of event times of a chunk (indices into `events`, in time order).
fn span(events: &[&Subject], chunk: &[usize]) -> Span {
    (events[chunk[0]].time, events[*chunk.last().expect("non-empty chunk")].time)
}

/// The calls a first chunk spanning `span` can match, read ahead of its page.
pub async fn calls_ahead(conn: &mut PgConnection, reads: Reads<'_>, span: Span) -> Result<CallsAhead> {
    let calls = calls_for(conn, reads, Some(span), 0).await?;
    Ok(CallsAhead { span, calls })
}

/// The calls a chunk of sessionless events spanning `span` can match; none to read without a
/// chunk or when no rule targets calls. For a rematch ([`Reads::split`]), on two connections
/// when a second one is free (idle, or within the pool's size) within a second; on `conn` alone
/// otherwise.
async fn calls_for(
    conn: &mut PgConnection,
    reads: Reads<'_>,
    span: Option<Span>,
    expected: usize,
) -> Result<ChunkCalls> {
    let (fields, _) = calldata::fields(reads.job);
    match span {
        Some((from, to)) if !fields.is_empty() => {
            // Waited for only when one is idle or can be opened: never for another's to be freed.
            let free = |pool: &PgPool| pool.num_idle() > 0 || pool.size() < pool.options().get_max_connections();
            let second = match reads.split().filter(|pool| free(pool)) {
                Some(pool) => crate::db::spare_connection(pool, std::time::Duration::from_secs(1))
                    .await
                    .map_err(|why| tracing::debug!(why, "no second connection to read calls on; reading on one"))
                    .ok(),
                None => None,
            };
            let window = reads.job.max_window();
            calldata::load_calls(conn, second, &fields, (from, to), window, reads.placed(), expected).await
        }
        _ => Ok(Default::default()),
    }
}

/// The filters that let a batch read only the call groups it can match: one per group rule, on
/// its first key. `None` when some group rule cannot be filtered in SQL exactly as the engine
/// normalises (`lower` and `trim` follow Unicode rules in Rust, locale rules in PostgreSQL):
/// then every group is read.
pub fn group_filters(job: &Job, events: &[&Map<String, Value>]) -> Option<Vec<GroupFilter>> {
    let mut filters = Vec::new();
    for rule in job.rules.iter().filter(|r| r.target == Target::CallGroup) {
        let key = &rule.keys[0];
        if matches!(key.normalize, Some(Normalizer::Lower | Normalizer::Trim)) {
            return None;
        }
        let values: HashSet<String> = events.iter().filter_map(|m| engine::event_key(m, key)).collect();
        filters.push(GroupFilter {
            field: key.field.clone(),
            normalize: key.normalize,
            values: values.into_iter().collect(),
        });
    }
    Some(filters)
}
