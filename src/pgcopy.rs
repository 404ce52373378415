//! Decoding PostgreSQL's binary COPY format into columns, for reading call data fast.
//!
//! The format: an 11-byte signature, flags and a header extension, then per row a field count
//! (`-1` ends the data) and per field a length (`-1` for null) and the value in the type's binary
//! form. Only `text` and `timestamptz` are needed here.

use anyhow::{Result, bail, ensure};

const SIGNATURE: &[u8] = b"PGCOPY\n\xff\r\n\0";
/// Microseconds between the Unix epoch and PostgreSQL's (2000-01-01).
const PG_EPOCH_MICROS: i64 = 946_684_800_000_000;

/// What a column is decoded as.
#[derive(Debug, Clone, Copy)]
pub enum Kind {
    Text,
    /// Microseconds since the Unix epoch.
    Timestamp,
    /// A `tid` (`ctid`), decoded to its block number.
    Block,
}

/// A column of text values in one buffer: their bytes end to end, and where each ends. Calls are
/// decoded into these: a `String` per value cost an allocation each, 20 million in a rematch of
/// 5M calls, and 56 bytes or more a value where this holds its bytes and 9.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Texts {
    bytes: String,
    /// Where each value ends in `bytes` (a null ends where it starts).
    ends: Vec<usize>,
    null: Vec<bool>,
}

impl Texts {
    pub fn len(&self) -> usize {
        self.ends.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }

    /// The value at `i`; `None` for a null.
    pub fn get(&self, i: usize) -> Option<&str> {
        if self.null[i] {
            return None;
        }
        let start = if i == 0 { 0 } else { self.ends[i - 1] };
        Some(&self.bytes[start..self.ends[i]])
    }

    /// The value at `i` of a column without nulls (a null reads as the empty text).
    pub fn str(&self, i: usize) -> &str {
        self.get(i).unwrap_or_default()
    }

    /// Whether some value is null.
    pub fn has_nulls(&self) -> bool {
        self.null.contains(&true)
    }

    pub fn push(&mut self, value: Option<&str>) {
        if let Some(v) = value {
            self.bytes.push_str(v);
        }
        self.ends.push(self.bytes.len());
        self.null.push(value.is_none());
    }

    /// Appends the value `write` leaves at the end of the buffer, or a null when it returns false
    /// (whatever it wrote is dropped): a value made in place, without a `String` of its own.
    pub fn push_with(&mut self, write: impl FnOnce(&mut String) -> bool) {
        let start = self.bytes.len();
        let valid = write(&mut self.bytes);
        if !valid {
            self.bytes.truncate(start);
        }
        self.ends.push(self.bytes.len());
        self.null.push(!valid);
    }

    pub fn iter(&self) -> impl Iterator<Item = Option<&str>> + '_ {
        (0..self.len()).map(|i| self.get(i))
    }

    /// Appends `other`'s values after this column's.
    pub fn append(&mut self, other: Texts) {
        let base = self.bytes.len();
        self.bytes.push_str(&other.bytes);
        self.ends.extend(other.ends.into_iter().map(|end| end + base));
        self.null.extend(other.null);
    }
}

impl<S: AsRef<str>> FromIterator<Option<S>> for Texts {
    fn from_iter<I: IntoIterator<Item = Option<S>>>(iter: I) -> Self {
        let mut t = Texts::default();
        for v in iter {
            t.push(v.as_ref().map(AsRef::as_ref));
        }
        t
    }
}

#[derive(Debug, PartialEq)]
pub enum Column {
    Text(Texts),
    Timestamp(Vec<Option<i64>>),
    Block(Vec<Option<i64>>),
}

impl Column {
    /// The values of a column decoded as [`Kind::Text`].
    pub fn into_text(self) -> Texts {
        match self {
            Column::Text(v) => v,
            other => unreachable!("a text column was decoded as {other:?}"),
        }
    }
    /// The values of a column decoded as [`Kind::Timestamp`]: microseconds since the epoch.
    pub fn into_micros(self) -> Vec<Option<i64>> {
        match self {
            Column::Timestamp(v) => v,
            other => unreachable!("a timestamp column was decoded as {other:?}"),
        }
    }
    /// Appends `other`'s values after this column's; both are decoded as the same kind.
    pub fn append(&mut self, other: Column) {
        match (self, other) {
            (Column::Text(a), Column::Text(b)) => a.append(b),
            (Column::Timestamp(a), Column::Timestamp(b)) | (Column::Block(a), Column::Block(b)) => a.extend(b),
            _ => unreachable!("columns are appended to columns of the same kinds"),
        }
    }
    /// The values of a column decoded as [`Kind::Block`]: block numbers.
    pub fn into_blocks(self) -> Vec<Option<i64>> {
        match self {
            Column::Block(v) => v,
            other => unreachable!("a tid column was decoded as {other:?}"),
        }
    }
}

