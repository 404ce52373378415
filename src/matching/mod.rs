//! Matching: which call or call group each pending event belongs to.
//!
//! Events with a SessionId attach by `session_id` ([`attach_by_session`]); sessionless events go
//! through the job's rules ([`engine::match_events`]). Architecture invariant: nothing here
//! touches the database; callers read the candidates and store the outcomes.

pub mod engine;
pub mod explain;
pub mod rules;

use std::collections::HashMap;

/// What a call or call group an event is attached to is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
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
}

/// Why an event is not matched.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Reason {
    UnknownSession,
    MissingKey,
    NoCandidate,
    Ambiguous,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::UnknownSession => "unknown_session",
            Reason::MissingKey => "missing_key",
            Reason::NoCandidate => "no_candidate",
            Reason::Ambiguous => "ambiguous",
        }
    }

    pub fn parse(s: &str) -> Option<Reason> {
        [Reason::UnknownSession, Reason::MissingKey, Reason::NoCandidate, Reason::Ambiguous]
            .into_iter()
            .find(|r| r.as_str() == s)
    }
}

/// The decision for one event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Matched { rule: String, kind: TargetKind, target: String },
    Unmatched { reason: Reason, candidates: Vec<String> },
}

/// The rule name recorded for SessionId attaches.
pub const SESSION_RULE: &str = "session_id";

/// Attaches events by SessionId given the calls found for their session ids
/// (`session_id -> call id`); an event whose session has no call yet stays `unknown_session`.
pub fn attach_by_session<'a>(
    session_ids: impl IntoIterator<Item = &'a str>,
    calls: &HashMap<String, String>,
) -> Vec<Outcome> {
    session_ids
        .into_iter()
        .map(|s| match calls.get(s) {
            Some(call) => {
                Outcome::Matched { rule: SESSION_RULE.to_owned(), kind: TargetKind::Call, target: call.clone() }
            }
            None => Outcome::Unmatched { reason: Reason::UnknownSession, candidates: Vec::new() },
        })
        .collect()
}
