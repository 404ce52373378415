//! A change written into the job file's text with `toml_edit`, keeping its comments and layout;
//! and the diff a person reads before accepting it.

use toml_edit::{Array, DocumentMut, InlineTable, Item, Table, TableLike, value};

use super::change::{Change, normalizer_name};

/// The job file's text with `change` made, or why it cannot be made in this file's layout.
pub fn apply(text: &str, change: &Change) -> Result<String, String> {
    let mut doc: DocumentMut = text.parse().map_err(|e| format!("the job file does not parse: {e}"))?;
    let rules = doc
        .get_mut("rules")
        .and_then(Item::as_array_of_tables_mut)
        .ok_or("the job file has no [[rules]] tables to change")?;
    if let Change::NewRule { name, target, event, column, normalize, window } = change {
        let mut key = InlineTable::new();
        key.insert("event", event.as_str().into());
        key.insert(if *target == crate::decision::TargetKind::Call { "call" } else { "call_group" }, (*column).into());
        if let Some(n) = normalize {
            key.insert("normalize", normalizer_name(*n).into());
        }
        let mut keys = Array::new();
        keys.push(key);
        let mut rule = Table::new();
        rule.decor_mut().set_prefix("\n# Suggested by `callrecon suggest`: a rule of one key, tied calls reported.\n");
        rule.insert("name", value(name.as_str()));
        rule.insert("target", value(target.as_str()));
        rule.insert("keys", value(keys));
        if let Some((before, after)) = window {
            rule.insert("window", value(window_table(Some(*before), Some(*after))));
        }
        rule.insert("ambiguous", value("report"));
        // Placed right after the last rule, not after the file's other tables.
        if let Some(last) = rules.iter().filter_map(Table::position).max() {
            rule.set_position(Some(last));
        }
        rules.push(rule);
        return Ok(doc.to_string());
    }
    let rule = rules
        .iter_mut()
        .find(|t| t.get("name").and_then(Item::as_str).map(str::trim) == Some(change.rule()))
        .ok_or_else(|| format!("the job file has no rule named {:?}", change.rule()))?;
    match change {
        Change::Normalize { key, normalize, .. } => {
            set_inline(key_table(rule, *key)?, "normalize", normalizer_name(*normalize));
        }
        Change::DropKey { key, .. } => {
            let keys = rule.get_mut("keys").and_then(Item::as_array_mut).ok_or(LAYOUT)?;
            if *key >= keys.len() {
                return Err(LAYOUT.to_owned());
            }
            let removed = keys.remove(*key);
            // The last key's line may end with a comment about the one before it: kept.
            if *key == keys.len() {
                let text = |r: Option<&toml_edit::RawString>| r.and_then(|r| r.as_str()).unwrap_or_default().to_owned();
                let kept = text(removed.decor().prefix());
                let trailing = text(Some(keys.trailing()));
                keys.set_trailing(format!("{kept}{trailing}"));
            }
        }
        Change::Window { before, after, .. } => {
            let sides = [("before", before), ("after", after)];
            let sides = sides.into_iter().filter_map(|(side, m)| m.map(|m| (side, format!("{m}m"))));
            match rule.get_mut("window") {
                Some(Item::Value(toml_edit::Value::InlineTable(window))) => {
                    sides.for_each(|(side, text)| set_inline(window, side, &text))
                }
                Some(Item::Table(window)) => sides.for_each(|(side, text)| set(window, side, &text)),
                Some(_) => return Err("the rule's window is not a table".to_owned()),
                None => {
                    rule.insert("window", value(window_table(*before, *after)));
                }
            }
        }
        Change::AmbiguousNearest { .. } => set(rule, "ambiguous", "nearest"),
        Change::NewRule { .. } => unreachable!("added above"),
    }
    Ok(doc.to_string())
}

const LAYOUT: &str =
    "the rule's keys are not an inline array of inline tables (`keys = [ { event = … } ]`): make this change by hand";

/// The `key`th key of a rule.
fn key_table(rule: &mut Table, key: usize) -> Result<&mut InlineTable, String> {
    let keys = rule.get_mut("keys").and_then(Item::as_array_mut).ok_or(LAYOUT)?;
    keys.get_mut(key).and_then(|k| k.as_inline_table_mut()).ok_or_else(|| LAYOUT.to_owned())
}

