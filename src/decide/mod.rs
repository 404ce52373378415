//! The decide stage: a run's events to decisions. This run's new events are decided in memory
//! when they fit in a page ([`Stage::fresh`]); stored ones (pending from earlier runs, a
//! backlog, a rematch's period) are read, decided and their changed decisions stored a page at a
//! time ([`Stage::stored`]); an undo reverts a run's decisions ([`Stage::undo`]). Every decision
//! is booked in a [`Tally`], which hands apply its inputs ([`ToApply`]) and the report its counts
//! and a rematch's [`Diff`].
//!
//! Matching ([`crate::matching`]) decides; this stage chooses what to decide, in which order,
//! and writes the outcome through the ledger.

mod diff;
mod pages;
mod tally;
mod undo;

pub use diff::{Change, ChangeKind, Diff, RuleDiff, TargetRef};
pub use tally::ToApply;
pub use undo::{UNDO_SKIPPED_LISTED, UndoReport, UndoSkipped};

use std::collections::BTreeMap;

use anyhow::Result;
use chrono::{DateTime, Utc};
use sqlx::{PgConnection, PgPool};

use crate::job::Job;
use crate::ledger::{Arrivals, DecisionRows, Fresh, Scope, ToDecide, Write};
use crate::matching::{self, Pass, Reads};
use crate::tuning::Tuning;
use pages::Pages;
use tally::Tally;

/// The decide stage of one run.
pub struct Stage<'a> {
    /// For reads on other connections than the run's (call groups, the next page).
    pool: &'a PgPool,
    job: &'a Job,
    tuning: &'a Tuning,
    run_id: i64,
    tally: Tally,
    times: Times,
}

/// What the decide stage hands on: apply's inputs, and the report's counts.
pub struct Decided {
    pub to_apply: ToApply,
    /// Events this run matched that were not matched before, in all and per rule.
    pub matched: u64,
    pub by_rule: BTreeMap<String, u64>,
    /// A rematch's changes.
    pub diff: Option<Diff>,
}

impl<'a> Stage<'a> {
    /// Unmatched events received before `expired_before` are expired; a rematch keeps a diff.
    pub fn new(
        pool: &'a PgPool,
        job: &'a Job,
        tuning: &'a Tuning,
        run_id: i64,
        expired_before: DateTime<Utc>,
        rematch: bool,
    ) -> Self {
        let tally = Tally::new(expired_before, rematch, tuning.page_events());
        Stage { pool, job, tuning, run_id, tally, times: Times::default() }
    }

    /// Decides the ingested events still waiting in memory (less than a page: a backlog was
    /// stored pending and is decided by [`Stage::stored`]), to be stored with their decision just
    /// before apply ([`Fresh::store`]).
    pub async fn fresh(&mut self, conn: &mut PgConnection, arrivals: Arrivals) -> Result<Option<Fresh>> {
        self.times.store_ms += arrivals.store_ms;
        let events = arrivals.into_waiting();
        if events.is_empty() {
            return Ok(None);
        }
        // Until they are stored they have no id: their position stands in for it.
        let to_decide: Vec<ToDecide> = events.iter().enumerate().map(|(i, e)| ToDecide::fresh(i as i64, e)).collect();
        let t = std::time::Instant::now();
        let reads = self.reads(Pass::Run);
        let matching::Decisions { decisions, hints, .. } =
            matching::decide(conn, reads, &to_decide, Default::default()).await?;
        self.times.match_ms += t.elapsed().as_millis() as u64;
        self.times.events += to_decide.len();
        let mut rows = DecisionRows::default();
        for (e, decision) in to_decide.iter().zip(&decisions) {
            let expired = self.tally.book(e, decision);
            rows.push(e, decision, expired, &self.job.group_fields, Write::Always);
        }
        self.tally.keep_hints(hints);
        drop(to_decide);
        tracing::debug!(events = events.len(), "new events decided");
        Ok(Some(Fresh { rows, events }))
    }

