//! Analysts' manual decisions: `callrecon resolve` (one event, or the filled-in rows of a report's
//! `unmatched.csv`), `reopen`, and `history`.
//!
//! Architecture invariant: every request is checked before anything is written, and the whole
//! set is written through the ledger (each change with its history row) and applied (apply
//! recomputes the calls and groups it touches) in one transaction that holds the job's lock:
//! all or nothing, never beside a run of the same job.

use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result, bail};
use sqlx::{PgConnection, PgPool};

use crate::apply;
use crate::calldata;
use crate::decision::{MANUAL_RULE, Reason, State, TargetKind};
use crate::job::Job;
use crate::ledger::{self, By, Decided};
use crate::tuning::Tuning;

/// What an analyst decides for an event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum To {
    /// Attach to a call or a call group.
    Attach(TargetKind, String),
    /// Close it out: no longer pending, never expires.
    Dismiss,
    /// Undo a manual decision: pending again, decided by the rules at the next run.
    Reopen,
}

impl std::str::FromStr for To {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let bad = || format!("{s:?} is not call:ID, group:ID or dismiss");
        match s.split_once(':') {
            Some((kind, id)) if !id.trim().is_empty() => match kind.trim().to_ascii_lowercase().as_str() {
                "call" => Ok(To::Attach(TargetKind::Call, id.trim().to_owned())),
                "group" | "call_group" => Ok(To::Attach(TargetKind::CallGroup, id.trim().to_owned())),
                _ => Err(bad()),
            },
            Some(_) => Err(bad()),
            None => match s.to_ascii_lowercase().as_str() {
                "dismiss" => Ok(To::Dismiss),
                "reopen" => Ok(To::Reopen),
                _ => Err(bad()),
            },
        }
    }
}

/// One decision asked for.
#[derive(Debug, Clone)]
pub struct Request {
    /// Its line in the file it came from.
    pub line: Option<u64>,
    pub event_id: i64,
    pub to: To,
    pub note: Option<String>,
    /// From a report's CSV: the reason the report gave; refused if the event changed since.
    pub reported_reason: Option<String>,
    /// From the review desk: the event's decision as its page showed it (`Decided::describe`);
    /// refused if it changed since, so that one analyst never overwrites another unseen.
    pub seen: Option<String>,
}

/// A decision made (or, dry, that would be).
#[derive(Debug, Clone)]
pub struct Resolved {
    pub event_id: i64,
    pub before: Decided,
    pub after: Decided,
}

/// Requests that cannot all be applied: every problem, by line or event. Nothing was changed.
#[derive(Debug, thiserror::Error)]
#[error("nothing was changed: {}", .problems.join("; "))]
pub struct Refused {
    pub problems: Vec<String>,
}

/// Checks every request, then applies them all in one transaction holding the job's lock (or,
/// dry, rolls it back). Returns what changed.
pub async fn resolve(pool: &PgPool, job: &Job, requests: &[Request], by: &str, dry_run: bool) -> Result<Vec<Resolved>> {
    if requests.is_empty() {
        return Ok(Vec::new());
    }
    let mut tx = pool.begin().await.context("starting the transaction")?;
    crate::runs::lock_job(pool, &mut tx, job).await?;
    let resolved = check(&mut tx, job, requests, by).await?;
    let rows: Vec<(i64, Decided)> = resolved.iter().map(|r| (r.event_id, r.after.clone())).collect();
    ledger::write_decisions(&mut tx, &rows, By::Person(by), &job.group_fields).await?;
    apply_touched(&mut tx, &resolved).await?;
    if dry_run {
        tx.rollback().await?;
    } else {
        tx.commit().await.context("committing the decisions")?;
    }
    tracing::info!(decisions = resolved.len(), by, dry_run, "manual decisions applied");
    Ok(resolved)
}

/// The events requests name (locked) and the calls and groups they attach to that exist.
struct Found {
    stored: HashMap<i64, ledger::Stored>,
    calls: HashSet<String>,
    groups: HashSet<String>,
}

