//! A scheduled job's file: loaded once, re-read while the scheduler runs; an edit that is refused
//! leaves the last good version in use.

use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};

use super::fire_time::next_fire;
use crate::job::{self, Job, JobError};

/// A job as the scheduler keeps it: the last good version of its file, and the file's error
/// while the file on disk is refused.
pub(super) struct Scheduled {
    pub(super) path: PathBuf,
    pub(super) job: Job,
    /// The text `job` was read from, and the last read of the file (good or not).
    good_text: String,
    last_read: Result<String, String>,
    pub(super) loaded_at: DateTime<Utc>,
    pub(super) refused: Option<String>,
}

impl Scheduled {
    pub(super) fn load(path: &Path) -> Result<Scheduled, JobError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| JobError(format!("{}: cannot read job file: {e}", path.display())))?;
        let job = job::parse(path, &text)?;
        if job.schedule.is_none() {
            return Err(JobError(format!(
                "{}: job {} has no `schedule`; add one, e.g. schedule = \"0 0 2 * * *\" \
                 (sec min hour day month weekday)",
                path.display(),
                job.name
            )));
        }
        Ok(Scheduled {
            path: path.to_path_buf(),
            job,
            good_text: text.clone(),
            last_read: Ok(text),
            loaded_at: Utc::now(),
            refused: None,
        })
    }

    pub(super) fn cron(&self) -> &cron::Schedule {
        &self.job.schedule.as_ref().expect("scheduled jobs have a schedule").cron
    }

    pub(super) fn next_fire(&self, after: DateTime<Utc>) -> Option<DateTime<Utc>> {
        next_fire(self.cron(), self.job.timezone, after)
    }

    /// Re-reads the job file. A changed file that is good replaces the job; one that is refused
    /// leaves the last good version in use and is logged as an error.
    pub(super) fn reload(&mut self) {
        let read = std::fs::read_to_string(&self.path).map_err(|e| e.to_string());
        if read == self.last_read {
            return;
        }
        self.last_read = read.clone();
        let checked = match read {
            Ok(text) if text == self.good_text => {
                if self.refused.take().is_some() {
                    tracing::info!(
                        job = %self.job.name,
                        file = %self.path.display(),
                        "job file fixed: back to its good version"
                    );
                }
                return;
            }
            Ok(text) => job::parse(&self.path, &text).and_then(|job| self.check_edit(job)).map(|job| (job, text)),
            Err(e) => Err(JobError(format!("{}: cannot read job file: {e}", self.path.display()))),
        };
        match checked {
            Ok((job, text)) => {
                let source = |j: &Job| j.schedule.as_ref().map(|s| s.source.clone());
                let changed = source(&self.job) != source(&job) || self.job.timezone != job.timezone;
                tracing::info!(
                    job = %job.name,
                    file = %self.path.display(),
                    schedule = %job.schedule.as_ref().map_or("", |s| s.source.as_str()),
                    timezone = %job.timezone,
                    schedule_changed = changed,
                    "job file changed: using the new version"
                );
                self.job = job;
                self.good_text = text;
                self.loaded_at = Utc::now();
                self.refused = None;
            }
            Err(e) => {
                tracing::error!(
                    job = %self.job.name,
                    error = %e,
                    good_version_read = %self.loaded_at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                    "job file refused: the last good version stays in use until the file is fixed"
                );
                self.refused = Some(e.0);
            }
        }
    }

    /// What a scheduler cannot take from an edit without a restart.
    fn check_edit(&self, job: Job) -> Result<Job, JobError> {
        if job.name != self.job.name {
            return Err(JobError(format!(
                "{}: the job's name changed from {:?} to {:?}; renaming a job needs a restart of the scheduler",
                self.path.display(),
                self.job.name,
                job.name
            )));
        }
        if job.schedule.is_none() {
            return Err(JobError(format!(
                "{}: `schedule` was removed; a scheduled job needs one",
                self.path.display()
            )));
        }
        Ok(job)
    }
}
