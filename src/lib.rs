//! callrecon: attaches customers' async metadata events to calls and call groups.
//!
//! The data flows one way: `ingest → matching → apply → report`, orchestrated by [`run`].

pub mod apply;
pub mod calldata;
pub mod cli;
pub mod datagen;
pub mod db;
pub mod decide;
pub mod decision;
pub mod demo;
pub mod event;
pub mod http;
pub mod ingest;
pub mod inspect;
pub mod job;
pub mod jsonb;
pub mod ledger;
pub mod matching;
pub mod metrics;
pub mod pgcopy;
pub mod progress;
pub mod report;
pub mod resolve;
pub mod run;
pub mod schedule;
pub mod serve;
pub mod suggest;
pub mod tuning;
pub mod users;
pub mod verify;
