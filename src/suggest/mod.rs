//! `callrecon suggest`: rule changes learned from the analysts' manual decisions, each simulated
//! on the job's events before anyone accepts it.
//!
//! The analysts' attaches are the positives: `candidates` proposes the changes that would have
//! made them (a normaliser, a wider window, a key dropped, a new rule, `ambiguous = "nearest"`),
//! `edit` writes each into the job file's text, which the job loader validates like any job
//! file, and `simulate` runs the resulting rules over the job's events in scope through the
//! matching engine, dry. Dismissals and unchallenged rule matches are what a change must not
//! disturb: the simulation counts those it would as conflicts.
//!
//! Architecture invariant: suggest writes nothing to the database; the one file it writes is the
//! job file, on `--accept ID --write`, with the text it shows as the diff.

mod candidates;
mod change;
mod edit;
mod evidence;
mod simulate;

use anyhow::{Context, Result};
use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::PgPool;

pub use change::Change;
pub use evidence::Scope;
use simulate::{Count, Outcome};

use crate::job::{self, Job};
use crate::tuning::Tuning;

/// Default `--min-support`: attaches a change must have made for it to be suggested.
pub const MIN_SUPPORT: usize = 3;

/// What `suggest` found, in the contract's JSON shape.
#[derive(Debug, Serialize)]
pub struct Suggestions {
    pub job: String,
    pub scope: ScopeOut,
    pub suggestions: Vec<Suggestion>,
}

#[derive(Debug, Serialize)]
pub struct ScopeOut {
    pub since: Option<DateTime<Utc>>,
    pub until: Option<DateTime<Utc>>,
}

#[derive(Debug, Serialize)]
pub struct Suggestion {
    pub id: String,
    pub kind: &'static str,
    pub rule: Option<String>,
    pub change: String,
    pub support: u64,
    pub simulated: Simulated,
    pub job_file: String,
}

#[derive(Debug, Serialize)]
pub struct Simulated {
    pub matched_more: u64,
    pub changed: u64,
    pub conflicts: u64,
    pub ambiguous_more: u64,
    pub examples: Examples,
}

#[derive(Debug, Serialize)]
pub struct Examples {
    pub matched_more: Vec<i64>,
    pub changed: Vec<i64>,
    pub conflicts: Vec<i64>,
    pub ambiguous_more: Vec<i64>,
}

/// A candidate written into the job file: its text, and the job it loads as.
struct Built {
    change: Change,
    text: String,
    job: Job,
    pairwise: usize,
}

/// The suggestions for `job` from its events in `scope`: every candidate change that at least
/// `min_support` attaches support in the simulation, those without conflicts first, then by the
/// events they would match more.
pub async fn suggest(pool: &PgPool, job: &Job, scope: Scope, min_support: usize) -> Result<Suggestions> {
    let mut tx = crate::db::begin(pool).await.context("starting a read-only transaction")?;
    let found = on(&mut tx, job, scope, min_support, &Tuning::from_env()).await;
    tx.rollback().await.ok();
    found
}

/// [`suggest`] on a connection (inside a run's transaction, its decisions too).
pub async fn on(
    conn: &mut sqlx::PgConnection,
    job: &Job,
    scope: Scope,
    min_support: usize,
    tuning: &Tuning,
) -> Result<Suggestions> {
    let (original, built) = candidates_of(conn, job, scope, min_support).await?;
    drop(original);
    let jobs: Vec<Job> = built.iter().map(|b| b.job.clone()).collect();
    let outcomes = simulate::simulate(conn, job, &jobs, scope, tuning).await?;
    let mut suggestions: Vec<Suggestion> = built
        .into_iter()
        .zip(outcomes)
        .filter(|(b, o)| kept(b, o, min_support))
        .map(|(b, o)| suggestion(b, o))
        .collect();
    suggestions.sort_by(|a, b| {
        (a.simulated.conflicts > 0)
            .cmp(&(b.simulated.conflicts > 0))
            .then(b.simulated.matched_more.cmp(&a.simulated.matched_more))
            .then(b.support.cmp(&a.support))
            .then(a.id.cmp(&b.id))
    });
    Ok(Suggestions { job: job.name.clone(), scope: ScopeOut { since: scope.since, until: scope.until }, suggestions })
}

/// Whether a simulated candidate is suggested: enough attaches it makes itself, and for
/// `ambiguous = "nearest"`, nearly every tie the analysts settled (nine in ten) settled as they did.
fn kept(b: &Built, o: &Outcome, min_support: usize) -> bool {
    let nearly_always = !matches!(b.change, Change::AmbiguousNearest { .. }) || o.support * 10 >= b.pairwise as u64 * 9;
    o.support >= min_support as u64 && nearly_always
}

fn suggestion(b: Built, o: Outcome) -> Suggestion {
    let examples = |c: &Count| c.examples.clone();
    Suggestion {
        id: b.change.id(),
        kind: b.change.kind(),
        rule: Some(b.change.rule().to_owned()),
        change: b.change.describe(),
        support: o.support,
        simulated: Simulated {
            matched_more: o.matched_more.n,
            changed: o.changed.n,
            conflicts: o.conflicts.n,
            ambiguous_more: o.ambiguous_more.n,
            examples: Examples {
                matched_more: examples(&o.matched_more),
                changed: examples(&o.changed),
                conflicts: examples(&o.conflicts),
                ambiguous_more: examples(&o.ambiguous_more),
            },
        },
        job_file: b.text,
    }
}

