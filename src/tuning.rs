//! Batch sizes and switches: the defaults, and the `CALLRECON_*` environment variables that
//! override them (tests use tiny batches to cross every boundary; operators never need them).
//!
//! Architecture invariant: `std::env::var` is read here only: by [`Tuning::from_env`], which the
//! conductor calls once a run (and `resolve` for its apply), so stages get the values passed
//! down.

/// Sessionless events matched per polars batch; bounds memory whatever the total. Two batches'
/// calls are held at once (the next is read while one is matched). Events are read, decided
/// and stored three batches at a time ([`Tuning::page_events`]).
pub const CHUNK_EVENTS: usize = 100_000;

/// Touched groups recomputed per batch, each with all its calls (~5 on average in the
/// benchmark's touched case groups); five times as many calls without a group. With apply's
/// reader, the run's connection writes a batch while the next ones are read and merged, so a
/// smaller batch lets the first write start sooner (bench/RESULTS.md). Up to five batches are in
/// memory at once: read, waiting, merged, waiting, written.
pub const APPLY_BATCH_GROUPS: usize = 5_000;

/// From this many touched calls on, apply finds their groups in one pass over `calls` rather than
/// one primary-key probe each, and reads those groups in passes ([`APPLY_PASS_GROUPS`]), when
/// they are also at least a twentieth of the table (a first run, a backfill): the probes' cost
/// grows faster than the table's (`apply/plan.rs`).
pub const APPLY_SCAN_FROM: usize = 50_000;

/// Touched groups recomputed per batch when the touched calls are that many ([`APPLY_SCAN_FROM`],
/// a twentieth of the table): each batch's calls are read in one pass over `calls` and its events
/// in one over `events`, and written back in one sweep in heap order. A batch this size holds
/// about 800k calls in the benchmark's case groups, a few hundred MB.
pub const APPLY_PASS_GROUPS: usize = 100_000;

/// Unmatched events fetched from the report's cursor at a time.
pub const REPORT_PAGE: usize = 5_000;
/// Events `report.html` shows per reason: this many of the oldest and of the newest.
pub const REPORT_SHOWN_PER_END: usize = 200;
/// Top-level metadata keys given a column of their own in `unmatched.csv` (the most frequent
/// ones); every key stays in the `metadata` column.
pub const REPORT_CSV_KEY_COLUMNS: usize = 100;

/// Below this many pending events a run decides them all again; from it on, only those whose
/// decision can have changed since the job's last run (`ledger::Unchanged`). Finding those
/// reads every call's `xmin` once (a sequential scan of `calls`), which costs about what
/// deciding this many events again does.
pub const RETRY_ALL_BELOW: usize = 100_000;

/// How long a one-shot command's allocator keeps freed memory mapped before returning it to the
/// OS, in milliseconds (mimalloc's `purge_delay`, 1,000 by default). A rematch frees a chunk's
/// calls and polars' join buffers and allocates the next chunk's a second or so later: returned
/// to the OS, they are faulted in and zeroed again (bench/RESULTS.md, "freed memory kept
/// mapped"). The daemons (`serve`, `schedule`) keep mimalloc's default: they idle between
/// runs, and memory they no longer use should go back.
pub const PURGE_DELAY_MS: i64 = 10_000;

/// [`PURGE_DELAY_MS`], unless the operator set mimalloc's own `MIMALLOC_PURGE_DELAY`, which
/// mimalloc has read already: `None` then.
pub fn purge_delay_ms() -> Option<i64> {
    std::env::var_os("MIMALLOC_PURGE_DELAY").is_none().then_some(PURGE_DELAY_MS)
}

/// The values a run uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tuning {
    /// [`CHUNK_EVENTS`], or `CALLRECON_CHUNK_EVENTS`.
    pub chunk_events: usize,
    /// Whether apply may read on a second connection while the run stores its events:
    /// `CALLRECON_APPLY_READER=off` turns it off (tests compare both ways).
    pub apply_reader: bool,
    /// [`APPLY_BATCH_GROUPS`], or `CALLRECON_APPLY_BATCH_GROUPS`.
    pub apply_batch_groups: usize,
    /// [`APPLY_SCAN_FROM`], or `CALLRECON_APPLY_SCAN_FROM`.
    pub apply_scan_from: usize,
    /// [`APPLY_PASS_GROUPS`], or `CALLRECON_APPLY_PASS_GROUPS`.
    pub apply_pass_groups: usize,
    /// [`RETRY_ALL_BELOW`], or `CALLRECON_RETRY_ALL_BELOW` (0: always only what can change).
    pub retry_all_below: usize,
    pub report: ReportTuning,
}

/// The report's sizes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReportTuning {
    /// [`REPORT_PAGE`], or `CALLRECON_REPORT_PAGE`.
    pub page: usize,
    /// [`REPORT_SHOWN_PER_END`], or `CALLRECON_REPORT_SHOWN`.
    pub shown_per_end: usize,
    /// [`REPORT_CSV_KEY_COLUMNS`], or `CALLRECON_REPORT_CSV_KEYS`.
    pub csv_key_columns: usize,
}

impl Default for Tuning {
    fn default() -> Self {
        Tuning {
            chunk_events: CHUNK_EVENTS,
            apply_reader: true,
            apply_batch_groups: APPLY_BATCH_GROUPS,
            apply_scan_from: APPLY_SCAN_FROM,
            apply_pass_groups: APPLY_PASS_GROUPS,
            retry_all_below: RETRY_ALL_BELOW,
            report: ReportTuning {
                page: REPORT_PAGE,
                shown_per_end: REPORT_SHOWN_PER_END,
                csv_key_columns: REPORT_CSV_KEY_COLUMNS,
            },
        }
    }
}

impl Tuning {
    /// The defaults, with what the environment overrides.
    pub fn from_env() -> Self {
        let d = Tuning::default();
        Tuning {
            chunk_events: size("CALLRECON_CHUNK_EVENTS", d.chunk_events),
            apply_reader: std::env::var("CALLRECON_APPLY_READER").map_or(true, |v| v != "off"),
            apply_batch_groups: size("CALLRECON_APPLY_BATCH_GROUPS", d.apply_batch_groups),
            apply_scan_from: size("CALLRECON_APPLY_SCAN_FROM", d.apply_scan_from),
            apply_pass_groups: size("CALLRECON_APPLY_PASS_GROUPS", d.apply_pass_groups),
            retry_all_below: std::env::var("CALLRECON_RETRY_ALL_BELOW")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(d.retry_all_below),
            report: ReportTuning {
                page: size("CALLRECON_REPORT_PAGE", d.report.page),
                shown_per_end: size("CALLRECON_REPORT_SHOWN", d.report.shown_per_end),
                csv_key_columns: size("CALLRECON_REPORT_CSV_KEYS", d.report.csv_key_columns),
            },
        }
    }

    /// Events read (or ingested), decided and stored at a time: three matching batches.
    pub fn page_events(&self) -> usize {
        3 * self.chunk_events
    }
}

/// A batch size: the positive integer in the environment variable `var`, else `default`.
fn size(var: &str, default: usize) -> usize {
    std::env::var(var).ok().and_then(|v| v.parse().ok()).filter(|&n| n > 0).unwrap_or(default)
}
