//! Query strings and posted forms, checked at the edge: every parameter is known, given once,
//! UTF-8 and free of U+0000, and not absurdly long; anything else is a 400 naming the parameter.
//! (`url::form_urlencoded` replaces bytes that are not UTF-8 silently, and PostgreSQL refuses
//! U+0000 in text with an error that would be a 500.)

use std::collections::BTreeMap;

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

/// The longest value taken (a search, a note, a cursor); longer ones are refused.
pub const LONGEST: usize = 2000;

/// A parameter refused, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadParam {
    pub name: String,
    pub reason: String,
}

impl BadParam {
    pub fn new(name: &str, reason: impl Into<String>) -> BadParam {
        BadParam { name: name.to_owned(), reason: reason.into() }
    }
}

impl std::fmt::Display for BadParam {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "parameter {:?}: {}", self.name, self.reason)
    }
}

impl IntoResponse for BadParam {
    fn into_response(self) -> Response {
        tracing::info!(parameter = %self.name, reason = %self.reason, "review desk: request refused");
        (StatusCode::BAD_REQUEST, [(axum::http::header::CONTENT_TYPE, "text/plain; charset=utf-8")], self.to_string())
            .into_response()
    }
}

/// The most values a list parameter takes (a bulk decision's events).
pub const MOST_VALUES: usize = 1000;

/// The parameters of a query string or form, each checked.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Params(BTreeMap<String, String>, BTreeMap<String, Vec<String>>);

impl Params {
    /// `raw` (`a=1&b=x+y`, percent-encoded) with only the names in `known`. Empty pairs (`&&`)
    /// are skipped.
    pub fn parse(raw: &[u8], known: &[&str]) -> Result<Params, BadParam> {
        Params::parse_lists(raw, known, &[])
    }

    /// [`Params::parse`], where the names in `lists` may be given many times (at most
    /// [`MOST_VALUES`]), their values kept in order ([`Params::list`]).
    pub fn parse_lists(raw: &[u8], known: &[&str], lists: &[&str]) -> Result<Params, BadParam> {
        let mut params = BTreeMap::new();
        let mut many: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for pair in raw.split(|b| *b == b'&').filter(|p| !p.is_empty()) {
            let (name, value) = match pair.iter().position(|b| *b == b'=') {
                Some(at) => (&pair[..at], &pair[at + 1..]),
                None => (pair, &[][..]),
            };
            let name = decode(name).map_err(|reason| BadParam::new(&String::from_utf8_lossy(name), reason))?;
            if !known.contains(&name.as_str()) && !lists.contains(&name.as_str()) {
                let reason = format!("unknown parameter (known: {})", known.join(", "));
                return Err(BadParam { name: name.chars().take(100).collect(), reason });
            }
            let value = decode(value).map_err(|reason| BadParam::new(&name, reason))?;
            if value.chars().count() > LONGEST {
                return Err(BadParam::new(&name, format!("longer than {LONGEST} characters")));
            }
            if lists.contains(&name.as_str()) {
                let values = many.entry(name.clone()).or_default();
                if values.len() == MOST_VALUES {
                    return Err(BadParam::new(&name, format!("given more than {MOST_VALUES} times")));
                }
                values.push(value);
            } else if params.insert(name.clone(), value).is_some() {
                return Err(BadParam::new(&name, "given more than once"));
            }
        }
        Ok(Params(params, many))
    }

    /// The values of list parameter `name`, in the order given.
    pub fn list(&self, name: &str) -> &[String] {
        self.1.get(name).map_or(&[], Vec::as_slice)
    }

    /// The value of `name`, trimmed; `None` when absent or empty.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0.get(name).map(|v| v.trim()).filter(|v| !v.is_empty())
    }

    /// The value of `name` as given (not trimmed); `""` when absent.
    pub fn raw(&self, name: &str) -> &str {
        self.0.get(name).map_or("", String::as_str)
    }

    /// `name` as a whole number from 0, at most `max` (larger ones are taken as `max`).
    pub fn number(&self, name: &str, max: u32, what: &str) -> Result<Option<u32>, BadParam> {
        let Some(v) = self.get(name) else { return Ok(None) };
        if v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) {
            return Err(BadParam::new(name, format!("must be a whole number of {what}, 0 or more")));
        }
        // All digits: too many of them is only a large number.
        Ok(Some(v.parse::<u32>().map_or(max, |n| n.min(max))))
    }
}

