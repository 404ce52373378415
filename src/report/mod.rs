//! The reconciliation report: `report.json`, `unmatched.csv` and `report.html` in
//! `<report dir>/<run id>/`, and the run history.

pub mod history;
pub mod html;
pub mod manual;
pub mod retention;
pub mod unmatched;
pub mod webhook;

pub use html::render_html;
pub use unmatched::{Shown, escape_cell};

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;

pub use crate::ingest::{FileEntry, FileStatus};

use crate::event::Rejected;
use crate::matching::TargetKind;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    #[serde(with = "id_text")]
    pub run_id: i64,
    pub job: String,
    /// `run`, `rematch` or `undo`.
    pub kind: String,
    pub started_at: DateTime<Utc>,
    pub finished_at: DateTime<Utc>,
    pub dry_run: bool,
    pub summary: Summary,
    /// What `report.html` shows of the unmatched events (all of them up to a cap per reason).
    /// `report.json` and `unmatched.csv` list every one: they are streamed from the database
    /// into the report's folder while the run's transaction is open ([`unmatched::stream`]).
    #[serde(skip)]
    pub unmatched: Shown,
    pub rejected: Vec<Rejected>,
    /// Inbox files this run picked and what became of them.
    pub files: Vec<FileEntry>,
    /// For a rematch: what changed against the previous decisions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub diff: Option<Diff>,
    /// For an undo: what it reverted and what it left.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub undo: Option<UndoReport>,
    /// Decisions analysts made by hand since the job's previous run (the newest
    /// [`manual::LISTED`]; `summary.manual` counts them all).
    #[serde(default)]
    pub manual: Vec<manual::ManualDecision>,
    /// Rule changes without conflicts `callrecon suggest` finds, when analysts decided events by
    /// hand since the job's previous run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub suggested: Option<Suggested>,
}

/// The report's line about suggested rule changes: how many without conflicts, the most events
/// one of them would match more (they often match the same ones), and the command listing them.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Suggested {
    pub changes: u64,
    pub matched_more: u64,
    pub command: String,
}

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

