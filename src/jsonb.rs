//! Values printed the way PostgreSQL prints jsonb, so they compare with stored text (apply's
//! merged values) and hash as stored events do (an event's digest, `ingest::dedupe`).

use serde_json::{Map, Value};

/// `value` as PostgreSQL prints it once stored as jsonb: `", "` and `": "` between items, object
/// keys by length then bytes, numbers as `numeric` prints them (never with an exponent). So a
/// new event's contribution compares with stored values without reading the event back.
/// Strings are escaped as serde_json escapes them, which is also PostgreSQL's escaping.
pub fn jsonb_text(value: &Value) -> String {
    let mut out = String::new();
    print_jsonb(value, &mut out);
    out
}

/// A JSON object as [`jsonb_text`] prints it, without copying it into a [`Value`].
pub fn object_text(map: &Map<String, Value>, out: &mut String) {
    print_object(map.iter().map(|(k, v)| (k.as_str(), v)).collect(), out, print_jsonb);
}

fn print_jsonb(value: &Value, out: &mut String) {
    match value {
        Value::Null | Value::Bool(_) | Value::String(_) => {
            out.push_str(&serde_json::to_string(value).expect("a JSON value serialises"))
        }
        Value::Number(n) => out.push_str(&plain_number(&n.to_string())),
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                print_jsonb(item, out);
            }
            out.push(']');
        }
        Value::Object(map) => object_text(map, out),
    }
}

/// Prints an object's entries as PostgreSQL prints a jsonb object: keys by length then bytes,
/// `", "` between entries and `": "` after each key. Keys are unique.
pub fn print_object<V>(mut entries: Vec<(&str, V)>, out: &mut String, print_value: impl Fn(V, &mut String)) {
    entries.sort_unstable_by(|(a, _), (b, _)| (a.len(), a.as_bytes()).cmp(&(b.len(), b.as_bytes())));
    out.push('{');
    for (i, (k, v)) in entries.into_iter().enumerate() {
        if i > 0 {
            out.push_str(", ");
        }
        out.push_str(&serde_json::to_string(k).expect("a string serialises"));
        out.push_str(": ");
        print_value(v, out);
    }
    out.push('}');
}

/// A JSON number's text as PostgreSQL's `numeric` prints it: an exponent (serde_json prints
/// `1e21` and `1.5e-7`) is written out, with as many decimals as the text implies, and zero has
/// no sign.
fn plain_number(text: &str) -> String {
    let (negative, unsigned) = match text.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, text),
    };
    let (mantissa, exponent) = match unsigned.split_once(['e', 'E']) {
        Some((m, e)) => (m, e.parse::<i64>().expect("a JSON exponent is an integer")),
        None => (unsigned, 0),
    };
    let (int, frac) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    let digits = format!("{int}{frac}");
    // The value is 0.digits × 10^point; `numeric` keeps `frac.len() - exponent` decimals.
    let point = int.len() as i64 + exponent;
    let decimals = (frac.len() as i64 - exponent).max(0) as usize;
    let whole = if point <= 0 {
        String::new()
    } else if point as usize >= digits.len() {
        format!("{digits}{}", "0".repeat(point as usize - digits.len()))
    } else {
        digits[..point as usize].to_owned()
    };
    let fraction = if point < 0 {
        format!("{}{digits}", "0".repeat(point.unsigned_abs() as usize))
    } else {
        digits.get(point as usize..).unwrap_or("").to_owned()
    };
    debug_assert_eq!(fraction.len(), decimals, "{text}");
    let whole = whole.trim_start_matches('0');
    let mut out = String::new();
    if negative && digits.bytes().any(|d| d != b'0') {
        out.push('-');
    }
    out.push_str(if whole.is_empty() { "0" } else { whole });
    if decimals > 0 {
        out.push('.');
        out.push_str(&fraction);
    }
    out
}
