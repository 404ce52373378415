//! Each candidate's rules run over the job's events in scope through the matching engine
//! ([`engine::match_events`], as a rematch decides), dry: nothing is written. The reads are
//! shared: each page of events is read once with the metadata keys any candidate reads, each
//! chunk's calls once with the fields and the widest window any candidate needs, the call
//! groups once; then every candidate decides the chunk in turn.

use anyhow::{Context, Result};
use sqlx::PgConnection;

use super::evidence::{Pages, Scope, Scoped, Stored};
use crate::calldata::{self, Candidates};
use crate::decision::{Decision, Reason, TargetKind};
use crate::job::{Job, TargetField};
use crate::matching::engine::{self, EventIn};
use crate::tuning::Tuning;

/// Example event ids kept per count.
pub const EXAMPLES: usize = 3;

/// A count of events, with the first few.
#[derive(Debug, Default, Clone)]
pub struct Count {
    pub n: u64,
    pub examples: Vec<i64>,
}

impl Count {
    fn add(&mut self, id: i64) {
        self.n += 1;
        if self.examples.len() < EXAMPLES {
            self.examples.push(id);
        }
    }
}

/// What one candidate's rules would do to the events in scope, each event counted once per count.
#[derive(Debug, Default, Clone)]
pub struct Outcome {
    /// Attaches it would have made itself: the event to the analyst's target.
    pub support: u64,
    /// Events not matched today (pending or expired) it would match.
    pub matched_more: Count,
    /// Rule matches it would move (to another target, to unmatched, or into a tie).
    pub changed: Count,
    /// Those of `changed`, dismissed events it would match, attached events it would match elsewhere.
    pub conflicts: Count,
    /// Events not matched today, not tied, that it would leave tied.
    pub ambiguous_more: Count,
}

impl Outcome {
    fn book(&mut self, id: i64, stored: &Stored, decision: &Decision) {
        let to = match decision {
            Decision::Matched { kind, target, .. } => Some((*kind, target.as_str())),
            Decision::Unmatched { .. } => None,
        };
        let tie = matches!(decision, Decision::Unmatched { reason: Reason::Ambiguous, .. });
        let same = |kind: &TargetKind, target: &str| to == Some((*kind, target));
        match stored {
            Stored::Open { .. } if to.is_some() => self.matched_more.add(id),
            Stored::Open { ambiguous: false } if tie => self.ambiguous_more.add(id),
            Stored::Rule { kind, target } if !same(kind, target) => {
                self.changed.add(id);
                self.conflicts.add(id);
            }
            Stored::Attached { kind, target } if same(kind, target) => self.support += 1,
            Stored::Attached { .. } | Stored::Dismissed if to.is_some() => self.conflicts.add(id),
            _ => {}
        }
    }
}

/// Runs each of `jobs` (the base job with one change each) over `base`'s events in `scope`.
pub async fn simulate(
    conn: &mut PgConnection,
    base: &Job,
    jobs: &[Job],
    scope: Scope,
    tuning: &Tuning,
) -> Result<Vec<Outcome>> {
    let mut outcomes = vec![Outcome::default(); jobs.len()];
    if jobs.is_empty() {
        return Ok(outcomes);
    }
    let (call_fields, group_fields, keys) = reads(jobs);
    let window = jobs
        .iter()
        .map(Job::max_window)
        .fold((chrono::Duration::zero(), chrono::Duration::zero()), |w, m| (w.0.max(m.0), w.1.max(m.1)));
    let groups = if group_fields.is_empty() {
        Candidates::default()
    } else {
        calldata::load_groups(conn, &group_fields, None).await?
    };
    let mut pages = Pages::new(base, scope, keys);
    let (mut events, mut expected) = (0usize, 0usize);
    loop {
        let page = pages.next(conn, tuning.page_events()).await?;
        if page.is_empty() {
            break;
        }
        events += page.len();
        for chunk in page.chunks(tuning.chunk_events) {
            let calls = if call_fields.is_empty() {
                Candidates::default()
            } else {
                let span = (chunk[0].time, chunk[chunk.len() - 1].time);
                calldata::load_calls(conn, None, &call_fields, span, window, false, expected).await?.0
            };
            expected = calls.ids.len();
            decide_chunk(jobs, chunk, &calls, &groups, &mut outcomes)?;
        }
    }
    tracing::info!(events, candidates = jobs.len(), "candidates simulated");
    Ok(outcomes)
}

/// Every candidate decides the chunk; its decisions are booked against the stored ones.
fn decide_chunk(
    jobs: &[Job],
    chunk: &[Scoped],
    calls: &Candidates,
    groups: &Candidates,
    outcomes: &mut [Outcome],
) -> Result<()> {
    let input: Vec<EventIn> =
        chunk.iter().map(|e| EventIn { id: e.id, time: e.time.timestamp_micros(), metadata: &e.metadata }).collect();
    // CPU-bound, and polars may block on its own runtime: off the async worker, as `decide` does.
    let decided = std::thread::scope(|s| {
        s.spawn(|| {
            jobs.iter()
                .map(|job| engine::match_events(&job.rules, &input, calls, groups))
                .collect::<Result<Vec<_>, _>>()
        })
        .join()
    })
    .map_err(|_| anyhow::anyhow!("the matching thread panicked"))?
    .context("simulating the candidates")?;
    for (outcome, decisions) in outcomes.iter_mut().zip(decided) {
        for (event, decision) in chunk.iter().zip(&decisions) {
            outcome.book(event.id, &event.stored, decision);
        }
    }
    Ok(())
}

/// What the candidates read together: the call fields, the call group fields and the top-level
/// metadata keys of every candidate's rules.
fn reads(jobs: &[Job]) -> (Vec<TargetField>, Vec<TargetField>, Vec<String>) {
    let (mut calls, mut groups, mut keys) = (Vec::new(), Vec::new(), std::collections::BTreeSet::new());
    for job in jobs {
        let (c, g) = calldata::fields(job);
        for (all, these) in [(&mut calls, c), (&mut groups, g)] {
            for f in these {
                if !all.contains(&f) {
                    all.push(f);
                }
            }
        }
        keys.extend(job.rules.iter().flat_map(|r| r.keys.iter().filter_map(|k| k.event.first().cloned())));
    }
    (calls, groups, keys.into_iter().collect())
}
