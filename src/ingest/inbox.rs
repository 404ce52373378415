//! Dropped files: which files are picked, how each format becomes records with positions, and
//! where files go afterwards (the archive; never deleted).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde_json::{Map, Value};

/// One record read from a file, before it is parsed as an event.
#[derive(Debug, Clone)]
pub struct Record {
    /// `inbox/crm.ndjson:17`.
    pub source: String,
    /// The payload, or why the record could not even be read (not JSON, bad CSV row).
    pub payload: Result<Value, String>,
    pub raw: String,
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

/// The records of a file's content. `Err` when the file as a whole cannot be read (invalid JSON
/// document, a CSV without an EventTime column, not UTF-8): the reason names the file.
pub fn read_records(bytes: &[u8], format: Format, label: &str) -> Result<Vec<Record>, String> {
    let text = std::str::from_utf8(bytes).map_err(|e| format!("{label}: not UTF-8 text ({e})"))?;
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    match format {
        Format::Json => json_records(text, label),
        Format::Ndjson => Ok(ndjson_records(text, label)),
        Format::Csv => csv_records(text, label),
    }
}

fn json_records(text: &str, label: &str) -> Result<Vec<Record>, String> {
    let line_of = |sub: &str| {
        let offset = sub.as_ptr() as usize - text.as_ptr() as usize;
        text[..offset].matches('\n').count() + 1
    };
    if text.trim_start().starts_with('[') {
        let items: Vec<&serde_json::value::RawValue> =
            serde_json::from_str(text).map_err(|e| format!("{label}: not a valid JSON array ({e})"))?;
        Ok(items
            .into_iter()
            .map(|raw| Record {
                source: format!("{label}:{}", line_of(raw.get())),
                payload: serde_json::from_str(raw.get()).map_err(|e| format!("not valid JSON ({e})")),
                raw: raw.get().to_owned(),
            })
            .collect())
    } else {
        let value: Value = serde_json::from_str(text).map_err(|e| format!("{label}: not valid JSON ({e})"))?;
        let start = text.len() - text.trim_start().len();
        Ok(vec![Record {
            source: format!("{label}:{}", line_of(&text[start..])),
            payload: Ok(value),
            raw: text.trim().to_owned(),
        }])
    }
}

fn ndjson_records(text: &str, label: &str) -> Vec<Record> {
    text.lines()
        .enumerate()
        .filter(|(_, line)| !line.trim().is_empty())
        .map(|(i, line)| Record {
            source: format!("{label}:{}", i + 1),
            payload: serde_json::from_str(line).map_err(|e| format!("not valid JSON ({e})")),
            raw: line.to_owned(),
        })
        .collect()
}

fn csv_records(text: &str, label: &str) -> Result<Vec<Record>, String> {
    let mut reader = csv::ReaderBuilder::new().has_headers(true).from_reader(text.as_bytes());
    let headers = reader.headers().map_err(|e| format!("{label}: cannot read the CSV header ({e})"))?.clone();
    let find = |name: &str| headers.iter().position(|h| h.trim().eq_ignore_ascii_case(name));
    let (session_col, time_col, meta_col) = (find("SessionId"), find("EventTime"), find("Metadata"));
    if time_col.is_none() {
        return Err(format!(
            "{label}: the CSV header has no EventTime column (found: {})",
            headers.iter().collect::<Vec<_>>().join(", ")
        ));
    }

    let mut out = Vec::new();
    for row in reader.records() {
        let (line, payload, raw) = match row {
            Err(e) => {
                let line = e.position().map_or(0, |p| p.line());
                (line, Err(format!("bad CSV row ({e})")), String::new())
            }
            Ok(rec) => {
                let line = rec.position().map_or(0, |p| p.line());
                let raw = rec.iter().collect::<Vec<_>>().join(",");
                (line, csv_payload(&headers, &rec, session_col, time_col, meta_col), raw)
            }
        };
        out.push(Record { source: format!("{label}:{line}"), payload, raw });
    }
    Ok(out)
}

/// A CSV row as an event payload: SessionId and EventTime columns, a Metadata column holding a
/// JSON object, and every other non-empty column as a string field of Metadata (a column wins
/// over the same key inside the Metadata column).
fn csv_payload(
    headers: &csv::StringRecord,
    rec: &csv::StringRecord,
    session_col: Option<usize>,
    time_col: Option<usize>,
    meta_col: Option<usize>,
) -> Result<Value, String> {
    let cell = |i: Option<usize>| i.and_then(|i| rec.get(i)).map(str::trim).filter(|s| !s.is_empty());
    let mut metadata = match cell(meta_col) {
        None => Value::Object(Map::new()),
        Some(m) => serde_json::from_str(m).map_err(|e| format!("the Metadata column is not valid JSON ({e})"))?,
    };
    if let Value::Object(fields) = &mut metadata {
        for (i, (name, value)) in headers.iter().zip(rec.iter()).enumerate() {
            if Some(i) == session_col || Some(i) == time_col || Some(i) == meta_col || value.trim().is_empty() {
                continue;
            }
            fields.insert(name.trim().to_owned(), Value::String(value.to_owned()));
        }
    }
    let mut payload = Map::new();
    if let Some(s) = cell(session_col) {
        payload.insert("SessionId".into(), Value::String(s.to_owned()));
    }
    if let Some(t) = cell(time_col) {
        payload.insert("EventTime".into(), Value::String(t.to_owned()));
    }
    payload.insert("Metadata".into(), metadata);
    Ok(Value::Object(payload))
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
            match r.payload {
                Ok(p) => payloads.push(p),
                Err(reason) => unreadable.push(format!("{}: {reason}", r.source)),
            }
        }
    }
    Ok((payloads, unreadable))
}

/// Where a file goes after a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disposition {
    Ingested,
    Duplicate,
    Failed,
}

/// Moves a file into `archive/[duplicate|failed/]YYYY-MM-DD/`, never overwriting: a name taken
/// already gets a numeric suffix. Returns the new path.
pub fn archive(file: &Path, archive: &Path, how: Disposition, day: chrono::NaiveDate) -> Result<PathBuf> {
    let mut dir = archive.to_path_buf();
    match how {
        Disposition::Ingested => {}
        Disposition::Duplicate => dir.push("duplicate"),
        Disposition::Failed => dir.push("failed"),
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
    fn json_single_object() {
        let got = payloads("\n{\"EventTime\": \"x\"}", Format::Json);
        assert_eq!(got[0].0, "inbox/f:2");
    }

    #[test]
    fn invalid_json_document_fails_the_file() {
        let err = read_records(b"[{\"a\": 1},", Format::Json, "inbox/f.json").unwrap_err();
        assert!(err.starts_with("inbox/f.json: not a valid JSON array"), "{err}");
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