/// [`set`] in an inline table: a value added last takes the space before the closing brace
/// from the one that was last (`{ a = 1 }` + b is `{ a = 1, b = 2 }`, not `{ a = 1 , b = 2 }`).
fn set_inline(table: &mut InlineTable, key: &str, text: &str) {
    if table.contains_key(key) {
        return set(table, key, text);
    }
    let suffix = table.iter_mut().last().and_then(|(_, v)| {
        let suffix = v.decor().suffix().cloned();
        v.decor_mut().set_suffix("");
        suffix
    });
    table.insert(key, text.into());
    if let (Some(suffix), Some(new)) = (suffix, table.get_mut(key)) {
        new.decor_mut().set_suffix(suffix);
    }
}

/// Sets a string value, keeping the comments and spacing around the one it replaces.
fn set(table: &mut dyn TableLike, key: &str, text: &str) {
    match table.get_mut(key).and_then(Item::as_value_mut) {
        Some(old) => {
            let decor = old.decor().clone();
            *old = text.into();
            *old.decor_mut() = decor;
        }
        None => {
            table.insert(key, value(text));
        }
    }
}

/// `{ before = "…", after = "…" }` with the sides given.
fn window_table(before: Option<i64>, after: Option<i64>) -> InlineTable {
    let mut w = InlineTable::new();
    for (side, minutes) in [("before", before), ("after", after)] {
        if let Some(m) = minutes {
            w.insert(side, format!("{m}m").into());
        }
    }
    w
}

/// A unified diff of the job file, as `diff -u` prints it.
pub fn diff(path: &std::path::Path, old: &str, new: &str) -> String {
    let name = path.display().to_string();
    similar::TextDiff::from_lines(old, new).unified_diff().context_radius(3).header(&name, &name).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::Normalizer;

    const JOB: &str = r#"name = "t"

# Phone and agent, as the CRM sends them.
[[rules]]
name = "phone-and-agent"   # the main rule
target = "call"
keys = [ { event = "customerPhone", call = "ani" },   # raw
         { event = "agentId", call = "agent_id" } ]
window = { before = "10m", after = "10m" }  # ten minutes
ambiguous = "report"

[report]
dir = "reports"  # kept
"#;

    fn apply_ok(change: Change) -> String {
        let out = apply(JOB, &change).unwrap();
        crate::job::parse(std::path::Path::new("j.toml"), &out).unwrap_or_else(|e| panic!("{e}\n{out}"));
        for kept in ["# Phone and agent, as the CRM sends them.", "# the main rule", "# raw", "# kept"] {
            assert!(out.contains(kept), "{kept:?} lost:\n{out}");
        }
        out
    }

    fn rule() -> String {
        "phone-and-agent".into()
    }

    #[test]
    fn each_change_keeps_comments_and_loads() {
        let out = apply_ok(Change::Normalize {
            rule: rule(),
            key: 0,
            event: "customerPhone".into(),
            column: "ani".into(),
            normalize: Normalizer::Phone,
        });
        assert!(out.contains(r#"{ event = "customerPhone", call = "ani", normalize = "phone" }"#), "{out}");
        let out = apply_ok(Change::Window { rule: rule(), before: None, after: Some(45) });
        assert!(out.contains(r#"window = { before = "10m", after = "45m" }  # ten minutes"#), "{out}");
        let out =
            apply_ok(Change::DropKey { rule: rule(), key: 1, event: "agentId".into(), column: "agent_id".into() });
        assert!(!out.contains("agentId"), "{out}");
        let out = apply_ok(Change::AmbiguousNearest { rule: rule() });
        assert!(out.contains(r#"ambiguous = "nearest""#), "{out}");
        let out = apply_ok(Change::NewRule {
            name: "suggested-ext-dnis".into(),
            target: crate::decision::TargetKind::Call,
            event: "ext".into(),
            column: "dnis",
            normalize: Some(Normalizer::Digits),
            window: Some((0, 5)),
        });
        let job = crate::job::parse(std::path::Path::new("j.toml"), &out).unwrap();
        assert_eq!(job.rules.len(), 2);
        assert_eq!(job.rules[1].name, "suggested-ext-dnis");
        assert!(out.find("suggested-ext-dnis").unwrap() < out.find("[report]").unwrap(), "{out}");
    }
}
