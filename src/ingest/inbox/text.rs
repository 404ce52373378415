//! A file's records as text with exact positions: lines counted the way an editor counts them,
//! bytes that are not UTF-8 found and named by line and column, and the [`Record`] a range of a
//! file makes.

use serde_json::Value;

use crate::event::Rejected;

/// One record read from a file, before it is parsed as an event.
#[derive(Debug, Clone)]
pub struct Record {
    /// `inbox/crm.ndjson:17`.
    pub source: String,
    /// The payload, or why the record could not even be read (not JSON, bad CSV row).
    pub payload: Result<Value, String>,
    pub raw: String,
}

/// The records of a file, one at a time; an item's `Err` is a failure to read the file itself.
pub type Records<'r> = Box<dyn Iterator<Item = std::io::Result<Record>> + Send + 'r>;

/// A file's content as text: every byte that is not part of valid UTF-8 replaced by `?` (one
/// byte each, so offsets stay those of the file), with where they were, and where lines start.
pub(super) struct Text<'b> {
    /// The file's bytes when some were not UTF-8 (else they are `text`'s).
    original: Option<std::borrow::Cow<'b, [u8]>>,
    pub(super) text: std::borrow::Cow<'b, str>,
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
    pub(super) fn owned(bytes: Vec<u8>) -> Text<'static> {
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
    pub(super) fn at_line(bytes: &'b [u8], first_line: usize) -> Self {
        Text { first_line, ..Text::new(bytes) }
    }

    /// The 1-based line of the byte at `offset`.
    fn line_of(&self, offset: usize) -> usize {
        self.lines.partition_point(|&start| start <= offset) + self.first_line - 1
    }

    /// The first byte in `range` that was not UTF-8, as a reason naming its line.
    pub(super) fn not_utf8(&self, range: std::ops::Range<usize>) -> Option<String> {
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
    pub(super) fn record(
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
