//! Candidate changes, generated from the analysts' attaches (the positives): how each attached
//! event's metadata and time relate to the call or group it was attached to, where today's
//! rules failed. Pure: the evidence is read by `evidence`.

use std::collections::{BTreeMap, HashSet};

use serde_json::{Map, Value};

use super::change::{Change, NORMALIZERS};
use crate::calldata::Candidates;
use crate::decision::TargetKind;
use crate::job::{Ambiguous, CALL_COLUMNS, GROUP_COLUMNS, Job, Normalizer, Rule, Target, TargetField};
use crate::matching::rules::{event_value, normalize};

/// An event an analyst attached by hand.
pub struct Positive {
    /// EventTime, microseconds since the epoch.
    pub time: i64,
    pub metadata: Map<String, Value>,
    pub kind: TargetKind,
    /// Its target's index in [`Evidence::calls`] or [`Evidence::groups`].
    pub target: usize,
}

/// The positives with their targets' rows (every key column and the rules' metadata paths).
#[derive(Default)]
pub struct Evidence {
    pub positives: Vec<Positive>,
    pub calls: Candidates,
    pub groups: Candidates,
}

/// A change with the number of positives whose target it makes agree with the event (keys and
/// window, one event and its target at a time: the simulation then counts the real support).
pub struct Candidate {
    pub change: Change,
    pub pairwise: usize,
}

/// Most candidates simulated: those agreeing with the most positives.
pub const MAX_CANDIDATES: usize = 20;

/// Most scalar values of one attached event's metadata looked at for a new rule.
const MAX_LEAVES: usize = 64;

/// The fields of a target a candidate may compare with: every key column a rule may name, and
/// the metadata paths the job's rules name.
pub fn fields(job: &Job, calls: bool) -> Vec<TargetField> {
    let columns = if calls { CALL_COLUMNS } else { GROUP_COLUMNS };
    let mut fields: Vec<TargetField> = columns.iter().map(|c| TargetField::Column(c)).collect();
    for rule in job.rules.iter().filter(|r| matches!(r.target, Target::Call { .. }) == calls) {
        for key in &rule.keys {
            if !fields.contains(&key.field) {
                fields.push(key.field.clone());
            }
        }
    }
    fields
}

/// Every candidate agreeing with at least `min_support` positives, the most agreeing first, at
/// most [`MAX_CANDIDATES`].
pub fn generate(job: &Job, evidence: &Evidence, min_support: usize) -> Vec<Candidate> {
    let mut out = Vec::new();
    for rule in &job.rules {
        out.extend(for_rule(rule, evidence, min_support));
    }
    out.extend(new_rules(job, evidence, min_support));
    out.sort_by(|a, b| b.pairwise.cmp(&a.pairwise).then_with(|| a.change.id().cmp(&b.change.id())));
    if out.len() > MAX_CANDIDATES {
        tracing::info!(candidates = out.len(), kept = MAX_CANDIDATES, "more candidate changes than are simulated");
        out.truncate(MAX_CANDIDATES);
    }
    out
}

/// The raw value of `field` of a positive's target.
fn target_raw<'a>(evidence: &'a Evidence, p: &Positive, field: &TargetField) -> Option<&'a str> {
    let targets = match p.kind {
        TargetKind::Call => &evidence.calls,
        TargetKind::CallGroup => &evidence.groups,
    };
    targets.fields.get(field).and_then(|c| c.get(p.target))
}

/// Whether the event's value at `path` and the target's `raw` value agree under `n`; a value
/// that normalises to nothing never agrees.
fn agrees(metadata: &Map<String, Value>, path: &[String], raw: Option<&str>, n: Option<Normalizer>) -> bool {
    let Some(event) = event_value(metadata, path).and_then(|v| normalize(n, &v)) else { return false };
    raw.and_then(|r| normalize(n, r)).is_some_and(|t| t == event)
}

/// Values shorter than this (normalised) are no evidence for a new rule: `digits` finds "0" in
/// "a0" and in "c0".
const MIN_NEW_RULE_VALUE: usize = 3;

