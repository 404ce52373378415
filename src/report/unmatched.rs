//! The run's unmatched events, streamed from the database a page at a time into
//! `unmatched.csv` and the `unmatched` list of `report.json`, while the run's transaction is
//! open (so the report shows what the run committed, and a dry run's report what it would have).
//! `report.html` gets a bounded sample ([`Shown`]) and counts over everything. Memory is bounded
//! by the page size and the sample, not by the backlog.

use std::collections::{BTreeMap, VecDeque};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result};
use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::PgConnection;

use super::types::{Shown, Unmatched};
use crate::decision::State;
use crate::tuning::ReportTuning;

/// File names in the report's partial folder.
pub const CSV: &str = "unmatched.csv";
pub const JSON_LIST: &str = "unmatched.json.part";

/// Buckets of the ageing chart: (label, lower bound in days).
pub const AGE_BUCKETS: &[(&str, f64)] =
    &[("< 1 day", 0.0), ("1–2 days", 1.0), ("2–3 days", 2.0), ("3–7 days", 3.0), ("≥ 7 days", 7.0)];

/// A row as read: the metadata as the JSON text PostgreSQL prints, parsed only for the CSV's
/// key columns and the events report.html shows.
type Row = (
    i64,
    String,
    Option<String>,
    Option<String>,
    DateTime<Utc>,
    DateTime<Utc>,
    String,
    Option<String>,
    Option<Vec<String>>,
    String,
);

/// An unmatched event report.html shows, its metadata still JSON text until it is shown.
struct Entry {
    event_id: i64,
    source: String,
    session_id: Option<String>,
    master_id: Option<String>,
    event_time: DateTime<Utc>,
    received_at: DateTime<Utc>,
    reason: String,
    last_reason: Option<String>,
    candidates: Vec<String>,
    expires_at: DateTime<Utc>,
    metadata: String,
}

impl Entry {
    fn into_unmatched(self) -> Unmatched {
        Unmatched {
            metadata: serde_json::from_str(&self.metadata).unwrap_or(Value::Null),
            event_id: self.event_id,
            source: self.source,
            session_id: self.session_id,
            master_id: self.master_id,
            event_time: self.event_time,
            received_at: self.received_at,
            reason: self.reason,
            last_reason: self.last_reason,
            candidates: self.candidates,
            expires_at: self.expires_at,
        }
    }
}

/// The events of the report, as SQL: every unmatched event of the job still pending, plus those
/// expired by the run; `job` and `run` are SQL (placeholders, or a literal and a number).
fn unmatched(job: &str, run: &str) -> String {
    format!("job = {job} and (state = 'pending' or (state = 'expired' and decided_run = {run}))")
}

