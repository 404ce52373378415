//! Dropped files: which files are picked, how each format becomes records with positions, and
//! where files go afterwards (the archive; never deleted). `text.rs`: positions and bytes that
//! are not UTF-8; `lines.rs`: records cut at line breaks as a file streams; `json.rs` and
//! `csv_rows.rs`: the formats.

mod csv_rows;
mod json;
mod lines;
mod text;

pub use text::{Record, Records};

use std::io::BufRead;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde_json::Value;

use crate::event;

/// Why a file is refused whole when none of its records could be read (the contract's "not
/// UTF-8, not JSON"): the first one's source and reason. `None` when some record was read.
pub fn nothing_readable(label: &str, first_unreadable: Option<&(String, String)>, readable: bool) -> Option<String> {
    let (source, reason) = first_unreadable.filter(|_| !readable)?;
    Some(format!("{label}: nothing in the file can be read ({source}: {reason})"))
}

/// Files of the inbox a run picks, sorted by name: `*.json`, `*.ndjson`, `*.jsonl`, `*.csv`;
/// hidden, `*.tmp` and `*.part` files are still being written and are left alone, as are other
/// names (logged).
pub fn list(inbox: &Path) -> Result<Vec<PathBuf>> {
    let entries = match std::fs::read_dir(inbox) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            tracing::warn!(inbox = %inbox.display(), "inbox folder does not exist; nothing to ingest");
            return Ok(Vec::new());
        }
        Err(e) => return Err(e).with_context(|| format!("reading inbox {}", inbox.display())),
    };
    let mut files = Vec::new();
    for entry in entries {
        let entry = entry.with_context(|| format!("reading inbox {}", inbox.display()))?;
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') || !entry.file_type()?.is_file() {
            continue;
        }
        match Format::of(&path) {
            Some(_) => files.push(path),
            None if name.ends_with(".tmp") || name.ends_with(".part") => {}
            None => {
                tracing::warn!(file = %path.display(), "not a .json, .ndjson, .jsonl or .csv file; left in the inbox")
            }
        }
    }
    files.sort();
    Ok(files)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Json,
    Ndjson,
    Csv,
}

impl Format {
    pub fn of(path: &Path) -> Option<Format> {
        match path.extension()?.to_str()?.to_ascii_lowercase().as_str() {
            "json" => Some(Format::Json),
            "ndjson" | "jsonl" => Some(Format::Ndjson),
            "csv" => Some(Format::Csv),
            _ => None,
        }
    }
}

/// The records of a file's content. `Err` when the file as a whole cannot be read (an empty JSON
/// file, a JSON array cut short, a CSV without an EventTime column or with an unreadable
/// header): the reason names the file. (A file none of whose records can be read is refused
/// whole too, by the run: see [`nothing_readable`].) Within a readable file a bad record (not UTF-8, not
/// JSON, trailing text) is a record of its own, rejected with its line, and the others are kept.
///
/// Lines are counted the way a person's editor counts them, whatever the line endings (`\n`,
/// `\r\n`, or a lone `\r`).
pub fn read_records(bytes: &[u8], format: Format, label: &str) -> Result<Vec<Record>, String> {
    let records = records(bytes, format, label)?;
    Ok(records.map(|r| r.expect("reading from memory")).collect())
}

/// The records of a file as they are read from `reader`, with [`read_records`]'s rules. NDJSON
/// and CSV files stream: one record is held at a time, whatever the file's size. A JSON file's
/// text is read whole (whether its array is closed is known at its end), and its records are
/// parsed and handed on one at a time. `Err` when the file as a whole
/// cannot be read; an item's `Err` is a failure to read the file itself.
pub fn records<'r, R: BufRead + Send + 'r>(mut reader: R, format: Format, label: &str) -> Result<Records<'r>, String> {
    let cannot = |e: std::io::Error| format!("{label}: cannot read the file ({e})");
    // A byte-order mark is not content.
    if reader.fill_buf().map_err(cannot)?.starts_with(b"\xEF\xBB\xBF") {
        reader.consume(3);
    }
    match format {
        Format::Json => json::records(reader, label),
        Format::Ndjson => Ok(json::ndjson_records(reader, label)),
        Format::Csv => csv_rows::records(reader, label),
    }
}