/// Every request checked against its event (locked until the transaction ends) and its target:
/// the decisions to make, or every problem found ([`Refused`]).
async fn check(conn: &mut PgConnection, job: &Job, requests: &[Request], by: &str) -> Result<Vec<Resolved>> {
    let mut problems = Vec::new();
    let mut first_line: HashMap<i64, &Request> = HashMap::new();
    for r in requests {
        if let Some(earlier) = first_line.insert(r.event_id, r) {
            problems.push(format!("{} is also on line {}", where_(r), earlier.line.unwrap_or(0)));
        }
    }
    let ids: Vec<i64> = first_line.keys().copied().collect();
    let stored = ledger::lock_events(conn, &ids).await?.into_iter().map(|s| (s.id, s)).collect();
    let (calls, groups): (Vec<&str>, Vec<&str>) = {
        let targets = requests.iter().filter_map(|r| match &r.to {
            To::Attach(kind, id) => Some((*kind, id.as_str())),
            _ => None,
        });
        let (c, g): (Vec<_>, Vec<_>) = targets.partition(|(k, _)| *k == TargetKind::Call);
        (c.into_iter().map(|(_, id)| id).collect(), g.into_iter().map(|(_, id)| id).collect())
    };
    let (calls, groups) = calldata::existing(conn, &calls, &groups).await?;
    let found = Found { stored, calls, groups };
    let mut resolved = Vec::new();
    for r in requests {
        match decide(r, job, by, &found) {
            Ok(decided) => resolved.push(decided),
            Err(problem) => problems.push(problem),
        }
    }
    if !problems.is_empty() {
        bail!(Refused { problems });
    }
    Ok(resolved)
}

/// Where a request is: its line of the file, or its event.
fn where_(r: &Request) -> String {
    match r.line {
        Some(line) => format!("line {line}: event {}", r.event_id),
        None => format!("event {}", r.event_id),
    }
}

/// One request's decision, or why it cannot be made.
fn decide(r: &Request, job: &Job, by: &str, found: &Found) -> Result<Resolved, String> {
    let Some(event) = found.stored.get(&r.event_id) else {
        return Err(format!("{}: no such event", where_(r)));
    };
    if event.job != job.name {
        return Err(format!("{}: belongs to job {}, not {}", where_(r), event.job, job.name));
    }
    let now = &event.decided;
    if let Some(reported) = &r.reported_reason {
        let still = match now.state {
            State::Expired => reported == "expired",
            State::Pending => now.reason.map_or("undecided", Reason::as_str) == reported,
            _ => false,
        };
        if !still {
            return Err(format!("{}: decided since the report was written (now {})", where_(r), now.describe()));
        }
    }
    if let Some(seen) = r.seen.as_deref().filter(|seen| *seen != now.describe()) {
        return Err(format!(
            "{}: changed since its page was loaded (it showed {seen}; now {}): nothing was overwritten",
            where_(r),
            now.describe()
        ));
    }
    let after = after(r, now, by, found)?;
    Ok(Resolved { event_id: r.event_id, before: now.clone(), after })
}

/// The decision a request asks for, given the event's decision `now`.
fn after(r: &Request, now: &Decided, by: &str, found: &Found) -> Result<Decided, String> {
    let note = r.note.as_deref().map(str::trim).filter(|n| !n.is_empty()).map(str::to_owned);
    match &r.to {
        To::Attach(kind, id) => {
            let exists = match kind {
                TargetKind::Call => found.calls.contains(id),
                TargetKind::CallGroup => found.groups.contains(id),
            };
            if !exists {
                let what = if *kind == TargetKind::Call { "call" } else { "call group" };
                return Err(format!("{}: there is no {what} {id}", where_(r)));
            }
            Ok(Decided {
                state: State::Matched,
                target: Some((*kind, id.clone())),
                rule: Some(MANUAL_RULE.to_owned()),
                reason: None,
                person: Some(by.to_owned()),
                note,
            })
        }
        To::Dismiss => {
            if note.is_none() {
                return Err(format!("{}: dismissing needs a note saying why", where_(r)));
            }
            Ok(Decided {
                state: State::Dismissed,
                target: None,
                rule: None,
                reason: None,
                person: Some(by.to_owned()),
                note,
            })
        }
        To::Reopen => {
            if now.person.is_none() {
                return Err(format!("{}: not decided by hand (now {}): nothing to reopen", where_(r), now.describe()));
            }
            Ok(Decided { note, ..Decided::undecided() })
        }
    }
}