/// Streams every unmatched event of `job` (still pending, or expired by `run_id`) into `partial`
/// ([`CSV`] and [`JSON_LIST`]), in `received_at`, id order, through a binary COPY on the run's
/// connection; returns the counts and the sample for `report.html`.
#[tracing::instrument(skip_all)]
pub async fn stream(
    conn: &mut PgConnection,
    job: &str,
    run_id: i64,
    pending_for: chrono::Duration,
    partial: &Path,
    tuning: ReportTuning,
) -> Result<Shown> {
    std::fs::create_dir_all(partial).with_context(|| format!("creating {}", partial.display()))?;
    let (keys, left_out) = csv_keys(conn, job, run_id, tuning.csv_key_columns).await?;
    // Binary COPY, decoded here: a cursor fetched through sqlx spent about twice PostgreSQL's
    // time decoding rows (1M events: 15 s against 5 s for the COPY alone). The job's name is a
    // literal (COPY takes no bind parameters), the run id a number.
    let sql = format!(
        "copy (select id, source, session_id, master_id, event_time, received_at, state, reason,
                      array_to_json(candidates)::text, metadata::text
               from events where {} order by received_at, id) to stdout (format binary)",
        unmatched(&crate::pgcopy::Literal::new(job).to_string(), &run_id.to_string())
    );

    // Pages are written on two blocking threads, report.json's list (with the counts and the
    // sample) and unmatched.csv, while the next page is read: formatting, not the read, sets
    // the pace (one thread: 5 s for 1M events).
    let (json_tx, mut json_rx) = tokio::sync::mpsc::channel::<Arc<Vec<Row>>>(1);
    let (csv_tx, mut csv_rx) = tokio::sync::mpsc::channel::<Arc<Vec<Row>>>(1);
    let mut writer = Writer::new(partial, pending_for, Utc::now(), tuning.shown_per_end)?;
    writer.shown.csv_keys_left_out = left_out;
    let mut csv = CsvWriter::new(partial, keys, pending_for)?;
    let writing = tokio::task::spawn_blocking(move || -> Result<Shown> {
        while let Some(rows) = json_rx.blocking_recv() {
            for row in rows.iter() {
                writer.add(row)?;
            }
        }
        writer.finish()
    });
    let writing_csv = tokio::task::spawn_blocking(move || -> Result<()> {
        while let Some(rows) = csv_rx.blocking_recv() {
            for row in rows.iter() {
                csv.row(row)?;
            }
        }
        csv.finish()
    });
    let read = async {
        use futures_util::TryStreamExt as _;
        let mut reader = crate::pgcopy::RowReader::new(10);
        let mut page: Vec<Row> = Vec::with_capacity(tuning.page);
        let mut stream = conn.copy_out_raw(&sql).await.context("reading unmatched events")?;
        let send = async |page: Vec<Row>| {
            let page = Arc::new(page);
            // Either fails only when its writer failed: that error is returned below.
            json_tx.send(page.clone()).await.is_ok() && csv_tx.send(page).await.is_ok()
        };
        while let Some(chunk) = stream.try_next().await.context("reading unmatched events")? {
            reader.feed(&chunk, |f| {
                page.push(decode(f)?);
                Ok(())
            })?;
            if page.len() >= tuning.page && !send(std::mem::take(&mut page)).await {
                return anyhow::Ok(());
            }
        }
        drop(stream);
        reader.finish()?;
        if !page.is_empty() {
            send(page).await;
        }
        anyhow::Ok(())
    };
    let read = read.await;
    drop((json_tx, csv_tx));
    let shown = writing.await.context("writing the unmatched events")??;
    writing_csv.await.context("writing the unmatched events")??;
    read?;
    tracing::debug!(events = shown.total, "unmatched events written");
    Ok(shown)
}

/// A row of the report's COPY, from its fields in binary form.
fn decode(f: &[Option<&[u8]>]) -> Result<Row> {
    use crate::pgcopy::{datetime, int8, text};
    let opt = |i: usize| -> Result<Option<String>> { f[i].map(|b| text(b).map(str::to_owned)).transpose() };
    let req = |i: usize| -> Result<&[u8]> { f[i].context("a null where the report needs a value") };
    let time = |i: usize| -> Result<DateTime<Utc>> { datetime(req(i)?) };
    let candidates = match f[8] {
        None => None,
        Some(b) => Some(serde_json::from_str::<Vec<String>>(text(b)?).context("candidates")?),
    };
    Ok((
        int8(req(0)?)?,
        text(req(1)?)?.to_owned(),
        opt(2)?,
        opt(3)?,
        time(4)?,
        time(5)?,
        text(req(6)?)?.to_owned(),
        opt(7)?,
        candidates,
        text(req(9)?)?.to_owned(),
    ))
}

/// The top-level metadata keys that get a column in `unmatched.csv`, alphabetical: all of them,
/// or the [`CSV_KEY_COLUMNS`] most frequent; and how many were left out.
async fn csv_keys(conn: &mut PgConnection, job: &str, run_id: i64, columns: usize) -> Result<(Vec<String>, u64)> {
    let rows: Vec<(String, i64)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "select k, count(*) over () from (
             select k, count(*) n
             from events e
             cross join lateral jsonb_object_keys(case jsonb_typeof(e.metadata) when 'object' then e.metadata else '{{}}' end) k
             where {}
             group by k
         ) s
         order by n desc, k
         limit $3",
        unmatched("$1", "$2")
    )))
    .bind(job)
    .bind(run_id)
    .bind(columns as i64)
    .fetch_all(&mut *conn)
    .await
    .context("reading the metadata keys of unmatched events")?;
    let all = rows.first().map_or(0, |r| r.1) as u64;
    let mut keys: Vec<String> = rows.into_iter().map(|r| r.0).collect();
    keys.sort_unstable();
    Ok((keys.clone(), all - keys.len() as u64))
}

