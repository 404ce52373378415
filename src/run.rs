//! One reconciliation run: `ingest → match → apply → report`, all or nothing.
//!
//! Everything that changes the database happens in one transaction holding the job's advisory
//! lock; inbox files move to the archive only after it commits, and a dry run rolls it back. The
//! `runs` row is written outside that transaction so failed and dry runs are recorded too.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use chrono::{DateTime, Utc};
use serde_json::{Map, Value};
use sha2::Digest as _;
use sqlx::{PgConnection, PgPool};

use crate::apply::{self, Applied};
use crate::calldata;
use crate::event::{self, Rejected};
use crate::ingest::{self, NewEvent, inbox};
use crate::job::Job;
use crate::matching::engine::{self, EventIn};
use crate::matching::{self, Outcome, TargetKind};
use crate::progress;
use crate::report::{self, Change, Diff, FileEntry, Report, Summary, TargetRef};

/// Sessionless events matched per polars batch; bounds memory whatever the total. Two batches'
/// calls are held at once (the next is read while one is matched). Events are read, decided
/// and stored three batches at a time.
pub const CHUNK_EVENTS: usize = 100_000;

/// [`CHUNK_EVENTS`], or `CALLRECON_CHUNK_EVENTS` (tests use small batches to cross boundaries).
fn chunk_events() -> usize {
    size_from_env("CALLRECON_CHUNK_EVENTS", CHUNK_EVENTS)
}

/// Whether apply may read on a second connection while the run stores ([`Work::apply`]):
/// `CALLRECON_APPLY_READER=off` turns it off (tests compare both ways).
fn apply_reader_enabled() -> bool {
    std::env::var("CALLRECON_APPLY_READER").map_or(true, |v| v != "off")
}

/// Events read (or ingested), decided and stored at a time: three matching batches.
fn page_events() -> usize {
    3 * chunk_events()
}

/// A batch size: the positive integer in the environment variable `var`, else `default`.
pub(crate) fn size_from_env(var: &str, default: usize) -> usize {
    std::env::var(var).ok().and_then(|v| v.parse().ok()).filter(|&n| n > 0).unwrap_or(default)
}

/// What kind of run, and over which events.
#[derive(Debug, Clone, Copy)]
pub enum Mode {
    /// Ingest new events, then match every pending one.
    Run,
    /// Re-evaluate rule-based decisions of events with EventTime in `[since, until)`.
    Rematch { since: Option<DateTime<Utc>>, until: Option<DateTime<Utc>> },
}

