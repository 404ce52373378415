//! Run history: `report list`, `report show`, and the summary a person reads after a run.

use std::fmt::Write as _;
use std::io::{BufReader, Write};
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use sqlx::PgPool;

use super::types::{Report, Summary, Unmatched};
use crate::{cli::ReportFormat, runs};

/// The few lines printed after a run.
pub fn summary_text(report: &Report, dir: &std::path::Path) -> String {
    let s = &report.summary;
    let secs = (report.finished_at - report.started_at).num_milliseconds() as f64 / 1000.0;
    let mut out = String::new();
    let dry = if report.dry_run { " (dry run: nothing written)" } else { "" };
    let _ = writeln!(out, "callrecon: job {}, {} {} in {secs:.2}s{dry}", report.job, report.kind, report.run_id);
    let _ = writeln!(
        out,
        "  ingested  {:>6} events   ({} rejected records, {} files, {} duplicate, {} failed)",
        s.ingested, s.rejected, s.files_ingested, s.files_duplicate, s.files_failed
    );
    if s.duplicates > 0 {
        let _ = writeln!(
            out,
            "  duplicate {:>6} events   (the job already held them: not stored again) {}",
            s.duplicates,
            counts(&s.duplicates_by_source)
        );
    }
    if s.files_later > 0 {
        let _ = writeln!(
            out,
            "  later     {:>6} files    still being written: left in the inbox for a later run",
            s.files_later
        );
    }
    let _ = writeln!(out, "  matched   {:>6}          {}", s.matched, counts(&s.by_rule));
    let _ = writeln!(out, "  unmatched {:>6}          {}", s.unmatched, counts(&s.by_reason));
    if s.dismissed > 0 || s.manual > 0 {
        let _ = writeln!(
            out,
            "  by hand   {:>6} decisions since the previous run; {} events of the job dismissed",
            s.manual, s.dismissed
        );
    }
    if let Some(g) = &report.suggested {
        let _ = writeln!(
            out,
            "  suggest   {:>6} rule change{} without conflicts would match up to {} more events: `{}`",
            g.changes,
            if g.changes == 1 { "" } else { "s" },
            g.matched_more,
            g.command
        );
    }
    if let Some(d) = &report.diff {
        let _ = writeln!(
            out,
            "  rematch   {:>6} events   {} newly matched · {} moved · {} newly unmatched · {} rule changed · {} unchanged · {} kept (manual)",
            d.evaluated, d.newly_matched, d.moved, d.newly_unmatched, d.rule_changed, d.unchanged, d.kept_manual
        );
    }
    if let Some(u) = &report.undo {
        let _ = writeln!(
            out,
            "  undo      {:>6} decisions of run {} reverted; {} skipped (changed since)",
            u.reverted, u.run, u.skipped_total
        );
        for s in u.skipped.iter().take(20) {
            let _ = writeln!(out, "            event {} skipped: changed since by {}", s.event_id, s.changed_by);
        }
    }
    let _ = writeln!(out, "  applied   {:>6} calls, {} call groups changed", s.calls_updated, s.groups_updated);
    let _ = write!(out, "report: {}", dir.join("report.html").display());
    out
}

fn counts(m: &std::collections::BTreeMap<String, u64>) -> String {
    m.iter().map(|(k, v)| format!("{k} {v}")).collect::<Vec<_>>().join(" · ")
}

/// `callrecon report list`: a table of recent runs.
pub async fn list(pool: &PgPool, job: Option<&str>, limit: i64) -> Result<String> {
    let rows = runs::recent(pool, job, limit).await?;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:>6}  {:<14} {:<8} {:<20} {:>8}  {:<4} {:>8} {:>8} {:>8} {:>9} {:>9}  status",
        "run",
        "job",
        "kind",
        "started (UTC)",
        "duration",
        "dry",
        "ingested",
        "rejected",
        "matched",
        "unmatched",
        "dismissed"
    );
    for run in rows {
        let error = notes(&run);
        let runs::Recent { id, job, kind, dry_run: dry, started_at: started, finished_at: finished, status, .. } = run;
        let dur = finished.map_or("-".into(), |f| format!("{:.1}s", (f - started).num_milliseconds() as f64 / 1000.0));
        let s: Option<Summary> = run.summary.map(serde_json::from_value).transpose().context("reading runs")?;
        let n = |f: fn(&Summary) -> u64| s.as_ref().map_or("-".into(), |s| f(s).to_string());
        let _ = write!(
            out,
            "{id:>6}  {job:<14} {kind:<8} {:<20} {dur:>8}  {:<4} {:>8} {:>8} {:>8} {:>9} {:>9}  {status}",
            started.format("%Y-%m-%d %H:%M:%S"),
            if dry { "yes" } else { "" },
            n(|s| s.ingested),
            n(|s| s.rejected),
            n(|s| s.matched),
            n(|s| s.unmatched),
            n(|s| s.dismissed),
        );
        if !error.is_empty() {
            let _ = write!(out, ": {error}");
        }
        out.push('\n');
    }
    Ok(out)
}