/// Recomputes the calls and groups the decisions moved events from and to.
async fn apply_touched(conn: &mut PgConnection, resolved: &[Resolved]) -> Result<()> {
    let mut touched_calls = HashSet::new();
    let mut touched_groups = HashSet::new();
    for r in resolved {
        for (kind, id) in r.before.target.iter().chain(&r.after.target) {
            match kind {
                TargetKind::Call => touched_calls.insert(id.clone()),
                TargetKind::CallGroup => touched_groups.insert(id.clone()),
            };
        }
    }
    let calls: Vec<String> = touched_calls.into_iter().collect();
    let groups: Vec<String> = touched_groups.into_iter().collect();
    apply::apply(conn, &calls, &groups, apply::Sizes::of(&Tuning::from_env())).await?;
    Ok(())
}

/// What `resolve` prints: one line per decision.
pub fn text(resolved: &[Resolved], dry_run: bool) -> String {
    let mut out = String::new();
    for r in resolved {
        let _ = writeln!(out, "event {}: {} -> {}", r.event_id, r.before.describe(), r.after.describe());
    }
    let _ = writeln!(
        out,
        "{} decision{} {}",
        resolved.len(),
        if resolved.len() == 1 { "" } else { "s" },
        if dry_run { "would be made (dry run: nothing changed)" } else { "made" }
    );
    out
}

/// The rows of an edited `unmatched.csv` whose `resolve_to` is filled in, as requests.
///
/// Made for a file back from a spreadsheet: a byte-order mark, CRLF line ends, `;` or a tab as
/// the separator (found from the header line), reordered or extra columns (found by name), rows
/// deleted, and the `'` the report put before cells a spreadsheet would take for a formula. A
/// file with any bad row is refused whole, every bad row listed by line.
pub fn read_file(path: &Path) -> Result<Vec<Request>> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let bytes = bytes.strip_prefix(b"\xef\xbb\xbf").unwrap_or(&bytes);
    let text = std::str::from_utf8(bytes).map_err(|e| {
        anyhow::anyhow!("{}: not UTF-8 text (byte {}); save it as \"CSV UTF-8\"", path.display(), e.valid_up_to())
    })?;
    // Line ends as `\n`: the csv reader numbers lines one short after a CRLF header.
    let text = text.replace("\r\n", "\n");
    let header = text.lines().next().unwrap_or_default();
    let delimiter =
        [b',', b';', b'\t'].into_iter().max_by_key(|d| header.bytes().filter(|b| b == d).count()).unwrap_or(b',');
    let mut reader =
        csv::ReaderBuilder::new().delimiter(delimiter).flexible(true).has_headers(true).from_reader(text.as_bytes());
    let headers = reader.headers().with_context(|| format!("reading the header of {}", path.display()))?.clone();
    let column = |name: &str| headers.iter().position(|h| unguard(h.trim()).eq_ignore_ascii_case(name));
    let (Some(id_col), Some(to_col)) = (column("event_id"), column("resolve_to")) else {
        bail!(
            "{}: no event_id and resolve_to columns in its first line; is it a report's unmatched.csv?",
            path.display()
        );
    };
    let (note_col, reason_col) = (column("note"), column("reason"));
    let mut requests = Vec::new();
    let mut problems = Vec::new();
    for record in reader.records() {
        let record = match record {
            Ok(r) => r,
            Err(e) => {
                let line = e.position().map_or(0, |p| p.line());
                problems.push(format!("line {line}: cannot be read ({e})"));
                continue;
            }
        };
        let line = record.position().map_or(0, |p| p.line());
        let cell = |i: Option<usize>| i.and_then(|i| record.get(i)).map(|c| unguard(c.trim()).to_owned());
        let to = cell(Some(to_col)).unwrap_or_default();
        if to.is_empty() {
            continue;
        }
        let id_text = cell(Some(id_col)).unwrap_or_default();
        let Some(event_id) = parse_id(&id_text) else {
            problems.push(format!("line {line}: event_id {id_text:?} is not an event id"));
            continue;
        };
        let to = match to.parse::<To>() {
            Ok(To::Reopen) => {
                problems.push(format!("line {line}: event {event_id}: reopen is its own command (callrecon reopen)"));
                continue;
            }
            Ok(to) => to,
            Err(e) => {
                problems.push(format!("line {line}: resolve_to {e}"));
                continue;
            }
        };
        requests.push(Request {
            line: Some(line),
            event_id,
            to,
            note: cell(note_col).filter(|n| !n.is_empty()),
            reported_reason: cell(reason_col).filter(|r| !r.is_empty()),
            seen: None,
        });
    }
    if !problems.is_empty() {
        bail!(Refused { problems });
    }
    Ok(requests)
}