/// A finished run: its report, and where the report files are.
pub struct Finished {
    pub report: Report,
    pub dir: PathBuf,
    /// What went wrong after the run committed (the report could not be written, its end could
    /// not be recorded): logged, and printed by the command, which still exits 0.
    pub problems: Vec<String>,
    /// Time spent per stage: "ingest", "match", "apply", "report" (for the metrics).
    pub stages: Vec<(&'static str, std::time::Duration)>,
}

/// Another run of the same job holds the lock.
#[derive(Debug, thiserror::Error)]
#[error("job {job} is already running (since {since})")]
pub struct AlreadyRunning {
    pub job: String,
    pub since: String,
}

/// Runs the job once. On error nothing is changed and the run is recorded as failed.
pub async fn execute(pool: &PgPool, job: &Job, mode: Mode, dry_run: bool) -> Result<Finished> {
    let mut tx = pool.begin().await.context("starting the run's transaction")?;
    let locked: bool = sqlx::query_scalar("select pg_try_advisory_xact_lock(hashtextextended($1, 0))")
        .bind(crate::db::job_lock_key(&job.name))
        .fetch_one(&mut *tx)
        .await?;
    if !locked {
        bail!(AlreadyRunning { job: job.name.clone(), since: lock_holder_since(pool, &job.name).await });
    }
    // We hold the lock: a run still marked running was killed.
    sqlx::query(
        "update runs set status = 'abandoned', finished_at = now(),
                error = 'the process ended before the run finished; nothing it did was kept'
         where job = $1 and status = 'running'",
    )
    .bind(&job.name)
    .execute(pool)
    .await?;
    let kind = match mode {
        Mode::Run => "run",
        Mode::Rematch { .. } => "rematch",
    };
    let (run_id, started_at): (i64, DateTime<Utc>) = sqlx::query_as(
        "insert into runs (job, kind, dry_run, rules_fingerprint) values ($1, $2, $3, $4) returning id, started_at",
    )
    .bind(&job.name)
    .bind(kind)
    .bind(dry_run)
    .bind(&job.rules_fingerprint)
    .fetch_one(pool)
    .await
    .context("recording the run")?;
    tracing::info!(run_id, job = %job.name, kind, dry_run, "run started");

    let mut stages = Vec::new();
    let result = async {
        let mut work = Work::new(job, pool, run_id, started_at);
        let t = std::time::Instant::now();
        if matches!(mode, Mode::Run) {
            work.ingest(&mut tx).await.context("ingesting events")?;
        }
        stages.push(("ingest", t.elapsed()));
        let t = std::time::Instant::now();
        let applied = work.match_and_apply(&mut tx, mode).await?;
        let apply_started = work.apply_started.unwrap_or(t);
        stages.extend([("match", apply_started - t), ("apply", apply_started.elapsed())]);
        let t = std::time::Instant::now();
        let mut report = work.report(&mut tx, kind, dry_run, applied).await?;
        stages.push(("report", t.elapsed()));
        tracing::debug!("report built");
        if dry_run {
            tx.rollback().await?;
        } else {
            // In the same transaction as the work: a run killed after its commit is never taken
            // for one that changed nothing.
            sqlx::query("update runs set status = 'succeeded', finished_at = now(), summary = $2 where id = $1")
                .bind(run_id)
                .bind(serde_json::to_value(&report.summary)?)
                .execute(&mut *tx)
                .await?;
            if let Err(e) = tx.commit().await {
                // The connection may have dropped during COMMIT: whether the commit happened is
                // in `runs`, which the transaction marked succeeded.
                match committed(pool, run_id).await {
                    Some(true) => tracing::warn!(error = %e, "the commit reported an error, but the run is committed"),
                    Some(false) => return Err(anyhow::Error::new(e).context("committing the run")),
                    None => {
                        return Err(anyhow::Error::new(e).context(
                            "committing the run (whether it was committed could not be checked: see `report list`)",
                        ));
                    }
                }
            }
            tracing::debug!("committed");
            work.archive_files();
        }
        report.files = work.files.into_iter().map(|(_, f)| f).collect();
        anyhow::Ok(report)
    }
    .await;

    let mut report = match result {
        Ok(report) => report,
        Err(e) => {
            report::discard_partial(&job.report_dir.join(run_id.to_string()));
            let error = crate::db::error_line(&e);
            let _ = sqlx::query("update runs set status = 'failed', finished_at = now(), error = $2 where id = $1")
                .bind(run_id)
                .bind(&error)
                .execute(pool)
                .await;
            notify(pool, job, run_id, report::webhook::failure_payload(run_id, &job.name, kind, dry_run, &error)).await;
            return Err(e);
        }
    };

    // From here on the run has committed (or, dry, changed nothing): what fails now is reported
    // loudly and recorded where possible, but cannot make the run a failure.
    report.finished_at = Utc::now();
    let dir = job.report_dir.join(&report.run_id);
    let mut problems = Vec::new();
    let t = std::time::Instant::now();
    let written = match report::write_all(&report, &dir) {
        Ok(()) => true,
        Err(e) if dry_run => return Err(e).with_context(|| format!("writing the report to {}", dir.display())),
        Err(e) => {
            problems.push(format!(
                "its report could not be written to {}: {}",
                dir.display(),
                crate::db::error_line(&e)
            ));
            false
        }
    };
    tracing::debug!("report written");
    stages.last_mut().expect("the report stage").1 += t.elapsed();
    let recorded = sqlx::query(
        "update runs set status = 'succeeded', finished_at = $2, summary = $3, report_dir = $4, error = $5 where id = $1",
    )
    .bind(run_id)
    .bind(report.finished_at)
    .bind(serde_json::to_value(&report.summary)?)
    .bind(dir.to_string_lossy().as_ref())
    .bind(problems.first().map(|p| format!("the run completed but {p}")))
    .execute(pool)
    .await;
    if let Err(e) = recorded {
        problems.push(format!("its end could not be recorded in `runs`: {}", crate::db::describe(&e)));
    }
    if written {
        report::retention::prune(pool, job, run_id).await;
    }
    for problem in &problems {
        tracing::error!(run_id, problem = %problem, "the run committed, but {problem}");
    }
    notify(pool, job, run_id, report::webhook::payload(&report, &dir)).await;
    Ok(Finished { report, dir, problems, stages })
}

/// Whether run `run_id` committed, read on another connection (`None`: it cannot be told).
async fn committed(pool: &PgPool, run_id: i64) -> Option<bool> {
    let status: Option<String> =
        sqlx::query_scalar("select status from runs where id = $1").bind(run_id).fetch_optional(pool).await.ok()?;
    Some(status.as_deref() == Some("succeeded"))
}

/// When the run holding the job's lock started: its transaction's start, from the lock itself
/// (its `runs` row may not be written yet), for the "already running" message.
async fn lock_holder_since(pool: &PgPool, job: &str) -> String {
    let since: Result<Option<DateTime<Utc>>, _> = sqlx::query_scalar(
        "select min(a.xact_start) from pg_locks l join pg_stat_activity a on a.pid = l.pid
         where l.locktype = 'advisory' and l.granted and l.database = (select oid from pg_database where datname = current_database())
           and (l.classid::bigint << 32 | l.objid::bigint) = hashtextextended($1, 0)",
    )
    .bind(crate::db::job_lock_key(job))
    .fetch_one(pool)
    .await;
    match since {
        Ok(Some(t)) => t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        _ => "a moment ago".to_owned(),
    }
}

/// Sends the job's webhook, if any, and records the outcome on the run. Never fails: a lost
/// notification is logged and recorded, the run stands.
async fn notify(pool: &PgPool, job: &Job, run_id: i64, body: Value) {
    let Some(url) = &job.webhook else { return };
    let outcome = report::webhook::notify(url, &body).await;
    if let Err(error) = &outcome {
        tracing::error!(%error, run_id, "webhook notification failed; the run's outcome stands");
    }
    let recorded = sqlx::query("update runs set notification = $2 where id = $1")
        .bind(run_id)
        .bind(outcome.err().unwrap_or_else(|| "delivered".into()))
        .execute(pool)
        .await;
    if let Err(e) = recorded {
        tracing::error!(error = %e, run_id, "could not record the webhook outcome");
    }
}

/// A pending event as read back for matching, or one this run ingested.
struct Pending<'e> {
    id: i64,
    session_id: Option<String>,
    time: DateTime<Utc>,
    received_at: DateTime<Utc>,
    /// Of an event read back, only the keys matching and apply look at ([`kept_keys`]).
    metadata: Cow<'e, Map<String, Value>>,
    /// The decision before this run: target (kind, id) when matched, and the rule.
    old: Option<(TargetKind, String)>,
    old_rule: Option<String>,
    /// The rest of the stored decision, to write only decisions that change.
    old_state: String,
    old_reason: Option<String>,
    old_candidates: Vec<String>,
    old_group_part: Map<String, Value>,
}

impl<'e> Pending<'e> {
    /// An event this run ingested, not stored yet: `id` stands in until it is.
    fn fresh(id: i64, e: &'e NewEvent) -> Self {
        Pending {
            id,
            session_id: e.event.session_id.clone(),
            time: e.event.event_time,
            received_at: e.received_at,
            metadata: Cow::Borrowed(&e.event.metadata),
            old: None,
            old_rule: None,
            old_state: "pending".into(),
            old_reason: None,
            old_candidates: Vec::new(),
            old_group_part: Map::new(),
        }
    }
}

/// The top-level metadata keys matching and apply look at: the first segment of every rule
/// key, and the job's group fields. Most of an event's metadata is never looked at here.
fn kept_keys(job: &Job) -> HashSet<&str> {
    job.rules
        .iter()
        .flat_map(|r| r.keys.iter().filter_map(|k| k.event.first()))
        .chain(&job.group_fields)
        .map(String::as_str)
        .collect()
}

/// A file's events handed on at a time while it is read.
const INBOX_BATCH: usize = 10_000;

/// A file opened, with the SHA-256 of its content (read in pieces), rewound to its start.
fn open_hashed(path: &std::path::Path) -> std::io::Result<(std::fs::File, String)> {
    use std::io::{Read as _, Seek as _};
    let mut file = std::fs::File::open(path)?;
    let mut hasher = sha2::Sha256::new();
    let mut buf = vec![0; 1 << 20];
    loop {
        match file.read(&mut buf)? {
            0 => break,
            n => hasher.update(&buf[..n]),
        }
    }
    file.rewind()?;
    Ok((file, hex::encode(hasher.finalize())))
}

