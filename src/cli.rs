//! Command-line definitions only (clap); `main.rs` dispatches.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{CommandFactory, Parser, Subcommand, ValueEnum};

/// `callrecon --version`: the crate's version and the commit it was built from (build.rs).
const VERSION: &str = concat!(env!("CARGO_PKG_VERSION"), " (commit ", env!("CALLRECON_COMMIT"), ")");

#[derive(Debug, Parser)]
#[command(name = "callrecon", version = VERSION, about = "Attach async metadata events to calls and report what did not match")]
pub struct Cli {
    /// PostgreSQL URL; the database is created if missing and migrated before any command. TLS
    /// as libpq's URLs say it: `sslmode=disable|prefer|require|verify-ca|verify-full`,
    /// `sslrootcert`, `sslcert`, `sslkey`.
    #[arg(long, env = "DATABASE_URL", value_name = "URL", default_value = crate::db::DEFAULT_URL, global = true, help_heading = GLOBAL)]
    pub database_url: String,

    /// Give up when the database cannot be reached or does not answer within this time
    /// (connecting, logging in, waiting for a free connection).
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = humantime::parse_duration, global = true, help_heading = GLOBAL)]
    pub connect_timeout: Duration,

    /// Give up on any one statement that runs longer (PostgreSQL's statement_timeout).
    #[arg(long, value_name = "DURATION", default_value = "30m", value_parser = humantime::parse_duration, global = true, help_heading = GLOBAL)]
    pub statement_timeout: Duration,

    /// Give up waiting for a lock someone else holds (PostgreSQL's lock_timeout): rows of calls,
    /// another job's apply.
    #[arg(long, value_name = "DURATION", default_value = "10m", value_parser = humantime::parse_duration, global = true, help_heading = GLOBAL)]
    pub lock_timeout: Duration,

    /// How connections reach PostgreSQL: `session` (directly, or PgBouncer in session pooling)
    /// or `transaction` (PgBouncer in transaction pooling: every statement in a transaction that
    /// sets callrecon's settings itself; `migrate`, `run`, `rematch`, `undo`, `enqueue`,
    /// `schedule`, `verify` and `serve`'s intake API only).
    #[arg(long, value_enum, env = "CALLRECON_POOLER", default_value_t = crate::db::Pooler::Session, global = true, help_heading = GLOBAL)]
    pub pooler: crate::db::Pooler,

    /// Do not apply pending migrations: refuse to work while any is pending, naming them (apply
    /// them with `callrecon migrate`, in a maintenance window of your choosing).
    #[arg(long, env = "CALLRECON_NO_MIGRATE", global = true, value_parser = clap::builder::FalseyValueParser::new(), help_heading = GLOBAL)]
    pub no_migrate: bool,

    /// Schema of callrecon's own tables and functions (created by `migrate` when missing).
    #[arg(long = "schema", env = "CALLRECON_SCHEMA", value_name = "NAME", default_value = "callrecon", global = true, help_heading = GLOBAL)]
    pub schema: String,

    /// Schema of the platform's calls, call_groups and event_queue.
    #[arg(long, env = "CALLRECON_PLATFORM_SCHEMA", value_name = "NAME", default_value = "public", global = true, help_heading = GLOBAL)]
    pub platform_schema: String,

    /// Log format on stderr.
    #[arg(long, value_enum, default_value_t = LogFormat::Human, global = true, help_heading = GLOBAL)]
    pub log_format: LogFormat,

    #[command(subcommand)]
    pub command: Command,
}

