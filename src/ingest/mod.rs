//! Ingestion: sources -> events for the run to decide and store, inside its transaction.
//!
//! Architecture invariant: every record goes through [`crate::event::parse`]; a bad record is
//! rejected with its position and never stops the good ones beside it.

pub mod inbox;
pub mod queue;

use chrono::{DateTime, Utc};

use crate::event::Event;

/// A valid event about to be stored.
#[derive(Debug, Clone)]
pub struct NewEvent {
    pub source: String,
    pub event: Event,
    pub received_at: DateTime<Utc>,
}