/// The payloads of files, for putting them on the queue as a producer would: every record that
/// reads as JSON (bad events among them are rejected by the run that ingests them), and the
/// records that do not, as `source: reason`.
pub fn payloads_of(files: &[PathBuf]) -> Result<(Vec<Value>, Vec<String>)> {
    let (mut payloads, mut unreadable) = (Vec::new(), Vec::new());
    for path in files {
        let format = Format::of(path)
            .with_context(|| format!("{}: not a .json, .ndjson, .jsonl or .csv file", path.display()))?;
        let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        for r in read_records(&bytes, format, &path.display().to_string()).map_err(anyhow::Error::msg)? {
            match r.payload.and_then(|p| event::storable_payload(&p).map(|()| p)) {
                Ok(p) => payloads.push(p),
                Err(reason) => unreadable.push(format!("{}: {reason}", r.source)),
            }
        }
    }
    Ok((payloads, unreadable))
}

/// What became of an inbox file, and so where it goes after a run.
#[derive(Debug, Clone, Copy, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum FileStatus {
    Ingested,
    /// Its content was ingested before (by its SHA-256): skipped.
    Duplicate,
    /// Refused whole: nothing in it could be read.
    Failed,
    /// Still being written (changed within `[sources] settle`): left in the inbox for a later run.
    Later,
}

