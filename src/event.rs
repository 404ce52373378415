//! The one event parser: a payload from any source becomes an [`Event`] or a reason to reject it.
//!
//! Every source (queue, inbox files, the intake API) goes through [`parse`]; nothing downstream
//! looks at raw payloads again.

use chrono::{DateTime, Datelike as _, LocalResult, NaiveDateTime, Offset as _, TimeZone, Utc};
use chrono_tz::Tz;
use serde_json::{Map, Value};

pub use crate::decision::Address;

/// A valid async-metadata event.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// A call by SessionId, a call group (`call_groups.id`) by MasterId (as the platform's
    /// masterCall endpoint takes it), or neither (a missing, null or empty id is none).
    pub address: Address,
    pub event_time: DateTime<Utc>,
    pub metadata: Map<String, Value>,
}

/// A valid event as ingested, about to be stored: where it came from, and when it arrived.
#[derive(Debug, Clone)]
pub struct NewEvent {
    pub source: String,
    pub event: Event,
    pub received_at: DateTime<Utc>,
    /// What makes it the same event as another (`ingest::dedupe::digest`), stored with it.
    pub digest: [u8; 16],
}

/// A record that could not become an event: where it came from, why, and what it was.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Rejected {
    /// `inbox/file.ndjson:17`, `queue:42`, …
    pub source: String,
    pub reason: String,
    pub raw: String,
}

impl Rejected {
    /// The longest `raw` kept, in bytes: a record's text beyond it is cut (with `…`), so that a
    /// file of huge bad records cannot fill memory or the report.
    pub const MAX_RAW: usize = 4096;

    pub fn new(source: String, reason: String, mut raw: String) -> Self {
        if raw.len() > Self::MAX_RAW {
            let cut = (0..=Self::MAX_RAW).rev().find(|&i| raw.is_char_boundary(i)).unwrap_or(0);
            raw.truncate(cut);
            raw.push('…');
        }
        Rejected { source, reason, raw }
    }
}

/// Parses one payload. The error is a reason a person can act on, naming the field at fault.
pub fn parse(payload: &Value, tz: Tz) -> Result<Event, String> {
    parse_naming_field(payload, tz).map_err(|invalid| invalid.reason)
}

/// Why a payload is not an event, with the top-level field at fault apart (as spelled in the
/// payload; `None` when the payload as a whole is wrong), for the intake API's error bodies.
#[derive(Debug, Clone, PartialEq)]
pub struct Invalid {
    pub field: Option<String>,
    pub reason: String,
}

impl std::fmt::Display for Invalid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.reason)
    }
}