/// The state of a run in progress.
struct Work<'j> {
    job: &'j Job,
    /// For reads on other connections than the run's (matching's call groups, apply's reader).
    pool: &'j PgPool,
    run_id: i64,
    now: DateTime<Utc>,
    ingested: u64,
    rejected: Vec<Rejected>,
    files: Vec<(PathBuf, FileEntry)>,
    matched: u64,
    by_rule: BTreeMap<String, u64>,
    diff: Option<Diff>,
    /// Events this run ingested and has not stored yet. Up to a page of them are decided first
    /// and stored once, with their decision: storing them pending and updating them in the same
    /// run wrote every new event twice.
    fresh: Vec<NewEvent>,
    /// More than a page was ingested: every new event is stored pending and decided from the
    /// table, in EventTime order. Pages in arrival order would each span the whole backlog's
    /// time range and hold the calls of all of it (3 GiB for 1.2M events over 60 days).
    backlog: bool,
    /// The fresh events, decided: stored just before apply, while apply's reader reads.
    decided_fresh: Option<Arc<Fresh>>,
    /// Stored events whose decision this run rewrote, while at most a page of them.
    stale: Option<Vec<i64>>,
    /// Targets whose set of matched events changed: what apply recomputes.
    touched_calls: foldhash::HashSet<String>,
    touched_groups: foldhash::HashSet<String>,
    /// Where matching saw the calls it matched, while apply may read on a second connection
    /// (as long as `stale` is kept): that reader then looks up only the other touched calls.
    hints: Option<foldhash::HashMap<String, apply::Hint>>,
    times: StageTimes,
    /// When apply started (the end of the match stage).
    apply_started: Option<std::time::Instant>,
}

/// Time spent per stage across pages, logged once at the end of matching.
#[derive(Default, Clone, Copy)]
struct StageTimes {
    /// Events decided (this run's new ones and those read back).
    events: usize,
    /// Events read back from the table.
    read: usize,
    read_ms: u64,
    match_ms: u64,
    store_ms: u64,
    stored: usize,
}

impl<'j> Work<'j> {
    fn new(job: &'j Job, pool: &'j PgPool, run_id: i64, now: DateTime<Utc>) -> Self {
        Work {
            job,
            pool,
            run_id,
            now,
            ingested: 0,
            rejected: Vec::new(),
            files: Vec::new(),
            matched: 0,
            by_rule: BTreeMap::new(),
            diff: None,
            fresh: Vec::new(),
            backlog: false,
            decided_fresh: None,
            stale: Some(Vec::new()),
            touched_calls: Default::default(),
            touched_groups: Default::default(),
            hints: Some(Default::default()),
            times: StageTimes::default(),
            apply_started: None,
        }
    }

    #[tracing::instrument(skip_all)]
    async fn ingest(&mut self, conn: &mut PgConnection) -> Result<()> {
        if self.job.queue {
            let pb = progress::spinner("queue", "events");
            let (mut valid, mut rejected) = (0, 0);
            if let Some(max_id) = ingest::queue::last_id(conn).await? {
                let tz = self.job.timezone;
                let mut rows = ingest::queue::take(conn, max_id).await?;
                // Each batch is parsed on another thread while the next is taken off the queue.
                while !rows.is_empty() {
                    let parsing = tokio::task::spawn_blocking(move || ingest::queue::parse(rows, tz));
                    let next = ingest::queue::take(conn, max_id).await;
                    let batch = parsing.await.context("parsing queued events")?;
                    // A failed take aborts the transaction: report it, not the next statement's
                    // "transaction is aborted".
                    rows = next?;
                    pb.inc(batch.taken() as u64);
                    (valid, rejected) = (valid + batch.events.len(), rejected + batch.rejected.len());
                    self.rejected.extend(batch.rejected);
                    self.add_fresh(conn, batch.events).await?;
                }
            }
            pb.finish_and_clear();
            tracing::info!(valid, rejected, "queue drained");
            self.ingested += valid as u64;
        }
        if let Some(dir) = self.job.inbox.clone() {
            self.ingest_inbox(conn, &dir).await?;
        }
        self.settle_fresh(conn).await
    }

    /// Reads the inbox's files into fresh events, recording each file's fate.
    async fn ingest_inbox(&mut self, conn: &mut PgConnection, dir: &std::path::Path) -> Result<()> {
        let label_dir = dir.file_name().map_or_else(|| "inbox".into(), |n| n.to_string_lossy().into_owned());
        let mut seen: HashSet<String> = HashSet::new();
        let files = inbox::list(dir)?;
        let pb = progress::bar("inbox", files.len() as u64, "files");
        for path in files {
            pb.inc(1);
            let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            let label = format!("{label_dir}/{name}");
            // Hashed first (to know a file seen before), then read record by record: memory
            // holds one batch of a file's events, whatever its size.
            let (file, sha) = match open_hashed(&path) {
                Ok(opened) => opened,
                Err(e) => {
                    tracing::error!(file = %path.display(), error = %e, "cannot read inbox file; left in place");
                    self.rejected.push(Rejected {
                        source: label,
                        reason: format!("cannot read the file: {e}"),
                        raw: String::new(),
                    });
                    continue;
                }
            };
            let mut entry = FileEntry {
                file: label.clone(),
                sha256: sha.clone(),
                status: "ingested".into(),
                events: 0,
                rejected: 0,
                archived_to: None,
                reason: None,
            };

            let known: Option<(i64, String)> = sqlx::query_as("select run_id, name from inbox_files where sha256 = $1")
                .bind(&sha)
                .fetch_optional(&mut *conn)
                .await?;
            if let Some((run, first_name)) = known.or_else(|| seen.contains(&sha).then(|| (self.run_id, name.clone())))
            {
                tracing::warn!(file = %label, first_name, run, "same content already ingested; skipped");
                entry.status = "duplicate".into();
                entry.reason = Some(format!("same content as {first_name}, ingested by run {run}"));
                self.files.push((path, entry));
                continue;
            }
            seen.insert(sha.clone());

            let format = inbox::Format::of(&path).expect("listed files have a known format");
            let reader = std::io::BufReader::with_capacity(1 << 20, file);
            let records = match inbox::records(reader, format, &label) {
                Ok(r) => r,
                Err(reason) => {
                    tracing::error!(file = %label, %reason, "file cannot be parsed; archived as failed");
                    self.rejected.push(Rejected { source: label, reason: reason.clone(), raw: String::new() });
                    entry.status = "failed".into();
                    entry.reason = Some(reason);
                    self.files.push((path, entry));
                    continue;
                }
            };
            let mut events = Vec::new();
            let rejected_before = self.rejected.len();
            let (mut readable, mut first_unreadable) = (false, None);
            for r in records {
                let r = r.with_context(|| format!("reading {}", path.display()))?;
                match &r.payload {
                    Ok(_) => readable = true,
                    Err(reason) if first_unreadable.is_none() => {
                        first_unreadable = Some((r.source.clone(), reason.clone()))
                    }
                    Err(_) => {}
                }
                match r.payload.and_then(|p| event::parse(&p, self.job.timezone)) {
                    Ok(event) => events.push(NewEvent { source: r.source, event, received_at: self.now }),
                    Err(reason) => {
                        entry.rejected += 1;
                        self.rejected.push(Rejected::new(r.source, reason, r.raw));
                    }
                }
                if events.len() >= INBOX_BATCH {
                    entry.events += events.len() as u64;
                    self.add_fresh(conn, std::mem::take(&mut events)).await?;
                }
            }
            if let Some(reason) = inbox::nothing_readable(&label, first_unreadable.as_ref(), readable) {
                // Nothing was taken from it (no record read, so no event): refused whole.
                tracing::error!(file = %label, %reason, "nothing in the file can be read; archived as failed");
                self.rejected.truncate(rejected_before);
                self.rejected.push(Rejected { source: label, reason: reason.clone(), raw: String::new() });
                entry.status = "failed".into();
                entry.rejected = 0;
                entry.reason = Some(reason);
                self.files.push((path, entry));
                continue;
            }
            entry.events += events.len() as u64;
            self.add_fresh(conn, events).await?;
            sqlx::query(
                "insert into inbox_files (sha256, job, name, run_id, events, rejected) values ($1, $2, $3, $4, $5, $6)",
            )
            .bind(&sha)
            .bind(&self.job.name)
            .bind(&name)
            .bind(self.run_id)
            .bind(entry.events as i32)
            .bind(entry.rejected as i32)
            .execute(&mut *conn)
            .await?;
            tracing::info!(file = %label, events = entry.events, rejected = entry.rejected, "file ingested");
            self.ingested += entry.events;
            self.files.push((path, entry));
        }
        pb.finish_and_clear();
        Ok(())
    }