/// Moves a file into `archive/[duplicate|failed/]YYYY-MM-DD/`, never overwriting: a name taken
/// already gets a numeric suffix. Returns the new path.
pub fn archive(file: &Path, archive: &Path, how: FileStatus, day: chrono::NaiveDate) -> Result<PathBuf> {
    let mut dir = archive.to_path_buf();
    match how {
        FileStatus::Ingested => {}
        FileStatus::Duplicate => dir.push("duplicate"),
        FileStatus::Failed => dir.push("failed"),
        FileStatus::Later => anyhow::bail!("{} is still being written: it stays in the inbox", file.display()),
    }
    dir.push(day.format("%Y-%m-%d").to_string());
    std::fs::create_dir_all(&dir).with_context(|| format!("creating archive folder {}", dir.display()))?;
    let name = file.file_name().context("file without a name")?.to_string_lossy().into_owned();
    let mut dest = dir.join(&name);
    let mut n = 1;
    while dest.exists() {
        dest = dir.join(format!("{name}.{n}"));
        n += 1;
    }
    if std::fs::rename(file, &dest).is_err() {
        // Another file system: copy, then remove the original only once the copy is complete.
        std::fs::copy(file, &dest).with_context(|| format!("copying {} to {}", file.display(), dest.display()))?;
        std::fs::File::open(&dest).and_then(|f| f.sync_all())?;
        std::fs::remove_file(file).with_context(|| format!("removing {} after archiving it", file.display()))?;
    }
    Ok(dest)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn payloads(bytes: &str, format: Format) -> Vec<(String, Result<Value, String>)> {
        read_records(bytes.as_bytes(), format, "inbox/f").unwrap().into_iter().map(|r| (r.source, r.payload)).collect()
    }

    #[test]
    fn json_array_positions_are_lines() {
        let got = payloads("[\n  {\"a\": 1},\n  {\n    \"b\": 2\n  }\n]\n", Format::Json);
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].0, "inbox/f:2");
        assert_eq!(got[1].0, "inbox/f:3");
    }

    #[test]
    fn json_array_records_come_one_at_a_time_and_a_bad_byte_rejects_its_element_alone() {
        let bytes = b"[\n{\"a\": 1},\n{\"b\": \"\xE3\"},\n{\"c\": 3}\n]\n";
        let mut records = records(&bytes[..], Format::Json, "inbox/f.json").unwrap();
        let first = records.next().unwrap().unwrap();
        assert_eq!((first.source.as_str(), first.payload), ("inbox/f.json:2", Ok(serde_json::json!({"a": 1}))));
        let bad = records.next().unwrap().unwrap();
        assert_eq!(bad.source, "inbox/f.json:3");
        assert_eq!(bad.payload, Err("not UTF-8 text: byte 0xE3 at line 3, column 8".to_owned()));
        assert_eq!(bad.raw, "{\"b\": \"\u{FFFD}\"}");
        assert_eq!(records.next().unwrap().unwrap().payload, Ok(serde_json::json!({"c": 3})));
        assert!(records.next().is_none());
    }

    #[test]
    fn json_single_object() {
        let got = payloads("\n{\"EventTime\": \"x\"}", Format::Json);
        assert_eq!(got[0].0, "inbox/f:2");
    }

    #[test]
    fn invalid_json_document_fails_the_file() {
        let err = read_records(b"[{\"a\": 1},", Format::Json, "inbox/f.json").unwrap_err();
        assert!(err.starts_with("inbox/f.json: the JSON array is not closed"), "{err}");
    }

    #[test]
    fn ndjson_bad_line_does_not_stop_others() {
        let got = payloads("{\"a\":1}\n\nnot json\n{\"b\":2}\n", Format::Ndjson);
        assert_eq!(got.iter().map(|g| g.0.as_str()).collect::<Vec<_>>(), ["inbox/f:1", "inbox/f:3", "inbox/f:4"]);
        assert!(got[1].1.as_ref().unwrap_err().starts_with("not valid JSON"));
        assert!(got[2].1.is_ok());
    }

    #[test]
    fn csv_columns_become_payload() {
        let got = payloads(
            "SessionId,EventTime,crmCaseId,empty,Metadata\n,2018-10-15T09:00:00Z,C-77,,\"{\"\"priority\"\":\"\"high\"\"}\"\ns1,2018-10-15T09:00:00Z,,,\n",
            Format::Csv,
        );
        assert_eq!(got[0].0, "inbox/f:2");
        assert_eq!(
            got[0].1.as_ref().unwrap(),
            &serde_json::json!({"EventTime": "2018-10-15T09:00:00Z", "Metadata": {"priority": "high", "crmCaseId": "C-77"}})
        );
        assert_eq!(got[1].1.as_ref().unwrap()["SessionId"], "s1");
    }

    #[test]
    fn csv_master_id_column_addresses_a_group_and_is_not_metadata() {
        let got = payloads(
            "EventTime,masterid,caseStatus\n2018-10-15T09:00:00Z, grp-7 ,open\n2018-10-15T09:00:00Z,,closed\n",
            Format::Csv,
        );
        assert_eq!(
            got[0].1.as_ref().unwrap(),
            &serde_json::json!({"MasterId": "grp-7", "EventTime": "2018-10-15T09:00:00Z", "Metadata": {"caseStatus": "open"}})
        );
        assert_eq!(
            got[1].1.as_ref().unwrap(),
            &serde_json::json!({"EventTime": "2018-10-15T09:00:00Z", "Metadata": {"caseStatus": "closed"}})
        );
    }

    #[test]
    fn csv_bad_metadata_and_short_row_are_records_not_file_errors() {
        let got = payloads(
            "EventTime,Metadata\n2018-10-15T09:00:00Z,{oops\n2018-10-15T09:00:00Z\n2018-10-15T09:00:00Z,\n",
            Format::Csv,
        );
        assert_eq!(got.len(), 3);
        assert!(got[0].1.as_ref().unwrap_err().contains("Metadata column is not valid JSON"));
        assert!(got[1].1.as_ref().unwrap_err().contains("bad CSV row"));
        assert_eq!(got[1].0, "inbox/f:3");
        assert!(got[2].1.is_ok());
    }

    #[test]
    fn csv_without_event_time_fails_the_file() {
        let err = read_records(b"SessionId,When\ns,x\n", Format::Csv, "inbox/f.csv").unwrap_err();
        assert!(err.contains("no EventTime column"), "{err}");
    }
}