    /// Decides every stored event in `scope` (for a run, those pending from earlier runs and a
    /// backlog this run stored pending; events [`Stage::fresh`] decided are not stored yet) and
    /// stores the decisions that changed.
    ///
    /// Events are read, decided and stored a page at a time in (EventTime, id) order, so memory
    /// does not grow with the number of events in scope; only the tally is kept across pages.
    pub async fn stored(&mut self, conn: &mut PgConnection, scope: Scope) -> Result<()> {
        // Where matched calls are helps apply start: worth reading for pending events, which a
        // run decides for the first time or which find their call now; a rematch confirms most
        // of its matches, and apply finds the few calls it touches by id.
        let pass = match scope {
            Scope::Pending { .. } => Pass::Run,
            Scope::Rematch { .. } => Pass::Rematch,
        };
        let reads = self.reads(pass);
        let t = std::time::Instant::now();
        let (mut pages, mut page) = Pages::open(conn, reads, scope, self.tuning.page_events()).await?;
        // For a rematch, the first page's read and the first chunk's calls beside it: the time
        // before matching can start.
        self.times.read_ms += t.elapsed().as_millis() as u64;
        while !page.events.is_empty() {
            self.times.events += page.events.len();
            self.times.read += page.events.len();
            pages.read_ahead(&mut page);
            let t = std::time::Instant::now();
            let matching::Decisions { decisions, hints, ahead } =
                matching::decide(conn, reads, &page.events, page.ahead).await?;
            self.times.match_ms += t.elapsed().as_millis() as u64;
            self.store_changed(conn, &page.events, &decisions, hints).await?;
            let t = std::time::Instant::now();
            page = pages.next(conn).await?;
            // The calls read for the next page's first chunk while this page's last was matched.
            page.ahead.calls = ahead;
            self.times.read_ms += t.elapsed().as_millis() as u64;
        }
        Ok(())
    }

    /// Books a page's decisions and stores those that changed, each with its history row.
    async fn store_changed(
        &mut self,
        conn: &mut PgConnection,
        events: &[ToDecide<'_>],
        decisions: &[crate::decision::Decision],
        hints: foldhash::HashMap<String, crate::calldata::Hint>,
    ) -> Result<()> {
        let mut rows = DecisionRows::default();
        for (e, decision) in events.iter().zip(decisions) {
            let expired = self.tally.book(e, decision);
            if rows.push(e, decision, expired, &self.job.group_fields, Write::IfChanged) {
                self.tally.recompute_target(decision);
            }
        }
        self.tally.keep_hints(hints);
        let t = std::time::Instant::now();
        rows.store(conn, self.run_id, self.job).await?;
        self.times.store_ms += t.elapsed().as_millis() as u64;
        self.times.stored += rows.id.len();
        self.tally.rewrote(&rows.id);
        Ok(())
    }

    /// Reverts the decisions run `run` made that are still as it left them.
    pub async fn undo(&mut self, conn: &mut PgConnection, run: i64) -> Result<UndoReport> {
        undo::undo(conn, self.job, run, self.run_id, &mut self.tally).await
    }

    /// A rematch's count of events in its scope kept as they are: decided by hand.
    pub fn kept_manual(&mut self, n: u64) {
        self.tally.kept_manual(n);
    }

    /// Ends the stage: its times logged, its outcome handed on.
    pub fn finish(mut self) -> Decided {
        self.times.log();
        let (matched, by_rule) = (self.tally.matched, std::mem::take(&mut self.tally.by_rule));
        let (to_apply, diff) = self.tally.into_parts();
        Decided { to_apply, matched, by_rule, diff }
    }

    fn reads(&self, pass: Pass) -> Reads<'a> {
        Reads { pool: self.pool, job: self.job, chunk_events: self.tuning.chunk_events, pass }
    }
}

/// Time spent per step across pages, logged once at the end of the stage.
#[derive(Default, Clone, Copy)]
struct Times {
    /// Events decided (this run's new ones and those read back).
    events: usize,
    /// Events read back from the table.
    read: usize,
    read_ms: u64,
    match_ms: u64,
    store_ms: u64,
    stored: usize,
}

impl Times {
    fn log(self) {
        let Times { events, read, read_ms, match_ms, store_ms, stored } = self;
        tracing::info!(events = read, elapsed_ms = read_ms, "stored events to match read");
        tracing::info!(events, elapsed_ms = match_ms, "matched");
        tracing::info!(stored, elapsed_ms = store_ms, "decisions stored");
    }
}
