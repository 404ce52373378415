//! The vocabulary every layer shares: an event as matching sees it ([`Subject`]), where it is
//! addressed ([`Address`]), what it is attached to ([`TargetKind`]), the [`Decision`] for it and
//! why it is not matched ([`Reason`]), and its [`State`] in `events`. Plain data, no I/O: the
//! ledger, matching, apply, the report and the desk all speak it, and it imports nothing of
//! theirs.

use std::borrow::Cow;

use chrono::{DateTime, Utc};
use serde_json::{Map, Value};

/// Where an event is addressed: to a call by its session, to a call group by its id (the
/// platform's `MasterId`), or to neither (the rules decide). Never to both.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Address {
    Session(String),
    Master(String),
    Sessionless,
}

impl Address {
    /// From the two columns (or fields) that store it; a session wins, as the parser never
    /// gives both.
    pub fn from_parts(session_id: Option<String>, master_id: Option<String>) -> Address {
        match (session_id, master_id) {
            (Some(s), _) => Address::Session(s),
            (None, Some(m)) => Address::Master(m),
            (None, None) => Address::Sessionless,
        }
    }

    pub fn session_id(&self) -> Option<&str> {
        match self {
            Address::Session(s) => Some(s),
            _ => None,
        }
    }

    pub fn master_id(&self) -> Option<&str> {
        match self {
            Address::Master(m) => Some(m),
            _ => None,
        }
    }
}

/// An event as matching sees it.
#[derive(Debug, Clone)]
pub struct Subject<'e> {
    /// `events.id`, or for an event not stored yet its position in the run's arrivals.
    pub id: i64,
    pub address: Address,
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

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
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

/// The rule recorded for a manual attach.
pub const MANUAL_RULE: &str = "manual";

/// An event's state in `events.state`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Not matched yet, retried by every run until it expires.
    Pending,
    Matched,
    /// Unmatched past the job's `pending_for`: retried only by a rematch.
    Expired,
    /// Closed out by an analyst (`callrecon resolve … --to dismiss`): final, never expires.
    Dismissed,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Pending => "pending",
            State::Matched => "matched",
            State::Expired => "expired",
            State::Dismissed => "dismissed",
        }
    }

    pub fn parse(s: &str) -> Option<State> {
        [State::Pending, State::Matched, State::Expired, State::Dismissed].into_iter().find(|x| x.as_str() == s)
    }
}

impl std::fmt::Display for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The words `events` and `event_history` store, read back into the vocabulary: an unknown one
/// is an error naming it (for `#[sqlx(try_from = "String")]` on row fields).
macro_rules! from_stored_text {
    ($($ty:ident),*) => {$(
        impl TryFrom<String> for $ty {
            type Error = String;

            fn try_from(s: String) -> Result<Self, String> {
                $ty::parse(&s).ok_or_else(|| format!(concat!("unknown ", stringify!($ty), " {:?}"), s))
            }
        }
    )*};
}
from_stored_text!(TargetKind, Reason, State);

/// What a run does (`runs.kind`, a report's `kind`): ingest and decide, decide a period again,
/// or revert a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunKind {
    Run,
    Rematch,
    Undo,
}

impl RunKind {
    pub fn as_str(self) -> &'static str {
        match self {
            RunKind::Run => "run",
            RunKind::Rematch => "rematch",
            RunKind::Undo => "undo",
        }
    }
}

impl std::fmt::Display for RunKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Ids that are numbers here and strings in the report's JSON (the contract's form).
pub mod id_text {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(id: &i64, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(id)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<i64, D::Error> {
        String::deserialize(d)?.parse().map_err(serde::de::Error::custom)
    }
}
