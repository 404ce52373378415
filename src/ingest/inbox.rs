//! Dropped files: which files are picked, how each format becomes records with positions, and
//! where files go afterwards (the archive; never deleted).

use std::io::BufRead;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde_json::{Map, Value};

use crate::event::{self, Rejected};

/// One record read from a file, before it is parsed as an event.
#[derive(Debug, Clone)]
pub struct Record {
    /// `inbox/crm.ndjson:17`.
    pub source: String,
    /// The payload, or why the record could not even be read (not JSON, bad CSV row).
    pub payload: Result<Value, String>,
    pub raw: String,
}

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
pub fn records<'r, R: BufRead + Send + 'r>(
    mut reader: R,
    format: Format,
    label: &str,
) -> Result<Box<dyn Iterator<Item = std::io::Result<Record>> + Send + 'r>, String> {
    let cannot = |e: std::io::Error| format!("{label}: cannot read the file ({e})");
    // A byte-order mark is not content.
    if reader.fill_buf().map_err(cannot)?.starts_with(b"\xEF\xBB\xBF") {
        reader.consume(3);
    }
    match format {
        Format::Json => {
            let mut bytes = Vec::new();
            reader.read_to_end(&mut bytes).map_err(cannot)?;
            let text = Text::owned(bytes);
            // The document's shape first (values found, none parsed): an array cut short refuses
            // the file before any of its events is handed on. Then its records, one at a time.
            let values = JsonValues::new(&text.text, label)?;
            let mut check = values.clone();
            while check.next(&text.text, label)?.is_some() {}
            Ok(Box::new(JsonRecords { text, values, label: label.to_owned() }))
        }
        Format::Ndjson => {
            let label = label.to_owned();
            // Blank as JSON sees it.
            let blank = |bytes: &[u8]| bytes.iter().all(|b| matches!(b, b' ' | b'\t'));
            Ok(each_record(Splitter::new(reader, false), blank, move |line, bytes| {
                Text::at_line(bytes, line).record(&label, 0..bytes.len(), json_payload)
            }))
        }
        Format::Csv => csv_records(reader, label),
    }
}

/// A file's content as text: every byte that is not part of valid UTF-8 replaced by `?` (one
/// byte each, so offsets stay those of the file), with where they were, and where lines start.
struct Text<'b> {
    /// The file's bytes when some were not UTF-8 (else they are `text`'s).
    original: Option<std::borrow::Cow<'b, [u8]>>,
    text: std::borrow::Cow<'b, str>,
    /// Offsets of the bytes that were not UTF-8, ascending.
    bad: Vec<usize>,
    /// Offsets at which lines start (the first is 0).
    lines: Vec<usize>,
    /// The file's line number of the text's first line.
    first_line: usize,
}

impl<'b> Text<'b> {
    fn new(bytes: &'b [u8]) -> Self {
        match std::str::from_utf8(bytes) {
            Ok(t) => Self::of(None, std::borrow::Cow::Borrowed(t), Vec::new()),
            Err(_) => {
                let (text, bad) = replaced(bytes);
                Self::of(Some(std::borrow::Cow::Borrowed(bytes)), std::borrow::Cow::Owned(text), bad)
            }
        }
    }

