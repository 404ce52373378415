//! The ingest stage: the job's sources (`event_queue`, inbox files) → valid events handed to the
//! ledger's [`Arrivals`], inside the run's transaction; bad records set aside with their
//! position.
//!
//! Architecture invariant: every record goes through [`crate::event::parse`]; a bad record is
//! rejected with its position and never stops the good ones beside it. Files are moved
//! ([`archive`]) only after the run commits, never deleted.

pub mod dedupe;
pub mod inbox;
pub mod queue;
pub mod settle;

pub use inbox::FileStatus;

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sha2::Digest as _;
use sqlx::PgConnection;

use crate::event::{self, NewEvent, Rejected};
use crate::job::Job;
use crate::ledger::Arrivals;
use crate::progress;
use dedupe::Dedupe;
use settle::Settled;

/// What ingestion took in, besides the events it handed on.
#[derive(Default)]
pub struct Ingested {
    /// Valid events handed on (new to the job).
    pub events: u64,
    /// Valid events the job already held, by source (`queue`, `inbox/a.ndjson`): not handed on.
    pub duplicates: BTreeMap<String, u64>,
    pub rejected: Vec<Rejected>,
    /// Inbox files with what became of them; archived after the commit.
    pub files: Vec<(PathBuf, FileEntry)>,
}

/// An inbox file and what became of it, as the report lists it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct FileEntry {
    pub file: String,
    pub sha256: String,
    pub status: FileStatus,
    pub events: u64,
    /// Its events the job already held (each event once): not stored again.
    #[serde(default)]
    pub duplicates: u64,
    pub rejected: u64,
    pub archived_to: Option<String>,
    pub reason: Option<String>,
}

/// Drains the queue, then reads the inbox's settled files ([`settle::settle`]), handing every
/// valid event new to the job to `arrivals` ([`dedupe`]).
#[tracing::instrument(skip_all)]
pub async fn ingest(
    conn: &mut PgConnection,
    job: &Job,
    run_id: i64,
    now: DateTime<Utc>,
    inbox: Settled,
    arrivals: &mut Arrivals,
) -> Result<Ingested> {
    let mut out = Ingested::default();
    let mut dedupe = Dedupe::default();
    if job.queue {
        drain_queue(conn, job, arrivals, &mut dedupe, &mut out).await?;
    }
    if let Some(dir) = &job.inbox {
        let Settled { ready, later } = inbox;
        let mut reader = InboxReader {
            conn: &mut *conn,
            job,
            run_id,
            now,
            dir,
            arrivals: &mut *arrivals,
            dedupe: &mut dedupe,
            out: &mut out,
            seen: HashSet::new(),
        };
        reader.read(ready).await?;
        for (path, reason) in later {
            let entry = FileEntry::new(label(dir, &path), String::new(), FileStatus::Later);
            out.files.push((path, FileEntry { reason: Some(reason), ..entry }));
        }
    }
    if dedupe.total() > 0 {
        tracing::info!(duplicates = dedupe.total(), by_source = ?dedupe.by_source, "events the job already held, not stored again");
    }
    out.duplicates = dedupe.by_source;
    Ok(out)
}

impl FileEntry {
    fn new(file: String, sha256: String, status: FileStatus) -> Self {
        FileEntry { file, sha256, status, events: 0, duplicates: 0, rejected: 0, archived_to: None, reason: None }
    }
}

/// A file as the report names it: `inbox/a.ndjson`.
fn label(dir: &Path, path: &Path) -> String {
    let dir = dir.file_name().map_or_else(|| "inbox".into(), |n| n.to_string_lossy().into_owned());
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    format!("{dir}/{name}")
}

