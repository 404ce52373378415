//! Matching: which call or call group each pending event belongs to.
//!
//! Events with a SessionId attach by `session_id` ([`attach_by_session`]), events with a MasterId
//! to the call group of that id ([`attach_by_group`]); the others (sessionless) go through the
//! job's rules ([`engine::match_events`]). [`decide`] is the stage: it reads the
//! candidates of a page of events through [`crate::calldata`] and runs the two.
//!
//! Architecture invariant: only `decide.rs` reads the database, and only through `calldata`;
//! `attach`, `engine`, `rules` and `explain` are pure, and decisions do not depend on input order.

pub mod attach;
pub mod decide;
pub mod engine;
pub mod explain;
pub mod rules;

pub use attach::{attach_by_group, attach_by_session};
pub use decide::{Ahead, Decisions, Pass, Reads, Span, calls_ahead, decide, groups_for};