/// A component of `application/x-www-form-urlencoded`: `+` is a space, `%XX` a byte; the bytes
/// must be UTF-8 without U+0000.
fn decode(raw: &[u8]) -> Result<String, &'static str> {
    let mut bytes = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        match raw[i] {
            b'+' => bytes.push(b' '),
            b'%' => match hex_pair(raw.get(i + 1..i + 3)) {
                Some(b) => {
                    bytes.push(b);
                    i += 2;
                }
                None => bytes.push(b'%'),
            },
            b => bytes.push(b),
        }
        i += 1;
    }
    let text = String::from_utf8(bytes).map_err(|_| "is not UTF-8 text")?;
    if text.contains('\0') {
        return Err("contains U+0000");
    }
    Ok(text)
}

fn hex_pair(pair: Option<&[u8]>) -> Option<u8> {
    let pair = pair?;
    let digit = |b: u8| (b as char).to_digit(16);
    Some((digit(pair[0])? * 16 + digit(pair[1])?) as u8)
}

#[cfg(test)]
mod tests {
    use super::*;

    const KNOWN: [&str; 3] = ["job", "q", "min_days"];

    fn check(raw: &str) -> Result<Params, String> {
        Params::parse(raw.as_bytes(), &KNOWN).map_err(|e| e.to_string())
    }

    #[test]
    fn values_are_decoded_and_checked() {
        let p = check("job=night+ly&q=C-7%25%C3%A9&min_days=").unwrap();
        assert_eq!(p.get("job"), Some("night ly"));
        assert_eq!(p.get("q"), Some("C-7%é"));
        assert_eq!(p.get("min_days"), None);
        assert_eq!(check("q=100%").unwrap().get("q"), Some("100%"));
        assert_eq!(check("q=%4").unwrap().get("q"), Some("%4"));
        assert_eq!(check("&&job=a&").unwrap().get("job"), Some("a"));
        for (raw, error) in [
            ("q=%00", r#"parameter "q": contains U+0000"#),
            ("q=%FF", r#"parameter "q": is not UTF-8 text"#),
            ("job=a&job=b", r#"parameter "job": given more than once"#),
            ("x=1", r#"parameter "x": unknown parameter (known: job, q, min_days)"#),
            ("%FF=1", r#"parameter "%FF": is not UTF-8 text"#),
        ] {
            assert_eq!(check(raw).unwrap_err(), error, "{raw}");
        }
        assert!(check(&format!("q={}", "x".repeat(LONGEST + 1))).is_err());
    }

    #[test]
    fn list_parameters_keep_every_value_in_order() {
        let p = Params::parse_lists(b"id=3&id=1&job=a&id=2", &KNOWN, &["id"]).unwrap();
        assert_eq!(p.list("id"), ["3", "1", "2"]);
        assert_eq!(p.get("job"), Some("a"));
        let many = vec!["id=1"; MOST_VALUES + 1].join("&");
        assert!(Params::parse_lists(many.as_bytes(), &KNOWN, &["id"]).is_err());
    }

    #[test]
    fn numbers_are_clamped_or_refused() {
        let number = |raw: &str| check(raw).unwrap().number("min_days", 36_500, "days").map_err(|e| e.reason);
        assert_eq!(number("min_days=3"), Ok(Some(3)));
        assert_eq!(number("min_days=106751991"), Ok(Some(36_500)));
        assert_eq!(number("min_days=99999999999999999999999"), Ok(Some(36_500)));
        assert_eq!(number(""), Ok(None));
        for bad in ["min_days=lots", "min_days=-1", "min_days=1.5", "min_days=%2B1"] {
            assert_eq!(number(bad), Err("must be a whole number of days, 0 or more".to_owned()), "{bad}");
        }
    }
}