    /// A whole file's text, owning its bytes (kept apart only when some are not UTF-8).
    fn owned(bytes: Vec<u8>) -> Text<'static> {
        match String::from_utf8(bytes) {
            Ok(t) => Text::of(None, std::borrow::Cow::Owned(t), Vec::new()),
            Err(e) => {
                let bytes = e.into_bytes();
                let (text, bad) = replaced(&bytes);
                Text::of(Some(std::borrow::Cow::Owned(bytes)), std::borrow::Cow::Owned(text), bad)
            }
        }
    }

    fn of(original: Option<std::borrow::Cow<'b, [u8]>>, text: std::borrow::Cow<'b, str>, bad: Vec<usize>) -> Self {
        let mut lines = vec![0];
        let b = text.as_bytes();
        for (i, &c) in b.iter().enumerate() {
            if c == b'\n' || (c == b'\r' && b.get(i + 1) != Some(&b'\n')) {
                lines.push(i + 1);
            }
        }
        Text { original, text, bad, lines, first_line: 1 }
    }

    fn bytes(&self) -> &[u8] {
        self.original.as_deref().unwrap_or(self.text.as_bytes())
    }

    /// A part of a file that starts at line `first_line`.
    fn at_line(bytes: &'b [u8], first_line: usize) -> Self {
        Text { first_line, ..Text::new(bytes) }
    }

    /// The 1-based line of the byte at `offset`.
    fn line_of(&self, offset: usize) -> usize {
        self.lines.partition_point(|&start| start <= offset) + self.first_line - 1
    }

    /// The first byte in `range` that was not UTF-8, as a reason naming its line.
    fn not_utf8(&self, range: std::ops::Range<usize>) -> Option<String> {
        let i = self.bad.partition_point(|&b| b < range.start);
        let at = *self.bad.get(i).filter(|&&b| b < range.end)?;
        let nth = self.lines.partition_point(|&start| start <= at);
        let (line, column) = (self.line_of(at), at - self.lines[nth - 1] + 1);
        Some(format!("not UTF-8 text: byte 0x{:02X} at line {line}, column {column}", self.bytes()[at]))
    }

    /// The record's text as read from the file (bytes that are not UTF-8 shown as U+FFFD), as
    /// much of it as a rejected record keeps (one byte more, so that it shows it was cut).
    fn raw(&self, range: std::ops::Range<usize>) -> String {
        let end = range.end.min(range.start + Rejected::MAX_RAW + 1);
        String::from_utf8_lossy(&self.bytes()[range.start..end]).into_owned()
    }

    /// The record of the bytes in `range`: rejected when they are not UTF-8, else what
    /// `payload` makes of their text.
    fn record(
        &self,
        label: &str,
        range: std::ops::Range<usize>,
        payload: impl FnOnce(&str) -> Result<Value, String>,
    ) -> Record {
        let payload = match self.not_utf8(range.clone()) {
            Some(reason) => Err(reason),
            None => payload(&self.text[range.clone()]),
        };
        Record { source: format!("{label}:{}", self.line_of(range.start)), payload, raw: self.raw(range) }
    }
}

/// `bytes` as text with every byte that is not part of valid UTF-8 replaced by `?` (one byte
/// each, so offsets stay those of the file), and where they were.
fn replaced(bytes: &[u8]) -> (String, Vec<usize>) {
    let mut bad = Vec::new();
    let mut out = Vec::with_capacity(bytes.len());
    for chunk in bytes.utf8_chunks() {
        out.extend_from_slice(chunk.valid().as_bytes());
        for _ in chunk.invalid() {
            bad.push(out.len());
            out.push(b'?');
        }
    }
    (String::from_utf8(out).expect("valid parts and ASCII"), bad)
}

/// A record's payload from its JSON text.
fn json_payload(text: &str) -> Result<Value, String> {
    serde_json::from_str(text).map_err(|e| format!("not valid JSON ({e})"))
}

/// The values of a JSON document (a top-level array's elements, or a sequence of values), each
/// as its byte range and, when it cannot be read, why; found by stepping over each value's text
/// (`RawValue`, nothing parsed). `Err`: the document as a whole cannot be read.
#[derive(Clone)]
struct JsonValues {
    pos: usize,
    in_array: bool,
    closed: bool,
}

type JsonValue = (std::ops::Range<usize>, Option<String>);

impl JsonValues {
    fn new(s: &str, label: &str) -> Result<JsonValues, String> {
        let pos = skip_ws(s, 0);
        if pos == s.len() {
            return Err(format!("{label}: not a JSON document (the file is empty)"));
        }
        let in_array = s[pos..].starts_with('[');
        Ok(JsonValues { pos: pos + usize::from(in_array), in_array, closed: !in_array })
    }