/// Takes the queue's rows off it a batch at a time; each batch is parsed on another thread
/// while the next is taken.
async fn drain_queue(
    conn: &mut PgConnection,
    job: &Job,
    arrivals: &mut Arrivals,
    dedupe: &mut Dedupe,
    out: &mut Ingested,
) -> Result<()> {
    let pb = progress::spinner("queue", "events");
    let (mut valid, mut rejected) = (0, 0);
    if let Some(max_id) = queue::last_id(conn).await? {
        let (tz, name) = (job.timezone, job.name.clone());
        let mut rows = queue::take(conn, i64::MIN, max_id).await?;
        while let Some(&(after, ..)) = rows.last() {
            let name = name.clone();
            let parsing = tokio::task::spawn_blocking(move || queue::parse(rows, &name, tz));
            let next = queue::take(conn, after, max_id).await;
            let batch = parsing.await.context("parsing queued events")?;
            // A failed take aborts the transaction: report it, not the next statement's
            // "transaction is aborted".
            rows = next?;
            pb.inc(batch.taken() as u64);
            rejected += batch.rejected.len();
            out.rejected.extend(batch.rejected);
            let events = dedupe.keep_new(conn, batch.events).await?;
            valid += events.len();
            arrivals.add(conn, events).await?;
        }
    }
    pb.finish_and_clear();
    tracing::info!(valid, rejected, "queue drained");
    out.events += valid as u64;
    Ok(())
}

/// A file's events handed on at a time while it is read.
const INBOX_BATCH: usize = 10_000;

/// A file opened, with the SHA-256 of its content (read in pieces), rewound to its start.
fn open_hashed(path: &Path) -> std::io::Result<(std::fs::File, String)> {
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

/// Reading the inbox's settled files in a run: where their events go and what is recorded of
/// each file (`inbox_files` remembers the content of every file ingested, so a file seen before
/// is skipped).
struct InboxReader<'a> {
    conn: &'a mut PgConnection,
    job: &'a Job,
    run_id: i64,
    now: DateTime<Utc>,
    dir: &'a Path,
    arrivals: &'a mut Arrivals,
    dedupe: &'a mut Dedupe,
    out: &'a mut Ingested,
    /// The contents read by this run so far, by SHA-256.
    seen: HashSet<String>,
}