/// The heading of the options every command takes, listed in a command's help after its own.
const GLOBAL: &str = "Global options";

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum LogFormat {
    /// One line a message, for a person.
    Human,
    /// One JSON object a line, for a log collector.
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Apply pending migrations and exit.
    Migrate,
    /// Print the SQL that gives ROLE the privileges callrecon needs to run (every command but
    /// `migrate`, `demo` and `gen`), for the configured schemas; connects to nothing.
    Grants {
        /// The PostgreSQL role to grant to.
        role: String,
    },
    /// One reconciliation run: ingest, match, apply, report.
    Run {
        /// The job file.
        #[arg(long, value_name = "FILE")]
        job: PathBuf,
        /// Compute and report everything, change no call data, consume no event.
        #[arg(long)]
        dry_run: bool,
        /// After the run (succeeded or failed), write its metrics and the job's backlog to this
        /// file in the Prometheus text format, for node_exporter's textfile collector (a
        /// `*.prom` file in its directory). Replaced atomically.
        #[arg(long, value_name = "PATH", conflicts_with = "dry_run")]
        metrics_file: Option<PathBuf>,
    },
    /// Re-evaluate rule-based matches of events with EventTime in [--since, --until) under the
    /// job's current rules and apply the differences.
    Rematch {
        /// The job file, with the rules to decide by.
        #[arg(long, value_name = "FILE")]
        job: PathBuf,
        /// Start of the EventTime range (inclusive); a time without offset is in the job's timezone.
        #[arg(long, value_name = "TIME")]
        since: Option<String>,
        /// End of the EventTime range (exclusive).
        #[arg(long, value_name = "TIME")]
        until: Option<String>,
        /// Compute and report the changes, write none.
        #[arg(long)]
        dry_run: bool,
    },
    /// Long-running: each job at its cron times in its time zone, one run at a time per job.
    Schedule {
        /// A job file with a `schedule`; repeat for several jobs.
        #[arg(long = "job", value_name = "FILE", required = true)]
        jobs: Vec<PathBuf>,
        /// Serve Prometheus metrics at http://ADDR/metrics and a health check at /healthz
        /// (port 0: a free port; the address is printed on stdout).
        #[arg(long, value_name = "ADDR")]
        metrics_listen: Option<SocketAddr>,
    },
    /// Why an event did or did not match: each rule, its keys, candidates and decision.
    Explain {
        /// The job file, with the rules to explain by.
        #[arg(long, value_name = "FILE")]
        job: PathBuf,
        /// The event's id (the report's first column).
        event_id: i64,
    },
    /// Decide an unmatched event by hand (attach it to a call or group, or dismiss it), or apply
    /// the filled-in `resolve_to` column of a report's unmatched.csv; all or nothing.
    Resolve {
        /// The job file of the event's job.
        #[arg(long, value_name = "FILE")]
        job: PathBuf,
        /// The event (without --file).
        #[arg(required_unless_present = "file", conflicts_with = "file")]
        event_id: Option<i64>,
        /// call:ID, group:ID or dismiss (without --file).
        #[arg(long, value_name = "DECISION", required_unless_present = "file", conflicts_with = "file")]
        to: Option<String>,
        /// An unmatched.csv with resolve_to (and note) filled in where decided.
        #[arg(long, value_name = "CSV")]
        file: Option<PathBuf>,
        /// Why (needed to dismiss).
        #[arg(long, conflicts_with = "file")]
        note: Option<String>,
        /// Who decides, recorded with the decision (default: the operating-system user).
        #[arg(long, env = "USER", value_name = "NAME")]
        by: Option<String>,
        /// Check and show what would change; change nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Undo a manual decision: the event is pending again, decided by the rules at the next run.
    Reopen {
        /// The job file of the event's job.
        #[arg(long, value_name = "FILE")]
        job: PathBuf,
        /// The event whose manual decision to undo.
        event_id: i64,
        /// Why, recorded in the event's history.
        #[arg(long)]
        note: Option<String>,
        /// Who reopens, recorded with it (default: the operating-system user).
        #[arg(long, env = "USER", value_name = "NAME")]
        by: Option<String>,
    },
    /// Every change of an event's decision, oldest first.
    History {
        /// The event.
        event_id: i64,
        /// Text for a person, JSON for tools.
        #[arg(long, value_enum, default_value_t = HistoryFormat::Text)]
        format: HistoryFormat,
    },
    /// Revert the decisions run RUN made that are still as it left them; a recorded run with a
    /// report.
    Undo {
        /// The run (or rematch) whose decisions to revert (`report list` shows the runs).
        run: i64,
        /// The job file (default: the one RUN was started with).
        #[arg(long, value_name = "FILE")]
        job: Option<PathBuf>,
        /// Show what would be reverted; change nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Recompute every call's and group's async_metadata from the record of matches and list
    /// the rows that differ; exit 4 when some do (and are not repaired).
    Verify {
        /// Check only the rows this job's matched events reach (values still merge every job's events).
        #[arg(long, value_name = "FILE")]
        job: Option<PathBuf>,
        /// Write the expected values, all or nothing, holding the apply lock.
        #[arg(long)]
        repair: bool,
    },
    /// Rule changes learned from the analysts' manual decisions, each simulated on the job's
    /// events (dry); with --accept, the job file's diff for one of them.
    Suggest {
        /// The job file whose rules to improve.
        #[arg(long, value_name = "FILE")]
        job: PathBuf,
        /// Start of the EventTime range of events learned from and simulated (inclusive).
        #[arg(long, value_name = "TIME")]
        since: Option<String>,
        /// End of the EventTime range (exclusive).
        #[arg(long, value_name = "TIME")]
        until: Option<String>,
        /// Suggest a change only when at least this many manual attaches would have been made by it.
        #[arg(long, value_name = "N", default_value_t = crate::suggest::MIN_SUPPORT as u64, value_parser = clap::value_parser!(u64).range(1..))]
        min_support: u64,
        /// `text` for a person; `json` for tools, in the contract's shape.
        #[arg(long, value_enum, default_value_t = HistoryFormat::Text)]
        format: HistoryFormat,
        /// Print the job file's diff for suggestion ID (its id in the list).
        #[arg(long, value_name = "ID")]
        accept: Option<String>,
        /// With --accept: write the change into the job file, keeping its comments and layout.
        #[arg(long, requires = "accept")]
        write: bool,
        /// With --write: then rematch the scope under the changed rules.
        #[arg(long, requires = "write")]
        rematch: bool,
    },
    /// Put the events of files (inbox formats) on event_queue.
    Enqueue {
        /// Files in the inbox formats: .json, .ndjson/.jsonl, .csv.
        #[arg(required = true, value_name = "FILE")]
        files: Vec<PathBuf>,
    },
    /// Past runs and their reports.
    Report {
        #[command(subcommand)]
        command: ReportCommand,
    },
    /// Generate benchmark data (deterministic from a seed), written with COPY.
    Gen {
        #[command(subcommand)]
        command: GenCommand,
    },
    /// Load samples/ into the database and run jobs/demo.toml.
    Demo {
        /// The sample data's folder.
        #[arg(long, value_name = "DIR", default_value = "samples")]
        samples: PathBuf,
        /// The demo's job file.
        #[arg(long, value_name = "FILE", default_value = "jobs/demo.toml")]
        job: PathBuf,
    },
    /// The intake API: POST /token, POST /callevent/v1/outofband/event and …/masterCall,
    /// GET /healthz, /metrics, /openapi.json; and the analysts' review desk at /review.
    Serve(ServeArgs),
    /// Users of the intake API and analysts of the review desk.
    Users {
        #[command(subcommand)]
        command: UsersCommand,
    },
    /// Write a man page per command and the shell completions into DIR (scripts/package.sh).
    #[command(hide = true)]
    GenerateDocs {
        /// Where to write `man/*.1` and `completions/` (created if missing).
        dir: PathBuf,
    },
}

/// Writes a man page per command (`man/callrecon.1`, `man/callrecon-run.1`, …) and the shell
/// completions (`completions/callrecon.bash`, `completions/_callrecon`,
/// `completions/callrecon.fish`) into `dir`, from the definitions above.
pub fn generate_docs(dir: &Path) -> std::io::Result<()> {
    let man = dir.join("man");
    std::fs::create_dir_all(&man)?;
    clap_mangen::generate_to(Cli::command(), &man)?;
    let completions = dir.join("completions");
    std::fs::create_dir_all(&completions)?;
    for shell in [clap_complete::Shell::Bash, clap_complete::Shell::Zsh, clap_complete::Shell::Fish] {
        clap_complete::generate_to(shell, &mut Cli::command(), "callrecon", &completions)?;
    }
    Ok(())
}

#[derive(Debug, Subcommand)]
pub enum ReportCommand {
    /// Recent runs, newest first.
    List {
        /// Only this job's runs (its name).
        #[arg(long, value_name = "NAME")]
        job: Option<String>,
        /// How many runs.
        #[arg(long, default_value_t = 20)]
        limit: i64,
    },
    /// One run's report.
    Show {
        /// The run's id (`report list`).
        run: i64,
        /// Which of the report's files to print: text is a summary of report.json.
        #[arg(long, value_enum, default_value_t = ReportFormat::Text)]
        format: ReportFormat,
    },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum HistoryFormat {
    /// A table for a person.
    Text,
    /// JSON for tools.
    Json,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum ReportFormat {
    /// The summary and the unmatched events, for a terminal.
    Text,
    /// report.json.
    Json,
    /// unmatched.csv.
    Csv,
    /// report.html.
    Html,
}

/// The shape of generated data: the same values give the same calls.
#[derive(Debug, clap::Args)]
pub struct GenScale {
    /// Number of calls.
    #[arg(long, default_value_t = 5_000_000)]
    pub calls: u64,
    /// Days the calls span, ending at --until.
    #[arg(long, default_value_t = 30)]
    pub days: u32,
    /// End of the calls' span.
    #[arg(long, default_value = "2026-10-31T00:00:00Z")]
    pub until: chrono::DateTime<chrono::Utc>,
    /// Seed of the random generator: the same seed gives the same data.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// How calls are put in call groups.
    #[arg(long, value_enum, default_value_t = crate::datagen::Groups::Cases)]
    pub groups: crate::datagen::Groups,
}

#[derive(Debug, Subcommand)]
pub enum GenCommand {
    /// Call groups and calls.
    Calls {
        #[command(flatten)]
        scale: GenScale,
        /// How `calls` is laid out: one heap, or range-partitioned by `started_at` a month a
        /// partition (replacing the empty table the migrations created).
        #[arg(long, value_enum, default_value_t = crate::datagen::Layout::Plain)]
        layout: crate::datagen::Layout,
        /// With `--layout partitioned`: how much of `started_at` a partition holds.
        #[arg(long, value_enum, default_value_t = crate::datagen::PartitionBy::Month)]
        partition_by: crate::datagen::PartitionBy,
    },
    /// Events on event_queue about the calls starting in [--from, --to).
    Events {
        #[command(flatten)]
        scale: GenScale,
        /// Start of the calls' range the events are about (RFC 3339).
        #[arg(long)]
        from: chrono::DateTime<chrono::Utc>,
        /// End of that range (exclusive).
        #[arg(long)]
        to: chrono::DateTime<chrono::Utc>,
        /// How many events.
        #[arg(long)]
        count: u64,
        /// Distinguishes batches generated over the same range.
        #[arg(long, default_value_t = 0)]
        salt: u64,
        /// Percentage of the events addressed to a call group by MasterId (one in 20 of them to
        /// a group that does not exist); 0 gives the events of earlier versions.
        #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u64).range(0..=100))]
        master_share: u64,
    },
}

#[derive(Debug, Clone, clap::Args)]
pub struct ServeArgs {
    /// Address to listen on; port 0 takes a free port (the address is printed on stdout).
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// Largest request body accepted, in bytes; a larger one is answered 413.
    #[arg(long, default_value_t = 1024 * 1024)]
    pub max_body: usize,
    /// Lifetime of access tokens (`expires_in` is one second less).
    #[arg(long, default_value = "30m", value_parser = humantime::parse_duration)]
    pub token_ttl: Duration,
    /// Most events stored in one transaction (group commit).
    #[arg(long, default_value_t = 1024)]
    pub max_batch: usize,
    /// Transactions storing events in flight at once.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=32))]
    pub writers: u32,
    /// Close a connection whose request head (request line and headers) has not arrived whole
    /// within this time; it also bounds how long a keep-alive connection waits for its next request.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub header_timeout: Duration,
    /// Answer 408 (and close) when a request's body has not arrived whole within this time of its head.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub body_timeout: Duration,
    /// Close a keep-alive connection that has been idle (no request in flight, nothing sent or
    /// received) this long.
    #[arg(long, default_value = "15s", value_parser = humantime::parse_duration)]
    pub idle_timeout: Duration,
    /// Most connections open at once. Past it the connection idle the longest is closed to make
    /// room; when every one has a request in flight, new connections are answered 503.
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections: u32,
    /// Answer an event 503 (with Retry-After; nothing stored) when the database has not
    /// committed it within this time.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub request_timeout: Duration,
    /// On SIGTERM or SIGINT: idle connections close at once; requests in flight get this long to
    /// finish, then their connections are closed too and the process exits.
    #[arg(long, default_value = "20s", value_parser = humantime::parse_duration)]
    pub shutdown_timeout: Duration,
    /// A TLS-terminating proxy in front of serve (repeatable): for requests from this address
    /// the client's address is read from `X-Forwarded-For` (throttling, logs).
    #[arg(long = "trusted-proxy", value_name = "IP")]
    pub trusted_proxies: Vec<std::net::IpAddr>,
    #[command(flatten)]
    pub review: ReviewArgs,
}

impl Default for ServeArgs {
    /// The command line's defaults (for tests and embedding), listening on a free loopback port.
    fn default() -> Self {
        ServeArgs {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            max_body: 1024 * 1024,
            token_ttl: Duration::from_secs(30 * 60),
            max_batch: 1024,
            writers: 2,
            header_timeout: Duration::from_secs(30),
            body_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(15),
            max_connections: 1024,
            request_timeout: Duration::from_secs(10),
            shutdown_timeout: Duration::from_secs(20),
            trusted_proxies: Vec::new(),
            review: ReviewArgs::default(),
        }
    }
}

/// The review desk's options (`serve`).
#[derive(Debug, Clone, clap::Args)]
pub struct ReviewArgs {
    /// A job whose events the review desk explains and decides (repeatable). A job not given is
    /// found through the job file its latest run was started with.
    #[arg(long = "job", value_name = "FILE")]
    pub jobs: Vec<PathBuf>,
    /// How long an analyst stays signed in.
    #[arg(long, default_value = "8h", value_parser = humantime::parse_duration)]
    pub session_ttl: Duration,
    /// Mark the session cookie `Secure` (browsers then send it over HTTPS only): for a desk
    /// served behind a TLS-terminating proxy.
    #[arg(long)]
    pub secure_cookies: bool,
}

impl Default for ReviewArgs {
    fn default() -> Self {
        ReviewArgs { jobs: Vec::new(), session_ttl: Duration::from_secs(8 * 3600), secure_cookies: false }
    }
}

#[derive(Debug, Subcommand)]
pub enum UsersCommand {
    /// Create an API user; prints its client id and secret (the only time the secret is shown).
    Add {
        /// The user's name (a customer system, or an analyst's login).
        name: String,
        /// A role to grant (repeatable): AsyncMetaData may post events; Analyst (a person) signs
        /// in to the review desk with the name and secret.
        #[arg(long = "role", value_name = "AsyncMetaData|Analyst", required = true, value_parser = ["AsyncMetaData", "Analyst"])]
        roles: Vec<String>,
    },
    /// Every API user, active and revoked.
    List,
    /// Revoke a user: its secret and tokens stop working at once.
    Revoke {
        /// The user's name.
        name: String,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `ServeArgs::default()` (tests, embedding) is what `callrecon serve` gets with no option.
    #[test]
    fn serve_defaults_are_the_command_lines() {
        let cli = Cli::try_parse_from(["callrecon", "serve", "--listen", "127.0.0.1:0"]).unwrap();
        let Command::Serve(parsed) = cli.command else { panic!("not serve") };
        assert_eq!(format!("{parsed:?}"), format!("{:?}", ServeArgs::default()));
    }
}