    fn next(&mut self, s: &str, label: &str) -> Result<Option<JsonValue>, String> {
        let not_closed = || {
            format!("{label}: the JSON array is not closed (the file looks cut short); nothing was ingested from it")
        };
        let open = |v: &JsonValues| v.in_array && !v.closed;
        loop {
            self.pos = skip_ws(s, self.pos);
            if self.pos >= s.len() {
                return if open(self) { Err(not_closed()) } else { Ok(None) };
            }
            if open(self) && s[self.pos..].starts_with(']') {
                self.closed = true;
                self.pos += 1;
                continue;
            }
            let start = self.pos;
            let mut values =
                serde_json::Deserializer::from_str(&s[start..]).into_iter::<&serde_json::value::RawValue>();
            let value = match values.next() {
                Some(Ok(_)) => {
                    let end = start + values.byte_offset();
                    (start..end, None)
                }
                Some(Err(e)) if e.is_eof() && open(self) => return Err(not_closed()),
                Some(Err(e)) => {
                    // Skip the bad value as a whole (to its closing bracket, or to the next comma)
                    // and go on with the next one.
                    let end = value_end(s, start, open(self)).max(start + 1);
                    let reason = if open(self) {
                        format!("not valid JSON ({e})")
                    } else {
                        format!("not valid JSON after the end of the document ({e})")
                    };
                    (start..end, Some(reason))
                }
                None => return if open(self) { Err(not_closed()) } else { Ok(None) },
            };
            self.pos = value.0.end;
            if open(self) {
                self.pos = skip_ws(s, self.pos);
                match s[self.pos..].chars().next() {
                    Some(',') => self.pos += 1,
                    Some(']') => {}
                    None => return Err(not_closed()),
                    Some(_) => {} // the next value is read (and rejected) from here
                }
            }
            return Ok(Some(value));
        }
    }
}

/// A JSON file's records, parsed one at a time from its text (whose shape was checked whole).
struct JsonRecords {
    text: Text<'static>,
    values: JsonValues,
    label: String,
}

impl Iterator for JsonRecords {
    type Item = std::io::Result<Record>;

    fn next(&mut self) -> Option<Self::Item> {
        let (range, bad) = self.values.next(&self.text.text, &self.label).expect("checked before")?;
        Some(Ok(match bad {
            None => self.text.record(&self.label, range, json_payload),
            Some(reason) => self.text.record(&self.label, range, |_| Err(reason)),
        }))
    }
}

fn skip_ws(s: &str, mut pos: usize) -> usize {
    let b = s.as_bytes();
    while pos < b.len() && matches!(b[pos], b' ' | b'\t' | b'\n' | b'\r') {
        pos += 1;
    }
    pos
}

/// Where the JSON value starting at `start` ends, for skipping a bad one: after its closing
/// bracket (brackets inside strings ignored) or, for anything else, at the next `,` (in an
/// array) or line break. A bracket that never closes ends at the line's end: the lines after it
/// are read again.
fn value_end(s: &str, start: usize, in_array: bool) -> usize {
    // In an array a bad value must end where the next one begins or the array ends; a bracket
    // it leaves open would otherwise swallow the elements after it, up to the array's own `]`.
    let fits = |end: &usize| !in_array || matches!(s[skip_ws(s, *end)..].chars().next(), Some(',' | ']'));
    balanced_end(s, start, in_array)
        .filter(fits)
        .unwrap_or_else(|| s[start..].find(['\n', '\r']).map_or(s.len(), |i| start + i))
}

