//! Cutting a file into records at line breaks (`\n`, `\r\n` or a lone `\r`) as it streams,
//! counting lines; for CSV, not inside a quoted field.

use std::io::BufRead;

use super::text::{Record, Records};

/// Splits a file into records at line breaks (`\n`, `\r\n` or a lone `\r`), counting lines;
/// for CSV, not at line breaks inside a quoted field (quotes as the csv crate reads them: a
/// field is quoted when it starts with `"`).
pub(super) struct Splitter<R> {
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
    pub(super) fn new(reader: R, csv: bool) -> Self {
        Splitter { reader, csv, line: 1, after_cr: false, skip_lf: false }
    }

    /// The next record: its first line and its bytes (without the line break); `None` at the end.
    pub(super) fn next_record(&mut self) -> std::io::Result<Option<(usize, Vec<u8>)>> {
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

/// The records `split` cuts, but blank ones, as `record` makes them from their first line and
/// bytes.
pub(super) fn each_record<'r, R: BufRead + Send + 'r>(
    mut split: Splitter<R>,
    blank: fn(&[u8]) -> bool,
    record: impl Fn(usize, &[u8]) -> Record + Send + 'r,
) -> Records<'r> {
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