/// [`agrees`], for a new rule: the agreeing value at least [`MIN_NEW_RULE_VALUE`] characters.
fn agrees_enough(metadata: &Map<String, Value>, path: &[String], raw: Option<&str>, n: Option<Normalizer>) -> bool {
    agrees(metadata, path, raw, n)
        && raw.and_then(|r| normalize(n, r)).is_some_and(|v| v.chars().count() >= MIN_NEW_RULE_VALUE)
}

/// How far (microseconds) a positive's time lies before its call's start and after its end.
fn gaps(evidence: &Evidence, p: &Positive) -> (i64, i64) {
    match p.kind {
        TargetKind::Call => {
            let (start, end) = (evidence.calls.start[p.target], evidence.calls.end[p.target]);
            ((start - p.time).max(0), (p.time - end).max(0))
        }
        TargetKind::CallGroup => (0, 0),
    }
}

/// Microseconds as whole minutes, rounded up.
fn minutes(micros: i64) -> i64 {
    (micros + 59_999_999) / 60_000_000
}

/// Normalise, window, drop-key and nearest candidates for one rule.
fn for_rule(rule: &Rule, evidence: &Evidence, min_support: usize) -> Vec<Candidate> {
    let (kind, before, after) = match rule.target {
        Target::Call { before, after } => (TargetKind::Call, micros(before), micros(after)),
        Target::CallGroup => (TargetKind::CallGroup, i64::MAX, i64::MAX),
    };
    let mut normalized: BTreeMap<(usize, usize), usize> = BTreeMap::new();
    let mut dropped: BTreeMap<usize, usize> = BTreeMap::new();
    let (mut late, mut need_before, mut need_after, mut tied) = (0, 0, 0, 0);
    for p in evidence.positives.iter().filter(|p| p.kind == kind) {
        let failing: Vec<usize> = (0..rule.keys.len())
            .filter(|&k| {
                let key = &rule.keys[k];
                !agrees(&p.metadata, &key.event, target_raw(evidence, p, &key.field), key.normalize)
            })
            .collect();
        let (gap_before, gap_after) = gaps(evidence, p);
        let in_window = gap_before <= before && gap_after <= after;
        match failing[..] {
            [] if !in_window => {
                late += 1;
                need_before = need_before.max(gap_before);
                need_after = need_after.max(gap_after);
            }
            // The rule found this target and did not take it: tied with others.
            [] => tied += 1,
            [k] if in_window => {
                let key = &rule.keys[k];
                let raw = target_raw(evidence, p, &key.field);
                for (i, n) in NORMALIZERS.into_iter().enumerate() {
                    if key.normalize != Some(n) && agrees(&p.metadata, &key.event, raw, Some(n)) {
                        *normalized.entry((k, i)).or_default() += 1;
                    }
                }
                if rule.keys.len() > 1 {
                    *dropped.entry(k).or_default() += 1;
                }
            }
            _ => {}
        }
    }
    let name = || rule.name.clone();
    let key_text = |k: usize| (rule.keys[k].event.join("."), field_text(&rule.keys[k].field));
    let mut out = Vec::new();
    for ((k, i), n) in normalized {
        let (event, column) = key_text(k);
        let change = Change::Normalize { rule: name(), key: k, event, column, normalize: NORMALIZERS[i] };
        out.push(Candidate { change, pairwise: n });
    }
    if late > 0 {
        let wider = |need: i64, has: i64| (need > has).then(|| minutes(need));
        let change =
            Change::Window { rule: name(), before: wider(need_before, before), after: wider(need_after, after) };
        out.push(Candidate { change, pairwise: late });
    }
    for (k, n) in dropped {
        let (event, column) = key_text(k);
        out.push(Candidate { change: Change::DropKey { rule: name(), key: k, event, column }, pairwise: n });
    }
    if kind == TargetKind::Call && rule.ambiguous == Ambiguous::Report && tied > 0 {
        out.push(Candidate { change: Change::AmbiguousNearest { rule: name() }, pairwise: tied });
    }
    out.retain(|c| c.pairwise >= min_support);
    out
}