/// [`parse`] itself (the same checks and reasons), keeping the field at fault apart.
pub fn parse_naming_field(payload: &Value, tz: Tz) -> Result<Event, Invalid> {
    let invalid = |field: &str, reason: String| Invalid { field: Some(field.to_owned()), reason };
    let Value::Object(fields) = payload else {
        return Err(Invalid {
            field: None,
            reason: format!(
                "expected a JSON object with SessionId or MasterId, EventTime and Metadata, found {}",
                kind(payload)
            ),
        });
    };

    let mut session_id = None;
    let mut master_id = None;
    let mut event_time = None;
    let mut metadata = None;
    for (key, value) in fields {
        let slot = match key.to_ascii_lowercase().as_str() {
            "sessionid" => &mut session_id,
            // `masterCallId`: the platform SDK's name for it (its MasterInteractionMetadata).
            "masterid" | "mastercallid" => &mut master_id,
            "eventtime" => &mut event_time,
            "metadata" => &mut metadata,
            _ => {
                return Err(invalid(
                    key,
                    format!(
                        "unknown top-level field `{key}`: only SessionId, MasterId (or MasterCallId), \
                         EventTime and Metadata are allowed; put custom fields inside Metadata"
                    ),
                ));
            }
        };
        if slot.replace((key, value)).is_some() {
            return Err(invalid(key, format!("field `{key}` is given twice (keys are case-insensitive)")));
        }
    }

    let (session_key, master_key) = (session_id.map(|(k, _)| k), master_id.map(|(k, _)| k));
    let session_id = id_field(session_id, "a session id").map_err(|(key, reason)| invalid(key, reason))?;
    let master_id = id_field(master_id, "a call group id").map_err(|(key, reason)| invalid(key, reason))?;
    if let (Some(_), Some(_), Some(session_key), Some(master_key)) = (&session_id, &master_id, session_key, master_key)
    {
        return Err(invalid(
            master_key,
            format!(
                "both `{session_key}` and `{master_key}` are given: an event is addressed to one call \
                 (SessionId) or to one call group (MasterId), not both"
            ),
        ));
    }

    let event_time = match event_time {
        None => return Err(invalid("EventTime", "missing EventTime".to_owned())),
        Some((key, Value::String(s))) => {
            parse_time(s, tz).map_err(|e| invalid(key, format!("EventTime {s:?}: {e}")))?
        }
        Some((key, other)) => {
            return Err(invalid(key, format!("`{key}` must be a date-time string, found {}", kind(other))));
        }
    };

    let metadata = match metadata {
        None => return Err(invalid("Metadata", "missing Metadata (a JSON object)".to_owned())),
        Some((key, Value::Object(m))) => {
            storable_object(m, &mut key.clone(), &mut 0).map_err(|reason| invalid(key, reason))?;
            m.clone()
        }
        Some((key, other)) => {
            return Err(invalid(key, format!("`{key}` must be a JSON object, found {}", kind(other))));
        }
    };

    Ok(Event { address: Address::from_parts(session_id, master_id), event_time, metadata })
}

/// SessionId or MasterId (`what` names it in reasons): missing, null or blank is none; else a
/// string, trimmed, storable, at most [`MAX_SESSION_ID`] bytes. The error names the key as spelled.
fn id_field<'p>(field: Option<(&'p String, &Value)>, what: &str) -> Result<Option<String>, (&'p String, String)> {
    match field {
        None | Some((_, Value::Null)) => Ok(None),
        Some((_, Value::String(s))) if s.trim().is_empty() => Ok(None),
        Some((key, Value::String(s))) if s.contains('\0') => {
            Err((key, format!("`{key}` contains the character U+0000, which PostgreSQL cannot store")))
        }
        Some((key, Value::String(s))) if s.trim().len() > MAX_SESSION_ID => {
            Err((key, format!("`{key}` is {} bytes long; {what} has at most {MAX_SESSION_ID}", s.trim().len())))
        }
        Some((_, Value::String(s))) => Ok(Some(s.trim().to_owned())),
        Some((key, other)) => Err((key, format!("`{key}` must be a string, found {}", kind(other)))),
    }
}

/// The longest SessionId accepted, in bytes: far beyond any provider's ids, and short enough for
/// every index and message it goes into.
pub const MAX_SESSION_ID: usize = 1_000;

/// The largest Metadata accepted, as JSON text (PostgreSQL's jsonb holds up to 255 MiB; the
/// intake API takes bodies of 1 MiB by default).
pub const MAX_METADATA_BYTES: usize = 16 << 20;

/// Checks that PostgreSQL can store `value` as jsonb exactly as it is: no U+0000 in a string or
/// key, numbers within `numeric`'s range, and the whole within [`MAX_METADATA_BYTES`]. `path`
/// names the value in the reason (`Metadata.acct`); `size` adds up the text's length.
fn storable(value: &Value, path: &mut String, size: &mut usize) -> Result<(), String> {
    match value {
        Value::Null | Value::Bool(_) => *size += 5,
        Value::String(s) => storable_str(s, path, size)?,
        Value::Number(n) => {
            let text = n.to_string();
            *size += text.len();
            numeric_storable(&text).map_err(|why| format!("{path}: the number {} {why}", shorten(&text)))?;
        }
        Value::Array(items) => {
            let len = path.len();
            for (i, item) in items.iter().enumerate() {
                path.truncate(len);
                path.push_str(&format!("[{i}]"));
                storable(item, path, size)?;
            }
            path.truncate(len);
        }
        Value::Object(map) => storable_object(map, path, size)?,
    }
    if *size > MAX_METADATA_BYTES {
        return Err(format!("Metadata is larger than {} MiB", MAX_METADATA_BYTES >> 20));
    }
    Ok(())
}

