//! Matching: which call or call group each pending event belongs to.
//!
//! Events with a SessionId attach by `session_id` ([`attach_by_session`]), events with a MasterId
//! to the call group of that id ([`attach_by_group`]); the others (sessionless) go through the
//! job's rules ([`engine::match_events`]). [`decide`] is the stage: it reads the
//! candidates of a page of events through [`crate::calldata`] and runs the two.
//!
//! Architecture invariant: only `decide.rs` reads the database, and only through `calldata`;
//! `engine`, `rules` and `explain` are pure, and decisions do not depend on input order.

pub mod decide;
pub mod engine;
pub mod explain;
pub mod rules;

use std::borrow::Cow;
use std::collections::HashMap;

use chrono::{DateTime, Utc};
use serde_json::{Map, Value};

pub use decide::{Ahead, Decided, Span, calls_ahead, decide, groups_for};

/// An event as matching sees it.
#[derive(Debug, Clone)]
pub struct Subject<'e> {
    /// `events.id`, or for an event not stored yet its position in the run's arrivals.
    pub id: i64,
    pub session_id: Option<String>,
    /// The call group the event is addressed to (`MasterId`).
    pub master_id: Option<String>,
    pub time: DateTime<Utc>,
    /// Of an event read back, only the keys matching and apply look at.
    pub metadata: Cow<'e, Map<String, Value>>,
}

/// What a call or call group an event is attached to is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TargetKind {
    Call,
    CallGroup,
}

impl TargetKind {
    pub fn as_str(self) -> &'static str {
        match self {
            TargetKind::Call => "call",
            TargetKind::CallGroup => "call_group",
        }
    }

    pub fn parse(s: &str) -> Option<TargetKind> {
        [TargetKind::Call, TargetKind::CallGroup].into_iter().find(|k| k.as_str() == s)
    }
}

/// Why an event is not matched.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Reason {
    UnknownSession,
    UnknownGroup,
    MissingKey,
    NoCandidate,
    Ambiguous,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::UnknownSession => "unknown_session",
            Reason::UnknownGroup => "unknown_group",
            Reason::MissingKey => "missing_key",
            Reason::NoCandidate => "no_candidate",
            Reason::Ambiguous => "ambiguous",
        }
    }

    pub fn parse(s: &str) -> Option<Reason> {
        [Reason::UnknownSession, Reason::UnknownGroup, Reason::MissingKey, Reason::NoCandidate, Reason::Ambiguous]
            .into_iter()
            .find(|r| r.as_str() == s)
    }
}

/// The decision for one event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Matched { rule: String, kind: TargetKind, target: String },
    Unmatched { reason: Reason, candidates: Vec<String> },
}

/// The rule name recorded for SessionId attaches.
pub const SESSION_RULE: &str = "session_id";

/// The rule name recorded for MasterId attaches (to a call group by its id).
pub const MASTER_RULE: &str = "master_id";

/// Attaches events by SessionId given the calls found for their session ids
/// (`session_id -> call id`); an event whose session has no call yet stays `unknown_session`.
pub fn attach_by_session<'a>(
    session_ids: impl IntoIterator<Item = &'a str>,
    calls: &HashMap<String, String>,
) -> Vec<Decision> {
    session_ids
        .into_iter()
        .map(|s| match calls.get(s) {
            Some(call) => {
                Decision::Matched { rule: SESSION_RULE.to_owned(), kind: TargetKind::Call, target: call.clone() }
            }
            None => Decision::Unmatched { reason: Reason::UnknownSession, candidates: Vec::new() },
        })
        .collect()
}

/// Attaches events by MasterId given which of their groups exist; an event whose group does not
/// exist yet stays `unknown_group`.
pub fn attach_by_group<'a>(
    master_ids: impl IntoIterator<Item = &'a str>,
    groups: &std::collections::HashSet<String>,
) -> Vec<Decision> {
    master_ids
        .into_iter()
        .map(|g| {
            if groups.contains(g) {
                Decision::Matched { rule: MASTER_RULE.to_owned(), kind: TargetKind::CallGroup, target: g.to_owned() }
            } else {
                Decision::Unmatched { reason: Reason::UnknownGroup, candidates: Vec::new() }
            }
        })
        .collect()
}