/// Incremental reader of a COPY stream's rows: feed it the chunks in order, and it hands each
/// complete row's fields (bytes in the types' binary forms, `None` for null) to a callback. For
/// streams too big to hold (`verify` reads every call); [`Decoder`] collects columns with it.
pub struct RowReader {
    fields: usize,
    buf: Vec<u8>,
    header_done: bool,
    finished: bool,
}

impl RowReader {
    pub fn new(fields: usize) -> Self {
        RowReader { fields, buf: Vec::new(), header_done: false, finished: false }
    }

    /// Hands every complete row in `chunk` (plus what was left over from earlier chunks) to `row`.
    pub fn feed(&mut self, chunk: &[u8], mut row: impl FnMut(&[Option<&[u8]>]) -> Result<()>) -> Result<()> {
        self.buf.extend_from_slice(chunk);
        let mut pos = 0;
        if !self.header_done {
            if self.buf.len() < SIGNATURE.len() + 8 {
                return Ok(());
            }
            ensure!(&self.buf[..SIGNATURE.len()] == SIGNATURE, "not a binary COPY stream");
            let ext = i32_at(&self.buf, SIGNATURE.len() + 4) as usize;
            if self.buf.len() < SIGNATURE.len() + 8 + ext {
                return Ok(());
            }
            pos = SIGNATURE.len() + 8 + ext;
            self.header_done = true;
        }
        let mut values: Vec<Option<&[u8]>> = Vec::with_capacity(self.fields);
        loop {
            let Some(row_end) = self.row_end(pos)? else { break };
            if row_end == usize::MAX {
                self.finished = true;
                pos += 2;
                break;
            }
            let mut p = pos + 2;
            values.clear();
            for _ in 0..self.fields {
                let len = i32_at(&self.buf, p);
                p += 4;
                values.push((len >= 0).then(|| &self.buf[p..p + len as usize]));
                p += len.max(0) as usize;
            }
            row(&values)?;
            pos = row_end;
        }
        drop(values);
        self.buf.drain(..pos);
        Ok(())
    }

    /// The end of the row starting at `pos` if it is complete, `usize::MAX` for the trailer.
    fn row_end(&self, pos: usize) -> Result<Option<usize>> {
        if self.buf.len() < pos + 2 {
            return Ok(None);
        }
        let fields = i16::from_be_bytes([self.buf[pos], self.buf[pos + 1]]);
        if fields == -1 {
            return Ok(Some(usize::MAX));
        }
        if fields as usize != self.fields {
            bail!("COPY row has {fields} fields, expected {}", self.fields);
        }
        let mut p = pos + 2;
        for _ in 0..fields {
            if self.buf.len() < p + 4 {
                return Ok(None);
            }
            p += 4 + i32_at(&self.buf, p).max(0) as usize;
        }
        Ok((p <= self.buf.len()).then_some(p))
    }

    /// Checks that the whole stream has been fed.
    pub fn finish(self) -> Result<()> {
        ensure!(self.finished && self.buf.is_empty(), "the COPY stream ended early");
        Ok(())
    }
}

/// A `bigint` in binary form.
pub fn int8(b: &[u8]) -> Result<i64> {
    ensure!(b.len() == 8, "bigint of {} bytes", b.len());
    Ok(i64::from_be_bytes(b.try_into().expect("8 bytes")))
}

/// A `timestamptz` in binary form, as microseconds since the Unix epoch.
pub fn timestamp(b: &[u8]) -> Result<i64> {
    ensure!(b.len() == 8, "timestamptz of {} bytes", b.len());
    Ok(i64::from_be_bytes(b.try_into().expect("8 bytes")) + PG_EPOCH_MICROS)
}

/// A `timestamptz` in binary form, as a time.
pub fn datetime(b: &[u8]) -> Result<chrono::DateTime<chrono::Utc>> {
    chrono::DateTime::from_timestamp_micros(timestamp(b)?).ok_or_else(|| anyhow::anyhow!("a timestamp out of range"))
}

/// A `tid` in binary form: the block (u32) then the line pointer (u16), big-endian.
pub fn tid(b: &[u8]) -> Result<(u32, u16)> {
    ensure!(b.len() == 6, "tid of {} bytes", b.len());
    Ok((u32::from_be_bytes(b[..4].try_into().expect("4 bytes")), u16::from_be_bytes([b[4], b[5]])))
}