    /// Adds ingested events to the fresh ones. Once they fill a page, this run has a backlog:
    /// they, and every event ingested after them, are stored pending right away.
    async fn add_fresh(&mut self, conn: &mut PgConnection, events: Vec<NewEvent>) -> Result<()> {
        self.fresh.extend(events);
        if self.backlog || self.fresh.len() >= page_events() {
            self.backlog = true;
            let t = std::time::Instant::now();
            ingest::store_pending(conn, &self.job.name, self.run_id, &self.fresh).await?;
            self.times.store_ms += t.elapsed().as_millis() as u64;
            self.fresh.clear();
        }
        Ok(())
    }

    /// Decides the fresh events (less than a page); [`Work::store_fresh`] stores them.
    async fn settle_fresh(&mut self, conn: &mut PgConnection) -> Result<()> {
        if self.fresh.is_empty() {
            return Ok(());
        }
        let fresh = std::mem::take(&mut self.fresh);
        // Until they are stored they have no id: their position stands in for it.
        let pending: Vec<Pending> = fresh.iter().enumerate().map(|(i, e)| Pending::fresh(i as i64, e)).collect();
        let t = std::time::Instant::now();
        let (outcomes, hints) = decide(conn, self.pool, self.job, &pending).await?;
        self.times.match_ms += t.elapsed().as_millis() as u64;
        self.times.events += pending.len();
        let mut rows = DecisionRows::default();
        for (p, outcome) in pending.iter().zip(&outcomes) {
            let expired = self.book(p, outcome, Mode::Run);
            rows.push(p, outcome, expired, &self.job.group_fields, Write::Always);
        }
        self.keep_hints(hints);
        tracing::debug!(events = fresh.len(), "new events decided");
        self.decided_fresh = Some(Arc::new(Fresh { rows, events: fresh }));
        Ok(())
    }

    /// Stores the fresh events with their decisions, in arrival order (their ids follow it:
    /// arrival order breaks merge ties).
    async fn store_fresh(&mut self, conn: &mut PgConnection) -> Result<()> {
        let Some(fresh) = self.decided_fresh.take() else { return Ok(()) };
        let t = std::time::Instant::now();
        fresh.rows.insert(conn, &self.job.name, self.run_id, &self.job.rules_fingerprint, &fresh.events).await?;
        tracing::info!(events = fresh.events.len(), elapsed_ms = t.elapsed().as_millis() as u64, "new events stored");
        // Hundreds of thousands of small allocations: freed off the run's path.
        std::thread::spawn(move || drop(fresh));
        Ok(())
    }

    /// Keeps where matching saw the calls it matched that apply will recompute (a rematch
    /// confirms most matches), while apply may use it. Call after booking the decisions.
    fn keep_hints(&mut self, hints: foldhash::HashMap<String, apply::Hint>) {
        if let Some(kept) = &mut self.hints {
            kept.extend(hints.into_iter().filter(|(call, _)| self.touched_calls.contains(call)));
        }
    }

    /// Books one decision: the targets it touches, a new match's count, a rematch's diff.
    /// Returns whether the event is expired: unmatched past `pending_for` since it was
    /// received, retried only by rematch.
    fn book(&mut self, p: &Pending, outcome: &Outcome, mode: Mode) -> bool {
        let new_target = match outcome {
            Outcome::Matched { kind, target, .. } => Some((*kind, target.clone())),
            Outcome::Unmatched { .. } => None,
        };
        if new_target != p.old {
            for (kind, id) in p.old.iter().chain(&new_target) {
                match kind {
                    TargetKind::Call => self.touched_calls.insert(id.clone()),
                    TargetKind::CallGroup => self.touched_groups.insert(id.clone()),
                };
            }
        }
        if let (Outcome::Matched { rule, .. }, None) = (outcome, &p.old) {
            self.matched += 1;
            match self.by_rule.get_mut(rule) {
                Some(n) => *n += 1,
                None => {
                    self.by_rule.insert(rule.clone(), 1);
                }
            }
        }
        if let Mode::Rematch { .. } = mode {
            record_change(self.diff.get_or_insert_with(Diff::default), p, outcome);
        }
        new_target.is_none() && p.received_at <= self.now - self.job.pending_for
    }