/// The CSV's fixed columns, before one per metadata key. `resolve_to` and `note` are left
/// empty for an analyst to fill in and hand back (`callrecon resolve --file`).
const FIXED: [&str; 13] = [
    "event_id",
    "resolve_to",
    "note",
    "source",
    "session_id",
    "master_id",
    "event_time",
    "received_at",
    "expires_at",
    "reason",
    "last_reason",
    "candidates",
    "metadata",
];

/// The byte-order mark the file starts with: a spreadsheet opened by a double click (Excel)
/// reads the file as UTF-8 only when it is there, and shows `Müller` as it is.
pub const UTF8_BOM: &[u8] = b"\xEF\xBB\xBF";

/// The byte-order mark, then the header: the fixed columns, then one per metadata key, named by
/// the key (`metadata.KEY` for a key named like a fixed column, say `note`, so each name is one
/// column).
pub fn write_csv_header(mut out: impl Write, keys: &[String]) -> Result<()> {
    out.write_all(UTF8_BOM)?;
    let mut w = csv::Writer::from_writer(out);
    let key_columns =
        keys.iter().map(|k| if FIXED.contains(&k.as_str()) { format!("metadata.{k}") } else { k.clone() });
    w.write_record(FIXED.iter().map(|c| c.to_string()).chain(key_columns).map(|c| escape_cell(&c).into_owned()))?;
    w.flush()?;
    Ok(())
}

/// Guards a cell against spreadsheet formula injection (OWASP): a leading `= + - @`, tab or
/// carriage return gets a `'` in front.
pub fn escape_cell(s: &str) -> std::borrow::Cow<'_, str> {
    match s.chars().next() {
        Some('=' | '+' | '-' | '@' | '\t' | '\r') => format!("'{s}").into(),
        _ => s.into(),
    }
}

/// The oldest and newest events of one reason.
#[derive(Default)]
struct Ends {
    oldest: Vec<Entry>,
    newest: VecDeque<Entry>,
    seen: u64,
}

/// An unmatched event as report.json lists it, borrowed from its row (its metadata spliced in
/// after it as PostgreSQL printed it).
#[derive(serde::Serialize)]
struct EntryRef<'a> {
    #[serde(serialize_with = "crate::decision::id_text::serialize")]
    event_id: i64,
    source: &'a str,
    session_id: Option<&'a str>,
    master_id: Option<&'a str>,
    event_time: DateTime<Utc>,
    received_at: DateTime<Utc>,
    reason: &'a str,
    last_reason: Option<&'a str>,
    candidates: &'a [String],
    expires_at: DateTime<Utc>,
}

impl<'a> EntryRef<'a> {
    fn of(row: &'a Row, pending_for: chrono::Duration) -> Self {
        let (id, source, session_id, master_id, event_time, received_at, state, reason, candidates, _) = row;
        let expired = State::parse(state) == Some(State::Expired);
        EntryRef {
            event_id: *id,
            source,
            session_id: session_id.as_deref(),
            master_id: master_id.as_deref(),
            event_time: *event_time,
            received_at: *received_at,
            // Undecided: reverted by an undo (or reopened) and not decided by a run since.
            reason: if expired { "expired" } else { reason.as_deref().unwrap_or("undecided") },
            last_reason: if expired { reason.as_deref() } else { None },
            candidates: candidates.as_deref().unwrap_or_default(),
            expires_at: *received_at + pending_for,
        }
    }

    fn to_owned(&self, metadata: &str) -> Entry {
        Entry {
            event_id: self.event_id,
            source: self.source.to_owned(),
            session_id: self.session_id.map(str::to_owned),
            master_id: self.master_id.map(str::to_owned),
            event_time: self.event_time,
            received_at: self.received_at,
            reason: self.reason.to_owned(),
            last_reason: self.last_reason.map(str::to_owned),
            candidates: self.candidates.to_vec(),
            expires_at: self.expires_at,
            metadata: metadata.to_owned(),
        }
    }
}

