//! Rule cascade over a batch of sessionless events, with polars joins.
//!
//! Architecture invariant: the engine never touches the database. It takes events and the
//! targets they may match (already read for the batch's time range) and returns one
//! [`Decision`] per event. Decisions do not depend on input order.

use std::collections::HashMap;

use foldhash::HashMapExt as _;

use polars::prelude::*;
use serde_json::{Map, Value};

use super::rules::{event_value, normalize, normalize_into};
pub use crate::calldata::Candidates;
use crate::decision::{Decision, Reason, TargetKind};
use crate::job::{Ambiguous, Key, Normalizer, Rule, Target, TargetField};
use crate::pgcopy::Texts;

/// A sessionless event to match; times are microseconds since the epoch (UTC).
pub struct EventIn<'a> {
    pub id: i64,
    pub time: i64,
    pub metadata: &'a Map<String, Value>,
}

/// Most candidates kept with an ambiguous decision (nearest first).
pub const MAX_CANDIDATES: usize = 20;

/// Runs the rule cascade: the first rule that yields a match or an ambiguity decides.
pub fn match_events(
    rules: &[Rule],
    events: &[EventIn],
    calls: &Candidates,
    groups: &Candidates,
) -> PolarsResult<Vec<Decision>> {
    Ok(match_events_at(rules, events, calls, groups)?.into_iter().map(|(o, _)| o).collect())
}

/// [`match_events`], with the index of each matched target in its [`Candidates`].
pub fn match_events_at(
    rules: &[Rule],
    events: &[EventIn],
    calls: &Candidates,
    groups: &Candidates,
) -> PolarsResult<Vec<(Decision, Option<u32>)>> {
    let mut decisions: Vec<Option<(Decision, Option<u32>)>> = vec![None; events.len()];
    let mut some_key_present = vec![false; events.len()];
    let mut cache = NormCache::default();

    for rule in rules {
        let undecided: Vec<usize> = (0..events.len()).filter(|&i| decisions[i].is_none()).collect();
        if undecided.is_empty() {
            break;
        }
        // Key values of the events this rule can evaluate (all keys present).
        let mut ev_idx: Vec<u32> = Vec::new();
        let mut ev_keys: Vec<Vec<String>> = vec![Vec::new(); rule.keys.len()];
        'events: for &i in &undecided {
            let mut vals = Vec::with_capacity(rule.keys.len());
            for key in &rule.keys {
                match event_key(events[i].metadata, key) {
                    Some(v) => vals.push(v),
                    None => continue 'events,
                }
            }
            some_key_present[i] = true;
            ev_idx.push(i as u32);
            for (col, v) in ev_keys.iter_mut().zip(vals) {
                col.push(v);
            }
        }
        if ev_idx.is_empty() {
            continue;
        }

        let (targets, kind) = match rule.target {
            Target::Call { .. } => (calls, TargetKind::Call),
            Target::CallGroup => (groups, TargetKind::CallGroup),
        };
        let pairs = candidate_pairs(rule, events, &ev_idx, ev_keys, targets, &mut cache)?;

        // Group candidates by event; decide.
        let mut by_event: foldhash::HashMap<u32, Vec<(i64, u32)>> = foldhash::HashMap::new();
        for (e, c) in pairs {
            let t = events[e as usize].time;
            let dist = match rule.target {
                Target::Call { .. } => (targets.start[c as usize] - t).max(t - targets.end[c as usize]).max(0),
                Target::CallGroup => 0,
            };
            by_event.entry(e).or_default().push((dist, c));
        }
        for (e, mut cands) in by_event {
            cands.sort_by(|a, b| {
                a.0.cmp(&b.0).then_with(|| targets.ids.str(a.1 as usize).cmp(targets.ids.str(b.1 as usize)))
            });
            let decided = match (cands.len(), rule.ambiguous) {
                (1, _) => true,
                (_, Ambiguous::Nearest) => matches!(rule.target, Target::Call { .. }) && cands[0].0 < cands[1].0,
                (_, Ambiguous::Report) => false,
            };
            decisions[e as usize] = Some(if decided {
                let target = targets.ids.str(cands[0].1 as usize).to_owned();
                (Decision::Matched { rule: rule.name.clone(), kind, target }, Some(cands[0].1))
            } else {
                let candidates =
                    cands.iter().take(MAX_CANDIDATES).map(|(_, c)| targets.ids.str(*c as usize).to_owned()).collect();
                (Decision::Unmatched { reason: Reason::Ambiguous, candidates }, None)
            });
        }
    }

    Ok(decisions
        .into_iter()
        .zip(some_key_present)
        .map(|(o, present)| {
            o.unwrap_or_else(|| {
                let reason = if present { Reason::NoCandidate } else { Reason::MissingKey };
                (Decision::Unmatched { reason, candidates: Vec::new() }, None)
            })
        })
        .collect())
}

