//! One integration-test binary (one link of polars): every test gets its own database from
//! `#[sqlx::test]`, so they run in parallel against the PostgreSQL in `DATABASE_URL`.

mod apply;
mod backlog;
mod browser;
mod cli;
mod connections;
mod crash;
mod demo;
mod desk;
mod docs;
mod feeds;
mod footprint;
mod fuzz;
mod helpers;
mod hostile;
mod ingest;
mod live;
mod master_id;
mod matching;
mod metrics;
mod openapi;
mod partitioned;
mod pooler;
mod report;
mod resolve;
mod retry;
mod review;
mod run;
mod schedule;
mod sdk;
mod serve;
mod servers;
mod spreadsheet;
mod tidy;
mod tls;
mod verify;
