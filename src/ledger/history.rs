//! Every change of a decision (`event_history`, append-only) and the decisions not made by a
//! run's matching: manual ones and those an undo restores (`write_decisions`), read back as
//! `Decided` (`history`, `changes_of_run`, `read_events`).

use anyhow::{Context, Result};
use chrono::{DateTime, Utc};
use sqlx::PgConnection;

use super::part::group_part_sql;
use crate::decision::{MANUAL_RULE, Reason, State, TargetKind};

/// Events stored per statement.
pub const STORE_CHUNK: usize = 10_000;

/// Before events' decisions are replaced: the first decision of each that has no history yet,
/// as its history's first row (when, by which run: the run's start).
///
/// A run's first decision of an event is recorded only in the event's row, not in
/// `event_history`: a nightly writes one history row per *replaced* decision, and a new event's
/// first decision replaces none (so a nightly's new events write no history, keeping the
/// history within its share of the nightly: bench/RESULTS.md). So an event without history rows has had
/// one decision, its current one, made by its `decided_run` (none: undecided); the first time
/// it is replaced, it is copied here first. [`history`] and [`changes_of_run`] read it there.
pub(super) async fn keep_first_decisions(conn: &mut PgConnection, ids: &[i64]) -> Result<()> {
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
    pub reason: Option<Reason>,
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
            reason: match reason {
                Some(r) => Some(Reason::parse(&r).with_context(|| format!("unknown reason {r:?}"))?),
                None => None,
            },
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
        .bind(col(|d| d.reason.map(|r| r.as_str().to_owned())))
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
