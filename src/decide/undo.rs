//! An undo: the decisions a run made that are still as it left them, each reverted to what it
//! was before; the others listed as skipped, with who changed them since.

use anyhow::Result;
use serde::{Deserialize, Serialize};
use sqlx::PgConnection;

use super::Tally;
use crate::job::Job;
use crate::ledger;

/// Skipped events an undo's report lists (it counts them all).
pub const UNDO_SKIPPED_LISTED: usize = 1_000;

/// What an undo did.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct UndoReport {
    /// The run undone.
    pub run: i64,
    /// Decisions reverted to what they were before it.
    pub reverted: u64,
    /// Decisions changed since by a later run or a person, left as they are.
    pub skipped_total: u64,
    pub skipped: Vec<UndoSkipped>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct UndoSkipped {
    pub event_id: i64,
    /// `run N` or the person's name.
    pub changed_by: String,
}

/// Reverts the decisions run `run` made that are still as it left them, written as run
/// `by_run`'s; the targets they leave and return to are booked in `tally`.
pub(super) async fn undo(
    conn: &mut PgConnection,
    job: &Job,
    run: i64,
    by_run: i64,
    tally: &mut Tally,
) -> Result<UndoReport> {
    let mut rows = Vec::new();
    let mut skipped = Vec::new();
    let mut skipped_total = 0;
    for change in ledger::changes_of_run(conn, run).await? {
        match change {
            ledger::Undoable::Revert { event_id, now, before } => {
                tally.touch(&now.target, &before.target);
                rows.push((event_id, *before));
            }
            ledger::Undoable::Skipped { event_id, by_run, by_person } => {
                skipped_total += 1;
                if skipped.len() < UNDO_SKIPPED_LISTED {
                    let by = match (by_run, by_person) {
                        (Some(r), _) => format!("run {r}"),
                        (None, Some(p)) => p,
                        (None, None) => "?".to_owned(),
                    };
                    skipped.push(UndoSkipped { event_id, changed_by: by });
                }
            }
        }
    }
    let ids: Vec<i64> = rows.iter().map(|(id, _)| *id).collect();
    ledger::write_decisions(conn, &rows, ledger::By::Run(by_run), &job.group_fields).await?;
    tally.rewrote(&ids);
    tracing::info!(run, reverted = rows.len(), skipped = skipped_total, "decisions reverted");
    Ok(UndoReport { run, reverted: rows.len() as u64, skipped_total, skipped })
}