/// [`storable`] of an object: its keys and values, each value named `path.key`.
fn storable_object(map: &Map<String, Value>, path: &mut String, size: &mut usize) -> Result<(), String> {
    let len = path.len();
    for (k, v) in map {
        path.truncate(len);
        storable_str(k, &format!("{path} key {k:?}"), size)?;
        path.push('.');
        path.push_str(k);
        storable(v, path, size)?;
    }
    path.truncate(len);
    Ok(())
}

fn storable_str(s: &str, what: &str, size: &mut usize) -> Result<(), String> {
    *size += s.len() + 2;
    if s.contains('\0') {
        return Err(format!("{what} contains the character U+0000, which PostgreSQL cannot store"));
    }
    Ok(())
}

/// Whether PostgreSQL's `numeric` (which jsonb numbers are) can hold the JSON number `text`
/// exactly: at most 131,072 digits before the decimal point and 16,383 after it.
pub fn numeric_storable(text: &str) -> Result<(), String> {
    let unsigned = text.strip_prefix('-').unwrap_or(text);
    let (mantissa, exponent) = match unsigned.split_once(['e', 'E']) {
        Some((m, e)) => {
            let e = e.strip_prefix('+').unwrap_or(e);
            match e.parse::<i64>() {
                Ok(e) if e.abs() < 1 << 30 => (m, e),
                _ => return Err("has an exponent outside PostgreSQL's range".to_owned()),
            }
        }
        None => (unsigned, 0),
    };
    let (int, frac) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    let decimals = frac.len() as i64 - exponent;
    if decimals > 16_383 {
        return Err(format!("has {decimals} decimal places; PostgreSQL keeps at most 16383"));
    }
    let digits = int.bytes().chain(frac.bytes());
    let leading_zeros = digits.clone().take_while(|&d| d == b'0').count() as i64;
    if leading_zeros < (int.len() + frac.len()) as i64 {
        let whole = int.len() as i64 + exponent - leading_zeros;
        if whole > 131_072 {
            return Err(format!("has {whole} digits before the decimal point; PostgreSQL keeps at most 131072"));
        }
    }
    Ok(())
}

/// Whether PostgreSQL can store `payload` as jsonb exactly as it is (for putting payloads on
/// the queue as given: `callrecon enqueue`); the reason names the value at fault.
pub fn storable_payload(payload: &Value) -> Result<(), String> {
    storable(payload, &mut "payload".to_owned(), &mut 0)
}

/// At most 40 characters of `s`, for messages.
fn shorten(s: &str) -> String {
    match s.char_indices().nth(40) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_owned(),
    }
}

/// EventTimes accepted: 1900-01-01 (inclusive) to 2200-01-01 (exclusive), UTC. Outside it a
/// time is an unset or corrupt value (an unset .NET `DateTime` is `0001-01-01T00:00:00Z`, its
/// maximum `9999-12-31T23:59:59Z`), not a call's time, and would only overflow the matching
/// windows' arithmetic.
pub const EVENT_TIME_RANGE: (i32, i32) = (1900, 2200);

/// Parses an EventTime in any form the contract allows.
///
/// RFC 3339 with any offset; the API's own `2018/10/15T09:00:00.000Z`; fractional seconds or
/// none; `T` or a space between date and time. A time without an offset is a wall-clock time in
/// `tz`: in the hour repeated when clocks fall back it is the first (earlier) instant; in the hour
/// skipped when clocks spring forward it is read with the offset in force before the change, so
/// `02:30` on a spring-forward night in New York is 07:30Z (03:30 EDT).
pub fn parse_time(raw: &str, tz: Tz) -> Result<DateTime<Utc>, String> {
    let t = parse_any_time(raw, tz)?;
    let (from, until) = EVENT_TIME_RANGE;
    if !(from..until).contains(&t.year()) {
        return Err(format!(
            "{} is outside the accepted range {from}-01-01 to {until}-01-01 (an unset date?)",
            t.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true)
        ));
    }
    Ok(t)
}

