//! What a report holds: the run (`Report`), its counts (`Summary`), the unmatched events
//! (`Unmatched`), a rematch's diff and an undo's outcome; written as report.json and read back.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;

pub use crate::ingest::{FileEntry, FileStatus};

use super::manual;

use crate::decide::{Diff, UndoReport};
use crate::decision::{RunKind, id_text};
use crate::event::Rejected;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    #[serde(with = "id_text")]
    pub run_id: i64,
    pub job: String,
    pub kind: RunKind,
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

/// What the report knows of the unmatched events without holding them: counts over every one,
/// and the ones `report.html` shows.
#[derive(Debug, Clone, Default)]
pub struct Shown {
    /// Every unmatched event when a reason has at most twice `per_end` of them; else the
    /// oldest and the newest `per_end` of that reason. In `received_at`, id order.
    pub events: Vec<Unmatched>,
    /// Per reason, the events not in `events`.
    pub omitted: BTreeMap<String, u64>,
    /// Per reason, every event.
    pub by_reason: BTreeMap<String, u64>,
    pub total: u64,
    pub expired: u64,
    /// Pending events per `unmatched::AGE_BUCKETS` bucket: by days pending, and by days until they expire.
    pub pending_by_age: Vec<u64>,
    pub expiring_by_age: Vec<u64>,
    /// Top-level metadata keys left without a column of their own in `unmatched.csv`.
    pub csv_keys_left_out: u64,
    /// How many of the oldest and of the newest of a reason `events` holds at most.
    pub per_end: usize,
}

impl Shown {
    pub fn capped(&self) -> bool {
        self.omitted.values().any(|&n| n > 0)
    }
}
