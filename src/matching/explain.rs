//! Why an event did or did not match: each rule in order, its normalised key values, the targets
//! sharing them, those in the window, and the decision — computed by the same engine as a run.

use std::fmt::Write as _;

use serde_json::{Map, Value};

use super::engine::{self, Candidates, EventIn, event_key, micros};
use super::rules::normalize;
use crate::decision::{Decision, Reason};
use crate::job::{Rule, Target};

/// One rule's part of an explanation.
#[derive(Debug, Clone, PartialEq)]
pub struct RuleStep {
    pub rule: String,
    /// (event path, normalised value or `None` when missing).
    pub keys: Vec<(String, Option<String>)>,
    /// Targets whose normalised keys equal the event's (within the range read).
    pub sharing: Vec<String>,
    /// Of those, the ones whose window holds the event, with their distance in seconds.
    pub in_window: Vec<(String, f64)>,
    /// What this rule decided, or `None` when it passed the event on.
    pub decision: Option<Decision>,
    /// Whether the rule has a time window (call targets).
    pub windowed: bool,
}

/// Explains the cascade for one sessionless event against the targets read around its time.
pub fn explain(
    rules: &[Rule],
    time: i64,
    metadata: &Map<String, Value>,
    calls: &Candidates,
    groups: &Candidates,
) -> Vec<RuleStep> {
    let mut steps = Vec::new();
    for (i, rule) in rules.iter().enumerate() {
        let keys: Vec<(String, Option<String>)> =
            rule.keys.iter().map(|k| (k.event.join("."), event_key(metadata, k))).collect();
        let targets = match rule.target {
            Target::Call { .. } => calls,
            Target::CallGroup => groups,
        };
        let mut step = RuleStep {
            rule: rule.name.clone(),
            keys: keys.clone(),
            sharing: Vec::new(),
            in_window: Vec::new(),
            decision: None,
            windowed: matches!(rule.target, Target::Call { .. }),
        };
        if keys.iter().all(|k| k.1.is_some()) {
            for row in 0..targets.ids.len() {
                let equal = rule.keys.iter().zip(&keys).all(|(k, (_, v))| {
                    let raw = targets.fields.get(&k.field).and_then(|c| c.get(row));
                    raw.and_then(|r| normalize(k.normalize, r)).as_deref() == v.as_deref()
                });
                if !equal {
                    continue;
                }
                step.sharing.push(targets.ids.str(row).to_owned());
                match rule.target {
                    Target::Call { before, after } => {
                        let (s, e) = (targets.start[row], targets.end[row]);
                        if s - micros(before) <= time && time <= e + micros(after) {
                            let dist = (s - time).max(time - e).max(0);
                            step.in_window.push((targets.ids.str(row).to_owned(), dist as f64 / 1e6));
                        }
                    }
                    Target::CallGroup => step.in_window.push((targets.ids.str(row).to_owned(), 0.0)),
                }
            }
            // The decision comes from the engine itself, evaluating this rule alone.
            let one = EventIn { id: 0, time, metadata };
            let decision = engine::match_events(&rules[i..=i], &[one], calls, groups).ok().and_then(|mut o| o.pop());
            step.decision = match decision {
                Some(o @ Decision::Matched { .. }) => Some(o),
                Some(o @ Decision::Unmatched { reason: Reason::Ambiguous, .. }) => Some(o),
                _ => None,
            };
        }
        let decided = step.decision.is_some();
        steps.push(step);
        if decided {
            break;
        }
    }
    steps
}

/// The explanation as text for support staff.
pub fn render(steps: &[RuleStep]) -> String {
    let mut out = String::new();
    for (i, s) in steps.iter().enumerate() {
        let _ = writeln!(out, "rule {} `{}`", i + 1, s.rule);
        for (path, v) in &s.keys {
            let _ =
                writeln!(out, "  key {path:<20} {}", v.as_deref().map_or("(missing)".to_owned(), |v| format!("{v:?}")));
        }
        if s.keys.iter().any(|k| k.1.is_none()) {
            let _ = writeln!(out, "  -> not applicable: a key is missing from the event's Metadata; next rule");
            continue;
        }
        let list = |v: &[String]| if v.is_empty() { String::new() } else { format!(": {}", v.join(", ")) };
        let _ = writeln!(out, "  {} target(s) share these keys{}", s.sharing.len(), list(&s.sharing));
        if s.windowed {
            let win: Vec<String> = s.in_window.iter().map(|(id, d)| format!("{id} ({d:.0}s away)")).collect();
            let _ = writeln!(out, "  {} in the time window{}", s.in_window.len(), list(&win));
        }
        let _ = match &s.decision {
            Some(Decision::Matched { target, .. }) => writeln!(out, "  -> matched {target}"),
            Some(Decision::Unmatched { candidates, .. }) => {
                writeln!(out, "  -> ambiguous between {}; the cascade stops here", candidates.join(", "))
            }
            None => writeln!(out, "  -> no candidate; next rule"),
        };
    }
    if steps.last().is_none_or(|s| s.decision.is_none()) {
        let any_keys = steps.iter().any(|s| s.keys.iter().all(|k| k.1.is_some()));
        let _ = writeln!(out, "result: unmatched ({})", if any_keys { "no_candidate" } else { "missing_key" });
    }
    out
}
