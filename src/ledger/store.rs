//! Storing events and their decisions: ingested events waiting for their decision
//! (`Arrivals`; past a page, a backlog staged in a temporary table), this run's new
//! events stored with their decision (`Fresh`), and the decisions of events read back
//! (`DecisionRows`): a staged event inserted into `events` with its decision, a stored one's
//! changed decision written with its history row in the same statement.

use anyhow::{Context, Result};
use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::PgConnection;

use super::history::{STORE_CHUNK, keep_first_decisions};
use super::part::{group_part, group_part_fields, group_part_sql, same_group_part};
use super::scope::ToDecide;
use crate::decision::{Decision, Reason, State, TargetKind};
use crate::event::NewEvent;
use crate::job::Job;

/// Ingested events on their way into the ledger. Up to a page of them wait in memory, to be
/// decided first and stored once, with their decision. Once they fill a page the run has a
/// backlog: they, and every event ingested after them, are staged right away in the temporary
/// table `callrecon_backlog` (dropped with the run's transaction; no index until the run reads
/// it back, when [`super::InScope`] adds one on `id`; no WAL; each event's id drawn from
/// `events`' sequence as it arrives, so ids follow arrival order) and
/// decided from there with the job's pending events in EventTime order (so a page spans a short
/// stretch of time and holds only its calls, where pages in arrival order would each span the
/// whole backlog), each inserted into `events` once, with its decision. A role without the
/// TEMPORARY privilege on the database stores its backlog pending in `events` instead, and
/// updates each event with its decision.
pub struct Arrivals {
    job: String,
    run_id: i64,
    page: usize,
    waiting: Vec<NewEvent>,
    backlog: Option<Backlog>,
    /// Time spent storing a backlog.
    pub store_ms: u64,
}

/// Where a run's backlog goes.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Backlog {
    Staged,
    Pending,
}

impl Arrivals {
    pub fn new(job: &str, run_id: i64, page: usize) -> Self {
        Arrivals { job: job.to_owned(), run_id, page, waiting: Vec::new(), backlog: None, store_ms: 0 }
    }

    /// Takes ingested events (see [`Arrivals`]).
    pub async fn add(&mut self, conn: &mut PgConnection, events: Vec<NewEvent>) -> Result<()> {
        self.waiting.extend(events);
        if self.backlog.is_none() && self.waiting.len() < self.page {
            return Ok(());
        }
        let t = std::time::Instant::now();
        let backlog = match self.backlog {
            Some(backlog) => backlog,
            None => *self.backlog.insert(open_backlog(conn).await?),
        };
        match backlog {
            Backlog::Staged => stage(conn, &self.waiting).await?,
            Backlog::Pending => store_pending(conn, &self.job, self.run_id, &self.waiting).await?,
        }
        self.store_ms += t.elapsed().as_millis() as u64;
        self.waiting.clear();
        Ok(())
    }

    /// The events waiting (less than a page), to be decided then stored with [`Fresh::store`].
    pub fn into_waiting(self) -> Vec<NewEvent> {
        self.waiting
    }
}

/// Creates `callrecon_backlog` when the run's role may create temporary tables; otherwise the backlog
/// is stored pending.
async fn open_backlog(conn: &mut PgConnection) -> Result<Backlog> {
    let allowed: bool = sqlx::query_scalar("select has_database_privilege(current_database(), 'TEMPORARY')")
        .fetch_one(&mut *conn)
        .await
        .context("checking the privilege to stage a backlog")?;
    if !allowed {
        tracing::warn!(
            "this role may not create temporary tables: the backlog is stored pending, then each event updated with its decision"
        );
        return Ok(Backlog::Pending);
    }
    sqlx::query(
        "create temporary table callrecon_backlog (
             id bigint not null, source text not null, session_id text, event_time timestamptz not null,
             received_at timestamptz not null, metadata jsonb not null, master_id text, digest bytea
         ) on commit drop",
    )
    .execute(&mut *conn)
    .await
    .context("creating the backlog's temporary table")?;
    Ok(Backlog::Staged)
}

