//! The job file: raw TOML becomes a validated [`Job`] once, or an error naming file, line and
//! what is wrong. Nothing after this module sees raw TOML.

use std::path::{Path, PathBuf};
use std::str::FromStr;

use chrono_tz::Tz;
use serde::Deserialize;
use toml::Spanned;

/// A validated job.
#[derive(Debug, Clone)]
pub struct Job {
    pub name: String,
    /// The job file, as given.
    pub path: PathBuf,
    pub schedule: Option<Schedule>,
    pub timezone: Tz,
    pub pending_for: chrono::Duration,
    pub queue: bool,
    /// Absolute (resolved against the job file's folder).
    pub inbox: Option<PathBuf>,
    pub archive: PathBuf,
    /// `[sources] settle`: an inbox file whose size or modification time changed this recently
    /// is still being written, and is left for later.
    pub settle: std::time::Duration,
    pub rules: Vec<Rule>,
    pub group_fields: Vec<String>,
    pub report_dir: PathBuf,
    /// Where to POST each run's summary, if anywhere.
    pub webhook: Option<url::Url>,
    /// Which report folders to keep after a successful run.
    pub keep: Keep,
    /// Text identifying the rules, recorded with every decision so a rematch can tell which
    /// rules made it.
    pub rules_fingerprint: String,
    /// Text identifying `group_fields` (as a set), recorded with every decision: a stored event
    /// with this one has the group part these fields give ([`group_fields_fingerprint`]).
    pub group_fields_fingerprint: String,
}

/// `[report] keep`: report folders kept after a successful run (the runs themselves are
/// always kept in the history).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Keep {
    /// Every report (the default).
    All,
    /// Those of runs started within this long.
    Age(chrono::Duration),
    /// The newest this many.
    Count(u32),
}