fn parse_any_time(raw: &str, tz: Tz) -> Result<DateTime<Utc>, String> {
    let s = raw.trim();
    let b = s.as_bytes();
    if b.len() < 19 || !b[..4].iter().all(u8::is_ascii_digit) {
        return Err("expected a date-time like 2018-10-15T09:00:00Z".to_owned());
    }
    // Normalise to RFC 3339 shape: slashes in the date, a space or lower-case t as separator.
    let mut norm = String::with_capacity(s.len());
    for (i, c) in s.char_indices() {
        norm.push(match (i, c) {
            (4 | 7, '/') => '-',
            (10, ' ' | 't') => 'T',
            (_, 'z') => 'Z',
            _ => c,
        });
    }

    if let Ok(t) = DateTime::parse_from_rfc3339(&norm) {
        return Ok(t.with_timezone(&Utc));
    }
    if let Ok(t) = DateTime::parse_from_str(&norm, "%Y-%m-%dT%H:%M:%S%.f%z") {
        return Ok(t.with_timezone(&Utc));
    }
    let naive = NaiveDateTime::parse_from_str(&norm, "%Y-%m-%dT%H:%M:%S%.f")
        .map_err(|e| format!("not a valid date-time ({e}); expected e.g. 2018-10-15T09:00:00.000Z"))?;
    Ok(local_to_utc(naive, tz))
}