    /// Decides every stored event in scope (for a run, those pending from earlier runs and a
    /// backlog this run stored pending; events it decided as it ingested them are left out),
    /// stores the decisions that changed and applies the changed targets.
    ///
    /// Events are read, decided and stored a page at a time in (EventTime, id) order, so
    /// memory does not grow with the number of events in scope; only the touched targets and a
    /// rematch's list of changes are kept across pages.
    async fn match_and_apply(&mut self, conn: &mut PgConnection, mode: Mode) -> Result<Applied> {
        let page = page_events();
        let mut cursor = match mode {
            Mode::Rematch { since: Some(since), .. } => (since, i64::MIN),
            _ => (DateTime::<Utc>::from_timestamp(-62_135_596_800, 0).expect("0001-01-01"), i64::MIN),
        };
        loop {
            let t = std::time::Instant::now();
            let pending = load_in_scope(conn, self.job, self.run_id, mode, cursor, page).await?;
            self.times.read_ms += t.elapsed().as_millis() as u64;
            let Some(last) = pending.last() else { break };
            cursor = (last.time, last.id);
            self.times.events += pending.len();
            self.times.read += pending.len();
            let t = std::time::Instant::now();
            let (outcomes, hints) = decide(conn, self.pool, self.job, &pending).await?;
            self.times.match_ms += t.elapsed().as_millis() as u64;

            let mut rows = DecisionRows::default();
            for (p, outcome) in pending.iter().zip(&outcomes) {
                let expired = self.book(p, outcome, mode);
                rows.push(p, outcome, expired, &self.job.group_fields, Write::IfChanged);
            }
            self.keep_hints(hints);
            let t = std::time::Instant::now();
            rows.store(conn, self.run_id, &self.job.rules_fingerprint).await?;
            self.times.store_ms += t.elapsed().as_millis() as u64;
            self.times.stored += rows.id.len();
            if let Some(stale) = &mut self.stale {
                stale.extend(&rows.id);
                if stale.len() > page {
                    self.stale = None;
                    self.hints = None;
                }
            }
            if pending.len() < page {
                break;
            }
        }
        if let Some(diff) = &mut self.diff {
            diff.changes.sort_by_key(|c| c.event_id.parse::<i64>().unwrap_or(i64::MAX));
        }
        let StageTimes { events, read, read_ms, match_ms, store_ms, stored } = self.times;
        tracing::info!(events = read, elapsed_ms = read_ms, "stored events to match read");
        tracing::info!(events, elapsed_ms = match_ms, "matched");
        tracing::info!(stored, elapsed_ms = store_ms, "decisions stored");

        let calls: Vec<String> = std::mem::take(&mut self.touched_calls).into_iter().collect();
        let groups: Vec<String> = std::mem::take(&mut self.touched_groups).into_iter().collect();
        self.apply_started = Some(std::time::Instant::now());
        let pb = progress::spinner("apply", "targets");
        pb.set_message(format!("recomputing {} calls, {} groups and their group members", calls.len(), groups.len()));
        let applied = self.apply(conn, &calls, &groups).await;
        pb.finish_and_clear();
        applied
    }

    /// Stores the fresh events and applies. When this run's decisions are few enough to hold
    /// (at most a page), the touched targets are read on a second connection meanwhile
    /// ([`apply::Reader`]); otherwise, or when no connection is free, one after the other.
    async fn apply(&mut self, conn: &mut PgConnection, calls: &[String], groups: &[String]) -> Result<Applied> {
        let fresh = self.decided_fresh.as_ref().map_or(0, |f| f.rows.id.len());
        let reader = match &self.stale {
            Some(stale) if stale.len() + fresh <= page_events() && apply_reader_enabled() => {
                match tokio::time::timeout(std::time::Duration::from_secs(2), self.pool.acquire()).await {
                    Ok(Ok(reader)) => Some(reader),
                    Ok(Err(e)) => {
                        tracing::warn!(error = %e, "no second connection for apply's reads; reading after storing");
                        None
                    }
                    Err(_) => {
                        tracing::warn!("no second connection free for apply's reads; reading after storing");
                        None
                    }
                }
            }
            _ => None,
        };
        let Some(reader) = reader else {
            self.store_fresh(conn).await?;
            return apply::apply(conn, calls, groups).await;
        };
        let started = std::time::Instant::now();
        apply::lock(conn).await?;
        let hints = self.hints.take().unwrap_or_default();
        let targets = apply::Targets::take_changes(conn, calls, groups).await?.with_hints(hints);
        let stale = self.stale.take().unwrap_or_default();
        let reader = apply::Reader::start(reader, targets, stale.iter().copied().collect());
        let this_run = apply::ThisRun::read(conn, &stale).await?;
        // The reader's batches are merged with this run's events while they are stored.
        let (fresh, group_fields) = (self.decided_fresh.clone(), self.job.group_fields.clone());
        let merging = reader.merge(this_run, move |this_run| {
            if let Some(fresh) = fresh {
                fresh.add_matches(this_run, &group_fields);
            }
        });
        self.store_fresh(conn).await?;
        tracing::debug!(elapsed_ms = started.elapsed().as_millis() as u64, "this run's events stored");
        merging.write(conn).await
    }

    async fn report(&mut self, conn: &mut PgConnection, kind: &str, dry_run: bool, applied: Applied) -> Result<Report> {
        // Streamed into the report's partial folder inside the transaction: the list is what
        // this run commits (or, dry, would have); `report::write_all` completes it.
        let partial = report::partial_dir(&self.job.report_dir.join(self.run_id.to_string()));
        let unmatched =
            report::unmatched::stream(conn, &self.job.name, self.run_id, self.job.pending_for, &partial).await?;
        let expired = unmatched.expired;
        let count_files = |s: &str| self.files.iter().filter(|(_, f)| f.status == s).count() as u64;
        let summary = Summary {
            ingested: self.ingested,
            rejected: self.rejected.len() as u64,
            matched: self.matched,
            unmatched: unmatched.total,
            by_rule: std::mem::take(&mut self.by_rule),
            by_reason: unmatched.by_reason.clone(),
            expired,
            pending: unmatched.total - expired,
            calls_updated: applied.calls_updated,
            groups_updated: applied.groups_updated,
            files_ingested: count_files("ingested"),
            files_duplicate: count_files("duplicate"),
            files_failed: count_files("failed"),
        };
        Ok(Report {
            run_id: self.run_id.to_string(),
            job: self.job.name.clone(),
            kind: kind.to_owned(),
            started_at: self.now,
            finished_at: Utc::now(),
            dry_run,
            summary,
            unmatched,
            rejected: std::mem::take(&mut self.rejected),
            // Filled in once the files are archived.
            files: Vec::new(),
            diff: self.diff.take().or_else(|| (kind == "rematch").then(Diff::default)),
        })
    }

    /// Moves this run's inbox files to the archive (after commit: a crash before leaves them in
    /// the inbox, and their content is then recognised as already ingested).
    fn archive_files(&mut self) {
        let day = self.now.with_timezone(&self.job.timezone).date_naive();
        for (path, entry) in &mut self.files {
            let how = match entry.status.as_str() {
                "duplicate" => inbox::Disposition::Duplicate,
                "failed" => inbox::Disposition::Failed,
                _ => inbox::Disposition::Ingested,
            };
            match inbox::archive(path, &self.job.archive, how, day) {
                Ok(dest) => entry.archived_to = Some(dest.display().to_string()),
                Err(e) => {
                    tracing::error!(file = %path.display(), error = %crate::db::error_line(&e), "could not archive file; it stays in the inbox")
                }
            }
        }
    }
}