/// A `text` value in binary form (its UTF-8 bytes).
pub fn text(b: &[u8]) -> Result<&str> {
    std::str::from_utf8(b).map_err(|e| anyhow::anyhow!("text that is not UTF-8: {e}"))
}

/// Incremental decoder into columns: feed it the chunks of a COPY stream in order.
pub struct Decoder {
    kinds: Vec<Kind>,
    pub columns: Vec<Column>,
    rows: RowReader,
}

impl Decoder {
    pub fn new(kinds: &[Kind]) -> Self {
        Self::with_capacity(kinds, 0)
    }

    /// A decoder with room for `rows` rows (texts of up to 16 bytes on average) before a column
    /// grows: growing one copies it, into fresh pages the kernel zeroes first (Vecs growing were
    /// a seventh of a 1× rematch's own `perf` samples, most of them in the kernel). Room never
    /// written to is not memory the process holds.
    pub fn with_capacity(kinds: &[Kind], rows: usize) -> Self {
        let columns = kinds
            .iter()
            .map(|k| match k {
                Kind::Text => Column::Text(Texts {
                    bytes: String::with_capacity(rows * 16),
                    ends: Vec::with_capacity(rows),
                    null: Vec::with_capacity(rows),
                }),
                Kind::Timestamp => Column::Timestamp(Vec::with_capacity(rows)),
                Kind::Block => Column::Block(Vec::with_capacity(rows)),
            })
            .collect();
        Decoder { kinds: kinds.to_vec(), columns, rows: RowReader::new(kinds.len()) }
    }

    /// Decodes every complete row in `chunk` (plus what was left over from earlier chunks).
    pub fn feed(&mut self, chunk: &[u8]) -> Result<()> {
        let Decoder { kinds, columns, rows } = self;
        rows.feed(chunk, |values| {
            for ((col, kind), value) in columns.iter_mut().zip(kinds.iter()).zip(values) {
                match (col, kind) {
                    (Column::Text(v), Kind::Text) => match value.map(std::str::from_utf8) {
                        None => v.push(None),
                        Some(Ok(text)) => v.push(Some(text)),
                        // PostgreSQL sends UTF-8; should some value not be, it is read as lossily.
                        Some(Err(_)) => v.push(value.map(String::from_utf8_lossy).as_deref()),
                    },
                    (Column::Timestamp(v), Kind::Timestamp) => v.push(value.map(timestamp).transpose()?),
                    (Column::Block(v), Kind::Block) => {
                        v.push(value.map(|b| tid(b).map(|t| i64::from(t.0))).transpose()?)
                    }
                    _ => unreachable!("columns are built from kinds"),
                }
            }
            Ok(())
        })
    }

    /// The columns, once the whole stream has been fed.
    pub fn finish(self) -> Result<Vec<Column>> {
        self.rows.finish()?;
        Ok(self.columns)
    }
}