/// What `report list` says after a run's status: its error or note, a webhook that was not
/// delivered, a pruned report.
fn notes(run: &runs::Recent) -> String {
    let webhook = run.notification.as_deref().filter(|n| *n != "delivered").map(|n| format!("webhook: {n}"));
    let pruned = run.report_pruned_at.map(|_| "report pruned".to_owned());
    [run.error.clone(), webhook, pruned].into_iter().flatten().collect::<Vec<_>>().join("; ")
}

/// `callrecon report show RUN`: the run's report in the chosen format, written to `out`.
///
/// Nothing of the size of the report is held in memory: json, csv and html are copied from the
/// files; text reads `report.json` twice with a streaming parser, once for the summary (its
/// `unmatched` list skipped) and once printing each unmatched event as it is parsed.
pub async fn show(pool: &PgPool, run: i64, format: ReportFormat, out: &mut dyn Write) -> Result<()> {
    let Some(runs::ReportOf { status, report_dir: dir, error, report_pruned_at: pruned }) =
        runs::report_of(pool, run).await?
    else {
        bail!("no run {run}; `callrecon report list` shows the runs")
    };
    if let Some(at) = pruned {
        bail!(
            "the report of run {run} was pruned on {} by the job's `[report] keep`; `callrecon report list` still shows its summary",
            at.format("%Y-%m-%d %H:%M:%S UTC")
        )
    }
    let Some(dir) = dir.map(PathBuf::from) else {
        bail!("run {run} has no report ({status}{})", error.map(|e| format!(": {e}")).unwrap_or_default())
    };
    let open = |name: &str| {
        let path = dir.join(name);
        std::fs::File::open(&path).map(BufReader::new).with_context(|| format!("reading {}", path.display()))
    };
    let mut out = std::io::BufWriter::new(out);
    let file = match format {
        ReportFormat::Json => Some("report.json"),
        ReportFormat::Csv => Some("unmatched.csv"),
        ReportFormat::Html => Some("report.html"),
        ReportFormat::Text => None,
    };
    match file {
        Some(name) => {
            std::io::copy(&mut open(name)?, &mut out)?;
        }
        None => {
            // `unmatched` is not a field of `Report`: the parser skips it without keeping it.
            let report: Report = serde_json::from_reader(open("report.json")?).context("parsing report.json")?;
            writeln!(out, "{}\n", summary_text(&report, &dir))?;
            let mut de = serde_json::Deserializer::from_reader(open("report.json")?);
            serde::de::DeserializeSeed::deserialize(UnmatchedLines(&mut out), &mut de)
                .context("parsing report.json")?;
            for r in &report.rejected {
                writeln!(out, "  rejected  {}: {}", r.source, r.reason)?;
            }
        }
    }
    out.flush()?;
    Ok(())
}

/// Prints one line per entry of `report.json`'s `unmatched` list as it is parsed, skipping
/// every other field.
struct UnmatchedLines<'w, W: Write>(&'w mut W);

impl<'de, W: Write> serde::de::DeserializeSeed<'de> for UnmatchedLines<'_, W> {
    type Value = ();

    fn deserialize<D: serde::Deserializer<'de>>(self, de: D) -> Result<(), D::Error> {
        de.deserialize_map(self)
    }
}

impl<'de, W: Write> serde::de::Visitor<'de> for UnmatchedLines<'_, W> {
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a report")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        while let Some(key) = map.next_key::<String>()? {
            if key == "unmatched" {
                map.next_value_seed(EachUnmatched(&mut *self.0))?;
            } else {
                map.next_value::<serde::de::IgnoredAny>()?;
            }
        }
        Ok(())
    }
}

struct EachUnmatched<'w, W: Write>(&'w mut W);

impl<'de, W: Write> serde::de::DeserializeSeed<'de> for EachUnmatched<'_, W> {
    type Value = ();

    fn deserialize<D: serde::Deserializer<'de>>(self, de: D) -> Result<(), D::Error> {
        de.deserialize_seq(self)
    }
}

impl<'de, W: Write> serde::de::Visitor<'de> for EachUnmatched<'_, W> {
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a list of unmatched events")
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while let Some(u) = seq.next_element::<Unmatched>()? {
            let candidates = if u.candidates.is_empty() {
                String::new()
            } else {
                format!("  candidates: {}", u.candidates.join(", "))
            };
            writeln!(
                self.0,
                "  event {:>6}  {:<16} {}  {}{candidates}",
                u.event_id,
                u.reason,
                u.event_time.format("%Y-%m-%d %H:%M:%S"),
                u.source,
            )
            .map_err(serde::de::Error::custom)?;
        }
        Ok(())
    }
}
