//! Files still being written are left alone: SFTP and `cp` write straight to the final name, so
//! an inbox file whose size or modification time changed within the job's `[sources] settle` is
//! not read yet.
//!
//! A run waits for such a young file (at most `settle`, and only when that is sooner than the
//! job's next scheduled run) and reads it if it did not change meanwhile; otherwise the file is
//! left for a later run, and the report lists it. The listing happens before the run's
//! transaction begins, so a wait holds no transaction open.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use anyhow::Result;
use chrono::{DateTime, Utc};

use super::inbox;
use crate::job::Job;

/// A file's size and modification time: when either changes, someone is writing it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stat {
    len: u64,
    modified: Option<SystemTime>,
}

impl Stat {
    /// The file's stat now; `None` when it cannot be read (reading the file will say why).
    pub fn of(path: &Path) -> Option<Stat> {
        std::fs::metadata(path).ok().map(|m| Stat { len: m.len(), modified: m.modified().ok() })
    }

    /// How long ago the file last changed (zero for a time in the future).
    fn age(&self, now: SystemTime) -> Duration {
        self.modified.and_then(|m| now.duration_since(m).ok()).unwrap_or_default()
    }
}

/// The inbox's files as a run takes them.
#[derive(Debug, Default)]
pub struct Settled {
    /// Files to read, with their stat when they were found settled (a file that changes again
    /// before it is read is left for later too).
    pub ready: Vec<(PathBuf, Option<Stat>)>,
    /// Files still being written, with why they are left for later.
    pub later: Vec<(PathBuf, String)>,
}

/// Lists the job's inbox and sets apart the files still being written, waiting for them when
/// that is worth it (see the module's comment).
pub async fn settle(job: &Job, now: DateTime<Utc>) -> Result<Settled> {
    let Some(dir) = &job.inbox else { return Ok(Settled::default()) };
    let listed: Vec<(PathBuf, Option<Stat>)> = inbox::list(dir)?
        .into_iter()
        .map(|p| {
            let stat = Stat::of(&p);
            (p, stat)
        })
        .collect();
    let wall = SystemTime::now();
    let young = |stat: &Option<Stat>| stat.is_some_and(|s| s.age(wall) < job.settle);
    let wait = listed.iter().filter_map(|(_, s)| s.filter(|_| young(s)).map(|s| job.settle - s.age(wall))).max();
    let Some(wait) = wait else { return Ok(Settled { ready: listed, later: Vec::new() }) };

    let next_run = next_run_in(job, now);
    let mut out = Settled::default();
    if next_run.is_some_and(|next| next <= wait) {
        for (path, stat) in listed {
            if young(&stat) {
                let age = stat.expect("a young file has a stat").age(wall);
                let reason = format!(
                    "changed {} ago (settle {}): still being written; left for the next run",
                    humantime::format_duration(whole_ms(age)),
                    humantime::format_duration(job.settle)
                );
                tracing::info!(file = %path.display(), %reason, "inbox file left for later");
                out.later.push((path, reason));
            } else {
                out.ready.push((path, stat));
            }
        }
        return Ok(out);
    }

    let young_files = listed.iter().filter(|(_, s)| young(s)).count();
    tracing::info!(
        files = young_files,
        wait_ms = wait.as_millis() as u64,
        "waiting for inbox files still being written"
    );
    tokio::time::sleep(wait).await;
    for (path, stat) in listed {
        let now_stat = Stat::of(&path);
        if young(&stat) && now_stat != stat {
            let reason = format!(
                "changed while the run waited {} for it to settle: still being written; left for the next run",
                humantime::format_duration(whole_ms(wait))
            );
            tracing::info!(file = %path.display(), %reason, "inbox file left for later");
            out.later.push((path, reason));
        } else {
            out.ready.push((path, stat));
        }
    }
    Ok(out)
}

/// How long until the job's next scheduled run, if it has a schedule.
fn next_run_in(job: &Job, now: DateTime<Utc>) -> Option<Duration> {
    let schedule = job.schedule.as_ref()?;
    let next = schedule.cron.after(&now.with_timezone(&job.timezone)).next()?;
    (next.with_timezone(&Utc) - now).to_std().ok()
}

fn whole_ms(d: Duration) -> Duration {
    Duration::from_millis(d.as_millis() as u64)
}