/// report.json's list of unmatched events, with the counts and the sample report.html shows.
struct Writer {
    json: std::io::BufWriter<std::fs::File>,
    json_path: PathBuf,
    pending_for: chrono::Duration,
    now: DateTime<Utc>,
    per_end: usize,
    ends: BTreeMap<String, Ends>,
    shown: Shown,
    /// One JSON entry, reused.
    buf: Vec<u8>,
}

impl Writer {
    fn new(partial: &Path, pending_for: chrono::Duration, now: DateTime<Utc>, per_end: usize) -> Result<Writer> {
        let path = partial.join(JSON_LIST);
        let file = std::fs::File::create(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(Writer {
            json: std::io::BufWriter::with_capacity(1 << 16, file),
            json_path: path,
            pending_for,
            now,
            per_end,
            ends: BTreeMap::new(),
            shown: Shown {
                per_end,
                pending_by_age: vec![0; AGE_BUCKETS.len()],
                expiring_by_age: vec![0; AGE_BUCKETS.len()],
                ..Shown::default()
            },
            buf: Vec::with_capacity(1024),
        })
    }

    fn add(&mut self, row: &Row) -> Result<()> {
        let u = EntryRef::of(row, self.pending_for);
        let metadata = &row.9;
        // The entry with its metadata spliced in as PostgreSQL printed it (valid JSON).
        self.buf.clear();
        self.buf.extend_from_slice(if self.shown.total > 0 { b",\n    " } else { b"    " });
        serde_json::to_writer(&mut self.buf, &u)?;
        self.buf.pop(); // `}`
        self.buf.extend_from_slice(b",\"metadata\":");
        self.buf.extend_from_slice(metadata.as_bytes());
        self.buf.push(b'}');
        self.json.write_all(&self.buf)?;

        self.shown.total += 1;
        match self.shown.by_reason.get_mut(u.reason) {
            Some(n) => *n += 1,
            None => drop(self.shown.by_reason.insert(u.reason.to_owned(), 1)),
        }
        if State::parse(&row.6) == Some(State::Expired) {
            self.shown.expired += 1;
        } else {
            let days = |from: DateTime<Utc>, to: DateTime<Utc>| (to - from).num_minutes() as f64 / 1440.0;
            let bucket = |d: f64| AGE_BUCKETS.iter().rposition(|(_, lo)| d >= *lo).unwrap_or(0);
            self.shown.pending_by_age[bucket(days(u.received_at, self.now))] += 1;
            self.shown.expiring_by_age[bucket(days(self.now, u.expires_at).max(0.0))] += 1;
        }
        // Rows come oldest first: the first `per_end` of a reason are its oldest, the last ones
        // its newest.
        if !self.ends.contains_key(u.reason) {
            self.ends.insert(u.reason.to_owned(), Ends::default());
        }
        let ends = self.ends.get_mut(u.reason).expect("inserted above");
        ends.seen += 1;
        if ends.oldest.len() < self.per_end {
            ends.oldest.push(u.to_owned(metadata));
        } else {
            if ends.newest.len() == self.per_end {
                ends.newest.pop_front();
            }
            ends.newest.push_back(u.to_owned(metadata));
        }
        Ok(())
    }

    fn finish(mut self) -> Result<Shown> {
        self.json.flush()?;
        let mut shown = self.shown;
        for (reason, ends) in self.ends {
            let kept = (ends.oldest.len() + ends.newest.len()) as u64;
            shown.omitted.insert(reason, ends.seen - kept);
            shown.events.extend(ends.oldest.into_iter().chain(ends.newest).map(Entry::into_unmatched));
        }
        shown.events.sort_by_key(|u| (u.received_at, u.event_id));
        tracing::trace!(path = %self.json_path.display(), "unmatched list written");
        Ok(shown)
    }
}

/// The values of `keys` (sorted) in a JSON object's text, in the keys' order, borrowed from the
/// text: one pass, and no key copied unless it has escapes (a `HashMap<String, _>` of every key
/// was most of the CSV's cost per row). All none if the text is not an object.
fn key_values<'a>(json: &'a str, keys: &[String]) -> Vec<Option<&'a serde_json::value::RawValue>> {
    use serde::de::{DeserializeSeed, Deserializer, MapAccess, Visitor};
    use serde_json::value::RawValue;
    use std::borrow::Cow;
    struct Key;
    impl<'de> DeserializeSeed<'de> for Key {
        type Value = Cow<'de, str>;
        fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
            d.deserialize_str(self)
        }
    }
    impl<'de> Visitor<'de> for Key {
        type Value = Cow<'de, str>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a key")
        }
        fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Self::Value, E> {
            Ok(Cow::Borrowed(v))
        }
        fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
            Ok(Cow::Owned(v.to_owned()))
        }
    }
    struct Values<'k>(&'k [String]);
    impl<'de> Visitor<'de> for Values<'_> {
        type Value = Vec<Option<&'de RawValue>>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a JSON object")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            let mut out = vec![None; self.0.len()];
            while let Some(key) = map.next_key_seed(Key)? {
                let value: &'de RawValue = map.next_value()?;
                if let Ok(i) = self.0.binary_search_by(|k| k.as_str().cmp(&key)) {
                    out[i] = Some(value);
                }
            }
            Ok(out)
        }
    }
    let mut de = serde_json::Deserializer::from_str(json);
    de.deserialize_map(Values(keys)).unwrap_or_else(|_| vec![None; keys.len()])
}