/// A wall-clock time in `tz` as an instant, DST rules as documented on [`parse_time`].
pub fn local_to_utc(naive: NaiveDateTime, tz: Tz) -> DateTime<Utc> {
    match tz.from_local_datetime(&naive) {
        LocalResult::Single(t) => t.with_timezone(&Utc),
        LocalResult::Ambiguous(first, _) => first.with_timezone(&Utc),
        LocalResult::None => {
            // In a gap: use the offset in force just before it.
            let before = naive - chrono::Duration::hours(3);
            let offset = match tz.from_local_datetime(&before) {
                LocalResult::Single(t) | LocalResult::Ambiguous(t, _) => t.offset().fix(),
                LocalResult::None => chrono::FixedOffset::east_opt(0).expect("zero offset"),
            };
            (naive - chrono::Duration::seconds(i64::from(offset.local_minus_utc()))).and_utc()
        }
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const NY: Tz = chrono_tz::America::New_York;

    fn check_time(input: &str, expected: &str) {
        let got = parse_time(input, NY).unwrap_or_else(|e| panic!("{input}: {e}"));
        assert_eq!(got.to_rfc3339_opts(chrono::SecondsFormat::Millis, true), expected, "{input}");
    }

    #[test]
    fn every_event_time_form() {
        check_time("2018-10-15T09:00:00.000Z", "2018-10-15T09:00:00.000Z");
        check_time("2018/10/15T09:00:00.000Z", "2018-10-15T09:00:00.000Z");
        check_time("2018-10-15T09:00:00Z", "2018-10-15T09:00:00.000Z");
        check_time("2018-10-15 09:00:00Z", "2018-10-15T09:00:00.000Z");
        check_time("2018/10/15 09:00:00.5Z", "2018-10-15T09:00:00.500Z");
        check_time("2018-10-15T11:00:00+02:00", "2018-10-15T09:00:00.000Z");
        check_time("2018-10-15T04:00:00.000-05:00", "2018-10-15T09:00:00.000Z");
        check_time("2018-10-15T11:00:00+0200", "2018-10-15T09:00:00.000Z");
        check_time("2018-10-15t09:00:00z", "2018-10-15T09:00:00.000Z");
        // No offset: the job's time zone (EDT in October).
        check_time("2018-10-15T05:00:00", "2018-10-15T09:00:00.000Z");
        check_time("2018/10/15 05:00:00.250", "2018-10-15T09:00:00.250Z");
        // Winter: EST.
        check_time("2018-12-15T04:00:00", "2018-12-15T09:00:00.000Z");
    }

    #[test]
    fn naive_times_on_dst_change_days() {
        // Spring forward 2026-03-08 02:00 EST -> 03:00 EDT: 02:30 does not exist, read as EST.
        check_time("2026-03-08T02:30:00", "2026-03-08T07:30:00.000Z");
        check_time("2026-03-08T03:30:00", "2026-03-08T07:30:00.000Z");
        check_time("2026-03-08T01:59:59", "2026-03-08T06:59:59.000Z");
        // Fall back 2026-11-01 02:00 EDT -> 01:00 EST: 01:30 happens twice, the first is taken.
        check_time("2026-11-01T01:30:00", "2026-11-01T05:30:00.000Z");
        check_time("2026-11-01T02:30:00", "2026-11-01T07:30:00.000Z");
    }

    #[test]
    fn bad_event_times_are_refused() {
        for bad in [
            "yesterday",
            "",
            "2018-10-15",
            "2018-13-45T09:00:00Z",
            "2018-10-15T25:00:00Z",
            "2018-10-15T09:00Z",
            "15/10/2018 09:00:00",
            "2018-10-15T09:00:00+25:00",
        ] {
            assert!(parse_time(bad, NY).is_err(), "{bad:?} should be refused");
        }
    }

    #[test]
    fn keys_are_case_insensitive() {
        let e =
            parse(&json!({"sessionID": "s1", "eventTime": "2018-10-15T09:00:00Z", "metaData": {"a": 1}}), NY).unwrap();
        assert_eq!(e.address, Address::Session("s1".into()));
        assert_eq!(e.metadata["a"], json!(1));
    }

    #[test]
    fn missing_null_or_empty_session_is_sessionless() {
        for p in [
            json!({"EventTime": "2018-10-15T09:00:00Z", "Metadata": {}}),
            json!({"SessionId": null, "EventTime": "2018-10-15T09:00:00Z", "Metadata": {}}),
            json!({"SessionId": "  ", "EventTime": "2018-10-15T09:00:00Z", "Metadata": {}}),
        ] {
            assert_eq!(parse(&p, NY).unwrap().address, Address::Sessionless, "{p}");
        }
    }

    #[test]
    fn master_id_names_a_call_group_in_any_spelling() {
        for key in ["MasterId", "masterId", "masterID", "MASTERID", "masterCallId", "MasterCallID"] {
            let e = parse(&json!({key: " grp-7 ", "EventTime": "2018-10-15T09:00:00Z", "Metadata": {}}), NY).unwrap();
            assert_eq!(e.address, Address::Master("grp-7".into()), "{key}");
        }
        // Missing, null or blank: addressed to no group; an empty SessionId beside it is none.
        for p in [
            json!({"MasterId": null, "EventTime": "2018-10-15T09:00:00Z", "Metadata": {}}),
            json!({"MasterId": " ", "SessionId": "s1", "EventTime": "2018-10-15T09:00:00Z", "Metadata": {}}),
        ] {
            assert_eq!(parse(&p, NY).unwrap().address.master_id(), None, "{p}");
        }
        let e =
            parse(&json!({"SessionId": "", "MasterId": "g", "EventTime": "2018-10-15T09:00:00Z", "Metadata": {}}), NY)
                .unwrap();
        assert_eq!(e.address, Address::Master("g".into()));
        // The platform SDK's name and ours for the same field: one too many.
        let both = json!({"MasterId": "g", "masterCallId": "g", "EventTime": "2018-10-15T09:00:00Z", "Metadata": {}});
        assert!(parse_naming_field(&both, NY).unwrap_err().reason.contains("given twice"));
    }

    #[test]
    fn session_id_and_master_id_together_are_refused_naming_both() {
        let err = parse_naming_field(
            &json!({"sessionId": "s1", "MasterID": "g1", "EventTime": "2018-10-15T09:00:00Z", "Metadata": {}}),
            NY,
        )
        .unwrap_err();
        assert_eq!(err.field.as_deref(), Some("MasterID"));
        assert!(err.reason.contains("`sessionId`") && err.reason.contains("`MasterID`"), "{}", err.reason);
        for (payload, expected) in [
            (
                json!({"MasterId": 7, "EventTime": "2018-10-15T09:00:00Z", "Metadata": {}}),
                "`MasterId` must be a string",
            ),
            (json!({"MasterId": "g\u{0}", "EventTime": "2018-10-15T09:00:00Z", "Metadata": {}}), "U+0000"),
            (
                json!({"MasterId": "g".repeat(1001), "EventTime": "2018-10-15T09:00:00Z", "Metadata": {}}),
                "at most 1000",
            ),
            (
                json!({"MasterId": "a", "masterid": "b", "EventTime": "2018-10-15T09:00:00Z", "Metadata": {}}),
                "given twice",
            ),
        ] {
            let err = parse(&payload, NY).unwrap_err();
            assert!(err.contains(expected), "{payload}: {err:?} should contain {expected:?}");
        }
    }

    #[test]
    fn bad_payloads_name_the_field() {
        let cases = [
            (json!([1]), "expected a JSON object"),
            (json!({"Metadata": {}}), "missing EventTime"),
            (json!({"EventTime": "2018-10-15T09:00:00Z"}), "missing Metadata"),
            (json!({"EventTime": "2018-10-15T09:00:00Z", "Metadata": "x"}), "`Metadata` must be"),
            (json!({"EventTime": "2018-10-15T09:00:00Z", "Metadata": [1]}), "found an array"),
            (json!({"EventTime": 1539594000, "Metadata": {}}), "`EventTime` must be"),
            (json!({"EventTime": "nope", "Metadata": {}}), "EventTime \"nope\""),
            (
                json!({"SessionId": 7, "EventTime": "2018-10-15T09:00:00Z", "Metadata": {}}),
                "`SessionId` must be a string",
            ),
            (json!({"EventTime": "2018-10-15T09:00:00Z", "Metadata": {}, "Foo": 1}), "unknown top-level field `Foo`"),
            (
                json!({"EventTime": "2018-10-15T09:00:00Z", "eventtime": "2018-10-15T09:00:00Z", "Metadata": {}}),
                "given twice",
            ),
        ];
        for (payload, expected) in cases {
            let err = parse(&payload, NY).unwrap_err();
            assert!(err.contains(expected), "{payload}: {err:?} should contain {expected:?}");
        }
    }

    #[test]
    fn the_field_at_fault_is_named_as_spelled() {
        let cases = [
            (json!([1]), None),
            (json!({"Metadata": {}}), Some("EventTime")),
            (json!({"eventTime": "x", "Metadata": {}}), Some("eventTime")),
            (json!({"EventTime": 1, "Metadata": {}}), Some("EventTime")),
            (json!({"EventTime": "2018-10-15T09:00:00Z"}), Some("Metadata")),
            (json!({"EventTime": "2018-10-15T09:00:00Z", "metaData": "x"}), Some("metaData")),
            (json!({"sessionId": 7, "EventTime": "2018-10-15T09:00:00Z", "Metadata": {}}), Some("sessionId")),
            (json!({"EventTime": "2018-10-15T09:00:00Z", "Metadata": {}, "Foo": 1}), Some("Foo")),
        ];
        for (payload, field) in cases {
            let err = parse_naming_field(&payload, NY).unwrap_err();
            assert_eq!(err.field.as_deref(), field, "{payload}");
            assert_eq!(Err(err.reason), parse(&payload, NY), "{payload}");
        }
    }
}
