//! An event's group part: its values of the job's `group_fields`, which a call's group and the
//! group's other calls get from an event matched to the call; built in memory (`group_part`) or
//! by the statement that stores a decision from the stored metadata (`group_part_sql!`).

use serde_json::{Map, Value};

use crate::decision::TargetKind;

/// The group part of an event matched to a target of `kind`: its values of the job's
/// `group_fields`, given to the call's group and its other calls. None for an event matched to
/// a group, which gets all of the event.
pub fn group_part(metadata: &Map<String, Value>, kind: TargetKind, group_fields: &[String]) -> Map<String, Value> {
    group_part_fields(kind, group_fields)
        .iter()
        .filter_map(|f| metadata.get(f).map(|v| (f.clone(), v.clone())))
        .collect()
}

/// The fields of [`group_part`] for a target of `kind`.
pub(super) fn group_part_fields(kind: TargetKind, group_fields: &[String]) -> &[String] {
    if kind == TargetKind::Call { group_fields } else { &[] }
}

/// Whether [`group_part`] with `fields` would equal `stored`, without building it: a rematch
/// asks this of every event it confirms.
pub(super) fn same_group_part(metadata: &Map<String, Value>, fields: &[String], stored: &Map<String, Value>) -> bool {
    let mut present = 0;
    for (i, f) in fields.iter().enumerate() {
        if fields[..i].contains(f) {
            continue;
        }
        if let Some(v) = metadata.get(f) {
            present += 1;
            if stored.get(f) != Some(v) {
                return false;
            }
        }
    }
    present == stored.len()
}

/// The group part of the event `e` matched to a call, taken from its stored metadata, the job's
/// group fields being parameter `$11` (as [`group_part`] takes it from the metadata in memory).
macro_rules! group_part_sql {
    () => {
        "(select coalesce(jsonb_object_agg(f, e.metadata -> f), '{}') from unnest($11::text[]) f
          where jsonb_typeof(e.metadata) = 'object' and e.metadata ? f)"
    };
}
pub(crate) use group_part_sql;

#[cfg(test)]
mod tests {
    use super::*;

    /// `same_group_part` answers what building the group part and comparing it would.
    #[test]
    fn same_group_part_is_group_part_compared() {
        let map = |text: &str| -> Map<String, Value> { serde_json::from_str(text).unwrap() };
        let metadata = map(r#"{"tier": "gold", "acct": 7, "other": true}"#);
        let stored = [
            "{}",
            r#"{"tier": "gold"}"#,
            r#"{"acct": 7, "tier": "gold"}"#,
            r#"{"tier": "gold", "acct": 7}"#,
            r#"{"tier": "gold", "acct": 8}"#,
            r#"{"tier": "gold", "acct": 7, "gone": 1}"#,
        ];
        let fields: [&[&str]; 5] = [&[], &["tier"], &["tier", "acct"], &["tier", "acct", "tier"], &["missing", "tier"]];
        for f in fields {
            let f: Vec<String> = f.iter().map(|s| s.to_string()).collect();
            for s in stored {
                let s = map(s);
                let built = group_part(&metadata, TargetKind::Call, &f);
                assert_eq!(same_group_part(&metadata, &f, &s), built == s, "fields {f:?}, stored {s:?}");
            }
        }
    }
}
