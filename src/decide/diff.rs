//! A rematch's diff: how each re-decided event's decision changed (pure).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::decision::{Decision, TargetKind, id_text};
use crate::ledger::Previous;

/// What a rematch changed.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Diff {
    /// Events re-evaluated.
    pub evaluated: u64,
    pub newly_matched: u64,
    pub moved: u64,
    pub newly_unmatched: u64,
    /// Same target, now by another rule.
    pub rule_changed: u64,
    pub unchanged: u64,
    /// Events in range decided by hand: a rematch keeps them as they are.
    #[serde(default)]
    pub kept_manual: u64,
    /// Per rule: events it now decides that it did not (`gained`) and the reverse (`lost`).
    pub by_rule: BTreeMap<String, RuleDiff>,
    /// Every event whose target or rule changed.
    pub changes: Vec<Change>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct RuleDiff {
    pub gained: u64,
    pub lost: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Change {
    #[serde(with = "id_text")]
    pub event_id: i64,
    pub change: ChangeKind,
    pub from: Option<TargetRef>,
    pub to: Option<TargetRef>,
    pub rule_before: Option<String>,
    pub rule_after: Option<String>,
    /// For `newly_unmatched`: why.
    pub reason: Option<String>,
}

/// How a rematch changed an event's decision.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ChangeKind {
    NewlyMatched,
    Moved,
    NewlyUnmatched,
    RuleChanged,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TargetRef {
    pub kind: TargetKind,
    pub id: String,
}

/// Adds one re-decided event to a rematch's diff.
pub(super) fn record_change(diff: &mut Diff, event_id: i64, p: &Previous, decision: &Decision) {
    diff.evaluated += 1;
    let target_ref = |(kind, id): &(TargetKind, String)| TargetRef { kind: *kind, id: id.clone() };
    let (new, new_rule, reason) = match decision {
        Decision::Matched { rule, kind, target } => (Some((*kind, target.clone())), Some(rule.clone()), None),
        Decision::Unmatched { reason, .. } => (None, None, Some(reason.as_str().to_owned())),
    };
    let change = match (&p.target, &new) {
        (None, None) => None,
        (None, Some(_)) => Some(ChangeKind::NewlyMatched),
        (Some(_), None) => Some(ChangeKind::NewlyUnmatched),
        (Some(a), Some(b)) if a != b => Some(ChangeKind::Moved),
        (Some(_), Some(_)) if p.rule != new_rule => Some(ChangeKind::RuleChanged),
        (Some(_), Some(_)) => None,
    };
    let Some(change) = change else {
        diff.unchanged += 1;
        return;
    };
    match change {
        ChangeKind::NewlyMatched => diff.newly_matched += 1,
        ChangeKind::NewlyUnmatched => diff.newly_unmatched += 1,
        ChangeKind::Moved => diff.moved += 1,
        ChangeKind::RuleChanged => diff.rule_changed += 1,
    }
    if p.rule != new_rule {
        if let Some(r) = &p.rule {
            diff.by_rule.entry(r.clone()).or_default().lost += 1;
        }
        if let Some(r) = &new_rule {
            diff.by_rule.entry(r.clone()).or_default().gained += 1;
        }
    }
    diff.changes.push(Change {
        event_id,
        change,
        from: p.target.as_ref().map(target_ref),
        to: new.as_ref().map(target_ref),
        rule_before: p.rule.clone(),
        rule_after: new_rule,
        reason,
    });
}