/// The stored events a run decides, the next `limit` after `(after_time, after_id)` in
/// (EventTime, id) order: every pending event of the job but those run `run_id` decided
/// already; for a rematch, every rule-decided or undecided event (SessionId
/// attaches are final) with EventTime in range.
async fn load_in_scope(
    conn: &mut PgConnection,
    job: &Job,
    run_id: i64,
    mode: Mode,
    (after_time, after_id): (DateTime<Utc>, i64),
    limit: usize,
) -> Result<Vec<Pending<'static>>> {
    type Row = (
        i64,
        Option<String>,
        DateTime<Utc>,
        DateTime<Utc>,
        String,
        Option<String>,
        Option<String>,
        Option<String>,
        String,
        Option<String>,
        Vec<String>,
        sqlx::types::Json<Map<String, Value>>,
    );
    let rows: Vec<Row> = match mode {
        Mode::Run => {
            sqlx::query_as(
                "select id, session_id, event_time, received_at, metadata::text, target_kind, target_id, rule,
                        state, reason, coalesce(candidates, '{}'), group_part
                 from events
                 where job = $1 and state = 'pending' and decided_run is distinct from $5
                   and event_time >= $2 and (event_time, id) > ($2, $3)
                 order by event_time, id limit $4",
            )
            .bind(&job.name)
            .bind(after_time)
            .bind(after_id)
            .bind(limit as i64)
            .bind(run_id)
            .fetch_all(&mut *conn)
            .await
        }
        Mode::Rematch { since, until } => {
            sqlx::query_as(
                "select id, session_id, event_time, received_at, metadata::text, target_kind, target_id, rule,
                        state, reason, coalesce(candidates, '{}'), group_part
                 from events
                 where job = $1 and session_id is null
                   and ($2::timestamptz is null or event_time >= $2)
                   and ($3::timestamptz is null or event_time < $3)
                   and event_time >= $4 and (event_time, id) > ($4, $5)
                 order by event_time, id limit $6",
            )
            .bind(&job.name)
            .bind(since)
            .bind(until)
            .bind(after_time)
            .bind(after_id)
            .bind(limit as i64)
            .fetch_all(&mut *conn)
            .await
        }
    }
    .context("reading events to match")?;
    // Only the keys matching and apply look at are parsed: parsing the whole metadata was most
    // of this stage's time.
    let keep = kept_keys(job);
    rows.into_iter()
        .map(|(id, session_id, time, received_at, metadata, kind, target, old_rule, state, reason, cands, part)| {
            let metadata = parse_keeping(&metadata, &keep).with_context(|| format!("metadata of event {id}"))?;
            Ok(Pending {
                id,
                session_id,
                time,
                received_at,
                metadata: Cow::Owned(metadata),
                old: match (kind.as_deref(), target) {
                    (Some("call"), Some(t)) => Some((TargetKind::Call, t)),
                    (Some("call_group"), Some(t)) => Some((TargetKind::CallGroup, t)),
                    _ => None,
                },
                old_rule,
                old_state: state,
                old_reason: reason,
                old_candidates: cands,
                old_group_part: part.0,
            })
        })
        .collect()
}

/// The top-level entries of a JSON object whose keys are in `keep`; the others are skipped
/// without being built.
fn parse_keeping(json: &str, keep: &HashSet<&str>) -> Result<Map<String, Value>> {
    use serde::de::{DeserializeSeed, Deserializer, IgnoredAny, MapAccess, Visitor};
    struct Keep<'k>(&'k HashSet<&'k str>);
    impl<'de> DeserializeSeed<'de> for Keep<'_> {
        type Value = Map<String, Value>;
        fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
            d.deserialize_map(self)
        }
    }
    impl<'de> Visitor<'de> for Keep<'_> {
        type Value = Map<String, Value>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a JSON object")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            let mut out = Map::new();
            while let Some(key) = map.next_key::<String>()? {
                if self.0.contains(key.as_str()) {
                    out.insert(key, map.next_value()?);
                } else {
                    map.next_value::<IgnoredAny>()?;
                }
            }
            Ok(out)
        }
    }
    let mut de = serde_json::Deserializer::from_str(json);
    let out = Keep(keep).deserialize(&mut de)?;
    de.end()?;
    Ok(out)
}