/// unmatched.csv, a row per event, on a thread of its own.
struct CsvWriter {
    csv: csv::Writer<std::io::BufWriter<std::fs::File>>,
    keys: Vec<String>,
    pending_for: chrono::Duration,
}

impl CsvWriter {
    fn new(partial: &Path, keys: Vec<String>, pending_for: chrono::Duration) -> Result<CsvWriter> {
        let path = partial.join(CSV);
        let file = std::fs::File::create(&path).with_context(|| format!("creating {}", path.display()))?;
        let mut out = std::io::BufWriter::with_capacity(1 << 16, file);
        write_csv_header(&mut out, &keys)?;
        Ok(CsvWriter { csv: csv::Writer::from_writer(out), keys, pending_for })
    }

    fn row(&mut self, row: &Row) -> Result<()> {
        let u = EntryRef::of(row, self.pending_for);
        let metadata = &row.9;
        let w = &mut self.csv;
        for cell in [
            &u.event_id.to_string(),
            "",
            "",
            u.source,
            u.session_id.unwrap_or_default(),
            u.master_id.unwrap_or_default(),
        ] {
            w.write_field(escape_cell(cell).as_bytes())?;
        }
        for t in [u.event_time, u.received_at, u.expires_at] {
            w.write_field(t.to_rfc3339())?;
        }
        w.write_field(escape_cell(u.reason).as_bytes())?;
        w.write_field(escape_cell(u.last_reason.unwrap_or_default()).as_bytes())?;
        w.write_field(escape_cell(&u.candidates.join(" ")).as_bytes())?;
        w.write_field(escape_cell(metadata).as_bytes())?;
        if !self.keys.is_empty() {
            // Values borrowed from the text: only the keys' own cells are decoded.
            let values = key_values(metadata, &self.keys);
            for v in values {
                let cell = match v.map(|v| v.get()) {
                    None | Some("null") => std::borrow::Cow::Borrowed(""),
                    Some(text) if text.starts_with('"') => match serde_json::from_str(text) {
                        Ok(s) => std::borrow::Cow::<str>::Owned(s),
                        Err(_) => std::borrow::Cow::Borrowed(""),
                    },
                    Some(text) => std::borrow::Cow::Borrowed(text),
                };
                w.write_field(escape_cell(&cell).as_bytes())?;
            }
        }
        w.write_record(None::<&[u8]>)?;
        Ok(())
    }

    fn finish(mut self) -> Result<()> {
        self.csv.flush()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_values_finds_each_key_once_escaped_or_not() {
        let keys: Vec<String> = ["a\"b", "n", "tier", "zz"].iter().map(|s| s.to_string()).collect();
        let json = r#"{"tier": "gold", "n": 1.50, "x": {"tier": "inner"}, "a\"b": [1, 2]}"#;
        let got: Vec<Option<&str>> = key_values(json, &keys).into_iter().map(|v| v.map(|v| v.get())).collect();
        assert_eq!(got, vec![Some("[1, 2]"), Some("1.50"), Some("\"gold\""), None]);
        assert!(key_values("[1, 2]", &keys).iter().all(Option::is_none));
        assert!(key_values("not json", &keys).iter().all(Option::is_none));
    }
}