/// A field as the job file names it.
fn field_text(field: &TargetField) -> String {
    match field {
        TargetField::Column(c) => (*c).to_owned(),
        TargetField::Metadata(path) => format!("metadata.{}", path.join(".")),
    }
}

/// New rules of one key: a metadata value of the event and a key column of its target that
/// agree (under the normaliser agreeing most often, the least changing on a tie), for pairs no
/// rule compares yet.
fn new_rules(job: &Job, evidence: &Evidence, min_support: usize) -> Vec<Candidate> {
    let used: HashSet<(bool, Vec<String>, TargetField)> = job
        .rules
        .iter()
        .flat_map(|r| {
            r.keys.iter().map(move |k| (matches!(r.target, Target::Call { .. }), k.event.clone(), k.field.clone()))
        })
        .collect();
    let options: Vec<Option<Normalizer>> = std::iter::once(None).chain(NORMALIZERS.map(Some)).collect();
    // (calls?, event path, column) -> per normaliser, the positives agreeing.
    type Pair = (bool, Vec<String>, &'static str);
    let mut agreeing: BTreeMap<Pair, Vec<Vec<usize>>> = BTreeMap::new();
    for (i, p) in evidence.positives.iter().enumerate() {
        let calls = p.kind == TargetKind::Call;
        let columns = if calls { CALL_COLUMNS } else { GROUP_COLUMNS };
        for path in leaves(&p.metadata) {
            for column in columns {
                let field = TargetField::Column(column);
                if used.contains(&(calls, path.clone(), field.clone())) {
                    continue;
                }
                let raw = target_raw(evidence, p, &field);
                for (o, n) in options.iter().enumerate() {
                    if agrees_enough(&p.metadata, &path, raw, *n) {
                        let per = agreeing
                            .entry((calls, path.clone(), column))
                            .or_insert_with(|| vec![Vec::new(); options.len()]);
                        per[o].push(i);
                    }
                }
            }
        }
    }
    let mut out = Vec::new();
    for ((calls, path, column), per) in agreeing {
        // The first of the largest: `max_by_key` keeps the last.
        let (o, support) = per.iter().enumerate().rev().max_by_key(|(_, s)| s.len()).expect("one per option");
        if support.len() < min_support {
            continue;
        }
        let window = calls.then(|| {
            support.iter().fold((0, 0), |(b, a), &i| {
                let (gb, ga) = gaps(evidence, &evidence.positives[i]);
                (b.max(minutes(gb)), a.max(minutes(ga)))
            })
        });
        let event = path.join(".");
        let mut name = format!("suggested-{}-{column}", event.replace('.', "-"));
        while job.rules.iter().any(|r| r.name == name) {
            name.push('-');
        }
        let target = if calls { TargetKind::Call } else { TargetKind::CallGroup };
        let change = Change::NewRule { name, target, event, column, normalize: options[o], window };
        out.push(Candidate { change, pairwise: support.len() });
    }
    out
}

/// The paths of the scalar values of metadata (three levels deep at most), at most
/// [`MAX_LEAVES`]; a path whose parts are empty or hold a dot cannot be named in a job file.
fn leaves(metadata: &Map<String, Value>) -> Vec<Vec<String>> {
    fn walk(map: &Map<String, Value>, prefix: &mut Vec<String>, out: &mut Vec<Vec<String>>) {
        for (k, v) in map {
            if out.len() >= MAX_LEAVES || k.is_empty() || k.contains('.') || k.trim() != k {
                continue;
            }
            prefix.push(k.clone());
            match v {
                Value::String(_) | Value::Number(_) | Value::Bool(_) => out.push(prefix.clone()),
                Value::Object(inner) if prefix.len() < 3 => walk(inner, prefix, out),
                _ => {}
            }
            prefix.pop();
        }
    }
    let mut out = Vec::new();
    walk(metadata, &mut Vec::new(), &mut out);
    out
}

fn micros(d: chrono::Duration) -> i64 {
    crate::matching::engine::micros(d)
}