/// Outcomes for `events`, in their order: SessionId attaches, then the rule cascade over the
/// sessionless ones in time-ordered chunks. With them, where each matched call was when read.
async fn decide(
    conn: &mut PgConnection,
    pool: &PgPool,
    job: &Job,
    events: &[Pending<'_>],
) -> Result<(Vec<Outcome>, foldhash::HashMap<String, apply::Hint>)> {
    let mut outcomes: Vec<Option<Outcome>> = vec![None; events.len()];
    let mut hints = foldhash::HashMap::default();

    let with_session: Vec<usize> = (0..events.len()).filter(|&i| events[i].session_id.is_some()).collect();
    let mut sessionless: Vec<usize> = (0..events.len()).filter(|&i| events[i].session_id.is_none()).collect();
    sessionless.sort_by_key(|&i| (events[i].time, events[i].id));
    let (call_fields, group_fields) = calldata::fields(job);
    let chunks: Vec<&[usize]> = sessionless.chunks(chunk_events()).collect();

    // The call groups are read on a second connection while the run's connection reads the
    // calls: committed call data either way (the run writes none before apply).
    let groups = async {
        if sessionless.is_empty() || group_fields.is_empty() {
            return Ok(Default::default());
        }
        let metas: Vec<&Map<String, Value>> = sessionless.iter().map(|&i| &*events[i].metadata).collect();
        let filters = calldata::group_filters(job, &metas);
        let mut other = pool.acquire().await.context("connecting to read call groups")?;
        calldata::load_groups(&mut other, &group_fields, filters.as_deref()).await
    };
    let calls = async {
        let sessions: HashSet<&str> = with_session.iter().filter_map(|&i| events[i].session_id.as_deref()).collect();
        let by_session =
            if sessions.is_empty() { Default::default() } else { calldata::calls_by_session(conn, &sessions).await? };
        let calls = calls_for(conn, job, &call_fields, events, chunks.first().copied()).await?;
        anyhow::Ok((by_session, calls))
    };
    let (groups, (by_session, mut calls)) = tokio::try_join!(groups, calls)?;

    if !with_session.is_empty() {
        let calls = by_session;
        let ids: HashMap<String, String> = calls.iter().map(|(s, c)| (s.clone(), c.id.clone())).collect();
        let attached =
            matching::attach_by_session(with_session.iter().filter_map(|&i| events[i].session_id.as_deref()), &ids);
        for (i, o) in with_session.into_iter().zip(attached) {
            if let (Outcome::Matched { .. }, Some(call)) =
                (&o, events[i].session_id.as_ref().and_then(|s| calls.get(s)))
            {
                hints.insert(call.id.clone(), call.hint.clone());
            }
            outcomes[i] = Some(o);
        }
    }

    if !sessionless.is_empty() {
        let pb = progress::bar("match", sessionless.len() as u64, "events");
        // On a multi-threaded runtime the next chunk's calls are read while this chunk is
        // matched: PostgreSQL formats and sends rows while polars joins.
        let overlap = tokio::runtime::Handle::current().runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread;
        for (k, chunk) in chunks.iter().enumerate() {
            tracing::debug!(
                events = chunk.len(),
                calls = calls.0.ids.len(),
                groups = groups.ids.len(),
                "matching chunk"
            );
            let input: Vec<EventIn> = chunk
                .iter()
                .map(|&i| EventIn {
                    id: events[i].id,
                    time: events[i].time.timestamp_micros(),
                    metadata: &events[i].metadata,
                })
                .collect();
            pb.set_message(format!("matching against {} calls", calls.0.ids.len()));
            let next = chunks.get(k + 1);
            // CPU-bound, and polars may block on its own runtime: run it off the async worker.
            let (decided, next_calls) = if overlap && next.is_some() {
                let handle = tokio::runtime::Handle::current();
                tokio::task::block_in_place(|| {
                    std::thread::scope(|s| {
                        let matching = s.spawn(|| engine::match_events_at(&job.rules, &input, &calls.0, &groups));
                        let next_calls =
                            handle.block_on(calls_for(&mut *conn, job, &call_fields, events, next.copied()));
                        (matching.join(), next_calls)
                    })
                })
            } else {
                let decided = std::thread::scope(|s| {
                    s.spawn(|| engine::match_events_at(&job.rules, &input, &calls.0, &groups)).join()
                });
                (decided, calls_for(&mut *conn, job, &call_fields, events, next.copied()).await)
            };
            let decided = decided
                .map_err(|_| anyhow::anyhow!("the matching thread panicked"))?
                .context("matching sessionless events")?;
            for (&i, (o, at)) in chunk.iter().zip(decided) {
                if let (Outcome::Matched { kind: TargetKind::Call, target, .. }, Some(at)) = (&o, at) {
                    hints.insert(target.clone(), calls.1.hint(at as usize));
                }
                outcomes[i] = Some(o);
            }
            pb.inc(chunk.len() as u64);
            calls = next_calls?;
        }
        pb.finish_and_clear();
    }
    Ok((outcomes.into_iter().map(|o| o.expect("every event decided")).collect(), hints))
}

/// The calls a chunk of sessionless events can match; none to read without a chunk or when no
/// rule targets calls.
async fn calls_for(
    conn: &mut PgConnection,
    job: &Job,
    fields: &[crate::job::TargetField],
    events: &[Pending<'_>],
    chunk: Option<&[usize]>,
) -> Result<(engine::Targets, calldata::Placement)> {
    match chunk {
        Some(c) if !fields.is_empty() => {
            let (from, to) = (events[c[0]].time, events[*c.last().expect("non-empty chunk")].time);
            calldata::load_calls(conn, fields, from, to, job.max_window()).await
        }
        _ => Ok(Default::default()),
    }
}

/// The group part of an event matched to a target of `kind` (`call` or `call_group`): its
/// values of the job's `group_fields`, given to the call's group and its other calls. None for
/// an event matched to a group, which gets all of the event.
fn group_part(metadata: &Map<String, Value>, kind: &str, group_fields: &[String]) -> Map<String, Value> {
    if kind != TargetKind::Call.as_str() {
        return Map::new();
    }
    group_fields.iter().filter_map(|f| metadata.get(f).map(|v| (f.clone(), v.clone()))).collect()
}

/// This run's new events, decided, until they are stored.
struct Fresh {
    rows: DecisionRows,
    events: Vec<NewEvent>,
}

impl Fresh {
    /// Adds the events matched to `this_run`, from memory: what [`Work::store_fresh`] stores,
    /// printed as PostgreSQL prints jsonb.
    fn add_matches(&self, this_run: &mut apply::ThisRun, group_fields: &[String]) {
        for (i, e) in self.events.iter().enumerate() {
            if let (Some(kind), Some(target)) = (self.rows.kind[i], &self.rows.target[i]) {
                let part = group_part(&e.event.metadata, kind, group_fields);
                this_run.push_new(i, e.event.event_time, &e.event.metadata, &part, kind, target.clone());
            }
        }
    }
}

/// Decisions as columns, written with one statement per batch.
#[derive(Default)]
struct DecisionRows {
    id: Vec<i64>,
    state: Vec<&'static str>,
    kind: Vec<Option<&'static str>>,
    target: Vec<Option<String>>,
    rule: Vec<Option<String>>,
    group_part: Vec<String>,
    reason: Vec<Option<&'static str>>,
    candidates: Vec<String>,
}

/// Whether [`DecisionRows::push`] keeps a decision that is the one already stored.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Write {
    /// A stored event: skip it (a rematch that confirms most decisions then writes few rows).
    IfChanged,
    /// A fresh event, stored with its decision whatever it is.
    Always,
}

impl DecisionRows {
    /// Adds the event's new decision (see [`Write`]).
    fn push(&mut self, p: &Pending, outcome: &Outcome, expired: bool, group_fields: &[String], write: Write) {
        let (state, kind, target, rule, part, reason, candidates): (_, _, _, _, Map<String, Value>, _, &[String]) =
            match outcome {
                Outcome::Matched { rule, kind, target } => {
                    let part = group_part(&p.metadata, kind.as_str(), group_fields);
                    ("matched", Some(*kind), Some(target), Some(rule), part, None, &[])
                }
                Outcome::Unmatched { reason, candidates } => (
                    if expired { "expired" } else { "pending" },
                    None,
                    None,
                    None,
                    Map::new(),
                    Some(*reason),
                    candidates,
                ),
            };
        let unchanged = state == p.old_state
            && kind.zip(target).map(|(k, t)| (k, t.clone())) == p.old
            && rule == p.old_rule.as_ref()
            && reason.map(|r| r.as_str()) == p.old_reason.as_deref()
            && candidates == p.old_candidates.as_slice()
            && part == p.old_group_part;
        if unchanged && write == Write::IfChanged {
            return;
        }
        self.id.push(p.id);
        self.state.push(state);
        self.kind.push(kind.map(TargetKind::as_str));
        self.target.push(target.cloned());
        self.rule.push(rule.cloned());
        self.group_part.push(Value::Object(part).to_string());
        self.reason.push(reason.map(|r| r.as_str()));
        // A Postgres array literal; ids are quoted.
        let quoted: Vec<String> =
            candidates.iter().map(|c| format!("\"{}\"", c.replace('\\', "\\\\").replace('"', "\\\""))).collect();
        self.candidates.push(format!("{{{}}}", quoted.join(",")));
    }

    /// Inserts `events` (this run's fresh ones, in the order they were pushed) with their
    /// decisions; ids are assigned in that order.
    async fn insert(
        &self,
        conn: &mut PgConnection,
        job: &str,
        run_id: i64,
        fingerprint: &str,
        events: &[NewEvent],
    ) -> Result<()> {
        debug_assert_eq!(self.id.len(), events.len());
        for start in (0..events.len()).step_by(ingest::STORE_CHUNK) {
            let range = start..(start + ingest::STORE_CHUNK).min(events.len());
            let columns = ingest::EventColumns::of(&events[range.clone()])?;
            let statement = sqlx::query(
                "insert into events (job, source, session_id, event_time, received_at, metadata, ingested_run,
                                     state, target_kind, target_id, rule, group_part, reason, candidates,
                                     decided_run, rules_fingerprint)
                 select $1, s, sid, t, r, m::jsonb, $2, st, k, tg, ru, gp::jsonb, re,
                        case when re is null then null else c::text[] end, $2, $3
                 from unnest($4::text[], $5::text[], $6::timestamptz[], $7::timestamptz[], $8::text[],
                             $9::text[], $10::text[], $11::text[], $12::text[], $13::text[], $14::text[], $15::text[])
                      with ordinality as u(s, sid, t, r, m, st, k, tg, ru, gp, re, c, ord)
                 order by ord",
            )
            .bind(job)
            .bind(run_id)
            .bind(fingerprint);
            let statement = columns.bind(statement);
            self.bind_decisions(statement, range).execute(&mut *conn).await.context("storing events")?;
        }
        Ok(())
    }

    /// Binds the decision columns of `range`: state, kind, target, rule, group part, reason and
    /// candidates, the order both statements take them in.
    fn bind_decisions<'q>(
        &'q self,
        statement: sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>,
        range: std::ops::Range<usize>,
    ) -> sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments> {
        statement
            .bind(&self.state[range.clone()])
            .bind(&self.kind[range.clone()])
            .bind(&self.target[range.clone()])
            .bind(&self.rule[range.clone()])
            .bind(&self.group_part[range.clone()])
            .bind(&self.reason[range.clone()])
            .bind(&self.candidates[range])
    }

    /// Updates stored events with their new decisions.
    async fn store(&self, conn: &mut PgConnection, run_id: i64, fingerprint: &str) -> Result<()> {
        for range in (0..self.id.len()).step_by(20_000).map(|s| s..(s + 20_000).min(self.id.len())) {
            // One primary-key probe per decision, not a scan of every event per batch.
            let statement = sqlx::query(
                "update events e set state = u.state, target_kind = u.kind, target_id = u.target, rule = u.rule,
                        group_part = u.part::jsonb, reason = u.reason,
                        candidates = case when u.reason is null then null else u.cands::text[] end,
                        decided_run = $1, rules_fingerprint = $2
                 from unnest($3::bigint[], $4::text[], $5::text[], $6::text[], $7::text[], $8::text[], $9::text[], $10::text[])
                      as u(id, state, kind, target, rule, part, reason, cands)
                 where e.id = u.id",
            )
            .bind(run_id)
            .bind(fingerprint)
            .bind(&self.id[range.clone()]);
            let statement = self.bind_decisions(statement, range);
            crate::db::with_index_probes(conn, statement).await.context("storing match decisions")?;
        }
        Ok(())
    }
}

