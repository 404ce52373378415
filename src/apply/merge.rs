//! Merging in memory: a target's value from its contributions, in merge order.

use foldhash::{HashMap, HashMapExt as _};

use serde_json::value::RawValue;

use super::this_run::ThisRun;
use super::types::{Batch, Contribution, Merged, NewValue, Part, Row};
use crate::jsonb::print_object;

impl Batch {
    /// Merges the batch's values, with this run's decisions it was read without.
    pub(super) fn merge(&self, this_run: &ThisRun) -> Merged {
        let step = std::time::Instant::now();
        let Batch { groups, groupless, current, members, by_call, by_group, group_rows } = self;
        let none: &[Contribution] = &[];
        let new_of = |c: &str| this_run.calls.get(c).map_or(&[][..], Vec::as_slice);
        let mut m = Merged {
            group_changes: Vec::new(),
            call_changes: Vec::new(),
            contributing: Vec::new(),
            not_contributing: Vec::new(),
        };
        // Rows are only looked at: the caller frees the batch on another thread.
        let keep_if_changed = |changes: &mut Vec<NewValue>, rows: &HashMap<String, Row>, id: &str, value: String| {
            if let Some(row) = rows.get(id)
                && row.value != value
            {
                changes.push(NewValue { tid: row.tid, start: row.start, id: id.to_owned(), value });
            }
        };
        for g in groups {
            let calls = members.get(g).map_or(&[][..], Vec::as_slice);
            // The group's contributions, with the call whose event each group part is.
            let mut parts: Vec<Part> =
                by_group.get(g).map_or(none, Vec::as_slice).iter().map(Contribution::as_part).collect();
            parts.extend(this_run.groups.get(g).into_iter().flatten().map(|p| (p, None)));
            for c in calls {
                parts.extend(new_of(c).iter().filter_map(|(_, part)| part.as_ref()).map(|p| (p, Some(c.as_str()))));
            }
            for c in calls {
                let own = by_call.get(c).map_or(none, Vec::as_slice).iter().chain(new_of(c).iter().map(|(m, _)| m));
                keep_if_changed(&mut m.call_changes, current, c, call_value(c, own, &parts));
            }
            let value = group_value(&parts);
            if value == "{}" {
                m.not_contributing.push(g.clone())
            } else {
                m.contributing.push(g.clone())
            }
            keep_if_changed(&mut m.group_changes, group_rows, g, value);
        }
        for c in groupless {
            let own = by_call.get(c).map_or(none, Vec::as_slice).iter().chain(new_of(c).iter().map(|(m, _)| m));
            keep_if_changed(&mut m.call_changes, current, c, call_value(c, own, &[]));
        }
        tracing::debug!(
            elapsed_ms = step.elapsed().as_millis() as u64,
            calls = m.call_changes.len(),
            groups = m.group_changes.len(),
            "values merged"
        );
        m
    }
}

/// The shallow merge of `parts` in merge order (later wins), as JSON text in the form
/// PostgreSQL prints jsonb (keys by length, then bytes; `", "` and `": "`), so it compares
/// equal to the stored value's text exactly when it needs no write. Values are the events'
/// jsonb text, already in that form.
fn merge<'a>(parts: impl Iterator<Item = &'a Contribution>) -> String {
    let mut parts: Vec<&Contribution> = parts.collect();
    parts.sort_by_key(|p| p.order);
    let mut merged: HashMap<&str, &RawValue> = HashMap::new();
    for p in parts {
        for (k, v) in &p.fields {
            merged.insert(k, v);
        }
    }
    let mut out = String::new();
    print_object(merged.into_iter().collect(), &mut out, |v: &RawValue, out| out.push_str(v.get()));
    out
}

/// The value of call `call`: its own events (`own`) and the parts of its group (`group`, empty
/// for a call without a group) that are not its own: a call has its events' full metadata already.
/// `verify` computes the same values with this function.
pub fn call_value<'a>(call: &str, own: impl Iterator<Item = &'a Contribution>, group: &[Part<'a>]) -> String {
    let theirs = group.iter().filter(|(_, owner)| *owner != Some(call)).map(|(p, _)| *p);
    merge(own.chain(theirs))
}

/// The value of a call group: every one of its parts. It is also the value of each call of the
/// group that has no matched event of its own (such a call owns no part).
pub fn group_value(parts: &[Part<'_>]) -> String {
    merge(parts.iter().map(|(p, _)| *p))
}

#[cfg(test)]
mod tests {
    use chrono::DateTime;

    use super::*;

    fn part(time: i64, id: i64, metadata: &str) -> Contribution {
        Contribution::parse(DateTime::from_timestamp_micros(time).unwrap(), id, metadata, None).unwrap()
    }

    #[test]
    fn later_event_time_wins_then_arrival_order() {
        let parts =
            [part(20, 1, r#"{"a": "late"}"#), part(10, 2, r#"{"a": "early", "b": 1}"#), part(20, 3, r#"{"b": 2}"#)];
        let merged: serde_json::Value = serde_json::from_str(&merge(parts.iter())).unwrap();
        assert_eq!(merged, serde_json::json!({"a": "late", "b": 2}));
        assert_eq!(merge([].iter()), "{}");
    }

    #[test]
    fn values_are_written_back_exactly_as_stored() {
        let text =
            r#"{"big": 123456789012345678901234567890, "f": 1.50, "s": "a\"b\\c\nd", "k\"ey": [1, {"x": null}]}"#;
        let merged = merge([part(1, 1, text)].iter());
        assert!(merged.contains("123456789012345678901234567890"), "{merged}");
        assert!(merged.contains("1.50"), "{merged}");
        let a: serde_json::Value = serde_json::from_str(&merged).unwrap();
        let b: serde_json::Value = serde_json::from_str(text).unwrap();
        assert_eq!(a, b);
    }

    #[test]
    fn metadata_that_is_not_an_object_names_the_event() {
        let e = Contribution::parse(DateTime::from_timestamp_micros(0).unwrap(), 42, "[1]", None).err().unwrap();
        assert!(format!("{e:#}").contains("event 42"), "{e:#}");
    }
}