/// A cell without the `'` the report put before text a spreadsheet would take for a formula.
fn unguard(cell: &str) -> &str {
    match cell.strip_prefix('\'') {
        Some(rest) if rest.starts_with(['=', '+', '-', '@', '\t', '\r']) => rest,
        _ => cell,
    }
}

/// An event id as a spreadsheet may give it back: `123`, or `123.0`.
fn parse_id(text: &str) -> Option<i64> {
    text.parse().ok().or_else(|| text.strip_suffix(".0").and_then(|t| t.parse().ok())).filter(|&n: &i64| n > 0)
}

/// `callrecon history`: every change of the event's decision, oldest first.
pub async fn history(pool: &PgPool, event_id: i64, json: bool) -> Result<String> {
    let mut conn = pool.acquire().await?;
    let entries = ledger::history(&mut conn, event_id).await?;
    // Only read: printing the history must not wait for an analyst's decision in progress.
    let now = ledger::read_events(&mut conn, &[event_id], false).await?.pop();
    let Some(now) = now else { bail!("no event {event_id}") };
    if json {
        let decided = |d: &Decided| {
            serde_json::json!({
                "state": d.state.as_str(),
                "target": d.target.as_ref().map(|(k, id)| serde_json::json!({"kind": k.as_str(), "id": id})),
                "rule": d.rule, "reason": d.reason.map(Reason::as_str),
            })
        };
        let mut before: Option<&Decided> = None;
        let list: Vec<serde_json::Value> = entries
            .iter()
            .map(|e| {
                let v = serde_json::json!({
                    "at": e.at,
                    "by": match (&e.run_id, &e.decided.person) {
                        (Some(run), _) => serde_json::json!({"run": run, "kind": e.run_kind}),
                        (None, person) => serde_json::json!({"person": person}),
                    },
                    "from": before.map(decided),
                    "to": decided(&e.decided),
                    "note": e.decided.note,
                });
                before = Some(&e.decided);
                v
            })
            .collect();
        let out =
            serde_json::json!({"event_id": event_id, "job": now.job, "now": decided(&now.decided), "history": list});
        return Ok(format!("{}\n", serde_json::to_string_pretty(&out)?));
    }
    let mut out = format!("event {event_id} (job {}): now {}\n", now.job, now.decided.describe());
    if entries.is_empty() {
        let _ = writeln!(out, "no change recorded (decided before callrecon kept history)");
    }
    let mut before = "new".to_owned();
    for e in &entries {
        let who = match (&e.run_id, &e.decided.person) {
            (Some(run), _) => format!("{} {run}", e.run_kind.as_deref().unwrap_or("run")),
            (None, Some(person)) => person.clone(),
            (None, None) => "?".to_owned(),
        };
        let after = e.decided.describe();
        let _ = writeln!(out, "{}  {who:<14} {before} -> {after}", e.at.format("%Y-%m-%d %H:%M:%S"));
        before = after;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn to_parses_what_an_analyst_types() {
        assert_eq!("call:c1".parse::<To>(), Ok(To::Attach(TargetKind::Call, "c1".into())));
        assert_eq!(" Group: g1 ".parse::<To>(), Ok(To::Attach(TargetKind::CallGroup, "g1".into())));
        assert_eq!("DISMISS".parse::<To>(), Ok(To::Dismiss));
        assert!("call:".parse::<To>().is_err());
        assert!("c1".parse::<To>().is_err());
        assert!("agent:a1".parse::<To>().is_err());
    }

    #[test]
    fn cells_lose_the_formula_guard_only() {
        assert_eq!(unguard("'=1+1"), "=1+1");
        assert_eq!(unguard("'-5"), "-5");
        assert_eq!(unguard("'quoted'"), "'quoted'");
        assert_eq!(parse_id("12.0"), Some(12));
        assert_eq!(parse_id("1e3"), None);
    }
}

#[cfg(test)]
mod line_tests {
    #[test]
    fn bad_rows_are_named_by_the_line_a_spreadsheet_shows() {
        for eol in ["\n", "\r\n"] {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("u.csv");
            let text =
                ["event_id,resolve_to,note", "1,,", "2,teleport,", "3,call:c1,\"two\nlines\"", "4,nowhere,"].join(eol);
            std::fs::write(&path, text).unwrap();
            let err = super::read_file(&path).unwrap_err().to_string();
            assert!(err.contains("line 3: resolve_to \"teleport\""), "{eol:?}: {err}");
            assert!(err.contains("line 6: resolve_to \"nowhere\""), "{eol:?}: {err}");
        }
    }
}