/// Adds one re-decided event to a rematch's diff.
fn record_change(diff: &mut Diff, p: &Pending, outcome: &Outcome) {
    diff.evaluated += 1;
    let target_ref = |(kind, id): &(TargetKind, String)| TargetRef { kind: kind.as_str().to_owned(), id: id.clone() };
    let (new, new_rule, reason) = match outcome {
        Outcome::Matched { rule, kind, target } => (Some((*kind, target.clone())), Some(rule.clone()), None),
        Outcome::Unmatched { reason, .. } => (None, None, Some(reason.as_str().to_owned())),
    };
    let change = match (&p.old, &new) {
        (None, None) => None,
        (None, Some(_)) => Some("newly_matched"),
        (Some(_), None) => Some("newly_unmatched"),
        (Some(a), Some(b)) if a != b => Some("moved"),
        (Some(_), Some(_)) if p.old_rule != new_rule => Some("rule_changed"),
        (Some(_), Some(_)) => None,
    };
    let Some(change) = change else {
        diff.unchanged += 1;
        return;
    };
    match change {
        "newly_matched" => diff.newly_matched += 1,
        "newly_unmatched" => diff.newly_unmatched += 1,
        "moved" => diff.moved += 1,
        _ => diff.rule_changed += 1,
    }
    if p.old_rule != new_rule {
        if let Some(r) = &p.old_rule {
            diff.by_rule.entry(r.clone()).or_default().lost += 1;
        }
        if let Some(r) = &new_rule {
            diff.by_rule.entry(r.clone()).or_default().gained += 1;
        }
    }
    diff.changes.push(Change {
        event_id: p.id.to_string(),
        change: change.to_owned(),
        from: p.old.as_ref().map(target_ref),
        to: new.as_ref().map(target_ref),
        rule_before: p.old_rule.clone(),
        rule_after: new_rule,
        reason,
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_keeping_keeps_only_the_named_top_level_keys() {
        let keep: HashSet<&str> = ["phone", "tier", "k\"q"].into_iter().collect();
        let json = r#"{"phone": "+1 555", "notes": {"deep": [1, 2, {"phone": "x"}]}, "tier": 7, "k\"q": null, "big": "\u00e9"}"#;
        let m = parse_keeping(json, &keep).unwrap();
        assert_eq!(Value::Object(m), serde_json::json!({"phone": "+1 555", "tier": 7, "k\"q": null}));
        assert!(parse_keeping("[1]", &keep).is_err());
        assert!(parse_keeping(r#"{"phone": "x"} trailing"#, &keep).is_err());
    }
}
