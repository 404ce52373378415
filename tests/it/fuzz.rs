//! Issue 17: fuzzing the event parser and every inbox reader with hostile input (proptest: wrong
//! types, deep and huge values, NULs, invalid UTF-8, extreme dates and numbers, duplicate keys,
//! any line endings). Failures found are kept in `proptest-regressions/` and replayed first.
//! `PROPTEST_CASES=100000 cargo test --test it fuzz` runs a long session.

use callrecon::event;
use callrecon::ingest::inbox::{self, Format};
use proptest::prelude::*;
use serde_json::{Map, Value};

/// A string of the kinds producers send, hostile ones included.
fn hostile_string() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(String::new()),
        Just("\0".to_owned()),
        Just("a\0b".to_owned()),
        Just("'; drop table calls; --".to_owned()),
        Just("\u{feff}\u{202e}\u{ffff}".to_owned()),
        Just("é".repeat(300)),
        proptest::collection::vec(any::<char>(), 0..12).prop_map(String::from_iter),
        "[a-zA-Z0-9 _-]{0,12}",
    ]
}

/// JSON number text: any sign, digits and exponent, some far outside PostgreSQL's range.
fn number_text() -> impl Strategy<Value = String> {
    (
        any::<bool>(),
        "(0|[1-9][0-9]{0,30})",
        proptest::option::of("[0-9]{1,30}"),
        proptest::option::of(-40_000i64..40_000),
    )
        .prop_map(|(neg, int, frac, exp)| {
            let mut s = String::new();
            if neg {
                s.push('-');
            }
            s.push_str(&int);
            if let Some(f) = frac {
                s.push('.');
                s.push_str(&f);
            }
            if let Some(e) = exp {
                s.push_str(&format!("e{e}"));
            }
            s
        })
}

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        number_text().prop_map(|t| serde_json::from_str(&t).unwrap()),
        hostile_string().prop_map(Value::String),
    ];
    leaf.prop_recursive(6, 48, 6, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            proptest::collection::vec((hostile_string(), inner), 0..6)
                .prop_map(|kv| Value::Object(kv.into_iter().collect::<Map<_, _>>())),
        ]
    })
}

fn event_time() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::String("2026-11-02T10:00:00Z".into())),
        Just(Value::String("2018/10/15T09:00:00.000Z".into())),
        Just(Value::String("2026-03-08 02:30:00".into())),
        Just(Value::String("0001-01-01T00:00:00Z".into())),
        Just(Value::String("9999-12-31T23:59:59Z".into())),
        Just(Value::String("1899-12-31T23:59:59Z".into())),
        Just(Value::String("2199-12-31T23:59:59.999999Z".into())),
        Just(Value::String("2026-11-02T10:00:00+14:00".into())),
        Just(Value::String("+275760-09-13T00:00:00Z".into())),
        hostile_string().prop_map(Value::String),
        json_value(),
    ]
}

/// A payload as a producer might send it: shaped like an event (an address or none, an
/// EventTime, a Metadata object: many of these parse), or any fields in any case with values of
/// any type (few of these do).
fn payload() -> impl Strategy<Value = Value> {
    prop_oneof![3 => shaped_payload(), 1 => loose_payload()]
}

/// An event's shape with hostile parts: a SessionId, a MasterId or neither, spelled in any case.
fn shaped_payload() -> impl Strategy<Value = Value> {
    let address = proptest::option::of((
        prop_oneof![Just("SessionId"), Just("sessionID"), Just("MasterId"), Just("masterid")],
        prop_oneof![3 => "[a-zA-Z0-9_-]{1,12}", 1 => hostile_string()],
    ));
    let time = prop_oneof![
        3 => (1_000_000_000i64..4_000_000_000).prop_map(|s| {
            Value::String(chrono::DateTime::from_timestamp(s, 0).unwrap().format("%Y-%m-%dT%H:%M:%SZ").to_string())
        }),
        1 => event_time(),
    ];
    let key = prop_oneof![3 => "[a-zA-Z][a-zA-Z0-9_]{0,8}", 1 => hostile_string()];
    let metadata = proptest::collection::vec((key, json_value()), 0..4);
    (address, time, metadata).prop_map(|(address, time, metadata)| {
        let mut fields = Map::new();
        if let Some((key, id)) = address {
            fields.insert(key.to_owned(), Value::String(id));
        }
        fields.insert("EventTime".to_owned(), time);
        fields.insert("Metadata".to_owned(), Value::Object(metadata.into_iter().collect()));
        Value::Object(fields)
    })
}

