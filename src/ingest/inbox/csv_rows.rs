//! CSV files: a header naming the columns (EventTime required), then a record per row, a
//! quoted field free to hold line breaks; columns other than the event's own become Metadata.

use std::io::BufRead;

use serde_json::{Map, Value};

use super::lines::{Splitter, each_record};
use super::text::{Records, Text};

/// A CSV file's records, a row at a time after its header.
pub(super) fn records<'r, R: BufRead + Send + 'r>(reader: R, label: &str) -> Result<Records<'r>, String> {
    let mut split = Splitter::new(reader, true);
    let cannot = |e: std::io::Error| format!("{label}: cannot read the file ({e})");
    let header = loop {
        match split.next_record().map_err(cannot)? {
            None => return Err(format!("{label}: the CSV file is empty (no header row)")),
            Some((_, bytes)) if bytes.is_empty() => continue,
            Some((line, bytes)) => break (line, bytes),
        }
    };
    let text = Text::at_line(&header.1, header.0);
    if let Some(reason) = text.not_utf8(0..header.1.len()) {
        return Err(format!("{label}: the CSV header is {reason}"));
    }
    let headers = csv_row(&text.text).map_err(|e| format!("{label}: cannot read the CSV header ({e})"))?;
    let find = |name: &str| headers.iter().position(|h| h.trim().eq_ignore_ascii_case(name));
    let columns = Columns {
        session: find("SessionId"),
        master: find("MasterId"),
        time: find("EventTime"),
        metadata: find("Metadata"),
    };
    if columns.time.is_none() {
        return Err(format!(
            "{label}: the CSV header has no EventTime column (found: {})",
            headers.iter().collect::<Vec<_>>().join(", ")
        ));
    }
    let label = label.to_owned();
    Ok(each_record(split, <[u8]>::is_empty, move |line, bytes| {
        Text::at_line(bytes, line).record(&label, 0..bytes.len(), |row| match csv_row(row) {
            Err(e) => Err(format!("bad CSV row ({e})")),
            Ok(rec) if rec.len() != headers.len() => {
                Err(format!("bad CSV row ({} fields where the header has {})", rec.len(), headers.len()))
            }
            Ok(rec) => csv_payload(&headers, &rec, columns),
        })
    }))
}

/// One CSV record's fields.
fn csv_row(text: &str) -> Result<csv::StringRecord, String> {
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(false)
        .flexible(true)
        .buffer_capacity(text.len() + 1)
        .from_reader(text.as_bytes());
    let mut rec = csv::StringRecord::new();
    // Flexible: a row's field count is checked against the header by the caller.
    reader.read_record(&mut rec).map(|_| rec).map_err(|e| e.to_string())
}

/// Where the columns that are not Metadata fields are in a CSV header.
#[derive(Clone, Copy)]
struct Columns {
    session: Option<usize>,
    master: Option<usize>,
    time: Option<usize>,
    metadata: Option<usize>,
}

/// A CSV row as an event payload: SessionId, MasterId and EventTime columns, a Metadata column
/// holding a JSON object, and every other non-empty column as a string field of Metadata (a
/// column wins over the same key inside the Metadata column).
fn csv_payload(headers: &csv::StringRecord, rec: &csv::StringRecord, columns: Columns) -> Result<Value, String> {
    let cell = |i: Option<usize>| i.and_then(|i| rec.get(i)).map(str::trim).filter(|s| !s.is_empty());
    let mut metadata = match cell(columns.metadata) {
        None => Value::Object(Map::new()),
        Some(m) => serde_json::from_str(m).map_err(|e| format!("the Metadata column is not valid JSON ({e})"))?,
    };
    let own = [columns.session, columns.master, columns.time, columns.metadata];
    if let Value::Object(fields) = &mut metadata {
        for (i, (name, value)) in headers.iter().zip(rec.iter()).enumerate() {
            if own.contains(&Some(i)) || value.trim().is_empty() {
                continue;
            }
            fields.insert(name.trim().to_owned(), Value::String(value.to_owned()));
        }
    }
    let mut payload = Map::new();
    for (key, column) in [("SessionId", columns.session), ("MasterId", columns.master), ("EventTime", columns.time)] {
        if let Some(s) = cell(column) {
            payload.insert(key.into(), Value::String(s.to_owned()));
        }
    }
    payload.insert("Metadata".into(), metadata);
    Ok(Value::Object(payload))
}