impl InboxReader<'_> {
    /// Reads the files into events, recording each file's fate.
    async fn read(&mut self, files: Vec<(PathBuf, Option<settle::Stat>)>) -> Result<()> {
        let pb = progress::bar("inbox", files.len() as u64, "files");
        for (path, settled) in files {
            pb.inc(1);
            self.read_file(path, settled).await?;
        }
        pb.finish_and_clear();
        Ok(())
    }

    /// One file: its events handed on and its fate in `out.files`, or, when it cannot be opened,
    /// a rejected record (it stays in the inbox).
    async fn read_file(&mut self, path: PathBuf, settled: Option<settle::Stat>) -> Result<()> {
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let label = label(self.dir, &path);
        // Hashed first (to know a file seen before), then read record by record: memory
        // holds one batch of a file's events, whatever its size.
        let (file, sha) = match open_hashed(&path) {
            Ok(opened) => opened,
            Err(e) => {
                tracing::error!(file = %path.display(), error = %e, "cannot read inbox file; left in place");
                self.out.rejected.push(Rejected {
                    source: label,
                    reason: format!("cannot read the file: {e}"),
                    raw: String::new(),
                });
                return Ok(());
            }
        };
        let mut entry = FileEntry::new(label.clone(), sha.clone(), FileStatus::Ingested);
        if settled.is_some() && settle::Stat::of(&path) != settled {
            // Written to again since it was found settled: what was hashed may be half of it.
            let reason = "changed while the run read it: still being written; left for the next run";
            tracing::info!(file = %label, reason, "inbox file left for later");
            entry.status = FileStatus::Later;
            entry.reason = Some(reason.to_owned());
            entry.sha256 = String::new();
            self.out.files.push((path, entry));
            return Ok(());
        }
        if let Some((run, first_name)) = self.ingested_before(&sha, &name).await? {
            tracing::warn!(file = %label, first_name, run, "same content already ingested; skipped");
            entry.status = FileStatus::Duplicate;
            entry.reason = Some(format!("same content as {first_name}, ingested by run {run}"));
            self.out.files.push((path, entry));
            return Ok(());
        }
        self.seen.insert(sha.clone());

        let format = inbox::Format::of(&path).expect("listed files have a known format");
        let reader = std::io::BufReader::with_capacity(1 << 20, file);
        let refused = match inbox::records(reader, format, &label) {
            Ok(records) => self.take_records(records, &path, &label, &mut entry).await?,
            Err(reason) => {
                tracing::error!(file = %label, %reason, "file cannot be parsed; archived as failed");
                Some(reason)
            }
        };
        if let Some(reason) = refused {
            self.out.rejected.push(Rejected { source: label, reason: reason.clone(), raw: String::new() });
            entry.status = FileStatus::Failed;
            entry.reason = Some(reason);
            self.out.files.push((path, entry));
            return Ok(());
        }
        self.record_file(&sha, &name, &entry).await?;
        let (events, duplicates, rejected) = (entry.events, entry.duplicates, entry.rejected);
        tracing::info!(file = %label, events, duplicates, rejected, "file ingested");
        self.out.events += entry.events;
        self.out.files.push((path, entry));
        Ok(())
    }

    /// The run and name a file of this content was first ingested by, if any (this run's files
    /// included).
    async fn ingested_before(&mut self, sha: &str, name: &str) -> Result<Option<(i64, String)>> {
        let known: Option<(i64, String)> = sqlx::query_as("select run_id, name from inbox_files where sha256 = $1")
            .bind(sha)
            .fetch_optional(&mut *self.conn)
            .await?;
        Ok(known.or_else(|| self.seen.contains(sha).then(|| (self.run_id, name.to_owned()))))
    }

    /// A file's records parsed as events and handed on a batch at a time, counted in `entry`.
    /// `Some(reason)`: nothing in the file can be read, and it is refused whole (its rejected
    /// records taken back, as no record of it was read).
    async fn take_records(
        &mut self,
        records: inbox::Records<'_>,
        path: &Path,
        label: &str,
        entry: &mut FileEntry,
    ) -> Result<Option<String>> {
        let job = self.job;
        let mut events = Vec::new();
        let rejected_before = self.out.rejected.len();
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
            match r.payload.and_then(|p| event::parse(&p, job.timezone)) {
                Ok(event) => events.push(NewEvent {
                    source: r.source,
                    digest: dedupe::digest(&job.name, &event),
                    event,
                    received_at: self.now,
                }),
                Err(reason) => {
                    entry.rejected += 1;
                    self.out.rejected.push(Rejected::new(r.source, reason, r.raw));
                }
            }
            if events.len() >= INBOX_BATCH {
                self.hand_on(std::mem::take(&mut events), entry).await?;
            }
        }
        if let Some(reason) = inbox::nothing_readable(label, first_unreadable.as_ref(), readable) {
            // Nothing was taken from it (no record read, so no event): refused whole.
            tracing::error!(file = %label, %reason, "nothing in the file can be read; archived as failed");
            self.out.rejected.truncate(rejected_before);
            entry.rejected = 0;
            return Ok(Some(reason));
        }
        self.hand_on(events, entry).await?;
        entry.duplicates = self.dedupe.by_source.get(label).copied().unwrap_or(0);
        Ok(None)
    }

    /// Events new to the job handed to the ledger, counted in `entry`.
    async fn hand_on(&mut self, events: Vec<NewEvent>, entry: &mut FileEntry) -> Result<()> {
        let events = self.dedupe.keep_new(self.conn, events).await?;
        entry.events += events.len() as u64;
        self.arrivals.add(self.conn, events).await
    }

    /// Remembers an ingested file's content in `inbox_files`.
    async fn record_file(&mut self, sha: &str, name: &str, entry: &FileEntry) -> Result<()> {
        sqlx::query(
            "insert into inbox_files (sha256, job, name, run_id, events, rejected) values ($1, $2, $3, $4, $5, $6)",
        )
        .bind(sha)
        .bind(&self.job.name)
        .bind(name)
        .bind(self.run_id)
        .bind(entry.events as i32)
        .bind(entry.rejected as i32)
        .execute(&mut *self.conn)
        .await?;
        Ok(())
    }
}

/// Moves a committed run's inbox files to the archive (after commit: a crash before leaves them
/// in the inbox, and their content is then recognised as already ingested). A file that cannot
/// be moved stays in the inbox, logged.
pub fn archive(files: &mut [(PathBuf, FileEntry)], job: &Job, now: DateTime<Utc>) {
    let day = now.with_timezone(&job.timezone).date_naive();
    for (path, entry) in files {
        if entry.status == FileStatus::Later {
            // Still being written: it stays in the inbox for a later run.
            continue;
        }
        match inbox::archive(path, &job.archive, entry.status, day) {
            Ok(dest) => entry.archived_to = Some(dest.display().to_string()),
            Err(e) => {
                tracing::error!(file = %path.display(), error = %crate::db::error_line(&e), "could not archive file; it stays in the inbox")
            }
        }
    }
}
