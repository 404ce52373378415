//! Key values: reading them from an event's Metadata and normalising both sides alike.

use serde_json::{Map, Value};

use crate::job::Normalizer;

/// The text of the value at `path` in Metadata: strings as they are, numbers and booleans as
/// their JSON text. Missing, null, arrays and objects have no key value.
pub fn event_value<'a>(metadata: &'a Map<String, Value>, path: &[String]) -> Option<std::borrow::Cow<'a, str>> {
    let (first, rest) = path.split_first()?;
    let mut v = metadata.get(first)?;
    for p in rest {
        v = v.as_object()?.get(p)?;
    }
    match v {
        Value::String(s) => Some(s.as_str().into()),
        Value::Number(n) => Some(n.to_string().into()),
        Value::Bool(b) => Some(b.to_string().into()),
        Value::Null | Value::Array(_) | Value::Object(_) => None,
    }
}

/// Normalises a key value; `None` when nothing is left to compare (an empty value never
/// matches anything).
pub fn normalize(n: Option<Normalizer>, raw: &str) -> Option<String> {
    let mut out = String::new();
    normalize_into(n, raw, &mut out).then_some(out)
}

/// [`normalize`], appending the value to `out`; false when nothing is left to compare (what it
/// appended is then empty). For columns of millions of values, without a `String` each.
pub fn normalize_into(n: Option<Normalizer>, raw: &str, out: &mut String) -> bool {
    let start = out.len();
    match n {
        None => out.push_str(raw),
        Some(Normalizer::Trim) => out.push_str(raw.trim()),
        // `str::to_lowercase`, not per char: a final sigma lowers as a final sigma.
        Some(Normalizer::Lower) => out.push_str(&raw.to_lowercase()),
        Some(Normalizer::Digits) => out.extend(raw.chars().filter(char::is_ascii_digit)),
        Some(Normalizer::Phone) => {
            // North American numbers: "+1 555-123-4567", "15551234567" and "(555) 123-4567" are
            // one number. The contract's rule, kept exact rather than guessed by a phone
            // library: digits only, a leading country code 1 on 11 digits dropped.
            out.extend(raw.chars().filter(char::is_ascii_digit));
            if out.len() - start == 11 && out.as_bytes()[start] == b'1' {
                out.remove(start);
            }
        }
    }
    out.len() > start
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn normalisers() {
        let cases: &[(Option<Normalizer>, &str, Option<&str>)] = &[
            (Some(Normalizer::Phone), "(555) 123-4567", Some("5551234567")),
            (Some(Normalizer::Phone), "+1 555-123-4567", Some("5551234567")),
            (Some(Normalizer::Phone), "15551234567", Some("5551234567")),
            (Some(Normalizer::Phone), "5551234567", Some("5551234567")),
            (Some(Normalizer::Phone), "+1 (555) 123.4567", Some("5551234567")),
            (Some(Normalizer::Phone), "+44 20 7946 0958", Some("442079460958")),
            (Some(Normalizer::Phone), "25551234567", Some("25551234567")),
            (Some(Normalizer::Phone), "n/a", None),
            (Some(Normalizer::Lower), "Agent-7", Some("agent-7")),
            (Some(Normalizer::Trim), "  C-77 ", Some("C-77")),
            (Some(Normalizer::Trim), "   ", None),
            (Some(Normalizer::Digits), "C-0077", Some("0077")),
            (None, " as is ", Some(" as is ")),
            (None, "", None),
        ];
        for (n, input, expected) in cases {
            assert_eq!(normalize(*n, input).as_deref(), *expected, "{n:?} {input:?}");
        }
    }

    #[test]
    fn event_values_by_path() {
        let m = json!({"a": "x", "n": 42, "f": 1.5, "b": true, "z": null, "o": {"p": {"q": 7}}, "l": [1]});
        let m = m.as_object().unwrap();
        let get =
            |p: &str| event_value(m, &p.split('.').map(str::to_owned).collect::<Vec<_>>()).map(|c| c.into_owned());
        assert_eq!(get("a").as_deref(), Some("x"));
        assert_eq!(get("n").as_deref(), Some("42"));
        assert_eq!(get("f").as_deref(), Some("1.5"));
        assert_eq!(get("b").as_deref(), Some("true"));
        assert_eq!(get("o.p.q").as_deref(), Some("7"));
        assert_eq!(get("z"), None);
        assert_eq!(get("l"), None);
        assert_eq!(get("o"), None);
        assert_eq!(get("missing"), None);
        assert_eq!(get("a.deeper"), None);
    }
}