fn balanced_end(s: &str, start: usize, in_array: bool) -> Option<usize> {
    let b = s.as_bytes();
    let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
    for (i, &c) in b.iter().enumerate().skip(start) {
        if in_string {
            match c {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match c {
            b'"' => in_string = true,
            b'{' | b'[' => depth += 1,
            b'}' | b']' if depth > 0 => {
                depth -= 1;
                if depth == 0 {
                    return Some(i + 1);
                }
            }
            b']' if in_array => return Some(i),
            b',' if depth == 0 && in_array => return Some(i),
            b'\n' | b'\r' if depth == 0 => return Some(i),
            _ => {}
        }
    }
    (depth == 0 && !in_string).then_some(b.len())
}

/// Splits a file into records at line breaks (`\n`, `\r\n` or a lone `\r`), counting lines;
/// for CSV, not at line breaks inside a quoted field (quotes as the csv crate reads them: a
/// field is quoted when it starts with `"`).
struct Splitter<R> {
    reader: R,
    csv: bool,
    /// The line the next byte is on.
    line: usize,
    /// The last byte read was a `\r`: a `\n` right after it is the same line break.
    after_cr: bool,
    /// That `\r` ended a record: the `\n` after it is not part of the next one.
    skip_lf: bool,
}

#[derive(Clone, Copy, PartialEq)]
enum Field {
    Start,
    Unquoted,
    Quoted,
    QuoteInQuoted,
}

impl<R: BufRead> Splitter<R> {
    fn new(reader: R, csv: bool) -> Self {
        Splitter { reader, csv, line: 1, after_cr: false, skip_lf: false }
    }

    /// The next record: its first line and its bytes (without the line break); `None` at the end.
    fn next_record(&mut self) -> std::io::Result<Option<(usize, Vec<u8>)>> {
        let mut record = Vec::new();
        let start = self.line;
        let mut field = Field::Start;
        loop {
            let buf = self.reader.fill_buf()?;
            if buf.is_empty() {
                return Ok((!record.is_empty()).then_some((start, record)));
            }
            let mut used = 0;
            let mut ended = false;
            for &b in buf {
                used += 1;
                let crlf = std::mem::take(&mut self.after_cr) && b == b'\n';
                if std::mem::take(&mut self.skip_lf) && crlf {
                    continue;
                }
                let line_break = b == b'\n' || b == b'\r';
                if line_break && !crlf {
                    self.line += 1;
                }
                self.after_cr = b == b'\r';
                if self.csv {
                    field = match (field, b) {
                        (Field::Quoted, b'"') => Field::QuoteInQuoted,
                        (Field::Quoted, _) => Field::Quoted,
                        (Field::QuoteInQuoted, b'"') | (Field::Start, b'"') => Field::Quoted,
                        (_, b',') => Field::Start,
                        (f, _) if line_break => f,
                        _ => Field::Unquoted,
                    };
                }
                if line_break && field != Field::Quoted {
                    self.skip_lf = b == b'\r';
                    ended = true;
                    break;
                }
                record.push(b);
            }
            self.reader.consume(used);
            if ended {
                return Ok(Some((start, record)));
            }
        }
    }
}

fn csv_records<'r, R: BufRead + Send + 'r>(
    reader: R,
    label: &str,
) -> Result<Box<dyn Iterator<Item = std::io::Result<Record>> + Send + 'r>, String> {
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

/// The records `split` cuts, but blank ones, as `record` makes them from their first line and
/// bytes.
fn each_record<'r, R: BufRead + Send + 'r>(
    mut split: Splitter<R>,
    blank: fn(&[u8]) -> bool,
    record: impl Fn(usize, &[u8]) -> Record + Send + 'r,
) -> Box<dyn Iterator<Item = std::io::Result<Record>> + Send + 'r> {
    Box::new(std::iter::from_fn(move || {
        loop {
            match split.next_record() {
                Ok(Some((_, bytes))) if blank(&bytes) => continue,
                Ok(Some((line, bytes))) => return Some(Ok(record(line, &bytes))),
                Ok(None) => return None,
                Err(e) => return Some(Err(e)),
            }
        }
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