fn i32_at(b: &[u8], at: usize) -> i32 {
    i32::from_be_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

/// Runs `copy (…) to stdout (format binary)` and decodes the result into columns of `kinds`,
/// with room for `rows` rows from the start ([`Decoder::with_capacity`]): a guess, 0 for none.
pub async fn read(conn: &mut sqlx::PgConnection, sql: &str, kinds: &[Kind], rows: usize) -> Result<Vec<Column>> {
    use futures_util::TryStreamExt as _;
    let mut decoder = Decoder::with_capacity(kinds, rows);
    let mut stream = conn.copy_out_raw(sql).await?;
    while let Some(chunk) = stream.try_next().await? {
        decoder.feed(&chunk)?;
    }
    drop(stream);
    decoder.finish()
}

/// Runs `copy (…) to stdout (format binary)` and hands each row's `fields` (binary forms, `None`
/// for null) to `row` as they arrive: for streams too big to hold.
pub async fn for_each_row(
    conn: &mut sqlx::PgConnection,
    sql: &str,
    fields: usize,
    mut row: impl FnMut(&[Option<&[u8]>]) -> Result<()>,
) -> Result<()> {
    use futures_util::TryStreamExt as _;
    let mut rows = RowReader::new(fields);
    let mut stream = conn.copy_out_raw(sql).await?;
    while let Some(chunk) = stream.try_next().await? {
        rows.feed(&chunk, &mut row)?;
    }
    drop(stream);
    rows.finish()
}

/// A SQL string literal, for COPY, which takes no bind parameters: the one way text from a job
/// file or the command line goes into SQL text. It can only be built by [`Literal::new`], which
/// writes the escape-string form (`E'…'`, quotes and backslashes doubled): it reads as the same
/// text whatever `standard_conforming_strings` is, so no text can end it early.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Literal(String);

impl Literal {
    pub fn new(text: &str) -> Self {
        Literal(format!("E'{}'", text.replace('\\', "\\\\").replace('\'', "''")))
    }
}

impl std::fmt::Display for Literal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stream(rows: &[(Option<&str>, Option<i64>)]) -> Vec<u8> {
        let mut b = SIGNATURE.to_vec();
        b.extend_from_slice(&0i32.to_be_bytes());
        b.extend_from_slice(&0i32.to_be_bytes());
        for (text, ts) in rows {
            b.extend_from_slice(&2i16.to_be_bytes());
            match text {
                Some(t) => {
                    b.extend_from_slice(&(t.len() as i32).to_be_bytes());
                    b.extend_from_slice(t.as_bytes());
                }
                None => b.extend_from_slice(&(-1i32).to_be_bytes()),
            }
            match ts {
                Some(t) => {
                    b.extend_from_slice(&8i32.to_be_bytes());
                    b.extend_from_slice(&(t - PG_EPOCH_MICROS).to_be_bytes());
                }
                None => b.extend_from_slice(&(-1i32).to_be_bytes()),
            }
        }
        b.extend_from_slice(&(-1i16).to_be_bytes());
        b
    }

    #[test]
    fn decodes_rows_split_at_every_byte() {
        let rows = [(Some("c1"), Some(1_700_000_000_000_000)), (None, None), (Some("é"), Some(0))];
        let bytes = stream(&rows);
        for split in 1..bytes.len() {
            let mut d = Decoder::new(&[Kind::Text, Kind::Timestamp]);
            d.feed(&bytes[..split]).unwrap();
            d.feed(&bytes[split..]).unwrap();
            let cols = d.finish().unwrap();
            let texts: Texts = [Some("c1"), None, Some("é")].into_iter().collect();
            assert_eq!(cols[0], Column::Text(texts), "split at {split}");
            assert_eq!(cols[1], Column::Timestamp(vec![Some(1_700_000_000_000_000), None, Some(0)]));
        }
    }

    #[test]
    fn columns_decoded_apart_and_appended_are_the_columns_decoded_at_once() {
        let rows = [(Some("c1"), Some(1)), (None, None), (Some(""), Some(2)), (Some("é"), Some(3)), (Some("c5"), None)];
        let decode = |rows: &[(Option<&str>, Option<i64>)]| {
            let mut d = Decoder::new(&[Kind::Text, Kind::Timestamp]);
            d.feed(&stream(rows)).unwrap();
            d.finish().unwrap()
        };
        let whole = decode(&rows);
        for split in 0..=rows.len() {
            let mut first = decode(&rows[..split]);
            for (column, later) in first.iter_mut().zip(decode(&rows[split..])) {
                column.append(later);
            }
            assert_eq!(first, whole, "split at {split}");
        }
    }

    #[test]
    fn texts_keep_nulls_and_empty_values_apart() {
        let mut t: Texts = [Some("a"), None, Some(""), Some("héllo")].into_iter().collect();
        t.push_with(|b| {
            b.push_str("dropped");
            false
        });
        t.push_with(|b| {
            b.push_str("kept");
            true
        });
        let all: Vec<Option<&str>> = t.iter().collect();
        assert_eq!(all, [Some("a"), None, Some(""), Some("héllo"), None, Some("kept")]);
        assert_eq!((t.len(), t.has_nulls(), t.str(1)), (6, true, ""));
    }

    #[test]
    fn a_tid_decodes_to_its_block() {
        let mut b = SIGNATURE.to_vec();
        b.extend_from_slice(&[0; 8]);
        b.extend_from_slice(&1i16.to_be_bytes());
        b.extend_from_slice(&6i32.to_be_bytes());
        b.extend_from_slice(&3_000_000_000u32.to_be_bytes());
        b.extend_from_slice(&7u16.to_be_bytes());
        b.extend_from_slice(&(-1i16).to_be_bytes());
        let mut d = Decoder::new(&[Kind::Block]);
        d.feed(&b).unwrap();
        assert_eq!(d.finish().unwrap(), vec![Column::Block(vec![Some(3_000_000_000)])]);
    }

    #[test]
    fn a_truncated_stream_is_an_error() {
        let bytes = stream(&[(Some("c1"), Some(1))]);
        let mut d = Decoder::new(&[Kind::Text, Kind::Timestamp]);
        d.feed(&bytes[..bytes.len() - 2]).unwrap();
        assert!(d.finish().is_err());
    }

    #[test]
    fn literals_double_quotes() {
        assert_eq!(Literal::new("it's").to_string(), "E'it''s'");
        assert_eq!(Literal::new(r"a\'; drop table calls; --").to_string(), r"E'a\\''; drop table calls; --'");
    }
}