/// What a rematch changed.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Diff {
    /// Events re-evaluated.
    pub evaluated: u64,
    pub newly_matched: u64,
    pub moved: u64,
    pub newly_unmatched: u64,
    /// Same target, now by another rule.
    pub rule_changed: u64,
    pub unchanged: u64,
    /// Events in range decided by hand: a rematch keeps them as they are.
    #[serde(default)]
    pub kept_manual: u64,
    /// Per rule: events it now decides that it did not (`gained`) and the reverse (`lost`).
    pub by_rule: BTreeMap<String, RuleDiff>,
    /// Every event whose target or rule changed.
    pub changes: Vec<Change>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct RuleDiff {
    pub gained: u64,
    pub lost: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Change {
    #[serde(with = "id_text")]
    pub event_id: i64,
    pub change: ChangeKind,
    pub from: Option<TargetRef>,
    pub to: Option<TargetRef>,
    pub rule_before: Option<String>,
    pub rule_after: Option<String>,
    /// For `newly_unmatched`: why.
    pub reason: Option<String>,
}

/// How a rematch changed an event's decision.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ChangeKind {
    NewlyMatched,
    Moved,
    NewlyUnmatched,
    RuleChanged,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TargetRef {
    pub kind: TargetKind,
    pub id: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Summary {
    /// Valid events stored by this run.
    pub ingested: u64,
    /// Records this run refused.
    pub rejected: u64,
    /// Events matched in this run.
    pub matched: u64,
    /// Entries of `unmatched`: still pending, plus expired in this run.
    pub unmatched: u64,
    pub by_rule: BTreeMap<String, u64>,
    pub by_reason: BTreeMap<String, u64>,
    pub expired: u64,
    pub pending: u64,
    pub calls_updated: u64,
    pub groups_updated: u64,
    pub files_ingested: u64,
    pub files_duplicate: u64,
    pub files_failed: u64,
    /// Inbox files still being written (`[sources] settle`), left in the inbox for a later run.
    #[serde(default)]
    pub files_later: u64,
    /// Valid events the job already held (each event once): not stored again, no decision
    /// changed.
    #[serde(default)]
    pub duplicates: u64,
    /// `duplicates` by source: `queue` (the intake API's events too), or the inbox file.
    #[serde(default)]
    pub duplicates_by_source: BTreeMap<String, u64>,
    /// The job's events analysts dismissed (all of them, not only this run's): no longer
    /// pending, never in `unmatched`.
    #[serde(default)]
    pub dismissed: u64,
    /// Decisions analysts made by hand since the job's previous run.
    #[serde(default)]
    pub manual: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Unmatched {
    #[serde(with = "id_text")]
    pub event_id: i64,
    pub source: String,
    pub session_id: Option<String>,
    /// The call group the event is addressed to (`MasterId`); absent from reports written
    /// before MasterId existed.
    #[serde(default)]
    pub master_id: Option<String>,
    pub event_time: DateTime<Utc>,
    pub received_at: DateTime<Utc>,
    /// `unknown_session`, `unknown_group`, `missing_key`, `no_candidate`, `ambiguous`, or `expired`.
    pub reason: String,
    /// For `expired`: the reason it never matched.
    pub last_reason: Option<String>,
    pub candidates: Vec<String>,
    pub metadata: Value,
    /// When it stops being retried (`received_at + pending_for`).
    pub expires_at: DateTime<Utc>,
}

/// Ids that are numbers here and strings in the report's JSON (the contract's form).
pub(crate) mod id_text {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(id: &i64, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(id)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<i64, D::Error> {
        String::deserialize(d)?.parse().map_err(serde::de::Error::custom)
    }
}

/// Where a run's report is written before it is complete: `<report dir>/.<run id>.partial`,
/// renamed to `dir` once every file is in place, so a report folder is either whole or absent.
pub fn partial_dir(dir: &Path) -> PathBuf {
    let name = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    dir.with_file_name(format!(".{name}.partial"))
}

/// Removes what a run that failed left of its report.
pub fn discard_partial(dir: &Path) {
    let partial = partial_dir(dir);
    if partial.exists()
        && let Err(e) = std::fs::remove_dir_all(&partial)
    {
        tracing::warn!(dir = %partial.display(), error = %e, "could not remove a partial report");
    }
}

/// Completes the report in `dir`: `unmatched.csv` and the unmatched list are already in its
/// partial folder ([`unmatched::stream`]); this writes `report.json` around that list and
/// `report.html`, then renames the folder into place.
pub fn write_all(report: &Report, dir: &Path) -> Result<()> {
    let partial = partial_dir(dir);
    std::fs::create_dir_all(&partial).with_context(|| format!("creating {}", partial.display()))?;
    write_json(report, &partial).context("writing report.json")?;
    let csv = partial.join(unmatched::CSV);
    if !csv.exists() {
        // A report built without its stream (no unmatched events were read): a header only.
        unmatched::write_csv_header(&mut std::fs::File::create(&csv)?, &[])?;
    }
    std::fs::write(partial.join("report.html"), render_html(report)?).context("writing report.html")?;
    if dir.exists() {
        // A folder of the same run id from another database: the report of this run replaces it.
        std::fs::remove_dir_all(dir).with_context(|| format!("replacing {}", dir.display()))?;
    }
    std::fs::rename(&partial, dir).with_context(|| format!("renaming {} to {}", partial.display(), dir.display()))
}

/// `report.json`, written a field at a time: one top-level field a line, one entry of
/// `unmatched` and `rejected` a line, the unmatched entries copied from the list streamed
/// earlier. Nothing of the size of the list is held in memory.
fn write_json(report: &Report, partial: &Path) -> Result<()> {
    let mut w = std::io::BufWriter::with_capacity(1 << 16, std::fs::File::create(partial.join("report.json"))?);
    let field = |w: &mut std::io::BufWriter<std::fs::File>, name: &str, v: &dyn erased::Json| -> Result<()> {
        write!(w, "  {}: ", serde_json::to_string(name)?)?;
        v.write(w)?;
        w.write_all(b",\n")?;
        Ok(())
    };
    w.write_all(b"{\n")?;
    field(&mut w, "run_id", &report.run_id.to_string())?;
    field(&mut w, "job", &report.job)?;
    field(&mut w, "kind", &report.kind)?;
    field(&mut w, "started_at", &report.started_at)?;
    field(&mut w, "finished_at", &report.finished_at)?;
    field(&mut w, "dry_run", &report.dry_run)?;
    field(&mut w, "summary", &report.summary)?;
    w.write_all(b"  \"unmatched\": [")?;
    let list = partial.join(unmatched::JSON_LIST);
    if let Ok(mut part) = std::fs::File::open(&list) {
        if part.metadata()?.len() > 0 {
            w.write_all(b"\n")?;
            std::io::copy(&mut part, &mut w)?;
            w.write_all(b"\n  ")?;
        }
        drop(part);
        std::fs::remove_file(&list)?;
    }
    w.write_all(b"],\n  \"rejected\": [")?;
    for (i, r) in report.rejected.iter().enumerate() {
        w.write_all(if i == 0 { b"\n    " } else { b",\n    " })?;
        serde_json::to_writer(&mut w, r)?;
    }
    w.write_all(if report.rejected.is_empty() { b"],\n" } else { b"\n  ],\n" })?;
    field(&mut w, "manual", &report.manual)?;
    if let Some(suggested) = &report.suggested {
        field(&mut w, "suggested", suggested)?;
    }
    if let Some(undo) = &report.undo {
        field(&mut w, "undo", undo)?;
    }
    match &report.diff {
        Some(diff) => {
            field(&mut w, "files", &report.files)?;
            write!(w, "  \"diff\": ")?;
            serde_json::to_writer(&mut w, diff)?;
            w.write_all(b"\n")?;
        }
        None => {
            write!(w, "  \"files\": ")?;
            serde_json::to_writer(&mut w, &report.files)?;
            w.write_all(b"\n")?;
        }
    }
    w.write_all(b"}\n")?;
    w.flush()?;
    Ok(())
}

/// A value written as compact JSON, for [`write_json`]'s fields of different types.
mod erased {
    pub trait Json {
        fn write(&self, w: &mut dyn std::io::Write) -> serde_json::Result<()>;
    }
    impl<T: serde::Serialize> Json for T {
        fn write(&self, w: &mut dyn std::io::Write) -> serde_json::Result<()> {
            serde_json::to_writer(w, self)
        }
    }
}
