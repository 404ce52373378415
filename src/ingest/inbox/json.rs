//! JSON and NDJSON files: a JSON document's values found by stepping over their text (a bad one
//! skipped as a whole, an array cut short refusing the file), an NDJSON file a line at a time.

use std::io::BufRead;

use serde_json::Value;

use super::lines::{Splitter, each_record};
use super::text::{Record, Records, Text};

/// A JSON file's records: its text is read whole (whether its array is closed is known at its
/// end), its shape checked, then its records parsed and handed on one at a time.
pub(super) fn records<'r, R: BufRead + Send + 'r>(mut reader: R, label: &str) -> Result<Records<'r>, String> {
    let mut bytes = Vec::new();
    reader.read_to_end(&mut bytes).map_err(|e| format!("{label}: cannot read the file ({e})"))?;
    let text = Text::owned(bytes);
    // The document's shape first (values found, none parsed): an array cut short refuses
    // the file before any of its events is handed on. Then its records, one at a time.
    let values = JsonValues::new(&text.text, label)?;
    let mut check = values.clone();
    while check.next(&text.text, label)?.is_some() {}
    Ok(Box::new(JsonRecords { text, values, label: label.to_owned() }))
}

/// An NDJSON file's records, a line at a time.
pub(super) fn ndjson_records<'r, R: BufRead + Send + 'r>(reader: R, label: &str) -> Records<'r> {
    let label = label.to_owned();
    // Blank as JSON sees it.
    let blank = |bytes: &[u8]| bytes.iter().all(|b| matches!(b, b' ' | b'\t'));
    each_record(Splitter::new(reader, false), blank, move |line, bytes| {
        Text::at_line(bytes, line).record(&label, 0..bytes.len(), json_payload)
    })
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
