//! What a run's decisions add up to, as they are made: the targets apply must recompute, the
//! counts of the summary, a rematch's diff. Pure: no I/O.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};

use super::diff::{Diff, record_change};
use crate::calldata::Hint;
use crate::decision::{Decision, TargetKind};
use crate::ledger::ToDecide;

/// What the decide stage hands apply: the targets of events whose decision changed (old and
/// new targets), where matching saw the calls, and the stored events whose decision this run
/// rewrote (`None` when there were too many to keep).
pub struct ToApply {
    pub calls: Vec<String>,
    pub groups: Vec<String>,
    pub hints: foldhash::HashMap<String, Hint>,
    pub rewritten: Option<Vec<i64>>,
}

/// The tally of a run's decisions.
pub struct Tally {
    /// Unmatched events received before this are expired.
    expired_before: DateTime<Utc>,
    /// A rematch keeps the diff of every decision.
    diff: Option<Diff>,
    pub matched: u64,
    pub by_rule: BTreeMap<String, u64>,
    /// Targets whose set of matched events changed: what apply recomputes.
    touched_calls: foldhash::HashSet<String>,
    touched_groups: foldhash::HashSet<String>,
    /// Stored events whose decision this run rewrote, while at most `page` of them: then apply
    /// may read on a second connection, leaving them out.
    rewritten: Option<Vec<i64>>,
    /// Where matching saw the calls it matched, kept as long as `rewritten` is.
    hints: Option<foldhash::HashMap<String, Hint>>,
    page: usize,
}

impl Tally {
    pub fn new(expired_before: DateTime<Utc>, rematch: bool, page: usize) -> Self {
        Tally {
            expired_before,
            diff: rematch.then(Diff::default),
            matched: 0,
            by_rule: BTreeMap::new(),
            touched_calls: Default::default(),
            touched_groups: Default::default(),
            rewritten: Some(Vec::new()),
            hints: Some(Default::default()),
            page,
        }
    }

    /// Books one decision: the targets it touches, a new match's count, a rematch's diff.
    /// Returns whether the event is expired: unmatched past `pending_for` since it was
    /// received, retried only by rematch.
    pub fn book(&mut self, e: &ToDecide, decision: &Decision) -> bool {
        let new_target = match decision {
            Decision::Matched { kind, target, .. } => Some((*kind, target.clone())),
            Decision::Unmatched { .. } => None,
        };
        let p = &e.previous;
        self.touch(&p.target, &new_target);
        if let (Decision::Matched { rule, .. }, None) = (decision, &p.target) {
            self.matched += 1;
            match self.by_rule.get_mut(rule) {
                Some(n) => *n += 1,
                None => {
                    self.by_rule.insert(rule.clone(), 1);
                }
            }
        }
        if let Some(diff) = &mut self.diff {
            record_change(diff, e.subject.id, p, decision);
        }
        new_target.is_none() && e.received_at <= self.expired_before
    }

    /// Notes the old and new target of a decision: both are recomputed when they differ.
    pub fn touch(&mut self, old: &Option<(TargetKind, String)>, new: &Option<(TargetKind, String)>) {
        if old != new {
            for (kind, id) in old.iter().chain(new) {
                match kind {
                    TargetKind::Call => self.touched_calls.insert(id.clone()),
                    TargetKind::CallGroup => self.touched_groups.insert(id.clone()),
                };
            }
        }
    }

    /// Notes a stored event's decision rewritten: its target is recomputed even when it kept
    /// it, its rule or group part changed (the group part reaches the other calls of its group:
    /// a change of `group_fields` rewrites group parts alone).
    pub fn recompute_target(&mut self, decision: &Decision) {
        if let Decision::Matched { kind, target, .. } = decision {
            self.touch(&None, &Some((*kind, target.clone())));
        }
    }

    /// A rematch's count of events in its scope kept as they are: decided by hand.
    pub fn kept_manual(&mut self, n: u64) {
        if let Some(diff) = &mut self.diff {
            diff.kept_manual = n;
        }
    }

    /// Keeps where matching saw the calls it matched that apply will recompute (a rematch
    /// confirms most matches), while apply may use it. Call after booking the decisions.
    pub fn keep_hints(&mut self, hints: foldhash::HashMap<String, Hint>) {
        if let Some(kept) = &mut self.hints {
            kept.extend(hints.into_iter().filter(|(call, _)| self.touched_calls.contains(call)));
        }
    }

    /// Notes stored events whose decision was rewritten; past a page of them they are
    /// forgotten (and apply reads after storing).
    pub fn rewrote(&mut self, ids: &[i64]) {
        if let Some(rewritten) = &mut self.rewritten {
            rewritten.extend(ids);
            if rewritten.len() > self.page {
                self.rewritten = None;
                self.hints = None;
            }
        }
    }

    /// What apply needs, and the rematch's diff (its changes in event order).
    pub fn into_parts(self) -> (ToApply, Option<Diff>) {
        let mut diff = self.diff;
        if let Some(diff) = &mut diff {
            diff.changes.sort_by_key(|c| c.event_id);
        }
        let inputs = ToApply {
            calls: self.touched_calls.into_iter().collect(),
            groups: self.touched_groups.into_iter().collect(),
            hints: self.hints.unwrap_or_default(),
            rewritten: self.rewritten,
        };
        (inputs, diff)
    }
}
