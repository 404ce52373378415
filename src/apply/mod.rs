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
//!
//! The stage's parts: [`plan`] (which targets, read in which batches), [`read`] (the batches,
//! on the run's connection or a second one), [`this_run`] (this run's own decisions, which such
//! a reader cannot see), [`merge`] (values computed in memory), [`crate::jsonb`] (values printed
//! as PostgreSQL prints jsonb), [`write`] (only the changed rows, in heap order), and [`types`]
//! (the data they hand each other).

pub mod merge;
pub mod plan;
pub mod read;
pub mod this_run;
pub mod types;
pub mod write;

// foldhash: these maps hash hundreds of thousands of ids per run, where SipHash is costly.
use foldhash::{HashSet, HashSetExt as _};

use std::sync::Arc;

use anyhow::{Context, Result};
use sqlx::{PgConnection, PgPool};

use crate::decide::ToApply;
use crate::job::Job;
use crate::ledger::Fresh;
use crate::tuning::Tuning;

pub use crate::jsonb::jsonb_text;
pub use merge::{call_value, group_value};
pub use plan::{Sizes, Touched};
pub use read::{Merging, Reader};
pub use this_run::ThisRun;
use types::NO_MEMOIZE;
pub use types::{Applied, Contribution, NewValue, Part, Tid, Written};
pub use write::write_values;

/// Apply under way ([`start`]): the run's connection stores this run's new events, then
/// [`Applying::finish`] recomputes and writes.
pub enum Applying {
    /// Everything is read after the new events are stored, on the run's connection.
    After { calls: Vec<String>, groups: Vec<String>, sizes: Sizes },
    /// The touched targets are being read on a second connection and merged with this run's
    /// decisions meanwhile ([`Reader`]).
    Beside(Merging),
}

/// The apply stage of run `run_id`: stores its new events (`fresh`, decided in memory) and
/// recomputes the touched targets, reading them on a second connection
/// meanwhile when it can ([`start`]).
pub async fn run(
    conn: &mut PgConnection,
    pool: &PgPool,
    tuning: &Tuning,
    job: &Job,
    run_id: i64,
    inputs: ToApply,
    fresh: Option<Fresh>,
) -> Result<Applied> {
    let pb = crate::progress::spinner("apply", "targets");
    pb.set_message(format!(
        "recomputing {} calls, {} groups and their group members",
        inputs.calls.len(),
        inputs.groups.len()
    ));
    let fresh = fresh.map(Arc::new);
    let new_events = fresh.as_ref().map_or(0, |f| f.events.len());
    let (adding, group_fields) = (fresh.clone(), job.group_fields.clone());
    // Apply's reader cannot see the new events: they are merged from memory.
    let add_new = move |this_run: &mut ThisRun| {
        for (position, e, kind, target) in adding.iter().flat_map(|f| f.matched()) {
            let part = crate::ledger::group_part(&e.event.metadata, kind, &group_fields);
            this_run.push_new(position, e.event.event_time, &e.event.metadata, &part, kind, target.to_owned());
        }
    };
    let started = std::time::Instant::now();
    let applying = start(conn, pool, tuning, inputs, new_events, add_new).await?;
    if let Some(fresh) = fresh {
        let t = std::time::Instant::now();
        fresh.store(conn, job, run_id).await?;
        tracing::info!(events = fresh.events.len(), elapsed_ms = t.elapsed().as_millis() as u64, "new events stored");
        // Hundreds of thousands of small allocations: freed off the run's path.
        std::thread::spawn(move || drop(fresh));
    }
    if matches!(applying, Applying::Beside(_)) {
        // The mark of a run whose apply reads while its events are stored (tests look for it).
        tracing::debug!(elapsed_ms = started.elapsed().as_millis() as u64, "this run's events stored");
    }
    let applied = applying.finish(conn).await;
    pb.finish_and_clear();
    applied
}

/// Starts applying. When this run rewrote few enough stored decisions to hold their ids (at
/// most `page`), and a second connection is free, the touched targets are read on it while the
/// run's connection stores the new events: PostgreSQL does the nightly's two biggest steps at
/// once. `new_events` adds the run's new matched events (not stored yet) to what that reader
/// cannot see; it runs on another thread. Otherwise everything happens in [`Applying::finish`].
pub async fn start(
    conn: &mut PgConnection,
    pool: &PgPool,
    tuning: &Tuning,
    inputs: ToApply,
    new_matches: usize,
    new_events: impl FnOnce(&mut ThisRun) + Send + 'static,
) -> Result<Applying> {
    let ToApply { calls, groups, hints, rewritten } = inputs;
    let sizes = Sizes::of(tuning);
    let reader = match &rewritten {
        Some(stale) if stale.len() + new_matches <= tuning.page_events() && tuning.apply_reader => {
            crate::db::spare_connection(pool, std::time::Duration::from_secs(2))
                .await
                .map_err(|why| tracing::warn!(why, "no second connection for apply's reads; reading after storing"))
                .ok()
        }
        _ => None,
    };
    let Some(reader) = reader else { return Ok(Applying::After { calls, groups, sizes }) };
    lock(conn).await?;
    let touched = Touched::take_changes(conn, &calls, &groups).await?.with_hints(hints);
    let stale = rewritten.unwrap_or_default();
    let reader = Reader::start(reader, touched, stale.iter().copied().collect(), sizes);
    let this_run = ThisRun::read(conn, &stale).await?;
    Ok(Applying::Beside(reader.merge(this_run, new_events)))
}

impl Applying {
    /// Recomputes the touched targets and writes the values that changed: call after the run's
    /// new events are stored.
    pub async fn finish(self, conn: &mut PgConnection) -> Result<Applied> {
        match self {
            Applying::After { calls, groups, sizes } => apply(conn, &calls, &groups, sizes).await,
            Applying::Beside(merging) => merging.write(conn).await,
        }
    }
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
pub async fn apply(conn: &mut PgConnection, calls: &[String], groups: &[String], sizes: Sizes) -> Result<Applied> {
    let started = std::time::Instant::now();
    lock(conn).await?;
    sqlx::query(NO_MEMOIZE).execute(&mut *conn).await?;
    let touched = Touched::take_changes(conn, calls, groups).await?;
    let mut plan = touched.resolve(conn, sizes).await?;
    let mut out = Written::default();
    let stale = HashSet::new();
    while let Some(batch) = plan.next(conn, &stale).await? {
        out.merge_and_write(conn, batch, &ThisRun::default()).await?;
    }
    sqlx::query("reset enable_memoize").execute(&mut *conn).await?;
    out.finish(conn, started).await
}

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