/// Stages events of a backlog in `callrecon_backlog`, their ids drawn in the given order.
async fn stage(conn: &mut PgConnection, events: &[NewEvent]) -> Result<()> {
    for chunk in events.chunks(STORE_CHUNK) {
        let columns = EventColumns::of(chunk)?;
        // The ids are drawn after the sort (volatile output expressions are evaluated in ORDER
        // BY's order).
        let statement = sqlx::query(
            "insert into pg_temp.callrecon_backlog (id, source, session_id, event_time, received_at, metadata, master_id, digest)
             select nextval(pg_get_serial_sequence('events', 'id')), s, sid, t, r, m::jsonb, mid, dg
             from unnest($1::text[], $2::text[], $3::timestamptz[], $4::timestamptz[], $5::text[], $6::text[],
                         $7::bytea[])
                  with ordinality as u(s, sid, t, r, m, mid, dg, ord)
             order by ord",
        );
        columns.bind(statement).bind(&columns.digest).execute(&mut *conn).await.context("staging the backlog")?;
    }
    Ok(())
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
            session: events.iter().map(|e| e.event.address.session_id()).collect(),
            time: events.iter().map(|e| e.event.event_time).collect(),
            received: events.iter().map(|e| e.received_at).collect(),
            metadata: events.iter().map(|e| serde_json::to_string(&e.event.metadata)).collect::<Result<_, _>>()?,
            master: events.iter().map(|e| e.event.address.master_id()).collect(),
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
/// breaks merge ties). For a backlog that cannot be staged: the run then decides them from the
/// table in EventTime order.
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

/// Decisions as columns, written with one statement per batch.
#[derive(Default, Clone)]
pub struct DecisionRows {
    pub id: Vec<i64>,
    /// Whether the event is staged in `callrecon_backlog` (inserted with its decision), not in
    /// `events`.
    staged: Vec<bool>,
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
        if unchanged && write == Write::IfChanged && !p.staged {
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
        self.staged.push(p.staged);
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

    /// Stores the decisions: a staged event inserted into `events` with its decision, a stored
    /// one updated.
    pub async fn store(&self, conn: &mut PgConnection, run_id: i64, job: &Job) -> Result<()> {
        let staged = self.staged.iter().filter(|s| **s).count();
        if staged == 0 {
            return self.update(conn, run_id, job).await;
        }
        if staged == self.id.len() {
            return self.insert_staged(conn, run_id, job).await;
        }
        self.only(true).insert_staged(conn, run_id, job).await?;
        self.only(false).update(conn, run_id, job).await
    }

    /// The decisions of the staged events (`true`) or of the stored ones.
    fn only(&self, staged: bool) -> DecisionRows {
        let keep: Vec<usize> = (0..self.id.len()).filter(|&i| self.staged[i] == staged).collect();
        fn pick<T: Clone>(v: &[T], keep: &[usize]) -> Vec<T> {
            keep.iter().map(|&i| v[i].clone()).collect()
        }
        DecisionRows {
            id: pick(&self.id, &keep),
            staged: pick(&self.staged, &keep),
            state: pick(&self.state, &keep),
            kind: pick(&self.kind, &keep),
            target: pick(&self.target, &keep),
            rule: pick(&self.rule, &keep),
            group_part: pick(&self.group_part, &keep),
            reason: pick(&self.reason, &keep),
            candidates: pick(&self.candidates, &keep),
        }
    }

    /// Inserts staged events into `events` with their decisions, in the order they were pushed,
    /// each with the id drawn when it was staged. No history row: until a decision is replaced,
    /// its event's row is its record ([`keep_first_decisions`]).
    async fn insert_staged(&self, conn: &mut PgConnection, run_id: i64, job: &Job) -> Result<()> {
        debug_assert!(self.group_part.iter().all(Option::is_some), "staged events are read with their group fields");
        for range in (0..self.id.len()).step_by(STORE_CHUNK).map(|s| s..(s + STORE_CHUNK).min(self.id.len())) {
            let statement = sqlx::query(
                "insert into events (id, job, source, session_id, event_time, received_at, metadata, master_id,
                                     ingested_run, digest, state, target_kind, target_id, rule, group_part, reason,
                                     candidates, decided_run, rules_fingerprint, group_fields_fingerprint)
                 select b.id, $1, b.source, b.session_id, b.event_time, b.received_at, b.metadata, b.master_id, $2,
                        b.digest, u.st, u.k, u.tg, u.ru, u.gp::jsonb, u.re,
                        case when u.re is null then null else u.c::text[] end, $2, $3, $12
                 from unnest($4::bigint[], $5::text[], $6::text[], $7::text[], $8::text[], $9::text[], $10::text[],
                             $11::text[])
                      with ordinality as u(id, st, k, tg, ru, gp, re, c, ord)
                 join pg_temp.callrecon_backlog b on b.id = u.id
                 order by u.ord",
            )
            .bind(&job.name)
            .bind(run_id)
            .bind(&job.rules_fingerprint)
            .bind(&self.id[range.clone()]);
            let statement = self.bind_decisions(statement, range.clone()).bind(&job.group_fields_fingerprint);
            let stored = crate::db::with_index_probes(conn, statement).await.context("storing the backlog's events")?;
            anyhow::ensure!(
                stored == range.len() as u64,
                "storing the backlog's events: {stored} of {} found staged",
                range.len()
            );
        }
        Ok(())
    }

    /// Updates stored events with their new decisions.
    async fn update(&self, conn: &mut PgConnection, run_id: i64, job: &Job) -> Result<()> {
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
