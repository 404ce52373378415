//! The reconciliation report: `report.json`, `unmatched.csv` and `report.html` in
//! `<report dir>/<run id>/`, and the run history.

pub mod history;
pub mod html;
pub mod manual;
pub mod retention;
pub mod types;
pub mod unmatched;
pub mod webhook;

pub use crate::decide::{Change, ChangeKind, Diff, RuleDiff, TargetRef, UNDO_SKIPPED_LISTED, UndoReport, UndoSkipped};
pub use html::render_html;
pub use types::Shown;
pub use types::{FileEntry, FileStatus, Report, Suggested, Summary, Unmatched};
pub use unmatched::escape_cell;

use std::io::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

/// Where a run's report is written before it is complete: `<report dir>/.<run id>.partial`,
/// renamed to `dir` once every file is in place, so a report folder is either whole or absent.
pub fn partial_dir(dir: &Path) -> PathBuf {
    let name = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    dir.with_file_name(format!(".{name}.partial"))
}

/// Removes what a run that failed left of its report.
pub fn discard_partial(dir: &Path) {
    let partial = partial_dir(dir);
    if partial.exists()
        && let Err(e) = std::fs::remove_dir_all(&partial)
    {
        tracing::warn!(dir = %partial.display(), error = %e, "could not remove a partial report");
    }
}

/// Completes the report in `dir`: `unmatched.csv` and the unmatched list are already in its
/// partial folder ([`unmatched::stream`]); this writes `report.json` around that list and
/// `report.html`, then renames the folder into place.
pub fn write_all(report: &Report, dir: &Path) -> Result<()> {
    let partial = partial_dir(dir);
    std::fs::create_dir_all(&partial).with_context(|| format!("creating {}", partial.display()))?;
    write_json(report, &partial).context("writing report.json")?;
    let csv = partial.join(unmatched::CSV);
    if !csv.exists() {
        // A report built without its stream (no unmatched events were read): a header only.
        unmatched::write_csv_header(&mut std::fs::File::create(&csv)?, &[])?;
    }
    std::fs::write(partial.join("report.html"), render_html(report)?).context("writing report.html")?;
    if dir.exists() {
        // A folder of the same run id from another database: the report of this run replaces it.
        std::fs::remove_dir_all(dir).with_context(|| format!("replacing {}", dir.display()))?;
    }
    std::fs::rename(&partial, dir).with_context(|| format!("renaming {} to {}", partial.display(), dir.display()))
}

/// `report.json`, written a field at a time: one top-level field a line, one entry of
/// `unmatched` and `rejected` a line, the unmatched entries copied from the list streamed
/// earlier. Nothing of the size of the list is held in memory.
fn write_json(report: &Report, partial: &Path) -> Result<()> {
    let mut w = std::io::BufWriter::with_capacity(1 << 16, std::fs::File::create(partial.join("report.json"))?);
    let field = |w: &mut std::io::BufWriter<std::fs::File>, name: &str, v: &dyn erased::Json| -> Result<()> {
        write!(w, "  {}: ", serde_json::to_string(name)?)?;
        v.write(w)?;
        w.write_all(b",\n")?;
        Ok(())
    };
    w.write_all(b"{\n")?;
    field(&mut w, "run_id", &report.run_id.to_string())?;
    field(&mut w, "job", &report.job)?;
    field(&mut w, "kind", &report.kind)?;
    field(&mut w, "started_at", &report.started_at)?;
    field(&mut w, "finished_at", &report.finished_at)?;
    field(&mut w, "dry_run", &report.dry_run)?;
    field(&mut w, "summary", &report.summary)?;
    w.write_all(b"  \"unmatched\": [")?;
    let list = partial.join(unmatched::JSON_LIST);
    if let Ok(mut part) = std::fs::File::open(&list) {
        if part.metadata()?.len() > 0 {
            w.write_all(b"\n")?;
            std::io::copy(&mut part, &mut w)?;
            w.write_all(b"\n  ")?;
        }
        drop(part);
        std::fs::remove_file(&list)?;
    }
    w.write_all(b"],\n  \"rejected\": [")?;
    for (i, r) in report.rejected.iter().enumerate() {
        w.write_all(if i == 0 { b"\n    " } else { b",\n    " })?;
        serde_json::to_writer(&mut w, r)?;
    }
    w.write_all(if report.rejected.is_empty() { b"],\n" } else { b"\n  ],\n" })?;
    field(&mut w, "manual", &report.manual)?;
    if let Some(suggested) = &report.suggested {
        field(&mut w, "suggested", suggested)?;
    }
    if let Some(undo) = &report.undo {
        field(&mut w, "undo", undo)?;
    }
    match &report.diff {
        Some(diff) => {
            field(&mut w, "files", &report.files)?;
            write!(w, "  \"diff\": ")?;
            serde_json::to_writer(&mut w, diff)?;
            w.write_all(b"\n")?;
        }
        None => {
            write!(w, "  \"files\": ")?;
            serde_json::to_writer(&mut w, &report.files)?;
            w.write_all(b"\n")?;
        }
    }
    w.write_all(b"}\n")?;
    w.flush()?;
    Ok(())
}

/// A value written as compact JSON, for [`write_json`]'s fields of different types.
mod erased {
    pub trait Json {
        fn write(&self, w: &mut dyn std::io::Write) -> serde_json::Result<()>;
    }
    impl<T: serde::Serialize> Json for T {
        fn write(&self, w: &mut dyn std::io::Write) -> serde_json::Result<()> {
            serde_json::to_writer(w, self)
        }
    }
}