/// The job file's text and every candidate written into it that loads as a job.
async fn candidates_of(
    conn: &mut sqlx::PgConnection,
    job: &Job,
    scope: Scope,
    min_support: usize,
) -> Result<(String, Vec<Built>)> {
    let original = std::fs::read_to_string(&job.path)
        .with_context(|| format!("{}: cannot read the job file", job.path.display()))?;
    let evidence = evidence::positives(conn, job, scope).await?;
    let mut built = Vec::new();
    for c in candidates::generate(job, &evidence, min_support) {
        let made = edit::apply(&original, &c.change)
            .and_then(|text| job::parse(&job.path, &text).map(|j| (text, j)).map_err(|e| e.0));
        match made {
            Ok((text, job)) => built.push(Built { change: c.change, text, job, pairwise: c.pairwise }),
            Err(why) => tracing::warn!(change = %c.change.describe(), why, "a candidate change left out"),
        }
    }
    Ok((original, built))
}

/// A suggestion accepted: the job file's text before and after, and the diff.
pub struct Accepted {
    pub change: Change,
    pub before: String,
    pub after: String,
    pub diff: String,
}

/// The change of suggestion `id` (as `suggest` lists it for the same scope), made in the job
/// file's text; nothing is written.
pub async fn accept(pool: &PgPool, job: &Job, scope: Scope, id: &str) -> Result<Accepted> {
    let mut tx = crate::db::begin(pool).await.context("starting a read-only transaction")?;
    // Every candidate, whatever its support: the id names one `suggest` listed.
    let (before, built) = candidates_of(&mut tx, job, scope, 1).await?;
    tx.rollback().await.ok();
    let b = built.into_iter().find(|b| b.change.id() == id).with_context(|| {
        format!(
            "no suggestion {id:?} for job {} in this scope: `callrecon suggest --job {}` lists the current ones",
            job.name,
            job.path.display()
        )
    })?;
    let diff = edit::diff(&job.path, &before, &b.text);
    Ok(Accepted { change: b.change, before, after: b.text, diff })
}

/// Writes the accepted job file in place (a temporary file beside it, renamed over it).
pub fn write(job: &Job, accepted: &Accepted) -> Result<()> {
    let current = std::fs::read_to_string(&job.path).with_context(|| format!("reading {}", job.path.display()))?;
    anyhow::ensure!(
        current == accepted.before,
        "{} changed while the suggestion was computed; run the command again",
        job.path.display()
    );
    let dir = job.path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(std::path::Path::new("."));
    let mut tmp =
        tempfile::NamedTempFile::new_in(dir).with_context(|| format!("creating a file in {}", dir.display()))?;
    std::io::Write::write_all(&mut tmp, accepted.after.as_bytes()).context("writing the job file")?;
    if let Ok(meta) = std::fs::metadata(&job.path) {
        let _ = std::fs::set_permissions(tmp.path(), meta.permissions());
    }
    tmp.persist(&job.path).with_context(|| format!("replacing {}", job.path.display()))?;
    Ok(())
}

/// The command that accepts suggestion `id` (printing the diff; `--write` writes it).
pub fn accept_command(
    job_path: &std::path::Path,
    since: Option<DateTime<Utc>>,
    until: Option<DateTime<Utc>>,
    id: &str,
) -> String {
    let mut cmd = format!("callrecon suggest --job {}", job_path.display());
    for (flag, t) in [("since", since), ("until", until)] {
        if let Some(t) = t {
            cmd.push_str(&format!(" --{flag} {}", t.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true)));
        }
    }
    cmd.push_str(&format!(" --accept {id}"));
    cmd
}

/// The suggestions as a person reads them.
pub fn text(s: &Suggestions, job_path: &std::path::Path) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let time = |t: Option<DateTime<Utc>>, none: &str| t.map_or(none.to_owned(), |t| t.to_rfc3339());
    let _ = writeln!(
        out,
        "job {}: events from {} until {}",
        s.job,
        time(s.scope.since, "the first"),
        time(s.scope.until, "the last")
    );
    if s.suggestions.is_empty() {
        let _ = writeln!(out, "no rule change suggested: no change made by enough of the analysts' attaches");
        return out;
    }
    for g in &s.suggestions {
        let m = &g.simulated;
        let _ = writeln!(out, "\n{}  {}  {}", g.id, g.kind, g.change);
        let _ = writeln!(
            out,
            "  support {}: would match {} more, change {}, conflict with {}, tie {} more",
            g.support, m.matched_more, m.changed, m.conflicts, m.ambiguous_more
        );
        for (what, ids) in [
            ("matched more", &m.examples.matched_more),
            ("changed", &m.examples.changed),
            ("conflicts", &m.examples.conflicts),
            ("tied more", &m.examples.ambiguous_more),
        ] {
            if !ids.is_empty() {
                let ids: Vec<String> = ids.iter().map(i64::to_string).collect();
                let _ = writeln!(out, "  e.g. {what}: {}", ids.join(", "));
            }
        }
        let _ = writeln!(out, "  accept: {} --write", accept_command(job_path, s.scope.since, s.scope.until, &g.id));
    }
    out
}