#[derive(Debug, Clone)]
pub struct Schedule {
    pub source: String,
    pub cron: cron::Schedule,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Rule {
    pub name: String,
    pub target: Target,
    pub keys: Vec<Key>,
    pub ambiguous: Ambiguous,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Target {
    Call { before: chrono::Duration, after: chrono::Duration },
    CallGroup,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ambiguous {
    Nearest,
    Report,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Key {
    /// Path of the value in the event's Metadata (`customer.phone` -> ["customer", "phone"]).
    pub event: Vec<String>,
    pub field: TargetField,
    pub normalize: Option<Normalizer>,
}

/// A value of the target row a key compares with.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum TargetField {
    Column(&'static str),
    Metadata(Vec<String>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Normalizer {
    Phone,
    Lower,
    Trim,
    Digits,
}

/// Columns of `calls` a key may name.
pub const CALL_COLUMNS: &[&str] = &["id", "session_id", "call_group_id", "ani", "dnis", "agent_id"];
/// Columns of `call_groups` a key may name.
pub const GROUP_COLUMNS: &[&str] = &["id"];

/// A job file that cannot be used: the message names the file, line and problem.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct JobError(pub String);

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawJob {
    name: Spanned<String>,
    schedule: Option<Spanned<String>>,
    #[serde(default)]
    timezone: Option<Spanned<String>>,
    #[serde(default)]
    pending_for: Option<Spanned<String>>,
    #[serde(default)]
    sources: RawSources,
    #[serde(default)]
    rules: Vec<RawRule>,
    #[serde(default)]
    apply: RawApply,
    #[serde(default)]
    report: RawReport,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawSources {
    #[serde(default)]
    queue: bool,
    inbox: Option<String>,
    archive: Option<String>,
    settle: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    name: Spanned<String>,
    target: Spanned<String>,
    keys: Spanned<Vec<RawKey>>,
    window: Option<Spanned<RawWindow>>,
    ambiguous: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKey {
    event: Spanned<String>,
    call: Option<Spanned<String>>,
    call_group: Option<Spanned<String>>,
    normalize: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWindow {
    before: Option<Spanned<String>>,
    after: Option<Spanned<String>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawApply {
    #[serde(default)]
    group_fields: Vec<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawReport {
    dir: Option<String>,
    webhook: Option<Spanned<String>>,
    keep: Option<Spanned<RawKeep>>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum RawKeep {
    Count(i64),
    Age(String),
}

/// Reads and validates a job file.
pub fn load(path: &Path) -> Result<Job, JobError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| JobError(format!("{}: cannot read job file: {e}", path.display())))?;
    parse(path, &text)
}

/// Validates a job file's text; `path` names it in errors and anchors relative folders.
pub fn parse(path: &Path, text: &str) -> Result<Job, JobError> {
    let at = Locate { path, text };
    let raw: RawJob = toml::from_str(text).map_err(|e| {
        let msg = e.message().trim().to_owned();
        match e.span() {
            Some(span) => at.error(span, &msg),
            None => JobError(format!("{}: {msg}", path.display())),
        }
    })?;
    let name = job_name(&at, &raw.name)?;
    let timezone = timezone(&at, raw.timezone.as_ref())?;
    let schedule = schedule(&at, raw.schedule.as_ref())?;
    let pending_for = match &raw.pending_for {
        None => chrono::Duration::hours(72),
        Some(d) => duration(d).map_err(|m| at.error(d.span(), &m))?,
    };
    let settle = settle(&at, raw.sources.settle.as_ref())?;
    let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
    let resolve = |p: &str| {
        let p = Path::new(p);
        if p.is_absolute() { p.to_path_buf() } else { base.join(p) }
    };
    let mut rules: Vec<Rule> = Vec::new();
    for r in &raw.rules {
        let rule = rule(&at, r, &rules)?;
        rules.push(rule);
    }
    let webhook = webhook(&at, raw.report.webhook.as_ref())?;
    let keep = keep(&at, raw.report.keep.as_ref())?;
    let rules_fingerprint = fingerprint(&rules);
    let group_fields_fingerprint = group_fields_fingerprint(&raw.apply.group_fields);
    Ok(Job {
        name,
        path: path.to_path_buf(),
        schedule,
        timezone,
        pending_for,
        queue: raw.sources.queue,
        inbox: raw.sources.inbox.as_deref().map(resolve),
        archive: resolve(raw.sources.archive.as_deref().unwrap_or("archive")),
        settle,
        rules,
        group_fields: raw.apply.group_fields,
        report_dir: resolve(raw.report.dir.as_deref().unwrap_or("reports")),
        webhook,
        keep,
        rules_fingerprint,
        group_fields_fingerprint,
    })
}

/// The job file being read, for errors that name its file, line and column.
struct Locate<'t> {
    path: &'t Path,
    text: &'t str,
}

impl Locate<'_> {
    fn error(&self, span: std::ops::Range<usize>, msg: &str) -> JobError {
        let (line, col) = line_col(self.text, span.start);
        JobError(format!("{}:{line}:{col}: {msg}", self.path.display()))
    }
}

fn job_name(at: &Locate, name: &Spanned<String>) -> Result<String, JobError> {
    let trimmed = name.get_ref().trim().to_owned();
    if trimmed.is_empty() || !trimmed.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) {
        return Err(at.error(name.span(), "job name must be non-empty letters, digits, `-`, `_` or `.`"));
    }
    Ok(trimmed)
}

fn timezone(at: &Locate, tz: Option<&Spanned<String>>) -> Result<Tz, JobError> {
    let Some(tz) = tz else { return Ok(Tz::UTC) };
    Tz::from_str(tz.get_ref()).map_err(|_| {
        at.error(
            tz.span(),
            &format!("unknown time zone {:?}; use an IANA name like \"America/New_York\"", tz.get_ref()),
        )
    })
}

fn schedule(at: &Locate, s: Option<&Spanned<String>>) -> Result<Option<Schedule>, JobError> {
    let Some(s) = s else { return Ok(None) };
    let cron = cron::Schedule::from_str(s.get_ref()).map_err(|e| {
        at.error(s.span(), &format!("bad schedule {:?}: {e}; expected `sec min hour day month weekday`", s.get_ref()))
    })?;
    Ok(Some(Schedule { source: s.get_ref().clone(), cron }))
}

fn settle(at: &Locate, d: Option<&Spanned<String>>) -> Result<std::time::Duration, JobError> {
    let Some(d) = d else { return Ok(DEFAULT_SETTLE) };
    match duration(d).map_err(|m| at.error(d.span(), &m))?.to_std() {
        Ok(settle) if settle <= MAX_SETTLE => Ok(settle),
        _ => Err(at.error(d.span(), &format!("settle {:?} is longer than 1h", d.get_ref()))),
    }
}

/// A `[[rules]]` entry; `before`: the rules already read (names are unique).
fn rule(at: &Locate, r: &RawRule, before: &[Rule]) -> Result<Rule, JobError> {
    let name = r.name.get_ref().trim().to_owned();
    if name.is_empty() || name == "session_id" || name == "master_id" {
        return Err(at.error(
            r.name.span(),
            "rule name must be non-empty and not `session_id` or `master_id` (reserved for SessionId and \
             MasterId attaches)",
        ));
    }
    if before.iter().any(|x| x.name == name) {
        return Err(at.error(r.name.span(), &format!("duplicate rule name {name:?}")));
    }
    let target = target(at, r)?;
    if r.keys.get_ref().is_empty() {
        return Err(at.error(r.keys.span(), "a rule needs at least one key"));
    }
    let is_call = matches!(target, Target::Call { .. });
    let keys = r.keys.get_ref().iter().map(|k| key(at, k, is_call)).collect::<Result<Vec<_>, _>>()?;
    let ambiguous = match &r.ambiguous {
        None => Ambiguous::Report,
        Some(a) => match a.get_ref().as_str() {
            "nearest" => Ambiguous::Nearest,
            "report" => Ambiguous::Report,
            other => {
                return Err(at.error(a.span(), &format!("ambiguous must be \"nearest\" or \"report\", not {other:?}")));
            }
        },
    };
    Ok(Rule { name, target, keys, ambiguous })
}

/// A rule's target, with its window for calls.
fn target(at: &Locate, r: &RawRule) -> Result<Target, JobError> {
    match r.target.get_ref().as_str() {
        "call" => {}
        "call_group" => {
            if let Some(w) = &r.window {
                return Err(
                    at.error(w.span(), "a window applies to call targets only; remove it from this call_group rule")
                );
            }
            return Ok(Target::CallGroup);
        }
        other => {
            return Err(at.error(r.target.span(), &format!("target must be \"call\" or \"call_group\", not {other:?}")));
        }
    }
    let Some(w) = &r.window else {
        return Ok(Target::Call { before: chrono::Duration::zero(), after: chrono::Duration::zero() });
    };
    let w = w.get_ref();
    let side = |d: &Option<Spanned<String>>| match d {
        None => Ok(chrono::Duration::zero()),
        Some(d) => duration(d).map_err(|m| at.error(d.span(), &m)),
    };
    Ok(Target::Call { before: side(&w.before)?, after: side(&w.after)? })
}

/// A rule's key: the event's path, the target's column or metadata path (for the rule's target),
/// the normaliser.
fn key(at: &Locate, k: &RawKey, is_call: bool) -> Result<Key, JobError> {
    let event = dotted(k.event.get_ref())
        .ok_or_else(|| at.error(k.event.span(), "event key must be a dotted path like `customer.phone`"))?;
    let (spec, allowed, wrong) = match (is_call, &k.call, &k.call_group) {
        (true, Some(c), None) => (c, CALL_COLUMNS, None),
        (false, None, Some(g)) => (g, GROUP_COLUMNS, None),
        (true, _, Some(g)) => (g, CALL_COLUMNS, Some("this rule targets calls: name the column with `call = ...`")),
        (false, Some(c), _) => {
            (c, GROUP_COLUMNS, Some("this rule targets call groups: name the column with `call_group = ...`"))
        }
        (_, None, None) => {
            return Err(at.error(
                k.event.span(),
                if is_call {
                    "key needs `call = <column or metadata.path>`"
                } else {
                    "key needs `call_group = <column or metadata.path>`"
                },
            ));
        }
    };
    if let Some(msg) = wrong {
        return Err(at.error(spec.span(), msg));
    }
    let field = target_field(spec.get_ref(), allowed).map_err(|m| at.error(spec.span(), &m))?;
    let normalize = match &k.normalize {
        None => None,
        Some(n) => Some(match n.get_ref().as_str() {
            "phone" => Normalizer::Phone,
            "lower" => Normalizer::Lower,
            "trim" => Normalizer::Trim,
            "digits" => Normalizer::Digits,
            other => {
                return Err(
                    at.error(n.span(), &format!("unknown normaliser {other:?}; use phone, lower, trim or digits"))
                );
            }
        }),
    };
    Ok(Key { event, field, normalize })
}

fn webhook(at: &Locate, w: Option<&Spanned<String>>) -> Result<Option<url::Url>, JobError> {
    let Some(w) = w else { return Ok(None) };
    match url::Url::parse(w.get_ref()) {
        Ok(u) if u.scheme() == "https" || u.scheme() == "http" => Ok(Some(u)),
        _ => Err(at.error(w.span(), &format!("webhook must be an http(s) URL, not {:?}", w.get_ref()))),
    }
}

/// `[report] keep`: a count of reports, or an age.
fn keep(at: &Locate, k: Option<&Spanned<RawKeep>>) -> Result<Keep, JobError> {
    let Some(k) = k else { return Ok(Keep::All) };
    match k.get_ref() {
        RawKeep::Count(n) => match u32::try_from(*n) {
            Ok(n) if n > 0 => Ok(Keep::Count(n)),
            _ => Err(at.error(k.span(), &format!("keep must be a count of reports of at least 1, not {n}"))),
        },
        RawKeep::Age(text) => {
            match humantime::parse_duration(text.trim()).ok().and_then(|d| chrono::Duration::from_std(d).ok()) {
                Some(d) if d > chrono::Duration::zero() => Ok(Keep::Age(d)),
                _ => {
                    Err(at
                        .error(k.span(), &format!("keep must be an age like \"30d\" or a count like 50, not {text:?}")))
                }
            }
        }
    }
}

impl Job {
    /// The widest window of any call rule: how far around the events' times calls are read.
    pub fn max_window(&self) -> (chrono::Duration, chrono::Duration) {
        self.rules.iter().fold((chrono::Duration::zero(), chrono::Duration::zero()), |(b, a), r| match r.target {
            Target::Call { before, after } => (b.max(before), a.max(after)),
            Target::CallGroup => (b, a),
        })
    }
}

/// `[sources] settle` when the job file does not say.
pub const DEFAULT_SETTLE: std::time::Duration = std::time::Duration::from_secs(30);
/// The longest `settle` a job file may ask for: a run may wait that long for a young file.
pub const MAX_SETTLE: std::time::Duration = std::time::Duration::from_secs(3600);

/// Parses "90s", "10m", "2h", "72h", "1h 30m".
fn duration(s: &Spanned<String>) -> Result<chrono::Duration, String> {
    let d = humantime::parse_duration(s.get_ref().trim())
        .map_err(|e| format!("bad duration {:?}: {e}; use e.g. \"90s\", \"10m\", \"72h\"", s.get_ref()))?;
    chrono::Duration::from_std(d).map_err(|_| format!("duration {:?} is too long", s.get_ref()))
}

fn dotted(s: &str) -> Option<Vec<String>> {
    let parts: Vec<String> = s.trim().split('.').map(str::to_owned).collect();
    (!parts.iter().any(String::is_empty)).then_some(parts)
}

fn target_field(spec: &str, allowed: &[&'static str]) -> Result<TargetField, String> {
    if let Some(path) = spec.strip_prefix("metadata.") {
        return dotted(path).map(TargetField::Metadata).ok_or_else(|| format!("bad metadata path {spec:?}"));
    }
    allowed
        .iter()
        .find(|c| **c == spec)
        .map(|c| TargetField::Column(c))
        .ok_or_else(|| format!("unknown column {spec:?}; use one of {} or metadata.<path>", allowed.join(", ")))
}

fn fingerprint(rules: &[Rule]) -> String {
    short_digest(&format!("{rules:?}"))
}

/// Text identifying a job's group fields as a set (their order and repeats give the same group
/// parts): stored with each decision as `events.group_fields_fingerprint`.
pub fn group_fields_fingerprint(group_fields: &[String]) -> String {
    let set: std::collections::BTreeSet<&String> = group_fields.iter().collect();
    short_digest(&format!("{set:?}"))
}

/// The first 8 bytes of `text`'s SHA-256, in hex: the form of both fingerprints.
fn short_digest(text: &str) -> String {
    use sha2::Digest as _;
    hex::encode(&sha2::Sha256::digest(text.as_bytes())[..8])
}

fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
    (line, col)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
name = "nightly"
schedule = "0 0 2 * * *"
timezone = "America/New_York"
pending_for = "72h"

[sources]
queue = true
inbox = "inbox"
archive = "archive"

[[rules]]
name = "phone-and-agent"
target = "call"
keys = [ { event = "customerPhone", call = "ani", normalize = "phone" },
         { event = "agentId", call = "agent_id" } ]
window = { before = "10m", after = "10m" }
ambiguous = "nearest"

[[rules]]
name = "crm-case"
target = "call_group"
keys = [ { event = "crmCaseId", call_group = "metadata.caseNumber" } ]

[apply]
group_fields = ["accountTier", "crmAccountId"]

[report]
dir = "reports"
"#;

    #[test]
    fn contract_example_loads() {
        let job = parse(Path::new("jobs/nightly.toml"), GOOD).unwrap();
        assert_eq!(job.name, "nightly");
        assert_eq!(job.timezone, chrono_tz::America::New_York);
        assert_eq!(job.pending_for, chrono::Duration::hours(72));
        assert_eq!(job.settle, DEFAULT_SETTLE);
        let text = GOOD.replacen("archive = \"archive\"", "archive = \"archive\"\nsettle = \"10s\"", 1);
        let job = parse(Path::new("jobs/nightly.toml"), &text).unwrap();
        assert_eq!(job.settle, std::time::Duration::from_secs(10));
        assert_eq!(job.inbox.as_deref(), Some(Path::new("jobs/inbox")));
        assert_eq!(job.report_dir, Path::new("jobs/reports"));
        assert_eq!(job.rules.len(), 2);
        assert_eq!(
            job.rules[0].target,
            Target::Call { before: chrono::Duration::minutes(10), after: chrono::Duration::minutes(10) }
        );
        assert_eq!(job.rules[0].keys[0].normalize, Some(Normalizer::Phone));
        assert_eq!(job.rules[1].keys[0].field, TargetField::Metadata(vec!["caseNumber".into()]));
        assert_eq!(job.group_fields, ["accountTier", "crmAccountId"]);
    }

    fn check_err(from: &str, to: &str, expected: &str) {
        assert!(GOOD.contains(from), "{from}");
        let text = GOOD.replacen(from, to, 1);
        let err = parse(Path::new("jobs/nightly.toml"), &text).unwrap_err().0;
        assert!(err.starts_with("jobs/nightly.toml:"), "{err}");
        assert!(err.contains(expected), "{err:?} should contain {expected:?}");
    }

    #[test]
    fn errors_name_file_line_and_problem() {
        check_err("timezone = \"America/New_York\"", "timezone = \"Mars/Olympus\"", ":4:12: unknown time zone");
        check_err("pending_for = \"72h\"", "pending_for = \"3 fortnights\"", ":5:15: bad duration");
        check_err("pending_for", "pending_fro", ":5:1: unknown field `pending_fro`");
        check_err("normalize = \"phone\"", "normalize = \"e164\"", ":15:63: unknown normaliser \"e164\"");
        check_err("call = \"agent_id\"", "call = \"agent\"", ":16:38: unknown column \"agent\"");
        check_err("target = \"call_group\"", "target = \"group\"", ":22:10: target must be");
        check_err("ambiguous = \"nearest\"", "ambiguous = \"first\"", ":18:13: ambiguous must be");
        check_err("before = \"10m\"", "before = \"ten\"", ":17:21: bad duration");
        check_err("schedule = \"0 0 2 * * *\"", "schedule = \"every night\"", ":3:12: bad schedule");
        check_err("name = \"crm-case\"", "name = \"phone-and-agent\"", ":21:8: duplicate rule name");
        check_err("call_group = \"metadata.caseNumber\"", "call = \"metadata.caseNumber\"", "targets call groups");
        check_err("queue = true", "queue = yes", ":8:9:");
        let settle = |value: &str| format!("archive = \"archive\"\nsettle = \"{value}\"");
        check_err("archive = \"archive\"", &settle("2h"), ":11:10: settle \"2h\" is longer than 1h");
        check_err("archive = \"archive\"", &settle("soon"), ":11:10: bad duration");
        check_err("name = \"crm-case\"", "name = \"session_id\"", "reserved");
        check_err("name = \"crm-case\"", "name = \"master_id\"", "reserved");
        check_err(
            "dir = \"reports\"",
            "dir = \"reports\"\nwebhook = \"ftp://x\"",
            ":30:11: webhook must be an http(s) URL",
        );
        check_err(
            "dir = \"reports\"",
            "dir = \"reports\"\nkeep = \"a month\"",
            ":30:8: keep must be an age like \"30d\"",
        );
        check_err(
            "dir = \"reports\"",
            "dir = \"reports\"\nkeep = 0",
            ":30:8: keep must be a count of reports of at least 1",
        );
        check_err("dir = \"reports\"", "dir = \"reports\"\nkeep = true", ":30:8:");
    }

    #[test]
    fn report_keep_is_an_age_or_a_count() {
        let keep = |line: &str| parse(Path::new("j.toml"), &GOOD.replace("dir = \"reports\"", line)).unwrap().keep;
        assert_eq!(keep("dir = \"reports\""), Keep::All);
        assert_eq!(keep("keep = \"30d\""), Keep::Age(chrono::Duration::days(30)));
        assert_eq!(keep("keep = 50"), Keep::Count(50));
    }
}