fn loose_payload() -> impl Strategy<Value = Value> {
    let key = prop_oneof![
        Just("SessionId"),
        Just("sessionID"),
        Just("EventTime"),
        Just("eventtime"),
        Just("Metadata"),
        Just("metaData"),
        Just("Foo"),
    ];
    let value = prop_oneof![json_value(), event_time(), json_value().prop_map(|v| serde_json::json!({"m": v}))];
    proptest::collection::vec((key, value), 0..5)
        .prop_map(|kv| Value::Object(kv.into_iter().map(|(k, v)| (k.to_owned(), v)).collect()))
}

/// What PostgreSQL would refuse in a value the parser accepted: a NUL anywhere, a number with
/// more than 16383 decimals or 131072 integer digits. Written apart from the parser's own check.
fn unstorable(v: &Value) -> Option<String> {
    match v {
        Value::String(s) if s.contains('\0') => Some(format!("NUL in {s:?}")),
        Value::Number(n) => {
            let text = n.to_string();
            let big = bigdecimal_like(&text);
            (!big).then(|| format!("number {text}"))
        }
        Value::Array(items) => items.iter().find_map(unstorable),
        Value::Object(m) => {
            m.iter().find_map(|(k, v)| if k.contains('\0') { Some(format!("NUL in key {k:?}")) } else { unstorable(v) })
        }
        _ => None,
    }
}

/// Whether `numeric` holds the JSON number `text`, by writing it out (exponents here are small
/// enough to expand).
fn bigdecimal_like(text: &str) -> bool {
    let t = text.trim_start_matches('-');
    let (m, e) = t.split_once(['e', 'E']).map_or((t, 0i64), |(m, e)| (m, e.parse().unwrap()));
    let (int, frac) = m.split_once('.').unwrap_or((m, ""));
    let digits: String = format!("{int}{frac}");
    let scale = frac.len() as i64 - e;
    if scale > 16_383 {
        return false;
    }
    let point = int.len() as i64 + e; // digits before the point, counting leading zeros
    let first_nonzero = digits.find(|c| c != '0');
    match first_nonzero {
        None => true,
        Some(z) => point - z as i64 <= 131_072,
    }
}

proptest! {
    // 512 cases each in the suite; PROPTEST_CASES for a long session.
    #![proptest_config(ProptestConfig {
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|n| n.parse().ok()).unwrap_or(512),
        ..ProptestConfig::default()
    })]

    /// The parser never panics, and what it accepts PostgreSQL can store and match.
    #[test]
    fn parser_accepts_only_storable_events(p in payload()) {
        if let Ok(e) = event::parse(&p, chrono_tz::America::New_York) {
            prop_assert_eq!(unstorable(&Value::Object(e.metadata.clone())), None);
            prop_assert!(e.address.session_id().is_none_or(|s| !s.contains('\0') && !s.is_empty()));
            let year = chrono::Datelike::year(&e.event_time);
            prop_assert!((1900..2200).contains(&year), "{}", e.event_time);
            prop_assert!(e.address.master_id().is_none_or(|m| !m.contains('\0') && !m.is_empty()));
        } else if let Err(invalid) = event::parse_naming_field(&p, chrono_tz::America::New_York) {
            // A refusal says why, naming a field the payload has or one it lacks.
            prop_assert!(!invalid.reason.is_empty());
            let named = invalid.field.as_deref().is_none_or(|f| {
                p.as_object().is_some_and(|o| o.contains_key(f)) || ["EventTime", "Metadata"].contains(&f)
            });
            prop_assert!(named, "{:?} is neither a field of {} nor a missing one", invalid.field, p);
        }
    }

    /// NDJSON: whatever the lines hold and whatever ends them, each non-blank line is one
    /// record at its own line number, its raw text as read; a good line is never lost.
    #[test]
    fn ndjson_lines_are_records_at_their_line(lines in proptest::collection::vec(line(), 0..30)) {
        let (bytes, expected) = join_lines(&lines);
        let records = inbox::read_records(&bytes, Format::Ndjson, "f").unwrap();
        let got: Vec<(String, bool)> = records.iter().map(|r| (r.source.clone(), r.payload.is_ok())).collect();
        let want: Vec<(String, bool)> = expected.iter().map(|(n, good)| (format!("f:{n}"), *good)).collect();
        prop_assert_eq!(got, want);
    }

    /// JSON arrays: good elements are all kept at their line, garbage between them rejected.
    #[test]
    fn json_array_elements_survive_garbage_beside_them(items in proptest::collection::vec(element(), 1..20), tail in proptest::option::of("#[a-z ]{0,8}")) {
        let mut text = String::from("[\n");
        for (i, item) in items.iter().enumerate() {
            if i > 0 { text.push_str(",\n"); }
            text.push_str(item.as_deref().unwrap_or("{\"EventTime\": nope}"));
        }
        text.push_str("\n]\n");
        if let Some(t) = &tail { text.push_str(t.trim()); }
        let records = inbox::read_records(text.as_bytes(), Format::Json, "f");
        let good = items.iter().filter(|i| i.is_some()).count();
        if good == 0 {
            // Nothing in it is JSON: the file fails as a whole.
            prop_assert!(records.is_err() || records.unwrap().iter().all(|r| r.payload.is_err()));
        } else {
            let records = records.unwrap();
            let ok: Vec<String> = records.iter().filter(|r| r.payload.is_ok()).map(|r| r.source.clone()).collect();
            let want: Vec<String> = items.iter().enumerate().filter(|(_, i)| i.is_some()).map(|(n, _)| format!("f:{}", n + 2)).collect();
            prop_assert_eq!(ok, want);
            let bad = items.len() - good + usize::from(tail.as_deref().is_some_and(|t| !t.trim().is_empty()));
            prop_assert_eq!(records.len() - good, bad);
        }
    }

    /// Any bytes at all: no reader panics, and every position is a line of the file.
    #[test]
    fn readers_never_panic_on_any_bytes(bytes in proptest::collection::vec(prop_oneof![
        any::<u8>(), Just(b'\n'), Just(b'\r'), Just(b'"'), Just(b','), Just(b'{'), Just(b'}'), Just(b'['), Just(b']')
    ], 0..400)) {
        let lines = 1 + bytes.iter().enumerate().filter(|&(i, &b)| b == b'\n' || (b == b'\r' && bytes.get(i + 1) != Some(&b'\n'))).count();
        for format in [Format::Json, Format::Ndjson, Format::Csv] {
            if let Ok(records) = inbox::read_records(&bytes, format, "f") {
                for r in records {
                    let line: usize = r.source.strip_prefix("f:").unwrap().parse().unwrap();
                    prop_assert!((1..=lines).contains(&line), "{format:?}: {} of {lines} lines", r.source);
                }
            }
        }
    }
}