/// The normalised key value of an event, if present.
pub fn event_key(metadata: &Map<String, Value>, key: &Key) -> Option<String> {
    event_value(metadata, &key.event).and_then(|v| normalize(key.normalize, &v))
}

/// Normalised target columns, computed once per (field, normaliser) for the batch.
#[derive(Default)]
struct NormCache(HashMap<(TargetField, Option<Normalizer>), Texts>);

impl NormCache {
    /// Normalises the target column `key` compares with, unless already done for this batch.
    fn fill(&mut self, targets: &Candidates, key: &Key) {
        self.0.entry((key.field.clone(), key.normalize)).or_insert_with(|| {
            let mut out = Texts::default();
            let raw = targets.fields.get(&key.field);
            for row in 0..targets.ids.len() {
                let raw = raw.and_then(|c| c.get(row));
                out.push_with(|buf| raw.is_some_and(|v| normalize_into(key.normalize, v, buf)));
            }
            out
        });
    }

    fn get(&self, key: &Key) -> &Texts {
        &self.0[&(key.field.clone(), key.normalize)]
    }
}

/// (event index, target index) pairs whose keys are equal and, for calls, whose window holds the
/// event's time: an equi-join on the key columns followed by a window filter.
fn candidate_pairs(
    rule: &Rule,
    events: &[EventIn],
    ev_idx: &[u32],
    ev_keys: Vec<Vec<String>>,
    targets: &Candidates,
    cache: &mut NormCache,
) -> PolarsResult<Vec<(u32, u32)>> {
    let names: Vec<PlSmallStr> = (0..rule.keys.len()).map(|k| format!("k{k}").into()).collect();

    // Target rows with every key present.
    for k in &rule.keys {
        cache.fill(targets, k);
    }
    let norm: Vec<&Texts> = rule.keys.iter().map(|k| cache.get(k)).collect();
    let rows: Vec<u32> =
        (0..targets.ids.len() as u32).filter(|&r| norm.iter().all(|col| col.get(r as usize).is_some())).collect();
    if rows.is_empty() {
        return Ok(Vec::new());
    }

    let mut ev_cols = vec![
        Column::new("e".into(), ev_idx),
        Column::new("t".into(), ev_idx.iter().map(|&i| events[i as usize].time).collect::<Vec<i64>>()),
    ];
    for (name, vals) in names.iter().zip(ev_keys) {
        ev_cols.push(Column::new(name.clone(), vals));
    }
    let ev_df = DataFrame::new(ev_idx.len(), ev_cols)?;

    let mut tg_cols = vec![Column::new("c".into(), &rows)];
    let window = match rule.target {
        Target::Call { before, after } => {
            let (before, after) = (micros(before), micros(after));
            tg_cols.push(Column::new(
                "lo".into(),
                rows.iter().map(|&r| targets.start[r as usize] - before).collect::<Vec<i64>>(),
            ));
            tg_cols.push(Column::new(
                "hi".into(),
                rows.iter().map(|&r| targets.end[r as usize] + after).collect::<Vec<i64>>(),
            ));
            true
        }
        Target::CallGroup => false,
    };
    for (name, col) in names.iter().zip(norm) {
        let vals: Vec<&str> = rows.iter().map(|&r| col.str(r as usize)).collect();
        tg_cols.push(Column::new(name.clone(), vals));
    }
    let tg_df = DataFrame::new(rows.len(), tg_cols)?;

    let on: Vec<Expr> = names.iter().map(|n| col(n.clone())).collect();
    let mut joined = ev_df.lazy().join(tg_df.lazy(), &on, &on, JoinArgs::new(JoinType::Inner));
    if window {
        joined = joined.filter(col("t").gt_eq(col("lo")).and(col("t").lt_eq(col("hi"))));
    }
    let out = joined.select([col("e"), col("c")]).collect()?;
    let e = out.column("e")?.u32()?;
    let c = out.column("c")?.u32()?;
    Ok(e.into_no_null_iter().zip(c.into_no_null_iter()).collect())
}

pub fn micros(d: chrono::Duration) -> i64 {
    d.num_microseconds().unwrap_or(i64::MAX / 4)
}
