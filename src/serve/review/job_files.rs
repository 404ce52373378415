//! The job files the desk reads, each parsed once and again only when it changes on disk (its
//! modification time or length), so a page does not re-parse every job file, and an edited file
//! (`suggest --accept --write`, an operator's change) is seen on the next page.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use crate::job::{self, Job};

/// What a file was when it was parsed, and what parsing gave.
struct Parsed {
    modified: Option<SystemTime>,
    len: u64,
    job: Result<Arc<Job>, String>,
}

/// Parsed job files by path.
#[derive(Default)]
pub struct JobFiles(Mutex<HashMap<PathBuf, Parsed>>);

impl JobFiles {
    /// The job in `path`, parsed now if the file is new or changed since it was last parsed.
    pub fn load(&self, path: &Path) -> Result<Arc<Job>, String> {
        let meta = std::fs::metadata(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let (modified, len) = (meta.modified().ok(), meta.len());
        let mut parsed = self.0.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(p) = parsed.get(path)
            && p.modified.is_some()
            && p.modified == modified
            && p.len == len
        {
            return p.job.clone();
        }
        let job = job::load(path).map(Arc::new).map_err(|e| format!("{e:#}"));
        parsed.insert(path.to_owned(), Parsed { modified, len, job: job.clone() });
        job
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_job_file_is_parsed_once_until_it_changes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("job.toml");
        let text = include_str!("../../../jobs/demo.toml");
        std::fs::write(&path, text).unwrap();
        let files = JobFiles::default();
        let first = files.load(&path).unwrap();
        assert!(Arc::ptr_eq(&first, &files.load(&path).unwrap()), "parsed again though unchanged");
        std::fs::write(&path, text.replace("name = \"demo\"", "name = \"demo-edited\"")).unwrap();
        assert_eq!(files.load(&path).unwrap().name, "demo-edited");
        std::fs::write(&path, "name = ").unwrap();
        assert!(files.load(&path).is_err(), "a file broken since is refused");
    }
}