/// One NDJSON line: a good event, a blank line, or garbage bytes (any, but no line break).
fn line() -> impl Strategy<Value = (Vec<u8>, &'static str)> {
    let ending = prop_oneof![Just("\n"), Just("\r\n"), Just("\r")];
    let body = prop_oneof![
        (0u32..1000).prop_map(
            |i| format!("{{\"EventTime\": \"2026-11-02T10:00:00Z\", \"Metadata\": {{\"i\": {i}}}}}").into_bytes()
        ),
        Just(Vec::new()),
        proptest::collection::vec(any::<u8>().prop_map(|b| if b == b'\n' || b == b'\r' { b'x' } else { b }), 1..40),
    ];
    (body, ending)
}

/// The file's bytes and, per non-blank line, (its number, whether it is a good event).
fn join_lines(lines: &[(Vec<u8>, &str)]) -> (Vec<u8>, Vec<(usize, bool)>) {
    let mut bytes = Vec::new();
    let mut expected = Vec::new();
    let mut previous = "";
    for (n, (body, ending)) in lines.iter().enumerate() {
        // A `\r` ending and an empty line ending in `\n` would make one `\r\n` line break.
        let ending = if previous == "\r" && body.is_empty() && ending.starts_with('\n') { "\r" } else { ending };
        previous = ending;
        if !body.iter().all(|b| matches!(b, b' ' | b'\t')) {
            let good = serde_json::from_slice::<Value>(body).is_ok();
            expected.push((n + 1, good));
        }
        bytes.extend_from_slice(body);
        bytes.extend_from_slice(ending.as_bytes());
    }
    (bytes, expected)
}

/// A JSON array element: a good event (Some) or a broken object (None).
fn element() -> impl Strategy<Value = Option<String>> {
    prop_oneof![
        (0u32..1000).prop_map(|i| Some(format!(
            "{{\"EventTime\": \"2026-11-02T10:00:00Z\", \"Metadata\": {{\"i\": {i}, \"s\": \"a,]}}\"}}}}"
        ))),
        Just(None),
    ]
}

/// The property above says something only about the payloads that parse: enough of those the
/// strategy generates do (and enough do not).
#[test]
fn enough_generated_payloads_parse_for_the_property_to_say_something() {
    use proptest::strategy::ValueTree as _;
    let mut runner = proptest::test_runner::TestRunner::deterministic();
    let strategy = payload();
    let n = 2000;
    let parsed = (0..n)
        .filter(|_| {
            let p = strategy.new_tree(&mut runner).unwrap().current();
            event::parse(&p, chrono_tz::America::New_York).is_ok()
        })
        .count();
    assert!((n / 5..=n * 4 / 5).contains(&parsed), "{parsed} of {n} generated payloads parse");
}
